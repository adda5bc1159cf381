"""DeepSpeed ZeRO checkpoint directories: read N ranks, write M ranks, fp32, 8-bit or 4-bit state.

    <root>/latest                                          the tag of the newest checkpoint
    <root>/<tag>/mp_rank_00_model_states.pt                ZeRO 1/2: weights, param_shapes, dp_world_size, ...
    <root>/<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: the same, one per rank
    <root>/<tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   one per data-parallel rank r

A rank file's `optimizer_state_dict` holds the rank's flat fp32 buffers (see
deepspeed_layout.py): the wrapped optimizer's state dict (`base_optimizer_state`
for ZeRO 1/2, `optimizer_state_dict` for ZeRO-3; one "parameter" per flat:
torch-style flat exp_avg/exp_avg_sq of the flat's size, or dist8bit's packed
codes/absmax/values with its `segment_table`) and the fp32 master weights
(`single_partition_of_fp32_groups` without the tail padding, or
`fp32_flat_groups`). ZeRO 1/2 also keeps `group_paddings` and
`param_slice_mappings` (name -> numel and start of each piece). The segment
table's last column says each piece's precision (32, 8 or 4 bits; 0/1 before
state format 3): a 4-bit piece's codes are its own ceil(length / 2) packed
bytes, so a piece of odd length (ZeRO cuts parameters anywhere) ends in a
half-used byte and the next piece starts on a fresh one.

The reader recomputes the layout from `param_shapes` and checks it against
every rank's flats, slice mappings and segment tables, so a layout it does not
know is refused rather than misread. Pieces become canonical per-parameter
`Pieced` buffers; the writer lays the parameters out again for M ranks.
"""

from __future__ import annotations

