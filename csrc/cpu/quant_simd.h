// Building blocks of the CPU quantization kernels, shared by quantize.cpp
// (quantize/dequantize_blockwise) and fused_step.cpp (the optimizer step, which
// re-encodes its 8-bit states with the same code): element conversions, the
// codebook's scalar rounding rule, absmax as an unsigned max over |x| bits,
// and with AVX-512 the permute-based binary search encoder and (VBMI) the
// byte-plane decoder. quantize.cpp's header comment describes the methods and
// why they agree bit for bit with dist8bit/backends/reference.py.
//
// Everything here is inline or a template: each kernel file includes it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/code_search.h"
#include "common/op_contract.h"
#include "common/stochastic_rounding.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    !defined(D8_PORTABLE)
#define D8_AVX512 1
#include <immintrin.h>
#if defined(__AVX512VBMI__)
#define D8_AVX512_VBMI 1
#endif
#endif

namespace dist8bit {
namespace cpu {

constexpr int64_t kWindow = 2048;          // small blocks are encoded this many elements at a time
constexpr int64_t kMaxAhead = 4096;        // software prefetch distance limit, elements
constexpr int kOneScale = 62;              // encode shift: every vector uses inv[0]
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kCanonicalNaN = 0x7FC00000u;

// ---------------------------------------------------------------------------
// Element conversions (scalar).

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0xFFFF like torch's vectorised copy.
inline uint16_t bfloat16_bits(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & kAbsMask) > kInfBits) return 0xFFFFu;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline void store_float(float* out, float v) { *out = v; }
inline void store_float(c10::Half* out, float v) { *out = c10::Half(v); }
inline void store_float(c10::BFloat16* out, float v) { *out = c10::BFloat16(bfloat16_bits(v), c10::BFloat16::from_bits()); }

// A blocksize of n or more means one block; clamping it keeps all offsets within n.
inline int64_t effective_blocksize(int64_t n, int64_t blocksize) { return std::min(blocksize, std::max<int64_t>(n, 1)); }

// absmax from the max of |x| bits: NaN becomes the canonical quiet NaN.
inline float absmax_from_bits(uint32_t bits) { return bits_to_float(bits > kInfBits ? kCanonicalNaN : bits); }

// ---------------------------------------------------------------------------
// Portable loops (also the path of rare blocks: absmax 0, Inf, NaN, or so
// small that 1 / absmax overflows).

template <typename T>
uint32_t absmax_bits_portable(const T* x, int64_t n) {
  uint32_t result = 0;
#pragma omp simd reduction(max : result)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = float_to_bits(to_float(x[i])) & kAbsMask;
    result = a > result ? a : result;
  }
  return result;
}

// Round-to-nearest codes. With an encoder table, a run at a time: the lines
// for every value (one straight line of code, no data-dependent branch), then
// the binary search for the values they leave undecided.
template <typename T>
void encode_portable(const Codebook& book, const T* x, int64_t len, float inv, uint8_t* out) {
  if (book.bits != 8 || book.encoder == nullptr) {
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<uint8_t>(book.nearest(scaled_value(to_float(x[i]), inv)));
    return;
  }
  constexpr int64_t kRun = 256;
  int code[kRun];
  bool decided[kRun];
  for (int64_t start = 0; start < len; start += kRun) {
    const int64_t n = std::min(kRun, len - start);
    bool all_decided = true;
    for (int64_t j = 0; j < n; ++j) {
      decided[j] = encoder_table_candidate(book.encoder, scaled_value(to_float(x[start + j]), inv), &code[j]);
      all_decided &= decided[j];
    }
    if (!all_decided) {
      for (int64_t j = 0; j < n; ++j) {
        if (!decided[j]) code[j] = nearest_code_index(book.thresholds, scaled_value(to_float(x[start + j]), inv));
      }
    }
    for (int64_t j = 0; j < n; ++j) out[start + j] = static_cast<uint8_t>(code[j]);
  }
}

template <typename T>
void encode_stochastic_portable(const Codebook& book, const T* x, int64_t len, float inv, uint8_t* out, uint32_t key,
                                int64_t index0) {
  for (int64_t i = 0; i < len; ++i) {
    const float s = scaled_value(to_float(x[i]), inv);
    const int nearest = book.nearest(s);
    const float u = uniform_for_index(key, static_cast<uint64_t>(index0 + i));
    out[i] = static_cast<uint8_t>(stochastic_code_index(book.code, nearest, s, u));
  }
}

