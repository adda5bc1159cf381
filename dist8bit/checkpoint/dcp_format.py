"""torch.distributed.checkpoint (DCP) directories, as FSDP2 runs write them, converted offline.

A DCP directory holds `.metadata` (every key of the flattened state dict with
its global shape and dtype, and where each rank's chunks are) and one
`__<rank>_0.distcp` file per writing rank. dist8bit's FSDP2 optimizer state is
there under global shapes: for a parameter of shape S, 8-bit state is
`<name>_codes` (uint8, S) and `<name>_absmax` (float32, [S[0], row / b]) with b
the row-aligned block size (dist8bit/optim/sharded.py), 4-bit state the same
but with codes packed two per byte per row ([S[0], row / 2]: rows hold whole
blocks of even size, so FSDP2's row shards never split a byte), 32-bit state
is `<name>` (S), and `step` a scalar. torch.optim under FSDP2 writes `<name>` (S).
The param group's `optim_bits` says 8 or 4. Packed codes do not say S beyond
its rows and row length: S is taken from a full-precision buffer of the same
parameter, else from the model's tensor of that name in the same checkpoint,
else it is [S[0], row] (right for every 2-D parameter).

Because every key has a global shape, conversion needs no process group and
no knowledge of how many ranks wrote it: each key is loaded whole
(`dcp.load(..., no_dist=True)` reassembles the chunks), one at a time, and the
output is written as a new single-writer DCP directory whose tensors are
produced lazily while the writer streams them out (dcp_io.LazySavePlanner), so
peak memory is one state tensor, not the checkpoint. DCP reshards on load, so
the output resumes on any number of ranks and `--world-size` changes nothing.

Safety: DCP itself unpickles `.metadata` and non-tensor entries with plain
pickle (arbitrary code); here (dcp_io) `.metadata` goes through an unpickler that
allows only DCP's own metadata classes, and non-tensor entries (param groups,
extra objects) are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import itertools
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from ..optim.master_weights import ERROR_KEY, converted_error
from ..optim.sharded import row_aligned_blocksize, row_elems
from ..optim.state import ABSMAX_SUFFIX, CODES_SUFFIX
from ..quant.maps import map_bits
from . import codec, optimizers, weight_errors
from .atomic import atomic_output
from .canonical import Dense, Quantized
from .dcp_io import METADATA_FILE, LazySavePlanner, Source, find_checkpoint, open_source, reraise_ours
from .errors import CheckpointError
from .plan import DEFAULT_MIN_8BIT_SIZE, Target, output_group
from .progress import Report, bar, finished
from .verify import Agreement, compare_buffer

PRECISION_KEYS = ("optim_bits", "blocksize", "min_8bit_size")

TORCH_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


# ------------------------------------------------------------- optimizer state
@dataclass
class ParamEntry:
    """One parameter's optimizer state: flat keys of its buffers (quantized pairs or dense), step and extras."""

    fqn: str
    shape: tuple[int, ...]
    bits: int  # of its quantized buffers: 8 or 4 (32 when it has none)
    step: str | None
    quantized: dict[str, tuple[str, str]]  # name -> (codes key, absmax key)
    dense: dict[str, str]  # name -> key
    extras: dict[str, str]  # state key -> flat key, carried over
    error: str | None = None  # flat key of a compensated bf16 parameter's weight_error (weight_errors.py)


@dataclass
class OptimizerEntry:
    prefix: tuple
    groups: list[dict[str, Any]]
    group_keys: list[str]  # flat keys of the param_groups entries (replaced by the converted groups)
    params: dict[str, ParamEntry]
    kind: str | None = None
    source_format: str = "torch"
    keys: set[str] = field(default_factory=set)  # every flat key this optimizer owns


