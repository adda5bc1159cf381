"""From a canonical source state and a target precision to output slots and the jobs that fill them.

Every job streams: it reads its source in chunks of CHUNK elements (a multiple
of every block size, so chunk boundaries are block boundaries and chunked
quantization equals whole-tensor quantization), converts, and appends to its
output slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..optim.state import ABSMAX_SUFFIX, CODES_SUFFIX, STATE_FORMAT_VERSION
from ..quant.layout import DEFAULT_BLOCKSIZE, num_blocks
from ..quant.maps import create_dynamic_map
from . import codec, optimizers
from .canonical import Buffer, Dense, OptimizerState, ParamState, Quantized
from .loading import Read, slice_read
from .writer import Sink, Slot, map_leaves

CHUNK = 1 << 20  # elements per read: 4 MiB of float32, a multiple of every block size
DEFAULT_MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class Target:
    """What to convert to; None fields mean "as the source has it, else the default"."""

    precision: str  # "fp32" or "8bit"
    blocksize: int | None = None
    min_8bit_size: int | None = None
    keep_fp32: frozenset = frozenset()
    # With "8bit": exactly these parameter keys get 8-bit state, whatever the source had (an
    # optimizer loading in memory has already decided each parameter's precision).
    eight_bit_keys: frozenset | None = None


@dataclass
class Job:
    label: str
    bytes_in: int
    run: Callable[[Sink], None]


@dataclass
class Plan:
    """Output tree (Slots where tensors go) and the jobs that fill the slots."""

    tree: Any
    read: Read = slice_read
    jobs: list[Job] = field(default_factory=list)


def read_values(buffer: Buffer, start: int, stop: int, read: Read = slice_read) -> torch.Tensor:
    """Elements [start, stop) of a buffer's values as float32 (dequantized if 8-bit)."""
    if isinstance(buffer, Dense):
        return read(buffer.values, start, stop).float()
    if isinstance(buffer, Quantized):
        blocksize = buffer.blocksize
        first, last = start // blocksize, num_blocks(stop, blocksize)
        codes = read(buffer.codes, first * blocksize, min(last * blocksize, buffer.numel))
        values = codec.dequantize(codes, read(buffer.absmax, first, last), buffer.code, blocksize)
        return values[start - first * blocksize : stop - first * blocksize]
    parts = []
    for offset, piece in buffer.pieces:
        low, high = max(start, offset), min(stop, offset + piece.numel)
        if low < high:
            parts.append(read_values(piece, low - offset, high - offset, read))
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0)


