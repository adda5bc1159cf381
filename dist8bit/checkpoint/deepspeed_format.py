"""DeepSpeed ZeRO 1/2 checkpoint directories: read N ranks, write M ranks, fp32 or 8-bit state.

    <root>/latest                                       the tag of the newest checkpoint
    <root>/<tag>/mp_rank_00_model_states.pt             weights, param_shapes, dp_world_size, scheduler, ...
    <root>/<tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   one per data-parallel rank r

Each rank file's `optimizer_state_dict` holds, per param group, the rank's
partition of the group's flat fp32 buffer: `base_optimizer_state` (the wrapped
optimizer's state dict with one "parameter" per group: torch-style flat
exp_avg/exp_avg_sq of partition size, or dist8bit's packed codes/absmax/values
with its `segment_table`), the fp32 master weights
(`single_partition_of_fp32_groups`, without padding), `group_paddings` and
`param_slice_mappings` (name -> numel and start of each parameter piece).

DeepSpeed 0.19's layout (round_robin_gradients off, no parameter_alignment
padding): a group's flat buffer is its parameters in `param_shapes` order,
padded to a multiple of 2 x world size; rank r holds [r P, (r+1) P) with
P = padded size / world size. The reader checks every rank's slice mappings
(and dist8bit's segment tables) against this layout, so anything else is
refused rather than misread. Pieces become canonical per-parameter `Pieced`
buffers; the writer lays the parameters out again for M ranks.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim.segments import Segment, packed_layout, segment_table
from ..optim.state import ABSMAX_SUFFIX, CODES_SUFFIX, STATE_FORMAT_VERSION
from ..quant.layout import num_blocks
from ..quant.maps import create_dynamic_map
from . import codec, loading, optimizers
from .canonical import Dense, OptimizerState, ParamState, Pieced, Quantized
from .errors import CheckpointError
from .plan import CHUNK, DEFAULT_MIN_8BIT_SIZE, Job, Target, read_values, value_job
from .writer import Sink, Slot

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
OPTIM_PATTERN = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL_PATTERN = re.compile(r"(?:zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")
ALIGNMENT_FACTOR = 2  # DeepSpeed's nccl_start_alignment_factor: partitions start on 4-byte boundaries
DEEPSPEED_ADAM_GROUP_KEYS = ("bias_correction", "step")  # FusedAdam / DeepSpeedCPUAdam only


# ------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Piece:
    """Elements [start, start + length) of a rank's partition are [param_offset, ...) of `name`."""

    name: str
    start: int
    length: int
    param_offset: int


@dataclass(frozen=True)
class ZeroLayout:
    """Where every parameter of every group lies in each rank's partition."""

    world: int
    params: tuple[tuple[tuple[str, int, int], ...], ...]  # per group: (name, start in the group's flat buffer, numel)
    partition: tuple[int, ...]  # partition size per group

    @classmethod
    def build(cls, param_shapes: list[dict[str, torch.Size]], world: int) -> ZeroLayout:
        groups, partitions = [], []
        for shapes in param_shapes:
            start, entries = 0, []
            for name, shape in shapes.items():
                numel = int(torch.Size(shape).numel())
                entries.append((name, start, numel))
                start += numel
            alignment = ALIGNMENT_FACTOR * world
            groups.append(tuple(entries))
            partitions.append(math.ceil(start / alignment) * alignment // world)
        return cls(world, tuple(groups), tuple(partitions))

    def pieces(self, group: int, rank: int) -> list[Piece]:
        low, high = rank * self.partition[group], (rank + 1) * self.partition[group]
        result = []
        for name, start, numel in self.params[group]:
            first, last = max(start, low), min(start + numel, high)
            if first < last:
                result.append(Piece(name, first - low, last - first, first - start))
        return result

    def padding(self, group: int, rank: int) -> int:
        """Elements at the end of this rank's partition that belong to no parameter."""
        total = sum(numel for _, _, numel in self.params[group])
        low = rank * self.partition[group]
        return self.partition[group] - min(max(total - low, 0), self.partition[group])


# ------------------------------------------------------------------ files
def safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoints pickle (plain data holders), allowed for weights_only loading."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError as error:
        raise CheckpointError(
            f"converting DeepSpeed checkpoints needs deepspeed installed (pip install deepspeed): {error}"
        ) from None
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: Path) -> Any:
    with torch.serialization.safe_globals(safe_globals()):
        return loading.load(path)


