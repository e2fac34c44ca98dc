// CUDA implementations of the capkit masked_linear and info_nce ops (schemas
// are defined in csrc/bindings.cpp).  Validates arguments, makes inputs
// contiguous, allocates outputs and workspaces, and calls the launchers of
// masked_linear.cu and info_nce.cu on the current stream.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "info_nce.cuh"
#include "masked_linear.cuh"

namespace capkit {
namespace {

using cuda::DType;
using cuda::MaskKind;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    default:
      return DType::BF16;
  }
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A 2-D floating-point CUDA matrix on `device` (the first one checked
// defines the device).
void check_matrix(const char* op, const char* name, const at::Tensor& t,
                  const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other ",
              "inputs, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

// Mask: absent, uint8 / bool (0/1 bytes, same storage), or the weight's
// dtype; shape [N, K].
MaskKind check_mask(const char* op, const std::optional<at::Tensor>& mask,
                    const at::Tensor& weight) {
  if (!mask.has_value()) return MaskKind::None;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.is_cuda() && m.device() == weight.device(), op,
              ": mask must be a CUDA tensor on ", weight.device(), ", got ", m.device());
  TORCH_CHECK(m.sizes() == weight.sizes(), op, ": mask must have the weight's shape ",
              weight.sizes(), ", got ", m.sizes());
  if (m.scalar_type() == at::kByte || m.scalar_type() == at::kBool) return MaskKind::U8;
  TORCH_CHECK(m.scalar_type() == weight.scalar_type(), op,
              ": mask must be uint8, bool or have the weight's dtype (", weight.scalar_type(),
              "), got ", m.scalar_type());
  return MaskKind::SameAsWeight;
}

// Block layout: both index tensors or neither; int32 1-D CUDA tensors;
// ptr has (number of block lines) + 1 entries.  Returns whether present.
bool check_layout(const char* op, const char* ptr_name, const char* idx_name,
                  const std::optional<at::Tensor>& ptr, const std::optional<at::Tensor>& idx,
                  int64_t block_size, int64_t lines_dim, const char* lines_dim_name,
                  const at::Device& device) {
  TORCH_CHECK(ptr.has_value() == idx.has_value(), op, ": ", ptr_name, " and ", idx_name,
              " must be given together (block layout) or both be None");
  if (!ptr.has_value()) return false;
  TORCH_CHECK(cuda::masked_linear_block_size_ok(block_size), op,
              ": block_size must be one of 16, 32, 64, 128 with a block layout, got ",
              block_size);
  for (const auto* pr : {&ptr, &idx}) {
    const at::Tensor& t = **pr;
    const char* name = pr == &ptr ? ptr_name : idx_name;
    TORCH_CHECK(t.is_cuda() && t.device() == device, op, ": ", name,
                " must be a CUDA tensor on ", device, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  }
  const int64_t lines = (lines_dim + block_size - 1) / block_size;
  TORCH_CHECK(ptr->numel() == lines + 1, op, ": ", ptr_name, " must have ceil(",
              lines_dim_name, " / block_size) + 1 = ", lines + 1, " entries, got ",
              ptr->numel());
  TORCH_CHECK(idx->numel() <= INT32_MAX, op, ": ", idx_name, " is too long for int32 offsets");
  return true;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err),
              " (", cudaGetErrorString(err), ")");
}

// Workspace tensor for split reductions; lives until the end of the op,
// which is enough because the caching allocator orders reuse on the stream.
at::Tensor make_workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

const int32_t* opt_idx(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int32_t>() : nullptr;
}

std::optional<at::Tensor> opt_contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

at::Tensor masked_linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& row_ptr,
                                      const std::optional<at::Tensor>& col_idx,
                                      int64_t block_size) {
  constexpr const char* op = "capkit::masked_linear_forward";
  check_matrix(op, "x", x, x.device());
  check_matrix(op, "weight", weight, x.device());
  TORCH_CHECK(supported_dtype(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": x is [M, K] = ", x.sizes(),
              " and weight must be [N, K], got ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const MaskKind mk = check_mask(op, mask, weight);
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device(), op,
                ": bias must be a CUDA tensor on ", x.device(), ", got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [N] = [", N,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype (",
                x.scalar_type(), "), got ", bias->scalar_type());
  }
  const bool layout =
      check_layout(op, "row_ptr", "col_idx", row_ptr, col_idx, block_size, N, "N", x.device());

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const auto mc = opt_contiguous(mask), bc = opt_contiguous(bias);
  const auto rp = opt_contiguous(row_ptr), ci = opt_contiguous(col_idx);
  at::Tensor y = at::empty({M, N}, x.options());

  cuda::ForwardArgs a;
  a.x = xc.data_ptr();
  a.weight = wc.data_ptr();
  a.mask = opt_ptr(mc);
  a.bias = opt_ptr(bc);
  a.row_ptr = opt_idx(rp);
  a.col_idx = opt_idx(ci);
  a.nnz_blocks = layout ? ci->numel() : 0;
  a.y = y.data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  a.block_size = static_cast<int>(layout ? block_size : 0);
  a.dtype = to_dtype(x.scalar_type());
  a.mask_kind = mk;
  if (M == 0) return y;
  const at::Tensor ws = make_workspace(cuda::masked_linear_forward_workspace_bytes(a), x);
  if (ws.defined()) {
    a.workspace = ws.data_ptr();
    a.workspace_bytes = static_cast<size_t>(ws.numel());
  }
  check_launch(op, cuda::masked_linear_forward(a, c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor masked_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& col_ptr,
                                         const std::optional<at::Tensor>& row_idx,
                                         int64_t block_size) {
  constexpr const char* op = "capkit::masked_linear_grad_input";
  check_matrix(op, "grad_out", grad_out, grad_out.device());
  check_matrix(op, "weight", weight, grad_out.device());
  TORCH_CHECK(supported_dtype(grad_out.scalar_type()), op,
              ": grad_out must be float32, float16 or bfloat16, got ", grad_out.scalar_type());
  TORCH_CHECK(weight.scalar_type() == grad_out.scalar_type(), op,
              ": weight must have grad_out's dtype (", grad_out.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(0) == grad_out.size(1), op, ": grad_out is [M, N] = ",
              grad_out.sizes(), " and weight must be [N, K], got ", weight.sizes());
  const int64_t M = grad_out.size(0), N = weight.size(0), K = weight.size(1);
  const MaskKind mk = check_mask(op, mask, weight);
  const bool layout = check_layout(op, "col_ptr", "row_idx", col_ptr, row_idx, block_size, K, "K",
                                   grad_out.device());

  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor gc = grad_out.contiguous(), wc = weight.contiguous();
  const auto mc = opt_contiguous(mask);
  const auto cp = opt_contiguous(col_ptr), ri = opt_contiguous(row_idx);
  at::Tensor dx = at::empty({M, K}, grad_out.options());

  cuda::GradInputArgs a;
  a.grad_out = gc.data_ptr();
  a.weight = wc.data_ptr();
  a.mask = opt_ptr(mc);
  a.col_ptr = opt_idx(cp);
  a.row_idx = opt_idx(ri);
  a.nnz_blocks = layout ? ri->numel() : 0;
  a.dx = dx.data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  a.block_size = static_cast<int>(layout ? block_size : 0);
  a.dtype = to_dtype(grad_out.scalar_type());
  a.mask_kind = mk;
  if (M == 0) return dx;
  const at::Tensor ws = make_workspace(cuda::masked_linear_grad_input_workspace_bytes(a), grad_out);
  if (ws.defined()) {
    a.workspace = ws.data_ptr();
    a.workspace_bytes = static_cast<size_t>(ws.numel());
  }
  check_launch(op, cuda::masked_linear_grad_input(a, c10::cuda::getCurrentCUDAStream()));
  return dx;
}

std::tuple<at::Tensor, at::Tensor> masked_linear_grad_weight_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& row_ptr,
    const std::optional<at::Tensor>& col_idx, int64_t block_size, bool need_weight_grad,
    bool need_mask_grad) {
  constexpr const char* op = "capkit::masked_linear_grad_weight";
  check_matrix(op, "grad_out", grad_out, grad_out.device());
  check_matrix(op, "x", x, grad_out.device());
  check_matrix(op, "weight", weight, grad_out.device());
  TORCH_CHECK(supported_dtype(grad_out.scalar_type()), op,
              ": grad_out must be float32, float16 or bfloat16, got ", grad_out.scalar_type());
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type() &&
                  weight.scalar_type() == grad_out.scalar_type(),
              op, ": grad_out, x and weight must share one dtype, got ", grad_out.scalar_type(),
              ", ", x.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out [M, N] = ", grad_out.sizes(),
              " and x [M, K] = ", x.sizes(), " must have the same M");
  TORCH_CHECK(weight.size(0) == grad_out.size(1) && weight.size(1) == x.size(1), op,
              ": weight must be [N, K] = [", grad_out.size(1), ", ", x.size(1), "], got ",
              weight.sizes());
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  const MaskKind mk = check_mask(op, mask, weight);
  TORCH_CHECK(!need_mask_grad || mk == MaskKind::SameAsWeight, op,
              ": need_mask_grad requires a floating-point mask with the weight's dtype (",
              weight.scalar_type(), ")");
  const bool layout = check_layout(op, "row_ptr", "col_idx", row_ptr, col_idx, block_size, N, "N",
                                   grad_out.device());

  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor dW = need_weight_grad ? at::empty({N, K}, weight.options())
                                   : at::empty({0}, weight.options());
  at::Tensor dM = need_mask_grad ? at::empty({N, K}, mask->options())
                                 : at::empty({0}, mask.has_value() ? mask->options()
                                                                   : weight.options());
  if (!need_weight_grad && !need_mask_grad) return {dW, dM};

  const at::Tensor gc = grad_out.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const auto mc = opt_contiguous(mask);
  const auto rp = opt_contiguous(row_ptr), ci = opt_contiguous(col_idx);

  cuda::GradWeightArgs a;
  a.grad_out = gc.data_ptr();
  a.x = xc.data_ptr();
  a.weight = wc.data_ptr();
  a.mask = opt_ptr(mc);
  a.row_ptr = opt_idx(rp);
  a.col_idx = opt_idx(ci);
  a.nnz_blocks = layout ? ci->numel() : 0;
  a.dW = need_weight_grad ? dW.data_ptr() : nullptr;
  a.dM = need_mask_grad ? dM.data_ptr() : nullptr;
  a.M = M;
  a.N = N;
  a.K = K;
  a.block_size = static_cast<int>(layout ? block_size : 0);
  a.dtype = to_dtype(grad_out.scalar_type());
  a.mask_kind = mk;
  a.need_weight_grad = need_weight_grad;
  a.need_mask_grad = need_mask_grad;
  const at::Tensor ws =
      make_workspace(cuda::masked_linear_grad_weight_workspace_bytes(a), grad_out);
  if (ws.defined()) {
    a.workspace = ws.data_ptr();
    a.workspace_bytes = static_cast<size_t>(ws.numel());
  }
  // M == 0 is handled by the launcher (zero gradients, no GEMM).
  check_launch(op, cuda::masked_linear_grad_weight(a, c10::cuda::getCurrentCUDAStream()));
  return {dW, dM};
}

// ---------------------------------------------------------------------------
// info_nce: the checks shared by the forward and backward.  self_index values
// are not range-checked here (that would need a device sync; capkit.ops does
// it): the kernels only compare them with key positions, so a value outside
// [0, M) leaves nothing out and is never used as an address.

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                  at::ScalarType dtype, const char* rows_of, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, op, ": ", name, " must be a CUDA tensor on ",
              device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be a vector of length ", n,
              " (one per row of ", rows_of, "), got shape ", t.sizes());
}

