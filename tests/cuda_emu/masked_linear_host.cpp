// C entry points over csrc/cuda/masked_linear.cu compiled for host emulation (tests only), called
// from tests/test_cuda_masked_linear_emulated.py through ctypes. dtype: 0 fp32, 1 fp16, 2 bf16;
// mask_kind: 0 none, 1 uint8, 2 the weight's dtype. Returns the launcher's status.
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "masked_linear.cuh"

namespace {
using namespace capkit::cuda;

// The fields the three argument structs share.
template <typename Args>
void set_common(Args& a, const void* mask, int mask_kind, int64_t nnz, int64_t M, int64_t N, int64_t K, int block,
                int dtype) {
  a.mask = mask;
  a.mask_kind = static_cast<MaskKind>(mask_kind);
  a.nnz_blocks = nnz;
  a.M = M;
  a.N = N;
  a.K = K;
  a.block_size = block;
  a.dtype = static_cast<DType>(dtype);
}

struct Aligned {  // 32-byte aligned workspace, as the launchers require
  void* p = nullptr;
  explicit Aligned(size_t bytes) {
    if (bytes) p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  ~Aligned() { std::free(p); }
};
}  // namespace

extern "C" int emu_ml_forward(const void* x, const void* w, const void* mask, int mask_kind, const void* bias,
                              const int32_t* row_ptr, const int32_t* col_idx, int64_t nnz, void* y, int64_t M,
                              int64_t N, int64_t K, int block, int dtype) {
  ForwardArgs a;
  set_common(a, mask, mask_kind, nnz, M, N, K, block, dtype);
  a.x = x;
  a.weight = w;
  a.bias = bias;
  a.row_ptr = row_ptr;
  a.col_idx = col_idx;
  a.y = y;
  a.workspace_bytes = masked_linear_forward_workspace_bytes(a);
  Aligned ws(a.workspace_bytes);
  a.workspace = ws.p;
  return masked_linear_forward(a, nullptr);
}

extern "C" int emu_ml_grad_input(const void* dy, const void* w, const void* mask, int mask_kind,
                                 const int32_t* col_ptr, const int32_t* row_idx, int64_t nnz, void* dx, int64_t M,
                                 int64_t N, int64_t K, int block, int dtype) {
  GradInputArgs a;
  set_common(a, mask, mask_kind, nnz, M, N, K, block, dtype);
  a.grad_out = dy;
  a.weight = w;
  a.col_ptr = col_ptr;
  a.row_idx = row_idx;
  a.dx = dx;
  a.workspace_bytes = masked_linear_grad_input_workspace_bytes(a);
  Aligned ws(a.workspace_bytes);
  a.workspace = ws.p;
  return masked_linear_grad_input(a, nullptr);
}

extern "C" int emu_ml_grad_weight(const void* dy, const void* x, const void* w, const void* mask, int mask_kind,
                                  const int32_t* row_ptr, const int32_t* col_idx, int64_t nnz, void* dw, void* dm,
                                  int64_t M, int64_t N, int64_t K, int block, int dtype, int need_w, int need_m) {
  GradWeightArgs a;
  set_common(a, mask, mask_kind, nnz, M, N, K, block, dtype);
  a.grad_out = dy;
  a.x = x;
  a.weight = w;
  a.row_ptr = row_ptr;
  a.col_idx = col_idx;
  a.dW = dw;
  a.dM = dm;
  a.need_weight_grad = need_w != 0;
  a.need_mask_grad = need_m != 0;
  a.workspace_bytes = masked_linear_grad_weight_workspace_bytes(a);
  Aligned ws(a.workspace_bytes);
  a.workspace = ws.p;
  return masked_linear_grad_weight(a, nullptr);
}

// Workspace bytes of each op for a dense weight (no mask, no layout): > 0 when it splits its reduction.
extern "C" int64_t emu_ml_workspace_bytes(int op, int64_t M, int64_t N, int64_t K, int dtype) {
  if (op == 0) {
    ForwardArgs a;
    set_common(a, nullptr, 0, 0, M, N, K, 0, dtype);
    return static_cast<int64_t>(masked_linear_forward_workspace_bytes(a));
  }
  if (op == 1) {
    GradInputArgs a;
    set_common(a, nullptr, 0, 0, M, N, K, 0, dtype);
    return static_cast<int64_t>(masked_linear_grad_input_workspace_bytes(a));
  }
  GradWeightArgs a;
  static char output;  // dW must be given; the query never writes it
  set_common(a, nullptr, 0, 0, M, N, K, 0, dtype);
  a.dW = &output;
  return static_cast<int64_t>(masked_linear_grad_weight_workspace_bytes(a));
}
