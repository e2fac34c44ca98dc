// Masked / block-sparse linear layer kernels.
//
// All three ops are one tiled GEMM template (masked_gemm_kernel) that differs
// in where its two operands come from and how its output is written:
//   Fwd    : y[m, n]  = sum_k x[m, k]        * W'[n, k]   (+ bias[n])
//   GradIn : dx[m, k] = sum_n grad_out[m, n] * W'[n, k]
//   GradW  : G[n, k]  = sum_m grad_out[m, n] * x[m, k]    -> dW, dM
// W' = weight * mask is formed while W tiles are staged into shared memory
// and is never written to global memory.  Dead blocks of a block layout are
// skipped by walking only the live entries of the CSR row (Fwd) or CSC
// column (GradIn) that owns the CTA's output tile; GradW without a mask
// gradient runs one CTA per live block.
//
// When the output has too few tiles to fill the GPU (few tokens in Fwd /
// GradIn, small or very sparse weights in GradW), each tile's reduction is
// split over more CTAs that write fp32 partials to a workspace; a second
// kernel sums them in a fixed order (deterministic, unlike fp32 atomics).
//
// Math: fp16/bf16 use WMMA 16x16x16 tensor-core fragments with fp32
// accumulators; fp32 uses SIMT FMA (exact fp32 products, so fp32 results stay
// within the ~1e-4 relative tolerance the fp32 reference checks use; TF32
// would not).
//
// Pipeline: two shared-memory stages.  While the MMAs consume chunk t, the
// unmasked tiles of chunk t+1 arrive by cp.async and the masked W tile of
// chunk t+1 is loaded into registers; after the MMAs it is masked and
// stored, so one __syncthreads per chunk suffices.

#include "launch.cuh"
#include "masked_linear.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace capkit {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Element helpers

template <typename T>
struct Num;

template <>
struct Num<float> {
  __device__ __forceinline__ static float to_f(float v) { return v; }
  __device__ __forceinline__ static float from_f(float v) { return v; }
  __device__ __forceinline__ static float bits_to_f(uint32_t b) { return __uint_as_float(b); }
  __device__ __forceinline__ static uint32_t f_to_bits(float v) { return __float_as_uint(v); }
};

template <>
struct Num<__half> {
  __device__ __forceinline__ static float to_f(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static float bits_to_f(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ __forceinline__ static uint32_t f_to_bits(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

template <>
struct Num<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static float bits_to_f(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
  }
  __device__ __forceinline__ static uint32_t f_to_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// Element e of a 16-byte chunk holding 16 / sizeof(T) elements.
template <typename T>
__device__ __forceinline__ uint32_t chunk_get(const uint4& u, int e) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&u);
  if constexpr (sizeof(T) == 4) {
    return w[e];
  } else {
    return (w[e >> 1] >> ((e & 1) * 16)) & 0xffffu;
  }
}

template <typename T>
__device__ __forceinline__ void chunk_set(uint4& u, int e, uint32_t bits) {
  uint32_t* w = reinterpret_cast<uint32_t*>(&u);
  if constexpr (sizeof(T) == 4) {
    w[e] = bits;
  } else {
    const int sh = (e & 1) * 16;
    w[e >> 1] = (w[e >> 1] & ~(0xffffu << sh)) | ((bits & 0xffffu) << sh);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t load_bits(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
}

// v masked by element idx (global memory): a 0/1 mask selects, so pruned
// entries are exactly zero even for non-finite v; a float mask multiplies.
template <typename T, MaskKind MK>
__device__ __forceinline__ float apply_mask(float v, const void* mask, int64_t idx) {
  if constexpr (MK == MaskKind::None) {
    return v;
  } else if constexpr (MK == MaskKind::U8) {
    return __ldg(static_cast<const unsigned char*>(mask) + idx) != 0 ? v : 0.f;
  } else {
    return v * Num<T>::to_f(static_cast<const T*>(mask)[idx]);
  }
}

// ---------------------------------------------------------------------------
// Tile staging into shared memory.
//
// A ROWS x COLS tile of a row-major matrix (leading dimension ld) is moved in
// 16-byte chunks along COLS; elements outside [0, row_lim) x [0, col_lim)
// read as zero.  Shared rows are padded by 16 bytes, so every chunk is
// 16-byte aligned there too.
//   copy():        unmasked operands, cp.async straight into shared memory
//                  (no registers held across the MMAs).
//   load()/store(): the masked W operand goes through registers so the mask
//                  can be applied; the loads are issued before the MMAs of
//                  the current stage and stored after them.
// Rows whose length is not a multiple of 16 bytes (or unaligned pointers,
// vec == false) take a scalar path.

#ifndef CAPKIT_CUDA_HOST_EMULATION
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  // src_bytes < 16 zero-fills the rest of the chunk.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gsrc),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
#else
// host emulation (tests/cuda_emu): the copy happens at once, which the kernel allows (a stage is
// only refilled after the barrier that ends its last use)
inline void cp_async16(void* smem_dst, const void* gsrc, int src_bytes) {
  capkit_emu::copy_zero_fill(smem_dst, gsrc, src_bytes, 16);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}
#endif

template <typename T, MaskKind MK, int ROWS, int COLS, int NT>
struct TileLoader {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  static constexpr int CPR = COLS / V;
  static constexpr int CHUNKS = ROWS * CPR;
  static constexpr int PT = (CHUNKS + NT - 1) / NT;
  static constexpr bool MASKED = MK != MaskKind::None;
  // Registers only for the masked path.
  static constexpr int RPT = MASKED ? PT : 1;
  static_assert(COLS % V == 0, "tile width must be a whole number of 16-byte chunks");

  uint4 d[RPT];
  uint4 m[RPT];

  // Scalar guarded gather of one chunk (and its mask chunk).
  __device__ __forceinline__ static void gather(const T* g, const void* mask, int64_t off,
                                                int64_t col, int64_t col_lim, uint4& dv,
                                                uint4& mv) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (col + e < col_lim) {
        chunk_set<T>(dv, e, load_bits(g + off + e));
        if constexpr (MK == MaskKind::U8) {
          const uint32_t byte = __ldg(static_cast<const unsigned char*>(mask) + off + e);
          reinterpret_cast<uint32_t*>(&mv)[e >> 2] |= byte << ((e & 3) * 8);
        } else if constexpr (MK == MaskKind::SameAsWeight) {
          chunk_set<T>(mv, e, load_bits(static_cast<const T*>(mask) + off + e));
        }
      }
    }
  }

  __device__ __forceinline__ void copy(T* s, int lds, const T* __restrict__ g, int64_t ld,
                                       int64_t row0, int64_t col0, int64_t row_lim,
                                       int64_t col_lim, bool vec) const {
    static_assert(!MASKED, "masked tiles are staged through registers");
#pragma unroll
    for (int q = 0; q < PT; ++q) {
      const int c = static_cast<int>(threadIdx.x) + q * NT;
      if (CHUNKS % NT != 0 && c >= CHUNKS) continue;
      T* dst = s + (c / CPR) * lds + (c % CPR) * V;
      const int64_t row = row0 + c / CPR;
      const int64_t col = col0 + (c % CPR) * V;
      const int64_t rem = row < row_lim ? col_lim - col : 0;
      if (vec) {
        const int bytes = rem >= V ? 16 : (rem > 0 ? static_cast<int>(rem) * static_cast<int>(sizeof(T)) : 0);
        cp_async16(dst, bytes > 0 ? static_cast<const void*>(g + row * ld + col)
                                  : static_cast<const void*>(g),
                   bytes);
      } else if (rem <= 0) {
        // cp.async needs a 16-byte aligned source even when it copies
        // nothing, and g need not be aligned here: store the zeros directly.
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      } else {
        uint4 v = make_uint4(0u, 0u, 0u, 0u), no_mask = v;
        gather(g, nullptr, row * ld + col, col, col_lim, v, no_mask);
        *reinterpret_cast<uint4*>(dst) = v;
      }
    }
  }

  __device__ __forceinline__ void load(const T* __restrict__ g, const void* __restrict__ mask,
                                       int64_t ld, int64_t row0, int64_t col0, int64_t row_lim,
                                       int64_t col_lim, bool vec) {
    static_assert(MASKED, "unmasked tiles use copy()");
#pragma unroll
    for (int q = 0; q < PT; ++q) {
      d[q] = make_uint4(0u, 0u, 0u, 0u);
      m[q] = make_uint4(0u, 0u, 0u, 0u);
      const int c = static_cast<int>(threadIdx.x) + q * NT;
      if (CHUNKS % NT != 0 && c >= CHUNKS) continue;
      const int64_t row = row0 + c / CPR;
      const int64_t col = col0 + (c % CPR) * V;
      if (row >= row_lim) continue;
      const int64_t off = row * ld + col;
      if (vec && col + V <= col_lim) {
        d[q] = __ldg(reinterpret_cast<const uint4*>(g + off));
        if constexpr (MK == MaskKind::U8) {
          const unsigned char* mp = static_cast<const unsigned char*>(mask) + off;
          if constexpr (V == 8) {
            const uint2 t = __ldg(reinterpret_cast<const uint2*>(mp));
            m[q].x = t.x;
            m[q].y = t.y;
          } else {
            m[q].x = __ldg(reinterpret_cast<const unsigned int*>(mp));
          }
        } else {
          m[q] = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(mask) + off));
        }
      } else {
        gather(g, mask, off, col, col_lim, d[q], m[q]);
      }
    }
  }

