// The CPU kernels' fast path on x86 CPUs with AVX2 + FMA + F16C but no
// AVX-512: AMD EPYC Zen 2 and Zen 3 (Rome, Milan), and older or client Intel
// cores. Without it those machines run the scalar portable loops, whose
// per-element branches (the encoder's guard and sign tests) cost about 60
// cycles per encoded value.
//
// Same rules as everywhere (common/code_search.h, common/update_rules.h),
// on 8 lanes:
//   * encoding takes the encoder table's line (encoder_table_candidate) for 8
//     lanes at once; its four 32-entry lookups are gathers from the table (AVX2
//     has no two-register permute, and a 32-entry lookup by vpermps costs 4
//     permutes and 3 blends). A lane near a jump (or one the line does not
//     cover) takes the scalar binary search, so the codes never depend on
//     the line;
//   * decoding gathers code[c] and multiplies by the block's absmax, the same
//     float32 product as per element.
//   * compensated and stochastic bfloat16 writes are weight_error_simd.h's
//     and quant_simd.h's 16-lane integer forms on 8 lanes.
// Encoding here covers round-to-nearest 8-bit codes with a finite scale
// (nibble_simd.h has the 4-bit one); stochastic codes and blocks with a
// zero, Inf or NaN absmax stay on the portable loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/code_search.h"
#include "common/stochastic_rounding.h"
#include "common/weight_error.h"
#include "quant_simd.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(D8_PORTABLE) && !defined(D8_AVX512)
#define D8_AVX2 1
#include <immintrin.h>
#endif

namespace dist8bit {
namespace cpu {

#if D8_AVX2

// 8 elements as float32.
__attribute__((always_inline)) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((always_inline)) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((always_inline)) inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 8 float32 values stored in the parameter dtype, rounding to nearest even; a
// NaN becomes 0xFFFF in bfloat16 (as torch's vectorised copy writes it).
__attribute__((always_inline)) inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
__attribute__((always_inline)) inline void store8(c10::Half* out, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// float32 -> bfloat16 bits (round to nearest even, NaN -> 0xFFFF), one per 32-bit lane.
__attribute__((always_inline)) inline __m256i bfloat16_lanes8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_or_si256(rounded, _mm256_and_si256(nan, _mm256_set1_epi32(0xFFFF)));
}

// Stores the low 16 bits of 8 lanes holding values <= 0xFFFF (unsigned saturation keeps them).
__attribute__((always_inline)) inline void store_low_halves8(c10::BFloat16* out, __m256i lanes) {
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
}

__attribute__((always_inline)) inline void store8(c10::BFloat16* out, __m256 v) {
  store_low_halves8(out, bfloat16_lanes8(v));
}

// r(i) of common/stochastic_rounding.h for the 8 elements index0 .. index0 + 7.
__attribute__((always_inline)) inline __m256i mix32_avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMixMulA)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMixMulB)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}
__attribute__((always_inline)) inline __m256i random_bits8(uint32_t key, int64_t index0) {
  const uint64_t first = static_cast<uint64_t>(index0);
  const __m256i base_low = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m256i low = _mm256_add_epi32(base_low, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // low < base_low (unsigned): the index's low word wrapped, so its high word is one more.
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_low, flip), _mm256_xor_si256(low, flip));
  const __m256i high = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32))), carry);
  const __m256i mixed_high = mix32_avx2(_mm256_xor_si256(high, _mm256_set1_epi32(static_cast<int>(key))));
  return mix32_avx2(_mm256_xor_si256(low, mixed_high));
}

// u(i) of common/stochastic_rounding.h for the 8 elements index0 .. index0 + 7.
__attribute__((always_inline)) inline __m256 uniform8(uint32_t key, int64_t index0) {
  const __m256i top = _mm256_srli_epi32(random_bits8(key, index0), 8);
  return _mm256_mul_ps(_mm256_cvtepi32_ps(top), _mm256_set1_ps(5.9604644775390625e-08f));
}

