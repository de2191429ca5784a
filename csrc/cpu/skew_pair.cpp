// CPU kernels of sparse skew-pair attention (DESIGN.md section 4; contract in
// fusionops/ops/_kernels.py).
//
// out[n, p] = ha[n, i_p] + c[n, p] Woᵀ + bo, where per head c is the softmax(q·k / √dh)-weighted
// sum of the values of the B layers within `window` of j_p, and q is projected from ha[n, i_p].
// The pairs share layers, so a block of rows projects each layer it needs once, not once per
// pair: q for the distinct A layers of the pairs ("A slots"), k and v for the union of their
// bands ("B slots"), each one GEMM of (rows · slots, D) by (D, D). The attention itself is a few
// dot products per pair and head (a band has at most 2·window + 1 layers) in plain loops, then
// c Woᵀ is one GEMM of (rows · P, D) per block. With window 0 every softmax is over one layer
// (α = 1, c = v of layer j_p), so q and k are never computed.
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

// The parameters in the compute dtype, contiguous (a copy only where the dtype or layout
// differs); wq, wk and bq undefined without attention, every bias undefined when None. bk is
// never used: it adds q_h · bk_h to every score of a band, which the softmax ignores.
struct Params {
  at::Tensor wq, wk, wv, wo, bq, bv, bo;
};

