"""Codebook: a map plus what the kernels need to find the nearest code fast.

The rounding rule, defined here once for every backend:

    s    = x * (1 / absmax)            (float32; s = 0 when that is NaN)
    code = #{ j : thresholds[j] < s }  (thresholds[255] = +inf)

where thresholds[j] is the exact midpoint of code[j] and code[j+1] rounded
*down* to float32. Because s is a float32, `s > thresholds[j]` holds exactly
when s lies above the true midpoint, so every backend picks the truly nearest
code, and a value exactly on a midpoint goes to the lower code.

Kernels may find that count however they like (binary search on CUDA, a
lookup table on CPU); the lookup table built here is only an accelerator:
it maps the float32 bits of s (sign, exponent, top mantissa bits) to the count
at the bottom of that bucket, and at most `refine_steps` comparisons finish
the search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .maps import MAP_SIZE

LUT_MANTISSA_BITS = 7
MAX_REFINE_STEPS = 4
_FLOAT32_EXP_ONE = 127  # biased exponent of 1.0; |s| < 2 so no larger exponent occurs


@dataclass(frozen=True)
class Codebook:
    """Everything a quantize kernel needs about one map, on one device."""

    code: torch.Tensor  # (256,) float32, sorted
    thresholds: torch.Tensor  # (256,) float32, last entry +inf
    lut: torch.Tensor  # int32 bucket -> count table; empty means "binary search"
    lut_mantissa_bits: int
    lut_min_exponent: int
    refine_steps: int

    def to(self, device: torch.device | str) -> Codebook:
        device = torch.device(device)
        if self.code.device == device:
            return self
        return Codebook(
            self.code.to(device),
            self.thresholds.to(device),
            self.lut.to(device),
            self.lut_mantissa_bits,
            self.lut_min_exponent,
            self.refine_steps,
        )


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


def _bucket_bounds(mantissa_bits: int, min_exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest float32 value of every lookup-table bucket, in key order."""
    rows = _FLOAT32_EXP_ONE - min_exponent + 2
    mantissa_steps = 1 << mantissa_bits
    row = torch.arange(rows, dtype=torch.int64).repeat_interleave(mantissa_steps)
    mant = torch.arange(mantissa_steps, dtype=torch.int64).repeat(rows)
    exponent = row + min_exponent - 1
    low_bits = (exponent << 23) | (mant << (23 - mantissa_bits))
    high_bits = low_bits | ((1 << (23 - mantissa_bits)) - 1)
    # Row 0 gathers every exponent below min_exponent: [0, 2^(min_exponent-127)).
    low_bits = torch.where(row == 0, torch.zeros_like(low_bits), low_bits)
    high_bits = torch.where(row == 0, torch.full_like(high_bits, (min_exponent << 23) - 1), high_bits)
    low = low_bits.to(torch.int32).view(torch.float32)
    high = high_bits.to(torch.int32).view(torch.float32)
    # Negative half: same magnitudes, so the smallest value is -high.
    return torch.cat([low, -high]), torch.cat([high, -low])


def build_lookup_table(thresholds: torch.Tensor, mantissa_bits: int = LUT_MANTISSA_BITS) -> tuple[torch.Tensor, int, int]:
    """Bucket table over s's float32 bits: (lut, min_exponent, refine_steps)."""
    finite = thresholds[:-1]
    magnitudes = finite.abs()
    nonzero = magnitudes[magnitudes > 0]
    smallest = float(nonzero.min()) if nonzero.numel() else 1.0
    min_exponent = max(1, int(torch.tensor(smallest).view(torch.int32)) >> 23)
    low, high = _bucket_bounds(mantissa_bits, min_exponent)
    counts_low = torch.searchsorted(thresholds, low, side="left")
    counts_high = torch.searchsorted(thresholds, high, side="left")
    refine_steps = int((counts_high - counts_low).max())
    return counts_low.to(torch.int32), min_exponent, refine_steps


def build_codebook(code: torch.Tensor) -> Codebook:
    """Codebook for a validated 256-value map, on the map's device."""
    if code.numel() != MAP_SIZE:
        raise ValueError(f"a map must hold {MAP_SIZE} values, got {code.numel()}")
    code = code.reshape(-1).float().contiguous()
    thresholds = midpoint_thresholds(code.cpu())
    lut, min_exponent, refine_steps = build_lookup_table(thresholds)
    if refine_steps > MAX_REFINE_STEPS:
        lut = torch.empty(0, dtype=torch.int32)
        refine_steps = 0
    return Codebook(code.cpu(), thresholds, lut, LUT_MANTISSA_BITS, min_exponent, refine_steps).to(code.device)
