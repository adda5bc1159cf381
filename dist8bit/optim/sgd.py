"""SGD with momentum / nesterov (torch.optim.SGD semantics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants
from .optimizer import Optimizer8bit, check_non_negative
from .variants import with_fixed

MOMENTUM_STATE = (StateSpec("momentum_buffer", signed=True),)


class SGD(Optimizer8bit):
    """SGD; with momentum > 0 the momentum buffer is 8-bit under optim_bits=8."""

    rule = Rule.SGD

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **options: Any,
    ) -> None:
        check_non_negative(momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        super().__init__(
            params,
            {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay, "nesterov": nesterov},
            **options,
        )

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return MOMENTUM_STATE if config["momentum"] > 0 else ()

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        return StepConstants(
            lr=config["lr"],
            step=step,
            weight_decay=config["weight_decay"],
            momentum=config["momentum"],
            dampening=config["dampening"],
            nesterov=config["nesterov"],
        )


SGD8bit = with_fixed(SGD, "SGD8bit", "SGD with an 8-bit block-wise momentum buffer.", optim_bits=8)
SGD32bit = with_fixed(SGD, "SGD32bit", "SGD with a 32-bit momentum buffer.", optim_bits=32)
