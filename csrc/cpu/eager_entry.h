// The compiled eager entries: the common eager call of an op, entered from Python with no Python
// between the call and the ATen or fusionops ops it runs (issue 15: at research sizes the Python
// one pass and backend choice cost 5% of a 280 µs tensor fusion and half of a 2 µs product).
// fusionops/ops/<op>.py calls fusionops._C._<op>_eager(...) first when no backend is forced in
// any thread and nothing is traced. An entry accepts only plain strided CPU tensors (torch.Tensor
// or nn.Parameter, not subclasses) of one float dtype, with no autocast, torch function mode or
// functorch transform active, and the op's common call shape; it makes the op's size-rule choice
// (OpDef.prefers_fused, handed over from Python at import), counts it, and runs the reference's
// own ATen ops or the op's kernels. Anything else returns None, and the Python path decides and
// explains as before.
#pragma once

#include <Python.h>
#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <limits>

namespace fusionops::cpu::eager {

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
Entry& entry(Op op);

// The tensor held by obj when it is a plain strided CPU tensor of a float dtype, else nullptr.
const at::Tensor* plain_cpu_float(PyObject* obj);
// No autocast on CPU, no torch function mode, no functorch transform: an entry may run.
bool modes_allow();
// The items of a list or tuple (borrowed), or false for anything else.
bool items(PyObject* seq, PyObject* const** first, Py_ssize_t* count);

// The entries (csrc/cpu/product_eager.cpp, csrc/cpu/tensor_fusion_eager.cpp).
PyObject* product_eager(PyObject* self, PyObject* xs);
PyObject* tensor_fusion_eager(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

// fusionops._C's module methods (csrc/cpu/eager_entry.cpp).
extern PyMethodDef methods[];

}  // namespace fusionops::cpu::eager
