// CPU kernels of tensor fusion (DESIGN.md section 1; contract in fusionops/ops/_kernels.py).
//
// Z[n, k] = prod_m z_m[n, k_m] with z_m = [1, x_m], k row-major, modality 0 slowest.
// The projected kernels never hold Z or any (N, K) tensor. They split the modalities into a
// head [0, s) and a tail [s, M), so that Z[n, h*Kt + t] = P[n, h] * T[n, t] with P and T the
// outer products of the head and of the tail, and work on one block of rows at a time: BLAS
// multiplies T (scaling the small side by a column of P) or cache-sized column tiles of Z
// rebuilt from P and T with the matching columns of W, and the tiles of dZ = G W are reduced
// onto P and T, whose gradients give dx.
//
// Dropout on Z (the projected kernels' `dropout`, `seed`): the tiles of Z and of dZ are masked
// as they are formed, with the counter-based mask of fusionops/reference/tensor_fusion.py
// (dropout_keep), regenerated in backward: no mask or Z is ever stored.
//
// Non-finite inputs: the head/tail split groups the products differently from autograd
// through the reference (with an inf, a·(b + c) is ±inf where a·b + a·c is NaN), so a call whose
// features or upstream gradient hold an inf or NaN takes the whole-row path (Z = T, the
// grouping of the reference) instead; finding out costs one pass over the N·Σd features.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "dropout.h"

namespace fusionops::cpu {
namespace {

// Tuning (measured on the N = 512, dims (40, 40, 40), O = 64 case; see the report).
// The tail spans at most kTailCols columns (unless the last modality alone is wider). A block
// of the forward and dW holds at most kBlockRows rows, one of dx at most kDxBlockRows (so
// that T, dT and a tile of dZ stay in L2 together), and fewer when its P and T would exceed
// kBlockElems elements. A tile holds about kTileElems elements (512 KB in float32). Groups
// of at least kMinDirectCols columns are multiplied straight from T (see Plan::direct).
constexpr int64_t kTailCols = 4096;
constexpr int64_t kBlockRows = 256;
constexpr int64_t kDxBlockRows = 64;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kBlockElems = int64_t{1} << 20;
constexpr int64_t kTileElems = int64_t{1} << 17;
constexpr int64_t kMinDirectCols = 256;
// The direct path's product of every group for a block and some outputs (see stacked()) holds
// at most this many elements (1 MB in float32), unless one output alone needs more.
constexpr int64_t kStackElems = int64_t{1} << 18;
// When the tail is all of Z (K <= kTailCols), a block is sized by kWholeElems elements of Z
// instead (1 MB in float32, whatever N is): few, large GEMMs when K is small.
constexpr int64_t kWholeElems = int64_t{1} << 18;

// Whether every element of a contiguous buffer is finite: x·0 is 0 for a finite x, NaN for
// an inf or a NaN, and a NaN in the sum stays.
template <typename T>
FUSIONOPS_SIMD_CLONES bool all_finite(const T* x, int64_t len) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) acc += x[i] * T(0);
  return acc == acc;
}

// Whether the features (masked rows already [1, 0…0]) and `extra` (grad, or undefined) are all
// finite.
template <typename T>
bool features_finite(const Features& f, const at::Tensor& extra) {
  for (const at::Tensor& z : f.z)
    if (!all_finite(z.const_data_ptr<T>(), z.numel())) return false;
  return !extra.defined() || all_finite(extra.const_data_ptr<T>(), extra.numel());
}

// ---- one row of an outer product, forward and backward ---------------------------------

// dst = s * src; dst may be src.
template <typename T>
FUSIONOPS_SIMD_CLONES void scale(T* dst, const T* src, T s, int64_t len) {
#pragma omp simd
  for (int64_t r = 0; r < len; ++r) dst[r] = s * src[r];
}

// <a, b> over len elements (a row of W and of Z; of P and U), vectorized.
template <typename T>
FUSIONOPS_SIMD_CLONES T dot(const T* __restrict a, const T* __restrict b, int64_t len) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) acc += a[i] * b[i];
  return acc;
}

// Returns <a, b> and adds s * a to c, in one pass over a. The running sum is split over
// kLanes partial sums (several vector registers) so that the adds do not wait on each other.
template <typename T>
FUSIONOPS_SIMD_CLONES T dot_axpy(const T* __restrict a, const T* __restrict b, T s, T* __restrict c, int64_t len) {
  constexpr int kLanes = 64;
  if (len < kLanes) {  // short rows (small d_m): skip the partial sums' set-up and reduction
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < len; ++i) {
      acc += a[i] * b[i];
      c[i] += s * a[i];
    }
    return acc;
  }
  T part[kLanes] = {};
  int64_t r = 0;
  for (; r + kLanes <= len; r += kLanes) {
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) {
      part[i] += a[r + i] * b[r + i];
      c[r + i] += s * a[r + i];
    }
  }
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < kLanes; ++i) acc += part[i];
#pragma omp simd reduction(+ : acc)
  for (int64_t i = r; i < len; ++i) {
    acc += a[i] * b[i];
    c[i] += s * a[i];
  }
  return acc;
}

// out[0 : prod D) = z[0] ⊗ … ⊗ z[k-1] for one row (z[0] slowest); out[0] = 1 when k == 0.
// Built in place from the back: the product of the faster modalities already sits where
// its last copy belongs, so the slots before it are written and then it is scaled.
template <typename T>
void outer_row(const T* const* z, const int64_t* D, int k, T* out) {
  if (k == 0) {
    out[0] = T(1);
    return;
  }
  int64_t total = 1;
  for (int j = 0; j < k; ++j) total *= D[j];
  int64_t len = D[k - 1];
  T* cur = out + total - len;
  std::copy(z[k - 1], z[k - 1] + len, cur);
  for (int j = k - 2; j >= 0; --j) {
    T* base = cur - (D[j] - 1) * len;
    for (int64_t i = 0; i + 1 < D[j]; ++i) scale(base + i * len, cur, z[j][i], len);
    scale(cur, cur, z[j][D[j] - 1], len);
    cur = base;
    len *= D[j];
  }
}

// Scratch elements outer_backward_row needs for modalities with widths D[0 : k).
int64_t outer_backward_scratch(const int64_t* D, int k) {
  int64_t head = 1, widest = 0;
  for (int j = 0; j + 1 < k; ++j) head *= D[j];
  for (int j = 0; j < k; ++j) widest = std::max(widest, D[j]);
  return 3 * head + widest;
}

