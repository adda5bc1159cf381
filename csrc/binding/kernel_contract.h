// The argument checks and the dtype dispatch of the dist8bit operators
// (schemas: dist8bit/backends/ops.py), written once for the CPU kernels
// (csrc/cpu/quantize.cpp, fused_step.cpp) and the CUDA bindings
// (csrc/cuda/bindings.cpp, fused_step_binding.cpp).
//
// dist8bit.functional and the optimizers validate arguments first; these are
// the second line of defence the operator contract asks for, so a wrong call
// fails with a message naming the argument and what it must be instead of
// reading out of bounds. Every check is cheap (no synchronisation): the one
// that reads tensor data (thresholds[255] = +inf) runs on CPU tensors only.
//
// The backends differ only in what they are handed here: the device type their
// tensors live on, a message prefix, and (CUDA) whether every gradient must
// share one dtype. The torch-free facts behind the checks (slot counts per
// rule, quantized blocksizes, code bytes, the float dispatch) are
// common/op_contract.h; map sizes and bits are common/code_search.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <ostream>

#include "common/code_search.h"
#include "common/op_contract.h"
#include "common/update_rules.h"

namespace dist8bit {
namespace binding {

// An argument's name as messages print it: "grads" or "grads[3]". Formatted
// only when a check fails, so naming costs nothing on the common path.
struct ArgName {
  const char* base;
  int64_t index = -1;
};

inline std::ostream& operator<<(std::ostream& out, const ArgName& name) {
  out << name.base;
  if (name.index >= 0) out << "[" << name.index << "]";
  return out;
}

// The FloatType of a torch dtype; false for any dtype the kernels do not take.
inline bool float_type_of(at::ScalarType dtype, FloatType* out) {
  switch (dtype) {
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

// visit_float_type with torch's host element types: fn(TypeTag<float>{}),
// fn(TypeTag<c10::Half>{}) or fn(TypeTag<c10::BFloat16>{}).
template <typename Fn>
decltype(auto) visit_torch_float(FloatType type, Fn&& fn) {
  return visit_float_type<float, c10::Half, c10::BFloat16>(type, static_cast<Fn&&>(fn));
}

// The checks of one operator call: every tensor contiguous and on the device
// of the call's first tensor (the anchor), which must be of the backend's
// device type. `op` starts every message ("dist8bit CPU kernel").
class ArgChecks {
 public:
  ArgChecks(const char* op, at::DeviceType backend, const at::Tensor& anchor, ArgName anchor_name)
      : op_(op), device_(anchor.device()), anchor_(anchor_name) {
    TORCH_CHECK(device_.type() == backend, op_, ": ", anchor_name, " must be a ", at::Device(backend),
                " tensor, got one on ", device_);
  }

  const char* op() const { return op_; }
  const at::Device& device() const { return device_; }

  // Contiguous and on the call's device.
  void placed(const at::Tensor& t, ArgName name) const {
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " is on ", t.device(), " but ", anchor_, " is on ", device_,
                "; move it there");
    TORCH_CHECK(t.is_contiguous(), op_, ": ", name, " must be contiguous (call .contiguous() on it)");
  }

  // Placed, of `dtype`.
  void typed(const at::Tensor& t, ArgName name, at::ScalarType dtype) const {
    placed(t, name);
    TORCH_CHECK(t.scalar_type() == dtype, op_, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  }

  // Placed, `numel` elements of `dtype`.
  void sized(const at::Tensor& t, ArgName name, at::ScalarType dtype, int64_t numel) const {
    typed(t, name, dtype);
    TORCH_CHECK(t.numel() == numel, op_, ": ", name, " must hold ", numel, " elements, got ", t.numel());
  }

  // Placed, float32, float16 or bfloat16: its FloatType.
  FloatType floating(const at::Tensor& t, ArgName name) const {
    placed(t, name);
    FloatType type;
    TORCH_CHECK(float_type_of(t.scalar_type(), &type), op_, ": ", name,
                " must be float32, float16 or bfloat16, got ", t.scalar_type());
    return type;
  }

  // The scales of n codes: float32, one per block of `blocksize`.
  void scales(const at::Tensor& absmax, ArgName name, int64_t n, int64_t blocksize) const {
    sized(absmax, name, at::kFloat, block_count(n, blocksize));
  }

  // A codebook as dist8bit.quant.codebook.Codebook hands it to the kernels:
  // 256 code values, 256 thresholds, and the encoder table (131 float32
  // values, dist8bit.quant.encoder_table; empty: binary search only), or for
  // a 4-bit map 16 code values, 16 thresholds and an empty encoder. Any
  // table of the right size is memory-safe: every index the encoder computes
  // is masked into range, and a wrong table only sends values to the search.
  // `index` is the code's position in the fused_step codebooks list, or -1.
  Codebook codebook(const at::Tensor& code, const at::Tensor& thresholds, const at::Tensor& encoder,
                    int64_t index = -1) const {
    const bool listed = index >= 0;
    const ArgName code_name = listed ? ArgName{"codebooks", index} : ArgName{"code"};
    typed(code, code_name, at::kFloat);
    const int bits = map_bits(code.numel());
    TORCH_CHECK(bits != 0, op_, ": ", code_name, " must hold ", kMapSize, " values (an 8-bit map) or ", kMapSize4,
                " (a 4-bit map), got ", code.numel(), "; build it with dist8bit.functional.create_dynamic_map()");
    const int64_t entries = code.numel();
    const ArgName thresholds_name = listed ? ArgName{"codebooks", index + 1} : ArgName{"thresholds"};
    sized(thresholds, thresholds_name, at::kFloat, entries);
    if (device_.is_cpu()) {
      const float last = thresholds.const_data_ptr<float>()[entries - 1];
      TORCH_CHECK(std::isinf(last) && last > 0.0f, op_, ": ", thresholds_name, "[", entries - 1,
                  "] must be +inf, got ", last);
    }
    const ArgName encoder_name = listed ? ArgName{"codebooks", index + 2} : ArgName{"encoder"};
    TORCH_CHECK(encoder.scalar_type() == at::kFloat, op_, ": ", encoder_name, " (encoder table) must be float32, got ",
                encoder.scalar_type());
    TORCH_CHECK(bits == 8 || encoder.numel() == 0, op_, ": ", encoder_name,
                " (encoder table) must be empty for a 4-bit map, got ", encoder.numel(), " values");
    TORCH_CHECK(encoder.numel() == 0 || encoder.numel() == kEncoderTableSize, op_, ": ", encoder_name,
                " (encoder table) must hold ", kEncoderTableSize,
                " values (dist8bit.quant.encoder_table.TABLE_SIZE) or none, got ", encoder.numel());
    const float* table = nullptr;
    if (encoder.numel() != 0) {
      placed(encoder, encoder_name);
      table = encoder.const_data_ptr<float>();
    }
    return Codebook{code.const_data_ptr<float>(), thresholds.const_data_ptr<float>(), table, bits};
  }

  // An optional per-call tensor: nullptr when absent, else checked by sized().
  const at::Tensor* optional(const std::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
                             int64_t numel) const {
    if (!t.has_value() || !t->defined()) return nullptr;
    sized(*t, ArgName{name}, dtype, numel);
    return &*t;
  }

  void blocksize_positive(int64_t blocksize) const {
    TORCH_CHECK(blocksize >= 1, op_, ": blocksize must be positive, got ", blocksize);
  }

  void seed(std::optional<int64_t> value) const {
    TORCH_CHECK(!value.has_value() || *value >= 0, op_, ": seed must be non-negative, got ", value.value_or(0));
  }

 private:
  const char* op_;
  at::Device device_;
  ArgName anchor_;
};

// ---------------------------------------------------------------------------
// quantize_blockwise and dequantize_blockwise.

struct QuantizeCall {
  FloatType x_type;
  Codebook book;
  int64_t n;  // elements of x (0: nothing to do)
};

inline QuantizeCall check_quantize(const char* op, at::DeviceType backend, const at::Tensor& x, const at::Tensor& code,
                                   const at::Tensor& thresholds, const at::Tensor& encoder, int64_t blocksize,
                                   std::optional<int64_t> seed, const at::Tensor& codes, const at::Tensor& absmax) {
  const ArgChecks checks(op, backend, x, ArgName{"x"});
  QuantizeCall call;
  call.x_type = checks.floating(x, ArgName{"x"});
  call.book = checks.codebook(code, thresholds, encoder);
  TORCH_CHECK(call.book.bits == 8, op, ": code must hold ", kMapSize,
              " values; 4-bit maps are quantized by dist8bit.functional.quantize_blockwise (reference backend)");
  checks.blocksize_positive(blocksize);
  checks.seed(seed);
  call.n = x.numel();
  checks.sized(codes, ArgName{"codes"}, at::kByte, call.n);
  checks.scales(absmax, ArgName{"absmax"}, call.n, blocksize);
  return call;
}

struct DequantizeCall {
  FloatType out_type;
  int64_t n;  // elements of codes (0: nothing to do)
};

inline DequantizeCall check_dequantize(const char* op, at::DeviceType backend, const at::Tensor& codes,
                                       const at::Tensor& code, const at::Tensor& absmax, int64_t blocksize,
                                       const at::Tensor& out) {
  const ArgChecks checks(op, backend, codes, ArgName{"codes"});
  checks.typed(codes, ArgName{"codes"}, at::kByte);
  checks.sized(code, ArgName{"code"}, at::kFloat, kMapSize);
  checks.blocksize_positive(blocksize);
  DequantizeCall call;
  call.n = codes.numel();
  call.out_type = checks.floating(out, ArgName{"out"});
  TORCH_CHECK(out.numel() == call.n, op, ": out must hold ", call.n, " elements, got ", out.numel());
  checks.scales(absmax, ArgName{"absmax"}, call.n, blocksize);
  return call;
}

// ---------------------------------------------------------------------------
// fused_step.

// The schema's tensor arguments, as the operator receives them.
struct FusedStepTensors {
  at::TensorList params;
  at::TensorList grads;
  std::array<at::TensorList, kMaxStates> states;    // state1..3 (empty: slot unused)
  std::array<at::TensorList, kMaxStates> absmaxes;  // absmax1..3
  at::TensorList codebooks;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& update_scale;
  const std::optional<at::Tensor>& norm_out;
  const std::optional<at::Tensor>& nonfinite_count;
  at::TensorList errors;  // compensated bfloat16 parameters: one int8/int16 error buffer per segment (or none)
};

// A checked fused_step call. Slots are numbered as the kernels use them: the
// used slots in order (slot i is schema slot used[i] + 1).
struct FusedStepCall {
  Rule rule;
  WeightDecayMode wd_mode;
  StepConstants hyper;  // float32 values
  int64_t num_segments;
  FloatType param_type;
  FloatType grad_type;  // of grads[0]; with mixed_grads, each grads[k] has its own
  int num_states;
  std::array<int, kMaxStates> used;
  // The states' precision, one for every used slot: 32 (float32 values), or
  // 8 or 4 (uint8 codes, 4-bit ones packed two per byte, with float32 absmax
  // per block), from the size of the slots' maps.
  int state_bits;
  std::array<Codebook, kMaxStates> books;  // quantized: slot i's codebook
  const at::Tensor* grad_scale;            // nullptr when absent
  const at::Tensor* update_scale;
  const at::Tensor* norm_out;
  const at::Tensor* nonfinite_count;
  // Compensated bfloat16 parameters (common/weight_error.h): 8 (int8 errors)
  // or 16 (int16), 0 when the call has no error buffers.
  int error_bits;
  const FusedStepTensors* tensors;

  bool quantized() const { return state_bits != 32; }
  bool compensated() const { return error_bits != 0; }
  const at::Tensor& error(int64_t k) const { return tensors->errors[k]; }
  const at::Tensor& state(int slot, int64_t k) const { return tensors->states[used[slot]][k]; }
  const at::Tensor& absmax(int slot, int64_t k) const { return tensors->absmaxes[used[slot]][k]; }
};

namespace detail {

inline const char* const kStateNames[kMaxStates] = {"state1", "state2", "state3"};
inline const char* const kAbsmaxNames[kMaxStates] = {"absmax1", "absmax2", "absmax3"};

// rule, wd_mode, hyper, the list lengths and seed: everything checkable without a tensor.
inline void check_fused_scalars(const char* op, int64_t rule, int64_t wd_mode, c10::ArrayRef<double> hyper,
                                const FusedStepTensors& t, c10::ArrayRef<int64_t> segment_offsets,
                                std::optional<int64_t> seed) {
  TORCH_CHECK(rule >= 0 && rule <= static_cast<int64_t>(Rule::kLars), op, ": unknown rule ", rule);
  TORCH_CHECK(wd_mode >= 0 && wd_mode <= static_cast<int64_t>(WeightDecayMode::kInDirection), op,
              ": unknown weight decay mode ", wd_mode);
  TORCH_CHECK(static_cast<int64_t>(hyper.size()) == kHyperSize, op, ": hyper must hold ", int64_t{kHyperSize},
              " values (dist8bit.backends.rules.Hyper), got ", hyper.size());
  const size_t segments = t.params.size();
  TORCH_CHECK(t.grads.size() == segments, op, ": got ", segments, " params but ", t.grads.size(), " grads");
  TORCH_CHECK(segment_offsets.size() == segments, op, ": got ", segments, " params but ", segment_offsets.size(),
              " segment_offsets (one per segment)");
  for (size_t k = 0; k < segments; ++k) {
    TORCH_CHECK(segment_offsets[k] >= 0, op, ": segment_offsets[", k, "] must be non-negative, got ",
                segment_offsets[k]);
  }
  TORCH_CHECK(!seed.has_value() || *seed >= 0, op, ": seed must be non-negative, got ", seed.value_or(0));
}

// The used slots, whether they are quantized and the blocksize; fills used,
// num_states, and state_bits = 32 (float32) or 8 (uint8 codes; the codebooks
// may make it 4, check_fused_extras).
inline void check_fused_slots(const char* op, Rule rule, int64_t blocksize, const FusedStepTensors& t,
                              FusedStepCall* call) {
  const int64_t segments = static_cast<int64_t>(t.params.size());
  call->num_states = 0;
  for (int s = 0; s < kMaxStates; ++s) {
    const int64_t count = static_cast<int64_t>(t.states[s].size());
    TORCH_CHECK(count == 0 || count == segments, op, ": ", kStateNames[s], " must hold 0 (unused) or ", segments,
                " tensors (one per segment), got ", count);
    if (count != 0) call->used[call->num_states++] = s;
  }
  const at::ScalarType state_dtype = call->num_states > 0 ? t.states[call->used[0]][0].scalar_type() : at::kFloat;
  TORCH_CHECK(state_dtype == at::kByte || state_dtype == at::kFloat, op,
              ": states must be uint8 (8- or 4-bit codes) or float32, got ", state_dtype);
  const bool quantized = call->num_states > 0 && state_dtype == at::kByte;
  call->state_bits = quantized ? 8 : 32;
  TORCH_CHECK(rule_takes_states(rule, call->num_states), op, ": rule ", static_cast<int>(rule), " does not take ",
              call->num_states, " state slots");
  TORCH_CHECK(!quantized || is_state_blocksize(blocksize), op,
              ": blocksize must be a power of two in [64, 4096] for 8- and 4-bit states, got ", blocksize);
  for (int s = 0; s < kMaxStates; ++s) {
    const int64_t wanted = quantized && !t.states[s].empty() ? segments : 0;
    TORCH_CHECK(static_cast<int64_t>(t.absmaxes[s].size()) == wanted, op, ": ", kAbsmaxNames[s], " must hold ",
                wanted, " tensors (one per segment of an 8- or 4-bit slot, else none), got ", t.absmaxes[s].size());
  }
}

// The codebooks of the used quantized slots (their size sets state_bits: 256
// values 8, 16 values 4, the same for every slot) and the optional per-call tensors.
inline void check_fused_extras(const ArgChecks& checks, const FusedStepTensors& t, FusedStepCall* call) {
  if (call->quantized()) {
    constexpr size_t kPerBook = 3;  // code, thresholds, encoder
    TORCH_CHECK(t.codebooks.size() == kPerBook * kMaxStates, checks.op(), ": codebooks must hold [code, thresholds, ",
                "encoder] for each of the ", kMaxStates, " slots (", kPerBook * kMaxStates,
                " tensors) for 8- and 4-bit states, got ", t.codebooks.size());
    for (int i = 0; i < call->num_states; ++i) {
      const size_t first = kPerBook * static_cast<size_t>(call->used[i]);
      call->books[i] = checks.codebook(t.codebooks[first], t.codebooks[first + 1], t.codebooks[first + 2],
                                       static_cast<int64_t>(first));
      TORCH_CHECK(call->books[i].bits == call->books[0].bits, checks.op(), ": codebooks[", first, "] is a ",
                  call->books[i].bits, "-bit map but codebooks[", kPerBook * static_cast<size_t>(call->used[0]),
                  "] is a ", call->books[0].bits,
                  "-bit map; every quantized slot of a call must have the same bits (step them in separate calls)");
    }
    call->state_bits = call->books[0].bits;
  }
  const int64_t segments = call->num_segments;
  call->grad_scale = checks.optional(t.grad_scale, "grad_scale", at::kFloat, segments);
  call->update_scale = checks.optional(t.update_scale, "update_scale", at::kFloat, segments);
  call->norm_out = checks.optional(t.norm_out, "norm_out", at::kDouble, segments);
  call->nonfinite_count = checks.optional(t.nonfinite_count, "nonfinite_count", at::kLong, 1);
  call->error_bits = 0;
  if (t.errors.empty()) return;
  TORCH_CHECK(static_cast<int64_t>(t.errors.size()) == segments, checks.op(), ": errors must hold 0 or ", segments,
              " tensors (one per segment), got ", t.errors.size());
  const at::ScalarType error_dtype = t.errors[0].scalar_type();
  TORCH_CHECK(error_dtype == at::kChar || error_dtype == at::kShort, checks.op(),
              ": errors[0] must be int8 (8-bit error buffer) or int16 (16-bit), got ", error_dtype);
  TORCH_CHECK(call->param_type == FloatType::kBFloat16, checks.op(),
              ": error buffers (compensated updates) need bfloat16 params, got ", t.params[0].scalar_type());
  call->error_bits = error_dtype == at::kChar ? 8 : 16;
}

// Segment k's parameter, gradient, states and scales.
inline void check_fused_segment(const ArgChecks& checks, const FusedStepCall& call, bool mixed_grads,
                                int64_t blocksize, int64_t k) {
  const at::Tensor& param = call.tensors->params[k];
  const at::Tensor& grad = call.tensors->grads[k];
  const FloatType param_type = checks.floating(param, ArgName{"params", k});
  TORCH_CHECK(param_type == call.param_type, checks.op(), ": params[", k, "] is ", param.scalar_type(),
              " but params[0] is ", call.tensors->params[0].scalar_type(), "; every param must have one dtype");
  const FloatType grad_type = checks.floating(grad, ArgName{"grads", k});
  TORCH_CHECK(mixed_grads || grad_type == call.grad_type, checks.op(), ": grads[", k, "] is ", grad.scalar_type(),
              " but grads[0] is ", call.tensors->grads[0].scalar_type(), "; this backend needs one gradient dtype");
  const int64_t n = param.numel();
  TORCH_CHECK(grad.numel() == n, checks.op(), ": grads[", k, "] must hold ", n, " elements like params[", k,
              "], got ", grad.numel());
  for (int i = 0; i < call.num_states; ++i) {
    const int s = call.used[i];
    const ArgName state_name{kStateNames[s], k};
    if (!call.quantized()) {
      checks.sized(call.state(i, k), state_name, at::kFloat, n);
      continue;
    }
    const int64_t bytes = code_bytes(n, call.state_bits);
    checks.typed(call.state(i, k), state_name, at::kByte);
    TORCH_CHECK(call.state(i, k).numel() == bytes, checks.op(), ": ", state_name, " must hold ", bytes, " bytes (",
                n, " ", call.state_bits, "-bit codes", call.state_bits == 4 ? ", two per byte" : "", "), got ",
                call.state(i, k).numel());
    checks.scales(call.absmax(i, k), ArgName{kAbsmaxNames[s], k}, n, blocksize);
  }
  if (call.compensated()) checks.sized(call.error(k), ArgName{"errors", k}, call.tensors->errors[0].scalar_type(), n);
}

}  // namespace detail

// Checks a whole fused_step call. `backend` is the device type every tensor
// must be on (all on params[0]'s device); with `mixed_grads` false every
// gradient must have grads[0]'s dtype. A call without segments returns
// num_segments = 0 and nothing else filled in.
inline FusedStepCall check_fused_step(const char* op, at::DeviceType backend, bool mixed_grads, int64_t rule,
                                      int64_t wd_mode, c10::ArrayRef<double> hyper, const FusedStepTensors& tensors,
                                      c10::ArrayRef<int64_t> segment_offsets, int64_t blocksize,
                                      std::optional<int64_t> seed) {
  detail::check_fused_scalars(op, rule, wd_mode, hyper, tensors, segment_offsets, seed);
  FusedStepCall call{};
  call.tensors = &tensors;
  call.num_segments = static_cast<int64_t>(tensors.params.size());
  if (call.num_segments == 0) return call;
  call.rule = static_cast<Rule>(rule);
  call.wd_mode = static_cast<WeightDecayMode>(wd_mode);
  for (int h = 0; h < kHyperSize; ++h) call.hyper.v[h] = static_cast<float>(hyper[h]);
  const ArgChecks checks(op, backend, tensors.params[0], ArgName{"params", 0});
  call.param_type = checks.floating(tensors.params[0], ArgName{"params", 0});
  call.grad_type = checks.floating(tensors.grads[0], ArgName{"grads", 0});
  detail::check_fused_slots(op, call.rule, blocksize, tensors, &call);
  detail::check_fused_extras(checks, tensors, &call);
  TORCH_CHECK(!call.compensated() || !seed.has_value(), op,
              ": compensated params (errors) are rounded to nearest; pass no seed");
  for (int64_t k = 0; k < call.num_segments; ++k) {
    detail::check_fused_segment(checks, call, mixed_grads, blocksize, k);
  }
  return call;
}

// ---------------------------------------------------------------------------
// The operators' C++ signatures, written once. A backend is a struct with
//   static constexpr BackendInfo kInfo;
//   static void quantize(const QuantizeCall&, x, codes, absmax, blocksize, seed);
//   static void dequantize(const DequantizeCall&, codes, code, absmax, blocksize, out);
//   static void fused_step(const FusedStepCall&, segment_offsets, blocksize, seed);
// and registers them in TORCH_LIBRARY_IMPL (register_quantize_ops<Backend>,
// fused_step_op<Backend>). The backend functions run only for checked,
// non-empty calls.

struct BackendInfo {
  const char* op;          // message prefix
  at::DeviceType device;   // where its tensors live
  bool mixed_grads;        // fused_step: grads may differ in dtype
  bool four_bit = false;   // fused_step: runs 4-bit states (else refuses them)
  bool compensated = false;  // fused_step: runs error buffers (compensated bfloat16 params; else refuses them)
};

template <typename Backend>
void quantize_op(const at::Tensor& x, const at::Tensor& code, const at::Tensor& thresholds, const at::Tensor& encoder,
                 int64_t blocksize, std::optional<int64_t> seed, const at::Tensor& codes, const at::Tensor& absmax) {
  const QuantizeCall call =
      check_quantize(Backend::kInfo.op, Backend::kInfo.device, x, code, thresholds, encoder, blocksize, seed, codes, absmax);
  if (call.n != 0) Backend::quantize(call, x, codes, absmax, blocksize, seed);
}

template <typename Backend>
void dequantize_op(const at::Tensor& codes, const at::Tensor& code, const at::Tensor& absmax, int64_t blocksize,
                   const at::Tensor& out) {
  const DequantizeCall call = check_dequantize(Backend::kInfo.op, Backend::kInfo.device, codes, code, absmax, blocksize, out);
  if (call.n != 0) Backend::dequantize(call, codes, code, absmax, blocksize, out);
}

// Registers quantize_op<Backend> and dequantize_op<Backend> in the backend's
// TORCH_LIBRARY_IMPL block (the two operators share one backend struct).
template <typename Backend>
void register_quantize_ops(torch::Library& m) {
  m.impl("quantize_blockwise", &quantize_op<Backend>);
  m.impl("dequantize_blockwise", &dequantize_op<Backend>);
}

template <typename Backend>
void fused_step_op(int64_t rule, int64_t wd_mode, c10::ArrayRef<double> hyper, at::TensorList params,
                   at::TensorList grads, at::TensorList state1, at::TensorList absmax1, at::TensorList state2,
                   at::TensorList absmax2, at::TensorList state3, at::TensorList absmax3, at::TensorList codebooks,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& update_scale,
                   const std::optional<at::Tensor>& norm_out, const std::optional<at::Tensor>& nonfinite_count,
                   at::TensorList errors, c10::ArrayRef<int64_t> segment_offsets, int64_t blocksize,
                   std::optional<int64_t> seed) {
  const FusedStepTensors tensors{params,     grads,        {state1, state2, state3},
                                 {absmax1, absmax2, absmax3}, codebooks, grad_scale,
                                 update_scale, norm_out, nonfinite_count, errors};
  const FusedStepCall call = check_fused_step(Backend::kInfo.op, Backend::kInfo.device, Backend::kInfo.mixed_grads, rule, wd_mode,
                                              hyper, tensors, segment_offsets, blocksize, seed);
  TORCH_CHECK(call.state_bits != 4 || Backend::kInfo.four_bit, Backend::kInfo.op,
              ": this backend does not run 4-bit states yet; use the reference backend (DIST8BIT_BACKEND=reference)");
  TORCH_CHECK(!call.compensated() || Backend::kInfo.compensated, Backend::kInfo.op,
              ": this backend does not run compensated bfloat16 updates (error buffers) yet; use the reference backend "
              "(DIST8BIT_BACKEND=reference)");
  if (call.num_segments != 0) Backend::fused_step(call, segment_offsets, blocksize, seed);
}

}  // namespace binding
}  // namespace dist8bit
