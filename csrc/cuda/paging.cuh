// Managed-memory primitives behind dist8bit's paged optimizer states.
//
// Torch-free on purpose, like the kernel launchers: paging_binding.cpp (host
// compiler, against torch) and paging.cu (nvcc, CUDA runtime only) meet here
// through raw pointers, byte counts, device ordinals and a cudaStream_t, so CI
// compiles this half without a GPU or torch's CUDA headers.
//
// Policy (what to prefetch or evict, and when) lives in Python
// (dist8bit/paging/manager.py); these functions only carry it out. Every one
// returns the CUDA error instead of throwing, and leaves the runtime's
// last-error state clear (cudaGetLastError) when it fails: the binding reports
// the failure as a status, and a later, unrelated torch kernel-launch check
// must not pick it up again and raise from the middle of an optimizer step.
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
// the host can reach; pages are populated where they are first placed. First
// frees whatever earlier releases left pending and is now safe to free
// (reclaim(device, stream, false)), so dead states make room for new ones.
cudaError_t managed_alloc(void** ptr, size_t nbytes, int device, cudaStream_t stream);

// Releases managed memory in stream order, without waiting: records an event on
// `stream` (a stream of `device`: the one current where the memory dies) and
// queues the memory; it is cudaFree'd by a later reclaim once that event has
// completed, i.e. once every kernel queued before the release is done. Called
// from a tensor deleter, so it never throws and restores the current device.
// A release while `stream` is capturing a CUDA graph records no event then;
// the event is recorded by the first reclaim after the capture has ended.
cudaError_t managed_release(void* ptr, size_t nbytes, int device, cudaStream_t stream);

// cudaFree's the pending releases whose events have completed; with `wait`, it
// first waits for those events on the host (only for them, never for the whole
// device). Skipped while `stream` (a stream of `device`) is capturing, since
// freeing memory is not allowed in a capture.
cudaError_t reclaim(int device, cudaStream_t stream, bool wait);

// Managed allocations not yet cudaFree'd (pending releases included), and their bytes.
void live(long long* count, long long* nbytes);

// Enqueues a migration of [ptr, ptr + nbytes) to `location` (a device ordinal
// or kHost) on `stream`: it runs after the work already queued there and
// before what is queued later; asynchronous with respect to the host.
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
