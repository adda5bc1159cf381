"""Plain-PyTorch backend: the oracle the kernels are tested against.

It follows the rounding rule of dist8bit.quant.codebook to the bit, runs on
any device torch supports, and is the fallback when no compiler is available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.codebook import Codebook, nearest_code_index
from ..quant.layout import num_blocks
from ..quant.maps import MAP_SIZE_4BIT
from ..quant.packing import pack_nibbles, unpack_nibbles
from ..quant.stochastic import uniform_for_indices


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x as float32 rows of `blocksize`, the last row zero-padded."""
    flat = x.reshape(-1).float()
    padding = num_blocks(flat.numel(), blocksize) * blocksize - flat.numel()
    return F.pad(flat, (0, padding)).view(-1, blocksize)


def scaled_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, absmax): values normalised by their block's absmax, NaN mapped to 0."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # ones / absmax, not 1.0 / absmax: a true division on every device.
    scaled = blocks * (torch.ones_like(absmax) / absmax).unsqueeze(1)
    scaled = torch.where(torch.isnan(scaled), torch.zeros_like(scaled), scaled)
    return scaled.reshape(-1)[: x.numel()], absmax


def round_stochastically(s: torch.Tensor, nearest: torch.Tensor, code: torch.Tensor, seed: int) -> torch.Tensor:
    """Pick the code below or above s with probability given by the distance."""
    at_or_above = s >= code[nearest]
    low = torch.where(at_or_above, nearest, nearest - 1).clamp(min=0)
    high = (low + 1).clamp(max=code.numel() - 1)
    code_low, code_high = code[low], code[high]
    fraction = (s - code_low) / (code_high - code_low)
    indices = torch.arange(s.numel(), device=s.device, dtype=torch.int64)
    u = uniform_for_indices(seed, indices)
    return torch.where(u < fraction, high, low)


def quantize_blockwise(
    x: torch.Tensor,
    codebook: Codebook,
    blocksize: int,
    seed: int | None,
    codes: torch.Tensor,
    absmax: torch.Tensor,
) -> None:
    if x.numel() == 0:
        return
    s, block_absmax = scaled_blocks(x, blocksize)
    index = nearest_code_index(s, codebook.thresholds)
    if seed is not None:
        index = round_stochastically(s, index, codebook.code, seed)
    index = index.to(torch.uint8)
    codes.view(-1).copy_(pack_nibbles(index) if codebook.bits == 4 else index)
    absmax.copy_(block_absmax)


def dequantize_blockwise(
    codes: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
) -> None:
    """out[i] = code[c_i] * absmax[i // blocksize]; codes are packed two per byte for a 16-value `code`."""
    n = out.numel()
    if n == 0:
        return
    flat = unpack_nibbles(codes, n) if code.numel() == MAP_SIZE_4BIT else codes.reshape(-1)
    values = code[flat.long()]
    scales = absmax.repeat_interleave(blocksize)[:n]
    out.view(-1).copy_(values * scales)
