// capkit._C: defines the torch custom ops (schemas), registers the CPU kernels, and exposes a
// small pybind11 module with build information. The CUDA kernels register themselves for the
// same ops in csrc/cuda/bindings_cuda.cpp when the extension is built with CUDA.
//
// Tensors become raw pointers here, after every argument has been checked, so the kernels in
// csrc/cpu and csrc/cuda stay free of torch types.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <string>

#include "cpu/attention_cpu.h"
#include "cpu/info_nce_cpu.h"
#include "cpu/masked_linear_cpu.h"
#include "cpu/sparse_linear_cpu.h"

namespace capkit {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "capkit: ", name, " must be a 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "capkit: ", name, " must be contiguous");
}

// Output tensors of the CPU ops: uninitialised, with huge-page advice when large.
Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
  cpu::advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks a CSR (or CSC) block list; `extent` is the weight dimension its pointer array runs over.
void check_layout(const OptTensor& ptr, const OptTensor& idx, int64_t extent, int64_t block_size,
                  const char* ptr_name, const char* idx_name, const at::Device& dev) {
  TORCH_CHECK(ptr.has_value() == idx.has_value(), "capkit: ", ptr_name, " and ", idx_name,
              " must be given together");
  if (!ptr.has_value()) return;
  TORCH_CHECK(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128,
              "capkit: block_size must be one of 16, 32, 64, 128; got ", block_size);
  const int64_t n_lines = cdiv(extent, block_size);
  for (const auto* p : {&*ptr, &*idx}) {
    TORCH_CHECK(p->scalar_type() == at::kInt && p->dim() == 1 && p->is_contiguous(), "capkit: ",
                p == &*ptr ? ptr_name : idx_name, " must be a contiguous 1-D int32 tensor");
    TORCH_CHECK(p->device() == dev, "capkit: ", p == &*ptr ? ptr_name : idx_name, " is on ", p->device(),
                " but the inputs are on ", dev);
  }
  TORCH_CHECK(ptr->numel() == n_lines + 1, "capkit: ", ptr_name, " must have ", n_lines + 1,
              " entries for this weight and block size, got ", ptr->numel());
}

cpu::MaskView mask_view(const OptTensor& mask, const Tensor& weight) {
  cpu::MaskView mv;
  if (!mask.has_value()) return mv;
  TORCH_CHECK(mask->sizes() == weight.sizes(), "capkit: mask must have the weight's shape ", weight.sizes(),
              ", got ", mask->sizes());
  TORCH_CHECK(mask->is_contiguous(), "capkit: mask must be contiguous");
  TORCH_CHECK(mask->device() == weight.device(), "capkit: mask must be on the weight's device");
  if (mask->scalar_type() == at::kByte || mask->scalar_type() == at::kBool) {
    mv.u8 = reinterpret_cast<const uint8_t*>(mask->data_ptr());
  } else {
    TORCH_CHECK(mask->scalar_type() == at::kFloat, "capkit: the cpu backend takes a bool/uint8 or float32 mask, got ",
                mask->scalar_type());
    mv.f32 = mask->data_ptr<float>();
  }
  return mv;
}

void check_f32_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "capkit: ", name, " must be a CPU tensor for the cpu backend");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "capkit: the cpu backend supports float32 ", name, ", got ",
              t.scalar_type());
}

const int32_t* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr<int32_t>() : nullptr; }

Tensor forward_cpu(const Tensor& x, const Tensor& weight, const OptTensor& mask, const OptTensor& bias,
                   const OptTensor& row_ptr, const OptTensor& col_idx, int64_t block_size) {
  check_matrix(x, "x");
  check_matrix(weight, "weight");
  check_f32_cpu(x, "x");
  check_f32_cpu(weight, "weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "capkit: weight must have shape [out, ", K, "] to match x's last dimension, got ",
              weight.sizes());
  const auto mv = mask_view(mask, weight);
  if (bias.has_value()) {
    check_f32_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "capkit: bias must be a contiguous vector of length ", N);
  }
  check_layout(row_ptr, col_idx, N, block_size, "row_ptr", "col_idx", x.device());
  Tensor y = new_output({M, N}, x.options());
  cpu::masked_linear_forward_f32(x.data_ptr<float>(), weight.data_ptr<float>(), mv,
                                 bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N,
                                 K, ptr_or_null(row_ptr), ptr_or_null(col_idx), static_cast<int>(block_size));
  return y;
}

