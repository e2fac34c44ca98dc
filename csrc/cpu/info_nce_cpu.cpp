// CPU kernels of the streaming InfoNCE op (see info_nce_cpu.h for the contract).
//
// Work is split into tasks = (block of queries, range of keys). A task streams its keys in
// chunks of kKC: a chunk is converted to fp32 into a small per-thread buffer when it is not
// usable in place (fp16/bf16 keys, or fp32 rows that do not have the padded layout of
// Geometry), so each key is converted once per chunk and query block. Scores come from a [3 queries x 4 keys]
// register tile of dot products along d; each [3 x chunk] row strip is then folded into an
// online log-sum-exp per query (running max and rescaled sum) and the positive sums and counts
// (forward), or turned into the gradient weights g_ij * key_scale_j (backward), which a [6 x 16]
// register tile multiplies into dqs once per chunk. The B x M score matrix never exists.
// Query blocks run in parallel; when they are too few for the threads, key ranges are split
// too, with per-range partial statistics (or partial dqs) combined at the end.
#include "cpu/info_nce_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CAPKIT_X86 1
#endif

#ifdef CAPKIT_WITH_OPENMP
#include <omp.h>
#endif

namespace capkit {
namespace cpu {
namespace {

constexpr int kKC = 64;            // keys per chunk
constexpr int kQR = 3;             // queries of the score register tile
constexpr int kKR = 4;             // keys of the score register tile
constexpr int kMR = 6;             // rows of the dqs register tile
constexpr int kNR = 16;            // columns of the dqs register tile (two AVX2 vectors)
constexpr int64_t kMaxRows = 128;  // queries per task
constexpr int64_t kMinKeys = 512;  // fewest keys of a task when key ranges are split
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool detect(bool f16c) {
#ifdef CAPKIT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         (!f16c || __builtin_cpu_supports("f16c"));
#else
  (void)f16c;
  return false;
#endif
}

const bool kHasAvx2 = detect(false);
const bool kHasF16c = detect(true);

// Uninitialised, 64-byte aligned float buffer. Sized before the parallel region, where an
// exception could not leave the thread that raised it.
class Buf {
 public:
  Buf() = default;
  Buf(Buf&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p_); }
  void allocate(size_t n) {
    std::free(p_);
    p_ = static_cast<float*>(std::aligned_alloc(64, (std::max<size_t>(n, 16) * sizeof(float) + 63) & ~size_t(63)));
    if (!p_) throw std::bad_alloc();
  }
  float* data() const { return p_; }

 private:
  float* p_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Key conversion (exact: every fp16 and bf16 value is a float32 value).

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf, nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    int e = 1;  // subnormal: shift the leading one into the implicit bit
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    return bits_to_float(sign | (uint32_t(e + 112) << 23) | ((mant & 0x3ffu) << 13));
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

void convert_row_scalar(const void* src, KeyType t, int64_t c, int64_t d, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (t == KeyType::kF16)
    for (; c < d; ++c) dst[c] = f16_to_f32(h[c]);
  else
    for (; c < d; ++c) dst[c] = bf16_to_f32(h[c]);
}

#ifdef CAPKIT_X86
__attribute__((target("avx2,fma,f16c"))) void convert_row_avx2(const void* src, KeyType t, int64_t d, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  int64_t c = 0;
  if (t == KeyType::kF16) {
    for (; c + 8 <= d; c += 8)
      _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c))));
  } else {
    for (; c + 8 <= d; c += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c)));
      _mm256_storeu_ps(dst + c, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
  convert_row_scalar(src, t, c, d, dst);
}
#endif

// Row layout shared by the query block, the key chunk and the dqs accumulator: d padded with
// zeros to dp (a multiple of 16); leading dimension ld = dp, plus 16 when dp is a multiple of
// 1024 floats (rows 4 KiB apart fall into the same L1 sets).
struct Geometry {
  int64_t d, dp, ld;
  bool direct;  // fp32 keys whose rows already have this layout are read in place
  explicit Geometry(const InfoNceArgs& a) {
    d = a.d;
    dp = cdiv(d, 16) * 16;
    ld = dp + (dp % 1024 == 0 ? 16 : 0);
    direct = a.key_type == KeyType::kF32 && ld == d;
  }
};