struct InfoNceInputs {
  at::Tensor qs, keys;
  std::optional<at::Tensor> key_scale, qlab, klab, self_index;
  at::Tensor qid, kid;
  cuda::InfoNceArgs args;
};

InfoNceInputs info_nce_inputs(const char* op, const at::Tensor& qs, const at::Tensor& keys,
                              const std::optional<at::Tensor>& key_scale, const at::Tensor& qid,
                              const at::Tensor& kid, const std::optional<at::Tensor>& qlab,
                              const std::optional<at::Tensor>& klab,
                              const std::optional<at::Tensor>& self_index) {
  const at::Device device = qs.device();
  check_matrix(op, "qs", qs, device);
  TORCH_CHECK(qs.scalar_type() == at::kFloat, op, ": qs must be float32, got ", qs.scalar_type());
  check_matrix(op, "keys", keys, device);
  TORCH_CHECK(supported_dtype(keys.scalar_type()), op,
              ": keys must be float32, float16 or bfloat16, got ", keys.scalar_type());
  const int64_t B = qs.size(0), d = qs.size(1), M = keys.size(0);
  TORCH_CHECK(keys.size(1) == d, op, ": keys must have ", d, " columns to match qs, got shape ",
              keys.sizes());
  if (key_scale.has_value())
    check_vector(op, "key_scale", *key_scale, M, at::kFloat, "keys", device);
  check_vector(op, "qid", qid, B, at::kLong, "qs", device);
  check_vector(op, "kid", kid, M, at::kLong, "keys", device);
  TORCH_CHECK(qlab.has_value() == klab.has_value(), op, ": qlab and klab must be given together");
  if (qlab.has_value()) {
    check_vector(op, "qlab", *qlab, B, at::kLong, "qs", device);
    check_vector(op, "klab", *klab, M, at::kLong, "keys", device);
  }
  if (self_index.has_value())
    check_vector(op, "self_index", *self_index, B, at::kLong, "qs", device);

  InfoNceInputs in;
  in.qs = qs.contiguous();
  in.keys = keys.contiguous();
  in.key_scale = opt_contiguous(key_scale);
  in.qid = qid.contiguous();
  in.kid = kid.contiguous();
  in.qlab = opt_contiguous(qlab);
  in.klab = opt_contiguous(klab);
  in.self_index = opt_contiguous(self_index);
  cuda::InfoNceArgs& a = in.args;
  a.qs = in.qs.data_ptr<float>();
  a.keys = in.keys.data_ptr();
  a.key_type = keys.scalar_type() == at::kFloat  ? cuda::KeyType::F32
               : keys.scalar_type() == at::kHalf ? cuda::KeyType::F16
                                                 : cuda::KeyType::BF16;
  a.key_scale = in.key_scale.has_value() ? in.key_scale->data_ptr<float>() : nullptr;
  a.qid = in.qid.data_ptr<int64_t>();
  a.kid = in.kid.data_ptr<int64_t>();
  a.qlab = in.qlab.has_value() ? in.qlab->data_ptr<int64_t>() : nullptr;
  a.klab = in.klab.has_value() ? in.klab->data_ptr<int64_t>() : nullptr;
  a.self_index = in.self_index.has_value() ? in.self_index->data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.M = M;
  a.d = d;
  return in;
}

