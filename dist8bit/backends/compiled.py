"""Adapter from the backend interface to the registered torch operators."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..quant.codebook import Codebook
from . import ops


def compiled_backend(kind: str) -> SimpleNamespace:
    """A backend object whose calls go to the extension registered for `kind`."""
    if not ops.has_kernel("quantize_blockwise", kind):
        raise RuntimeError(f"the {kind} extension loaded but registered no dist8bit::quantize_blockwise kernel")

    def quantize_blockwise(
        x: torch.Tensor,
        codebook: Codebook,
        blocksize: int,
        seed: int | None,
        codes: torch.Tensor,
        absmax: torch.Tensor,
    ) -> None:
        torch.ops.dist8bit.quantize_blockwise(
            x,
            codebook.code,
            codebook.thresholds,
            codebook.lut,
            codebook.lut_mantissa_bits,
            codebook.lut_min_exponent,
            codebook.refine_steps,
            blocksize,
            seed,
            codes,
            absmax,
        )

    def dequantize_blockwise(
        codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor
    ) -> None:
        torch.ops.dist8bit.dequantize_blockwise(codes, code, absmax, blocksize, out)

    return SimpleNamespace(
        __name__=f"dist8bit.backends.{kind}",
        name=kind,
        quantize_blockwise=quantize_blockwise,
        dequantize_blockwise=dequantize_blockwise,
    )
