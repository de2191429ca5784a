// CPU kernels of the bilinear pooling family (DESIGN.md section 6; contract in
// fusionops/ops/_bilinear.py, BilinearKernels): MFB (MLB: k = 1), MUTAN and BLOCK share them.
//
// One problem covers the family. x (N, C·dx) and t (N, C·dt) are cut into C chunks; chunk c is
// projected to P = R·S columns, A_c = x_c Wx[c]ᵀ + bx[c] and B_c = t_c Wt[c]ᵀ + bt[c]; the
// product of the activated projections is sum-pooled over R to S columns, p[c·S + j] = Σ_r
// act(A_c)[i] act(B_c)[i] with i = r·S + j (rank_major: MUTAN, BLOCK) or j·R + r (MFB's j·k + i);
// n(·) (signed square root, then L2 over each chunk or over the row) is optional; y = z Woᵀ + bo.
// MFB is C = 1, R = k, S = o; MUTAN is C = 1; BLOCK is C chunks.
//
// Rows go in tiles, each thread taking whole tiles: per tile the projections are GEMMs (BLAS,
// single-threaded inside the parallel region), the middle part (activation, product, pool,
// normalisation) is one pass over the tile's rows, and the tile's part of y is one more GEMM.
// Neither the (N, C·P) projections nor their product exist for all rows: each thread holds one
// tile's; the backward recomputes them and overwrites them with their gradients, and the weight
// gradients are summed over tiles by GEMMs over rounds of tiles (the same bits on every run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fusionops::cpu {
namespace {

// Bytes of one tile's projection buffer A (or B): 256 KB keeps a tile's A and B in a core's L2
// (2 MB here) and the buffers of all threads small beside the weights' gradients; a tile has at
// least kMinTileRows rows. Measured with one thread, (rows, 512) x (512, 1280) GEMMs run at
// 71-76 GFLOP/s from 32 to 171 rows (60-67 at 256-512 rows), so thin tiles cost no speed.
constexpr int64_t kTileBytes = int64_t{1} << 18;
constexpr int64_t kMinTileRows = 16;
// F.normalize's eps: z / max(‖z‖, eps).
constexpr double kNormEps = 1e-12;

enum Activation : int64_t { kNone = 0, kRelu = 1, kTanh = 2 };
enum Normalize : int64_t { kNoNorm = 0, kPerChunk = 1, kWholeRow = 2 };

struct Problem {
  int64_t N = 0, C = 0, dx = 0, dt = 0, P = 0, R = 0, S = 0, O = 0, tile = 1;
  RowBlocks blocks;  // the tiles: as many for every thread, at most `tile` rows each
  bool rank_major = false;
  int64_t act = kNone, norm = kNoNorm;
  at::ScalarType dtype = at::kFloat, acc = at::kFloat;
  // Parameters in the compute dtype, contiguous (one copy per call, the size of the weights).
  at::Tensor wx, bx, wt, bt, wo, bo;

  at::TensorOptions opts() const { return at::TensorOptions().dtype(acc); }
};

void check_param(const char* op, const char* name, const at::Tensor& w, at::IntArrayRef shape,
                 at::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype && w.sizes() == shape, "fusionops::", op, ": ",
              name, " must be a ", dtype, " cpu tensor of shape ", shape, ", got ", w.scalar_type(), " on ",
              w.device(), " of shape ", w.sizes());
}

at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t ? t->to(acc).contiguous() : at::Tensor();
}

