// CPU kernels of the masked linear op, on raw pointers (no torch types).
//
// All matrices are row-major and contiguous, float32, fp32 accumulation.
//   x [M, K], weight [N, K], y [M, N], grad_out [M, N], dx [M, K], dweight/dmask [N, K].
// Mask: at most one of mask_u8 (0/1 bytes) and mask_f32 (multiplicative factor) is non-null;
// both null means "no element mask" (every element of a live block counts).
// Block layout over the weight's block grid [ceil(N/b), ceil(K/b)], b = block_size:
//   CSR: row_ptr [nbr + 1], col_idx [nnz] (live block columns of each block row);
//   CSC: col_ptr [nbc + 1], row_idx [nnz].
// Null layout pointers mean every block is live (the kernels then tile with an internal size).
#pragma once
#include <cstddef>
#include <cstdint>

namespace capkit {
namespace cpu {

struct MaskView {
  const uint8_t* u8 = nullptr;
  const float* f32 = nullptr;
};

// y = x @ (weight * mask)^T + bias; dead blocks are skipped.
void masked_linear_forward_f32(const float* x, const float* weight, MaskView mask, const float* bias,
                               float* y, int64_t M, int64_t N, int64_t K, const int32_t* row_ptr,
                               const int32_t* col_idx, int block_size);

// dx = grad_out @ (weight * mask); dead blocks are skipped.
void masked_linear_grad_input_f32(const float* grad_out, const float* weight, MaskView mask, float* dx,
                                  int64_t M, int64_t N, int64_t K, const int32_t* col_ptr,
                                  const int32_t* row_idx, int block_size);

// G = grad_out^T @ x computed once per tile; dweight = G * mask (if dweight != null),
// dmask = G * weight (if dmask != null). Without dmask and with a layout, only live blocks of
// G are computed and dead blocks of dweight are set to zero.
void masked_linear_grad_weight_f32(const float* grad_out, const float* x, const float* weight, MaskView mask,
                                   float* dweight, float* dmask, int64_t M, int64_t N, int64_t K,
                                   const int32_t* row_ptr, const int32_t* col_idx, int block_size);

// Asks the kernel for 2 MiB pages over the 2 MiB-aligned interior of [p, p + bytes) when the
// range is large (first-touch faults of 4 KiB pages are a large share of a big layer's time).
void advise_huge_pages(void* p, size_t bytes);

bool cpu_has_avx2_fma();
bool cpu_has_avx512f();
int cpu_max_threads();

}  // namespace cpu
}  // namespace capkit
