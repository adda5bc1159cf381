"""DeepSpeed ZeRO's partition arithmetic (0.19): which elements of which parameter a rank's flat buffer holds.

The one copy of these formulas. The training glue (`deepspeed_segments.py`) turns a rank's spans
into optimizer segments; the checkpoint converter (`checkpoint/deepspeed_layout.py`) recomputes
the flats of any world size from the parameter sizes. Pure integer arithmetic (no DeepSpeed, no
torch), checked against DeepSpeed's own partitioning code in tests/test_deepspeed.py.

ZeRO 1/2 and the BF16 optimizer: a param group's parameters are concatenated, padded to a
multiple of ALIGNMENT_FACTOR x world size, and rank r holds [r P, (r + 1) P) of that, with
P = padded size / world size. (round_robin_gradients off, no parameter_alignment padding.)

ZeRO-3: every parameter is split on its own into world-size partitions of ceil(numel / world)
elements, the last ones padded; a group is cut into sub-groups of about `sub_group_size`
partition elements, and rank r's flat for a sub-group is its parameters' r-th partitions, one
after another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALIGNMENT_FACTOR = 2  # DeepSpeed's nccl_start_alignment_factor: ZeRO 1/2 partitions start on 4-byte boundaries
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default


@dataclass(frozen=True)
class Span:
    """Elements [start, start + length) of a flat are elements [param_offset, ...) of parameter `index`
    (its position in the list the span was computed from)."""

    index: int
    start: int
    length: int
    param_offset: int


def zero12_partition_numel(numels: Sequence[int], world: int) -> int:
    """Elements of each rank's flat for one param group (padding included)."""
    alignment = ALIGNMENT_FACTOR * world
    return math.ceil(sum(numels) / alignment) * alignment // world


def zero12_spans(numels: Sequence[int], world: int, rank: int) -> list[Span]:
    """The pieces of the group's parameters that rank `rank`'s flat holds, in flat order."""
    partition = zero12_partition_numel(numels, world)
    low, high = rank * partition, (rank + 1) * partition
    spans, start = [], 0
    for index, numel in enumerate(numels):
        first, last = max(start, low), min(start + numel, high)
        if first < last:
            spans.append(Span(index, first - low, last - first, first - start))
        start += numel
    return spans


def zero3_partition_numel(numel: int, world: int) -> int:
    """Elements of each rank's partition of one parameter (DeepSpeed's `ds_tensor.ds_numel`)."""
    return math.ceil(numel / world)


def zero3_spans(numels: Sequence[int], partitions: Sequence[int], ranks: Sequence[int]) -> tuple[list[Span], int]:
    """One ZeRO-3 sub-group's flat: parameter i contributes its `ranks[i]`-th partition of
    `partitions[i]` elements. Returns the spans of real elements (tail padding excluded) and the
    flat's size (padding included)."""
    spans, offset = [], 0
    for index, (numel, partition, rank) in enumerate(zip(numels, partitions, ranks, strict=True)):
        first = rank * partition
        length = min(partition, numel - first)
        if length > 0:  # ranks past the end hold only padding
            spans.append(Span(index, offset, length, first))
        offset += partition
    return spans, offset


def zero3_sub_groups(partitions: Sequence[int], sub_group_size: int) -> list[range]:
    """DeepSpeed's rule: add parameters (by index) until their partitions reach sub_group_size."""
    if sub_group_size >= sum(partitions):
        return [range(len(partitions))]
    groups, first, size = [], 0, 0
    for index, partition in enumerate(partitions):
        size += partition
        if size >= sub_group_size or index == len(partitions) - 1:
            groups.append(range(first, index + 1))
            first, size = index + 1, 0
    return groups
