// Torch binding of the CUDA kernels of product fusion (kernels/product_fusion_kernels.cu).
// Compiled only in a CUDA build (setup.py adds csrc/cuda/ when torch is a CUDA build and a
// toolkit is present); the kernels themselves have no torch headers and are compile-checked on
// every CI run by .ci/nvcc_check.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "binding.h"
#include "kernels/product_fusion_kernels.h"

namespace fusionops::cuda {
namespace {

using binding::dtype_of;

// Checks xs: 1 <= M <= kMaxModalities, every x_m a 2-D CUDA tensor (N, d) of one dtype on one device.
void check_operands(const char* op, at::TensorList xs) {
  TORCH_CHECK(!xs.empty(), "fusionops::", op, ": xs is empty; expected M >= 1 modalities");
  TORCH_CHECK(static_cast<int>(xs.size()) <= kMaxModalities, "fusionops::", op, ": the CUDA kernels take at most ",
              kMaxModalities, " modalities, got M = ", xs.size(),
              " (use the triton or reference backend for more)");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.dim() == 2, "fusionops::", op, ": xs[0] must be (N, d), got shape ", x0.sizes());
  dtype_of(op, x0.scalar_type());
  for (size_t m = 0; m < xs.size(); ++m) {
    const at::Tensor& x = xs[m];
    TORCH_CHECK(x.is_cuda() && x.device() == x0.device(), "fusionops::", op, ": xs[", m, "] is on ", x.device(),
                ", expected ", x0.device(), " (a CUDA device)");
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), "fusionops::", op, ": xs[", m, "] has dtype ",
                x.scalar_type(), " but xs[0] has ", x0.scalar_type());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == x0.size(0) && x.size(1) == x0.size(1), "fusionops::", op, ": xs[",
                m, "] must have the shape of xs[0], ", x0.sizes(), ", got ", x.sizes());
  }
}

struct Pointers {
  std::vector<const void*> data;
  std::vector<int64_t> s0, s1;

  explicit Pointers(at::TensorList xs) {
    for (const at::Tensor& x : xs) {
      data.push_back(x.const_data_ptr());
      s0.push_back(x.stride(0));
      s1.push_back(x.stride(1));
    }
  }
};

at::Tensor product_fwd(at::TensorList xs) {
  constexpr const char* kOp = "_product_fwd";
  check_operands(kOp, xs);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const int64_t N = xs[0].size(0), d = xs[0].size(1);
  at::Tensor out = at::empty({N, d}, xs[0].options());
  const Pointers p(xs);
  const cudaError_t err =
      product_forward(dtype_of(kOp, xs[0].scalar_type()), static_cast<int>(xs.size()), p.data.data(), p.s0.data(),
                      p.s1.data(), N, d, out.mutable_data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  return out;
}

std::vector<at::Tensor> product_bwd(const at::Tensor& grad, at::TensorList xs) {
  constexpr const char* kOp = "_product_bwd";
  check_operands(kOp, xs);
  const int64_t N = xs[0].size(0), d = xs[0].size(1);
  TORCH_CHECK(grad.device() == xs[0].device() && grad.scalar_type() == xs[0].scalar_type() && grad.dim() == 2 &&
                  grad.size(0) == N && grad.size(1) == d,
              "fusionops::", kOp, ": grad must be a ", xs[0].scalar_type(), " tensor of shape (", N, ", ", d,
              ") on ", xs[0].device(), ", got ", grad.scalar_type(), " of shape ", grad.sizes(), " on ",
              grad.device());
  const c10::cuda::CUDAGuard guard(xs[0].device());
  std::vector<at::Tensor> dx;
  std::vector<void*> out;
  for (size_t m = 0; m < xs.size(); ++m) {
    dx.push_back(at::empty({N, d}, xs[0].options()));
    out.push_back(dx.back().mutable_data_ptr());
  }
  const Pointers p(xs);
  const cudaError_t err = product_backward(dtype_of(kOp, xs[0].scalar_type()), static_cast<int>(xs.size()),
                                           grad.const_data_ptr(), grad.stride(0), grad.stride(1), p.data.data(),
                                           p.s0.data(), p.s1.data(), N, d, out.data(),
                                           at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  return dx;
}

}  // namespace
}  // namespace fusionops::cuda

TORCH_LIBRARY_IMPL(fusionops, CUDA, m) {
  m.impl("_product_fwd", &fusionops::cuda::product_fwd);
  m.impl("_product_bwd", &fusionops::cuda::product_bwd);
}
