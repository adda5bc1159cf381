// Counter-based random numbers for stochastic rounding (host and device).
//
// Integer for integer the hash of dist8bit/quant/stochastic.py, so that every
// backend draws the same u for element i whatever its thread layout:
//
//   mix32(x)   x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
//   key        mix32(lo32(seed) ^ mix32(hi32(seed)))          (seed in [0, 2^63))
//   r(i)       mix32(lo32(i) ^ mix32(hi32(i) ^ key))
//   u(i)       (r(i) >> 8) * 2^-24                             (float32 in [0, 1), exact)
//
// All arithmetic is on uint32_t, so the products wrap modulo 2^32 exactly as
// the Python `& 0xFFFFFFFF` does.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace dist8bit {

constexpr uint32_t kMixMulA = 0x21F0AAADu;
constexpr uint32_t kMixMulB = 0x735A2D97u;

// Bijective 32-bit finaliser (lowbias32 style).
D8_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixMulA;
  x ^= x >> 15;
  x *= kMixMulB;
  x ^= x >> 15;
  return x;
}

// Fold a 64-bit seed into the 32-bit key of the per-element hash.
D8_HD uint32_t seed_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32)));
}

// r(i): the 32 random bits of element `index` under `key`.
D8_HD uint32_t random_bits_for_index(uint32_t key, uint64_t index) {
  const uint32_t high = mix32(static_cast<uint32_t>(index >> 32) ^ key);
  return mix32(static_cast<uint32_t>(index) ^ high);
}

// u(i) in [0, 1): the top 24 random bits times 2^-24 (both steps exact in float32).
D8_HD float uniform_for_index(uint32_t key, uint64_t index) {
  return static_cast<float>(random_bits_for_index(key, index) >> 8) * 5.9604644775390625e-08f;
}

}  // namespace dist8bit
