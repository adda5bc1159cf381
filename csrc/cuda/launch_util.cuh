// Host-side launch helpers shared by quantize_kernels.cu and
// fused_step_kernels.cu (CUDA runtime only, no torch): the SM count that caps
// persistent grids, the alignment test of vector paths, and the one switch
// from a run-time 8-bit blocksize to the kernel instantiated for it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "common/op_contract.h"

namespace dist8bit {
namespace cuda {

// Multiprocessors of the current device (an H100's 132 when the query fails:
// the grid is then only sized for it, never wrong).
inline int multiprocessor_count() {
  constexpr int kFallback = 132;
  int device = 0;
  int count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return kFallback;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    return kFallback;
  }
  return count;
}

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// fn(std::integral_constant<int, BS>{}) for the blocksize BS = `blocksize`, a
// power of two in [kMinStateBlocksize, kMaxStateBlocksize]
// (common/op_contract.h); `otherwise` for any other value.
template <int BS = static_cast<int>(kMinStateBlocksize), typename Fn>
cudaError_t with_state_blocksize(int64_t blocksize, cudaError_t otherwise, Fn&& fn) {
  if constexpr (BS > kMaxStateBlocksize) {
    return otherwise;
  } else {
    if (blocksize == BS) return fn(std::integral_constant<int, BS>{});
    return with_state_blocksize<BS * 2>(blocksize, otherwise, static_cast<Fn&&>(fn));
  }
}

}  // namespace cuda
}  // namespace dist8bit
