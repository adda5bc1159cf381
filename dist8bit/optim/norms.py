"""Per-segment norms and the step scales built from them.

Trust ratios (LAMB, LARS), max_unorm and percentile clipping all scale a
whole parameter's step by a ratio of L2 norms. The norms are computed per
segment, each at most once per step, and only when a rule asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property

import torch

HISTORY = 100  # steps of gradient norms kept for percentile clipping


def l2_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """float32 L2 norm of each tensor, stacked.

    Accumulated and returned in float32 whatever the tensors' dtype: a
    bfloat16 norm is off by up to 0.4%, which would bend trust ratios,
    max_unorm and percentile clipping for bf16 parameters."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


class SegmentNorms:
    """The norms one step of a batch of segments may need, computed lazily and once.

    `direction_sums` runs the fused kernel in its norm mode (it writes
    nothing and returns sum(d^2) per segment, float64): an extra pass over
    the states that only LAMB and max_unorm pay for.
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], direction_sums: Callable[[], torch.Tensor]) -> None:
        self._params, self._grads, self._direction_sums = params, grads, direction_sums

    @cached_property
    def params(self) -> torch.Tensor:
        """||p|| per segment."""
        return l2_norms(self._params)

    @cached_property
    def grads(self) -> torch.Tensor:
        """||g|| per segment (before any gradient scaling)."""
        return l2_norms(self._grads)

    @cached_property
    def directions(self) -> torch.Tensor:
        """||d|| per segment: the rule's direction, before lr and the step scale."""
        return self._direction_sums().sqrt().float()


def clip_update_norm(max_unorm: float, param_norms: torch.Tensor, update_norms: torch.Tensor) -> torch.Tensor:
    """Scale that limits each update's norm to max_unorm * ||p|| (bitsandbytes' max_unorm)."""
    limit = max_unorm * param_norms
    return torch.where(update_norms > limit, limit / update_norms, torch.ones_like(update_norms))


def percentile_clip(histories: list[torch.Tensor], grads: list[torch.Tensor], step: int, percentile: int) -> torch.Tensor:
    """Gradient scale clipping each norm to the given percentile of its last 100 norms."""
    norms = l2_norms(grads)
    slot = (step - 1) % HISTORY
    stacked = torch.stack(histories)
    stacked[:, slot] = norms
    torch._foreach_copy_(histories, list(stacked.unbind(0)))
    observed = min(step, HISTORY)
    rank = max(math.ceil(percentile / 100 * observed) - 1, 0)
    clip_value = torch.sort(stacked, dim=1).values[:, rank]
    return torch.where(norms > clip_value, clip_value / norms, torch.ones_like(norms))
