"""Re-read a written checkpoint and compare it with its source, chunk by chunk.

fp32 targets must equal the source's (dequantized) values exactly; 8-bit
targets must decode to within the quantizer's bound of the source values:
|x - x_hat| <= absmax_of_block * (error_bound(map) + 2^-22), the largest rounding
error the map allows (half its widest gap between codes, or the distance from +-1 to
its end codes). Carried-over tensors (model weights, scheduler state, ...) must
be bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..optim.master_weights import ERROR_KEY, converted_error
from ..quant.layout import num_blocks
from . import codec, plan, weight_errors
from .canonical import Buffer, OptimizerState, Pieced, Quantized
from .errors import CheckpointError
from .loading import Read
from .plan import read_values
from .writer import walk

ROUNDING = 2.0**-22  # float32 rounding of decode and difference: a few ulps of the block's absmax


@dataclass
class Agreement:
    """Worst case over everything compared."""

    max_error: float = 0.0
    bound_ratio: float = 0.0  # max error / allowed error (<= 1 passes; 0 for exact copies)
    tensors: int = 0

    def add(self, error: float, ratio: float) -> None:
        self.max_error = max(self.max_error, error)
        self.bound_ratio = max(self.bound_ratio, ratio)
        self.tensors += 1


def _block_maxima(difference: torch.Tensor, allowed: torch.Tensor | None, blocksize: int) -> torch.Tensor:
    """The largest difference per quantization block (elementwise when the output is fp32)."""
    if allowed is None:
        return difference
    padding = allowed.numel() * blocksize - difference.numel()
    return torch.nn.functional.pad(difference, (0, padding)).view(-1, blocksize).amax(1)


def _largest(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def compare_buffer(
    source: Buffer, output: Buffer, where: str, on_bytes: Callable[[int], None], read: Read
) -> tuple[float, float]:
    """(max |output - source|, max over blocks of that error / the allowed error) for one state buffer."""
    if source.numel != output.numel:
        raise CheckpointError(f"verify: {where} has {output.numel} elements in the output but {source.numel} in the source")
    error = ratio = 0.0
    for offset, piece in output.pieces if isinstance(output, Pieced) else ((0, output),):
        quantized = isinstance(piece, Quantized)
        blocksize = piece.blocksize if quantized else 1
        unit = codec.error_bound(piece.code) + ROUNDING if quantized else 0.0
        for start in range(0, piece.numel, plan.CHUNK):  # chunks start on block boundaries
            stop = min(start + plan.CHUNK, piece.numel)
            expected = read_values(source, offset + start, offset + stop, read)
            actual = read_values(piece, start, stop, read)
            on_bytes(source.nbytes() * (stop - start) // max(source.numel, 1))
            allowed = read(piece.absmax, start // blocksize, num_blocks(stop, blocksize)) * unit if quantized else None
            chunk_error, chunk_ratio = _compare_chunk(expected, actual, allowed, blocksize, where)
            error, ratio = max(error, chunk_error), max(ratio, chunk_ratio)
    return error, ratio


def _compare_chunk(
    expected: torch.Tensor, actual: torch.Tensor, allowed: torch.Tensor | None, blocksize: int, where: str
) -> tuple[float, float]:
    difference = _block_maxima((actual - expected).abs(), allowed, blocksize)
    error = _largest(difference)
    if not math.isfinite(error):  # slow path: NaN/Inf in the source stay out of the comparison
        finite = expected.abs() < math.inf
        if not bool((actual[finite].abs() < math.inf).all()):
            raise CheckpointError(f"verify: {where} decodes to non-finite values where the source is finite")
        difference = _block_maxima((actual - expected).abs().masked_fill(~finite, 0.0), allowed, blocksize)
        error = _largest(difference)
    if allowed is None:
        return error, 0.0 if error == 0.0 else math.inf
    return error, _largest(difference / allowed.clamp_min(torch.finfo(torch.float32).tiny))


# Group keys a conversion may rewrite: the target precision and block layout, and the
# state format version (an old checkpoint is written in the current format).
CONVERTED_GROUP_KEYS = ("optim_bits", "blocksize", "min_8bit_size", "dist8bit_state_version")


def compare_errors(
    source: weight_errors.ErrorBuffer | None,
    output: weight_errors.ErrorBuffer | None,
    error_bits: int | str | None,
    where: str,
    on_bytes: Callable[[int], None],
    read: Read,
) -> None:
    """A weight_error must come out exactly as planned: the source's codes at the output's width, or gone when dropped."""
    expected = None if source is None else weight_errors.output_dtype(weight_errors.dtype_of(source), error_bits)
    found = None if output is None else weight_errors.dtype_of(output)
    if expected != found:
        raise CheckpointError(f"verify: {where} {ERROR_KEY} is {found} in the output, expected {expected}")
    if source is None or output is None:
        return
    if source.numel != output.numel:
        raise CheckpointError(f"verify: {where} {ERROR_KEY} has {output.numel} elements, the source {source.numel}")
    bits = weight_errors.BITS[found]
    for start in range(0, source.numel, plan.CHUNK):
        stop = min(start + plan.CHUNK, source.numel)
        want = converted_error(weight_errors.read_codes(source, start, stop, read), bits)
        if not torch.equal(want, weight_errors.read_codes(output, start, stop, read)):
            raise CheckpointError(f"verify: {where} {ERROR_KEY} differs from the source's codes")
        on_bytes(source.nbytes() * (stop - start) // max(source.numel, 1))


def compare_optimizer(
    source: OptimizerState,
    output: OptimizerState,
    where: str,
    on_bytes: Callable[[int], None],
    read: Read,
    error_bits: int | str | None = None,
) -> Agreement:
    agreement = Agreement()
    if len(source.param_groups) != len(output.param_groups):
        raise CheckpointError(
            f"verify: {where} has {len(output.param_groups)} param groups, the source {len(source.param_groups)}"
        )
    for index, (a, b) in enumerate(zip(source.param_groups, output.param_groups, strict=True)):
        changed = [k for k in a if k in b and k not in CONVERTED_GROUP_KEYS and a[k] != b[k]]
        if changed:
            raise CheckpointError(f"verify: {where} param group {index} changed {changed}")
    for key, param in source.params.items():
        converted = output.params.get(key)
        if converted is None:
            raise CheckpointError(f"verify: {where} lost the state of parameter {key!r}")
        if param.step is not None and converted.step != param.step:
            raise CheckpointError(f"verify: {where} parameter {key!r} step {converted.step} != source {param.step}")
        for name, buffer in param.buffers.items():
            if name not in converted.buffers:
                raise CheckpointError(f"verify: {where} parameter {key!r} lost its {name}")
            label = f"{where} parameter {key!r} {name}"
            agreement.add(*compare_buffer(buffer, converted.buffers[name], label, on_bytes, read))
        compare_errors(param.error, converted.error, error_bits, f"{where} parameter {key!r}", on_bytes, read)
    if agreement.bound_ratio > 1.0:
        kind = "is not exact" if agreement.bound_ratio == float("inf") else "exceeds the quantizer's error bound"
        raise CheckpointError(
            f"verify: {where} {kind} (max error {agreement.max_error:.3g}, {agreement.bound_ratio:.3g} x the bound)"
        )
    return agreement


def compare_carried(source: Any, output: Any, skip: set[tuple], on_bytes: Callable[[int], None], read: Read) -> int:
    """Every tensor outside the converted optimizer state dicts must be bit-identical; returns how many."""
    count = 0
    for (path, a), (_, b) in zip(_outside(source, skip), _outside(output, skip), strict=True):
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            for start in range(0, a.numel() if same else 0, plan.CHUNK):
                stop = min(start + plan.CHUNK, a.numel())
                same = same and torch.equal(read(a, start, stop), read(b, start, stop))
                on_bytes((stop - start) * a.element_size())
            if not same:
                raise CheckpointError(f"verify: the carried-over tensor at {list(path)} differs from the source")
            count += 1
    return count


def _outside(tree: Any, skip: set[tuple]) -> Iterator[tuple[tuple, Any]]:
    for path, leaf in walk(tree):
        if not any(path[: len(s)] == s for s in skip):
            yield path, leaf
