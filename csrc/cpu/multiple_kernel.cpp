// CPU kernels of multiple kernel fusion (DESIGN.md section 5; contract in fusionops/ops/_kernels.py).
//
// K = Σ_m β_m k_m(G_m), G_m = A_m B_mᵀ. The output is cut into tiles of (rows, cols); a thread
// builds a tile for all modalities at once: per modality one GEMM of the tile's rows of A_m by
// its columns of B_m (BLAS single-threaded inside the parallel region, as in the other kernels)
// into a thread-local buffer, then one vectorized pass that applies k_m and adds β_m k_m to the
// tile while both are in cache. No Gram matrix of all rows is ever held: the reference makes
// 5 to 10 passes over M matrices of (N_a, N_b), this makes one pass over each small tile.
//
// The backward recomputes G_m per tile (the forward keeps nothing), turns it into
// S = β g dk/dG in place, and runs dA_m += S B_m and dB_m += Sᵀ A_m on it. Threads own blocks of
// rows of A (so dA needs no reduction); dB, the RBF column sums of E and the scalar sums (dβ,
// dparams) are summed per thread and added in thread order (ThreadSums): deterministic, at the
// cost of one (N_b, d_m) dB copy per thread and modality (the size of the inputs times the
// threads, far below one Gram matrix; a second pass over blocks of columns instead would
// recompute every G_m once more).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fusionops::cpu {
namespace {

constexpr int64_t kLinear = 0, kRbf = 1, kPolynomial = 2;

// Tiles of kTileRows x kTileCols: a float32 G buffer of 512 KB, in a core's L2 (2 MB here)
// with the tile's rows of A_m. Measured on one thread (CPU time: the shared machine was too
// loaded for wall-clock tuning) at N = 4096, widths (128, 64, 300): tiles of 128 to 512 rows by
// 256 to 512 columns are within 5% of each other, forward and backward, this one among the
// fastest of both; far larger tiles would leave threads idle at small N.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileCols = 512;

// ---- exp, vectorizable ----------------------------------------------------------------------
// std::exp does not vectorize without -ffast-math, and exp of every element of every RBF tile
// is most of the elementwise work. exp(x) for -bias · ln 2 <= x <= 0 as 2^n · exp(r),
// n = round(x / ln 2), r = x - n ln 2 (Cody-Waite: ln 2 split in two so that n·hi is exact), in
// plain arithmetic that the loops below vectorize: within 2 ulp of std::exp in float32 (Cephes'
// polynomial), 1 ulp in float64 (Taylor to r^12). At the bottom of that range n = -bias, whose
// 2^n has all-zero bits: exactly 0. The RBF loops feed it -γ min(D, max_distance(γ)), so that
// far-apart points (and D = +inf) give k = 0 exactly, as the reference's exp does where it
// underflows; only k below about 0.7 times the smallest normal number (1e-38 in float32), where
// the reference gives a subnormal, comes out 0. That bound depends on γ, known only at run
// time; a clamp of x to a constant inside exp made GCC branch on it and not vectorize the AVX2
// clones (and so did selecting k = 0 after exp). NaN must go through all of it (the reference
// gives NaN for a NaN distance): every clamp is a select whose comparison is false for NaN and
// so keeps D, `D < 0 ? 0 : D` and `D > d_max ? d_max : D`, never `D > 0 ? D : 0` (nor std::max,
// which GCC does not vectorize here either); exp_nonpositive(NaN) is NaN.

template <typename T>
struct ExpConsts;

template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  static constexpr float zero_at = -88.02969193111305f;  // -127 ln 2: exp_nonpositive gives 0
  static constexpr float round = 12582912.0f;             // 1.5 · 2^23: adding it rounds to an integer
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int mantissa = 23, bias = 127;
  static float poly(float r) {
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * r * r + r + 1.0f;
  }
};

