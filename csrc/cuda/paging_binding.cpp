// Torch binding of the managed-memory primitives (paging.cuh) as the
// dist8bit_paging operators that dist8bit/paging/native.py calls.
//
// alloc() wraps cudaMallocManaged memory as a uint8 CUDA tensor whose deleter
// frees it: the memory lives exactly as long as the tensor's storage (views
// included), so dropping an optimizer or one of its states releases it.
// Streams arrive as the integer handle torch.cuda.Stream.cuda_stream, which
// keeps this file free of torch's CUDA headers. None of these operators takes
// a tensor, so they are registered as catch-all kernels in their own
// namespace rather than in the per-device dist8bit kernel contract
// (dist8bit/backends/ops.py).

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "paging.cuh"

namespace dist8bit {
namespace cuda {
namespace {

namespace pg = ::dist8bit::cuda::paging;

// Managed allocations alive in this process (what the "memory is released"
// test reads back through live()).
std::atomic<int64_t> live_count{0};
std::atomic<int64_t> live_bytes{0};

void check(cudaError_t error, const char* call) {
  TORCH_CHECK(error == cudaSuccess, "dist8bit paging: ", call, " failed: ", cudaGetErrorString(error));
}

void check_location(int64_t location, const char* name) {
  TORCH_CHECK(location >= pg::kHost, "dist8bit paging: ", name, " must be a device ordinal or -1 (host), got ",
              location);
}

void check_ranges(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes) {
  TORCH_CHECK(ptrs.size() == sizes.size(), "dist8bit paging: got ", ptrs.size(), " pointers but ", sizes.size(),
              " sizes");
  for (const int64_t size : sizes) TORCH_CHECK(size > 0, "dist8bit paging: range sizes must be positive, got ", size);
}

const void* pointer(int64_t address) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(address)); }

cudaStream_t stream_of(int64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(handle)); }

// nbytes of managed memory on `device`, first placed at `location` (the
// device, or -1: host memory, preferred there and mapped for the device) by a
// prefetch on `stream`, so pages are populated there before any kernel runs.
at::Tensor alloc(int64_t nbytes, int64_t device, int64_t location, int64_t stream) {
  TORCH_CHECK(nbytes > 0, "dist8bit paging: alloc needs a positive size, got ", nbytes);
  TORCH_CHECK(device >= 0, "dist8bit paging: device must be a CUDA device ordinal, got ", device);
  check_location(location, "location");
  void* ptr = nullptr;
  check(pg::managed_alloc(&ptr, static_cast<size_t>(nbytes)), "cudaMallocManaged");
  live_count.fetch_add(1);
  live_bytes.fetch_add(nbytes);
  const int ordinal = static_cast<int>(device);
  auto release = [ordinal, nbytes](void* data) {
    // A deleter must not throw; an error here (the runtime already unloaded at
    // interpreter exit) leaves nothing to release.
    (void)pg::managed_free(data, ordinal);
    live_count.fetch_sub(1);
    live_bytes.fetch_sub(nbytes);
  };
  const at::Device where(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  // The tensor owns the memory from here on: a failure below frees it.
  at::Tensor tensor = at::from_blob(ptr, {nbytes}, release, at::TensorOptions().dtype(at::kByte).device(where), where);
  if (location == pg::kHost) check(pg::prefer_host(ptr, nbytes, ordinal), "cudaMemAdvise (prefer host)");
  check(pg::prefetch(ptr, nbytes, static_cast<int>(location), stream_of(stream)), "cudaMemPrefetchAsync");
  return tensor;
}

void prefetch(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes, int64_t location, int64_t stream) {
  check_ranges(ptrs, sizes);
  check_location(location, "location");
  for (size_t i = 0; i < ptrs.size(); ++i) {
    check(pg::prefetch(pointer(ptrs[i]), sizes[i], static_cast<int>(location), stream_of(stream)),
          "cudaMemPrefetchAsync");
  }
}

// to_host: evicted placement (prefer host, mapped for `device`); else resident
// placement (prefer `device`).
void advise(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes, int64_t device, bool to_host) {
  check_ranges(ptrs, sizes);
  TORCH_CHECK(device >= 0, "dist8bit paging: device must be a CUDA device ordinal, got ", device);
  for (size_t i = 0; i < ptrs.size(); ++i) {
    const cudaError_t error = to_host ? pg::prefer_host(pointer(ptrs[i]), sizes[i], static_cast<int>(device))
                                      : pg::prefer_device(pointer(ptrs[i]), sizes[i], static_cast<int>(device));
    check(error, to_host ? "cudaMemAdvise (prefer host)" : "cudaMemAdvise (prefer device)");
  }
}

// [preferred, last_prefetch] per range, flattened.
std::vector<int64_t> locations(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes) {
  check_ranges(ptrs, sizes);
  std::vector<int64_t> out;
  out.reserve(2 * ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    int preferred = 0;
    int last_prefetch = 0;
    check(pg::range_locations(pointer(ptrs[i]), sizes[i], &preferred, &last_prefetch), "cudaMemRangeGetAttribute");
    out.push_back(preferred);
    out.push_back(last_prefetch);
  }
  return out;
}

bool concurrent_managed_access(int64_t device) {
  bool supported = false;
  check(pg::concurrent_managed_access(static_cast<int>(device), &supported),
        "cudaDeviceGetAttribute(cudaDevAttrConcurrentManagedAccess)");
  return supported;
}

// [allocations, bytes] of managed memory alive in this process.
std::vector<int64_t> live() { return {live_count.load(), live_bytes.load()}; }

}  // namespace
}  // namespace cuda
}  // namespace dist8bit

TORCH_LIBRARY(dist8bit_paging, m) {
  m.def("alloc(int nbytes, int device, int location, int stream) -> Tensor", &dist8bit::cuda::alloc);
  m.def("prefetch(int[] ptrs, int[] sizes, int location, int stream) -> ()", &dist8bit::cuda::prefetch);
  m.def("advise(int[] ptrs, int[] sizes, int device, bool to_host) -> ()", &dist8bit::cuda::advise);
  m.def("locations(int[] ptrs, int[] sizes) -> int[]", &dist8bit::cuda::locations);
  m.def("concurrent_managed_access(int device) -> bool", &dist8bit::cuda::concurrent_managed_access);
  m.def("live() -> int[]", &dist8bit::cuda::live);
}
