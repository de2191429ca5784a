// Plain CUDA kernels of tensor fusion (DESIGN.md section 1; contract in
// fusionops/ops/_kernels.py TensorFusionKernels): no torch or ATen headers, so nvcc compiles
// them without a CUDA build of torch (.ci/nvcc_check does, on every CI run). The torch binding
// is csrc/cuda/tensor_fusion.cpp.
//
// Z[n, k] = Π_m z_m[n, k_m] with z_m = [1, x_m] (a missing modality: [1, 0…0]), K = Π (d_m + 1),
// k row-major with modality 0 slowest. The projected kernels never hold Z or any (N, K)
// tensor: tiles of Z are generated in shared memory from the modalities; the dx of the
// projected backward works on chunks of rows whose dZ = G W takes at most
// tf_projected_backward_workspace() elements (about 2^22, or one row when K is larger).
// Operands are read with any strides (stride 0 included); outputs are contiguous. float16 /
// bfloat16 / float32 compute in float32, float64 in float64. Reductions are done by one thread
// per output in a fixed order (no atomics): results are deterministic.
//
// Every launcher returns cudaErrorInvalidValue for bad arguments (M outside 1..kMaxModalities,
// a width < 1, too small a workspace), else cudaGetLastError() after its launches; nothing is
// launched for empty outputs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"  // kMaxModalities, DType, Modalities

namespace fusionops::cuda {

// out (N, K, contiguous) = Z.
cudaError_t tf_features_forward(DType dtype, const Modalities& xs, void* out, cudaStream_t stream);

// dx[m] (N, d_m, contiguous) = dL/dx_m given grad = dL/dZ (N, K), read with (grad_row_stride,
// grad_col_stride); rows where modality m is missing get 0.
cudaError_t tf_features_backward(DType dtype, const void* grad, int64_t grad_row_stride, int64_t grad_col_stride,
                                 const Modalities& xs, void* const* dx, cudaStream_t stream);

// out (N, O, contiguous) = Z Wᵀ + b; weight (O, K) read with (weight_row_stride,
// weight_col_stride), bias (O,) with bias_stride, or nullptr.
cudaError_t tf_projected_forward(DType dtype, const Modalities& xs, const void* weight, int64_t weight_row_stride,
                                 int64_t weight_col_stride, int64_t O, const void* bias, int64_t bias_stride,
                                 void* out, cudaStream_t stream);

// Elements of the compute type (float32, float64 for float64) that tf_projected_backward needs
// as workspace when dx is asked for (0 when N == 0).
int64_t tf_projected_backward_workspace(const Modalities& xs);

// Given grad = dL/dy (N, O) read with (grad_row_stride, grad_col_stride):
//   dx[m] (N, d_m, contiguous, input dtype) when dx != nullptr (0 on rows where m is missing);
//   dw (O, K, contiguous, input dtype) = Gᵀ Z when dw != nullptr;
//   db (O,, input dtype) = Σ_n G when db != nullptr.
// workspace: workspace_elems elements of the compute type, at least
// tf_projected_backward_workspace(xs) when dx is asked for (may be nullptr otherwise).
cudaError_t tf_projected_backward(DType dtype, const void* grad, int64_t grad_row_stride, int64_t grad_col_stride,
                                  const Modalities& xs, const void* weight, int64_t weight_row_stride,
                                  int64_t weight_col_stride, int64_t O, void* const* dx, void* dw, void* db,
                                  void* workspace, int64_t workspace_elems, cudaStream_t stream);

}  // namespace fusionops::cuda