template <>
struct ExpConsts<double> {
  using Bits = int64_t;
  static constexpr double zero_at = -709.0895657128241;  // -1023 ln 2: exp_nonpositive gives 0
  static constexpr double round = 6755399441055744.0;    // 1.5 · 2^52
  static constexpr double ln2_hi = 0.693145751953125, ln2_lo = 1.42860682030941723212e-6;
  static constexpr int mantissa = 52, bias = 1023;
  static double poly(double r) {
    // Σ_{k<=12} r^k / k!: the first term left out is below 2e-16 for |r| <= ln 2 / 2.
    double p = 1.0 / 479001600;
    p = p * r + 1.0 / 39916800;
    p = p * r + 1.0 / 3628800;
    p = p * r + 1.0 / 362880;
    p = p * r + 1.0 / 40320;
    p = p * r + 1.0 / 5040;
    p = p * r + 1.0 / 720;
    p = p * r + 1.0 / 120;
    p = p * r + 1.0 / 24;
    p = p * r + 1.0 / 6;
    p = p * r + 0.5;
    return (p * r + 1.0) * r + 1.0;
  }
};

template <typename T>
inline T exp_nonpositive(T x) {
  using C = ExpConsts<T>;
  using Bits = typename C::Bits;
  const T t = x * T(1.4426950408889634) + C::round;  // round(x / ln 2) in the low bits of t
  const T n = t - C::round;
  const T r = x - n * C::ln2_hi - n * C::ln2_lo;
  Bits tb, rb;
  std::memcpy(&tb, &t, sizeof(T));
  std::memcpy(&rb, &C::round, sizeof(T));
  // 2^n: n = tb - rb. Shifted unsigned: for a NaN x the exponent field is garbage (the result
  // is NaN anyway, from poly(r)) and a signed shift could overflow.
  using UBits = std::make_unsigned_t<Bits>;
  const Bits scale_bits = static_cast<Bits>(static_cast<UBits>(tb - rb + C::bias) << C::mantissa);
  T scale;
  std::memcpy(&scale, &scale_bits, sizeof(T));
  return C::poly(r) * scale;
}

// The largest D for which -γ D is in exp_nonpositive's range, where it gives exactly 0 (-γ D
// rounds to within an ulp of zero_at, and n = round(-γ D / ln 2) is still -bias).
template <typename T>
T max_distance(T gamma) {
  return -ExpConsts<T>::zero_at / gamma;
}

// ---- rows of a tile -------------------------------------------------------------------------
// Each applies one modality's kernel to a row of n elements of its Gram tile G. The forward ones
// add β k to acc; the backward ones add to the sums (gk: Σ g k, ps: the parameter's sum) and
// overwrite G with S = β g dk/dG.

template <typename T>
FUSIONOPS_SIMD_CLONES void linear_fwd(const T* G, T beta, T* acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += beta * G[j];
}

// k = exp(-γ clamp_min(D, 0)) of D = ‖a‖² + ‖b_j‖² - 2G, as the reference: NaN for a NaN D
// (a NaN or inf in the inputs), exactly 0 from max_distance on (far apart, or D = +inf); Dc is
// clamp_min(D, 0). (Selects, not std::min, which GCC does not vectorize here; see exp_nonpositive.)
template <typename T>
inline T rbf_k(T Dc, T gamma, T d_max) {
  return exp_nonpositive(-gamma * (Dc > d_max ? d_max : Dc));
}

template <typename T>
FUSIONOPS_SIMD_CLONES void rbf_fwd(const T* G, T sq_a, const T* sq_b, T gamma, T beta, T* acc, int64_t n) {
  const T d_max = max_distance(gamma);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T D = sq_a + sq_b[j] - T(2) * G[j];
    acc[j] += beta * rbf_k(D < T(0) ? T(0) : D, gamma, d_max);
  }
}

// y = x^p for an integer p >= 0, by squaring: a pass over the row per step. Overwrites x.
template <typename T>
FUSIONOPS_SIMD_CLONES void pow_row(T* x, int64_t p, T* y, int64_t n) {
  bool started = false;
  while (true) {
    if (p & 1) {
      if (started) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] *= x[j];
      } else {
        std::copy(x, x + n, y);
        started = true;
      }
    }
    p >>= 1;
    if (!p) break;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= x[j];
  }
  if (!started) std::fill(y, y + n, T(1));
}

// k = (G + c)^p; x, y: scratch of n elements.
template <typename T>
FUSIONOPS_SIMD_CLONES void poly_fwd(const T* G, T c, int64_t p, T beta, T* acc, T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = G[j] + c;
  pow_row(x, p, y, n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += beta * y[j];
}

template <typename T>
FUSIONOPS_SIMD_CLONES void linear_bwd(T* G, const T* g, T beta, T& gk, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    s += g[j] * G[j];
    G[j] = beta * g[j];
  }
  gk += s;
}

