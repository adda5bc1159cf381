// Device helpers shared by the CUDA kernels (quantize_kernels.cu, fused_step_kernels.cu).
//
// Moved here unchanged from quantize_kernels.cu so that every kernel reads,
// converts, reduces and rounds exactly the same way: the element types as raw
// storage bits, 4-to-16-byte vector loads, code stores, and the rounding rule
// of dist8bit/quant/codebook.py (absmax as an unsigned max over the bits of
// |x| with NaN propagated and stored canonical, the IEEE reciprocal, and the
// threshold count of common/code_search.h over tables in shared memory),
// and the conflict-free table layouts of the encode and decode paths.
// CUDA runtime headers and the project's torch-free headers only; nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/code_search.h"

namespace dist8bit {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kCodeSize = 256;  // entries of an 8-bit map and of its threshold table
// (a 4-bit map and its thresholds: kMapSize4 = 16 entries, common/code_search.h)
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Element types, as raw storage bits (no class types on the device side).

struct F32 {
  using Storage = float;
  static constexpr int kBytes = 4;
  static __device__ __forceinline__ float to_float(Storage v) { return v; }
  static __device__ __forceinline__ float from_word(uint32_t bits) { return __uint_as_float(bits); }
  static __device__ __forceinline__ Storage from_float(float v) { return v; }
  static __device__ __forceinline__ uint32_t to_bits(float v) { return __float_as_uint(v); }
};

struct F16 {
  using Storage = unsigned short;
  static constexpr int kBytes = 2;
  static __device__ __forceinline__ float to_float(Storage v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ float from_word(uint32_t bits) {
    return to_float(static_cast<Storage>(bits & 0xffffu));
  }
  static __device__ __forceinline__ Storage from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  static __device__ __forceinline__ uint32_t to_bits(float v) { return from_float(v); }
};

struct BF16 {
  using Storage = unsigned short;
  static constexpr int kBytes = 2;
  // bfloat16 is the top half of a float32: widening is exact.
  static __device__ __forceinline__ float to_float(Storage v) { return __uint_as_float(uint32_t{v} << 16); }
  static __device__ __forceinline__ float from_word(uint32_t bits) { return __uint_as_float(bits << 16); }
  static __device__ __forceinline__ Storage from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ uint32_t to_bits(float v) { return from_float(v); }
};

// ---------------------------------------------------------------------------
// Vector memory access through 32-bit words.

template <int kWords>
struct Words {
  uint32_t w[kWords];
};

template <int kWords>
__device__ __forceinline__ Words<kWords> load_words(const void* p);

template <>
__device__ __forceinline__ Words<1> load_words<1>(const void* p) {
  return {{*static_cast<const unsigned*>(p)}};
}

template <>
__device__ __forceinline__ Words<2> load_words<2>(const void* p) {
  const uint2 v = *static_cast<const uint2*>(p);
  return {{v.x, v.y}};
}

template <>
__device__ __forceinline__ Words<4> load_words<4>(const void* p) {
  const uint4 v = *static_cast<const uint4*>(p);
  return {{v.x, v.y, v.z, v.w}};
}

// Element k of a vector of E loaded as words (little-endian lanes).
template <typename E, int kWords>
__device__ __forceinline__ float element(const Words<kWords>& v, int k) {
  constexpr int kPerWord = 4 / E::kBytes;
  return E::from_word(v.w[k / kPerWord] >> (32 / kPerWord * (k % kPerWord)));
}

// Store kCount codes (each < 256) as one 2-, 4- or 8-byte store.
template <int kCount>
__device__ __forceinline__ void store_codes(uint8_t* p, const uint32_t (&c)[kCount]);

template <>
__device__ __forceinline__ void store_codes<2>(uint8_t* p, const uint32_t (&c)[2]) {
  *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(c[0] | (c[1] << 8));
}

template <>
__device__ __forceinline__ void store_codes<4>(uint8_t* p, const uint32_t (&c)[4]) {
  *reinterpret_cast<unsigned*>(p) = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
}

template <>
__device__ __forceinline__ void store_codes<8>(uint8_t* p, const uint32_t (&c)[8]) {
  *reinterpret_cast<uint2*>(p) =
      make_uint2(c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24), c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24));
}

// ---------------------------------------------------------------------------
// The rounding rule, per element.

// Bits of |v|: ordered like |v| for numbers, every NaN above +inf.
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ unsigned warp_max(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
#endif
}

