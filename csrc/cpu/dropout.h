// Inverted dropout by a counter-based hash (csrc/cpu/tensor_fusion.cpp's dropout on Z, the
// bilinear family's dropouts): element (row, col) is kept iff its hash clears the threshold, so a
// mask is regenerated in backward, on any thread, instead of being stored; bit for bit the
// reference's dropout_keep (fusionops/reference/tensor_fusion.py).
//
// Internal linkage (an anonymous namespace) on purpose: mask_row has SIMD clones
// (target_clones), whose ifunc resolvers are per translation unit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace fusionops::cpu {
namespace {

constexpr uint32_t kSeedSalt = 0x27D4EB2Fu;
constexpr uint32_t kRowMul = 0x9E3779B1u;
constexpr uint32_t kColMul = 0x85EBCA77u;

// murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// row[j] = keep(k0 + j) ? row[j] * scale : 0 for one row of Z (or of dZ), given its row key.
template <typename T>
FUSIONOPS_SIMD_CLONES void mask_row(T* row, int64_t len, uint32_t key, uint32_t k0, uint32_t threshold, T scale) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t h = fmix32(key + (k0 + static_cast<uint32_t>(j)) * kColMul);
    row[j] = (h >> 8) >= threshold ? row[j] * scale : T(0);
  }
}

// Inverted dropout of probability p on Z: feature k of row n is kept, and scaled by 1/(1 - p),
// iff (fmix32(fmix32(fmix32(seed ^ salt) ^ n·A) + k·B) >> 8) >= floor(p · 2^24).
template <typename T>
struct Dropout {
  bool on = false;
  uint32_t seed_key = 0;
  uint32_t threshold = 0;
  T scale = T(1);

  Dropout(double p, int64_t seed) : on(p > 0) {
    seed_key = fmix32(static_cast<uint32_t>(seed) ^ kSeedSalt);
    threshold = static_cast<uint32_t>(p * 16777216.0);  // exact product, truncated = floor
    scale = static_cast<T>(1.0 / (1.0 - p));
  }

  uint32_t row_key(int64_t row) const { return fmix32(seed_key ^ (static_cast<uint32_t>(row) * kRowMul)); }

  // keep[j] = whether element (row, k0 + j) is kept, j < len (all kept when off).
  void keep_row(uint8_t* keep, int64_t len, int64_t row, int64_t k0) const {
    if (!on) {
      std::fill(keep, keep + len, uint8_t{1});
      return;
    }
    const uint32_t key = row_key(row);
    for (int64_t j = 0; j < len; ++j) {
      keep[j] = (fmix32(key + (static_cast<uint32_t>(k0) + static_cast<uint32_t>(j)) * kColMul) >> 8) >= threshold;
    }
  }

  // The dropped value of v given its keep flag: selected, never multiplied by 0 (a dropped inf
  // or NaN is 0, as the reference's torch.where).
  T of(uint8_t keep, T v) const { return keep ? v * scale : T(0); }

  // Rows [0, rows) of a (rows, cols) tile of row stride ld holding Z[row0 + n, k0 + j].
  void apply(T* tile, int64_t rows, int64_t cols, int64_t ld, int64_t row0, int64_t k0) const {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        mask_row(tile + n * ld, cols, row_key(row0 + n), static_cast<uint32_t>(k0), threshold, scale);
    });
  }
};

// The checks of the op layer, repeated where the kernels take the numbers.
inline void check_dropout(const char* op, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fusionops::", op, ": dropout must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0 && seed < (int64_t{1} << 31), "fusionops::", op, ": seed must be in [0, 2**31), got ",
              seed);
}

}  // namespace
}  // namespace fusionops::cpu