// E = β g k where D >= 0, else 0 (also where D is NaN: autograd's clamp_min passes gradient only
// where D >= 0), S = 2γE; ps: Σ β g k clamp_min(D, 0) (dγ = -ps; NaN where k is NaN, or 0 · inf
// where D = +inf, as autograd gives), row: Σ_j E, col[j] += E.
template <typename T>
FUSIONOPS_SIMD_CLONES void rbf_bwd(T* G, const T* g, T sq_a, const T* sq_b, T gamma, T beta, T& gk, T& ps,
                                   T& row, T* col, int64_t n) {
  const T d_max = max_distance(gamma);
  T s_gk = 0, s_ed = 0, s_e = 0;
#pragma omp simd reduction(+ : s_gk, s_ed, s_e)
  for (int64_t j = 0; j < n; ++j) {
    const T D = sq_a + sq_b[j] - T(2) * G[j];
    const T Dc = D < T(0) ? T(0) : D;
    const T gkj = g[j] * rbf_k(Dc, gamma, d_max);
    const T E = beta * (D >= T(0) ? gkj : T(0));  // (β · select: GCC vectorizes this form, not select(β·))
    s_gk += gkj;
    s_ed += beta * gkj * Dc;
    s_e += E;
    col[j] += E;
    G[j] = T(2) * gamma * E;
  }
  gk += s_gk;
  ps += s_ed;
  row += s_e;
}

// q = (G + c)^(p-1), k = q (G + c), S = β p g q; ps: Σ S (= dc).
template <typename T>
FUSIONOPS_SIMD_CLONES void poly_bwd(T* G, const T* g, T c, int64_t p, T beta, T& gk, T& ps, T* x, T* q,
                                    int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = G[j] + c;
  std::copy(x, x + n, G);  // pow_row overwrites x
  pow_row(x, p - 1, q, n);
  const T bp = beta * T(p);
  T s_gk = 0, s_s = 0;
#pragma omp simd reduction(+ : s_gk, s_s)
  for (int64_t j = 0; j < n; ++j) {
    const T S = bp * g[j] * q[j];
    s_gk += g[j] * q[j] * G[j];
    s_s += S;
    G[j] = S;
  }
  gk += s_gk;
  ps += s_s;
}

// ---- the problem ----------------------------------------------------------------------------

struct Problem {
  int M = 0;
  int64_t Na = 0, Nb = 0;
  std::vector<int64_t> d, kinds, degrees;
  std::vector<double> beta, params;
  // Contiguous copies in the compute dtype (the inputs themselves where they already are), and
  // for RBF modalities the squared norms of their rows; B shares A's where xs_b[m] is xs_a[m].
  std::vector<at::Tensor> A, B, sq_a, sq_b;
  RowBlocks rows;
  int64_t col_blocks = 0;
  // xs_b holds the very tensors of xs_a (a Gram matrix): K is symmetric, so the forward builds
  // only the tiles that reach the diagonal or above it and mirrors the rest.
  bool symmetric = true;

  int64_t col_first(int64_t c) const { return c * kTileCols; }
  int64_t col_count(int64_t c) const { return std::min(kTileCols, Nb - c * kTileCols); }
};

