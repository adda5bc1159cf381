// CPU kernels of dist8bit::quantize_blockwise and dist8bit::dequantize_blockwise.
//
// Contract: the operator schemas of dist8bit/backends/ops.py. Results are bit
// for bit those of dist8bit/backends/reference.py:
//   absmax  max |x| over the block, found as an unsigned max over the bits of
//           |x| (sign cleared): that order is the float order for every
//           non-negative float, and every NaN sorts above +inf, so a NaN in
//           the block makes absmax NaN (stored as the canonical 0x7FC00000,
//           as torch's amax does).
//   s       x * (1.0f / absmax) in float32, 0 where that is NaN.
//   code    #{ j : thresholds[j] < s } (common/code_search.h), then with a
//           seed the stochastic choice (common/stochastic_rounding.h).
//   out     code[c] * absmax in float32, rounded to out's dtype to nearest
//           even; a NaN becomes 0xFFFF in bfloat16, which is what torch's
//           vectorised float -> bfloat16 copy (the reference) writes.
//
// Work layout (at::parallel_for over torch's OpenMP pool). Blocks up to
// kFusedMaxBlock elements: each task takes a run of whole blocks and, a
// window of about kWindow elements at a time, computes the window's scales and
// then encodes it while it sits in L1, prefetching the next window. Larger
// blocks (functional.quantize passes blocksize = numel) are cut into pieces:
// one parallel pass for the pieces' maxima, one for encoding. Dequantize is
// element-parallel. Outputs of kStreamBytes and more are written with
// non-temporal stores (no read-for-ownership of lines nobody reads soon).
//
// With AVX-512 the count of thresholds below s is an 8-step binary search
// whose lookups are register permutes (no gathers: they are slow on AMD
// cores), 16 vectors in lock step; decoding looks up the 4 bytes of code[c]
// with byte permutes (VBMI). Without AVX-512 (or built with -DD8_PORTABLE)
// the same entry points run plain loops over the shared scalar helpers (the
// codebook's lookup table, or the binary search when it has none). Blocks
// whose absmax is 0, Inf, NaN or so small that 1 / absmax overflows take the
// scalar helpers on every path. All paths give identical results.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common/code_search.h"
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
namespace {

constexpr int64_t kFusedMaxBlock = 16384;  // blocks up to this size are quantized in one task each
constexpr int64_t kPiece = 16384;          // larger blocks are split into pieces of this size
constexpr int64_t kTaskElements = 32768;   // least work per parallel task
constexpr int64_t kWindow = 2048;          // small blocks are encoded this many elements at a time
constexpr int64_t kMaxAhead = 4096;        // software prefetch distance limit, elements
constexpr int kOneScale = 62;              // encode shift: every vector uses inv[0]
constexpr int64_t kStreamBytes = int64_t{8} << 20;  // outputs this large bypass the caches
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

// ceil(n / blocksize) without overflow for any blocksize >= 1.
inline int64_t block_count(int64_t n, int64_t blocksize) { return n / blocksize + (n % blocksize != 0 ? 1 : 0); }

// A blocksize of n or more means one block; clamping it keeps all offsets within n.
inline int64_t effective_blocksize(int64_t n, int64_t blocksize) { return std::min(blocksize, std::max<int64_t>(n, 1)); }

// absmax from the max of |x| bits: NaN becomes the canonical quiet NaN.
inline float absmax_from_bits(uint32_t bits) { return bits_to_float(bits > kInfBits ? kCanonicalNaN : bits); }

// ---------------------------------------------------------------------------
// What a quantize call needs, gathered once per call.

struct Codebook {
  const float* code;
  const float* thresholds;
  const int32_t* lut;  // nullptr: binary search
  int mantissa_bits;
  int min_exponent;
  int refine_steps;

