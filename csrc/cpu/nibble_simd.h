// 4-bit codes on the CPU: the fused step's decoder and encoder for states
// whose map has 16 values (dist8bit.quant.maps.create_dynamic_map_4bit,
// create_linear_map_4bit), codes packed two per byte (op_contract.h
// code_bytes; dist8bit/quant/packing.py): element 2j is the low nibble of
// byte j, element 2j + 1 the high nibble, and an odd run's last high nibble is 0.
//
// The rounding rule is quant_simd.h's (common/code_search.h): s = x * inv,
// code = #{ j : thresholds[j] < s }. With AVX-512:
//   decode  8 code bytes widen to 8 qwords (vpmovzxbq); or-ing each qword with
//           itself shifted left by 28 puts byte j's low nibble in the low 4
//           bits of lane 2j and its high nibble in the low 4 bits of lane
//           2j + 1, which are the only index bits vpermps reads: one permute of
//           the 16-entry table code[c] * scale (scaled once per block; the
//           same float32 product as code[c] * absmax per element) gives 16
//           values.
//   encode  a 4-step binary search whose tables (1, 2, 4 and 8 thresholds)
//           each fit one register: step k looks up the threshold for the
//           k-1 decisions so far with vpermps and shifts the sign bit of
//           threshold - s into the code (quant_simd.h search_step, exact for
//           finite s). 64 codes are packed to bytes (pack_bytes), then each
//           byte pair to one byte (c_even | c_odd << 4, vpmovwb).
// With AVX2 (no AVX-512) the same on 8 lanes: 16-entry lookups are two
// vpermps blended by bit 3, the search's step tables have at most 8 entries
// (one vpermps each), and byte pairs become one byte with vpmaddubsw.
// Without either the same entry points run scalar loops; all paths give the
// reference's bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "avx2_simd.h"
#include "common/code_search.h"
#include "common/op_contract.h"
#include "quant_simd.h"

namespace dist8bit {
namespace cpu {

// `len` codes of `code` (< 16) from element 0: the bytes they fill, an odd
// run's last high nibble 0 (blocks whose every s rounds as 0).
inline void fill_nibbles(uint8_t code, int64_t len, uint8_t* out) {
  std::memset(out, code | (code << 4), static_cast<size_t>(len / 2));
  if (len % 2 != 0) out[len / 2] = code;
}

// Round-to-nearest 4-bit codes of `len` values scaled by `inv`, packed into code_bytes(len, 4) bytes.
inline void encode_nibbles_portable(const Codebook& book, const float* x, int64_t len, float inv, uint8_t* out) {
  for (int64_t j = 0; 2 * j < len; ++j) {
    const int low = nearest_code_index4(book.thresholds, scaled_value(x[2 * j], inv));
    const int high = 2 * j + 1 < len ? nearest_code_index4(book.thresholds, scaled_value(x[2 * j + 1], inv)) : 0;
    out[j] = static_cast<uint8_t>(low | (high << 4));
  }
}

// The 4-step search's table for step k + 1 over `lanes` lanes: lane l holds
// thresholds[p * 2^(4-k) + 2^(3-k) - 1] for the prefix p = l mod 2^k (step 1
// is one threshold, broadcast); -0 is stored as +0 so that s = +-0 compares as
// the reference does. Shared by the 16- and 8-lane tables.
inline void fill_nibble_step(const float* thresholds, int k, int lanes, float* table) {
  for (int lane = 0; lane < lanes; ++lane) {
    const int p = lane & ((1 << k) - 1);
    const float t = thresholds[(p << (4 - k)) + (1 << (3 - k)) - 1];
    table[lane] = t == 0.0f ? 0.0f : t;
  }
}

#if D8_AVX512
// One 4-bit slot's tables: the 16 code values and the search's step tables.
struct NibbleTables {
  __m512 code;     // code[c], c = 0..15
  // Step k + 1: entry p = thresholds[p * 2^(4-k) + 2^(3-k) - 1] for the 2^k
  // prefixes p, repeated over the 16 lanes (step 1 is one threshold,
  // broadcast); -0 is stored as +0 so that s = +-0 compares as the reference does.
  __m512 step[4];

  NibbleTables(const float* code_values, const float* thresholds) {
    code = _mm512_loadu_ps(code_values);
    alignas(64) float table[16];
    for (int k = 0; k < 4; ++k) {
      fill_nibble_step(thresholds, k, 16, table);
      step[k] = _mm512_load_ps(table);
    }
  }
};

// 16 values code[c] * scale from the 8 code bytes at `bytes`; `table` = code * scale.
__attribute__((always_inline)) inline __m512 decode_nibbles16(__m128i bytes, __m512 table) {
  const __m512i wide = _mm512_cvtepu8_epi64(bytes);
  return _mm512_permutexvar_ps(_mm512_or_si512(wide, _mm512_slli_epi64(wide, 28)), table);
}

// The values of 64 elements (32 code bytes at `codes`); a partial group
// (count < 64) reads only its code_bytes(count, 4) bytes.
template <bool kFull>
__attribute__((always_inline)) inline void decode_nibble_group(const uint8_t* codes, int64_t count, __m512 table,
                                                               __m512 out[4]) {
  for (int q = 0; q < 4; ++q) {
    __m128i bytes;
    if (kFull) {
      bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * q));
    } else {
      const int64_t left = code_bytes(count, 4) - 8 * q;
      const __mmask16 mask = left <= 0 ? __mmask16(0) : static_cast<__mmask16>(first_bits(std::min<int64_t>(left, 8)));
      bytes = _mm_maskz_loadu_epi8(mask, codes + 8 * q);
    }
    out[q] = decode_nibbles16(bytes, table);
  }
}

