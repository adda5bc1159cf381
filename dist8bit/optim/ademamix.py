"""AdEMAMix (Pagliardini et al. 2024): Adam plus a slow EMA of gradients.

    m1 <- b1 m1 + (1-b1) g ;  m2 <- b3 m2 + (1-b3) g ;  v <- b2 v + (1-b2) g^2
    p  <- p (1 - lr wd) - lr (m1 / bc1 + alpha m2) / (sqrt(v / bc2) + eps)

with optional warm-ups of alpha (linear over t_alpha steps) and b3 (the
paper's schedule over t_beta3 steps), computed on the host each step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay
from .optimizer import Optimizer8bit, check_betas, hyper_parameters
from .variants import FixedSettings

ADEMAMIX_STATES = (
    StateSpec("exp_avg", signed=True),
    StateSpec("exp_avg_slow", signed=True),
    StateSpec("exp_avg_sq", signed=False),
)


def alpha_at(step: int, alpha: float, t_alpha: int | None) -> float:
    return alpha if not t_alpha else min(step * alpha / t_alpha, alpha)


def beta3_at(step: int, beta1: float, beta3: float, t_beta3: int | None) -> float:
    if not t_beta3:
        return beta3
    fraction = min(step / t_beta3, 1.0)
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log_beta1 * log_beta3 / ((1 - fraction) * log_beta3 + fraction * log_beta1)), beta3)


class AdEMAMix(Optimizer8bit):
    """AdEMAMix (Pagliardini et al. 2024); all three states go 8-bit with optim_bits=8.

        m1 <- b1 * m1 + (1 - b1) * g;  m2 <- b3 * m2 + (1 - b3) * g;  v <- b2 * v + (1 - b2) * g * g
        p <- p * (1 - lr * weight_decay) - lr * (m1 / bc1 + alpha * m2) / (sqrt(v) / sqrt(bc2) + eps)

    alpha and b3 may warm up (see the module doc). Reference:
    dist8bit/backends/reference_optim.py (_ademamix), csrc/common/update_rules.h.
    """

    rule = Rule.ADEMAMIX
    weight_decay_kind = WeightDecay.DECOUPLED

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, **options: Any) -> None:  # fmt: skip
        defaults = hyper_parameters(
            lr=lr, betas=check_betas(betas, 3), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps, weight_decay=weight_decay
        )
        if defaults["betas"][0] == 0.0 and t_beta3:
            raise ValueError("the beta3 warm-up (t_beta3) needs betas[0] > 0")
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADEMAMIX_STATES

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        beta1, beta2, beta3 = config["betas"]
        beta3 = beta3_at(step, beta1, beta3, config["t_beta3"])
        alpha = alpha_at(step, config["alpha"], config["t_alpha"])
        return StepConstants.from_group(
            config, step, "lr", "eps", "weight_decay", beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, decoupled=True
        )


class AdEMAMix8bit(FixedSettings, AdEMAMix, optim_bits=8):
    """AdEMAMix with 8-bit block-wise states. Rule and arguments: AdEMAMix."""


class AdEMAMix4bit(FixedSettings, AdEMAMix, optim_bits=4):
    """AdEMAMix with 4-bit block-wise states. Rule and arguments: AdEMAMix."""


class AdEMAMix32bit(FixedSettings, AdEMAMix, optim_bits=32):
    """AdEMAMix with 32-bit states. Rule and arguments: AdEMAMix."""