// Rows [j0, j0 + n) of the keys in fp32 with the geometry's layout.
const float* key_chunk(const InfoNceArgs& a, const Geometry& g, int64_t j0, int64_t n, float* buf) {
  if (g.direct) return static_cast<const float*>(a.keys) + j0 * g.d;
  for (int64_t r = 0; r < n; ++r) {
    float* dst = buf + r * g.ld;
    if (a.key_type == KeyType::kF32) {
      std::memcpy(dst, static_cast<const float*>(a.keys) + (j0 + r) * g.d, sizeof(float) * g.d);
    } else {
      const void* src = static_cast<const uint16_t*>(a.keys) + (j0 + r) * g.d;
#ifdef CAPKIT_X86
      if (kHasF16c)
        convert_row_avx2(src, a.key_type, g.d, dst);
      else
#endif
        convert_row_scalar(src, a.key_type, 0, g.d, dst);
    }
    std::fill(dst + g.d, dst + g.dp, 0.0f);
  }
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Score tile: out[r * ldo + c] = (q_r . k_c) * ks[c] for R queries (stride ldq) and C keys
// (stride ldk), over dp (a multiple of 16; zero padding beyond d).

template <int R, int C>
void score_tile_scalar(const float* q, int64_t ldq, const float* k, int64_t ldk, int64_t dp, const float* ks,
                       float* out, int64_t ldo) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float acc = 0.0f;
      for (int64_t p = 0; p < dp; ++p) acc += q[r * ldq + p] * k[c * ldk + p];
      out[r * ldo + c] = ks ? acc * ks[c] : acc;
    }
}

#ifdef CAPKIT_X86
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Named accumulators (not arrays): GCC otherwise keeps arrays in memory. Three queries by four
// keys: 12 accumulators and the 4 key vectors fill the 16 registers; each query vector is loaded
// once per step (a 4 x 3 tile needs more registers than there are and reloads its operands).
#define CAPKIT_QK(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) X(2, 0) X(2, 1) X(2, 2) X(2, 3)

template <int R, int C>
__attribute__((target("avx2,fma"))) void score_tile_avx2(const float* q, int64_t ldq, const float* k, int64_t ldk,
                                                         int64_t dp, const float* ks, float* out, int64_t ldo) {
#define CAPKIT_DECL(r, c) __m256 a##r##c = _mm256_setzero_ps();
  CAPKIT_QK(CAPKIT_DECL)
#undef CAPKIT_DECL
  for (int64_t p = 0; p < dp; p += 8) {
    const __m256 k0 = _mm256_loadu_ps(k + p);
    const __m256 k1 = C > 1 ? _mm256_loadu_ps(k + ldk + p) : k0;
    const __m256 k2 = C > 2 ? _mm256_loadu_ps(k + 2 * ldk + p) : k0;
    const __m256 k3 = C > 3 ? _mm256_loadu_ps(k + 3 * ldk + p) : k0;
#define CAPKIT_ROW(r)                                                       \
  if constexpr (R > r) {                                                    \
    const __m256 qr = _mm256_loadu_ps(q + r * ldq + p);                     \
    a##r##0 = _mm256_fmadd_ps(qr, k0, a##r##0);                             \
    if constexpr (C > 1) a##r##1 = _mm256_fmadd_ps(qr, k1, a##r##1);        \
    if constexpr (C > 2) a##r##2 = _mm256_fmadd_ps(qr, k2, a##r##2);        \
    if constexpr (C > 3) a##r##3 = _mm256_fmadd_ps(qr, k3, a##r##3);        \
  }
    CAPKIT_ROW(0) CAPKIT_ROW(1) CAPKIT_ROW(2)
#undef CAPKIT_ROW
  }
#define CAPKIT_STORE(r, c)                                              \
  if constexpr (R > r && C > c) {                                       \
    const float v = hsum8(a##r##c);                                     \
    out[r * ldo + c] = ks ? v * ks[c] : v;                              \
  }
  CAPKIT_QK(CAPKIT_STORE)
#undef CAPKIT_STORE
}
#endif

using ScoreFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t);

