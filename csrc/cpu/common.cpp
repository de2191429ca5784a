// Helpers shared by the CPU kernels; see common.h.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#ifdef FUSIONOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusionops::cpu {

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, cols)); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

RowBlocks row_blocks(int64_t N, int64_t max_rows) {
  const int64_t threads = at::get_num_threads();
  RowBlocks r;
  r.N = N;
  r.blocks = threads * ceil_div(N, threads * std::max<int64_t>(1, max_rows));
  r.rows = N > 0 ? ceil_div(N, r.blocks) : 1;
  r.blocks = ceil_div(N, r.rows);
  return r;
}

ThreadSums::ThreadSums(std::vector<at::Tensor> outs) : outs_(std::move(outs)), parts_(at::get_num_threads()) {}

std::vector<at::Tensor>& ThreadSums::mine() {
  const int t = at::get_thread_num();
  TORCH_INTERNAL_ASSERT(t < static_cast<int>(parts_.size()));
  std::vector<at::Tensor>& part = parts_[t];
  if (part.empty()) {
    for (const at::Tensor& out : outs_) {
      part.push_back(!out.defined() || t == 0 ? out : at::zeros_like(out));
    }
  }
  return part;
}

void ThreadSums::reduce() {
  for (size_t t = 1; t < parts_.size(); ++t) {
    for (size_t k = 0; k < parts_[t].size(); ++k) {
      if (parts_[t][k].defined()) outs_[k].add_(parts_[t][k]);
    }
  }
}

void check_modalities(const char* op, at::TensorList xs, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(!xs.empty(), "fusionops::", op, ": xs is empty; expected M >= 1 modalities");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.dim() == 2, "fusionops::", op, ": xs[0] must be (N, d), got shape ", x0.sizes());
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusionops::", op, ": expected float16, bfloat16, float32 or float64 inputs, got ", dtype);
  for (size_t m = 0; m < xs.size(); ++m) {
    const at::Tensor& x = xs[m];
    TORCH_CHECK(x.device().is_cpu(), "fusionops::", op, ": xs[", m, "] is on ", x.device(), ", expected cpu");
    TORCH_CHECK(x.scalar_type() == dtype, "fusionops::", op, ": xs[", m, "] has dtype ", x.scalar_type(),
                " but xs[0] has ", dtype);
    TORCH_CHECK(x.dim() == 2 && x.size(0) == x0.size(0) && x.size(1) >= 1, "fusionops::", op, ": xs[", m,
                "] must be (N, d) with N = ", x0.size(0), " and d >= 1, got shape ", x.sizes());
  }
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->dim() == 2 &&
                    mask->size(0) == x0.size(0) && mask->size(1) == static_cast<int64_t>(xs.size()),
                "fusionops::", op, ": mask must be a bool cpu tensor of shape (N, M) = (", x0.size(0), ", ",
                xs.size(), "), got ", mask->scalar_type(), " of shape ", mask->sizes());
  }
}

void check_2d(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols,
              at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 &&
                  (rows < 0 || t.size(0) == rows) && t.size(1) == cols,
              "fusionops::", op, ": ", name, " must be a ", dtype, " cpu tensor of shape (",
              rows < 0 ? "*" : std::to_string(rows), ", ", cols, "), got ", t.scalar_type(), " on ",
              t.device(), " of shape ", t.sizes());
}

void fill_features(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t m, int64_t first,
                   int64_t count, const at::Tensor& out) {
  const int64_t d = x.size(1), D = d + 1, s0 = x.stride(0), s1 = x.stride(1);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(out.is_contiguous() && out.numel() >= count * D && out.scalar_type() == at::toOpMathType(dtype),
              "fusionops: fill_features got a bad output buffer");
  const bool* keep = mask ? mask->const_data_ptr<bool>() : nullptr;
  const int64_t k0 = mask ? mask->stride(0) : 0, k1 = mask ? mask->stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusionops_fill_features_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    acc_t* dst = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, count, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = first + i;
        acc_t* row = dst + i * D;
        row[0] = acc_t(1);
        if (keep && !keep[n * k0 + m * k1]) {
          std::fill(row + 1, row + D, acc_t(0));  // select, never multiply: a masked NaN stays out
        } else {
          load_n(src + n * s0, s1, row + 1, d);
        }
      }
    });
  });
}

