// CUDA kernels of block-wise 8-bit quantization (see quantize_kernels.cuh).
//
// Bit-identical to dist8bit/backends/reference.py by construction:
//   absmax  the largest |x| of the block, NaN when the block holds a NaN. It
//           is taken as an unsigned max over the bits of |x| (sign cleared):
//           for non-negative floats the unsigned order of the bits is the
//           float order, and every NaN lies above +inf, so NaN propagates
//           and the maximum is exact. A NaN absmax is stored as 0x7FC00000.
//   s       x * (1 / absmax) in float32: the reciprocal is __fdiv_rn (IEEE
//           round-to-nearest whatever -prec-div says), the product and the
//           NaN -> 0 rule are scaled_value() of common/code_search.h.
//   code    the number of thresholds below s, as nearest_code_index(thresholds,
//           encoder, s) of common/code_search.h finds it: the encoder
//           table's candidate (encoder_table_candidate, on the table staged
//           in shared memory) when it clears the guard, else the 8-step
//           binary search, comparison for comparison, over the thresholds in
//           shared memory (in PTX, see count_thresholds_below); without an
//           encoder table every value searches. With stochastic rounding then
//           stochastic_code_index() with u = uniform_for_index(seed_key(seed),
//           i) of common/stochastic_rounding.h, i the element's flat index.
//   out     code[c] * absmax in float32 (__fmul_rn, never contracted), then
//           rounded to nearest even (__float2half_rn, __float2bfloat16_rn).
// Denormals are kept (no -ftz, no fast-math), like torch's CUDA kernels.
//
// Work layout.
//   quantize, blocksize a power of two in [64, 4096], 16-byte aligned input:
//     one warp per quantization block (two or four warps for blocks of more
//     than 128 bytes per lane, meeting through shared memory); small blocks
//     are grouped so that every lane loads at least 64 bytes before any
//     arithmetic (enough loads in flight to saturate HBM). The input stays
//     in registers between the reduction and the rounding, so x is read
//     from memory exactly once. Loads are 4- to 16-byte vectors, codes are
//     stored 2 to 8 per instruction, absmax is one warp reduction
//     (__reduce_max_sync on sm_80+). The blocks of the last, incomplete
//     step take the scalar warp path below.
//   quantize, any other blocksize up to kLargeBlock (or misaligned pointers):
//     one warp per block, scalar loads, two passes over the block (the second
//     one mostly hits L1/L2).
//   quantize, blocksize > kLargeBlock (functional.quantize: one block for the
//     whole tensor): two kernels. The first reduces |x| over tiles of
//     kLargeTile elements (a tile meets at most two blocks) into absmax with
//     atomicMax on the bits; the second quantizes element-parallel.
//   dequantize: element-parallel, 16 codes per thread per step (one 16-byte
//     load, 32 or 64 bytes stored), scalar tail.
// All loops are grid-stride with 64-bit indices; the tables live in shared
// memory, laid out so that the common case reads them without bank
// conflicts (device_quant.cuh): the encoder table (4 x 32 words, one
// wavefront per read) for encoding, lane-private copies of the code (word
// c * 32 + lane, 32 KB) for decoding. Stochastic rounding reads the code
// values around the nearest one from a plain 256-word copy (conflicts
// possible, as before: it is not the common case).
//
// Occupancy: every kernel declares __launch_bounds__(kThreads, blocks per SM)
// and the grids are capped at the resident blocks (occupancy query, once per
// kernel), so a persistent grid is one wave:
//   quantize fast path       3 blocks/SM (24 warps, <= 80 registers), each
//                            lane with 64..128 bytes of input in flight
//   generic, large paths     4 blocks/SM (<= 64 registers)
//   dequantize               6 blocks/SM (48 warps; 6 x 33 KB of shared memory)
// The element types, vector accesses and rounding helpers are in
// device_quant.cuh, shared with the fused optimizer step (fused_step_kernels.cu).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/code_search.h"
#include "common/host_device.h"
#include "common/stochastic_rounding.h"
#include "device_quant.cuh"
#include "launch_util.cuh"
#include "quantize_kernels.cuh"