template <int R, int C>
void score_tile(const float* q, int64_t ldq, const float* k, int64_t ldk, int64_t dp, const float* ks, float* out,
                int64_t ldo) {
#ifdef CAPKIT_X86
  if (kHasAvx2) return score_tile_avx2<R, C>(q, ldq, k, ldk, dp, ks, out, ldo);
#endif
  score_tile_scalar<R, C>(q, ldq, k, ldk, dp, ks, out, ldo);
}

constexpr ScoreFn kScoreFns[kQR + 1][kKR + 1] = {
    {nullptr, nullptr, nullptr, nullptr, nullptr},
    {nullptr, score_tile<1, 1>, score_tile<1, 2>, score_tile<1, 3>, score_tile<1, 4>},
    {nullptr, score_tile<2, 1>, score_tile<2, 2>, score_tile<2, 3>, score_tile<2, 4>},
    {nullptr, score_tile<3, 1>, score_tile<3, 2>, score_tile<3, 3>, score_tile<3, 4>},
};

// ---------------------------------------------------------------------------------------------
// dqs tile: acc[MR x 16] (stride lda) += sum_j g[i * ldg + j] * k[j * ldk + 0..15], j < n.

template <int MR>
void dqs_tile_scalar(const float* g, int64_t ldg, const float* k, int64_t ldk, int64_t n, float* acc, int64_t lda) {
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float w = g[i * ldg + j];
      for (int c = 0; c < kNR; ++c) acc[i * lda + c] += w * k[j * ldk + c];
    }
}

#ifdef CAPKIT_X86
#define CAPKIT_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <int MR>
__attribute__((target("avx2,fma"))) void dqs_tile_avx2(const float* g, int64_t ldg, const float* k, int64_t ldk,
                                                       int64_t n, float* acc, int64_t lda) {
#define CAPKIT_DECL(i)                                                 \
  __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps(); \
  if constexpr (MR > i) {                                              \
    c##i##0 = _mm256_loadu_ps(acc + i * lda);                          \
    c##i##1 = _mm256_loadu_ps(acc + i * lda + 8);                      \
  }
  CAPKIT_ROWS(CAPKIT_DECL)
#undef CAPKIT_DECL
  for (int64_t j = 0; j < n; ++j) {
    const __m256 b0 = _mm256_loadu_ps(k + j * ldk);
    const __m256 b1 = _mm256_loadu_ps(k + j * ldk + 8);
#define CAPKIT_FMA(i)                                           \
  if constexpr (MR > i) {                                       \
    const __m256 w = _mm256_broadcast_ss(g + i * ldg + j);      \
    c##i##0 = _mm256_fmadd_ps(w, b0, c##i##0);                  \
    c##i##1 = _mm256_fmadd_ps(w, b1, c##i##1);                  \
  }
    CAPKIT_ROWS(CAPKIT_FMA)
#undef CAPKIT_FMA
  }
#define CAPKIT_STORE(i)                               \
  if constexpr (MR > i) {                             \
    _mm256_storeu_ps(acc + i * lda, c##i##0);         \
    _mm256_storeu_ps(acc + i * lda + 8, c##i##1);     \
  }
  CAPKIT_ROWS(CAPKIT_STORE)
#undef CAPKIT_STORE
}
#endif

using DqsFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <int MR>
void dqs_tile(const float* g, int64_t ldg, const float* k, int64_t ldk, int64_t n, float* acc, int64_t lda) {
#ifdef CAPKIT_X86
  if (kHasAvx2) return dqs_tile_avx2<MR>(g, ldg, k, ldk, n, acc, lda);
#endif
  dqs_tile_scalar<MR>(g, ldg, k, ldk, n, acc, lda);
}

constexpr DqsFn kDqsFns[kMR + 1] = {nullptr, dqs_tile<1>, dqs_tile<2>, dqs_tile<3>,
                                    dqs_tile<4>, dqs_tile<5>, dqs_tile<6>};

// ---------------------------------------------------------------------------------------------
// One query's scores against one chunk of keys.
struct RowCtx {
  const float* s;       // scores, n of them
  int n;
  int self;             // position of the left-out key in the chunk, or -1
  const int64_t* kid;   // chunk's key ids
  const int64_t* klab;  // chunk's key labels, or null
  int64_t qid, qlab;
};

// Per-query running statistics over a range of keys.
struct RowAcc {
  float m = kNegInf;  // running max of the kept scores
  double se = 0.0;    // sum of exp(s - m) over the kept keys
  double su = 0.0, ss = 0.0;
  int64_t cu = 0, cs = 0;
};

// Sums of one chunk (relative to the max m in use).
struct ChunkSums {
  float se = 0.0f, su = 0.0f, ss = 0.0f;
  int64_t cu = 0, cs = 0;
};

float row_max_scalar(const RowCtx& x, int c) {
  float m = kNegInf;
  for (; c < x.n; ++c)
    if (c != x.self) m = std::max(m, x.s[c]);
  return m;
}

void row_fold_scalar(const RowCtx& x, int c, float m, ChunkSums& out) {
  for (; c < x.n; ++c) {
    if (c == x.self) continue;
    const float v = x.s[c];
    out.se += std::exp(v - m);
    if (x.kid[c] == x.qid) {
      out.su += v;
      ++out.cu;
    }
    if (x.klab && x.klab[c] == x.qlab) {
      out.ss += v;
      ++out.cs;
    }
  }
}

// g[c] = (cu [u] + cs [s] + cc exp(s - lse)) * ks[c], zero for the left-out key.
void row_grad_scalar(const RowCtx& x, int c, const float* ks, float lse, float cu, float cs, float cc, float* g) {
  for (; c < x.n; ++c) {
    float v = cc * std::exp(x.s[c] - lse);
    if (x.kid[c] == x.qid) v += cu;
    if (x.klab && x.klab[c] == x.qlab) v += cs;
    if (ks) v *= ks[c];
    g[c] = c == x.self ? 0.0f : v;
  }
}

#ifdef CAPKIT_X86
// exp for x <= 88 (Cephes polynomial, about 1 ulp); 0 below -87.3 (and for -inf).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 live = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

// All-ones lanes where the 8 int64 at p equal v.
__attribute__((target("avx2,fma"))) inline __m256 eq8(const int64_t* p, __m256i v) {
  const __m256i a = _mm256_cmpeq_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), v);
  const __m256i b = _mm256_cmpeq_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4)), v);
  const __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), 0x88);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));  // lanes back in key order
}