// One step of outer_backward_row: F = L ⊗ z of `rows` rows L[p] and width D (z fastest):
// dL[p] = <dF_p, z> and acc = Σ_p L[p] dF_p.
template <typename T>
FUSIONOPS_SIMD_CLONES void peel_row(const T* __restrict dF, const T* __restrict L, const T* __restrict z,
                                    int64_t rows, int64_t D, T* __restrict dL, T* __restrict acc) {
  std::fill(acc, acc + D, T(0));
  for (int64_t p = 0; p < rows; ++p) {
    const T* dFp = dF + p * D;
    const T l = L[p];
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < D; ++i) {
      dot += dFp[i] * z[i];
      acc[i] += l * dFp[i];
    }
    dL[p] = dot;
  }
}

// dx[j] = dF/dx_j (x_j = z[j][1:]) for one row of F = z[0] ⊗ … ⊗ z[k-1], given dL/dF.
// Peels off the fastest modality, F = L ⊗ z[k-1] with L the outer product of the others:
// dx_{k-1}[i-1] = Σ_p L[p] dF[p, i], dL[p] = <dF_p, z[k-1]>, then goes on with L. That is the
// order of autograd through the reference (which builds Z from modality 1 on), and it matters
// with non-finite inputs: where some z holds an inf, Σ_p L[p] (Σ_i dF z) is ±inf where
// Σ_{p,i} L[p] dF z is NaN (inf - inf), so another order gives NaN where the reference gives
// ±inf or the reverse. No division, so zeros in z are fine.
template <typename T>
void outer_backward_row(const T* dF, const T* const* z, const int64_t* D, int k, T* const* dx, T* scratch) {
  int64_t len = 1;  // prod D[0 : j) for j = k - 1
  for (int j = 0; j + 1 < k; ++j) len *= D[j];
  T* L = scratch;
  T* dL_buffers[2] = {scratch + len, scratch + 2 * len};
  T* acc = scratch + 3 * len;
  for (int j = k - 1; j > 0; --j) {
    outer_row(z, D, j, L);
    T* dL = dL_buffers[j % 2];  // the other buffer holds dF unless j == k - 1
    peel_row(dF, L, z[j], len, D[j], dL, acc);
    std::copy(acc + 1, acc + D[j], dx[j]);
    dF = dL;
    len /= D[j - 1];
  }
  std::copy(dF + 1, dF + D[0], dx[0]);
}

// ---- features: Z (N, K) --------------------------------------------------------------

template <typename scalar_t>
void features_forward_kernel(const Features& f, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int M = static_cast<int>(f.D.size());
  const auto zp = base_pointers<acc_t>(f.z);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, f.N, grain_rows(f.K), [&](int64_t begin, int64_t end) {
    std::vector<const acc_t*> zr(M);
    std::vector<acc_t> row(kSameType ? 0 : f.K);  // low precision: build in acc_t, then cast
    for (int64_t n = begin; n < end; ++n) {
      rows_at(zp, n, [&](size_t m) { return f.D[m]; }, zr);
      scalar_t* dst = o + n * f.K;
      if constexpr (kSameType) {
        outer_row(zr.data(), f.D.data(), M, dst);
      } else {
        outer_row(zr.data(), f.D.data(), M, row.data());
        std::copy(row.begin(), row.end(), dst);
      }
    }
  });
}

// One row of grad as contiguous acc_t: the row itself when it already is one, else gathered
// into `row`. grad may have any strides (a y.sum() gives stride 0), and copying it whole
// would make an (N, K) temporary.
template <typename scalar_t, typename acc_t>
const acc_t* grad_row(const scalar_t* gn, int64_t stride, int64_t K, acc_t* row) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return gn;
  }
  for (int64_t k = 0; k < K; ++k) row[k] = static_cast<acc_t>(gn[k * stride]);
  return row;
}

template <typename scalar_t>
void features_backward_kernel(const at::Tensor& grad, const Features& f, std::vector<at::Tensor>& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int M = static_cast<int>(f.D.size());
  const auto zp = base_pointers<acc_t>(f.z);
  const auto dxp = mutable_pointers<acc_t>(dx);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t s0 = grad.stride(0), s1 = grad.stride(1);
  const int64_t scratch = outer_backward_scratch(f.D.data(), M);
  at::parallel_for(0, f.N, grain_rows(f.K), [&](int64_t begin, int64_t end) {
    std::vector<const acc_t*> zr(M);
    std::vector<acc_t*> dxr(M);
    std::vector<acc_t> buf(scratch + f.K);
    acc_t* row = buf.data() + scratch;
    for (int64_t n = begin; n < end; ++n) {
      rows_at(zp, n, [&](size_t m) { return f.D[m]; }, zr);
      rows_at(dxp, n, [&](size_t m) { return f.D[m] - 1; }, dxr);
      const acc_t* dF = grad_row(g + n * s0, s1, f.K, row);
      outer_backward_row(dF, zr.data(), f.D.data(), M, dxr.data(), buf.data());
    }
  });
}

// ---- projected: y = Z Wᵀ + b without Z --------------------------------------------------

// Columns of Z for head groups [h0, h1) and tail columns [t0, t1). A tile spans either whole
// groups or part of one group, so its columns are contiguous in Z.
struct Tile {
  int64_t h0, h1, t0, t1;
};

struct Plan {
  int M = 0;
  int split = 0;  // head = modalities [0, split), tail = [split, M)
  int64_t H = 1, Kt = 1;
  int64_t rows = 1;  // rows per block
  // Whether the forward and dW use T itself as the GEMM operand of each group h,
  // Z_h = diag(P[:, h]) T, scaling the (rows, O) side by P[:, h] instead of building Z_h.
  bool direct = false;
  // Column tiles of Z: of dZ = G W for dx, and of Z itself for the forward and dW unless direct.
  std::vector<Tile> tiles;
  int64_t tile_elems = 0;  // scratch for the largest tile of a full block

