"""Counter-based random numbers for stochastic rounding, shared by all backends.

Rounding element i of a tensor up or down must not depend on thread layout,
so the random number is a pure function of (seed, i). The CPU and CUDA kernels
implement the same integer hash (csrc/common/stochastic_rounding.h); tests check
that all three give identical codes.

    mix(x)  = lowbias32-style 32-bit finaliser (constants below)
    key     = mix(seed_lo ^ mix(seed_hi))
    r(i)    = mix(lo32(i) ^ mix(hi32(i) ^ key))
    u(i)    = (r(i) >> 8) * 2^-24        (a float32 in [0, 1))
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL_A = 0x21F0AAAD
MUL_B = 0x735A2D97


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """Bijective 32-bit integer hash; works on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    return x ^ (x >> 15)


def seed_key(seed: int) -> int:
    """Fold a 64-bit seed into the 32-bit key the per-element hash uses."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return mix32((seed & MASK32) ^ mix32(seed >> 32))


def uniform_for_indices(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """u(i) for int64 element indices, as float32 in [0, 1)."""
    key = seed_key(seed)
    high = mix32((indices >> 32) ^ key)
    bits = mix32((indices & MASK32) ^ high)
    return (bits >> 8).to(torch.float32) * (2.0**-24)
