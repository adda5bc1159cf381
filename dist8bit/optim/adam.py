"""Adam and AdamW (torch.optim semantics; bitsandbytes-compatible arguments)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay
from .optimizer import Optimizer8bit, check_betas, hyper_parameters
from .variants import FixedSettings

ADAM_STATES = (StateSpec("exp_avg", signed=True), StateSpec("exp_avg_sq", signed=False))


class Adam(Optimizer8bit):
    """Adam (torch.optim.Adam semantics); 8-bit states with optim_bits=8.

    Per element, at step t (bc1 = 1 - b1^t, bc2 = 1 - b2^t):

        g <- g + weight_decay * p                        (Adam: L2; AdamW: see below)
        m <- b1 * m + (1 - b1) * g
        v <- b2 * v + (1 - b2) * g * g
        d <- (m / (sqrt(v) * (1 / sqrt(bc2)) + eps)) * (1 / bc1)
        p <- p * decay - lr * d                          (decay = 1; AdamW: 1 - lr * weight_decay)

    Every backend rounds these float32 operations the same way:
    csrc/common/update_rules.h, and in plain PyTorch
    dist8bit/backends/reference_optim.py (_adam). First moment: signed dynamic
    map; second moment: unsigned dynamic map; both block-wise (blocksize 256).
    optim_bits=4 (Li, Chen, Zhu 2023): the signed 4-bit dynamic map for the first
    moment, the 4-bit linear map without zero for the second, blocksize 128.
    Parameters smaller than min_8bit_size elements keep 32-bit state.
    """

    rule = Rule.ADAM
    decoupled = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, **options: Any) -> None:  # fmt: skip
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by dist8bit's Adam")
        defaults = hyper_parameters(lr=lr, betas=check_betas(betas, 2), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, **options)

    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_STATES

    def weight_decay_mode(self, config: dict[str, Any]) -> WeightDecay:
        return WeightDecay.DECOUPLED if self.decoupled else WeightDecay.L2

    def implied_torch_flags(self) -> dict[str, Any]:
        return {"decoupled_weight_decay": self.decoupled, "bias_correction": True}

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        beta1, beta2 = config["betas"]
        return StepConstants.from_group(
            config, step, "lr", "eps", "weight_decay", beta1=beta1, beta2=beta2, decoupled=self.decoupled
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW semantics).

    The rule of Adam without the L2 term, and p <- p * (1 - lr * weight_decay) - lr * d.
    """

    decoupled = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs: Any):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class Adam8bit(FixedSettings, Adam, optim_bits=8):
    """Adam with 8-bit block-wise states. Rule and arguments: Adam."""


class Adam4bit(FixedSettings, Adam, optim_bits=4):
    """Adam with 4-bit block-wise states (Li, Chen, Zhu 2023 maps, blocksize 128). Rule and arguments: Adam."""


class Adam32bit(FixedSettings, Adam, optim_bits=32):
    """Adam with 32-bit states. Rule and arguments: Adam."""


class AdamW8bit(FixedSettings, AdamW, optim_bits=8):
    """AdamW with 8-bit block-wise states. Rule and arguments: AdamW."""


class AdamW4bit(FixedSettings, AdamW, optim_bits=4):
    """AdamW with 4-bit block-wise states (Li, Chen, Zhu 2023 maps, blocksize 128). Rule and arguments: AdamW."""


class AdamW32bit(FixedSettings, AdamW, optim_bits=32):
    """AdamW with 32-bit states. Rule and arguments: AdamW."""
