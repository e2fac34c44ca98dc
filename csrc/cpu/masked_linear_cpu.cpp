// CPU kernels of the masked linear op (see masked_linear_cpu.h for the contract).
//
// Every product is a block-sparse GEMM over the weight's block grid. The live blocks of
// W * mask are first packed (mask applied, edges zero-padded) into contiguous b x b tiles laid
// out so that the output dimension is contiguous; an AVX2/FMA micro-kernel then accumulates a
// 6 x 16 output tile in registers over all live blocks of its block row. Dead blocks cost
// nothing, which is where the speed-up over a dense GEMM comes from at high sparsity.
#include "cpu/masked_linear_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CAPKIT_X86 1
#endif

#ifdef CAPKIT_WITH_OPENMP
#include <omp.h>
#endif

#include <cstdlib>
#include <memory>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace capkit {
namespace cpu {
namespace {

constexpr int kMR = 6;          // rows of the register tile
constexpr int kNR = 16;         // columns of the register tile (two AVX2 vectors)
constexpr int kDenseBlock = 64; // tile size used when no block layout is given
constexpr int64_t kRowTile = 96;   // rows of x per task (multiple of kMR)
constexpr int64_t kGradChunk = 256; // rows of the reduction streamed per pass in grad_weight

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice only: errors are harmless
#else
  (void)p;
  (void)bytes;
#endif
}

namespace {

// Scratch memory for the kernels: uninitialised, 2 MiB-aligned and backed by huge pages when
// large. Fresh 4 KiB pages cost one fault each on first touch, which for the tens of MB that a
// 4096-token layer needs was a third of the run time.
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(size_t n) { resize(n); }
  void resize(size_t n) {
    if (n <= size_) return;
    const size_t bytes = ((n * sizeof(float)) + (size_t(2) << 20) - 1) & ~((size_t(2) << 20) - 1);
    ptr_.reset(static_cast<float*>(std::aligned_alloc(size_t(2) << 20, bytes)));
    if (!ptr_) throw std::bad_alloc();
    advise_huge_pages(ptr_.get(), bytes);
    size_ = n;
  }
  float* data() { return ptr_.get(); }
  const float* data() const { return ptr_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr_;
  size_t size_ = 0;
};

// v masked by element i: a pruned entry of a 0/1 mask contributes nothing, even when v is not
// finite; a float mask is a multiplicative factor.
inline float apply_mask(float v, const MaskView& m, int64_t i) {
  if (m.u8) return m.u8[i] ? v : 0.0f;
  if (m.f32) return v * m.f32[i];
  return v;
}

// A layout of live blocks: either the caller's CSR/CSC, or a synthetic "all live" one.
struct Layout {
  int b;
  int64_t n_out;  // number of output block lines
  const int32_t* ptr;
  const int32_t* idx;
  std::vector<int32_t> own_ptr, own_idx;
};

// The caller's block list when `ptr` is given; otherwise every block live, with tiles of
// `dense_block` (default: the internal tile size).
Layout make_layout(const int32_t* ptr, const int32_t* idx, int block_size, int64_t out_extent,
                   int64_t red_extent, int dense_block = kDenseBlock) {
  Layout l;
  if (ptr != nullptr) {
    l.b = block_size;
    l.n_out = cdiv(out_extent, block_size);
    l.ptr = ptr;
    l.idx = idx;
    return l;
  }
  l.b = dense_block;
  l.n_out = cdiv(out_extent, l.b);
  const int64_t nred = cdiv(red_extent, l.b);
  l.own_ptr.resize(l.n_out + 1);
  l.own_idx.resize(l.n_out * nred);
  for (int64_t r = 0; r <= l.n_out; ++r) l.own_ptr[r] = static_cast<int32_t>(r * nred);
  for (int64_t r = 0; r < l.n_out; ++r)
    for (int64_t c = 0; c < nred; ++c) l.own_idx[r * nred + c] = static_cast<int32_t>(c);
  l.ptr = l.own_ptr.data();
  l.idx = l.own_idx.data();
  return l;
}

// ---------------------------------------------------------------------------------------------
// Register-tile kernels: acc[MR x 16] += A[MR x P] * B[P x 16].
// A(i, p) = A[i * a_rs + p * a_cs]; B(p, j) = B[p * ldb + j] (16 readable floats per row).
template <int MR>
void acc_tile_scalar(float* acc, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb,
                     int64_t P, int nr) {
  for (int64_t p = 0; p < P; ++p) {
    const float* b = B + p * ldb;
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * a_rs + p * a_cs];
      for (int j = 0; j < nr; ++j) acc[i * kNR + j] += a * b[j];
    }
  }
}

