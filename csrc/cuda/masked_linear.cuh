// Host-side interface of the masked / block-sparse linear CUDA kernels.
// Plain C++ on raw device pointers so it can be used without torch headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace capkit {
namespace cuda {

// Element type shared by x, weight, grad_out (and bias / float masks).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// None: no element mask.  U8: uint8 0/1 mask, applied as a select (a pruned
// entry is exactly zero even where the weight is not finite).  SameAsWeight:
// multiplicative factor stored in the weight's dtype.
enum class MaskKind : int { None = 0, U8 = 1, SameAsWeight = 2 };

// Block sizes accepted with a block layout.
inline bool masked_linear_block_size_ok(int64_t b) {
  return b == 16 || b == 32 || b == 64 || b == 128;
}

// y[M, N] = x[M, K] @ (weight * mask)^T + bias, dead blocks treated as zero.
// All matrices are dense, contiguous and row-major.  row_ptr / col_idx are
// the int32 CSR of the [ceil(N/b), ceil(K/b)] block grid (col_idx ascending
// within a row), or both null.  The layout is present iff row_ptr is set;
// col_idx may be null when nnz_blocks == 0.
struct ForwardArgs {
  const void* x = nullptr;        // [M, K]
  const void* weight = nullptr;   // [N, K]
  const void* mask = nullptr;     // [N, K] or null (mask_kind None)
  const void* bias = nullptr;     // [N] or null
  const int32_t* row_ptr = nullptr;
  const int32_t* col_idx = nullptr;
  int64_t nnz_blocks = 0;         // col_idx's length
  void* y = nullptr;              // [M, N]
  int64_t M = 0, N = 0, K = 0;
  int block_size = 0;             // used only with a layout
  DType dtype = DType::F32;
  MaskKind mask_kind = MaskKind::None;
  void* workspace = nullptr;      // fp32 split-K partials, see below
  size_t workspace_bytes = 0;
};

// dx[M, K] = grad_out[M, N] @ (weight * mask).  col_ptr / row_idx are the
// int32 CSC of the block grid (same conventions as the CSR above).
struct GradInputArgs {
  const void* grad_out = nullptr;  // [M, N]
  const void* weight = nullptr;    // [N, K]
  const void* mask = nullptr;      // [N, K] or null
  const int32_t* col_ptr = nullptr;
  const int32_t* row_idx = nullptr;
  int64_t nnz_blocks = 0;          // row_idx's length
  void* dx = nullptr;              // [M, K]
  int64_t M = 0, N = 0, K = 0;
  int block_size = 0;
  DType dtype = DType::F32;
  MaskKind mask_kind = MaskKind::None;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// G = grad_out^T @ x (fp32); dW = G * mask_eff, dM = G * weight.
// With a layout and need_mask_grad false only live blocks are computed and
// dead blocks of dW are zero.  nnz_blocks is col_idx's length.
struct GradWeightArgs {
  const void* grad_out = nullptr;  // [M, N]
  const void* x = nullptr;         // [M, K]
  const void* weight = nullptr;    // [N, K]
  const void* mask = nullptr;      // [N, K] or null
  const int32_t* row_ptr = nullptr;
  const int32_t* col_idx = nullptr;
  int64_t nnz_blocks = 0;
  void* dW = nullptr;              // [N, K], weight dtype; used if need_weight_grad
  void* dM = nullptr;              // [N, K], mask dtype; used if need_mask_grad
  int64_t M = 0, N = 0, K = 0;
  int block_size = 0;
  DType dtype = DType::F32;
  MaskKind mask_kind = MaskKind::None;
  bool need_weight_grad = true;
  bool need_mask_grad = false;     // requires mask_kind SameAsWeight
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Workspace: when the output has too few tiles to fill the GPU (few tokens,
// small or very sparse weights) the reduction is split over more CTAs whose
// fp32 partials are summed by a second kernel.  *_workspace_bytes returns
// the bytes that needs on the current device (0 when no split is used); it
// must be queried with the same args and device as the launch, and the
// workspace must be 32-byte aligned.
size_t masked_linear_forward_workspace_bytes(const ForwardArgs& args);
size_t masked_linear_grad_input_workspace_bytes(const GradInputArgs& args);
size_t masked_linear_grad_weight_workspace_bytes(const GradWeightArgs& args);

// Each launcher enqueues on `stream` and returns the launch status
// (cudaGetLastError after the last launch); cudaErrorInvalidValue for
// arguments the kernels do not support or a missing workspace.
cudaError_t masked_linear_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t masked_linear_grad_input(const GradInputArgs& args, cudaStream_t stream);
cudaError_t masked_linear_grad_weight(const GradWeightArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace capkit
