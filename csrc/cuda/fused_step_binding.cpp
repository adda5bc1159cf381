// CUDA implementation of dist8bit::fused_step (schema and contract:
// dist8bit/backends/ops.py; oracle: dist8bit/backends/reference_optim.py).
//
// Only argument checks, device and stream selection and the segment table
// live here; the kernel is in fused_step_kernels.cu behind the torch-free
// launcher of fused_step_kernels.cuh. The table (unit prefix sums and one
// record of pointers per segment) is written into pinned host memory and
// copied to the device with a non-blocking copy on the current stream, so a
// call never synchronises with the GPU (see upload_table for why the pinned
// buffer is not reused before that copy has run). A launch on a stream that
// is capturing a CUDA graph is refused: the captured copy would read the
// pinned buffer again at every replay, long after it was reused. Like
// quantize_blockwise,
// each codebook's encoder table (131 float32 values, or empty: binary search
// only) goes to the kernel with its code and thresholds. The current stream comes from
// c10/cuda/CUDAStream.h, which keeps this file free of ATen/cuda/CUDAContext.h.

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/code_search.h"
#include "fused_step_kernels.cuh"

namespace dist8bit {
namespace cuda {
namespace {

constexpr int64_t kCodeValues = 256;  // entries of a map and of its threshold table
constexpr int64_t kEncoderValues = kEncoderTableSize;
constexpr size_t kTensorsPerCodebook = 3;  // code, thresholds, encoder

const char* const kOp = "dist8bit CUDA fused_step: ";

bool float_type(at::ScalarType type, FloatType* out) {
  switch (type) {
    case at::kFloat:
      *out = FloatType::kFloat32;
      return true;
    case at::kHalf:
      *out = FloatType::kFloat16;
      return true;
    case at::kBFloat16:
      *out = FloatType::kBFloat16;
      return true;
    default:
      return false;
  }
}

// A contiguous tensor on `device` with `numel` elements of `dtype`.
void check_tensor(const at::Tensor& t, const char* name, int64_t index, const at::Device& device,
                  at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device() == device, kOp, name, "[", index, "] is on ", t.device(), " but params[0] is on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, kOp, name, "[", index, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, kOp, name, "[", index, "] must hold ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), kOp, name, "[", index, "] must be contiguous");
}

// An optional per-call tensor: on `device`, contiguous, `numel` elements of `dtype`.
const at::Tensor* check_optional(const std::optional<at::Tensor>& t, const char* name, const at::Device& device,
                                 at::ScalarType dtype, int64_t numel) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, name, 0, device, dtype, numel);
  return &*t;
}

int64_t num_blocks(int64_t n, int64_t blocksize) { return n / blocksize + (n % blocksize != 0 ? 1 : 0); }

// A graph capture would record the table's host-to-device copy with the
// address of a pinned buffer that is handed out again after this call, so
// every replay would launch with a stale table: refuse it, naming the fix.
void refuse_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t error = cudaStreamIsCapturing(stream, &status);
  if (error != cudaSuccess) (void)cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess && status == cudaStreamCaptureStatusNone, kOp,
              "cannot run while the current stream is capturing a CUDA graph: the launch uploads its segment table "
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