// #{ j : thresholds[j] < s } for 16 finite lanes: 4 steps.
__attribute__((always_inline)) inline __m512i search_nibbles(const NibbleTables& t, __m512 s) {
  __m512i p = _mm512_srli_epi32(_mm512_castps_si512(_mm512_sub_ps(t.step[0], s)), 31);
  for (int k = 1; k < 4; ++k) p = search_step(p, s, _mm512_permutexvar_ps(p, t.step[k]));
  return p;
}

// Round-to-nearest codes of `len` values (in L1) whose scale `inv` and
// absmax are finite, packed into code_bytes(len, 4) bytes at `out`.
inline void encode_nibbles_avx512(const NibbleTables& tables, const float* x, int64_t len, float inv, uint8_t* out) {
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < len; i += 64) {
    const int64_t count = std::min<int64_t>(64, len - i);
    __m512i c[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t left = count - 16 * v;
      const __mmask16 lanes = left <= 0 ? __mmask16(0) : static_cast<__mmask16>(first_bits(left));
      c[v] = search_nibbles(tables, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + i + 16 * v), scale));
    }
    // Codes past the run are 0, so an odd run's last high nibble is 0.
    const __m512i bytes = _mm512_maskz_mov_epi8(first_bits(count), pack_bytes(c[0], c[1], c[2], c[3]));
    const __m256i packed = _mm512_cvtepi16_epi8(_mm512_or_si512(bytes, _mm512_srli_epi16(bytes, 4)));
    if (count == 64) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), packed);
    } else {
      _mm256_mask_storeu_epi8(out + i / 2, static_cast<__mmask32>(first_bits(code_bytes(count, 4))), packed);
    }
  }
}
#endif  // D8_AVX512

#if D8_AVX2
// One 4-bit slot's search tables on 8 lanes (as NibbleTables: step k + 1's
// entry p is thresholds[p * 2^(4-k) + 2^(3-k) - 1], -0 stored as +0).
struct NibbleTables8 {
  __m256 step[4];

  explicit NibbleTables8(const float* thresholds) {
    alignas(32) float table[8];
    for (int k = 0; k < 4; ++k) {
      fill_nibble_step(thresholds, k, 8, table);
      step[k] = _mm256_load_ps(table);
    }
  }
};

// The 16-entry table code[c] * scale in two registers.
struct ScaledNibbleCode8 {
  __m256 low, high;
  ScaledNibbleCode8(const float* code_values, float scale) {
    low = _mm256_mul_ps(_mm256_loadu_ps(code_values), _mm256_set1_ps(scale));
    high = _mm256_mul_ps(_mm256_loadu_ps(code_values + 8), _mm256_set1_ps(scale));
  }
};

// 8 values code[c] * scale from the 4 code bytes at `codes`: widening each byte
// to a qword and or-ing it with itself shifted left by 28 leaves the low nibble
// in the low bits of dword 2j and the high nibble in those of dword 2j + 1.
__attribute__((always_inline)) inline __m256 decode_nibbles8(const uint8_t* codes, const ScaledNibbleCode8& table) {
  int32_t four;
  std::memcpy(&four, codes, 4);
  const __m256i wide = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
  const __m256i index = _mm256_or_si256(wide, _mm256_slli_epi64(wide, 28));
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.low, index), _mm256_permutevar8x32_ps(table.high, index), bit3);
}

// #{ j : thresholds[j] < s } for 8 finite lanes: 4 steps, each decision the
// sign bit of threshold - s (exact for finite s, as search_step).
__attribute__((always_inline)) inline __m256i search_nibbles8(const NibbleTables8& t, __m256 s) {
  __m256i p = _mm256_srli_epi32(_mm256_castps_si256(_mm256_sub_ps(t.step[0], s)), 31);
  for (int k = 1; k < 4; ++k) {
    const __m256 threshold = _mm256_permutevar8x32_ps(t.step[k], p);
    const __m256i decision = _mm256_srli_epi32(_mm256_castps_si256(_mm256_sub_ps(threshold, s)), 31);
    p = _mm256_or_si256(_mm256_slli_epi32(p, 1), decision);
  }
  return p;
}

// Round-to-nearest codes of `len` values (in L1) whose scale `inv` and
// absmax are finite, packed into code_bytes(len, 4) bytes at `out`: 32 values
// at a time, the last len % 32 by the scalar loop.
inline void encode_nibbles_avx2(const Codebook& book, const NibbleTables8& tables, const float* x, int64_t len,
                                float inv, uint8_t* out) {
  const __m256 scale = _mm256_set1_ps(inv);
  const __m256i pair = _mm256_set1_epi16(0x1001);  // c_even * 1 + c_odd * 16
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256i c[4];
    for (int v = 0; v < 4; ++v) c[v] = search_nibbles8(tables, _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * v), scale));
    const __m256i words = _mm256_maddubs_epi16(pack_bytes8(c[0], c[1], c[2], c[3]), pair);
    const __m128i packed = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), packed);
  }
  encode_nibbles_portable(book, x + i, len - i, inv, out + i / 2);
}
#endif  // D8_AVX2

}  // namespace cpu
}  // namespace dist8bit
