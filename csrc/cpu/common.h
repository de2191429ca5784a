// Helpers shared by the CPU kernels (tensor, low-rank and product fusion, skew-pair attention):
// argument checks, the z_m = [1, x_m] features the fusions start from, the finishing of dx,
// blocks of rows and deterministic per-thread sums, and vectorized conversions between the
// input dtype and the compute dtype.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace fusionops::cpu {

// Elements of work below which a parallel_for chunk is not worth a thread.
constexpr int64_t kGrainElems = int64_t{1} << 15;

// Rows of `cols` elements that make one parallel_for grain.
int64_t grain_rows(int64_t cols);

// The inner loops of the kernels run over every element of their largest buffers. The
// extension is built for the baseline ISA, so on x86-64 these loops are also compiled for
// AVX2 and AVX-512 and picked at load time: 4x to 8x wider than the SSE2 baseline. The clones
// name ISA levels, not CPUs: a clone for arch=<cpu> is picked by CPU model, so on a model the
// compiler does not know (GCC 12 on a 5th-generation Xeon) the SSE2 default ran instead.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FUSIONOPS_X86_DISPATCH 1
#define FUSIONOPS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSIONOPS_SIMD_CLONES
#endif

// Every op of this extension is the bottom of the autograd op layer (fusionops/ops/), which
// differentiates it itself, so its inner ATen calls skip autograd: its inputs may require grad,
// views of them taken inside would too, and out= calls such as mm_out refuse those. Each op
// holds one of these for its whole body, and so does every parallel_for body that calls ATen on
// such tensors: the guard is thread-local, and parallel_for's worker threads do not inherit it.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// ---- blocks of rows and per-thread sums ----------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b);

// Rows [0, N) cut into `blocks` blocks of `rows` rows (the last one may be shorter), with as many
// blocks for every thread (parallel_for's static schedule) and no block above max_rows rows.
struct RowBlocks {
  int64_t N = 0, rows = 1, blocks = 0;

  int64_t first(int64_t block) const { return block * rows; }
  int64_t count(int64_t block) const { return std::min(rows, N - block * rows); }
};

RowBlocks row_blocks(int64_t N, int64_t max_rows);

// Sums over the chunks of a parallel_for that do not depend on timing: each thread adds into its
// own zeroed copies of the outputs (thread 0 straight into the outputs), and reduce() adds the
// copies in thread order after the loop.
class ThreadSums {
 public:
  // outs: zero-filled outputs; undefined entries are skipped (and stay undefined in mine()).
  explicit ThreadSums(std::vector<at::Tensor> outs);
  // The calling thread's copies, made on its first call (a backend may give it several chunks).
  std::vector<at::Tensor>& mine();
  // Adds every thread's copies into the outputs, thread 1 first; call once, after the loop.
  void reduce();

 private:
  std::vector<at::Tensor> outs_;
  std::vector<std::vector<at::Tensor>> parts_;
};

// ---- argument checks (the Python op layer guarantees all of these) --------------------
// `op` names the op in the messages, e.g. "_tf_features_fwd".

// xs: M >= 1 cpu tensors (N, d_m), d_m >= 1, one floating dtype; mask: None or bool (N, M).
void check_modalities(const char* op, at::TensorList xs, const std::optional<at::Tensor>& mask);

// t: a cpu tensor of `dtype` and shape (rows, cols); rows < 0 accepts any number of rows.
void check_2d(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols,
              at::ScalarType dtype);

// ---- z_m = [1, where(mask, x_m, 0)] ------------------------------------------------------

// Every z_m as a contiguous (N, D_m) tensor of the compute dtype: inputs of any strides and
// dtype meet the kernels in one layout, at the cost of a copy as small as the inputs.
struct Features {
  std::vector<at::Tensor> z;
  std::vector<int64_t> D;
  int64_t N = 0;
  int64_t K = 1;  // prod D_m
};

// acc: the compute dtype of xs, at::toOpMathType(dtype).
Features make_features(at::TensorList xs, const std::optional<at::Tensor>& mask, at::ScalarType acc);

// Rows [first, first + count) of z_m (modality m, input x = xs[m]) into out, a contiguous buffer
// of the compute dtype with room for (count, D_m): the block-sized make_features, for kernels
// that never hold z_m of all rows. Runs in parallel over the rows unless called from a
// parallel region.
void fill_features(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t m, int64_t first,
                   int64_t count, const at::Tensor& out);

// Uninitialised dx_m (N, D_m - 1) of dtype acc, one per modality of f.
std::vector<at::Tensor> empty_dx(const Features& f, at::ScalarType acc);

// dx_m in the input dtype, contiguous, zero on masked rows whatever the kernel computed there.
std::vector<at::Tensor> finish_dx(std::vector<at::Tensor> dx, const std::optional<at::Tensor>& mask,
                                  at::ScalarType dtype);

// ---- conversions to and from the compute dtype -------------------------------------------

// bfloat16 / float16 <-> float32 with the rounding of c10 (to nearest even), vectorized: c10's
// own conversions convert one element at a time. bfloat16 as bit operations the compiler
// vectorizes, float16 with the F16C instructions where the CPU has them.
void bfloat16_to_float(const c10::BFloat16* src, float* dst, int64_t n);
void float_to_bfloat16(const float* src, c10::BFloat16* dst, int64_t n);
void half_to_float(const c10::Half* src, float* dst, int64_t n);
void float_to_half(const float* src, c10::Half* dst, int64_t n);

// dst[0, n) = src[0 : n·stride : stride] in the compute dtype acc_t.
template <typename scalar_t, typename acc_t>
void load_n(const scalar_t* src, int64_t stride, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (stride == 1) return bfloat16_to_float(src, dst, n);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    if (stride == 1) return half_to_float(src, dst, n);
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j * stride]);
}

// dst[0, n) = src[0, n) rounded to scalar_t (once, from the compute dtype).
template <typename acc_t, typename scalar_t>
void store_n(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return float_to_bfloat16(src, dst, n);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    return float_to_half(src, dst, n);
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// ---- raw pointers -------------------------------------------------------------------------

template <typename T>
std::vector<const T*> base_pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.const_data_ptr<T>());
  return out;
}

template <typename T>
std::vector<T*> mutable_pointers(std::vector<at::Tensor>& ts) {
  std::vector<T*> out;
  for (auto& t : ts) out.push_back(t.mutable_data_ptr<T>());
  return out;
}

// rows[m] = pointer to row n of the (N, width(m)) contiguous buffer starting at base[m].
template <typename P, typename Width>
void rows_at(const std::vector<P>& base, int64_t n, Width width, std::vector<P>& rows) {
  for (size_t m = 0; m < base.size(); ++m) rows[m] = base[m] + n * width(m);
}

}  // namespace fusionops::cpu
