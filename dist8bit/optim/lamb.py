"""LAMB (You et al. 2019): Adam directions scaled per parameter by a trust ratio.

    d = m_hat / (sqrt(v_hat) + eps) + weight_decay * p
    p <- p - lr * (||p|| / ||d||) * d        (ratio 1 where either norm is 0)

The trust ratio needs ||d|| before any state is written, so a LAMB step runs
the fused kernel twice: once to reduce ||d|| per segment (nothing written),
once to apply. Both passes compute d identically, on the 8-bit path too
(bitsandbytes 0.50 dropped the trust ratio from its 8-bit LAMB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay
from .adam import ADAM_STATES
from .optimizer import Optimizer8bit, check_betas, check_non_negative, clip_update_norm, parameter_norms
from .variants import FixedSettings


def trust_ratio(param_norms: torch.Tensor, update_norms: torch.Tensor) -> torch.Tensor:
    usable = (param_norms > 0) & (update_norms > 0)
    return torch.where(usable, param_norms / update_norms, torch.ones_like(param_norms))


class LAMB(Optimizer8bit):
    """LAMB (You et al. 2019) with a real per-parameter trust ratio; 8-bit states with optim_bits=8.

        d <- Adam's direction (bias-corrected m / (sqrt(v) + eps)) + weight_decay * p
        p <- p - lr * (||p|| / ||d||) * d         (ratio 1 where either norm is 0)

    ||d|| comes from a first kernel pass that writes nothing (see the module
    doc). Reference: dist8bit/backends/reference_optim.py (_adam) for d.
    """

    rule = Rule.ADAM
    uses_parameter_norms = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        **options: Any,
    ) -> None:
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by dist8bit's LAMB")
        betas = check_betas(betas, 2)
        check_non_negative(eps=eps, weight_decay=weight_decay)
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "bias_correction": bias_correction,
                "adam_w_mode": adam_w_mode,
            },
            **options,
        )

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_STATES

    def weight_decay_mode(self, config: dict[str, Any]) -> WeightDecay:
        return WeightDecay.IN_DIRECTION if config["adam_w_mode"] else WeightDecay.L2

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        beta1, beta2 = config["betas"]
        return StepConstants(
            lr=config["lr"],
            step=step,
            beta1=beta1,
            beta2=beta2,
            eps=config["eps"],
            weight_decay=config["weight_decay"],
            bias_correction=config["bias_correction"],
        )

    def update_scale(
        self,
        config: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        direction_norms: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        param_norms = parameter_norms(params)
        update_norms = direction_norms().sqrt().float()
        scale = trust_ratio(param_norms, update_norms)
        if config["max_unorm"] > 0:
            scale = scale * clip_update_norm(config["max_unorm"], param_norms, update_norms * scale)
        return scale


class LAMB8bit(FixedSettings, LAMB):
    """LAMB with 8-bit block-wise states. Rule and arguments: LAMB."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 8}


class LAMB32bit(FixedSettings, LAMB):
    """LAMB with 32-bit states. Rule and arguments: LAMB."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 32}