// Every argument of a call (no tensor is read or made).
void check_args(const char* op, at::TensorList xs_a, at::TensorList xs_b, const at::Tensor& beta,
                at::IntArrayRef kinds, const at::Tensor& params, at::IntArrayRef degrees) {
  check_modalities(op, xs_a, std::nullopt);
  TORCH_CHECK(xs_b.size() == xs_a.size(), "fusionops::", op, ": xs_a has ", xs_a.size(), " modalities but xs_b has ",
              xs_b.size());
  check_modalities(op, xs_b, std::nullopt);
  const auto dtype = xs_a[0].scalar_type();
  const auto acc = at::toOpMathType(dtype);
  const int M = static_cast<int>(xs_a.size());
  TORCH_CHECK(xs_b[0].scalar_type() == dtype, "fusionops::", op, ": xs_b has dtype ", xs_b[0].scalar_type(),
              " but xs_a has ", dtype);
  TORCH_CHECK(static_cast<int>(kinds.size()) == M && static_cast<int>(degrees.size()) == M, "fusionops::", op,
              ": kinds and degrees must have M = ", M, " entries, got ", kinds.size(), " and ", degrees.size());
  TORCH_CHECK(beta.device().is_cpu() && beta.scalar_type() == dtype && beta.dim() == 1 && beta.size(0) == M,
              "fusionops::", op, ": beta must be a ", dtype, " cpu tensor of shape (", M, "), got ",
              beta.scalar_type(), " on ", beta.device(), " of shape ", beta.sizes());
  TORCH_CHECK(params.device().is_cpu() && params.scalar_type() == acc && params.dim() == 1 && params.size(0) == M,
              "fusionops::", op, ": params must be a ", acc, " cpu tensor of shape (", M, "), got ",
              params.scalar_type(), " on ", params.device(), " of shape ", params.sizes());
  for (int m = 0; m < M; ++m) {
    const int64_t dm = xs_a[m].size(1);
    TORCH_CHECK(xs_b[m].size(1) == dm, "fusionops::", op, ": xs_b[", m, "] has width ", xs_b[m].size(1),
                " but xs_a[", m, "] has ", dm);
    TORCH_CHECK(kinds[m] == kLinear || kinds[m] == kRbf || kinds[m] == kPolynomial, "fusionops::", op,
                ": kinds[", m, "] = ", kinds[m], " is not 0 (linear), 1 (rbf) or 2 (polynomial)");
    TORCH_CHECK(kinds[m] != kPolynomial || degrees[m] >= 1, "fusionops::", op, ": degrees[", m,
                "] must be >= 1, got ", degrees[m]);
  }
}

// The arguments of a call that check_args accepted, as the tiled kernels take them.
Problem make_problem(at::TensorList xs_a, at::TensorList xs_b, const at::Tensor& beta, at::IntArrayRef kinds,
                     const at::Tensor& params, at::IntArrayRef degrees) {
  const auto acc = at::toOpMathType(xs_a[0].scalar_type());
  Problem p;
  p.M = static_cast<int>(xs_a.size());
  p.Na = xs_a[0].size(0);
  p.Nb = xs_b[0].size(0);
  const at::Tensor beta64 = beta.to(at::kDouble).contiguous(), params64 = params.to(at::kDouble).contiguous();
  for (int m = 0; m < p.M; ++m) {
    const int64_t dm = xs_a[m].size(1);
    p.d.push_back(dm);
    p.kinds.push_back(kinds[m]);
    p.degrees.push_back(degrees[m]);
    p.beta.push_back(beta64.const_data_ptr<double>()[m]);
    p.params.push_back(params64.const_data_ptr<double>()[m]);
    const bool same = xs_b[m].is_same(xs_a[m]);
    p.symmetric = p.symmetric && same;
    p.A.push_back(xs_a[m].to(acc).contiguous());
    p.B.push_back(same ? p.A.back() : xs_b[m].to(acc).contiguous());
    if (kinds[m] == kRbf) {
      p.sq_a.push_back(p.A.back().square().sum(1));
      p.sq_b.push_back(same ? p.sq_a.back() : p.B.back().square().sum(1));
    } else {
      p.sq_a.emplace_back();
      p.sq_b.emplace_back();
    }
  }
  p.rows = row_blocks(p.Na, kTileRows);
  p.col_blocks = ceil_div(p.Nb, kTileCols);
  return p;
}

// ---- forward --------------------------------------------------------------------------------

// Symmetric case: the first column block built for row block rb, the one holding its first row.
// Every row i of the block then has columns [i, Nb) built, and column i of any earlier row j < i
// too (its own first built column is at most j).
int64_t first_built_col_block(const Problem& p, int64_t rb) { return p.rows.first(rb) / kTileCols; }

