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

// The IEEE bits of a float32 and back (no conversion, no rounding). A 4-byte
// memcpy between locals is the portable bit cast of C++17; host compilers and
// nvcc (where memcpy is a device function too) reduce it to a register move.
template <typename To, typename From>
D8_HD To bit_copy(From value) {
  static_assert(sizeof(To) == sizeof(From), "a bit copy keeps the size");
  To out;
  std::memcpy(&out, &value, sizeof(out));
  return out;
}

D8_HD uint32_t float_to_bits(float value) { return bit_copy<uint32_t>(value); }
D8_HD float bits_to_float(uint32_t bits) { return bit_copy<float>(bits); }

}  // namespace dist8bit
