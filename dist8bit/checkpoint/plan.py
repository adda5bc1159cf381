"""From a canonical source state and a target precision to output slots and the jobs that fill them.

Every job streams: it reads its source in chunks of CHUNK elements (a multiple
of every block size, so chunk boundaries are block boundaries and chunked
quantization equals whole-tensor quantization), converts, and appends to its
output slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..optim.master_weights import ERROR_KEY
from ..optim.optimizer import default_blocksize
from ..optim.state import ABSMAX_SUFFIX, CODES_SUFFIX, STATE_FORMAT_VERSION
from ..quant.layout import num_blocks
from ..quant.packing import code_bytes
from . import codec, optimizers, weight_errors
from .canonical import Buffer, Dense, OptimizerState, ParamState, Quantized
from .loading import Read, slice_read
from .writer import Sink, Slot, map_leaves

CHUNK = 1 << 20  # elements per read: 4 MiB of float32, a multiple of every block size
DEFAULT_MIN_8BIT_SIZE = 4096
PRECISION_BITS = {"fp32": 32, "8bit": 8, "4bit": 4}  # --to value -> optim_bits
PRECISION_NAMES = {bits: name for name, bits in PRECISION_BITS.items()}


@dataclass(frozen=True)
class Target:
    """What to convert to; None fields mean "as the source has it, else the default"."""

    precision: str  # "fp32", "8bit" or "4bit"
    blocksize: int | None = None
    min_8bit_size: int | None = None
    keep_fp32: frozenset = frozenset()
    # With a quantized precision: exactly these parameter keys get quantized state, whatever the
    # source had (an optimizer loading in memory has already decided each parameter's precision).
    quantized_keys: frozenset | None = None
    # weight_error of compensated bf16 parameters: None as the source has it, 8 / 16 re-widthed, "none" dropped
    error_bits: int | str | None = None

    @property
    def bits(self) -> int:
        """optim_bits of the output: 32, 8 or 4."""
        return PRECISION_BITS[self.precision]

    @property
    def quantized(self) -> bool:
        return self.bits < 32

    def group_blocksize(self, group: dict[str, Any], params: Iterable[ParamState] = ()) -> int:
        """The output block size of a param group: --blocksize, else the group's own when it was saved
        at this precision (a 32-bit dist8bit group's is its 8-bit default), else the one block size of its
        state at this precision, else the precision's default."""
        if self.blocksize is not None or not self.quantized:
            return self.blocksize or default_blocksize(self.bits)
        saved = int(group.get("optim_bits", 8))
        if "blocksize" in group and (saved == self.bits or (saved == 32 and self.bits == 8)):
            return int(group["blocksize"])
        sizes = {b.blocksize for p in params for b in p.buffers.values() if isinstance(b, Quantized) and b.bits == self.bits}
        return sizes.pop() if len(sizes) == 1 else default_blocksize(self.bits)

    def describe(self) -> str:
        return {"fp32": "fp32", "8bit": "dist8bit-8bit", "4bit": "dist8bit-4bit"}[self.precision]


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
    error_bits: int | str | None = None  # the target's, for the weight_error entries


def read_values(buffer: Buffer, start: int, stop: int, read: Read = slice_read) -> torch.Tensor:
    """Elements [start, stop) of a buffer's values as float32 (dequantized if quantized)."""
    if isinstance(buffer, Dense):
        return read(buffer.values, start, stop).float()
    if isinstance(buffer, Quantized):
        blocksize, bits = buffer.blocksize, buffer.bits
        first, last = start // blocksize, num_blocks(stop, blocksize)
        low, high = first * blocksize, min(last * blocksize, buffer.numel)  # low is even: a byte boundary at 4 bits
        codes = read(buffer.codes, code_bytes(low, bits), code_bytes(high, bits))
        values = codec.dequantize(codes, read(buffer.absmax, first, last), buffer.code, blocksize, high - low)
        return values[start - low : stop - low]
    parts = []
    for offset, piece in buffer.pieces:
        low, high = max(start, offset), min(stop, offset + piece.numel)
        if low < high:
            parts.append(read_values(piece, low - offset, high - offset, read))
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0)


def dense_chunks(buffer: Buffer, on_bytes: Callable[[int], None], read: Read = slice_read) -> Iterator[torch.Tensor]:
    """float32 chunks of CHUNK elements of a buffer's values (dequantized if quantized); reports bytes read."""
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