template <typename T>
void decode_portable(const uint8_t* codes, int64_t len, const float* code, float scale, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) store_float(out + i, code[codes[i]] * scale);
}

#if D8_AVX512
// ---------------------------------------------------------------------------
// AVX-512 quantize.
//
// Binary search for #{ j : thresholds[j] < s }: step k (k = 1..8) compares s
// with thresholds[p * 2^(9-k) + 2^(8-k) - 1], p = the k-1 decisions so far
// read as a binary number, which is also the index of step k's table: tables
// of up to 16 entries take one vpermps, 32 entries one vpermt2ps, 64 and 128
// entries 2 and 4 vpermt2ps blended by the first decisions (bits of p). After
// 8 steps p is the code. No gathers (slow on AMD cores) and no compare masks
// on the dependency chain: the decision s > t is the sign bit of t - s, shifted
// into p with one vpshldd. That is exact: s and t are finite, the difference of
// two different floats is never zero (gradual underflow), rounding never flips
// a sign, and t == s gives +0; thresholds equal to -0 are stored as +0 so that
// s = +-0 compares as the reference does.
//
// The chain is 8 lookups long, so the loop runs kLanes independent vectors in
// lock step to keep the vector units busy.

// The encoder table's fast path (common/code_search.h, encoder_table_candidate)
// on 16 lanes: every table has 32 entries, so each lookup is one vpermt2ps.
// The guard test is folded into a running minimum of |h - rint(h)| (vreduceps,
// vrangeps); a group whose minimum falls below the guard (or is NaN) is
// encoded again by the binary search, so the result never depends on the lines.
struct LineTables {
  __m512 split1[2], split2[2], slope[2], offset[2];
  __m512 mirror, guard, slot_scale;
  bool two_splits = false;  // some slot has a second split point (else its lookup is skipped)

  explicit LineTables(const float* table) {
    if (table == nullptr) return;
    for (int slot = 0; slot < kEncoderSlots; ++slot) two_splits = two_splits || !std::isnan(table[kEncoderSplit2 + slot]);
    slot_scale = _mm512_set1_ps(table[kEncoderSlotScale]);
    for (int q = 0; q < 2; ++q) {
      split1[q] = _mm512_loadu_ps(table + kEncoderSplit1 + 16 * q);
      split2[q] = _mm512_loadu_ps(table + kEncoderSplit2 + 16 * q);
      slope[q] = _mm512_loadu_ps(table + kEncoderSlope + 16 * q);
      offset[q] = _mm512_loadu_ps(table + kEncoderOffset + 16 * q);
    }
    mirror = _mm512_set1_ps(table[kEncoderMirror]);
    guard = _mm512_set1_ps(table[kEncoderGuard]);
  }
};