// 8 float32 values as bfloat16 under stochastic rounding of element indices
// index0 ..: (bits + 16 random bits) >> 16; +-Inf stays itself, NaN becomes 0xFFFF.
__attribute__((always_inline)) inline void store8_stochastic(c10::BFloat16* out, __m256 v, uint32_t key,
                                                            int64_t index0) {
  const __m256i random = _mm256_and_si256(random_bits8(key, index0), _mm256_set1_epi32(0xFFFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(v), random), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  store_low_halves8(out, _mm256_or_si256(rounded, _mm256_and_si256(nan, _mm256_set1_epi32(0xFFFF))));
}

// Compensated bfloat16 parameters (common/weight_error.h) on 8 lanes, as
// weight_error_simd.h's 16-lane forms: the buffer's width and format.
static_assert(WeightErrorFormat::for_bits(8).q_max == INT8_MAX && WeightErrorFormat::for_bits(16).q_max == INT16_MAX,
              "store_errors8 clamps at q_max by saturating to the buffer's type");

struct ErrorFormat8 {
  bool eight;     // int8 buffer (else int16)
  __m128i shift;  // the shift count, for vpslld / vpsrad
  __m256i half;   // (1 << shift) >> 1: rounds the shift half up
  __m256i q_min;

  ErrorFormat8(int bits, WeightErrorFormat format)
      : eight(bits == 8),
        shift(_mm_cvtsi32_si128(format.shift)),
        half(_mm256_set1_epi32((int32_t{1} << format.shift) >> 1)),
        q_min(_mm256_set1_epi32(format.q_min)) {}
};

// 8 error codes from element i, sign-extended to int32.
__attribute__((always_inline)) inline __m256i load_errors8(const ErrorFormat8& f, const void* base, int64_t i) {
  if (f.eight) return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + i)));
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int16_t*>(base) + i)));
}

// Stores 8 codes at least q_min, saturating them to the type (that is, to q_max).
__attribute__((always_inline)) inline void store_errors8(const ErrorFormat8& f, void* base, int64_t i, __m256i q) {
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  if (f.eight) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<int8_t*>(base) + i), _mm_packs_epi16(words, words));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<int16_t*>(base) + i), words);
  }
}

// compensated_value on 8 lanes; `bits` holds the bfloat16 patterns << 16.
__attribute__((always_inline)) inline __m256 compensated_values8(const ErrorFormat8& f, __m256i bits, __m256i q) {
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int32_t>(kMagnitudeMask)));
  const __m256i widened = _mm256_max_epi32(_mm256_add_epi32(magnitude, _mm256_sll_epi32(q, f.shift)),
                                           _mm256_setzero_si256());
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int32_t>(kSignMask)));
  const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(kInfinityBits)), magnitude);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(bits, _mm256_or_si256(sign, widened), finite));
}

// weight_error on 8 lanes: the codes of writing `x` as its round-to-nearest-even bfloat16
// patterns `p_bits` (<< 16), at least q_min and not yet clamped at q_max (store_errors8 saturates).
__attribute__((always_inline)) inline __m256i weight_errors8(const ErrorFormat8& f, __m256 x, __m256i p_bits) {
  const __m256i delta = _mm256_sub_epi32(_mm256_castps_si256(x), p_bits);  // |x| - |p|: same signs
  const __m256i p_magnitude = _mm256_and_si256(p_bits, _mm256_set1_epi32(static_cast<int32_t>(kMagnitudeMask)));
  const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(kInfinityBits)), p_magnitude);
  const __m256i q = _mm256_max_epi32(_mm256_sra_epi32(_mm256_add_epi32(delta, f.half), f.shift), f.q_min);
  return _mm256_and_si256(q, finite);
}

// Lanes whose float is not finite (exponent all ones), as an all-ones mask.
__attribute__((always_inline)) inline __m256i not_finite8(__m256 v) {
  const __m256i exponent = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(static_cast<int>(kInfBits)));
  return _mm256_cmpeq_epi32(exponent, _mm256_set1_epi32(static_cast<int>(kInfBits)));
}

// code[c] * scale for 8 codes.
__attribute__((always_inline)) inline __m256 decode8(const float* code, const uint8_t* codes, __m256 scale) {
  const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  return _mm256_mul_ps(_mm256_i32gather_ps(code, index, 4), scale);
}

// The encoder table's four 32-entry columns, 8 floats per register.
struct LineTables8 {
  __m256 split1[4], split2[4], slope[4], offset[4];
  const float* table;
  bool two_splits = false;  // some slot has a second split point (else that lookup is skipped)

