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

// A codebook as dist8bit.quant.codebook.Codebook hands it to the kernels.
inline void check_codebook(const at::Tensor& code, const at::Tensor& thresholds, const at::Tensor& lut,
                           int64_t lut_mantissa_bits, int64_t lut_min_exponent, int64_t refine_steps) {
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
}

}  // namespace cpu
}  // namespace dist8bit