Problem make_problem(const char* op, const at::Tensor& x, const at::Tensor& t, const at::Tensor& wx,
                     const std::optional<at::Tensor>& bx, const at::Tensor& wt,
                     const std::optional<at::Tensor>& bt, const at::Tensor& wo,
                     const std::optional<at::Tensor>& bo, int64_t rank, bool rank_major, int64_t activation,
                     int64_t normalize) {
  Problem p;
  p.dtype = x.scalar_type();
  p.acc = at::toOpMathType(p.dtype);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && at::isFloatingType(p.dtype), "fusionops::", op,
              ": x must be a floating cpu tensor (N, d_x), got ", p.dtype, " on ", x.device(), " of shape ",
              x.sizes());
  TORCH_CHECK(wx.dim() == 3 && wt.dim() == 3 && wo.dim() == 2, "fusionops::", op,
              ": wx, wt must be (C, R·S, d) and wo (O, C·S), got ", wx.sizes(), ", ", wt.sizes(), ", ",
              wo.sizes());
  TORCH_CHECK(rank >= 1 && wx.size(1) % rank == 0, "fusionops::", op, ": rank ", rank,
              " must be >= 1 and divide wx.size(1) = ", wx.size(1));
  TORCH_CHECK(activation >= kNone && activation <= kTanh && normalize >= kNoNorm && normalize <= kWholeRow,
              "fusionops::", op, ": activation must be 0, 1 or 2 and normalize 0, 1 or 2, got ", activation,
              " and ", normalize);
  p.N = x.size(0);
  p.C = wx.size(0);
  p.P = wx.size(1);
  p.R = rank;
  p.S = p.P / rank;
  p.dx = wx.size(2);
  p.dt = wt.size(2);
  p.O = wo.size(0);
  p.rank_major = rank_major;
  p.act = activation;
  p.norm = normalize;
  check_param(op, "x", x, {p.N, p.C * p.dx}, p.dtype);
  check_param(op, "t", t, {p.N, p.C * p.dt}, p.dtype);
  check_param(op, "wt", wt, {p.C, p.P, p.dt}, p.dtype);
  check_param(op, "wo", wo, {p.O, p.C * p.S}, p.dtype);
  if (bx) check_param(op, "bx", *bx, {p.C, p.P}, p.dtype);
  if (bt) check_param(op, "bt", *bt, {p.C, p.P}, p.dtype);
  if (bo) check_param(op, "bo", *bo, {p.O}, p.dtype);
  p.wx = wx.to(p.acc).contiguous();
  p.wt = wt.to(p.acc).contiguous();
  p.wo = wo.to(p.acc).contiguous();
  p.bx = to_acc(bx, p.acc);
  p.bt = to_acc(bt, p.acc);
  p.bo = to_acc(bo, p.acc);
  const int64_t elem = static_cast<int64_t>(c10::elementSize(p.acc));
  p.blocks = row_blocks(p.N, std::max(kMinTileRows, kTileBytes / (elem * p.C * p.P)));
  p.tile = p.blocks.rows;
  return p;
}

// Rows [r0, r0 + rows) of a (N, C·d) input as (C, rows, d) in the compute dtype (a view when
// the input already has that dtype).
at::Tensor chunks_of(const at::Tensor& x, int64_t r0, int64_t rows, int64_t C, at::ScalarType acc) {
  return x.narrow(0, r0, rows).to(acc).reshape({rows, C, -1}).transpose(0, 1);
}

// out (C, rows, P) = X Wᵀ + b per chunk.
void project(const at::Tensor& X, const at::Tensor& W, const at::Tensor& b, at::Tensor& out) {
  if (W.size(0) == 1) {  // one GEMM, without bmm's batch bookkeeping
    at::Tensor o = out.select(0, 0);
    if (b.defined()) {
      at::addmm_out(o, b[0], X[0], W[0].t());
    } else {
      at::mm_out(o, X[0], W[0].t());
    }
    return;
  }
  at::bmm_out(out, X, W.transpose(1, 2));
  if (b.defined()) out.add_(b.unsqueeze(1));
}

// The activation is a template argument: the loops over a row then vectorize, with no branch
// per element.
template <int64_t ACT, typename T>
inline T activate(T v) {
  if constexpr (ACT == kRelu) return v < T(0) ? T(0) : v;  // NaN stays NaN, as F.relu
  if constexpr (ACT == kTanh) return std::tanh(v);
  return v;
}

// d act / d pre-activation, from the pre-activation v and the activated a.
template <int64_t ACT, typename T>
inline T activate_grad(T v, T a) {
  if constexpr (ACT == kRelu) return v <= T(0) ? T(0) : T(1);  // as relu's backward: NaN passes
  if constexpr (ACT == kTanh) return T(1) - a * a;
  return T(1);
}

