// CPU kernels of the streaming InfoNCE op, on raw pointers (no torch types).
//
// qs [B, d] float32 (normalised queries / temperature), keys [M, d] float32, float16 or bfloat16
// (read as stored, converted to fp32 per element, fp32 accumulation), all row-major and contiguous.
// Scores s_ij = (qs_i . k_j) * key_scale_j (key_scale null: 1). Key j is left out for query i
// when j == self_index[i] (self_index null or -1: none). Positives of query i among the kept keys:
// P_u = {j : kid_j == qid_i}, P_s = {j : klab_j == qlab_i} (qlab/klab null: P_s empty).
#pragma once
#include <cstdint>

namespace capkit {
namespace cpu {

enum class KeyType { kF32, kF16, kBF16 };

struct InfoNceArgs {
  const float* qs = nullptr;
  const void* keys = nullptr;
  KeyType key_type = KeyType::kF32;
  const float* key_scale = nullptr;  // [M] or null
  const int64_t* qid = nullptr;       // [B]
  const int64_t* kid = nullptr;       // [M]
  const int64_t* qlab = nullptr;      // [B] or null (together with klab)
  const int64_t* klab = nullptr;      // [M] or null
  const int64_t* self_index = nullptr;  // [B] or null; entries in [-1, M)
  int64_t B = 0, M = 0, d = 0;
};

// stats [B, 5] = (lse, sum_u, cnt_u, sum_s, cnt_s): lse = log sum over kept keys of exp(s_ij)
// (-inf when none is kept), sum_t / cnt_t = sum of s_ij over P_t and |P_t|.
void info_nce_forward_f32(const InfoNceArgs& a, float* stats);

// dqs [B, d] = sum over kept j of g_ij * key_scale_j * k_j with
// g_ij = coef[i,0] [j in P_u] + coef[i,1] [j in P_s] + coef[i,2] exp(s_ij - lse_i);
// rows with lse_i = -inf get zero. lse [B], coef [B, 3].
void info_nce_backward_f32(const InfoNceArgs& a, const float* lse, const float* coef, float* dqs);

}  // namespace cpu
}  // namespace capkit