// A block maximum from its abs_bits: any NaN becomes the canonical quiet NaN
// 0x7FC00000 (what torch's amax gives for ordinary NaNs, and what the CPU
// kernels store), so every backend writes the same absmax bits.
constexpr unsigned kInfBits = 0x7f800000u;
constexpr unsigned kCanonicalNaN = 0x7fc00000u;
__device__ __forceinline__ unsigned canonical_bits(unsigned abs_max_bits) {
  return abs_max_bits > kInfBits ? kCanonicalNaN : abs_max_bits;
}

// The float32 reciprocal of the reference, 1 / absmax (IEEE, round to nearest).
__device__ __forceinline__ float reciprocal(float absmax) { return __fdiv_rn(1.0f, absmax); }

// One step of nearest_code_index (common/code_search.h) on a threshold table
// in shared memory, with the table position kept as a shared-memory byte
// address `a` (= table + 4 * idx):
//     idx += s > thresholds[idx + STEP - 1] ? STEP : 0
// The same comparison in the same order, written in PTX so that a step is
// three instructions (LDS with an immediate offset, FSETP, predicated IADD)
// instead of the five the compiler emits for the index form; the search is
// most of the arithmetic per element. Volatile with a memory clobber: it is
// never moved above the __syncthreads() that publishes the table.
template <int STEP>
__device__ __forceinline__ void search_step(unsigned& a, float s) {
  asm volatile(
      "{\n\t"
      ".reg .pred p;\n\t"
      ".reg .f32 t;\n\t"
      "ld.shared.f32 t, [%0+%2];\n\t"
      "setp.gt.f32 p, %1, t;\n\t"
      "@p add.u32 %0, %0, %3;\n\t"
      "}"
      : "+r"(a)
      : "f"(s), "n"((STEP - 1) * 4), "n"(STEP * 4)
      : "memory");
}

// The steps of count_thresholds_below from kStep down to 1, halving.
template <int kStep>
__device__ __forceinline__ void search_steps(unsigned& a, float s) {
  search_step<kStep>(a, s);
  if constexpr (kStep > 1) search_steps<kStep / 2>(a, s);
}

// #{ j : thresholds[j] < s } for the table of kEntries thresholds (256, or 16
// for a 4-bit map) at shared address `table`: exactly search_thresholds<kEntries>
// of common/code_search.h (nearest_code_index, nearest_code_index4),
// log2(kEntries) branch-free steps, reading thresholds[0 .. kEntries - 2]
// only, result in [0, kEntries - 1]. Build with -DD8_CUDA_PORTABLE_SEARCH to
// call the shared header's function instead.
template <int kEntries = kCodeSize>
__device__ __forceinline__ int count_thresholds_below(const float* s_thresholds, unsigned table, float s) {
  static_assert(kEntries == kCodeSize || kEntries == kMapSize4, "a map has 256 or 16 entries");
#ifdef D8_CUDA_PORTABLE_SEARCH
  (void)table;
  return search_thresholds<kEntries>(s_thresholds, s);
#else
  (void)s_thresholds;
  unsigned a = table;
  search_steps<kEntries / 2>(a, s);
  return static_cast<int>((a - table) / 4);
#endif
}