import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim.master_weights import ERROR_KEY
from ..optim.segments import PackedLayout, Segment, packed_entries, packed_layout, segment_table, table_bits
from ..optim.state import ABSMAX_SUFFIX, CODES_SUFFIX, STATE_FORMAT_VERSION
from ..quant.layout import num_blocks
from ..quant.maps import map_bits
from ..quant.packing import code_bytes
from . import codec, loading, optimizers, weight_errors
from .canonical import Dense, OptimizerState, ParamState, Pieced, Quantized
from .deepspeed_layout import Flat, Piece, ZeroLayout
from .errors import CheckpointError
from .plan import CHUNK, DEFAULT_MIN_8BIT_SIZE, Job, Target, read_values, value_job
from .writer import Sink, Slot

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
OPTIM_PATTERN = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL_PATTERN = re.compile(r"(?:zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
DEEPSPEED_ADAM_GROUP_KEYS = ("bias_correction", "step")  # FusedAdam / DeepSpeedCPUAdam only


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
    rank_files: list[Path]
    ranks: list[dict[str, Any]]
    model_files: list[Path]  # one (ZeRO 1/2) or one per rank (ZeRO-3)
    model: dict[str, Any]  # rank 0's model states
    layout: ZeroLayout
    state: OptimizerState  # keyed by parameter name; params lists hold names
    master: dict[str, Pieced]  # fp32 master weights
    bits: dict[str, int] = field(default_factory=dict)  # the source's precision per parameter (32, 8 or 4)

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def keys(self) -> tuple[str, str]:
        """(base optimizer state dict, fp32 weights) keys of this stage's optimizer_state_dict."""
        if self.layout.stage == 3:
            return "optimizer_state_dict", "fp32_flat_groups"
        return "base_optimizer_state", "single_partition_of_fp32_groups"


def is_zero3(tag_dir: Path) -> bool:
    return (tag_dir / ZERO3_MODEL_FILE.format(rank=0)).exists()


def read(tag_dir: Path, tag: str | None, kind: str | None, reader: loading.FileReader) -> ZeroCheckpoint:
    where = str(tag_dir)
    if any(p.name.startswith("bf16_zero_pp_rank_") for p in tag_dir.iterdir()):
        raise CheckpointError(f"{where} was written by DeepSpeed's BF16_Optimizer: converting it is not supported yet")
    zero3 = is_zero3(tag_dir)
    model_file = tag_dir / (ZERO3_MODEL_FILE.format(rank=0) if zero3 else MODEL_FILE)
    if not model_file.is_file():
        raise CheckpointError(f"{where} has no {model_file.name}: not a complete DeepSpeed ZeRO checkpoint")
    model = load_file(model_file)
    world = int(model.get("dp_world_size", 0))
    files = _rank_files(tag_dir)
    expected = [tag_dir / OPTIM_FILE.format(rank=r) for r in range(world)]
    model_files = [tag_dir / ZERO3_MODEL_FILE.format(rank=r) for r in range(world)] if zero3 else [model_file]
    missing = sorted({p.name for p in expected} - {p.name for p in files}) + [p.name for p in model_files if not p.is_file()]
    if missing or len(files) != world:
        raise CheckpointError(
            f"{where}: the checkpoint was saved by {world} data-parallel ranks but "
            + (f"{', '.join(missing)} are missing" if missing else f"it has {len(files)} rank files")
        )
    ranks = []
    for path in files:
        loaded = load_file(path)
        reader.add(path, loaded)
        ranks.append(loaded)
    config = ranks[0].get("ds_config", {}) if isinstance(ranks[0], dict) else {}
    zero_config = config.get("zero_optimization") or {}
    if zero_config.get("round_robin_gradients"):
        raise CheckpointError(f"{where} was saved with round_robin_gradients=true: converting it is not supported yet")
    layout = ZeroLayout.build(3 if zero3 else 2, model["param_shapes"], world, zero_config.get("sub_group_size"))
    checkpoint = ZeroCheckpoint(tag_dir, tag, files, ranks, model_files, model, layout, None, {})  # type: ignore[arg-type]
    _assemble(checkpoint, kind, where)
    return checkpoint


def _optimizer_dict(loaded: Any, path: Path, base_key: str) -> dict[str, Any]:
    osd = loaded.get("optimizer_state_dict") if isinstance(loaded, dict) else None
    if not isinstance(osd, dict) or base_key not in osd:
        raise CheckpointError(f"{path} is not a DeepSpeed ZeRO optimizer file (no optimizer_state_dict.{base_key})")
    if not isinstance(osd[base_key], dict):
        raise CheckpointError(
            f"{path} is an elastic ZeRO checkpoint (elastic_checkpoint=true): converting it is not supported yet"
        )
    paddings = osd.get("param_alignment_paddings") or []
    if any(any(group) for group in paddings):
        raise CheckpointError(f"{path} uses zero_optimization.parameter_alignment padding: converting it is not supported yet")
    return osd


def _assemble(checkpoint: ZeroCheckpoint, kind: str | None, where: str) -> None:
    layout = checkpoint.layout
    base_key, weights_key = checkpoint.keys
    buffers: dict[str, dict[str, list]] = {}
    errors: dict[str, list] = {}  # name -> (offset, Dense int8/int16 piece) of compensated bf16 flats
    master: dict[str, list] = {}
    steps: dict[str, Any] = {}
    base_groups = None
    for rank, path in enumerate(checkpoint.rank_files):
        osd = _optimizer_dict(checkpoint.ranks[rank], path, base_key)
        base = osd[base_key]
        base_groups = base_groups or base["param_groups"]
        flats = layout.flats(rank)
        keys = [(index, key) for index, group in enumerate(base["param_groups"]) for key in group["params"]]
        weights = osd[weights_key]
        if (
            len(keys) != len(flats)
            or len(weights) != len(flats)
            or any(i != f.group for (i, _), f in zip(keys, flats, strict=False))
        ):
            raise CheckpointError(
                f"{path.name}: {len(keys)} flat buffers in the optimizer, the layout of {layout.world} ranks has {len(flats)} "
                "(saved with another DeepSpeed version, sub_group_size or layout option?)"
            )
        for index, ((group, key), flat, fp32) in enumerate(zip(keys, flats, weights, strict=True)):
            label = f"{path.name} flat {index}"
            saved = flat.size if layout.stage == 3 else flat.used
            if fp32.numel() != saved:
                raise CheckpointError(f"{label}: the fp32 weights have {fp32.numel()} elements, the layout expects {saved}")
            if layout.stage != 3:
                _check_mapping(osd, group, flat, label)
            state = base["state"].get(key, {})
            for piece in flat.pieces:
                master.setdefault(piece.name, []).append((piece.param_offset, Dense(fp32.narrow(0, piece.start, piece.length))))
                if state.get("step") is not None:
                    steps.setdefault(piece.name, state["step"])
            for piece, codes in _error_pieces(state, flat, label):
                errors.setdefault(piece.name, []).append((piece.param_offset, codes))
            for piece, name, buffer in _state_pieces(state, flat, base["param_groups"][group], label):
                buffers.setdefault(piece.name, {}).setdefault(name, []).append((piece.param_offset, buffer))
                if isinstance(buffer, Quantized):
                    checkpoint.bits[piece.name] = buffer.bits
                else:
                    checkpoint.bits.setdefault(piece.name, 32)
    if len(base_groups) != len(layout.params):
        raise CheckpointError(f"{where}: {len(base_groups)} optimizer param groups but {len(layout.params)} in param_shapes")
    shapes = {name: tuple(shape) for shapes in checkpoint.model["param_shapes"] for name, shape in shapes.items()}
    params = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        found = {key: _pieced(numel, pieces, f"{where}: {name} {key}") for key, pieces in buffers.get(name, {}).items()}
        step = steps.get(name)
        error = _pieced(numel, errors[name], f"{where}: {name} {ERROR_KEY}") if name in errors else None
        params[name] = ParamState(shape, None if step is None else float(step), found, {}, error)
    groups = [{**g, "params": [name for name, _ in layout.params[i]]} for i, g in enumerate(base_groups)]
    names = {n for p in params.values() for n in p.buffers}
    quantized = sorted({b for b in checkpoint.bits.values() if b < 32}, reverse=True)
    source = "dist8bit-" + "/".join(f"{b}bit" for b in quantized) if quantized else "fp32"
    stage = "ZeRO-3" if layout.stage == 3 else "ZeRO 1/2"
    checkpoint.state = OptimizerState(
        f"DeepSpeed {stage} ({source})", kind or optimizers.infer_kind(names, groups), groups, params
    )
    checkpoint.master = {
        name: _pieced(int(torch.Size(shapes[name]).numel()), m, f"{where}: {name} fp32 weights") for name, m in master.items()
    }


def _pieced(numel: int, found: list, where: str) -> Pieced:
    pieced = Pieced(numel, tuple(sorted(found, key=lambda item: item[0])))
    try:
        pieced.check(where)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return pieced


def _check_mapping(osd: dict[str, Any], group: int, flat: Flat, label: str) -> None:
    mappings = osd.get("param_slice_mappings")
    if mappings is None:
        return
    saved = [(name, int(address.start), int(address.numel)) for name, address in mappings[group].items()]
    expected = [(p.name, p.start, p.length) for p in flat.pieces]
    if saved != expected:
        raise CheckpointError(
            f"{label}: the parameter pieces {saved[:3]}... are not where DeepSpeed 0.19's layout puts them {expected[:3]}...; "
            "saved with another DeepSpeed version or layout option (round_robin_gradients, parameter_alignment)?"
        )


def _error_pieces(state: dict[str, Any], flat: Flat, label: str):
    """(piece, Dense codes) of a compensated flat's weight_error: one code per element of the flat, padding included."""
    codes = state.get(ERROR_KEY)
    if codes is None:
        return
    names = ", ".join(sorted({p.name for p in flat.pieces}))
    codes = weight_errors.check(codes, flat.size, f"{label} (parameters {names})")
    for piece in flat.pieces:
        yield piece, Dense(codes.reshape(-1).narrow(0, piece.start, piece.length))


def _state_pieces(state: dict[str, Any], flat: Flat, group: dict[str, Any], label: str):
    """(piece, state name, Quantized/Dense) for every state buffer of every piece of one flat."""
    if not state:
        return
    table = state.get("segment_table")
    if table is None:  # torch-style: flat tensors of the flat's size
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == flat.size:
                for piece in flat.pieces:
                    yield piece, name, Dense(value.narrow(0, piece.start, piece.length))
        return
    rows = [tuple(int(v) for v in row) for row in table.tolist()]
    expected = [(p.start, p.length, p.param_offset) for p in flat.pieces]
    if [row[:3] for row in rows] != expected:
        raise CheckpointError(f"{label}: the dist8bit segment_table {rows} does not match the partition layout {expected}")
    version = _state_version(group, label)
    try:
        bits = table_bits(table, version)
    except ValueError as error:
        raise CheckpointError(f"{label}: {error}") from None
    blocksize = int(group.get("blocksize", 256))
    segments = [Segment(torch.empty(0), p.start, p.length, p.param_offset, rows[i][3]) for i, p in enumerate(flat.pieces)]
    layout = packed_layout(segments, bits, blocksize, version=version)
    names = {k[: -len(CODES_SUFFIX)] for k in state if k.endswith(CODES_SUFFIX)}
    names |= {
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 1 and not k.endswith(ABSMAX_SUFFIX)
    }
    _check_packed_sizes(state, names, layout, label)
    for name in sorted(names):
        for index, piece in enumerate(flat.pieces):
            offset = layout.value_offsets[index]
            if bits[index] < 32:
                codes = state[name + CODES_SUFFIX].narrow(0, offset, code_bytes(piece.length, bits[index]))
                absmax = state[name + ABSMAX_SUFFIX].narrow(0, layout.block_offsets[index], num_blocks(piece.length, blocksize))
                code = optimizers.state_map(name, bits[index], label)
                yield piece, name, Quantized(codes, absmax, blocksize, code, piece.length)
            else:
                yield piece, name, Dense(state[name].narrow(0, offset, piece.length))


def _state_version(group: dict[str, Any], label: str) -> int:
    """The group's dist8bit state format: it says how the packed layout was padded (see optim/segments.py)."""
    version = int(group.get("dist8bit_state_version", STATE_FORMAT_VERSION))
    if version > STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{label}: dist8bit state format version {version} is newer than this dist8bit reads ({STATE_FORMAT_VERSION}); "
            "upgrade dist8bit"
        )
    return version


