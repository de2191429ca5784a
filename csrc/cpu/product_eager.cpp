// Product fusion's compiled eager entry (see eager_entry.h): fusionops._C._product_eager(xs).
// With two modalities the automatic choice is always the reference's single multiply (about
// 2 µs at research sizes), and a Python layer in front of it cost as much again. Accepted: a
// list or tuple of plain CPU tensors of one float dtype and one shape, at least 1-d and 1 wide.
// On the reference it multiplies as fusionops.reference.product_fusion does (at::mul left to
// right, through autograd: the same bits and the same graph); on the cpu backend it calls the
// kernels on the (rows, d) views as fusionops/ops/product_fusion.py does
// (fusionops::_product_eager, with its autograd in C++, when a gradient is recorded, else
// fusionops::_product_fwd).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "eager_entry.h"

namespace fusionops::cpu::eager {
namespace {

// Other Python threads run during the multiplies from this many elements on (about 10 µs of
// work), as around torch's own kernels; below it releasing and taking the GIL back would cost
// 10% of the call.
constexpr int64_t kReleaseGilFrom = int64_t{1} << 16;

// The accepted call's tensors, or false. Never raises.
bool accept(PyObject* xs, std::vector<const at::Tensor*>& out) {
  PyObject* const* item = nullptr;
  Py_ssize_t m = 0;
  if (!items(xs, &item, &m) || m == 0 || !modes_allow()) return false;
  out.reserve(m);
  for (Py_ssize_t i = 0; i < m; ++i) {
    const at::Tensor* t = plain_cpu_float(item[i]);
    if (t == nullptr) return false;
    if (i == 0 ? (t->dim() == 0 || t->size(-1) == 0)
               : (t->scalar_type() != out[0]->scalar_type() || t->sizes() != out[0]->sizes())) {
      return false;
    }
    out.push_back(t);
  }
  return true;
}

bool recording(const std::vector<const at::Tensor*>& xs) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : xs)
    if (t->requires_grad()) return true;
  return false;
}

using KernelFn = at::Tensor(at::TensorList);

c10::TypedOperatorHandle<KernelFn> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<KernelFn>();
}

at::Tensor reference(const std::vector<const at::Tensor*>& ts) {
  at::Tensor p = at::mul(*ts[0], *ts[1]);
  for (size_t i = 2; i < ts.size(); ++i) p = at::mul(p, *ts[i]);
  return p;
}

at::Tensor kernels(const std::vector<const at::Tensor*>& ts, bool training) {
  static const auto fwd = kernel_op("fusionops::_product_fwd");
  static const auto eager = kernel_op("fusionops::_product_eager");
  const at::IntArrayRef shape = ts[0]->sizes();
  const int64_t d = shape.back();
  const bool is_rows = shape.size() == 2;  // no reshape then (a view, and a node in the graph, each)
  std::vector<at::Tensor> rows;
  rows.reserve(ts.size());
  for (const at::Tensor* t : ts) rows.push_back(is_rows ? *t : t->reshape({t->numel() / d, d}));
  at::Tensor out = (training ? eager : fwd).call(rows);
  return is_rows ? out : out.reshape(shape);
}

}  // namespace

PyObject* product_eager(PyObject* /*self*/, PyObject* xs) {
  HANDLE_TH_ERRORS
  std::vector<const at::Tensor*> ts;
  if (!accept(xs, ts)) Py_RETURN_NONE;
  Entry& e = entry(kProductFusion);
  const bool training = recording(ts);
  const bool fused = e.rule.prefers_fused(ts[0]->numel(), static_cast<int64_t>(ts.size()), training, 0);
  PyObject* out = nullptr;
  if (!fused && ts.size() == 1) {  // the reference returns xs[0] itself
    out = PySequence_Fast_ITEMS(xs)[0];
    Py_INCREF(out);
  } else {
    at::Tensor p;
    {
      std::optional<pybind11::gil_scoped_release> no_gil;
      if (ts[0]->numel() >= kReleaseGilFrom) no_gil.emplace();
      p = fused ? kernels(ts, training) : reference(ts);
    }
    out = THPVariable_Wrap(std::move(p));
  }
  e.calls[fused ? kCpu : kReference].fetch_add(1, std::memory_order_relaxed);
  return out;
  END_HANDLE_TH_ERRORS
}

}  // namespace fusionops::cpu::eager
