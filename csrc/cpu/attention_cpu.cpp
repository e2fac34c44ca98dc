// Scaled dot-product attention on the CPU (contract in attention_cpu.h).
//
// A task is one (batch, head) and a range of query rows. It copies the head's keys once,
// transposed, into kT [D][Skp] (Skp: Sk rounded up to 16, zero columns past Sk), then walks its
// query rows four at a time: the four rows' scores against 64 keys at a time stay in 16 AVX-512
// registers while the D features stream past (one 16-key load of kT serves four rows); the softmax
// runs on the four score rows in L1 (vector exp, see vec_math.h); the weighted sum of the value
// rows again keeps four output rows in registers, up to 64 features at a time, with the value row
// loaded once for the four. The 1 / sum of the softmax is applied to the output, not to the
// probabilities.
#include "cpu/attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

#include "cpu/masked_linear_cpu.h"
#include "cpu/sparse_linear_cpu.h"
#include "cpu/vec_math.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CAPKIT_X86 1
#endif

namespace capkit {
namespace cpu {
namespace {

constexpr int kRows = 4;    // query rows per block
constexpr int kChunks = 4;  // 16-float vectors per register tile (64 keys, or 64 features)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

const bool kAvx512 = cpu_has_avx512f();
std::atomic<bool> g_force_plain{false};

float* scratch(size_t n) { return thread_scratch_f32(n, 0); }  // the CSR kernel's, shared

const float* mask_row(const AttentionArgs& a, int64_t b, int64_t h, int64_t i) {
  return a.mask ? a.mask + b * a.m_sb + h * a.m_sh + i * a.m_si : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Plain path (any CPU, any D): one query row at a time.
void rows_plain(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1, float* s) {
  const float* kh = a.k + b * a.k_sb + h * a.k_sh;
  const float* vh = a.v + b * a.v_sb + h * a.v_sh;
  for (int64_t i = i0; i < i1; ++i) {
    const float* qi = a.q + b * a.q_sb + h * a.q_sh + i * a.q_ss;
    const float* m = mask_row(a, b, h, i);
    float mx = kNegInf;
    for (int64_t j = 0; j < a.Sk; ++j) {
      const float* kj = kh + j * a.k_ss;
      float dot = 0.0f;
      for (int64_t d = 0; d < a.D; ++d) dot += qi[d] * kj[d];
      s[j] = dot * a.scale + (m ? m[j * a.m_sj] : 0.0f);
      mx = std::max(mx, s[j]);
    }
    float* o = a.out + ((b * a.Sq + i) * a.H + h) * a.D;
    std::fill(o, o + a.D, 0.0f);
    if (mx == kNegInf) continue;  // every key removed: zeros
    float sum = 0.0f;
    for (int64_t j = 0; j < a.Sk; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < a.Sk; ++j) {
      const float* vj = vh + j * a.v_ss;
      const float p = s[j] * inv;
      for (int64_t d = 0; d < a.D; ++d) o[d] += p * vj[d];
    }
  }
}

#ifdef CAPKIT_X86
// ---------------------------------------------------------------------------------------------
// AVX-512 path.

// s[r][0 : 16C] = scale * q_r . kT[:, 0 : 16C] for R query rows.
template <int R, int C>
__attribute__((target("avx512f"))) void qk_tile(const float* const* q, const float* kt, int64_t ldk, int64_t D,
                                                float scale, float* s, int64_t lds) {
  __m512 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) kv[c] = _mm512_load_ps(kt + d * ldk + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r][d]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 y[R][C];  // scaled first, stored after (see pv_tile)
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) y[r][c] = _mm512_mul_ps(acc[r][c], vs);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_store_ps(s + r * lds + 16 * c, y[r][c]);
}

// o_r[0 : 16C] = inv_r * sum_j p[r][j] v_j[0 : 16C] for R rows (the last vector under `tail`).
template <int R, int C>
__attribute__((target("avx512f"))) void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t Sk,
                                                __mmask16 tail, const float* inv, float* const* o) {
  __m512 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Sk; ++j) {
    __m512 vv[C];
    const float* vj = v + j * ldv;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c)
      vv[c] = c == C - 1 ? _mm512_maskz_loadu_ps(tail, vj + 16 * c) : _mm512_loadu_ps(vj + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  // scaled first, stored after: with the stores (through float*, which may alias the vector
  // accumulators) interleaved, GCC kept every accumulator in memory inside the loop (3x slower)
  __m512 y[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 vi = _mm512_set1_ps(inv[r]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) y[r][c] = _mm512_mul_ps(acc[r][c], vi);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      if (c == C - 1)
        _mm512_mask_storeu_ps(o[r] + 16 * c, tail, y[r][c]);
      else
        _mm512_storeu_ps(o[r] + 16 * c, y[r][c]);
    }
  }
}