def _check_packed_sizes(state: dict[str, Any], names: set[str], layout: PackedLayout, label: str) -> None:
    """Every packed tensor must have the size its layout (segment table and state version) implies:
    a state saved with another layout is refused, never read at the wrong offsets."""
    for key, part in packed_entries(names).items():
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.numel() != layout.numel(part):
            raise CheckpointError(
                f"{label}: packed state {key} has {value.numel()} elements, its segment_table and state version "
                f"imply {layout.numel(part)}"
            )


# ------------------------------------------------------------------ writing
@dataclass
class OutputFile:
    path: Path
    tree: Any
    jobs: list[Job]


def output_group(group: dict[str, Any], target: Target, blocksize: int, min_8bit_size: int, where: str) -> dict:
    hyper = {k: v for k, v in group.items() if k != "params"}
    if target.quantized:
        if hyper.get("bias_correction", True) is not True:
            raise CheckpointError(
                f"{where}: a param group has bias_correction=False, which dist8bit's optimizers do not implement"
            )
        hyper = {k: v for k, v in hyper.items() if k not in DEEPSPEED_ADAM_GROUP_KEYS}
        hyper |= {
            "optim_bits": target.bits,
            "min_8bit_size": min_8bit_size,
            "blocksize": blocksize,
            "dist8bit_state_version": STATE_FORMAT_VERSION,
        }
    else:
        if "optim_bits" in hyper:
            hyper["optim_bits"] = 32
        hyper.setdefault("bias_correction", True)  # DeepSpeed's FusedAdam / DeepSpeedCPUAdam read it
    return hyper


