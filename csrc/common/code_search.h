// The rounding rule of dist8bit/quant/codebook.py, element by element (host and device).
//
//   s    = x * (1 / absmax), float32, and 0 when that is NaN
//   code = #{ j : thresholds[j] < s }, thresholds sorted, last threshold +inf
//
// A map has 256 values (8-bit codes, one per byte) or 16 (4-bit codes, two per
// byte: dist8bit/quant/packing.py). Ways to find the count, which agree for
// every s that is not NaN:
//   * binary search: 8 (4-bit: 4) branch-free steps over the thresholds;
//   * the encoder table (dist8bit/quant/encoder_table.py): a straight line per
//     piece of |s| gives the count unless it lands near a jump, where the
//     binary search decides. A map without a table (nullptr) always searches.
// Stochastic rounding then picks the code below or above s (reference.round_stochastically).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace dist8bit {

constexpr int kMapSize = 256;
constexpr int kLastCode = kMapSize - 1;
constexpr int kMapSize4 = 16;  // a 4-bit map
constexpr int kLastCode4 = kMapSize4 - 1;

// Bits per code of a map with `entries` values: 8, 4, or 0 for any other size.
constexpr int map_bits(int64_t entries) {
  return entries == kMapSize ? 8 : entries == kMapSize4 ? 4 : 0;
}

// The 4-bit code of element i of a packed run (op_contract.h code_bytes: the layout).
D8_HD int nibble_at(const uint8_t* codes, int64_t i) { return (codes[i >> 1] >> ((i & 1) * 4)) & 15; }
constexpr int kFloat32ExponentOne = 127;  // biased exponent of 1.0f

// s = x * inv with NaN mapped to 0 (inv = 1 / absmax, computed once per block).
D8_HD float scaled_value(float x, float inv) {
  const float s = x * inv;
  return s != s ? 0.0f : s;
}

// #{ j : thresholds[j] < s } over a map of kSize (256 or 16) values by a
// log2(kSize)-step branch-free binary search. Only the first kSize - 1
// thresholds are ever read (the last one is +inf), so the result is in
// [0, kSize - 1]. Equals torch.searchsorted(thresholds, s, side="left").
template <int kSize>
D8_HD int search_thresholds(const float* thresholds, float s) {
  int idx = 0;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int step = kSize / 2; step > 0; step >>= 1) idx += s > thresholds[idx + step - 1] ? step : 0;
  return idx;
}

// The 8-bit search (256 thresholds, 8 steps).
D8_HD int nearest_code_index(const float* thresholds, float s) { return search_thresholds<kMapSize>(thresholds, s); }

// The 4-bit search (16 thresholds, 4 steps; a 4-bit map has no encoder table).
D8_HD int nearest_code_index4(const float* thresholds, float s) { return search_thresholds<kMapSize4>(thresholds, s); }

// The encoder table of dist8bit/quant/encoder_table.py (kEncoderTableSize
// floats; see that module for how it is built and why it is exact):
//   [0, 32)   split1 per slot; its low 5 bits (or NaN payload) = the slot's first piece
//   [32, 64)  split2 per slot (NaN: unused)
//   [64, 96)  slope per piece, [96, 128) offset per piece
//   [128]     mirror: negative s gets code trunc(mirror - h) (= mirror - 1 - floor(h)
//             whenever h clears the guard)
//   [129]     guard: h within `guard` of an integer takes the binary search
//   [130]     slot scale c in [0.5, 1): slots are binades of float32(|s| * c)
constexpr int kEncoderSlots = 32;
constexpr int kEncoderSlotBase = 96;  // slot = max(biased exponent of |s| * c, 96) - 96
constexpr int kEncoderSplit1 = 0;
constexpr int kEncoderSplit2 = 32;
constexpr int kEncoderSlope = 64;
constexpr int kEncoderOffset = 96;
constexpr int kEncoderMirror = 128;
constexpr int kEncoderGuard = 129;
constexpr int kEncoderSlotScale = 130;
constexpr int kEncoderTableSize = 131;
constexpr uint32_t kEncoderPieceMask = 31u;

