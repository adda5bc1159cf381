"""Quantization maps: the values a code can decode to.

An 8-bit map is a sorted float32 tensor of exactly 256 values (bitsandbytes'
maps with fewer bits are padded with zeros, so kernels index a 256-entry
table). A 4-bit map is a sorted float32 tensor of exactly 16 values, unpadded:
padding zeros would put 0 back among the candidates, and the 4-bit second-
moment map exists to keep 0 out (Li, Chen, Zhu 2023, the zero-point problem).
The kernels tell the two apart by the map's size. This module is the only
place maps are built; the CPU, CUDA and reference paths all receive the
tensor it returns.
"""

from __future__ import annotations

import torch

MAP_SIZE = 256
MAP_SIZE_4BIT = 16
MAP_SIZES = {MAP_SIZE: 8, MAP_SIZE_4BIT: 4}  # entries -> bits per code


def map_bits(code: torch.Tensor) -> int:
    """Bits per code of a map: 8 for 256 entries, 4 for 16."""
    bits = MAP_SIZES.get(code.numel())
    if bits is None:
        raise ValueError(f"a map holds {MAP_SIZE} (8-bit) or {MAP_SIZE_4BIT} (4-bit) values, got {code.numel()}")
    return bits


def _pad_and_sort(values: list[float] | torch.Tensor, size: int = MAP_SIZE) -> torch.Tensor:
    """Zero-pad to `size` entries and sort, so kernels can assume one layout."""
    data = torch.as_tensor(values, dtype=torch.float32).flatten()
    if data.numel() > size:
        raise ValueError(f"a map holds at most {size} values, got {data.numel()}")
    padded = torch.cat([data, torch.zeros(size - data.numel(), dtype=torch.float32)])
    # Stable: a map holding both +0.0 and -0.0 (the signed fp8 maps) keeps
    # their order, so the bits of the map are reproducible.
    return torch.sort(padded, stable=True).values