at::Tensor info_nce_forward_cuda(const at::Tensor& qs, const at::Tensor& keys,
                                 const std::optional<at::Tensor>& key_scale, const at::Tensor& qid,
                                 const at::Tensor& kid, const std::optional<at::Tensor>& qlab,
                                 const std::optional<at::Tensor>& klab,
                                 const std::optional<at::Tensor>& self_index) {
  constexpr const char* op = "capkit::info_nce_forward";
  InfoNceInputs in = info_nce_inputs(op, qs, keys, key_scale, qid, kid, qlab, klab, self_index);
  const c10::cuda::CUDAGuard guard(qs.device());  // the launchers size the key split for this device
  at::Tensor stats = at::empty({in.args.B, 5}, qs.options());
  if (in.args.B == 0) return stats;
  const size_t bytes = cuda::info_nce_forward_workspace_bytes(in.args);
  const at::Tensor ws = make_workspace(bytes, qs);
  check_launch(op, cuda::info_nce_forward(in.args, stats.data_ptr<float>(),
                                          ws.defined() ? ws.data_ptr() : nullptr, bytes,
                                          c10::cuda::getCurrentCUDAStream()));
  return stats;
}

at::Tensor info_nce_backward_cuda(const at::Tensor& qs, const at::Tensor& keys,
                                  const std::optional<at::Tensor>& key_scale, const at::Tensor& qid,
                                  const at::Tensor& kid, const std::optional<at::Tensor>& qlab,
                                  const std::optional<at::Tensor>& klab,
                                  const std::optional<at::Tensor>& self_index,
                                  const at::Tensor& lse, const at::Tensor& coef) {
  constexpr const char* op = "capkit::info_nce_backward";
  InfoNceInputs in = info_nce_inputs(op, qs, keys, key_scale, qid, kid, qlab, klab, self_index);
  const int64_t B = in.args.B;
  check_vector(op, "lse", lse, B, at::kFloat, "qs", qs.device());
  TORCH_CHECK(coef.is_cuda() && coef.device() == qs.device(), op, ": coef must be a CUDA tensor on ",
              qs.device(), ", got ", coef.device());
  TORCH_CHECK(coef.scalar_type() == at::kFloat, op, ": coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == B && coef.size(1) == 3, op,
              ": coef must be [", B, ", 3], got shape ", coef.sizes());
  const c10::cuda::CUDAGuard guard(qs.device());
  const at::Tensor lc = lse.contiguous(), cc = coef.contiguous();
  at::Tensor dqs = at::empty({B, in.args.d}, qs.options());
  if (dqs.numel() == 0) return dqs;
  const size_t bytes = cuda::info_nce_backward_workspace_bytes(in.args);
  const at::Tensor ws = make_workspace(bytes, qs);
  check_launch(op, cuda::info_nce_backward(in.args, lc.data_ptr<float>(), cc.data_ptr<float>(),
                                           dqs.data_ptr<float>(),
                                           ws.defined() ? ws.data_ptr() : nullptr, bytes,
                                           c10::cuda::getCurrentCUDAStream()));
  return dqs;
}

}  // namespace
}  // namespace capkit

TORCH_LIBRARY_IMPL(capkit, CUDA, m) {
  m.impl("masked_linear_forward", &capkit::masked_linear_forward_cuda);
  m.impl("masked_linear_grad_input", &capkit::masked_linear_grad_input_cuda);
  m.impl("masked_linear_grad_weight", &capkit::masked_linear_grad_weight_cuda);
  m.impl("info_nce_forward", &capkit::info_nce_forward_cuda);
  m.impl("info_nce_backward", &capkit::info_nce_backward_cuda);
}
