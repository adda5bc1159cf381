"""Compensated bf16 parameters' `weight_error` in conversions: check, carry, re-width or drop.

A bfloat16 parameter trained with master_weights="compensated" keeps the state
entry `weight_error`: one int8 (error_bits=8) or int16 (16) code per element,
the low bits its last bf16 write dropped (quant/weight_error.py). It belongs to
the weights, not to the optimizer's moments: it has no blocks and no map, so it
is never quantized or dequantized. A conversion carries it element for element
whatever precision the states get (a ZeRO reshard moves each element's code
with it, like a value), and only on request changes it:

    error_bits=None    as the source has it (every torch-convention loader
                       tolerates the extra entry: torch.optim ignores it)
    error_bits=8 / 16  re-width with optim.master_weights.converted_error
                       (8 -> 16 exact; 16 -> 8 rounds to 1/256 of a bf16 ulp)
    error_bits="none"  drop it: each weight then loses its compensation, less
                       than half a bfloat16 ulp; warned and in the summary

A buffer that is not int8/int16 or whose element count is not the parameter's
is refused, naming the parameter: a wrong buffer would silently shift weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..optim.master_weights import ERROR_KEY, converted_error
from ..quant.weight_error import ERROR_DTYPES, fits_error_codes
from .canonical import Dense, Pieced
from .errors import CheckpointError
from .loading import Read, slice_read
from .writer import Sink, Slot

DROP = "none"
CHOICES = (8, 16, DROP)
BITS = {dtype: bits for bits, dtype in ERROR_DTYPES.items()}
LOST = "each weight loses its compensation, less than half a bfloat16 ulp"
# torch state dict files only: their reader skips the checks of a buffer that is dropped anyway
DROP_REMEDY = "; to convert without it, drop it: --error-bits none"

ErrorBuffer = Dense | Pieced  # Dense of int8/int16 codes in the parameter's element order, or pieces of them


def check_choice(error_bits: Any) -> int | str | None:
    """The --error-bits value: None (as the source has it), 8, 16 or "none" (drop)."""
    if error_bits is None:
        return None
    if isinstance(error_bits, str) and error_bits.isdigit():
        error_bits = int(error_bits)
    if isinstance(error_bits, bool) or error_bits not in CHOICES:
        raise CheckpointError(f"--error-bits must be 8, 16 or none, got {error_bits!r}")
    return error_bits


def check_dtype(dtype: Any, numel: int, expected: int | None, where: str, remedy: str = "") -> None:
    """Refuse a weight_error that is not int8/int16 codes, one per element of its parameter."""
    if not fits_error_codes(dtype, numel, expected):
        count = "" if expected is None else f" of {expected} elements (one per element of the parameter)"
        raise CheckpointError(
            f"{where}: {ERROR_KEY} must be an int8 or int16 tensor{count}, the compensated bf16 weights' error codes; "
            f"got {dtype} with {numel} elements (corrupt, or re-saved by an optimizer that casts state it does not "
            f"keep, such as torch.optim?){remedy}"
        )


def check(value: Any, expected: int | None, where: str, remedy: str = "") -> torch.Tensor:
    """A saved weight_error entry, checked (see check_dtype)."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: {ERROR_KEY} must be an int8 or int16 tensor, got {type(value).__name__}{remedy}")
    check_dtype(value.dtype, value.numel(), expected, where, remedy)
    return value


def dtype_of(buffer: ErrorBuffer) -> torch.dtype:
    if isinstance(buffer, Dense):
        return buffer.values.dtype
    dtypes = {piece.values.dtype for _, piece in buffer.pieces}
    return dtypes.pop() if len(dtypes) == 1 else torch.int16  # mixed widths: int16 holds both exactly


def output_dtype(source: torch.dtype, error_bits: int | str | None) -> torch.dtype | None:
    """The output's dtype for a source buffer of `source` dtype; None when it is dropped."""
    if error_bits == DROP:
        return None
    return source if error_bits is None else ERROR_DTYPES[error_bits]


def read_codes(buffer: ErrorBuffer, start: int, stop: int, read: Read = slice_read) -> torch.Tensor:
    """Codes [start, stop) of an error buffer, as stored (pieces of several widths come back as int16)."""
    if isinstance(buffer, Dense):
        return read(buffer.values, start, stop)
    dtype, parts = dtype_of(buffer), []
    for offset, piece in buffer.pieces:
        low, high = max(start, offset), min(stop, offset + piece.numel)
        if low < high:
            parts.append(converted_error(read(piece.values, low - offset, high - offset), BITS[dtype]))
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def write_codes(sink: Sink, slot: Slot, buffer: ErrorBuffer, start: int, stop: int, read: Read, chunk: int) -> None:
    """Codes [start, stop) of `buffer` into `slot`, converted to its width, `chunk` elements at a time."""
    for low in range(start, stop, chunk):
        codes = read_codes(buffer, low, min(low + chunk, stop), read)
        sink.write(slot, converted_error(codes, BITS[slot.dtype]))
        sink.progress(codes.numel() * codes.element_size())


@dataclass
class Tally:
    """What a conversion did with weight_error buffers, for its summary line and the warning when dropped."""

    error_bits: int | str | None = None
    params: int = 0
    source_dtypes: set[torch.dtype] = field(default_factory=set)

    @classmethod
    def of(cls, params: Iterable[Any], error_bits: int | str | None) -> Tally:
        """The tally of canonical ParamStates."""
        tally = cls(error_bits)
        for param in params:
            if param.error is not None:
                tally.add(dtype_of(param.error))
        return tally

    def add(self, dtype: torch.dtype) -> None:
        self.params += 1
        self.source_dtypes.add(dtype)

    def describe(self) -> str | None:
        """'weight_error of N compensated bf16 parameters (int8) carried per element, unchanged' (None: none met)."""
        if not self.params:
            return None
        widths = "/".join(str(d).removeprefix("torch.") for d in sorted(self.source_dtypes, key=str))
        head = f"{ERROR_KEY} of {self.params} compensated bf16 parameter{'s' if self.params != 1 else ''} ({widths})"
        if self.error_bits == DROP:
            return f"{head} dropped: {LOST}"
        target = ERROR_DTYPES.get(self.error_bits) if self.error_bits is not None else None
        if target is None or self.source_dtypes == {target}:
            return f"{head} carried per element, unchanged"
        return f"{head} converted to {str(target).removeprefix('torch.')}"

    def warn(self, where: Any) -> None:
        """The warning a drop must give (never silent)."""
        if self.error_bits == DROP and self.params:
            warnings.warn(f"{where}: {self.describe()}", UserWarning, stacklevel=3)
