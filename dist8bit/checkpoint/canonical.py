"""The canonical, sharding-independent description of an optimizer's state.

Every reader turns its format into this and every writer starts from it, so a
converter is reader x writer and never format x format. Per logical parameter
each state buffer (torch's name: exp_avg, exp_avg_sq, momentum_buffer, ...) is
either

    Quantized  uint8 codes in the parameter's own element order, one float32
               absmax per `blocksize` elements, and the map: 256 values for
               8-bit codes (one per byte), 16 values for 4-bit codes (packed
               two per byte, element 2j in the low nibble: quant/packing.py), or
    Dense      float values in the parameter's element order.

Tensors are not copied: they may be slices of a memory-mapped file, read in
chunks by the conversion jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..quant.layout import num_blocks
from ..quant.maps import map_bits
from ..quant.packing import code_bytes


@dataclass(frozen=True)
class Quantized:
    """Block-wise quantized state: value[i] = code[codes(i)] * absmax[i // blocksize].

    `length` is the number of elements. 8-bit codes say it themselves (one
    byte each); packed 4-bit codes cannot (ceil(n / 2) bytes hold 2k - 1 or 2k
    elements), so 4-bit state must name it.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    code: torch.Tensor
    length: int | None = None

    def __post_init__(self) -> None:
        if self.length is None and self.bits == 4:
            raise ValueError("4-bit state needs its element count: ceil(n / 2) code bytes do not say n")

    @property
    def bits(self) -> int:
        """Bits per code: 8 (256-value map) or 4 (16-value map, packed)."""
        return map_bits(self.code)

    @property
    def numel(self) -> int:
        return self.codes.numel() if self.length is None else self.length

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel()

    def check(self, where: str) -> None:
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"{where}: codes must be uint8, got {self.codes.dtype}")
        if self.absmax.dtype != torch.float32:
            raise ValueError(f"{where}: absmax must be float32, got {self.absmax.dtype}")
        expected = code_bytes(self.numel, self.bits)
        if self.codes.numel() != expected:
            raise ValueError(
                f"{where}: {self.numel} elements take {expected} bytes of {self.bits}-bit codes, the checkpoint has "
                f"{self.codes.numel()} (truncated, or saved at another precision?)"
            )
        blocks = num_blocks(self.numel, self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(
                f"{where}: {self.numel} codes with blocksize {self.blocksize} need {blocks} absmax scales, "
                f"the checkpoint has {self.absmax.numel()} (truncated or written with another blocksize?)"
            )


@dataclass(frozen=True)
class Dense:
    """Full-precision state values."""

    values: torch.Tensor

    @property
    def numel(self) -> int:
        return self.values.numel()

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass(frozen=True)
class Pieced:
    """A parameter's state kept in pieces, as a sharded (ZeRO) checkpoint holds it.

    `pieces` are (offset in the parameter, Quantized or Dense piece), sorted,
    disjoint and covering [0, numel). A quantized piece's blocks (and, at 4
    bits, its first byte) start at the piece's first element, so pieces cannot
    be concatenated into one Quantized; a piece may have any length, odd ones
    included (ZeRO cuts parameters anywhere).
    """

    numel: int
    pieces: tuple[tuple[int, Quantized | Dense], ...]

    def nbytes(self) -> int:
        return sum(piece.nbytes() for _, piece in self.pieces)

    def check(self, where: str) -> None:
        end = 0
        for offset, piece in self.pieces:
            if offset != end:
                raise ValueError(f"{where}: elements [{end}, {offset}) are in no rank's partition (missing or mismatched ranks?)")
            end = offset + piece.numel
        if end != self.numel:
            raise ValueError(f"{where}: the ranks' pieces cover {end} of {self.numel} elements (missing ranks?)")


Buffer = Quantized | Dense | Pieced


@dataclass
class ParamState:
    """One logical parameter's optimizer state."""

    shape: tuple[int, ...]
    step: float | None
    buffers: dict[str, Buffer]
    # Entries carried over unchanged (grad_norm_history, ...), in their original order.
    extras: dict[str, Any] = field(default_factory=dict)
    # A compensated bf16 parameter's weight_error: int8/int16 codes per element, Dense or Pieced
    # (never quantized: it belongs to the weights; see weight_errors.py).
    error: Dense | Pieced | None = None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class OptimizerState:
    """An optimizer state dict in canonical form.

    `params` is keyed like torch's state dict (the integer index of each
    parameter across param groups); `param_groups` keep every hyper-parameter
    (including a scheduler's `initial_lr`) with `params` lists of those keys.
    """

    source_format: str
    optimizer: str | None  # the optimizer kind, when known (adamw, sgd, ...)
    param_groups: list[dict[str, Any]]
    params: dict[Any, ParamState]

    def group_of(self) -> dict[Any, dict[str, Any]]:
        return {key: group for group in self.param_groups for key in group["params"]}