// Symmetric case: K[i, j] = K[j, i] for the columns j left of row i's first built column block,
// copied in 64 x 64 blocks so that the column reads stay in cache.
template <typename scalar_t>
void mirror_unbuilt(const Problem& p, scalar_t* out) {
  constexpr int64_t kBlock = 64;
  const int64_t N = p.Na;
  auto unbuilt = [&](int64_t i) { return first_built_col_block(p, i / p.rows.rows) * kTileCols; };
  at::parallel_for(0, ceil_div(N, kBlock), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, i1 = std::min(N, i0 + kBlock);
      const int64_t widest = unbuilt(i1 - 1);  // non-decreasing in i
      for (int64_t j0 = 0; j0 < widest; j0 += kBlock) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t j1 = std::min({j0 + kBlock, unbuilt(i)});
          for (int64_t j = j0; j < j1; ++j) out[i * N + j] = out[j * N + i];
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Problem& p, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<scalar_t, T>;  // the tile is summed straight in out
  const auto opts = p.A[0].options();
  scalar_t* out_ = out.mutable_data_ptr<scalar_t>();
  // The tiles to build, row block by row block: all of them, or in the symmetric case those from
  // the column block holding the row block's first row on (the rest is mirrored below).
  std::vector<int64_t> tiles;
  for (int64_t rb = 0; rb < p.rows.blocks; ++rb) {
    for (int64_t cb = p.symmetric ? first_built_col_block(p, rb) : 0; cb < p.col_blocks; ++cb) {
      tiles.push_back(rb * p.col_blocks + cb);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    const BelowAutograd below_autograd;  // the inputs may require grad
    at::Tensor G = at::empty({kTileRows * kTileCols}, opts);
    std::vector<T> acc_buf(in_place ? 0 : kTileRows * kTileCols), x(kTileCols), y(kTileCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = tiles[t] / p.col_blocks, cb = tiles[t] % p.col_blocks;
      const int64_t r0 = p.rows.first(rb), nr = p.rows.count(rb);
      const int64_t c0 = p.col_first(cb), nc = p.col_count(cb);
      // Row i of the tile: out row r0 + i from column c0 (in place), or the thread's buffer.
      auto acc_row = [&](int64_t i) -> T* {
        if constexpr (in_place) {
          return out_ + (r0 + i) * p.Nb + c0;
        } else {
          return acc_buf.data() + i * nc;
        }
      };
      for (int64_t i = 0; i < nr; ++i) std::fill(acc_row(i), acc_row(i) + nc, T(0));
      for (int m = 0; m < p.M; ++m) {
        at::Tensor Gt = G.narrow(0, 0, nr * nc).view({nr, nc});
        at::mm_out(Gt, p.A[m].narrow(0, r0, nr), p.B[m].narrow(0, c0, nc).t());
        const T* G_ = Gt.const_data_ptr<T>();
        const T beta = static_cast<T>(p.beta[m]), param = static_cast<T>(p.params[m]);
        for (int64_t i = 0; i < nr; ++i) {
          const T* Gi = G_ + i * nc;
          if (p.kinds[m] == kLinear) {
            linear_fwd(Gi, beta, acc_row(i), nc);
          } else if (p.kinds[m] == kRbf) {
            rbf_fwd(Gi, p.sq_a[m].const_data_ptr<T>()[r0 + i], p.sq_b[m].const_data_ptr<T>() + c0, param, beta,
                    acc_row(i), nc);
          } else {
            poly_fwd(Gi, param, p.degrees[m], beta, acc_row(i), x.data(), y.data(), nc);
          }
        }
      }
      if constexpr (!in_place) {
        for (int64_t i = 0; i < nr; ++i) store_n(acc_row(i), out_ + (r0 + i) * p.Nb + c0, nc);
      }
    }
  });
  if (p.symmetric) mirror_unbuilt(p, out_);
}

// ---- backward -------------------------------------------------------------------------------

// What the backward computes: the four flags of `needs`, and per modality whether its tiles are
// needed at all (a linear modality gives nothing to dparams).
struct Needs {
  bool dA, dB, dbeta, dparams;
  std::vector<char> modality;

  Needs(const Problem& p, const c10::List<bool>& flags)
      : dA(flags[0]), dB(flags[1]), dbeta(flags[2]), dparams(flags[3]) {
    for (int m = 0; m < p.M; ++m) {
      modality.push_back(dA || dB || dbeta || (dparams && p.kinds[m] != kLinear));
    }
  }
};

// The per-thread sums: (2, M) scalars in float64 (Σ g k per modality, then the parameter's sum),
// then dB_m and the RBF column sums of E (undefined where not needed).
struct Sums {
  at::Tensor scalars;
  std::vector<at::Tensor> dB, col;

  std::vector<at::Tensor> all() const {
    std::vector<at::Tensor> v{scalars};
    v.insert(v.end(), dB.begin(), dB.end());
    v.insert(v.end(), col.begin(), col.end());
    return v;
  }
};

template <typename scalar_t>
void backward_kernel(const Problem& p, const Needs& need, const at::Tensor& grad, std::vector<at::Tensor>& dA,
                     const Sums& totals) {
  using T = at::opmath_type<scalar_t>;
  const auto opts = p.A[0].options();
  const scalar_t* grad_ = grad.const_data_ptr<scalar_t>();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  ThreadSums sums(totals.all());
  at::parallel_for(0, p.rows.blocks, 1, [&](int64_t b0, int64_t b1) {
    const BelowAutograd below_autograd;
    std::vector<at::Tensor>& mine = sums.mine();
    double* scalars = mine[0].mutable_data_ptr<double>();
    at::Tensor G = at::empty({kTileRows * kTileCols}, opts);
    std::vector<T> g(kTileRows * kTileCols), x(kTileCols), q(kTileCols);
    std::vector<T> row_e(static_cast<size_t>(p.M) * kTileRows);  // Σ_j E of each row, per RBF modality
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = p.rows.first(rb), nr = p.rows.count(rb);
      std::fill(row_e.begin(), row_e.end(), T(0));
      for (int64_t cb = 0; cb < p.col_blocks; ++cb) {
        const int64_t c0 = p.col_first(cb), nc = p.col_count(cb);
        for (int64_t i = 0; i < nr; ++i) load_n(grad_ + (r0 + i) * gs0 + c0 * gs1, gs1, g.data() + i * nc, nc);
        for (int m = 0; m < p.M; ++m) {
          if (!need.modality[m]) continue;
          const at::Tensor Ar = p.A[m].narrow(0, r0, nr), Bc = p.B[m].narrow(0, c0, nc);
          at::Tensor Gt = G.narrow(0, 0, nr * nc).view({nr, nc});
          at::mm_out(Gt, Ar, Bc.t());
          T* G_ = Gt.mutable_data_ptr<T>();
          const T beta = static_cast<T>(p.beta[m]), param = static_cast<T>(p.params[m]);
          T gk = 0, ps = 0;
          for (int64_t i = 0; i < nr; ++i) {
            T* Gi = G_ + i * nc;
            const T* gi = g.data() + i * nc;
            if (p.kinds[m] == kLinear) {
              linear_bwd(Gi, gi, beta, gk, nc);
            } else if (p.kinds[m] == kRbf) {
              // The column sums of E only feed dB; without it they go to scratch.
              T* col = need.dB ? mine[1 + p.M + m].mutable_data_ptr<T>() + c0 : x.data();
              rbf_bwd(Gi, gi, p.sq_a[m].const_data_ptr<T>()[r0 + i], p.sq_b[m].const_data_ptr<T>() + c0, param, beta,
                      gk, ps, row_e[m * kTileRows + i], col, nc);
            } else {
              poly_bwd(Gi, gi, param, p.degrees[m], beta, gk, ps, x.data(), q.data(), nc);
            }
          }
          scalars[m] += gk;
          scalars[p.M + m] += ps;
          if (need.dA) dA[m].narrow(0, r0, nr).addmm_(Gt, Bc);          // dA_m += S B_m
          if (need.dB) mine[1 + m].narrow(0, c0, nc).addmm_(Gt.t(), Ar);  // dB_m += Sᵀ A_m
        }
      }
      // RBF: dA_m -= 2γ rowsum(E) ⊙ A_m on the block's rows.
      for (int m = 0; m < p.M; ++m) {
        if (!need.dA || p.kinds[m] != kRbf) continue;
        const T two_gamma = T(2) * static_cast<T>(p.params[m]);
        const T* a = p.A[m].const_data_ptr<T>();
        T* da = dA[m].mutable_data_ptr<T>();
        for (int64_t i = 0; i < nr; ++i) {
          const T w = two_gamma * row_e[m * kTileRows + i];
          const int64_t off = (r0 + i) * p.d[m];
          for (int64_t e = 0; e < p.d[m]; ++e) da[off + e] -= w * a[off + e];
        }
      }
    }
  });
  sums.reduce();
}

