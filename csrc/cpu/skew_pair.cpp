// CPU kernels of sparse skew-pair attention (DESIGN.md section 4; contract in
// fusionops/ops/_kernels.py).
//
// out[n, p] = ha[n, i_p] + c[n, p] Woᵀ + bo, where per head c is the softmax(q·k / √dh)-weighted
// sum of the values of the B layers within `window` of j_p, and q is projected from ha[n, i_p].
// The pairs share layers, so a block of rows projects each layer it needs once, not once per
// pair: q for the distinct A layers of the pairs ("A slots"), k and v for the union of their
// bands ("B slots"), each one GEMM of (rows · slots, D) by (D, D). The attention itself is a few
// dot products per pair and head (a band has at most 2·window + 1 layers) in plain loops, then
// c Woᵀ is one GEMM of (rows · P, D) per block.
//
// With window 0 (or a stack B of one layer) every softmax is over one score: α = 1 where that
// score is finite and NaN where it is not, as softmax gives (and its gradient ds = α (dα - α dα)
// is 0, or NaN where dα is not finite). A block first tries to prove every one of its scores (and,
// in backward, every dα) finite from bounds: the largest |element| of its rows of ha and hb
// (O(rows · D) beside the O(rows · D²) of its GEMMs) and of the weights (one pass over wq and wk,
// and wv and wo in backward, per call); proven, it takes α = 1 and ds = 0 and computes neither q
// nor k (c = v of layer j_p). A block that cannot prove it (a NaN or inf in its inputs or the
// weights, or values near overflow) computes its scores as with a window, so that every NaN and
// inf comes out where the reference's softmax puts it.
//
// Each thread takes a share of the blocks of rows and runs the GEMMs itself (BLAS
// single-threaded inside the parallel region), as the low-rank fusion kernels do. Nothing of
// the whole batch is held but the inputs and outputs: the backward recomputes q, k, v, α and c
// per block (the forward saves nothing), and sums the weight and bias gradients per thread,
// added in thread order at the end (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fusionops::cpu {
namespace {

// Rows of the block GEMMs: a block has kGemmRows / (most slots or pairs) rows of the batch, so
// that its GEMMs have about kGemmRows rows. Measured with 2 threads at N = 256, D = 768, 5 pairs
// (7 B slots at window 2), forward + backward: 192 to 512 are within 2% of each other (256 gives
// blocks of 32 rows), 128 is 5% slower and 64 is 15% slower; larger blocks leave a thread
// without work at small N.
constexpr int64_t kGemmRows = 256;

// ---- the problem ----------------------------------------------------------------------------

struct Problem {
  int64_t N = 0, La = 0, Lb = 0, D = 0, P = 0, H = 1, dh = 1;
  int64_t window = 0;                  // clipped to Lb - 1: a wider band is the whole stack
  bool attend = false;                 // window > 0: a softmax over more than one layer
  std::vector<int64_t> a_layer;        // A slot -> layer of A, increasing
  std::vector<int64_t> b_layer;        // B slot -> layer of B, increasing
  std::vector<int64_t> a_slot;         // layer of A -> its slot, or -1
  std::vector<int64_t> b_slot;         // layer of B -> its slot, or -1
  std::vector<int64_t> pa, pb, plen;   // pair -> A slot of i_p, B slot of its band's first layer,
                                       // band length (a band's slots are consecutive)
  int64_t nA = 0, nB = 0, band = 1;    // slots, the longest band
  RowBlocks blocks;
};

Problem make_problem(const char* op, const at::Tensor& ha, const at::Tensor& hb, const at::Tensor& pairs,
                     int64_t heads, int64_t window) {
  const auto dtype = ha.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusionops::", op, ": expected float16, bfloat16, float32 or float64 inputs, got ", dtype);
  TORCH_CHECK(ha.device().is_cpu() && ha.dim() == 3 && ha.size(1) >= 1 && ha.size(2) >= 1, "fusionops::", op,
              ": ha must be a cpu tensor (N, La, D) with La, D >= 1, got shape ", ha.sizes(), " on ", ha.device());
  TORCH_CHECK(hb.device().is_cpu() && hb.scalar_type() == dtype && hb.dim() == 3 && hb.size(0) == ha.size(0) &&
                  hb.size(1) >= 1 && hb.size(2) == ha.size(2),
              "fusionops::", op, ": hb must be a ", dtype, " cpu tensor (", ha.size(0), ", Lb, ", ha.size(2),
              "), got ", hb.scalar_type(), " on ", hb.device(), " of shape ", hb.sizes());
  TORCH_CHECK(pairs.device().is_cpu() && pairs.scalar_type() == at::kLong && pairs.dim() == 2 &&
                  pairs.size(0) >= 1 && pairs.size(1) == 2 && pairs.is_contiguous(),
              "fusionops::", op, ": pairs must be a contiguous int64 cpu tensor (P, 2) with P >= 1, got ",
              pairs.scalar_type(), " on ", pairs.device(), " of shape ", pairs.sizes());
  Problem p;
  p.N = ha.size(0);
  p.La = ha.size(1);
  p.Lb = hb.size(1);
  p.D = ha.size(2);
  p.P = pairs.size(0);
  TORCH_CHECK(heads >= 1 && p.D % heads == 0, "fusionops::", op, ": heads = ", heads, " must divide D = ", p.D);
  TORCH_CHECK(window >= 0, "fusionops::", op, ": window must be >= 0, got ", window);
  p.H = heads;
  p.dh = p.D / heads;
  p.window = std::min(window, p.Lb - 1);
  p.attend = p.window > 0;
  // The layers in use, then their slots.
  const int64_t* ij = pairs.const_data_ptr<int64_t>();
  std::vector<char> used_a(p.La, 0), used_b(p.Lb, 0);
  for (int64_t k = 0; k < p.P; ++k) {
    const int64_t i = ij[2 * k], j = ij[2 * k + 1];
    TORCH_CHECK(0 <= i && i < p.La && 0 <= j && j < p.Lb, "fusionops::", op, ": pair ", k, " = (", i, ", ", j,
                ") is out of range for La = ", p.La, ", Lb = ", p.Lb);
    used_a[i] = 1;
    for (int64_t l = std::max<int64_t>(0, j - p.window); l <= std::min(p.Lb - 1, j + p.window); ++l) used_b[l] = 1;
  }
  p.a_slot.assign(p.La, -1);
  p.b_slot.assign(p.Lb, -1);
  for (int64_t l = 0; l < p.La; ++l) {
    if (used_a[l]) p.a_slot[l] = static_cast<int64_t>(p.a_layer.size()), p.a_layer.push_back(l);
  }
  for (int64_t l = 0; l < p.Lb; ++l) {
    if (used_b[l]) p.b_slot[l] = static_cast<int64_t>(p.b_layer.size()), p.b_layer.push_back(l);
  }
  p.nA = static_cast<int64_t>(p.a_layer.size());
  p.nB = static_cast<int64_t>(p.b_layer.size());
  for (int64_t k = 0; k < p.P; ++k) {
    const int64_t i = ij[2 * k], j = ij[2 * k + 1];
    const int64_t lo = std::max<int64_t>(0, j - p.window), hi = std::min(p.Lb - 1, j + p.window);
    p.pa.push_back(p.a_slot[i]);
    p.pb.push_back(p.b_slot[lo]);
    p.plen.push_back(hi - lo + 1);
    p.band = std::max(p.band, hi - lo + 1);
  }
  p.blocks = row_blocks(p.N, kGemmRows / std::max({p.nA, p.nB, p.P}));
  return p;
}

// The largest |element| of x[0, n), or +inf when one of them is NaN or ±inf.
template <typename T>
FUSIONOPS_SIMD_CLONES T max_abs_run(const T* x, int64_t n) {
  T top = 0, poison = 0;  // poison: x · 0 is NaN exactly where x is not finite
#pragma omp simd reduction(max : top) reduction(+ : poison)
  for (int64_t e = 0; e < n; ++e) {
    top = std::max(top, std::abs(x[e]));
    poison += x[e] * T(0);
  }
  return poison == T(0) ? top : std::numeric_limits<T>::infinity();
}

// max_abs_run over a contiguous tensor of the compute dtype (0 when undefined), in parallel: a
// (D, D) weight is read once per call, beside the rows · D² work of a GEMM.
double max_abs(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0.0;
  double top = 0.0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "max_abs", [&] {
    const scalar_t* x = t.const_data_ptr<scalar_t>();
    const int64_t n = t.numel(), grain = kGrainElems * 4;
    std::vector<scalar_t> part(ceil_div(n, grain), 0);
    at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) part[c] = max_abs_run(x + c * grain, std::min(grain, n - c * grain));
    });
    for (const scalar_t m : part) top = std::max(top, static_cast<double>(m));
  });
  return top;
}