__attribute__((target("avx2,fma"))) inline __m256 self_mask(__m256i idx, __m256i self) {
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, self));
}

__attribute__((target("avx2,fma"))) float row_max_avx2(const RowCtx& x) {
  const int n8 = x.n & ~7;
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const __m256i self = _mm256_set1_epi32(x.self), step = _mm256_set1_epi32(8);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 vm = ninf;
  for (int c = 0; c < n8; c += 8, idx = _mm256_add_epi32(idx, step))
    vm = _mm256_max_ps(vm, _mm256_blendv_ps(_mm256_loadu_ps(x.s + c), ninf, self_mask(idx, self)));
  return std::max(hmax8(vm), row_max_scalar(x, n8));
}

__attribute__((target("avx2,fma"))) void row_fold_avx2(const RowCtx& x, float m, ChunkSums& out) {
  const int n8 = x.n & ~7;
  const __m256 mv = _mm256_set1_ps(m);
  const __m256i self = _mm256_set1_epi32(x.self), step = _mm256_set1_epi32(8);
  const __m256i qid = _mm256_set1_epi64x(x.qid), qlab = _mm256_set1_epi64x(x.qlab);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 se = _mm256_setzero_ps(), su = _mm256_setzero_ps(), ss = _mm256_setzero_ps();
  __m256i cu = _mm256_setzero_si256(), cs = _mm256_setzero_si256();
  for (int c = 0; c < n8; c += 8, idx = _mm256_add_epi32(idx, step)) {
    const __m256 v = _mm256_loadu_ps(x.s + c);
    const __m256 out_self = self_mask(idx, self);
    se = _mm256_add_ps(se, _mm256_andnot_ps(out_self, exp8(_mm256_sub_ps(v, mv))));
    const __m256 pu = _mm256_andnot_ps(out_self, eq8(x.kid + c, qid));
    su = _mm256_add_ps(su, _mm256_and_ps(pu, v));
    cu = _mm256_sub_epi32(cu, _mm256_castps_si256(pu));  // all-ones lanes are -1
    if (x.klab) {
      const __m256 ps = _mm256_andnot_ps(out_self, eq8(x.klab + c, qlab));
      ss = _mm256_add_ps(ss, _mm256_and_ps(ps, v));
      cs = _mm256_sub_epi32(cs, _mm256_castps_si256(ps));
    }
  }
  alignas(32) int32_t cnt[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(cnt), cu);
  _mm256_store_si256(reinterpret_cast<__m256i*>(cnt + 8), cs);
  out.se = hsum8(se);
  out.su = hsum8(su);
  out.ss = hsum8(ss);
  for (int l = 0; l < 8; ++l) {
    out.cu += cnt[l];
    out.cs += cnt[8 + l];
  }
  row_fold_scalar(x, n8, m, out);
}

