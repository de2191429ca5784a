// CPU kernels of low-rank fusion (DESIGN.md section 2; contract in fusionops/ops/_kernels.py).
//
// y[n, o] = Σ_r w_r P[n, r, o] + b[o] with P = Π_m A_m and A_m[n, r, o] = Σ_k z_m[n, k] F_m[r, k, o].
// With F_m laid out as Ft_m = (D_m, R·O), A_m of a block of rows is one GEMM, z_m[blk] Ft_m (the
// leading 1 of z_m adds F_m[:, 0, :]). The kernels never hold z_m, A_m, P or their gradients for
// all rows: each thread takes a share of the blocks of rows and, per block, builds z_m, runs the
// GEMMs itself (BLAS single-threaded inside the parallel region) and forms the products and
// gradients row by row while the block's M buffers of (rows, R·O) are still in its cache. This
// beat running each GEMM on all threads block after block, and holds up far better when other
// processes share the cores (see the report). The backward recomputes A_m per block (it keeps
// nothing from the forward): one more GEMM per modality, in exchange for not holding the
// (N, R·O) per modality that the reference keeps between forward and backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace fusionops::cpu {
namespace {

// A block's M buffers A_m (rows, R·O) of the compute dtype take about kBlockBytes, so that they
// and the block's z_m stay in a core's L2 (2 MB here), but a block has at least kMinBlockRows
// rows (when N allows) because thin GEMMs cost more than cache misses. Measured with 2 threads
// on N = 4096, dims (128, 64, 300): at R·O = 512, blocks of 128 to 512 rows are within 3% of
// each other (this picks 256) and 64 rows is 15% slower; at R·O = 2048, 128 or 256 rows beat
// the cache-sized 64 by 13% and 32 by 30%.
constexpr int64_t kBlockBytes = int64_t{3} << 19;  // 1.5 MB
constexpr int64_t kMinBlockRows = 128;


// ---- arguments ------------------------------------------------------------------------------

struct Problem {
  at::TensorList xs;
  const std::optional<at::Tensor>& mask;
  std::vector<int64_t> D;      // d_m + 1
  std::vector<at::Tensor> Ft;  // Ft_m[k, r·O + o] = F_m[r, k, o]: (D_m, R·O), contiguous, compute dtype
  at::Tensor w;                // (R,), contiguous, compute dtype
  int M = 0;
  int64_t N = 0, R = 0, O = 0, RO = 0;
  RowBlocks blocks;
  const bool* keep = nullptr;    // the mask's data, strides k0, k1
  int64_t k0 = 0, k1 = 0;

  Problem(at::TensorList xs_, const std::optional<at::Tensor>& mask_) : xs(xs_), mask(mask_) {}

  // Whether modality m of row n is present.
  bool present(int m, int64_t n) const { return !keep || keep[n * k0 + m * k1]; }

