// CUDA kernel of the fused multi-tensor optimizer step (see fused_step_kernels.cuh).
//
// Bit-identical to dist8bit/backends/reference_optim.py (run on the CPU) by
// construction, element by element:
//   g       float(grad) * grad_scale[k] (__fmul_rn); finite = g is not inf/NaN;
//           a non-finite g enters the math as 0 and the element keeps its old
//           parameter and state values, and is counted.
//   old     quantized: code[c] * absmax[block] (__fmul_rn, like dequantize);
//           32-bit: the stored float32.
//   d       dist8bit::update_element of common/update_rules.h (the file is
//           built with --fmad=false, so no product is contracted into an FMA;
//           division and sqrt are IEEE: no fast-math).
//   p       dist8bit::apply_direction(p, hyper[DECAY], write_rate(rule, lr_eff), d), lr_eff =
//           hyper[LR] * update_scale[k] (__fmul_rn) when update_scale is given;
//           written round-to-nearest-even (F16/BF16::from_float of
//           device_quant.cuh), or for bfloat16 with a seed stochastically:
//           (bits + (r(i) & 0xFFFF)) >> 16 with r the hash of
//           common/stochastic_rounding.h at segment_offsets[k] + i, non-finite
//           values rounded to nearest.
//   errors  compensated bfloat16 parameters (error_bits 8 or 16): p is read as
//           compensated_value(p_bits, q) of common/weight_error.h (the float32
//           the bfloat16 and its stored error code q stand for), written round
//           to nearest even, and q = weight_error(p_new, p_new_bits) stored in
//           the same pass; a skipped element's p_new is its read p, which
//           rounds back to p_bits and re-encodes its q. The norm pass reads p
//           the same way.
//   states  quantized: the block's new absmax is the NaN-propagating max of
//           |kept| over the block (unsigned max of the bits, canonical NaN),
//           then code = #thresholds below kept * (1 / absmax) with NaN -> 0:
//           the same helpers as quantize_kernels.cu (device_quant.cuh).
//           4-bit (16-entry maps): the same operations, the count over the 16
//           thresholds, codes packed two per byte (dist8bit/quant/packing.py:
//           element 2j in the low nibble of byte j, an odd segment's last
//           high nibble 0).
//   norm    with norm_out: sum of (double) d * d over the finite elements of
//           each segment, nothing else written (float64 atomics: the order of
//           the sum differs from the reference, the terms do not).
//
// Work layout. The segments are cut into work units: with quantized states a unit
// is max(blocksize, 256) elements starting at a block boundary of its segment,
// with 32-bit states 256 elements. A group of warps owns one unit at a time
// (one warp for blocksize <= 256, blocksize / 256 warps for 512..4096; for
// 4096 the group is the whole 512-thread CUDA block); each lane holds 2
// rows of 4 consecutive elements, rows strided by 128 elements, so every
// load and store instruction of a warp covers one contiguous span. The unit
// list of all segments is walked grid-stride by the groups of a persistent
// grid, one launch per call; the segment of a unit is found with a 32-way
// warp-cooperative search (one ballot per step) over the prefix sums of the
// segments' unit counts in the device-side segment table, starting from the
// previous unit's segment.
//   Per unit: every load first (parameters, gradients, codes or float32
//   states, old scales), then the update per element, the parameter store,
//   and for quantized states the block maxima: within a lane, then across the 16
//   or 32 lanes of the block (shuffles / redux), then across the warps of
//   the group through shared memory (double-buffered, one named barrier per
//   group and step).
//   The new states stay in registers between the reduction and the encoding,
//   so every byte is read once and written once: 16 bytes per element for
//   AdamW8bit with float32 parameters and gradients. The tables of every used
//   slot live in shared memory, laid out so that the common case reads them
//   without bank conflicts (device_quant.cuh): decoding reads lane-private
//   copies of the code, encoding the encoder table's 32-entry arrays
//   (nearest_codes), and only values near a jump of the rounding rule take
//   the threshold search (count_thresholds_below).
//   4-bit states run the same kernels (the code width is a uniform argument,
//   not a template parameter, so the 66 instantiations serve both widths):
//   a lane's 4 elements of a row are 2 whole bytes of codes, loaded and spread
//   to one code per byte so that decoding is the 8-bit path, and packed back
//   after the 4-step search over the slot's 16 thresholds. The 4-bit tables
//   are 2 KB per slot (lane-private code 16 x 32 words, 16 thresholds); every
//   read stays within 16 consecutive words or a lane's own bank, so no bank
//   conflicts. At blocksize 128 (the 4-bit default) a block is one warp row:
//   its maximum is one redux.sync, and a warp writes 64 contiguous code bytes
//   per row.
//   Vector accesses (16 bytes of float32, 8 of 16-bit, 4 or 2 code bytes, 4
//   or 8 bytes of int8 / int16 error codes) need aligned pointers (checked per
//   segment on the host) and a whole row; the last row of a segment and
//   unaligned segments take per-element accesses.
//   Error codes are a run-time argument (error_bits, uniform over the grid):
//   a row's codes ride in the two words of its bfloat16 parameter row (Row)
//   that only float32 parameters use, and a call without errors takes one
//   uniform branch per row and phase. The quantized kernels serve both kinds
//   of call; the float32-state kernels come with and without the error path
//   (kErrors, launch_blocksize says why): 76 instantiations.
// The non-finite count is summed per warp and added once per warp (int64
// atomics); the norm is summed per lane, reduced per warp and added once per
// warp and segment. No host synchronisation anywhere.
//
// Registers (ptxas, sm_90, -O3 --fmad=false), capped at 128 by
// __launch_bounds__, no spills, each quantized kernel serving 8- and 4-bit
// states with and without error codes (before error codes in parentheses):
// Adam 116..122 (110..116), SGD/LARS/RMSprop/Adagrad/Lion with one slot
// 94..114 (88..92), RMSprop with two 114..128 (110..112), AdEMAMix 122..126
// (122..128); 4096: Adam 116 (110), AdEMAMix 122 (122; 154 / 179 with 4 rows
// per lane). So 16 warps are resident per SM for every variant, as before
// (docs/cuda_encoder.md has the table; sm_80 the same blocks per SM).
// Float32 states: 71..124 without the error path (unchanged), 80..124 with
// it. The per-phase device functions below are force-inlined: splitting the
// kernel into them moved single-slot variants by -2..+4 registers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/code_search.h"
#include "common/host_device.h"
#include "common/stochastic_rounding.h"
#include "common/update_rules.h"
#include "common/weight_error.h"
#include "device_quant.cuh"
#include "fused_step_kernels.cuh"
#include "launch_util.cuh"

