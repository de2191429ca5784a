// Plain CUDA kernels of tensor fusion: see tensor_fusion_kernels.h.
//
// * features forward: one thread per element of Z (grid-stride), its index split into the
//   digits k_m (last modality fastest).
// * features backward: one block per row (grid-stride over rows), one thread per output
//   dx_m[n, i]: it walks the K / D_m columns of Z whose digit k_m is i + 1 (an odometer over
//   the other digits, the last modality fastest) and sums dZ[n, k] Π_{m'≠m} z_m'[n, k_m'] in a
//   fixed order, grouped as autograd through the reference groups it: the modalities after m
//   contracted one at a time from the last, dA(p) = Σ_{k_{m+1}} z_{m+1} (… Σ_{k_M} z_M dZ), then
//   dx_m = Σ_p L(p) dA(p) over the flat products L of the modalities before m. With an inf in
//   some z the grouping decides between ±inf and NaN (a · (b + c) against a·b + a·c), so this
//   one gives NaN and ±inf where the reference does. No division, so zeros are fine.
// * projected forward: y = Z Wᵀ + b as the tiled GEMM of device_common.cuh, whose A operand is a
//   loader that forms Z[n, k] from the modalities when the tile is staged in shared memory.
// * projected backward: dW = Gᵀ Z by the same GEMM (reduction over the rows, one thread per
//   output of dW: deterministic); db by the column sum; dx by chunks of rows: dZ = G W of the
//   chunk into the workspace (GEMM), then the features-backward kernel on it.
#include "tensor_fusion_kernels.h"

#include <algorithm>

#include "device_common.cuh"

namespace fusionops::cuda {
namespace {

using detail::Acc, detail::from_acc, detail::to_acc, detail::Z;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;
// The dZ chunk of the projected dx: about this many elements (one row at least).
constexpr int64_t kWorkspaceElems = int64_t{1} << 22;

template <typename T>
struct Outputs {
  T* dx[kMaxModalities];
};

template <typename T>
Outputs<T> make_outputs(const Modalities& xs, void* const* dx, int64_t first) {
  Outputs<T> out{};
  for (int m = 0; m < xs.M; ++m) out.dx[m] = static_cast<T*>(dx[m]) + first * xs.width[m];
  return out;
}

// ---- features ---------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) features_forward_kernel(Z<T> z, int64_t N, int64_t K, T* __restrict__ out) {
  const int64_t total = N * K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t n = e / K;
    out[e] = from_acc<T>(z.feature(n, e - n * K));
  }
}

// dx[m][n, i] for rows [0, N) of z, given dZ (N, K) of element type G (the input dtype, or the
// compute type for the projected backward's workspace) read with strides (gs0, gs1).
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    features_backward_kernel(const G* __restrict__ dz, int64_t gs0, int64_t gs1, Z<T> z, int64_t N, int64_t K,
                             Outputs<T> outs) {
  using acc_t = typename Acc<T>::type;
  // L[m] = Π_{m' > m} D[m']: the step of digit m in k.
  int64_t L[kMaxModalities];
  int64_t width_total = 0;
  {
    int64_t l = 1;
#pragma unroll
    for (int m = kMaxModalities - 1; m >= 0; --m) {
      if (m < z.M) {
        L[m] = l;
        l *= z.D[m];
        width_total += z.D[m] - 1;
      } else {
        L[m] = 0;
      }
    }
  }
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    bool present[kMaxModalities];
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m) present[m] = m < z.M && z.present(m, n);
    const G* g = dz + n * gs0;
    for (int64_t t = threadIdx.x; t < width_total; t += blockDim.x) {
      // output t of the row: modality m, column i
      int m = 0;
      int64_t i = t;
      while (i >= z.D[m] - 1) {
        i -= z.D[m] - 1;
        ++m;
      }
      T* dst = outs.dx[m] + n * (z.D[m] - 1) + i;
      if (!present[m]) {
        *dst = from_acc<T>(acc_t(0));
        continue;
      }
      int64_t digit[kMaxModalities];
      // acc[q], q > m: the contraction of dZ over the digits q … M-1 so far (see the top).
      acc_t acc[kMaxModalities];
#pragma unroll
      for (int q = 0; q < kMaxModalities; ++q) {
        digit[q] = 0;
        acc[q] = acc_t(0);
      }
      digit[m] = i + 1;
      int64_t k = (i + 1) * L[m];
      const int64_t count = K / z.D[m];
      const int last = z.M - 1;
      acc_t lead = acc_t(1);  // L(p): Π_{q<m} z_q[k_q] (all digits 0 at first)
      acc_t sum = acc_t(0);
      for (int64_t r = 0; r < count; ++r) {
        const acc_t v = to_acc(g[k * gs1]);
        if (m == last) {
          sum += lead * v;
        } else {
          acc[last] += z.z(last, n, digit[last]) * v;
        }
        // Next combination of the other digits, the last modality fastest. A digit q > m that
        // wraps completes acc[q]: folded into the level before it, or (q = m + 1) into sum.
        bool lead_moved = false;
        for (int q = last; q >= 0; --q) {
          if (q == m) continue;
          ++digit[q];
          k += L[q];
          if (q < m) lead_moved = true;
          if (digit[q] < z.D[q]) break;
          k -= z.D[q] * L[q];
          digit[q] = 0;
          if (q > m) {
            if (q == m + 1) {
              sum += lead * acc[q];
            } else {
              acc[q - 1] += z.z(q - 1, n, digit[q - 1]) * acc[q];
            }
            acc[q] = acc_t(0);
          }
        }
        if (lead_moved) {
          lead = acc_t(1);
          for (int q = 0; q < m; ++q) lead *= z.z(q, n, digit[q]);
        }
      }
      *dst = from_acc<T>(sum);
    }
  }
}