  at::TensorOptions opts() const { return w.options(); }
};

Problem make_problem(const char* op, at::TensorList xs, at::TensorList factors, const at::Tensor& rank_weight,
                     const std::optional<at::Tensor>& mask) {
  check_modalities(op, xs, mask);
  const auto dtype = xs[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  Problem p(xs, mask);
  p.M = static_cast<int>(xs.size());
  p.N = xs[0].size(0);
  TORCH_CHECK(factors.size() == xs.size(), "fusionops::", op, ": got ", xs.size(), " modalities but ",
              factors.size(), " factors");
  TORCH_CHECK(factors[0].dim() == 3 && factors[0].size(0) >= 1 && factors[0].size(2) >= 1, "fusionops::", op,
              ": factors[0] must be (R, d_0 + 1, O) with R, O >= 1, got shape ", factors[0].sizes());
  p.R = factors[0].size(0);
  p.O = factors[0].size(2);
  p.RO = p.R * p.O;
  for (int m = 0; m < p.M; ++m) {
    const at::Tensor& F = factors[m];
    const int64_t D = xs[m].size(1) + 1;
    TORCH_CHECK(F.device().is_cpu() && F.scalar_type() == dtype && F.dim() == 3 && F.size(0) == p.R &&
                    F.size(1) == D && F.size(2) == p.O,
                "fusionops::", op, ": factors[", m, "] must be a ", dtype, " cpu tensor of shape (", p.R,
                ", ", D, ", ", p.O, "), got ", F.scalar_type(), " on ", F.device(), " of shape ", F.sizes());
    p.D.push_back(D);
    // A copy of the parameter's size, made once per call.
    p.Ft.push_back(F.to(acc).permute({1, 0, 2}).reshape({D, p.RO}).contiguous());
  }
  TORCH_CHECK(rank_weight.device().is_cpu() && rank_weight.scalar_type() == dtype && rank_weight.dim() == 1 &&
                  rank_weight.size(0) == p.R,
              "fusionops::", op, ": rank_weight must be a ", dtype, " cpu tensor of shape (", p.R, "), got ",
              rank_weight.scalar_type(), " on ", rank_weight.device(), " of shape ", rank_weight.sizes());
  p.w = rank_weight.to(acc).contiguous();
  if (mask) {
    p.keep = mask->const_data_ptr<bool>();
    p.k0 = mask->stride(0);
    p.k1 = mask->stride(1);
  }
  // Blocks of at most the rows the cache budget allows (as many for every thread).
  const int64_t elem = static_cast<int64_t>(c10::elementSize(acc));
  p.blocks = row_blocks(p.N, std::max(kMinBlockRows, kBlockBytes / (elem * p.M * p.RO)));
  return p;
}

// ---- one row of a block ---------------------------------------------------------------------

// y[0, O) = b + Σ_r w_r Π_m a[m][r·O + o]. Overwrites a[0] with the product P.
template <typename T>
FUSIONOPS_SIMD_CLONES void forward_row(T* const* a, int M, const T* w, int64_t R, int64_t O, const T* b,
                                       T* y) {
  const int64_t RO = R * O;
  T* P = a[0];
  for (int m = 1; m < M; ++m) {
    const T* am = a[m];
#pragma omp simd
    for (int64_t j = 0; j < RO; ++j) P[j] *= am[j];
  }
#pragma omp simd
  for (int64_t o = 0; o < O; ++o) y[o] = b ? b[o] : T(0);
  for (int64_t r = 0; r < R; ++r) {
    const T wr = w[r];
    const T* Pr = P + r * O;
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) y[o] += wr * Pr[o];
  }
}

// Scratch elements backward_row needs: M - 2 prefix products and the running suffix, R·O each.
int64_t backward_row_scratch(int M, int64_t RO) { return (std::max(M - 2, 0) + 1) * RO; }

// From a[m] = A_m of one row: dw[r] = Σ_o g[o] P[r, o] and, when need_dA, a[m] = dA_m =
// (w_r g[o]) Π_{k≠m} A_k, by prefix products (kept in scratch) and a running suffix product:
// no division, so zeros in A are fine.
template <typename T>
FUSIONOPS_SIMD_CLONES void backward_row(T* const* a, int M, const T* w, int64_t R, int64_t O, const T* g,
                                        bool need_dA, T* dw, T* scratch) {
  const int64_t RO = R * O;
  // pre(m) = Π_{k<m} a[k] for m >= 1: a[0] itself, then the scratch rows.
  auto pre = [&](int m) -> T* { return m == 1 ? a[0] : scratch + (m - 2) * RO; };
  for (int m = 2; m < M; ++m) {
    const T* prev = pre(m - 1);
    const T* am = a[m - 1];
    T* cur = pre(m);
#pragma omp simd
    for (int64_t j = 0; j < RO; ++j) cur[j] = prev[j] * am[j];
  }
  // dw[r] = Σ_o g[o] pre(M)[r, o] with pre(M) = pre(M - 1) a[M - 1] (= a[0] when M = 1).
  const T* last = a[M - 1];
  const T* before = M > 1 ? pre(M - 1) : nullptr;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t r0 = r * O;
    T acc = 0;
    if (before) {
#pragma omp simd reduction(+ : acc)
      for (int64_t o = 0; o < O; ++o) acc += g[o] * before[r0 + o] * last[r0 + o];
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t o = 0; o < O; ++o) acc += g[o] * last[r0 + o];
    }
    dw[r] = acc;
  }
  if (!need_dA) return;
  // s = dP = w_r g[o], then for m = M-1 … 0: dA_m = s pre(m), s *= A_m (in place over a[m]).
  T* s = scratch + std::max(M - 2, 0) * RO;
  for (int64_t r = 0; r < R; ++r) {
    const T wr = w[r];
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) s[r * O + o] = wr * g[o];
  }
  for (int m = M - 1; m >= 1; --m) {
    T* am = a[m];
    const T* pm = pre(m);
#pragma omp simd
    for (int64_t j = 0; j < RO; ++j) {
      const T t = am[j];
      am[j] = s[j] * pm[j];
      s[j] *= t;
    }
  }
  std::copy(s, s + RO, a[0]);
}

