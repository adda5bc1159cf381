"""Adapter from the backend interface to the registered torch operators."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from ..quant.codebook import Codebook
from . import ops
from .build import BuildError


def compiled_backend(kind: str) -> SimpleNamespace:
    """A backend object whose calls go to the extension registered for `kind`.

    Raises BuildError at the load step when the library registered no kernel
    (a stale or foreign binary), so the fallback warning says so.
    """
    if not ops.has_kernel("quantize_blockwise", kind):
        raise BuildError(
            kind,
            "load",
            f"the library loaded but registered no dist8bit::quantize_blockwise kernel for {kind}; "
            "delete the dist8bit cache folder to force a clean rebuild",
        )

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
            codebook.encoder,
            blocksize,
            seed,
            codes,
            absmax,
        )

    def dequantize_blockwise(
        codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor
    ) -> None:
        torch.ops.dist8bit.dequantize_blockwise(codes, code, absmax, blocksize, out)

    def fused_step(
        rule: int,
        wd_mode: int,
        hyper: Sequence[float],
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[Sequence[torch.Tensor]],
        absmaxes: Sequence[Sequence[torch.Tensor]],
        codebooks: Sequence[Codebook | None],
        grad_scale: torch.Tensor | None,
        update_scale: torch.Tensor | None,
        norm_out: torch.Tensor | None,
        nonfinite_count: torch.Tensor | None,
        segment_offsets: Sequence[int],
        blocksize: int,
        seed: int | None,
    ) -> None:
        books = _flatten_codebooks(codebooks)
        torch.ops.dist8bit.fused_step(
            rule,
            wd_mode,
            list(hyper),
            list(params),
            list(grads),
            *(list(slot) for pair in zip(states, absmaxes, strict=True) for slot in pair),
            books,
            grad_scale,
            update_scale,
            norm_out,
            nonfinite_count,
            list(segment_offsets),
            blocksize,
            seed,
        )

    return SimpleNamespace(
        name=kind,
        quantize_blockwise=quantize_blockwise,
        dequantize_blockwise=dequantize_blockwise,
        fused_step=fused_step,
    )


def _flatten_codebooks(codebooks: Sequence[Codebook | None]) -> list[torch.Tensor]:
    """[code, thresholds, encoder] per slot (unused slots repeat a used one); empty for 32-bit."""
    if all(book is None for book in codebooks):
        return []
    first = next(book for book in codebooks if book is not None)
    tensors: list[torch.Tensor] = []
    for book in codebooks:
        book = book or first
        tensors += [book.code, book.thresholds, book.encoder]
    return tensors
