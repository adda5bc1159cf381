"""Plain-PyTorch fused optimizer step: the oracle for the CPU and CUDA kernels.

Mirrors csrc/common/update_rules.h operation by operation (each line below is
one float32 rounding in the kernels too), so the kernels can be tested bit for
bit. Contract: dist8bit.backends.contract (FusedStepCall) and dist8bit.backends.rules.
"""

from __future__ import annotations

import torch

from ..quant.codebook import Codebook
from ..quant.stochastic import MASK32, mix32, seed_key
from ..quant.weight_error import compensated_values, weight_errors
from . import reference
from .contract import FusedStepCall
from .rules import HyperSlot, Rule, WeightDecay


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, as the kernels' sqrtf.

    torch.sqrt on CPU goes through MKL's vsSqrt, which on some CPUs (AMD Zen
    here) is off by one ulp for about a fifth of the inputs, and differently
    on other CPUs. A float32's square root computed in float64 and rounded once
    is the correctly rounded result (it is never close enough to a float32
    rounding boundary for float64's error to matter)."""
    return torch.sqrt(x.double()).float()


def _adam(h, wd_mode, g, p, states, rate):
    m, v = states
    if wd_mode == WeightDecay.L2:
        g = g + h[HyperSlot.WEIGHT_DECAY] * p
    m = h[HyperSlot.BETA1] * m + h[HyperSlot.ONE_MINUS_BETA1] * g
    v = h[HyperSlot.BETA2] * v + h[HyperSlot.ONE_MINUS_BETA2] * (g * g)
    denom = _sqrt(v) * h[HyperSlot.INV_BIAS_CORRECTION2_SQRT] + h[HyperSlot.EPS]
    direction = (m / denom) * h[HyperSlot.INV_BIAS_CORRECTION1]
    if wd_mode == WeightDecay.IN_DIRECTION:
        direction = direction + h[HyperSlot.WEIGHT_DECAY] * p
    return [m, v], direction


def _sgd(h, wd_mode, g, p, states, rate):
    if wd_mode == WeightDecay.L2:
        g = g + h[HyperSlot.WEIGHT_DECAY] * p
    return _momentum(h, g, states)


def _lars(h, wd_mode, g, p, states, rate):
    """You et al. 2017: the local rate (lr * trust) scales the momentum's input; see write_rate."""
    if wd_mode == WeightDecay.L2:
        g = g + h[HyperSlot.WEIGHT_DECAY] * p
    return _momentum(h, rate * g, states)


def _momentum(h, g, states):
    if not states:
        return [], g
    (buffer,) = states
    if h[HyperSlot.FIRST_STEP] != 0:
        buffer = g
    else:
        buffer = h[HyperSlot.MOMENTUM] * buffer + h[HyperSlot.ONE_MINUS_DAMPENING] * g
    direction = g + h[HyperSlot.MOMENTUM] * buffer if h[HyperSlot.NESTEROV] != 0 else buffer
    return [buffer], direction


def _rmsprop(h, wd_mode, g, p, states, rate):
    if wd_mode == WeightDecay.L2:
        g = g + h[HyperSlot.WEIGHT_DECAY] * p
    square_avg = h[HyperSlot.BETA2] * states[0] + h[HyperSlot.ONE_MINUS_BETA2] * (g * g)
    avg = _sqrt(square_avg) + h[HyperSlot.EPS]
    if len(states) == 1:
        return [square_avg], g / avg
    buffer = h[HyperSlot.MOMENTUM] * states[1] + g / avg
    return [square_avg, buffer], buffer


def _adagrad(h, wd_mode, g, p, states, rate):
    if wd_mode == WeightDecay.L2:
        g = g + h[HyperSlot.WEIGHT_DECAY] * p
    total = states[0] + g * g
    return [total], g / (_sqrt(total) + h[HyperSlot.EPS])


def _lion(h, wd_mode, g, p, states, rate):
    (m,) = states
    mixed = h[HyperSlot.BETA1] * m + h[HyperSlot.ONE_MINUS_BETA1] * g
    m = h[HyperSlot.BETA2] * m + h[HyperSlot.ONE_MINUS_BETA2] * g
    return [m], torch.sign(mixed)


def _ademamix(h, wd_mode, g, p, states, rate):
    fast, slow, v = states
    fast = h[HyperSlot.BETA1] * fast + h[HyperSlot.ONE_MINUS_BETA1] * g
    slow = h[HyperSlot.BETA3] * slow + h[HyperSlot.ONE_MINUS_BETA3] * g
    v = h[HyperSlot.BETA2] * v + h[HyperSlot.ONE_MINUS_BETA2] * (g * g)
    denom = _sqrt(v) * h[HyperSlot.INV_BIAS_CORRECTION2_SQRT] + h[HyperSlot.EPS]
    direction = (fast * h[HyperSlot.INV_BIAS_CORRECTION1] + h[HyperSlot.ALPHA] * slow) / denom
    return [fast, slow, v], direction


RULES = {
    Rule.ADAM: _adam,
    Rule.SGD: _sgd,
    Rule.RMSPROP: _rmsprop,
    Rule.ADAGRAD: _adagrad,
    Rule.LION: _lion,
    Rule.ADEMAMIX: _ademamix,
    Rule.LARS: _lars,
}


def write_rate(rule: Rule, lr):
    """What the parameter write multiplies the direction by: lr, or 1 for LARS (its direction is the step)."""
    return 1.0 if rule == Rule.LARS else lr


def _load_state(
    state: torch.Tensor, absmax: torch.Tensor | None, codebook: Codebook | None, blocksize: int, n: int
) -> torch.Tensor:
    if state.dtype == torch.float32:
        return state.reshape(-1).clone()
    out = torch.empty(n, dtype=torch.float32, device=state.device)
    reference.dequantize_blockwise(state.reshape(-1), codebook.code, absmax, blocksize, out)
    return out


def _store_state(
    values: torch.Tensor, state: torch.Tensor, absmax: torch.Tensor | None, codebook: Codebook | None, blocksize: int
) -> None:
    if state.dtype == torch.float32:
        state.view(-1).copy_(values)
        return
    reference.quantize_blockwise(values, codebook, blocksize, None, state.view(-1), absmax)


def round_bf16_stochastically(values: torch.Tensor, seed: int, first_index: int) -> torch.Tensor:
    """float32 -> bfloat16, rounding up with probability given by the dropped bits."""
    indices = torch.arange(values.numel(), device=values.device, dtype=torch.int64) + first_index
    key = seed_key(seed)
    random = mix32((indices & MASK32) ^ mix32((indices >> 32) ^ key)) & 0xFFFF
    bits = values.view(torch.int32).long() & MASK32
    rounded = ((bits + random) & 0xFFFF0000).to(torch.int64)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(values), rounded, values).bfloat16()