Tensor grad_input_cpu(const Tensor& grad_out, const Tensor& weight, const OptTensor& mask, const OptTensor& col_ptr,
                      const OptTensor& row_idx, int64_t block_size) {
  check_matrix(grad_out, "grad_out");
  check_matrix(weight, "weight");
  check_f32_cpu(grad_out, "grad_out");
  check_f32_cpu(weight, "weight");
  const int64_t M = grad_out.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_out.size(1) == N, "capkit: grad_out must have ", N, " columns, got ", grad_out.sizes());
  const auto mv = mask_view(mask, weight);
  check_layout(col_ptr, row_idx, K, block_size, "col_ptr", "row_idx", grad_out.device());
  Tensor dx = new_output({M, K}, grad_out.options());
  cpu::masked_linear_grad_input_f32(grad_out.data_ptr<float>(), weight.data_ptr<float>(), mv, dx.data_ptr<float>(),
                                    M, N, K, ptr_or_null(col_ptr), ptr_or_null(row_idx),
                                    static_cast<int>(block_size));
  return dx;
}

std::tuple<Tensor, Tensor> grad_weight_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                           const OptTensor& mask, const OptTensor& row_ptr,
                                           const OptTensor& col_idx, int64_t block_size, bool need_weight_grad,
                                           bool need_mask_grad) {
  check_matrix(grad_out, "grad_out");
  check_matrix(x, "x");
  check_matrix(weight, "weight");
  check_f32_cpu(grad_out, "grad_out");
  check_f32_cpu(x, "x");
  check_f32_cpu(weight, "weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && grad_out.size(0) == M && grad_out.size(1) == N,
              "capkit: shapes do not agree: grad_out ", grad_out.sizes(), ", x ", x.sizes(), ", weight ",
              weight.sizes());
  const auto mv = mask_view(mask, weight);
  TORCH_CHECK(!need_mask_grad || mv.f32 != nullptr, "capkit: a mask gradient needs a float32 mask");
  check_layout(row_ptr, col_idx, N, block_size, "row_ptr", "col_idx", x.device());
  Tensor dw = need_weight_grad ? new_output({N, K}, weight.options()) : at::empty({0}, weight.options());
  Tensor dm = need_mask_grad ? new_output({N, K}, mask->options()) : at::empty({0}, weight.options());
  if (need_weight_grad || need_mask_grad) {
    if (M == 0) {
      if (need_weight_grad) dw.zero_();
      if (need_mask_grad) dm.zero_();
    } else {
      cpu::masked_linear_grad_weight_f32(grad_out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(),
                                         mv, need_weight_grad ? dw.data_ptr<float>() : nullptr,
                                         need_mask_grad ? dm.data_ptr<float>() : nullptr, M, N, K,
                                         ptr_or_null(row_ptr), ptr_or_null(col_idx), static_cast<int>(block_size));
    }
  }
  return {dw, dm};
}