namespace dist8bit {
namespace cuda {
namespace {

constexpr int kVec = 4;                     // consecutive elements per lane and row
constexpr int kRow = kWarpSize * kVec;      // elements per warp row
constexpr int kRows = 2;                    // rows per lane
constexpr int kWarpElems = kRows * kRow;    // elements per warp and unit
constexpr int kUnit32 = kWarpElems;         // elements per work unit with float32 states
constexpr int kMaxBlockThreads = 512;

constexpr int log2_of(int v) { return v <= 1 ? 0 : 1 + log2_of(v / 2); }

// Elements of one work unit (host and device agree through this function).
constexpr int64_t unit_elements(bool quantized, int64_t blocksize) {
  return quantized && blocksize > kUnit32 ? blocksize : kUnit32;
}

// The layout of a work unit for blocksize BS (0: float32 states).
//
// Threads and occupancy: every lane holds kRows = 2 rows of 4 elements, so
// every variant needs the same registers per thread (at most 128: see
// __launch_bounds__ below) and runs 16 warps per SM:
//   BS <= 2048 and float32 states: 256 threads per CUDA block, 2 blocks/SM;
//   BS == 4096: a block of 4096 elements is 16 warps' worth, so the CUDA
//   block has 512 threads (one group of 16 warps), 1 block/SM.
// (Holding 4 rows per lane in 256-thread blocks instead needed up to 180
// registers for AdEMAMix: 8 warps per SM.)
template <int BS>
struct Layout {
  static constexpr bool kQuant = BS > 0;
  static constexpr int kThreads = BS == 4096 ? 512 : 256;  // threads per CUDA block
  static constexpr int kWarps = kThreads / kWarpSize;
  static constexpr int kBlocksPerSM = BS == 4096 ? 1 : 2;  // intended residency (__launch_bounds__)
  static constexpr int kGroupWarps = BS > kWarpElems ? BS / kWarpElems : 1;  // warps sharing a unit
  static constexpr int kUnit = kGroupWarps * kWarpElems;
  static constexpr int kGroups = kWarps / kGroupWarps;  // units per CUDA block and step
  // Lanes of one row inside one block, and rows of a lane inside one block.
  static constexpr int kLanesPerBlock = (kQuant && BS < kRow) ? BS / kVec : kWarpSize;
  static constexpr int kRowsPerBlock = (!kQuant || BS <= kRow) ? 1 : (BS >= kWarpElems ? kRows : BS / kRow);
  static constexpr int kLog2Block = kQuant ? log2_of(BS) : 0;
  static_assert(!kQuant || (1 << kLog2Block) == BS, "blocks are indexed by shifts");

  static_assert(!kQuant || is_state_blocksize(BS),
                "blocksize must be a power of two in [64, 4096]");
  static_assert(kGroups * kGroupWarps == kWarps, "the groups must fill the CUDA block");
  static_assert(kThreads <= kMaxBlockThreads && kThreads >= kCodeSize, "staging covers the tables");
  static_assert(kThreads * kBlocksPerSM * 128 <= 65536, "at most 128 registers per thread at this residency");
  static_assert(kUnit == unit_elements(kQuant, BS), "host and device must cut the same units");
  static_assert(kUnit % (kQuant ? BS : 1) == 0, "a unit holds whole blocks");
  static_assert(kLanesPerBlock * kVec * kRowsPerBlock * kGroupWarps == (kQuant ? BS : kRow),
                "every element of a block is held by exactly one lane of its group");
};

// Bytes before the segment records in the table: the unit prefix sums, padded to 16.
size_t prefix_bytes(int64_t num_segments) {
  return (static_cast<size_t>(num_segments + 1) * sizeof(int64_t) + 15) / 16 * 16;
}

// ---------------------------------------------------------------------------
// Kernel arguments (passed by value: the constant vector sits in parameter space).

struct KernelArgs {
  StepConstants hyper;
  const int64_t* prefix;          // num_segments + 1 unit prefix sums
  const FusedSegment* segments;   // num_segments records
  int64_t num_segments;
  int64_t total_units;
  const float* code[kMaxStates];
  const float* thresholds[kMaxStates];
  const float* encoder[kMaxStates];  // nullptr: binary search only (always for 4-bit maps)
  int code_bits;                     // quantized kernels: 8 (256-entry maps) or 4 (16-entry maps, packed codes)
  const float* grad_scale;
  const float* update_scale;
  double* norm_out;
  unsigned long long* nonfinite_count;
  WeightDecayMode wd_mode;
  FloatType param_type;
  FloatType grad_type;
  uint32_t key;  // seed_key(seed) for stochastic rounding
  bool stochastic;
  int error_bits;  // compensated bfloat16 parameters: 8 or 16 (segments' error codes), else 0
};

// ---------------------------------------------------------------------------
// Row access: kVec consecutive elements of one lane, `count` (0..kVec) of them
// inside the segment; one vector access when the pointers allow it and the
// row is whole, else one access per element. Every tensor is streamed once,
// so loads and stores are explicit global accesses with the evict-first hint
// (ld/st.global.cs; the pointers come from the segment table, where the
// compiler cannot see their address space). Dtype branches are taken once
// per row and are uniform over the grid.

struct Row {
  uint32_t w[kVec];  // storage bits: one float32 per word, or two 16-bit values per word (low first)
};

__device__ __forceinline__ bool whole_vector(bool vector_ok, int count) { return vector_ok && count == kVec; }

// kVec 16-bit values from p, two per word (low first): `lo` holds elements 0
// and 1, `hi` 2 and 3; elements past `count` are 0.
__device__ __forceinline__ void load_halves(const unsigned short* p, int count, bool vector_ok, uint32_t& lo,
                                            uint32_t& hi) {
  if (whole_vector(vector_ok, count)) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    lo = v.x;
    hi = v.y;
    return;
  }
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < count) w[k / 2] |= uint32_t{__ldcs(p + k)} << (16 * (k % 2));
  }
  lo = w[0];
  hi = w[1];
}

// Stores h[0..count) (16-bit values: every h[k] < 2^16) at p.
__device__ __forceinline__ void store_halves(unsigned short* p, int count, bool vector_ok, const uint32_t (&h)[kVec]) {
  if (whole_vector(vector_ok, count)) {
    __stcs(reinterpret_cast<uint2*>(p), make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16)));
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < count) __stcs(p + k, static_cast<unsigned short>(h[k]));
  }
}