// The fast path's candidate: h = fma(|s|, slope, offset) on s's piece. Returns
// false when h is within the guard of an integer, or s is outside the lines
// (|s| >= 2, Inf, NaN), where the candidate may be wrong and the binary search
// must decide. No early exits: the same straight line for every s (a scalar
// loop over it needs no unpredictable branch and can be vectorized; the
// table reads stay in range for any s).
D8_HD bool encoder_table_candidate(const float* table, float s, int* code) {
  const uint32_t bits = float_to_bits(s);
  const uint32_t magnitude_bits = bits & 0x7FFFFFFFu;
  const float a = bits_to_float(magnitude_bits);
  const bool covered = (magnitude_bits >> 23) <= static_cast<uint32_t>(kFloat32ExponentOne);  // |s| < 2
  // |s| * c < 2 (c < 1), so its exponent is at most 127: exponents 96..127 -> slots 0..31.
  uint32_t exponent = float_to_bits(a * table[kEncoderSlotScale]) >> 23;
  exponent = exponent < static_cast<uint32_t>(kEncoderSlotBase) ? static_cast<uint32_t>(kEncoderSlotBase) : exponent;
  const uint32_t slot = exponent & 31u;
  const float split1 = table[kEncoderSplit1 + slot];
  uint32_t piece = float_to_bits(split1) & kEncoderPieceMask;
  piece += a > split1 ? 1u : 0u;
  piece += a > table[kEncoderSplit2 + slot] ? 1u : 0u;
  piece &= kEncoderPieceMask;
#ifdef __CUDA_ARCH__
  const float h = __fmaf_rn(a, table[kEncoderSlope + piece], table[kEncoderOffset + piece]);
  const float nearest_integer = rintf(h);
#else
  const float h = std::fma(a, table[kEncoderSlope + piece], table[kEncoderOffset + piece]);
  const float nearest_integer = std::nearbyint(h);
#endif
  const float distance = h - nearest_integer;
  const bool clear = (distance >= table[kEncoderGuard]) | (-distance >= table[kEncoderGuard]);  // NaN: false
  const bool decided = covered & clear;
  // y = negative s ? mirror - h : h, and 0 where undecided, as bit masks (no branch on the sign).
  const uint32_t negative = 0u - (bits >> 31);
  const uint32_t keep = 0u - static_cast<uint32_t>(decided);
  const uint32_t y_bits = ((float_to_bits(table[kEncoderMirror] - h) & negative) | (float_to_bits(h) & ~negative)) & keep;
  int candidate = static_cast<int>(bits_to_float(y_bits));  // decided: |y| < 2^9, so truncation is defined
  candidate = candidate < 0 ? 0 : candidate;
  *code = candidate > kLastCode ? kLastCode : candidate;
  return decided;
}

// The rounding rule as a codebook hands it over: the encoder table's line
// when it is clear of every jump, else the binary search (also when the map
// has no table, table == nullptr).
D8_HD int nearest_code_index(const float* thresholds, const float* table, float s) {
  int code;
  if (table != nullptr && encoder_table_candidate(table, s, &code)) return code;
  return nearest_code_index(thresholds, s);
}

// A codebook as the kernels take it (dist8bit.quant.codebook.Codebook): 256
// (4-bit: 16) sorted code values, as many thresholds, and the encoder table
// or nullptr (always nullptr for a 4-bit map).
struct Codebook {
  const float* code;
  const float* thresholds;
  const float* encoder;  // the encoder table (kEncoderTableSize floats); nullptr: binary search only
  int bits = 8;          // 8: 256 values; 4: 16 values, codes packed two per byte

  D8_HD int last_code() const { return bits == 4 ? kLastCode4 : kLastCode; }
  D8_HD int nearest(float s) const {
    return bits == 4 ? nearest_code_index4(thresholds, s) : nearest_code_index(thresholds, encoder, s);
  }
};

// Stochastic rounding (reference.round_stochastically): between the codes
// `low` and `high` = low + 1 that bracket s, pick `high` when
//   u < (s - code[low]) / (code[high] - code[low])
// (float32 subtractions and division; a NaN fraction picks `low`). `last`:
// the map's last code (kLastCode4 for a 4-bit map).
D8_HD int stochastic_code_index(const float* code, int nearest, float s, float u, int last = kLastCode) {
  int low = s >= code[nearest] ? nearest : nearest - 1;
  low = low < 0 ? 0 : low;
  const int high = low + 1 > last ? last : low + 1;
  const float code_low = code[low];
  const float code_high = code[high];
  const float fraction = (s - code_low) / (code_high - code_low);
  return u < fraction ? high : low;
}

}  // namespace dist8bit