int row_blocks(int64_t N) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(N, kMaxBlocks))); }

template <typename T, typename G>
cudaError_t launch_features_backward(const G* dz, int64_t gs0, int64_t gs1, const Modalities& xs, int64_t first,
                                     int64_t rows, int64_t K, void* const* dx, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  features_backward_kernel<T, G><<<row_blocks(rows), kThreads, 0, stream>>>(
      dz, gs0, gs1, detail::make_z<T>(xs, first), rows, K, make_outputs<T>(xs, dx, first));
  return detail::launched();
}

// ---- GEMM operands ----------------------------------------------------------------------------

// A(n, k) = Z[n, k], generated from the modalities.
template <typename T>
struct ZLoad {
  Z<T> z;
  __device__ __forceinline__ typename Acc<T>::type operator()(int64_t n, int64_t k) const { return z.feature(n, k); }
};

// y[n, o] = acc + b[o], input dtype, contiguous (N, O).
template <typename T>
struct ProjectedStore {
  T* y;
  int64_t O;
  const T* bias;
  int64_t bs;
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, typename Acc<T>::type acc) const {
    if (bias != nullptr) acc += to_acc(bias[o * bs]);
    y[n * O + o] = from_acc<T>(acc);
  }
};

// out[i, j] = acc, contiguous (I, J), of type Out.
template <typename Out>
struct DenseStore {
  Out* out;
  int64_t J;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, typename Acc<Out>::type acc) const {
    out[i * J + j] = from_acc<Out>(acc);
  }
};

template <typename T>
cudaError_t projected_forward(const Modalities& xs, const void* weight, int64_t ws0, int64_t ws1, int64_t O,
                              const void* bias, int64_t bs, void* out, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t K = detail::feature_count(xs);
  // B(k, o) = W[o, k]: W read with its strides swapped
  const detail::Strided<T> w{static_cast<const T*>(weight), ws1, ws0};
  return detail::gemm<acc_t>(xs.N, O, K, ZLoad<T>{detail::make_z<T>(xs)}, w,
                             ProjectedStore<T>{static_cast<T*>(out), O, static_cast<const T*>(bias), bs}, stream);
}

int64_t chunk_rows(int64_t N, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(N, kWorkspaceElems / std::max<int64_t>(K, 1)));
}