__device__ __forceinline__ Row load_row(FloatType type, const void* base, int64_t first, int count, bool vector_ok) {
  Row r = {{0u, 0u, 0u, 0u}};
  if (type == FloatType::kFloat32) {
    const unsigned* p = static_cast<const unsigned*>(base) + first;
    if (whole_vector(vector_ok, count)) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
      r.w[0] = v.x;
      r.w[1] = v.y;
      r.w[2] = v.z;
      r.w[3] = v.w;
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (k < count) r.w[k] = __ldcs(p + k);
      }
    }
  } else {
    load_halves(static_cast<const unsigned short*>(base) + first, count, vector_ok, r.w[0], r.w[1]);
  }
  return r;
}

// The row as float32 (exact widening).
__device__ __forceinline__ void row_values(FloatType type, const Row& r, float (&v)[kVec]) {
  if (type == FloatType::kFloat32) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = F32::from_word(r.w[k]);
  } else if (type == FloatType::kBFloat16) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = BF16::from_word(r.w[k / 2] >> (16 * (k % 2)));
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = F16::from_word(r.w[k / 2] >> (16 * (k % 2)));
  }
}

// Four codes as one little-endian word.
__device__ __forceinline__ uint32_t load_codes(const uint8_t* base, int64_t first, int count, bool vector_ok) {
  const uint8_t* p = base + first;
  if (whole_vector(vector_ok, count)) return __ldcs(reinterpret_cast<const unsigned*>(p));
  uint32_t word = 0;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < count) word |= uint32_t{__ldcs(p + k)} << (8 * k);
  }
  return word;
}

// Four 4-bit codes of elements first .. first + 3 (first even: rows start at
// multiples of 4), two bytes of packed codes, spread to one code per byte of
// the returned word, so that decoding reads them like 8-bit codes. Only the
// bytes holding the `count` elements inside the segment are read.
__device__ __forceinline__ uint32_t load_nibbles(const uint8_t* base, int64_t first, int count, bool vector_ok) {
  const uint8_t* p = base + first / 2;
  uint32_t packed = 0;
  if (whole_vector(vector_ok, count)) {
    packed = __ldcs(reinterpret_cast<const unsigned short*>(p));
  } else {
#pragma unroll
    for (int b = 0; b < kVec / 2; ++b) {
      if (2 * b < count) packed |= uint32_t{__ldcs(p + b)} << (8 * b);
    }
  }
  packed = (packed | (packed << 8)) & 0x00ff00ffu;  // byte 1 to byte 2
  return (packed | (packed << 4)) & 0x0f0f0f0fu;    // the high nibbles of bytes 0 and 2 to bytes 1 and 3
}

// Stores four 4-bit codes, nibble k of `packed` = element first + k, as two
// bytes (dist8bit/quant/packing.py: element 2j is the low nibble of byte j).
// The caller zeroes the nibbles of elements past the segment's end, so an odd
// segment's last byte gets a high nibble of 0.
__device__ __forceinline__ void store_nibbles(uint8_t* base, int64_t first, int count, bool vector_ok,
                                              uint32_t packed) {
  uint8_t* p = base + first / 2;
  if (whole_vector(vector_ok, count)) {
    __stcs(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(packed));
    return;
  }
#pragma unroll
  for (int b = 0; b < kVec / 2; ++b) {
    if (2 * b < count) __stcs(p + b, static_cast<unsigned char>(packed >> (8 * b)));
  }
}

__device__ __forceinline__ void store_code_word(uint8_t* base, int64_t first, int count, bool vector_ok,
                                                uint32_t word) {
  uint8_t* p = base + first;
  if (whole_vector(vector_ok, count)) {
    __stcs(reinterpret_cast<unsigned*>(p), word);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < count) __stcs(p + k, static_cast<unsigned char>(word >> (8 * k)));
  }
}

__device__ __forceinline__ void load_state_row(const float* base, int64_t first, int count, bool vector_ok,
                                               float (&v)[kVec]) {
  const float* p = base + first;
  if (whole_vector(vector_ok, count)) {
    const float4 w = __ldcs(reinterpret_cast<const float4*>(p));
    v[0] = w.x;
    v[1] = w.y;
    v[2] = w.z;
    v[3] = w.w;
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) v[k] = k < count ? __ldcs(p + k) : 0.0f;
}

__device__ __forceinline__ void store_state_row(float* base, int64_t first, int count, bool vector_ok,
                                                const float (&v)[kVec]) {
  float* p = base + first;
  if (whole_vector(vector_ok, count)) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < count) __stcs(p + k, v[k]);
  }
}

// reference_optim.round_bf16_stochastically for one value: finite values add
// the low 16 random bits of element `index` to their float32 bits and drop the
// low half (uint32 arithmetic, as the reference's & 0xFFFF0000); inf and NaN
// round to nearest like the reference's final .bfloat16().
__device__ __forceinline__ uint32_t bf16_stochastic_bits(float v, uint32_t key, uint64_t index) {
  const uint32_t bits = __float_as_uint(v);
  if ((bits & kInfBits) == kInfBits) return BF16::to_bits(v);
  return (bits + (random_bits_for_index(key, index) & 0xffffu)) >> 16;
}

// The parameter row back in its dtype: round to nearest even, or for
// bfloat16 with `stochastic` stochastically, element k of the row drawing the
// bits of stream position index + k.
__device__ __forceinline__ void store_param_row(FloatType type, void* base, int64_t first, int count, bool vector_ok,
                                                const float (&v)[kVec], bool stochastic, uint32_t key,
                                                uint64_t index) {
  if (type == FloatType::kFloat32) {
    store_state_row(static_cast<float*>(base), first, count, vector_ok, v);
    return;
  }
  uint32_t h[kVec];
  if (type == FloatType::kFloat16) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) h[k] = F16::to_bits(v[k]);
  } else if (stochastic) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) h[k] = bf16_stochastic_bits(v[k], key, index + k);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) h[k] = BF16::to_bits(v[k]);
  }
  store_halves(static_cast<unsigned short*>(base) + first, count, vector_ok, h);
}

// ---------------------------------------------------------------------------
// Compensated bfloat16 parameters (common/weight_error.h). A bfloat16 row
// fills only Row::w[0] and w[1]; its error codes ride in w[2] (int8: four
// bytes, element k in byte k) or w[2] and w[3] (int16: two per word, low first).

