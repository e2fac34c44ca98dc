// Host emulation of the small part of CUDA that capkit's kernels use (tests only).
//
// Compiling a kernel file as C++ with this folder first on the include path replaces the CUDA
// runtime and intrinsics: a launch runs the CTAs one after another on blockDim real threads that
// meet at __syncthreads (a barrier of the CTA), __syncwarp and __shfl_xor_sync (within the warp);
// __shared__ variables become function statics, which is one copy per CTA because only one CTA
// runs at a time. Device pointers are host pointers. Tensor-core fragments (mma.h here)
// are held whole by every lane and multiplied in fp32; cp.async copies at once (the kernel wraps
// it). Inline PTX cannot be emulated, so a kernel that uses it must offer a host spelling.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::isfinite;

typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
             cudaErrorLaunchFailure = 719 };
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace capkit_emu {

inline int& sm_count() {  // what cudaDevAttrMultiProcessorCount reports
  static int n = 4;
  return n;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

struct Cta {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;  // one exchange slot per thread
};
inline Cta*& current_cta() {
  static Cta* c = nullptr;
  return c;
}

template <typename Kernel>
struct Launch {
  dim3 grid, block;
  Kernel kernel;
  // One thread per CTA thread for the whole launch; the threads walk the CTAs in order and meet
  // after each one, so the function-static "shared memory" belongs to one CTA at a time.
  template <typename... Args>
  void operator()(Args... args) const {
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
      last_error() = cudaErrorInvalidValue;
      return;
    }
    Cta cta;
    cta.all = std::make_unique<std::barrier<>>(n);
    for (unsigned w = 0; w < (n + 31) / 32; ++w)
      cta.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
    cta.lanes.assign(n, 0.f);
    current_cta() = &cta;
    std::exception_ptr failed;
    std::mutex failed_lock;
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t)
      threads.emplace_back([&, t] {
        threadIdx.x = t % block.x;
        threadIdx.y = (t / block.x) % block.y;
        threadIdx.z = t / (block.x * block.y);
        blockDim = block;
        gridDim = grid;
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
              blockIdx.x = bx;
              blockIdx.y = by;
              blockIdx.z = bz;
              try {
                kernel(args...);
              } catch (...) {
                std::lock_guard<std::mutex> g(failed_lock);
                failed = std::current_exception();
              }
              cta.all->arrive_and_wait();  // the CTA is done before the next one starts
            }
      });
    for (auto& th : threads) th.join();
    current_cta() = nullptr;
    if (failed) last_error() = cudaErrorLaunchFailure;
  }
};

template <typename Kernel>
Launch<Kernel> launch(dim3 grid, dim3 block, Kernel kernel) {
  return Launch<Kernel>{grid, block, kernel};
}

inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// All lanes of the calling thread's warp meet here.
inline void warp_barrier() {
  current_cta()->warps[linear_thread() / 32]->arrive_and_wait();
}

// cp.async of `bytes` (<= chunk) from src, zeros for the rest of the chunk.
inline void copy_zero_fill(void* dst, const void* src, int bytes, int chunk) {
  if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
  if (bytes < chunk) std::memset(static_cast<char*>(dst) + bytes, 0, static_cast<size_t>(chunk - bytes));
}

}  // namespace capkit_emu

inline void __syncthreads() { capkit_emu::current_cta()->all->arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) { capkit_emu::warp_barrier(); }

// Every lane of the warp must call it (as with a full mask on a GPU).
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  capkit_emu::Cta& cta = *capkit_emu::current_cta();
  const unsigned t = capkit_emu::linear_thread(), warp = t / 32, lane = t % 32;
  auto& bar = *cta.warps[warp];
  cta.lanes[t] = v;
  bar.arrive_and_wait();
  const float r = cta.lanes[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return r;
}

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = capkit_emu::sm_count();
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = capkit_emu::last_error();
  capkit_emu::last_error() = cudaSuccess;
  return e;
}
