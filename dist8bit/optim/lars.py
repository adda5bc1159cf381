"""LARS (You et al. 2017, Algorithm 1): momentum SGD with a per-layer local learning rate.

The local rate lr * trust enters the momentum, as in the paper:

    trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p||)   (1 where a norm is 0)
    buffer <- momentum * buffer + lr * trust * (g + weight_decay * p)
    p <- p - buffer

`trust_ratio_in="step"` keeps the variant earlier dist8bit releases shipped:
a plain SGD momentum buffer, with the trust ratio scaling only the step
(p <- p - lr * trust * buffer). Its buffer is a torch.optim.SGD momentum
buffer, so that variant is the one whose checkpoints convert to and from
torch SGD. bitsandbytes' LARS is neither: it clips the update norm instead
(dist8bit.compat.bitsandbytes.optim.LARS).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..backends.rules import Rule
from .norms import SegmentNorms
from .sgd import SGD
from .variants import FixedSettings

TRUST_RATIO_PLACEMENTS = ("momentum", "step")


class LARS(SGD):
    """LARS (You et al. 2017) with the local rate inside the momentum; 8-bit momentum with optim_bits=8.

        trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p||)   (1 where a norm is 0)
        buffer <- momentum * buffer + (1 - dampening) * lr * trust * (g + weight_decay * p)
                  (the first step stores lr * trust * (g + weight_decay * p))
        p <- p - buffer

    trust_ratio_in="step": buffer <- momentum * buffer + (1 - dampening) * (g + weight_decay * p),
    p <- p - lr * trust * buffer.
    Reference: dist8bit/backends/reference_optim.py (_lars; _sgd for "step").
    """

    uses_parameter_norms = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, trust_coefficient: float = 0.001,
                 trust_ratio_in: str = "momentum", **options: Any) -> None:  # fmt: skip
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient!r}")
        _check_placement(trust_ratio_in, options.get("max_unorm", 0.0))
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, **options)
        for group in self.param_groups:
            group.setdefault("trust_coefficient", trust_coefficient)
            group.setdefault("trust_ratio_in", trust_ratio_in)
        self.defaults.update(trust_coefficient=trust_coefficient, trust_ratio_in=trust_ratio_in)

    def kernel_rule(self, config: dict[str, Any]) -> Rule:
        _check_placement(config["trust_ratio_in"], config["max_unorm"])
        return Rule.LARS if config["trust_ratio_in"] == "momentum" else Rule.SGD

    def trust_ratio(self, config: dict[str, Any], norms: SegmentNorms) -> torch.Tensor:
        """trust_coefficient * ||p|| / (||g|| + weight_decay * ||p||) per segment, 1 where a norm is 0."""
        denominator = norms.grads + config["weight_decay"] * norms.params
        usable = (norms.params > 0) & (norms.grads > 0)
        return torch.where(usable, config["trust_coefficient"] * norms.params / denominator, torch.ones_like(norms.params))


def _check_placement(trust_ratio_in: str, max_unorm: float) -> None:
    if trust_ratio_in not in TRUST_RATIO_PLACEMENTS:
        raise ValueError(f"trust_ratio_in must be one of {TRUST_RATIO_PLACEMENTS}, got {trust_ratio_in!r}")
    if trust_ratio_in == "momentum" and max_unorm > 0:
        raise ValueError(
            "LARS: max_unorm clips the step by its norm, but with trust_ratio_in='momentum' the step is the "
            "momentum buffer itself; pass trust_ratio_in='step', or use dist8bit.compat.bitsandbytes.optim.LARS "
            "for bitsandbytes' norm-clipped LARS"
        )


class LARS8bit(FixedSettings, LARS, optim_bits=8):
    """LARS with an 8-bit block-wise momentum. Rule and arguments: LARS."""


class LARS4bit(FixedSettings, LARS, optim_bits=4):
    """LARS with a 4-bit block-wise momentum. Rule and arguments: LARS."""


class LARS32bit(FixedSettings, LARS, optim_bits=32):
    """LARS with a 32-bit momentum. Rule and arguments: LARS."""
