// Streaming multi-positive InfoNCE on CUDA (see info_nce.cuh for the
// contract).  Neither pass holds the B x M score matrix:
//
// forward   grid (query blocks of kBQ, key splits).  A CTA streams its range
//           of key tiles: the kBQ x kBK score tile is a register-tiled fp32
//           product over d in steps of kBD (operands staged in shared memory,
//           keys converted to fp32 on load), then each thread folds its
//           scores into an online log-sum-exp and the positive sums / counts
//           of both terms.  The 16 threads that share a query row merge over
//           shuffles; one writes the CTA's partial (max, sum exp, sum_u,
//           cnt_u, sum_s, cnt_s).  A second kernel merges the splits.
// backward  same grid: recompute the score tile, form g_ij * key_scale_j in
//           shared memory, and add g @ K_tile to the CTA's own [kBQ, d] rows
//           of an fp32 partial (plain read-add-write: every element has one
//           owner); a second kernel sums the splits (or the single split
//           writes dqs itself).  No atomics: results do not depend on timing.

#include "info_nce.cuh"
#include "launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace capkit {
namespace cuda {
namespace {

constexpr int kBQ = 32;                  // queries per CTA
constexpr int kBK = 64;                  // keys per tile
constexpr int kBD = 32;                  // feature columns per step
constexpr int kThreads = 256;            // 16 x 16
constexpr int kTQ = kBQ / 16;            // query rows per thread
constexpr int kTK = kBK / 16;            // key columns per thread
constexpr int kTD = kBD / 16;            // feature columns per thread in the backward's product
constexpr int kPartial = 6;              // max, sum exp, sum_u, cnt_u, sum_s, cnt_s
constexpr int kMaxGridY = 65535;
constexpr size_t kMaxBackwardWorkspace = size_t(1) << 30;  // fp32 dq partials

static_assert(kBQ % 16 == 0 && kBK % 16 == 0 && kBD % 16 == 0, "tiles are multiples of 16");
static_assert(kThreads == 256, "16 x 16 threads");

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

struct Tiles {
  float q[kBD][kBQ + 1];  // [feature][query], padded against bank conflicts
  float k[kBD][kBK + 1];  // [feature][key]
};

// Keys [k0, k0 + kBK) x features [c0, c0 + kBD) into sh.k[feature][key],
// zeros outside the matrix.  Consecutive threads read consecutive features.
template <typename KT>
__device__ __forceinline__ void load_keys(const KT* __restrict__ keys, int64_t M, int64_t d, int64_t k0,
                                          int64_t c0, float (*dst)[kBK + 1]) {
  for (int e = threadIdx.x; e < kBK * kBD; e += kThreads) {
    const int r = e / kBD, c = e % kBD;
    const int64_t j = k0 + r, col = c0 + c;
    dst[c][r] = (j < M && col < d) ? to_f32(keys[j * d + col]) : 0.f;
  }
}

// acc[r][c] = qs_(q0 + ty + 16 r) . k_(k0 + tx + 16 c) (unscaled).
template <typename KT>
__device__ __forceinline__ void score_tile(const float* __restrict__ qs, const KT* __restrict__ keys,
                                           int64_t B, int64_t M, int64_t d, int64_t q0, int64_t k0,
                                           Tiles& sh, float (&acc)[kTQ][kTK]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < kTQ; ++r)
#pragma unroll
    for (int c = 0; c < kTK; ++c) acc[r][c] = 0.f;
  for (int64_t c0 = 0; c0 < d; c0 += kBD) {
    for (int e = threadIdx.x; e < kBQ * kBD; e += kThreads) {
      const int r = e / kBD, c = e % kBD;
      const int64_t i = q0 + r, col = c0 + c;
      sh.q[c][r] = (i < B && col < d) ? qs[i * d + col] : 0.f;
    }
    load_keys(keys, M, d, k0, c0, sh.k);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBD; ++kk) {
      float a[kTQ], b[kTK];
#pragma unroll
      for (int r = 0; r < kTQ; ++r) a[r] = sh.q[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < kTK; ++c) b[c] = sh.k[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < kTQ; ++r)
#pragma unroll
        for (int c = 0; c < kTK; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
    __syncthreads();
  }
}

// (m, l) <- the log-sum-exp state of both sets of scores.
__device__ __forceinline__ void merge_lse(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {  // both empty (fmaxf ignores a NaN operand; a NaN l still spreads below)
    l = l + l2;
    return;
  }
  l = l * expf(m - mn) + l2 * expf(m2 - mn);
  m = mn;
}

// The query block and the range of key tiles of this CTA (blockIdx.x: query block, .y: split).
struct CtaWork {
  int64_t q0, split, t_begin, t_end;
};

__device__ __forceinline__ CtaWork cta_work(const InfoNceArgs& a, int64_t tiles_per_split) {
  CtaWork w;
  w.q0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  w.split = blockIdx.y;
  const int64_t tiles = (a.M + kBK - 1) / kBK;
  w.t_begin = w.split * tiles_per_split;
  w.t_end = w.t_begin + tiles_per_split < tiles ? w.t_begin + tiles_per_split : tiles;
  return w;
}

// Id, label and left-out key of the thread's query rows q0 + ty + 16 r.
struct QueryRows {
  bool in[kTQ];
  int64_t id[kTQ], label[kTQ], self[kTQ];
};

__device__ __forceinline__ void load_rows(const InfoNceArgs& a, int64_t q0, int ty, QueryRows& rows) {
#pragma unroll
  for (int r = 0; r < kTQ; ++r) {
    const int64_t i = q0 + ty + 16 * r;
    rows.in[r] = i < a.B;
    rows.id[r] = rows.in[r] ? a.qid[i] : 0;
    rows.label[r] = (rows.in[r] && a.qlab != nullptr) ? a.qlab[i] : 0;
    rows.self[r] = (rows.in[r] && a.self_index != nullptr) ? a.self_index[i] : -1;
  }
}

template <typename KT>
__global__ void __launch_bounds__(kThreads)
    info_nce_forward_kernel(InfoNceArgs a, int64_t tiles_per_split, float* __restrict__ partial) {
  __shared__ Tiles sh;
  const KT* keys = static_cast<const KT*>(a.keys);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const CtaWork w = cta_work(a, tiles_per_split);
  const int64_t q0 = w.q0;
  QueryRows rows;
  load_rows(a, q0, ty, rows);
  float m[kTQ], l[kTQ], sum_u[kTQ], cnt_u[kTQ], sum_s[kTQ], cnt_s[kTQ];
#pragma unroll
  for (int r = 0; r < kTQ; ++r) {
    m[r] = -INFINITY;
    l[r] = sum_u[r] = cnt_u[r] = sum_s[r] = cnt_s[r] = 0.f;
  }

  for (int64_t t = w.t_begin; t < w.t_end; ++t) {
    const int64_t k0 = t * kBK;
    float acc[kTQ][kTK];
    score_tile(a.qs, keys, a.B, a.M, a.d, q0, k0, sh, acc);
#pragma unroll
    for (int c = 0; c < kTK; ++c) {
      const int64_t j = k0 + tx + 16 * c;
      if (j >= a.M) continue;
      const float scale = a.key_scale != nullptr ? a.key_scale[j] : 1.f;
      const int64_t id = a.kid[j];
      const bool labelled = a.klab != nullptr;
      const int64_t label = labelled ? a.klab[j] : 0;
#pragma unroll
      for (int r = 0; r < kTQ; ++r) {
        if (!rows.in[r] || j == rows.self[r]) continue;
        const float s = acc[r][c] * scale;
        if (s > m[r]) {
          l[r] = l[r] * expf(m[r] - s) + 1.f;
          m[r] = s;
        } else {
          l[r] += expf(s - m[r]);
        }
        if (id == rows.id[r]) {
          sum_u[r] += s;
          cnt_u[r] += 1.f;
        }
        if (labelled && label == rows.label[r]) {
          sum_s[r] += s;
          cnt_s[r] += 1.f;
        }
      }
    }
  }

  // The 16 threads of a query row are the lanes of one half warp.
#pragma unroll
  for (int r = 0; r < kTQ; ++r) {
#pragma unroll
    for (int off = 8; off >= 1; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
      merge_lse(m[r], l[r], m2, l2);
      sum_u[r] += __shfl_xor_sync(0xffffffffu, sum_u[r], off);
      cnt_u[r] += __shfl_xor_sync(0xffffffffu, cnt_u[r], off);
      sum_s[r] += __shfl_xor_sync(0xffffffffu, sum_s[r], off);
      cnt_s[r] += __shfl_xor_sync(0xffffffffu, cnt_s[r], off);
    }
    const int64_t i = q0 + ty + 16 * r;
    if (tx == 0 && rows.in[r]) {
      float* p = partial + (w.split * a.B + i) * kPartial;
      p[0] = m[r];
      p[1] = l[r];
      p[2] = sum_u[r];
      p[3] = cnt_u[r];
      p[4] = sum_s[r];
      p[5] = cnt_s[r];
    }
  }
}

__global__ void info_nce_forward_merge_kernel(const float* __restrict__ partial, int64_t splits, int64_t B,
                                              float* __restrict__ stats) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  float m = -INFINITY, l = 0.f, su = 0.f, cu = 0.f, ss = 0.f, cs = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    const float* p = partial + (s * B + i) * kPartial;
    merge_lse(m, l, p[0], p[1]);
    su += p[2];
    cu += p[3];
    ss += p[4];
    cs += p[5];
  }
  float* out = stats + i * 5;
  out[0] = l > 0.f ? m + logf(l) : (l == 0.f ? -INFINITY : l);  // l NaN: NaN
  out[1] = su;
  out[2] = cu;
  out[3] = ss;
  out[4] = cs;
}

