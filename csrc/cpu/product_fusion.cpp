// CPU kernels of product fusion (DESIGN.md section 3; contract in fusionops/ops/_kernels.py).
//
// p = Π_m x_m elementwise over (N, d); dx_m = G Π_{k≠m} x_k by prefix and suffix products (no
// division, so zeros are fine). Both are one pass over the operands, cut into segments of at most
// kChunk elements of a row, computed in the compute dtype (rounded once at the end) in buffers
// that stay in L1. When every operand is contiguous, (N, d) is walked as one row of N·d elements,
// so a small d costs no per-row overhead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fusionops::cpu {
namespace {

// Elements of a segment: 4 KB in float32, so the few segments one step touches stay in L1.
constexpr int64_t kChunk = 1024;

// The (rows, cols) the kernels walk: the (N, d) rows, or one row of N·d elements.
struct Layout {
  int64_t rows, cols, chunks;  // chunks per row

  Layout(int64_t N, int64_t d, bool flat)
      : rows(flat ? (N * d > 0 ? 1 : 0) : N), cols(flat ? N * d : d), chunks((cols + kChunk - 1) / kChunk) {}
};

// Gathering along a row is fast when its elements are close together (stride 0, 1 or small) or
// every row is the same (row stride 0); an operand laid out column by column (a transpose) would
// miss the cache on every element, so it is copied to rows first, by ATen's blocked copy: a
// temporary of the operand's size.
at::Tensor rowwise(const at::Tensor& t) {
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  const bool by_column = t.size(0) > 1 && t.size(1) > 1 && s0 > 0 && s1 > std::max<int64_t>(s0, 1);
  return by_column ? t.contiguous() : t;
}

// An operand of (N, d) as the layout sees it.
template <typename T>
struct Operand {
  const T* data;
  int64_t s0, s1;

  Operand(const at::Tensor& t, bool flat)
      : data(t.const_data_ptr<T>()), s0(flat ? 0 : t.stride(0)), s1(flat ? 1 : t.stride(1)) {}

  // Its segment [j0, j0 + len) of row n as contiguous acc_t: in place when it already is one,
  // else converted / gathered into buf.
  template <typename acc_t>
  const acc_t* load(int64_t n, int64_t j0, int64_t len, acc_t* buf) const {
    const T* src = data + n * s0 + j0 * s1;
    if constexpr (std::is_same_v<T, acc_t>) {
      if (s1 == 1) return src;
    }
    load_n(src, s1, buf, len);
    return buf;
  }

  // The same segment, always into dst.
  template <typename acc_t>
  void load_into(int64_t n, int64_t j0, int64_t len, acc_t* dst) const {
    const acc_t* src = load(n, j0, len, dst);
    if (src != dst) std::copy(src, src + len, dst);
  }
};

// A contiguous output, whose segments are computed in place when it has the compute dtype, else
// in a buffer that store() rounds into it.
template <typename T, typename acc_t>
struct Output {
  T* data;
  int64_t cols;

  acc_t* segment(int64_t n, int64_t j0, acc_t* buf) const {
    if constexpr (std::is_same_v<T, acc_t>) {
      return data + n * cols + j0;
    } else {
      return buf;
    }
  }

  void store(int64_t n, int64_t j0, int64_t len, const acc_t* seg) const {
    if constexpr (!std::is_same_v<T, acc_t>) store_n(seg, data + n * cols + j0, len);
  }
};

// dst *= x
template <typename T>
FUSIONOPS_SIMD_CLONES void mul_(T* __restrict dst, const T* __restrict x, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) dst[j] *= x[j];
}

// dst = a * x
template <typename T>
FUSIONOPS_SIMD_CLONES void mul(T* __restrict dst, const T* __restrict a, const T* __restrict x, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) dst[j] = a[j] * x[j];
}

// Calls body(n, j0, len, scratch, ptrs) for every segment, in parallel, with per-thread scratch
// of `buffers` segments of acc_t and room for M pointers.
template <typename acc_t, typename Body>
void for_segments(const Layout& l, int M, int buffers, const Body& body) {
  const int64_t grain = grain_rows(M * std::min(l.cols, kChunk));
  at::parallel_for(0, l.rows * l.chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(buffers * kChunk);
    std::vector<acc_t*> ptrs(M);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / l.chunks, j0 = (i % l.chunks) * kChunk;
      body(n, j0, std::min(kChunk, l.cols - j0), scratch.data(), ptrs.data());
    }
  });
}

template <typename scalar_t>
void forward_kernel(const std::vector<at::Tensor>& xs, const Layout& l, bool flat, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int M = static_cast<int>(xs.size());
  std::vector<Operand<scalar_t>> x;
  for (const at::Tensor& t : xs) x.emplace_back(t, flat);
  const Output<scalar_t, acc_t> p{out.mutable_data_ptr<scalar_t>(), l.cols};
  // Scratch: two loaded inputs, and p when it is not computed in place.
  for_segments<acc_t>(l, M, 3, [&](int64_t n, int64_t j0, int64_t len, acc_t* scratch, acc_t**) {
    acc_t* in = scratch;
    acc_t* seg = p.segment(n, j0, scratch + 2 * kChunk);
    if (M == 1) {
      x[0].load_into(n, j0, len, seg);
    } else {
      mul(seg, x[0].load(n, j0, len, in), x[1].load(n, j0, len, in + kChunk), len);
      for (int m = 2; m < M; ++m) mul_(seg, x[m].load(n, j0, len, in), len);
    }
    p.store(n, j0, len, seg);
  });
}

