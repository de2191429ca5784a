// Device helpers shared by the plain CUDA kernels of product fusion, tensor fusion and low-rank
// fusion: the compute type, the modalities as the kernels read them (z_m = [1, x_m], masked rows
// [1, 0…0]), a generic tiled GEMM whose operands are produced by loader functors (so Z tiles
// are generated on the fly from the modalities and never written to memory), and a
// deterministic column sum. No torch headers (see common.h).
//
// Everything here is a template or inline, in namespace fusionops::cuda::detail, so each .cu
// that includes it gets identical definitions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace fusionops::cuda::detail {

// ---- compute type: float32 for float16 / bfloat16 / float32, float64 for float64 -----------

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the element type T of dtype; cudaErrorInvalidValue for an unknown one.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32:
      return f(Tag<float>{});
    case DType::Float64:
      return f(Tag<double>{});
    case DType::Float16:
      return f(Tag<__half>{});
    case DType::BFloat16:
      return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

inline cudaError_t launched() { return cudaGetLastError(); }

// (Data pointers are not checked: an empty tensor's may be null, and N may be 0.)
inline bool valid(const Modalities& xs) {
  if (xs.M < 1 || xs.M > kMaxModalities || xs.N < 0) return false;
  for (int m = 0; m < xs.M; ++m) {
    if (xs.width[m] < 1) return false;
  }
  return true;
}

// K = Π (d_m + 1).
inline int64_t feature_count(const Modalities& xs) {
  int64_t K = 1;
  for (int m = 0; m < xs.M; ++m) K *= xs.width[m] + 1;
  return K;
}

// ---- the modalities, by value in the kernel arguments ----------------------------------------

template <typename T>
struct Z {
  using acc_t = typename Acc<T>::type;
  const T* x[kMaxModalities];
  int64_t s0[kMaxModalities];
  int64_t s1[kMaxModalities];
  int64_t D[kMaxModalities];  // d_m + 1
  const bool* mask;
  int64_t k0, k1;
  int M;

  // Whether modality m of row n is present.
  __device__ __forceinline__ bool present(int m, int64_t n) const { return mask == nullptr || mask[n * k0 + m * k1]; }

  // z_m[n, j] = [1, x_m[n]][j], 0 for j >= 1 on a missing row (selected: x is not read).
  __device__ __forceinline__ acc_t z(int m, int64_t n, int64_t j) const {
    if (j == 0) return acc_t(1);
    return present(m, n) ? to_acc(x[m][n * s0[m] + (j - 1) * s1[m]]) : acc_t(0);
  }

  // Z[n, k] = Π_m z_m[n, k_m], k row-major over (D_0, …, D_{M-1}), the last modality fastest.
  __device__ __forceinline__ acc_t feature(int64_t n, int64_t k) const {
    acc_t v = acc_t(1);
#pragma unroll
    for (int m = kMaxModalities - 1; m >= 0; --m) {
      if (m < M) {
        const int64_t q = k / D[m];
        v *= z(m, n, k - q * D[m]);
        k = q;
      }
    }
    return v;
  }
};

// The modalities of rows [first, first + …) as the kernels read them.
template <typename T>
Z<T> make_z(const Modalities& xs, int64_t first = 0) {
  Z<T> z{};
  z.M = xs.M;
  for (int m = 0; m < xs.M; ++m) {
    z.x[m] = static_cast<const T*>(xs.data[m]) + first * xs.row_stride[m];
    z.s0[m] = xs.row_stride[m];
    z.s1[m] = xs.col_stride[m];
    z.D[m] = xs.width[m] + 1;
  }
  z.mask = xs.mask == nullptr ? nullptr : xs.mask + first * xs.mask_row_stride;
  z.k0 = xs.mask_row_stride;
  z.k1 = xs.mask_col_stride;
  return z;
}

// ---- generic tiled GEMM: C[i, j] = Σ_k A(i, k) B(k, j) -----------------------------------------
//
// 64 x 64 output tiles, 16-deep slices of the reduction staged in shared memory (in the compute
// type), 256 threads each owning a 4 x 4 register tile (rows ty + 16 a, columns tx + 16 b).
// A(i, k) and B(k, j) are loader functors (any strides, generated values such as tiles of Z);
// the store functor receives each finished C[i, j] once. Each output is reduced by one thread
// in a fixed order over k: results are deterministic (no atomics, no split reduction).
constexpr int kGemmThreads = 256;
constexpr int kTileI = 64;
constexpr int kTileJ = 64;
constexpr int kTileK = 16;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond this