  int nearest(float s) const {
    return nearest_code_index(thresholds, lut, mantissa_bits, min_exponent, refine_steps, s);
  }
};

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

template <typename T>
void encode_portable(const Codebook& book, const T* x, int64_t len, float inv, uint8_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    out[i] = static_cast<uint8_t>(book.nearest(scaled_value(to_float(x[i]), inv)));
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

struct SearchTables {
  __m512 first;          // step 1: thresholds[127], broadcast
  __m512 small[4];       // steps 2..5
  __m512 step6[2];       // 32 entries
  __m512 step7[4];       // 64 entries
  __m512 step8[8];       // 128 entries

  explicit SearchTables(const float* thresholds) {
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

// codes[v] = #{ j : thresholds[j] < s[v] } for V vectors (s finite).
template <int V>
__attribute__((always_inline)) inline void search(const __m512* s, __m512i* codes, const SearchTables& t) {
  const __m512i bit5 = _mm512_set1_epi32(32);
  __mmask16 first[V];
  for (int v = 0; v < V; ++v) codes[v] = _mm512_srli_epi32(_mm512_castps_si512(_mm512_sub_ps(t.first, s[v])), 31);
  for (int k = 0; k < 4; ++k)
    for (int v = 0; v < V; ++v) codes[v] = search_step(codes[v], s[v], _mm512_permutexvar_ps(codes[v], t.small[k]));
  for (int v = 0; v < V; ++v)
    codes[v] = search_step(codes[v], s[v], _mm512_permutex2var_ps(t.step6[0], codes[v], t.step6[1]));
  for (int v = 0; v < V; ++v) {
    first[v] = _mm512_test_epi32_mask(codes[v], bit5);  // decision 1
    const __m512 lookup = _mm512_mask_blend_ps(first[v], _mm512_permutex2var_ps(t.step7[0], codes[v], t.step7[1]),
                                               _mm512_permutex2var_ps(t.step7[2], codes[v], t.step7[3]));
    codes[v] = search_step(codes[v], s[v], lookup);
  }
  for (int v = 0; v < V; ++v) {
    const __mmask16 second = _mm512_test_epi32_mask(codes[v], bit5);  // decision 2
    const __m512 low = _mm512_mask_blend_ps(second, _mm512_permutex2var_ps(t.step8[0], codes[v], t.step8[1]),
                                            _mm512_permutex2var_ps(t.step8[2], codes[v], t.step8[3]));
    const __m512 high = _mm512_mask_blend_ps(second, _mm512_permutex2var_ps(t.step8[4], codes[v], t.step8[5]),
                                             _mm512_permutex2var_ps(t.step8[6], codes[v], t.step8[7]));
    codes[v] = search_step(codes[v], s[v], _mm512_mask_blend_ps(first[v], low, high));
  }
}

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

// Round-to-nearest codes of `len` elements whose scales are finite (so s is
// never NaN). Vector k (elements 16k .. 16k+15) is scaled by inv[k >> shift]:
// one scale per block when blocks are 16 << shift elements long.
constexpr int kLanes = 16;  // vectors in flight in the main loop (256 elements)

template <int V, bool kFull, bool kStream = false, typename T>
__attribute__((always_inline)) inline void encode_vectors(const SearchTables& tables, const T* x, int64_t count,
                                                          const float* inv, int64_t first_vector, int shift,
                                                          uint8_t* out) {
  static_assert(V % 4 == 0, "whole 64-byte groups");
  __m512 s[V];
  __m512i c[V];
  for (int v = 0; v < V; ++v) {
    const __m512 scale = _mm512_set1_ps(inv[(first_vector + v) >> shift]);
    if (kFull) {
      s[v] = _mm512_mul_ps(load16(x + 16 * v), scale);
    } else {
      const int64_t left = count - 16 * v;
      const __mmask16 lanes = left <= 0 ? __mmask16(0) : static_cast<__mmask16>(first_bits(left));
      s[v] = _mm512_mul_ps(load16(x + 16 * v, lanes), scale);
    }
  }
  search<V>(s, c, tables);
  for (int g = 0; g < V / 4; ++g) {
    const __m512i bytes = pack_bytes(c[4 * g], c[4 * g + 1], c[4 * g + 2], c[4 * g + 3]);
    if (kStream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + 64 * g), bytes);
    } else if (kFull) {
      _mm512_storeu_si512(out + 64 * g, bytes);
    } else if (count > 64 * g) {
      _mm512_mask_storeu_epi8(out + 64 * g, first_bits(count - 64 * g), bytes);
    }
  }
}

template <bool kStream, typename T>
void encode_avx512_impl(const SearchTables& tables, const T* x, int64_t len, const float* inv, int shift, uint8_t* out) {
  // The loop is compute-heavy, so the hardware prefetcher falls behind: fetch
  // the data one window or block ahead (the next absmax pass reads it), at
  // most kMaxAhead elements so that it still lands in L1.
  const int64_t distance = std::min(std::max(len, kWindow), kMaxAhead);
  int64_t i = 0;
  for (; i + 16 * kLanes <= len; i += 16 * kLanes) {
    const char* ahead = reinterpret_cast<const char*>(x + i + distance);
    for (size_t line = 0; line < 16 * kLanes * sizeof(T); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    encode_vectors<kLanes, true, kStream>(tables, x + i, 16 * kLanes, inv, i / 16, shift, out + i);
  }
  for (; i + 64 <= len; i += 64) encode_vectors<4, true>(tables, x + i, 64, inv, i / 16, shift, out + i);
  if (i < len) encode_vectors<4, false>(tables, x + i, len - i, inv, i / 16, shift, out + i);
}

// Non-temporal stores when asked and `out` is 64-byte aligned (the caller fences).
template <typename T>
void encode_avx512(const SearchTables& tables, const T* x, int64_t len, const float* inv, int shift, uint8_t* out,
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

// u(i) for the 16 elements index0 .. index0 + 15.
__attribute__((always_inline)) inline __m512 uniform16(uint32_t key, int64_t index0) {
  const uint64_t first = static_cast<uint64_t>(index0);
  const __m512i base_low = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m512i low = _mm512_add_epi32(base_low, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(low, base_low);
  const __m512i base_high = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  const __m512i high = _mm512_mask_add_epi32(base_high, carry, base_high, _mm512_set1_epi32(1));
  const __m512i mixed_high = mix32_avx512(_mm512_xor_si512(high, _mm512_set1_epi32(static_cast<int>(key))));
  const __m512i bits = mix32_avx512(_mm512_xor_si512(low, mixed_high));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 8)), _mm512_set1_ps(5.9604644775390625e-08f));
}

// Stochastic codes of a block whose absmax and 1/absmax are finite.
template <typename T>
void encode_stochastic_avx512(const SearchTables& tables, const FloatTable256& code, const T* x, int64_t len, float inv,
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
    search<4>(s, nearest, tables);
    for (int v = 0; v < 4; ++v) {
      const __mmask16 at_or_above = _mm512_cmp_ps_mask(s[v], code.lookup(nearest[v]), _CMP_GE_OQ);
      __m512i low = _mm512_mask_mov_epi32(_mm512_sub_epi32(nearest[v], one), at_or_above, nearest[v]);
      low = _mm512_max_epi32(low, _mm512_setzero_si512());
      const __m512i high = _mm512_min_epi32(_mm512_add_epi32(low, one), _mm512_set1_epi32(kLastCode));
      const __m512 code_low = code.lookup(low);
      const __m512 fraction = _mm512_div_ps(_mm512_sub_ps(s[v], code_low), _mm512_sub_ps(code.lookup(high), code_low));
      const __m512 u = uniform16(key, index0 + i + 16 * v);
      c[v] = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(u, fraction, _CMP_LT_OQ), low, high);
    }
    _mm512_mask_storeu_epi8(out + i, mask, pack_bytes(c[0], c[1], c[2], c[3]));
  }
}
#endif  // D8_AVX512

