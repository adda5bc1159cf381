"""Where DeepSpeed ZeRO puts each parameter: the flat buffers of every rank, for any world size.

DeepSpeed 0.19 hands the optimizer flat fp32 buffers ("flats") instead of
parameters; a checkpoint stores each rank's flats. This module recomputes
their layout from the parameter shapes, so a checkpoint can be read as
per-parameter pieces and written for another world size. The partition
formulas themselves (ZeRO 1/2 and ZeRO-3) are DeepSpeed's, kept in one place:
`dist8bit/integrations/zero_partition.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..integrations import zero_partition
from ..integrations.zero_partition import DEFAULT_SUB_GROUP_SIZE


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
        entries = self.params[group]
        spans = zero_partition.zero12_spans([numel for _, numel in entries], self.world, rank)
        size = zero_partition.zero12_partition_numel([numel for _, numel in entries], self.world)
        return Flat(group, size, _pieces(entries, spans))

    def sub_groups(self, group: int) -> list[list[tuple[str, int]]]:
        """The group's parameters cut into ZeRO-3 sub-groups, as DeepSpeed cuts them."""
        entries = self.params[group]
        partitions = [zero_partition.zero3_partition_numel(numel, self.world) for _, numel in entries]
        return [[entries[i] for i in members] for members in zero_partition.zero3_sub_groups(partitions, self.sub_group_size)]

    def _zero3_flats(self, group: int, rank: int) -> list[Flat]:
        flats = []
        for members in self.sub_groups(group):
            numels = [numel for _, numel in members]
            partitions = [zero_partition.zero3_partition_numel(numel, self.world) for numel in numels]
            spans, size = zero_partition.zero3_spans(numels, partitions, [rank] * len(numels))
            flats.append(Flat(group, size, _pieces(members, spans)))
        return flats


def _pieces(entries: Sequence[tuple[str, int]], spans: list[zero_partition.Span]) -> tuple[Piece, ...]:
    """Spans (parameters by position) as pieces (parameters by name)."""
    return tuple(Piece(entries[s.index][0], s.start, s.length, s.param_offset) for s in spans)