// A panelled CSR weight by output row (capkit/ops/sparse_format.py builds it) for inputs of K
// features, checked, with its bias (nullable, a vector of out_features).
cpu::CsrMatrix checked_csr(const Tensor& ptr, const Tensor& col_idx, const Tensor& values, const OptTensor& bias,
                           int64_t out_features, int64_t panel, int64_t K, const OptTensor& quads = std::nullopt) {
  check_f32_cpu(values, "values");
  for (const auto* t : {&ptr, &col_idx}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(),
                "capkit: ", t == &ptr ? "ptr" : "col_idx", " must be a contiguous 1-D int32 CPU tensor");
  }
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "capkit: values must be a contiguous vector");
  const int64_t N = out_features, nnz = col_idx.numel();
  TORCH_CHECK(N >= 0, "capkit: out_features must be >= 0");
  const int64_t n_panels = panel > 0 && K > 0 ? cdiv(K, panel) : 1;
  TORCH_CHECK(ptr.numel() == n_panels * N + 1, "capkit: ptr must have ", n_panels * N + 1, " entries (",
              n_panels, " panel(s) of ", N, " rows, + 1) for x with ", K, " columns, got ", ptr.numel());
  TORCH_CHECK(values.numel() == nnz, "capkit: values (", values.numel(), ") and col_idx (", nnz,
              ") must have the same length");
  const int32_t* rp = ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n_panels * N] == nnz, "capkit: ptr must start at 0 and end at nnz (", nnz, ")");
  if (bias.has_value()) {
    check_f32_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "capkit: bias must be a contiguous vector of length ", N);
  }
  cpu::CsrMatrix w;
  w.ptr = rp, w.col_idx = col_idx.data_ptr<int32_t>(), w.values = values.data_ptr<float>(), w.rows = N, w.panel = panel;
  if (quads.has_value()) {
    TORCH_CHECK(quads->device().is_cpu() && quads->scalar_type() == at::kByte && quads->dim() == 1 &&
                    quads->is_contiguous() && quads->numel() == N / 4,
                "capkit: row_quads must be a contiguous uint8 CPU vector of out_features // 4 = ", N / 4,
                " entries, got ", quads->sizes(), " ", quads->scalar_type());
    w.quads = quads->data_ptr<uint8_t>();
  }
  return w;
}

// The steps after a CSR layer of M x N outputs, checked: activation, residual, LayerNorm.
cpu::Epilogue checked_epilogue(int64_t M, int64_t N, int64_t activation, const OptTensor& residual, bool layer_norm,
                               const OptTensor& ln_weight, const OptTensor& ln_bias, double ln_eps) {
  TORCH_CHECK(activation == cpu::kActivationNone || activation == cpu::kActivationGelu,
              "capkit: activation must be 0 (none) or 1 (gelu), got ", activation);
  if (residual.has_value()) {
    check_f32_cpu(*residual, "residual");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N && residual->is_contiguous(),
                "capkit: residual must be a contiguous [", M, ", ", N, "] matrix, got ", residual->sizes());
    TORCH_CHECK(activation == cpu::kActivationNone, "capkit: residual and activation cannot be combined");
  }
  for (const auto* t : {&ln_weight, &ln_bias}) {
    if (!t->has_value()) continue;
    TORCH_CHECK(layer_norm, "capkit: ln_weight and ln_bias need layer_norm=True");
    check_f32_cpu(**t, t == &ln_weight ? "ln_weight" : "ln_bias");
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == N && (*t)->is_contiguous(), "capkit: ",
                t == &ln_weight ? "ln_weight" : "ln_bias", " must be a contiguous vector of length ", N);
  }
  TORCH_CHECK(!layer_norm || ln_eps >= 0, "capkit: ln_eps must be >= 0, got ", ln_eps);
  TORCH_CHECK(!(layer_norm && activation != cpu::kActivationNone),
              "capkit: layer_norm and activation cannot be combined");
  cpu::Epilogue ep;
  ep.activation = static_cast<int>(activation);
  ep.residual = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  ep.layer_norm = layer_norm;
  ep.ln_weight = ln_weight.has_value() ? ln_weight->data_ptr<float>() : nullptr;
  ep.ln_bias = ln_bias.has_value() ? ln_bias->data_ptr<float>() : nullptr;
  ep.ln_eps = static_cast<float>(ln_eps);
  return ep;
}