def find_optimizers(source: Source, kind: str | None) -> list[OptimizerEntry]:
    """Every optimizer state dict in the checkpoint: a prefix P with P + ("state", fqn, name) and P + ("param_groups", ...)."""
    group_prefixes = {path[:i] for path in source.paths.values() for i, part in enumerate(path) if part == "param_groups"}
    found: dict[tuple, OptimizerEntry] = {}
    for key, path in source.paths.items():
        for i, part in enumerate(path):
            prefix = path[:i]
            if prefix not in group_prefixes:
                continue
            entry = found.setdefault(prefix, OptimizerEntry(prefix, [], [], {}))
            if part == "param_groups":
                entry.group_keys.append(key)
                entry.keys.add(key)
            elif part == "state" and len(path) == i + 3:
                entry.keys.add(key)
            break
    if not found:
        raise CheckpointError(
            f"{source.directory} holds no optimizer state dict (keys '<prefix>.state.<param>.<name>' and "
            "'<prefix>.param_groups.<i>.<key>'); save it with dcp.save({'optim': optim_state_dict, ...})"
        )
    for entry in found.values():
        _read_optimizer(source, entry, kind)
    return list(found.values())


def _read_optimizer(source: Source, entry: OptimizerEntry, kind: str | None) -> None:
    where = f"{source.directory} [{'.'.join(map(str, entry.prefix)) or 'top level'}]"
    values = source.load(entry.group_keys)
    groups: dict[int, dict[str, Any]] = {}
    for key in entry.group_keys:
        path = source.paths[key][len(entry.prefix) :]
        if len(path) != 3 or not isinstance(path[1], int):
            raise CheckpointError(f"{where}: unexpected param group entry {key!r}")
        groups.setdefault(path[1], {})[path[2]] = values[key]
    entry.groups = [groups[i] for i in sorted(groups)]
    owner = {}
    for index, group in enumerate(entry.groups):
        if not isinstance(group.get("params"), list):
            raise CheckpointError(f"{where}: param group {index} has no 'params' list")
        owner.update({fqn: group for fqn in group["params"]})
    per_param: dict[str, dict[str, str]] = {}
    for key in entry.keys - set(entry.group_keys):
        _, fqn, name = source.paths[key][len(entry.prefix) :]
        per_param.setdefault(fqn, {})[name] = key
    known = set(optimizers.state_names())
    for fqn, names in per_param.items():
        if fqn not in owner:
            raise CheckpointError(f"{where}: the state holds parameter {fqn!r}, which no param group lists")
        bits = int(owner[fqn].get("optim_bits", 8))
        entry.params[fqn] = _read_param(source, fqn, names, known, bits if bits in (8, 4) else 8, f"{where}: parameter {fqn!r}")
    state_names = {n for p in entry.params.values() for n in (*p.quantized, *p.dense)}
    quantized_bits = sorted({p.bits for p in entry.params.values() if p.quantized}, reverse=True)
    entry.source_format = (
        "dist8bit-" + "/".join(f"{b}bit" for b in quantized_bits)
        if quantized_bits
        else "dist8bit-32bit"
        if any("dist8bit_state_version" in g for g in entry.groups)
        else "torch"
    )
    if kind is None:
        entry.kind = optimizers.infer_kind(state_names, entry.groups)
    else:
        entry.kind = kind
        for fqn, param in entry.params.items():
            optimizers.check_buffers(kind, owner[fqn], [*param.quantized, *param.dense], f"{where}: parameter {fqn!r}")