  __device__ __forceinline__ void store(T* s, int lds) const {
    static_assert(MASKED, "unmasked tiles use copy()");
#pragma unroll
    for (int q = 0; q < PT; ++q) {
      const int c = static_cast<int>(threadIdx.x) + q * NT;
      if (CHUNKS % NT != 0 && c >= CHUNKS) continue;
      uint4 v = d[q];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if constexpr (MK == MaskKind::U8) {
          // 0/1 masks select: a pruned entry is exactly zero even if the weight is not finite.
          const uint32_t* w = reinterpret_cast<const uint32_t*>(&m[q]);
          if (((w[e >> 2] >> ((e & 3) * 8)) & 0xffu) == 0u) chunk_set<T>(v, e, 0u);
        } else {
          const float f = Num<T>::bits_to_f(chunk_get<T>(m[q], e));
          chunk_set<T>(v, e, Num<T>::f_to_bits(Num<T>::bits_to_f(chunk_get<T>(v, e)) * f));
        }
      }
      *reinterpret_cast<uint4*>(s + (c / CPR) * lds + (c % CPR) * V) = v;
    }
  }
};

// ---------------------------------------------------------------------------
// Warp-level math cores.  Shared tiles: A is stored [i][r] (or [r][i] when
// A_RI), B is stored [r][j] (or [j][r] when B_JR); i indexes output rows, j
// output columns, r the reduction.

template <typename T, int BN, int BR, int WM, int WN, bool A_RI, bool B_JR, int LDA, int LDB>
struct WmmaCore {
  static constexpr int FM = WM / 16;
  static constexpr int FN = WN / 16;
  using ALay = std::conditional_t<A_RI, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  using BLay = std::conditional_t<B_JR, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  static_assert(BR % 16 == 0 && WM % 16 == 0 && WN % 16 == 0, "WMMA tiles are 16x16x16");

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FM][FN];

  __device__ __forceinline__ void init(int /*lane*/) {
#pragma unroll
    for (int a = 0; a < FM; ++a)
#pragma unroll
      for (int b = 0; b < FN; ++b) nvcuda::wmma::fill_fragment(acc[a][b], 0.f);
  }

  __device__ __forceinline__ void step(const T* As, const T* Bs, int wm0, int wn0) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < BR; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLay> bf[FN];
#pragma unroll
      for (int b = 0; b < FN; ++b) {
        const int j = wn0 + b * 16;
        const T* pb = B_JR ? Bs + j * LDB + kk : Bs + kk * LDB + j;
        wmma::load_matrix_sync(bf[b], pb, LDB);
      }
