// CPU emulation of the few CUDA runtime pieces the plain kernels (csrc/cuda/kernels) use, for
// tests/test_cuda_kernels_emulated.py only: every CUDA thread of a block is an OS thread,
// __syncthreads is a std::barrier, __shared__ is a static (blocks run one after the other), and
// kernel<<<grid, block, 0, stream>>>(args) is rewritten by the test into emu::launch(...).
// It checks indexing, strides, masks, chunking and the float32/float64 arithmetic; it says
// nothing about warps, the memory model, coalescing or speed.
#pragma once
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline long launches = 0;

// Blocks run one after the other on one set of block.x threads (a barrier between blocks), so
// a static __shared__ array belongs to one block at a time, as on a GPU.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
  ++launches;
  grid_dim = grid;
  block_dim = block;
  std::barrier<> barrier(block.x);
  block_barrier = &barrier;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      thread_idx = dim3(t);
      for (unsigned b = 0; b < grid.x; ++b) {
        block_idx = dim3(b);
        kernel();
        barrier.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
