// C entry points over csrc/cuda/info_nce.cu compiled for host emulation (tests only), called
// from tests/test_cuda_info_nce_emulated.py through ctypes. key_type: 0 fp32, 1 fp16, 2 bf16.
#include <cstdint>
#include <vector>

#include "info_nce.cuh"

namespace {
capkit::cuda::InfoNceArgs make_args(const float* qs, const void* keys, int key_type, const float* key_scale,
                                    const int64_t* qid, const int64_t* kid, const int64_t* qlab,
                                    const int64_t* klab, const int64_t* self_index, int64_t B, int64_t M,
                                    int64_t d, int num_sms, int num_splits) {
  capkit::cuda::InfoNceArgs a;
  a.qs = qs;
  a.keys = keys;
  a.key_type = static_cast<capkit::cuda::KeyType>(key_type);
  a.key_scale = key_scale;
  a.qid = qid;
  a.kid = kid;
  a.qlab = qlab;
  a.klab = klab;
  a.self_index = self_index;
  a.B = B;
  a.M = M;
  a.d = d;
  a.num_sms = num_sms;
  a.num_splits = num_splits;
  return a;
}
}  // namespace

extern "C" int emu_info_nce_splits(int64_t B, int64_t M, int64_t d, int num_sms, int num_splits, int backward) {
  const auto a = make_args(nullptr, nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, B, M, d,
                           num_sms, num_splits);
  return capkit::cuda::info_nce_num_splits(a, backward != 0);
}

extern "C" int emu_info_nce_forward(const float* qs, const void* keys, int key_type, const float* key_scale,
                                    const int64_t* qid, const int64_t* kid, const int64_t* qlab,
                                    const int64_t* klab, const int64_t* self_index, int64_t B, int64_t M,
                                    int64_t d, int num_sms, int num_splits, float* stats) {
  const auto a = make_args(qs, keys, key_type, key_scale, qid, kid, qlab, klab, self_index, B, M, d, num_sms,
                           num_splits);
  std::vector<double> ws((capkit::cuda::info_nce_forward_workspace_bytes(a) + 7) / 8 + 4);
  return capkit::cuda::info_nce_forward(a, stats, ws.data(), ws.size() * 8, nullptr);
}

extern "C" int emu_info_nce_backward(const float* qs, const void* keys, int key_type, const float* key_scale,
                                     const int64_t* qid, const int64_t* kid, const int64_t* qlab,
                                     const int64_t* klab, const int64_t* self_index, int64_t B, int64_t M,
                                     int64_t d, int num_sms, int num_splits, const float* lse, const float* coef,
                                     float* dqs) {
  const auto a = make_args(qs, keys, key_type, key_scale, qid, kid, qlab, klab, self_index, B, M, d, num_sms,
                           num_splits);
  std::vector<double> ws((capkit::cuda::info_nce_backward_workspace_bytes(a) + 7) / 8 + 4);
  return capkit::cuda::info_nce_backward(a, lse, coef, dqs, ws.data(), ws.size() * 8, nullptr);
}
