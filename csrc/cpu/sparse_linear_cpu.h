// CPU kernel of a linear layer whose weight is unstructured-sparse, on raw pointers.
//
// The weight W [N, K] is stored once as CSR by output row within panels of `panel` input
// features: for panel p (features [p * panel, (p + 1) * panel)), the stored weights of row n are
// ptr[p * N + n] .. ptr[p * N + n + 1] (int32; ptr has ceil(K / panel) * N + 1 entries), with
// col_idx [nnz] (int32, the feature index k, increasing) and values [nnz] (float32). panel <= 0
// or >= K is plain CSR (ptr [N + 1]). Pruned entries are not stored, so whatever the dense weight
// held there (NaN included) is never read.
//   y [M, N] = x [M, K] @ W^T + bias, x and y row-major and contiguous, fp32 accumulation.
// activation = kActivationGelu applies the exact (erf) GELU to y on the way out (within 2e-7 of
// the float64 value times |y|): a BERT feed-forward's first layer and its activation in one pass.
// residual (nullable, [M, N] row-major) is added after that: y = x @ W^T + bias + residual, the
// residual connection of a BERT sub-layer in the same pass (activation and residual exclusive);
// layer_norm then normalises each row of y over its N outputs (LayerNorm with ln_weight and
// ln_bias, each nullable, and ln_eps), so that a BERT sub-layer's dense, residual and LayerNorm
// are one pass.
// The same kernel gives dx = dy @ W when it is handed the CSR of W^T (rows = input features).
#pragma once
#include <cstddef>
#include <cstdint>

namespace capkit {
namespace cpu {

constexpr int kActivationNone = 0;
constexpr int kActivationGelu = 1;

struct Epilogue {
  int activation = kActivationNone;
  const float* residual = nullptr;
  bool layer_norm = false;
  const float* ln_weight = nullptr;
  const float* ln_bias = nullptr;
  float ln_eps = 1e-5f;
};

// Grow-only, 64-byte aligned scratch of the calling thread, one buffer per slot (0 or 1); valid
// until the next call for the same slot on that thread.
float* thread_scratch_f32(size_t n, int slot);

// dst[c * ld + r] = src[r * ls + c] for r < rows, c < cols (8 x 8 blocks in registers with AVX2).
void transpose_f32(const float* src, int64_t ls, int64_t rows, int64_t cols, float* dst, int64_t ld);

// quads (nullable, [N / 4]): quads[g] != 0 marks rows 4g .. 4g + 3 whose stored columns are the
// same in every panel (a weight pruned in blocks of four rows or more); the kernel then reads each
// of their xT rows once for the four.
void csr_linear_forward_f32(const float* x, const int32_t* ptr, const int32_t* col_idx, const float* values,
                            const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t panel,
                            const Epilogue& epilogue = Epilogue(), const uint8_t* quads = nullptr);

// A panelled CSR weight of `rows` output rows (layout as above; panel <= 0: plain CSR).
struct CsrMatrix {
  const int32_t* ptr = nullptr;
  const int32_t* col_idx = nullptr;
  const float* values = nullptr;
  int64_t rows = 0;
  int64_t panel = 0;
  const uint8_t* quads = nullptr;  // as in csr_linear_forward_f32
};

// Two CSR layers in one pass over token tiles (a BERT feed-forward block):
//   h [M, w1.rows] = act(x [M, K] @ W1^T + b1)      act: hidden_activation (kActivation*)
//   y [M, w2.rows] = h @ W2^T + b2, then `epilogue` (its residual and LayerNorm as above)
// h never goes to memory: each tile's h stays in the thread's scratch in the layout the second
// layer reads (one transpose fewer each way). Equal, up to the order of float sums, to two calls
// of csr_linear_forward_f32.
void csr_ffn_forward_f32(const float* x, int64_t M, int64_t K, const CsrMatrix& w1, const float* b1,
                         int hidden_activation, const CsrMatrix& w2, const float* b2, float* y,
                         const Epilogue& epilogue = Epilogue());

// Several CSR layers on the same input in one pass (a layer's query, key and value projections):
// ys[j] [M, ws[j].rows] = x [M, K] @ W_j^T + biases[j] (nullable), then eps[j] (eps nullable: no
// steps), each x tile transposed once for all of them. csr_linear_forward_f32 is this with one
// weight.
void csr_multi_forward_f32(const float* x, int64_t M, int64_t K, int count, const CsrMatrix* ws,
                           const float* const* biases, float* const* ys, const Epilogue* eps = nullptr);

}  // namespace cpu
}  // namespace capkit