// Candidate codes (int32, unclamped) of 16 finite lanes with |s| < 2; `near`
// gets h - rint(h), whose magnitude the guard checks. kTwoSplits: some slot
// of the table has a second split point.
template <bool kTwoSplits>
__attribute__((always_inline)) inline __m512i line_codes(const LineTables& t, __m512 s, __m512& near) {
  const __m512i bits = _mm512_castps_si512(s);
  const __m512i magnitude_bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512 a = _mm512_castsi512_ps(magnitude_bits);
  // Binades of |s| * c (c < 1, so exponents stay <= 127): exponents below 96
  // share slot 0; 96..127 index the 32 slots by their low 5 bits.
  const __m512i scaled_bits = _mm512_castps_si512(_mm512_mul_ps(a, t.slot_scale));
  const __m512i slot = _mm512_max_epu32(_mm512_srli_epi32(scaled_bits, 23), _mm512_set1_epi32(kEncoderSlotBase));
  const __m512 split1 = _mm512_permutex2var_ps(t.split1[0], slot, t.split1[1]);
  const __m512i one = _mm512_set1_epi32(1);
  // The permutes read only the low 5 index bits: that is the rule's & 31 (sums carry only upwards).
  __m512i piece = _mm512_castps_si512(split1);
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(a, split1, _CMP_GT_OQ), piece, one);
  if (kTwoSplits) {
    const __m512 split2 = _mm512_permutex2var_ps(t.split2[0], slot, t.split2[1]);
    piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(a, split2, _CMP_GT_OQ), piece, one);
  }
  const __m512 h = _mm512_fmadd_ps(a, _mm512_permutex2var_ps(t.slope[0], piece, t.slope[1]),
                                   _mm512_permutex2var_ps(t.offset[0], piece, t.offset[1]));
  // h - rint(h), exact; vrndscaleps + vsubps is twice the throughput of vreduceps on Zen 4.
  near = _mm512_sub_ps(h, _mm512_roundscale_ps(h, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512 y = _mm512_mask_sub_ps(h, _mm512_movepi32_mask(bits), t.mirror, h);
  return _mm512_cvttps_epi32(y);
}

// Whether every lane of four `near` vectors is clear of the guard band: the
// smallest magnitude (vrangeps imm 0x0A: smaller magnitude, sign cleared; a
// NaN propagates) is compared once, as a tree to keep the chain short.
__attribute__((always_inline)) inline bool lines_hold(const LineTables& t, const __m512 near[4]) {
  const __m512 low = _mm512_range_ps(_mm512_range_ps(near[0], near[1], 0x0A), _mm512_range_ps(near[2], near[3], 0x0A), 0x0A);
  return _mm512_cmp_ps_mask(low, t.guard, _CMP_NGE_UQ) == 0;
}

struct EncodeTables {
  __m512 first;          // step 1: thresholds[127], broadcast
  __m512 small[4];       // steps 2..5
  __m512 step6[2];       // 32 entries
  __m512 step7[4];       // 64 entries
  __m512 step8[8];       // 128 entries
#if D8_AVX512_VBMI
  __m512i step8_planes[4][2];  // the step-8 table as four byte planes of 128 bytes (vpermi2b)
#endif

  LineTables line;
  bool has_line;

  EncodeTables(const float* thresholds, const float* encoder) : line(encoder), has_line(encoder != nullptr) {
    alignas(64) float table[128];
    auto fill = [&](int k) {
      const int entries = 1 << (k - 1);
      for (int p = 0; p < 128; ++p) table[p] = 0.0f;
      for (int p = 0; p < entries; ++p) {
        const float t = thresholds[(p << (9 - k)) + (1 << (8 - k)) - 1];
        table[p] = t == 0.0f ? 0.0f : t;  // -0 -> +0
      }
    };
    fill(1);
    first = _mm512_set1_ps(table[0]);
    for (int k = 2; k <= 5; ++k) {
      fill(k);
      small[k - 2] = _mm512_load_ps(table);
    }
    fill(6);
    for (int q = 0; q < 2; ++q) step6[q] = _mm512_load_ps(table + 16 * q);
    fill(7);
    for (int q = 0; q < 4; ++q) step7[q] = _mm512_load_ps(table + 16 * q);
    fill(8);
    for (int q = 0; q < 8; ++q) step8[q] = _mm512_load_ps(table + 16 * q);
#if D8_AVX512_VBMI
    alignas(64) uint8_t bytes[128];
    for (int k = 0; k < 4; ++k) {
      for (int q = 0; q < 128; ++q) bytes[q] = static_cast<uint8_t>(float_to_bits(table[q]) >> (8 * k));
      step8_planes[k][0] = _mm512_load_si512(bytes);
      step8_planes[k][1] = _mm512_load_si512(bytes + 64);
    }
#endif
  }
};

// p <- 2p + (s > t)
__attribute__((always_inline)) inline __m512i search_step(__m512i p, __m512 s, __m512 t) {
  const __m512i difference = _mm512_castps_si512(_mm512_sub_ps(t, s));
#if defined(__AVX512VBMI2__)
  return _mm512_shldi_epi32(p, difference, 1);
#else
  return _mm512_or_si512(_mm512_slli_epi32(p, 1), _mm512_srli_epi32(difference, 31));
#endif
}

// Steps 1..7 for V vectors (s finite): codes[v] = the first 7 decisions, in [0, 127].
template <int V>
__attribute__((always_inline)) inline void search7(const __m512* s, __m512i* codes, const EncodeTables& t) {
  const __m512i bit5 = _mm512_set1_epi32(32);
  for (int v = 0; v < V; ++v) codes[v] = _mm512_srli_epi32(_mm512_castps_si512(_mm512_sub_ps(t.first, s[v])), 31);
  for (int k = 0; k < 4; ++k)
    for (int v = 0; v < V; ++v) codes[v] = search_step(codes[v], s[v], _mm512_permutexvar_ps(codes[v], t.small[k]));
  for (int v = 0; v < V; ++v)
    codes[v] = search_step(codes[v], s[v], _mm512_permutex2var_ps(t.step6[0], codes[v], t.step6[1]));
  for (int v = 0; v < V; ++v) {
    const __mmask16 first = _mm512_test_epi32_mask(codes[v], bit5);  // decision 1
    const __m512 lookup = _mm512_mask_blend_ps(first, _mm512_permutex2var_ps(t.step7[0], codes[v], t.step7[1]),
                                               _mm512_permutex2var_ps(t.step7[2], codes[v], t.step7[3]));
    codes[v] = search_step(codes[v], s[v], lookup);
  }
}

// codes[v] = #{ j : thresholds[j] < s[v] } for V vectors (s finite): steps 1..7, then
// step 8 with the 128-entry table in 16 registers.
template <int V>
__attribute__((always_inline)) inline void search(const __m512* s, __m512i* codes, const EncodeTables& t) {
  search7<V>(s, codes, t);
  const __m512i bit5 = _mm512_set1_epi32(32);
  const __m512i bit6 = _mm512_set1_epi32(64);
  for (int v = 0; v < V; ++v) {
    const __mmask16 first = _mm512_test_epi32_mask(codes[v], bit6);   // decision 1
    const __mmask16 second = _mm512_test_epi32_mask(codes[v], bit5);  // decision 2
    const __m512 low = _mm512_mask_blend_ps(second, _mm512_permutex2var_ps(t.step8[0], codes[v], t.step8[1]),
                                            _mm512_permutex2var_ps(t.step8[2], codes[v], t.step8[3]));
    const __m512 high = _mm512_mask_blend_ps(second, _mm512_permutex2var_ps(t.step8[4], codes[v], t.step8[5]),
                                             _mm512_permutex2var_ps(t.step8[6], codes[v], t.step8[7]));
    codes[v] = search_step(codes[v], s[v], _mm512_mask_blend_ps(first, low, high));
  }
}

#if D8_AVX512_VBMI
// Four byte planes (byte k of 64 floats, in the order the packs below leave
// them: position 16L + 4r + q holds element 16r + 4L + q) -> four vectors of 16
// floats, elements 0..15, 16..31, 32..47, 48..63.
__attribute__((always_inline)) inline void planes_to_floats(const __m512i b[4], __m512 out[4]) {
  const __m512i w_low = _mm512_unpacklo_epi8(b[0], b[1]);
  const __m512i w_high = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i z_low = _mm512_unpacklo_epi8(b[2], b[3]);
  const __m512i z_high = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w_low, z_low));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w_low, z_low));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w_high, z_high));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w_high, z_high));
}