// f<ACT>() for the activation code act.
template <typename F>
void with_activation(int64_t act, F&& f) {
  if (act == kRelu) {
    f(std::integral_constant<int64_t, kRelu>{});
  } else if (act == kTanh) {
    f(std::integral_constant<int64_t, kTanh>{});
  } else {
    f(std::integral_constant<int64_t, kNone>{});
  }
}

// The groups of S·C pooled columns normalised together: (count, width).
std::pair<int64_t, int64_t> norm_groups(const Problem& p) {
  return p.norm == kPerChunk ? std::make_pair(p.C, p.S) : std::make_pair(int64_t{1}, p.C * p.S);
}

// Middle, forward, on one tile: pooled[n, c·S + j] = Σ_r act(A)[c, n, at(r, j)] act(B)[...],
// z = n(pooled) (or pooled itself).
template <typename T, int64_t ACT>
void middle_forward_act(const Problem& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& pooled,
                    const at::Tensor& z) {
  // A, B: (C, rows, P) with rows of stride P and chunks of any stride (a slice of a round).
  const int64_t rows = A.size(1), P = p.P, S = p.S, R = p.R, CS = p.C * p.S, cs = A.stride(0);
  const T* a = A.const_data_ptr<T>();
  const T* b = B.const_data_ptr<T>();
  T* pl = pooled.mutable_data_ptr<T>();
  T* zz = z.mutable_data_ptr<T>();
  const auto [groups, width] = norm_groups(p);
  std::vector<T> e(P);  // one chunk's product e of one row
  {
    for (int64_t n = 0; n < rows; ++n) {
      T* prow = pl + n * CS;
      for (int64_t c = 0; c < p.C; ++c) {
        const T* ar = a + c * cs + n * P;
        const T* br = b + c * cs + n * P;
        T* out = prow + c * S;
        for (int64_t i = 0; i < P; ++i) e[i] = activate<ACT>(ar[i]) * activate<ACT>(br[i]);
        if (p.rank_major) {  // i = r·S + j: rows of S
          std::copy(e.data(), e.data() + S, out);
          for (int64_t r = 1; r < R; ++r) {
            const T* er = e.data() + r * S;
            for (int64_t j = 0; j < S; ++j) out[j] += er[j];
          }
        } else {  // i = j·R + r: runs of R
          for (int64_t j = 0; j < S; ++j) {
            const T* ej = e.data() + j * R;
            T s = 0;
            for (int64_t r = 0; r < R; ++r) s += ej[r];
            out[j] = s;
          }
        }
      }
      T* zrow = zz + n * CS;
      if (p.norm == kNoNorm) {
        std::copy(prow, prow + CS, zrow);
        continue;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const T* pg = prow + g * width;
        T* zg = zrow + g * width;
        T sq = 0;
        for (int64_t j = 0; j < width; ++j) {
          const T q = std::sqrt(std::abs(pg[j]));
          zg[j] = pg[j] < T(0) ? -q : q;
          sq += q * q;
        }
        const T den = std::max(std::sqrt(sq), static_cast<T>(kNormEps));
        for (int64_t j = 0; j < width; ++j) zg[j] /= den;
      }
    }
  }
}

