// CPU kernels of tensor fusion (DESIGN.md section 1; contract in fusionops/ops/_kernels.py).
//
// Z[n, k] = prod_m z_m[n, k_m] with z_m = [1, x_m], k row-major, modality 0 slowest.
// The projected kernels never hold Z or any (N, K) tensor. They split the modalities into a
// head [0, s) and a tail [s, M), so that Z[n, h*Kt + t] = P[n, h] * T[n, t] with P and T the
// outer products of the head and of the tail, and work on one block of rows at a time: BLAS
// multiplies T (scaling the small side by a column of P) or cache-sized column tiles of Z
// rebuilt from P and T with the matching columns of W, and the tiles of dZ = G W are reduced
// onto P and T, whose gradients give dx.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

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
// When the tail is all of Z (K <= kTailCols), a block is sized by kWholeElems elements of Z
// instead (1 MB in float32, whatever N is): few, large GEMMs when K is small.
constexpr int64_t kWholeElems = int64_t{1} << 18;

// ---- one row of an outer product, forward and backward ---------------------------------

// dst = s * src; dst may be src.
template <typename T>
FUSIONOPS_SIMD_CLONES void scale(T* dst, const T* src, T s, int64_t len) {
#pragma omp simd
  for (int64_t r = 0; r < len; ++r) dst[r] = s * src[r];
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

Plan make_plan(const std::vector<int64_t>& D, int64_t N, int64_t O, int64_t max_rows) {
  Plan p;
  p.M = static_cast<int>(D.size());
  p.split = p.M - 1;
  p.Kt = D.back();
  while (p.split > 0 && p.Kt * D[p.split - 1] <= kTailCols) p.Kt *= D[--p.split];
  for (int j = 0; j < p.split; ++j) p.H *= D[j];
  p.rows = p.split == 0 ? std::max(kWholeElems / p.Kt, kMinBlockRows)
                        : std::clamp(kBlockElems / (p.H + p.Kt), kMinBlockRows, max_rows);
  p.rows = std::max<int64_t>(1, std::min(p.rows, N));
  p.direct = p.Kt >= kMinDirectCols && p.Kt > O;
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
  int64_t r0 = 0, nr = 0;    // rows [r0, r0 + nr) of the current block

  Block(const Features& f_, const Plan& p_, const at::TensorOptions& opts)
      : f(f_), p(p_), zp(base_pointers<T>(f_.z)) {
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

  // The tile's columns of Z for the block's rows: Z[n, h*Kt + t] = P[n, h] * T[n, t].
  at::Tensor build(const Tile& t) {
    const int64_t w = p.width(t), cols = p.cols(t);
    if (!tile.defined()) tile = at::empty({p.tile_elems}, Tt.options());
    const T* P_ = P.const_data_ptr<T>();
    const T* T_ = Tt.const_data_ptr<T>();
    T* out = tile.mutable_data_ptr<T>();
    at::parallel_for(0, nr, grain_rows(cols), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* src = T_ + n * p.Kt + t.t0;
        for (int64_t h = t.h0; h < t.h1; ++h) scale(out + n * cols + (h - t.h0) * w, src, P_[n * p.H + h], w);
      }
    });
    return as_matrix(tile, nr, cols);
  }
};

template <typename T>
void projected_forward_kernel(const Features& f, const at::Tensor& w, const Plan& p, at::Tensor& y) {
  Block<T> block(f, p, w.options());
  at::Tensor u = at::empty({p.rows, w.size(0)}, w.options());  // T W_hᵀ of one group (direct)
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    at::Tensor yb = y.narrow(0, r0, block.nr);
    if (p.split == 0) {
      at::mm_out(yb, block.Tt, w.t());  // Z = T: one GEMM per block
    } else if (p.direct) {
      at::Tensor ub = u.narrow(0, 0, block.nr);
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
  at::Tensor gs = scaled_g.narrow(0, 0, block.nr);
  for (int64_t h = 0; h < p.H; ++h) {
    at::mul_out(gs, gb, block.P_col(h));  // Gᵀ diag(P[:, h]) T = (P[:, h] ⊙ G)ᵀ T
    dw.narrow(1, h * p.Kt, p.Kt).addmm_(gs.t(), block.Tt);
  }
}

// dW = Gᵀ Z, block by block.
template <typename T>
void projected_dw_kernel(const Features& f, const at::Tensor& g, const Plan& p, at::Tensor& dw) {
  Block<T> block(f, p, dw.options());
  const at::Tensor scaled_g = at::empty({p.rows, dw.size(0)}, dw.options());
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    block_dw(block, g.narrow(0, r0, block.nr), scaled_g, dw);
  }
}

// dx from dZ = G W, tile by tile, reduced onto the head and tail features.
template <typename T>
void projected_dx_kernel(const Features& f, const at::Tensor& g, const at::Tensor& w, const Plan& p,
                         std::vector<at::Tensor>& dx) {
  Block<T> block(f, p, w.options());
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
      reduce_tile(block, t, dZt, dP, dT);
    }
    block_dx(block, dP, dT, dxp);
  }
}