// Step 8 for four vectors of 7-bit prefixes p (after search7), 64 lanes at a
// time in the byte domain, returning the 64 codes 2p + (s > t8[p]) as bytes in
// element order. The packs leave p exactly in the order planes_to_floats
// expects, so t8[p] costs 4 vpermi2b (128-entry byte tables) and 8 unpacks
// instead of 16 float permutes and 12 blends; the decision s > t is t < s, the
// same comparison as search_step's sign bit for finite s and t.
__attribute__((always_inline)) inline __m512i search8_bytes(const __m512i p[4], const __m512 s[4], const EncodeTables& t) {
  const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(p[0], p[1]), _mm512_packus_epi32(p[2], p[3]));
  __m512i planes[4];
  for (int k = 0; k < 4; ++k) planes[k] = _mm512_permutex2var_epi8(t.step8_planes[k][0], packed, t.step8_planes[k][1]);
  __m512 threshold[4];
  planes_to_floats(planes, threshold);
  __mmask16 below[4];
  for (int v = 0; v < 4; ++v) below[v] = _mm512_cmp_ps_mask(threshold[v], s[v], _CMP_LT_OQ);
  const __mmask64 decision = _mm512_kunpackd(static_cast<__mmask64>(_mm512_kunpackw(below[3], below[2])),
                                             static_cast<__mmask64>(_mm512_kunpackw(below[1], below[0])));
  const __m512i prefix = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), packed);
  const __m512i doubled = _mm512_add_epi8(prefix, prefix);
  return _mm512_mask_sub_epi8(doubled, decision, doubled, _mm512_set1_epi8(-1));
}
#endif

// Four vectors of 16 int32 in [0, 255] -> 64 bytes in element order.
__attribute__((always_inline)) inline __m512i pack_bytes(__m512i a, __m512i b, __m512i c, __m512i d) {
  // packs interleave per 128-bit lane: dword 4L+v ends up holding vector v's elements 4L..4L+3.
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
}

