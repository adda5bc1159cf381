// CUDA implementations of dist8bit::quantize_blockwise and
// dist8bit::dequantize_blockwise (schemas: dist8bit/backends/ops.py).
//
// Only argument checks, device and stream selection and dtype dispatch live
// here; the kernels are in quantize_kernels.cu behind the torch-free
// launchers of quantize_kernels.cuh. The codebook's encoder table (131
// float32 values, dist8bit/quant/encoder_table.py; empty: binary search only)
// is handed to the kernels, which use it for every value it serves and
// binary-search the thresholds for the rest. The current stream comes from
// c10/cuda/CUDAStream.h (what
// at::cuda::getCurrentCUDAStream forwards to), which keeps this file free of
// the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common/code_search.h"
#include "quantize_kernels.cuh"

namespace dist8bit {
namespace cuda {
namespace {

constexpr int64_t kMapSize = 256;
constexpr int64_t kEncoderSize = kEncoderTableSize;

bool float_type_of(at::ScalarType type, FloatType* out) {
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

// A contiguous CUDA tensor on `device`.
void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "dist8bit CUDA kernel: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "dist8bit CUDA kernel: ", name, " is on ", t.device(), " but the input is on ",
              device);
  TORCH_CHECK(t.is_contiguous(), "dist8bit CUDA kernel: ", name, " must be contiguous");
}

void check_table(const at::Tensor& t, const char* name, const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dist8bit CUDA kernel: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == kMapSize, "dist8bit CUDA kernel: ", name, " must hold ", kMapSize, " values, got ",
              t.numel());
}

// The encoder table: float32 with 0 values (binary search only) or kEncoderSize.
// Returns its device pointer, or nullptr when it is empty.
const float* checked_encoder(const at::Tensor& encoder, const at::Device& device) {
  TORCH_CHECK(encoder.scalar_type() == at::kFloat, "dist8bit CUDA kernel: encoder must be float32, got ",
              encoder.scalar_type());
  TORCH_CHECK(encoder.numel() == 0 || encoder.numel() == kEncoderSize, "dist8bit CUDA kernel: encoder must hold ",
              kEncoderSize, " values (dist8bit.quant.encoder_table.TABLE_SIZE) or none, got ", encoder.numel());
  if (encoder.numel() == 0) return nullptr;
  check_cuda(encoder, "encoder", device);
  return encoder.const_data_ptr<float>();
}

int64_t num_blocks(int64_t n, int64_t blocksize) { return n / blocksize + (n % blocksize != 0 ? 1 : 0); }

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, "dist8bit CUDA kernel: ", op, " failed: ", cudaGetErrorString(error));
}

void quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& code, const at::Tensor& thresholds,
                             const at::Tensor& encoder, int64_t blocksize, std::optional<int64_t> seed,
                             const at::Tensor& codes, const at::Tensor& absmax) {
  TORCH_CHECK(x.is_cuda(), "dist8bit CUDA kernel: x must be a CUDA tensor, got ", x.device());
  const at::Device device = x.device();
  check_cuda(x, "x", device);
  FloatType x_type;
  TORCH_CHECK(float_type_of(x.scalar_type(), &x_type),
              "dist8bit CUDA kernel: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_table(code, "code", device);
  check_table(thresholds, "thresholds", device);
  const float* const encoder_table = checked_encoder(encoder, device);
  TORCH_CHECK(blocksize >= 1, "dist8bit CUDA kernel: blocksize must be positive, got ", blocksize);
  TORCH_CHECK(!seed.has_value() || *seed >= 0, "dist8bit CUDA kernel: seed must be non-negative, got ",
              seed.value_or(0));
  check_cuda(codes, "codes", device);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dist8bit CUDA kernel: codes must be uint8, got ", codes.scalar_type());
  check_cuda(absmax, "absmax", device);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "dist8bit CUDA kernel: absmax must be float32, got ",
              absmax.scalar_type());
  const int64_t n = x.numel();
  TORCH_CHECK(codes.numel() == n, "dist8bit CUDA kernel: codes must hold ", n, " elements, got ", codes.numel());
  const int64_t blocks = num_blocks(n, blocksize);
  TORCH_CHECK(absmax.numel() == blocks, "dist8bit CUDA kernel: absmax must hold ", blocks, " elements, got ",
              absmax.numel());
  if (n == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(launch_quantize_blockwise(x_type, x.const_data_ptr(), n, code.const_data_ptr<float>(),
                                         thresholds.const_data_ptr<float>(), encoder_table, blocksize,
                                         seed.has_value(),
                                         static_cast<uint64_t>(seed.value_or(0)), codes.mutable_data_ptr<uint8_t>(),
                                         absmax.mutable_data_ptr<float>(), stream),
               "quantize_blockwise");
}

void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& code, const at::Tensor& absmax,
                               int64_t blocksize, const at::Tensor& out) {
  TORCH_CHECK(codes.is_cuda(), "dist8bit CUDA kernel: codes must be a CUDA tensor, got ", codes.device());
  const at::Device device = codes.device();
  check_cuda(codes, "codes", device);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dist8bit CUDA kernel: codes must be uint8, got ", codes.scalar_type());
  check_table(code, "code", device);
  check_cuda(absmax, "absmax", device);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "dist8bit CUDA kernel: absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(blocksize >= 1, "dist8bit CUDA kernel: blocksize must be positive, got ", blocksize);
  check_cuda(out, "out", device);
  FloatType out_type;
  TORCH_CHECK(float_type_of(out.scalar_type(), &out_type),
              "dist8bit CUDA kernel: out must be float32, float16 or bfloat16, got ", out.scalar_type());
  const int64_t n = codes.numel();
  TORCH_CHECK(out.numel() == n, "dist8bit CUDA kernel: out must hold ", n, " elements, got ", out.numel());
  const int64_t blocks = num_blocks(n, blocksize);
  TORCH_CHECK(absmax.numel() == blocks, "dist8bit CUDA kernel: absmax must hold ", blocks, " elements, got ",
              absmax.numel());
  if (n == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(launch_dequantize_blockwise(out_type, codes.const_data_ptr<uint8_t>(), n, code.const_data_ptr<float>(),
                                           absmax.const_data_ptr<float>(), blocksize, out.mutable_data_ptr(), stream),
               "dequantize_blockwise");
}

}  // namespace
}  // namespace cuda
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CUDA, m) {
  m.impl("quantize_blockwise", &dist8bit::cuda::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dist8bit::cuda::dequantize_blockwise_cuda);
}