// ---------------------------------------------------------------------------
// Quantize driver.

template <typename T>
struct Quantizer {
  const T* x;
  int64_t n;
  int64_t blocksize;
  uint8_t* codes;
  float* absmax;
  Codebook book;
  bool stochastic;
  uint32_t key;
  uint8_t zero_code;  // the code of s = 0 (blocks whose every s is 0)
  bool stream;        // write codes with non-temporal stores (large outputs)
#if D8_AVX512
  SearchTables tables;
  FloatTable256 code_table;
#endif

  Quantizer(const T* x_, int64_t n_, int64_t blocksize_, uint8_t* codes_, float* absmax_, const Codebook& book_,
            bool stochastic_, uint32_t key_)
      : x(x_),
        n(n_),
        blocksize(blocksize_),
        codes(codes_),
        absmax(absmax_),
        book(book_),
        stochastic(stochastic_),
        key(key_),
        zero_code(static_cast<uint8_t>(book_.nearest(0.0f))),
        stream(n_ >= kStreamBytes)
#if D8_AVX512
        ,
        tables(book_.thresholds),
        code_table(book_.code)
#endif
  {
  }

  // Order this thread's non-temporal stores before the caller reads the codes.
  void fence() const {
#if D8_AVX512
    if (stream) _mm_sfence();
#endif
  }

