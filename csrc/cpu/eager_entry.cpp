// The compiled eager entries (see eager_entry.h), in one translation unit: each file including
// torch's Python headers costs CI about 25 s per build, and it builds twice.
#include "eager_entry.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace fusionops::cpu::eager {

// --- what the entries share: the size rule, the counters, the test of a plain tensor ---------

namespace {

// Other Python threads run during an entry's ATen calls or kernels from this many elements on
// (about 10 µs of work), as around torch's own kernels; below it releasing and taking the GIL
// back would cost 10% of a call.
constexpr int64_t kReleaseGilFrom = int64_t{1} << 16;

// OpDef.prefers_fused on CPU for one op (fusionops/registry.py), with its fields. Atomic: a rule
// may be handed over (tests, benchmarks.crossover) while another thread's call reads it.
struct SizeRule {
  std::atomic<int64_t> min_modalities{std::numeric_limits<int64_t>::max()};  // nothing fused until set
  std::atomic<int64_t> min_size{0};                                          // with gradients
  std::atomic<int64_t> min_size_forward{0};                                  // without
  std::atomic<int64_t> narrow{0};          // widest modality, with gradients (0: off)
  std::atomic<int64_t> narrow_forward{0};  // without
  bool prefers_fused(int64_t size, int64_t modalities, bool training, int64_t widest) const;
};

// The ops with an entry, and their backends ("reference", "cpu").
enum Op { kProductFusion = 0, kTensorFusion = 1, kOps = 2 };
enum Backend { kReference = 0, kCpu = 1, kBackends = 2 };

// Per op: its rule and its calls counted by backend (read by fusionops.dispatch_counts()).
struct Entry {
  SizeRule rule;
  std::atomic<int64_t> calls[kBackends] = {};
};

bool SizeRule::prefers_fused(int64_t size, int64_t modalities, bool training, int64_t widest) const {
  if (modalities < min_modalities) return false;
  const int64_t narrow_width = training ? narrow : narrow_forward;
  if (narrow_width > 0 && widest > 0 && widest <= narrow_width) return true;
  return size >= (training ? min_size : min_size_forward);
}

Entry& entry(Op op) {
  static Entry entries[kOps];
  return entries[op];
}

const at::Tensor* plain_cpu_float(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || t.is_nested()) return nullptr;
  const at::ScalarType s = t.scalar_type();
  if (s != at::kFloat && s != at::kDouble && s != at::kBFloat16 && s != at::kHalf) return nullptr;
  return &t;
}

bool modes_allow() {
  // A torch function mode sees Python's calls but not at::'s; autocast and functorch change
  // which backend may serve (the Python path decides those).
  return !at::impl::torch_function_mode_enabled() && !at::autocast::is_autocast_enabled(at::kCPU) &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

bool items(PyObject* seq, PyObject* const** first, Py_ssize_t* count) {
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return false;
  *first = PySequence_Fast_ITEMS(seq);
  *count = PySequence_Fast_GET_SIZE(seq);
  return true;
}

}  // namespace

// --- product fusion ------------------------------------------------------------------------