#ifdef CAPKIT_X86
// Named accumulators (not arrays): GCC otherwise keeps arrays in memory and stores them on
// every step of the inner loop.
#define CAPKIT_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <int MR>
__attribute__((target("avx2,fma"))) void acc_tile_avx2(float* acc, const float* A, int64_t a_rs, int64_t a_cs,
                                                       const float* B, int64_t ldb, int64_t P) {
#define CAPKIT_DECL(i)                                                          \
  __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();          \
  if constexpr (MR > i) {                                                       \
    c##i##0 = _mm256_loadu_ps(acc + i * kNR);                                   \
    c##i##1 = _mm256_loadu_ps(acc + i * kNR + 8);                               \
  }
  CAPKIT_ROWS(CAPKIT_DECL)
#undef CAPKIT_DECL
  for (int64_t p = 0; p < P; ++p) {
    const float* bp = B + p * ldb;
    const __m256 b0 = _mm256_loadu_ps(bp);
    const __m256 b1 = _mm256_loadu_ps(bp + 8);
    const float* a = A + p * a_cs;
#define CAPKIT_FMA(i)                                       \
  if constexpr (MR > i) {                                   \
    const __m256 ai = _mm256_broadcast_ss(a + i * a_rs);    \
    c##i##0 = _mm256_fmadd_ps(ai, b0, c##i##0);             \
    c##i##1 = _mm256_fmadd_ps(ai, b1, c##i##1);             \
  }
    CAPKIT_ROWS(CAPKIT_FMA)
#undef CAPKIT_FMA
  }
#define CAPKIT_STORE(i)                           \
  if constexpr (MR > i) {                         \
    _mm256_storeu_ps(acc + i * kNR, c##i##0);     \
    _mm256_storeu_ps(acc + i * kNR + 8, c##i##1); \
  }
  CAPKIT_ROWS(CAPKIT_STORE)
#undef CAPKIT_STORE
}

// Forward/dx register tile over all live blocks of one output block line:
// out[MR x 16] = init + sum_e A[:, idx[e]*b : +plen] @ packed[e][:, jc : jc+16].
template <int MR>
__attribute__((target("avx2,fma"))) void bsr_tile_avx2(const float* A, int64_t lda, const int32_t* idx, int64_t e0,
                                                       int64_t e1, const float* packed, int b, int64_t P, int jc,
                                                       const float* init, float* out, int64_t ldo) {
  const __m256 i0 = _mm256_loadu_ps(init), i1 = _mm256_loadu_ps(init + 8);
#define CAPKIT_DECL(i) __m256 c##i##0 = i0, c##i##1 = i1;
  CAPKIT_ROWS(CAPKIT_DECL)
#undef CAPKIT_DECL
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t p0 = static_cast<int64_t>(idx[e]) * b;
    const int64_t plen = std::min<int64_t>(b, P - p0);
    const float* B = packed + e * b * b + jc;
    const float* a = A + p0;
    for (int64_t p = 0; p < plen; ++p) {
      const __m256 b0 = _mm256_loadu_ps(B + p * b);
      const __m256 b1 = _mm256_loadu_ps(B + p * b + 8);
#define CAPKIT_FMA(i)                                              \
  if constexpr (MR > i) {                                          \
    const __m256 ai = _mm256_broadcast_ss(a + i * lda + p);        \
    c##i##0 = _mm256_fmadd_ps(ai, b0, c##i##0);                    \
    c##i##1 = _mm256_fmadd_ps(ai, b1, c##i##1);                    \
  }
      CAPKIT_ROWS(CAPKIT_FMA)
#undef CAPKIT_FMA
    }
  }
#define CAPKIT_STORE(i)                              \
  if constexpr (MR > i) {                            \
    _mm256_storeu_ps(out + i * ldo, c##i##0);        \
    _mm256_storeu_ps(out + i * ldo + 8, c##i##1);    \
  }
  CAPKIT_ROWS(CAPKIT_STORE)
#undef CAPKIT_STORE
}

using RowTileFn = void (*)(const float*, int64_t, const int32_t*, int64_t, int64_t, const float*, int, int64_t, int,
                           const float*, float*, int64_t);
constexpr RowTileFn kRowTileFns[kMR + 1] = {nullptr,          bsr_tile_avx2<1>, bsr_tile_avx2<2>, bsr_tile_avx2<3>,
                                            bsr_tile_avx2<4>, bsr_tile_avx2<5>, bsr_tile_avx2<6>};
#endif

bool detect_avx2() {
#ifdef CAPKIT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool detect_avx512f() {
#ifdef CAPKIT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

const bool kHasAvx2 = cpu_has_avx2_fma();

template <int MR>
inline void acc_tile(float* acc, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb,
                     int64_t P, int nr) {
#ifdef CAPKIT_X86
  if (kHasAvx2 && nr == kNR) {
    acc_tile_avx2<MR>(acc, A, a_rs, a_cs, B, ldb, P);
    return;
  }
#endif
  acc_tile_scalar<MR>(acc, A, a_rs, a_cs, B, ldb, P, nr);
}

using TileFn = void (*)(float*, const float*, int64_t, int64_t, const float*, int64_t, int64_t, int);
constexpr TileFn kTileFns[kMR + 1] = {nullptr,          acc_tile<1>, acc_tile<2>, acc_tile<3>,
                                      acc_tile<4>,      acc_tile<5>, acc_tile<6>};

// ---------------------------------------------------------------------------------------------
// Packing: tile e of the list holds W' restricted to its block, as [red (b) x out (b)], so the
// micro-kernel reads 16 contiguous output columns per reduction step. Padding is zero.
// out_is_n: true for the forward (output = weight rows n, reduction = k), false for dx.
void pack_blocks(const float* weight, const MaskView& mask, int64_t N, int64_t K, const Layout& l,
                 bool out_is_n, Scratch& packed) {
  const int b = l.b;
  const int64_t nnz = l.ptr[l.n_out];
  packed.resize(static_cast<size_t>(nnz) * b * b);
  float* dst_all = packed.data();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t o = 0; o < l.n_out; ++o) {
    for (int64_t e = l.ptr[o]; e < l.ptr[o + 1]; ++e) {
      const int64_t rblk = l.idx[e];
      const int64_t n0 = out_is_n ? o * b : rblk * b;
      const int64_t k0 = out_is_n ? rblk * b : o * b;
      float* dst = dst_all + e * b * b;
      for (int nn = 0; nn < b; ++nn) {
        const int64_t n = n0 + nn;
        for (int kk = 0; kk < b; ++kk) {
          const int64_t k = k0 + kk;
          float v = 0.0f;
          if (n < N && k < K) v = apply_mask(weight[n * K + k], mask, n * K + k);
          if (out_is_n)
            dst[kk * b + nn] = v;  // [k][n]
          else
            dst[nn * b + kk] = v;  // [n][k]
        }
      }
    }
  }
}

// C[M x J] = A[M x P] @ W'-blocks (+ bias). A row-major with leading dimension lda.
bool bad_stride(int64_t ld);

// C[M x J] = A[M x P] @ W'-blocks (+ bias). A row-major with leading dimension lda.
// Task = (tile of kRowTile rows, one output block line); each register tile accumulates over
// all live blocks of its line. When lda is a multiple of 4 KiB, the rows of a task's live
// blocks are first gathered into a small per-thread panel with a benign stride.
void bsr_gemm(const float* A, int64_t lda, int64_t M, int64_t P, const Layout& l, const float* packed,
              const float* bias, float* C, int64_t J) {
  const int b = l.b;
  const int64_t n_mt = cdiv(M, kRowTile);
  const int64_t tasks = n_mt * l.n_out;
  const bool pack_a = bad_stride(lda);
  int64_t max_line = 0;
  for (int64_t o = 0; o < l.n_out; ++o) max_line = std::max<int64_t>(max_line, l.ptr[o + 1] - l.ptr[o]);
  std::vector<int32_t> iota(max_line);
  for (int64_t i = 0; i < max_line; ++i) iota[i] = static_cast<int32_t>(i);
#pragma omp parallel
  {
    std::vector<float> panel;
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t mt = t / l.n_out, o = t % l.n_out;
      const int64_t m_begin = mt * kRowTile, m_end = std::min(M, (mt + 1) * kRowTile);
      // Operands of this task: A rows, the list of live blocks and where they sit.
      const float* At = A + m_begin * lda;
      int64_t ldt = lda, Pt = P, e0 = l.ptr[o], e1 = l.ptr[o + 1];
      const int32_t* idx = l.idx;
      const float* pk = packed;
      if (pack_a) {
        const int64_t nblk = e1 - e0;
        ldt = nblk * b + (bad_stride(nblk * b) ? 16 : 0);
        panel.assign(static_cast<size_t>(m_end - m_begin) * ldt, 0.0f);  // zero beyond P
        for (int64_t r = 0; r < m_end - m_begin; ++r)
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t p0 = static_cast<int64_t>(l.idx[e]) * b;
            std::memcpy(panel.data() + r * ldt + (e - e0) * b, At + r * lda + p0,
                        sizeof(float) * std::min<int64_t>(b, P - p0));
          }
        At = panel.data();
        Pt = nblk * b;
        idx = iota.data();
        pk = packed + e0 * b * b;
        e1 -= e0;
        e0 = 0;
      }
      alignas(32) float acc[kMR * kNR];
      for (int64_t m = m_begin; m < m_end; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m_end - m));
        const float* Am = At + (m - m_begin) * ldt;
        for (int jc = 0; jc < b; jc += kNR) {
          const int64_t j0 = o * b + jc;
          if (j0 >= J) break;
          const int nvalid = static_cast<int>(std::min<int64_t>(kNR, J - j0));
#ifdef CAPKIT_X86
          if (kHasAvx2) {
            alignas(32) float init[kNR] = {0};
            if (bias)
              for (int j = 0; j < nvalid; ++j) init[j] = bias[j0 + j];
            if (nvalid == kNR) {  // full tile: registers go straight to the output
              kRowTileFns[mr](Am, ldt, idx, e0, e1, pk, b, Pt, jc, init, C + m * J + j0, J);
            } else {
              kRowTileFns[mr](Am, ldt, idx, e0, e1, pk, b, Pt, jc, init, acc, kNR);
              for (int i = 0; i < mr; ++i) std::memcpy(C + (m + i) * J + j0, acc + i * kNR, sizeof(float) * nvalid);
            }
            continue;
          }
#endif
          for (int i = 0; i < mr; ++i)
            for (int j = 0; j < kNR; ++j) acc[i * kNR + j] = (bias && j < nvalid) ? bias[j0 + j] : 0.0f;
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t p0 = static_cast<int64_t>(idx[e]) * b;
            const int64_t plen = std::min<int64_t>(b, Pt - p0);
            kTileFns[mr](acc, Am + p0, ldt, 1, pk + e * b * b + jc, b, plen, kNR);
          }
          for (int i = 0; i < mr; ++i) std::memcpy(C + (m + i) * J + j0, acc + i * kNR, sizeof(float) * nvalid);
        }
      }
    }
  }
}