template <typename KT>
__global__ void __launch_bounds__(kThreads)
    info_nce_backward_kernel(InfoNceArgs a, const float* __restrict__ lse, const float* __restrict__ coef,
                             int64_t tiles_per_split, float* __restrict__ out /* [splits, B, d] */) {
  __shared__ Tiles sh;
  __shared__ float g[kBQ][kBK + 1];
  const KT* keys = static_cast<const KT*>(a.keys);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const CtaWork w = cta_work(a, tiles_per_split);
  const int64_t q0 = w.q0;
  float* dq = out + w.split * a.B * a.d;
  QueryRows rows;
  load_rows(a, q0, ty, rows);
  bool row_ok[kTQ];  // in the batch and with at least one kept key
  float my_lse[kTQ], a_u[kTQ], a_s[kTQ], c_sm[kTQ];
#pragma unroll
  for (int r = 0; r < kTQ; ++r) {
    const int64_t i = q0 + ty + 16 * r;
    const bool in = rows.in[r];
    my_lse[r] = in ? lse[i] : 0.f;
    row_ok[r] = in && isfinite(my_lse[r]);
    a_u[r] = in ? coef[i * 3 + 0] : 0.f;
    a_s[r] = in ? coef[i * 3 + 1] : 0.f;
    c_sm[r] = in ? coef[i * 3 + 2] : 0.f;
  }

  for (int64_t t = w.t_begin; t < w.t_end; ++t) {
    const int64_t k0 = t * kBK;
    float acc[kTQ][kTK];
    score_tile(a.qs, keys, a.B, a.M, a.d, q0, k0, sh, acc);
#pragma unroll
    for (int c = 0; c < kTK; ++c) {
      const int64_t j = k0 + tx + 16 * c;
      const bool key_ok = j < a.M;
      const float scale = (key_ok && a.key_scale != nullptr) ? a.key_scale[j] : 1.f;
      const int64_t id = key_ok ? a.kid[j] : 0;
      const bool labelled = key_ok && a.klab != nullptr;
      const int64_t label = labelled ? a.klab[j] : 0;
#pragma unroll
      for (int r = 0; r < kTQ; ++r) {
        float gv = 0.f;
        if (key_ok && row_ok[r] && j != rows.self[r]) {
          const float s = acc[r][c] * scale;
          gv = c_sm[r] * expf(s - my_lse[r]);
          if (id == rows.id[r]) gv += a_u[r];
          if (labelled && label == rows.label[r]) gv += a_s[r];
          gv *= scale;
        }
        g[ty + 16 * r][tx + 16 * c] = gv;
      }
    }
    // (score_tile ended with a barrier, so sh.k is free; g becomes visible at the next one)
    for (int64_t c0 = 0; c0 < a.d; c0 += kBD) {
      load_keys(keys, a.M, a.d, k0, c0, sh.k);
      __syncthreads();
      float part[kTQ][kTD];
#pragma unroll
      for (int r = 0; r < kTQ; ++r)
#pragma unroll
        for (int c = 0; c < kTD; ++c) part[r][c] = 0.f;
#pragma unroll 8
      for (int kk = 0; kk < kBK; ++kk) {
        float gr[kTQ], kv[kTD];
#pragma unroll
        for (int r = 0; r < kTQ; ++r) gr[r] = g[ty + 16 * r][kk];
#pragma unroll
        for (int c = 0; c < kTD; ++c) kv[c] = sh.k[tx + 16 * c][kk];
#pragma unroll
        for (int r = 0; r < kTQ; ++r)
#pragma unroll
          for (int c = 0; c < kTD; ++c) part[r][c] = fmaf(gr[r], kv[c], part[r][c]);
      }
      __syncthreads();  // sh.k is reloaded next step
#pragma unroll
      for (int r = 0; r < kTQ; ++r) {
        const int64_t i = q0 + ty + 16 * r;
#pragma unroll
        for (int c = 0; c < kTD; ++c) {
          const int64_t col = c0 + tx + 16 * c;
          if (i < a.B && col < a.d) dq[i * a.d + col] += part[r][c];
        }
      }
    }
    __syncthreads();  // g is rewritten by the next tile
  }
}