// fusionops._C._product_eager(xs).
// With two modalities the automatic choice is always the reference's single multiply (about
// 2 µs at research sizes), and a Python layer in front of it cost as much again. Accepted: a
// list or tuple of plain CPU tensors of one float dtype and one shape, at least 1-d and 1 wide.
// On the reference it multiplies as fusionops.reference.product_fusion does (at::mul left to
// right, through autograd: the same bits and the same graph); on the cpu backend it calls the
// kernels on the (rows, d) views as fusionops/ops/product_fusion.py does
// (fusionops::_product_eager, with its autograd in C++, when a gradient is recorded, else
// fusionops::_product_fwd).
namespace product {
namespace {

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

}  // namespace product

// --- tensor fusion ------------------------------------------------------------------------

// fusionops._C._tensor_fusion_eager(xs, weight, bias). Accepted: the projection of rows, xs a
// list or tuple of plain CPU tensors (N, d_m >= 1) of one float dtype, weight (O, K) with
// K = Π(d_m + 1) and bias (O,) or None of that dtype (no mask, no dropout: the Python caller
// passes only such calls). On the reference it runs fusionops.reference.tensor_fusion's own ATen
// ops (the same bits and the same autograd graph); on the cpu backend, the kernels as
// fusionops/ops/tensor_fusion.py calls them (fusionops::_tf_projected_eager, with its autograd in
// C++, when a gradient is recorded, else fusionops::_tf_projected_fwd).
namespace tensor_fusion {
namespace {

using ProjectedFn = at::Tensor(at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, double, int64_t);

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

}  // namespace tensor_fusion

// --- fusionops._C's methods -------------------------------------------------------------------

namespace {

bool op_named(const char* name, Op* op) {
  if (std::strcmp(name, "product_fusion") == 0) {
    *op = kProductFusion;
  } else if (std::strcmp(name, "tensor_fusion") == 0) {
    *op = kTensorFusion;
  } else {
    PyErr_Format(PyExc_ValueError, "fusionops._C: no compiled eager entry for op %s", name);
    return false;
  }
  return true;
}

// _eager_rule(op, min_modalities, min_size, min_size_forward, narrow, narrow_forward)
PyObject* set_rule(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  long long v[5] = {};
  if (!PyArg_ParseTuple(args, "sLLLLL", &name, &v[0], &v[1], &v[2], &v[3], &v[4])) return nullptr;
  Op op{};
  if (!op_named(name, &op)) return nullptr;
  SizeRule& rule = entry(op).rule;
  rule.min_modalities = v[0];
  rule.min_size = v[1];
  rule.min_size_forward = v[2];
  rule.narrow = v[3];
  rule.narrow_forward = v[4];
  Py_RETURN_NONE;
}

// _eager_calls(op, backend, reset) -> the calls the entry served on backend ("reference" or
// "cpu"), then zero when reset is true
PyObject* calls(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  const char* backend = nullptr;
  int reset = 0;
  if (!PyArg_ParseTuple(args, "ssp", &name, &backend, &reset)) return nullptr;
  Op op{};
  if (!op_named(name, &op)) return nullptr;
  const bool cpu = std::strcmp(backend, "cpu") == 0;
  if (!cpu && std::strcmp(backend, "reference") != 0) {
    PyErr_Format(PyExc_ValueError, "fusionops._C._eager_calls: backend must be reference or cpu, got %s", backend);
    return nullptr;
  }
  std::atomic<int64_t>& n = entry(op).calls[cpu ? kCpu : kReference];
  return PyLong_FromLongLong(reset ? n.exchange(0) : n.load());
}

// _eager_prefers_fused(op, size, modalities, training, widest): the rule as the entries apply it
PyObject* prefers_fused(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  long long size = 0, modalities = 0, widest = 0;
  int training = 0;
  if (!PyArg_ParseTuple(args, "sLLpL", &name, &size, &modalities, &training, &widest)) return nullptr;
  Op op{};
  if (!op_named(name, &op)) return nullptr;
  return PyBool_FromLong(entry(op).rule.prefers_fused(size, modalities, training, widest));
}

}  // namespace

PyMethodDef methods[] = {
    {"_product_eager", product::product_eager, METH_O,
     "product_fusion's common eager call (above), or None."},
    {"_tensor_fusion_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(tensor_fusion::tensor_fusion_eager)),
     METH_FASTCALL, "tensor_fusion's common eager call (above), or None."},
    {"_eager_rule", set_rule, METH_VARARGS,
     "Hand an op's CPU size rule to its entry: (op, min_modalities, min_size, min_size_forward, narrow, "
     "narrow_forward)."},
    {"_eager_calls", calls, METH_VARARGS, "(op, backend, reset) -> the calls an entry served on backend."},
    {"_eager_prefers_fused", prefers_fused, METH_VARARGS,
     "(op, size, modalities, training, widest) -> the entry's size-rule choice."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fusionops::cpu::eager
