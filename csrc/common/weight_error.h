// Compensated bfloat16 parameters: the rounding error of each bfloat16 write,
// kept per element as a small signed integer (host and device).
//
// Integer for integer dist8bit/quant/weight_error.py. A bfloat16 is the top 16
// bits of a float32, so rounding a float32 `x` to bfloat16 `p` drops its low
// 16 bits: with |.| the float32 bit pattern without the sign bit, the dropped
// part is the integer delta = |x| - |p| in [-0x8000, 0x8000] (x and p have the
// same sign; round-to-nearest-even). The error buffer stores q = delta >> shift,
// rounded half up and clamped to a symmetric range that stays off the ties:
//   int8  (8-bit buffer):  shift 8, q in [-127, 127]
//   int16 (16-bit buffer): shift 0, q in [-32767, 32767]   (x itself, but for ties)
// so the restored float32 always rounds back to p (an element whose gradient
// is skipped keeps p and q).
// and the next step starts from the float32 whose magnitude bits are
// |p| + q << shift (never below 0) and whose sign is p's. Working on bit
// patterns needs no ulp arithmetic: it is the same at every exponent, across
// a binade boundary and for subnormals. A non-finite p carries no error (q = 0
// is stored, and p is read as it is).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace dist8bit {

constexpr uint32_t kMagnitudeMask = 0x7FFFFFFFu;
constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kInfinityBits = 0x7F800000u;

// The error buffer's integer format: bits per element (8 or 16).
struct WeightErrorFormat {
  int shift;      // 8 or 0
  int32_t q_min;  // -127 or -32767
  int32_t q_max;  // 127 or 32767

  D8_HD static constexpr WeightErrorFormat for_bits(int bits) {  // D8_HD: kernels pick the format at run time
    return bits == 8 ? WeightErrorFormat{8, -127, 127} : WeightErrorFormat{0, -32767, 32767};
  }
};

// The float32 a compensated bfloat16 parameter stands for: its bits (`p_bits`,
// the bfloat16's 16 bits) widened, with q << shift added to the magnitude.
D8_HD float compensated_value(uint16_t p_bits, int32_t q, WeightErrorFormat format) {
  const uint32_t bits = static_cast<uint32_t>(p_bits) << 16;
  const uint32_t magnitude = bits & kMagnitudeMask;
  if (magnitude >= kInfinityBits) return bits_to_float(bits);
  int32_t widened = static_cast<int32_t>(magnitude) + q * (int32_t{1} << format.shift);
  if (widened < 0) widened = 0;
  return bits_to_float((bits & kSignMask) | static_cast<uint32_t>(widened));
}

// The error of writing `x` as the bfloat16 `p_bits` (its round-to-nearest-even
// value): (|x| - |p|) >> shift, rounded half up, clamped; 0 when p is not finite.
D8_HD int32_t weight_error(float x, uint16_t p_bits, WeightErrorFormat format) {
  const uint32_t p_magnitude = (static_cast<uint32_t>(p_bits) << 16) & kMagnitudeMask;
  if (p_magnitude >= kInfinityBits) return 0;
  const int32_t delta = static_cast<int32_t>(float_to_bits(x) & kMagnitudeMask) - static_cast<int32_t>(p_magnitude);
  const int32_t half = format.shift > 0 ? (int32_t{1} << (format.shift - 1)) : 0;
  int32_t q = (delta + half) >> format.shift;  // arithmetic shift: floor
  if (q < format.q_min) q = format.q_min;
  if (q > format.q_max) q = format.q_max;
  return q;
}

}  // namespace dist8bit