#pragma unroll
      for (int a = 0; a < FM; ++a) {
        const int i = wm0 + a * 16;
        const T* pa = A_RI ? As + kk * LDA + i : As + i * LDA + kk;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> af;
        wmma::load_matrix_sync(af, pa, LDA);
#pragma unroll
        for (int b = 0; b < FN; ++b) wmma::mma_sync(acc[a][b], af, bf[b], acc[a][b]);
      }
    }
  }

  // ws: fp32 partial tile [BM][BN] (split-M) or null.  scratch: 16x16 floats
  // private to this warp (shared memory no longer used for operands).
  template <class Emit>
  __device__ __forceinline__ void finish(Emit& emit, float* ws, float* scratch, int lane, int wm0,
                                         int wn0) {
    using namespace nvcuda;
#pragma unroll
    for (int a = 0; a < FM; ++a) {
#pragma unroll
      for (int b = 0; b < FN; ++b) {
        const int ti = wm0 + a * 16, tj = wn0 + b * 16;
        if (ws != nullptr) {
          wmma::store_matrix_sync(ws + ti * BN + tj, acc[a][b], BN, wmma::mem_row_major);
          continue;
        }
        wmma::store_matrix_sync(scratch, acc[a][b], 16, wmma::mem_row_major);
        __syncwarp();
        // Half-warps cover alternating rows so reads are bank-conflict free and
        // 16 consecutive output columns are written together.
        const int c = lane & 15;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int r = (lane >> 4) + 2 * e;
          emit(ti + r, tj + c, scratch[r * 16 + c]);
        }
        __syncwarp();
      }
    }
  }
};

template <int BN, int BR, int WM, int WN, int TM, int TN, bool A_RI, bool B_JR, int LDA, int LDB>
struct SimtCore {
  static constexpr int LX = WN / TN;  // lanes along j
  static constexpr int LY = WM / TM;  // lanes along i
  static_assert(LX * LY == 32, "thread micro-tiles must cover the warp tile");

  float acc[TM][TN];
  int ty, tx;

  __device__ __forceinline__ void init(int lane) {
    ty = lane / LX;
    tx = lane % LX;
#pragma unroll
    for (int s = 0; s < TM; ++s)
#pragma unroll
      for (int u = 0; u < TN; ++u) acc[s][u] = 0.f;
  }

  __device__ __forceinline__ void step(const float* As, const float* Bs, int wm0, int wn0) {
#pragma unroll
    for (int r = 0; r < BR; ++r) {
      float a[TM], b[TN];
#pragma unroll
      for (int s = 0; s < TM; ++s) {
        const int i = wm0 + ty + s * LY;
        a[s] = A_RI ? As[r * LDA + i] : As[i * LDA + r];
      }
#pragma unroll
      for (int u = 0; u < TN; ++u) {
        const int j = wn0 + tx + u * LX;
        b[u] = B_JR ? Bs[j * LDB + r] : Bs[r * LDB + j];
      }
#pragma unroll
      for (int s = 0; s < TM; ++s)
#pragma unroll
        for (int u = 0; u < TN; ++u) acc[s][u] = fmaf(a[s], b[u], acc[s][u]);
    }
  }

