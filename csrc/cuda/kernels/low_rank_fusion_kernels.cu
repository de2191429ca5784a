// Plain CUDA kernels of low-rank fusion: see low_rank_fusion_kernels.h.
//
// Per chunk of rows [first, first + nr), with F_m viewed as a (D_m, R·O) matrix (column
// c = r·O + o):
// * A_m (nr, R·O) = z_m F_m, one tiled GEMM per modality (device_common.cuh), whose A operand
//   forms z_m = [1, x_m] (masked rows [1, 0…0]) when staged in shared memory;
// * forward: one thread per (n, o): y = b + Σ_r w_r Π_m A_m;
// * backward: one thread per (n, r) walks o: the dw partial Σ_o g P (P = Π_m A_m), and, in
//   place over A_m, dA_m = w_r g Π_{k≠m} A_k by prefix products and a running suffix (no
//   division, so zeros are fine); then per modality dx_m = dA_m F_m[:, 1:]ᵀ (GEMM over R·O,
//   0 on missing rows) and dF_m += z_mᵀ dA_m (GEMM over the chunk's rows, added to the previous
//   chunks' sum); dw += the column sum of the partials. db is one column sum of G.
#include "low_rank_fusion_kernels.h"

#include <algorithm>

#include "device_common.cuh"

namespace fusionops::cuda {
namespace {

using detail::Acc, detail::from_acc, detail::to_acc, detail::Z;

constexpr int kThreads = 256;
// A chunk's buffers (M (nr, R·O) projections and the (nr, R) dw partials) take about this many
// elements of the compute type (one row at least).
constexpr int64_t kWorkspaceElems = int64_t{1} << 22;

bool valid(const Modalities& xs, const Factors& f) {
  if (!detail::valid(xs) || f.R < 1 || f.O < 1) return false;
  for (int m = 0; m < xs.M; ++m) {
    if (f.data[m] == nullptr) return false;
  }
  return true;
}

int64_t per_row(const Modalities& xs, const Factors& f) { return xs.M * f.R * f.O + f.R; }

int64_t chunk_rows(const Modalities& xs, const Factors& f) {
  return std::max<int64_t>(1, std::min<int64_t>(xs.N, kWorkspaceElems / per_row(xs, f)));
}

// ---- GEMM operands ----------------------------------------------------------------------------

// A(n, j) = z_m[n, j] (transposed: A(j, n)).
template <typename T, bool kTransposed>
struct ZLoad {
  Z<T> z;
  int m;
  __device__ __forceinline__ typename Acc<T>::type operator()(int64_t a, int64_t b) const {
    return kTransposed ? z.z(m, b, a) : z.z(m, a, b);
  }
};

// B(j, c) = F_m[r, j + shift, o] with c = r·O + o (transposed: B(c, j)).
template <typename T, bool kTransposed>
struct FactorLoad {
  const T* f;
  int64_t s0, s1, s2, O, shift;
  __device__ __forceinline__ typename Acc<T>::type operator()(int64_t a, int64_t b) const {
    const int64_t j = kTransposed ? b : a, c = kTransposed ? a : b;
    const int64_t r = c / O, o = c - r * O;
    return to_acc(f[r * s0 + (j + shift) * s1 + o * s2]);
  }
};

// Row-major contiguous (., ld) buffer of the compute type.
template <typename acc_t>
struct Buffer {
  const acc_t* p;
  int64_t ld;
  __device__ __forceinline__ acc_t operator()(int64_t i, int64_t j) const { return p[i * ld + j]; }
};

template <typename acc_t>
struct BufferStore {
  acc_t* p;
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, acc_t v) const { p[i * ld + j] = v; }
};

// dx_m[n, i] of the chunk (contiguous, d_m wide), 0 where modality m is missing.
template <typename T>
struct DxStore {
  T* dx;
  int64_t d;
  Z<T> z;
  int m;
  __device__ __forceinline__ void operator()(int64_t n, int64_t i, typename Acc<T>::type v) const {
    dx[n * d + i] = from_acc<T>(z.present(m, n) ? v : typename Acc<T>::type(0));
  }
};

// dF_m[r, j, o] += v for (j, c = r·O + o); dF_m contiguous (R, D, O) of the compute type.
template <typename acc_t>
struct FactorGradStore {
  acc_t* df;
  int64_t D, O;
  __device__ __forceinline__ void operator()(int64_t j, int64_t c, acc_t v) const {
    const int64_t r = c / O, o = c - r * O;
    df[(r * D + j) * O + o] += v;
  }
};

// ---- per-row combination ------------------------------------------------------------------

// y[n, o] = b[o] + Σ_r w_r Π_m A_m[n, r, o]; A_m at A + m * a_stride, (nr, R·O) contiguous.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_combine_kernel(const typename Acc<T>::type* __restrict__ A, int64_t a_stride, int M, int64_t nr,
                           int64_t R, int64_t O, const T* __restrict__ w, int64_t w_stride,
                           const T* __restrict__ bias, int64_t b_stride, T* __restrict__ y) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = nr * O, RO = R * O;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t n = e / O, o = e - n * O;
    acc_t acc = bias != nullptr ? to_acc(bias[o * b_stride]) : acc_t(0);
    for (int64_t r = 0; r < R; ++r) {
      const acc_t* a = A + n * RO + r * O + o;
      acc_t p = a[0];
#pragma unroll
      for (int m = 1; m < kMaxModalities; ++m) {
        if (m < M) p *= a[m * a_stride];
      }
      acc += to_acc(w[r * w_stride]) * p;
    }
    y[e] = from_acc<T>(acc);
  }
}

