// Argument checks shared by the CPU operators (quantize.cpp, fused_step.cpp).
// dist8bit.functional validates arguments first; these are the second line of
// defence the operator contract (dist8bit/backends/ops.py) asks for.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "common/code_search.h"

namespace dist8bit {
namespace cpu {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dist8bit CPU kernel: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "dist8bit CPU kernel: ", name, " must be contiguous");
}

inline void check_map(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dist8bit CPU kernel: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == kMapSize, "dist8bit CPU kernel: ", name, " must hold ", kMapSize, " values, got ", t.numel());
}

inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// A codebook as dist8bit.quant.codebook.Codebook hands it to the kernels. Any
// table of the right size is memory-safe: every index the encoder computes is
// masked into range, and a wrong table can only send values to the search.
inline void check_codebook(const at::Tensor& code, const at::Tensor& thresholds, const at::Tensor& encoder) {
  check_map(code, "code");
  check_map(thresholds, "thresholds");
  TORCH_CHECK(std::isinf(thresholds.const_data_ptr<float>()[kLastCode]) &&
                  thresholds.const_data_ptr<float>()[kLastCode] > 0.0f,
              "dist8bit CPU kernel: thresholds[255] must be +inf");
  check_cpu(encoder, "encoder");
  TORCH_CHECK(encoder.scalar_type() == at::kFloat, "dist8bit CPU kernel: encoder must be float32, got ",
              encoder.scalar_type());
  TORCH_CHECK(encoder.numel() == 0 || encoder.numel() == kEncoderTableSize, "dist8bit CPU kernel: encoder must hold 0 or ",
              kEncoderTableSize, " values (dist8bit.quant.encoder_table), got ", encoder.numel());
}

}  // namespace cpu
}  // namespace dist8bit