  explicit LineTables8(const float* encoder) : table(encoder) {
    for (int slot = 0; slot < kEncoderSlots; ++slot) two_splits = two_splits || !std::isnan(encoder[kEncoderSplit2 + slot]);
    for (int q = 0; q < 4; ++q) {
      split1[q] = _mm256_loadu_ps(encoder + kEncoderSplit1 + 8 * q);
      split2[q] = _mm256_loadu_ps(encoder + kEncoderSplit2 + 8 * q);
      slope[q] = _mm256_loadu_ps(encoder + kEncoderSlope + 8 * q);
      offset[q] = _mm256_loadu_ps(encoder + kEncoderOffset + 8 * q);
    }
  }
};

// column[index] for 8 indices in [0, 31]: four in-register permutes (index
// bits 0-2) blended by bit 3 and bit 4, moved into the sign bit for blendv.
__attribute__((always_inline)) inline __m256 lookup32(const __m256 column[4], __m256i index, __m256 bit3, __m256 bit4) {
  const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(column[0], index),
                                      _mm256_permutevar8x32_ps(column[1], index), bit3);
  const __m256 high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(column[2], index),
                                       _mm256_permutevar8x32_ps(column[3], index), bit3);
  return _mm256_blendv_ps(low, high, bit4);
}

// encoder_table_candidate (common/code_search.h) on 8 lanes: the candidate
// codes, and in `bad` the lanes (all ones) the line does not decide.
template <bool kTwoSplits>
__attribute__((always_inline)) inline __m256i line_codes8(const LineTables8& t, __m256 s, __m256i* bad) {
  // Indices are used as they come: lookup32 reads only their low 5 bits, which
  // is the scalar rule's & 31 (sums carry only upwards out of those bits).
  const float* table = t.table;
  const __m256i bits = _mm256_castps_si256(s);
  const __m256i magnitude_bits = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(kAbsMask)));
  const __m256 a = _mm256_castsi256_ps(magnitude_bits);
  const __m256i too_large = _mm256_cmpgt_epi32(magnitude_bits, _mm256_set1_epi32(0x3FFFFFFF));  // |s| >= 2, Inf, NaN
  const __m256i scaled = _mm256_castps_si256(_mm256_mul_ps(a, _mm256_broadcast_ss(table + kEncoderSlotScale)));
  const __m256i slot = _mm256_max_epu32(_mm256_srli_epi32(scaled, 23), _mm256_set1_epi32(kEncoderSlotBase));
  const __m256 slot_bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(slot, 28));
  const __m256 slot_bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(slot, 27));
  const __m256 split1 = lookup32(t.split1, slot, slot_bit3, slot_bit4);
  // a > split is all ones (-1) where true, so subtracting the mask adds one.
  __m256i piece = _mm256_sub_epi32(_mm256_castps_si256(split1), _mm256_castps_si256(_mm256_cmp_ps(a, split1, _CMP_GT_OQ)));
  if (kTwoSplits) {
    const __m256 split2 = lookup32(t.split2, slot, slot_bit3, slot_bit4);
    piece = _mm256_sub_epi32(piece, _mm256_castps_si256(_mm256_cmp_ps(a, split2, _CMP_GT_OQ)));
  }
  const __m256 piece_bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(piece, 28));
  const __m256 piece_bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(piece, 27));
  const __m256 h = _mm256_fmadd_ps(a, lookup32(t.slope, piece, piece_bit3, piece_bit4),
                                   lookup32(t.offset, piece, piece_bit3, piece_bit4));
  // Undecided: |h - rint(h)| below the guard, or NaN (the unordered compare is true then).
  const __m256 distance = _mm256_sub_ps(h, _mm256_round_ps(h, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256 magnitude = _mm256_and_ps(distance, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask))));
  const __m256 near = _mm256_cmp_ps(magnitude, _mm256_broadcast_ss(table + kEncoderGuard), _CMP_NGE_UQ);
  *bad = _mm256_or_si256(too_large, _mm256_castps_si256(near));
  const __m256 mirrored = _mm256_sub_ps(_mm256_broadcast_ss(table + kEncoderMirror), h);
  const __m256 y = _mm256_blendv_ps(h, mirrored, s);  // the sign bit of s picks the mirrored line
  return _mm256_cvttps_epi32(y);  // a decided lane's y is below 2^9: pack_bytes8's saturation clamps it
}