// The parameters in the compute dtype, contiguous (a copy only where the dtype or layout
// differs), every bias undefined when None; with one-key bands, the bounds that prove scores
// (and dα) finite.
struct Params {
  at::Tensor wq, wk, wv, wo, bq, bk, bv, bo;
  // Largest |element| (+inf when one is not finite; 0 for a missing bias): wq, wk, bq, bk for
  // the scores, wv, bv, wo for dα = dc · v (backward).
  double mq = 0, mk = 0, mbq = 0, mbk = 0, mv = 0, mbv = 0, mo = 0;
};

Params make_params(const char* op, const Problem& p, at::ScalarType dtype, const at::Tensor& wq,
                   const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& wo,
                   const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk,
                   const std::optional<at::Tensor>& bv, const std::optional<at::Tensor>& bo,
                   bool value_bounds) {
  const auto acc = at::toOpMathType(dtype);
  check_2d(op, "wq", wq, p.D, p.D, dtype);
  check_2d(op, "wk", wk, p.D, p.D, dtype);
  check_2d(op, "wv", wv, p.D, p.D, dtype);
  check_2d(op, "wo", wo, p.D, p.D, dtype);
  auto bias = [&](const char* name, const std::optional<at::Tensor>& b) {
    if (!b) return at::Tensor();
    TORCH_CHECK(b->device().is_cpu() && b->scalar_type() == dtype && b->dim() == 1 && b->size(0) == p.D,
                "fusionops::", op, ": ", name, " must be a ", dtype, " cpu tensor of shape (", p.D, "), got ",
                b->scalar_type(), " on ", b->device(), " of shape ", b->sizes());
    return b->to(acc).contiguous();
  };
  auto weight = [&](const at::Tensor& w) { return w.to(acc).contiguous(); };
  Params w;
  w.wq = weight(wq);  // one-key bands: for the blocks that cannot prove their scores finite
  w.wk = weight(wk);
  w.bq = bias("bq", bq);
  w.bk = bias("bk", bk);
  w.wv = weight(wv);
  w.wo = weight(wo);
  w.bv = bias("bv", bv);
  w.bo = bias("bo", bo);
  if (!p.attend) {
    w.mq = max_abs(w.wq), w.mk = max_abs(w.wk), w.mbq = max_abs(w.bq), w.mbk = max_abs(w.bk);
    if (value_bounds) w.mv = max_abs(w.wv), w.mbv = max_abs(w.bv), w.mo = max_abs(w.wo);
  }
  return w;
}