template <typename T>
cudaError_t projected_backward(const void* grad, int64_t gs0, int64_t gs1, const Modalities& xs, const void* weight,
                               int64_t ws0, int64_t ws1, int64_t O, void* const* dx, void* dw, void* db,
                               void* workspace, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t N = xs.N, K = detail::feature_count(xs);
  const T* g = static_cast<const T*>(grad);
  cudaError_t err = cudaSuccess;
  if (db != nullptr) {
    err = detail::colsum<T, T>(g, N, O, gs0, gs1, static_cast<T*>(db), false, stream);
    if (err != cudaSuccess) return err;
  }
  if (dw != nullptr) {
    // dW[o, k] = Σ_n G[n, o] Z[n, k]: A(o, n) = G[n, o] (strides swapped), B(n, k) = Z[n, k]
    err = detail::gemm<acc_t>(O, K, N, detail::Strided<T>{g, gs1, gs0}, ZLoad<T>{detail::make_z<T>(xs)},
                              DenseStore<T>{static_cast<T*>(dw), K}, stream);
    if (err != cudaSuccess) return err;
  }
  if (dx != nullptr) {
    acc_t* dz = static_cast<acc_t*>(workspace);
    const int64_t rows = chunk_rows(N, K);
    const detail::Strided<T> w{static_cast<const T*>(weight), ws0, ws1};  // B(o, k) = W[o, k]
    for (int64_t first = 0; first < N; first += rows) {
      const int64_t nr = std::min(rows, N - first);
      // dZ (nr, K) = G[first : first + nr] W, then its reduction onto dx of those rows
      err = detail::gemm<acc_t>(nr, K, O, detail::Strided<T>{g + first * gs0, gs0, gs1}, w,
                                DenseStore<acc_t>{dz, K}, stream);
      if (err != cudaSuccess) return err;
      err = launch_features_backward<T, acc_t>(dz, K, 1, xs, first, nr, K, dx, stream);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t tf_features_forward(DType dtype, const Modalities& xs, void* out, cudaStream_t stream) {
  if (!detail::valid(xs)) return cudaErrorInvalidValue;
  const int64_t K = detail::feature_count(xs);
  if (xs.N == 0) return cudaSuccess;
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    features_forward_kernel<T><<<detail::elementwise_blocks(xs.N * K, kThreads), kThreads, 0, stream>>>(
        detail::make_z<T>(xs), xs.N, K, static_cast<T*>(out));
    return detail::launched();
  });
}

cudaError_t tf_features_backward(DType dtype, const void* grad, int64_t grad_row_stride, int64_t grad_col_stride,
                                 const Modalities& xs, void* const* dx, cudaStream_t stream) {
  if (!detail::valid(xs) || dx == nullptr) return cudaErrorInvalidValue;
  const int64_t K = detail::feature_count(xs);
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return launch_features_backward<T, T>(static_cast<const T*>(grad), grad_row_stride, grad_col_stride, xs, 0,
                                          xs.N, K, dx, stream);
  });
}

cudaError_t tf_projected_forward(DType dtype, const Modalities& xs, const void* weight, int64_t weight_row_stride,
                                 int64_t weight_col_stride, int64_t O, const void* bias, int64_t bias_stride,
                                 void* out, cudaStream_t stream) {
  if (!detail::valid(xs) || O < 0) return cudaErrorInvalidValue;
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return projected_forward<T>(xs, weight, weight_row_stride, weight_col_stride, O, bias, bias_stride, out,
                                stream);
  });
}

int64_t tf_projected_backward_workspace(const Modalities& xs) {
  if (!detail::valid(xs) || xs.N == 0) return 0;
  const int64_t K = detail::feature_count(xs);
  return chunk_rows(xs.N, K) * K;
}

cudaError_t tf_projected_backward(DType dtype, const void* grad, int64_t grad_row_stride, int64_t grad_col_stride,
                                  const Modalities& xs, const void* weight, int64_t weight_row_stride,
                                  int64_t weight_col_stride, int64_t O, void* const* dx, void* dw, void* db,
                                  void* workspace, int64_t workspace_elems, cudaStream_t stream) {
  if (!detail::valid(xs) || O < 0) return cudaErrorInvalidValue;
  if (dx != nullptr && xs.N > 0 && (workspace == nullptr || workspace_elems < tf_projected_backward_workspace(xs))) {
    return cudaErrorInvalidValue;
  }
  return detail::dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return projected_backward<T>(grad, grad_row_stride, grad_col_stride, xs, weight, weight_row_stride,
                                 weight_col_stride, O, dx, dw, db, workspace, stream);
  });
}

}  // namespace fusionops::cuda
