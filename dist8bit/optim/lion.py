"""Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay
from .optimizer import Optimizer8bit, check_betas, hyper_parameters
from .variants import FixedSettings

LION_STATE = (StateSpec("exp_avg", signed=True),)


class Lion(Optimizer8bit):
    """Lion (Chen et al. 2023); its single momentum goes 8-bit (signed map).

        d <- sign(b1 * m + (1 - b1) * g)
        m <- b2 * m + (1 - b2) * g
        p <- p * (1 - lr * weight_decay) - lr * d

    Reference: dist8bit/backends/reference_optim.py (_lion), csrc/common/update_rules.h.
    """

    rule = Rule.LION
    weight_decay_kind = WeightDecay.DECOUPLED

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, **options: Any) -> None:  # fmt: skip
        defaults = hyper_parameters(lr=lr, betas=check_betas(betas, 2), weight_decay=weight_decay)
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return LION_STATE

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        beta1, beta2 = config["betas"]
        return StepConstants.from_group(config, step, "lr", "weight_decay", beta1=beta1, beta2=beta2, decoupled=True)


class Lion8bit(FixedSettings, Lion, optim_bits=8):
    """Lion with an 8-bit block-wise momentum. Rule and arguments: Lion."""


class Lion4bit(FixedSettings, Lion, optim_bits=4):
    """Lion with a 4-bit block-wise momentum. Rule and arguments: Lion."""


class Lion32bit(FixedSettings, Lion, optim_bits=32):
    """Lion with a 32-bit momentum. Rule and arguments: Lion."""