__device__ __forceinline__ void load_error_row(int error_bits, const void* base, int64_t first, int count,
                                               bool vector_ok, Row& r) {
  if (error_bits == 8) {
    r.w[2] = load_codes(static_cast<const uint8_t*>(base), first, count, vector_ok);
  } else {
    load_halves(static_cast<const unsigned short*>(base) + first, count, vector_ok, r.w[2], r.w[3]);
  }
}

// Element k's error code, sign-extended.
__device__ __forceinline__ int32_t error_code(int error_bits, const Row& r, int k) {
  return error_bits == 8 ? static_cast<int32_t>(r.w[2] << (24 - 8 * k)) >> 24
                         : static_cast<int32_t>(r.w[2 + k / 2] << (16 - 16 * (k % 2))) >> 16;
}

// The float32 values a compensated row stands for.
__device__ __forceinline__ void compensated_row(int error_bits, const Row& r, float (&v)[kVec]) {
  const WeightErrorFormat format = WeightErrorFormat::for_bits(error_bits);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const auto p_bits = static_cast<uint16_t>(r.w[k / 2] >> (16 * (k % 2)));
    v[k] = compensated_value(p_bits, error_code(error_bits, r, k), format);
  }
}

// Writes a compensated row: the parameters rounded to nearest even, and the
// error code of each write.
__device__ __forceinline__ void store_compensated_row(int error_bits, void* param, void* error, int64_t first,
                                                      int count, bool vector_ok, const float (&v)[kVec]) {
  const WeightErrorFormat format = WeightErrorFormat::for_bits(error_bits);
  uint32_t h[kVec];
  uint32_t q[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    h[k] = BF16::to_bits(v[k]);
    q[k] = static_cast<uint32_t>(weight_error(v[k], static_cast<uint16_t>(h[k]), format));
  }
  store_halves(static_cast<unsigned short*>(param) + first, count, vector_ok, h);
  if (error_bits == 8) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) word |= (q[k] & 0xffu) << (8 * k);
    store_code_word(static_cast<uint8_t*>(error), first, count, vector_ok, word);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) q[k] &= 0xffffu;
    store_halves(static_cast<unsigned short*>(error) + first, count, vector_ok, q);
  }
}

__device__ __forceinline__ bool is_finite(float v) { return (__float_as_uint(v) & kInfBits) != kInfBits; }

// ---------------------------------------------------------------------------
// Reductions.

// Maximum over aligned groups of kLanes lanes (kLanes a power of two <= 32).
template <int kLanes>
__device__ __forceinline__ unsigned group_max(unsigned v) {
  if constexpr (kLanes == kWarpSize) {
    return warp_max(v);
  } else {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
  }
}

__device__ __forceinline__ unsigned warp_sum(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFullMask, v);
#else
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
#endif
}

// Barrier of the kGroupWarps warps of group `group`: named barrier 1 + group
// (an immediate, so that ptxas reserves only the barriers in use), so that the
// groups of a CUDA block do not wait for each other. Group g is warps
// g * kGroupWarps .. (g + 1) * kGroupWarps - 1; the whole block is barrier 0.
template <int kId, int kThreadCount>
__device__ __forceinline__ void named_barrier() {
  asm volatile("bar.sync %0, %1;" : : "n"(kId), "n"(kThreadCount) : "memory");
}

template <int kGroupWarps, int kBlockWarps>
__device__ __forceinline__ void group_barrier(int group) {
  static_assert(kBlockWarps % kGroupWarps == 0 && kBlockWarps / kGroupWarps <= 4, "at most four groups per block");
  constexpr int kCount = kGroupWarps * kWarpSize;
  if constexpr (kGroupWarps == kBlockWarps) {
    __syncthreads();
  } else {
    switch (group) {
      case 0:
        named_barrier<1, kCount>();
        break;
      case 1:
        named_barrier<2, kCount>();
        break;
      case 2:
        named_barrier<3, kCount>();
        break;
      default:
        named_barrier<4, kCount>();
        break;
    }
  }
}

// Adds the warp's partial sums to *out (one atomic per warp) and clears them.
// Called by all lanes of a warp.
__device__ __forceinline__ void flush_norm(double& sum, double* out) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum = __dadd_rn(sum, __shfl_xor_sync(kFullMask, sum, offset));
  if (threadIdx.x % kWarpSize == 0 && sum != 0.0) atomicAdd(out, sum);  // a NaN sum is added too
  sum = 0.0;
}

// The segment of work unit `unit`: the k with prefix[k] <= unit < prefix[k + 1],
// searched from `lo` (prefix[lo] <= unit) by all lanes of a warp: each step
// probes 32 evenly spaced entries at once and keeps the span between the last
// probe at or below `unit` and the next one. Empty segments repeat a prefix
// value and are never returned.
__device__ __forceinline__ int64_t find_segment(const int64_t* __restrict__ prefix, int64_t num_segments,
                                                int64_t unit, int64_t lo, int lane) {
  if (prefix[lo + 1] > unit) return lo;  // still the same segment (lo < num_segments)
  int64_t hi = num_segments;             // prefix[hi] > unit
  while (hi - lo > 1) {
    const int64_t step = (hi - lo + kWarpSize - 1) / kWarpSize;
    const int64_t probe = lo + (lane + 1) * step;
    const bool at_or_below = probe < hi && prefix[probe] <= unit;
    lo += __popc(__ballot_sync(kFullMask, at_or_below)) * step;
    hi = lo + step < hi ? lo + step : hi;
  }
  return lo;
}

// ---------------------------------------------------------------------------
// The tables of the quantized states, per used slot, in dynamic shared memory
// (device_quant.cuh explains why each read is conflict-free), for maps of E
// entries (256, or 16 for 4-bit maps):
//   [0, NS * E * 32)         the code, lane-private (word c * 32 + lane), for decoding
//   then NS * E              the thresholds, for the values the encoder table leaves to the search
//                            (4-bit: for every value, 4 steps)
//   then NS * kEncoderWords  the encoder table (8-bit only: 4-bit maps have none)
// 8-bit: 34,320 bytes per slot: Adam 68.6 KB, AdEMAMix 103 KB per CUDA block.
// Two blocks per SM (BS <= 2048) take at most 2 x (103 + 1) KB of the 228 KB
// of an SM of sm_90 (1 KB per block is reserved by the runtime), one
// 512-thread block (BS = 4096) half of that, so the tables never limit the 16
// warps per SM that the registers allow; the kernels ask for the maximum
// shared-memory carveout (they stream every tensor once with evict-first
// hints, so L1 has little to cache). Registers and shuffles instead of the
// lane-private code would cost 8 SHFL + 8 selects per decoded element
// (MIO-bound at 3 slots). 4-bit: 2,112 bytes per slot.
__host__ __device__ constexpr int map_entries(int code_bits) { return code_bits == 4 ? kMapSize4 : kCodeSize; }

