"""RMSprop (torch.optim.RMSprop semantics, without `centered`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants
from .optimizer import Optimizer8bit, check_non_negative
from .variants import with_fixed

SQUARE_AVG = StateSpec("square_avg", signed=False)
MOMENTUM = StateSpec("momentum_buffer", signed=True)


class RMSprop(Optimizer8bit):
    """RMSprop; square_avg (unsigned map) and the optional momentum buffer go 8-bit."""

    rule = Rule.RMSPROP

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        **options: Any,
    ) -> None:
        if centered:
            raise ValueError("centered=True is not supported by dist8bit's RMSprop")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        check_non_negative(eps=eps, weight_decay=weight_decay, momentum=momentum)
        super().__init__(
            params,
            {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay, "momentum": momentum, "centered": False},
            **options,
        )

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (SQUARE_AVG, MOMENTUM) if config["momentum"] > 0 else (SQUARE_AVG,)

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        # The rule reads alpha from the beta2 slots (an EMA of g^2 like Adam's).
        return StepConstants(
            lr=config["lr"],
            step=step,
            beta2=config["alpha"],
            eps=config["eps"],
            weight_decay=config["weight_decay"],
            momentum=config["momentum"],
        )


RMSprop8bit = with_fixed(RMSprop, "RMSprop8bit", "RMSprop with 8-bit block-wise states.", optim_bits=8)
RMSprop32bit = with_fixed(RMSprop, "RMSprop32bit", "RMSprop with 32-bit states.", optim_bits=32)