def _read_param(source: Source, fqn: str, names: dict[str, str], known: set[str], bits: int, where: str) -> ParamEntry:
    def tensor_meta(key: str) -> TensorStorageMetadata | None:
        meta = source.entry(key)
        return meta if isinstance(meta, TensorStorageMetadata) else None

    quantized, dense, extras, shapes = {}, {}, {}, {}
    error = names.pop(ERROR_KEY, None)
    if error is not None and tensor_meta(error) is None:
        raise CheckpointError(f"{where}: {ERROR_KEY} must be an int8 or int16 tensor, got a non-tensor entry")
    for name, key in names.items():
        if name.endswith(CODES_SUFFIX):
            base = name[: -len(CODES_SUFFIX)]
            absmax = names.get(base + ABSMAX_SUFFIX)
            if absmax is None or tensor_meta(absmax) is None or tensor_meta(key) is None:
                raise CheckpointError(f"{where}: {name} needs a tensor {base + ABSMAX_SUFFIX} beside it (truncated state?)")
            quantized[base] = (key, absmax)
            if bits == 8:
                shapes[base] = tuple(tensor_meta(key).size)
    for name, key in names.items():
        meta = tensor_meta(key)
        if (
            name == "step"
            or name.endswith(CODES_SUFFIX)
            or (name.endswith(ABSMAX_SUFFIX) and name[: -len(ABSMAX_SUFFIX)] in quantized)
        ):
            continue
        if meta is not None and meta.properties.dtype.is_floating_point and len(meta.size) and name in known:
            dense[name] = key
            shapes[name] = tuple(meta.size)
        else:
            extras[name] = key
    if len(set(shapes.values())) > 1:
        raise CheckpointError(f"{where}: state buffers disagree on the parameter's shape: {shapes}")
    shape = next(iter(shapes.values()), ())
    if quantized and bits == 4 and not shapes:
        packed = tuple(tensor_meta(next(iter(quantized.values()))[0]).size)
        shape = _packed_param_shape(source, fqn, packed, where)
    for name, key in list(extras.items()):  # state dist8bit has no 8-bit form for, shaped like the parameter
        meta = tensor_meta(key)
        if meta is not None and meta.properties.dtype.is_floating_point and shape and tuple(meta.size) == shape:
            dense[name] = extras.pop(name)
    if error is not None:
        meta = tensor_meta(error)
        shape = shape or tuple(meta.size)  # saved shaped like the parameter
        weight_errors.check_dtype(meta.properties.dtype, math.prod(meta.size), math.prod(shape), where)
    step = names.get("step")
    entry = ParamEntry(fqn, shape, bits if quantized else 32, step, quantized, dense, extras, error)
    for name, (codes, absmax) in quantized.items():
        _blocksize_of(source, entry, codes, absmax, f"{where}: {name}")
    if step is not None and (tensor_meta(step) is not None and math.prod(tensor_meta(step).size) != 1):
        raise CheckpointError(f"{where}: 'step' must be a scalar, got shape {tuple(tensor_meta(step).size)}")
    return entry


def _packed_param_shape(source: Source, fqn: str, packed: tuple[int, ...], where: str) -> tuple[int, ...]:
    """A 4-bit parameter's shape from its packed codes [rows, row / 2]: the model's tensor of the same
    name in the checkpoint when it fits (N-D parameters), else [rows, row]."""
    if len(packed) != 2:
        raise CheckpointError(f"{where}: 4-bit codes must be [rows, row_elems / 2] bytes, got shape {packed}")
    rows, row = packed[0], 2 * packed[1]
    for key, path in source.paths.items():
        meta = source.entry(key)
        if (path and path[-1] == fqn) or key.endswith("." + fqn):
            size = tuple(getattr(meta, "size", ()))
            if len(size) >= 2 and size[0] == rows and row_elems(torch.Size(size)) == row:
                return size
    return (rows, row)


def _blocksize_of(source: Source, param: ParamEntry, codes: str, absmax: str, where: str) -> int:
    """The row-aligned block size of a saved quantized buffer: a row's elements / scales per row."""
    codes_meta, absmax_meta = source.entry(codes), source.entry(absmax)
    scales, shape = tuple(absmax_meta.size), param.shape
    if codes_meta.properties.dtype != torch.uint8 or absmax_meta.properties.dtype != torch.float32:
        raise CheckpointError(
            f"{where}: codes must be uint8 and scales float32 (got {codes_meta.properties.dtype}, {absmax_meta.properties.dtype})"
        )
    row = row_elems(torch.Size(shape))
    if len(shape) < 2 or len(scales) != 2 or scales[0] != shape[0] or scales[1] == 0 or row % scales[1]:
        raise CheckpointError(
            f"{where}: scales of shape {scales} do not fit FSDP2's row-aligned layout for a parameter of shape {shape} "
            "([rows, row_elems / blocksize]); only dist8bit FSDP2 (DTensor) state is read from DCP checkpoints"
        )
    expected = _codes_shape(shape, param.bits)
    if tuple(codes_meta.size) != expected:
        raise CheckpointError(
            f"{where}: {param.bits}-bit codes of a parameter of shape {shape} are {expected} bytes, the checkpoint has "
            f"{tuple(codes_meta.size)} (saved at another precision? the param group says optim_bits={param.bits})"
        )
    return row // scales[1]