  uint32_t range_absmax_bits(const T* p, int64_t len) const {
#if D8_AVX512
    return absmax_bits(p, len);
#else
    return absmax_bits_portable(p, len);
#endif
  }

  // Codes of elements [start, start + len) of one block with the given absmax.
  void encode(int64_t start, int64_t len, float block_absmax) const {
    const T* p = x + start;
    uint8_t* out = codes + start;
    const float inv = 1.0f / block_absmax;
    const bool regular = std::isfinite(block_absmax) && std::isfinite(inv);
    if (!regular && !stochastic && (block_absmax == 0.0f || !std::isfinite(block_absmax))) {
      // absmax 0 (all x are +-0), NaN or Inf: every s is +-0 or NaN, which is 0.
      std::memset(out, zero_code, static_cast<size_t>(len));
      return;
    }
#if D8_AVX512
    if (regular) {
      if (stochastic) {
        encode_stochastic_avx512(tables, code_table, p, len, inv, out, key, start);
      } else {
        encode_avx512(tables, p, len, &inv, kOneScale, out, stream);
      }
      return;
    }
#endif
    if (stochastic) {
      encode_stochastic_portable(book, p, len, inv, out, key, start);
    } else {
      encode_portable(book, p, len, inv, out);
    }
  }

  void run() const {
    const int64_t blocks = block_count(n, blocksize);
    if (blocksize <= kFusedMaxBlock) {
      // Blocks of 16 << shift elements are taken kWindow elements at a time:
      // all their scales, then one encode pass over the (L1-resident) window.
      int shift = -1;
#if D8_AVX512
      if (!stochastic && blocksize >= 16 && blocksize <= kWindow && (blocksize & (blocksize - 1)) == 0) {
        shift = 0;
        while ((int64_t{16} << shift) < blocksize) ++shift;
      }
#endif
      const int64_t per_window = shift >= 0 ? kWindow / blocksize : 1;
      const int64_t grain = std::max<int64_t>(per_window, kTaskElements / blocksize);
      at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
        float inv[kWindow / 16];
        for (int64_t b = first; b < last; b += per_window) {
          const int64_t window_end = std::min(last, b + per_window);
          bool all_regular = shift >= 0;
          for (int64_t q = b; q < window_end; ++q) {
            const int64_t start = q * blocksize;
            const float a = absmax_from_bits(range_absmax_bits(x + start, std::min(blocksize, n - start)));
            absmax[q] = a;
            inv[q - b] = 1.0f / a;
            all_regular = all_regular && std::isfinite(a) && std::isfinite(inv[q - b]);
          }
#if D8_AVX512
          if (all_regular) {
            const int64_t start = b * blocksize;
            encode_avx512(tables, x + start, std::min(n, window_end * blocksize) - start, inv, shift, codes + start,
                          stream);
            continue;
          }
#endif
          for (int64_t q = b; q < window_end; ++q) {
            const int64_t start = q * blocksize;
            encode(start, std::min(blocksize, n - start), absmax[q]);
          }
        }
        fence();
      });
      return;
    }
    // Large blocks: pieces of at most kPiece elements, never crossing a block.
    const int64_t per_block = (std::min(blocksize, n) + kPiece - 1) / kPiece;
    const int64_t pieces = blocks * per_block;
    auto piece_range = [&](int64_t q, int64_t* start, int64_t* len) {
      const int64_t b = q / per_block;
      const int64_t block_end = std::min(n, (b + 1) * blocksize);
      *start = b * blocksize + (q % per_block) * kPiece;
      *len = std::max<int64_t>(0, std::min(kPiece, block_end - *start));
    };
    std::vector<uint32_t> piece_max(static_cast<size_t>(pieces), 0u);
    at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
      for (int64_t q = first; q < last; ++q) {
        int64_t start, len;
        piece_range(q, &start, &len);
        if (len > 0) piece_max[q] = range_absmax_bits(x + start, len);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      uint32_t bits = 0;
      for (int64_t q = b * per_block; q < (b + 1) * per_block; ++q) bits = std::max(bits, piece_max[q]);
      absmax[b] = absmax_from_bits(bits);
    }
    at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
      for (int64_t q = first; q < last; ++q) {
        int64_t start, len;
        piece_range(q, &start, &len);
        if (len > 0) encode(start, len, absmax[q / per_block]);
      }
      fence();
    });
  }
};