def plan_output(
    ckpt: ZeroCheckpoint, target: Target, world: int, out_dir: Path, read: loading.Read, where: str
) -> list[OutputFile]:
    """Every file of the output tag directory for `world` ranks (optimizer files, then model states)."""
    layout = ckpt.layout.for_world(world)
    state = ckpt.state
    if target.quantized:
        optimizers.check_torch_flags(state.optimizer, state.param_groups, where)
    hypers, settings = [], []
    for group in state.param_groups:
        blocksize = target.group_blocksize(group)
        min_8bit_size = target.min_8bit_size or int(group.get("min_8bit_size", DEFAULT_MIN_8BIT_SIZE))
        hypers.append(output_group(group, target, blocksize, min_8bit_size, where))
        settings.append((blocksize, min_8bit_size))
    bits = _precisions(ckpt, layout, target, settings)
    base_key, weights_key = ckpt.keys
    outputs = []
    for rank in range(world):
        jobs: list[Job] = []
        flats = layout.flats(rank)
        states, weights = {}, []
        for index, flat in enumerate(flats):
            label = f"rank {rank} flat {index}"
            names = sorted({n for p in flat.pieces for n in ckpt.state.params[p.name].buffers})
            step = next((ckpt.state.params[p.name].step for p in flat.pieces if ckpt.state.params[p.name].step is not None), None)
            if step is not None:
                if target.quantized:
                    states[index] = _packed_entry(ckpt, flat, names, bits, settings[flat.group][0], step, label, jobs, read)
                else:
                    states[index] = _flat_entry(ckpt, flat, names, step, label, jobs, read)
                error = _error_slot(ckpt, flat, target, label, jobs, read)
                if error is not None:
                    states[index][ERROR_KEY] = error
            dtype = _master_dtype(ckpt, flat)  # float32, or bfloat16 flats (compensated, without an fp32 master)
            slot = Slot((flat.size if layout.stage == 3 else flat.used,), dtype, f"{label} fp32 weights")
            jobs.append(_fill_job(slot.label, [(ckpt.master[p.name], p, p.start) for p in flat.pieces], slot, read))
            weights.append(slot)
        groups = [{**hyper, "params": [i for i, f in enumerate(flats) if f.group == g]} for g, hyper in enumerate(hypers)]
        source = ckpt.ranks[min(rank, len(ckpt.ranks) - 1)]
        osd = dict(source["optimizer_state_dict"])
        osd[base_key] = {"state": states, "param_groups": groups}
        osd[weights_key] = weights
        if layout.stage == 3:
            osd["partition_count"] = world
        else:
            from deepspeed.utils.tensor_fragment import fragment_address

            osd["group_paddings"] = [f.size - f.used for f in flats]
            osd["partition_count"] = [world] * len(flats)
            osd["param_slice_mappings"] = [
                OrderedDict((p.name, fragment_address(numel=p.length, start=p.start)) for p in f.pieces) for f in flats
            ]
        tree = {"optimizer_state_dict": osd, **{k: v for k, v in source.items() if k != "optimizer_state_dict"}}
        outputs.append(OutputFile(out_dir / OPTIM_FILE.format(rank=rank), tree, jobs))
    if world != ckpt.world:  # model states name the world size (DeepSpeed finds the rank files by it)
        model = {**ckpt.model, "dp_world_size": world}
        names = [ZERO3_MODEL_FILE.format(rank=r) for r in range(world)] if layout.stage == 3 else [MODEL_FILE]
        outputs += [OutputFile(out_dir / name, model, []) for name in names]
    return outputs