// 16 elements as float32; lanes outside `mask` read as 0 (never touching memory).
__attribute__((always_inline)) inline __m512 load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
__attribute__((always_inline)) inline __m512 load16(const c10::Half* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}
__attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
__attribute__((always_inline)) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((always_inline)) inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __mmask64 first_bits(int64_t count) { return count >= 64 ? ~__mmask64(0) : ((__mmask64(1) << count) - 1); }

// max |x| bits of a range.
inline uint32_t absmax_bits(const float* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int>(kAbsMask));
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask));
    a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_loadu_si512(x + i + 16), abs_mask));
    a2 = _mm512_max_epu32(a2, _mm512_and_si512(_mm512_loadu_si512(x + i + 32), abs_mask));
    a3 = _mm512_max_epu32(a3, _mm512_and_si512(_mm512_loadu_si512(x + i + 48), abs_mask));
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(first_bits(n - i));
    a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_maskz_loadu_epi32(mask, x + i), abs_mask));
  }
  return _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3)));
}

// max |x| over 16-bit floats (half or bfloat16): the same order argument holds for their bits.
inline uint32_t absmax_bits16(const uint16_t* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi16(0x7FFF);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_max_epu16(a0, _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask));
    a1 = _mm512_max_epu16(a1, _mm512_and_si512(_mm512_loadu_si512(x + i + 32), abs_mask));
  }
  for (; i < n; i += 32) {
    const __mmask32 mask = static_cast<__mmask32>(first_bits(n - i));
    a0 = _mm512_max_epu16(a0, _mm512_and_si512(_mm512_maskz_loadu_epi16(mask, x + i), abs_mask));
  }
  const __m512i m = _mm512_max_epu16(a0, a1);
  const __m512i wide = _mm512_max_epu32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(m)),
                                        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m, 1)));
  return _mm512_reduce_max_epu32(wide);
}

inline uint32_t absmax_bits(const c10::Half* x, int64_t n) {
  const uint32_t bits = absmax_bits16(reinterpret_cast<const uint16_t*>(x), n);
  return float_to_bits(static_cast<float>(c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits())));
}
inline uint32_t absmax_bits(const c10::BFloat16* x, int64_t n) {
  return absmax_bits16(reinterpret_cast<const uint16_t*>(x), n) << 16;
}

// The binary search for one group of 64 lanes (4 vectors), as bytes in element
// order: the lines' rare fallback, kept out of line (its arguments travel in
// registers) so the hot loop stays small and spills nothing.
__attribute__((noinline)) inline __m512i search_group(const EncodeTables& tables, __m512 s0, __m512 s1, __m512 s2,
                                                      __m512 s3) {
  const __m512 s[4] = {s0, s1, s2, s3};
  __m512i c[4];
#if D8_AVX512_VBMI
  search7<4>(s, c, tables);
  return search8_bytes(c, s, tables);
#else
  search<4>(s, c, tables);
  return pack_bytes(c[0], c[1], c[2], c[3]);
#endif
}

// Round-to-nearest codes of 64 finite lanes with |s| < 2 (4 vectors) by the
// encoder table's lines, as bytes in element order; the binary search when a
// lane is near a jump.
template <bool kTwoSplits>
__attribute__((always_inline)) inline __m512i encode_group_lines(const EncodeTables& tables, const __m512* s) {
  __m512 near[4];
  __m512i c[4];
  for (int v = 0; v < 4; ++v) c[v] = line_codes<kTwoSplits>(tables.line, s[v], near[v]);
  if (__builtin_expect(lines_hold(tables.line, near), 1)) return pack_bytes(c[0], c[1], c[2], c[3]);
  return search_group(tables, s[0], s[1], s[2], s[3]);
}

// Round-to-nearest codes of `len` elements whose scales are finite (so s is
// never NaN). Vector k (elements 16k .. 16k+15) is scaled by inv[k >> shift]:
// one scale per block when blocks are 16 << shift elements long.
constexpr int kLanes = 16;  // vectors in flight in the main loop (256 elements)

// 64 codes of group g (of `count` in all) to out + 64 g.
template <bool kFull, bool kStream>
__attribute__((always_inline)) inline void store_codes(__m512i bytes, int64_t count, int g, uint8_t* out) {
  if (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + 64 * g), bytes);
  } else if (kFull) {
    _mm512_storeu_si512(out + 64 * g, bytes);
  } else if (count > 64 * g) {
    _mm512_mask_storeu_epi8(out + 64 * g, first_bits(count - 64 * g), bytes);
  }
}