__attribute__((target("avx2,fma"))) void row_grad_avx2(const RowCtx& x, const float* ks, float lse, float cu,
                                                       float cs, float cc, float* g) {
  const int n8 = x.n & ~7;
  const __m256 lv = _mm256_set1_ps(lse), cuv = _mm256_set1_ps(cu), csv = _mm256_set1_ps(cs),
               ccv = _mm256_set1_ps(cc);
  const __m256i self = _mm256_set1_epi32(x.self), step = _mm256_set1_epi32(8);
  const __m256i qid = _mm256_set1_epi64x(x.qid), qlab = _mm256_set1_epi64x(x.qlab);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int c = 0; c < n8; c += 8, idx = _mm256_add_epi32(idx, step)) {
    __m256 v = _mm256_mul_ps(ccv, exp8(_mm256_sub_ps(_mm256_loadu_ps(x.s + c), lv)));
    v = _mm256_add_ps(v, _mm256_and_ps(eq8(x.kid + c, qid), cuv));
    if (x.klab) v = _mm256_add_ps(v, _mm256_and_ps(eq8(x.klab + c, qlab), csv));
    if (ks) v = _mm256_mul_ps(v, _mm256_loadu_ps(ks + c));
    _mm256_storeu_ps(g + c, _mm256_andnot_ps(self_mask(idx, self), v));
  }
  row_grad_scalar(x, n8, ks, lse, cu, cs, cc, g);
}
#endif

// Folds one chunk into a query's running statistics.
void fold_row(const RowCtx& x, RowAcc& acc) {
#ifdef CAPKIT_X86
  const float cmax = kHasAvx2 ? row_max_avx2(x) : row_max_scalar(x, 0);
#else
  const float cmax = row_max_scalar(x, 0);
#endif
  if (!(cmax > kNegInf)) return;  // no kept key in this chunk
  const float m = std::max(acc.m, cmax);
  if (acc.m > kNegInf && acc.m < m) acc.se *= std::exp(static_cast<double>(acc.m) - m);
  acc.m = m;
  ChunkSums cs;
#ifdef CAPKIT_X86
  if (kHasAvx2)
    row_fold_avx2(x, m, cs);
  else
#endif
    row_fold_scalar(x, 0, m, cs);
  acc.se += cs.se;
  acc.su += cs.su;
  acc.ss += cs.ss;
  acc.cu += cs.cu;
  acc.cs += cs.cs;
}

void grad_row(const RowCtx& x, const float* ks, float lse, const float* coef, float* g) {
  if (!(lse > kNegInf)) {  // no kept key at all: no gradient
    std::fill(g, g + x.n, 0.0f);
    return;
  }
#ifdef CAPKIT_X86
  if (kHasAvx2) return row_grad_avx2(x, ks, lse, coef[0], coef[1], coef[2], g);
#endif
  row_grad_scalar(x, 0, ks, lse, coef[0], coef[1], coef[2], g);
}

// ---------------------------------------------------------------------------------------------
// Task driver: rows [r0, r1) of the queries against keys [k0, k1), chunk by chunk.
// on_strip(i0, R, j0, n, S): scores of block rows i0..i0+R-1 against keys j0..j0+n-1 are in
// S[r * kKC + c]; on_chunk(j0, n, keys, ldk) runs after every strip of the chunk.

struct Work {
  Buf q, k, s, g, acc;  // query block, key chunk, score strip; backward: g rows, dqs rows
};