// Shared-memory address of a __shared__ table, for count_thresholds_below.
__device__ __forceinline__ unsigned shared_address(const float* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------
// Conflict-free table reads.
//
// Shared memory has 32 banks of 4-byte words; word w is in bank w % 32. A
// warp's load takes one wavefront per distinct bank *row* it touches in the
// busiest bank: lanes reading the same word share it (broadcast), lanes
// reading different words of one bank serialise. So a table read is free of
// conflicts by construction exactly when no two lanes can read different
// words of one bank, whatever the data.
//
// Encode: the encoder table (common/code_search.h) is read per element at
//   split1[slot], split2[slot], slope[piece], offset[piece]: four arrays of
//   32 consecutive words each. 32 consecutive words lie in 32 distinct banks
//   (at any alignment), so two lanes meet in a bank only when they read the
//   same index of the same array, i.e. the same word: one wavefront per load,
//   always. mirror and guard are one word each (a broadcast). Only values
//   within the guard of a jump (about 2 * guard = 0.05% of them) and
//   non-finite ones take the binary search over the 256 thresholds, whose
//   steps at strides of 128/64/32 words do conflict.
//
// Decode: code[c] for a data-dependent c in [0, 256) cannot be conflict-free
//   from one 256-word copy (codes c and c + 32 share a bank). Lane-private
//   copies can: word c * 32 + lane holds code[c], so lane l only ever reads
//   bank l, and a warp's 32 reads hit 32 distinct banks in one wavefront,
//   whatever the codes (all warps of a CUDA block share the copies: the
//   layout depends on the lane only). 8192 words = 32 KB per codebook.
//   Registers and shuffles would cost 8 SHFL + 8 selects per element (the
//   register holding code[c] differs from lane to lane), 8 times the MIO
//   traffic of one LDS; 32 KB of shared memory per map fits every kernel at
//   its intended occupancy (see fused_step_kernels.cu and dequantize).
//
// 4-bit maps (16 entries): every threshold read of the 4-step search lies in
//   16 consecutive words (16 distinct banks), so it is conflict-free like
//   the encoder table's arrays; decoding uses the lane-private layout for
//   the 16 codes (512 words), the same instructions as 8-bit.

// Words of the encoder table as staged in shared memory (kEncoderTableSize
// rounded up to 16 bytes, so that consecutive tables stay 16-byte aligned).
constexpr int kEncoderWords = (kEncoderTableSize + 3) / 4 * 4;
// Words of one lane-private code table.
constexpr int kPrivateCodeWords = kCodeSize * kWarpSize;

// Copy the encoder table to shared memory, by `threads` threads (tid = thread
// index in [0, threads)). Without a table (encoder == nullptr: binary search
// only) the staged table has every line 0 and guard +inf: each value then
// fails the guard (|h - rint(h)| >= inf never holds) and takes the search,
// so one code path serves both cases with the same results.
__device__ __forceinline__ void stage_encoder(const float* __restrict__ encoder, float* s_encoder, int tid,
                                              int threads) {
  for (int i = tid; i < kEncoderWords; i += threads) {
    float v = 0.0f;
    if (i < kEncoderTableSize) {
      if (encoder != nullptr) {
        v = encoder[i];
      } else if (i == kEncoderGuard) {
        v = __uint_as_float(kInfBits);
      }
    }
    s_encoder[i] = v;
  }
}

// Copy the `entries` code values (256, or 16 for a 4-bit map) to the
// lane-private layout (word c * 32 + lane = code[c]) by the warps of a CUDA
// block of `threads` threads (a multiple of 32, called by all of them). A warp
// takes up to 32 codes at a time: lane r loads code[c0 + r] and shuffles hand
// each value to every lane, whose store goes to bank `lane`, so no store
// conflicts either.
__device__ __forceinline__ void stage_private_code(const float* __restrict__ code, float* s_private, int threads,
                                                   int entries = kCodeSize) {
  const int lane = threadIdx.x % kWarpSize;
  const int warps = threads / kWarpSize;
  for (int chunk = threadIdx.x / kWarpSize; chunk * kWarpSize < entries; chunk += warps) {
    const int c0 = chunk * kWarpSize;
    const int rows = entries - c0 < kWarpSize ? entries - c0 : kWarpSize;
    const float mine = lane < rows ? code[c0 + lane] : 0.0f;
#pragma unroll 8
    for (int r = 0; r < kWarpSize; ++r) {
      const float value = __shfl_sync(kFullMask, mine, r);
      if (r < rows) s_private[(c0 + r) * kWarpSize + lane] = value;
    }
  }
}

// code[c] from the lane-private table; lane_code = s_private + lane.
__device__ __forceinline__ float private_code(const float* lane_code, uint32_t c) { return lane_code[c * kWarpSize]; }

// The nearest code of kCount scaled values (scaled_value of code_search.h):
// exactly nearest_code_index(thresholds, encoder, s) of common/code_search.h.
// Every candidate first (encoder_table_candidate of code_search.h on the
// staged table, plain shared loads with nothing in between, so the guard and
// mirror words are loaded once for all kCount), then the binary search
// (count_thresholds_below) for the values whose candidate failed the guard.
template <int kCount>
__device__ __forceinline__ void nearest_codes(const float* s_encoder, const float* s_thresholds,
                                              unsigned thresholds_address, const float (&s)[kCount],
                                              uint32_t (&code)[kCount]) {
  bool found[kCount];
#pragma unroll
  for (int k = 0; k < kCount; ++k) {
    int c = 0;
    found[k] = encoder_table_candidate(s_encoder, s[k], &c);
    code[k] = static_cast<uint32_t>(c);
  }
#pragma unroll
  for (int k = 0; k < kCount; ++k) {
    if (!found[k]) code[k] = static_cast<uint32_t>(count_thresholds_below(s_thresholds, thresholds_address, s[k]));
  }
}

// One value: the same rule.
__device__ __forceinline__ int nearest_code(const float* s_encoder, const float* s_thresholds,
                                            unsigned thresholds_address, float s) {
  int c = 0;
  if (encoder_table_candidate(s_encoder, s, &c)) return c;
  return count_thresholds_below(s_thresholds, thresholds_address, s);
}

}  // namespace cuda
}  // namespace dist8bit