const float* ptr_or_null_f32(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Unstructured-sparse weight in panelled CSR by output row (capkit/ops/sparse_format.py builds it).
Tensor csr_linear_forward_cpu(const Tensor& x, const Tensor& ptr, const Tensor& col_idx, const Tensor& values,
                              const OptTensor& bias, int64_t out_features, int64_t panel, int64_t activation,
                              const OptTensor& residual, bool layer_norm, const OptTensor& ln_weight,
                              const OptTensor& ln_bias, double ln_eps, const OptTensor& row_quads) {
  check_matrix(x, "x");
  check_f32_cpu(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  const cpu::CsrMatrix w = checked_csr(ptr, col_idx, values, bias, out_features, panel, K, row_quads);
  const cpu::Epilogue ep = checked_epilogue(M, out_features, activation, residual, layer_norm, ln_weight, ln_bias,
                                            ln_eps);
  Tensor y = new_output({M, out_features}, x.options());
  cpu::csr_linear_forward_f32(x.data_ptr<float>(), w.ptr, w.col_idx, w.values, ptr_or_null_f32(bias),
                              y.data_ptr<float>(), M, out_features, K, panel, ep, w.quads);
  return y;
}

// Scaled dot-product attention (fp32 inference): q [B, H, Sq, D], k and v [B, H, Sk, D], any
// strides with the feature dimension's stride 1; mask additive, 4-D, each dimension of the full
// size or 1 (broadcast). Returns [B, Sq, H, D], contiguous.
Tensor attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask, double scale) {
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : t == &k ? "k" : "v";
    check_f32_cpu(*t, name);
    TORCH_CHECK(t->dim() == 4, "capkit: ", name, " must be 4-D [batch, heads, positions, features], got shape ",
                t->sizes());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "capkit: ", name,
                "'s last dimension must be contiguous (stride 1), got stride ", t->stride(3));
  }
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "capkit: k must be [", B, ", ", H, ", Sk, ", D,
              "] to match q, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "capkit: v must have k's shape ", k.sizes(), ", got ", v.sizes());
  cpu::AttentionArgs a;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.B = B, a.H = H, a.Sq = Sq, a.Sk = Sk, a.D = D;
  a.q_sb = q.stride(0), a.q_sh = q.stride(1), a.q_ss = q.stride(2);
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_ss = k.stride(2);
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_ss = v.stride(2);
  if (mask.has_value()) {
    check_f32_cpu(*mask, "mask");
    TORCH_CHECK(mask->dim() == 4, "capkit: mask must be 4-D (broadcastable to [", B, ", ", H, ", ", Sq, ", ", Sk,
                "]), got shape ", mask->sizes());
    const int64_t full[4] = {B, H, Sq, Sk};
    int64_t st[4];
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(mask->size(d) == full[d] || mask->size(d) == 1, "capkit: mask must be broadcastable to [", B, ", ",
                  H, ", ", Sq, ", ", Sk, "], got shape ", mask->sizes());
      st[d] = mask->size(d) == full[d] ? mask->stride(d) : 0;
    }
    a.mask = mask->data_ptr<float>();
    a.m_sb = st[0], a.m_sh = st[1], a.m_si = st[2], a.m_sj = st[3];
  }
  a.scale = static_cast<float>(scale);
  Tensor out = new_output({B, Sq, H, D}, q.options());
  a.out = out.data_ptr<float>();
  cpu::attention_forward_f32(a);
  return out;
}

