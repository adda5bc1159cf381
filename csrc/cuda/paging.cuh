// Managed-memory primitives behind dist8bit's paged optimizer states.
//
// Torch-free on purpose, like the kernel launchers: paging_binding.cpp (host
// compiler, against torch) and paging.cu (nvcc, CUDA runtime only) meet here
// through raw pointers, byte counts, device ordinals and a cudaStream_t, so CI
// compiles this half without a GPU or torch's CUDA headers.
//
// Policy (what to prefetch or evict, and when) lives in Python
// (dist8bit/paging/manager.py); these functions only carry it out. Every one
// returns the CUDA error instead of throwing, so the binding can name the
// call that failed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace dist8bit {
namespace cuda {
namespace paging {

// Location value meaning "host memory" (the runtime's cudaCpuDeviceId); a
// device ordinal >= 0 means that GPU.
constexpr int kHost = -1;

// cudaMallocManaged(ptr, nbytes, cudaMemAttachGlobal): memory every stream and
// the host can reach; pages are populated where they are first placed.
cudaError_t managed_alloc(void** ptr, size_t nbytes);

// Waits for `device`'s outstanding work, then frees `ptr`. cudaFree only *may*
// synchronise for managed memory, and a state tensor can die while a kernel
// that updates it is still queued; the explicit wait makes that safe. Called
// from a tensor deleter, so it restores the caller's current device.
cudaError_t managed_free(void* ptr, int device);

// Enqueues a migration of [ptr, ptr + nbytes) to `location` (a device ordinal
// or kHost) on `stream`; asynchronous with respect to the host.
cudaError_t prefetch(const void* ptr, size_t nbytes, int location, cudaStream_t stream);

// Evicted placement: the range prefers host memory and stays mapped in
// `device`'s page tables, so kernels on `device` read and write it in place
// over the interconnect instead of faulting pages back.
cudaError_t prefer_host(const void* ptr, size_t nbytes, int device);

// Resident placement: the range prefers `device` and drops the host mapping
// advice set by prefer_host.
cudaError_t prefer_device(const void* ptr, size_t nbytes, int device);

// Where the driver records the range: its preferred location and the last
// location it was prefetched to (device ordinal, kHost, or -2 when unset or
// mixed across the range, the runtime's cudaInvalidDeviceId).
cudaError_t range_locations(const void* ptr, size_t nbytes, int* preferred, int* last_prefetch);

// cudaDevAttrConcurrentManagedAccess of `device`: without it the host may not
// touch managed memory while kernels run, and prefetch/advice to a device fail.
cudaError_t concurrent_managed_access(int device, bool* supported);

}  // namespace paging
}  // namespace cuda
}  // namespace dist8bit