using QkFn = void (*)(const float* const*, const float*, int64_t, int64_t, float, float*, int64_t);
using PvFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __mmask16, const float*, float* const*);

template <int R>
constexpr QkFn qk_of(int c) {
  return c == 1 ? qk_tile<R, 1> : c == 2 ? qk_tile<R, 2> : c == 3 ? qk_tile<R, 3> : qk_tile<R, 4>;
}
template <int R>
constexpr PvFn pv_of(int c) {
  return c == 1 ? pv_tile<R, 1> : c == 2 ? pv_tile<R, 2> : c == 3 ? pv_tile<R, 3> : pv_tile<R, 4>;
}
QkFn qk_fn(int r, int c) {
  return r == 1 ? qk_of<1>(c) : r == 2 ? qk_of<2>(c) : r == 3 ? qk_of<3>(c) : qk_of<4>(c);
}
PvFn pv_fn(int r, int c) {
  return r == 1 ? pv_of<1>(c) : r == 2 ? pv_of<2>(c) : r == 3 ? pv_of<3>(c) : pv_of<4>(c);
}

// Softmax of one score row in place over [0, skp): the mask added, keys past sk removed; returns
// 1 / sum of the exponentials (0 for a row whose keys are all removed, whose output is then 0).
__attribute__((target("avx512f"))) float softmax_row(float* s, int64_t sk, int64_t skp, const float* m, int64_t m_sj) {
  if (m) {
    if (m_sj == 1) {
      int64_t j = 0;
      for (; j + 16 <= sk; j += 16) _mm512_store_ps(s + j, _mm512_add_ps(_mm512_load_ps(s + j), _mm512_loadu_ps(m + j)));
      for (; j < sk; ++j) s[j] += m[j];
    } else {
      for (int64_t j = 0; j < sk; ++j) s[j] += m[j * m_sj];
    }
  }
  for (int64_t j = sk; j < skp; ++j) s[j] = kNegInf;
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < skp; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j));
  const float row_max = _mm512_reduce_max_ps(mx);
  if (row_max == kNegInf) {
    std::memset(s, 0, sizeof(float) * skp);
    return 0.0f;
  }
  const __m512 vmax = _mm512_set1_ps(row_max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < skp; j += 16) {
    const __m512 e = exp_neg_avx512(_mm512_sub_ps(_mm512_load_ps(s + j), vmax));
    _mm512_store_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

void rows_avx512(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  const int64_t skp = cdiv(a.Sk, 16) * 16, D = a.D, ldv = cdiv(D, 16) * 16;
  float* kt = scratch(static_cast<size_t>(D * skp + kRows * skp + a.Sk * ldv));
  float* s = kt + D * skp;
  float* vc = s + kRows * skp;
  const float* kh = a.k + b * a.k_sb + h * a.k_sh;
  transpose_f32(kh, a.k_ss, a.Sk, D, kt, skp);
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * skp + a.Sk, kt + (d + 1) * skp, 0.0f);
  // The head's value rows copied together ([Sk][ldv]): in a [B, S, H * D] layout they lie H * D
  // floats apart, a stride that maps them onto few L1 sets, so that the weighted sums (which
  // read all of them for every four query rows) kept missing L1 (2x slower).
  const float* vh = a.v + b * a.v_sb + h * a.v_sh;
  for (int64_t j = 0; j < a.Sk; ++j) std::memcpy(vc + j * ldv, vh + j * a.v_ss, sizeof(float) * D);
  const int64_t d_vecs = cdiv(D, 16);
  const int tail_bits = static_cast<int>(D - (d_vecs - 1) * 16);  // 1 .. 16 features in the last vector
  for (int64_t r0 = i0; r0 < i1; r0 += kRows) {
    const int R = static_cast<int>(std::min<int64_t>(kRows, i1 - r0));
    const float* q[kRows];
    float* o[kRows];
    float inv[kRows];
    for (int r = 0; r < R; ++r) {
      q[r] = a.q + b * a.q_sb + h * a.q_sh + (r0 + r) * a.q_ss;
      o[r] = a.out + ((b * a.Sq + r0 + r) * a.H + h) * D;
    }
    for (int64_t c0 = 0; c0 < skp / 16; c0 += kChunks) {
      const int C = static_cast<int>(std::min<int64_t>(kChunks, skp / 16 - c0));
      qk_fn(R, C)(q, kt + 16 * c0, skp, D, a.scale, s + 16 * c0, skp);
    }
    for (int r = 0; r < R; ++r) inv[r] = softmax_row(s + r * skp, a.Sk, skp, mask_row(a, b, h, r0 + r), a.m_sj);
    for (int64_t c0 = 0; c0 < d_vecs; c0 += kChunks) {
      const int C = static_cast<int>(std::min<int64_t>(kChunks, d_vecs - c0));
      const bool last = c0 + C == d_vecs;
      const __mmask16 tail = last ? static_cast<__mmask16>((1u << tail_bits) - 1u) : static_cast<__mmask16>(0xFFFF);
      float* oc[kRows];
      for (int r = 0; r < R; ++r) oc[r] = o[r] + 16 * c0;
      pv_fn(R, C)(s, skp, vc + 16 * c0, ldv, a.Sk, tail, inv, oc);
    }
  }
}
#endif

}  // namespace