// Rows whose stride is a multiple of 4 KiB fall into one L1 set (and alias in the load/store
// unit), which slows the 6-row register tile several-fold: such operands are copied once with a
// padded leading dimension. The copy is O(rows * cols), small next to the GEMM it feeds.
bool bad_stride(int64_t ld) { return ld % 1024 == 0; }

const float* padded_rows(const float* src, int64_t rows, int64_t cols, int64_t& ld, Scratch& buf) {
  ld = cols;
  if (!bad_stride(cols)) return src;
  ld = cols + 16;
  buf.resize(static_cast<size_t>(rows) * ld);
  float* dst = buf.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src + r * cols, sizeof(float) * cols);
  return dst;
}

// dst[c, r] = src[r, c] for src [rows, cols]; dst has leading dimension ld_dst (>= rows).
void transpose_into(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  constexpr int64_t T = 32;
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < cols; c0 += T)
    for (int64_t r0 = 0; r0 < rows; r0 += T) {
      const int64_t r1 = std::min(rows, r0 + T), c1 = std::min(cols, c0 + T);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * cols + c];
    }
}

}  // namespace

void masked_linear_forward_f32(const float* x, const float* weight, MaskView mask, const float* bias, float* y,
                               int64_t M, int64_t N, int64_t K, const int32_t* row_ptr, const int32_t* col_idx,
                               int block_size) {
  if (M == 0 || N == 0) return;
  const Layout l = make_layout(row_ptr, col_idx, block_size, N, K);
  Scratch packed;
  pack_blocks(weight, mask, N, K, l, /*out_is_n=*/true, packed);
  bsr_gemm(x, K, M, K, l, packed.data(), bias, y, N);
}

