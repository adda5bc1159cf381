"""Block layout: how a run of elements is cut into quantization blocks.

One rule everywhere: blocks of `blocksize` elements start at the first element
of each segment (a tensor, or a parameter's piece of a flat shard), and the
last block of a segment may be short. No block ever spans two segments, so a
block's scale never mixes two parameters.

Two ranges of block sizes, both powers of two from 64:
- `QUANTIZE_BLOCKSIZES` (up to 65536) for `dist8bit.functional`: the
  quantize/dequantize kernels of every backend take any block size (blocks
  above their tuned sizes take a two-pass path), as bitsandbytes' CPU path
  accepts 16384 and more;
- `SUPPORTED_BLOCKSIZES` (up to 4096) for 8-bit optimizer states: the fused
  step kernels keep one whole block in registers / L1 (CPU: a 4096-float
  buffer per state; CUDA: one block per 512-thread CUDA block) while they
  compute its new absmax.
"""

from __future__ import annotations

MIN_BLOCKSIZE = 64
DEFAULT_BLOCKSIZE = 256
MAX_STATE_BLOCKSIZE = 4096
MAX_QUANTIZE_BLOCKSIZE = 65536
SUPPORTED_BLOCKSIZES = tuple(2**k for k in range(6, MAX_STATE_BLOCKSIZE.bit_length()))
QUANTIZE_BLOCKSIZES = tuple(2**k for k in range(6, MAX_QUANTIZE_BLOCKSIZE.bit_length()))


def check_blocksize(blocksize: int, name: str = "blocksize", supported: tuple[int, ...] = SUPPORTED_BLOCKSIZES) -> int:
    """Accept only the powers of two in `supported` (default: optimizer-state sizes)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in supported:
        hint = ""
        if blocksize in QUANTIZE_BLOCKSIZES:
            hint = (
                f"; 8-bit optimizer states take blocksizes up to {MAX_STATE_BLOCKSIZE} (the fused step kernels hold a "
                f"whole block while they compute its absmax), while dist8bit.functional.quantize_blockwise takes up "
                f"to {MAX_QUANTIZE_BLOCKSIZE}"
            )
        raise ValueError(f"{name} must be one of {supported}, got {blocksize!r}{hint}")
    return blocksize


def num_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks (and absmax scales) a segment of `numel` elements needs."""
    return -(-numel // blocksize)
