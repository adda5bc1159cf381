"""Quantization maps: the 256 values an 8-bit code can decode to.

Every map is a sorted float32 tensor of exactly 256 values (maps with fewer
bits are padded with zeros, so kernels always index a 256-entry table). This
module is the only place maps are built; the CPU, CUDA and reference paths all
receive the tensor it returns.
"""

from __future__ import annotations

import torch

MAP_SIZE = 256


def _pad_and_sort(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Zero-pad to 256 entries and sort, so kernels can assume one layout."""
    data = torch.as_tensor(values, dtype=torch.float32).flatten()
    if data.numel() > MAP_SIZE:
        raise ValueError(f"a map holds at most {MAP_SIZE} values, got {data.numel()}")
    padded = torch.cat([data, torch.zeros(MAP_SIZE - data.numel(), dtype=torch.float32)])
    return torch.sort(padded).values


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Dynamic tree quantization map (Dettmers 2015; used by 8-bit Adam).

    Each decade 10^-k gets its own run of linearly spaced values, so the map
    resolves both tiny and large magnitudes after block-wise absmax scaling.
    The signed map serves first moments; the unsigned one spends the sign bit
    on extra resolution for non-negative second moments. Values are
    bit-identical to bitsandbytes' map, so its checkpoints decode unchanged.
    """
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [1, 8], got {total_bits}")
    non_sign_bits = total_bits - 1
    if not 0 <= max_exponent_bits <= non_sign_bits:
        raise ValueError(
            f"max_exponent_bits must be in [0, {non_sign_bits}] for total_bits={total_bits}, got {max_exponent_bits}"
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
        add_decade(10.0 ** (-(max_exponent_bits - 1) + i), 2**shift)
    extra_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra_items > 0:
        add_decade(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1), extra_items)
    values.append(torch.tensor([0.0, 1.0]))
    return _pad_and_sort(torch.cat(values))


def create_linear_map(signed: bool = True, total_bits: int = 8) -> torch.Tensor:
    """Evenly spaced map over [-1, 1] (signed, with an exact zero) or [0, 1]."""
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [1, 8], got {total_bits}")
    # k / steps in float64, rounded once: the signed map then holds an exact 0
    # (float32 linspace leaves 3.7e-9 there) and is exactly symmetric.
    steps = 2 ** (total_bits - 1) - 1 if signed else 2**total_bits - 1
    first = -steps if signed else 0
    grid = torch.arange(first, steps + 1, dtype=torch.float64) / steps
    return _pad_and_sort(grid.float())


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
    """Raise a clear error unless `code` is 256 sorted finite float32 values."""
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {MAP_SIZE} float32 values, got {type(code).__name__}")
    if code.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {code.dtype}; build it with dist8bit.functional.create_dynamic_map()")
    if code.numel() != MAP_SIZE:
        raise ValueError(f"{name} must hold exactly {MAP_SIZE} values, got {code.numel()}; pad shorter maps with zeros")
    flat = code.reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    if not bool((flat[1:] >= flat[:-1]).all()):
        raise ValueError(f"{name} must be sorted in ascending order; use torch.sort(code).values")
