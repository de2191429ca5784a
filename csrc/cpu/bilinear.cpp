// CPU kernels of the bilinear pooling family (DESIGN.md section 6; contract in
// fusionops/ops/_bilinear.py, BilinearKernels): MFB (MLB: k = 1), MUTAN and BLOCK share them.
//
// One problem covers the family. x (N, C·dx) and t (N, C·dt) are cut into C chunks; chunk c is
// projected to P = R·S columns, A_c = x_c Wx[c]ᵀ + bx[c] and B_c = t_c Wt[c]ᵀ + bt[c]; the
// product of the activated projections is sum-pooled over R to S columns, p[c·S + j] = Σ_r
// act(A_c)[i] act(B_c)[i] with i = r·S + j (rank_major: MUTAN, BLOCK) or j·R + r (MFB's j·k + i);
// n(·) (signed square root, then L2 over each chunk or over the row) is optional; y = z Woᵀ + bo.
// MFB is C = 1, R = k, S = o; MUTAN is C = 1; BLOCK is C chunks.
// MFH (Yu et al. 2018) is `chain`: x (N, dx) and t (N, dt) are shared by the C chunks (its p
// blocks), and the products are chained, e_c = (act(A_c) act(B_c)) e_{c-1} (e_{-1} = 1, the
// reference's `a * b * skip`), before each is pooled; its backward carries dL/de_c back from
// chunk c + 1, so a tile's rows take all chunks at once (backward_by_rows).
//
// Rows go in tiles, each thread taking whole tiles: per tile and chunk the projections are GEMMs
// (BLAS, single-threaded inside the parallel region) and the activation ATen's in-place kernel,
// the middle part (product, pool, normalisation) is one pass over the tile's rows, and the
// tile's part of y is one more GEMM. Neither the (N, C·P) projections nor their product exist for
// all rows: each thread holds one tile's; the backward recomputes them and overwrites them with
// their gradients. Its weight gradients are summed over tiles either by one thread per chunk
// (backward_by_chunk: BLOCK's independent chunks) or by GEMMs over rounds of tiles
// (backward_by_rows); the same bits on every run either way.
//
// Dropout (block.bootstrap's dropout_input, MFB's dropout_pre_norm, MFH's and MLB's/BLOCK's
// dropout_pre_lin) is inverted and hashed (dropout.h): site s of {act(A), act(B), e, z} keeps
// element (row, col) by dropout_keep(site_seed(seed, s), row, col), col counted over the row's
// C·P (or C·S for z) columns, so backward regenerates every mask instead of storing one. The
// projections stay unmasked in the tile buffers (the activations' backward needs them); the
// general middle (pool_general, unpool_general_act, which also chains) applies the masks as it
// reads them.
//
// Cost (issue 20): the recomputation is the one thing the fused backward does beyond the
// reference's, one more forward's worth of projection GEMMs. At MFB's headline (N = 512,
// 512-d, k·o = 1280, O = 256) that is 5.57 GFLOP for fwd+bwd against the reference's 4.23: were
// both all GEMMs at one rate, the fused kernels would run at 0.76x the reference's speed there
// (the reference's elementwise passes over its (N, k·o) tensors leave them a little more).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "dropout.h"

namespace fusionops::cpu {
namespace {

// Bytes of one chunk's projection buffer A (or B) of a tile, and the rows of a tile: at least
// kMinTileRows, at most kMaxTileRows. Measured at the headlines with one thread (fwd+bwd, CPU
// time), 128 KB / 256 KB / 512 KB / 1 MB: MFB 88 / 73 / 68 / 65 ms, BLOCK 36.6 / 35.5 / 34.7 /
// 34.1 ms: the GEMMs of thin tiles (47 rows at 256 KB) each re-read the weights and their
// gradients for few rows. Past 256 rows a (rows, 512) x (512, 1280) GEMM gains nothing (91-96
// GFLOP/s from 64 to 256 rows, one thread) and BLOCK's fwd+bwd neither, while its scratch grew
// (2 MB at 2 threads from 273 to 512 rows): MFB's tiles get 204 rows, BLOCK's 256.
constexpr int64_t kTileBytes = int64_t{1} << 20;
constexpr int64_t kMinTileRows = 16;
constexpr int64_t kMaxTileRows = 256;
// F.normalize's eps: z / max(‖z‖, eps).
constexpr double kNormEps = 1e-12;

enum Activation : int64_t { kNone = 0, kRelu = 1, kTanh = 2 };
enum Normalize : int64_t { kNoNorm = 0, kPerChunk = 1, kWholeRow = 2 };
// Dropout sites, in the order of Problem::drop_p; site_seed mixes the site into the seed
// (fusionops/reference/bilinear.py's site_seed).
enum Site : int { kSiteA = 0, kSiteB = 1, kSiteE = 2, kSiteZ = 3 };
constexpr uint32_t kSiteMul = 0x5BD1E995u;

int64_t site_seed(int64_t seed, int site) {
  return static_cast<int64_t>((static_cast<uint32_t>(seed) ^ (static_cast<uint32_t>(site) * kSiteMul)) & 0x7FFFFFFFu);
}

struct Problem {
  int64_t N = 0, C = 0, dx = 0, dt = 0, P = 0, R = 0, S = 0, O = 0;
  RowBlocks fwd_blocks;  // the forward's tiles (one chunk's projections at a time)
  RowBlocks bwd_blocks;  // the backward's (by_rows: every chunk's projections of a tile at once)
  bool by_chunk = false;  // backward by chunks (backward_by_chunk) or by rows (backward_by_rows)
  bool rank_major = false;
  bool chain = false;  // MFH: inputs shared by the chunks, products chained over them
  double drop_p[4] = {0, 0, 0, 0};  // per Site
  int64_t seed = 0;
  int64_t act = kNone, norm = kNoNorm;
  at::ScalarType dtype = at::kFloat, acc = at::kFloat;
  // Parameters in the compute dtype, contiguous (one copy per call, the size of the weights).
  at::Tensor wx, bx, wt, bt, wo, bo;