void attention_force_plain(bool on) { g_force_plain.store(on); }

bool attention_vectorised() {
#ifdef CAPKIT_X86
  return kAvx512;
#else
  return false;
#endif
}

void attention_forward_f32(const AttentionArgs& a) {
  if (a.B == 0 || a.H == 0 || a.Sq == 0 || a.D == 0) return;
  if (a.Sk == 0) {  // no keys: zeros, like a row whose keys are all removed
    std::fill(a.out, a.out + a.B * a.Sq * a.H * a.D, 0.0f);
    return;
  }
  const int threads = cpu_max_threads();
  const int64_t heads = a.B * a.H;
  // Split each head's rows into parts when there are fewer heads than twice the threads (whole
  // blocks of kRows rows per part; each part copies the head's keys again).
  const int64_t blocks = cdiv(a.Sq, kRows);
  const int64_t parts = std::min<int64_t>(blocks, std::max<int64_t>(1, cdiv(2 * threads, heads)));
  const int64_t rows_per_part = cdiv(blocks, parts) * kRows;
  const int64_t tasks = heads * parts;
  const bool plain = g_force_plain.load();
  (void)plain;  // unused without x86
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t bh = t / parts, part = t % parts;
    const int64_t b = bh / a.H, h = bh % a.H;
    const int64_t i0 = part * rows_per_part, i1 = std::min<int64_t>(a.Sq, i0 + rows_per_part);
    if (i0 >= i1) continue;
#ifdef CAPKIT_X86
    if (kAvx512 && !plain) {
      rows_avx512(a, b, h, i0, i1);
      continue;
    }
#endif
    rows_plain(a, b, h, i0, i1, scratch(static_cast<size_t>(a.Sk)));
  }
}

}  // namespace cpu
}  // namespace capkit
