"""Adapter from the backend interface to the registered torch operators.

Each function here takes the same arguments as the reference backend's
(reference.py, and reference_optim.fused_step for a FusedStepCall) and
flattens them into the operator schemas of ops.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from ..quant.codebook import Codebook
from . import ops
from .build import BuildError
from .contract import NUM_SLOTS, FusedStepCall


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
        x: torch.Tensor, codebook: Codebook, blocksize: int, seed: int | None, codes: torch.Tensor, absmax: torch.Tensor
    ) -> None:
        torch.ops.dist8bit.quantize_blockwise(
            x, codebook.code, codebook.thresholds, codebook.encoder, blocksize, seed, codes, absmax
        )

    def dequantize_blockwise(
        codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor
    ) -> None:
        torch.ops.dist8bit.dequantize_blockwise(codes, code, absmax, blocksize, out)

    def fused_step(call: FusedStepCall) -> None:
        torch.ops.dist8bit.fused_step(*_operator_arguments(call))

    return SimpleNamespace(
        name=kind,
        quantize_blockwise=quantize_blockwise,
        dequantize_blockwise=dequantize_blockwise,
        fused_step=fused_step,
    )


def _operator_arguments(call: FusedStepCall) -> list[Any]:
    """The call flattened into torch.ops.dist8bit.fused_step's arguments, in the schema's order (ops.py)."""
    slots = [list(entries) for slot in range(NUM_SLOTS) for entries in (call.states[slot], call.absmaxes[slot])]
    return [
        int(call.rule),
        int(call.wd_mode),
        list(call.constants),
        list(call.params),
        list(call.grads),
        *slots,
        _flatten_codebooks(call.codebooks),
        call.grad_scale,
        call.update_scale,
        call.norm_out,
        call.nonfinite_count,
        list(call.errors),
        list(call.segment_offsets),
        call.blocksize,
        call.seed,
    ]


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