__global__ void info_nce_backward_sum_kernel(const float* __restrict__ partial, int64_t splits, int64_t n,
                                             float* __restrict__ dqs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    float s = 0.f;
    for (int64_t p = 0; p < splits; ++p) s += partial[p * n + e];
    dqs[e] = s;
  }
}

int64_t num_tiles(const InfoNceArgs& a) { return a.M > 0 ? (a.M + kBK - 1) / kBK : 1; }
int64_t num_query_blocks(const InfoNceArgs& a) { return (a.B + kBQ - 1) / kBQ; }

int64_t tiles_per_split(const InfoNceArgs& a, int splits) {
  const int64_t tiles = num_tiles(a);
  return (tiles + splits - 1) / splits;
}

bool args_ok(const InfoNceArgs& a) {
  if (a.B < 0 || a.M < 0 || a.d < 0) return false;
  if (a.B > 0 && (a.qs == nullptr || a.qid == nullptr)) return false;
  if (a.M > 0 && (a.keys == nullptr || a.kid == nullptr)) return false;
  if ((a.qlab == nullptr) != (a.klab == nullptr)) return false;
  if (num_query_blocks(a) > 0x7fffffff) return false;
  return a.key_type == KeyType::F32 || a.key_type == KeyType::F16 || a.key_type == KeyType::BF16;
}