  int64_t width(const Tile& t) const { return t.t1 - t.t0; }
  int64_t cols(const Tile& t) const { return (t.h1 - t.h0) * width(t); }
  int64_t k0(const Tile& t) const { return t.h0 * Kt + t.t0; }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// whole: the tail is all of Z (split 0) whatever K is, the grouping of the reference (see the
// top of the file). direct_ok: false when the tiles of Z must be formed (dropout masks them).
Plan make_plan(const std::vector<int64_t>& D, int64_t N, int64_t O, int64_t max_rows, bool whole, bool direct_ok) {
  Plan p;
  p.M = static_cast<int>(D.size());
  p.split = p.M - 1;
  p.Kt = D.back();
  const int64_t tail_cols = whole ? std::numeric_limits<int64_t>::max() : kTailCols;
  while (p.split > 0 && p.Kt * D[p.split - 1] <= tail_cols) p.Kt *= D[--p.split];
  for (int j = 0; j < p.split; ++j) p.H *= D[j];
  p.rows = p.split == 0 ? std::max(kWholeElems / p.Kt, kMinBlockRows)
                        : std::clamp(kBlockElems / (p.H + p.Kt), kMinBlockRows, max_rows);
  p.rows = std::max<int64_t>(1, std::min(p.rows, N));
  p.direct = direct_ok && p.Kt >= kMinDirectCols && p.Kt > O;
  const int64_t tile_cols = std::max<int64_t>(1, kTileElems / p.rows);
  if (p.Kt <= tile_cols) {
    const int64_t groups = tile_cols / p.Kt;
    for (int64_t h = 0; h < p.H; h += groups) p.tiles.push_back({h, std::min(h + groups, p.H), 0, p.Kt});
  } else {
    // Chunk-major, so that a chunk of T and dT stays in cache while every group uses it.
    const int64_t width = ceil_div(p.Kt, ceil_div(p.Kt, tile_cols));
    for (int64_t t = 0; t < p.Kt; t += width)
      for (int64_t h = 0; h < p.H; ++h) p.tiles.push_back({h, h + 1, t, std::min(t + width, p.Kt)});
  }
  for (const Tile& t : p.tiles) p.tile_elems = std::max(p.tile_elems, p.rows * p.cols(t));
  return p;
}

// The first rows * cols elements of a flat scratch tensor, as a (rows, cols) matrix.
at::Tensor as_matrix(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Per-block buffers of the projected kernels; none grows with N.
template <typename T>
struct Block {
  const Features& f;
  const Plan& p;
  std::vector<const T*> zp;
  at::Tensor P, Tt;          // the block's (nr, H) and (nr, Kt), contiguous
  at::Tensor P_buf, T_buf;   // their storage when they are products, not a single z_m
  at::Tensor tile;           // flat scratch of build(), allocated on first use
  at::Tensor dropped;        // whole() under dropout: the block's Z, masked
  int64_t r0 = 0, nr = 0;    // rows [r0, r0 + nr) of the current block
  const Dropout<T>* drop;    // null when p = 0: Z as it is

  Block(const Features& f_, const Plan& p_, const at::TensorOptions& opts, const Dropout<T>* drop_ = nullptr)
      : f(f_), p(p_), zp(base_pointers<T>(f_.z)), drop(drop_ && drop_->on ? drop_ : nullptr) {
    if (p.split > 1) P_buf = at::empty({p.rows, p.H}, opts);
    if (p.M - p.split != 1) T_buf = at::empty({p.rows, p.Kt}, opts);
  }

  // P = outer product of the head (ones when it is empty), T = of the tail, for rows
  // [first, first + count). A single modality is used in place (z_m is contiguous).
  void load(int64_t first, int64_t count) {
    r0 = first;
    nr = count;
    // An empty head (split == 0) has no P: Z = T, and the whole-row paths never read P.
    if (p.split > 1) {
      P = P_buf.narrow(0, 0, nr);
    } else if (p.split == 1) {
      P = f.z[0].narrow(0, r0, nr);
    }
    Tt = T_buf.defined() ? T_buf.narrow(0, 0, nr) : f.z[p.split].narrow(0, r0, nr);
    if (!P_buf.defined() && !T_buf.defined()) return;
    T* P_ = P_buf.defined() ? P.mutable_data_ptr<T>() : nullptr;
    T* T_ = T_buf.defined() ? Tt.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, nr, grain_rows(p.H + p.Kt), [&](int64_t begin, int64_t end) {
      std::vector<const T*> zr(p.M);
      for (int64_t n = begin; n < end; ++n) {
        rows_at(zp, r0 + n, [&](size_t m) { return f.D[m]; }, zr);
        if (P_) outer_row(zr.data(), f.D.data(), p.split, P_ + n * p.H);
        if (T_) outer_row(zr.data() + p.split, f.D.data() + p.split, p.M - p.split, T_ + n * p.Kt);
      }
    });
  }

  at::Tensor P_col(int64_t h) const { return P.narrow(1, h, 1); }

  // Z of the block's rows when the tail is all of it (split 0): T, masked under dropout (into
  // a copy: T may be z_m itself, which backward reads again).
  at::Tensor whole() {
    if (drop == nullptr) return Tt;
    if (!dropped.defined()) dropped = at::empty({p.rows, p.Kt}, Tt.options());
    at::Tensor out = dropped.narrow(0, 0, nr);
    out.copy_(Tt);
    mask(out, 0);
    return out;
  }

  // Dropout on a contiguous (nr, cols) tile holding columns [k0, k0 + cols) of Z (or of dZ)
  // for the block's rows; nothing without dropout.
  void mask(const at::Tensor& tile_, int64_t k0) const {
    if (drop) drop->apply(tile_.mutable_data_ptr<T>(), nr, tile_.size(1), tile_.size(1), r0, k0);
  }

  // The tile's columns of Z for the block's rows: Z[n, h*Kt + t] = P[n, h] * T[n, t].
  at::Tensor build(const Tile& t) {
    const int64_t w = p.width(t), cols = p.cols(t);
    if (!tile.defined()) tile = at::empty({p.tile_elems}, Tt.options());
    const T* P_ = P.const_data_ptr<T>();
    const T* T_ = Tt.const_data_ptr<T>();
    T* out = tile.mutable_data_ptr<T>();
    const uint32_t k0 = static_cast<uint32_t>(p.k0(t));
    at::parallel_for(0, nr, grain_rows(cols), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* src = T_ + n * p.Kt + t.t0;
        T* row = out + n * cols;
        for (int64_t h = t.h0; h < t.h1; ++h) scale(row + (h - t.h0) * w, src, P_[n * p.H + h], w);
        if (drop) mask_row(row, cols, drop->row_key(r0 + n), k0, drop->threshold, drop->scale);
      }
    });
    return as_matrix(tile, nr, cols);
  }
};