// ---- blocks -------------------------------------------------------------------------------

// One thread's buffers, and the block of rows [r0, r0 + nb) it holds: z_m (nb, D_m) and
// A_m = z_m Ft_m (nb, R·O).
template <typename T>
struct Block {
  const Problem& p;
  at::Tensor zbuf;  // the z_m one after the other
  at::Tensor A;     // (M, rows, R·O)
  std::vector<at::Tensor> z, Am;
  int64_t r0 = 0, nb = 0;

  explicit Block(const Problem& p_) : p(p_), A(at::empty({p_.M, p_.blocks.rows, p_.RO}, p_.opts())) {
    int64_t total = 0;
    for (int64_t D : p.D) total += D;
    zbuf = at::empty({p.blocks.rows * total}, p.opts());
  }

  void load(int64_t block) {
    r0 = p.blocks.first(block);
    nb = p.blocks.count(block);
    z.clear();
    Am.clear();
    int64_t offset = 0;
    for (int m = 0; m < p.M; ++m) {
      z.push_back(zbuf.narrow(0, offset, nb * p.D[m]).view({nb, p.D[m]}));
      offset += nb * p.D[m];
      fill_features(p.xs[m], p.mask, m, r0, nb, z.back());
      Am.push_back(A.select(0, m).narrow(0, 0, nb));
      at::mm_out(Am.back(), z.back(), p.Ft[m]);
    }
  }

  // a[m] = row i of A_m.
  void row(int64_t i, std::vector<T*>& a) const {
    T* base = A.mutable_data_ptr<T>();
    for (int m = 0; m < p.M; ++m) a[m] = base + (m * p.blocks.rows + i) * p.RO;
  }
};

template <typename T>
void forward_kernel(const Problem& p, const T* b, at::Tensor& y) {
  const T* w = p.w.const_data_ptr<T>();
  T* y_ = y.mutable_data_ptr<T>();
  at::parallel_for(0, p.blocks.blocks, 1, [&](int64_t b0, int64_t b1) {
    Block<T> block(p);
    std::vector<T*> a(p.M);
    for (int64_t bi = b0; bi < b1; ++bi) {
      block.load(bi);
      for (int64_t i = 0; i < block.nb; ++i) {
        block.row(i, a);
        forward_row(a.data(), p.M, w, p.R, p.O, b, y_ + (block.r0 + i) * p.O);
      }
    }
  });
}

// Adds to dw (R,) always, to dx_m (N, d_m) and dFt_m (D_m, R·O) when they are given (non-empty).
// Each thread sums dw and dFt over its blocks, added in thread order after the loop
// (ThreadSums), so the result does not depend on timing.
template <typename T>
void backward_kernel(const Problem& p, const at::Tensor& g, std::vector<at::Tensor>& dx,
                     std::vector<at::Tensor>& dFt, at::Tensor& dw) {
  const bool need_dA = !dx.empty() || !dFt.empty();
  const T* w = p.w.const_data_ptr<T>();
  const T* g_ = g.const_data_ptr<T>();
  const int64_t scratch = backward_row_scratch(p.M, p.RO);
  std::vector<at::Tensor> outs{dw};  // then dFt_m, if asked for
  outs.insert(outs.end(), dFt.begin(), dFt.end());
  ThreadSums sums(std::move(outs));
  at::parallel_for(0, p.blocks.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<at::Tensor>& part = sums.mine();
    T* dw_ = part[0].mutable_data_ptr<T>();
    Block<T> block(p);
    std::vector<T*> a(p.M);
    std::vector<T> buf(scratch + p.R);
    T* dw_row = buf.data() + scratch;
    for (int64_t bi = b0; bi < b1; ++bi) {
      block.load(bi);  // recomputes A_m: the forward kept nothing
      for (int64_t i = 0; i < block.nb; ++i) {
        block.row(i, a);
        backward_row(a.data(), p.M, w, p.R, p.O, g_ + (block.r0 + i) * p.O, need_dA, dw_row, buf.data());
        for (int64_t r = 0; r < p.R; ++r) dw_[r] += dw_row[r];
      }
      for (int m = 0; m < p.M; ++m) {
        const at::Tensor& dA = block.Am[m];  // now dL/dA_m
        if (!dx.empty()) {
          // dx_m = dz_m[:, 1:] = dA_m Ft_m[1:]ᵀ, 0 on rows where the modality is missing
          at::Tensor dxb = dx[m].narrow(0, block.r0, block.nb);
          at::mm_out(dxb, dA, p.Ft[m].narrow(0, 1, p.D[m] - 1).t());
          T* d = dxb.mutable_data_ptr<T>();
          const int64_t dm = p.D[m] - 1;
          for (int64_t i = 0; i < block.nb; ++i) {
            if (!p.present(m, block.r0 + i)) std::fill(d + i * dm, d + (i + 1) * dm, T(0));
          }
        }
        if (!dFt.empty()) part[1 + m].addmm_(block.z[m].t(), dA);  // dFt_m += z_mᵀ dA_m
      }
    }
  });
  sums.reduce();
}