void masked_linear_grad_input_f32(const float* grad_out, const float* weight, MaskView mask, float* dx, int64_t M,
                                  int64_t N, int64_t K, const int32_t* col_ptr, const int32_t* row_idx,
                                  int block_size) {
  if (M == 0 || K == 0) return;
  const Layout l = make_layout(col_ptr, row_idx, block_size, K, N);
  Scratch packed;
  pack_blocks(weight, mask, N, K, l, /*out_is_n=*/false, packed);
  bsr_gemm(grad_out, N, M, N, l, packed.data(), nullptr, dx, K);
}

void masked_linear_grad_weight_f32(const float* grad_out, const float* x, const float* weight, MaskView mask,
                                   float* dweight, float* dmask, int64_t M, int64_t N, int64_t K,
                                   const int32_t* row_ptr, const int32_t* col_idx, int block_size) {
  // With a mask gradient every element of G is needed (tiled on the caller's block grid, so
  // that dead blocks can still be told apart); otherwise only the live blocks are computed.
  const bool use_layout = row_ptr != nullptr && dmask == nullptr;
  const Layout l = use_layout ? make_layout(row_ptr, col_idx, block_size, N, K)
                              : make_layout(nullptr, nullptr, 0, N, K, row_ptr ? block_size : kDenseBlock);
  const int b = l.b;
  const int64_t nnz = l.ptr[l.n_out];
  // Live-block bitmap of the caller's grid, for dW on the dense-G path (dead blocks are mask 0).
  std::vector<uint8_t> live;
  const int64_t nbc = cdiv(K, b);
  if (row_ptr != nullptr && !use_layout) {
    live.assign(static_cast<size_t>(cdiv(N, b)) * nbc, 0);
    for (int64_t r = 0; r < cdiv(N, b); ++r)
      for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) live[r * nbc + col_idx[e]] = 1;
  }
  if (dweight && use_layout) {
    // Dead blocks keep a zero gradient; live blocks are overwritten below.
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) std::memset(dweight + n * K, 0, sizeof(float) * K);
  }
  // grad_out^T with a padded leading dimension, so the 6 rows of a register tile (6 output
  // features) are read with a benign stride; x likewise if its stride is a multiple of 4 KiB.
  const int64_t ldt = bad_stride(M) ? M + 16 : M;
  Scratch gt(static_cast<size_t>(N) * ldt);
  transpose_into(grad_out, M, N, gt.data(), ldt);
  Scratch xbuf;
  int64_t ldx;
  const float* xp = padded_rows(x, M, K, ldx, xbuf);
  // Block-row of each live block, for the flat parallel loop.
  std::vector<int32_t> block_row(nnz);
  for (int64_t o = 0; o < l.n_out; ++o)
    for (int64_t e = l.ptr[o]; e < l.ptr[o + 1]; ++e) block_row[e] = static_cast<int32_t>(o);