// Whether the direct path multiplies every group at once: W (or dW) row-major, so that it is
// the (O·H, Kt) matrix W_s[o·H + h, t] = W[o, h·Kt + t]. One GEMM of O·H columns instead of H
// GEMMs of O columns: at research sizes (a few dozen rows, O of 64) the per-group GEMMs are too
// thin for BLAS. Outputs [o0, o1) are the contiguous rows [o0·H, o1·H) of W_s, so the product is
// formed for stack_outputs() outputs at a time, (rows, that·H) within kStackElems.
bool stacked(const Plan& p, const at::Tensor& w) { return p.direct && w.is_contiguous(); }
int64_t stack_outputs(const Plan& p) { return std::max<int64_t>(1, kStackElems / (p.rows * p.H)); }

// y[n, o0 + j] = Σ_h P[n, h] U[n, j·H + h] for the block's rows and oc outputs from o0
// (U = T W_sᵀ of those outputs, (nr, oc·H) contiguous; y of the block: (nr, O) contiguous).
template <typename T>
void contract_groups(const Block<T>& b, const at::Tensor& U, int64_t o0, int64_t oc, at::Tensor& yb) {
  const int64_t H = b.p.H, O = yb.size(1), ps = b.P.stride(0);
  const T* P_ = b.P.template const_data_ptr<T>();
  const T* U_ = U.const_data_ptr<T>();
  T* y_ = yb.mutable_data_ptr<T>();
  // Eight outputs at a time, each its own accumulator: a dot of H (often a few dozen) per output
  // would be mostly loop overhead and horizontal sums (measured 5x slower at H = 17).
  constexpr int64_t kOuts = 8;
  at::parallel_for(0, b.nr, grain_rows(oc * H), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* Pn = P_ + n * ps;
      const T* Un = U_ + n * oc * H;
      T* yn = y_ + n * O + o0;
      int64_t j = 0;
      for (; j + kOuts <= oc; j += kOuts) {
        T acc[kOuts] = {};
        for (int64_t h = 0; h < H; ++h) {
          const T ph = Pn[h];
          for (int64_t i = 0; i < kOuts; ++i) acc[i] += ph * Un[(j + i) * H + h];
        }
        for (int64_t i = 0; i < kOuts; ++i) yn[j + i] = acc[i];
      }
      for (; j < oc; ++j) yn[j] = dot(Pn, Un + j * H, H);
    }
  });
}

// S[n, j·H + h] = G[n, o0 + j] P[n, h] for the block's rows and oc outputs from o0, so that
// rows [o0·H, (o0 + oc)·H) of dW_s get Sᵀ T.
template <typename T>
void spread_groups(const Block<T>& b, const at::Tensor& gb, int64_t o0, int64_t oc, at::Tensor& S) {
  const int64_t H = b.p.H, O = gb.size(1), ps = b.P.stride(0);
  const T* P_ = b.P.template const_data_ptr<T>();
  const T* g_ = gb.const_data_ptr<T>();  // rows of the contiguous (N, O) gradient
  T* S_ = S.mutable_data_ptr<T>();
  at::parallel_for(0, b.nr, grain_rows(oc * H), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* Pn = P_ + n * ps;
      const T* gn = g_ + n * O + o0;
      T* Sn = S_ + n * oc * H;
      for (int64_t j = 0; j < oc; ++j)
        for (int64_t h = 0; h < H; ++h) Sn[j * H + h] = gn[j] * Pn[h];
    }
  });
}

template <typename T>
void projected_forward_kernel(const Features& f, const at::Tensor& w, const Plan& p, const Dropout<T>& drop,
                              at::Tensor& y) {
  Block<T> block(f, p, w.options(), &drop);
  const int64_t O = w.size(0);
  const bool stack = stacked(p, w);
  const int64_t so = std::min(O, stack_outputs(p));
  // T W_hᵀ of one group, or of every group for so outputs when stacked (direct)
  at::Tensor u = at::empty({p.rows * (stack ? so * p.H : O)}, w.options());
  const at::Tensor ws = stack ? w.view({O * p.H, p.Kt}) : at::Tensor();
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    at::Tensor yb = y.narrow(0, r0, block.nr);
    if (p.split == 0) {
      at::mm_out(yb, block.whole(), w.t());  // Z = T: one GEMM per block
    } else if (stack) {
      for (int64_t o0 = 0; o0 < O; o0 += so) {
        const int64_t oc = std::min(so, O - o0);
        at::Tensor ub = as_matrix(u, block.nr, oc * p.H);
        at::mm_out(ub, block.Tt, ws.narrow(0, o0 * p.H, oc * p.H).t());
        contract_groups(block, ub, o0, oc, yb);
      }
    } else if (p.direct) {
      at::Tensor ub = as_matrix(u, block.nr, O);
      for (int64_t h = 0; h < p.H; ++h) {
        at::mm_out(ub, block.Tt, w.narrow(1, h * p.Kt, p.Kt).t());
        yb.addcmul_(block.P_col(h), ub);
      }
    } else {
      for (const Tile& t : p.tiles) yb.addmm_(block.build(t), w.narrow(1, p.k0(t), p.cols(t)).t());
    }
  }
}

// dP[n, h] += Σ_t dZ[n, h, t] T[n, t] and dT[n, t] += Σ_h dZ[n, h, t] P[n, h] over one tile.
template <typename T>
void reduce_tile(const Block<T>& b, const Tile& t, const at::Tensor& dZ, at::Tensor& dP, at::Tensor& dT) {
  const Plan& p = b.p;
  const int64_t w = p.width(t), cols = p.cols(t);
  const T* dZ_ = dZ.const_data_ptr<T>();
  const T* P_ = b.P.template const_data_ptr<T>();
  const T* T_ = b.Tt.template const_data_ptr<T>();
  T* dP_ = dP.mutable_data_ptr<T>();
  T* dT_ = dT.mutable_data_ptr<T>();
  at::parallel_for(0, b.nr, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* Tn = T_ + n * p.Kt + t.t0;
      T* dTn = dT_ + n * p.Kt + t.t0;
      for (int64_t h = t.h0; h < t.h1; ++h) {
        const int64_t nh = n * p.H + h;
        dP_[nh] += dot_axpy(dZ_ + n * cols + (h - t.h0) * w, Tn, P_[nh], dTn, w);
      }
    }
  });
}