  at::TensorOptions opts() const { return at::TensorOptions().dtype(acc); }
  bool dropout(int site) const { return drop_p[site] > 0; }
  // act(A), act(B) or e masked (the masked middle runs).
  bool masked_middle() const { return dropout(kSiteA) || dropout(kSiteB) || dropout(kSiteE); }
  template <typename T>
  Dropout<T> site(int s) const {
    return Dropout<T>(drop_p[s], site_seed(seed, s));
  }
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
                     int64_t normalize, bool chain, double drop_in, double drop_prod, double drop_out,
                     int64_t seed) {
  Problem p;
  for (const double q : {drop_in, drop_prod, drop_out}) check_dropout(op, q, seed);
  p.drop_p[kSiteA] = p.drop_p[kSiteB] = drop_in;
  p.drop_p[kSiteE] = drop_prod;
  p.drop_p[kSiteZ] = drop_out;
  p.seed = seed;
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
  p.chain = chain;
  p.act = activation;
  p.norm = normalize;
  const int64_t in_chunks = chain ? 1 : p.C;  // chain: every chunk reads the whole row
  check_param(op, "x", x, {p.N, in_chunks * p.dx}, p.dtype);
  check_param(op, "t", t, {p.N, in_chunks * p.dt}, p.dtype);
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
  // One chunk's A (rows, P) and the tile's pooled values (rows, C·S) within the budget.
  const auto rows_within = [&](int64_t bytes_per_row) {
    return std::clamp(kTileBytes / bytes_per_row, kMinTileRows, kMaxTileRows);
  };
  const int64_t chunk_rows = rows_within(elem * std::max(p.P, p.C * p.S));
  p.fwd_blocks = row_blocks(p.N, chunk_rows);
  p.by_chunk = p.C > 1 && !p.chain && p.norm != kWholeRow && p.C >= at::get_num_threads();
  if (p.by_chunk) {  // every thread goes over all rows: tiles independent of the thread count
    p.bwd_blocks.N = p.N;
    p.bwd_blocks.rows = std::max<int64_t>(1, std::min(p.N, chunk_rows));
    p.bwd_blocks.blocks = ceil_div(p.N, p.bwd_blocks.rows);
  } else {
    p.bwd_blocks = row_blocks(p.N, rows_within(elem * p.C * p.P));
  }
  return p;
}

// Rows [r0, r0 + rows) of a (N, C·d) input as (C, rows, d) in the compute dtype (a view when
// the input already has that dtype); chain: of a (N, d) input, the same rows for every chunk
// (a stride-0 view).
at::Tensor chunks_of(const Problem& p, const at::Tensor& x, int64_t r0, int64_t rows) {
  const at::Tensor r = x.narrow(0, r0, rows).to(p.acc);
  if (p.chain) return r.unsqueeze(0).expand({p.C, rows, r.size(1)});
  return r.reshape({rows, p.C, -1}).transpose(0, 1);
}

// The activation, in place, by ATen's own vectorized kernels (those of the reference's F.relu
// and F.tanh, NaN handling included): a scalar std::tanh per element cost 7.4 ms a 171-row tile
// of the MFB headline, about 3x the tile's two projection GEMMs. The middle then reads the
// activated values only (relu's and tanh's backward need no more).
void activate_(const Problem& p, const at::Tensor& A) {
  if (p.act == kRelu) {
    A.relu_();
  } else if (p.act == kTanh) {
    A.tanh_();
  }
}

// out (C, rows, P) = act(X Wᵀ + b) per chunk.
void project(const Problem& p, const at::Tensor& X, const at::Tensor& W, const at::Tensor& b, at::Tensor& out) {
  if (W.size(0) == 1) {  // one GEMM, without bmm's batch bookkeeping
    at::Tensor o = out.select(0, 0);
    if (b.defined()) {
      at::addmm_out(o, b[0], X[0], W[0].t());
    } else {
      at::mm_out(o, X[0], W[0].t());
    }
  } else {
    at::bmm_out(out, X, W.transpose(1, 2));
    if (b.defined()) out.add_(b.unsqueeze(1));
  }
  activate_(p, out);
}

// g where keep, +0 elsewhere, without a branch (on random signs relu's branch cost 2.4 ms a
// 171-row tile of the MFB headline, 20x the same loop without activation) and without
// multiplying by 0 (which turns an inf or NaN g into NaN where the reference has 0).
template <typename T>
inline T keep_if(bool keep, T g) {
  using I = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  I bits;
  std::memcpy(&bits, &g, sizeof(T));
  bits &= I(0) - I(keep);
  std::memcpy(&g, &bits, sizeof(T));
  return g;
}

// dL/d pre-activation from g = dL/d act and the activated a: relu's backward (threshold_backward)
// is 0 where a <= 0 (that is, the pre-activation v <= 0) and g elsewhere, NaN included;
// tanh_backward's g (1 - a²), in that grouping.
template <int64_t ACT, typename T>
inline T activate_backward(T g, T a) {
  if constexpr (ACT == kRelu) return keep_if(!(a <= T(0)), g);
  if constexpr (ACT == kTanh) return g * (T(1) - a * a);
  return g;
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

// Rows of the pooled or normalised values of a tile: `rows` rows of stride `ld`, starting at the
// tile's first column (of the chunks it holds).
template <typename T>
struct Rows {
  T* data;
  int64_t ld;
  T* row(int64_t n) const { return data + n * ld; }
};

// The activated projections of G chunks of a tile: chunk g's rows at a + g·cs, rows of stride P.
template <typename T>
struct Chunks {
  T* a;
  T* b;
  int64_t G, cs, rows;
  int64_t c0 = 0, row0 = 0;  // the first chunk's index and the first row's (global), for masks
};

// The chained product of a tile (MFH): e_{c-1} of each row, (rows, P) of stride P, overwritten
// with e_c by each chunk that `pool_general` takes; `first`: the first of those chunks is chunk 0.
template <typename T>
struct Chain {
  T* e = nullptr;
  bool first = true;
};

// pooled[j] = Σ_r e[i] of one row's product e (P), i = r·S + j or j·R + r.
template <typename T>
inline void pool_row(const Problem& p, const T* __restrict__ e, T* __restrict__ out) {
  const int64_t S = p.S, R = p.R;
  if (p.rank_major) {
    for (int64_t j = 0; j < S; ++j) out[j] = e[j];
    for (int64_t r = 1; r < R; ++r) {
      for (int64_t j = 0; j < S; ++j) out[j] += e[r * S + j];
    }
  } else {
    for (int64_t j = 0; j < S; ++j) {
      const T* ej = e + j * R;
      T sum = 0;
      for (int64_t r = 0; r < R; ++r) sum += ej[r];
      out[j] = sum;
    }
  }
}

// Middle, forward, pooling: pooled[n, g·S + j] = Σ_r A[g, n, i] B[g, n, i] for the G chunks of
// `ab` (activated; i = r·S + j, or j·R + r).
template <typename T>
void pool(const Problem& p, const Chunks<T>& ab, Rows<T> pooled) {
  const int64_t P = p.P, S = p.S, R = p.R;
  std::vector<T> e(p.rank_major ? 0 : P);  // one chunk's product of one row, for runs of R
  for (int64_t n = 0; n < ab.rows; ++n) {
    for (int64_t g = 0; g < ab.G; ++g) {
      const T* __restrict__ ar = ab.a + g * ab.cs + n * P;
      const T* __restrict__ br = ab.b + g * ab.cs + n * P;
      T* __restrict__ out = pooled.row(n) + g * S;
      if (p.rank_major) {  // i = r·S + j: rows of S, summed in r order
        for (int64_t j = 0; j < S; ++j) out[j] = ar[j] * br[j];
        for (int64_t r = 1; r < R; ++r) {
          const int64_t o = r * S;
          for (int64_t j = 0; j < S; ++j) out[j] += ar[o + j] * br[o + j];
        }
      } else {  // i = j·R + r: runs of R
        for (int64_t i = 0; i < P; ++i) e[i] = ar[i] * br[i];
        pool_row<T>(p, e.data(), out);
      }
    }
  }
}

// z = n(pooled) over `groups` groups of `width` columns per row (signed square root, then
// / max(‖q‖, eps) as F.normalize).
template <typename T>
void normalize_rows(int64_t rows, int64_t groups, int64_t width, Rows<const T> pooled, Rows<T> z) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* pg = pooled.row(n) + g * width;
      T* zg = z.row(n) + g * width;
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

// dL/dpooled from dL/dz (overwritten in place), given pooled and z = n(pooled).
template <typename T>
void normalize_backward(int64_t rows, int64_t groups, int64_t width, Rows<const T> pooled, Rows<const T> z,
                        Rows<T> gz) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* pg = pooled.row(n) + g * width;
      const T* zg = z.row(n) + g * width;
      T* dg = gz.row(n) + g * width;
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
}

// dL/dpooled of chunk g of a row spread over the P products it sums.
template <typename T>
inline void spread_row(const Problem& p, const T* dp, T* dpx) {
  const int64_t S = p.S, R = p.R;
  if (p.rank_major) {
    for (int64_t r = 0; r < R; ++r) std::copy(dp, dp + S, dpx + r * S);
  } else {
    for (int64_t j = 0; j < S; ++j) std::fill(dpx + j * R, dpx + (j + 1) * R, dp[j]);
  }
}

// Middle, backward, unpooling: overwrite the G chunks of `ab` (activated) with dL/dA and dL/dB
// (pre-activation) from dpooled = dL/dpooled.
template <typename T, int64_t ACT>
void unpool_act(const Problem& p, const Chunks<T>& ab, Rows<const T> dpooled) {
  const int64_t P = p.P, S = p.S;
  std::vector<T> dpx(P);  // dL/dpooled spread over the P products it sums: one flat loop below
  for (int64_t n = 0; n < ab.rows; ++n) {
    for (int64_t g = 0; g < ab.G; ++g) {
      T* __restrict__ ar = ab.a + g * ab.cs + n * P;
      T* __restrict__ br = ab.b + g * ab.cs + n * P;
      spread_row<T>(p, dpooled.row(n) + g * S, dpx.data());
      const T* __restrict__ d = dpx.data();
      for (int64_t i = 0; i < P; ++i) {
        const T fa = ar[i], fb = br[i];
        // (dp · other) first: mul's backward, then the activation's, as autograd groups them.
        ar[i] = activate_backward<ACT>(d[i] * fb, fa);
        br[i] = activate_backward<ACT>(d[i] * fa, fb);
      }
    }
  }
}

// Middle, forward, chained (MFH) or with dropout (any of act(A), act(B), e masked), or both:
// e_c = drop_e((drop_a(A_c) drop_b(B_c)) e_{c-1}) for the G chunks of `ab` in order, each pooled
// into pooled[n, g·S + ·]. chain.e (null when not chained) carries e from chunk to chunk, and from
// call to call (the forward takes one chunk a call). A site without dropout keeps every element
// and scales by 1: the same bits as no mask.
template <typename T>
void pool_general(const Problem& p, const Chunks<T>& ab, Rows<T> pooled, const Chain<T>& chain) {
  const int64_t P = p.P;
  const Dropout<T> da = p.site<T>(kSiteA), db = p.site<T>(kSiteB), de = p.site<T>(kSiteE);
  std::vector<uint8_t> ka(P), kb(P), ke(P);
  std::vector<T> own(P);
  for (int64_t n = 0; n < ab.rows; ++n) {
    const int64_t row = ab.row0 + n;
    T* __restrict__ e = p.chain ? chain.e + n * P : own.data();
    for (int64_t g = 0; g < ab.G; ++g) {
      const int64_t col0 = (ab.c0 + g) * P;
      da.keep_row(ka.data(), P, row, col0);
      db.keep_row(kb.data(), P, row, col0);
      de.keep_row(ke.data(), P, row, col0);
      const T* __restrict__ ar = ab.a + g * ab.cs + n * P;
      const T* __restrict__ br = ab.b + g * ab.cs + n * P;
      const bool carry = p.chain && !(chain.first && g == 0);
      for (int64_t i = 0; i < P; ++i) {
        T v = da.of(ka[i], ar[i]) * db.of(kb[i], br[i]);
        if (carry) v = v * e[i];
        e[i] = de.on ? de.of(ke[i], v) : v;
      }
      pool_row<T>(p, e, pooled.row(n) + g * p.S);
    }
  }
}

// Middle, backward, chained or with dropout (all G chunks of a tile when chained): for each row,
// the chain e'_0 … e'_{G-2} recomputed as the forward made it, then the chunks walked backwards
// carrying dL/de_c: dL/de_c = spread(dL/dpooled_c) + dL/de_{c+1} (A_{c+1} B_{c+1}); for
// e_c = (A_c B_c) e_{c-1}, as mul's backward groups it, dL/d(A_c B_c) = dL/de_c e_{c-1} and
// dL/de_{c-1} = dL/de_c (A_c B_c). Each mask is applied where the forward applied it; a dropped
// element's gradient is 0 (selected), whatever the upstream gradient holds.
template <typename T, int64_t ACT>
void unpool_general_act(const Problem& p, const Chunks<T>& ab, Rows<const T> dpooled) {
  const int64_t P = p.P, S = p.S, G = ab.G;
  const Dropout<T> da = p.site<T>(kSiteA), db = p.site<T>(kSiteB), de = p.site<T>(kSiteE);
  std::vector<uint8_t> ka(G * P), kb(G * P), ke(G * P);
  std::vector<T> e(p.chain ? std::max<int64_t>(G - 1, 0) * P : 0), carry(P), dpx(P);
  for (int64_t n = 0; n < ab.rows; ++n) {
    const int64_t row = ab.row0 + n;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t col0 = (ab.c0 + g) * P;
      da.keep_row(ka.data() + g * P, P, row, col0);
      db.keep_row(kb.data() + g * P, P, row, col0);
      de.keep_row(ke.data() + g * P, P, row, col0);
    }
    for (int64_t g = 0; p.chain && g + 1 < G; ++g) {  // e'_0 … e'_{G-2}, as the forward made them
      const T* __restrict__ ar = ab.a + g * ab.cs + n * P;
      const T* __restrict__ br = ab.b + g * ab.cs + n * P;
      const int64_t o = g * P;
      for (int64_t i = 0; i < P; ++i) {
        T v = da.of(ka[o + i], ar[i]) * db.of(kb[o + i], br[i]);
        if (g > 0) v = v * e[o - P + i];
        e[o + i] = de.on ? de.of(ke[o + i], v) : v;
      }
    }
    for (int64_t g = G - 1; g >= 0; --g) {
      T* __restrict__ ar = ab.a + g * ab.cs + n * P;
      T* __restrict__ br = ab.b + g * ab.cs + n * P;
      spread_row<T>(p, dpooled.row(n) + g * S, dpx.data());
      const T* __restrict__ prev = p.chain && g > 0 ? e.data() + (g - 1) * P : nullptr;
      const bool carried = p.chain && g < G - 1;
      const int64_t o = g * P;
      for (int64_t i = 0; i < P; ++i) {
        const T fa = ar[i], fb = br[i];
        const T va = da.of(ka[o + i], fa), vb = db.of(kb[o + i], fb);
        T ge = carried ? dpx[i] + carry[i] : dpx[i];
        if (de.on) ge = de.of(ke[o + i], ge);
        T gab = ge;
        if (prev) {
          gab = ge * prev[i];
          carry[i] = ge * (va * vb);
        }
        const T gva = gab * vb, gvb = gab * va;
        ar[i] = activate_backward<ACT>(da.on ? da.of(ka[o + i], gva) : gva, fa);
        br[i] = activate_backward<ACT>(db.on ? db.of(kb[o + i], gvb) : gvb, fb);
      }
    }
  }
}

// The forward middle for any problem: the plain one (MFB, MUTAN, BLOCK without dropout, the fast
// path) or the general one.
template <typename T>
void pool_any(const Problem& p, const Chunks<T>& ab, Rows<T> pooled, const Chain<T>& chain) {
  if (p.masked_middle() || p.chain) {
    pool_general<T>(p, ab, pooled, chain);
  } else {
    pool<T>(p, ab, pooled);
  }
}

template <typename T>
void unpool(const Problem& p, const Chunks<T>& ab, Rows<const T> dpooled) {
  with_activation(p.act, [&](auto act) {
    if (p.masked_middle() || p.chain) {
      unpool_general_act<T, decltype(act)::value>(p, ab, dpooled);
    } else {
      unpool_act<T, decltype(act)::value>(p, ab, dpooled);
    }
  });
}

// The projections A, B (G, rows, P) as Chunks.
template <typename T>
Chunks<T> chunks_view(const at::Tensor& A, const at::Tensor& B) {
  return {A.mutable_data_ptr<T>(), B.mutable_data_ptr<T>(), A.size(0), A.stride(0), A.size(1)};
}

template <typename T>
Rows<T> rows_view(const at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0)};
}