Params make_params(const char* op, const Problem& p, at::ScalarType dtype, const at::Tensor& wq,
                   const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& wo,
                   const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk,
                   const std::optional<at::Tensor>& bv, const std::optional<at::Tensor>& bo) {
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
  if (p.attend) {
    w.wq = weight(wq);
    w.wk = weight(wk);
    w.bq = bias("bq", bq);
  }
  bias("bk", bk);  // checked only
  w.wv = weight(wv);
  w.wo = weight(wo);
  w.bv = bias("bv", bv);
  w.bo = bias("bo", bo);
  return w;
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
  bool xa = false;   // ha at the A slots
  bool xb = false;   // hb at the B slots
  bool qk = false;   // q and k (attention only)
  bool v = false;    // v
  bool c = false;    // c, and α with attention
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

  // q_buffer, v_buffer, c_buffer: the backward needs these buffers (for dxa, dxb, dc) even where
  // the plan does not compute q, v or c.
  Block(const Problem& p_, const Params& w_, const Plan& plan_, bool q_buffer, bool v_buffer, bool c_buffer)
      : p(p_), w(w_), plan(plan_), scale(T(1) / std::sqrt(T(p_.dh))) {
    const auto o = w.wo.options();
    if (plan.xa) xa = Buffer(p, p.nA, o);
    if (plan.xb) xb = Buffer(p, p.nB, o);
    if (plan.qk || q_buffer) q = Buffer(p, p.nA, o);
    if (plan.qk) k = Buffer(p, p.nB, o);
    if (plan.v || v_buffer) v = Buffer(p, p.nB, o);
    if (plan.c || c_buffer) c = Buffer(p, p.P, o);
    if (plan.c && p.attend) alpha.resize(p.blocks.rows * p.P * p.H * p.band);
  }

  void compute(int64_t block, const at::Tensor& ha, const at::Tensor& hb) {
    r0 = p.blocks.first(block);
    nb = p.blocks.count(block);
    if (plan.xa) load_layers<scalar_t>(ha, p.a_layer.data(), p.nA, r0, nb, xa.data<T>());
    if (plan.xb) load_layers<scalar_t>(hb, p.b_layer.data(), p.nB, r0, nb, xb.data<T>());
    if (plan.qk) {
      linear_out(q.rows(nb), xa.rows(nb), w.wq, w.bq);
      linear_out(k.rows(nb), xb.rows(nb), w.wk, at::Tensor());
    }
    if (plan.v) linear_out(v.rows(nb), xb.rows(nb), w.wv, w.bv);
    if (!plan.c) return;
    const int64_t D = p.D;
    T* c_ = c.data<T>();
    const T* v_ = v.data<T>();
    if (p.attend) {
      const T *q_ = q.data<T>(), *k_ = k.data<T>();
      for (int64_t n = 0; n < nb; ++n) {
        attend_row(p, q_ + n * p.nA * D, k_ + n * p.nB * D, v_ + n * p.nB * D, scale, c_ + n * p.P * D,
                   alpha.data() + n * p.P * p.H * p.band);
      }
    } else {
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
  plan.xa = plan.xb = plan.v = plan.c = true;  // xa: q, and the residual ha[n, i_p]
  plan.qk = p.attend;
  at::parallel_for(0, p.blocks.blocks, 1, [&](int64_t b0, int64_t b1) {
    const BelowAutograd below_autograd;  // the weights may require grad
    Block<scalar_t> blk(p, w, plan, false, false, false);
    Buffer ybuf = in_place ? Buffer() : Buffer(p, p.P, w.wo.options());
    for (int64_t bi = b0; bi < b1; ++bi) {
      blk.compute(bi, ha, hb);
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

// The gradients asked for (bk's is zero, so never computed), and what they take.
struct Needs {
  bool ha, hb, wq, wk, wv, wo, bq, bv, bo;
  bool dq, dk, dv, dc;  // dL/dq etc. of a block

  Needs(const Problem& p, const c10::List<bool>& flags)
      : ha(flags[0]), hb(flags[1]), wq(flags[2]), wk(flags[3]), wv(flags[4]), wo(flags[5]), bq(flags[6]),
        bv(flags[8]), bo(flags[9]) {
    dq = p.attend && (ha || wq || bq);
    dk = p.attend && (hb || wk);
    dv = hb || wv || bv;
    dc = dq || dk || dv;
  }

  Plan plan(const Problem& p) const {
    Plan r;
    r.c = wo || (p.attend && dc);       // c for dWo, α for the attention's backward
    r.qk = p.attend && r.c;
    r.v = r.c;                           // c = Σ α v (and dα = dc · v)
    r.xa = r.qk;                         // q, and dWq = dqᵀ xa
    r.xb = r.qk || r.v || (dv && wv);    // k, v, and dWv = dvᵀ xb
    return r;
  }
};

// Partial sums of the weight and bias gradients, in ThreadSums order.
enum Sum { kWq, kWk, kWv, kWo, kBq, kBv, kBo, kSums };

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
    Buffer dq = need.dq ? Buffer(p, p.nA, opts) : Buffer();
    Buffer dk = need.dk ? Buffer(p, p.nB, opts) : Buffer();
    Buffer dv = need.dv ? Buffer(p, p.nB, opts) : Buffer();
    std::vector<T> da(p.band);
    for (int64_t bi = b0; bi < b1; ++bi) {
      blk.compute(bi, ha, hb);  // recomputes q, k, v, α, c: the forward kept nothing
      const int64_t r0 = blk.r0, nb = blk.nb;
      load_layers<scalar_t>(grad, nullptr, p.P, r0, nb, g.data<T>());
      const at::Tensor gb = g.rows(nb);
      if (need.wo) mine[kWo].addmm_(gb.t(), blk.c.rows(nb));  // dWo += gᵀ c
      if (need.bo) add_column_sums(g.data<T>(), nb * p.P, D, mine[kBo].mutable_data_ptr<T>());
      if (need.dc) {
        at::Tensor dc = blk.c.rows(nb);  // over c, spent
        at::mm_out(dc, gb, w.wo);        // dc = g Wo
        const T* dc_ = blk.c.template data<T>();
        for (Buffer* b : {&dq, &dk, &dv}) {
          if (b->full.defined()) b->rows(nb).zero_();
        }
        T *dq_ = dq.data<T>(), *dk_ = dk.data<T>(), *dv_ = dv.data<T>();
        if (p.attend) {
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
      if (need.wq && need.dq) mine[kWq].addmm_(dq.rows(nb).t(), blk.xa.rows(nb));
      if (need.bq && need.dq) add_column_sums(dq.data<T>(), nb * p.nA, D, mine[kBq].mutable_data_ptr<T>());
      if (need.wk && need.dk) mine[kWk].addmm_(dk.rows(nb).t(), blk.xb.rows(nb));
      if (need.wv) mine[kWv].addmm_(dv.rows(nb).t(), blk.xb.rows(nb));
      if (need.bv) add_column_sums(dv.data<T>(), nb * p.nB, D, mine[kBv].mutable_data_ptr<T>());
      if (need.ha) {  // dxa = dq Wq, plus the residual's g at every pair of the layer
        at::Tensor dxa = blk.q.rows(nb);
        if (need.dq) {
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
        if (need.dk) dxb.addmm_(dk.rows(nb), w.wk);
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
  const Params w = make_params(kOp, p, dtype, wq, wk, wv, wo, bq, bk, bv, bo);
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
  const Params w = make_params(kOp, p, dtype, wq, wk, wv, wo, bq, bk, bv, std::nullopt);
  TORCH_CHECK(needs.size() == 10, "fusionops::", kOp, ": needs must have 10 flags, got ", needs.size());
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == dtype && grad.dim() == 3 && grad.size(0) == p.N &&
                  grad.size(1) == p.P && grad.size(2) == p.D,
              "fusionops::", kOp, ": grad must be a ", dtype, " cpu tensor of shape (", p.N, ", ", p.P, ", ", p.D,
              "), got ", grad.scalar_type(), " on ", grad.device(), " of shape ", grad.sizes());
  const Needs need(p, needs);
  const auto opts = ha.options();
  at::Tensor dha = need.ha ? at::empty({p.N, p.La, p.D}, opts) : at::empty({0}, opts);
  at::Tensor dhb = need.hb ? at::empty({p.N, p.Lb, p.D}, opts) : at::empty({0}, opts);
  // Zero-filled sums in the compute dtype; the ones not needed stay undefined.
  const bool sum_flags[kSums] = {need.wq, need.wk, need.wv, need.wo, need.bq, need.bv, need.bo};
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
          needs[7] ? at::zeros({p.D}, opts) : at::empty({0}, opts),
          out(need.bv, totals[kBv]),
          out(need.bo, totals[kBo])};
}

}  // namespace
}  // namespace fusionops::cpu

TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_skew_pair_fwd", &fusionops::cpu::skew_pair_fwd);
  m.impl("_skew_pair_bwd", &fusionops::cpu::skew_pair_bwd);
}
