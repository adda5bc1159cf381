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

A flat buffer's state is packed: the quantized segments' codes one after
another in `<name>_codes` (a 4-bit segment's run is its ceil(length / 2)
packed bytes, dist8bit.quant.packing; absmax in `<name>_absmax`), the 32-bit
segments' values in `<name>`, and the table below in `segment_table`, so a
checkpoint describes itself and a mismatched layout (another world size,
other parameters) is refused on load instead of silently misread. Its last
column is each segment's bits (32, 8 or 4) from state format 3 on; formats
1-2 stored 0/1 for 32/8, which `table_bits` reads as well.

Each segment's run in every packed tensor starts on a 16-byte boundary
(PACKED_ALIGNMENT): the kernels take their vector path only for aligned state
pointers, and one odd-sized piece would otherwise misalign every segment after
it. The unused bytes in between belong to no block and are never read.
State format version 1 packed the runs back to back; `packed_layout(...,
version=1)` still describes it, and `repack` moves such state to the current
layout, so old checkpoints load and convert.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..quant.layout import num_blocks
from ..quant.packing import code_bytes
from .state import ABSMAX_SUFFIX, CODES_SUFFIX, PRECISIONS, STATE_FORMAT_VERSION, as_bits, is_quantized

# Byte boundary of every segment's run in the packed tensors (state format >= 2).
PACKED_ALIGNMENT = 16
# The first state format version whose packed layout is padded.
PADDED_VERSION = 2
# The first state format version whose segment_table stores bits (32/8/4), not 0/1.
BITS_TABLE_VERSION = 3

# Columns of the int64 `segment_table` state entry, one row per segment.
TABLE_COLUMNS = ("start", "length", "param_offset", "logical_numel", "bits")


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

    bits: tuple[int, ...]  # per segment: 32, 8 or 4
    value_offsets: tuple[int, ...]  # into <name>_codes (quantized, in bytes) or <name> (32-bit)
    block_offsets: tuple[int, ...]  # into <name>_absmax (quantized segments only)
    codes_numel: int  # bytes
    values_numel: int
    blocks: int
    lengths: tuple[int, ...]  # elements per segment
    block_counts: tuple[int, ...]  # scales per segment (0 for 32-bit segments)

    @cached_property
    def quantized(self) -> tuple[bool, ...]:
        """Per segment: whether its state is codes and scales (8- or 4-bit) rather than values
        (computed once: the step's segment views and `runs` index it per segment)."""
        return tuple(is_quantized(b) for b in self.bits)

    def code_bytes(self, index: int) -> int:
        """Bytes of segment `index`'s run in <name>_codes (0 for a 32-bit segment)."""
        return code_bytes(self.lengths[index], self.bits[index]) if self.quantized[index] else 0

    def runs(self, part: str) -> list[tuple[int, int]]:
        """(offset, numel) of each segment's run in one packed tensor, segment order, for
        part "codes", "absmax" or "values": what `repack` moves from one layout to another."""
        indices = range(len(self.bits))
        if part == "values":
            return [(self.value_offsets[i], self.lengths[i]) for i in indices if not self.quantized[i]]
        if part == "codes":
            return [(self.value_offsets[i], self.code_bytes(i)) for i in indices if self.quantized[i]]
        if part == "absmax":
            return [(self.block_offsets[i], self.block_counts[i]) for i in indices if self.quantized[i]]
        raise ValueError(f"a packed layout has parts 'codes', 'absmax' and 'values', not {part!r}")

    def numel(self, part: str) -> int:
        """Elements of one packed tensor (no padding after the last run)."""
        return {"codes": self.codes_numel, "absmax": self.blocks, "values": self.values_numel}[part]


def alignment_for(version: int) -> int:
    """Byte boundary of the segments' runs in packed state of format `version`:
    version 1 packed them back to back, later versions pad to PACKED_ALIGNMENT."""
    return 1 if version < PADDED_VERSION else PACKED_ALIGNMENT


