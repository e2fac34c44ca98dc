// Vector exp shared by the CPU kernels (the GELU's erf, the attention's softmax).
//
// exp(x) for x <= 0: range reduction x = n ln2 + r, r in [-ln2/2, ln2/2], then a degree-6
// Taylor polynomial of exp(r) (relative error about 1.2e-7) scaled by 2^n; exactly 0 for x < -80,
// where the result would otherwise be a denormal (which costs the FMA units some hundred cycles
// each). -inf gives 0.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace capkit {
namespace cpu {

constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f;
// exp(r) = sum r^j / j!, j = 6 .. 0, in Horner order (shared by the AVX-512 and AVX2 paths)
constexpr int kExpTerms = 7;
constexpr float kExpTaylor[kExpTerms] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) inline __m512 exp_neg_avx512(__m512 x0) {  // x0 <= 0
  const __m512 x = _mm512_max_ps(x0, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 q = _mm512_set1_ps(kExpTaylor[0]);
  for (int j = 1; j < kExpTerms; ++j) q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kExpTaylor[j]));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x0, _mm512_set1_ps(-80.0f), _CMP_GE_OQ), _mm512_scalef_ps(q, n));
}

__attribute__((target("avx2,fma"))) inline __m256 exp_neg_avx2(__m256 x0) {  // x0 <= 0
  const __m256 x = _mm256_max_ps(x0, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 q = _mm256_set1_ps(kExpTaylor[0]);
  for (int j = 1; j < kExpTerms; ++j) q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(kExpTaylor[j]));
  // 2^n through the exponent bits (n >= -126 after the clamp above)
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(q, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x0, _mm256_set1_ps(-80.0f), _CMP_GE_OQ));
}
#endif

}  // namespace cpu
}  // namespace capkit