template <int V, bool kFull, bool kStream = false, typename T>
__attribute__((always_inline)) inline void encode_vectors(const EncodeTables& tables, const T* x, int64_t count,
                                                          const float* inv, int64_t first_vector, int shift,
                                                          uint8_t* out) {
  static_assert(V % 4 == 0, "whole 64-byte groups");
  __m512 s[V];
  __m512i c[V];
  // Blocks of 64 elements or more (shift >= 2) give every group of 4 vectors one scale.
  const __m512 group_scale = _mm512_set1_ps(inv[first_vector >> shift]);
  for (int v = 0; v < V; ++v) {
    const __m512 scale = V == 4 && shift >= 2 ? group_scale : _mm512_set1_ps(inv[(first_vector + v) >> shift]);
    if (kFull) {
      s[v] = _mm512_mul_ps(load16(x + 16 * v), scale);
    } else {
      const int64_t left = count - 16 * v;
      const __mmask16 lanes = left <= 0 ? __mmask16(0) : static_cast<__mmask16>(first_bits(left));
      s[v] = _mm512_mul_ps(load16(x + 16 * v, lanes), scale);
    }
  }
  if (tables.has_line) {
    for (int g = 0; g < V / 4; ++g) {
      const __m512i bytes = tables.line.two_splits ? encode_group_lines<true>(tables, s + 4 * g)
                                                   : encode_group_lines<false>(tables, s + 4 * g);
      store_codes<kFull, kStream>(bytes, count, g, out);
    }
    return;
  }
#if D8_AVX512_VBMI
  search7<V>(s, c, tables);
#else
  search<V>(s, c, tables);
#endif
  for (int g = 0; g < V / 4; ++g) {
#if D8_AVX512_VBMI
    const __m512i bytes = search8_bytes(c + 4 * g, s + 4 * g, tables);
#else
    const __m512i bytes = pack_bytes(c[4 * g], c[4 * g + 1], c[4 * g + 2], c[4 * g + 3]);
#endif
    store_codes<kFull, kStream>(bytes, count, g, out);
  }
}

__attribute__((always_inline)) inline void prefetch_ahead(const void* p, size_t bytes) {
  for (size_t line = 0; line < bytes; line += 64) _mm_prefetch(static_cast<const char*>(p) + line, _MM_HINT_T0);
}

// kPrefetch = false: x is already in L1 (a kernel's local buffer).
template <bool kStream, bool kPrefetch = true, typename T>
void encode_avx512_impl(const EncodeTables& tables, const T* x, int64_t len, const float* inv, int shift, uint8_t* out) {
  // The loop is compute-heavy, so the hardware prefetcher falls behind: fetch
  // the data one window or block ahead (the next absmax pass reads it), at
  // most kMaxAhead elements so that it still lands in L1.
  const int64_t distance = std::min(std::max(len, kWindow), kMaxAhead);
  int64_t i = 0;
  if (tables.has_line) {
    // Short dependency chains: one group of 64 at a time keeps everything in registers.
    for (; i + 64 <= len; i += 64) {
      if (kPrefetch) prefetch_ahead(x + i + distance, 64 * sizeof(T));
      encode_vectors<4, true, kStream>(tables, x + i, 64, inv, i / 16, shift, out + i);
    }
  }
  for (; i + 16 * kLanes <= len; i += 16 * kLanes) {
    if (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(x + i + distance);
      for (size_t line = 0; line < 16 * kLanes * sizeof(T); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    encode_vectors<kLanes, true, kStream>(tables, x + i, 16 * kLanes, inv, i / 16, shift, out + i);
  }
  for (; i + 64 <= len; i += 64) encode_vectors<4, true, kStream>(tables, x + i, 64, inv, i / 16, shift, out + i);
  if (i < len) encode_vectors<4, false>(tables, x + i, len - i, inv, i / 16, shift, out + i);
}

// Non-temporal stores when asked and `out` is 64-byte aligned (the caller fences).
template <typename T>
void encode_avx512(const EncodeTables& tables, const T* x, int64_t len, const float* inv, int shift, uint8_t* out,
                   bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(out) & 63) == 0) {
    encode_avx512_impl<true>(tables, x, len, inv, shift, out);
  } else {
    encode_avx512_impl<false>(tables, x, len, inv, shift, out);
  }
}

