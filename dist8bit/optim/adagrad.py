"""Adagrad (torch.optim.Adagrad semantics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants
from .optimizer import Optimizer8bit, hyper_parameters
from .variants import FixedSettings

SUM = (StateSpec("sum", signed=False),)


class Adagrad(Optimizer8bit):
    """Adagrad; the squared-gradient sum goes 8-bit (unsigned dynamic map) or 4-bit (linear map without zero).

        g <- g + weight_decay * p
        sum <- sum + g * g
        p <- p - lr_t * g / (sqrt(sum) + eps)      (lr_t = lr / (1 + (t - 1) * lr_decay))

    Reference: dist8bit/backends/reference_optim.py (_adagrad), csrc/common/update_rules.h.
    """

    rule = Rule.ADAGRAD

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, **options: Any) -> None:  # fmt: skip
        defaults = hyper_parameters(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value, eps=eps
        )
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return SUM

    def initial_state_value(self, config: dict[str, Any]) -> float:
        return float(config["initial_accumulator_value"])

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        decayed_lr = config["lr"] / (1 + (step - 1) * config["lr_decay"])
        return StepConstants.from_group(config, step, "eps", "weight_decay", lr=decayed_lr)


class Adagrad8bit(FixedSettings, Adagrad, optim_bits=8):
    """Adagrad with an 8-bit block-wise accumulator. Rule and arguments: Adagrad."""


class Adagrad4bit(FixedSettings, Adagrad, optim_bits=4):
    """Adagrad with a 4-bit block-wise accumulator (linear map without zero). Rule and arguments: Adagrad."""


class Adagrad32bit(FixedSettings, Adagrad, optim_bits=32):
    """Adagrad with a 32-bit accumulator. Rule and arguments: Adagrad."""