def _dynamic_values(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    """The dynamic map's values, unsorted and unpadded (see create_dynamic_map)."""
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [1, 8], got {total_bits}")
    non_sign_bits = total_bits - 1
    max_bits = total_bits if signed else non_sign_bits
    if not 0 <= max_exponent_bits <= max_bits:
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"max_exponent_bits must be in [0, {max_bits}] for a {kind} map with total_bits={total_bits}, got {max_exponent_bits}"
        )
    values: list[torch.Tensor] = []

    def add_decade(scale: float, items: int) -> None:
        # Midpoints of `items` equal steps over [0.1, 1], scaled, all in
        # float32 arithmetic (the bitsandbytes recipe, to the last bit).
        edges = torch.linspace(0.1, 1.0, items + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values.append(scale * means)
        if signed:
            values.append(-scale * means)

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        # shift is -1 for the smallest decade when every bit is exponent: no items.
        add_decade(10.0 ** (-(max_exponent_bits - 1) + i), int(2.0**shift))
    extra_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra_items > 0:
        add_decade(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1), extra_items)
    values.append(torch.tensor([0.0, 1.0]))
    return torch.cat(values)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Dynamic tree quantization map (Dettmers 2015; used by 8-bit Adam).

    Each decade 10^-k gets its own run of linearly spaced values, so the map
    resolves both tiny and large magnitudes after block-wise absmax scaling.
    The signed map serves first moments; the unsigned one spends the sign bit
    on extra resolution for non-negative second moments. Values are
    bit-identical to bitsandbytes' map, so its checkpoints decode unchanged,
    over bitsandbytes' whole argument range: a signed map may use every bit
    for the exponent (`max_exponent_bits == total_bits`: the smallest decade
    is then empty). Unsigned maps with fewer exponent bits than
    `total_bits - 1`, which bitsandbytes refuses, come out zero-padded.
    """
    return _pad_and_sort(_dynamic_values(signed, max_exponent_bits, total_bits))


def create_dynamic_map_4bit(signed: bool = True) -> torch.Tensor:
    """The 16-value dynamic map: the same recipe at 4 bits (3 exponent bits), unpadded.

    Signed, it is the first-moment map of 4-bit optimizer states (Li, Chen,
    Zhu 2023's "DE": decades 10^-2, 10^-1, 10^0 with 1, 2 and 4 values per
    sign, plus 0 and 1).
    """
    return _pad_and_sort(_dynamic_values(signed, 3, 4), MAP_SIZE_4BIT)


def create_linear_map_4bit(add_zero: bool = False) -> torch.Tensor:
    """The 16-value unsigned linear map: k/16 for k = 1..16, or k/15 for k = 0..15 with `add_zero`.

    Without zero it is the second-moment map of 4-bit optimizer states: a
    second moment that rounds to 0 turns m / sqrt(v) into m / eps, the
    zero-point problem Li, Chen, Zhu (2023) found to destabilise 4-bit Adam;
    here the smallest value a non-empty block can decode to is absmax / 16.
    """
    steps = MAP_SIZE_4BIT - 1
    if add_zero:
        grid = torch.arange(0, steps + 1, dtype=torch.float64) / steps
    else:
        grid = torch.arange(1, steps + 2, dtype=torch.float64) / (steps + 1)
    return _pad_and_sort(grid.float(), MAP_SIZE_4BIT)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """Evenly spaced map over [-1, 1] (signed) or [0, 1].

    A signed map holds an exact zero unless `add_zero=False` with 8 bits
    (then 256 values, none of them 0, as in bitsandbytes; with fewer bits a
    zero is always kept, since the padding is zeros anyway).
    """
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [1, 8], got {total_bits}")
    if signed and total_bits < 2:
        raise ValueError("a signed linear map needs total_bits >= 2 (one bit is the sign)")
    # k / steps in float64, rounded once: the signed map then holds an exact 0
    # (float32 linspace leaves 3.7e-9 there) and is exactly symmetric.
    if signed and (add_zero or total_bits < 8):
        steps = 2 ** (total_bits - 1) - 1
        grid = torch.arange(-steps, steps + 1, dtype=torch.float64) / steps
    elif signed:
        steps = 2**total_bits - 1
        grid = torch.arange(-steps, steps + 1, 2, dtype=torch.float64) / steps
    else:
        steps = 2**total_bits - 1
        grid = torch.arange(0, steps + 1, dtype=torch.float64) / steps
    return _pad_and_sort(grid.float())


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8) -> torch.Tensor:
    """Map of a small floating-point format, normalised so its largest value is 1.

    Every (exponent, mantissa) bit pattern gives one value: exponent field 0
    is subnormal (`m * 2^-bias`), field E > 0 normal (`(1 + m) * 2^(bias + 1 - E)`),
    with `bias = 2^(exponent_bits - 1)` and `m` the mantissa as a fraction.
    That is bitsandbytes' layout, and the map is bit-identical to its
    `create_fp8_map` (a signed map holds +0.0 and -0.0, in that order).
    bitsandbytes' FP4 is `create_fp8_map(True, 2, 1, 4)`.
    """
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [1, 8], got {total_bits}")
    if exponent_bits < 0 or precision_bits < 0 or exponent_bits + precision_bits != total_bits - int(signed):
        raise ValueError(
            f"exponent_bits + precision_bits must be total_bits - {int(signed)} (the sign bit) = "
            f"{total_bits - int(signed)} and neither negative, got {exponent_bits} + {precision_bits}"
        )
    bias = 2.0 ** (exponent_bits - 1)
    values: list[float] = []
    for field in range(2**exponent_bits):
        # Python floats: every product is computed exactly as bitsandbytes does.
        scale = 2.0**-bias if field == 0 else 2.0 ** (bias + 1 - field)
        for mantissa in range(2**precision_bits):
            fraction = mantissa / 2**precision_bits + (0 if field == 0 else 1)
            value = fraction * scale
            values.extend([value, -value] if signed else [value])
    code = _pad_and_sort(values)
    return code / code.max()


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """NormalFloat map (QLoRA's NF4): 16 normal quantiles normalised to [-1, 1], zero-padded.

    Each code then covers the same probability mass of N(0, 1) between the
    levels 1 - offset and offset. With `use_extra_value` the positive side
    gets 8 values and the negative side 7 (plus an exact zero); without it
    7 each. The inverse normal CDF is torch's float64 `ndtri` at bitsandbytes'
    float32 levels, which rounds to the same float32 values as the scipy
    `norm.ppf` bitsandbytes calls, so the map is bit-identical without scipy.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be in (0.5, 1), got {offset}")

    def quantiles(count: int) -> torch.Tensor:
        levels = torch.linspace(offset, 0.5, count + 1, dtype=torch.float32)[:-1]
        return torch.special.ndtri(levels.double())

    positive = quantiles(8 if use_extra_value else 7)
    negative = -quantiles(7)
    code = _pad_and_sort(torch.cat([positive, negative]).float())
    return code / code.max()


def create_quantile_map(A: torch.Tensor, total_bits: int = 8) -> torch.Tensor:
    """Map whose values are quantiles of `A`, normalised to [-1, 1].

    Each code then covers about the same number of elements of `A`, the
    information-optimal choice for data distributed like `A`. Zero is always
    included so that zeros stay exact.
    """
    from .quantiles import estimate_quantiles

    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [1, 8], got {total_bits}")
    quantiles = estimate_quantiles(A, num_quantiles=2**total_bits - 1).float().cpu()
    values = torch.cat([quantiles, torch.zeros(1)])
    scale = values.abs().max()
    if scale > 0:
        values = values / scale
    return _pad_and_sort(values)


def validate_map(code: torch.Tensor, name: str = "code") -> None:
    """Raise a clear error unless `code` is 256 (8-bit) or 16 (4-bit) sorted finite float32 values."""
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {MAP_SIZE} float32 values, got {type(code).__name__}")
    if code.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {code.dtype}; build it with dist8bit.functional.create_dynamic_map()")
    if code.numel() not in MAP_SIZES:
        raise ValueError(
            f"{name} must hold exactly {MAP_SIZE} values (8-bit) or {MAP_SIZE_4BIT} (4-bit), got {code.numel()}; "
            "pad shorter 8-bit maps with zeros"
        )
    flat = code.reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    if not bool((flat[1:] >= flat[:-1]).all()):
        raise ValueError(f"{name} must be sorted in ascending order; use torch.sort(code).values")