// ---------------------------------------------------------------------------
// Dequantize.

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
    const __m512i w_low = _mm512_unpacklo_epi8(b[0], b[1]);
    const __m512i w_high = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i z_low = _mm512_unpacklo_epi8(b[2], b[3]);
    const __m512i z_high = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w_low, z_low));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w_low, z_low));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w_high, z_high));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w_high, z_high));
  }
};

// float32 -> the output type, 16 values.
__attribute__((always_inline)) inline __m256i narrow(__m512 v, c10::Half*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
__attribute__((always_inline)) inline __m256i narrow(__m512 v, c10::BFloat16*) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(rounded);
}

// 64 values to out[0..63] (whole 64-byte lines; kStream: non-temporal, out 64-byte aligned).
template <bool kStream>
__attribute__((always_inline)) inline void store64(float* out, const __m512* v) {
  for (int q = 0; q < 4; ++q) {
    if (kStream) {
      _mm512_stream_ps(out + 16 * q, v[q]);
    } else {
      _mm512_storeu_ps(out + 16 * q, v[q]);
    }
  }
}
template <bool kStream, typename T>
__attribute__((always_inline)) inline void store64(T* out, const __m512* v) {
  for (int h = 0; h < 2; ++h) {
    const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(narrow(v[2 * h], out)), narrow(v[2 * h + 1], out), 1);
    if (kStream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + 32 * h), line);
    } else {
      _mm512_storeu_si512(out + 32 * h, line);
    }
  }
}

// The first `count` of 64 values (count < 64).
__attribute__((always_inline)) inline void store_part(float* out, const __m512* v, int64_t count) {
  const __mmask64 mask = first_bits(count);
  for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(out + 16 * q, static_cast<__mmask16>(mask >> (16 * q)), v[q]);
}
template <typename T>
__attribute__((always_inline)) inline void store_part(T* out, const __m512* v, int64_t count) {
  const __mmask64 mask = first_bits(count);
  for (int q = 0; q < 4; ++q) {
    _mm256_mask_storeu_epi16(out + 16 * q, static_cast<__mmask16>(mask >> (16 * q)), narrow(v[q], out));
  }
}

template <bool kStream, typename T>
void decode_avx512_impl(const DecodeTables& tables, const uint8_t* codes, int64_t len, float scale, T* out) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 values[4];
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    tables.decode(_mm512_loadu_si512(codes + i), values);
    for (int q = 0; q < 4; ++q) values[q] = _mm512_mul_ps(values[q], vscale);
    store64<kStream>(out + i, values);
  }
  if (i < len) {
    tables.decode(_mm512_maskz_loadu_epi8(first_bits(len - i), codes + i), values);
    for (int q = 0; q < 4; ++q) values[q] = _mm512_mul_ps(values[q], vscale);
    store_part(out + i, values, len - i);
  }
}