// Whether x · y, a dot of `len` products of factors below fx and fy in magnitude, is finite
// whatever the order of its sums: each factor and the dot below half the largest finite value.
// Every bound is an upper bound (|x_e| <= a · D · max|W| + max|b| for a projection of a row
// below a), and the 2 covers the rounding of sums of up to millions of terms (γ_n << 1).
bool dot_is_finite(double fx, double fy, int64_t len, double largest) {
  const double half = largest / 2;
  return fx <= half && fy <= half && static_cast<double>(len) * fx * fy <= half;  // false for NaN
}

// ---- rows of a block ------------------------------------------------------------------------

// dst (nb · count, D) = h[n, layers[l]] for n in [r0, r0 + nb), l in [0, count), in the compute
// dtype; layers == nullptr reads layers 0 … count - 1. h is (N, L, D) of any strides.
template <typename scalar_t, typename T>
void load_layers(const at::Tensor& h, const int64_t* layers, int64_t count, int64_t r0, int64_t nb, T* dst) {
  const scalar_t* src = h.const_data_ptr<scalar_t>();
  const int64_t s0 = h.stride(0), s1 = h.stride(1), s2 = h.stride(2), D = h.size(2);
  for (int64_t n = 0; n < nb; ++n) {
    for (int64_t l = 0; l < count; ++l) {
      const int64_t layer = layers ? layers[l] : l;
      load_n(src + (r0 + n) * s0 + layer * s1, s2, dst + (n * count + l) * D, D);
    }
  }
}

// Rows [r0, r0 + nb) of dh (N, L, D), contiguous in the input dtype: the rows of d (nb · slots,
// D) at the layers of their slots, zero at the other layers.
template <typename scalar_t, typename T>
void store_layers(const T* d, const std::vector<int64_t>& slot_of_layer, int64_t slots, int64_t r0, int64_t nb,
                  int64_t D, scalar_t* dh) {
  const int64_t L = static_cast<int64_t>(slot_of_layer.size());
  for (int64_t n = 0; n < nb; ++n) {
    for (int64_t l = 0; l < L; ++l) {
      scalar_t* dst = dh + ((r0 + n) * L + l) * D;
      const int64_t s = slot_of_layer[l];
      if (s < 0) {
        std::fill(dst, dst + D, scalar_t(0));
      } else {
        store_n(d + (n * slots + s) * D, dst, D);
      }
    }
  }
}

// out = x wᵀ + b (b may be undefined).
void linear_out(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (b.defined()) {
    at::addmm_out(out, b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

// sum[0, D) += Σ_r x[r, 0, D) over `rows` rows.
template <typename T>
FUSIONOPS_SIMD_CLONES void add_column_sums(const T* x, int64_t rows, int64_t D, T* sum) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) sum[e] += xr[e];
  }
}

