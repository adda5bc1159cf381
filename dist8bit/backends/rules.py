"""Update rules: which states each algorithm keeps and the per-step constants.

This is the contract between the optimizer classes and the fused kernels.
The element-wise math itself lives in two mirrored places that tests hold
bit-identical: dist8bit/backends/reference_optim.py (plain PyTorch) and
csrc/common/update_rules.h (C++ for the CPU and CUDA kernels).

Every rule produces a *direction* d per element and then

    p <- p * decay - (lr * update_scale) * d

where decay = 1 - lr * weight_decay for decoupled weight decay (else 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class Rule(IntEnum):
    """Kernel ids; the values are shared with csrc/common/update_rules.h."""

    ADAM = 0  # Adam, AdamW, LAMB
    SGD = 1  # SGD with momentum / nesterov, LARS
    RMSPROP = 2
    ADAGRAD = 3
    LION = 4
    ADEMAMIX = 5


class WeightDecay(IntEnum):
    """How weight decay enters the update (shared with the kernels)."""

    L2 = 0  # g <- g + wd * p (torch Adam, SGD, RMSprop, Adagrad)
    DECOUPLED = 1  # p <- p * (1 - lr * wd) (AdamW, Lion, AdEMAMix)
    IN_DIRECTION = 2  # d <- d + wd * p (LAMB: decay joins the trust-ratio-scaled step)


class Hyper(IntEnum):
    """Slots of the float32 constant vector passed to every fused step."""

    LR = 0
    BETA1 = 1
    ONE_MINUS_BETA1 = 2
    BETA2 = 3
    ONE_MINUS_BETA2 = 4
    BETA3 = 5
    ONE_MINUS_BETA3 = 6
    EPS = 7
    WEIGHT_DECAY = 8
    DECAY = 9  # 1 - lr * weight_decay when decoupled, else 1
    INV_BIAS_CORRECTION1 = 10
    INV_BIAS_CORRECTION2_SQRT = 11
    ALPHA = 12  # AdEMAMix mixing weight
    MOMENTUM = 13
    ONE_MINUS_DAMPENING = 14
    NESTEROV = 15  # 0 or 1
    FIRST_STEP = 16  # 1 on the first step (SGD's buffer starts as the gradient)


HYPER_SIZE = len(Hyper)


@dataclass(frozen=True)
class StateSpec:
    """One state buffer: its torch-style name and which 8-bit map it uses."""

    name: str
    signed: bool


@dataclass(frozen=True)
class StepConstants:
    """Inputs to `constants()`; derived values are rounded to float32 once, on the host."""

    lr: float
    step: int
    beta1: float = 0.0
    beta2: float = 0.0
    beta3: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    decoupled: bool = False
    bias_correction: bool = True
    alpha: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


def constants(c: StepConstants) -> list[float]:
    """The constant vector, indexed by Hyper, as float64 values exactly representable in float32."""
    import struct

    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    if c.bias_correction:
        bias_correction1 = 1.0 - c.beta1**c.step
        bias_correction2 = 1.0 - c.beta2**c.step
    else:
        bias_correction1 = bias_correction2 = 1.0
    values = [0.0] * HYPER_SIZE
    values[Hyper.LR] = c.lr
    values[Hyper.BETA1] = c.beta1
    values[Hyper.ONE_MINUS_BETA1] = 1.0 - c.beta1
    values[Hyper.BETA2] = c.beta2
    values[Hyper.ONE_MINUS_BETA2] = 1.0 - c.beta2
    values[Hyper.BETA3] = c.beta3
    values[Hyper.ONE_MINUS_BETA3] = 1.0 - c.beta3
    values[Hyper.EPS] = c.eps
    values[Hyper.WEIGHT_DECAY] = c.weight_decay
    values[Hyper.DECAY] = 1.0 - c.lr * c.weight_decay if c.decoupled else 1.0
    values[Hyper.INV_BIAS_CORRECTION1] = 1.0 / bias_correction1 if bias_correction1 > 0 else 1.0
    values[Hyper.INV_BIAS_CORRECTION2_SQRT] = 1.0 / math.sqrt(bias_correction2) if bias_correction2 > 0 else 1.0
    values[Hyper.ALPHA] = c.alpha
    values[Hyper.MOMENTUM] = c.momentum
    values[Hyper.ONE_MINUS_DAMPENING] = 1.0 - c.dampening
    values[Hyper.NESTEROV] = 1.0 if c.nesterov else 0.0
    values[Hyper.FIRST_STEP] = 1.0 if c.step == 1 else 0.0
    return [f32(v) for v in values]