// One BERT-family encoder layer on the CPU kernels, for inference: x [B, S, hidden] (contiguous);
// linears in the order query, key, value, attention output, feed-forward in, feed-forward out,
// each a panelled CSR (ptrs / col_idx / values / bias / out_features / panels, one entry each);
//   q, k, v = x W_q^T + b_q, ...      split into `heads` heads of hidden / heads features
//   a = LayerNorm1(attention(q, k, v, mask, scale) W_o^T + b_o + x)
//   y = LayerNorm2(gelu(a W_i^T + b_i) W_f^T + b_f + a)
// The same floats as the csr_linear_forward and attention_forward calls one by one, with their
// checks, in one dispatch instead of seven: the three projections in one pass over x
// (cpu::csr_multi_forward_f32), the feed-forward block in one pass (cpu::csr_ffn_forward_f32).
Tensor encoder_layer_forward_cpu(const Tensor& x, const OptTensor& mask, int64_t heads, double scale,
                                 at::TensorList ptrs, at::TensorList col_idx, at::TensorList values,
                                 const c10::List<std::optional<Tensor>>& biases, at::IntArrayRef out_features,
                                 at::IntArrayRef panels, const c10::List<std::optional<Tensor>>& quads,
                                 const OptTensor& ln1_weight, const OptTensor& ln1_bias,
                                 double ln1_eps, const OptTensor& ln2_weight, const OptTensor& ln2_bias,
                                 double ln2_eps) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "capkit: x must be a contiguous [batch, positions, hidden] tensor, "
              "got shape ", x.sizes());
  check_f32_cpu(x, "x");
  for (const size_t n : {ptrs.size(), col_idx.size(), values.size(), biases.size(), out_features.size(),
                         panels.size(), quads.size()}) {
    TORCH_CHECK(n == 6, "capkit: encoder_layer_forward takes 6 linear layers (query, key, value, attention output, "
                "feed-forward in, feed-forward out), got a list of ", n);
  }
  const int64_t B = x.size(0), S = x.size(1), Hd = x.size(2);
  TORCH_CHECK(heads > 0 && Hd % heads == 0, "capkit: heads (", heads, ") must divide the hidden size ", Hd);
  for (int i : {0, 1, 2, 3, 5})
    TORCH_CHECK(out_features[i] == Hd, "capkit: linear ", i, " must have ", Hd, " outputs, got ", out_features[i]);
  const int64_t d = Hd / heads;
  auto contiguous = [](const OptTensor& t) { return t.has_value() ? OptTensor(t->contiguous()) : t; };
  const Tensor x2 = x.view({B * S, Hd});
  auto heads_view = [&](const Tensor& t) { return t.view({B, S, heads, d}).transpose(1, 2); };
  // the three projections in one pass over x (each tile of x transposed once)
  cpu::CsrMatrix w_qkv[3];
  OptTensor b_qkv[3];
  Tensor qkv[3];
  const float* bp[3];
  float* yp[3];
  for (int i = 0; i < 3; ++i) {
    b_qkv[i] = contiguous(biases.get(i));
    w_qkv[i] = checked_csr(ptrs[i], col_idx[i], values[i], b_qkv[i], Hd, panels[i], Hd, quads.get(i));
    qkv[i] = new_output({B * S, Hd}, x.options());
    bp[i] = ptr_or_null_f32(b_qkv[i]);
    yp[i] = qkv[i].data_ptr<float>();
  }
  cpu::csr_multi_forward_f32(x.data_ptr<float>(), B * S, Hd, 3, w_qkv, bp, yp);
  const Tensor &q = qkv[0], &k = qkv[1], &v = qkv[2];
  const Tensor ctx = attention_forward_cpu(heads_view(q), heads_view(k), heads_view(v), mask, scale).view({B * S, Hd});
  const Tensor a = csr_linear_forward_cpu(ctx, ptrs[3], col_idx[3], values[3], contiguous(biases.get(3)), Hd, panels[3],
                                          cpu::kActivationNone, x2, true, contiguous(ln1_weight), contiguous(ln1_bias),
                                          ln1_eps, quads.get(3));
  // the feed-forward block in one pass (its hidden activations stay in the threads' caches)
  const int64_t inter = out_features[4];
  const OptTensor b_in = contiguous(biases.get(4)), b_out = contiguous(biases.get(5));
  const cpu::CsrMatrix w_in = checked_csr(ptrs[4], col_idx[4], values[4], b_in, inter, panels[4], Hd, quads.get(4));
  const cpu::CsrMatrix w_out = checked_csr(ptrs[5], col_idx[5], values[5], b_out, Hd, panels[5], inter, quads.get(5));
  const OptTensor ln2_w = contiguous(ln2_weight), ln2_b = contiguous(ln2_bias);
  const cpu::Epilogue ep = checked_epilogue(B * S, Hd, cpu::kActivationNone, a, true, ln2_w, ln2_b, ln2_eps);
  Tensor y = new_output({B, S, Hd}, x.options());
  cpu::csr_ffn_forward_f32(a.data_ptr<float>(), B * S, Hd, w_in, ptr_or_null_f32(b_in), cpu::kActivationGelu, w_out,
                           ptr_or_null_f32(b_out), y.data_ptr<float>(), ep);
  return y;
}

// ---------------------------------------------------------------------------------------------
// info_nce: the checks and views shared by the forward and backward.
void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "capkit: ", name, " must be a CPU tensor for the cpu backend, got one on ",
              t.device());
}

