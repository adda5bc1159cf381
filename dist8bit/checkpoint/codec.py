"""Quantize and dequantize state chunks with dist8bit.functional (the one implementation).

`quantize_exact` adds one thing on top of `quantize_blockwise`: values that are
themselves a dequantization come back as the very codes and scales they were
decoded from, so 8-bit -> fp32 -> 8-bit is bit-exact. That needs care only for
the signed map, whose most negative value is -0.993, not -1: a block whose
largest magnitude is negative decodes to at most 0.993 * absmax, and a plain
requantization would shrink its scale by 0.7% (and move some codes). For such
blocks the original scale is absmax / 0.993 to within an ulp; each candidate is
tried by quantizing the block with its largest element set to -candidate (which
fixes the scale and still encodes to the lowest code) and accepted only if the
result decodes to exactly the input bits. Genuine fp32 data never passes that
test, so it is quantized exactly as the optimizer would (and after a probe of a
few blocks fails, costs nothing more).

4-bit maps (16 values) work the same way: codes come packed two per byte
(quant/packing.py), an odd element count leaves the last high nibble 0, and
the signed 4-bit map's most negative value (-0.8875) is recovered like the
8-bit one's. The unsigned 4-bit map holds 1.0 and every block's largest
element encodes to it, so its scales come back unchanged.
"""

from __future__ import annotations

import torch

from .. import functional as F
from ..quant.layout import num_blocks
from ..quant.maps import map_bits
from ..quant.packing import code_bytes

# Tried in this order around absmax / |lowest code|, in ulps.
CANDIDATE_ULPS = (0, 1, -1, 2, -2)
# A wrong-by-an-ulp scale leaves errors of a few ulps of the scale; anything
# larger means the block is not a dequantization and is left as quantized.
NEAR_EXACT = 2.0**-20
PROBE = 32  # candidate blocks tried before deciding a chunk is genuine data
PROBE_BLOCKS = 512  # where the probe looks for them


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, numel: int | None = None
) -> torch.Tensor:
    """float32 values of 1-D codes; `numel` elements (needed for packed 4-bit codes, default all 8-bit codes)."""
    out = None if map_bits(code) == 8 else torch.empty(2 * codes.numel() if numel is None else numel)
    return F.dequantize_blockwise(codes.reshape(-1), absmax=absmax.reshape(-1), code=code, blocksize=blocksize, out=out)


def quantize_exact(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise codes and scales of 1-D `values` (float32), exact on dequantized input.

    Codes are one byte per element for a 256-value map, packed nibbles (ceil(n / 2) bytes) for a 16-value one."""
    n = values.numel()
    bits = map_bits(code)
    blocks = num_blocks(n, blocksize)
    padded = values.float().reshape(-1)
    if blocks * blocksize != n:  # zero padding changes neither the scale nor the other codes
        padded = torch.cat([padded, padded.new_zeros(blocks * blocksize - n)])
    codes, state = F.quantize_blockwise(padded, code=code, blocksize=blocksize)
    absmax = state.absmax
    lowest = float(code.min())
    if -1.0 < lowest < 0.0 and n > 0:
        rows = codes.view(blocks, code_bytes(blocksize, bits))
        _recover_scales(padded.view(blocks, blocksize), code, lowest, rows, absmax)
    codes = codes[: code_bytes(n, bits)]
    if bits == 4 and n % 2:  # the padding element's code: an odd tail leaves the last high nibble 0
        codes[-1] &= 0x0F
    return codes, absmax


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _recover_scales(blocks: torch.Tensor, code: torch.Tensor, lowest: float, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Fix codes/absmax in place for blocks that are a dequantization with a negative extreme.

    Such a block's extreme decodes to lowest * scale, so its minimum equals -absmax and a plain
    requantization can never reproduce it. A tensor is either a dequantization throughout or
    genuine data throughout (one fp32 step changes every value), so the candidates among the
    first PROBE_BLOCKS blocks decide whether the rest are worth looking at.
    """
    head = min(PROBE_BLOCKS, blocks.shape[0])
    rows = _candidates(blocks[:head], absmax[:head])
    if rows.numel() and not _recover(rows[:PROBE], blocks, code, lowest, codes, absmax):
        return  # genuine data: quantized exactly as the optimizer would
    rows = torch.cat([rows[PROBE:], _candidates(blocks[head:], absmax[head:]) + head])
    _recover(rows, blocks, code, lowest, codes, absmax)


def _candidates(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return ((blocks.amin(1) == -absmax) & (absmax > 0) & torch.isfinite(absmax)).nonzero().squeeze(1)


def _recover(
    rows: torch.Tensor, blocks: torch.Tensor, code: torch.Tensor, lowest: float, codes: torch.Tensor, absmax: torch.Tensor
) -> int:
    """Try the candidate scales on these blocks; returns how many came back bit-exact.

    Rows are gathered with index_select/index_copy_ (advanced indexing spins up a parallel
    region per call, which costs milliseconds on a busy machine)."""
    blocksize, width = blocks.shape[1], codes.shape[1]
    scale = (absmax.index_select(0, rows).double() / -lowest).float()
    recovered = 0
    for attempt, ulps in enumerate(CANDIDATE_ULPS):
        if rows.numel() == 0:
            break
        target = blocks.index_select(0, rows)
        trial_scale = scale
        for _ in range(abs(ulps)):
            trial_scale = torch.nextafter(trial_scale, torch.full_like(trial_scale, float("inf") if ulps > 0 else 0.0))
        trial = target.clone().scatter_(1, target.argmin(1, keepdim=True), -trial_scale.unsqueeze(1))
        trial_codes, trial_state = F.quantize_blockwise(trial.reshape(-1), code=code, blocksize=blocksize)
        trial_decoded = dequantize(trial_codes, trial_state.absmax, code, blocksize).view(-1, blocksize)
        exact = (_bits(trial_decoded) == _bits(target)).all(1)
        hits = exact.nonzero().squeeze(1)
        codes.index_copy_(0, rows.index_select(0, hits), trial_codes.view(-1, width).index_select(0, hits))
        absmax.index_copy_(0, rows.index_select(0, hits), trial_state.absmax.index_select(0, hits))
        recovered += hits.numel()
        keep = ~exact
        if attempt == 0:
            keep &= (trial_decoded - target).abs().amax(1) <= trial_scale * NEAR_EXACT
        kept = keep.nonzero().squeeze(1)
        rows, scale = rows.index_select(0, kept), scale.index_select(0, kept)
    return recovered


def error_bound(code: torch.Tensor) -> float:
    """Largest |x - dequantize(quantize(x))| / absmax for x in the map's range.

    Half the widest gap between neighbouring codes, or the distance from a
    range end (1, and -1 for a signed map or 0 for an unsigned one) to the
    nearest code, if larger: the 4-bit second-moment map has no 0, so a zero
    decodes to its smallest value, 1/16.
    """
    values = code.double().sort().values
    bound = float((values[1:] - values[:-1]).max()) / 2
    bound = max(bound, 1.0 - float(values[-1]))
    lowest = float(values[0])
    return max(bound, 1.0 + lowest if lowest < 0 else lowest)