def _codes_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Global shape of a DTensor parameter's codes: the parameter's at 8 bits, [rows, row / 2] at 4 (sharded.py)."""
    return tuple(shape) if bits == 8 else (shape[0], row_elems(torch.Size(shape)) // 2)


# ------------------------------------------------------------------------ plan
def _group_defaults(kind: str | None, precision: str) -> dict[str, Any]:
    """Hyper-parameters the resuming optimizer's own state dict has: DCP loads exactly its keys, so each must exist."""
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    if precision != "fp32" and kind in optimizers.KINDS:
        return dict(optimizers.KINDS[kind](dummy).defaults)
    if precision == "fp32" and kind in TORCH_CLASSES:
        return dict(TORCH_CLASSES[kind](dummy).defaults)
    return {}


@dataclass
class Check:
    """What --verify compares for one output entry."""

    key: str  # the output's flat key (codes key for quantized state)
    kind: str  # "carried", "exact" (converted, must equal values()), "fp32" or "quantized"
    values: Callable[[], torch.Tensor] | None = None  # the source values (float32), for converted state
    absmax_key: str = ""
    code: torch.Tensor | None = None
    blocksize: int = 0
    numel: int = 0


@dataclass
class Output:
    """The converted checkpoint: nested placeholders for dcp.save, lazy producers by flat key, verify checks."""

    tree: dict[str, Any] = field(default_factory=dict)
    producers: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    bytes_in: int = 0
    tensors: int = 0

    def put(self, path: tuple, value: Any) -> None:
        node: Any = self.tree
        for part, following in itertools.pairwise(path):
            child = [] if isinstance(following, int) else {}
            if isinstance(node, list):
                node.extend([None] * (part + 1 - len(node)))
                node[part] = child if node[part] is None else node[part]
                node = node[part]
            else:
                node = node.setdefault(part, child)
        if isinstance(node, list):
            node.extend([None] * (path[-1] + 1 - len(node)))
        node[path[-1]] = value

    def tensor(self, path: tuple, shape: tuple, dtype: torch.dtype, produce: Callable[[], torch.Tensor], nbytes: int) -> str:
        key = ".".join(map(str, path))  # the flat key dcp.save's flattening gives this path
        self.put(path, torch.empty(shape, dtype=dtype, device="meta"))
        self.producers[key] = produce
        self.bytes_in += nbytes
        self.tensors += 1
        return key


def plan(source: Source, found: list[OptimizerEntry], target: Target, meter: Callable[[int], None]) -> Output:
    out = Output()
    owned = set().union(*(o.keys for o in found))
    for key, path in source.paths.items():  # everything that is not optimizer state: carried over unchanged
        if key not in owned:
            _carry(source, out, key, path, meter)
    for entry in found:
        _plan_optimizer(source, out, entry, target, meter)
    return out


def _carry(source: Source, out: Output, key: str, path: tuple, meter: Callable[[int], None]) -> None:
    meta = source.entry(key)
    if isinstance(meta, BytesStorageMetadata):
        out.put(path, source.load([key])[key])
        out.checks.append(Check(key, "carried"))
        return
    nbytes = source.nbytes(key)

    def produce() -> torch.Tensor:
        value = source.tensor(key)
        meter(nbytes)
        return value

    written = out.tensor(path, tuple(meta.size), meta.properties.dtype, produce, nbytes)
    if written != key:
        raise CheckpointError(f"{source.directory}: key {key!r} does not follow dcp.save's flattening of {path}")
    out.checks.append(Check(key, "carried"))


