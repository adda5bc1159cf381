"""Approximate quantiles without a full sort (the "SRAM quantiles" idea).

The input is cut into chunks small enough to sort in cache; each chunk's
quantiles are interpolated from its own sorted values and the estimates are
averaged, weighted by chunk size. Cost is O(n log chunk) with every chunk
sorted in parallel, instead of O(n log n) for one global sort, and the error
shrinks as chunks grow (tests pin it against exact quantiles).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096


def quantile_levels(num_quantiles: int, offset: float, device: torch.device) -> torch.Tensor:
    """Probability levels: num_quantiles evenly spaced in [offset, 1 - offset]."""
    return torch.linspace(offset, 1.0 - offset, num_quantiles, device=device, dtype=torch.float64)


def _sorted_chunk_quantiles(sorted_rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of every sorted row: (rows, len(levels))."""
    width = sorted_rows.shape[1]
    position = levels * (width - 1)
    below = position.floor().long().clamp(max=width - 1)
    above = (below + 1).clamp(max=width - 1)
    weight = (position - below).to(sorted_rows.dtype)
    low = sorted_rows[:, below]
    high = sorted_rows[:, above]
    return low + (high - low) * weight


def default_offset(num_quantiles: int) -> float:
    """Half a level's width, 1 / (2 * num_quantiles): the levels are then the
    centres of num_quantiles equal slices of probability (1/512 for 256).
    bitsandbytes applies the same rule when num_quantiles < 256; a fixed
    1/512 with few quantiles would put the outer ones far in the tails.
    """
    return 1.0 / (2 * num_quantiles)


def estimate_quantiles(
    A: torch.Tensor,
    offset: float | None = None,
    num_quantiles: int = 256,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Estimate `num_quantiles` quantiles of A at levels linspace(offset, 1-offset).

    `offset` defaults to 1 / (2 * num_quantiles) (default_offset). Returns
    float32 values on A's device, in ascending order.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if not A.is_floating_point():
        raise TypeError(f"A must be a floating-point tensor, got {A.dtype}")
    if A.numel() == 0:
        raise ValueError("A is empty; quantiles need at least one element")
    if not isinstance(num_quantiles, int) or not 1 <= num_quantiles <= 256:
        raise ValueError(f"num_quantiles must be an int in [1, 256], got {num_quantiles!r}")
    if offset is None:
        offset = default_offset(num_quantiles)
    if not 0 <= offset < 0.5:
        raise ValueError(f"offset must be in [0, 0.5), got {offset}")
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2, got {chunk_size}")
    flat = A.detach().reshape(-1).float()
    levels = quantile_levels(num_quantiles, offset, A.device)
    full_chunks = flat.numel() // chunk_size
    estimates = []
    weights = []
    if full_chunks:
        rows = flat[: full_chunks * chunk_size].view(full_chunks, chunk_size)
        per_chunk = _sorted_chunk_quantiles(torch.sort(rows, dim=1).values, levels.float())
        estimates.append(per_chunk.double().sum(dim=0))
        weights.append(full_chunks * chunk_size)
    tail = flat[full_chunks * chunk_size :]
    if tail.numel():
        tail_q = _sorted_chunk_quantiles(torch.sort(tail).values.view(1, -1), levels.float())[0]
        # Chunks are weighted by element count; the full-chunk sum is a sum of means.
        estimates.append(tail_q.double() * tail.numel() / chunk_size)
        weights.append(tail.numel())
    total_chunks = sum(weights) / chunk_size
    return (sum(estimates) / total_chunks).float()
