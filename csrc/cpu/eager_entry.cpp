// What the compiled eager entries share (see eager_entry.h): the size rule, the counters, the
// test of a plain tensor, and fusionops._C's module methods.
#include "eager_entry.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>

namespace fusionops::cpu::eager {

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
    {"_product_eager", product_eager, METH_O,
     "product_fusion's common eager call (csrc/cpu/product_eager.cpp), or None."},
    {"_tensor_fusion_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(tensor_fusion_eager)),
     METH_FASTCALL, "tensor_fusion's common eager call (csrc/cpu/tensor_fusion_eager.cpp), or None."},
    {"_eager_rule", set_rule, METH_VARARGS,
     "Hand an op's CPU size rule to its entry: (op, min_modalities, min_size, min_size_forward, narrow, "
     "narrow_forward)."},
    {"_eager_calls", calls, METH_VARARGS, "(op, backend, reset) -> the calls an entry served on backend."},
    {"_eager_prefers_fused", prefers_fused, METH_VARARGS,
     "(op, size, modalities, training, widest) -> the entry's size-rule choice."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fusionops::cpu::eager