def _aligned(offset: int, element_size: int, alignment: int) -> int:
    """`offset` (in elements) rounded up to the next `alignment`-byte boundary."""
    step = max(alignment // element_size, 1)
    return -(-offset // step) * step


def packed_layout(
    segments: Sequence[Segment], bits: Sequence[int | bool], blocksize: int, *, version: int = STATE_FORMAT_VERSION
) -> PackedLayout:
    """Offsets of every segment's codes, scales or values in the packed tensors of
    state format `version` (the current, padded one unless reading an old checkpoint).

    `bits` per segment: 32, 8 or 4 (0/1 flags, as formats 1-2 stored them, mean 32/8)."""
    bits = tuple(as_bits(b) for b in bits)
    alignment = alignment_for(version)
    codes = values = blocks = 0
    value_offsets, block_offsets, block_counts = [], [], []
    for segment, precision in zip(segments, bits, strict=True):
        if is_quantized(precision):
            codes = _aligned(codes, 1, alignment)
            blocks = _aligned(blocks, 4, alignment)
            value_offsets.append(codes)
            block_offsets.append(blocks)
            block_counts.append(num_blocks(segment.length, blocksize))
            codes += code_bytes(segment.length, precision)
            blocks += block_counts[-1]
        else:
            values = _aligned(values, 4, alignment)
            value_offsets.append(values)
            block_offsets.append(0)
            block_counts.append(0)
            values += segment.length
    lengths = tuple(s.length for s in segments)
    return PackedLayout(bits, tuple(value_offsets), tuple(block_offsets), codes, values, blocks, lengths, tuple(block_counts))


def packed_entries(names: Iterable[str]) -> dict[str, str]:
    """Packed state key -> layout part, for state slots `names` (exp_avg, ...)."""
    parts = {}
    for name in names:
        parts |= {name + CODES_SUFFIX: "codes", name + ABSMAX_SUFFIX: "absmax", name: "values"}
    return parts


def repack(state: Mapping[str, Any], names: Iterable[str], source: PackedLayout, target: PackedLayout) -> dict[str, Any]:
    """A flat buffer's packed state moved from layout `source` to `target` (e.g. an
    unpadded version-1 checkpoint to the current padded layout), bit for bit.

    Other entries (step, segment_table) are kept as they are; padding is zeros.
    Raises ValueError when a tensor does not have the size `source` implies, so a
    state of another layout is refused rather than misread.
    """
    moved = dict(state)
    for key, part in packed_entries(names).items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() != 1 or value.numel() != source.numel(part):
            raise ValueError(
                f"packed state {key!r} has shape {tuple(value.shape)}, but its layout needs {source.numel(part)} elements"
            )
        out = value.new_zeros(target.numel(part))
        for (old, count), (new, _) in zip(source.runs(part), target.runs(part), strict=True):
            out.narrow(0, new, count).copy_(value.narrow(0, old, count))
        moved[key] = out
    return moved


def segment_table(segments: Sequence[Segment], bits: Sequence[int | bool]) -> torch.Tensor:
    """The current format's table: one row per segment, its last column the segment's bits."""
    rows = [[s.start, s.length, s.param_offset, s.logical_numel, as_bits(b)] for s, b in zip(segments, bits, strict=True)]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(TABLE_COLUMNS))


def table_bits(table: torch.Tensor, version: int = STATE_FORMAT_VERSION) -> list[int]:
    """Each segment's bits from a saved segment_table of state format `version`
    (formats before BITS_TABLE_VERSION stored 0/1 for 32/8)."""
    column = [int(v) for v in table[:, TABLE_COLUMNS.index("bits")].tolist()]
    allowed = (0, 1) if version < BITS_TABLE_VERSION else PRECISIONS
    if any(v not in allowed for v in column):
        raise ValueError(f"a segment_table of state format {version} stores one of {allowed} per segment, got {column}")
    return [as_bits(v) for v in column]


def upgraded_table(table: torch.Tensor, version: int) -> torch.Tensor:
    """A saved segment_table in the current format (bits in the last column)."""
    if version >= BITS_TABLE_VERSION:
        return table
    upgraded = table.clone()
    upgraded[:, TABLE_COLUMNS.index("bits")] = torch.tensor(table_bits(table, version), dtype=table.dtype)
    return upgraded
