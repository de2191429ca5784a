// The common eager call of product fusion, entered from Python with no Python in between
// (issue 15: with two modalities the automatic choice is the reference's one multiply, 2 µs, and
// a Python layer in front of it cost as much again). fusionops/ops/product_fusion.py calls
// fusionops._C._product_reference_eager(xs) first when no backend is forced and nothing is
// traced. It accepts only the call the size rule gives to the reference: a list or tuple of plain
// strided CPU tensors (torch.Tensor or nn.Parameter, not subclasses) of one float dtype and one
// shape, at least 1-d and at least 1 wide, with no autocast or torch function mode active. It
// then multiplies exactly as fusionops.reference.product_fusion does (at::mul left to right,
// through autograd: the same graph and the same bits) and counts the call. Anything else returns
// None, and the Python path decides and explains as before.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <Python.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace fusionops::cpu {
namespace {

// OpDef.prefers_fused of product fusion on CPU, set by fusionops/ops/product_fusion.py at import
// (the OpDef is frozen, so it cannot change later). Until then nothing is accepted.
struct SizeRule {
  int64_t min_modalities = std::numeric_limits<int64_t>::max();
  int64_t min_size = 0;          // N*d, with gradients
  int64_t min_size_forward = 0;  // N*d, without
};
SizeRule rule;
std::atomic<int64_t> reference_calls{0};
constexpr int64_t kReleaseGilFrom = int64_t{1} << 16;  // elements: from about 10 µs of work

bool plain_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// The accepted call's tensors, or false. Never raises.
bool accept(PyObject* xs, std::vector<const at::Tensor*>& out) {
  const bool is_list = PyList_CheckExact(xs);
  if (!is_list && !PyTuple_CheckExact(xs)) return false;
  const Py_ssize_t m = is_list ? PyList_GET_SIZE(xs) : PyTuple_GET_SIZE(xs);
  if (m == 0) return false;
  // A torch function mode sees Python's `*` but not at::mul. (Functorch transforms need no test:
  // at::mul meets them in the dispatcher, as Python's `*` does.)
  if (at::impl::torch_function_mode_enabled() || at::autocast::is_autocast_enabled(at::kCPU)) return false;
  out.reserve(m);
  for (Py_ssize_t i = 0; i < m; ++i) {
    PyObject* obj = is_list ? PyList_GET_ITEM(xs, i) : PyTuple_GET_ITEM(xs, i);
    if (!THPVariable_CheckExact(obj)) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || t.is_nested()) return false;
    if (i == 0) {
      if (!plain_float(t.scalar_type()) || t.dim() == 0 || t.size(-1) == 0) return false;
    } else if (t.scalar_type() != out[0]->scalar_type() || t.sizes() != out[0]->sizes()) {
      return false;
    }
    out.push_back(&t);
  }
  return true;
}

// Whether the size rule gives the call to the reference.
bool reference_by_rule(const std::vector<const at::Tensor*>& xs) {
  const auto m = static_cast<int64_t>(xs.size());
  if (m < rule.min_modalities) return true;
  bool training = false;
  if (c10::GradMode::is_enabled()) {
    for (const at::Tensor* t : xs) training = training || t->requires_grad();
  }
  return xs[0]->numel() < (training ? rule.min_size : rule.min_size_forward);
}

PyObject* product_reference_eager(PyObject* /*self*/, PyObject* xs) {
  HANDLE_TH_ERRORS
  std::vector<const at::Tensor*> ts;
  if (!accept(xs, ts) || !reference_by_rule(ts)) Py_RETURN_NONE;
  reference_calls.fetch_add(1, std::memory_order_relaxed);
  if (ts.size() == 1) {  // the reference returns xs[0] itself
    PyObject* first = PyList_CheckExact(xs) ? PyList_GET_ITEM(xs, 0) : PyTuple_GET_ITEM(xs, 0);
    Py_INCREF(first);
    return first;
  }
  at::Tensor p;
  {
    // Other Python threads run meanwhile, as around torch's own kernels; not for small calls,
    // where releasing and taking the GIL back costs 10% of the call.
    std::optional<pybind11::gil_scoped_release> no_gil;
    if (ts[0]->numel() >= kReleaseGilFrom) no_gil.emplace();
    p = at::mul(*ts[0], *ts[1]);
    for (size_t i = 2; i < ts.size(); ++i) p = at::mul(p, *ts[i]);
  }
  return THPVariable_Wrap(std::move(p));
  END_HANDLE_TH_ERRORS
}

// _product_eager_rule(min_modalities, min_size, min_size_forward)
PyObject* set_product_rule(PyObject* /*self*/, PyObject* args) {
  long long min_modalities = 0, min_size = 0, min_size_forward = 0;
  if (!PyArg_ParseTuple(args, "LLL", &min_modalities, &min_size, &min_size_forward)) return nullptr;
  rule = SizeRule{min_modalities, min_size, min_size_forward};
  Py_RETURN_NONE;
}

// _product_reference_calls(reset) -> the calls served so far (then zero if reset)
PyObject* product_reference_calls(PyObject* /*self*/, PyObject* reset) {
  const int truth = PyObject_IsTrue(reset);
  if (truth < 0) return nullptr;
  const int64_t n = truth ? reference_calls.exchange(0) : reference_calls.load();
  return PyLong_FromLongLong(n);
}

}  // namespace

PyMethodDef product_eager_methods[] = {
    {"_product_reference_eager", product_reference_eager, METH_O,
     "The reference's product of an accepted eager call, else None (csrc/cpu/product_eager.cpp)."},
    {"_product_eager_rule", set_product_rule, METH_VARARGS,
     "Set the CPU size rule: (min_modalities, min_size, min_size_forward)."},
    {"_product_reference_calls", product_reference_calls, METH_O,
     "Calls served by _product_reference_eager (reset to zero when the argument is true)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fusionops::cpu