// Per (n, r): dw_part[n, r] = Σ_o g[n, o] P[n, r, o] and, when need_dA, A_m := dA_m =
// w_r g[n, o] Π_{k≠m} A_k (prefix products, then a running suffix from the last modality).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_combine_kernel(typename Acc<T>::type* __restrict__ A, int64_t a_stride, int M, int64_t nr, int64_t R,
                            int64_t O, const T* __restrict__ w, int64_t w_stride, const T* __restrict__ g,
                            int64_t gs0, int64_t gs1, bool need_dA, typename Acc<T>::type* __restrict__ dw_part) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = nr * R, RO = R * O;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t n = e / R, r = e - n * R;
    const acc_t wr = to_acc(w[r * w_stride]);
    acc_t dw = acc_t(0);
    for (int64_t o = 0; o < O; ++o) {
      acc_t* a = A + n * RO + r * O + o;
      acc_t val[kMaxModalities], prefix[kMaxModalities];
      acc_t p = acc_t(1);
#pragma unroll
      for (int m = 0; m < kMaxModalities; ++m) {
        if (m < M) {
          val[m] = a[m * a_stride];
          prefix[m] = p;  // Π_{k<m} A_k
          p *= val[m];
        }
      }
      const acc_t gv = to_acc(g[n * gs0 + o * gs1]);
      dw += gv * p;
      if (need_dA) {
        acc_t s = wr * gv;  // then times Π_{k>m} A_k
#pragma unroll
        for (int m = kMaxModalities - 1; m >= 0; --m) {
          if (m < M) {
            a[m * a_stride] = s * prefix[m];
            s *= val[m];
          }
        }
      }
    }
    dw_part[e] = dw;
  }
}

// ---- launchers ------------------------------------------------------------------------------

template <typename T>
FactorLoad<T, false> factor(const Factors& f, int m, int64_t shift) {
  return {static_cast<const T*>(f.data[m]), f.stride0[m], f.stride1[m], f.stride2[m], f.O, shift};
}