template <typename T>
void decode_avx512(const DecodeTables& tables, const uint8_t* codes, int64_t len, float scale, T* out, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(out) & 63) == 0) {
    decode_avx512_impl<true>(tables, codes, len, scale, out);
  } else {
    decode_avx512_impl<false>(tables, codes, len, scale, out);
  }
}
#endif  // D8_AVX512_VBMI

template <typename T>
void dequantize_impl(const uint8_t* codes, int64_t n, const float* code, const float* absmax, int64_t blocksize,
                     T* out) {
#if D8_AVX512_VBMI
  const DecodeTables tables(code);
  const bool stream = n * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
#endif
  constexpr int64_t kUnit = 64;
  const int64_t units = (n + kUnit - 1) / kUnit;
  at::parallel_for(0, units, kTaskElements / kUnit, [&](int64_t first, int64_t last) {
    int64_t e = first * kUnit;
    const int64_t end = std::min(n, last * kUnit);
    while (e < end) {
      const int64_t b = e / blocksize;
      const int64_t stop = std::min(end, (b + 1) * blocksize);
#if D8_AVX512_VBMI
      decode_avx512(tables, codes + e, stop - e, absmax[b], out + e, stream);
#else
      decode_portable(codes + e, stop - e, code, absmax[b], out + e);
#endif
      e = stop;
    }
#if D8_AVX512_VBMI
    if (stream) _mm_sfence();
#endif
  });
}

// ---------------------------------------------------------------------------
// Operators.

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dist8bit CPU kernel: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "dist8bit CPU kernel: ", name, " must be contiguous");
}

void check_map(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dist8bit CPU kernel: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == kMapSize, "dist8bit CPU kernel: ", name, " must hold ", kMapSize, " values, got ", t.numel());
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& code, const at::Tensor& thresholds,
                            const at::Tensor& lut, int64_t lut_mantissa_bits, int64_t lut_min_exponent,
                            int64_t refine_steps, int64_t blocksize, std::optional<int64_t> seed,
                            const at::Tensor& codes, const at::Tensor& absmax) {
  check_cpu(x, "x");
  TORCH_CHECK(is_float_type(x.scalar_type()), "dist8bit CPU kernel: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_map(code, "code");
  check_map(thresholds, "thresholds");
  TORCH_CHECK(std::isinf(thresholds.const_data_ptr<float>()[kLastCode]) &&
                  thresholds.const_data_ptr<float>()[kLastCode] > 0.0f,
              "dist8bit CPU kernel: thresholds[255] must be +inf");
  check_cpu(lut, "lut");
  TORCH_CHECK(lut.scalar_type() == at::kInt, "dist8bit CPU kernel: lut must be int32, got ", lut.scalar_type());
  if (lut.numel() != 0) {
    TORCH_CHECK(lut_mantissa_bits >= 0 && lut_mantissa_bits <= 23, "dist8bit CPU kernel: lut_mantissa_bits must be in [0, 23], got ",
                lut_mantissa_bits);
    TORCH_CHECK(lut_min_exponent >= 1 && lut_min_exponent <= kFloat32ExponentOne + 1,
                "dist8bit CPU kernel: lut_min_exponent must be in [1, 128], got ", lut_min_exponent);
    const int64_t entries = lut_entries(static_cast<int>(lut_mantissa_bits), static_cast<int>(lut_min_exponent));
    TORCH_CHECK(lut.numel() == entries, "dist8bit CPU kernel: lut must hold 2 * rows * 2^mantissa_bits = ", entries,
                " entries, got ", lut.numel());
  }
  TORCH_CHECK(refine_steps >= 0 && refine_steps <= kLastCode, "dist8bit CPU kernel: refine_steps must be in [0, 255], got ",
              refine_steps);
  TORCH_CHECK(blocksize >= 1, "dist8bit CPU kernel: blocksize must be positive, got ", blocksize);
  TORCH_CHECK(!seed.has_value() || *seed >= 0, "dist8bit CPU kernel: seed must be non-negative, got ", seed.value_or(0));
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dist8bit CPU kernel: codes must be uint8, got ", codes.scalar_type());
  check_cpu(absmax, "absmax");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "dist8bit CPU kernel: absmax must be float32, got ",
              absmax.scalar_type());
  const int64_t n = x.numel();
  TORCH_CHECK(codes.numel() == n, "dist8bit CPU kernel: codes must hold ", n, " elements, got ", codes.numel());
  const int64_t blocks = block_count(n, blocksize);
  TORCH_CHECK(absmax.numel() == blocks, "dist8bit CPU kernel: absmax must hold ", blocks, " elements, got ",
              absmax.numel());
  if (n == 0) return;

  const Codebook book{code.const_data_ptr<float>(),
                      thresholds.const_data_ptr<float>(),
                      lut.numel() == 0 ? nullptr : lut.const_data_ptr<int32_t>(),
                      static_cast<int>(lut_mantissa_bits),
                      static_cast<int>(lut_min_exponent),
                      lut.numel() == 0 ? 0 : static_cast<int>(refine_steps)};
  const int64_t bs = effective_blocksize(n, blocksize);
  const bool stochastic = seed.has_value();
  const uint32_t key = stochastic ? seed_key(static_cast<uint64_t>(*seed)) : 0u;
  auto* out = static_cast<uint8_t*>(codes.data_ptr());
  auto* scales = static_cast<float*>(absmax.data_ptr());
  switch (x.scalar_type()) {
    case at::kFloat:
      Quantizer<float>(static_cast<const float*>(x.const_data_ptr()), n, bs, out, scales, book, stochastic, key)
          .run();
      break;
    case at::kHalf:
      Quantizer<c10::Half>(static_cast<const c10::Half*>(x.const_data_ptr()), n, bs, out, scales, book,
                           stochastic, key)
          .run();
      break;
    default:
      Quantizer<c10::BFloat16>(static_cast<const c10::BFloat16*>(x.const_data_ptr()), n, bs, out, scales, book,
                               stochastic, key)
          .run();
      break;
  }
}

