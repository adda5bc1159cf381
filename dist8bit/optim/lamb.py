"""LAMB (You et al. 2019): Adam directions scaled per parameter by a trust ratio.

    d = m_hat / (sqrt(v_hat) + eps) + weight_decay * p
    p <- p - lr * (||p|| / ||d||) * d        (ratio 1 where either norm is 0)

The trust ratio needs ||d|| before any state is written, so a LAMB step runs
the fused kernel twice: once to reduce ||d|| per segment (nothing written),
once to apply. Both passes compute d identically, on the 8-bit path too
(bitsandbytes 0.50 dropped the trust ratio from its 8-bit LAMB).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay
from .adam import ADAM_STATES
from .norms import SegmentNorms
from .optimizer import Optimizer8bit, check_betas, hyper_parameters
from .variants import FixedSettings


class LAMB(Optimizer8bit):
    """LAMB (You et al. 2019) with a real per-parameter trust ratio; 8-bit states with optim_bits=8.

        d <- Adam's direction (bias-corrected m / (sqrt(v) + eps)) + weight_decay * p
        p <- p - lr * (||p|| / ||d||) * d         (ratio 1 where either norm is 0)

    ||d|| comes from a first kernel pass that writes nothing (see the module
    doc). Reference: dist8bit/backends/reference_optim.py (_adam) for d.
    """

    rule = Rule.ADAM
    uses_parameter_norms = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adam_w_mode: bool = True, **options: Any) -> None:  # fmt: skip
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by dist8bit's LAMB")
        defaults = hyper_parameters(
            lr=lr,
            betas=check_betas(betas, 2),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            adam_w_mode=adam_w_mode,
        )
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_STATES

    def weight_decay_mode(self, config: dict[str, Any]) -> WeightDecay:
        return WeightDecay.IN_DIRECTION if config["adam_w_mode"] else WeightDecay.L2

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        beta1, beta2 = config["betas"]
        return StepConstants.from_group(config, step, "lr", "eps", "weight_decay", "bias_correction", beta1=beta1, beta2=beta2)

    def trust_ratio(self, config: dict[str, Any], norms: SegmentNorms) -> torch.Tensor:
        """||p|| / ||d|| per segment, 1 where either norm is 0."""
        usable = (norms.params > 0) & (norms.directions > 0)
        return torch.where(usable, norms.params / norms.directions, torch.ones_like(norms.params))


class LAMB8bit(FixedSettings, LAMB, optim_bits=8):
    """LAMB with 8-bit block-wise states. Rule and arguments: LAMB."""


class LAMB4bit(FixedSettings, LAMB, optim_bits=4):
    """LAMB with 4-bit block-wise states. Rule and arguments: LAMB."""


class LAMB32bit(FixedSettings, LAMB, optim_bits=32):
    """LAMB with 32-bit states. Rule and arguments: LAMB."""