__host__ __device__ constexpr int slot_table_words(int code_bits) {
  return map_entries(code_bits) * (kWarpSize + 1) + (code_bits == 4 ? 0 : kEncoderWords);
}

constexpr size_t quant_table_bytes(int num_states, int code_bits) {
  return static_cast<size_t>(num_states) * static_cast<size_t>(slot_table_words(code_bits)) * sizeof(float);
}

// ---------------------------------------------------------------------------
// The kernel's phases, one device function each. They are force-inlined and
// take the kernel's own arrays by reference, so the arrays stay in registers
// exactly as in one body (ptxas reports the same registers, no spills).

// Stages the tables of the NS used slots (layout above, for maps of 256 or,
// with four_bit, 16 entries); every thread then finds its slot s at
// lane_code[s] (its lane's column), thresholds[s], encoder[s] (8-bit only)
// and, for count_thresholds_below, address[s].
template <int NS, int kThreads>
__device__ __forceinline__ void stage_tables(const KernelArgs& args, bool four_bit, float* s_tables, int lane,
                                             const float* (&lane_code)[NS], const float* (&thresholds)[NS],
                                             const float* (&encoder)[NS], unsigned (&address)[NS]) {
  const int entries = four_bit ? kMapSize4 : kCodeSize;
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    float* const s_private = s_tables + s * entries * kWarpSize;
    float* const s_thresholds = s_tables + NS * entries * kWarpSize + s * entries;
    float* const s_encoder = s_tables + NS * entries * (kWarpSize + 1) + s * kEncoderWords;
    stage_private_code(args.code[s], s_private, kThreads, entries);
    for (int i = threadIdx.x; i < entries; i += kThreads) s_thresholds[i] = args.thresholds[s][i];
    if (!four_bit) stage_encoder(args.encoder[s], s_encoder, static_cast<int>(threadIdx.x), kThreads);
    lane_code[s] = s_private + lane;
    thresholds[s] = s_thresholds;
    encoder[s] = s_encoder;
    address[s] = shared_address(s_thresholds);
  }
  __syncthreads();
}

// Every load of the lane's rows, before any arithmetic: where each row starts
// (first[j]) and how many of its elements lie inside the segment (count[j]),
// then parameters (with their error codes when error_bits is 8 or 16),
// gradients, and the codes with their old scales (quantized states: 4-bit
// codes spread to one per byte, so that they decode like 8-bit ones) or the
// float32 states.
template <int NS, typename L, int kSlots>
__device__ __forceinline__ void load_rows(const FusedSegment& record, FloatType param_type, FloatType grad_type,
                                          int error_bits, bool four_bit, int64_t base, int lane, bool vector_ok,
                                          int (&count)[kRows], int64_t (&first)[kRows], Row (&p_raw)[kRows],
                                          Row (&g_raw)[kRows],
                                          uint32_t (&codes)[kSlots][kRows], float (&old_scale)[kSlots][kRows],
                                          float (&old_value)[kSlots][kRows][kVec]) {
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    first[j] = base + j * kRow + lane * kVec;
    const int64_t left = record.numel - first[j];
    count[j] = left <= 0 ? 0 : (left >= kVec ? kVec : static_cast<int>(left));
    p_raw[j] = load_row(param_type, record.param, first[j], count[j], vector_ok);
    if (error_bits != 0) load_error_row(error_bits, record.error, first[j], count[j], vector_ok, p_raw[j]);
    g_raw[j] = load_row(grad_type, record.grad, first[j], count[j], vector_ok);
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if constexpr (L::kQuant) {
        const uint8_t* const state = static_cast<const uint8_t*>(record.state[s]);
        codes[s][j] = four_bit ? load_nibbles(state, first[j], count[j], vector_ok)
                               : load_codes(state, first[j], count[j], vector_ok);
        old_scale[s][j] = count[j] > 0 ? __ldcs(record.absmax[s] + (first[j] >> L::kLog2Block)) : 0.0f;
      } else {
        load_state_row(static_cast<const float*>(record.state[s]), first[j], count[j], vector_ok, old_value[s][j]);
      }
    }
  }
}

// The update of the lane's rows, element by element: the rule's direction,
// then (norm mode) its square into norm_sum, or the new parameter (stored
// here), the new states in `kept` (stored here for float32 states) and the
// count of non-finite gradients. The rows come as loaded (p_raw, g_raw, and
// codes with their old scales, or float32 states in old_value, where 8-bit
// states are decoded here), count[j] of their elements inside the segment
// from element first[j] on.
template <Rule R, int NS, bool kQuant, int kSlots>
__device__ __forceinline__ void update_row(int j, const KernelArgs& args, FloatType param_type, FloatType grad_type,
                                            int error_bits, const FusedSegment& record, void* param, bool vector_ok,
                                            const float* const (&lane_code)[kSlots], float grad_scale, float lr,
                                            float decay, bool norm_mode, const Row (&p_raw)[kRows],
                                            const Row (&g_raw)[kRows], const uint32_t (&codes)[kSlots][kRows],
                                            const float (&old_scale)[kSlots][kRows], const int (&count)[kRows],
                                            const int64_t (&first)[kRows], float (&old_value)[kSlots][kRows][kVec],
                                            float (&kept)[kSlots][kRows][kVec], double& norm_sum,
                                            unsigned& nonfinite) {
  float p_row[kVec];
  float g_row[kVec];
  float p_new[kVec];
  if (error_bits != 0) {
    compensated_row(error_bits, p_raw[j], p_row);
  } else {
    row_values(param_type, p_raw[j], p_row);
  }
  row_values(grad_type, g_raw[j], g_row);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const bool valid = k < count[j];
    const float p = p_row[k];
    // Without grad_scale the factor is 1: exact for every finite g, and
    // a non-finite g stays non-finite.
    const float g = __fmul_rn(g_row[k], grad_scale);
    const bool finite = valid && is_finite(g);
    float state[kMaxStates] = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if constexpr (kQuant) {
        old_value[s][j][k] =
            __fmul_rn(private_code(lane_code[s], (codes[s][j] >> (8 * k)) & 0xffu), old_scale[s][j]);
      }
      state[s] = old_value[s][j][k];
    }
    const float d = update_element(R, args.wd_mode, args.hyper, finite ? g : 0.0f, p, state, NS, lr);
    if (norm_mode) {
      if (finite) norm_sum = __dadd_rn(norm_sum, __dmul_rn(static_cast<double>(d), static_cast<double>(d)));
    } else {
      p_new[k] = finite ? apply_direction(p, decay, write_rate(R, lr), d) : p;
#pragma unroll
      for (int s = 0; s < NS; ++s) kept[s][j][k] = valid ? (finite ? state[s] : old_value[s][j][k]) : 0.0f;
      nonfinite += valid && !finite ? 1u : 0u;
    }
  }
  if (!norm_mode) {
    if (error_bits != 0) {
      store_compensated_row(error_bits, param, record.error, first[j], count[j], vector_ok, p_new);
    } else {
      store_param_row(param_type, param, first[j], count[j], vector_ok, p_new, args.stochastic, args.key,
                      static_cast<uint64_t>(record.first_index + first[j]));
    }
    if constexpr (!kQuant) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        store_state_row(static_cast<float*>(record.state[s]), first[j], count[j], vector_ok, kept[s][j]);
      }
    }
  }
}

