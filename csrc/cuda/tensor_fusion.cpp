// Torch binding of the CUDA kernels of tensor fusion (kernels/tensor_fusion_kernels.cu).
// Compiled only in a CUDA build (setup.py adds csrc/cuda/ when torch is a CUDA build and a
// toolkit is present); the kernels themselves have no torch headers and are compile-checked on
// every CI run by .ci/nvcc_check. The schemas are declared once, in csrc/ops.cpp; these are their CUDA implementations.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "binding.h"
#include "kernels/tensor_fusion_kernels.h"

namespace fusionops::cuda {
namespace {

using binding::check_tensor;

// One (N, d_m) tensor of the input dtype per modality, and their data pointers.
struct Dx {
  std::vector<at::Tensor> tensors;
  std::vector<void*> ptrs;

  Dx(const Modalities& p, const at::TensorOptions& opts) {
    for (int m = 0; m < p.M; ++m) {
      tensors.push_back(at::empty({p.N, p.width[m]}, opts));
      ptrs.push_back(tensors.back().mutable_data_ptr());
    }
  }
};

// The checked inputs of the projected ops: xs and mask as the kernels read them, K, and O,
// weight being an (O, K) tensor of the dtype and on the device of xs[0] (both also returned).
struct Projected {
  Modalities p;
  int64_t K;
  int64_t O;
  at::ScalarType dtype;
  at::Device device;
};

Projected projected(const char* op, at::TensorList xs, const at::Tensor& weight,
                    const std::optional<at::Tensor>& mask) {
  const Modalities p = binding::modalities(op, xs, mask);
  const int64_t K = binding::feature_count(op, p);
  const auto dtype = xs[0].scalar_type();
  const at::Device device = xs[0].device();
  binding::check_device(op, "weight", weight, device);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "fusionops::", op, ": weight must be (O, K) with K = ", K,
              ", got shape ", weight.sizes());
  const int64_t O = weight.size(0);
  check_tensor(op, "weight", weight, {O, K}, dtype, device);
  return {p, K, O, dtype, device};
}

at::Tensor tf_features_fwd(at::TensorList xs, const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_tf_features_fwd";
  const Modalities p = binding::modalities(kOp, xs, mask);
  const int64_t K = binding::feature_count(kOp, p);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  at::Tensor out = at::empty({p.N, K}, xs[0].options());
  C10_CUDA_CHECK(tf_features_forward(binding::dtype_of(kOp, xs[0].scalar_type()), p, out.mutable_data_ptr(),
                                     at::cuda::getCurrentCUDAStream()));
  return out;
}

std::vector<at::Tensor> tf_features_bwd(const at::Tensor& grad, at::TensorList xs,
                                        const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_tf_features_bwd";
  const Modalities p = binding::modalities(kOp, xs, mask);
  const int64_t K = binding::feature_count(kOp, p);
  check_tensor(kOp, "grad", grad, {p.N, K}, xs[0].scalar_type(), xs[0].device());
  const c10::cuda::CUDAGuard guard(xs[0].device());
  Dx dx(p, xs[0].options());
  C10_CUDA_CHECK(tf_features_backward(binding::dtype_of(kOp, xs[0].scalar_type()), grad.const_data_ptr(),
                                      grad.stride(0), grad.stride(1), p, dx.ptrs.data(),
                                      at::cuda::getCurrentCUDAStream()));
  return dx.tensors;
}

// The CUDA kernels have no dropout on Z: the op layer sends calls with dropout > 0 to the
// triton backend (fusionops/ops/tensor_fusion.py), and these refuse them.
void check_no_dropout(const char* op, double dropout) {
  TORCH_CHECK(dropout == 0.0, "fusionops::", op, ": the CUDA C++ kernels have no dropout on Z (dropout must be 0, got ",
              dropout, "); use the triton backend");
}

at::Tensor tf_projected_fwd(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& mask, double dropout, int64_t /*seed*/) {
  constexpr const char* kOp = "_tf_projected_fwd";
  check_no_dropout(kOp, dropout);
  const auto [p, K, O, dtype, device] = projected(kOp, xs, weight, mask);
  if (bias) check_tensor(kOp, "bias", *bias, {O}, dtype, device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({p.N, O}, xs[0].options());
  C10_CUDA_CHECK(tf_projected_forward(binding::dtype_of(kOp, dtype), p, weight.const_data_ptr(), weight.stride(0),
                                      weight.stride(1), O, bias ? bias->const_data_ptr() : nullptr,
                                      bias ? bias->stride(0) : 0, out.mutable_data_ptr(),
                                      at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> tf_projected_bwd(
    const at::Tensor& grad, at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& mask,
    bool need_dx, bool need_dw, bool need_db, double dropout, int64_t /*seed*/) {
  constexpr const char* kOp = "_tf_projected_bwd";
  check_no_dropout(kOp, dropout);
  const auto [p, K, O, dtype, device] = projected(kOp, xs, weight, mask);
  check_tensor(kOp, "grad", grad, {p.N, O}, dtype, device);
  const c10::cuda::CUDAGuard guard(device);
  const at::TensorOptions opts = xs[0].options();
  std::optional<Dx> dx;
  at::Tensor workspace;
  int64_t workspace_elems = 0;
  if (need_dx) {
    dx.emplace(p, opts);
    workspace_elems = tf_projected_backward_workspace(p);
    workspace = at::empty({workspace_elems}, opts.dtype(binding::compute_type(dtype)));
  }
  std::optional<at::Tensor> dw, db;
  if (need_dw) dw = at::empty({O, K}, opts);
  if (need_db) db = at::empty({O}, opts);
  if (need_dx || need_dw || need_db) {
    C10_CUDA_CHECK(tf_projected_backward(
        binding::dtype_of(kOp, dtype), grad.const_data_ptr(), grad.stride(0), grad.stride(1), p,
        weight.const_data_ptr(), weight.stride(0), weight.stride(1), O, need_dx ? dx->ptrs.data() : nullptr,
        need_dw ? dw->mutable_data_ptr() : nullptr, need_db ? db->mutable_data_ptr() : nullptr,
        need_dx ? workspace.mutable_data_ptr() : nullptr, workspace_elems, at::cuda::getCurrentCUDAStream()));
  }
  return {need_dx ? dx->tensors : std::vector<at::Tensor>{}, dw, db};
}

}  // namespace
}  // namespace fusionops::cuda

TORCH_LIBRARY_IMPL(fusionops, CUDA, m) {
  m.impl("_tf_features_fwd", &fusionops::cuda::tf_features_fwd);
  m.impl("_tf_features_bwd", &fusionops::cuda::tf_features_bwd);
  m.impl("_tf_projected_fwd", &fusionops::cuda::tf_projected_fwd);
  m.impl("_tf_projected_bwd", &fusionops::cuda::tf_projected_bwd);
}