// dx of every modality for the block's rows, from dP (head) and dT (tail).
template <typename T>
void block_dx(const Block<T>& b, const at::Tensor& dP, const at::Tensor& dT, const std::vector<T*>& dxp) {
  const Plan& p = b.p;
  const Features& f = b.f;
  const int64_t scratch = std::max(outer_backward_scratch(f.D.data(), p.split),
                                   outer_backward_scratch(f.D.data() + p.split, p.M - p.split));
  const T* dP_ = p.split > 0 ? dP.const_data_ptr<T>() : nullptr;
  const T* dT_ = dT.const_data_ptr<T>();
  at::parallel_for(0, b.nr, grain_rows(p.H + p.Kt), [&](int64_t begin, int64_t end) {
    std::vector<const T*> zr(p.M);
    std::vector<T*> dxr(p.M);
    std::vector<T> buf(scratch);
    for (int64_t n = begin; n < end; ++n) {
      rows_at(b.zp, b.r0 + n, [&](size_t m) { return f.D[m]; }, zr);
      rows_at(dxp, b.r0 + n, [&](size_t m) { return f.D[m] - 1; }, dxr);
      if (p.split > 0) outer_backward_row(dP_ + n * p.H, zr.data(), f.D.data(), p.split, dxr.data(), buf.data());
      outer_backward_row(dT_ + n * p.Kt, zr.data() + p.split, f.D.data() + p.split, p.M - p.split,
                         dxr.data() + p.split, buf.data());
    }
  });
}

// dW += Gᵀ Z for the block's rows.
template <typename T>
void block_dw(Block<T>& block, const at::Tensor& gb, const at::Tensor& scaled_g, at::Tensor& dw) {
  const Plan& p = block.p;
  if (!p.direct) {
    for (const Tile& t : p.tiles) dw.narrow(1, p.k0(t), p.cols(t)).addmm_(gb.t(), block.build(t));
    return;
  }
  const int64_t O = dw.size(0);
  if (stacked(p, dw)) {
    const int64_t so = std::min(O, stack_outputs(p));
    at::Tensor dws = dw.view({O * p.H, p.Kt});
    for (int64_t o0 = 0; o0 < O; o0 += so) {
      const int64_t oc = std::min(so, O - o0);
      at::Tensor S = as_matrix(scaled_g, block.nr, oc * p.H);
      spread_groups(block, gb, o0, oc, S);
      dws.narrow(0, o0 * p.H, oc * p.H).addmm_(S.t(), block.Tt);
    }
    return;
  }
  at::Tensor gs = as_matrix(scaled_g, block.nr, O);
  for (int64_t h = 0; h < p.H; ++h) {
    at::mul_out(gs, gb, block.P_col(h));  // Gᵀ diag(P[:, h]) T = (P[:, h] ⊙ G)ᵀ T
    dw.narrow(1, h * p.Kt, p.Kt).addmm_(gs.t(), block.Tt);
  }
}

// dW = Gᵀ Z, block by block.
template <typename T>
void projected_dw_kernel(const Features& f, const at::Tensor& g, const Plan& p, const Dropout<T>& drop,
                         at::Tensor& dw) {
  Block<T> block(f, p, dw.options(), &drop);
  // (P[:, h] ⊙ G) of one group, or S of every group for some outputs when stacked
  const int64_t O = dw.size(0);
  const at::Tensor scaled_g =
      at::empty({p.rows * (stacked(p, dw) ? std::min(O, stack_outputs(p)) * p.H : O)}, dw.options());
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    block_dw(block, g.narrow(0, r0, block.nr), scaled_g, dw);
  }
}

// dx from dZ = G W, tile by tile, reduced onto the head and tail features.
template <typename T>
void projected_dx_kernel(const Features& f, const at::Tensor& g, const at::Tensor& w, const Plan& p,
                         const Dropout<T>& drop, std::vector<at::Tensor>& dx) {
  Block<T> block(f, p, w.options(), &drop);
  at::Tensor dZ = at::empty({p.tile_elems}, w.options());
  at::Tensor dP = at::empty({p.rows, p.H}, w.options());
  at::Tensor dT = at::empty({p.rows, p.Kt}, w.options());
  const auto dxp = mutable_pointers<T>(dx);
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    const at::Tensor gb = g.narrow(0, r0, block.nr);
    dP.zero_();
    dT.zero_();
    for (const Tile& t : p.tiles) {
      at::Tensor dZt = as_matrix(dZ, block.nr, p.cols(t));
      at::mm_out(dZt, gb, w.narrow(1, p.k0(t), p.cols(t)));
      block.mask(dZt, p.k0(t));  // the gradient of a dropped feature is 0, of a kept one scaled
      reduce_tile(block, t, dZt, dP, dT);
    }
    block_dx(block, dP, dT, dxp);
  }
}

// Backward when Z = T (empty head): dW += Gᵀ T and dT = dZ = G W, block by block, T built once
// (both masked under dropout).
template <typename T>
void projected_whole_bwd_kernel(const Features& f, const at::Tensor& g, const at::Tensor& w, const Plan& p,
                                const Dropout<T>& drop, bool need_dw, bool need_dx, at::Tensor& dw,
                                std::vector<at::Tensor>& dx) {
  Block<T> block(f, p, g.options(), &drop);  // (w is undefined when !need_dx)
  const at::Tensor dZ = need_dx ? at::empty({p.rows, p.Kt}, g.options()) : at::Tensor();
  const auto dxp = need_dx ? mutable_pointers<T>(dx) : std::vector<T*>{};
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    const at::Tensor gb = g.narrow(0, r0, block.nr);
    if (need_dw) dw.addmm_(gb.t(), block.whole());
    if (need_dx) {
      at::Tensor dZb = dZ.narrow(0, 0, block.nr);
      at::mm_out(dZb, gb, w);
      block.mask(dZb, 0);
      block_dx(block, at::Tensor(), dZb, dxp);
    }
  }
}

// W of more than one row with stride 0 along O: every row is the same w_0 (an expanded view).
bool is_expanded_rows(const at::Tensor& weight) { return weight.size(0) > 1 && weight.stride(0) == 0; }