// A_m of rows [first, first + nr) into A + m * a_stride.
template <typename T>
cudaError_t projections(const Modalities& xs, const Factors& f, int64_t first, int64_t nr,
                        typename Acc<T>::type* A, int64_t a_stride, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const Z<T> z = detail::make_z<T>(xs, first);
  const int64_t RO = f.R * f.O;
  for (int m = 0; m < xs.M; ++m) {
    const cudaError_t err = detail::gemm<acc_t>(nr, RO, xs.width[m] + 1, ZLoad<T, false>{z, m}, factor<T>(f, m, 0),
                                                BufferStore<acc_t>{A + m * a_stride, RO}, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t forward(const Modalities& xs, const Factors& f, const void* rank_weight, int64_t w_stride,
                    const void* bias, int64_t b_stride, void* out, void* workspace, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t rows = chunk_rows(xs, f), RO = f.R * f.O;
  acc_t* A = static_cast<acc_t*>(workspace);
  for (int64_t first = 0; first < xs.N; first += rows) {
    const int64_t nr = std::min(rows, xs.N - first);
    cudaError_t err = projections<T>(xs, f, first, nr, A, rows * RO, stream);
    if (err != cudaSuccess) return err;
    forward_combine_kernel<T><<<detail::elementwise_blocks(nr * f.O, kThreads), kThreads, 0, stream>>>(
        A, rows * RO, xs.M, nr, f.R, f.O, static_cast<const T*>(rank_weight), w_stride,
        static_cast<const T*>(bias), b_stride, static_cast<T*>(out) + first * f.O);
    err = detail::launched();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t backward(const void* grad, int64_t gs0, int64_t gs1, const Modalities& xs, const Factors& f,
                     const void* rank_weight, int64_t w_stride, void* const* dx, void* const* dfactors, void* dw,
                     void* db, void* workspace, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const T* g = static_cast<const T*>(grad);
  cudaError_t err = cudaSuccess;
  if (db != nullptr) {
    err = detail::colsum<T, T>(g, xs.N, f.O, gs0, gs1, static_cast<T*>(db), false, stream);
    if (err != cudaSuccess) return err;
  }
  const bool need_dA = dx != nullptr || dfactors != nullptr;
  if (!need_dA && dw == nullptr) return cudaSuccess;
  const int64_t rows = chunk_rows(xs, f), RO = f.R * f.O;
  acc_t* A = static_cast<acc_t*>(workspace);
  acc_t* dw_part = A + xs.M * rows * RO;  // (rows, R)
  for (int64_t first = 0; first < xs.N; first += rows) {
    const int64_t nr = std::min(rows, xs.N - first);
    err = projections<T>(xs, f, first, nr, A, rows * RO, stream);  // recomputed: the forward kept nothing
    if (err != cudaSuccess) return err;
    backward_combine_kernel<T><<<detail::elementwise_blocks(nr * f.R, kThreads), kThreads, 0, stream>>>(
        A, rows * RO, xs.M, nr, f.R, f.O, static_cast<const T*>(rank_weight), w_stride, g + first * gs0, gs0, gs1,
        need_dA, dw_part);
    err = detail::launched();
    if (err != cudaSuccess) return err;
    if (dw != nullptr) {
      err = detail::colsum<acc_t, acc_t>(dw_part, nr, f.R, f.R, 1, static_cast<acc_t*>(dw), true, stream);
      if (err != cudaSuccess) return err;
    }
    const Z<T> z = detail::make_z<T>(xs, first);
    for (int m = 0; m < xs.M; ++m) {
      const acc_t* dA = A + m * rows * RO;  // now dL/dA_m, (nr, R·O)
      const int64_t d = xs.width[m];
      if (dx != nullptr) {
        // dx_m[n, i] = Σ_c dA_m[n, c] F_m[r, i + 1, o]
        const FactorLoad<T, false> fm = factor<T>(f, m, 1);
        const FactorLoad<T, true> fmt{fm.f, fm.s0, fm.s1, fm.s2, fm.O, fm.shift};
        err = detail::gemm<acc_t>(nr, d, RO, Buffer<acc_t>{dA, RO}, fmt,
                                  DxStore<T>{static_cast<T*>(dx[m]) + first * d, d, z, m}, stream);
        if (err != cudaSuccess) return err;
      }
      if (dfactors != nullptr) {
        // dF_m[r, j, o] += Σ_n z_m[n, j] dA_m[n, c]
        err = detail::gemm<acc_t>(d + 1, RO, nr, ZLoad<T, true>{z, m}, Buffer<acc_t>{dA, RO},
                                  FactorGradStore<acc_t>{static_cast<acc_t*>(dfactors[m]), d + 1, f.O}, stream);
        if (err != cudaSuccess) return err;
      }
    }
  }
  return cudaSuccess;
}

}  // namespace

int64_t lmf_workspace(const Modalities& xs, const Factors& factors) {
  if (!valid(xs, factors) || xs.N == 0) return 0;
  return chunk_rows(xs, factors) * per_row(xs, factors);
}

cudaError_t lmf_forward(DType dtype, const Modalities& xs, const Factors& factors, const void* rank_weight,
                        int64_t rank_weight_stride, const void* bias, int64_t bias_stride, void* out,
                        void* workspace, int64_t workspace_elems, cudaStream_t stream) {
  if (!valid(xs, factors)) return cudaErrorInvalidValue;
  if (xs.N == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_elems < lmf_workspace(xs, factors)) return cudaErrorInvalidValue;
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return forward<T>(xs, factors, rank_weight, rank_weight_stride, bias, bias_stride, out, workspace, stream);
  });
}

cudaError_t lmf_backward(DType dtype, const void* grad, int64_t grad_row_stride, int64_t grad_col_stride,
                         const Modalities& xs, const Factors& factors, const void* rank_weight,
                         int64_t rank_weight_stride, void* const* dx, void* const* dfactors, void* drank_weight,
                         void* dbias, void* workspace, int64_t workspace_elems, cudaStream_t stream) {
  if (!valid(xs, factors)) return cudaErrorInvalidValue;
  const bool chunks = xs.N > 0 && (dx != nullptr || dfactors != nullptr || drank_weight != nullptr);
  if (chunks && (workspace == nullptr || workspace_elems < lmf_workspace(xs, factors))) return cudaErrorInvalidValue;
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return backward<T>(grad, grad_row_stride, grad_col_stride, xs, factors, rank_weight, rank_weight_stride, dx,
                       dfactors, drank_weight, dbias, workspace, stream);
  });
}

}  // namespace fusionops::cuda
