// The rounding rule of dist8bit/quant/codebook.py, element by element (host and device).
//
//   s    = x * (1 / absmax), float32, and 0 when that is NaN
//   code = #{ j : thresholds[j] < s }, thresholds sorted, thresholds[255] = +inf
//
// Two ways to find that count, which agree for every s that is not NaN:
//   * binary search: 8 branch-free steps over the 256 thresholds;
//   * lookup table (codebook.build_lookup_table): the float32 bits of s pick a
//     bucket whose entry is the count at the bucket's bottom, then at most
//     `refine_steps` comparisons `idx += s > thresholds[idx]` finish the count.
//     An empty table means "binary search".
// Stochastic rounding then picks the code below or above s (reference.round_stochastically).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace dist8bit {

constexpr int kMapSize = 256;
constexpr int kLastCode = kMapSize - 1;
constexpr int kFloat32ExponentOne = 127;  // biased exponent of 1.0f

// s = x * inv with NaN mapped to 0 (inv = 1 / absmax, computed once per block).
D8_HD float scaled_value(float x, float inv) {
  const float s = x * inv;
  return s != s ? 0.0f : s;
}

// Lookup-table geometry: rows of 2^mantissa_bits buckets per sign. Row 0 holds
// every |s| below 2^(min_exponent - 127); the last row holds exponent 128 and
// above (only +-inf reaches it, since |s| <= 1 otherwise).
D8_HD int lut_rows(int min_exponent) { return kFloat32ExponentOne - min_exponent + 2; }

D8_HD int64_t lut_entries(int mantissa_bits, int min_exponent) {
  return (static_cast<int64_t>(2 * lut_rows(min_exponent))) << mantissa_bits;
}

// The bucket of s, in the key order of codebook._bucket_bounds:
//   key = sign * rows * 2^M + row * 2^M + top M mantissa bits,
//   row = clamp(exponent - min_exponent + 1, 0, rows - 1).
D8_HD uint32_t lut_key(float s, int mantissa_bits, int min_exponent) {
  const uint32_t bits = float_to_bits(s);
  const uint32_t sign = bits >> 31;
  const int exponent = static_cast<int>((bits >> 23) & 0xFFu);
  const int rows = lut_rows(min_exponent);
  int row = exponent - min_exponent + 1;
  row = row < 0 ? 0 : row;
  row = row > rows - 1 ? rows - 1 : row;
  const uint32_t mantissa_top = (bits & 0x7FFFFFu) >> (23 - mantissa_bits);
  return ((sign * static_cast<uint32_t>(rows) + static_cast<uint32_t>(row)) << mantissa_bits) + mantissa_top;
}

// Finish a lookup-table count: `steps` comparisons against the next threshold.
// thresholds[255] = +inf stops the count at 255.
D8_HD int refine_count(int idx, float s, const float* thresholds, int steps) {
  for (int step = 0; step < steps; ++step) idx += s > thresholds[idx] ? 1 : 0;
  return idx;
}

// #{ j : thresholds[j] < s } by an 8-step branch-free binary search. Only the
// first 255 thresholds are ever read (the last one is +inf), so the result is
// in [0, 255]. Equals torch.searchsorted(thresholds, s, side="left").
D8_HD int nearest_code_index(const float* thresholds, float s) {
  int idx = 0;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int step = kMapSize / 2; step > 0; step >>= 1) idx += s > thresholds[idx + step - 1] ? step : 0;
  return idx;
}

// The same count through the lookup table (lut must not be empty). Table
// entries are clamped to [0, 255] so that a damaged table cannot index past
// the thresholds.
D8_HD int nearest_code_index_lut(const float* thresholds, const int32_t* lut, int mantissa_bits, int min_exponent,
                                 int refine_steps, float s) {
  uint32_t idx = static_cast<uint32_t>(lut[lut_key(s, mantissa_bits, min_exponent)]);
  idx = idx > static_cast<uint32_t>(kLastCode) ? static_cast<uint32_t>(kLastCode) : idx;
  return refine_count(static_cast<int>(idx), s, thresholds, refine_steps);
}

// The rounding rule as a codebook hands it over: the table when it has one,
// else the binary search (lut == nullptr).
D8_HD int nearest_code_index(const float* thresholds, const int32_t* lut, int mantissa_bits, int min_exponent,
                             int refine_steps, float s) {
  return lut == nullptr ? nearest_code_index(thresholds, s)
                        : nearest_code_index_lut(thresholds, lut, mantissa_bits, min_exponent, refine_steps, s);
}

// Stochastic rounding (reference.round_stochastically): between the codes
// `low` and `high` = low + 1 that bracket s, pick `high` when
//   u < (s - code[low]) / (code[high] - code[low])
// (float32 subtractions and division; a NaN fraction picks `low`).
D8_HD int stochastic_code_index(const float* code, int nearest, float s, float u) {
  int low = s >= code[nearest] ? nearest : nearest - 1;
  low = low < 0 ? 0 : low;
  const int high = low + 1 > kLastCode ? kLastCode : low + 1;
  const float code_low = code[low];
  const float code_high = code[high];
  const float fraction = (s - code_low) / (code_high - code_low);
  return u < fraction ? high : low;
}

}  // namespace dist8bit