template <typename KT>
void launch_forward(const InfoNceArgs& a, dim3 grid, int64_t tps, float* partial, cudaStream_t stream) {
  CAPKIT_LAUNCH(grid, kThreads, stream, info_nce_forward_kernel<KT>)(a, tps, partial);
}

template <typename KT>
void launch_backward(const InfoNceArgs& a, dim3 grid, const float* lse, const float* coef, int64_t tps,
                     float* out, cudaStream_t stream) {
  CAPKIT_LAUNCH(grid, kThreads, stream, info_nce_backward_kernel<KT>)(a, lse, coef, tps, out);
}

size_t align32(size_t bytes) { return (bytes + 31) / 32 * 32; }

}  // namespace

int info_nce_num_splits(const InfoNceArgs& a, bool backward) {
  const int64_t tiles = num_tiles(a);
  int64_t splits;
  if (a.num_splits > 0) {
    splits = a.num_splits;
  } else {
    int sms = a.num_sms;
    if (sms <= 0) {
      int dev = 0;
      if (cudaGetDevice(&dev) != cudaSuccess ||
          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
        sms = 108;
    }
    // about four CTAs per SM in all, however few query blocks there are
    const int64_t blocks = std::max<int64_t>(1, num_query_blocks(a));
    splits = (4 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, tiles, kMaxGridY}));
  if (backward) {  // each split beyond the first holds a [B, d] fp32 partial
    const size_t per = static_cast<size_t>(std::max<int64_t>(1, a.B * a.d)) * sizeof(float);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, static_cast<int64_t>(kMaxBackwardWorkspace / per)));
  }
  // no empty split: spread the tiles evenly over the fewest CTAs that take them
  const int64_t tps = (tiles + splits - 1) / splits;
  return static_cast<int>((tiles + tps - 1) / tps);
}