// A 256-entry float table in 16 registers, looked up by int32 indices in [0, 255].
struct FloatTable256 {
  __m512 part[16];
  explicit FloatTable256(const float* values) {
    for (int q = 0; q < 16; ++q) part[q] = _mm512_loadu_ps(values + 16 * q);
  }
  __attribute__((always_inline)) __m512 lookup(__m512i idx) const {
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512 q[4];
    for (int h = 0; h < 4; ++h) {
      q[h] = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(part[4 * h], idx, part[4 * h + 1]),
                                  _mm512_permutex2var_ps(part[4 * h + 2], idx, part[4 * h + 3]));
    }
    return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, q[0], q[1]), _mm512_mask_blend_ps(b6, q[2], q[3]));
  }
};

__attribute__((always_inline)) inline __m512i mix32_avx512(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kMixMulA)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kMixMulB)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}

// r(i) for the 16 elements index0 .. index0 + 15 (common/stochastic_rounding.h).
__attribute__((always_inline)) inline __m512i random_bits16(uint32_t key, int64_t index0) {
  const uint64_t first = static_cast<uint64_t>(index0);
  const __m512i base_low = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m512i low = _mm512_add_epi32(base_low, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(low, base_low);
  const __m512i base_high = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  const __m512i high = _mm512_mask_add_epi32(base_high, carry, base_high, _mm512_set1_epi32(1));
  const __m512i mixed_high = mix32_avx512(_mm512_xor_si512(high, _mm512_set1_epi32(static_cast<int>(key))));
  return mix32_avx512(_mm512_xor_si512(low, mixed_high));
}

// u(i) for the 16 elements index0 .. index0 + 15.
__attribute__((always_inline)) inline __m512 uniform16(uint32_t key, int64_t index0) {
  const __m512i bits = random_bits16(key, index0);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 8)), _mm512_set1_ps(5.9604644775390625e-08f));
}

// float32 -> the output type, 16 values.
__attribute__((always_inline)) inline __m256i narrow(__m512 v, c10::Half*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// float32 -> bfloat16 bits (round to nearest even, NaN -> 0xFFFF), one per 32-bit lane.
__attribute__((always_inline)) inline __m512i bfloat16_lanes(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
}
__attribute__((always_inline)) inline __m256i narrow(__m512 v, c10::BFloat16*) {
  return _mm512_cvtepi32_epi16(bfloat16_lanes(v));
}

#endif  // D8_AVX512

#if D8_AVX512_VBMI
// code[c] as four byte planes (byte k of every code value), each a 256-byte
// table in 4 registers: a lookup is two vpermt2b (128 entries each) blended by
// bit 7 of c. The codes are permuted first so that interleaving the planes
// with in-lane unpacks yields the 64 floats in element order.
struct DecodeTables {
  __m512i plane[4][4];
  __m512i order;

  explicit DecodeTables(const float* code) {
    alignas(64) uint8_t bytes[256];
    for (int k = 0; k < 4; ++k) {
      for (int i = 0; i < 256; ++i) bytes[i] = static_cast<uint8_t>(float_to_bits(code[i]) >> (8 * k));
      for (int q = 0; q < 4; ++q) plane[k][q] = _mm512_load_si512(bytes + 64 * q);
    }
    // After unpacking, byte position 16L + 4r + q of the planes becomes element 16r + 4L + q.
    for (int lane = 0; lane < 4; ++lane)
      for (int r = 0; r < 4; ++r)
        for (int q = 0; q < 4; ++q) bytes[16 * lane + 4 * r + q] = static_cast<uint8_t>(16 * r + 4 * lane + q);
    order = _mm512_load_si512(bytes);
  }

  // 64 codes -> four vectors of 16 floats, elements 0..15, 16..31, 32..47, 48..63.
  __attribute__((always_inline)) void decode(__m512i codes, __m512 out[4]) const {
    const __m512i idx = _mm512_permutexvar_epi8(order, codes);
    const __mmask64 upper = _mm512_movepi8_mask(idx);
    __m512i b[4];
    for (int k = 0; k < 4; ++k) {
      b[k] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(plane[k][0], idx, plane[k][1]),
                                    _mm512_permutex2var_epi8(plane[k][2], idx, plane[k][3]));
    }
    planes_to_floats(b, out);
  }
};
#endif  // D8_AVX512_VBMI

