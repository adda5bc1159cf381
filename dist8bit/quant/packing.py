"""Code packing: how 4-bit codes share bytes; one layout for every backend.

Element 2j's code is the low nibble of byte j, element 2j + 1's the high
nibble. A run of n elements takes ceil(n / 2) bytes; an odd run leaves the
last high nibble 0. Blocks hold an even number of elements (every block size
is a power of two from 64) and start at a segment's first element, so a
block's codes start on a byte boundary: byte (block * blocksize / 2) of its
segment's codes. 8-bit codes are one per byte, unchanged.
"""

from __future__ import annotations

import torch

BITS_PER_BYTE = 8


def code_bytes(numel: int, bits: int) -> int:
    """Bytes that the codes of `numel` elements take at `bits` (8 or 4) per code."""
    if bits == 8:
        return numel
    if bits == 4:
        return (numel + 1) // 2
    raise ValueError(f"codes are 8 or 4 bits wide, got {bits}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 (one per element) -> packed bytes, two codes per byte."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed bytes -> `numel` uint8 codes, one per element."""
    flat = packed.reshape(-1)
    if flat.numel() != code_bytes(numel, 4):
        raise ValueError(f"{numel} 4-bit codes take {code_bytes(numel, 4)} bytes, got {flat.numel()}")
    both = torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)
    return both[:numel]