namespace dist8bit {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per CUDA block, every kernel
constexpr int kWarps = kThreads / kWarpSize;
static_assert(kThreads == kCodeSize, "staging loads one table entry per thread");

// Blocks above this size (and every size on the large path) use the two-kernel path.
constexpr int64_t kLargeBlock = 8192;
// Elements one CUDA block covers per step on the large path: 32 per thread.
constexpr int kLargeItems = 32;
constexpr int64_t kLargeTile = int64_t{kThreads} * kLargeItems;
static_assert(kLargeTile <= kLargeBlock, "a large-path tile must meet at most two blocks");
// Codes per thread per step when dequantizing.
constexpr int kDequantItems = 16;

// Intended resident CUDA blocks per SM (__launch_bounds__ minimum blocks).
constexpr int kFastBlocksPerSM = 3;
constexpr int kScalarBlocksPerSM = 4;
constexpr int kDequantBlocksPerSM = 6;

// The code of one element: x scaled by inv, NaN to 0, nearest code, and with
// SR the stochastic choice between the neighbours of s. `index` is the
// element's flat index in the tensor (the stochastic stream position).
// The tables of the encode path in shared memory: the encoder table, the
// thresholds (for the values that take the binary search) and, for
// stochastic rounding, the code.
template <bool SR>
struct EncodeTables {
  float encoder[kEncoderWords];
  float thresholds[kCodeSize];
  float code[SR ? kCodeSize : 1];
};

template <bool SR>
__device__ __forceinline__ uint32_t quantize_value(float x, float inv, const EncodeTables<SR>& t, uint32_t key,
                                                   int64_t index) {
  const float s = scaled_value(x, inv);
  int c = nearest_code(t.encoder, t.thresholds, shared_address(t.thresholds), s);
  if constexpr (SR) c = stochastic_code_index(t.code, c, s, uniform_for_index(key, static_cast<uint64_t>(index)));
  return static_cast<uint32_t>(c);
}

// Copy the tables to shared memory.
template <bool SR>
__device__ __forceinline__ void stage_tables(const float* code, const float* thresholds, const float* encoder,
                                             EncodeTables<SR>& t) {
  t.thresholds[threadIdx.x] = thresholds[threadIdx.x];
  if constexpr (SR) t.code[threadIdx.x] = code[threadIdx.x];
  stage_encoder(encoder, t.encoder, static_cast<int>(threadIdx.x), kThreads);
  __syncthreads();
}

// One block [start, start + len) by one warp with scalar accesses: absmax in
// a first pass, codes in a second. Any len >= 1.
template <typename E, bool SR>
__device__ __forceinline__ void quantize_block_scalar(const typename E::Storage* __restrict__ x, int64_t start,
                                                      int64_t len, int lane, const EncodeTables<SR>& t, uint32_t key,
                                                      uint8_t* __restrict__ codes, float* __restrict__ absmax_slot) {
  unsigned m = 0;
#pragma unroll 4
  for (int64_t j = lane; j < len; j += kWarpSize) m = max(m, abs_bits(E::to_float(x[start + j])));
  m = warp_max(m);
  const float absmax = __uint_as_float(canonical_bits(m));
  if (lane == 0) *absmax_slot = absmax;
  const float inv = reciprocal(absmax);
#pragma unroll 4
  for (int64_t j = lane; j < len; j += kWarpSize) {
    const int64_t i = start + j;
    codes[i] = static_cast<uint8_t>(quantize_value<SR>(E::to_float(x[i]), inv, t, key, i));
  }
}

// ---------------------------------------------------------------------------
// Quantize, fast path: BS a power of two in [64, 4096], x 16-byte and codes
// 8-byte aligned.
//
// A lane holds at most kMaxBytesPerLane of input in registers. Small blocks
// are grouped, kBlocksPerWarp to a warp, so that every lane has
// kMinBytesPerLane in flight before the first reduction; large blocks are
// split over kWarpsPerBlock warps of the CUDA block, whose partial maxima
// meet in shared memory. Each step of a CUDA block covers kStepBlocks
// consecutive blocks; warp w handles blocks (w / G) * B + b, b < B, and part
// w % G of each (G = kWarpsPerBlock, B = kBlocksPerWarp, one of them is 1).

constexpr int kMinBytesPerLane = 64;
constexpr int kMaxBytesPerLane = 128;

template <typename E, int BS>
struct FastLayout {
  static constexpr int kBlockBytesPerLane = BS * E::kBytes / kWarpSize;
  static constexpr int kWarpsPerBlock =
      kBlockBytesPerLane > kMaxBytesPerLane ? kBlockBytesPerLane / kMaxBytesPerLane : 1;
  static constexpr int kBlocksPerWarp =
      kBlockBytesPerLane < kMinBytesPerLane ? kMinBytesPerLane / kBlockBytesPerLane : 1;
  static constexpr int kPart = BS / kWarpsPerBlock;                     // elements of a block per warp
  static constexpr int kPerLane = kPart / kWarpSize;                    // ... per lane
  static constexpr int kMaxVec = 16 / E::kBytes;                        // elements in a 16-byte load
  static constexpr int kVec = kPerLane < kMaxVec ? kPerLane : kMaxVec;  // elements per load
  static constexpr int kIters = kPerLane / kVec;                        // loads per lane per block
  static constexpr int kWords = kVec * E::kBytes / 4;                   // 32-bit words per load
  static constexpr int kStepBlocks = kWarps / kWarpsPerBlock * kBlocksPerWarp;

