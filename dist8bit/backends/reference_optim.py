"""Plain-PyTorch fused optimizer step: the oracle for the CPU and CUDA kernels.

Mirrors csrc/common/update_rules.h operation by operation (each line below is
one float32 rounding in the kernels too), so the kernels can be tested bit for
bit. Contract: dist8bit.backends.ops (fused_step) and dist8bit.backends.rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..quant.codebook import Codebook
from ..quant.stochastic import MASK32, mix32, seed_key
from . import reference
from .rules import Hyper, Rule, WeightDecay


class _Constants:
    """Hyper slots (Python floats already rounded to float32)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = values

    def __getitem__(self, slot: Hyper) -> float:
        return self.values[slot]


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, as the kernels' sqrtf.

    torch.sqrt on CPU goes through MKL's vsSqrt, which on some CPUs (AMD Zen
    here) is off by one ulp for about a fifth of the inputs, and differently
    on other CPUs. A float32's square root computed in float64 and rounded once
    is the correctly rounded result (it is never close enough to a float32
    rounding boundary for float64's error to matter)."""
    return torch.sqrt(x.double()).float()


def _adam(h, wd_mode, g, p, states):
    m, v = states
    if wd_mode == WeightDecay.L2:
        g = g + h[Hyper.WEIGHT_DECAY] * p
    m = h[Hyper.BETA1] * m + h[Hyper.ONE_MINUS_BETA1] * g
    v = h[Hyper.BETA2] * v + h[Hyper.ONE_MINUS_BETA2] * (g * g)
    denom = _sqrt(v) * h[Hyper.INV_BIAS_CORRECTION2_SQRT] + h[Hyper.EPS]
    direction = (m / denom) * h[Hyper.INV_BIAS_CORRECTION1]
    if wd_mode == WeightDecay.IN_DIRECTION:
        direction = direction + h[Hyper.WEIGHT_DECAY] * p
    return [m, v], direction


def _sgd(h, wd_mode, g, p, states):
    if wd_mode == WeightDecay.L2:
        g = g + h[Hyper.WEIGHT_DECAY] * p
    if not states:
        return [], g
    (buffer,) = states
    if h[Hyper.FIRST_STEP] != 0:
        buffer = g
    else:
        buffer = h[Hyper.MOMENTUM] * buffer + h[Hyper.ONE_MINUS_DAMPENING] * g
    direction = g + h[Hyper.MOMENTUM] * buffer if h[Hyper.NESTEROV] != 0 else buffer
    return [buffer], direction


def _rmsprop(h, wd_mode, g, p, states):
    if wd_mode == WeightDecay.L2:
        g = g + h[Hyper.WEIGHT_DECAY] * p
    square_avg = h[Hyper.BETA2] * states[0] + h[Hyper.ONE_MINUS_BETA2] * (g * g)
    avg = _sqrt(square_avg) + h[Hyper.EPS]
    if len(states) == 1:
        return [square_avg], g / avg
    buffer = h[Hyper.MOMENTUM] * states[1] + g / avg
    return [square_avg, buffer], buffer


def _adagrad(h, wd_mode, g, p, states):
    if wd_mode == WeightDecay.L2:
        g = g + h[Hyper.WEIGHT_DECAY] * p
    total = states[0] + g * g
    return [total], g / (_sqrt(total) + h[Hyper.EPS])


def _lion(h, wd_mode, g, p, states):
    (m,) = states
    mixed = h[Hyper.BETA1] * m + h[Hyper.ONE_MINUS_BETA1] * g
    m = h[Hyper.BETA2] * m + h[Hyper.ONE_MINUS_BETA2] * g
    return [m], torch.sign(mixed)


def _ademamix(h, wd_mode, g, p, states):
    fast, slow, v = states
    fast = h[Hyper.BETA1] * fast + h[Hyper.ONE_MINUS_BETA1] * g
    slow = h[Hyper.BETA3] * slow + h[Hyper.ONE_MINUS_BETA3] * g
    v = h[Hyper.BETA2] * v + h[Hyper.ONE_MINUS_BETA2] * (g * g)
    denom = _sqrt(v) * h[Hyper.INV_BIAS_CORRECTION2_SQRT] + h[Hyper.EPS]
    direction = (fast * h[Hyper.INV_BIAS_CORRECTION1] + h[Hyper.ALPHA] * slow) / denom
    return [fast, slow, v], direction


RULES = {
    Rule.ADAM: _adam,
    Rule.SGD: _sgd,
    Rule.RMSPROP: _rmsprop,
    Rule.ADAGRAD: _adagrad,
    Rule.LION: _lion,
    Rule.ADEMAMIX: _ademamix,
}


def _load_state(state: torch.Tensor, absmax: torch.Tensor | None, codebook: Codebook | None, blocksize: int) -> torch.Tensor:
    if state.dtype == torch.float32:
        return state.reshape(-1).clone()
    n = state.numel()
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


def fused_step(
    rule: int,
    wd_mode: int,
    hyper: Sequence[float],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    absmaxes: Sequence[Sequence[torch.Tensor]],
    codebooks: Sequence[Codebook | None],
    grad_scale: torch.Tensor | None,
    update_scale: torch.Tensor | None,
    norm_out: torch.Tensor | None,
    nonfinite_count: torch.Tensor | None,
    segment_offsets: Sequence[int],
    blocksize: int,
    seed: int | None,
) -> None:
    h = _Constants(hyper)
    update = RULES[Rule(rule)]
    slots = [k for k in range(len(states)) if len(states[k])]
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if param.numel() == 0:
            if norm_out is not None:
                norm_out[index] = 0.0
            continue
        p = param.reshape(-1).float()
        g = grad.reshape(-1).float()
        if grad_scale is not None:
            g = g * grad_scale[index]
        finite = torch.isfinite(g)
        g = torch.where(finite, g, torch.zeros_like(g))
        absmax_of = [absmaxes[k][index] if len(absmaxes[k]) else None for k in slots]
        old = [_load_state(states[k][index], absmax_of[i], codebooks[k], blocksize) for i, k in enumerate(slots)]
        new, direction = update(h, WeightDecay(wd_mode), g, p, old)
        if norm_out is not None:
            norm_out[index] = (direction.double() ** 2)[finite].sum()
            continue
        lr = h[Hyper.LR] if update_scale is None else torch.tensor(h[Hyper.LR], dtype=torch.float32) * update_scale[index]
        stepped = p * h[Hyper.DECAY] - lr * direction
        stepped = torch.where(finite, stepped, p)
        if seed is not None and param.dtype == torch.bfloat16:
            param.view(-1).copy_(round_bf16_stochastically(stepped, seed, int(segment_offsets[index])))
        else:
            param.view(-1).copy_(stepped)
        for i, k in enumerate(slots):
            kept = torch.where(finite, new[i], old[i])
            _store_state(kept, states[k][index], absmax_of[i], codebooks[k], blocksize)
        if nonfinite_count is not None:
            nonfinite_count += (~finite).sum()