FUSIONOPS_SIMD_CLONES void bfloat16_to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* in = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(in[j]) << 16;
    std::memcpy(dst + j, &u, sizeof(u));
  }
}

FUSIONOPS_SIMD_CLONES void float_to_bfloat16(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, src + j, sizeof(u));
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
    out[j] = nan ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
}

// One element at a time, in c10's conversion; the fallback and the tails of the F16C loops.
static void half_to_float_scalar(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

static void float_to_half_scalar(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

#ifdef FUSIONOPS_X86_DISPATCH
// Function multiversioning: the F16C version is picked at load time where the CPU has AVX2
// and F16C (x86-64-v3), the scalar one elsewhere. The versions are called from this file only
// (through the public functions below): callers elsewhere would bind to the default version.
#define FUSIONOPS_DEFAULT __attribute__((target("default")))
#define FUSIONOPS_V3 __attribute__((target("arch=x86-64-v3")))

FUSIONOPS_DEFAULT static void half_to_float_impl(const c10::Half* src, float* dst, int64_t n) {
  half_to_float_scalar(src, dst, n);
}

FUSIONOPS_DEFAULT static void float_to_half_impl(const float* src, c10::Half* dst, int64_t n) {
  float_to_half_scalar(src, dst, n);
}

FUSIONOPS_V3 static void half_to_float_impl(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  half_to_float_scalar(src + j, dst + j, n - j);
}

FUSIONOPS_V3 static void float_to_half_impl(const float* src, c10::Half* dst, int64_t n) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
  float_to_half_scalar(src + j, dst + j, n - j);
}

#undef FUSIONOPS_DEFAULT
#undef FUSIONOPS_V3

void half_to_float(const c10::Half* src, float* dst, int64_t n) { half_to_float_impl(src, dst, n); }
void float_to_half(const float* src, c10::Half* dst, int64_t n) { float_to_half_impl(src, dst, n); }
#else
void half_to_float(const c10::Half* src, float* dst, int64_t n) { half_to_float_scalar(src, dst, n); }
void float_to_half(const float* src, c10::Half* dst, int64_t n) { float_to_half_scalar(src, dst, n); }
#endif

Features make_features(at::TensorList xs, const std::optional<at::Tensor>& mask, at::ScalarType acc) {
  Features f;
  f.N = xs[0].size(0);
  for (size_t m = 0; m < xs.size(); ++m) {
    const int64_t D = xs[m].size(1) + 1;
    at::Tensor z = at::empty({f.N, D}, xs[m].options().dtype(acc));
    fill_features(xs[m], mask, static_cast<int64_t>(m), 0, f.N, z);
    f.z.push_back(std::move(z));
    f.D.push_back(D);
    f.K *= D;
  }
  return f;
}

std::vector<at::Tensor> empty_dx(const Features& f, at::ScalarType acc) {
  std::vector<at::Tensor> dx;
  for (int64_t D : f.D) dx.push_back(at::empty({f.N, D - 1}, f.z[0].options().dtype(acc)));
  return dx;
}

std::vector<at::Tensor> finish_dx(std::vector<at::Tensor> dx, const std::optional<at::Tensor>& mask,
                                  at::ScalarType dtype) {
  for (size_t m = 0; m < dx.size(); ++m) {
    if (mask) dx[m] = at::where(mask->select(1, static_cast<int64_t>(m)).unsqueeze(1), dx[m], at::Scalar(0));
    dx[m] = dx[m].to(dtype).contiguous();
  }
  return dx;
}

}  // namespace fusionops::cpu
