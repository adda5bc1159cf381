// Managed-memory primitives of dist8bit's paged optimizer states (see
// paging.cuh). Host code only: the CUDA runtime's unified-memory calls, with
// the location arguments spelled for the runtime version at hand (CUDA 13
// takes a cudaMemLocation; CUDA 12.2-12.9 has that form as the *_v2 calls;
// older runtimes take a device ordinal).
//
// Releasing managed memory. There is no stream-ordered free for managed
// memory (cudaFreeAsync is for cudaMallocAsync pools only), and a state tensor
// can die while a kernel that updates it is still queued. Waiting for the
// device in the deleter (cudaDeviceSynchronize) would make that safe, but it
// stalls the host behind every queued kernel of every stream whenever a state
// dies. Instead a release records an event on the stream current where the
// memory dies and puts {pointer, event} on a deferred-free list guarded by a
// mutex; reclaim() frees the entries whose events have completed. reclaim runs
// (without waiting) on every release and every allocation, and on request
// (dist8bit.paging.free_pending). The event orders the free after all work
// queued on that stream before the release: all of dist8bit's own uses of a
// state (fill, prefetch, the optimizer kernels) run on the current stream, so
// this is the same contract torch's caching allocator gives (memory used on
// another stream must be kept alive by its user). cudaFree itself may still
// block the host briefly (the driver's choice for managed memory), but only for
// memory whose last use has already finished. What is still pending when the
// process exits is released with the CUDA context.

#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

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

// Clears the runtime's last-error state after a failed call (see paging.cuh);
// cudaErrorNotReady from cudaEventQuery is recorded there too.
cudaError_t cleared(cudaError_t error) {
  if (error != cudaSuccess) (void)cudaGetLastError();
  return error;
}

cudaError_t advise(const void* ptr, size_t nbytes, cudaMemoryAdvise advice, int location) {
#if CUDART_VERSION >= 13000
  return cleared(cudaMemAdvise(ptr, nbytes, advice, location_of(location)));
#elif CUDART_VERSION >= 12020
  return cleared(cudaMemAdvise_v2(ptr, nbytes, advice, location_of(location)));
#else
  return cleared(cudaMemAdvise(ptr, nbytes, advice, location));
#endif
}

// Makes `device` current for the scope's lifetime and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    error_ = cleared(cudaGetDevice(&previous_));
    if (error_ == cudaSuccess && previous_ != device) error_ = cleared(cudaSetDevice(device));
    restore_ = error_ == cudaSuccess && previous_ != device;
  }
  ~DeviceScope() {
    if (restore_) (void)cleared(cudaSetDevice(previous_));
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t error() const { return error_; }

 private:
  int previous_ = 0;
  bool restore_ = false;
  cudaError_t error_ = cudaSuccess;
};

