// Tensor fusion's compiled eager entry (see eager_entry.h):
// fusionops._C._tensor_fusion_eager(xs, weight, bias). Accepted: the projection of rows, xs a
// list or tuple of plain CPU tensors (N, d_m >= 1) of one float dtype, weight (O, K) with
// K = Π(d_m + 1) and bias (O,) or None of that dtype (no mask, no dropout: the Python caller
// passes only such calls). On the reference it runs fusionops.reference.tensor_fusion's own ATen
// ops (the same bits and the same autograd graph); on the cpu backend, the kernels as
// fusionops/ops/tensor_fusion.py calls them (fusionops::_tf_projected_eager, with its autograd in
// C++, when a gradient is recorded, else fusionops::_tf_projected_fwd).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "eager_entry.h"

namespace fusionops::cpu::eager {
namespace {

using ProjectedFn = at::Tensor(at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, double, int64_t);

// From this many elements of Z on, other Python threads run meanwhile (see product_eager.cpp).
constexpr int64_t kReleaseGilFrom = int64_t{1} << 16;

c10::TypedOperatorHandle<ProjectedFn> projected(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<ProjectedFn>();
}

struct Call {
  std::vector<at::Tensor> xs;
  const at::Tensor* weight = nullptr;
  std::optional<at::Tensor> bias;
  int64_t n = 0, k = 1, widest = 0;
  bool training = false;
};

// The accepted call, or false. Never raises.
bool accept(PyObject* const* args, Py_ssize_t nargs, Call& c) {
  PyObject* const* item = nullptr;
  Py_ssize_t m = 0;
  if (nargs != 3 || !items(args[0], &item, &m) || m == 0 || !modes_allow()) return false;
  c.weight = plain_cpu_float(args[1]);
  if (c.weight == nullptr) return false;
  const at::ScalarType dtype = c.weight->scalar_type();
  bool grads = c.weight->requires_grad();
  c.xs.reserve(m);
  for (Py_ssize_t i = 0; i < m; ++i) {
    const at::Tensor* x = plain_cpu_float(item[i]);
    if (x == nullptr || x->scalar_type() != dtype || x->dim() != 2) return false;
    const int64_t d = x->size(1);
    if (d == 0 || (i > 0 && x->size(0) != c.n) || __builtin_mul_overflow(c.k, d + 1, &c.k)) return false;
    c.n = x->size(0);
    c.widest = std::max(c.widest, d);
    grads = grads || x->requires_grad();
    c.xs.push_back(*x);
  }
  if (c.weight->dim() != 2 || c.weight->size(1) != c.k) return false;
  if (args[2] != Py_None) {
    const at::Tensor* b = plain_cpu_float(args[2]);
    if (b == nullptr || b->scalar_type() != dtype || b->dim() != 1 || b->size(0) != c.weight->size(0)) return false;
    grads = grads || b->requires_grad();
    c.bias = *b;
  }
  c.training = grads && c10::GradMode::is_enabled();
  return true;
}

// fusionops.reference.tensor_fusion(xs, weight, bias), op for op.
at::Tensor reference(const Call& c) {
  at::Tensor z;
  for (const at::Tensor& x : c.xs) {
    at::Tensor zm = at::cat({at::ones_like(x.slice(-1, 0, 1)), x}, -1);
    z = z.defined() ? (z.unsqueeze(-1) * zm.unsqueeze(-2)).flatten(-2) : zm;
  }
  return at::linear(z, *c.weight, c.bias);
}

at::Tensor kernels(const Call& c) {
  static const auto fwd = projected("fusionops::_tf_projected_fwd");
  static const auto eager = projected("fusionops::_tf_projected_eager");
  return (c.training ? eager : fwd).call(c.xs, *c.weight, c.bias, std::nullopt, 0.0, 0);
}

}  // namespace

PyObject* tensor_fusion_eager(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Call c;
  if (!accept(args, nargs, c)) Py_RETURN_NONE;
  int64_t size = 0;
  if (__builtin_mul_overflow(c.n, c.k, &size)) Py_RETURN_NONE;
  Entry& e = entry(kTensorFusion);
  const bool fused = e.rule.prefers_fused(size, static_cast<int64_t>(c.xs.size()), c.training, c.widest);
  at::Tensor out;
  {
    std::optional<pybind11::gil_scoped_release> no_gil;
    if (size >= kReleaseGilFrom) no_gil.emplace();
    out = fused ? kernels(c) : reference(c);
  }
  e.calls[fused ? kCpu : kReference].fetch_add(1, std::memory_order_relaxed);
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

}  // namespace fusionops::cpu::eager