def _plan_optimizer(source: Source, out: Output, entry: OptimizerEntry, target: Target, meter: Callable[[int], None]) -> None:
    where = f"{source.directory} [{'.'.join(map(str, entry.prefix)) or 'top level'}]"
    if target.quantized and entry.source_format == "torch":
        optimizers.check_torch_flags(entry.kind, entry.groups, where)
    defaults = _group_defaults(entry.kind, target.precision)
    layout: dict[str, tuple[int, int]] = {}
    for index, group in enumerate(entry.groups):
        blocksize = target.group_blocksize(group)
        min_8bit_size = target.min_8bit_size or int(group.get("min_8bit_size", DEFAULT_MIN_8BIT_SIZE))
        converted = {**defaults, **output_group(group, target, blocksize, min_8bit_size)}
        for key, value in converted.items():
            out.put((*entry.prefix, "param_groups", index, key), value)
        layout.update({fqn: (blocksize, min_8bit_size) for fqn in group["params"]})
    source_quantized = any(p.quantized for p in entry.params.values())
    for fqn, param in entry.params.items():
        blocksize, min_8bit_size = layout[fqn]
        aligned = row_aligned_blocksize(torch.Size(param.shape), blocksize)
        if not target.quantized:
            quantized = False
        elif param.quantized:
            quantized = True
        elif source_quantized and target.min_8bit_size is None:
            quantized = False  # the source optimizer chose 32-bit for it (1-D, small, or an override)
        else:
            quantized = math.prod(param.shape) >= min_8bit_size and aligned is not None and fqn not in target.keep_fp32
        if quantized and aligned is None:
            raise CheckpointError(
                f"{where}: parameter {fqn!r} of shape {param.shape} has no row-aligned block size <= {blocksize}"
            )
        bits = target.bits if quantized else 32
        _plan_param(source, out, entry.prefix, param, bits, aligned, f"{where}: parameter {fqn!r}", meter, target.error_bits)


def _plan_param(
    source: Source,
    out: Output,
    prefix: tuple,
    param: ParamEntry,
    bits: int,
    blocksize: int | None,
    where: str,
    meter: Callable[[int], None],
    target_error_bits: int | str | None = None,
) -> None:
    """One parameter's state: quantized at `bits` (row-aligned `blocksize`) when bits < 32, else float32."""
    state = (*prefix, "state", param.fqn)
    if param.step is not None:
        _carry(source, out, param.step, (*state, "step"), meter)
    else:  # torch's SGD keeps no step; dist8bit needs one, and state exists, so a step was taken
        out.tensor((*state, "step"), (), torch.float32, lambda: torch.tensor(1.0), 0)
    for name, key in param.extras.items():
        _carry(source, out, key, (*state, name), meter)
    if param.error is not None:
        _plan_error(source, out, param.error, (*state, ERROR_KEY), target_error_bits, meter)
    for name in [*param.quantized, *param.dense]:
        values = _values(source, param, name, where)
        nbytes = sum(source.nbytes(k) for k in param.quantized.get(name, (param.dense.get(name),)) if k)
        if bits == 32 or blocksize is None:
            key = out.tensor((*state, name), param.shape, torch.float32, _metered(values, meter, nbytes), nbytes)
            out.checks.append(Check(key, "fp32", values))
            continue
        code = optimizers.state_map(name, bits, where)
        same_bits = name in param.quantized and param.bits == bits
        if same_bits and _blocksize_of(source, param, *param.quantized[name], where) == blocksize:
            codes_key, absmax_key = param.quantized[name]  # already in the target layout: copied as they are
            _carry(source, out, codes_key, (*state, name + CODES_SUFFIX), meter)
            _carry(source, out, absmax_key, (*state, name + ABSMAX_SUFFIX), meter)
            continue
        quantize = _Quantize(_metered(values, meter, nbytes), code, blocksize, param.shape)
        columns = row_elems(torch.Size(param.shape)) // blocksize
        codes_shape = _codes_shape(param.shape, bits)
        codes_key = out.tensor((*state, name + CODES_SUFFIX), codes_shape, torch.uint8, quantize.codes, nbytes)
        absmax_key = out.tensor((*state, name + ABSMAX_SUFFIX), (param.shape[0], columns), torch.float32, quantize.absmax, 0)
        out.checks.append(Check(codes_key, "quantized", values, absmax_key, code, blocksize, math.prod(param.shape)))


