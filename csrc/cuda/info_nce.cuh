// Host-side interface of the streaming multi-positive InfoNCE CUDA kernels.
// Plain C++ on raw device pointers, like masked_linear.cuh, so nvcc can
// compile-check it without torch.  The contract is the CPU kernels' one
// (csrc/cpu/info_nce_cpu.h):
//
// qs [B, d] float32 (normalised queries / temperature), keys [M, d] float32,
// float16 or bfloat16 (converted per element, fp32 accumulation), row-major
// and contiguous.  Scores s_ij = (qs_i . k_j) * key_scale_j (key_scale null:
// 1).  Key j is left out for query i when j == self_index[i] (self_index null
// or -1: none; other values outside [0, M) leave nothing out).  Positives of
// query i among the kept keys: P_u = {j : kid_j == qid_i}, P_s = {j : klab_j
// == qlab_i} (qlab / klab null: P_s empty).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace capkit {
namespace cuda {

enum class KeyType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct InfoNceArgs {
  const float* qs = nullptr;            // [B, d]
  const void* keys = nullptr;           // [M, d]
  KeyType key_type = KeyType::F32;
  const float* key_scale = nullptr;     // [M] or null
  const int64_t* qid = nullptr;         // [B]
  const int64_t* kid = nullptr;         // [M]
  const int64_t* qlab = nullptr;        // [B] or null (together with klab)
  const int64_t* klab = nullptr;        // [M] or null
  const int64_t* self_index = nullptr;  // [B] or null
  int64_t B = 0, M = 0, d = 0;
  // The keys are split over this many CTAs per block of queries, each writing
  // fp32 partials that a second kernel combines.  0: chosen from num_sms so
  // that a small batch still fills the GPU; num_sms 0: the current device's.
  int num_splits = 0;
  int num_sms = 0;
};

// The split the launchers will use for these arguments (>= 1).
int info_nce_num_splits(const InfoNceArgs& args, bool backward);

// Workspace bytes of each launcher (32-byte aligned device memory; query it
// with the same arguments and device as the launch).
size_t info_nce_forward_workspace_bytes(const InfoNceArgs& args);
size_t info_nce_backward_workspace_bytes(const InfoNceArgs& args);

// stats [B, 5] = (lse, sum_u, cnt_u, sum_s, cnt_s): lse = log sum over kept
// keys of exp(s_ij) (-inf when none is kept), sum_t / cnt_t = sum of s_ij
// over P_t and |P_t|.
cudaError_t info_nce_forward(const InfoNceArgs& args, float* stats, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// dqs [B, d] = sum over kept j of g_ij * key_scale_j * k_j with g_ij =
// coef[i,0] [j in P_u] + coef[i,1] [j in P_s] + coef[i,2] exp(s_ij - lse_i);
// rows whose lse_i is not finite get zero.  lse [B], coef [B, 3].
cudaError_t info_nce_backward(const InfoNceArgs& args, const float* lse, const float* coef,
                              float* dqs, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace capkit