// Backward when Z = T (empty head): dW += Gᵀ T and dT = dZ = G W, block by block, T built once.
template <typename T>
void projected_whole_bwd_kernel(const Features& f, const at::Tensor& g, const at::Tensor& w, const Plan& p,
                                bool need_dw, bool need_dx, at::Tensor& dw, std::vector<at::Tensor>& dx) {
  Block<T> block(f, p, g.options());  // (w is undefined when !need_dx)
  const at::Tensor dZ = need_dx ? at::empty({p.rows, p.Kt}, g.options()) : at::Tensor();
  const auto dxp = need_dx ? mutable_pointers<T>(dx) : std::vector<T*>{};
  for (int64_t r0 = 0; r0 < f.N; r0 += p.rows) {
    block.load(r0, std::min(p.rows, f.N - r0));
    const at::Tensor gb = g.narrow(0, r0, block.nr);
    if (need_dw) dw.addmm_(gb.t(), block.Tt);
    if (need_dx) {
      at::Tensor dZb = dZ.narrow(0, 0, block.nr);
      at::mm_out(dZb, gb, w);
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

at::Tensor tf_projected_fwd(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_tf_projected_fwd";
  const BelowAutograd below_autograd;
  check_modalities(kOp, xs, mask);
  const auto dtype = xs[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  const Features f = make_features(xs, mask, acc);
  check_2d(kOp, "weight", weight, -1, f.K, dtype);
  const int64_t O = weight.size(0);
  // A weight expanded along O (every row w_0, stride 0) is used as its one row: y = (Z w_0) 1ᵀ,
  // instead of a copy of O rows for BLAS.
  const bool expanded = is_expanded_rows(weight);
  const at::Tensor w = blas_weight(expanded ? weight.narrow(0, 0, 1) : weight, acc);
  at::Tensor y = at::zeros({f.N, w.size(0)}, w.options());
  if (f.N > 0) {
    const Plan p = make_plan(f.D, f.N, w.size(0), kBlockRows);
    AT_DISPATCH_FLOATING_TYPES(acc, "_tf_projected_fwd", [&] { projected_forward_kernel<scalar_t>(f, w, p, y); });
  }
  if (expanded) y = y.expand({f.N, O}).contiguous();
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == O,
                "fusionops::_tf_projected_fwd: bias must be a ", dtype, " tensor of shape (", O,
                "), got ", bias->scalar_type(), " of shape ", bias->sizes());
    y.add_(bias->to(acc));
  }
  return y.to(dtype);
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> tf_projected_bwd(
    const at::Tensor& grad, at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& mask,
    bool need_dx, bool need_dw, bool need_db) {
  constexpr const char* kOp = "_tf_projected_bwd";
  const BelowAutograd below_autograd;
  check_modalities(kOp, xs, mask);
  const auto dtype = xs[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  const Features f = make_features(xs, mask, acc);
  check_2d(kOp, "weight", weight, -1, f.K, dtype);
  check_2d(kOp, "grad", grad, f.N, weight.size(0), dtype);
  if (need_dx && is_expanded_rows(weight)) {
    // Every row of W is w_0: dZ = G W = (G 1) w_0, so dx needs one row of W and the row sums of
    // G, not a copy of W. dW (the gradient of the (O, K) view) still has O rows.
    auto dx = std::get<0>(tf_projected_bwd(grad.to(acc).sum(1, /*keepdim=*/true).to(dtype), xs,
                                           weight.narrow(0, 0, 1), mask, true, false, false));
    auto rest = tf_projected_bwd(grad, xs, weight, mask, false, need_dw, need_db);
    return {std::move(dx), std::get<1>(rest), std::get<2>(rest)};
  }
  const int64_t O = weight.size(0);
  const at::Tensor w = need_dx ? blas_weight(weight, acc) : at::Tensor();  // read by dx only
  const at::Tensor g = grad.to(acc).contiguous();  // (N, O): small, and stride 0 is common here
  std::vector<at::Tensor> dx = need_dx ? empty_dx(f, acc) : std::vector<at::Tensor>{};
  at::Tensor dw = need_dw ? at::zeros({O, f.K}, g.options()) : at::Tensor();
  if (f.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "_tf_projected_bwd", [&] {
      const Plan whole = make_plan(f.D, f.N, O, kBlockRows);
      if (whole.split == 0) {
        if (need_dw || need_dx) projected_whole_bwd_kernel<scalar_t>(f, g, w, whole, need_dw, need_dx, dw, dx);
        return;
      }
      if (need_dw) projected_dw_kernel<scalar_t>(f, g, make_plan(f.D, f.N, O, kBlockRows), dw);
      if (need_dx) projected_dx_kernel<scalar_t>(f, g, w, make_plan(f.D, f.N, O, kDxBlockRows), dx);
    });
  }
  std::optional<at::Tensor> dw_out, db_out;
  if (need_dw) dw_out = dw.to(dtype);
  if (need_db) db_out = g.sum(0).to(dtype);
  return {finish_dx(std::move(dx), mask, dtype), dw_out, db_out};
}

}  // namespace
}  // namespace fusionops::cpu

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_tf_features_fwd", &fusionops::cpu::tf_features_fwd);
  m.impl("_tf_features_bwd", &fusionops::cpu::tf_features_bwd);
  m.impl("_tf_projected_fwd", &fusionops::cpu::tf_projected_fwd);
  m.impl("_tf_projected_bwd", &fusionops::cpu::tf_projected_bwd);
}
