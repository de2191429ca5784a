// C entry points over the plain CUDA kernel launchers, for tests/test_cuda_kernels_emulated.py
// (ctypes): flat arrays in, the launchers' structs built here.
#include "low_rank_fusion_kernels.h"
#include "product_fusion_kernels.h"
#include "tensor_fusion_kernels.h"
using namespace fusionops::cuda;
#define MOD int M, int64_t N, void** data, int64_t* s0, int64_t* s1, int64_t* w, const bool* mask, int64_t k0, int64_t k1
#define MODV M, N, data, s0, s1, w, mask, k0, k1
#define FAC void** fd, int64_t* f0, int64_t* f1, int64_t* f2, int64_t R, int64_t O
static Modalities mk(MOD) {
  Modalities p; p.M = M; p.N = N;
  for (int m = 0; m < M; ++m) { p.data[m] = data[m]; p.row_stride[m] = s0[m]; p.col_stride[m] = s1[m]; p.width[m] = w[m]; }
  p.mask = mask; p.mask_row_stride = k0; p.mask_col_stride = k1; return p;
}
static Factors mf(int M, FAC) {
  Factors f; f.R = R; f.O = O;
  for (int m = 0; m < M; ++m) { f.data[m] = fd[m]; f.stride0[m] = f0[m]; f.stride1[m] = f1[m]; f.stride2[m] = f2[m]; }
  return f;
}
extern "C" {
long launches() { return emu::launches; }
int pf_f(int dt, int M, void** xs, int64_t* s0, int64_t* s1, int64_t N, int64_t d, void* out) {
  return product_forward(DType(dt), M, xs, s0, s1, N, d, out, nullptr);
}
int pf_b(int dt, int M, const void* g, int64_t g0, int64_t g1, void** xs, int64_t* s0, int64_t* s1, int64_t N, int64_t d, void** dx) {
  return product_backward(DType(dt), M, g, g0, g1, xs, s0, s1, N, d, dx, nullptr);
}
int tf_ff(int dt, MOD, void* out) { return tf_features_forward(DType(dt), mk(MODV), out, nullptr); }
int tf_fb(int dt, const void* g, int64_t g0, int64_t g1, MOD, void** dx) {
  return tf_features_backward(DType(dt), g, g0, g1, mk(MODV), dx, nullptr);
}
int tf_pf(int dt, MOD, const void* W, int64_t w0, int64_t w1, int64_t O, const void* b, int64_t bs, void* out) {
  return tf_projected_forward(DType(dt), mk(MODV), W, w0, w1, O, b, bs, out, nullptr);
}
int64_t tf_pb_ws(MOD) { return tf_projected_backward_workspace(mk(MODV)); }
int tf_pb(int dt, const void* g, int64_t g0, int64_t g1, MOD, const void* W, int64_t w0, int64_t w1, int64_t O,
          void** dx, void* dw, void* db, void* ws, int64_t wse) {
  return tf_projected_backward(DType(dt), g, g0, g1, mk(MODV), W, w0, w1, O, dx, dw, db, ws, wse, nullptr);
}
int64_t lmf_ws(MOD, FAC) { return lmf_workspace(mk(MODV), mf(M, fd, f0, f1, f2, R, O)); }
int lmf_f(int dt, MOD, FAC, const void* rw, int64_t rws, const void* b, int64_t bs, void* out, void* ws, int64_t wse) {
  return lmf_forward(DType(dt), mk(MODV), mf(M, fd, f0, f1, f2, R, O), rw, rws, b, bs, out, ws, wse, nullptr);
}
int lmf_b(int dt, const void* g, int64_t g0, int64_t g1, MOD, FAC, const void* rw, int64_t rws, void** dx, void** dF,
          void* dw, void* db, void* ws, int64_t wse) {
  return lmf_backward(DType(dt), g, g0, g1, mk(MODV), mf(M, fd, f0, f1, f2, R, O), rw, rws, dx, dF, dw, db, ws, wse,
                      nullptr);
}
}