def _plan_error(
    source: Source, out: Output, key: str, path: tuple, error_bits: int | str | None, meter: Callable[[int], None]
) -> None:
    """A weight_error: carried as it is, re-widthed (--error-bits 8|16), or left out (--error-bits none)."""
    meta = source.entry(key)
    dtype = weight_errors.output_dtype(meta.properties.dtype, error_bits)
    if dtype is None:
        return
    if dtype == meta.properties.dtype:
        _carry(source, out, key, path, meter)
        return
    nbytes = source.nbytes(key)

    def codes() -> torch.Tensor:
        return converted_error(source.tensor(key), weight_errors.BITS[dtype])

    written = out.tensor(path, tuple(meta.size), dtype, _metered(codes, meter, nbytes), nbytes)
    out.checks.append(Check(written, "exact", codes))


def _metered(values: Callable[[], torch.Tensor], meter: Callable[[int], None], nbytes: int) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        result = values()
        meter(nbytes)
        return result

    return produce


def _values(source: Source, param: ParamEntry, name: str, where: str) -> Callable[[], torch.Tensor]:
    """The buffer's values as float32 of the parameter's shape (dequantized if quantized)."""
    if name in param.dense:
        key = param.dense[name]
        return lambda: source.tensor(key).float()
    codes_key, absmax_key = param.quantized[name]
    blocksize = _blocksize_of(source, param, codes_key, absmax_key, where)
    code = optimizers.state_map(name, param.bits, where)
    numel = math.prod(param.shape)

    def read() -> torch.Tensor:
        loaded = source.load([codes_key, absmax_key])
        return codec.dequantize(loaded[codes_key], loaded[absmax_key], code, blocksize, numel).view(param.shape)

    return read


class _Quantize:
    """Quantizes a buffer when the writer asks for its codes and keeps the scales until it asks for those.

    The writer may ask for all codes before any scales, so scales (1/256 of the float32 state at blocksize 256) may wait
    until the codes of every tensor are written.
    """

    def __init__(self, values: Callable[[], torch.Tensor], code: torch.Tensor, blocksize: int, shape: tuple) -> None:
        self.values, self.code, self.blocksize, self.shape = values, code, blocksize, shape
        self.scales: torch.Tensor | None = None

    def codes(self) -> torch.Tensor:
        # rows are whole blocks, so quantizing the flat tensor gives exactly FSDP2's per-shard blocks
        codes, absmax = codec.quantize_exact(self.values().reshape(-1), self.code, self.blocksize)
        self.scales = absmax.view(self.shape[0], -1)
        # 4-bit: rows hold whole even-sized blocks, so the packed bytes split into rows too
        return codes.view(self.shape) if map_bits(self.code) == 8 else codes.view(self.shape[0], -1)

    def absmax(self) -> torch.Tensor:
        if self.scales is None:
            self.codes()
        scales, self.scales = self.scales, None
        return scales