// ---- the ops ----------------------------------------------------------------------------------
// (each skips autograd for its inner ATen calls: see BelowAutograd in common.h)

// ---- small problems: plain loops, no ATen call beyond the output ----------------------------
// At research batch sizes and below (N_a·N_b·Σd of a few thousand) make_problem's conversions
// and the tiles' GEMM calls cost several times their arithmetic (a tiny call, N = 8 and widths
// (4, 4): 14 µs raw, most of it ATen calls). Up to kSmallWork multiply-adds a forward reads its
// inputs through their strides, forms each row of G_m with plain dot products (k ascending, so
// G[i, j] and G[j, i] of a Gram matrix are the same products summed in the same order: K stays
// exactly symmetric) and applies the tiles' row functions. Never parallel: at this size a thread
// hand-off costs more than the work.
constexpr int64_t kSmallWork = int64_t{1} << 15;
// The limit in force: kSmallWork unless the tests move it (_mkl_small_work): 0 sends every
// call to the tiles, a huge limit every call to the loops.
std::atomic<int64_t> small_work{kSmallWork};

// Sets the limit (limit < 0: leaves it) and returns the previous one.
int64_t set_small_work(int64_t limit) { return limit < 0 ? small_work.load() : small_work.exchange(limit); }

bool is_small(at::TensorList xs_a, at::TensorList xs_b) {
  int64_t width = 0;
  for (const at::Tensor& x : xs_a) width += x.size(1);
  return xs_a[0].size(0) * xs_b[0].size(0) * width <= small_work.load();
}

