// Plain CUDA kernels of low-rank fusion (DESIGN.md section 2; contract in
// fusionops/ops/_kernels.py LowRankFusionKernels): no torch or ATen headers, so nvcc compiles
// them without a CUDA build of torch (.ci/nvcc_check does, on every CI run). The torch binding
// is csrc/cuda/low_rank_fusion.cpp.
//
// y[n, o] = b[o] + Σ_r w_r Π_m A_m[n, r, o], A_m[n, r, o] = Σ_j z_m[n, j] F_m[r, j, o], with
// z_m = [1, x_m] (a missing modality: [1, 0…0], so A_m = F_m[r, 0]). The kernels work on
// chunks of rows: the A_m of one chunk, about lmf_workspace() elements of the compute type
// (2^22, or one row when M·R·O is larger), never the (N, R, O) projections of all rows, and the
// backward recomputes them (the forward keeps nothing). Operands are read with any strides
// (stride 0 included). float16 / bfloat16 / float32 compute in float32, float64 in float64.
// Every reduction is done by one thread per output in a fixed order, chunk after chunk in
// stream order (no atomics): results are deterministic.
//
// Every launcher returns cudaErrorInvalidValue for bad arguments (M outside 1..kMaxModalities,
// a width < 1, R or O < 1, too small a workspace), else cudaGetLastError() after its launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"  // kMaxModalities, DType, Modalities

namespace fusionops::cuda {

// The factors F_m (R, d_m + 1, O), element F_m[r, j, o] at data[m] + r * stride0[m] +
// j * stride1[m] + o * stride2[m] (the dtype of the modalities).
struct Factors {
  const void* data[kMaxModalities] = {};
  int64_t stride0[kMaxModalities] = {};
  int64_t stride1[kMaxModalities] = {};
  int64_t stride2[kMaxModalities] = {};
  int64_t R = 0;
  int64_t O = 0;
};

// Elements of the compute type (float32, float64 for float64) the forward and the backward need
// as workspace (0 when N == 0).
int64_t lmf_workspace(const Modalities& xs, const Factors& factors);

// out (N, O, contiguous, input dtype) = y; rank_weight (R,) read with rank_weight_stride, bias
// (O,) with bias_stride or nullptr.
cudaError_t lmf_forward(DType dtype, const Modalities& xs, const Factors& factors, const void* rank_weight,
                        int64_t rank_weight_stride, const void* bias, int64_t bias_stride, void* out,
                        void* workspace, int64_t workspace_elems, cudaStream_t stream);

// Given grad = dL/dy (N, O) read with (grad_row_stride, grad_col_stride), each output when its
// pointer is not nullptr (dx and dfactors: arrays of M pointers):
//   dx[m] (N, d_m, contiguous, input dtype): written; 0 on rows where modality m is missing;
//   dfactors[m] (R, d_m + 1, O, contiguous, COMPUTE type): added to (pass zeros);
//   drank_weight (R,, COMPUTE type): added to (pass zeros);
//   dbias (O,, input dtype): written.
cudaError_t lmf_backward(DType dtype, const void* grad, int64_t grad_row_stride, int64_t grad_col_stride,
                         const Modalities& xs, const Factors& factors, const void* rank_weight,
                         int64_t rank_weight_stride, void* const* dx, void* const* dfactors, void* drank_weight,
                         void* dbias, void* workspace, int64_t workspace_elems, cudaStream_t stream);

}  // namespace fusionops::cuda