  static_assert(BS >= 64 && BS <= 4096 && (BS & (BS - 1)) == 0, "fast path: power-of-two blocksize in [64, 4096]");
  static_assert(kWarpsPerBlock == 1 || kBlocksPerWarp == 1, "either blocks per warp or warps per block");
  static_assert(kWarps % kWarpsPerBlock == 0 && kPart % kWarpSize == 0, "whole warps, whole lanes");
  static_assert(kVec >= 2 && kVec <= 8 && kPerLane % kVec == 0, "vector width");
  static_assert(kWords >= 1 && kWords <= 4 && kWords * 4 == kVec * E::kBytes, "vector of whole words");
  static_assert(kBlocksPerWarp * kIters * kWords * 4 <= kMaxBytesPerLane, "register budget");
};

template <typename E, int BS, bool SR>
__global__ void __launch_bounds__(kThreads, kFastBlocksPerSM)
    quantize_fast_kernel(const typename E::Storage* __restrict__ x, int64_t n, const float* __restrict__ code,
                         const float* __restrict__ thresholds, const float* __restrict__ encoder, uint32_t key,
                         uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  using L = FastLayout<E, BS>;
  constexpr int G = L::kWarpsPerBlock;
  constexpr int B = L::kBlocksPerWarp;
  __shared__ EncodeTables<SR> tables;
  __shared__ unsigned s_partial[G > 1 ? 2 : 1][G > 1 ? kWarps : 1];
  stage_tables<SR>(code, thresholds, encoder, tables);
  const unsigned thresholds_address = shared_address(tables.thresholds);

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int part = warp % G;
  const int64_t num_blocks = (n + BS - 1) / BS;
  const int64_t num_steps = (num_blocks + L::kStepBlocks - 1) / L::kStepBlocks;
  int parity = 0;
  // The loop bound is uniform over the CUDA block: the barrier inside (G > 1) is safe.
  for (int64_t step = blockIdx.x; step < num_steps; step += gridDim.x) {
    const int64_t first_block = step * L::kStepBlocks + (warp / G) * B;
    const bool full = (first_block + B) * BS <= n;
    const int64_t base = first_block * BS + part * L::kPart;  // this warp's first element

    // Every load of the step first, then the arithmetic.
    Words<L::kWords> v[B][L::kIters];
    unsigned m[B] = {};
    if (full) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
#pragma unroll
        for (int it = 0; it < L::kIters; ++it) {
          v[b][it] = load_words<L::kWords>(x + base + b * BS + (it * kWarpSize + lane) * L::kVec);
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        m[b] = 0;
#pragma unroll
        for (int it = 0; it < L::kIters; ++it) {
#pragma unroll
          for (int k = 0; k < L::kVec; ++k) m[b] = max(m[b], abs_bits(element<E>(v[b][it], k)));
        }
        m[b] = warp_max(m[b]);
      }
    }
    if constexpr (G > 1) {
      // Partial maxima of the block's warps meet in shared memory. Double
      // buffered by step parity: a warp cannot run two steps ahead of
      // another, so one barrier per step suffices.
      if (full && lane == 0) s_partial[parity][warp] = m[0];
      __syncthreads();
      if (full) {
        const int group_first = warp - part;
        m[0] = 0;
#pragma unroll
        for (int p = 0; p < G; ++p) m[0] = max(m[0], s_partial[parity][group_first + p]);
      }
      parity ^= 1;
    }

    if (full) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const float block_absmax = __uint_as_float(canonical_bits(m[b]));
        if (lane == 0 && part == 0) absmax[first_block + b] = block_absmax;
        const float inv = reciprocal(block_absmax);
#pragma unroll
        for (int it = 0; it < L::kIters; ++it) {
          const int64_t first = base + b * BS + (it * kWarpSize + lane) * L::kVec;
          float s[L::kVec];
#pragma unroll
          for (int k = 0; k < L::kVec; ++k) s[k] = scaled_value(element<E>(v[b][it], k), inv);
          uint32_t c[L::kVec];
          nearest_codes<L::kVec>(tables.encoder, tables.thresholds, thresholds_address, s, c);
          if constexpr (SR) {
#pragma unroll
            for (int k = 0; k < L::kVec; ++k) {
              const float u = uniform_for_index(key, static_cast<uint64_t>(first + k));
              c[k] = static_cast<uint32_t>(stochastic_code_index(tables.code, static_cast<int>(c[k]), s[k], u));
            }
          }
          store_codes<L::kVec>(codes + first, c);
        }
      }
    } else if (part == 0) {
      // The end of the tensor: whole and short blocks, one warp each, scalar accesses.
      for (int b = 0; b < B; ++b) {
        const int64_t block = first_block + b;
        if (block >= num_blocks) break;
        const int64_t start = block * BS;
        const int64_t len = n - start < BS ? n - start : BS;
        quantize_block_scalar<E, SR>(x, start, len, lane, tables, key, codes, absmax + block);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Quantize, generic path: any blocksize in [1, kLargeBlock], any alignment.

template <typename E, bool SR>
__global__ void __launch_bounds__(kThreads, kScalarBlocksPerSM)
    quantize_generic_kernel(const typename E::Storage* __restrict__ x, int64_t n, int64_t blocksize,
                            const float* __restrict__ code, const float* __restrict__ thresholds,
                            const float* __restrict__ encoder, uint32_t key, uint8_t* __restrict__ codes,
                            float* __restrict__ absmax) {
  __shared__ EncodeTables<SR> tables;
  stage_tables<SR>(code, thresholds, encoder, tables);

  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  const int64_t warp_stride = int64_t{gridDim.x} * kWarps;
  for (int64_t block = int64_t{blockIdx.x} * kWarps + threadIdx.x / kWarpSize; block < num_blocks;
       block += warp_stride) {
    const int64_t start = block * blocksize;
    const int64_t len = n - start < blocksize ? n - start : blocksize;
    quantize_block_scalar<E, SR>(x, start, len, lane, tables, key, codes, absmax + block);
  }
}

// ---------------------------------------------------------------------------
// Quantize, large path: blocksize > kLargeBlock >= kLargeTile, so a tile of
// kLargeTile elements meets block `first` = base / blocksize and at most the
// next one.

// absmax_bits must hold zeros on entry; receives the bits of every block's absmax.
template <typename E>
__global__ void __launch_bounds__(kThreads, kScalarBlocksPerSM) absmax_large_kernel(const typename E::Storage* __restrict__ x, int64_t n, int64_t blocksize,
                                    unsigned* __restrict__ absmax_bits) {
  __shared__ unsigned s_partial[2][kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t num_tiles = (n + kLargeTile - 1) / kLargeTile;
  // The loop bound is uniform over the CUDA block: __syncthreads inside is safe.
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t base = tile * kLargeTile;
    const int64_t first = base / blocksize;
    const int64_t boundary = (first + 1) * blocksize;  // first element of block first + 1
    unsigned m0 = 0;
    unsigned m1 = 0;
#pragma unroll 8
    for (int k = 0; k < kLargeItems; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      if (i < n) {
        const unsigned bits = abs_bits(E::to_float(x[i]));
        if (i < boundary) {
          m0 = max(m0, bits);
        } else {
          m1 = max(m1, bits);
        }
      }
    }
    m0 = warp_max(m0);
    m1 = warp_max(m1);
    if (lane == 0) {
      s_partial[0][warp] = m0;
      s_partial[1][warp] = m1;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned a = 0;
      unsigned b = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        a = max(a, s_partial[0][w]);
        b = max(b, s_partial[1][w]);
      }
      atomicMax(absmax_bits + first, canonical_bits(a));
      const int64_t tile_end = n - base < kLargeTile ? n : base + kLargeTile;
      if (boundary < tile_end) atomicMax(absmax_bits + first + 1, canonical_bits(b));
    }
    __syncthreads();  // s_partial is reused by the next tile
  }
}

template <typename E, bool SR>
__global__ void __launch_bounds__(kThreads, kScalarBlocksPerSM)
    quantize_large_kernel(const typename E::Storage* __restrict__ x, int64_t n, int64_t blocksize,
                          const float* __restrict__ code, const float* __restrict__ thresholds,
                          const float* __restrict__ encoder, uint32_t key, const float* __restrict__ absmax,
                          uint8_t* __restrict__ codes) {
  __shared__ EncodeTables<SR> tables;
  stage_tables<SR>(code, thresholds, encoder, tables);

  const int64_t num_tiles = (n + kLargeTile - 1) / kLargeTile;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t base = tile * kLargeTile;
    const int64_t first = base / blocksize;
    const int64_t boundary = (first + 1) * blocksize;
    const float inv0 = reciprocal(absmax[first]);
    const float inv1 = boundary < n ? reciprocal(absmax[first + 1]) : 0.0f;
#pragma unroll 8
    for (int k = 0; k < kLargeItems; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      if (i < n) {
        const float inv = i < boundary ? inv0 : inv1;
        codes[i] = static_cast<uint8_t>(quantize_value<SR>(E::to_float(x[i]), inv, tables, key, i));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Dequantize.
//
// kUniformScale: blocksize is a multiple of kDequantItems, so the aligned run
// of 16 codes a thread handles lies in one block. shift >= 0: blocksize is
// 2**shift (block index by shift instead of division).

__device__ __forceinline__ int64_t block_of(int64_t i, int64_t blocksize, int shift) {
  return shift >= 0 ? (i >> shift) : (i / blocksize);
}

template <typename E>
__device__ __forceinline__ void store_outputs(typename E::Storage* p, const float (&v)[kDequantItems]) {
  constexpr int kPerWord = 4 / E::kBytes;
  constexpr int kWords = kDequantItems / kPerWord;
  uint32_t w[kWords];
#pragma unroll
  for (int j = 0; j < kWords; ++j) {
    w[j] = 0;
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) w[j] |= E::to_bits(v[j * kPerWord + k]) << (32 / kPerWord * k);
  }
  uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int j = 0; j < kWords / 4; ++j) dst[j] = make_uint4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
}

// The code values are read from lane-private copies (device_quant.cuh):
// every read of a warp is one wavefront, whatever the codes.
template <typename E, bool kVectorized, bool kUniformScale>
__global__ void __launch_bounds__(kThreads, kDequantBlocksPerSM)
    dequantize_kernel(const uint8_t* __restrict__ codes, int64_t n, const float* __restrict__ code,
                      const float* __restrict__ absmax, int64_t blocksize, int shift,
                      typename E::Storage* __restrict__ out) {
  __shared__ float s_private[kPrivateCodeWords];
  stage_private_code(code, s_private, kThreads);
  __syncthreads();
  const float* const lane_code = s_private + threadIdx.x % kWarpSize;

  const int64_t thread = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  int64_t scalar_begin = 0;
  if (kVectorized) {
    const int64_t num_chunks = n / kDequantItems;
    for (int64_t chunk = thread; chunk < num_chunks; chunk += stride) {
      const int64_t i0 = chunk * kDequantItems;
      const Words<4> raw = load_words<4>(codes + i0);
      int64_t block = block_of(i0, blocksize, shift);
      float scale = absmax[block];
      // Elements left in `block` from i0 on (only used when a run can cross blocks).
      int64_t left = (block + 1) * blocksize - i0;
      float v[kDequantItems];
#pragma unroll
      for (int k = 0; k < kDequantItems; ++k) {
        if (!kUniformScale) {
          if (left == 0) {
            ++block;
            scale = absmax[block];
            left = blocksize;
          }
          --left;
        }
        const uint32_t c = (raw.w[k / 4] >> (8 * (k % 4))) & 0xffu;
        v[k] = __fmul_rn(private_code(lane_code, c), scale);
      }
      store_outputs<E>(out + i0, v);
    }
    scalar_begin = num_chunks * kDequantItems;
  }
  for (int64_t i = scalar_begin + thread; i < n; i += stride) {
    out[i] = E::from_float(__fmul_rn(private_code(lane_code, codes[i]), absmax[block_of(i, blocksize, shift)]));
  }
}

// ---------------------------------------------------------------------------
// Launchers.

// Resident CUDA blocks per SM of a compiled kernel (registers, shared memory),
// or `intended` (its __launch_bounds__ minimum) when the query fails. Callers
// keep the answer in a static: it is a property of the kernel.
int resident_blocks_per_sm(const void* kernel, int intended) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1) {
    (void)cudaGetLastError();  // clear a failed query; the launch reports real errors
    return intended;
  }
  return blocks;
}