def fused_step(call: FusedStepCall) -> None:
    """Run `call` segment by segment; `h` is the constant vector (float32 values indexed by HyperSlot)."""
    h = call.constants
    update = RULES[Rule(call.rule)]
    slots = call.used_slots()
    for index, (param, grad) in enumerate(zip(call.params, call.grads, strict=True)):
        if param.numel() == 0:
            if call.norm_out is not None:
                call.norm_out[index] = 0.0
            continue
        error = call.errors[index] if len(call.errors) else None
        p = param.reshape(-1).float() if error is None else compensated_values(param, error)
        g = grad.reshape(-1).float()
        if call.grad_scale is not None:
            g = g * call.grad_scale[index]
        finite = torch.isfinite(g)
        g = torch.where(finite, g, torch.zeros_like(g))
        absmax_of = [call.absmaxes[k][index] if len(call.absmaxes[k]) else None for k in slots]
        old = [
            _load_state(call.states[k][index], absmax_of[i], call.codebooks[k], call.blocksize, p.numel())
            for i, k in enumerate(slots)
        ]
        lr = h[HyperSlot.LR]
        if call.update_scale is not None:
            lr = torch.tensor(lr, dtype=torch.float32) * call.update_scale[index]
        new, direction = update(h, WeightDecay(call.wd_mode), g, p, old, lr)
        if call.norm_out is not None:
            call.norm_out[index] = (direction.double() ** 2)[finite].sum()
            continue
        stepped = p * h[HyperSlot.DECAY] - write_rate(Rule(call.rule), lr) * direction
        stepped = torch.where(finite, stepped, p)
        if call.seed is not None and param.dtype == torch.bfloat16:
            param.view(-1).copy_(round_bf16_stochastically(stepped, call.seed, int(call.segment_offsets[index])))
        else:
            param.view(-1).copy_(stepped)
        if error is not None:  # a skipped element: stepped rounds back to p and re-encodes its old error
            error.view(-1).copy_(weight_errors(stepped, param, error.dtype))
        for i, k in enumerate(slots):
            kept = torch.where(finite, new[i], old[i])
            _store_state(kept, call.states[k][index], absmax_of[i], call.codebooks[k], call.blocksize)
        if call.nonfinite_count is not None:
            call.nonfinite_count.add_((~finite).sum())
