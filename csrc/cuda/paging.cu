// Managed-memory primitives of dist8bit's paged optimizer states (see
// paging.cuh). Host code only: the CUDA runtime's unified-memory calls, with
// the location arguments spelled for the runtime version at hand (CUDA 13
// takes a cudaMemLocation; CUDA 12.2-12.9 has that form as the *_v2 calls;
// older runtimes take a device ordinal).

#include "paging.cuh"

namespace dist8bit {
namespace cuda {
namespace paging {
namespace {

static_assert(kHost == cudaCpuDeviceId, "kHost must be the runtime's host location");

#if CUDART_VERSION >= 12020
cudaMemLocation location_of(int location) {
  cudaMemLocation where{};
  where.type = location == kHost ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  where.id = location == kHost ? 0 : location;
  return where;
}
#endif

cudaError_t advise(const void* ptr, size_t nbytes, cudaMemoryAdvise advice, int location) {
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(ptr, nbytes, advice, location_of(location));
#elif CUDART_VERSION >= 12020
  return cudaMemAdvise_v2(ptr, nbytes, advice, location_of(location));
#else
  return cudaMemAdvise(ptr, nbytes, advice, location);
#endif
}

}  // namespace

cudaError_t managed_alloc(void** ptr, size_t nbytes) { return cudaMallocManaged(ptr, nbytes, cudaMemAttachGlobal); }

cudaError_t managed_free(void* ptr, int device) {
  int previous = 0;
  cudaError_t error = cudaGetDevice(&previous);
  if (error != cudaSuccess) return error;
  error = cudaSetDevice(device);
  if (error == cudaSuccess) error = cudaDeviceSynchronize();
  const cudaError_t freed = cudaFree(ptr);
  const cudaError_t restored = cudaSetDevice(previous);
  if (error != cudaSuccess) return error;
  return freed != cudaSuccess ? freed : restored;
}

cudaError_t prefetch(const void* ptr, size_t nbytes, int location, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(ptr, nbytes, location_of(location), 0, stream);
#elif CUDART_VERSION >= 12020
  return cudaMemPrefetchAsync_v2(ptr, nbytes, location_of(location), 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, nbytes, location, stream);
#endif
}

cudaError_t prefer_host(const void* ptr, size_t nbytes, int device) {
  cudaError_t error = advise(ptr, nbytes, cudaMemAdviseSetPreferredLocation, kHost);
  if (error == cudaSuccess) error = advise(ptr, nbytes, cudaMemAdviseSetAccessedBy, device);
  return error;
}

cudaError_t prefer_device(const void* ptr, size_t nbytes, int device) {
  cudaError_t error = advise(ptr, nbytes, cudaMemAdviseSetPreferredLocation, device);
  if (error == cudaSuccess) error = advise(ptr, nbytes, cudaMemAdviseUnsetAccessedBy, device);
  return error;
}

cudaError_t range_locations(const void* ptr, size_t nbytes, int* preferred, int* last_prefetch) {
  cudaError_t error =
      cudaMemRangeGetAttribute(preferred, sizeof(int), cudaMemRangeAttributePreferredLocation, ptr, nbytes);
  if (error == cudaSuccess) {
    error = cudaMemRangeGetAttribute(last_prefetch, sizeof(int), cudaMemRangeAttributeLastPrefetchLocation, ptr,
                                     nbytes);
  }
  return error;
}

cudaError_t concurrent_managed_access(int device, bool* supported) {
  int value = 0;
  const cudaError_t error = cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device);
  *supported = error == cudaSuccess && value != 0;
  return error;
}

}  // namespace paging
}  // namespace cuda
}  // namespace dist8bit