template <typename T>
Rows<const T> crows_view(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0)};
}

// z = n(pooled) for a tile's rows, over `groups` groups of `width` columns; nothing when not
// normalised (z is then pooled itself).
template <typename T>
void normalize_tile(const Problem& p, int64_t groups, int64_t width, const at::Tensor& pooled,
                    const at::Tensor& z) {
  if (p.norm != kNoNorm) normalize_rows<T>(pooled.size(0), groups, width, crows_view<T>(pooled), rows_view<T>(z));
}

// dL/dW (C, P, d) += dAᵀ X per chunk; `first`: dL/dW = dAᵀ X (dW holds no sum yet: it is left
// unfilled, and the first GEMM writes it without reading it).
void add_weight_grad(at::Tensor dW, const at::Tensor& dA, const at::Tensor& X, bool first) {
  if (dW.size(0) == 1) {
    at::Tensor w = dW.select(0, 0);
    if (first) {
      at::mm_out(w, dA[0].t(), X[0]);
    } else {
      w.addmm_(dA[0].t(), X[0]);
    }
  } else if (first) {
    at::bmm_out(dW, dA.transpose(1, 2), X);
  } else {
    dW.baddbmm_(dA.transpose(1, 2), X);
  }
}

// Rows of dx (rows, C·d) = dA W per chunk; chain: dx (rows, d) = Σ_c dA_c W_c (every chunk read
// the same x).
void input_grad(const Problem& p, at::Tensor dx, const at::Tensor& dA, const at::Tensor& W) {
  if (W.size(0) == 1 || p.chain) {
    at::mm_out(dx, dA[0], W[0]);
    for (int64_t c = 1; c < W.size(0); ++c) dx.addmm_(dA[c], W[c]);
  } else {
    dx.view({dx.size(0), W.size(0), W.size(2)}).transpose(0, 1).copy_(at::bmm(dA, W));
  }
}

