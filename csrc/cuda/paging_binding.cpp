// Torch binding of the managed-memory primitives (paging.cuh) as the
// dist8bit_paging operators that dist8bit/paging/native.py calls.
//
// alloc() wraps cudaMallocManaged memory as a uint8 CUDA tensor whose deleter
// releases it in stream order (paging.cu): the memory lives as long as the
// tensor's storage (views included), and is freed once the work queued before
// the storage died has run. Streams arrive as the integer handle
// torch.cuda.Stream.cuda_stream; the deleter finds the current stream through
// c10's device-generic guard interface. Both keep this file free of torch's
// CUDA headers and libraries. None of these operators takes a tensor, so they
// are registered as catch-all kernels in their own namespace rather than in
// the per-device dist8bit kernel contract (dist8bit/backends/ops.py).
//
// Errors. A CUDA runtime failure of an allocation or a placement is returned
// as a status string naming the call ("" when all went well), never thrown:
// placement is advice, and the Python side turns a failure into one warning
// and ordinary device memory instead of an exception out of optimizer.step()
// (dist8bit/paging/native.py). paging.cu has already cleared the runtime's
// error state by then. Bad arguments (a bug in the caller) still throw, and so
// do the queries (locations, concurrent_managed_access), which no step needs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "paging.cuh"

namespace dist8bit {
namespace cuda {
namespace {

namespace pg = ::dist8bit::cuda::paging;

void check(cudaError_t error, const char* call) {
  TORCH_CHECK(error == cudaSuccess, "dist8bit paging: ", call, " failed: ", cudaGetErrorString(error));
}

// "" on success, else "<call> failed: <reason>".
std::string status(cudaError_t error, const char* call) {
  if (error == cudaSuccess) return {};
  return std::string(call) + " failed: " + cudaGetErrorString(error);
}

void check_location(int64_t location, const char* name) {
  TORCH_CHECK(location >= pg::kHost, "dist8bit paging: ", name, " must be a device ordinal or -1 (host), got ",
              location);
}

void check_device(int64_t device) {
  TORCH_CHECK(device >= 0, "dist8bit paging: device must be a CUDA device ordinal, got ", device);
}

void check_ranges(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes) {
  TORCH_CHECK(ptrs.size() == sizes.size(), "dist8bit paging: got ", ptrs.size(), " pointers but ", sizes.size(),
              " sizes");
  for (const int64_t size : sizes) TORCH_CHECK(size > 0, "dist8bit paging: range sizes must be positive, got ", size);
}

const void* pointer(int64_t address) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(address)); }

cudaStream_t stream_of(int64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(handle)); }