// Block maxima of |kept|: within the lane, then across the block's lanes of the warp.
template <int NS, typename L, int kSlots>
__device__ __forceinline__ void warp_block_maxima(const float (&kept)[kSlots][kRows][kVec],
                                                  unsigned (&block_max)[kSlots][kRows]) {
#pragma unroll
  for (int s = 0; s < NS; ++s) {
#pragma unroll
    for (int j0 = 0; j0 < kRows; j0 += L::kRowsPerBlock) {
      unsigned m = 0;
#pragma unroll
      for (int r = 0; r < L::kRowsPerBlock; ++r) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) m = max(m, abs_bits(kept[s][j0 + r][k]));
      }
      m = group_max<L::kLanesPerBlock>(m);
#pragma unroll
      for (int r = 0; r < L::kRowsPerBlock; ++r) block_max[s][j0 + r] = m;
    }
  }
}

// The block maxima across the warps of a group, in shared memory. Double
// buffered by step parity: a warp cannot run two steps ahead of another of
// its group, so one barrier per step suffices. Every warp of the group calls
// it (the barrier), active or not.
template <int NS, typename L, int kSlots>
__device__ __forceinline__ void group_block_maxima(unsigned (&s_partial)[2][L::kWarps][kSlots], int parity, int warp,
                                                   int part, int group, int lane, bool active,
                                                   unsigned (&block_max)[kSlots][kRows]) {
  if (active && lane == 0) {
#pragma unroll
    for (int s = 0; s < NS; ++s) s_partial[parity][warp][s] = block_max[s][0];
  }
  group_barrier<L::kGroupWarps, L::kWarps>(group);
  if (active) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      unsigned m = 0;
#pragma unroll
      for (int w = 0; w < L::kGroupWarps; ++w) m = max(m, s_partial[parity][warp - part + w][s]);
#pragma unroll
      for (int j = 0; j < kRows; ++j) block_max[s][j] = m;
    }
  }
}

// The packed 4-bit codes of a row's kVec scaled values: the 4-step search
// over the slot's 16 thresholds (all reads within 16 consecutive words: no
// bank conflicts), elements past the segment's end (k >= count) given 0.
__device__ __forceinline__ uint32_t nearest_nibbles(const float* s_thresholds, unsigned thresholds_address,
                                                    const float (&x)[kVec], int count) {
  uint32_t packed = 0;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const uint32_t c = static_cast<uint32_t>(count_thresholds_below<kMapSize4>(s_thresholds, thresholds_address, x[k]));
    packed |= (k < count ? c : 0u) << (4 * k);
  }
  return packed;
}