# ---------------------------------------------------------------------- verify
def _slice(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor[start:stop]


def verify(source: Source, out: Output, written: Path, progress: bool) -> Agreement:
    """Re-read the written checkpoint: converted state within the quantizer's bound (fp32: exact), the rest identical."""
    result = open_source(written)
    agreement = Agreement()
    with bar(out.bytes_in, "verify", progress) as meter:
        for check in out.checks:
            if check.kind == "carried":
                a, b = source.load([check.key])[check.key], result.load([check.key])[check.key]
                same = torch.equal(a, b) and a.dtype == b.dtype if isinstance(a, torch.Tensor) else a == b
                if not same:
                    raise CheckpointError(f"verify: the carried-over entry {check.key!r} differs from the source")
                meter.update(a.numel() * a.element_size() if isinstance(a, torch.Tensor) else 0)
                continue
            if check.kind == "exact":
                expected_codes, written_codes = check.values(), result.tensor(check.key)
                if expected_codes.dtype != written_codes.dtype or not torch.equal(expected_codes, written_codes):
                    raise CheckpointError(f"verify: {check.key!r} differs from the source's converted codes")
                continue
            expected = Dense(check.values().reshape(-1))
            if check.kind == "fp32":
                written_buffer = Dense(result.tensor(check.key).reshape(-1))
            else:
                loaded = result.load([check.key, check.absmax_key])
                written_buffer = Quantized(
                    loaded[check.key].reshape(-1), loaded[check.absmax_key].reshape(-1), check.blocksize, check.code, check.numel
                )
            agreement.add(*compare_buffer(expected, written_buffer, check.key, meter.update, _slice))
    if agreement.bound_ratio > 1.0:
        kind = "is not exact" if agreement.bound_ratio == float("inf") else "exceeds the quantizer's error bound"
        raise CheckpointError(
            f"verify: {written} {kind} (max error {agreement.max_error:.3g}, {agreement.bound_ratio:.3g} x the bound)"
        )
    return agreement


# --------------------------------------------------------------------- convert
def convert(
    src: Path,
    dst: Path,
    target: Target,
    kind: str | None,
    world_size: int | None,
    verify_output: bool,
    overwrite: bool,
    progress: bool,
    started: float,
) -> Report:
    """Convert a DCP checkpoint directory (or a directory whose `latest` names one) into DST."""
    directory, tag = find_checkpoint(src)
    source = open_source(directory)
    found = find_optimizers(source, kind)
    errors = weight_errors.Tally(target.error_bits)
    for entry in found:
        for param in entry.params.values():
            if param.error is not None:
                errors.add(source.entry(param.error).properties.dtype)
    errors.warn(src)
    agreement = None
    with atomic_output(dst, overwrite, directory=True) as tmp:
        out_dir = tmp / tag if tag is not None else tmp
        out_dir.mkdir(exist_ok=True)
        if tag is not None:  # the launcher's layout: `latest` (and any other top-level files) come along
            for path in src.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        for path in directory.iterdir():  # launch.pt and other files beside the DCP shards
            if path.is_file() and path.name != METADATA_FILE and not path.name.endswith(".distcp"):
                shutil.copy2(path, out_dir / path.name)
        with bar(1, f"convert {src.name}", progress) as meter:
            out = plan(source, found, target, meter.update)
            meter.total = max(out.bytes_in, 1)
            writer = FileSystemWriter(out_dir, thread_count=1, per_thread_copy_ahead=0)  # serial: see LazySavePlanner
            planner = LazySavePlanner(out.producers)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.save(out.tree, storage_writer=writer, planner=planner, no_dist=True)
            except CheckpointException as error:  # a producer's error (reading the source) comes back wrapped by DCP
                reraise_ours(error)
                raise
        if verify_output:
            agreement = verify(source, out, out_dir, progress)
    bytes_out = sum(p.stat().st_size for p in (dst / tag if tag else dst).iterdir() if p.name.endswith(".distcp"))
    first = found[0]
    resharding = "DCP, any world size (DCP reshards on load"
    resharding += f"; --world-size {world_size} changes nothing)" if world_size is not None else ")"
    return finished(
        started,
        agreement,
        source=src,
        destination=dst,
        source_format=f"{'+'.join(o.source_format for o in found)}, DCP",
        target=(target.describe() if target.quantized else "fp32 (torch names)") + f", {resharding}",
        optimizer=first.kind,
        params=sum(len(o.params) for o in found),
        tensors=out.tensors,
        bytes_in=out.bytes_in,
        bytes_out=bytes_out,
        weight_errors=errors.describe(),
    )