#if D8_AVX512
// code[c] for 4 vectors of int32 indices in [0, 255]: with VBMI the byte-plane
// decoder on the 64 indices packed to bytes, else the permute table per vector.
struct CodeLookup {
#if D8_AVX512_VBMI
  DecodeTables planes;
  explicit CodeLookup(const float* code) : planes(code) {}
  __attribute__((always_inline)) void lookup4(const __m512i index[4], __m512 out[4]) const {
    planes.decode(pack_bytes(index[0], index[1], index[2], index[3]), out);
  }
#else
  FloatTable256 table;
  explicit CodeLookup(const float* code) : table(code) {}
  __attribute__((always_inline)) void lookup4(const __m512i index[4], __m512 out[4]) const {
    for (int v = 0; v < 4; ++v) out[v] = table.lookup(index[v]);
  }
#endif
};

// Round-to-nearest codes (int32) of 4 vectors of finite s with |s| < 2: the
// encoder table's lines when the map has a table and every lane clears the
// guard, else the binary search.
__attribute__((always_inline)) inline void nearest_codes4(const EncodeTables& tables, const __m512 s[4], __m512i codes[4]) {
  if (tables.has_line) {
    __m512 near[4];
    for (int v = 0; v < 4; ++v) {
      codes[v] = tables.line.two_splits ? line_codes<true>(tables.line, s[v], near[v])
                                        : line_codes<false>(tables.line, s[v], near[v]);
    }
    if (__builtin_expect(lines_hold(tables.line, near), 1)) {
      for (int v = 0; v < 4; ++v) {
        codes[v] = _mm512_min_epi32(_mm512_max_epi32(codes[v], _mm512_setzero_si512()), _mm512_set1_epi32(kLastCode));
      }
      return;
    }
  }
  search<4>(s, codes, tables);
}

// Stochastic codes of a block whose absmax and 1/absmax are finite. The codes
// bracketing s are low = max(s >= code[n] ? n : n - 1, 0) and high =
// min(low + 1, 255) around the nearest code n; one of them is n, so besides
// code[n] one more lookup gives both values.
template <typename T>
void encode_stochastic_avx512(const EncodeTables& tables, const CodeLookup& code, const T* x, int64_t len, float inv,
                              uint8_t* out, uint32_t key, int64_t index0) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < len; i += 64) {
    const __mmask64 mask = first_bits(len - i);
    __m512 s[4];
    __m512i nearest[4], c[4];
    for (int v = 0; v < 4; ++v) {
      s[v] = _mm512_mul_ps(load16(x + i + 16 * v, static_cast<__mmask16>(mask >> (16 * v))), vinv);
    }
    nearest_codes4(tables, s, nearest);
    __m512 at_nearest[4], other[4];
    code.lookup4(nearest, at_nearest);
    __m512i low[4], high[4], other_index[4];
    __mmask16 low_is_nearest[4];
    for (int v = 0; v < 4; ++v) {
      const __mmask16 at_or_above = _mm512_cmp_ps_mask(s[v], at_nearest[v], _CMP_GE_OQ);
      low[v] = _mm512_mask_mov_epi32(_mm512_sub_epi32(nearest[v], one), at_or_above, nearest[v]);
      low[v] = _mm512_max_epi32(low[v], _mm512_setzero_si512());
      high[v] = _mm512_min_epi32(_mm512_add_epi32(low[v], one), _mm512_set1_epi32(kLastCode));
      low_is_nearest[v] = _mm512_cmpeq_epi32_mask(low[v], nearest[v]);
      other_index[v] = _mm512_mask_mov_epi32(low[v], low_is_nearest[v], high[v]);
    }
    code.lookup4(other_index, other);
    for (int v = 0; v < 4; ++v) {
      const __m512 code_low = _mm512_mask_mov_ps(other[v], low_is_nearest[v], at_nearest[v]);
      const __m512 code_high = _mm512_mask_mov_ps(at_nearest[v], low_is_nearest[v], other[v]);
      const __m512 fraction = _mm512_div_ps(_mm512_sub_ps(s[v], code_low), _mm512_sub_ps(code_high, code_low));
      const __m512 u = uniform16(key, index0 + i + 16 * v);
      c[v] = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(u, fraction, _CMP_LT_OQ), low[v], high[v]);
    }
    _mm512_mask_storeu_epi8(out + i, mask, pack_bytes(c[0], c[1], c[2], c[3]));
  }
}
#endif  // D8_AVX512

}  // namespace cpu
}  // namespace dist8bit
