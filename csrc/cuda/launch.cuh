// Kernel launch, written once for both ways capkit's CUDA sources are compiled.
//
//   CAPKIT_LAUNCH(grid, block, stream, kernel)(args...)
//
// nvcc: kernel<<<grid, block, 0, stream>>>(args...).  With CAPKIT_CUDA_HOST_EMULATION (tests
// only, tests/cuda_emu/) the file is host C++ and the launch runs each CTA as real threads, so
// the kernels can be checked on a machine without a GPU.  The kernel comes last because a
// template-id such as k<A, B> holds commas.
#pragma once

#ifdef CAPKIT_CUDA_HOST_EMULATION
#define CAPKIT_LAUNCH(grid, block, stream, ...) ::capkit_emu::launch(grid, block, __VA_ARGS__)
#else
#define CAPKIT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif
