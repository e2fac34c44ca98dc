// Scaled dot-product attention on the CPU, fp32, for inference on the short sequences of encoder
// models (no dropout, no causal mask, no gradient).
//
//   out[b, i, h, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, h, j, :] + mask[b, h, i, j]) v[b, h, j, :]
//
// q [B, H, Sq, D], k and v [B, H, Sk, D] are read through their strides (in elements; the feature
// stride must be 1), so the transposed views a model makes of its [B, S, H * D] projections need
// no copy. mask (nullable) is additive, read through four strides (0 for broadcast dimensions);
// -inf removes a key. A row whose keys are all removed gives zeros (as torch's SDPA does). out is
// written [B, Sq, H, D], contiguous: the layout a model reshapes back to [B, Sq, H * D].
#pragma once
#include <cstdint>

namespace capkit {
namespace cpu {

struct AttentionArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;  // strides of batch, head, position
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  const float* mask = nullptr;
  int64_t m_sb = 0, m_sh = 0, m_si = 0, m_sj = 0;
  float scale = 1.0f;
  float* out = nullptr;
};

void attention_forward_f32(const AttentionArgs& a);

// Whether the vectorised path runs on this CPU (AVX-512F; otherwise a plain loop, correct but slower
// than torch's own attention).
bool attention_vectorised();

// Tests only: run the plain path even where the vectorised one exists (process-wide).
void attention_force_plain(bool on);

}  // namespace cpu
}  // namespace capkit
