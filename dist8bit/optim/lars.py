"""LARS (You et al. 2017): momentum SGD scaled per parameter by a trust ratio.

    buffer <- momentum * buffer + (g + weight_decay * p)
    p <- p - lr * trust * buffer,  trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p||)

(trust = 1 where a norm is 0). The norms come from the parameter and its
gradient, so one kernel pass suffices. The trust ratio scales the step rather
than entering the momentum buffer, so the buffer stays a plain SGD momentum
that converts to and from torch.optim.SGD checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .norms import SegmentNorms
from .sgd import SGD
from .variants import FixedSettings


class LARS(SGD):
    """LARS (You et al. 2017) with a per-parameter trust ratio; 8-bit momentum with optim_bits=8.

        buffer <- momentum * buffer + (g + weight_decay * p)
        p <- p - lr * trust * buffer,
        trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p||)   (1 where a norm is 0)

    Reference: dist8bit/backends/reference_optim.py (_sgd) for the buffer.
    """

    uses_parameter_norms = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        **options: Any,
    ) -> None:
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient!r}")
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, **options)
        for group in self.param_groups:
            group.setdefault("trust_coefficient", trust_coefficient)
        self.defaults["trust_coefficient"] = trust_coefficient

    def trust_ratio(self, config: dict[str, Any], norms: SegmentNorms) -> torch.Tensor:
        """trust_coefficient * ||p|| / (||g|| + weight_decay * ||p||) per segment, 1 where a norm is 0."""
        denominator = norms.grads + config["weight_decay"] * norms.params
        usable = (norms.params > 0) & (norms.grads > 0)
        return torch.where(usable, config["trust_coefficient"] * norms.params / denominator, torch.ones_like(norms.params))


class LARS8bit(FixedSettings, LARS, optim_bits=8):
    """LARS with an 8-bit block-wise momentum. Rule and arguments: LARS."""


class LARS32bit(FixedSettings, LARS, optim_bits=32):
    """LARS with a 32-bit momentum. Rule and arguments: LARS."""