// Encodes the kept values with the blocks' new scales and writes codes and
// scales (the segment record is read again: an L1 hit, and no registers held
// meanwhile).
template <int NS, typename L, int kSlots>
__device__ __forceinline__ void encode_rows(const FusedSegment& record, bool four_bit,
                                            const float* const (&s_encoder)[kSlots],
                                            const float* const (&s_thresholds)[kSlots],
                                            const unsigned (&table_address)[kSlots], int part, int lane,
                                            bool vector_ok, const int (&count)[kRows], const int64_t (&first)[kRows],
                                            const float (&kept)[kSlots][kRows][kVec],
                                            const unsigned (&block_max)[kSlots][kRows]) {
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    uint8_t* const codes = static_cast<uint8_t*>(record.state[s]);
    float* const scales = record.absmax[s];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const float scale = __uint_as_float(canonical_bits(block_max[s][j]));
      const float inv = reciprocal(scale);
      float x[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) x[k] = scaled_value(kept[s][j][k], inv);
      if (four_bit) {
        store_nibbles(codes, first[j], count[j], vector_ok, nearest_nibbles(s_thresholds[s], table_address[s], x, count[j]));
      } else {
        uint32_t c[kVec];
        nearest_codes<kVec>(s_encoder[s], s_thresholds[s], table_address[s], x, c);
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < kVec; ++k) word |= c[k] << (8 * k);
        store_code_word(codes, first[j], count[j], vector_ok, word);
      }
      // The lane holding a block's first element writes its scale.
      if (part == 0 && lane % L::kLanesPerBlock == 0 && j % L::kRowsPerBlock == 0 && count[j] > 0) {
        __stcs(scales + (first[j] >> L::kLog2Block), scale);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The kernel: rule R with NS state slots, blocksize BS (0: float32 states),
// kErrors: whether it has the path of compensated parameters (args.error_bits
// 8 or 16; without it error_bits is ignored and the code is the one before
// error buffers existed).
//
// __launch_bounds__(threads, blocks/SM) caps the registers at 128 per thread
// (65536 / (256 x 2) or 65536 / (512 x 1)): 16 warps per SM for every
// blocksize, 4096 included.

template <Rule R, int NS, int BS, bool kErrors>
__global__ void __launch_bounds__(Layout<BS>::kThreads, Layout<BS>::kBlocksPerSM)
    fused_step_kernel(const __grid_constant__ KernelArgs args) {
  using L = Layout<BS>;
  constexpr bool kQuant = L::kQuant;
  constexpr int kSlots = NS > 0 ? NS : 1;  // array extents
  constexpr bool kCrossWarp = kQuant && L::kGroupWarps > 1;
  static_assert(!kQuant || NS > 0, "8-bit states need a slot");

  extern __shared__ __align__(16) float s_tables[];
  __shared__ unsigned s_partial[kCrossWarp ? 2 : 1][kCrossWarp ? L::kWarps : 1][kSlots];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const float* lane_code[kSlots];     // this lane's column of the lane-private code
  const float* s_thresholds[kSlots];
  const float* s_encoder[kSlots];
  unsigned table_address[kSlots];     // shared address of s_thresholds, for count_thresholds_below
  const bool four_bit = kQuant && args.code_bits == 4;  // uniform over the grid
  if constexpr (kQuant) stage_tables<NS, L::kThreads>(args, four_bit, s_tables, lane, lane_code, s_thresholds,
                                                       s_encoder, table_address);

  const int part = warp % L::kGroupWarps;  // this warp's share of the unit
  const int group = warp / L::kGroupWarps;
  const bool norm_mode = args.norm_out != nullptr;
  const FloatType param_type = args.param_type;
  const FloatType grad_type = args.grad_type;
  const int error_bits = kErrors ? args.error_bits : 0;  // uniform over the grid

  int64_t seg = 0;        // segment of the previous unit: the search starts there
  int64_t norm_seg = -1;  // segment whose partial norm `norm_sum` holds
  double norm_sum = 0.0;
  unsigned nonfinite = 0;
  int parity = 0;

  const int64_t num_steps = (args.total_units + L::kGroups - 1) / L::kGroups;
  // The loop bound is uniform over the CUDA block: the barriers inside are safe.
  for (int64_t step = blockIdx.x; step < num_steps; step += gridDim.x) {
    const int64_t unit = step * L::kGroups + group;
    const bool active = unit < args.total_units;  // uniform over the group

    // Carried from the update to the encoding (8-bit states).
    float kept[kSlots][kRows][kVec];
    unsigned block_max[kSlots][kRows];
    int count[kRows];
    int64_t first[kRows];
    bool vector_ok = false;

    if (active) {
      seg = find_segment(args.prefix, args.num_segments, unit, seg, lane);
      const FusedSegment& record = args.segments[seg];
      const int64_t base = (unit - args.prefix[seg]) * L::kUnit + part * kWarpElems;
      void* const param = record.param;
      vector_ok = record.vector_ok != 0;

      Row p_raw[kRows];
      Row g_raw[kRows];
      uint32_t codes[kSlots][kRows];
      float old_scale[kSlots][kRows];
      float old_value[kSlots][kRows][kVec];
      load_rows<NS, L>(record, param_type, grad_type, error_bits, four_bit, base, lane, vector_ok, count, first,
                       p_raw, g_raw, codes, old_scale, old_value);
      const float grad_scale = args.grad_scale != nullptr ? args.grad_scale[seg] : 1.0f;
      const float lr = args.update_scale != nullptr ? __fmul_rn(args.hyper.v[kLr], args.update_scale[seg])
                                                    : args.hyper.v[kLr];
      const float decay = args.hyper.v[kDecay];

      if (norm_mode && seg != norm_seg) {
        if (norm_seg >= 0) flush_norm(norm_sum, args.norm_out + norm_seg);
        norm_seg = seg;
      }

#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        update_row<R, NS, kQuant>(j, args, param_type, grad_type, error_bits, record, param, vector_ok, lane_code,
                                  grad_scale, lr, decay, norm_mode, p_raw, g_raw, codes, old_scale, count, first,
                                  old_value, kept, norm_sum, nonfinite);
      }

      if (kQuant && !norm_mode) warp_block_maxima<NS, L>(kept, block_max);
    }

    // The loop bound is uniform over the CUDA block and norm_mode over the
    // grid, so every warp of a group reaches every barrier.
    if constexpr (kCrossWarp) {
      if (!norm_mode) {
        group_block_maxima<NS, L>(s_partial, parity, warp, part, group, lane, active, block_max);
        parity ^= 1;
      }
    }

    if constexpr (kQuant) {
      if (active && !norm_mode) {
        encode_rows<NS, L>(args.segments[seg], four_bit, s_encoder, s_thresholds, table_address, part, lane,
                           vector_ok, count, first, kept, block_max);
      }
    }
  }

  if (norm_mode) {
    if (norm_seg >= 0) flush_norm(norm_sum, args.norm_out + norm_seg);  // norm_seg is uniform over the warp
  } else if (args.nonfinite_count != nullptr) {
    const unsigned total = warp_sum(nonfinite);
    if (lane == 0 && total != 0) atomicAdd(args.nonfinite_count, static_cast<unsigned long long>(total));
  }
}

// ---------------------------------------------------------------------------
// Launch.

// Resident CUDA blocks per multiprocessor of `kernel` with `table_bytes` of
// dynamic shared memory (at least 1).
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t table_bytes) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, table_bytes) != cudaSuccess || blocks < 1) {
    (void)cudaGetLastError();  // clear a failed query; the launch reports real errors
    blocks = 1;
  }
  return blocks;
}

template <Rule R, int NS, int BS, bool kErrors>
cudaError_t launch_kernel(const KernelArgs& args, cudaStream_t stream) {
  using L = Layout<BS>;
  const auto kernel = fused_step_kernel<R, NS, BS, kErrors>;
  // One kernel serves 8- and 4-bit maps; only its tables' size differs.
  const size_t table_bytes = L::kQuant ? quant_table_bytes(NS, args.code_bits) : 0;
  if (L::kQuant) {
    // More than the default 48 KB of dynamic shared memory, and the largest
    // carveout: function attributes of the current device's module, so they
    // are set on every launch (cheap host calls, no synchronisation). The
    // limit is always the 8-bit tables' size, the larger, so that a 4-bit
    // launch never lowers it under an 8-bit launch of another host thread.
    cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(quant_table_bytes(NS, 8)));
    if (error != cudaSuccess) return error;
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (error != cudaSuccess) return error;
  }
  // Resident CUDA blocks per multiprocessor: a property of the compiled kernel
  // (registers, shared memory), asked once per kernel, code width and process.
  static const int per_multiprocessor_8 = resident_blocks(kernel, L::kThreads, L::kQuant ? quant_table_bytes(NS, 8) : 0);
  static const int per_multiprocessor_4 = resident_blocks(kernel, L::kThreads, L::kQuant ? quant_table_bytes(NS, 4) : 0);
  const int per_multiprocessor = L::kQuant && args.code_bits == 4 ? per_multiprocessor_4 : per_multiprocessor_8;
  // A persistent grid: one wave of resident CUDA blocks (fewer for small
  // calls), every block walking the units grid-stride.
  const int64_t steps = (args.total_units + L::kGroups - 1) / L::kGroups;
  const int64_t resident = int64_t{multiprocessor_count()} * per_multiprocessor;
  const int64_t grid = steps < resident ? steps : resident;
  kernel<<<static_cast<unsigned>(grid < 1 ? 1 : grid), L::kThreads, table_bytes, stream>>>(args);
  return cudaGetLastError();
}