void fused_step_cuda(int64_t rule, int64_t wd_mode, c10::ArrayRef<double> hyper, at::TensorList params,
                     at::TensorList grads, at::TensorList state1, at::TensorList absmax1, at::TensorList state2,
                     at::TensorList absmax2, at::TensorList state3, at::TensorList absmax3, at::TensorList codebooks,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& update_scale,
                     const std::optional<at::Tensor>& norm_out, const std::optional<at::Tensor>& nonfinite_count,
                     c10::ArrayRef<int64_t> segment_offsets, int64_t blocksize, std::optional<int64_t> seed) {
  TORCH_CHECK(rule >= static_cast<int64_t>(Rule::kAdam) && rule <= static_cast<int64_t>(Rule::kAdemamix), kOp,
              "unknown rule ", rule);
  TORCH_CHECK(wd_mode >= static_cast<int64_t>(WeightDecayMode::kL2) &&
                  wd_mode <= static_cast<int64_t>(WeightDecayMode::kInDirection),
              kOp, "unknown weight decay mode ", wd_mode);
  TORCH_CHECK(static_cast<int64_t>(hyper.size()) == kHyperSize, kOp, "hyper must hold ", int64_t{kHyperSize},
              " values, got ", hyper.size());
  const int64_t num_segments = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == num_segments, kOp, "got ", num_segments, " params but ",
              grads.size(), " grads");
  TORCH_CHECK(static_cast<int64_t>(segment_offsets.size()) == num_segments, kOp, "got ", num_segments,
              " params but ", segment_offsets.size(), " segment_offsets");
  TORCH_CHECK(!seed.has_value() || *seed >= 0, kOp, "seed must be non-negative, got ", seed.value_or(0));
  if (num_segments == 0) return;

  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), kOp, "params must be CUDA tensors, got ", device);
  const at::ScalarType param_dtype = params[0].scalar_type();
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  FloatType param_type;
  FloatType grad_type;
  TORCH_CHECK(float_type(param_dtype, &param_type), kOp, "params must be float32, float16 or bfloat16, got ",
              param_dtype);
  TORCH_CHECK(float_type(grad_dtype, &grad_type), kOp, "grads must be float32, float16 or bfloat16, got ",
              grad_dtype);

  // Slots: used iff their list is non-empty; the used ones are compacted in order.
  const std::array<at::TensorList, kMaxStates> states = {state1, state2, state3};
  const std::array<at::TensorList, kMaxStates> absmaxes = {absmax1, absmax2, absmax3};
  std::vector<int> used;
  for (int s = 0; s < kMaxStates; ++s) {
    const int64_t count = static_cast<int64_t>(states[s].size());
    TORCH_CHECK(count == 0 || count == num_segments, kOp, "state", s + 1, " must hold 0 or ", num_segments,
                " tensors, got ", count);
    if (count != 0) used.push_back(s);
  }
  const int num_states = static_cast<int>(used.size());
  const bool eight_bit = num_states > 0 && states[used[0]][0].scalar_type() == at::kByte;
  TORCH_CHECK(eight_bit || num_states == 0 || states[used[0]][0].scalar_type() == at::kFloat, kOp,
              "states must be uint8 (8-bit) or float32, got ", states[used[0]][0].scalar_type());
  TORCH_CHECK(!eight_bit || (blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0), kOp,
              "blocksize must be a power of two in [64, 4096] for 8-bit states, got ", blocksize);
  TORCH_CHECK(fused_step_supported(static_cast<Rule>(rule), num_states, eight_bit, blocksize), kOp, "rule ", rule,
              " cannot run with ", num_states, " state slot(s)");
  for (int s = 0; s < kMaxStates; ++s) {
    const bool wants_scales = eight_bit && !states[s].empty();
    const int64_t count = static_cast<int64_t>(absmaxes[s].size());
    TORCH_CHECK(count == (wants_scales ? num_segments : 0), kOp, "absmax", s + 1, " must hold ",
                wants_scales ? num_segments : 0, " tensors, got ", count);
  }

  FusedStepConfig config{};
  config.rule = static_cast<Rule>(rule);
  config.wd_mode = static_cast<WeightDecayMode>(wd_mode);
  for (int i = 0; i < kHyperSize; ++i) config.hyper.v[i] = static_cast<float>(hyper[i]);
  config.param_type = param_type;
  config.grad_type = grad_type;
  config.num_states = num_states;
  config.eight_bit = eight_bit;
  config.blocksize = blocksize;
  if (eight_bit) {
    TORCH_CHECK(codebooks.size() == kTensorsPerCodebook * kMaxStates, kOp, "codebooks must hold ",
                kTensorsPerCodebook * kMaxStates, " tensors for 8-bit states, got ", codebooks.size());
    for (int i = 0; i < num_states; ++i) {
      const size_t book = kTensorsPerCodebook * static_cast<size_t>(used[i]);
      const at::Tensor& code = codebooks[book];
      const at::Tensor& thresholds = codebooks[book + 1];
      const at::Tensor& encoder = codebooks[book + 2];
      check_tensor(code, "codebooks", static_cast<int64_t>(book), device, at::kFloat, kCodeValues);
      check_tensor(thresholds, "codebooks", static_cast<int64_t>(book + 1), device, at::kFloat, kCodeValues);
      // The encoder table: float32, kEncoderValues values, or none (binary search only).
      TORCH_CHECK(encoder.scalar_type() == at::kFloat, kOp, "codebooks[", book + 2,
                  "] (encoder table) must be float32, got ", encoder.scalar_type());
      TORCH_CHECK(encoder.numel() == 0 || encoder.numel() == kEncoderValues, kOp, "codebooks[", book + 2,
                  "] (encoder table) must hold ", kEncoderValues, " values or none, got ", encoder.numel());
      if (encoder.numel() != 0) {
        check_tensor(encoder, "codebooks", static_cast<int64_t>(book + 2), device, at::kFloat, kEncoderValues);
      }
      config.code[i] = code.const_data_ptr<float>();
      config.thresholds[i] = thresholds.const_data_ptr<float>();
      config.encoder[i] = encoder.numel() != 0 ? encoder.const_data_ptr<float>() : nullptr;
    }
  }
  if (const at::Tensor* t = check_optional(grad_scale, "grad_scale", device, at::kFloat, num_segments)) {
    config.grad_scale = t->const_data_ptr<float>();
  }
  if (const at::Tensor* t = check_optional(update_scale, "update_scale", device, at::kFloat, num_segments)) {
    config.update_scale = t->const_data_ptr<float>();
  }
  if (const at::Tensor* t = check_optional(norm_out, "norm_out", device, at::kDouble, num_segments)) {
    config.norm_out = t->mutable_data_ptr<double>();
  }
  if (const at::Tensor* t = check_optional(nonfinite_count, "nonfinite_count", device, at::kLong, 1)) {
    config.nonfinite_count = t->mutable_data_ptr<int64_t>();
  }
  config.stochastic = seed.has_value();
  config.seed = static_cast<uint64_t>(seed.value_or(0));

  std::vector<FusedSegment> segments(static_cast<size_t>(num_segments));
  for (int64_t k = 0; k < num_segments; ++k) {
    const at::Tensor& param = params[k];
    const int64_t n = param.numel();
    check_tensor(param, "params", k, device, param_dtype, n);
    check_tensor(grads[k], "grads", k, device, grad_dtype, n);
    TORCH_CHECK(segment_offsets[k] >= 0, kOp, "segment_offsets[", k, "] must be non-negative, got ",
                segment_offsets[k]);
    FusedSegment& segment = segments[static_cast<size_t>(k)];
    segment.param = param.mutable_data_ptr();
    segment.grad = grads[k].const_data_ptr();
    for (int i = 0; i < num_states; ++i) {
      const int s = used[i];
      const char* state_name = s == 0 ? "state1" : (s == 1 ? "state2" : "state3");
      const char* absmax_name = s == 0 ? "absmax1" : (s == 1 ? "absmax2" : "absmax3");
      check_tensor(states[s][k], state_name, k, device, eight_bit ? at::kByte : at::kFloat, n);
      segment.state[i] = states[s][k].mutable_data_ptr();
      if (eight_bit) {
        check_tensor(absmaxes[s][k], absmax_name, k, device, at::kFloat, num_blocks(n, blocksize));
        segment.absmax[i] = absmaxes[s][k].mutable_data_ptr<float>();
      }
    }
    segment.numel = n;
    segment.first_index = segment_offsets[k];
  }

  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  const cudaStream_t stream = current.stream();
  refuse_capture(stream);
  int64_t total_units = 0;
  const at::Tensor device_table = upload_table(config, segments, num_segments, device, current, &total_units);
  const cudaError_t error =
      launch_fused_step(config, device_table.const_data_ptr(), num_segments, total_units, stream);
  TORCH_CHECK(error == cudaSuccess, kOp, "launch failed: ", cudaGetErrorString(error));
}

}  // namespace
}  // namespace cuda
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CUDA, m) { m.impl("fused_step", &dist8bit::cuda::fused_step_cuda); }