void check_index_vector(const Tensor& t, int64_t n, const char* name, const char* rows_of) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "capkit: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "capkit: ", name, " must be a vector of length ", n, " (one per row of ",
              rows_of, "), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "capkit: ", name, " must be contiguous");
}

cpu::InfoNceArgs info_nce_args(const Tensor& qs, const Tensor& keys, const OptTensor& key_scale, const Tensor& qid,
                               const Tensor& kid, const OptTensor& qlab, const OptTensor& klab,
                               const OptTensor& self_index) {
  check_matrix(qs, "qs");
  check_f32_cpu(qs, "qs");
  check_matrix(keys, "keys");
  check_cpu(keys, "keys");
  const auto kt = keys.scalar_type();
  TORCH_CHECK(kt == at::kFloat || kt == at::kHalf || kt == at::kBFloat16,
              "capkit: keys must be float32, float16 or bfloat16, got ", kt);
  const int64_t B = qs.size(0), d = qs.size(1), M = keys.size(0);
  TORCH_CHECK(keys.size(1) == d, "capkit: keys must have ", d, " columns to match qs, got shape ", keys.sizes());
  if (key_scale.has_value()) {
    check_f32_cpu(*key_scale, "key_scale");
    TORCH_CHECK(key_scale->dim() == 1 && key_scale->size(0) == M && key_scale->is_contiguous(),
                "capkit: key_scale must be a contiguous vector of length ", M, " (one per key), got shape ",
                key_scale->sizes());
  }
  check_index_vector(qid, B, "qid", "qs");
  check_index_vector(kid, M, "kid", "keys");
  TORCH_CHECK(qlab.has_value() == klab.has_value(), "capkit: qlab and klab must be given together");
  if (qlab.has_value()) {
    check_index_vector(*qlab, B, "qlab", "qs");
    check_index_vector(*klab, M, "klab", "keys");
  }
  if (self_index.has_value()) {
    check_index_vector(*self_index, B, "self_index", "qs");
    const int64_t* si = self_index->data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i)
      TORCH_CHECK(si[i] >= -1 && si[i] < M, "capkit: self_index entries must lie in [-1, ", M, "), got ", si[i],
                  " at position ", i);
  }
  cpu::InfoNceArgs a;
  a.qs = qs.data_ptr<float>();
  a.keys = keys.data_ptr();
  a.key_type = kt == at::kFloat ? cpu::KeyType::kF32 : kt == at::kHalf ? cpu::KeyType::kF16 : cpu::KeyType::kBF16;
  a.key_scale = key_scale.has_value() ? key_scale->data_ptr<float>() : nullptr;
  a.qid = qid.data_ptr<int64_t>();
  a.kid = kid.data_ptr<int64_t>();
  a.qlab = qlab.has_value() ? qlab->data_ptr<int64_t>() : nullptr;
  a.klab = klab.has_value() ? klab->data_ptr<int64_t>() : nullptr;
  a.self_index = self_index.has_value() ? self_index->data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.M = M;
  a.d = d;
  return a;
}

Tensor info_nce_forward_cpu(const Tensor& qs, const Tensor& keys, const OptTensor& key_scale, const Tensor& qid,
                            const Tensor& kid, const OptTensor& qlab, const OptTensor& klab,
                            const OptTensor& self_index) {
  const auto a = info_nce_args(qs, keys, key_scale, qid, kid, qlab, klab, self_index);
  Tensor stats = at::empty({a.B, 5}, qs.options());
  cpu::info_nce_forward_f32(a, stats.data_ptr<float>());
  return stats;
}