// dst[0, D) += a[0, D) (+ b[0, D) when b is given).
template <typename T>
FUSIONOPS_SIMD_CLONES void add_rows(T* __restrict dst, const T* __restrict a, const T* __restrict b, int64_t D) {
  if (b) {
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) dst[e] += a[e] + b[e];
  } else {
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) dst[e] += a[e];
  }
}

// ---- attention of one row n (window > 0) -------------------------------------------------------

// From q (nA, D), k and v (nB, D) of one row: c (P, D) and alpha (P, H, band), the softmax of
// every pair and head.
template <typename T>
FUSIONOPS_SIMD_CLONES void attend_row(const Problem& p, const T* q, const T* k, const T* v, T scale, T* c,
                                      T* alpha) {
  const int64_t D = p.D, dh = p.dh;
  for (int64_t pp = 0; pp < p.P; ++pp) {
    const T* qp = q + p.pa[pp] * D;
    const T* kp = k + p.pb[pp] * D;
    const T* vp = v + p.pb[pp] * D;
    const int64_t len = p.plen[pp];
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t o = h * dh;
      T* al = alpha + (pp * p.H + h) * p.band;
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t t = 0; t < len; ++t) {
        const T* qh = qp + o;
        const T* kt = kp + t * D + o;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t e = 0; e < dh; ++e) s += qh[e] * kt[e];
        al[t] = s * scale;
        top = std::max(top, al[t]);
      }
      T total = 0;
      for (int64_t t = 0; t < len; ++t) {
        al[t] = std::exp(al[t] - top);
        total += al[t];
      }
      const T inv = T(1) / total;
      T* ch = c + pp * D + o;
      std::fill(ch, ch + dh, T(0));
      for (int64_t t = 0; t < len; ++t) {
        const T a = al[t] *= inv;
        const T* vt = vp + t * D + o;
#pragma omp simd
        for (int64_t e = 0; e < dh; ++e) ch[e] += a * vt[e];
      }
    }
  }
}

// Adds the gradients of one row, given dc (P, D): dv += α dc; with ds = α (dα - Σ α dα) · scale
// and dα_t = dc · v_t, dq += Σ_t ds_t k_t and dk_t += ds_t q. dq, dk or dv may be null (not
// needed). da: scratch of `band` elements.
template <typename T>
FUSIONOPS_SIMD_CLONES void attend_row_backward(const Problem& p, const T* q, const T* k, const T* v,
                                               const T* alpha, const T* dc, T scale, T* dq, T* dk, T* dv,
                                               T* da) {
  const int64_t D = p.D, dh = p.dh;
  for (int64_t pp = 0; pp < p.P; ++pp) {
    const int64_t a_off = p.pa[pp] * D, b_off = p.pb[pp] * D, len = p.plen[pp];
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t o = h * dh;
      const T* al = alpha + (pp * p.H + h) * p.band;
      const T* dch = dc + pp * D + o;
      T mean = 0;
      for (int64_t t = 0; t < len; ++t) {
        const T* vt = v + b_off + t * D + o;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t e = 0; e < dh; ++e) s += dch[e] * vt[e];
        da[t] = s;
        mean += al[t] * s;
      }
      for (int64_t t = 0; t < len; ++t) {
        const T a = al[t], ds = a * (da[t] - mean) * scale;
        const int64_t kt = b_off + t * D + o;
        if (dv) {
          T* dvt = dv + kt;
#pragma omp simd
          for (int64_t e = 0; e < dh; ++e) dvt[e] += a * dch[e];
        }
        if (dq) {
          T* dqh = dq + a_off + o;
          const T* kh = k + kt;
#pragma omp simd
          for (int64_t e = 0; e < dh; ++e) dqh[e] += ds * kh[e];
        }
        if (dk) {
          T* dkt = dk + kt;
          const T* qh = q + a_off + o;
#pragma omp simd
          for (int64_t e = 0; e < dh; ++e) dkt[e] += ds * qh[e];
        }
      }
    }
  }
}

// ---- blocks -----------------------------------------------------------------------------------

// Which of a block's values to compute.
struct Plan {
  bool xa = false;      // ha at the A slots
  bool xb = false;      // hb at the B slots
  bool scores = false;  // α and c: by the softmax where scores are computed (below), else α = 1
  bool c = false;       // with α = 1: c = v (forward, dWo)
  bool dalpha = false;  // backward of one-key bands: prove dα finite too (ds = 0), or compute ds
};

// A (rows · per_row, D) buffer of one thread, of which a block uses the first nb · per_row rows.
struct Buffer {
  at::Tensor full;
  int64_t per_row = 0;