// W as BLAS takes it (row- or column-major with a valid leading dimension), in the compute
// dtype; other layouts (stride 0, say) are copied once, a copy of the parameter's size.
at::Tensor blas_weight(const at::Tensor& weight, at::ScalarType acc) {
  at::Tensor w = weight.to(acc);
  const bool row_major = w.stride(1) == 1 && w.stride(0) >= std::max<int64_t>(1, w.size(1));
  const bool col_major = w.stride(0) == 1 && w.stride(1) >= std::max<int64_t>(1, w.size(0));
  return row_major || col_major ? w : w.contiguous();
}

// ---- small problems: plain loops, no ATen call beyond the outputs ----------------------------
// At research-batch sizes and below (N·K·O of a few thousand) the blocked kernels' ATen calls
// (scratch allocations, narrow views, GEMM dispatch, conversions) cost several times their
// arithmetic. Up to kSmallWork multiply-adds and kSmallRows rows a call reads its inputs through
// their strides, builds each row of Z (whole, the reference's grouping, so non-finite inputs need
// no test) in a row buffer and writes the outputs directly: one allocation per output, no zero
// fill of what is fully written. Never parallel: at this size a thread hand-off costs more than
// the work.
constexpr int64_t kSmallWork = int64_t{1} << 15;
// The limit in force: kSmallWork, unless the tests move it (_tf_small_work): 0 runs the blocked
// kernels on small inputs too, a limit above kSmallWork also lifts the row cap (every test call
// takes the loops).
std::atomic<int64_t> small_work{kSmallWork};

// Sets the limit (limit < 0: leaves it) and returns the previous one.
int64_t set_small_work(int64_t limit) { return limit < 0 ? small_work.load() : small_work.exchange(limit); }

// K = prod (d_m + 1), from the inputs' shapes.
int64_t feature_count(at::TensorList xs) {
  int64_t K = 1;
  for (const at::Tensor& x : xs) K *= x.size(1) + 1;
  return K;
}

// Measured on this machine (1 thread, raw kernels, small vs blocked): the loops win or tie up to
// N·K·O = 32768 with N <= 64; with more rows the per-row work (loading the z rows, O dot products
// of a short K) loses to the blocked path's one GEMM, forward (N = 128, K = 16, O = 16: 1.5x slower).
constexpr int64_t kSmallRows = 64;

bool is_small(at::TensorList xs, int64_t O) {
  const int64_t limit = small_work.load();
  const int64_t N = xs[0].size(0);
  return (N <= kSmallRows || limit > kSmallWork) && N * feature_count(xs) * O <= limit;
}

// One call's inputs as raw pointers and strides, rows read on demand in the compute dtype.
template <typename scalar_t>
struct SmallInputs {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<const scalar_t*> x;
  std::vector<int64_t> s0, s1, D, off;  // strides, widths d_m + 1, offsets in the row buffer
  const bool* keep = nullptr;
  int64_t k0 = 0, k1 = 0, K = 1, sumD = 0;

  SmallInputs(at::TensorList xs, const std::optional<at::Tensor>& mask) {
    for (const at::Tensor& t : xs) {
      x.push_back(t.const_data_ptr<scalar_t>());
      s0.push_back(t.stride(0));
      s1.push_back(t.stride(1));
      D.push_back(t.size(1) + 1);
      off.push_back(sumD);
      sumD += t.size(1) + 1;
      K *= t.size(1) + 1;
    }
    if (mask) {
      keep = mask->const_data_ptr<bool>();
      k0 = mask->stride(0);
      k1 = mask->stride(1);
    }
  }

  bool kept(int64_t n, size_t m) const { return keep == nullptr || keep[n * k0 + static_cast<int64_t>(m) * k1]; }

  // z_m = [1, x_m] (or [1, 0…0] where masked: a select, so a masked NaN stays out) of row n
  // into buf[off[m] : off[m] + D[m]), and zr[m] pointing there.
  void load_row(int64_t n, acc_t* buf, const acc_t** zr) const {
    for (size_t m = 0; m < x.size(); ++m) {
      acc_t* z = buf + off[m];
      z[0] = acc_t(1);
      if (kept(n, m)) {
        load_n(x[m] + n * s0[m], s1[m], z + 1, D[m] - 1);
      } else {
        std::fill(z + 1, z + D[m], acc_t(0));
      }
      zr[m] = z;
    }
  }
};

// c += s * a over len elements, vectorized.
template <typename T>
FUSIONOPS_SIMD_CLONES void axpy(T s, const T* __restrict a, T* __restrict c, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) c[i] += s * a[i];
}

// W's rows as the kernels read them: straight when W is contiguous along K in the compute dtype
// (nn.Linear's weight in float32 or float64), else element by element through the strides.
template <typename scalar_t>
constexpr bool kDirectRows = std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

template <typename scalar_t>
void small_forward_kernel(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& mask, double dropout, int64_t seed, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const SmallInputs<scalar_t> in(xs, mask);
  const int M = static_cast<int>(xs.size());
  const int64_t N = xs[0].size(0), O = weight.size(0), K = in.K;
  const scalar_t* W = weight.const_data_ptr<scalar_t>();
  const int64_t w0 = weight.stride(0), w1 = weight.stride(1);
  const scalar_t* B = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  const int64_t b0 = bias ? bias->stride(0) : 0;
  const Dropout<acc_t> drop(dropout, seed);
  scalar_t* Y = y.mutable_data_ptr<scalar_t>();
  c10::SmallVector<acc_t, 512> buf(in.sumD + K + O, acc_t(0));
  c10::SmallVector<const acc_t*, 8> zr(M);
  acc_t* Z = buf.data() + in.sumD;
  acc_t* yrow = Z + K;
  for (int64_t n = 0; n < N; ++n) {
    in.load_row(n, buf.data(), zr.data());
    outer_row(zr.data(), in.D.data(), M, Z);
    if (drop.on) mask_row(Z, K, drop.row_key(n), 0, drop.threshold, drop.scale);
    for (int64_t o = 0; o < O; ++o) {
      const scalar_t* Wo = W + o * w0;
      acc_t acc = 0;
      if constexpr (kDirectRows<scalar_t>) {
        if (w1 == 1) acc = dot(Wo, Z, K);
      }
      if (!kDirectRows<scalar_t> || w1 != 1)
        for (int64_t k = 0; k < K; ++k) acc += static_cast<acc_t>(Wo[k * w1]) * Z[k];
      yrow[o] = B ? acc + static_cast<acc_t>(B[o * b0]) : acc;  // (Z Wᵀ) + b, as the GEMM path adds
    }
    store_n(yrow, Y + n * O, O);
  }
}