// ---- the ops ------------------------------------------------------------------------------
// (each skips autograd for its inner ATen calls: see BelowAutograd in common.h)

at::Tensor lmf_fwd(at::TensorList xs, at::TensorList factors, const at::Tensor& rank_weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask) {
  constexpr const char* kOp = "_lmf_fwd";
  const BelowAutograd below_autograd;
  const Problem p = make_problem(kOp, xs, factors, rank_weight, mask);
  const auto dtype = xs[0].scalar_type();
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(
        bias->device().is_cpu() && bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == p.O,
        "fusionops::", kOp, ": bias must be a ", dtype, " cpu tensor of shape (", p.O, "), got ",
        bias->scalar_type(), " on ", bias->device(), " of shape ", bias->sizes());
    b = bias->to(p.w.scalar_type()).contiguous();
  }
  at::Tensor y = at::empty({p.N, p.O}, p.opts());
  AT_DISPATCH_FLOATING_TYPES(p.w.scalar_type(), kOp, [&] {
    forward_kernel<scalar_t>(p, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y);
  });
  return y.to(dtype);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
lmf_bwd(const at::Tensor& grad, at::TensorList xs, at::TensorList factors, const at::Tensor& rank_weight,
        const std::optional<at::Tensor>& mask, bool need_dx, bool need_dfactors, bool need_dw, bool need_db) {
  constexpr const char* kOp = "_lmf_bwd";
  const BelowAutograd below_autograd;
  const Problem p = make_problem(kOp, xs, factors, rank_weight, mask);
  const auto dtype = xs[0].scalar_type();
  const auto acc = p.w.scalar_type();
  check_2d(kOp, "grad", grad, p.N, p.O, dtype);
  const at::Tensor g = grad.to(acc).contiguous();  // (N, O): small, and stride 0 is common here
  std::vector<at::Tensor> dx, dFt;
  for (int m = 0; m < p.M; ++m) {
    if (need_dx) dx.push_back(at::empty({p.N, p.D[m] - 1}, p.opts()));
    if (need_dfactors) dFt.push_back(at::zeros_like(p.Ft[m]));
  }
  at::Tensor dw = at::zeros({p.R}, p.opts());
  if (need_dx || need_dfactors || need_dw) {
    AT_DISPATCH_FLOATING_TYPES(acc, kOp, [&] { backward_kernel<scalar_t>(p, g, dx, dFt, dw); });
  }
  std::vector<at::Tensor> dfactors;
  for (size_t m = 0; m < dFt.size(); ++m) {
    dfactors.push_back(dFt[m].view({p.D[m], p.R, p.O}).permute({1, 0, 2}).to(dtype).contiguous());
  }
  std::optional<at::Tensor> dw_out, db_out;
  if (need_dw) dw_out = dw.to(dtype);
  if (need_db) db_out = g.sum(0).to(dtype);
  // dx is already 0 where masked: finish_dx only rounds it to the input dtype.
  return {finish_dx(std::move(dx), std::nullopt, dtype), std::move(dfactors), dw_out, db_out};
}

}  // namespace
}  // namespace fusionops::cpu

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_lmf_fwd", &fusionops::cpu::lmf_fwd);
  m.impl("_lmf_bwd", &fusionops::cpu::lmf_bwd);
}