  Buffer() = default;
  Buffer(const Problem& p, int64_t per_row_, const at::TensorOptions& o)
      : full(at::empty({p.blocks.rows * per_row_, p.D}, o)), per_row(per_row_) {}

  at::Tensor rows(int64_t nb) const { return full.narrow(0, 0, nb * per_row); }
  template <typename T>
  T* data() const {
    return full.defined() ? full.mutable_data_ptr<T>() : nullptr;
  }
};

// One thread's buffers and the block of rows [r0, r0 + nb) they hold. The forward values
// (xa, q, xb, k, v, c, alpha) come from compute(); the backward reuses q, v and c for dxa, dxb
// and dc once they are no longer needed.
template <typename scalar_t>
struct Block {
  using T = at::opmath_type<scalar_t>;
  const Problem& p;
  const Params& w;
  const Plan plan;
  const T scale;
  Buffer xa, q, xb, k, v, c;
  std::vector<T> alpha;  // (rows, P, H, band)
  int64_t r0 = 0, nb = 0;
  bool scored = false;  // this block's α came from its scores (always with a window)

  // q_buffer, v_buffer, c_buffer: the backward needs these buffers (for dxa, dxb, dc) even where
  // the plan does not compute q, v or c. One-key bands allocate q, k and α at the first block
  // whose scores are computed (none where every score is proven finite).
  Block(const Problem& p_, const Params& w_, const Plan& plan_, bool q_buffer, bool v_buffer, bool c_buffer)
      : p(p_), w(w_), plan(plan_), scale(T(1) / std::sqrt(T(p_.dh))) {
    const auto o = w.wo.options();
    if (plan.xa) xa = Buffer(p, p.nA, o);
    if (plan.xb) xb = Buffer(p, p.nB, o);
    if (q_buffer) q = Buffer(p, p.nA, o);
    if (plan.scores || plan.c || v_buffer) v = Buffer(p, p.nB, o);
    if (plan.scores || c_buffer) c = Buffer(p, p.P, o);
    if (plan.scores && p.attend) score_buffers();
  }

  void score_buffers() {
    const auto o = w.wo.options();
    if (!q.full.defined()) q = Buffer(p, p.nA, o);
    if (!k.full.defined()) k = Buffer(p, p.nB, o);
    alpha.resize(p.blocks.rows * p.P * p.H * p.band);
  }

  // One-key bands: whether every score of the block (and with plan.dalpha every dα = dc · v,
  // dc = g Wo from the block's upstream gradient g (nb · P, D)) is provably finite. Then α = 1
  // and ds = α (dα - α dα) = 0 exactly, and q, k only ever meet zeros.
  bool proven_finite(const T* g) const {
    const double largest = static_cast<double>(std::numeric_limits<T>::max());
    const double D = static_cast<double>(p.D);
    const double ma = max_abs_run(xa.data<T>(), nb * p.nA * p.D);
    const double mb = max_abs_run(xb.data<T>(), nb * p.nB * p.D);
    const double fq = ma * D * w.mq + w.mbq, fk = mb * D * w.mk + w.mbk;
    if (!dot_is_finite(fq, fk, p.dh, largest)) return false;
    if (!g) return true;
    const double fc = max_abs_run(g, nb * p.P * p.D) * D * w.mo, fv = mb * D * w.mv + w.mbv;
    return dot_is_finite(fc, fv, p.dh, largest);
  }

  // g: the block's upstream gradient, read when plan.dalpha.
  void compute(int64_t block, const at::Tensor& ha, const at::Tensor& hb, const T* g) {
    r0 = p.blocks.first(block);
    nb = p.blocks.count(block);
    if (plan.xa) load_layers<scalar_t>(ha, p.a_layer.data(), p.nA, r0, nb, xa.data<T>());
    if (plan.xb) load_layers<scalar_t>(hb, p.b_layer.data(), p.nB, r0, nb, xb.data<T>());
    scored = plan.scores && (p.attend || !proven_finite(plan.dalpha ? g : nullptr));
    const int64_t D = p.D;
    if (scored) {
      score_buffers();
      linear_out(q.rows(nb), xa.rows(nb), w.wq, w.bq);
      linear_out(k.rows(nb), xb.rows(nb), w.wk, w.bk);  // bk: the reference's scores have q·bk
      linear_out(v.rows(nb), xb.rows(nb), w.wv, w.bv);
      const T *q_ = q.data<T>(), *k_ = k.data<T>(), *v_ = v.data<T>();
      for (int64_t n = 0; n < nb; ++n) {
        attend_row(p, q_ + n * p.nA * D, k_ + n * p.nB * D, v_ + n * p.nB * D, scale, c.data<T>() + n * p.P * D,
                   alpha.data() + n * p.P * p.H * p.band);
      }
    } else if (plan.c) {  // one key, α = 1: c = v of layer j_p
      linear_out(v.rows(nb), xb.rows(nb), w.wv, w.bv);
      const T* v_ = v.data<T>();
      T* c_ = c.data<T>();
      for (int64_t n = 0; n < nb; ++n) {
        for (int64_t pp = 0; pp < p.P; ++pp) {
          const T* src = v_ + (n * p.nB + p.pb[pp]) * D;
          std::copy(src, src + D, c_ + (n * p.P + pp) * D);
        }
      }
    }
  }
};