void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& code, const at::Tensor& absmax,
                              int64_t blocksize, const at::Tensor& out) {
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dist8bit CPU kernel: codes must be uint8, got ", codes.scalar_type());
  check_map(code, "code");
  check_cpu(absmax, "absmax");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "dist8bit CPU kernel: absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(blocksize >= 1, "dist8bit CPU kernel: blocksize must be positive, got ", blocksize);
  check_cpu(out, "out");
  TORCH_CHECK(is_float_type(out.scalar_type()), "dist8bit CPU kernel: out must be float32, float16 or bfloat16, got ",
              out.scalar_type());
  const int64_t n = codes.numel();
  TORCH_CHECK(out.numel() == n, "dist8bit CPU kernel: out must hold ", n, " elements, got ", out.numel());
  const int64_t blocks = block_count(n, blocksize);
  TORCH_CHECK(absmax.numel() == blocks, "dist8bit CPU kernel: absmax must hold ", blocks, " elements, got ",
              absmax.numel());
  if (n == 0) return;

  const int64_t bs = effective_blocksize(n, blocksize);
  const auto* in = static_cast<const uint8_t*>(codes.const_data_ptr());
  const float* table = code.const_data_ptr<float>();
  const float* scales = absmax.const_data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_impl(in, n, table, scales, bs, static_cast<float*>(out.data_ptr()));
      break;
    case at::kHalf:
      dequantize_impl(in, n, table, scales, bs, static_cast<c10::Half*>(out.data_ptr()));
      break;
    default:
      dequantize_impl(in, n, table, scales, bs, static_cast<c10::BFloat16*>(out.data_ptr()));
      break;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CPU, m) {
  m.impl("quantize_blockwise", &dist8bit::cpu::quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dist8bit::cpu::dequantize_blockwise_cpu);
}
