// CUDA implementation of dist8bit::fused_step (schema and contract:
// dist8bit/backends/ops.py; oracle: dist8bit/backends/reference_optim.py).
//
// Only device and stream selection and the segment table live here (the
// argument checks are binding/kernel_contract.h's, shared with the CPU kernel); the kernel is in fused_step_kernels.cu behind the torch-free
// launcher of fused_step_kernels.cuh. The table (unit prefix sums and one
// record of pointers per segment) is written into pinned host memory and
// copied to the device with a non-blocking copy on the current stream, so a
// call never synchronises with the GPU (see upload_table for why the pinned
// buffer is not reused before that copy has run). A launch on a stream that
// is capturing a CUDA graph is refused: the captured copy would read the
// pinned buffer again at every replay, long after it was reused. Like
// quantize_blockwise,
// each codebook's encoder table (131 float32 values, or empty: binary search
// only) goes to the kernel with its code and thresholds. 8- and 4-bit states
// (checked.state_bits, from the size of the slots' maps) run the same kernels,
// told the code width. The current stream comes from
// c10/cuda/CUDAStream.h, which keeps this file free of ATen/cuda/CUDAContext.h.

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "binding/kernel_contract.h"
#include "fused_step_kernels.cuh"

namespace dist8bit {
namespace cuda {
namespace {

// A graph capture would record the table's host-to-device copy with the
// address of a pinned buffer that is handed out again after this call, so
// every replay would launch with a stale table: refuse it, naming the fix.
void refuse_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t error = cudaStreamIsCapturing(stream, &status);
  if (error != cudaSuccess) (void)cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess && status == cudaStreamCaptureStatusNone,
              "dist8bit CUDA fused_step: cannot run while the current stream is capturing a CUDA graph: the launch uploads its segment table "
              "from a pinned host buffer that is reused afterwards, so a replay would read stale pointers. Call "
              "optimizer.step() outside graph capture (capture forward and backward only).");
}

// The segment table on `device`, uploaded from pinned host memory by a copy
// queued on `stream`. The pinned buffer comes from torch's caching host
// allocator, which hands a block out again only once every stream recorded on
// it has passed the point where it was recorded (it records an event at free
// time and queries it before reuse). The non-blocking copy records `stream`
// itself; recording it here as well, after the copy is queued, makes that
// guarantee this function's own rather than a detail of Tensor::to. So the
// buffer is never rewritten before the copy that reads it has finished, and
// the host never waits for it.
at::Tensor upload_table(const FusedStepConfig& config, const std::vector<FusedSegment>& segments,
                        int64_t num_segments, const at::Device& device, const c10::cuda::CUDAStream& stream,
                        int64_t* total_units) {
  const auto table_bytes = static_cast<int64_t>(fused_step_table_bytes(num_segments));
  at::Tensor host_table = at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  *total_units = fill_fused_step_table(config, segments.data(), num_segments, host_table.mutable_data_ptr());
  at::Tensor device_table = host_table.to(device, at::kByte, /*non_blocking=*/true);
  // false only for a block the caching allocator does not know, which the copy would not have recorded either.
  (void)at::getHostAllocator(at::kCUDA)->record_event(host_table.mutable_data_ptr(),
                                                      host_table.storage().data_ptr().get_context(), stream.unwrap());
  return device_table;
}

// The call's description for the launcher, from the checked arguments.
FusedStepConfig make_config(const binding::FusedStepCall& checked, int64_t blocksize, std::optional<int64_t> seed) {
  FusedStepConfig config{};
  config.rule = checked.rule;
  config.wd_mode = checked.wd_mode;
  config.hyper = checked.hyper;
  config.param_type = checked.param_type;
  config.grad_type = checked.grad_type;
  config.num_states = checked.num_states;
  config.quantized = checked.quantized();
  config.code_bits = checked.quantized() ? checked.state_bits : 0;  // 8 or 4 (packed codes)
  config.blocksize = blocksize;
  for (int i = 0; config.quantized && i < checked.num_states; ++i) {
    config.code[i] = checked.books[i].code;
    config.thresholds[i] = checked.books[i].thresholds;
    config.encoder[i] = checked.books[i].encoder;
  }
  if (checked.grad_scale != nullptr) config.grad_scale = checked.grad_scale->const_data_ptr<float>();
  if (checked.update_scale != nullptr) config.update_scale = checked.update_scale->const_data_ptr<float>();
  if (checked.norm_out != nullptr) config.norm_out = checked.norm_out->mutable_data_ptr<double>();
  if (checked.nonfinite_count != nullptr) config.nonfinite_count = checked.nonfinite_count->mutable_data_ptr<int64_t>();
  config.stochastic = seed.has_value();
  config.seed = static_cast<uint64_t>(seed.value_or(0));
  config.error_bits = checked.error_bits;  // 0, or 8 / 16: compensated bfloat16 params
  return config;
}

// One record per segment: its pointers (error codes too, for compensated
// params), size and stochastic-rounding offset.
std::vector<FusedSegment> make_segments(const binding::FusedStepCall& checked,
                                        c10::ArrayRef<int64_t> segment_offsets) {
  std::vector<FusedSegment> segments(static_cast<size_t>(checked.num_segments));
  for (int64_t k = 0; k < checked.num_segments; ++k) {
    FusedSegment& segment = segments[static_cast<size_t>(k)];
    segment.param = checked.tensors->params[k].mutable_data_ptr();
    segment.grad = checked.tensors->grads[k].const_data_ptr();
    for (int i = 0; i < checked.num_states; ++i) {
      segment.state[i] = checked.state(i, k).mutable_data_ptr();
      if (checked.quantized()) segment.absmax[i] = checked.absmax(i, k).mutable_data_ptr<float>();
    }
    if (checked.compensated()) segment.error = checked.error(k).mutable_data_ptr();
    segment.numel = checked.tensors->params[k].numel();
    segment.first_index = segment_offsets[k];
  }
  return segments;
}

// The CUDA backend of binding::fused_step_op. The kernel reads one gradient
// dtype per call (FusedStepConfig::grad_type).
struct FusedStepCuda {
  static constexpr binding::BackendInfo kInfo = {"dist8bit CUDA fused_step", at::kCUDA, /*mixed_grads=*/false,
                                                 /*four_bit=*/true, /*compensated=*/true};

  static void fused_step(const binding::FusedStepCall& checked, c10::ArrayRef<int64_t> segment_offsets,
                         int64_t blocksize, std::optional<int64_t> seed) {
    const FusedStepConfig config = make_config(checked, blocksize, seed);
    const std::vector<FusedSegment> segments = make_segments(checked, segment_offsets);
    const at::Device device = checked.tensors->params[0].device();
    const c10::cuda::CUDAGuard guard(device);
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
    refuse_capture(current.stream());
    int64_t total_units = 0;
    const at::Tensor device_table = upload_table(config, segments, checked.num_segments, device, current, &total_units);
    const cudaError_t error =
        launch_fused_step(config, device_table.const_data_ptr(), checked.num_segments, total_units, current.stream());
    TORCH_CHECK(error == cudaSuccess, kInfo.op, ": launch failed: ", cudaGetErrorString(error));
  }
};

}  // namespace
}  // namespace cuda
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CUDA, m) {
  m.impl("fused_step", &dist8bit::binding::fused_step_op<dist8bit::cuda::FusedStepCuda>);
}