// Enough CUDA blocks to cover `units` work items of `per_block` each, at most
// one wave of resident blocks (`per_sm` per SM; the kernels loop grid-stride
// over the rest, so a second, partial wave would only idle SMs at the end).
unsigned grid_for(int64_t units, int64_t per_block, int per_sm) {
  const int64_t wanted = (units + per_block - 1) / per_block;
  const int64_t cap = int64_t{multiprocessor_count()} * per_sm;
  const int64_t blocks = wanted < cap ? wanted : cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// The resident blocks per SM of kernel `k`, asked once per call site and template instance.
#define D8_RESIDENT(k, intended)                                                                  \
  ([] {                                                                                           \
    static const int blocks = resident_blocks_per_sm(reinterpret_cast<const void*>(k), intended); \
    return blocks;                                                                                \
  }())

int log2_if_power_of_two(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int shift = 0;
  while ((int64_t{1} << shift) != v) ++shift;
  return shift;
}

template <typename E, int BS, bool SR>
void launch_fast(const typename E::Storage* x, int64_t n, const float* code, const float* thresholds,
                 const float* encoder, uint32_t key, uint8_t* codes, float* absmax, cudaStream_t stream) {
  const int64_t num_blocks = (n + BS - 1) / BS;
  const int per_sm = D8_RESIDENT((quantize_fast_kernel<E, BS, SR>), kFastBlocksPerSM);
  quantize_fast_kernel<E, BS, SR>
      <<<grid_for(num_blocks, FastLayout<E, BS>::kStepBlocks, per_sm), kThreads, 0, stream>>>(
          x, n, code, thresholds, encoder, key, codes, absmax);
}

template <typename E, bool SR>
cudaError_t quantize_typed(const typename E::Storage* x, int64_t n, const float* code, const float* thresholds,
                           const float* encoder, int64_t blocksize, uint32_t key, uint8_t* codes, float* absmax,
                           cudaStream_t stream) {
  // The fast path: a blocksize that is a power of two in [64, 4096] and vector-aligned pointers.
  if (is_state_blocksize(blocksize) && aligned(x, 16) && aligned(codes, 8)) {
    return with_state_blocksize(blocksize, cudaErrorInvalidValue, [&](auto bs) {
      launch_fast<E, decltype(bs)::value, SR>(x, n, code, thresholds, encoder, key, codes, absmax, stream);
      return cudaGetLastError();
    });
  }
  if (blocksize <= kLargeBlock) {
    const int64_t num_blocks = (n + blocksize - 1) / blocksize;
    const int per_sm = D8_RESIDENT((quantize_generic_kernel<E, SR>), kScalarBlocksPerSM);
    quantize_generic_kernel<E, SR><<<grid_for(num_blocks, kWarps, per_sm), kThreads, 0, stream>>>(
        x, n, blocksize, code, thresholds, encoder, key, codes, absmax);
    return cudaGetLastError();
  }
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  const int64_t num_tiles = (n + kLargeTile - 1) / kLargeTile;
  const cudaError_t cleared = cudaMemsetAsync(absmax, 0, static_cast<size_t>(num_blocks) * sizeof(float), stream);
  if (cleared != cudaSuccess) return cleared;
  const int absmax_per_sm = D8_RESIDENT((absmax_large_kernel<E>), kScalarBlocksPerSM);
  absmax_large_kernel<E><<<grid_for(num_tiles, 1, absmax_per_sm), kThreads, 0, stream>>>(
      x, n, blocksize, reinterpret_cast<unsigned*>(absmax));
  const cudaError_t first = cudaGetLastError();
  if (first != cudaSuccess) return first;
  const int quantize_per_sm = D8_RESIDENT((quantize_large_kernel<E, SR>), kScalarBlocksPerSM);
  quantize_large_kernel<E, SR><<<grid_for(num_tiles, 1, quantize_per_sm), kThreads, 0, stream>>>(
      x, n, blocksize, code, thresholds, encoder, key, absmax, codes);
  return cudaGetLastError();
}

template <typename E>
cudaError_t quantize_dispatch_rounding(const void* x, int64_t n, const float* code, const float* thresholds,
                                       const float* encoder, int64_t blocksize, bool stochastic, uint64_t seed,
                                       uint8_t* codes, float* absmax, cudaStream_t stream) {
  const auto* typed = static_cast<const typename E::Storage*>(x);
  if (stochastic) {
    const uint32_t key = seed_key(seed);
    return quantize_typed<E, true>(typed, n, code, thresholds, encoder, blocksize, key, codes, absmax, stream);
  }
  return quantize_typed<E, false>(typed, n, code, thresholds, encoder, blocksize, 0u, codes, absmax, stream);
}

template <typename E>
cudaError_t dequantize_typed(const uint8_t* codes, int64_t n, const float* code, const float* absmax, int64_t blocksize,
                             void* out, cudaStream_t stream) {
  auto* typed = static_cast<typename E::Storage*>(out);
  const int shift = log2_if_power_of_two(blocksize);
  const bool vectorized = aligned(codes, 16) && aligned(out, 16) && n >= kDequantItems;
  // A block stages 8192 words of lane-private code (32 per thread): grids
  // give each thread at least kDequantRuns runs of 16 codes to amortise that.
  constexpr int64_t kDequantRuns = 2;
  if (!vectorized) {
    const int per_sm = D8_RESIDENT((dequantize_kernel<E, false, false>), kDequantBlocksPerSM);
    dequantize_kernel<E, false, false><<<grid_for(n, kThreads * kDequantRuns * kDequantItems, per_sm), kThreads, 0,
                                         stream>>>(codes, n, code, absmax, blocksize, shift, typed);
  } else if (blocksize % kDequantItems == 0) {
    const int per_sm = D8_RESIDENT((dequantize_kernel<E, true, true>), kDequantBlocksPerSM);
    dequantize_kernel<E, true, true><<<grid_for(n / kDequantItems, kThreads * kDequantRuns, per_sm), kThreads, 0,
                                       stream>>>(codes, n, code, absmax, blocksize, shift, typed);
  } else {
    const int per_sm = D8_RESIDENT((dequantize_kernel<E, true, false>), kDequantBlocksPerSM);
    dequantize_kernel<E, true, false><<<grid_for(n / kDequantItems, kThreads * kDequantRuns, per_sm), kThreads, 0,
                                        stream>>>(codes, n, code, absmax, blocksize, shift, typed);
  }
  return cudaGetLastError();
}

#undef D8_RESIDENT

}  // namespace