#pragma omp parallel
  {
    std::vector<float> g(static_cast<size_t>(b) * b);
    alignas(32) float acc[kMR * kNR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < nnz; ++e) {
      const int64_t n0 = static_cast<int64_t>(block_row[e]) * b;
      const int64_t k0 = static_cast<int64_t>(l.idx[e]) * b;
      const int bn = static_cast<int>(std::min<int64_t>(b, N - n0));
      const int bk = static_cast<int>(std::min<int64_t>(b, K - k0));
      std::fill(g.begin(), g.end(), 0.0f);
      for (int64_t m0 = 0; m0 < M; m0 += kGradChunk) {
        const int64_t mlen = std::min<int64_t>(kGradChunk, M - m0);
        for (int i = 0; i < bn; i += kMR) {
          const int mr = std::min(kMR, bn - i);
          for (int jc = 0; jc < bk; jc += kNR) {
            const int nr = std::min(kNR, bk - jc);
            for (int ii = 0; ii < mr; ++ii)
              for (int j = 0; j < kNR; ++j) acc[ii * kNR + j] = j < nr ? g[(i + ii) * b + jc + j] : 0.0f;
            // A(i, p) = grad_out[m0 + p, n0 + i] = gt[n0 + i, m0 + p]; B(p, j) = x[m0 + p, k0 + jc + j].
            kTileFns[mr](acc, gt.data() + (n0 + i) * ldt + m0, ldt, 1, xp + m0 * ldx + k0 + jc, ldx, mlen, nr);
            for (int ii = 0; ii < mr; ++ii)
              for (int j = 0; j < nr; ++j) g[(i + ii) * b + jc + j] = acc[ii * kNR + j];
          }
        }
      }
      const bool dead = !live.empty() && !live[(n0 / b) * nbc + k0 / b];
      for (int nn = 0; nn < bn; ++nn) {
        const int64_t row = (n0 + nn) * K + k0;
        const float* gr = g.data() + static_cast<size_t>(nn) * b;
        if (dweight && dead)
          std::memset(dweight + row, 0, sizeof(float) * bk);
        else if (dweight)
          for (int kk = 0; kk < bk; ++kk) dweight[row + kk] = apply_mask(gr[kk], mask, row + kk);
        if (dmask)
          for (int kk = 0; kk < bk; ++kk) dmask[row + kk] = gr[kk] * weight[row + kk];
      }
    }
  }
}

// Function-local statics: safe to call from other files' static initialisers.
bool cpu_has_avx2_fma() {
  static const bool has = detect_avx2();
  return has;
}

bool cpu_has_avx512f() {
  static const bool has = detect_avx512f();
  return has;
}

int cpu_max_threads() {
#ifdef CAPKIT_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace capkit