size_t info_nce_forward_workspace_bytes(const InfoNceArgs& a) {
  const int splits = info_nce_num_splits(a, false);
  return align32(static_cast<size_t>(splits) * static_cast<size_t>(std::max<int64_t>(a.B, 0)) * kPartial *
                 sizeof(float));
}

size_t info_nce_backward_workspace_bytes(const InfoNceArgs& a) {
  const int splits = info_nce_num_splits(a, true);
  if (splits <= 1) return 0;
  return align32(static_cast<size_t>(splits) * static_cast<size_t>(std::max<int64_t>(a.B, 0)) *
                 static_cast<size_t>(std::max<int64_t>(a.d, 0)) * sizeof(float));
}

cudaError_t info_nce_forward(const InfoNceArgs& a, float* stats, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (!args_ok(a) || (a.B > 0 && stats == nullptr)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  const int splits = info_nce_num_splits(a, false);
  if (workspace == nullptr || workspace_bytes < info_nce_forward_workspace_bytes(a)) return cudaErrorInvalidValue;
  float* partial = static_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>(num_query_blocks(a)), static_cast<unsigned>(splits));
  const int64_t tps = tiles_per_split(a, splits);
  switch (a.key_type) {
    case KeyType::F32: launch_forward<float>(a, grid, tps, partial, stream); break;
    case KeyType::F16: launch_forward<__half>(a, grid, tps, partial, stream); break;
    case KeyType::BF16: launch_forward<__nv_bfloat16>(a, grid, tps, partial, stream); break;
  }
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((a.B + threads - 1) / threads);
  CAPKIT_LAUNCH(blocks, threads, stream, info_nce_forward_merge_kernel)(partial, splits, a.B, stats);
  return cudaGetLastError();
}

cudaError_t info_nce_backward(const InfoNceArgs& a, const float* lse, const float* coef, float* dqs,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!args_ok(a) || (a.B > 0 && (lse == nullptr || coef == nullptr || dqs == nullptr)))
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(a.B) * static_cast<size_t>(a.d);
  if (n == 0) return cudaSuccess;
  const int splits = info_nce_num_splits(a, true);
  float* out = dqs;
  if (splits > 1) {
    if (workspace == nullptr || workspace_bytes < info_nce_backward_workspace_bytes(a))
      return cudaErrorInvalidValue;
    out = static_cast<float*>(workspace);
  }
  cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(splits) * n * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(num_query_blocks(a)), static_cast<unsigned>(splits));
  const int64_t tps = tiles_per_split(a, splits);
  switch (a.key_type) {
    case KeyType::F32: launch_backward<float>(a, grid, lse, coef, tps, out, stream); break;
    case KeyType::F16: launch_backward<__half>(a, grid, lse, coef, tps, out, stream); break;
    case KeyType::BF16: launch_backward<__nv_bfloat16>(a, grid, lse, coef, tps, out, stream); break;
  }
  if (splits > 1) {
    const int threads = 256;
    const int64_t want = (static_cast<int64_t>(n) + threads - 1) / threads;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 65535));
    CAPKIT_LAUNCH(blocks, threads, stream, info_nce_backward_sum_kernel)(out, splits,
                                                                         static_cast<int64_t>(n), dqs);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace capkit