// One modality's rows as pointers and strides, read in the compute dtype.
template <typename scalar_t>
struct SmallSide {
  const scalar_t* x;
  int64_t s0, s1;
  explicit SmallSide(const at::Tensor& t) : x(t.const_data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)) {}
  at::opmath_type<scalar_t> at(int64_t i, int64_t k) const { return x[i * s0 + k * s1]; }
};

template <typename scalar_t>
void small_forward_kernel(at::TensorList xs_a, at::TensorList xs_b, const at::Tensor& beta, at::IntArrayRef kinds,
                          const at::Tensor& params, at::IntArrayRef degrees, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const int M = static_cast<int>(xs_a.size());
  const int64_t Na = xs_a[0].size(0), Nb = xs_b[0].size(0);
  const scalar_t* beta_ = beta.const_data_ptr<scalar_t>();
  const T* params_ = params.const_data_ptr<T>();  // the compute dtype (checked)
  std::vector<T> G(Nb), x(Nb), y(Nb), sq_a(Na), sq_b(Nb);
  std::vector<T> K(Na * Nb, T(0));  // Σ_m β_m k_m so far, in the compute dtype
  // Per modality: the rows' squared norms (RBF), then G and β k row by row.
  for (int m = 0; m < M; ++m) {
    const SmallSide<scalar_t> a(xs_a[m]), b(xs_b[m]);
    const int64_t d = xs_a[m].size(1);
    const T bm = static_cast<T>(beta_[m * beta.stride(0)]), param = params_[m * params.stride(0)];
    if (kinds[m] == kRbf) {
      auto norms = [&](const SmallSide<scalar_t>& side, int64_t rows, std::vector<T>& sq) {
        for (int64_t i = 0; i < rows; ++i) {
          T s = 0;
          for (int64_t k = 0; k < d; ++k) s += side.at(i, k) * side.at(i, k);
          sq[i] = s;
        }
      };
      norms(a, Na, sq_a);
      norms(b, Nb, sq_b);
    }
    for (int64_t i = 0; i < Na; ++i) {
      for (int64_t j = 0; j < Nb; ++j) {
        T s = 0;
        for (int64_t k = 0; k < d; ++k) s += a.at(i, k) * b.at(j, k);
        G[j] = s;
      }
      T* Ki = K.data() + i * Nb;
      if (kinds[m] == kLinear) {
        linear_fwd(G.data(), bm, Ki, Nb);
      } else if (kinds[m] == kRbf) {
        rbf_fwd(G.data(), sq_a[i], sq_b.data(), param, bm, Ki, Nb);
      } else {
        poly_fwd(G.data(), param, degrees[m], bm, Ki, x.data(), y.data(), Nb);
      }
    }
  }
  scalar_t* out_ = out.mutable_data_ptr<scalar_t>();
  for (int64_t e = 0; e < Na * Nb; ++e) out_[e] = static_cast<scalar_t>(K[e]);
}