// dx_m = g Π_{k<m} x_k (prefix sweep, each from the one before), then times Π_{k>m} x_k
// (suffix sweep with a running product). Every step writes its result straight from its
// operands (for M = 2: dx_1 = g x_0, dx_0 = g x_1), so no segment is copied only to be scaled.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad, const std::vector<at::Tensor>& xs, const Layout& l, bool flat,
                     std::vector<at::Tensor>& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int M = static_cast<int>(xs.size());
  std::vector<Operand<scalar_t>> x;
  std::vector<Output<scalar_t, acc_t>> out;
  for (int m = 0; m < M; ++m) {
    x.emplace_back(xs[m], flat);
    out.push_back({dx[m].mutable_data_ptr<scalar_t>(), l.cols});
  }
  const Operand<scalar_t> g(grad, flat);
  // Scratch: a loaded input, g, x_{M-1}, the running suffix product, and the dx_m that are
  // not computed in place.
  for_segments<acc_t>(l, M, M + 4, [&](int64_t n, int64_t j0, int64_t len, acc_t* scratch, acc_t** d) {
    acc_t* in = scratch;
    acc_t* s = scratch + 3 * kChunk;
    for (int m = 0; m < M; ++m) d[m] = out[m].segment(n, j0, scratch + (4 + m) * kChunk);
    const acc_t* gn = g.load(n, j0, len, scratch + kChunk);
    if (M == 1) {
      std::copy(gn, gn + len, d[0]);
    } else {
      mul(d[1], gn, x[0].load(n, j0, len, in), len);
      for (int m = 2; m < M; ++m) mul(d[m], d[m - 1], x[m - 1].load(n, j0, len, in), len);
      const acc_t* suffix = x[M - 1].load(n, j0, len, scratch + 2 * kChunk);  // Π_{k>m} x_k
      for (int m = M - 2; m >= 0; --m) {
        if (m == 0) {
          mul(d[0], gn, suffix, len);
        } else {
          mul_(d[m], suffix, len);
          const acc_t* xm = x[m].load(n, j0, len, in);
          suffix == s ? mul_(s, xm, len) : mul(s, suffix, xm, len);
          suffix = s;
        }
      }
    }
    for (int m = 0; m < M; ++m) out[m].store(n, j0, len, d[m]);
  });
}

// ---- the ops ------------------------------------------------------------------------------
// (each skips autograd for its inner ATen calls: see BelowAutograd in common.h)

// Checks xs (every x_m (N, d) with one d) and returns them as the kernels read them.
std::vector<at::Tensor> operands(const char* op, at::TensorList xs) {
  check_modalities(op, xs, std::nullopt);
  std::vector<at::Tensor> out;
  for (size_t m = 0; m < xs.size(); ++m) {
    TORCH_CHECK(xs[m].size(1) == xs[0].size(1), "fusionops::", op,
                ": every modality must have the width of xs[0], ", xs[0].size(1), ", but xs[", m,
                "] has shape ", xs[m].sizes());
    out.push_back(rowwise(xs[m]));
  }
  return out;
}

bool all_contiguous(const std::vector<at::Tensor>& ts) {
  return std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.is_contiguous(); });
}

at::Tensor product_fwd(at::TensorList inputs) {
  constexpr const char* kOp = "_product_fwd";
  const BelowAutograd below_autograd;
  const std::vector<at::Tensor> xs = operands(kOp, inputs);
  const int64_t N = xs[0].size(0), d = xs[0].size(1);
  at::Tensor out = at::empty({N, d}, xs[0].options());
  const bool flat = all_contiguous(xs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), kOp,
                                  [&] { forward_kernel<scalar_t>(xs, Layout(N, d, flat), flat, out); });
  return out;
}

std::vector<at::Tensor> product_bwd(const at::Tensor& grad, at::TensorList inputs) {
  constexpr const char* kOp = "_product_bwd";
  const BelowAutograd below_autograd;
  const std::vector<at::Tensor> xs = operands(kOp, inputs);
  const int64_t N = xs[0].size(0), d = xs[0].size(1);
  check_2d(kOp, "grad", grad, N, d, xs[0].scalar_type());
  const at::Tensor g = rowwise(grad);
  std::vector<at::Tensor> dx;
  for (size_t m = 0; m < xs.size(); ++m) dx.push_back(at::empty({N, d}, xs[0].options()));
  const bool flat = all_contiguous(xs) && g.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), kOp,
                                  [&] { backward_kernel<scalar_t>(g, xs, Layout(N, d, flat), flat, dx); });
  return dx;
}

}  // namespace
}  // namespace fusionops::cpu

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_product_fwd", &fusionops::cpu::product_fwd);
  m.impl("_product_bwd", &fusionops::cpu::product_bwd);
}
