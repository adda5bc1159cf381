"""Codebook: a map plus what the kernels need to find the nearest code fast.

The rounding rule, defined here once for every backend:

    s    = x * (1 / absmax)            (float32; s = 0 when that is NaN)
    code = #{ j : thresholds[j] < s }  (thresholds[255] = +inf; thresholds[15] for a 4-bit map)

where thresholds[j] is the exact midpoint of code[j] and code[j+1] rounded
*down* to float32. Because s is a float32, `s > thresholds[j]` holds exactly
when s lies above the true midpoint, so every backend picks the truly nearest
code, and a value exactly on a midpoint goes to the lower code.

Kernels may find that count however they like; the encoder table built here
(dist8bit.quant.encoder_table) is only an accelerator: a straight line per
piece of |s| gives the count wherever it is clear of a jump, and the binary
search over the thresholds decides everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder_table import build_encoder_table
from .maps import MAP_SIZE_4BIT, map_bits


@dataclass(frozen=True)
class Codebook:
    """Everything a quantize kernel needs about one map, on one device."""

    code: torch.Tensor  # (256,) or, for a 4-bit map, (16,) float32, sorted
    thresholds: torch.Tensor  # same size as code, float32, last entry +inf
    encoder: torch.Tensor  # (encoder_table.TABLE_SIZE,) float32; empty means "binary search only"

    @property
    def bits(self) -> int:
        """Bits per code: 8, or 4 for a 16-value map (codes packed two per byte)."""
        return map_bits(self.code)

    def to(self, device: torch.device | str) -> Codebook:
        device = torch.device(device)
        if self.code.device == device:
            return self
        return Codebook(self.code.to(device), self.thresholds.to(device), self.encoder.to(device))


def midpoint_thresholds(code: torch.Tensor) -> torch.Tensor:
    """Midpoints between neighbouring codes, rounded down to float32, +inf appended."""
    code64 = code.double()
    exact = (code64[:-1] + code64[1:]) / 2.0
    rounded = exact.float()
    below = torch.where(
        rounded.double() > exact, torch.nextafter(rounded, torch.tensor(-float("inf"), device=code.device)), rounded
    )
    return torch.cat([below, torch.full((1,), float("inf"), device=code.device)])


def nearest_code_index(s: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The rounding rule itself, in plain PyTorch (the oracle for the kernels)."""
    return torch.searchsorted(thresholds, s.contiguous(), side="left")


def build_codebook(code: torch.Tensor) -> Codebook:
    """Codebook for a validated 256- or 16-value map, on the map's device.

    A 4-bit map gets no encoder table: four comparisons against its 15
    thresholds (a binary search over one 16-lane register) are already exact
    and cheap."""
    map_bits(code)
    code = code.reshape(-1).float().contiguous()
    thresholds = midpoint_thresholds(code.cpu())
    if code.numel() == MAP_SIZE_4BIT:
        return Codebook(code.cpu(), thresholds, torch.empty(0, dtype=torch.float32)).to(code.device)
    table, stats = build_encoder_table(thresholds)
    encoder = table if stats.fast_slots > 0 else torch.empty(0, dtype=torch.float32)
    return Codebook(code.cpu(), thresholds, encoder).to(code.device)