def error_job(label: str, buffer: weight_errors.ErrorBuffer, slot: Slot, read: Read) -> Job:
    """A weight_error's codes, element for element, at the slot's width."""

    def run(sink: Sink) -> None:
        weight_errors.write_codes(sink, slot, buffer, 0, buffer.numel, read, CHUNK)

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
def output_group(group: dict[str, Any], target: Target, blocksize: int, min_8bit_size: int) -> dict[str, Any]:
    hyper = {k: v for k, v in group.items() if k != "params"}
    if target.quantized:
        hyper |= {"optim_bits": target.bits, "min_8bit_size": min_8bit_size, "blocksize": blocksize}
        hyper["dist8bit_state_version"] = STATE_FORMAT_VERSION
    elif "optim_bits" in hyper:
        hyper["optim_bits"] = 32
    return {**hyper, "params": list(group["params"])}


def is_quantized(param: ParamState) -> bool:
    return any(isinstance(b, Quantized) for b in param.buffers.values())


def plan_optimizer(state: OptimizerState, target: Target, where: str, read: Read = slice_read) -> Plan:
    """Output state dict (torch conventions; dist8bit's codes/absmax names for quantized state) and its jobs."""
    if target.quantized and state.source_format == "torch":
        optimizers.check_torch_flags(state.optimizer, state.param_groups, where)
    source_quantized = any(is_quantized(p) for p in state.params.values())
    group_of = state.group_of()
    members: dict[int, list[ParamState]] = {}
    for key, param in state.params.items():
        members.setdefault(id(group_of[key]), []).append(param)
    plan = Plan(tree=None, read=read, error_bits=target.error_bits)
    groups, layout = [], {}
    for group in state.param_groups:
        blocksize = target.group_blocksize(group, members.get(id(group), []))
        min_8bit_size = target.min_8bit_size or int(group.get("min_8bit_size", DEFAULT_MIN_8BIT_SIZE))
        groups.append(output_group(group, target, blocksize, min_8bit_size))
        layout[id(group)] = (blocksize, min_8bit_size)
    entries = {}
    for key, param in state.params.items():
        blocksize, min_8bit_size = layout[id(group_of[key])]
        if not target.quantized:
            quantized = False
        elif target.quantized_keys is not None:
            quantized = key in target.quantized_keys
        elif is_quantized(param):
            quantized = True
        elif source_quantized and target.min_8bit_size is None:
            quantized = False  # the source optimizer chose 32-bit for it (small tensor, or an override)
        else:
            quantized = param.numel >= min_8bit_size and key not in target.keep_fp32
        bits = target.bits if quantized else 32
        entries[key] = _plan_param(plan, param, bits, blocksize, f"{where}: parameter {key!r}")
    plan.tree = {"state": entries, "param_groups": groups}
    return plan


def _plan_param(plan: Plan, param: ParamState, bits: int, blocksize: int, where: str) -> dict[str, Any]:
    step = Slot((), torch.float32, f"{where}: step")
    # dist8bit needs a step; torch's SGD keeps none. State exists, so at least one step was taken.
    plan.jobs.append(value_job(step.label, torch.tensor(1.0 if param.step is None else param.step, dtype=torch.float32), step))
    entry: dict[str, Any] = {"step": step}
    for name, buffer in param.buffers.items():
        label = f"{where}: {name}"
        if bits < 32:
            # 8-bit codes are shaped like the parameter; packed 4-bit codes are 1-D
            shape = param.shape if bits == 8 else (code_bytes(param.numel, bits),)
            codes = Slot(shape, torch.uint8, label + CODES_SUFFIX)
            absmax = Slot((num_blocks(param.numel, blocksize),), torch.float32, label + ABSMAX_SUFFIX)
            code = optimizers.state_map(name, bits, where)
            plan.jobs.append(to_quantized_job(label, buffer, codes, absmax, blocksize, code, plan.read))
            entry[name + CODES_SUFFIX], entry[name + ABSMAX_SUFFIX] = codes, absmax
        else:
            slot = Slot(param.shape, torch.float32, label)
            plan.jobs.append(to_dense_job(label, buffer, slot, plan.read))
            entry[name] = slot
    for name, value in param.extras.items():
        entry[name] = passthrough(plan, value, f"{where}: {name}")
    if param.error is not None:
        dtype = weight_errors.output_dtype(weight_errors.dtype_of(param.error), plan.error_bits)
        if dtype is not None:
            slot = Slot(param.shape, dtype, f"{where}: {ERROR_KEY}")
            plan.jobs.append(error_job(slot.label, param.error, slot, plan.read))
            entry[ERROR_KEY] = slot
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