template <typename scalar_t>
void small_backward_kernel(const at::Tensor& grad, at::TensorList xs, const at::Tensor& weight,
                           const std::optional<at::Tensor>& mask, double dropout, int64_t seed,
                           std::vector<at::Tensor>& dx, at::Tensor& dw, at::Tensor& db) {
  using acc_t = at::opmath_type<scalar_t>;
  const SmallInputs<scalar_t> in(xs, mask);
  const int M = static_cast<int>(xs.size());
  const int64_t N = xs[0].size(0), O = weight.size(0), K = in.K;
  const scalar_t* W = weight.const_data_ptr<scalar_t>();
  const int64_t w0 = weight.stride(0), w1 = weight.stride(1);
  const scalar_t* G = grad.const_data_ptr<scalar_t>();
  const int64_t g0 = grad.stride(0), g1 = grad.stride(1);
  const bool need_dx = !dx.empty(), need_dw = dw.defined(), need_db = db.defined();
  const Dropout<acc_t> drop(dropout, seed);
  const int64_t scratch = need_dx ? outer_backward_scratch(in.D.data(), M) : 0;
  // Row buffers: z rows, Z, dZ, g, dx rows and outer_backward_row's scratch; then the sums of
  // dW and db over the rows (in the compute dtype, rounded once at the end).
  c10::SmallVector<acc_t, 1024> buf(in.sumD + 2 * K + O + in.sumD + scratch + (need_dw ? O * K : 0) + O, acc_t(0));
  c10::SmallVector<const acc_t*, 8> zr(M);
  c10::SmallVector<acc_t*, 8> dxr(M);
  acc_t* Z = buf.data() + in.sumD;
  acc_t* dZ = Z + K;
  acc_t* g = dZ + K;
  acc_t* dxbuf = g + O;
  acc_t* work = dxbuf + in.sumD;
  acc_t* dW = work + scratch;  // zero (SmallVector's value-initialisation)
  acc_t* dB = dW + (need_dw ? O * K : 0);
  for (int m = 0; m < M; ++m) dxr[m] = dxbuf + in.off[m];
  std::vector<scalar_t*> dxp;
  for (at::Tensor& t : dx) dxp.push_back(t.mutable_data_ptr<scalar_t>());
  for (int64_t n = 0; n < N; ++n) {
    load_n(G + n * g0, g1, g, O);
    if (need_db)
      for (int64_t o = 0; o < O; ++o) dB[o] += g[o];
    if (!need_dx && !need_dw) continue;
    in.load_row(n, buf.data(), zr.data());
    const uint32_t key = drop.on ? drop.row_key(n) : 0;
    if (need_dw) {
      outer_row(zr.data(), in.D.data(), M, Z);
      if (drop.on) mask_row(Z, K, key, 0, drop.threshold, drop.scale);
      for (int64_t o = 0; o < O; ++o) {
        axpy(g[o], Z, dW + o * K, K);
      }
    }
    if (need_dx) {
      std::fill(dZ, dZ + K, acc_t(0));
      for (int64_t o = 0; o < O; ++o) {  // dZ = g W, row by row of W
        const acc_t go = g[o];
        const scalar_t* Wo = W + o * w0;
        if constexpr (kDirectRows<scalar_t>) {
          if (w1 == 1) {
            axpy(go, Wo, dZ, K);
            continue;
          }
        }
        for (int64_t k = 0; k < K; ++k) dZ[k] += go * static_cast<acc_t>(Wo[k * w1]);
      }
      if (drop.on) mask_row(dZ, K, key, 0, drop.threshold, drop.scale);
      outer_backward_row(dZ, zr.data(), in.D.data(), M, dxr.data(), work);
      for (int m = 0; m < M; ++m) {
        const int64_t d = in.D[m] - 1;
        if (!in.kept(n, m)) std::fill(dxr[m], dxr[m] + d, acc_t(0));  // a missing modality: zero
        store_n(dxr[m], dxp[m] + n * d, d);
      }
    }
  }
  if (need_dw) store_n(dW, dw.mutable_data_ptr<scalar_t>(), O * K);
  if (need_db) store_n(dB, db.mutable_data_ptr<scalar_t>(), O);
}