def _precisions(ckpt: ZeroCheckpoint, layout: ZeroLayout, target: Target, settings: list[tuple[int, int]]) -> dict[str, int]:
    """Bits per parameter: the target's for the parameters the source quantized (quantized sources,
    32 for the rest), else by size and --keep-fp32."""
    source_quantized = any(b < 32 for b in ckpt.bits.values())
    result = {}
    for group, entries in enumerate(layout.params):
        for name, numel in entries:
            if not target.quantized:
                quantized = False
            elif source_quantized and target.min_8bit_size is None:
                quantized = ckpt.bits.get(name, 32) < 32
            else:
                quantized = numel >= settings[group][1] and name not in target.keep_fp32
            result[name] = target.bits if quantized else 32
    return result


def copy_unchanged(ckpt: ZeroCheckpoint, world: int, out_root: Path, out_tag_dir: Path) -> None:
    """Files the conversion does not rewrite: `latest`, DeepSpeed's helper scripts, model states at the same world size."""
    if ckpt.tag is not None:
        for path in ckpt.tag_dir.parent.iterdir():
            if path.is_file():
                shutil.copy2(path, out_root / path.name)
    for path in ckpt.tag_dir.iterdir():
        if not path.is_file() or OPTIM_PATTERN.fullmatch(path.name):
            continue
        if MODEL_PATTERN.fullmatch(path.name) and world != ckpt.world:
            continue  # rewritten with the new dp_world_size
        shutil.copy2(path, out_tag_dir / path.name)


