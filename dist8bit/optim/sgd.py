"""SGD with momentum / nesterov (torch.optim.SGD semantics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants
from .optimizer import Optimizer8bit, hyper_parameters
from .variants import FixedSettings

MOMENTUM_STATE = (StateSpec("momentum_buffer", signed=True),)


class SGD(Optimizer8bit):
    """SGD; with momentum > 0 the momentum buffer is 8-bit under optim_bits=8.

        g <- g + weight_decay * p
        buffer <- g on the first step, else momentum * buffer + (1 - dampening) * g
        d <- g + momentum * buffer  (nesterov)  or  buffer
        p <- p - lr * d

    Reference: dist8bit/backends/reference_optim.py (_sgd), csrc/common/update_rules.h.
    """

    rule = Rule.SGD

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, **options: Any) -> None:  # fmt: skip
        defaults = hyper_parameters(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return MOMENTUM_STATE if config["momentum"] > 0 else ()

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        return StepConstants.from_group(config, step, "lr", "weight_decay", "momentum", "dampening", "nesterov")


class SGD8bit(FixedSettings, SGD, optim_bits=8):
    """SGD with an 8-bit block-wise momentum buffer. Rule and arguments: SGD."""


class SGD4bit(FixedSettings, SGD, optim_bits=4):
    """SGD with a 4-bit block-wise momentum buffer. Rule and arguments: SGD."""


class SGD32bit(FixedSettings, SGD, optim_bits=32):
    """SGD with a 32-bit momentum buffer. Rule and arguments: SGD."""
