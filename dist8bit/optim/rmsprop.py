"""RMSprop (torch.optim.RMSprop semantics, without `centered`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants
from .optimizer import Optimizer8bit, hyper_parameters
from .variants import FixedSettings

SQUARE_AVG = StateSpec("square_avg", signed=False)
MOMENTUM = StateSpec("momentum_buffer", signed=True)


class RMSprop(Optimizer8bit):
    """RMSprop; square_avg (unsigned map) and the optional momentum buffer go 8-bit.

        g <- g + weight_decay * p
        square_avg <- alpha * square_avg + (1 - alpha) * g * g
        d <- g / (sqrt(square_avg) + eps), or with momentum:
             buffer <- momentum * buffer + g / (sqrt(square_avg) + eps);  d <- buffer
        p <- p - lr * d

    Reference: dist8bit/backends/reference_optim.py (_rmsprop), csrc/common/update_rules.h.
    """

    rule = Rule.RMSPROP

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, **options: Any) -> None:  # fmt: skip
        if centered:
            raise ValueError("centered=True is not supported by dist8bit's RMSprop")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        defaults = hyper_parameters(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=False)
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (SQUARE_AVG, MOMENTUM) if config["momentum"] > 0 else (SQUARE_AVG,)

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        # The rule reads alpha from the beta2 slots (an EMA of g^2 like Adam's).
        return StepConstants.from_group(config, step, "lr", "eps", "weight_decay", "momentum", beta2=config["alpha"])


class RMSprop8bit(FixedSettings, RMSprop, optim_bits=8):
    """RMSprop with 8-bit block-wise states. Rule and arguments: RMSprop."""


class RMSprop4bit(FixedSettings, RMSprop, optim_bits=4):
    """RMSprop with 4-bit block-wise states. Rule and arguments: RMSprop."""


class RMSprop32bit(FixedSettings, RMSprop, optim_bits=32):
    """RMSprop with 32-bit states. Rule and arguments: RMSprop."""