at::Tensor small_projected_fwd(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mask, double dropout, int64_t seed) {
  at::Tensor y = at::empty({xs[0].size(0), weight.size(0)}, xs[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "_tf_projected_fwd", [&] {
    small_forward_kernel<scalar_t>(xs, weight, bias, mask, dropout, seed, y);
  });
  return y;
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> small_projected_bwd(
    const at::Tensor& grad, at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& mask,
    bool need_dx, bool need_dw, bool need_db, double dropout, int64_t seed) {
  const auto opts = xs[0].options();
  const int64_t N = xs[0].size(0), O = weight.size(0);
  std::vector<at::Tensor> dx;
  if (need_dx)
    for (const at::Tensor& x : xs) dx.push_back(at::empty({N, x.size(1)}, opts));
  at::Tensor dw = need_dw ? at::empty({O, weight.size(1)}, opts) : at::Tensor();
  at::Tensor db = need_db ? at::empty({O}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "_tf_projected_bwd", [&] {
    small_backward_kernel<scalar_t>(grad, xs, weight, mask, dropout, seed, dx, dw, db);
  });
  std::optional<at::Tensor> dw_out, db_out;
  if (need_dw) dw_out = std::move(dw);
  if (need_db) db_out = std::move(db);
  return {std::move(dx), dw_out, db_out};
}

// ---- the ops ------------------------------------------------------------------------------
// (each skips autograd for its inner ATen calls: see BelowAutograd in common.h)

at::Tensor tf_features_fwd(at::TensorList xs, const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_tf_features_fwd";
  const BelowAutograd below_autograd;
  check_modalities(kOp, xs, mask);
  const auto dtype = xs[0].scalar_type();
  const Features f = make_features(xs, mask, at::toOpMathType(dtype));
  at::Tensor out = at::empty({f.N, f.K}, xs[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "_tf_features_fwd",
                                  [&] { features_forward_kernel<scalar_t>(f, out); });
  return out;
}

std::vector<at::Tensor> tf_features_bwd(const at::Tensor& grad, at::TensorList xs,
                                        const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_tf_features_bwd";
  const BelowAutograd below_autograd;
  check_modalities(kOp, xs, mask);
  const auto dtype = xs[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  const Features f = make_features(xs, mask, acc);
  check_2d(kOp, "grad", grad, f.N, f.K, dtype);
  std::vector<at::Tensor> dx = empty_dx(f, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "_tf_features_bwd",
                                  [&] { features_backward_kernel<scalar_t>(grad, f, dx); });
  return finish_dx(std::move(dx), mask, dtype);
}

// The plan of the forward and dW: the head/tail split for speed, unless the inputs hold an inf
// or a NaN (the reference's grouping then, see the top of the file); no direct path under dropout.
template <typename T>
Plan main_plan(const Features& f, int64_t O, const at::Tensor& grad, bool dropout) {
  const Plan fast = make_plan(f.D, f.N, O, kBlockRows, false, !dropout);
  if (fast.split == 0 || features_finite<T>(f, grad)) return fast;
  return make_plan(f.D, f.N, O, kBlockRows, true, !dropout);
}

at::Tensor tf_projected_fwd(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& mask, double dropout, int64_t seed) {
  constexpr const char* kOp = "_tf_projected_fwd";
  const BelowAutograd below_autograd;
  check_modalities(kOp, xs, mask);
  check_dropout(kOp, dropout, seed);
  const auto dtype = xs[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  check_2d(kOp, "weight", weight, -1, feature_count(xs), dtype);
  const int64_t O = weight.size(0);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == O,
                "fusionops::_tf_projected_fwd: bias must be a ", dtype, " tensor of shape (", O,
                "), got ", bias->scalar_type(), " of shape ", bias->sizes());
  }
  if (is_small(xs, O)) return small_projected_fwd(xs, weight, bias, mask, dropout, seed);
  const Features f = make_features(xs, mask, acc);
  // A weight expanded along O (every row w_0, stride 0) is used as its one row: y = (Z w_0) 1ᵀ,
  // instead of a copy of O rows for BLAS.
  const bool expanded = is_expanded_rows(weight);
  const at::Tensor w = blas_weight(expanded ? weight.narrow(0, 0, 1) : weight, acc);
  at::Tensor y = at::zeros({f.N, w.size(0)}, w.options());
  if (f.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "_tf_projected_fwd", [&] {
      const Dropout<scalar_t> drop(dropout, seed);
      const Plan p = main_plan<scalar_t>(f, w.size(0), at::Tensor(), drop.on);
      projected_forward_kernel<scalar_t>(f, w, p, drop, y);
    });
  }
  if (expanded) y = y.expand({f.N, O}).contiguous();
  if (bias) y.add_(bias->to(acc));
  return y.to(dtype);
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> tf_projected_bwd(
    const at::Tensor& grad, at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& mask,
    bool need_dx, bool need_dw, bool need_db, double dropout, int64_t seed) {
  constexpr const char* kOp = "_tf_projected_bwd";
  const BelowAutograd below_autograd;
  check_modalities(kOp, xs, mask);
  check_dropout(kOp, dropout, seed);
  const auto dtype = xs[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  check_2d(kOp, "weight", weight, -1, feature_count(xs), dtype);
  check_2d(kOp, "grad", grad, xs[0].size(0), weight.size(0), dtype);
  if (is_small(xs, weight.size(0)))
    return small_projected_bwd(grad, xs, weight, mask, need_dx, need_dw, need_db, dropout, seed);
  const Features f = make_features(xs, mask, acc);
  if (need_dx && is_expanded_rows(weight)) {
    // Every row of W is w_0: dZ = G W = (G 1) w_0, so dx needs one row of W and the row sums of
    // G, not a copy of W. dW (the gradient of the (O, K) view) still has O rows.
    auto dx = std::get<0>(tf_projected_bwd(grad.to(acc).sum(1, /*keepdim=*/true).to(dtype), xs,
                                           weight.narrow(0, 0, 1), mask, true, false, false, dropout, seed));
    auto rest = tf_projected_bwd(grad, xs, weight, mask, false, need_dw, need_db, dropout, seed);
    return {std::move(dx), std::get<1>(rest), std::get<2>(rest)};
  }
  const int64_t O = weight.size(0);
  const at::Tensor w = need_dx ? blas_weight(weight, acc) : at::Tensor();  // read by dx only
  const at::Tensor g = grad.to(acc).contiguous();  // (N, O): small, and stride 0 is common here
  std::vector<at::Tensor> dx = need_dx ? empty_dx(f, acc) : std::vector<at::Tensor>{};
  at::Tensor dw = need_dw ? at::zeros({O, f.K}, g.options()) : at::Tensor();
  if (f.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "_tf_projected_bwd", [&] {
      const Dropout<scalar_t> drop(dropout, seed);
      const Plan p = main_plan<scalar_t>(f, O, g, drop.on);
      if (p.split == 0) {
        if (need_dw || need_dx) projected_whole_bwd_kernel<scalar_t>(f, g, w, p, drop, need_dw, need_dx, dw, dx);
        return;
      }
      if (need_dw) projected_dw_kernel<scalar_t>(f, g, p, drop, dw);
      if (need_dx) projected_dx_kernel<scalar_t>(f, g, w, make_plan(f.D, f.N, O, kDxBlockRows, false, true), drop, dx);
    });
  }
  std::optional<at::Tensor> dw_out, db_out;
  if (need_dw) dw_out = dw.to(dtype);
  if (need_db) db_out = g.sum(0).to(dtype);
  return {finish_dx(std::move(dx), mask, dtype), dw_out, db_out};
}

}  // namespace
}  // namespace fusionops::cpu

// A test knob, not a kernel: the small-problem limit (see kSmallWork). No tensor argument, so
// the dispatcher serves it from the CompositeExplicitAutograd key.
TORCH_LIBRARY_IMPL(fusionops, CompositeExplicitAutograd, m) {
  m.impl("_tf_small_work", &fusionops::cpu::set_small_work);
}

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_tf_features_fwd", &fusionops::cpu::tf_features_fwd);
  m.impl("_tf_features_bwd", &fusionops::cpu::tf_features_bwd);
  m.impl("_tf_projected_fwd", &fusionops::cpu::tf_projected_fwd);
  m.impl("_tf_projected_bwd", &fusionops::cpu::tf_projected_bwd);
}