// Middle, backward, on one tile: from gz = dL/dz (rows, C·S), overwrite A and B with dL/dA and
// dL/dB (pre-activation). pooled and z are middle_forward's.
template <typename T, int64_t ACT>
void middle_backward_act(const Problem& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& pooled,
                     const at::Tensor& z, const at::Tensor& gz) {
  // A, B: (C, rows, P) with rows of stride P and chunks of any stride (a slice of a round).
  const int64_t rows = A.size(1), P = p.P, S = p.S, R = p.R, CS = p.C * p.S, cs = A.stride(0);
  T* a = A.mutable_data_ptr<T>();
  T* b = B.mutable_data_ptr<T>();
  const T* pl = pooled.const_data_ptr<T>();
  const T* zz = z.const_data_ptr<T>();
  T* gg = gz.mutable_data_ptr<T>();  // overwritten with dL/dpooled
  const auto [groups, width] = norm_groups(p);
  std::vector<T> dpx(P);  // dL/dpooled spread over the P products it sums
  {
    for (int64_t n = 0; n < rows; ++n) {
      T* grow = gg + n * CS;
      if (p.norm != kNoNorm) {
        const T* prow = pl + n * CS;
        const T* zrow = zz + n * CS;
        for (int64_t g = 0; g < groups; ++g) {
          const T* pg = prow + g * width;
          const T* zg = zrow + g * width;
          T* dg = grow + g * width;
          T sq = 0, dot = 0;
          for (int64_t j = 0; j < width; ++j) {
            sq += std::abs(pg[j]);  // Σ q² = Σ |p|
            dot += dg[j] * zg[j];
          }
          const T norm = std::sqrt(sq);
          const bool clamped = norm < static_cast<T>(kNormEps);  // z = q / eps: no gradient through the norm
          const T den = clamped ? static_cast<T>(kNormEps) : norm;
          for (int64_t j = 0; j < width; ++j) {
            const T dq = (clamped ? dg[j] : dg[j] - zg[j] * dot) / den;
            // d sign(p)√|p| / dp = 1 / (2√|p|); 0 at p = 0, as sqrt(relu(·)) differentiates there.
            dg[j] = pg[j] != T(0) ? dq / (T(2) * std::sqrt(std::abs(pg[j]))) : T(0);
          }
        }
      }
      for (int64_t c = 0; c < p.C; ++c) {
        T* ar = a + c * cs + n * P;
        T* br = b + c * cs + n * P;
        const T* dp = grow + c * S;
        if (p.rank_major) {
          for (int64_t r = 0; r < R; ++r) std::copy(dp, dp + S, dpx.data() + r * S);
        } else {
          for (int64_t j = 0; j < S; ++j) std::fill(dpx.data() + j * R, dpx.data() + (j + 1) * R, dp[j]);
        }
        for (int64_t i = 0; i < P; ++i) {
          const T va = ar[i], vb = br[i];
          const T fa = activate<ACT>(va), fb = activate<ACT>(vb);
          ar[i] = dpx[i] * fb * activate_grad<ACT>(va, fa);
          br[i] = dpx[i] * fa * activate_grad<ACT>(vb, fb);
        }
      }
    }
  }
}

template <typename T>
void middle_forward(const Problem& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& pooled,
                    const at::Tensor& z) {
  with_activation(p.act, [&](auto act) { middle_forward_act<T, decltype(act)::value>(p, A, B, pooled, z); });
}

template <typename T>
void middle_backward(const Problem& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& pooled,
                     const at::Tensor& z, const at::Tensor& gz) {
  with_activation(p.act,
                  [&](auto act) { middle_backward_act<T, decltype(act)::value>(p, A, B, pooled, z, gz); });
}

// dW (C, P, d) += dAᵀ X per chunk.
void add_weight_grad(at::Tensor& dW, const at::Tensor& dA, const at::Tensor& X) {
  if (dW.size(0) == 1) {
    dW.select(0, 0).addmm_(dA[0].t(), X[0]);
  } else {
    dW.baddbmm_(dA.transpose(1, 2), X);
  }
}

// Rows of dx (rows, C·d) = dA W per chunk.
void input_grad(at::Tensor dx, const at::Tensor& dA, const at::Tensor& W) {
  if (W.size(0) == 1) {
    at::mm_out(dx, dA[0], W[0]);
  } else {
    dx.view({dx.size(0), W.size(0), W.size(2)}).transpose(0, 1).copy_(at::bmm(dA, W));
  }
}

// One thread's buffers for a tile of up to p.tile rows.
struct TileBuffers {
  at::Tensor A, B, pooled, z;
  explicit TileBuffers(const Problem& p)
      : A(at::empty({p.C, p.tile, p.P}, p.opts())),
        B(at::empty({p.C, p.tile, p.P}, p.opts())),
        pooled(at::empty({p.tile, p.C * p.S}, p.opts())),
        z(at::empty({p.tile, p.C * p.S}, p.opts())) {}
};

