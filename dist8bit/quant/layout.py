"""Block layout: how a run of elements is cut into quantization blocks.

One rule everywhere: blocks of `blocksize` elements start at the first element
of each segment (a tensor, or a parameter's piece of a flat shard), and the
last block of a segment may be short. No block ever spans two segments, so a
block's scale never mixes two parameters.
"""

from __future__ import annotations

MIN_BLOCKSIZE = 64
DEFAULT_BLOCKSIZE = 256
SUPPORTED_BLOCKSIZES = tuple(2**k for k in range(6, 13))


def check_blocksize(blocksize: int, name: str = "blocksize") -> int:
    """Accept only powers of two in [64, 4096]: what the kernels are tuned for."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    return blocksize


def num_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks (and absmax scales) a segment of `numel` elements needs."""
    return -(-numel // blocksize)