// Relaxed stream-capture mode for the calling thread while in scope: the event
// queries and frees of reclaim are "unsafe" calls that would otherwise
// invalidate a capture another thread runs in global mode.
class RelaxedCapture {
 public:
  RelaxedCapture() { (void)cleared(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCapture() { (void)cleared(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// Whether `stream` (of the current device) is capturing; an error counts as
// capturing (cudaStreamIsCapturing fails on the legacy stream while another
// stream captures in global mode), so nothing unsafe is tried then.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cleared(cudaStreamIsCapturing(stream, &status)) != cudaSuccess || status != cudaStreamCaptureStatusNone;
}

struct PendingFree {
  void* ptr;
  size_t nbytes;
  int device;
  cudaStream_t stream;  // current stream of `device` when the memory died
  cudaEvent_t event;    // recorded on `stream`; null until it could be (the stream was capturing)
};

struct Registry {
  std::mutex mutex;  // guards pending
  std::vector<PendingFree> pending;
  std::atomic<long long> live_count{0};
  std::atomic<long long> live_bytes{0};
};

// Never destroyed: deleters can run during interpreter exit, after static destructors.
Registry& registry() {
  static Registry* const instance = new Registry();
  return *instance;
}

// Records entry.event on entry.stream unless that stream is capturing now.
cudaError_t record(PendingFree& entry) {
  const DeviceScope scope(entry.device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (capturing(entry.stream)) return cudaSuccess;
  cudaEvent_t event = nullptr;
  cudaError_t error = cleared(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  if (error != cudaSuccess) return error;
  error = cleared(cudaEventRecord(event, entry.stream));
  if (error != cudaSuccess) {
    (void)cleared(cudaEventDestroy(event));
    return error;
  }
  entry.event = event;
  return cudaSuccess;
}

// Whether the work queued before entry's release has completed (waited for
// when `wait`); a real error (not cudaErrorNotReady) lands in *error.
bool completed(PendingFree& entry, bool wait, cudaError_t* error) {
  if (entry.event == nullptr) {
    *error = record(entry);
    if (entry.event == nullptr) return false;
  }
  const cudaError_t status = cleared(wait ? cudaEventSynchronize(entry.event) : cudaEventQuery(entry.event));
  if (status != cudaSuccess && status != cudaErrorNotReady) *error = status;
  return status == cudaSuccess;
}

cudaError_t free_now(const PendingFree& entry) {
  (void)cleared(cudaEventDestroy(entry.event));
  const cudaError_t error = cleared(cudaFree(entry.ptr));
  if (error == cudaSuccess) {
    registry().live_count.fetch_sub(1);
    registry().live_bytes.fetch_sub(static_cast<long long>(entry.nbytes));
  }
  return error;
}

}  // namespace

cudaError_t managed_alloc(void** ptr, size_t nbytes, int device, cudaStream_t stream) {
  (void)reclaim(device, stream, false);  // a failure to free earlier memory is not this allocation's
  const cudaError_t error = cleared(cudaMallocManaged(ptr, nbytes, cudaMemAttachGlobal));
  if (error == cudaSuccess) {
    registry().live_count.fetch_add(1);
    registry().live_bytes.fetch_add(static_cast<long long>(nbytes));
  }
  return error;
}

cudaError_t managed_release(void* ptr, size_t nbytes, int device, cudaStream_t stream) {
  PendingFree entry{ptr, nbytes, device, stream, nullptr};
  cudaError_t error = cudaSuccess;
  {
    const RelaxedCapture relaxed;
    error = record(entry);
  }
  {
    const std::lock_guard<std::mutex> lock(registry().mutex);
    registry().pending.push_back(entry);
  }
  const cudaError_t reclaimed = reclaim(device, stream, false);
  return error != cudaSuccess ? error : reclaimed;
}

cudaError_t reclaim(int device, cudaStream_t stream, bool wait) {
  {
    const DeviceScope scope(device);
    if (scope.error() != cudaSuccess) return scope.error();
    if (capturing(stream)) return cudaSuccess;
  }
  const RelaxedCapture relaxed;
  std::vector<PendingFree> batch;
  {
    const std::lock_guard<std::mutex> lock(registry().mutex);
    batch.swap(registry().pending);
  }
  // The CUDA calls run outside the lock; a concurrent reclaim takes a disjoint batch.
  std::vector<PendingFree> waiting;
  cudaError_t first = cudaSuccess;
  for (PendingFree& entry : batch) {
    cudaError_t error = cudaSuccess;
    if (completed(entry, wait, &error)) {
      error = free_now(entry);
    } else {
      waiting.push_back(entry);
    }
    if (first == cudaSuccess) first = error;
  }
  const std::lock_guard<std::mutex> lock(registry().mutex);
  registry().pending.insert(registry().pending.end(), waiting.begin(), waiting.end());
  return first;
}

void live(long long* count, long long* nbytes) {
  *count = registry().live_count.load();
  *nbytes = registry().live_bytes.load();
}

cudaError_t prefetch(const void* ptr, size_t nbytes, int location, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cleared(cudaMemPrefetchAsync(ptr, nbytes, location_of(location), 0, stream));
#elif CUDART_VERSION >= 12020
  return cleared(cudaMemPrefetchAsync_v2(ptr, nbytes, location_of(location), 0, stream));
#else
  return cleared(cudaMemPrefetchAsync(ptr, nbytes, location, stream));
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
  return cleared(error);
}

cudaError_t concurrent_managed_access(int device, bool* supported) {
  int value = 0;
  const cudaError_t error = cleared(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device));
  *supported = error == cudaSuccess && value != 0;
  return error;
}

}  // namespace paging
}  // namespace cuda
}  // namespace dist8bit
