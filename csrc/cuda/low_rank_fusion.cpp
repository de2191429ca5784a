// Torch binding of the CUDA kernels of low-rank fusion (kernels/low_rank_fusion_kernels.cu).
// Compiled only in a CUDA build (setup.py adds csrc/cuda/ when torch is a CUDA build and a
// toolkit is present); the kernels themselves have no torch headers and are compile-checked on
// every CI run by .ci/nvcc_check. The schemas are declared once, in csrc/ops.cpp; these are their CUDA implementations.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "binding.h"
#include "kernels/low_rank_fusion_kernels.h"

namespace fusionops::cuda {
namespace {

using binding::check_tensor;

// Checks factors (M tensors (R, d_m + 1, O), one R >= 1 and O >= 1, the dtype and device of
// xs[0]) and rank_weight (R,); describes the factors for the kernels.
Factors make_factors(const char* op, const Modalities& p, at::TensorList xs, at::TensorList factors,
                     const at::Tensor& rank_weight) {
  const auto dtype = xs[0].scalar_type();
  const at::Device device = xs[0].device();
  TORCH_CHECK(static_cast<int>(factors.size()) == p.M, "fusionops::", op, ": got ", p.M, " modalities but ",
              factors.size(), " factors");
  binding::check_device(op, "factors[0]", factors[0], device);
  TORCH_CHECK(factors[0].dim() == 3 && factors[0].size(0) >= 1 && factors[0].size(2) >= 1, "fusionops::", op,
              ": factors[0] must be (R, d_0 + 1, O) with R, O >= 1, got shape ", factors[0].sizes());
  Factors f;
  f.R = factors[0].size(0);
  f.O = factors[0].size(2);
  for (int m = 0; m < p.M; ++m) {
    const at::Tensor& F = factors[m];
    check_tensor(op, "factors[" + std::to_string(m) + "]", F, {f.R, p.width[m] + 1, f.O}, dtype, device);
    f.data[m] = F.const_data_ptr();
    f.stride0[m] = F.stride(0);
    f.stride1[m] = F.stride(1);
    f.stride2[m] = F.stride(2);
  }
  check_tensor(op, "rank_weight", rank_weight, {f.R}, dtype, device);
  return f;
}

at::Tensor lmf_fwd(at::TensorList xs, at::TensorList factors, const at::Tensor& rank_weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_lmf_fwd";
  const Modalities p = binding::modalities(kOp, xs, mask);
  const Factors f = make_factors(kOp, p, xs, factors, rank_weight);
  const auto dtype = xs[0].scalar_type();
  if (bias) check_tensor(kOp, "bias", *bias, {f.O}, dtype, xs[0].device());
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const at::TensorOptions opts = xs[0].options();
  at::Tensor out = at::empty({p.N, f.O}, opts);
  const int64_t workspace_elems = lmf_workspace(p, f);
  at::Tensor workspace = at::empty({workspace_elems}, opts.dtype(binding::compute_type(dtype)));
  C10_CUDA_CHECK(lmf_forward(binding::dtype_of(kOp, dtype), p, f, rank_weight.const_data_ptr(), rank_weight.stride(0),
                             bias ? bias->const_data_ptr() : nullptr, bias ? bias->stride(0) : 0,
                             out.mutable_data_ptr(), workspace.mutable_data_ptr(), workspace_elems,
                             at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
lmf_bwd(const at::Tensor& grad, at::TensorList xs, at::TensorList factors, const at::Tensor& rank_weight,
        const std::optional<at::Tensor>& mask, bool need_dx, bool need_dfactors, bool need_dw, bool need_db) {
  constexpr const char* kOp = "_lmf_bwd";
  const Modalities p = binding::modalities(kOp, xs, mask);
  const Factors f = make_factors(kOp, p, xs, factors, rank_weight);
  const auto dtype = xs[0].scalar_type();
  check_tensor(kOp, "grad", grad, {p.N, f.O}, dtype, xs[0].device());
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const at::TensorOptions opts = xs[0].options();
  const at::TensorOptions acc = opts.dtype(binding::compute_type(dtype));
  // dx in the input dtype (written); dfactors and drank_weight in the compute type, from zeros
  // (the kernels add each chunk of rows to them), rounded to the input dtype at the end.
  std::vector<at::Tensor> dx, dF;
  std::vector<void*> dx_ptrs, dF_ptrs;
  for (int m = 0; m < p.M; ++m) {
    if (need_dx) {
      dx.push_back(at::empty({p.N, p.width[m]}, opts));
      dx_ptrs.push_back(dx.back().mutable_data_ptr());
    }
    if (need_dfactors) {
      dF.push_back(at::zeros({f.R, p.width[m] + 1, f.O}, acc));
      dF_ptrs.push_back(dF.back().mutable_data_ptr());
    }
  }
  at::Tensor dw = need_dw ? at::zeros({f.R}, acc) : at::Tensor();
  at::Tensor db = need_db ? at::empty({f.O}, opts) : at::Tensor();
  const bool chunks = need_dx || need_dfactors || need_dw;
  const int64_t workspace_elems = chunks ? lmf_workspace(p, f) : 0;
  at::Tensor workspace = at::empty({workspace_elems}, acc);
  if (chunks || need_db) {
    C10_CUDA_CHECK(lmf_backward(binding::dtype_of(kOp, dtype), grad.const_data_ptr(), grad.stride(0), grad.stride(1),
                                p, f, rank_weight.const_data_ptr(), rank_weight.stride(0),
                                need_dx ? dx_ptrs.data() : nullptr, need_dfactors ? dF_ptrs.data() : nullptr,
                                need_dw ? dw.mutable_data_ptr() : nullptr, need_db ? db.mutable_data_ptr() : nullptr,
                                workspace.mutable_data_ptr(), workspace_elems, at::cuda::getCurrentCUDAStream()));
  }
  std::vector<at::Tensor> dfactors;
  for (const at::Tensor& t : dF) dfactors.push_back(t.to(dtype));
  std::optional<at::Tensor> dw_out, db_out;
  if (need_dw) dw_out = dw.to(dtype);
  if (need_db) db_out = db;
  return {dx, dfactors, dw_out, db_out};
}

}  // namespace
}  // namespace fusionops::cuda

TORCH_LIBRARY_IMPL(fusionops, CUDA, m) {
  m.impl("_lmf_fwd", &fusionops::cuda::lmf_fwd);
  m.impl("_lmf_bwd", &fusionops::cuda::lmf_bwd);
}
