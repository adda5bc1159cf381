// Element-wise optimizer update rules shared by the CPU and CUDA kernels.
//
// Mirrors dist8bit/backends/reference_optim.py operation by operation: every
// expression below rounds to float32 exactly where the reference does, and the
// kernels are built without FMA contraction, so all backends agree bit for bit.
// Rule ids, weight-decay modes and the constant slots are defined in
// dist8bit/backends/rules.py.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace dist8bit {

enum class Rule : int { kAdam = 0, kSgd = 1, kRmsprop = 2, kAdagrad = 3, kLion = 4, kAdemamix = 5, kLars = 6 };
constexpr int kRuleCount = 7;  // the rules are numbered 0 .. kRuleCount - 1
enum class WeightDecayMode : int { kL2 = 0, kDecoupled = 1, kInDirection = 2 };

// Slots of the constant vector (dist8bit.backends.rules.Hyper).
enum Hyper : int {
  kLr = 0,
  kBeta1 = 1,
  kOneMinusBeta1 = 2,
  kBeta2 = 3,
  kOneMinusBeta2 = 4,
  kBeta3 = 5,
  kOneMinusBeta3 = 6,
  kEps = 7,
  kWeightDecay = 8,
  kDecay = 9,
  kInvBiasCorrection1 = 10,
  kInvBiasCorrection2Sqrt = 11,
  kAlpha = 12,
  kMomentum = 13,
  kOneMinusDampening = 14,
  kNesterov = 15,
  kFirstStep = 16,
  kHyperSize = 17,
};

struct StepConstants {
  float v[kHyperSize];
};

// The two element operations the rules need besides + - * /, for float. A
// vector type F gives update_value<F> its own overloads (found by argument-
// dependent lookup) that round lane by lane exactly like these.
D8_HD float sqrt_value(float x) { return sqrtf(x); }
D8_HD float sign_value(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }

// The rules, written once for a value type F: float (update_element below, the
// CUDA kernels) or a SIMD vector of floats whose operators are the lane-wise
// float32 operations (the CPU kernel), so one source gives every backend the
// same roundings in the same order. F needs F op F, float op F and F op float
// for + - * /, sqrt_value, sign_value and an explicit F(float).
//
// One element's update. `state` holds the (dequantized) states on entry and the
// new states on exit; `num_states` says how many slots the rule uses (SGD without
// momentum: 0; RMSprop with momentum: 2). Returns the direction d, so that the
// caller writes p <- p * decay - write_rate(rule, lr_eff) * d. With `rule`, `wd_mode` and
// `num_states` compile-time constants the switch folds away.
template <typename F>
D8_HD F update_value(Rule rule, WeightDecayMode wd_mode, const StepConstants& c, F g, F p, F* state, int num_states,
                     float lr_eff) {
  switch (rule) {
    case Rule::kAdam: {
      if (wd_mode == WeightDecayMode::kL2) g = g + c.v[kWeightDecay] * p;
      const F m = c.v[kBeta1] * state[0] + c.v[kOneMinusBeta1] * g;
      const F v = c.v[kBeta2] * state[1] + c.v[kOneMinusBeta2] * (g * g);
      state[0] = m;
      state[1] = v;
      const F denom = sqrt_value(v) * c.v[kInvBiasCorrection2Sqrt] + c.v[kEps];
      F d = (m / denom) * c.v[kInvBiasCorrection1];
      if (wd_mode == WeightDecayMode::kInDirection) d = d + c.v[kWeightDecay] * p;
      return d;
    }
    case Rule::kSgd:
    case Rule::kLars: {
      if (wd_mode == WeightDecayMode::kL2) g = g + c.v[kWeightDecay] * p;
      // LARS (You et al. 2017): the local rate lr * trust enters the momentum,
      // so the buffer holds steps and the parameter write uses rate 1.
      if (rule == Rule::kLars) g = lr_eff * g;
      if (num_states == 0) return g;
      const F buffer =
          c.v[kFirstStep] != 0.f ? g : c.v[kMomentum] * state[0] + c.v[kOneMinusDampening] * g;
      state[0] = buffer;
      return c.v[kNesterov] != 0.f ? g + c.v[kMomentum] * buffer : buffer;
    }
    case Rule::kRmsprop: {
      if (wd_mode == WeightDecayMode::kL2) g = g + c.v[kWeightDecay] * p;
      const F square_avg = c.v[kBeta2] * state[0] + c.v[kOneMinusBeta2] * (g * g);
      state[0] = square_avg;
      const F avg = sqrt_value(square_avg) + c.v[kEps];
      if (num_states == 1) return g / avg;
      const F buffer = c.v[kMomentum] * state[1] + g / avg;
      state[1] = buffer;
      return buffer;
    }
    case Rule::kAdagrad: {
      if (wd_mode == WeightDecayMode::kL2) g = g + c.v[kWeightDecay] * p;
      const F total = state[0] + g * g;
      state[0] = total;
      return g / (sqrt_value(total) + c.v[kEps]);
    }
    case Rule::kLion: {
      const F mixed = c.v[kBeta1] * state[0] + c.v[kOneMinusBeta1] * g;
      state[0] = c.v[kBeta2] * state[0] + c.v[kOneMinusBeta2] * g;
      return sign_value(mixed);
    }
    case Rule::kAdemamix: {
      const F fast = c.v[kBeta1] * state[0] + c.v[kOneMinusBeta1] * g;
      const F slow = c.v[kBeta3] * state[1] + c.v[kOneMinusBeta3] * g;
      const F v = c.v[kBeta2] * state[2] + c.v[kOneMinusBeta2] * (g * g);
      state[0] = fast;
      state[1] = slow;
      state[2] = v;
      const F denom = sqrt_value(v) * c.v[kInvBiasCorrection2Sqrt] + c.v[kEps];
      return (fast * c.v[kInvBiasCorrection1] + c.v[kAlpha] * slow) / denom;
    }
  }
  return F(0.f);
}

// The float rules (CUDA kernels, scalar CPU paths).
D8_HD float update_element(Rule rule, WeightDecayMode wd_mode, const StepConstants& c, float g, float p,
                           float* state, int num_states, float lr_eff) {
  return update_value<float>(rule, wd_mode, c, g, p, state, num_states, lr_eff);
}

// The rate the parameter write multiplies the direction by: lr_eff, except for
// LARS, whose direction already carries it.
D8_HD float write_rate(Rule rule, float lr_eff) { return rule == Rule::kLars ? 1.0f : lr_eff; }

// The parameter write: p * decay - lr_eff * d (two float32 roundings).
template <typename F>
D8_HD F apply_direction_value(F p, float decay, float lr_eff, F d) {
  return p * decay - lr_eff * d;
}
D8_HD float apply_direction(float p, float decay, float lr_eff, float d) {
  return apply_direction_value<float>(p, decay, lr_eff, d);
}

}  // namespace dist8bit
