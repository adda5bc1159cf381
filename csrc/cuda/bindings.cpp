// CUDA implementations of dist8bit::quantize_blockwise and
// dist8bit::dequantize_blockwise (schemas: dist8bit/backends/ops.py).
//
// Only device and stream selection live here: the argument checks and the
// dtype dispatch are binding/kernel_contract.h's, shared with the CPU kernels,
// and the kernels are in quantize_kernels.cu behind the torch-free
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

#include "binding/kernel_contract.h"
#include "quantize_kernels.cuh"

namespace dist8bit {
namespace cuda {
namespace {

// A launcher's CUDA error as a torch error naming the operator.
void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, "dist8bit CUDA kernel: ", op, " failed: ", cudaGetErrorString(error));
}

// The CUDA backend of binding::quantize_op and binding::dequantize_op: the
// launch on the current stream of the tensors' device.
struct QuantizeCuda {
  static constexpr binding::BackendInfo kInfo = {"dist8bit CUDA kernel", at::kCUDA, /*mixed_grads=*/false};

  static void quantize(const binding::QuantizeCall& call, const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& absmax, int64_t blocksize, std::optional<int64_t> seed) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    check_launch(launch_quantize_blockwise(call.x_type, x.const_data_ptr(), call.n, call.book.code,
                                           call.book.thresholds, call.book.encoder, blocksize, seed.has_value(),
                                           static_cast<uint64_t>(seed.value_or(0)), codes.mutable_data_ptr<uint8_t>(),
                                           absmax.mutable_data_ptr<float>(), stream),
                 "quantize_blockwise");
  }

  static void dequantize(const binding::DequantizeCall& call, const at::Tensor& codes, const at::Tensor& code,
                         const at::Tensor& absmax, int64_t blocksize, const at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(codes.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(codes.device().index()).stream();
    check_launch(launch_dequantize_blockwise(call.out_type, codes.const_data_ptr<uint8_t>(), call.n,
                                             code.const_data_ptr<float>(), absmax.const_data_ptr<float>(), blocksize,
                                             out.mutable_data_ptr(), stream),
                 "dequantize_blockwise");
  }
};

}  // namespace
}  // namespace cuda
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CUDA, m) { dist8bit::binding::register_quantize_ops<dist8bit::cuda::QuantizeCuda>(m); }
