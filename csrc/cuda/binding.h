// Argument checks shared by the torch bindings of the CUDA kernels of product fusion, tensor
// fusion and low-rank fusion (csrc/cuda/product_fusion.cpp, csrc/cuda/tensor_fusion.cpp,
// csrc/cuda/low_rank_fusion.cpp). Needs a CUDA build of torch, like the bindings; the kernels
// (kernels/*.cu) do not.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "kernels/common.h"

namespace fusionops::cuda::binding {

inline DType dtype_of(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "fusionops::", op, ": expected float16, bfloat16, float32 or float64 inputs, got ", t);
}

// The kernels' compute type: float32, float64 for float64 inputs.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `name` must be a CUDA tensor on `device` (the device of xs[0]).
inline void check_device(const char* op, const std::string& name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "fusionops::", op, ": ", name, " is on ", t.device(),
              " but xs[0] is on ", device, "; every input must be on one CUDA device");
}

// `name` must be a `dtype` tensor of shape `shape` on `device`.
inline void check_tensor(const char* op, const std::string& name, const at::Tensor& t, at::IntArrayRef shape,
                         at::ScalarType dtype, const at::Device& device) {
  check_device(op, name, t, device);
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape, "fusionops::", op, ": ", name, " must be a ", dtype,
              " tensor of shape ", shape, ", got ", t.scalar_type(), " of shape ", t.sizes());
}

// Checks xs and mask (1 <= M <= kMaxModalities; every x_m a 2-D (N, d_m >= 1) CUDA tensor of one
// dtype on one device; mask None or bool (N, M) there) and describes them for the kernels.
inline Modalities modalities(const char* op, at::TensorList xs, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(!xs.empty(), "fusionops::", op, ": xs is empty; expected M >= 1 modalities");
  TORCH_CHECK(static_cast<int>(xs.size()) <= kMaxModalities, "fusionops::", op, ": the CUDA kernels take at most ",
              kMaxModalities, " modalities, got M = ", xs.size(), " (use the triton or reference backend for more)");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.is_cuda(), "fusionops::", op, ": xs[0] is on ", x0.device(), ", expected a CUDA device");
  TORCH_CHECK(x0.dim() == 2, "fusionops::", op, ": xs[0] must be (N, d), got shape ", x0.sizes());
  dtype_of(op, x0.scalar_type());
  Modalities p;
  p.M = static_cast<int>(xs.size());
  p.N = x0.size(0);
  for (int m = 0; m < p.M; ++m) {
    const at::Tensor& x = xs[m];
    check_device(op, "xs[" + std::to_string(m) + "]", x, x0.device());
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), "fusionops::", op, ": xs[", m, "] has dtype ", x.scalar_type(),
                " but xs[0] has ", x0.scalar_type());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == p.N && x.size(1) >= 1, "fusionops::", op, ": xs[", m,
                "] must be (N, d) with N = ", p.N, " and d >= 1, got shape ", x.sizes());
    p.data[m] = x.const_data_ptr();
    p.row_stride[m] = x.stride(0);
    p.col_stride[m] = x.stride(1);
    p.width[m] = x.size(1);
  }
  if (mask) {
    check_device(op, "mask", *mask, x0.device());
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == p.N &&
                    mask->size(1) == p.M,
                "fusionops::", op, ": mask must be a bool tensor of shape (N, M) = (", p.N, ", ", p.M, "), got ",
                mask->scalar_type(), " of shape ", mask->sizes());
    p.mask = mask->const_data_ptr<bool>();
    p.mask_row_stride = mask->stride(0);
    p.mask_col_stride = mask->stride(1);
  }
  return p;
}

// K = Π (d_m + 1), refusing a K that int64 cannot hold.
inline int64_t feature_count(const char* op, const Modalities& p) {
  int64_t K = 1;
  for (int m = 0; m < p.M; ++m) {
    const int64_t D = p.width[m] + 1;
    TORCH_CHECK(K <= std::numeric_limits<int64_t>::max() / D, "fusionops::", op,
                ": K = prod(d_m + 1) overflows int64");
    K *= D;
  }
  return K;
}

}  // namespace fusionops::cuda::binding