template <typename acc_t, class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(int64_t I, int64_t J, int64_t Kr, LoadA load_a, LoadB load_b, Store store) {
  __shared__ acc_t As[kTileK][kTileI + 1];
  __shared__ acc_t Bs[kTileK][kTileJ + 1];
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t tiles_j = (J + kTileJ - 1) / kTileJ;
  const int64_t tiles = ((I + kTileI - 1) / kTileI) * tiles_j;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i0 = (tile / tiles_j) * kTileI;
    const int64_t j0 = (tile % tiles_j) * kTileJ;
    acc_t c[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) c[a][b] = acc_t(0);
    }
    for (int64_t k0 = 0; k0 < Kr; k0 += kTileK) {
      for (int e = tid; e < kTileI * kTileK; e += kGemmThreads) {
        const int kk = e % kTileK, ii = e / kTileK;  // consecutive threads: consecutive k
        const int64_t i = i0 + ii, k = k0 + kk;
        As[kk][ii] = (i < I && k < Kr) ? load_a(i, k) : acc_t(0);
      }
      for (int e = tid; e < kTileJ * kTileK; e += kGemmThreads) {
        const int jj = e % kTileJ, kk = e / kTileJ;  // consecutive threads: consecutive j
        const int64_t j = j0 + jj, k = k0 + kk;
        Bs[kk][jj] = (j < J && k < Kr) ? load_b(k, j) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t a[4], b[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          a[q] = As[kk][ty + 16 * q];
          b[q] = Bs[kk][tx + 16 * q];
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) {
#pragma unroll
          for (int q = 0; q < 4; ++q) c[p][q] += a[p] * b[q];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t i = i0 + ty + 16 * p, j = j0 + tx + 16 * q;
        if (i < I && j < J) store(i, j, c[p][q]);
      }
    }
  }
}

inline int gemm_blocks(int64_t I, int64_t J) {
  const int64_t tiles = ((I + kTileI - 1) / kTileI) * ((J + kTileJ - 1) / kTileJ);
  return static_cast<int>(std::max<int64_t>(1, std::min(tiles, kMaxBlocks)));
}

// Launches the GEMM (nothing when I * J == 0; Kr == 0 stores zeros).
template <typename acc_t, class LoadA, class LoadB, class Store>
cudaError_t gemm(int64_t I, int64_t J, int64_t Kr, const LoadA& a, const LoadB& b, const Store& s,
                 cudaStream_t stream) {
  if (I <= 0 || J <= 0) return cudaSuccess;
  gemm_kernel<acc_t, LoadA, LoadB, Store><<<gemm_blocks(I, J), kGemmThreads, 0, stream>>>(I, J, Kr, a, b, s);
  return launched();
}

// Row-major (I, J) matrix of type T with strides, read in the compute type: M(i, j). Its
// transpose M(j, i) is Strided{p, s1, s0} (the strides swapped).
template <typename T>
struct Strided {
  const T* p;
  int64_t s0, s1;
  __device__ __forceinline__ typename Acc<T>::type operator()(int64_t i, int64_t j) const {
    return to_acc(p[i * s0 + j * s1]);
  }
};

// ---- deterministic column sum: out[j] (+)= Σ_i in[i * s0 + j * s1] ---------------------------
//
// A block of 256 threads takes 32 columns; 8 lanes per column each sum every 8th row, then one
// thread adds the 8 lane sums in a fixed order. No atomics.
constexpr int kSumThreads = 256;

template <typename In, typename Out>
__global__ void __launch_bounds__(kSumThreads)
    colsum_kernel(const In* __restrict__ in, int64_t I, int64_t J, int64_t s0, int64_t s1, Out* __restrict__ out,
                  bool accumulate) {
  using acc_t = typename Acc<In>::type;
  __shared__ acc_t part[8][32];
  const int tx = static_cast<int>(threadIdx.x) % 32, ty = static_cast<int>(threadIdx.x) / 32;
  for (int64_t j0 = static_cast<int64_t>(blockIdx.x) * 32; j0 < J; j0 += static_cast<int64_t>(gridDim.x) * 32) {
    const int64_t j = j0 + tx;
    acc_t s = acc_t(0);
    if (j < J) {
      for (int64_t i = ty; i < I; i += 8) s += to_acc(in[i * s0 + j * s1]);
    }
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && j < J) {
      acc_t total = accumulate ? static_cast<acc_t>(to_acc(out[j])) : acc_t(0);
#pragma unroll
      for (int q = 0; q < 8; ++q) total += part[q][tx];
      out[j] = from_acc<Out>(total);
    }
    __syncthreads();
  }
}

template <typename In, typename Out>
cudaError_t colsum(const In* in, int64_t I, int64_t J, int64_t s0, int64_t s1, Out* out, bool accumulate,
                   cudaStream_t stream) {
  if (J <= 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min<int64_t>((J + 31) / 32, 65535));
  colsum_kernel<In, Out><<<blocks, kSumThreads, 0, stream>>>(in, I, J, s0, s1, out, accumulate);
  return launched();
}

inline int elementwise_blocks(int64_t total, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65535)));
}

}  // namespace fusionops::cuda::detail