cudaError_t launch_quantize_blockwise(FloatType x_type, const void* x, int64_t n, const float* code,
                                      const float* thresholds, const float* encoder, int64_t blocksize,
                                      bool stochastic, uint64_t seed, uint8_t* codes, float* absmax,
                                      cudaStream_t stream) {
  if (n < 0 || blocksize < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (x_type) {
    case FloatType::kFloat32:
      return quantize_dispatch_rounding<F32>(x, n, code, thresholds, encoder, blocksize, stochastic, seed, codes,
                                         absmax, stream);
    case FloatType::kFloat16:
      return quantize_dispatch_rounding<F16>(x, n, code, thresholds, encoder, blocksize, stochastic, seed, codes,
                                         absmax, stream);
    case FloatType::kBFloat16:
      return quantize_dispatch_rounding<BF16>(x, n, code, thresholds, encoder, blocksize, stochastic, seed, codes,
                                          absmax, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dequantize_blockwise(FloatType out_type, const uint8_t* codes, int64_t n, const float* code,
                                        const float* absmax, int64_t blocksize, void* out, cudaStream_t stream) {
  if (n < 0 || blocksize < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (out_type) {
    case FloatType::kFloat32:
      return dequantize_typed<F32>(codes, n, code, absmax, blocksize, out, stream);
    case FloatType::kFloat16:
      return dequantize_typed<F16>(codes, n, code, absmax, blocksize, out, stream);
    case FloatType::kBFloat16:
      return dequantize_typed<BF16>(codes, n, code, absmax, blocksize, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dist8bit
