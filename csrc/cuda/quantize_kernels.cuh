// Launchers of the CUDA block-wise quantization kernels.
//
// Torch-free on purpose: bindings.cpp (compiled by the host compiler against
// torch) and quantize_kernels.cu (compiled by nvcc against the CUDA runtime
// only) meet here, through raw pointers, int64_t sizes and a cudaStream_t.
//
// The contract is the operator schema of dist8bit/backends/ops.py; the
// rounding rule is dist8bit/quant/codebook.py and stochastic rounding is
// dist8bit/quant/stochastic.py. Results are bit-identical to the reference
// backend (dist8bit/backends/reference.py).
//
// Every pointer is a device pointer on the current device, every buffer is
// contiguous, and the launchers enqueue on `stream` without synchronising.
// They return cudaSuccess or the first CUDA error they met
// (cudaGetLastError() after the launches).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/op_contract.h"

namespace dist8bit {
namespace cuda {

// Element type of the float tensor on the non-uint8 side of a kernel
// (common/op_contract.h; F32, F16 and BF16 of device_quant.cuh in the kernels).
using dist8bit::FloatType;

// codes[i] = index of the nearest code value to x[i] / absmax[i / blocksize];
// absmax[b] = max |x| over block b (NaN when the block holds a NaN).
//
//   x           n elements of type `x_type`
//   code        256 float32 values, sorted (read only when stochastic)
//   thresholds  256 float32 midpoints, thresholds[255] = +inf
//   encoder     the codebook's encoder table (dist8bit/quant/encoder_table.py,
//               kEncoderTableSize = 131 float32 values), or nullptr: then
//               every value takes the binary search (same codes, slower)
//   blocksize   >= 1; powers of two in [64, 4096] take the fast path, any
//               other value (functional.quantize passes blocksize = n) a
//               generic one
//   stochastic  round up or down at random; `seed` in [0, 2**63) picks the
//               stream, element i uses the hash of (seed, i)
//   codes       n bytes
//   absmax      ceil(n / blocksize) float32 values
//
// n == 0 launches nothing.
cudaError_t launch_quantize_blockwise(FloatType x_type, const void* x, int64_t n, const float* code,
                                      const float* thresholds, const float* encoder, int64_t blocksize,
                                      bool stochastic, uint64_t seed, uint8_t* codes, float* absmax,
                                      cudaStream_t stream);

// out[i] = code[codes[i]] * absmax[i / blocksize], computed in float32 and
// rounded to `out_type` (round to nearest even).
//
//   codes      n bytes
//   code       256 float32 values
//   absmax     ceil(n / blocksize) float32 values
//   blocksize  >= 1
//   out        n elements of type `out_type`
//
// n == 0 launches nothing.
cudaError_t launch_dequantize_blockwise(FloatType out_type, const uint8_t* codes, int64_t n, const float* code,
                                        const float* absmax, int64_t blocksize, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace dist8bit
