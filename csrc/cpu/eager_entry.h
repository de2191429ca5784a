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

namespace fusionops::cpu::eager {

// fusionops._C's module methods: the entries and their rule, counter and test hooks
// (csrc/cpu/eager_entry.cpp).
extern PyMethodDef methods[];

}  // namespace fusionops::cpu::eager
