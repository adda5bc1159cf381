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
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Rule(IntEnum):
    """Kernel ids; the values are shared with csrc/common/update_rules.h."""

    ADAM = 0  # Adam, AdamW, LAMB
    SGD = 1  # SGD with momentum / nesterov; LARS with trust_ratio_in="step"
    RMSPROP = 2
    ADAGRAD = 3
    LION = 4
    ADEMAMIX = 5
    LARS = 6  # SGD whose momentum input is (lr * update_scale) * g; the write then uses rate 1


class WeightDecay(IntEnum):
    """How weight decay enters the update (shared with the kernels)."""

    L2 = 0  # g <- g + wd * p (torch Adam, SGD, RMSprop, Adagrad)
    DECOUPLED = 1  # p <- p * (1 - lr * wd) (AdamW, Lion, AdEMAMix)
    IN_DIRECTION = 2  # d <- d + wd * p (LAMB: decay joins the trust-ratio-scaled step)


class HyperSlot(IntEnum):
    """Where each constant sits in StepConstants.vector() (C++: enum Hyper in update_rules.h)."""

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


@dataclass(frozen=True)
class StateSpec:
    """One state buffer: its torch-style name and which 8-bit map it uses."""

    name: str
    signed: bool


@dataclass(frozen=True)
class StepConstants:
    """The constants of one step, by name: what an optimizer's step_constants() returns.

    The kernels read them as vector(): float32 values indexed by HyperSlot
    (C++: struct StepConstants), with the derived ones (decay, bias
    corrections) computed and rounded to float32 once, here on the host, so
    that every backend starts from the same bits.
    """

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

    @classmethod
    def from_group(cls, group: Mapping[str, Any], step: int, *names: str, **values: Any) -> StepConstants:
        """The constants `names` read from a param group's settings of the same name, plus `values`."""
        return cls(step=step, **{name: group[name] for name in names}, **values)

    def vector(self) -> tuple[float, ...]:
        """The float32 constant vector, indexed by HyperSlot, as Python floats exactly representable in float32."""
        if self.bias_correction:
            bias_correction1 = 1.0 - self.beta1**self.step
            bias_correction2 = 1.0 - self.beta2**self.step
        else:
            bias_correction1 = bias_correction2 = 1.0
        values = {
            HyperSlot.LR: self.lr,
            HyperSlot.BETA1: self.beta1,
            HyperSlot.ONE_MINUS_BETA1: 1.0 - self.beta1,
            HyperSlot.BETA2: self.beta2,
            HyperSlot.ONE_MINUS_BETA2: 1.0 - self.beta2,
            HyperSlot.BETA3: self.beta3,
            HyperSlot.ONE_MINUS_BETA3: 1.0 - self.beta3,
            HyperSlot.EPS: self.eps,
            HyperSlot.WEIGHT_DECAY: self.weight_decay,
            HyperSlot.DECAY: 1.0 - self.lr * self.weight_decay if self.decoupled else 1.0,
            HyperSlot.INV_BIAS_CORRECTION1: 1.0 / bias_correction1 if bias_correction1 > 0 else 1.0,
            HyperSlot.INV_BIAS_CORRECTION2_SQRT: 1.0 / math.sqrt(bias_correction2) if bias_correction2 > 0 else 1.0,
            HyperSlot.ALPHA: self.alpha,
            HyperSlot.MOMENTUM: self.momentum,
            HyperSlot.ONE_MINUS_DAMPENING: 1.0 - self.dampening,
            HyperSlot.NESTEROV: 1.0 if self.nesterov else 0.0,
            HyperSlot.FIRST_STEP: 1.0 if self.step == 1 else 0.0,
        }
        return tuple(_float32(values[slot]) for slot in HyperSlot)


def _float32(x: float) -> float:
    """x rounded to float32 (round to nearest even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]
