// Plain CUDA kernels of product fusion (DESIGN.md section 3; contract in
// fusionops/ops/_kernels.py): no torch or ATen headers, so nvcc compiles them without a CUDA
// build of torch (.ci/nvcc_check does, on every CI run). The torch binding is
// csrc/cuda/product_fusion.cpp.
//
// p = Π_m x_m elementwise over (N, d); dx_m = g Π_{k≠m} x_k by prefix and suffix products (no
// division, so zeros are fine). Operands are read with any (row, col) strides, stride 0
// included; outputs are contiguous (N, d). float16 / bfloat16 / float32 compute in float32,
// float64 in float64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"  // kMaxModalities, DType

namespace fusionops::cuda {

// p (N, d, contiguous) = Π_{m<M} xs[m], where xs[m][n, j] is at xs[m] + n * row_strides[m] +
// j * col_strides[m] (in elements). 1 <= M <= kMaxModalities, else cudaErrorInvalidValue.
// Returns cudaGetLastError() after the launch (cudaSuccess and no launch when N * d == 0).
cudaError_t product_forward(DType dtype, int M, const void* const* xs, const int64_t* row_strides,
                            const int64_t* col_strides, int64_t N, int64_t d, void* out, cudaStream_t stream);

// dx[m] (N, d, contiguous) = grad Π_{k≠m} xs[k]; grad is read with (grad_row_stride,
// grad_col_stride). Same conventions as product_forward.
cudaError_t product_backward(DType dtype, int M, const void* grad, int64_t grad_row_stride,
                             int64_t grad_col_stride, const void* const* xs, const int64_t* row_strides,
                             const int64_t* col_strides, int64_t N, int64_t d, void* const* dx,
                             cudaStream_t stream);

}  // namespace fusionops::cuda
