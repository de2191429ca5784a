// The schema of every compiled kernel (DESIGN.md, Architecture): declared once here, with one
// implementation per dispatch key: CPU in csrc/cpu/*.cpp, CUDA in csrc/cuda/*.cpp (CUDA builds
// only). The dispatcher picks the implementation from the tensors' device (the
// pytorch/extension-cpp pattern). The public ops of the package (torch.ops.fusionops.tensor_fusion_*,
// low_rank_fusion, ...) are declared in Python (fusionops/ops/) and call these kernels.
#include <Python.h>
#include <torch/library.h>

#include "cpu/eager_entry.h"

extern "C" {
// `import fusionops._C` loads this shared library, which runs the registrations below (pattern of
// pytorch/extension-cpp). The Python module holds only the compiled eager entries, whose point is
// to cost less than Python (csrc/cpu/eager_entry.h).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusionops::cpu::eager::methods,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusionops, m) {
  // Whether this build carries CUDA kernels (read by fusionops._extension).
  m.def("_built_with_cuda() -> bool", []() -> bool {
#ifdef FUSIONOPS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // Tensor fusion (DESIGN.md section 1); contract in fusionops/ops/_kernels.py.
  m.def("_tf_features_fwd(Tensor[] xs, Tensor? mask) -> Tensor");
  m.def("_tf_features_bwd(Tensor grad, Tensor[] xs, Tensor? mask) -> Tensor[]");
  // dropout, seed: inverted dropout on Z (the mask of fusionops/reference/tensor_fusion.py).
  m.def(
      "_tf_projected_fwd(Tensor[] xs, Tensor weight, Tensor? bias, Tensor? mask, float dropout=0., "
      "int seed=0) -> Tensor");
  m.def(
      "_tf_projected_bwd(Tensor grad, Tensor[] xs, Tensor weight, Tensor? mask, bool need_dx, "
      "bool need_dw, bool need_db, float dropout=0., int seed=0) -> (Tensor[], Tensor?, Tensor?)");
  // The eager projection with its autograd in C++ (csrc/cpu/eager_autograd.cpp), for calls outside
  // tracing; and the differentiable gradients of its double backward, implemented in Python
  // (fusionops/ops/tensor_fusion.py): one per nonzero `needs` flag (xs..., weight).
  m.def(
      "_tf_projected_eager(Tensor[] xs, Tensor weight, Tensor? bias, Tensor? mask, float dropout=0., "
      "int seed=0) -> Tensor");
  m.def(
      "_tf_projected_reference_grads(Tensor grad, Tensor[] xs, Tensor weight, Tensor? mask, int[] needs, "
      "float dropout, int seed) -> Tensor[]");
  // Test knob of the CPU kernels: their small-problem limit (N·K·O), returning the previous one.
  m.def("_tf_small_work(int limit) -> int");
  // Low-rank fusion (DESIGN.md section 2); contract in fusionops/ops/_kernels.py.
  m.def(
      "_lmf_fwd(Tensor[] xs, Tensor[] factors, Tensor rank_weight, Tensor? bias, Tensor? mask) "
      "-> Tensor");
  m.def(
      "_lmf_bwd(Tensor grad, Tensor[] xs, Tensor[] factors, Tensor rank_weight, Tensor? mask, "
      "bool need_dx, bool need_dfactors, bool need_dw, bool need_db) "
      "-> (Tensor[], Tensor[], Tensor?, Tensor?)");
  // Product fusion (DESIGN.md section 3); contract in fusionops/ops/_kernels.py.
  m.def("_product_fwd(Tensor[] xs) -> Tensor");
  m.def("_product_bwd(Tensor grad, Tensor[] xs) -> Tensor[]");
  // The eager call of the kernels with its autograd in C++ (csrc/cpu/eager_autograd.cpp).
  m.def("_product_eager(Tensor[] xs) -> Tensor");
  // Sparse skew-pair attention (DESIGN.md section 4); contract in fusionops/ops/_kernels.py.
  m.def(
      "_skew_pair_fwd(Tensor ha, Tensor hb, Tensor pairs, Tensor wq, Tensor wk, Tensor wv, Tensor wo, "
      "Tensor? bq, Tensor? bk, Tensor? bv, Tensor? bo, int heads, int window) -> Tensor");
  m.def(
      "_skew_pair_bwd(Tensor grad, Tensor ha, Tensor hb, Tensor pairs, Tensor wq, Tensor wk, Tensor wv, "
      "Tensor wo, Tensor? bq, Tensor? bk, Tensor? bv, int heads, int window, bool[] needs) -> Tensor[]");
  // Multiple kernel fusion (DESIGN.md section 5); contract in fusionops/ops/_kernels.py.
  // Test knob of the CPU kernels: their forward's small-problem limit (N_a·N_b·Σd), returning the
  // previous one.
  m.def("_mkl_small_work(int limit) -> int");
  m.def("_mkl_fwd(Tensor[] xs_a, Tensor[] xs_b, Tensor beta, int[] kinds, Tensor params, int[] degrees) -> Tensor");
  m.def(
      "_mkl_bwd(Tensor grad, Tensor[] xs_a, Tensor[] xs_b, Tensor beta, int[] kinds, Tensor params, "
      "int[] degrees, bool[] needs) -> (Tensor[], Tensor[], Tensor, Tensor)");
  // Bilinear pooling family: MFB/MLB, MFH (chain), MUTAN, BLOCK (DESIGN.md section 6); contract in
  // fusionops/ops/_bilinear.py (BilinearKernels).
  m.def(
      "_bilinear_fwd(Tensor x, Tensor t, Tensor wx, Tensor? bx, Tensor wt, Tensor? bt, Tensor wo, Tensor? bo, "
      "int rank, bool rank_major, int activation, int normalize, bool chain=False, float drop_in=0., "
      "float drop_prod=0., float drop_out=0., int seed=0) -> Tensor");
  m.def(
      "_bilinear_bwd(Tensor grad, Tensor x, Tensor t, Tensor wx, Tensor? bx, Tensor wt, Tensor? bt, Tensor wo, "
      "int rank, bool rank_major, int activation, int normalize, bool[] needs, bool chain=False, "
      "float drop_in=0., float drop_prod=0., float drop_out=0., int seed=0) -> Tensor[]");
}