Tensor info_nce_backward_cpu(const Tensor& qs, const Tensor& keys, const OptTensor& key_scale, const Tensor& qid,
                             const Tensor& kid, const OptTensor& qlab, const OptTensor& klab,
                             const OptTensor& self_index, const Tensor& lse, const Tensor& coef) {
  const auto a = info_nce_args(qs, keys, key_scale, qid, kid, qlab, klab, self_index);
  check_f32_cpu(lse, "lse");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == a.B && lse.is_contiguous(),
              "capkit: lse must be a contiguous vector of length ", a.B, " (one per query), got shape ", lse.sizes());
  check_f32_cpu(coef, "coef");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == a.B && coef.size(1) == 3 && coef.is_contiguous(),
              "capkit: coef must be a contiguous [", a.B, ", 3] tensor, got shape ", coef.sizes());
  Tensor dqs = at::empty({a.B, a.d}, qs.options());
  cpu::info_nce_backward_f32(a, lse.data_ptr<float>(), coef.data_ptr<float>(), dqs.data_ptr<float>());
  return dqs;
}

}  // namespace
}  // namespace capkit

TORCH_LIBRARY(capkit, m) {
  m.def(
      "masked_linear_forward(Tensor x, Tensor weight, Tensor? mask, Tensor? bias, Tensor? row_ptr, "
      "Tensor? col_idx, int block_size) -> Tensor");
  m.def(
      "masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor? mask, Tensor? col_ptr, "
      "Tensor? row_idx, int block_size) -> Tensor");
  m.def(
      "masked_linear_grad_weight(Tensor grad_out, Tensor x, Tensor weight, Tensor? mask, Tensor? row_ptr, "
      "Tensor? col_idx, int block_size, bool need_weight_grad, bool need_mask_grad) -> (Tensor, Tensor)");
  m.def(
      "csr_linear_forward(Tensor x, Tensor ptr, Tensor col_idx, Tensor values, Tensor? bias, "
      "int out_features, int panel, int activation=0, Tensor? residual=None, bool layer_norm=False, "
      "Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=1e-05, Tensor? row_quads=None) -> Tensor");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def(
      "encoder_layer_forward(Tensor x, Tensor? mask, int heads, float scale, Tensor[] ptrs, Tensor[] col_idx, "
      "Tensor[] values, Tensor?[] biases, int[] out_features, int[] panels, Tensor?[] row_quads, "
      "Tensor? ln1_weight, Tensor? ln1_bias, float ln1_eps, Tensor? ln2_weight, Tensor? ln2_bias, float ln2_eps) -> Tensor");
  m.def(
      "info_nce_forward(Tensor qs, Tensor keys, Tensor? key_scale, Tensor qid, Tensor kid, Tensor? qlab, "
      "Tensor? klab, Tensor? self_index) -> Tensor");
  m.def(
      "info_nce_backward(Tensor qs, Tensor keys, Tensor? key_scale, Tensor qid, Tensor kid, Tensor? qlab, "
      "Tensor? klab, Tensor? self_index, Tensor lse, Tensor coef) -> Tensor");
}

TORCH_LIBRARY_IMPL(capkit, CPU, m) {
  m.impl("masked_linear_forward", &capkit::forward_cpu);
  m.impl("masked_linear_grad_input", &capkit::grad_input_cpu);
  m.impl("masked_linear_grad_weight", &capkit::grad_weight_cpu);
  m.impl("csr_linear_forward", &capkit::csr_linear_forward_cpu);
  m.impl("attention_forward", &capkit::attention_forward_cpu);
  m.impl("encoder_layer_forward", &capkit::encoder_layer_forward_cpu);
  m.impl("info_nce_forward", &capkit::info_nce_forward_cpu);
  m.impl("info_nce_backward", &capkit::info_nce_backward_cpu);
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "capkit native kernels (CPU C++ and, when built with it, CUDA)";
  mod.def("_attention_force_plain", [](bool on) { capkit::cpu::attention_force_plain(on); },
          "Tests only: the attention kernel's plain path even on AVX-512 CPUs.");
  mod.def("build_info", []() {
    py::dict d;
    d["version"] = CAPKIT_VERSION_STR;
#ifdef CAPKIT_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
#ifdef CAPKIT_WITH_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["avx2"] = capkit::cpu::cpu_has_avx2_fma();
    d["attention_vectorised"] = capkit::cpu::attention_vectorised();
    d["max_threads"] = capkit::cpu::cpu_max_threads();
    d["compiler"] = __VERSION__;
    d["torch_version_built"] = std::string(TORCH_VERSION);
    return d;
  });
}