  template <class Emit>
  __device__ __forceinline__ void finish(Emit& emit, float* ws, float* /*scratch*/, int /*lane*/,
                                         int wm0, int wn0) {
#pragma unroll
    for (int s = 0; s < TM; ++s) {
#pragma unroll
      for (int u = 0; u < TN; ++u) {
        const int il = wm0 + ty + s * LY, jl = wn0 + tx + u * LX;
        if (ws != nullptr) {
          ws[il * BN + jl] = acc[s][u];
        } else {
          emit(il, jl, acc[s][u]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Tile configurations.  BM x BN output tile, BR reduction chunk (per dtype
// class), WM x WN warp tile, TM x TN fp32 thread micro-tile.  With a layout
// BN and BR divide the block size, so a tile never straddles two blocks.

template <int BM_, int BN_, int BR16_, int BR32_, int WM_, int WN_, int TM_, int TN_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BR16 = BR16_, BR32 = BR32_;
  static constexpr int WM = WM_, WN = WN_, TM = TM_, TN = TN_;
  static constexpr int kWarps = (BM / WM) * (BN / WN);
  static constexpr int kThreads = kWarps * 32;
  // Residency the register budget is capped for (<= 128 registers/thread).
  static constexpr int kMinBlocks = 65536 / (kThreads * 128);
};

// Fwd / GradIn: BN = block size (128 also for "no layout").
// Warp tiles stay at 32x32 so that accumulators, fragments and the masked
// W prefetch fit in 128 registers without spills.
using CfgMM128 = Cfg<128, 128, 32, 16, 32, 32, 4, 8>;  // 16 warps
using CfgMM64 = Cfg<128, 64, 32, 16, 32, 32, 4, 8>;    // 8 warps
using CfgMM32 = Cfg<128, 32, 32, 16, 16, 32, 2, 8>;    // 8 warps
using CfgMM16 = Cfg<128, 16, 16, 16, 32, 16, 4, 4>;    // 4 warps
// GradW: square tiles over the weight (one block per CTA when sparse);
// reduction over tokens.
using CfgGW128 = CfgMM128;
using CfgGW64 = Cfg<64, 64, 32, 16, 32, 32, 4, 8>;  // 4 warps
using CfgGW32 = Cfg<32, 32, 64, 32, 16, 16, 2, 4>;  // 4 warps
using CfgGW16 = Cfg<16, 16, 64, 32, 16, 16, 2, 4>;  // 1 warp

enum class Op : int { Fwd, GradIn, GradW };

struct Params {
  const void* a = nullptr;       // Fwd: x, GradIn: grad_out, GradW: grad_out
  const void* b = nullptr;       // Fwd/GradIn: weight, GradW: x
  const void* mask = nullptr;
  const void* bias = nullptr;    // Fwd
  const void* weight = nullptr;  // GradW (dM)
  const int32_t* lptr = nullptr;  // CSR row_ptr (Fwd, GradW) / CSC col_ptr (GradIn)
  const int32_t* lidx = nullptr;  // col_idx / row_idx
  void* out = nullptr;           // y / dx / dW
  void* out2 = nullptr;          // dM
  float* ws = nullptr;           // split partials (splits > 1)
  int64_t M = 0, N = 0, K = 0;
  int block = 0;
  int mask_kind = 0;             // GradW epilogue (runtime: keeps instantiations down)
  int a_vec = 0, b_vec = 0;
  int need_w = 0, need_m = 0;
  int sparse = 0;        // GradW: tile index = live block index
  int dense_layout = 0;  // GradW: dense tiles, dW zeroed on dead blocks
  int splits = 1;        // split of the reduction (Fwd/GradIn: gridDim.z, GradW: gridDim.y)
  int64_t tiles = 0, tiles_k = 0;  // GradW
  int64_t mchunks = 0;             // GradW: token chunks
};

// Output-tile origin (n0, k0) of GradW tile `tile` (TS x TS).
__device__ __forceinline__ void gradw_tile_origin(const Params& p, int64_t tile, int ts, int64_t& n0,
                                                  int64_t& k0) {
  if (p.sparse) {
    // Block row of live block `tile`: largest r with row_ptr[r] <= tile.
    int64_t lo = 0, hi = (p.N + p.block - 1) / p.block;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) >> 1;
      if (static_cast<int64_t>(__ldg(p.lptr + mid)) <= tile) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    n0 = lo * p.block;
    k0 = static_cast<int64_t>(__ldg(p.lidx + tile)) * p.block;
  } else {
    n0 = (tile / p.tiles_k) * ts;
    k0 = (tile % p.tiles_k) * ts;
  }
}

// live_s[r * 8 + c] = whether block (n0/b + r, k0/b + c) is live, for the
// (ts/b)^2 <= 64 blocks of a dense GradW tile.  Called by the whole CTA.
__device__ void build_live_bitmap(const Params& p, int64_t n0, int64_t k0, int ts,
                                  unsigned char* live_s) {
  const int per = ts / p.block;
  for (int e = threadIdx.x; e < 64; e += blockDim.x) live_s[e] = 0;
  __syncthreads();
  const int64_t rb0 = n0 / p.block, kb0 = k0 / p.block;
  const int64_t nbr = (p.N + p.block - 1) / p.block;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  for (int r = warp; r < per && rb0 + r < nbr; r += nw) {
    const int64_t beg = __ldg(p.lptr + rb0 + r), end = __ldg(p.lptr + rb0 + r + 1);
    for (int64_t q = beg + lane; q < end; q += 32) {
      const int64_t c = static_cast<int64_t>(__ldg(p.lidx + q)) - kb0;
      if (c >= 0 && c < per) live_s[r * 8 + c] = 1;
    }
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void gradw_finish(const Params& p, int64_t n, int64_t k, float g,
                                             bool live) {
  const int64_t idx = n * p.K + k;
  if (p.need_w) {
    float v = 0.f;
    if (live) {
      if (p.mask_kind == static_cast<int>(MaskKind::U8)) {
        v = apply_mask<T, MaskKind::U8>(g, p.mask, idx);
      } else if (p.mask_kind == static_cast<int>(MaskKind::SameAsWeight)) {
        v = apply_mask<T, MaskKind::SameAsWeight>(g, p.mask, idx);
      } else {
        v = g;
      }
    }
    static_cast<T*>(p.out)[idx] = Num<T>::from_f(v);
  }
  if (p.need_m) {
    const float w = Num<T>::to_f(static_cast<const T*>(p.weight)[idx]);
    static_cast<T*>(p.out2)[idx] = Num<T>::from_f(g * w);
  }
}

// ---------------------------------------------------------------------------
// The GEMM kernel.
//   Fwd/GradIn grid: (ceil(M / BM), ceil(cols / BN), splits); one output
//   tile each; with splits > 1 each CTA takes a contiguous share of the
//   tile's chunk list and writes fp32 partials [split][M][cols] to p.ws.
//   GradW grid: (tiles, splits); tile = weight tile (or live block), split =
//   range of token chunks; splits > 1 writes fp32 partials
//   [split][tile][BM * BN] to p.ws.  GradW's mask only matters in the
//   epilogue, where it is read through p.mask_kind, so MK is None there.
template <Op OP, typename T, MaskKind MK, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    masked_gemm_kernel(const Params p) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  constexpr int BM = C::BM, BN = C::BN;
  constexpr int BR = kF32 ? C::BR32 : C::BR16;
  constexpr int NT = C::kThreads;
  // 16-byte row padding: keeps chunks aligned and spreads rows over banks.
  constexpr int PAD = 16 / static_cast<int>(sizeof(T));
  constexpr bool A_RI = OP == Op::GradW;
  constexpr bool B_JR = OP == Op::Fwd;
  constexpr MaskKind BMK = OP == Op::GradW ? MaskKind::None : MK;
  constexpr int A_ROWS = A_RI ? BR : BM, A_COLS = A_RI ? BM : BR;
  constexpr int B_ROWS = B_JR ? BN : BR, B_COLS = B_JR ? BR : BN;
  constexpr int LDA = A_COLS + PAD, LDB = B_COLS + PAD;
  constexpr int A_ELEMS = A_ROWS * LDA, B_ELEMS = B_ROWS * LDB;
  constexpr int STAGE = A_ELEMS + B_ELEMS;
  constexpr int OPER_BYTES = 2 * STAGE * static_cast<int>(sizeof(T));
  constexpr int SCRATCH_BYTES = kF32 ? 0 : C::kWarps * 256 * static_cast<int>(sizeof(float));
  constexpr int SMEM_BYTES = OPER_BYTES > SCRATCH_BYTES ? OPER_BYTES : SCRATCH_BYTES;
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory limit");
  static_assert(kF32 || (A_ELEMS * sizeof(T)) % 32 == 0, "WMMA needs 32-byte aligned stages");

  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  __shared__ unsigned char live_s[64];
  T* const sbuf = reinterpret_cast<T*>(smem);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / (BN / C::WN)) * C::WM;
  const int wn0 = (warp % (BN / C::WN)) * C::WN;

  // Tile origin and the list of reduction chunks this CTA walks: chunk c
  // starts at list[lbase + c / cpb] * block + (c % cpb) * BR with a layout
  // (the live blocks of the tile's block row / column), else at c * BR.
  int64_t i0 = 0, j0 = 0, tile = 0, lbase = 0, total = 0;
  const int32_t* list = nullptr;
  int cpb = 1, split = 0;
  if constexpr (OP != Op::GradW) {
    i0 = static_cast<int64_t>(blockIdx.x) * BM;
    j0 = static_cast<int64_t>(blockIdx.y) * BN;
    split = blockIdx.z;
    const int64_t red = OP == Op::Fwd ? p.K : p.N;
    if (p.lidx != nullptr) {
      const int64_t blk = j0 / p.block;
      lbase = __ldg(p.lptr + blk);
      cpb = p.block / BR;
      list = p.lidx;
      total = (__ldg(p.lptr + blk + 1) - lbase) * cpb;
    } else {
      total = (red + BR - 1) / BR;
    }
  } else {
    tile = blockIdx.x;
    split = blockIdx.y;
    gradw_tile_origin(p, tile, BM, i0, j0);
    total = p.mchunks;
    if (p.dense_layout) build_live_bitmap(p, i0, j0, BM, live_s);
  }
  int64_t cbeg = 0, count = total;
  if (p.splits > 1) {
    const int64_t cps = (total + p.splits - 1) / p.splits;
    cbeg = split * cps;
    count = total - cbeg < cps ? total - cbeg : cps;
    if (count < 0) count = 0;  // empty share: still writes its zero partial
  }
  const int nchunks = static_cast<int>(count);

  auto chunk_start = [&](int t) -> int64_t {
    const int64_t c = cbeg + t;
    if (list != nullptr) {
      const int64_t q = c / cpb;
      return static_cast<int64_t>(__ldg(list + lbase + q)) * p.block + (c - q * cpb) * BR;
    }
    return c * BR;
  };

  constexpr bool B_MASKED = BMK != MaskKind::None;
  TileLoader<T, MaskKind::None, A_ROWS, A_COLS, NT> la;
  TileLoader<T, BMK, B_ROWS, B_COLS, NT> lb;
  const T* ga = static_cast<const T*>(p.a);
  const T* gb = static_cast<const T*>(p.b);

  // Starts staging chunk t into stage buf: async copies for unmasked tiles,
  // register loads for the masked W tile (stored by land()).
  auto issue = [&](int t, int buf) {
    T* sa = sbuf + buf * STAGE;
    T* sb = sa + A_ELEMS;
    const int64_t r0 = chunk_start(t);
    if constexpr (OP == Op::Fwd) {
      la.copy(sa, LDA, ga, p.K, i0, r0, p.M, p.K, p.a_vec);
      if constexpr (B_MASKED) {
        lb.load(gb, p.mask, p.K, j0, r0, p.N, p.K, p.b_vec);
      } else {
        lb.copy(sb, LDB, gb, p.K, j0, r0, p.N, p.K, p.b_vec);
      }
    } else if constexpr (OP == Op::GradIn) {
      la.copy(sa, LDA, ga, p.N, i0, r0, p.M, p.N, p.a_vec);
      if constexpr (B_MASKED) {
        lb.load(gb, p.mask, p.K, r0, j0, p.N, p.K, p.b_vec);
      } else {
        lb.copy(sb, LDB, gb, p.K, r0, j0, p.N, p.K, p.b_vec);
      }
    } else {
      la.copy(sa, LDA, ga, p.N, r0, i0, p.M, p.N, p.a_vec);
      lb.copy(sb, LDB, gb, p.K, r0, j0, p.M, p.K, p.b_vec);
    }
    cp_async_commit();
  };
  // Completes stage buf: masked register tile stored, own copies waited for
  // (the __syncthreads that follows publishes them to the CTA).
  auto land = [&](int buf) {
    if constexpr (B_MASKED) lb.store(sbuf + buf * STAGE + A_ELEMS, LDB);
    cp_async_wait_all();
  };

  using Core =
      std::conditional_t<kF32, SimtCore<BN, BR, C::WM, C::WN, C::TM, C::TN, A_RI, B_JR, LDA, LDB>,
                         WmmaCore<T, BN, BR, C::WM, C::WN, A_RI, B_JR, LDA, LDB>>;
  Core core;
  core.init(lane);

  if (nchunks > 0) {
    issue(0, 0);
    land(0);
    __syncthreads();
    for (int t = 0; t < nchunks; ++t) {
      const int cur = t & 1;
      const bool more = t + 1 < nchunks;
      // The other stage was last read in iteration t - 1, before its barrier,
      // so it can be refilled while this stage feeds the MMAs.
      if (more) issue(t + 1, cur ^ 1);
      core.step(sbuf + cur * STAGE, sbuf + cur * STAGE + A_ELEMS, wm0, wn0);
      if (more) land(cur ^ 1);
      __syncthreads();
    }
  }

  // GradW partial tiles are written whole (straight from the fragments);
  // Fwd/GradIn partials go through emit with bounds checks.
  float* ws = nullptr;
  if constexpr (OP == Op::GradW) {
    if (p.splits > 1) ws = p.ws + (static_cast<int64_t>(split) * p.tiles + tile) * (BM * BN);
  }
  auto emit = [&](int il, int jl, float v) {
    const int64_t gi = i0 + il, gj = j0 + jl;
    if constexpr (OP == Op::GradW) {
      if (gi < p.N && gj < p.K) {
        const bool live = !p.dense_layout || live_s[(il / p.block) * 8 + jl / p.block] != 0;
        gradw_finish<T>(p, gi, gj, v, live);
      }
    } else {
      const int64_t cols = OP == Op::Fwd ? p.N : p.K;
      if (gi < p.M && gj < cols) {
        if (p.splits > 1) {
          p.ws[(split * p.M + gi) * cols + gj] = v;
        } else {
          if (OP == Op::Fwd && p.bias != nullptr) {
            v += Num<T>::to_f(static_cast<const T*>(p.bias)[gj]);
          }
          static_cast<T*>(p.out)[gi * cols + gj] = Num<T>::from_f(v);
        }
      }
    }
  };
  core.finish(emit, ws, reinterpret_cast<float*>(smem) + warp * 256, lane, wm0, wn0);
}

// Second pass of a split reduction: sums the fp32 partials in a fixed order
// (deterministic, unlike fp32 atomics), adds the bias, converts.
template <typename T>
__global__ void __launch_bounds__(256) mm_reduce_kernel(const Params p, int64_t cols) {
  const int64_t total = p.M * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += p.ws[s * total + e];
    if (p.bias != nullptr) v += Num<T>::to_f(static_cast<const T*>(p.bias)[e % cols]);
    static_cast<T*>(p.out)[e] = Num<T>::from_f(v);
  }
}

// GradW second pass: one CTA per tile, so dead blocks can be looked up in a
// per-tile bitmap as in the GEMM epilogue.
template <typename T, int TS>
__global__ void __launch_bounds__(256) gradw_reduce_kernel(const Params p) {
  __shared__ unsigned char live_s[64];
  const int64_t tile = blockIdx.x;
  int64_t n0, k0;
  gradw_tile_origin(p, tile, TS, n0, k0);
  if (p.dense_layout) build_live_bitmap(p, n0, k0, TS, live_s);
  const float* src = p.ws + tile * (TS * TS);
  const int64_t split_stride = p.tiles * (TS * TS);
  for (int e = threadIdx.x; e < TS * TS; e += blockDim.x) {
    const int il = e / TS, jl = e % TS;
    const int64_t n = n0 + il, k = k0 + jl;
    if (n >= p.N || k >= p.K) continue;
    float g = 0.f;
    for (int s = 0; s < p.splits; ++s) g += src[s * split_stride + e];
    const bool live = !p.dense_layout || live_s[(il / p.block) * 8 + jl / p.block] != 0;
    gradw_finish<T>(p, n, k, g, live);
  }
}

// ---------------------------------------------------------------------------
// Host side

template <typename T>
struct TypeTag {
  using type = T;
};
template <MaskKind MK>
using MaskTag = std::integral_constant<MaskKind, MK>;

template <typename Tag, typename Fn>
cudaError_t dispatch_mask(Tag tag, MaskKind mk, Fn& fn) {
  switch (mk) {
    case MaskKind::None:
      return fn(tag, MaskTag<MaskKind::None>{});
    case MaskKind::U8:
      return fn(tag, MaskTag<MaskKind::U8>{});
    case MaskKind::SameAsWeight:
      return fn(tag, MaskTag<MaskKind::SameAsWeight>{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(TypeTag<T>, MaskTag<MK>) for the runtime (dtype, mask kind).
template <typename Fn>
cudaError_t dispatch_types(DType dt, MaskKind mk, Fn fn) {
  switch (dt) {
    case DType::F32:
      return dispatch_mask(TypeTag<float>{}, mk, fn);
    case DType::F16:
      return dispatch_mask(TypeTag<__half>{}, mk, fn);
    case DType::BF16:
      return dispatch_mask(TypeTag<__nv_bfloat16>{}, mk, fn);
  }
  return cudaErrorInvalidValue;
}

inline int elem_bytes(DType dt) { return dt == DType::F32 ? 4 : 2; }

inline bool aligned(const void* ptr, size_t n) {
  return reinterpret_cast<uintptr_t>(ptr) % n == 0;
}

// Whether 16-byte chunks of a row-major matrix with leading dimension ld
// (elements) can be loaded as vectors, its mask included.
inline bool vec_ok(const void* ptr, int64_t ld, DType dt, const void* mask, MaskKind mk) {
  const int v = 16 / elem_bytes(dt);
  if (ld % v != 0 || !aligned(ptr, 16)) return false;
  if (mk == MaskKind::U8) return aligned(mask, static_cast<size_t>(v));
  if (mk == MaskKind::SameAsWeight) return aligned(mask, 16);
  return true;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

bool dtype_ok(DType dt) { return dt == DType::F32 || dt == DType::F16 || dt == DType::BF16; }

// A layout is present iff its pointer array is.  An empty index array may
// come with a null pointer (torch gives empty tensors none); it is never read
// then, but the kernels test the index pointer for "layout present", so it is
// replaced by the pointer array.
bool layout_ok(const int32_t* ptr, const int32_t* idx, int64_t nnz, int block) {
  if (ptr == nullptr) return idx == nullptr;
  return (idx != nullptr || nnz == 0) && masked_linear_block_size_ok(block);
}

const int32_t* layout_idx(const int32_t* ptr, const int32_t* idx) {
  return ptr != nullptr && idx == nullptr ? ptr : idx;
}

bool mask_ok(const void* mask, MaskKind mk) {
  if (mk != MaskKind::None && mk != MaskKind::U8 && mk != MaskKind::SameAsWeight) return false;
  return (mask == nullptr) == (mk == MaskKind::None);
}

bool workspace_ok(const void* ws, size_t have, size_t need) {
  return need == 0 || (ws != nullptr && have >= need && aligned(ws, 32));
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // do not leave the query's error behind for the launch check
    return 132;
  }
  return n;
}

// Split heuristic shared by all ops: if the output tiles fill less than one
// wave (`target` resident CTAs), split each tile's reduction into up to
// target / tiles shares of at least 4 chunks.  The workspace is then
// bounded by about 2 * target tiles of fp32 (<= ~35 MiB on H100).
int choose_splits(int64_t tiles, int64_t chunks, int64_t target, int64_t cap) {
  if (tiles <= 0 || tiles >= target || chunks < 8) return 1;
  int64_t s = min64(min64(cdiv(target, tiles), chunks / 4), cap);
  return s < 1 ? 1 : static_cast<int>(s);
}

// ---- Fwd / GradIn

struct MMPlan {
  bool valid = true;
  int sel = 128;  // config: tile width along the blocked output dimension
  int bm = 128, bn = 128, br = 32, per_sm = 2;
  int64_t gx = 0, gy = 0;
  int splits = 1;
  size_t ws_bytes = 0;
  int reduce_blocks = 1;
};

template <class C>
void mm_shape(bool f32, MMPlan& pl) {
  pl.bm = C::BM;
  pl.bn = C::BN;
  pl.br = f32 ? C::BR32 : C::BR16;
  pl.per_sm = C::kMinBlocks;
}

// cols: output columns (N for Fwd, K for GradIn); red: reduction length;
// lines: block rows (Fwd) / columns (GradIn) of the layout.
MMPlan plan_mm(int64_t M, int64_t cols, int64_t red, bool layout, int block, int64_t nnz,
               DType dt, int sms) {
  MMPlan pl;
  pl.sel = layout ? block : 128;
  const bool f32 = dt == DType::F32;
  switch (pl.sel) {
    case 128:
      mm_shape<CfgMM128>(f32, pl);
      break;
    case 64:
      mm_shape<CfgMM64>(f32, pl);
      break;
    case 32:
      mm_shape<CfgMM32>(f32, pl);
      break;
    case 16:
      mm_shape<CfgMM16>(f32, pl);
      break;
    default:
      pl.valid = false;
      return pl;
  }
  pl.gx = cdiv(M, pl.bm);
  pl.gy = cdiv(cols, pl.bn);
  // Average chunks per output tile (exact without a layout).
  const int64_t chunks =
      layout ? nnz * (block / pl.br) / (cdiv(cols, block) > 0 ? cdiv(cols, block) : 1)
             : cdiv(red, pl.br);
  pl.splits = choose_splits(pl.gx * pl.gy, chunks, static_cast<int64_t>(sms) * pl.per_sm, 16);
  if (pl.splits > 1) {
    pl.ws_bytes = static_cast<size_t>(pl.splits) * static_cast<size_t>(M) *
                  static_cast<size_t>(cols) * sizeof(float);
    pl.reduce_blocks = static_cast<int>(min64(cdiv(M * cols, 256), static_cast<int64_t>(sms) * 8));
  }
  return pl;
}

template <Op OP, typename T, MaskKind MK, class C>
cudaError_t launch_mm(const Params& p, const MMPlan& pl, int64_t cols, cudaStream_t stream) {
  if (pl.gx > INT_MAX || pl.gy > 65535 || pl.splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(pl.gx), static_cast<unsigned>(pl.gy),
                  static_cast<unsigned>(pl.splits));
  CAPKIT_LAUNCH(grid, C::kThreads, stream, masked_gemm_kernel<OP, T, MK, C>)(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || pl.splits <= 1) return err;
  CAPKIT_LAUNCH(pl.reduce_blocks, 256, stream, mm_reduce_kernel<T>)(p, cols);
  return cudaGetLastError();
}

template <Op OP>
cudaError_t run_mm(const Params& p, const MMPlan& pl, DType dt, MaskKind mk, int64_t cols,
                   cudaStream_t stream) {
  const int sel = pl.sel;
  return dispatch_types(dt, mk, [&](auto tt, auto mt) -> cudaError_t {
    using T = typename decltype(tt)::type;
    constexpr MaskKind MK = decltype(mt)::value;
    switch (sel) {
      case 128:
        return launch_mm<OP, T, MK, CfgMM128>(p, pl, cols, stream);
      case 64:
        return launch_mm<OP, T, MK, CfgMM64>(p, pl, cols, stream);
      case 32:
        return launch_mm<OP, T, MK, CfgMM32>(p, pl, cols, stream);
      case 16:
        return launch_mm<OP, T, MK, CfgMM16>(p, pl, cols, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

bool forward_args_ok(const ForwardArgs& a) {
  return a.M >= 0 && a.N >= 0 && a.K >= 0 && a.nnz_blocks >= 0 && dtype_ok(a.dtype) &&
         mask_ok(a.mask, a.mask_kind) &&
         layout_ok(a.row_ptr, a.col_idx, a.nnz_blocks, a.block_size);
}

MMPlan plan_forward(const ForwardArgs& a, int sms) {
  return plan_mm(a.M, a.N, a.K, a.row_ptr != nullptr, a.block_size, a.nnz_blocks, a.dtype, sms);
}

bool grad_input_args_ok(const GradInputArgs& a) {
  return a.M >= 0 && a.N >= 0 && a.K >= 0 && a.nnz_blocks >= 0 && dtype_ok(a.dtype) &&
         mask_ok(a.mask, a.mask_kind) &&
         layout_ok(a.col_ptr, a.row_idx, a.nnz_blocks, a.block_size);
}

MMPlan plan_grad_input(const GradInputArgs& a, int sms) {
  return plan_mm(a.M, a.K, a.N, a.col_ptr != nullptr, a.block_size, a.nnz_blocks, a.dtype, sms);
}

// ---- GradW

struct GradWeightPlan {
  bool sparse = false;
  int ts = 128;
  int br = 32;
  int splits = 1;
  int64_t tiles = 0, tiles_k = 0, mchunks = 0;
  size_t ws_bytes = 0;
};

template <class C>
void gw_shape(bool f32, GradWeightPlan& pl, int& per_sm) {
  pl.br = f32 ? C::BR32 : C::BR16;
  per_sm = C::kMinBlocks;
}

// A GradW CTA owns one square weight tile (one live block when sparse) and
// reduces over the tokens; with few tiles the token range is split over
// gridDim.y and gradw_reduce_kernel sums the fp32 partial tiles.
GradWeightPlan plan_grad_weight(const GradWeightArgs& a, int sms) {
  GradWeightPlan pl;
  const bool layout = a.row_ptr != nullptr;
  pl.sparse = layout && !a.need_mask_grad;
  pl.ts = pl.sparse ? a.block_size : 128;
  const bool f32 = a.dtype == DType::F32;
  int per_sm = 2;
  switch (pl.ts) {
    case 128:
      gw_shape<CfgGW128>(f32, pl, per_sm);
      break;
    case 64:
      gw_shape<CfgGW64>(f32, pl, per_sm);
      break;
    case 32:
      gw_shape<CfgGW32>(f32, pl, per_sm);
      break;
    default:
      gw_shape<CfgGW16>(f32, pl, per_sm);
      break;
  }
  pl.tiles_k = cdiv(a.K, pl.ts);
  pl.tiles = pl.sparse ? a.nnz_blocks : cdiv(a.N, pl.ts) * pl.tiles_k;
  pl.mchunks = cdiv(a.M, pl.br);
  int64_t splits = choose_splits(pl.tiles, pl.mchunks, static_cast<int64_t>(sms) * per_sm, 64);
  if (splits > 1) splits = cdiv(pl.mchunks, cdiv(pl.mchunks, splits));  // no empty shares
  pl.splits = static_cast<int>(splits);
  pl.ws_bytes = pl.splits > 1 ? static_cast<size_t>(pl.splits) * static_cast<size_t>(pl.tiles) *
                                    static_cast<size_t>(pl.ts) * pl.ts * sizeof(float)
                              : 0;
  return pl;
}

template <typename T, class C>
cudaError_t launch_gw(const Params& p, cudaStream_t stream) {
  if (p.tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.splits));
  CAPKIT_LAUNCH(grid, C::kThreads, stream, masked_gemm_kernel<Op::GradW, T, MaskKind::None, C>)(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits <= 1) return err;
  CAPKIT_LAUNCH(static_cast<unsigned>(p.tiles), 256, stream, gradw_reduce_kernel<T, C::BM>)(p);
  return cudaGetLastError();
}

bool grad_weight_args_ok(const GradWeightArgs& a) {
  return a.M >= 0 && a.N >= 0 && a.K >= 0 && a.nnz_blocks >= 0 && dtype_ok(a.dtype) &&
         mask_ok(a.mask, a.mask_kind) &&
         layout_ok(a.row_ptr, a.col_idx, a.nnz_blocks, a.block_size) &&
         !(a.need_mask_grad && a.mask_kind != MaskKind::SameAsWeight) &&
         !(a.need_weight_grad && a.dW == nullptr) && !(a.need_mask_grad && a.dM == nullptr);
}

}  // namespace

size_t masked_linear_forward_workspace_bytes(const ForwardArgs& a) {
  if (!forward_args_ok(a) || a.M == 0 || a.N == 0) return 0;
  return plan_forward(a, sm_count()).ws_bytes;
}

cudaError_t masked_linear_forward(const ForwardArgs& a, cudaStream_t stream) {
  if (!forward_args_ok(a)) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  const MMPlan pl = plan_forward(a, sm_count());
  if (!pl.valid || !workspace_ok(a.workspace, a.workspace_bytes, pl.ws_bytes)) {
    return cudaErrorInvalidValue;
  }
  Params p;
  p.a = a.x;
  p.b = a.weight;
  p.mask = a.mask;
  p.bias = a.bias;
  p.lptr = a.row_ptr;
  p.lidx = layout_idx(a.row_ptr, a.col_idx);
  p.out = a.y;
  p.ws = static_cast<float*>(a.workspace);
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.block = a.block_size;
  p.mask_kind = static_cast<int>(a.mask_kind);
  p.a_vec = vec_ok(a.x, a.K, a.dtype, nullptr, MaskKind::None);
  p.b_vec = vec_ok(a.weight, a.K, a.dtype, a.mask, a.mask_kind);
  p.splits = pl.splits;
  return run_mm<Op::Fwd>(p, pl, a.dtype, a.mask_kind, a.N, stream);
}

size_t masked_linear_grad_input_workspace_bytes(const GradInputArgs& a) {
  if (!grad_input_args_ok(a) || a.M == 0 || a.K == 0) return 0;
  return plan_grad_input(a, sm_count()).ws_bytes;
}

cudaError_t masked_linear_grad_input(const GradInputArgs& a, cudaStream_t stream) {
  if (!grad_input_args_ok(a)) return cudaErrorInvalidValue;
  if (a.M == 0 || a.K == 0) return cudaSuccess;
  const MMPlan pl = plan_grad_input(a, sm_count());
  if (!pl.valid || !workspace_ok(a.workspace, a.workspace_bytes, pl.ws_bytes)) {
    return cudaErrorInvalidValue;
  }
  Params p;
  p.a = a.grad_out;
  p.b = a.weight;
  p.mask = a.mask;
  p.lptr = a.col_ptr;
  p.lidx = layout_idx(a.col_ptr, a.row_idx);
  p.out = a.dx;
  p.ws = static_cast<float*>(a.workspace);
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.block = a.block_size;
  p.mask_kind = static_cast<int>(a.mask_kind);
  p.a_vec = vec_ok(a.grad_out, a.N, a.dtype, nullptr, MaskKind::None);
  p.b_vec = vec_ok(a.weight, a.K, a.dtype, a.mask, a.mask_kind);
  p.splits = pl.splits;
  return run_mm<Op::GradIn>(p, pl, a.dtype, a.mask_kind, a.K, stream);
}

size_t masked_linear_grad_weight_workspace_bytes(const GradWeightArgs& a) {
  if (!grad_weight_args_ok(a) || a.M == 0 || a.N == 0 || a.K == 0 ||
      (!a.need_weight_grad && !a.need_mask_grad)) {
    return 0;
  }
  return plan_grad_weight(a, sm_count()).ws_bytes;
}

cudaError_t masked_linear_grad_weight(const GradWeightArgs& a, cudaStream_t stream) {
  if (!grad_weight_args_ok(a)) return cudaErrorInvalidValue;
  if (!a.need_weight_grad && !a.need_mask_grad) return cudaSuccess;
  if (a.N == 0 || a.K == 0) return cudaSuccess;
  const size_t bytes = static_cast<size_t>(a.N) * static_cast<size_t>(a.K) * elem_bytes(a.dtype);
  const bool layout = a.row_ptr != nullptr;
  const bool sparse = layout && !a.need_mask_grad;
  if (a.M == 0 || sparse) {
    // No tokens: zero gradients.  Sparse: only live blocks are computed, the
    // rest of dW must read as zero.
    cudaError_t err = cudaSuccess;
    if (a.need_weight_grad) err = cudaMemsetAsync(a.dW, 0, bytes, stream);
    if (err == cudaSuccess && a.need_mask_grad) err = cudaMemsetAsync(a.dM, 0, bytes, stream);
    if (err != cudaSuccess || a.M == 0) return err;
  }
  const GradWeightPlan pl = plan_grad_weight(a, sm_count());
  if (!workspace_ok(a.workspace, a.workspace_bytes, pl.ws_bytes)) return cudaErrorInvalidValue;
  if (pl.tiles == 0) return cudaSuccess;
  Params p;
  p.a = a.grad_out;
  p.b = a.x;
  p.mask = a.mask;
  p.weight = a.weight;
  p.lptr = a.row_ptr;
  p.lidx = layout_idx(a.row_ptr, a.col_idx);
  p.out = a.dW;
  p.out2 = a.dM;
  p.ws = static_cast<float*>(a.workspace);
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.block = a.block_size;
  p.mask_kind = static_cast<int>(a.mask_kind);
  p.a_vec = vec_ok(a.grad_out, a.N, a.dtype, nullptr, MaskKind::None);
  p.b_vec = vec_ok(a.x, a.K, a.dtype, nullptr, MaskKind::None);
  p.need_w = a.need_weight_grad;
  p.need_m = a.need_mask_grad;
  p.sparse = pl.sparse;
  p.dense_layout = layout && !pl.sparse && a.need_weight_grad;
  p.splits = pl.splits;
  p.tiles = pl.tiles;
  p.tiles_k = pl.tiles_k;
  p.mchunks = pl.mchunks;
  const int ts = pl.ts;
  return dispatch_types(a.dtype, MaskKind::None, [&](auto tt, auto) -> cudaError_t {
    using T = typename decltype(tt)::type;
    switch (ts) {
      case 128:
        return launch_gw<T, CfgGW128>(p, stream);
      case 64:
        return launch_gw<T, CfgGW64>(p, stream);
      case 32:
        return launch_gw<T, CfgGW32>(p, stream);
      case 16:
        return launch_gw<T, CfgGW16>(p, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace cuda
}  // namespace capkit
