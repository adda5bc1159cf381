// What the operator schemas of dist8bit/backends/ops.py allow, as plain C++17
// (no torch), so that the host-side argument checks (binding/kernel_contract.h)
// and the kernels (CPU and nvcc) read the same facts from one place: the float
// element types and their dispatch, the state slots a rule takes and the
// dispatch over them, the quantized blocksizes of fused_step, and how many
// scales and code bytes a tensor of n codes has.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/update_rules.h"

namespace dist8bit {

// Element type of a float tensor: parameters, gradients, quantize's input and
// dequantize's output.
enum class FloatType : int {
  kFloat32 = 0,
  kFloat16 = 1,   // IEEE half
  kBFloat16 = 2,  // bfloat16
};

// A type carried as a value, so that a generic lambda can take it as `auto`.
template <typename T>
struct TypeTag {
  using type = T;
};

// The float32/float16/bfloat16 dispatch, written once: calls
// fn(TypeTag<F32T>{}), fn(TypeTag<F16T>{}) or fn(TypeTag<BF16T>{}) for `type`.
// Each backend names its own element types: the CPU float / c10::Half /
// c10::BFloat16, the CUDA kernels their F32 / F16 / BF16 codecs.
template <typename F32T, typename F16T, typename BF16T, typename Fn>
decltype(auto) visit_float_type(FloatType type, Fn&& fn) {
  switch (type) {
    case FloatType::kFloat32:
      return fn(TypeTag<F32T>{});
    case FloatType::kFloat16:
      return fn(TypeTag<F16T>{});
    default:
      return fn(TypeTag<BF16T>{});
  }
}

// fused_step: state slots (AdEMAMix uses all 3) and quantized (8- and 4-bit) blocksizes.
constexpr int kMaxStates = 3;
constexpr int64_t kMinStateBlocksize = 64;
constexpr int64_t kMaxStateBlocksize = 4096;

// Quantized states: a power of two in [64, 4096] (the kernels index blocks by
// shifts; even, so a 4-bit block's codes start on a byte boundary).
constexpr bool is_state_blocksize(int64_t blocksize) {
  return blocksize >= kMinStateBlocksize && blocksize <= kMaxStateBlocksize && (blocksize & (blocksize - 1)) == 0;
}

// The slot counts each rule runs with: Adam 2, SGD 0 (no momentum) or 1,
// RMSprop 1 or 2 (momentum), Adagrad 1, Lion 1, AdEMAMix 3.
constexpr bool rule_takes_states(Rule rule, int num_states) {
  switch (rule) {
    case Rule::kAdam:
      return num_states == 2;
    case Rule::kSgd:
    case Rule::kLars:
      return num_states == 0 || num_states == 1;
    case Rule::kRmsprop:
      return num_states == 1 || num_states == 2;
    case Rule::kAdagrad:
    case Rule::kLion:
      return num_states == 1;
    case Rule::kAdemamix:
      return num_states == 3;
  }
  return false;
}

// The one switch from a run-time (rule, slot count) to the code instantiated
// for it, so that every backend instantiates exactly the pairs that
// rule_takes_states admits: fn(std::integral_constant<Rule, R>{},
// std::integral_constant<int, NS>{}) for rule == R and num_states == NS, and
// `otherwise` for a pair the rule does not take.
template <int kRule = 0, int kStates = 0, typename Result, typename Fn>
Result visit_rule_states(Rule rule, int num_states, Result otherwise, Fn&& fn) {
  if constexpr (kRule == kRuleCount) {
    return otherwise;
  } else if constexpr (kStates > kMaxStates) {
    return visit_rule_states<kRule + 1, 0>(rule, num_states, otherwise, static_cast<Fn&&>(fn));
  } else {
    constexpr Rule kR = static_cast<Rule>(kRule);
    if constexpr (rule_takes_states(kR, kStates)) {
      if (rule == kR && num_states == kStates) {
        return fn(std::integral_constant<Rule, kR>{}, std::integral_constant<int, kStates>{});
      }
    }
    return visit_rule_states<kRule, kStates + 1>(rule, num_states, otherwise, static_cast<Fn&&>(fn));
  }
}

// Scales of n codes in blocks of `blocksize` (>= 1): ceil(n / blocksize).
constexpr int64_t block_count(int64_t n, int64_t blocksize) {
  return n / blocksize + (n % blocksize != 0 ? 1 : 0);
}

// Bytes the codes of n elements take at `bits` (8 or 4) per code
// (dist8bit/quant/packing.py): 4-bit codes are packed two per byte, element
// 2j in the low nibble of byte j and element 2j + 1 in the high nibble; an
// odd n leaves the last high nibble 0.
constexpr int64_t code_bytes(int64_t n, int bits) { return bits == 4 ? n / 2 + n % 2 : n; }

}  // namespace dist8bit