// Float32 states: a kernel with and one without the error path, because the
// error path's registers cost the float32-state kernels of one-slot and
// stateless rules a CUDA block per SM on sm_80 (3 -> 2, 4 -> 3). The quantized
// kernels' residency is set by their tables and the 128-register cap, which
// the error path leaves as they were (sm_80, sm_90), so one kernel serves
// both: 76 instantiations instead of 132.
template <Rule R, int NS>
cudaError_t launch_blocksize(bool quantized, int64_t blocksize, const KernelArgs& args, cudaStream_t stream) {
  if (!quantized) {
    return args.error_bits != 0 ? launch_kernel<R, NS, 0, true>(args, stream)
                                : launch_kernel<R, NS, 0, false>(args, stream);
  }
  if constexpr (NS == 0) {
    return cudaErrorInvalidValue;
  } else {
    return with_state_blocksize(blocksize, cudaErrorInvalidValue,
                                [&](auto bs) { return launch_kernel<R, NS, decltype(bs)::value, true>(args, stream); });
  }
}

cudaError_t launch_rule(const FusedStepConfig& config, const KernelArgs& args, cudaStream_t stream) {
  return visit_rule_states(config.rule, config.num_states, cudaErrorInvalidValue, [&](auto rule, auto states) {
    return launch_blocksize<decltype(rule)::value, decltype(states)::value>(config.quantized, config.blocksize, args,
                                                                             stream);
  });
}

int element_bytes(FloatType type) { return type == FloatType::kFloat32 ? 4 : 2; }

}  // namespace

bool fused_step_supported(Rule rule, int num_states, bool quantized, int64_t blocksize, int code_bits) {
  if (!rule_takes_states(rule, num_states)) return false;
  return !quantized || (num_states > 0 && is_state_blocksize(blocksize) && (code_bits == 8 || code_bits == 4));
}

size_t fused_step_table_bytes(int64_t num_segments) {
  return prefix_bytes(num_segments) + static_cast<size_t>(num_segments) * sizeof(FusedSegment);
}

int64_t fill_fused_step_table(const FusedStepConfig& config, const FusedSegment* segments, int64_t num_segments,
                              void* table) {
  auto* prefix = static_cast<int64_t*>(table);
  auto* records = reinterpret_cast<FusedSegment*>(static_cast<unsigned char*>(table) + prefix_bytes(num_segments));
  const int64_t unit = unit_elements(config.quantized, config.blocksize);
  const uintptr_t param_bytes = static_cast<uintptr_t>(kVec * element_bytes(config.param_type));
  const uintptr_t grad_bytes = static_cast<uintptr_t>(kVec * element_bytes(config.grad_type));
  // A row's codes: kVec bytes (8-bit) or kVec / 2 (4-bit, packed), or kVec float32 values.
  const uintptr_t state_bytes = static_cast<uintptr_t>(config.quantized ? kVec * config.code_bits / 8 : kVec * 4);
  // A row's error codes: kVec int8 or int16 values.
  const uintptr_t error_bytes = static_cast<uintptr_t>(kVec * config.error_bits / 8);
  prefix[0] = 0;
  for (int64_t k = 0; k < num_segments; ++k) {
    FusedSegment record = segments[k];
    bool ok = aligned(record.param, param_bytes) && aligned(record.grad, grad_bytes);
    for (int s = 0; s < config.num_states; ++s) ok = ok && aligned(record.state[s], state_bytes);
    if (config.error_bits != 0) {
      ok = ok && aligned(record.error, error_bytes);
    } else {
      record.error = nullptr;
    }
    record.vector_ok = ok ? 1 : 0;
    records[k] = record;
    prefix[k + 1] = prefix[k] + (record.numel + unit - 1) / unit;
  }
  return prefix[num_segments];
}

cudaError_t launch_fused_step(const FusedStepConfig& config, const void* device_table, int64_t num_segments,
                              int64_t total_units, cudaStream_t stream) {
  if (num_segments < 0 || total_units < 0) return cudaErrorInvalidValue;
  if (num_segments == 0) return cudaSuccess;
  if (!fused_step_supported(config.rule, config.num_states, config.quantized, config.blocksize, config.code_bits)) {
    return cudaErrorInvalidValue;
  }
  // Error codes: int8 or int16, of bfloat16 parameters rounded to nearest (the binding checks it first).
  if (config.error_bits != 0 && ((config.error_bits != 8 && config.error_bits != 16) ||
                                 config.param_type != FloatType::kBFloat16 || config.stochastic)) {
    return cudaErrorInvalidValue;
  }
  if (config.norm_out != nullptr) {
    const cudaError_t cleared =
        cudaMemsetAsync(config.norm_out, 0, static_cast<size_t>(num_segments) * sizeof(double), stream);
    if (cleared != cudaSuccess) return cleared;
  }
  if (total_units == 0) return cudaSuccess;

  KernelArgs args;
  args.hyper = config.hyper;
  args.prefix = static_cast<const int64_t*>(device_table);
  args.segments = reinterpret_cast<const FusedSegment*>(static_cast<const unsigned char*>(device_table) +
                                                        prefix_bytes(num_segments));
  args.num_segments = num_segments;
  args.total_units = total_units;
  for (int s = 0; s < kMaxStates; ++s) {
    const bool used = config.quantized && s < config.num_states;
    args.code[s] = used ? config.code[s] : nullptr;
    args.thresholds[s] = used ? config.thresholds[s] : nullptr;
    args.encoder[s] = used && config.code_bits == 8 ? config.encoder[s] : nullptr;
  }
  args.code_bits = config.quantized ? config.code_bits : 0;
  args.grad_scale = config.grad_scale;
  args.update_scale = config.update_scale;
  args.norm_out = config.norm_out;
  args.nonfinite_count = reinterpret_cast<unsigned long long*>(config.nonfinite_count);
  args.wd_mode = config.wd_mode;
  args.param_type = config.param_type;
  args.grad_type = config.grad_type;
  args.stochastic = config.stochastic && config.param_type == FloatType::kBFloat16;
  args.key = args.stochastic ? seed_key(config.seed) : 0u;
  args.error_bits = config.error_bits;
  return launch_rule(config, args, stream);
}

}  // namespace cuda
}  // namespace dist8bit