def _step_value(step: float, precision: str) -> torch.Tensor | int:
    """dist8bit keeps a float32 tensor; DeepSpeed's Adam implementations count with a Python int."""
    return torch.tensor(float(step), dtype=torch.float32) if precision != "fp32" else int(step)


def _packed_entry(ckpt, flat: Flat, names, bits, blocksize, step, label, jobs, read) -> dict[str, Any]:
    precisions = [bits[p.name] for p in flat.pieces]
    numel = {p.name: ckpt.state.params[p.name].numel for p in flat.pieces}
    segments = [Segment(torch.empty(0), p.start, p.length, p.param_offset, numel[p.name]) for p in flat.pieces]
    layout = packed_layout(segments, precisions, blocksize)
    entry: dict[str, Any] = {"step": _value_slot(_step_value(step, "quantized"), f"{label} step", jobs)}
    for name in names:
        sources = [(ckpt.state.params[p.name].buffers[name], p) for p in flat.pieces]
        if layout.codes_numel:
            codes = Slot((layout.codes_numel,), torch.uint8, f"{label} {name}{CODES_SUFFIX}")
            absmax = Slot((layout.blocks,), torch.float32, f"{label} {name}{ABSMAX_SUFFIX}")
            entry[name + CODES_SUFFIX], entry[name + ABSMAX_SUFFIX] = codes, absmax
            quantized = [
                (b, p, layout.value_offsets[i], layout.block_offsets[i])
                for i, (b, p) in enumerate(sources)
                if layout.quantized[i]
            ]
            code = optimizers.state_map(name, max(b for b in precisions if b < 32), label)  # the target's, for all
            jobs.append(_quantize_job(codes.label, quantized, codes, absmax, blocksize, code, read))
        if layout.values_numel:
            values = Slot((layout.values_numel,), torch.float32, f"{label} {name}")
            entry[name] = values
            dense = [(b, p, layout.value_offsets[i]) for i, (b, p) in enumerate(sources) if not layout.quantized[i]]
            jobs.append(_fill_job(values.label, dense, values, read))
    entry["segment_table"] = _value_slot(segment_table(segments, precisions), f"{label} segment_table", jobs)
    return entry


def _flat_entry(ckpt, flat: Flat, names, step, label, jobs, read) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": _step_value(step, "fp32")}
    for name in names:
        slot = Slot((flat.size,), torch.float32, f"{label} {name}")
        jobs.append(
            _fill_job(slot.label, [(ckpt.state.params[p.name].buffers[name], p, p.start) for p in flat.pieces], slot, read)
        )
        entry[name] = slot
    return entry


def _master_dtype(ckpt: ZeroCheckpoint, flat: Flat) -> torch.dtype:
    """The dtype of a flat's master weights: its parameters' in the source (the same for a whole group)."""
    for piece in flat.pieces:
        for _, part in ckpt.master[piece.name].pieces:
            return part.values.dtype
    return torch.float32