// torch's current stream of `device` (where the memory dies), or `fallback`
// if it cannot be had; never throws, since deleters call it.
cudaStream_t current_stream(int device, cudaStream_t fallback) noexcept {
  try {
    const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Device where(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    return static_cast<cudaStream_t>(impl->getStreamNativeHandle(impl->getStream(where)));
  } catch (...) {
    return fallback;
  }
}

// nbytes of managed memory on `device`, first placed at `location` (the
// device, or -1: host memory, preferred there and mapped for the device) by a
// prefetch on `stream`, so pages are populated there before any kernel runs.
// Returns (tensor, "") on success; (None, status) when cudaMallocManaged
// failed; (tensor, status) when only the first placement failed: the memory
// is managed and usable, its pages land wherever they are first touched.
std::tuple<std::optional<at::Tensor>, std::string> alloc(int64_t nbytes, int64_t device, int64_t location,
                                                          int64_t stream) {
  TORCH_CHECK(nbytes > 0, "dist8bit paging: alloc needs a positive size, got ", nbytes);
  check_device(device);
  check_location(location, "location");
  const int ordinal = static_cast<int>(device);
  void* ptr = nullptr;
  const cudaError_t allocated = pg::managed_alloc(&ptr, static_cast<size_t>(nbytes), ordinal, stream_of(stream));
  if (allocated != cudaSuccess) return {std::nullopt, status(allocated, "cudaMallocManaged")};
  const cudaStream_t born_on = stream_of(stream);
  auto release = [ordinal, nbytes, born_on](void* data) {
    // A deleter must not throw; an error here (the runtime already unloaded at
    // interpreter exit) leaves nothing to release.
    (void)pg::managed_release(data, static_cast<size_t>(nbytes), ordinal, current_stream(ordinal, born_on));
  };
  const at::Device where(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  // The tensor owns the memory from here on: a failure below releases it.
  at::Tensor tensor = at::from_blob(ptr, {nbytes}, release, at::TensorOptions().dtype(at::kByte).device(where), where);
  if (location == pg::kHost) {
    const cudaError_t advised = pg::prefer_host(ptr, static_cast<size_t>(nbytes), ordinal);
    if (advised != cudaSuccess) return {tensor, status(advised, "cudaMemAdvise (prefer host)")};
  }
  const cudaError_t placed = pg::prefetch(ptr, static_cast<size_t>(nbytes), static_cast<int>(location), born_on);
  return {tensor, status(placed, "cudaMemPrefetchAsync")};
}

// Prefetches every range on `stream` (torch's current stream: after the work
// queued there, before what comes next); the first failure's status, or "".
// A failed range does not stop the others.
std::string prefetch(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes, int64_t location, int64_t stream) {
  check_ranges(ptrs, sizes);
  check_location(location, "location");
  std::string first;
  for (size_t i = 0; i < ptrs.size(); ++i) {
    const cudaError_t error = pg::prefetch(pointer(ptrs[i]), sizes[i], static_cast<int>(location), stream_of(stream));
    if (first.empty()) first = status(error, "cudaMemPrefetchAsync");
  }
  return first;
}

// to_host: evicted placement (prefer host, mapped for `device`); else resident
// placement (prefer `device`). The first failure's status, or "".
std::string advise(c10::ArrayRef<int64_t> ptrs, c10::ArrayRef<int64_t> sizes, int64_t device, bool to_host) {
  check_ranges(ptrs, sizes);
  check_device(device);
  std::string first;
  for (size_t i = 0; i < ptrs.size(); ++i) {
    const cudaError_t error = to_host ? pg::prefer_host(pointer(ptrs[i]), sizes[i], static_cast<int>(device))
                                      : pg::prefer_device(pointer(ptrs[i]), sizes[i], static_cast<int>(device));
    if (first.empty()) first = status(error, to_host ? "cudaMemAdvise (prefer host)" : "cudaMemAdvise (prefer device)");
  }
  return first;
}

// Frees the released managed memory of the process whose last use has run
// (waiting on the host for exactly that work when `wait`); skipped while
// `stream` of `device` is capturing. A status, or "".
std::string reclaim(int64_t device, int64_t stream, bool wait) {
  check_device(device);
  return status(pg::reclaim(static_cast<int>(device), stream_of(stream), wait), "reclaiming released managed memory");
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

// [allocations, bytes] of managed memory not yet freed in this process
// (released memory still waiting for its last kernels included).
std::vector<int64_t> live() {
  long long count = 0;
  long long nbytes = 0;
  pg::live(&count, &nbytes);
  return {static_cast<int64_t>(count), static_cast<int64_t>(nbytes)};
}

}  // namespace
}  // namespace cuda
}  // namespace dist8bit

TORCH_LIBRARY(dist8bit_paging, m) {
  m.def("alloc(int nbytes, int device, int location, int stream) -> (Tensor?, str)", &dist8bit::cuda::alloc);
  m.def("prefetch(int[] ptrs, int[] sizes, int location, int stream) -> str", &dist8bit::cuda::prefetch);
  m.def("advise(int[] ptrs, int[] sizes, int device, bool to_host) -> str", &dist8bit::cuda::advise);
  m.def("reclaim(int device, int stream, bool wait) -> str", &dist8bit::cuda::reclaim);
  m.def("locations(int[] ptrs, int[] sizes) -> int[]", &dist8bit::cuda::locations);
  m.def("concurrent_managed_access(int device) -> bool", &dist8bit::cuda::concurrent_managed_access);
  m.def("live() -> int[]", &dist8bit::cuda::live);
}