// out (rows, P) = act(X_c W[c]ᵀ + b[c]), one chunk.
void project_chunk(const Problem& p, const at::Tensor& X, const at::Tensor& W, const at::Tensor& b, int64_t c,
                   at::Tensor& out) {
  if (b.defined()) {
    at::addmm_out(out, b[c], X, W[c].t());
  } else {
    at::mm_out(out, X, W[c].t());
  }
  activate_(p, out);
}

// Columns [c·d, (c + 1)·d) of rows [r0, r0 + rows) of a (N, C·d) input, in the compute dtype;
// chain: the rows of the (N, d) input every chunk reads.
at::Tensor chunk_of(const Problem& p, const at::Tensor& x, int64_t r0, int64_t rows, int64_t c, int64_t d) {
  return x.narrow(0, r0, rows).narrow(1, p.chain ? 0 : c * d, d).to(p.acc);
}

// Each thread takes whole tiles and runs their GEMMs itself (ATen's BLAS runs single-threaded
// inside a parallel region): one parallel region per call, not one barrier per GEMM, which on
// cores shared with other processes cost up to a scheduler slice each (see the report). A tile
// goes chunk by chunk: one chunk's (rows, P) projections at a time, pooled into the tile's
// (rows, C·S) before the normalisation (which may span the chunks) and the output GEMM.
template <typename T>
void forward_tiles(const Problem& p, const at::Tensor& x, const at::Tensor& t, const at::Tensor& y) {
  const at::Tensor wo_t = p.wo.t();
  const auto [groups, width] = norm_groups(p);
  const RowBlocks& tiles = p.fwd_blocks;
  at::parallel_for(0, tiles.blocks, 1, [&](int64_t b0, int64_t b1) {
    const BelowAutograd below;
    at::Tensor A = at::empty({tiles.rows, p.P}, p.opts()), B = at::empty({tiles.rows, p.P}, p.opts());
    at::Tensor pooled = at::empty({tiles.rows, p.C * p.S}, p.opts());
    at::Tensor z = p.norm == kNoNorm ? pooled : at::empty({tiles.rows, p.C * p.S}, p.opts());
    at::Tensor E = p.chain ? at::empty({tiles.rows, p.P}, p.opts()) : at::Tensor();  // e_{c-1}
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = tiles.first(bi), rows = tiles.count(bi);
      at::Tensor a = A.narrow(0, 0, rows), b = B.narrow(0, 0, rows);
      at::Tensor pl = pooled.narrow(0, 0, rows), zt = z.narrow(0, 0, rows);
      for (int64_t c = 0; c < p.C; ++c) {
        project_chunk(p, chunk_of(p, x, r0, rows, c, p.dx), p.wx, p.bx, c, a);
        project_chunk(p, chunk_of(p, t, r0, rows, c, p.dt), p.wt, p.bt, c, b);
        Chunks<T> ab = chunks_view<T>(a.unsqueeze(0), b.unsqueeze(0));
        ab.c0 = c;
        ab.row0 = r0;
        const Rows<T> out{pl.mutable_data_ptr<T>() + c * p.S, pl.stride(0)};
        pool_any<T>(p, ab, out, {p.chain ? E.mutable_data_ptr<T>() : nullptr, c == 0});
      }
      normalize_tile<T>(p, groups, width, pl, zt);
      if (p.dropout(kSiteZ)) p.site<T>(kSiteZ).apply(zt.mutable_data_ptr<T>(), rows, p.C * p.S, zt.stride(0), r0, 0);
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
                        int64_t normalize, bool chain, double drop_in, double drop_prod, double drop_out,
                        int64_t seed) {
  BelowAutograd below;
  const Problem p = make_problem("_bilinear_fwd", x, t, wx, bx, wt, bt, wo, bo, rank, rank_major, activation,
                                 normalize, chain, drop_in, drop_prod, drop_out, seed);
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

// Backward by chunks (BLOCK with C >= threads, normalised per chunk or not at all: its chunks are
// independent): each thread takes whole chunks and goes over every tile of rows for them, so it
// owns those chunks' weight gradients (no sums across threads, and the same bits for any thread
// count). Per tile and chunk: the (rows, P) projections are recomputed, turned into dL/dA, dL/dB
// in place, and go straight into the GEMMs of the input and weight gradients.
template <typename T>
void backward_by_chunk(const Problem& p, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                       Grads& g) {
  const RowBlocks& tiles = p.bwd_blocks;
  const int64_t S = p.S;
  const Dropout<T> dz = p.site<T>(kSiteZ);
  at::parallel_for(0, p.C, 1, [&](int64_t c0, int64_t c1) {
    const BelowAutograd below;
    at::Tensor A = at::empty({tiles.rows, p.P}, p.opts()), B = at::empty({tiles.rows, p.P}, p.opts());
    at::Tensor pooled = at::empty({tiles.rows, S}, p.opts()), gz = at::empty({tiles.rows, S}, p.opts());
    at::Tensor z = p.norm == kNoNorm ? pooled : at::empty({tiles.rows, S}, p.opts());
    for (int64_t c = c0; c < c1; ++c) {
      const at::Tensor wo_c = p.wo.narrow(1, c * S, S);
      for (int64_t bi = 0; bi < tiles.blocks; ++bi) {
        const int64_t r0 = tiles.first(bi), rows = tiles.count(bi);
        at::Tensor a = A.narrow(0, 0, rows), b = B.narrow(0, 0, rows);
        at::Tensor pl = pooled.narrow(0, 0, rows), zt = z.narrow(0, 0, rows), gzt = gz.narrow(0, 0, rows);
        const at::Tensor X = chunk_of(p, x, r0, rows, c, p.dx), Tt = chunk_of(p, t, r0, rows, c, p.dt);
        project_chunk(p, X, p.wx, p.bx, c, a);  // recomputed: the forward kept nothing
        project_chunk(p, Tt, p.wt, p.bt, c, b);
        Chunks<T> ab = chunks_view<T>(a.unsqueeze(0), b.unsqueeze(0));
        ab.c0 = c;
        ab.row0 = r0;
        pool_any<T>(p, ab, rows_view<T>(pl), {});
        normalize_tile<T>(p, 1, S, pl, zt);
        const at::Tensor G = grad.narrow(0, r0, rows).to(p.acc);
        at::mm_out(gzt, G, wo_c);
        if (p.dropout(kSiteZ)) dz.apply(gzt.mutable_data_ptr<T>(), rows, S, gzt.stride(0), r0, c * S);
        if (p.norm != kNoNorm) {
          normalize_backward<T>(rows, 1, S, crows_view<T>(pl), crows_view<T>(zt), rows_view<T>(gzt));
        }
        if (p.dropout(kSiteZ)) dz.apply(zt.mutable_data_ptr<T>(), rows, S, zt.stride(0), r0, c * S);
        if (g.dwo.defined()) g.dwo.narrow(1, c * S, S).addmm_(G.t(), zt);
        unpool<T>(p, ab, crows_view<T>(gzt));  // a, b now hold dL/dA, dL/dB
        if (g.dx.defined()) {
          at::Tensor dx = g.dx.narrow(0, r0, rows).narrow(1, c * p.dx, p.dx);
          at::mm_out(dx, a, p.wx[c]);
        }
        if (g.dt.defined()) {
          at::Tensor dt = g.dt.narrow(0, r0, rows).narrow(1, c * p.dt, p.dt);
          at::mm_out(dt, b, p.wt[c]);
        }
        if (g.dwx.defined()) add_weight_grad(g.dwx.narrow(0, c, 1), a.unsqueeze(0), X.unsqueeze(0), bi == 0);
        if (g.dbx.defined()) g.dbx[c].add_(a.sum(0));
        if (g.dwt.defined()) add_weight_grad(g.dwt.narrow(0, c, 1), b.unsqueeze(0), Tt.unsqueeze(0), bi == 0);
        if (g.dbt.defined()) g.dbt[c].add_(b.sum(0));
      }
    }
  });
}

// Backward by rows (MFB, MUTAN: one chunk; BLOCK normalised over the whole row, or with fewer
// chunks than threads), in rounds of one tile per thread. In a round each thread recomputes its
// tile's projections (every chunk: the normalisation may span them) and turns them into dL/dA,
// dL/dB (and its rows of dx, dt) in the round's shared buffers; after the round, the weight
// gradients take the whole round in one GEMM each (BLAS on every thread). Per-thread copies of
// the weight gradients, summed at the end, would cost (threads - 1) times the weights' size in
// memory.
template <typename T>
void backward_by_rows(const Problem& p, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                      Grads& g) {
  const int64_t threads = at::get_num_threads(), CS = p.C * p.S, tile = p.bwd_blocks.rows;
  const auto [groups, width] = norm_groups(p);
  const int64_t round_rows = std::min(p.N, threads * tile);
  const Dropout<T> dz = p.site<T>(kSiteZ);
  at::Tensor dA = at::empty({p.C, round_rows, p.P}, p.opts()), dB = at::empty({p.C, round_rows, p.P}, p.opts());
  at::Tensor Z = at::empty({round_rows, CS}, p.opts());
  for (int64_t q0 = 0; q0 < p.N; q0 += round_rows) {
    const int64_t nq = std::min(round_rows, p.N - q0);
    at::parallel_for(0, ceil_div(nq, tile), 1, [&](int64_t b0, int64_t b1) {
      const BelowAutograd below;
      at::Tensor gz = at::empty({tile, CS}, p.opts());
      at::Tensor pooled = p.norm == kNoNorm ? at::Tensor() : at::empty({tile, CS}, p.opts());
      at::Tensor E = p.chain ? at::empty({tile, p.P}, p.opts()) : at::Tensor();
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t off = bi * tile, rows = std::min(tile, nq - off), r0 = q0 + off;
        at::Tensor A = dA.narrow(1, off, rows), B = dB.narrow(1, off, rows);
        project(p, chunks_of(p, x, r0, rows), p.wx, p.bx, A);  // recomputed: the forward kept nothing
        project(p, chunks_of(p, t, r0, rows), p.wt, p.bt, B);
        at::Tensor zt = Z.narrow(0, off, rows), gzt = gz.narrow(0, 0, rows);
        at::Tensor pl = p.norm == kNoNorm ? zt : pooled.narrow(0, 0, rows);
        Chunks<T> ab = chunks_view<T>(A, B);
        ab.row0 = r0;
        pool_any<T>(p, ab, rows_view<T>(pl), {p.chain ? E.mutable_data_ptr<T>() : nullptr, true});
        normalize_tile<T>(p, groups, width, pl, zt);
        at::mm_out(gzt, grad.narrow(0, r0, rows).to(p.acc), p.wo);
        if (p.dropout(kSiteZ)) dz.apply(gzt.mutable_data_ptr<T>(), rows, CS, gzt.stride(0), r0, 0);
        if (p.norm != kNoNorm) {
          normalize_backward<T>(rows, groups, width, crows_view<T>(pl), crows_view<T>(zt), rows_view<T>(gzt));
        }
        if (p.dropout(kSiteZ)) dz.apply(zt.mutable_data_ptr<T>(), rows, CS, zt.stride(0), r0, 0);  // for dWo
        unpool<T>(p, ab, crows_view<T>(gzt));  // A, B now hold dL/dA, dL/dB
        if (g.dx.defined()) input_grad(p, g.dx.narrow(0, r0, rows), A, p.wx);
        if (g.dt.defined()) input_grad(p, g.dt.narrow(0, r0, rows), B, p.wt);
      }
    });
    const at::Tensor A = dA.narrow(1, 0, nq), B = dB.narrow(1, 0, nq);
    if (g.dwx.defined()) add_weight_grad(g.dwx, A, chunks_of(p, x, q0, nq), q0 == 0);
    if (g.dbx.defined()) g.dbx.add_(A.sum(1));
    if (g.dwt.defined()) add_weight_grad(g.dwt, B, chunks_of(p, t, q0, nq), q0 == 0);
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
                                     int64_t normalize, const c10::List<bool>& needs, bool chain, double drop_in,
                                     double drop_prod, double drop_out, int64_t seed) {
  BelowAutograd below;
  const Problem p = make_problem("_bilinear_bwd", x, t, wx, bx, wt, bt, wo, std::nullopt, rank, rank_major,
                                 activation, normalize, chain, drop_in, drop_prod, drop_out, seed);
  TORCH_CHECK(needs.size() == 8, "fusionops::_bilinear_bwd: needs must hold 8 flags, got ", needs.size());
  check_param("_bilinear_bwd", "grad", grad, {p.N, p.O}, p.dtype);
  const auto o = p.opts();
  Grads g;
  if (needs[0]) g.dx = at::empty({p.N, x.size(1)}, o);
  if (needs[1]) g.dt = at::empty({p.N, t.size(1)}, o);
  // dwx, dwt: written by their first GEMM when there are rows (add_weight_grad's `first`).
  const auto weight_grad = [&](at::IntArrayRef shape) { return p.N > 0 ? at::empty(shape, o) : at::zeros(shape, o); };
  if (needs[2]) g.dwx = weight_grad({p.C, p.P, p.dx});
  if (needs[3] && bx) g.dbx = at::zeros({p.C, p.P}, o);
  if (needs[4]) g.dwt = weight_grad({p.C, p.P, p.dt});
  if (needs[5] && bt) g.dbt = at::zeros({p.C, p.P}, o);
  if (needs[6]) g.dwo = at::zeros({p.O, p.C * p.S}, o);
  if (p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(p.acc, "_bilinear_bwd", [&] {
      if (p.by_chunk) {
        backward_by_chunk<scalar_t>(p, grad, x, t, g);
      } else {
        backward_by_rows<scalar_t>(p, grad, x, t, g);
      }
    });
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