// ---- forward ----------------------------------------------------------------------------------

template <typename scalar_t>
void forward_kernel(const Problem& p, const Params& w, const at::Tensor& ha, const at::Tensor& hb,
                    at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<scalar_t, T>;  // c Woᵀ straight into out
  at::Tensor out2d = out.view({p.N * p.P, p.D});
  scalar_t* out_ = out.mutable_data_ptr<scalar_t>();
  const T* bo = w.bo.defined() ? w.bo.const_data_ptr<T>() : nullptr;
  Plan plan;
  plan.xa = plan.xb = plan.scores = plan.c = true;  // xa: q, and the residual ha[n, i_p]
  at::parallel_for(0, p.blocks.blocks, 1, [&](int64_t b0, int64_t b1) {
    const BelowAutograd below_autograd;  // the weights may require grad
    Block<scalar_t> blk(p, w, plan, false, false, false);
    Buffer ybuf = in_place ? Buffer() : Buffer(p, p.P, w.wo.options());
    for (int64_t bi = b0; bi < b1; ++bi) {
      blk.compute(bi, ha, hb, nullptr);
      const int64_t r0 = blk.r0, nb = blk.nb, D = p.D;
      at::Tensor y = in_place ? out2d.narrow(0, r0 * p.P, nb * p.P) : ybuf.rows(nb);
      at::mm_out(y, blk.c.rows(nb), w.wo.t());
      T* y_ = y.mutable_data_ptr<T>();
      const T* xa = blk.xa.template data<T>();
      for (int64_t n = 0; n < nb; ++n) {
        for (int64_t pp = 0; pp < p.P; ++pp) add_rows(y_ + (n * p.P + pp) * D, xa + (n * p.nA + p.pa[pp]) * D, bo, D);
      }
      if constexpr (!in_place) store_n(y_, out_ + r0 * p.P * D, nb * p.P * D);
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------

// The gradients asked for, and what they take. dq and dk are computed in the blocks whose
// scores are (all of them with a window); with α = 1 proven they are exactly 0.
struct Needs {
  bool ha, hb, wq, wk, wv, wo, bq, bk, bv, bo;
  bool dq, dk, dv, dc;  // dL/dq etc. of a block

  explicit Needs(const c10::List<bool>& flags)
      : ha(flags[0]), hb(flags[1]), wq(flags[2]), wk(flags[3]), wv(flags[4]), wo(flags[5]), bq(flags[6]),
        bk(flags[7]), bv(flags[8]), bo(flags[9]) {
    dq = ha || wq || bq;
    dk = hb || wk || bk;
    dv = hb || wv || bv;
    dc = dq || dk || dv;
  }

  Plan plan(const Problem& p) const {
    Plan r;
    r.scores = wo || dc;                 // α for c (dWo) and for the attention's backward
    r.c = wo;                            // with α = 1: c = v for dWo
    r.dalpha = !p.attend && (dq || dk);  // ds is 0 only where dα is finite
    r.xa = r.scores;                     // the proof, q, and dWq = dqᵀ xa
    r.xb = r.scores || (dv && wv);       // the proof, k, v, and dWv = dvᵀ xb
    return r;
  }
};

// Partial sums of the weight and bias gradients, in ThreadSums order.
enum Sum { kWq, kWk, kWv, kWo, kBq, kBk, kBv, kBo, kSums };

template <typename scalar_t>
void backward_kernel(const Problem& p, const Params& w, const Needs& need, const at::Tensor& grad,
                     const at::Tensor& ha, const at::Tensor& hb, ThreadSums& sums, at::Tensor& dha,
                     at::Tensor& dhb) {
  using T = at::opmath_type<scalar_t>;
  const Plan plan = need.plan(p);
  const int64_t D = p.D;
  const auto opts = w.wo.options();
  at::parallel_for(0, p.blocks.blocks, 1, [&](int64_t b0, int64_t b1) {
    const BelowAutograd below_autograd;  // the weights may require grad
    std::vector<at::Tensor>& mine = sums.mine();
    // q's buffer takes dxa, v's dxb, c's dc once they are spent.
    Block<scalar_t> blk(p, w, plan, need.ha, need.hb, need.dc);
    Buffer g(p, p.P, opts);
    Buffer dq, dk;  // at the first block whose scores are computed
    Buffer dv = need.dv ? Buffer(p, p.nB, opts) : Buffer();
    std::vector<T> da(p.band);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = p.blocks.first(bi), nb = p.blocks.count(bi);
      load_layers<scalar_t>(grad, nullptr, p.P, r0, nb, g.data<T>());
      blk.compute(bi, ha, hb, g.data<T>());  // recomputes q, k, v, α, c: the forward kept nothing
      const bool scored = blk.scored;
      const bool dq_now = scored && need.dq, dk_now = scored && need.dk;
      if (dq_now && !dq.full.defined()) dq = Buffer(p, p.nA, opts);
      if (dk_now && !dk.full.defined()) dk = Buffer(p, p.nB, opts);
      const at::Tensor gb = g.rows(nb);
      if (need.wo) mine[kWo].addmm_(gb.t(), blk.c.rows(nb));  // dWo += gᵀ c
      if (need.bo) add_column_sums(g.data<T>(), nb * p.P, D, mine[kBo].mutable_data_ptr<T>());
      if (scored ? need.dc : need.dv) {  // with α = 1 (proven), dc only feeds dv
        at::Tensor dc = blk.c.rows(nb);  // over c, spent
        at::mm_out(dc, gb, w.wo);        // dc = g Wo
        const T* dc_ = blk.c.template data<T>();
        for (Buffer* b : {&dq, &dk, &dv}) {
          if (b->full.defined()) b->rows(nb).zero_();
        }
        T *dq_ = dq_now ? dq.data<T>() : nullptr, *dk_ = dk_now ? dk.data<T>() : nullptr, *dv_ = dv.data<T>();
        if (scored) {
          const T *q_ = blk.q.template data<T>(), *k_ = blk.k.template data<T>(), *v_ = blk.v.template data<T>();
          for (int64_t n = 0; n < nb; ++n) {
            const int64_t a = n * p.nA * D, b = n * p.nB * D;
            attend_row_backward(p, q_ + a, k_ + b, v_ + b, blk.alpha.data() + n * p.P * p.H * p.band,
                                dc_ + n * p.P * D, blk.scale, dq_ ? dq_ + a : nullptr, dk_ ? dk_ + b : nullptr,
                                dv_ ? dv_ + b : nullptr, da.data());
          }
        } else if (dv_) {  // c = v at j_p: dv at j_p += dc
          for (int64_t n = 0; n < nb; ++n) {
            for (int64_t pp = 0; pp < p.P; ++pp) {
              add_rows(dv_ + (n * p.nB + p.pb[pp]) * D, dc_ + (n * p.P + pp) * D, static_cast<const T*>(nullptr), D);
            }
          }
        }
      }
      if (need.wq && dq_now) mine[kWq].addmm_(dq.rows(nb).t(), blk.xa.rows(nb));
      if (need.bq && dq_now) add_column_sums(dq.data<T>(), nb * p.nA, D, mine[kBq].mutable_data_ptr<T>());
      if (need.wk && dk_now) mine[kWk].addmm_(dk.rows(nb).t(), blk.xb.rows(nb));
      if (need.bk && dk_now) add_column_sums(dk.data<T>(), nb * p.nB, D, mine[kBk].mutable_data_ptr<T>());
      if (need.wv) mine[kWv].addmm_(dv.rows(nb).t(), blk.xb.rows(nb));
      if (need.bv) add_column_sums(dv.data<T>(), nb * p.nB, D, mine[kBv].mutable_data_ptr<T>());
      if (need.ha) {  // dxa = dq Wq, plus the residual's g at every pair of the layer
        at::Tensor dxa = blk.q.rows(nb);
        if (dq_now) {
          at::mm_out(dxa, dq.rows(nb), w.wq);
        } else {
          dxa.zero_();
        }
        T* dxa_ = dxa.mutable_data_ptr<T>();
        const T* g_ = g.data<T>();
        for (int64_t n = 0; n < nb; ++n) {
          for (int64_t pp = 0; pp < p.P; ++pp) {
            add_rows(dxa_ + (n * p.nA + p.pa[pp]) * D, g_ + (n * p.P + pp) * D, static_cast<const T*>(nullptr), D);
          }
        }
        store_layers(static_cast<const T*>(dxa_), p.a_slot, p.nA, r0, nb, D, dha.mutable_data_ptr<scalar_t>());
      }
      if (need.hb) {  // dxb = dv Wv + dk Wk
        at::Tensor dxb = blk.v.rows(nb);
        at::mm_out(dxb, dv.rows(nb), w.wv);
        if (dk_now) dxb.addmm_(dk.rows(nb), w.wk);
        store_layers(static_cast<const T*>(dxb.mutable_data_ptr<T>()), p.b_slot, p.nB, r0, nb, D,
                     dhb.mutable_data_ptr<scalar_t>());
      }
    }
  });
  sums.reduce();
}

// ---- the ops ----------------------------------------------------------------------------------
// (each skips autograd for its inner ATen calls: see BelowAutograd in common.h)

at::Tensor skew_pair_fwd(const at::Tensor& ha, const at::Tensor& hb, const at::Tensor& pairs, const at::Tensor& wq,
                         const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& wo,
                         const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk,
                         const std::optional<at::Tensor>& bv, const std::optional<at::Tensor>& bo, int64_t heads,
                         int64_t window) {
  constexpr const char* kOp = "_skew_pair_fwd";
  const BelowAutograd below_autograd;
  const Problem p = make_problem(kOp, ha, hb, pairs, heads, window);
  const auto dtype = ha.scalar_type();
  const Params w = make_params(kOp, p, dtype, wq, wk, wv, wo, bq, bk, bv, bo, false);
  at::Tensor out = at::empty({p.N, p.P, p.D}, ha.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp,
                                  [&] { forward_kernel<scalar_t>(p, w, ha, hb, out); });
  return out;
}

std::vector<at::Tensor> skew_pair_bwd(const at::Tensor& grad, const at::Tensor& ha, const at::Tensor& hb,
                                      const at::Tensor& pairs, const at::Tensor& wq, const at::Tensor& wk,
                                      const at::Tensor& wv, const at::Tensor& wo,
                                      const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk,
                                      const std::optional<at::Tensor>& bv, int64_t heads, int64_t window,
                                      const c10::List<bool>& needs) {
  constexpr const char* kOp = "_skew_pair_bwd";
  const BelowAutograd below_autograd;
  const Problem p = make_problem(kOp, ha, hb, pairs, heads, window);
  const auto dtype = ha.scalar_type();
  const auto acc = at::toOpMathType(dtype);
  TORCH_CHECK(needs.size() == 10, "fusionops::", kOp, ": needs must have 10 flags, got ", needs.size());
  const Needs need(needs);
  const Params w = make_params(kOp, p, dtype, wq, wk, wv, wo, bq, bk, bv, std::nullopt, need.dq || need.dk);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == dtype && grad.dim() == 3 && grad.size(0) == p.N &&
                  grad.size(1) == p.P && grad.size(2) == p.D,
              "fusionops::", kOp, ": grad must be a ", dtype, " cpu tensor of shape (", p.N, ", ", p.P, ", ", p.D,
              "), got ", grad.scalar_type(), " on ", grad.device(), " of shape ", grad.sizes());
  const auto opts = ha.options();
  at::Tensor dha = need.ha ? at::empty({p.N, p.La, p.D}, opts) : at::empty({0}, opts);
  at::Tensor dhb = need.hb ? at::empty({p.N, p.Lb, p.D}, opts) : at::empty({0}, opts);
  // Zero-filled sums in the compute dtype; the ones not needed stay undefined.
  const bool sum_flags[kSums] = {need.wq, need.wk, need.wv, need.wo, need.bq, need.bk, need.bv, need.bo};
  std::vector<at::Tensor> totals;
  for (int s = 0; s < kSums; ++s) {
    const bool matrix = s < kBq;
    totals.push_back(sum_flags[s] ? at::zeros(matrix ? at::IntArrayRef{p.D, p.D} : at::IntArrayRef{p.D},
                                              opts.dtype(acc))
                                  : at::Tensor());
  }
  ThreadSums sums(totals);
  if (need.ha || need.hb || need.dc || need.wo || need.bo) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp, [&] {
      backward_kernel<scalar_t>(p, w, need, grad, ha, hb, sums, dha, dhb);
    });
  }
  auto out = [&](bool flag, const at::Tensor& t) { return flag ? t.to(dtype) : at::empty({0}, opts); };
  return {dha,
          dhb,
          out(need.wq, totals[kWq]),
          out(need.wk, totals[kWk]),
          out(need.wv, totals[kWv]),
          out(need.wo, totals[kWo]),
          out(need.bq, totals[kBq]),
          out(need.bk, totals[kBk]),
          out(need.bv, totals[kBv]),
          out(need.bo, totals[kBo])};
}

}  // namespace
}  // namespace fusionops::cpu

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_skew_pair_fwd", &fusionops::cpu::skew_pair_fwd);
  m.impl("_skew_pair_bwd", &fusionops::cpu::skew_pair_bwd);
}
