// Qualifiers and bit casts shared by the CPU (host compiler) and CUDA (nvcc)
// kernels. Everything in csrc/common is plain C++17 without torch, so the same
// header compiles for host code and for device code.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define D8_HD __host__ __device__ __forceinline__
#else
#define D8_HD inline
#endif

namespace dist8bit {

// The IEEE bits of a float32 and back (no conversion, no rounding).
D8_HD uint32_t float_to_bits(float value) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

D8_HD float bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

}  // namespace dist8bit
