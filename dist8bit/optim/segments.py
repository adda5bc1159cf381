"""Segments: the contiguous runs of one logical parameter that a step updates.

A wrapper that replaces the optimizer's parameters with flat buffers
(DeepSpeed ZeRO's fp32 partitions) tells the optimizer, per flat buffer, which
element ranges belong to which original parameter:

    optimizer.set_segments(flat, [Segment(source=p, start=0, length=100, param_offset=0, logical_numel=p_numel), ...])

`source` is the original parameter object: per-parameter overrides
(GlobalOptimManager, StableEmbedding) and the rounding stream are looked up on
it, and its full size (`logical_numel`, known before sharding) decides the
precision, so sharding never changes it. Quantization blocks start at each
segment's first element, so no block mixes two parameters and any partition
boundary works. Elements of the flat buffer outside every segment (alignment
padding) are never read or written.

A flat buffer's state is packed: the 8-bit segments' codes one after another
in `<name>_codes` (absmax in `<name>_absmax`), the 32-bit segments' values in
`<name>`, and the table below in `segment_table`, so a checkpoint describes
itself and a mismatched layout (another world size, other parameters) is
refused on load instead of silently misread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant.layout import num_blocks

# Columns of the int64 `segment_table` state entry, one row per segment.
TABLE_COLUMNS = ("start", "length", "param_offset", "logical_numel", "eight_bit")


@dataclass(frozen=True)
class Segment:
    """Elements [start, start + length) of a flat buffer are elements
    [param_offset, param_offset + length) of the flattened `source` parameter."""

    source: torch.Tensor
    start: int
    length: int
    param_offset: int
    logical_numel: int

    def __post_init__(self) -> None:
        if self.length <= 0 or self.start < 0 or self.param_offset < 0:
            raise ValueError(f"a segment needs start >= 0, length > 0 and param_offset >= 0, got {self}")
        if self.param_offset + self.length > self.logical_numel:
            raise ValueError(
                f"segment [{self.param_offset}, {self.param_offset + self.length}) lies outside its parameter "
                f"of {self.logical_numel} elements"
            )


def check_segments(flat: torch.Tensor, segments: Sequence[Segment]) -> list[Segment]:
    """Segments sorted by start; they must lie inside `flat` and not overlap."""
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"segments describe a contiguous 1-D buffer, got shape {tuple(flat.shape)}")
    ordered = sorted(segments, key=lambda s: s.start)
    end = 0
    for segment in ordered:
        if segment.start < end:
            raise ValueError(f"segments overlap at element {segment.start} of the flat buffer")
        end = segment.start + segment.length
    if end > flat.numel():
        raise ValueError(f"segments reach element {end} but the flat buffer has {flat.numel()}")
    return ordered


@dataclass(frozen=True)
class PackedLayout:
    """Where each segment's state lives in the packed per-buffer tensors."""

    eight_bit: tuple[bool, ...]
    value_offsets: tuple[int, ...]  # into <name>_codes (8-bit) or <name> (32-bit)
    block_offsets: tuple[int, ...]  # into <name>_absmax (8-bit segments only)
    codes_numel: int
    values_numel: int
    blocks: int


def packed_layout(segments: Sequence[Segment], eight_bit: Sequence[bool], blocksize: int) -> PackedLayout:
    codes = values = blocks = 0
    value_offsets, block_offsets = [], []
    for segment, quantized in zip(segments, eight_bit, strict=True):
        if quantized:
            value_offsets.append(codes)
            block_offsets.append(blocks)
            codes += segment.length
            blocks += num_blocks(segment.length, blocksize)
        else:
            value_offsets.append(values)
            block_offsets.append(0)
            values += segment.length
    return PackedLayout(tuple(eight_bit), tuple(value_offsets), tuple(block_offsets), codes, values, blocks)


def segment_table(segments: Sequence[Segment], eight_bit: Sequence[bool]) -> torch.Tensor:
    rows = [[s.start, s.length, s.param_offset, s.logical_numel, int(q)] for s, q in zip(segments, eight_bit, strict=True)]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(TABLE_COLUMNS))
