"""Where DeepSpeed ZeRO puts each parameter: the flat buffers of every rank, for any world size.

DeepSpeed 0.19 hands the optimizer flat fp32 buffers ("flats") instead of
parameters; a checkpoint stores each rank's flats. This module recomputes
their layout from the parameter shapes, so a checkpoint can be read as
per-parameter pieces and written for another world size.

ZeRO 1/2 (round_robin_gradients off, no parameter_alignment padding): a
group's parameters, in `param_shapes` order, are concatenated and padded to a
multiple of 2 x world size; rank r's flat is [r P, (r+1) P) of that, with
P = padded size / world size. One flat per group and rank.

ZeRO-3: every parameter is split on its own into world-size partitions of
ceil(numel / world) elements (the last ones padded); a group is cut into
sub-groups of about `sub_group_size` partition elements, and rank r's flat for
a sub-group is its parameters' r-th partitions one after another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGNMENT_FACTOR = 2  # DeepSpeed's nccl_start_alignment_factor: ZeRO 1/2 partitions start on 4-byte boundaries
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + length) of a flat are elements [param_offset, ...) of parameter `name`."""

    name: str
    start: int
    length: int
    param_offset: int


@dataclass(frozen=True)
class Flat:
    """One flat fp32 buffer of one rank (what the optimizer steps as one "parameter")."""

    group: int
    size: int  # elements, padding included
    pieces: tuple[Piece, ...]

    @property
    def used(self) -> int:
        """End of the last piece: ZeRO 1/2 saves the fp32 weights up to here (its padding is at the end)."""
        return max((p.start + p.length for p in self.pieces), default=0)


@dataclass(frozen=True)
class ZeroLayout:
    """Parameter names and sizes per group, and how a ZeRO stage lays them out on `world` ranks."""

    stage: int  # 2 for ZeRO 1/2 (same layout), 3 for ZeRO-3
    world: int
    params: tuple[tuple[tuple[str, int], ...], ...]  # per group: (name, numel) in flat order
    sub_group_size: int = DEFAULT_SUB_GROUP_SIZE

    @classmethod
    def build(
        cls, stage: int, param_shapes: list[dict[str, torch.Size]], world: int, sub_group_size: int | None = None
    ) -> ZeroLayout:
        params = tuple(tuple((name, int(torch.Size(shape).numel())) for name, shape in shapes.items()) for shapes in param_shapes)
        return cls(
            3 if stage == 3 else 2, world, params, DEFAULT_SUB_GROUP_SIZE if sub_group_size is None else int(sub_group_size)
        )

    def for_world(self, world: int) -> ZeroLayout:
        return ZeroLayout(self.stage, world, self.params, self.sub_group_size)

    def flats(self, rank: int) -> list[Flat]:
        """Rank `rank`'s flats, in the order the optimizer holds them (group by group)."""
        if self.stage == 3:
            return [flat for group in range(len(self.params)) for flat in self._zero3_flats(group, rank)]
        return [self._zero12_flat(group, rank) for group in range(len(self.params))]

    def _zero12_flat(self, group: int, rank: int) -> Flat:
        total = sum(numel for _, numel in self.params[group])
        alignment = ALIGNMENT_FACTOR * self.world
        partition = math.ceil(total / alignment) * alignment // self.world
        low, high = rank * partition, (rank + 1) * partition
        pieces, start = [], 0
        for name, numel in self.params[group]:
            first, last = max(start, low), min(start + numel, high)
            if first < last:
                pieces.append(Piece(name, first - low, last - first, first - start))
            start += numel
        return Flat(group, partition, tuple(pieces))

    def sub_groups(self, group: int) -> list[list[tuple[str, int]]]:
        """DeepSpeed's rule: add parameters until their partitions reach sub_group_size."""
        entries = list(self.params[group])
        partitions = [math.ceil(numel / self.world) for _, numel in entries]
        if self.sub_group_size >= sum(partitions):
            return [entries]
        result, current, size = [], [], 0
        for index, entry in enumerate(entries):
            current.append(entry)
            size += partitions[index]
            if size >= self.sub_group_size or index == len(entries) - 1:
                result.append(current)
                current, size = [], 0
        return result

    def _zero3_flats(self, group: int, rank: int) -> list[Flat]:
        flats = []
        for members in self.sub_groups(group):
            pieces, offset = [], 0
            for name, numel in members:
                partition = math.ceil(numel / self.world)
                first = rank * partition
                length = min(partition, numel - first)
                if length > 0:  # ranks past the end hold only padding
                    pieces.append(Piece(name, offset, length, first))
                offset += partition
            flats.append(Flat(group, offset, tuple(pieces)))
        return flats