def dense_chunks(buffer: Buffer, on_bytes: Callable[[int], None], read: Read = slice_read) -> Iterator[torch.Tensor]:
    """float32 chunks of CHUNK elements of a buffer's values (dequantized if 8-bit); reports bytes read."""
    total = buffer.numel
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        yield read_values(buffer, start, stop, read)
        on_bytes(buffer.nbytes() * (stop - start) // max(total, 1))


def copy_job(label: str, source: torch.Tensor, slot: Slot, read: Read) -> Job:
    """Carry a tensor over unchanged (cast to the slot's dtype)."""

    def run(sink: Sink) -> None:
        for start in range(0, source.numel(), CHUNK):
            piece = read(source, start, min(start + CHUNK, source.numel()))
            sink.write(slot, piece.to(slot.dtype))
            sink.progress(piece.numel() * piece.element_size())

    return Job(label, source.numel() * source.element_size(), run)


def value_job(label: str, value: torch.Tensor, slot: Slot) -> Job:
    def run(sink: Sink) -> None:
        sink.write(slot, value)

    return Job(label, 0, run)


def to_dense_job(label: str, buffer: Buffer, slot: Slot, read: Read) -> Job:
    def run(sink: Sink) -> None:
        for values in dense_chunks(buffer, sink.progress, read):
            sink.write(slot, values)

    return Job(label, buffer.nbytes(), run)


def to_quantized_job(
    label: str, buffer: Buffer, codes: Slot, absmax: Slot, blocksize: int, code: torch.Tensor, read: Read
) -> Job:
    if isinstance(buffer, Quantized) and buffer.blocksize == blocksize and torch.equal(buffer.code, code):

        def run(sink: Sink) -> None:  # already in the target layout: copy codes and scales as they are
            for source, slot in ((buffer.codes, codes), (buffer.absmax, absmax)):
                for start in range(0, source.numel(), CHUNK):
                    piece = read(source, start, min(start + CHUNK, source.numel()))
                    sink.write(slot, piece)
                    sink.progress(piece.numel() * piece.element_size())

    else:

        def run(sink: Sink) -> None:
            for values in dense_chunks(buffer, sink.progress, read):
                chunk_codes, chunk_absmax = codec.quantize_exact(values, code, blocksize)
                sink.write(codes, chunk_codes)
                sink.write(absmax, chunk_absmax)

    return Job(label, buffer.nbytes(), run)


# ----------------------------------------------------------------- optimizer
def _blocksize_of(group: dict[str, Any], params: list[ParamState], target: Target) -> int:
    if target.blocksize is not None:
        return target.blocksize
    if "blocksize" in group:
        return int(group["blocksize"])
    sizes = {b.blocksize for p in params for b in p.buffers.values() if isinstance(b, Quantized)}
    return sizes.pop() if len(sizes) == 1 else DEFAULT_BLOCKSIZE


def output_group(group: dict[str, Any], target: Target, blocksize: int, min_8bit_size: int) -> dict[str, Any]:
    hyper = {k: v for k, v in group.items() if k != "params"}
    if target.precision == "8bit":
        hyper |= {"optim_bits": 8, "min_8bit_size": min_8bit_size, "blocksize": blocksize}
        hyper["dist8bit_state_version"] = STATE_FORMAT_VERSION
    elif "optim_bits" in hyper:
        hyper["optim_bits"] = 32
    return {**hyper, "params": list(group["params"])}


def plan_optimizer(state: OptimizerState, target: Target, where: str, read: Read = slice_read) -> Plan:
    """Output state dict (torch conventions; dist8bit's 8-bit names for 8-bit) and its jobs."""
    if target.precision == "8bit" and state.source_format == "torch":
        optimizers.check_torch_flags(state.optimizer, state.param_groups, where)
    group_of = state.group_of()
    members: dict[int, list[ParamState]] = {}
    for key, param in state.params.items():
        members.setdefault(id(group_of[key]), []).append(param)
    source_has_8bit = any(isinstance(b, Quantized) for p in state.params.values() for b in p.buffers.values())
    plan = Plan(tree=None, read=read)
    groups, layout = [], {}
    for group in state.param_groups:
        blocksize = _blocksize_of(group, members.get(id(group), []), target)
        min_8bit_size = target.min_8bit_size or int(group.get("min_8bit_size", DEFAULT_MIN_8BIT_SIZE))
        groups.append(output_group(group, target, blocksize, min_8bit_size))
        layout[id(group)] = (blocksize, min_8bit_size)
    entries = {}
    for key, param in state.params.items():
        blocksize, min_8bit_size = layout[id(group_of[key])]
        if target.precision == "fp32":
            eight_bit = False
        elif target.eight_bit_keys is not None:
            eight_bit = key in target.eight_bit_keys
        elif any(isinstance(b, Quantized) for b in param.buffers.values()):
            eight_bit = True
        elif source_has_8bit and target.min_8bit_size is None:
            eight_bit = False  # the source optimizer chose 32-bit for it (small tensor, or an override)
        else:
            eight_bit = param.numel >= min_8bit_size and key not in target.keep_fp32
        entries[key] = _plan_param(plan, param, eight_bit, blocksize, f"{where}: parameter {key!r}")
    plan.tree = {"state": entries, "param_groups": groups}
    return plan


def _plan_param(plan: Plan, param: ParamState, eight_bit: bool, blocksize: int, where: str) -> dict[str, Any]:
    step = Slot((), torch.float32, f"{where}: step")
    # dist8bit needs a step; torch's SGD keeps none. State exists, so at least one step was taken.
    plan.jobs.append(value_job(step.label, torch.tensor(1.0 if param.step is None else param.step, dtype=torch.float32), step))
    entry: dict[str, Any] = {"step": step}
    for name, buffer in param.buffers.items():
        label = f"{where}: {name}"
        if eight_bit:
            spec = optimizers.spec_of(name, where)
            codes = Slot(param.shape, torch.uint8, label + CODES_SUFFIX)
            absmax = Slot((num_blocks(param.numel, blocksize),), torch.float32, label + ABSMAX_SUFFIX)
            code = create_dynamic_map(spec.signed)
            plan.jobs.append(to_quantized_job(label, buffer, codes, absmax, blocksize, code, plan.read))
            entry[name + CODES_SUFFIX], entry[name + ABSMAX_SUFFIX] = codes, absmax
        else:
            slot = Slot(param.shape, torch.float32, label)
            plan.jobs.append(to_dense_job(label, buffer, slot, plan.read))
            entry[name] = slot
    for name, value in param.extras.items():
        entry[name] = passthrough(plan, value, f"{where}: {name}")
    return entry


def passthrough(plan: Plan, value: Any, label: str) -> Any:
    """Carried-over data: every tensor in it becomes a slot filled by a copy job, anything else stays."""

    def leaf(path: tuple, item: Any) -> Any:
        if not isinstance(item, torch.Tensor):
            return item
        where = label + "".join(f"[{p!r}]" for p in path)
        slot = Slot(item.shape, item.dtype, where)
        plan.jobs.append(copy_job(where, item, slot, plan.read))
        return slot

    return map_leaves(value, leaf)