def _error_slot(ckpt: ZeroCheckpoint, flat: Flat, target: Target, label: str, jobs: list[Job], read) -> Slot | None:
    """A flat's weight_error (one code per element, zeros in the padding) when its parameters have one."""
    sources = [(ckpt.state.params[p.name].error, p) for p in flat.pieces if ckpt.state.params[p.name].error is not None]
    if not sources:
        return None
    dtypes = {weight_errors.dtype_of(error) for error, _ in sources}
    dtype = weight_errors.output_dtype(dtypes.pop() if len(dtypes) == 1 else torch.int16, target.error_bits)
    if dtype is None:
        return None
    slot = Slot((flat.size,), dtype, f"{label} {ERROR_KEY}")

    def run(sink: Sink) -> None:
        written = 0
        for error, piece in sources:
            _pad(sink, slot, piece.start - written)
            weight_errors.write_codes(sink, slot, error, piece.param_offset, piece.param_offset + piece.length, read, CHUNK)
            written = piece.start + piece.length
        _pad(sink, slot, flat.size - written)

    jobs.append(Job(slot.label, sum(e.nbytes() * p.length // max(e.numel, 1) for e, p in sources), run))
    return slot


def _value_slot(value: torch.Tensor, label: str, jobs: list[Job]) -> Slot:
    slot = Slot(value.shape, value.dtype, label)
    jobs.append(value_job(label, value, slot))
    return slot


def _fill_job(label: str, sources: list[tuple[Pieced, Piece, int]], slot: Slot, read: loading.Read) -> Job:
    """Each piece's float32 values at its position in the slot; zeros in between and after (padding)."""

    def run(sink: Sink) -> None:
        written = 0
        for buffer, piece, position in sorted(sources, key=lambda item: item[2]):
            _pad(sink, slot, position - written)
            for start in range(0, piece.length, CHUNK):
                stop = min(start + CHUNK, piece.length)
                values = read_values(buffer, piece.param_offset + start, piece.param_offset + stop, read)
                sink.write(slot, values.to(slot.dtype))  # bfloat16 master weights go through float32 exactly
                sink.progress(buffer.nbytes() * (stop - start) // max(buffer.numel, 1))
            written = position + piece.length
        _pad(sink, slot, slot.numel - written)

    return Job(label, sum(b.nbytes() * p.length // max(b.numel, 1) for b, p, _ in sources), run)


def _quantize_job(
    label: str, sources: list[tuple[Pieced, Piece, int, int]], codes: Slot, absmax: Slot, blocksize: int, code, read
) -> Job:
    """Quantized pieces at their (code byte, scale) offsets, zeros in the padding between them;
    a source piece already in this exact place and layout is copied bit for bit."""

    bits = map_bits(code)

    def run(sink: Sink) -> None:
        written = [0, 0]  # codes, scales
        for buffer, piece, code_offset, block_offset in sources:
            _pad(sink, codes, code_offset - written[0])
            _pad(sink, absmax, block_offset - written[1])
            written = [code_offset + code_bytes(piece.length, bits), block_offset + num_blocks(piece.length, blocksize)]
            same = _same_piece(buffer, piece, blocksize, code)
            if same is not None:
                sink.write(codes, read(same.codes, 0, same.codes.numel()))
                sink.write(absmax, read(same.absmax, 0, same.absmax.numel()))
                sink.progress(same.nbytes())
                continue
            for start in range(0, piece.length, CHUNK):  # CHUNK keeps blocks (and bytes) aligned to the piece start
                stop = min(start + CHUNK, piece.length)
                values = read_values(buffer, piece.param_offset + start, piece.param_offset + stop, read)
                chunk_codes, chunk_absmax = codec.quantize_exact(values, code, blocksize)
                sink.write(codes, chunk_codes)
                sink.write(absmax, chunk_absmax)
                sink.progress(buffer.nbytes() * (stop - start) // max(buffer.numel, 1))

    return Job(label, sum(b.nbytes() * p.length // max(b.numel, 1) for b, p, _, _ in sources), run)


def _pad(sink: Sink, slot: Slot, count: int) -> None:
    """`count` zeros of the slot's dtype: the unused bytes that align the next segment."""
    if count > 0:
        sink.write(slot, torch.zeros(count, dtype=slot.dtype))


def _same_piece(buffer: Pieced, piece: Piece, blocksize: int, code: torch.Tensor) -> Quantized | None:
    for offset, part in buffer.pieces:
        same_place = offset == piece.param_offset and part.numel == piece.length
        if same_place and isinstance(part, Quantized) and part.blocksize == blocksize and torch.equal(part.code, code):
            return part
    return None