// The projections of rows [r0, r0 + rows) into the buffers; returns (A, B) of that many rows.
std::pair<at::Tensor, at::Tensor> project_tile(const Problem& p, const at::Tensor& X, const at::Tensor& Tt,
                                               TileBuffers& buf, int64_t rows) {
  // Contiguous (C, rows, P) at the start of the buffers: the middle loops index them so.
  at::Tensor A = buf.A.view(-1).narrow(0, 0, p.C * rows * p.P).view({p.C, rows, p.P});
  at::Tensor B = buf.B.view(-1).narrow(0, 0, p.C * rows * p.P).view({p.C, rows, p.P});
  project(X, p.wx, p.bx, A);
  project(Tt, p.wt, p.bt, B);
  return {A, B};
}

// Each thread takes whole tiles and runs their GEMMs itself (ATen's BLAS runs single-threaded
// inside a parallel region): one parallel region per call, not one barrier per GEMM, which on
// cores shared with other processes cost up to a scheduler slice each (see the report).
template <typename T>
void forward_tiles(const Problem& p, const at::Tensor& x, const at::Tensor& t, const at::Tensor& y) {
  const at::Tensor wo_t = p.wo.t();
  at::parallel_for(0, p.blocks.blocks, 1, [&](int64_t b0, int64_t b1) {
    const BelowAutograd below;
    TileBuffers buf(p);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = p.blocks.first(bi), rows = p.blocks.count(bi);
      auto [A, B] = project_tile(p, chunks_of(x, r0, rows, p.C, p.acc), chunks_of(t, r0, rows, p.C, p.acc), buf,
                                 rows);
      at::Tensor pl = buf.pooled.narrow(0, 0, rows), zt = buf.z.narrow(0, 0, rows);
      middle_forward<T>(p, A, B, pl, zt);
      at::Tensor yt = y.narrow(0, r0, rows);
      if (p.bo.defined()) {
        at::addmm_out(yt, p.bo, zt, wo_t);
      } else {
        at::mm_out(yt, zt, wo_t);
      }
    }
  });
}

at::Tensor bilinear_fwd(const at::Tensor& x, const at::Tensor& t, const at::Tensor& wx,
                        const std::optional<at::Tensor>& bx, const at::Tensor& wt,
                        const std::optional<at::Tensor>& bt, const at::Tensor& wo,
                        const std::optional<at::Tensor>& bo, int64_t rank, bool rank_major, int64_t activation,
                        int64_t normalize) {
  BelowAutograd below;
  const Problem p =
      make_problem("_bilinear_fwd", x, t, wx, bx, wt, bt, wo, bo, rank, rank_major, activation, normalize);
  at::Tensor y = at::empty({p.N, p.O}, p.opts());
  if (p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(p.acc, "_bilinear_fwd", [&] { forward_tiles<scalar_t>(p, x, t, y); });
  }
  return y.to(p.dtype);
}

// Gradients in the compute dtype: dx, dt (N, C·d), dwx, dbx, dwt, dbt, dwo (accumulated over
// tiles); undefined where not needed.
struct Grads {
  at::Tensor dx, dt, dwx, dbx, dwt, dbt, dwo;
};

