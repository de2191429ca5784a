// Plain CUDA kernels of product fusion: see product_fusion_kernels.h.
//
// One thread per element of (N, d) in a grid-stride loop. The M operands travel by value in a
// small struct (up to kMaxModalities pointers and strides); the loops over modalities are
// unrolled to kMaxModalities with `m < M` guards, so the per-element values stay in registers.
#include "product_fusion_kernels.h"

#include "device_common.cuh"

namespace fusionops::cuda {
namespace {

using detail::Acc, detail::from_acc, detail::to_acc;

constexpr int kThreads = 256;

// The operands of one launch, by value.
template <typename T>
struct Operands {
  const T* x[kMaxModalities];
  int64_t s0[kMaxModalities];
  int64_t s1[kMaxModalities];
};

template <typename T>
struct Outputs {
  T* dx[kMaxModalities];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    product_forward_kernel(Operands<T> ops, int M, int64_t N, int64_t d, T* __restrict__ out) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = N * d;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / d, j = i - n * d;
    acc_t p = to_acc(ops.x[0][n * ops.s0[0] + j * ops.s1[0]]);
#pragma unroll
    for (int m = 1; m < kMaxModalities; ++m) {
      if (m < M) p *= to_acc(ops.x[m][n * ops.s0[m] + j * ops.s1[m]]);
    }
    out[i] = from_acc<T>(p);
  }
}

// dx_m = (g Π_{k<m} x_k) Π_{k>m} x_k: a prefix sweep, then a suffix sweep with a running product.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    product_backward_kernel(const T* __restrict__ grad, int64_t gs0, int64_t gs1, Operands<T> ops, int M,
                            int64_t N, int64_t d, Outputs<T> outs) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = N * d;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / d, j = i - n * d;
    acc_t x[kMaxModalities];
    acc_t dx[kMaxModalities];
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m) {
      x[m] = m < M ? to_acc(ops.x[m][n * ops.s0[m] + j * ops.s1[m]]) : acc_t(1);
    }
    acc_t prefix = to_acc(grad[n * gs0 + j * gs1]);
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m) {
      dx[m] = prefix;
      prefix *= x[m];
    }
    acc_t suffix = acc_t(1);
#pragma unroll
    for (int m = kMaxModalities - 1; m >= 0; --m) {
      if (m < M) {
        dx[m] *= suffix;
        suffix *= x[m];
        outs.dx[m][i] = from_acc<T>(dx[m]);
      }
    }
  }
}

template <typename T>
Operands<T> make_operands(int M, const void* const* xs, const int64_t* s0, const int64_t* s1) {
  Operands<T> ops{};
  for (int m = 0; m < M; ++m) {
    ops.x[m] = static_cast<const T*>(xs[m]);
    ops.s0[m] = s0[m];
    ops.s1[m] = s1[m];
  }
  return ops;
}

template <typename T>
cudaError_t launch_forward(int M, const void* const* xs, const int64_t* s0, const int64_t* s1, int64_t N,
                           int64_t d, void* out, cudaStream_t stream) {
  product_forward_kernel<T><<<detail::elementwise_blocks(N * d, kThreads), kThreads, 0, stream>>>(
      make_operands<T>(M, xs, s0, s1), M, N, d, static_cast<T*>(out));
  return detail::launched();
}

template <typename T>
cudaError_t launch_backward(int M, const void* grad, int64_t gs0, int64_t gs1, const void* const* xs,
                            const int64_t* s0, const int64_t* s1, int64_t N, int64_t d, void* const* dx,
                            cudaStream_t stream) {
  Outputs<T> outs{};
  for (int m = 0; m < M; ++m) outs.dx[m] = static_cast<T*>(dx[m]);
  product_backward_kernel<T><<<detail::elementwise_blocks(N * d, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(grad), gs0, gs1, make_operands<T>(M, xs, s0, s1), M, N, d, outs);
  return detail::launched();
}

bool valid(int M, int64_t N, int64_t d) { return M >= 1 && M <= kMaxModalities && N >= 0 && d >= 0; }

}  // namespace

cudaError_t product_forward(DType dtype, int M, const void* const* xs, const int64_t* row_strides,
                            const int64_t* col_strides, int64_t N, int64_t d, void* out, cudaStream_t stream) {
  if (!valid(M, N, d)) return cudaErrorInvalidValue;
  if (N * d == 0) return cudaSuccess;
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return launch_forward<T>(M, xs, row_strides, col_strides, N, d, out, stream);
  });
}

cudaError_t product_backward(DType dtype, int M, const void* grad, int64_t grad_row_stride,
                             int64_t grad_col_stride, const void* const* xs, const int64_t* row_strides,
                             const int64_t* col_strides, int64_t N, int64_t d, void* const* dx,
                             cudaStream_t stream) {
  if (!valid(M, N, d)) return cudaErrorInvalidValue;
  if (N * d == 0) return cudaSuccess;
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return launch_backward<T>(M, grad, grad_row_stride, grad_col_stride, xs, row_strides, col_strides, N, d, dx,
                              stream);
  });
}

}  // namespace fusionops::cuda