template <class OnStrip, class OnChunk>
void stream_keys(const InfoNceArgs& a, const Geometry& geo, int64_t r0, int64_t r1, int64_t k0, int64_t k1, Work& w,
                 OnStrip&& on_strip, OnChunk&& on_chunk) {
  const int64_t rows = r1 - r0, ld = geo.ld;
  float* q = w.q.data();
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(q + r * ld, a.qs + (r0 + r) * geo.d, sizeof(float) * geo.d);
    std::fill(q + r * ld + geo.d, q + r * ld + geo.dp, 0.0f);
  }
  float* kbuf = w.k.data();
  const int64_t ldk = geo.direct ? geo.d : ld;
  float* S = w.s.data();
  for (int64_t j0 = k0; j0 < k1; j0 += kKC) {
    const int n = static_cast<int>(std::min<int64_t>(kKC, k1 - j0));
    const float* kc = key_chunk(a, geo, j0, n, kbuf);
    const float* ks = a.key_scale ? a.key_scale + j0 : nullptr;
    for (int64_t i0 = 0; i0 < rows; i0 += kQR) {
      const int R = static_cast<int>(std::min<int64_t>(kQR, rows - i0));
      for (int c = 0; c < n; c += kKR) {
        const int C = std::min(kKR, n - c);
        kScoreFns[R][C](q + i0 * ld, ld, kc + c * ldk, ldk, geo.dp, ks ? ks + c : nullptr, S + c, kKC);
      }
      on_strip(i0, R, j0, n, S);
    }
    on_chunk(j0, n, kc, ldk);
  }
}

RowCtx row_ctx(const InfoNceArgs& a, int64_t i, int64_t j0, int n, const float* s) {
  RowCtx x;
  x.s = s;
  x.n = n;
  const int64_t self = a.self_index ? a.self_index[i] - j0 : -1;
  x.self = (self >= 0 && self < n) ? static_cast<int>(self) : -1;
  x.kid = a.kid + j0;
  x.klab = a.klab ? a.klab + j0 : nullptr;
  x.qid = a.qid[i];
  x.qlab = a.qlab ? a.qlab[i] : 0;
  return x;
}

// Tasks = n_qb query blocks x n_ks key ranges. Key ranges are split only as far as needed to
// give every thread a near-equal share (at most 15% idle), and never below kMinKeys keys.
struct Plan {
  int64_t n_qb, n_ks, threads;
  int64_t tasks() const { return n_qb * n_ks; }
  int64_t row(int64_t b, int64_t B) const { return b * B / n_qb; }
  int64_t key(int64_t r, int64_t M) const { return r * M / n_ks; }
};

Plan make_plan(int64_t B, int64_t M) {
  int64_t T = 1;
#ifdef CAPKIT_WITH_OPENMP
  T = omp_get_max_threads();
#endif
  Plan p{cdiv(B, kMaxRows), 1, 1};
  const int64_t max_ks = std::max<int64_t>(1, M / kMinKeys);
  auto balanced = [T](int64_t tasks) { return cdiv(tasks, T) * T * 100 <= tasks * 115; };
  while (p.n_ks < max_ks && !balanced(p.n_qb * p.n_ks)) ++p.n_ks;
  p.threads = std::min(T, p.tasks());
  return p;
}

// One Work per thread, sized for the largest query block.
std::vector<Work> make_work(const Plan& plan, const Geometry& geo, int64_t B, bool backward) {
  const size_t rows = static_cast<size_t>(cdiv(B, plan.n_qb)), ld = static_cast<size_t>(geo.ld);
  std::vector<Work> work(static_cast<size_t>(plan.threads));
  for (Work& w : work) {
    w.q.allocate(rows * ld);
    if (!geo.direct) w.k.allocate(static_cast<size_t>(kKC) * ld);
    w.s.allocate(static_cast<size_t>(kQR) * kKC);
    if (backward) {
      w.g.allocate(rows * kKC);
      w.acc.allocate(rows * ld);
    }
  }
  return work;
}