at::Tensor mkl_fwd(at::TensorList xs_a, at::TensorList xs_b, const at::Tensor& beta, at::IntArrayRef kinds,
                   const at::Tensor& params, at::IntArrayRef degrees) {
  constexpr const char* kOp = "_mkl_fwd";
  const BelowAutograd below_autograd;
  check_args(kOp, xs_a, xs_b, beta, kinds, params, degrees);
  const auto dtype = xs_a[0].scalar_type();
  if (is_small(xs_a, xs_b)) {
    at::Tensor out = at::empty({xs_a[0].size(0), xs_b[0].size(0)}, xs_a[0].options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp, [&] {
      small_forward_kernel<scalar_t>(xs_a, xs_b, beta, kinds, params, degrees, out);
    });
    return out;
  }
  const Problem p = make_problem(xs_a, xs_b, beta, kinds, params, degrees);
  at::Tensor out = at::empty({p.Na, p.Nb}, xs_a[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp, [&] { forward_kernel<scalar_t>(p, out); });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> mkl_bwd(
    const at::Tensor& grad, at::TensorList xs_a, at::TensorList xs_b, const at::Tensor& beta, at::IntArrayRef kinds,
    const at::Tensor& params, at::IntArrayRef degrees, const c10::List<bool>& needs) {
  constexpr const char* kOp = "_mkl_bwd";
  const BelowAutograd below_autograd;
  check_args(kOp, xs_a, xs_b, beta, kinds, params, degrees);
  const Problem p = make_problem(xs_a, xs_b, beta, kinds, params, degrees);
  const auto dtype = xs_a[0].scalar_type();
  const auto opts = p.A[0].options();  // the compute dtype
  TORCH_CHECK(needs.size() == 4, "fusionops::", kOp, ": needs must have 4 flags, got ", needs.size());
  check_2d(kOp, "grad", grad, p.Na, p.Nb, dtype);
  const Needs need(p, needs);
  std::vector<at::Tensor> dA;
  Sums totals;
  totals.scalars = at::zeros({2, p.M}, opts.dtype(at::kDouble));
  for (int m = 0; m < p.M; ++m) {
    if (need.dA) dA.push_back(at::zeros({p.Na, p.d[m]}, opts));
    totals.dB.push_back(need.dB ? at::zeros({p.Nb, p.d[m]}, opts) : at::Tensor());
    totals.col.push_back(need.dB && p.kinds[m] == kRbf ? at::zeros({p.Nb}, opts) : at::Tensor());
  }
  if (need.dA || need.dB || need.dbeta || need.dparams) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp,
                                    [&] { backward_kernel<scalar_t>(p, need, grad, dA, totals); });
  }
  std::vector<at::Tensor> dxs_a, dxs_b;
  for (int m = 0; m < p.M; ++m) {
    if (need.dA) dxs_a.push_back(dA[m].to(dtype));
    if (need.dB) {
      at::Tensor dB = totals.dB[m];
      if (p.kinds[m] == kRbf) dB.sub_(totals.col[m].unsqueeze(1) * p.B[m], 2 * p.params[m]);  // -2γ colsum(E) ⊙ B_m
      dxs_b.push_back(dB.to(dtype));
    }
  }
  at::Tensor dbeta = need.dbeta ? totals.scalars[0].to(dtype) : at::empty({0}, beta.options());
  at::Tensor dparams = at::empty({0}, params.options());
  if (need.dparams) {
    // dγ = -Σ β g k clamp_min(D, 0) for RBF, dc = Σ S for polynomial, 0 for linear.
    std::vector<double> sign;
    for (int m = 0; m < p.M; ++m) sign.push_back(p.kinds[m] == kRbf ? -1.0 : p.kinds[m] == kPolynomial ? 1.0 : 0.0);
    dparams = (totals.scalars[1] * at::tensor(sign, opts.dtype(at::kDouble))).to(params.scalar_type());
  }
  return {std::move(dxs_a), std::move(dxs_b), dbeta, dparams};
}

}  // namespace
}  // namespace fusionops::cpu

// A test knob, not a kernel (see kSmallWork): no tensor argument, so the dispatcher serves it
// from the CompositeExplicitAutograd key.
TORCH_LIBRARY_IMPL(fusionops, CompositeExplicitAutograd, m) {
  m.impl("_mkl_small_work", &fusionops::cpu::set_small_work);
}

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_mkl_fwd", &fusionops::cpu::mkl_fwd);
  m.impl("_mkl_bwd", &fusionops::cpu::mkl_bwd);
}