// The backward goes in rounds of one tile per thread. In a round each thread recomputes its
// tile's projections and turns them into dL/dA, dL/dB (and its rows of dx, dt) in the round's
// shared buffers; after the round, the weight gradients take the whole round in one GEMM each
// (BLAS on every thread). Per-thread copies of the weight gradients, summed at the end, would
// cost (threads - 1) times the weights' size in memory.
template <typename T>
void backward_tiles(const Problem& p, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                    Grads& g) {
  const int64_t threads = at::get_num_threads(), CS = p.C * p.S;
  const int64_t round_rows = std::min(p.N, threads * p.tile);
  at::Tensor dA = at::empty({p.C, round_rows, p.P}, p.opts()), dB = at::empty({p.C, round_rows, p.P}, p.opts());
  at::Tensor Z = at::empty({round_rows, CS}, p.opts());
  for (int64_t q0 = 0; q0 < p.N; q0 += round_rows) {
    const int64_t nq = std::min(round_rows, p.N - q0);
    const int64_t tiles = ceil_div(nq, p.tile);
    at::parallel_for(0, tiles, 1, [&](int64_t b0, int64_t b1) {
      const BelowAutograd below;
      at::Tensor pooled = at::empty({p.tile, CS}, p.opts()), gz = at::empty({p.tile, CS}, p.opts());
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t off = bi * p.tile, rows = std::min(p.tile, nq - off), r0 = q0 + off;
        at::Tensor A = dA.narrow(1, off, rows), B = dB.narrow(1, off, rows);
        project(chunks_of(x, r0, rows, p.C, p.acc), p.wx, p.bx, A);  // recomputed: the forward kept nothing
        project(chunks_of(t, r0, rows, p.C, p.acc), p.wt, p.bt, B);
        at::Tensor pl = pooled.narrow(0, 0, rows), zt = Z.narrow(0, off, rows), gzt = gz.narrow(0, 0, rows);
        middle_forward<T>(p, A, B, pl, zt);
        at::mm_out(gzt, grad.narrow(0, r0, rows).to(p.acc), p.wo);
        middle_backward<T>(p, A, B, pl, zt, gzt);  // A, B now hold dL/dA, dL/dB
        if (g.dx.defined()) input_grad(g.dx.narrow(0, r0, rows), A, p.wx);
        if (g.dt.defined()) input_grad(g.dt.narrow(0, r0, rows), B, p.wt);
      }
    });
    const at::Tensor A = dA.narrow(1, 0, nq), B = dB.narrow(1, 0, nq);
    if (g.dwx.defined()) add_weight_grad(g.dwx, A, chunks_of(x, q0, nq, p.C, p.acc));
    if (g.dbx.defined()) g.dbx.add_(A.sum(1));
    if (g.dwt.defined()) add_weight_grad(g.dwt, B, chunks_of(t, q0, nq, p.C, p.acc));
    if (g.dbt.defined()) g.dbt.add_(B.sum(1));
    if (g.dwo.defined()) g.dwo.addmm_(grad.narrow(0, q0, nq).to(p.acc).t(), Z.narrow(0, 0, nq));
  }
}

// needs: x, t, wx, bx, wt, bt, wo, bo. Returns those eight gradients (input dtype), an empty
// tensor where not needed.
std::vector<at::Tensor> bilinear_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                                     const at::Tensor& wx, const std::optional<at::Tensor>& bx,
                                     const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                                     const at::Tensor& wo, int64_t rank, bool rank_major, int64_t activation,
                                     int64_t normalize, const c10::List<bool>& needs) {
  BelowAutograd below;
  const Problem p = make_problem("_bilinear_bwd", x, t, wx, bx, wt, bt, wo, std::nullopt, rank, rank_major,
                                 activation, normalize);
  TORCH_CHECK(needs.size() == 8, "fusionops::_bilinear_bwd: needs must hold 8 flags, got ", needs.size());
  check_param("_bilinear_bwd", "grad", grad, {p.N, p.O}, p.dtype);
  const auto o = p.opts();
  Grads g;
  if (needs[0]) g.dx = at::empty({p.N, p.C * p.dx}, o);
  if (needs[1]) g.dt = at::empty({p.N, p.C * p.dt}, o);
  if (needs[2]) g.dwx = at::zeros({p.C, p.P, p.dx}, o);
  if (needs[3] && bx) g.dbx = at::zeros({p.C, p.P}, o);
  if (needs[4]) g.dwt = at::zeros({p.C, p.P, p.dt}, o);
  if (needs[5] && bt) g.dbt = at::zeros({p.C, p.P}, o);
  if (needs[6]) g.dwo = at::zeros({p.O, p.C * p.S}, o);
  if (p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(p.acc, "_bilinear_bwd", [&] { backward_tiles<scalar_t>(p, grad, x, t, g); });
  }
  const auto out = [&](const at::Tensor& d) { return d.defined() ? d.to(p.dtype) : at::empty({0}, x.options()); };
  at::Tensor dbo = needs[7] ? grad.to(p.acc).sum(0).to(p.dtype) : at::empty({0}, x.options());
  return {out(g.dx), out(g.dt), out(g.dwx), out(g.dbx), out(g.dwt), out(g.dbt), out(g.dwo), dbo};
}

}  // namespace
}  // namespace fusionops::cpu

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_bilinear_fwd", &fusionops::cpu::bilinear_fwd);
  m.impl("_bilinear_bwd", &fusionops::cpu::bilinear_bwd);
}