def find_tag_dir(path: Path) -> tuple[Path, str | None] | None:
    """(directory holding the rank files, tag) for a DeepSpeed save dir or tag dir; None if neither."""
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{latest} names tag {tag!r} but {path / tag} does not exist")
        return path / tag, tag
    if any(OPTIM_PATTERN.fullmatch(p.name) for p in path.iterdir()) or (path / MODEL_FILE).is_file():
        return path, None
    return None


def is_zero0(tag_dir: Path) -> bool:
    """Without ZeRO, DeepSpeed saves the whole optimizer state dict inside the model states file."""
    return (tag_dir / MODEL_FILE).is_file() and not any(OPTIM_PATTERN.fullmatch(p.name) for p in tag_dir.iterdir())


def _rank_files(tag_dir: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for path in tag_dir.iterdir():
        match = OPTIM_PATTERN.fullmatch(path.name)
        if match:
            if int(match.group(2)) != 0:
                raise CheckpointError(
                    f"{tag_dir} has model-parallel ranks (mp_rank {int(match.group(2))}): converting tensor/pipeline-parallel "
                    "DeepSpeed checkpoints is not supported yet"
                )
            found[int(match.group(1))] = path
    return [found[r] for r in sorted(found)]


# ------------------------------------------------------------------ reading
@dataclass
class ZeroCheckpoint:
    tag_dir: Path
    tag: str | None
    stage: Any  # DeepSpeed's ZeroStageEnum, written back as it was
    rank_files: list[Path]
    ranks: list[dict[str, Any]]
    model: dict[str, Any]
    layout: ZeroLayout
    state: OptimizerState  # keyed by parameter name
    master: dict[str, Pieced]  # fp32 master weights
    steps: list[Any]  # per group, as saved (tensor or int)
    eight_bit: dict[str, bool] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.layout.world


def is_zero3(tag_dir: Path) -> bool:
    return (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists()


def read(tag_dir: Path, tag: str | None, kind: str | None, reader: loading.FileReader) -> ZeroCheckpoint:
    where = str(tag_dir)
    if is_zero3(tag_dir):
        raise CheckpointError(
            f"{where} is a ZeRO-3 checkpoint: converting ZeRO-3 directories is not supported yet (ZeRO 1/2 are)"
        )
    if any(p.name.startswith("bf16_zero_pp_rank_") for p in tag_dir.iterdir()):
        raise CheckpointError(f"{where} was written by DeepSpeed's BF16_Optimizer: converting it is not supported yet")
    model_file = tag_dir / MODEL_FILE
    if not model_file.is_file():
        raise CheckpointError(f"{where} has no {MODEL_FILE}: not a complete DeepSpeed ZeRO checkpoint")
    model = load_file(model_file)
    world = int(model.get("dp_world_size", 0))
    files = _rank_files(tag_dir)
    expected = [tag_dir / OPTIM_FILE.format(rank=r) for r in range(world)]
    if files != expected:
        missing = sorted({p.name for p in expected} - {p.name for p in files})
        raise CheckpointError(
            f"{where}: the checkpoint was saved by {world} data-parallel ranks but "
            + (f"{', '.join(missing)} are missing" if missing else f"has {len(files)} rank files")
        )
    layout = ZeroLayout.build(model["param_shapes"], world)
    ranks = []
    for path in files:
        loaded = load_file(path)
        reader.add(path, loaded)
        ranks.append(loaded)
    return _assemble(tag_dir, tag, files, ranks, model, layout, kind, where)


def _optimizer_dict(loaded: Any, path: Path) -> dict[str, Any]:
    osd = loaded.get("optimizer_state_dict") if isinstance(loaded, dict) else None
    if not isinstance(osd, dict) or "base_optimizer_state" not in osd:
        raise CheckpointError(f"{path} is not a DeepSpeed ZeRO 1/2 optimizer file (no optimizer_state_dict.base_optimizer_state)")
    if not isinstance(osd["base_optimizer_state"], dict):
        raise CheckpointError(
            f"{path} is an elastic ZeRO checkpoint (elastic_checkpoint=true): converting it is not supported yet"
        )
    paddings = osd.get("param_alignment_paddings") or []
    if any(any(group) for group in paddings):
        raise CheckpointError(f"{path} uses zero_optimization.parameter_alignment padding: converting it is not supported yet")
    return osd


def _assemble(tag_dir, tag, files, ranks, model, layout, kind, where) -> ZeroCheckpoint:
    config = ranks[0].get("ds_config", {}) if isinstance(ranks[0], dict) else {}
    if (config.get("zero_optimization") or {}).get("round_robin_gradients"):
        raise CheckpointError(f"{where} was saved with round_robin_gradients=true: converting it is not supported yet")
    optim_dicts = [_optimizer_dict(r, p) for r, p in zip(ranks, files, strict=True)]
    base_groups = optim_dicts[0]["base_optimizer_state"]["param_groups"]
    if len(base_groups) != len(layout.params):
        raise CheckpointError(f"{where}: {len(base_groups)} optimizer param groups but {len(layout.params)} in param_shapes")
    buffers: dict[str, dict[str, list]] = {}
    master: dict[str, list] = {}
    eight_bit: dict[str, bool] = {}
    steps = []
    for rank, (osd, path) in enumerate(zip(optim_dicts, files, strict=True)):
        for group in range(len(layout.params)):
            pieces = layout.pieces(group, rank)
            label = f"{path.name} group {group}"
            _check_mapping(osd, group, pieces, label)
            padding = layout.padding(group, rank)
            fp32 = osd["single_partition_of_fp32_groups"][group]
            if fp32.numel() + padding != layout.partition[group]:
                raise CheckpointError(
                    f"{label}: the fp32 partition has {fp32.numel()} elements, the layout expects "
                    f"{layout.partition[group] - padding} (saved with another DeepSpeed layout?)"
                )
            state = _group_state(osd["base_optimizer_state"], base_groups[group], group, label)
            if rank == 0:
                steps.append(state.get("step"))
            for piece in pieces:
                master.setdefault(piece.name, []).append((piece.param_offset, Dense(fp32.narrow(0, piece.start, piece.length))))
            for piece, name, buffer in _state_pieces(state, pieces, base_groups[group], layout.partition[group], label):
                buffers.setdefault(piece.name, {}).setdefault(name, []).append((piece.param_offset, buffer))
                eight_bit[piece.name] = eight_bit.get(piece.name, False) or isinstance(buffer, Quantized)
    shapes = {name: tuple(shape) for shapes in model["param_shapes"] for name, shape in shapes.items()}
    params = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        per_name = {key: _pieced(numel, found, f"{where}: {name} {key}") for key, found in buffers.get(name, {}).items()}
        group = next(g for g, entries in enumerate(layout.params) if any(n == name for n, _, _ in entries))
        step = steps[group]
        params[name] = ParamState(shape, None if step is None else float(step), per_name, {})
    groups = [{**g, "params": [n for n, _, _ in layout.params[i]]} for i, g in enumerate(base_groups)]
    names = {n for p in params.values() for n in p.buffers}
    kind = kind or optimizers.infer_kind(names, groups)
    source = "dist8bit-8bit" if any(eight_bit.values()) else "fp32"
    state = OptimizerState(f"deepspeed-zero ({source})", kind, groups, params)
    master_weights = {
        name: _pieced(int(torch.Size(shapes[name]).numel()), found, f"{where}: {name} fp32 weights")
        for name, found in master.items()
    }
    stage = optim_dicts[0].get("zero_stage")
    return ZeroCheckpoint(tag_dir, tag, stage, files, ranks, model, layout, state, master_weights, steps, eight_bit)


def _pieced(numel: int, found: list, where: str) -> Pieced:
    pieced = Pieced(numel, tuple(sorted(found, key=lambda item: item[0])))
    try:
        pieced.check(where)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return pieced


def _check_mapping(osd: dict[str, Any], group: int, pieces: list[Piece], label: str) -> None:
    mappings = osd.get("param_slice_mappings")
    if mappings is None:
        return
    saved = [(name, int(address.start), int(address.numel)) for name, address in mappings[group].items()]
    expected = [(p.name, p.start, p.length) for p in pieces]
    if saved != expected:
        raise CheckpointError(
            f"{label}: the parameter pieces {saved[:3]}... are not where DeepSpeed 0.19's layout puts them {expected[:3]}...; "
            "saved with another DeepSpeed version or layout option (round_robin_gradients, parameter_alignment)?"
        )


def _group_state(base: dict[str, Any], group: dict[str, Any], index: int, label: str) -> dict[str, Any]:
    keys = group.get("params", [index])
    if len(keys) != 1:
        raise CheckpointError(f"{label}: the base optimizer's group holds {len(keys)} tensors, ZeRO 1/2 holds one flat partition")
    return base["state"].get(keys[0], {})


def _state_pieces(state: dict[str, Any], pieces: list[Piece], group: dict[str, Any], partition: int, label: str):
    """(piece, state name, Quantized/Dense) for every state buffer of every piece of one rank's group."""
    if not state:
        return
    table = state.get("segment_table")
    if table is None:  # torch-style: flat tensors of partition size
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == partition:
                for piece in pieces:
                    yield piece, name, Dense(value.narrow(0, piece.start, piece.length))
        return
    rows = [tuple(int(v) for v in row) for row in table.tolist()]
    expected = [(p.start, p.length, p.param_offset) for p in pieces]
    if [row[:3] for row in rows] != expected:
        raise CheckpointError(f"{label}: the dist8bit segment_table {rows} does not match the partition layout {expected}")
    flags = [bool(row[4]) for row in rows]
    blocksize = int(group.get("blocksize", 256))
    segments = [Segment(torch.empty(0), p.start, p.length, p.param_offset, rows[i][3]) for i, p in enumerate(pieces)]
    layout = packed_layout(segments, flags, blocksize)
    names = sorted(
        {k[: -len(CODES_SUFFIX)] for k in state if k.endswith(CODES_SUFFIX)}
        | {
            k
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 1 and not k.endswith(ABSMAX_SUFFIX)
        }
    )
    for name in names:
        spec = optimizers.spec_of(name, label)
        for index, piece in enumerate(pieces):
            offset = layout.value_offsets[index]
            if flags[index]:
                codes = state[name + CODES_SUFFIX].narrow(0, offset, piece.length)
                absmax = state[name + ABSMAX_SUFFIX].narrow(0, layout.block_offsets[index], num_blocks(piece.length, blocksize))
                yield piece, name, Quantized(codes, absmax, blocksize, create_dynamic_map(spec.signed))
            else:
                yield piece, name, Dense(state[name].narrow(0, offset, piece.length))


# ------------------------------------------------------------------ writing
@dataclass
class RankOutput:
    path: Path
    tree: Any
    jobs: list[Job]


def output_group(group: dict[str, Any], target: Target, blocksize: int, min_8bit_size: int, index: int, where: str) -> dict:
    hyper = {k: v for k, v in group.items() if k != "params"}
    if target.precision == "8bit":
        if hyper.get("bias_correction", True) is not True:
            raise CheckpointError(
                f"{where}: param group {index} has bias_correction=False, which dist8bit's optimizers do not implement"
            )
        hyper = {k: v for k, v in hyper.items() if k not in DEEPSPEED_ADAM_GROUP_KEYS}
        hyper |= {
            "optim_bits": 8,
            "min_8bit_size": min_8bit_size,
            "blocksize": blocksize,
            "dist8bit_state_version": STATE_FORMAT_VERSION,
        }
    else:
        if "optim_bits" in hyper:
            hyper["optim_bits"] = 32
        hyper.setdefault("bias_correction", True)  # DeepSpeed's FusedAdam / DeepSpeedCPUAdam read it
    return {**hyper, "params": [index]}


def plan_output(
    ckpt: ZeroCheckpoint, target: Target, world: int, out_dir: Path, read: loading.Read, where: str
) -> list[RankOutput]:
    layout = ZeroLayout.build(ckpt.model["param_shapes"], world)
    state = ckpt.state
    if target.precision == "8bit":
        optimizers.check_torch_flags(state.optimizer, state.param_groups, where)
    groups, settings = [], []
    for index, group in enumerate(state.param_groups):
        blocksize = target.blocksize or int(group.get("blocksize", 256))
        min_8bit_size = target.min_8bit_size or int(group.get("min_8bit_size", DEFAULT_MIN_8BIT_SIZE))
        groups.append(output_group(group, target, blocksize, min_8bit_size, index, where))
        settings.append((blocksize, min_8bit_size))
    source_8bit = any(ckpt.eight_bit.values())
    eight_bit = {}
    for index, entries in enumerate(layout.params):
        for name, _, numel in entries:
            if target.precision != "8bit":
                eight_bit[name] = False
            elif source_8bit and target.min_8bit_size is None:
                eight_bit[name] = ckpt.eight_bit.get(name, False)
            else:
                eight_bit[name] = numel >= settings[index][1] and name not in target.keep_fp32
    outputs = []
    for rank in range(world):
        jobs: list[Job] = []
        osd = _rank_optimizer_dict(ckpt, layout, rank, groups, settings, eight_bit, target, jobs, read)
        source_rank = ckpt.ranks[min(rank, len(ckpt.ranks) - 1)]
        tree = {k: v for k, v in source_rank.items() if k != "optimizer_state_dict"}
        tree = {"optimizer_state_dict": osd, **tree}
        outputs.append(RankOutput(out_dir / OPTIM_FILE.format(rank=rank), tree, jobs))
    return outputs


def _rank_optimizer_dict(ckpt, layout, rank, groups, settings, eight_bit, target, jobs, read) -> dict[str, Any]:
    source = ckpt.ranks[min(rank, len(ckpt.ranks) - 1)]["optimizer_state_dict"]
    from deepspeed.utils.tensor_fragment import fragment_address

    states, fp32_groups, paddings, mappings = {}, [], [], []
    for group in range(len(layout.params)):
        pieces = layout.pieces(group, rank)
        label = f"rank {rank} group {group}"
        blocksize = settings[group][0]
        step = ckpt.steps[group]
        names = sorted({n for p in pieces for n in ckpt.state.params[p.name].buffers}) if step is not None else []
        if target.precision == "8bit":
            entry = _packed_entry(ckpt, pieces, names, eight_bit, blocksize, step, label, jobs, read)
        else:
            entry = _flat_entry(ckpt, pieces, names, layout.partition[group], step, label, jobs, read)
        if entry:
            states[group] = entry
        padding = layout.padding(group, rank)
        weights = Slot((layout.partition[group] - padding,), torch.float32, f"{label} fp32 weights")
        jobs.append(_fill_job(weights.label, [(ckpt.master[p.name], p) for p in pieces], weights, None, read))
        fp32_groups.append(weights)
        paddings.append(padding)
        mappings.append(OrderedDict((p.name, fragment_address(numel=p.length, start=p.start)) for p in pieces))
    osd = {k: v for k, v in source.items()}
    osd["base_optimizer_state"] = {"state": states, "param_groups": groups}
    osd["single_partition_of_fp32_groups"] = fp32_groups
    osd["group_paddings"] = paddings
    osd["partition_count"] = [layout.world] * len(layout.params)
    osd["param_slice_mappings"] = mappings
    return osd


def _step_value(step: Any, precision: str) -> torch.Tensor | int:
    """dist8bit keeps a float32 tensor; DeepSpeed's Adam implementations count with a Python int."""
    value = float(step)
    return torch.tensor(value, dtype=torch.float32) if precision == "8bit" else int(value)


def _packed_entry(ckpt, pieces, names, eight_bit, blocksize, step, label, jobs, read) -> dict[str, Any]:
    if step is None:
        return {}
    flags = [eight_bit[p.name] for p in pieces]
    segments = [Segment(torch.empty(0), p.start, p.length, p.param_offset, _numel(ckpt, p.name)) for p in pieces]
    layout = packed_layout(segments, flags, blocksize)
    entry: dict[str, Any] = {"step": _scalar_slot(_step_value(step, "8bit"), f"{label} step", jobs)}
    for name in names:
        spec = optimizers.spec_of(name, label)
        code = create_dynamic_map(spec.signed)
        sources = [(ckpt.state.params[p.name].buffers[name], p) for p in pieces]
        codes = Slot((layout.codes_numel,), torch.uint8, f"{label} {name}{CODES_SUFFIX}") if layout.codes_numel else None
        absmax = Slot((layout.blocks,), torch.float32, f"{label} {name}{ABSMAX_SUFFIX}") if layout.codes_numel else None
        values = Slot((layout.values_numel,), torch.float32, f"{label} {name}") if layout.values_numel else None
        if codes is not None:
            entry[name + CODES_SUFFIX], entry[name + ABSMAX_SUFFIX] = codes, absmax
            jobs.append(
                _quantize_job(
                    codes.label, [s for s, f in zip(sources, flags, strict=True) if f], codes, absmax, blocksize, code, read
                )
            )
        if values is not None:
            entry[name] = values
            jobs.append(_fill_job(values.label, [s for s, f in zip(sources, flags, strict=True) if not f], values, None, read))
    table = segment_table(segments, flags)
    entry["segment_table"] = _scalar_slot(table, f"{label} segment_table", jobs)
    return entry


def _flat_entry(ckpt, pieces, names, partition, step, label, jobs, read) -> dict[str, Any]:
    if step is None:
        return {}
    entry: dict[str, Any] = {"step": _step_value(step, "fp32")}
    for name in names:
        slot = Slot((partition,), torch.float32, f"{label} {name}")
        jobs.append(_fill_job(slot.label, [(ckpt.state.params[p.name].buffers[name], p) for p in pieces], slot, partition, read))
        entry[name] = slot
    return entry


def _numel(ckpt: ZeroCheckpoint, name: str) -> int:
    return int(torch.Size(ckpt.state.params[name].shape).numel())


def _scalar_slot(value: torch.Tensor | int, label: str, jobs: list[Job]) -> Slot:
    slot = Slot(value.shape, value.dtype, label)
    jobs.append(value_job(label, value, slot))
    return slot


def _fill_job(label: str, sources: list[tuple[Any, Piece]], slot: Slot, total: int | None, read: loading.Read) -> Job:
    """Values of each piece back to back (float32), then zeros up to `total` (a partition's padding)."""

    def run(sink: Sink) -> None:
        written = 0
        for buffer, piece in sources:
            for start in range(0, piece.length, CHUNK):
                stop = min(start + CHUNK, piece.length)
                sink.write(slot, read_values(buffer, piece.param_offset + start, piece.param_offset + stop, read))
                sink.progress(buffer.nbytes() * (stop - start) // max(buffer.numel, 1))
            written += piece.length
        if total is not None and total > written:
            sink.write(slot, torch.zeros(total - written, dtype=torch.float32))

    return Job(label, sum(b.nbytes() * p.length // max(b.numel, 1) for b, p in sources), run)


def _quantize_job(label, sources, codes: Slot, absmax: Slot, blocksize: int, code: torch.Tensor, read) -> Job:
    """8-bit pieces back to back; a source piece already in this exact layout is copied bit for bit."""

    def run(sink: Sink) -> None:
        for buffer, piece in sources:
            same = _same_piece(buffer, piece, blocksize, code)
            if same is not None:
                sink.write(codes, read(same.codes, 0, same.numel))
                sink.write(absmax, read(same.absmax, 0, same.absmax.numel()))
                sink.progress(same.nbytes())
                continue
            for start in range(0, piece.length, CHUNK):  # CHUNK keeps blocks aligned to the piece start
                stop = min(start + CHUNK, piece.length)
                values = read_values(buffer, piece.param_offset + start, piece.param_offset + stop, read)
                chunk_codes, chunk_absmax = codec.quantize_exact(values, code, blocksize)
                sink.write(codes, chunk_codes)
                sink.write(absmax, chunk_absmax)
                sink.progress(buffer.nbytes() * (stop - start) // max(buffer.numel, 1))

    return Job(label, sum(b.nbytes() * p.length // max(b.numel, 1) for b, p in sources), run)


def _same_piece(buffer: Pieced, piece: Piece, blocksize: int, code: torch.Tensor) -> Quantized | None:
    for offset, part in buffer.pieces:
        same_place = offset == piece.param_offset and part.numel == piece.length
        if same_place and isinstance(part, Quantized) and part.blocksize == blocksize and torch.equal(part.code, code):
            return part
    return None


def model_states(ckpt: ZeroCheckpoint, world: int) -> dict[str, Any] | None:
    """The model states file with the new data-parallel world size (None: unchanged, copy it)."""
    if world == ckpt.world:
        return None
    return {**ckpt.model, "dp_world_size": world}


def copy_side_files(ckpt: ZeroCheckpoint, out_root: Path, out_tag_dir: Path) -> None:
    """`latest`, DeepSpeed's helper scripts and any other non-rank files, unchanged."""
    if ckpt.tag is not None:
        root = ckpt.tag_dir.parent
        for path in root.iterdir():
            if path.is_file():
                shutil.copy2(path, out_root / path.name)
    for path in ckpt.tag_dir.iterdir():
        if path.is_file() and not OPTIM_PATTERN.fullmatch(path.name) and path.name != MODEL_FILE:
            shutil.copy2(path, out_tag_dir / path.name)
