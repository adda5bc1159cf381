"""Re-read a written checkpoint and compare it with its source, chunk by chunk.

fp32 targets must equal the source's (dequantized) values exactly; 8-bit
targets must decode to within the quantizer's bound of the source values:
|x - x_hat| <= absmax_of_block * (error_bound(map) + 2^-22), the largest rounding
error the map allows (half its widest gap between codes, or the distance from +-1 to
its end codes). Carried-over tensors (model weights, scheduler state, ...) must
be bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import codec, plan
from .canonical import Buffer, Dense, OptimizerState
from .errors import CheckpointError
from .plan import dense_chunks
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


def _output_chunks(buffer: Buffer) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(decoded values, per-element allowed error or None for exact) per CHUNK elements."""
    if isinstance(buffer, Dense):
        for values in dense_chunks(buffer, lambda _: None):
            yield values, None
        return
    unit = codec.error_bound(buffer.code)
    blocksize = buffer.blocksize
    absmax = buffer.absmax.reshape(-1)
    for start, values in zip(range(0, buffer.numel, plan.CHUNK), dense_chunks(buffer, lambda _: None), strict=True):
        scales = absmax[start // blocksize : start // blocksize + -(-values.numel() // blocksize)]
        yield values, (scales * (unit + ROUNDING)).repeat_interleave(blocksize)[: values.numel()]


def compare_buffer(source: Buffer, output: Buffer, where: str, on_bytes: Callable[[int], None]) -> tuple[float, float]:
    if source.numel != output.numel:
        raise CheckpointError(f"verify: {where} has {output.numel} elements in the output but {source.numel} in the source")
    error = ratio = 0.0
    for expected, (actual, allowed) in zip(dense_chunks(source, on_bytes), _output_chunks(output), strict=True):
        finite = torch.isfinite(expected)
        if not bool(torch.isfinite(actual[finite]).all()):
            raise CheckpointError(f"verify: {where} decodes to non-finite values where the source is finite")
        difference = (actual - expected).abs().masked_fill(~finite, 0.0)
        error = max(error, float(difference.max()) if difference.numel() else 0.0)
        if allowed is None:
            chunk_ratio = 0.0 if error == 0.0 else float("inf")
        else:
            over = difference / allowed
            over = torch.where(allowed > 0, over, torch.where(difference > 0, float("inf"), 0.0))
            chunk_ratio = float(over.max()) if over.numel() else 0.0
        ratio = max(ratio, chunk_ratio)
    return error, ratio


def compare_optimizer(source: OptimizerState, output: OptimizerState, where: str, on_bytes: Callable[[int], None]) -> Agreement:
    agreement = Agreement()
    if len(source.param_groups) != len(output.param_groups):
        raise CheckpointError(
            f"verify: {where} has {len(output.param_groups)} param groups, the source {len(source.param_groups)}"
        )
    for index, (a, b) in enumerate(zip(source.param_groups, output.param_groups, strict=True)):
        changed = [k for k in a if k in b and k not in ("optim_bits", "blocksize", "min_8bit_size") and a[k] != b[k]]
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
            agreement.add(*compare_buffer(buffer, converted.buffers[name], f"{where} parameter {key!r} {name}", on_bytes))
    if agreement.bound_ratio > 1.0:
        kind = "is not exact" if agreement.bound_ratio == float("inf") else "exceeds the quantizer's error bound"
        raise CheckpointError(
            f"verify: {where} {kind} (max error {agreement.max_error:.3g}, {agreement.bound_ratio:.3g} x the bound)"
        )
    return agreement


def compare_carried(source: Any, output: Any, skip: set[tuple], on_bytes: Callable[[int], None]) -> int:
    """Every tensor outside the converted optimizer state dicts must be bit-identical; returns how many."""
    count = 0
    for (path, a), (_, b) in zip(_outside(source, skip), _outside(output, skip), strict=True):
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            if same:
                flat_a, flat_b = a.reshape(-1), b.reshape(-1)
                step = plan.CHUNK
                for start in range(0, a.numel(), step):
                    same = same and torch.equal(flat_a[start : start + step], flat_b[start : start + step])
                    on_bytes(min(step, a.numel() - start) * a.element_size())
            if not same:
                raise CheckpointError(f"verify: the carried-over tensor at {list(path)} differs from the source")
            count += 1
    return count


def _outside(tree: Any, skip: set[tuple]) -> Iterator[tuple[tuple, Any]]:
    for path, leaf in walk(tree):
        if not any(path[: len(s)] == s for s in skip):
            yield path, leaf