// Four vectors of 8 int32 codes in [-2^15, 2^15) -> 32 bytes in element order, clamped to [0, 255] (the packs saturate).
__attribute__((always_inline)) inline __m256i pack_bytes8(__m256i a, __m256i b, __m256i c, __m256i d) {
  // The packs work per 128-bit lane: dwords come out as a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7.
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Codes of the whole groups of 32 in [0, len); returns how many were done.
template <bool kTwoSplits, typename T>
int64_t encode_lines_avx2(const Codebook& book, const LineTables8& tables, const T* x, int64_t len, float inv,
                          uint8_t* out) {
  const __m256 scale = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256 s[4];
    __m256i codes[4], bad[4];
    for (int v = 0; v < 4; ++v) {
      s[v] = _mm256_mul_ps(load8(x + i + 8 * v), scale);
      codes[v] = line_codes8<kTwoSplits>(tables, s[v], &bad[v]);
    }
    const __m256i any_bad = _mm256_or_si256(_mm256_or_si256(bad[0], bad[1]), _mm256_or_si256(bad[2], bad[3]));
    if (__builtin_expect(!_mm256_testz_si256(any_bad, any_bad), 0)) {
      // The lanes the lines do not decide take the binary search (a NaN s counts as 0, as everywhere).
      for (int v = 0; v < 4; ++v) {
        const int lanes = _mm256_movemask_ps(_mm256_castsi256_ps(bad[v]));
        if (lanes == 0) continue;
        alignas(32) float values[8];
        alignas(32) int32_t fixed[8];
        _mm256_store_ps(values, s[v]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(fixed), codes[v]);
        for (int lane = 0; lane < 8; ++lane) {
          if ((lanes >> lane) & 1) fixed[lane] = nearest_code_index(book.thresholds, scaled_value(values[lane], 1.0f));
        }
        codes[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(fixed));
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), pack_bytes8(codes[0], codes[1], codes[2], codes[3]));
  }
  return i;
}

// Round-to-nearest codes of `len` values x * inv (inv finite), 32 at a time;
// the book's scalar rule for a group with an undecided lane and for the tail.
template <typename T>
void encode_avx2(const Codebook& book, const T* x, int64_t len, float inv, uint8_t* out) {
  int64_t i = 0;
  if (book.encoder != nullptr) {
    const LineTables8 tables(book.encoder);
    i = tables.two_splits ? encode_lines_avx2<true>(book, tables, x, len, inv, out)
                          : encode_lines_avx2<false>(book, tables, x, len, inv, out);
  }
  encode_portable(book, x + i, len - i, inv, out + i);
}

// Stochastic codes (common/code_search.h, stochastic_code_index) of `len`
// values x * inv (inv finite) whose first element has index `index0`: the
// round-to-nearest codes first (encode_avx2, into `out`), then 8 lanes at a
// time the pick between the two codes that bracket s; the tail takes the
// scalar rule.
template <typename T>
void encode_stochastic_avx2(const Codebook& book, const T* x, int64_t len, float inv, uint8_t* out, uint32_t key,
                            int64_t index0) {
  encode_avx2(book, x, len, inv, out);
  const __m256 scale = _mm256_set1_ps(inv);
  const __m256i one = _mm256_set1_epi32(1);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 s = _mm256_mul_ps(load8(x + i), scale);
    s = _mm256_andnot_ps(_mm256_cmp_ps(s, s, _CMP_UNORD_Q), s);  // NaN rounds as 0 (scaled_value)
    const __m256i nearest = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(out + i)));
    // low = s >= code[nearest] ? nearest : nearest - 1 (the compare's all-ones mask is -1), at least 0.
    const __m256 below = _mm256_cmp_ps(s, _mm256_i32gather_ps(book.code, nearest, 4), _CMP_LT_OQ);
    const __m256i low = _mm256_max_epi32(_mm256_add_epi32(nearest, _mm256_castps_si256(below)), _mm256_setzero_si256());
    const __m256i high = _mm256_min_epi32(_mm256_add_epi32(low, one), _mm256_set1_epi32(kLastCode));
    const __m256 code_low = _mm256_i32gather_ps(book.code, low, 4);
    const __m256 code_high = _mm256_i32gather_ps(book.code, high, 4);
    const __m256 fraction = _mm256_div_ps(_mm256_sub_ps(s, code_low), _mm256_sub_ps(code_high, code_low));
    const __m256 up = _mm256_cmp_ps(uniform8(key, index0 + i), fraction, _CMP_LT_OQ);  // NaN fraction: low
    const __m256i code = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(low), _mm256_castsi256_ps(high), up));
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(words, words));
  }
  encode_stochastic_portable(book, x + i, len - i, inv, out + i, key, index0 + i);
}

#endif  // D8_AVX2

}  // namespace cpu
}  // namespace dist8bit
