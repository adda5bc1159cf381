// Launcher of the CUDA fused multi-tensor optimizer step (dist8bit::fused_step).
//
// Torch-free on purpose, like quantize_kernels.cuh: fused_step_binding.cpp
// (host compiler, against torch) and fused_step_kernels.cu (nvcc, CUDA runtime
// only) meet here through raw pointers, int64_t sizes and a cudaStream_t.
//
// The contract is the fused_step schema of dist8bit/backends/ops.py; the
// element math is csrc/common/update_rules.h, the rounding rule of the
// quantized (8- or 4-bit) states dist8bit/quant/codebook.py, the packing of
// 4-bit codes dist8bit/quant/packing.py, the error codes of compensated
// bfloat16 parameters common/weight_error.h, and the results are bit-identical
// to dist8bit/backends/reference_optim.py run on the CPU.
//
// How a call goes:
//   1. the binding describes every segment (FusedSegment) and the call
//      (FusedStepConfig);
//   2. fill_fused_step_table() writes the segment table into host memory of
//      fused_step_table_bytes() bytes (the binding uses pinned memory);
//   3. the binding copies the table to the device on the stream, without
//      synchronising, and launch_fused_step() enqueues one kernel for all
//      segments (plus a memset of norm_out when it is given).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/op_contract.h"
#include "common/update_rules.h"
#include "quantize_kernels.cuh"

namespace dist8bit {
namespace cuda {

// One segment: a contiguous run of one parameter, its gradient and its states.
// Every pointer is a device pointer on the current device.
struct FusedSegment {
  void* param;                     // numel elements of FusedStepConfig::param_type, updated in place
  const void* grad;                // numel elements of FusedStepConfig::grad_type
  void* state[kMaxStates];         // used slots, in order: uint8 codes (8-bit: numel bytes, 4-bit:
                                   // ceil(numel / 2) bytes, packed) or float32 values (32-bit)
  float* absmax[kMaxStates];       // quantized: ceil(numel / blocksize) scales per used slot; else unused
  int64_t numel;                   // >= 0
  int64_t first_index;             // segment_offsets[k]: element i draws stochastic rounding bits at first_index + i
  int64_t vector_ok;               // set by fill_fused_step_table: every pointer allows vector access
  void* error;                     // compensated bfloat16 params: numel int8 or int16 error codes
                                   // (FusedStepConfig::error_bits), updated in place; else nullptr
};
static_assert(sizeof(FusedSegment) == 96, "the segment record is shared by host and device code");

// Everything about one call that is not per segment.
struct FusedStepConfig {
  Rule rule;
  WeightDecayMode wd_mode;
  StepConstants hyper;                     // float32 values, indexed by Hyper
  FloatType param_type;                    // one dtype for every parameter
  FloatType grad_type;                     // one dtype for every gradient
  int num_states;                          // used slots (0 to 3), as update_element counts them
  bool quantized;                          // uint8 codes + absmax, else float32 states
  int code_bits;                           // quantized: 8 (256-entry maps) or 4 (16-entry maps, codes packed
                                           // two per byte, element 2j in the low nibble of byte j)
  int64_t blocksize;                       // quantized: a power of two in [64, 4096]; ignored for 32-bit states
  const float* code[kMaxStates];           // quantized: 256 (4-bit: 16) sorted code values per used slot
  const float* thresholds[kMaxStates];     // quantized: as many midpoints per used slot, the last one +inf
  const float* encoder[kMaxStates];        // 8-bit: encoder table per used slot (131 float32 values,
                                           // dist8bit/quant/encoder_table.py), or nullptr: binary search
                                           // only; ignored for 4-bit maps
  const float* grad_scale;                 // float32 per segment, or nullptr
  const float* update_scale;               // float32 per segment, or nullptr
  double* norm_out;                        // float64 per segment, or nullptr (then only sum(d^2) is written)
  int64_t* nonfinite_count;                // one int64, or nullptr
  bool stochastic;                         // bfloat16 parameters written with stochastic rounding
  uint64_t seed;                           // in [0, 2**63), when stochastic
  int error_bits;                          // compensated bfloat16 parameters (common/weight_error.h): 8
                                           // (int8 error codes) or 16 (int16); 0: none. Needs bfloat16
                                           // parameters and no stochastic rounding
};

// Whether the kernels cover this rule, slot count and (quantized) blocksize
// and code width: Adam 2 states, SGD 0 or 1, RMSprop 1 or 2, Adagrad 1,
// Lion 1, AdEMAMix 3; 8- or 4-bit codes.
bool fused_step_supported(Rule rule, int num_states, bool quantized, int64_t blocksize, int code_bits = 8);

// Bytes of the segment table for `num_segments` segments.
size_t fused_step_table_bytes(int64_t num_segments);

// Writes the table for `segments` into `table` (host memory, 16-byte aligned,
// fused_step_table_bytes(num_segments) bytes) and returns the number of work
// units it describes (0 when every segment is empty).
int64_t fill_fused_step_table(const FusedStepConfig& config, const FusedSegment* segments, int64_t num_segments,
                              void* table);

// Enqueues the step on `stream`: device_table is the table above, copied to
// the device. Zeroes norm_out (all num_segments entries) first when given.
// Returns cudaSuccess or the first CUDA error met; no synchronisation.
cudaError_t launch_fused_step(const FusedStepConfig& config, const void* device_table, int64_t num_segments,
                              int64_t total_units, cudaStream_t stream);

}  // namespace cuda
}  // namespace dist8bit
