// What the plain CUDA kernels (csrc/cuda/kernels/*.cu) share with their torch bindings
// (csrc/cuda/*.cpp): no torch or ATen headers, so nvcc compiles the kernels without a CUDA
// build of torch (.ci/nvcc_check).
#pragma once

#include <cstdint>

namespace fusionops::cuda {

// The most modalities one launch takes (operands are passed by value in the kernel arguments).
// The ops rule the cuda backend out for more (their `_reasons`), and the bindings refuse them.
constexpr int kMaxModalities = 8;

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// M modalities x_m of shape (N, d_m), one dtype, read with any strides (in elements, stride 0
// included), with an optional per-row mask: mask[n * mask_row_stride + m * mask_col_stride]
// false means modality m of row n is missing, so it contributes z_m = [1, 0…0] whatever x_m
// holds (NaN included: the kernels select, never multiply) and its dx row is 0.
struct Modalities {
  int M = 0;
  int64_t N = 0;
  const void* data[kMaxModalities] = {};
  int64_t row_stride[kMaxModalities] = {};
  int64_t col_stride[kMaxModalities] = {};
  int64_t width[kMaxModalities] = {};  // d_m >= 1
  const bool* mask = nullptr;          // (N, M) or nullptr (every modality present)
  int64_t mask_row_stride = 0;
  int64_t mask_col_stride = 0;
};

}  // namespace fusionops::cuda
