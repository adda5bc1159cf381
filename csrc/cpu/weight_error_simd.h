// Compensated bfloat16 parameters on the CPU: the error buffer's element
// access and, with AVX-512, common/weight_error.h on 16 lanes.
//
// The vector forms compute compensated_value and weight_error of
// common/weight_error.h (the one definition of the encoding) lane by lane:
// widen the bfloat16 bits, add q << shift to the magnitude, floor at 0, keep a
// non-finite p as it is; encode by subtracting, adding half, an arithmetic
// shift and a clamp. Two steps are folded: x and its round-to-nearest-even p
// have the same sign, so |x| - |p| is the difference of the full bit patterns
// (the sign bits cancel); and the clamp at q_max is the saturating narrowing
// to int8/int16 (q_max is the type's maximum), the clamp at q_min a max that
// also zeroes the lanes whose p is not finite. The buffer's width (int8 or
// int16) is a run-time choice per call, like 8 or 4 state bits, so it costs no
// extra template instantiations; the branch on it is the same for every vector.
#pragma once

#include <cstdint>

#include "common/weight_error.h"
#include "quant_simd.h"

namespace dist8bit {
namespace cpu {

// One call's error buffers: their width and format (bits 0: no error buffers).
struct ErrorLayout {
  int bits = 0;  // 8 (int8) or 16 (int16); 0 when the call is not compensated
  WeightErrorFormat format = WeightErrorFormat::for_bits(8);

  bool enabled() const { return bits != 0; }
  int64_t bytes() const { return bits / 8; }
};

// Element i of an error buffer (scalar).
inline int32_t load_error(const ErrorLayout& layout, const void* base, int64_t i) {
  return layout.bits == 8 ? static_cast<const int8_t*>(base)[i] : static_cast<const int16_t*>(base)[i];
}

inline void store_error(const ErrorLayout& layout, void* base, int64_t i, int32_t q) {
  if (layout.bits == 8) {
    static_cast<int8_t*>(base)[i] = static_cast<int8_t>(q);
  } else {
    static_cast<int16_t*>(base)[i] = static_cast<int16_t>(q);
  }
}

#if D8_AVX512
static_assert(WeightErrorFormat::for_bits(8).q_max == INT8_MAX && WeightErrorFormat::for_bits(16).q_max == INT16_MAX,
              "store_errors16 clamps at q_max by saturating to the buffer's type");

// The format as vectors, built once per unit.
struct ErrorFormat16 {
  bool eight;     // int8 buffer (else int16)
  __m128i shift;  // the shift count, for vpslld / vpsrad
  __m512i half;   // (1 << shift) >> 1: rounds the shift half up
  __m512i q_min;

  explicit ErrorFormat16(const ErrorLayout& layout)
      : eight(layout.bits == 8),
        shift(_mm_cvtsi32_si128(layout.format.shift)),
        half(_mm512_set1_epi32((int32_t{1} << layout.format.shift) >> 1)),
        q_min(_mm512_set1_epi32(layout.format.q_min)) {}
};

// 16 error codes from element i, sign-extended to int32 (lanes outside `lanes` read 0).
__attribute__((always_inline)) inline __m512i load_errors16(const ErrorFormat16& f, const void* base, int64_t i,
                                                            __mmask16 lanes) {
  if (f.eight) return _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes, static_cast<const int8_t*>(base) + i));
  return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(lanes, static_cast<const int16_t*>(base) + i));
}

// Stores 16 codes at least q_min, saturating them to the type (that is, to q_max).
__attribute__((always_inline)) inline void store_errors16(const ErrorFormat16& f, void* base, int64_t i,
                                                          __mmask16 lanes, __m512i q) {
  if (f.eight) {
    _mm_mask_storeu_epi8(static_cast<int8_t*>(base) + i, lanes, _mm512_cvtsepi32_epi8(q));
  } else {
    _mm256_mask_storeu_epi16(static_cast<int16_t*>(base) + i, lanes, _mm512_cvtsepi32_epi16(q));
  }
}

// compensated_value on 16 lanes; `bits` holds the bfloat16 patterns << 16.
__attribute__((always_inline)) inline __m512 compensated_values16(const ErrorFormat16& f, __m512i bits, __m512i q) {
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int32_t>(kMagnitudeMask)));
  const __m512i widened = _mm512_max_epi32(_mm512_add_epi32(magnitude, _mm512_sll_epi32(q, f.shift)),
                                           _mm512_setzero_si512());
  const __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int32_t>(kSignMask)));
  const __mmask16 finite = _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(static_cast<int32_t>(kInfinityBits)));
  return _mm512_castsi512_ps(_mm512_mask_or_epi32(bits, finite, sign, widened));
}

// weight_error on 16 lanes: the codes of writing `x` as its round-to-nearest-even bfloat16 patterns
// `p_bits` (<< 16), at least q_min and not yet clamped at q_max (store_errors16 saturates).
__attribute__((always_inline)) inline __m512i weight_errors16(const ErrorFormat16& f, __m512 x, __m512i p_bits) {
  const __m512i delta = _mm512_sub_epi32(_mm512_castps_si512(x), p_bits);  // |x| - |p|: same signs
  const __m512i p_magnitude = _mm512_and_si512(p_bits, _mm512_set1_epi32(static_cast<int32_t>(kMagnitudeMask)));
  const __mmask16 finite =
      _mm512_cmplt_epu32_mask(p_magnitude, _mm512_set1_epi32(static_cast<int32_t>(kInfinityBits)));
  return _mm512_maskz_max_epi32(finite, _mm512_sra_epi32(_mm512_add_epi32(delta, f.half), f.shift), f.q_min);
}
#endif  // D8_AVX512

}  // namespace cpu
}  // namespace dist8bit