int thread_id() {
#ifdef CAPKIT_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace

void info_nce_forward_f32(const InfoNceArgs& a, float* stats) {
  const int64_t B = a.B, M = a.M;
  if (B == 0) return;
  const Geometry geo(a);
  const Plan plan = make_plan(B, M);
  std::vector<RowAcc> part(static_cast<size_t>(plan.n_ks * B));
  std::vector<Work> work = make_work(plan, geo, B, false);
  const int64_t tasks = plan.tasks();
#pragma omp parallel num_threads(plan.threads) if (plan.threads > 1)
  {
    Work& w = work[thread_id()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = t / plan.n_ks, kr = t % plan.n_ks;
      const int64_t r0 = plan.row(qb, B), r1 = plan.row(qb + 1, B);
      RowAcc* acc = part.data() + kr * B + r0;
      stream_keys(
          a, geo, r0, r1, plan.key(kr, M), plan.key(kr + 1, M), w,
          [&](int64_t i0, int R, int64_t j0, int n, const float* S) {
            for (int r = 0; r < R; ++r) fold_row(row_ctx(a, r0 + i0 + r, j0, n, S + r * kKC), acc[i0 + r]);
          },
          [](int64_t, int, const float*, int64_t) {});
    }
  }
  for (int64_t i = 0; i < B; ++i) {
    float m = kNegInf;
    for (int64_t kr = 0; kr < plan.n_ks; ++kr) m = std::max(m, part[kr * B + i].m);
    double se = 0.0, su = 0.0, ss = 0.0;
    int64_t cu = 0, cs = 0;
    for (int64_t kr = 0; kr < plan.n_ks; ++kr) {
      const RowAcc& p = part[kr * B + i];
      if (p.m > kNegInf) se += p.se * std::exp(static_cast<double>(p.m) - m);
      su += p.su;
      ss += p.ss;
      cu += p.cu;
      cs += p.cs;
    }
    float* o = stats + i * 5;
    o[0] = m > kNegInf ? static_cast<float>(m + std::log(se)) : kNegInf;
    o[1] = static_cast<float>(su);
    o[2] = static_cast<float>(cu);
    o[3] = static_cast<float>(ss);
    o[4] = static_cast<float>(cs);
  }
}

void info_nce_backward_f32(const InfoNceArgs& a, const float* lse, const float* coef, float* dqs) {
  const int64_t B = a.B, M = a.M, d = a.d;
  if (B == 0 || d == 0) return;
  const Geometry geo(a);
  const Plan plan = make_plan(B, M);
  const int64_t tasks = plan.tasks();
  // Each key range but the first writes a partial dqs, summed into dqs at the end.
  std::vector<float> partial(static_cast<size_t>((plan.n_ks - 1) * B * d));
  std::vector<Work> work = make_work(plan, geo, B, true);
#pragma omp parallel num_threads(plan.threads) if (plan.threads > 1)
  {
    Work& w = work[thread_id()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = t / plan.n_ks, kr = t % plan.n_ks;
      const int64_t r0 = plan.row(qb, B), r1 = plan.row(qb + 1, B), rows = r1 - r0;
      const int64_t ld = geo.ld;
      float* acc = w.acc.data();
      std::fill(acc, acc + rows * ld, 0.0f);
      float* G = w.g.data();
      stream_keys(
          a, geo, r0, r1, plan.key(kr, M), plan.key(kr + 1, M), w,
          [&](int64_t i0, int R, int64_t j0, int n, const float* S) {
            const float* ks = a.key_scale ? a.key_scale + j0 : nullptr;
            for (int r = 0; r < R; ++r) {
              const int64_t i = r0 + i0 + r;
              grad_row(row_ctx(a, i, j0, n, S + r * kKC), ks, lse[i], coef + i * 3, G + (i0 + r) * kKC);
            }
          },
          [&](int64_t, int n, const float* kc, int64_t ldk) {
            for (int64_t c0 = 0; c0 < geo.dp; c0 += kNR)
              for (int64_t i = 0; i < rows; i += kMR) {
                const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - i));
                kDqsFns[mr](G + i * kKC, kKC, kc + c0, ldk, n, acc + i * ld + c0, ld);
              }
          });
      float* dst = kr == 0 ? dqs : partial.data() + (kr - 1) * B * d;
      for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + (r0 + r) * d, acc + r * ld, sizeof(float) * d);
    }
  }
  if (plan.n_ks > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < B; ++i)
      for (int64_t kr = 1; kr < plan.n_ks; ++kr) {
        const float* p = partial.data() + ((kr - 1) * B + i) * d;
        float* o = dqs + i * d;
        for (int64_t c = 0; c < d; ++c) o[c] += p[c];
      }
  }
}

}  // namespace cpu
}  // namespace capkit
