"""convert(): detect the source format (a torch.save file or a DeepSpeed directory), plan, stream the output atomically, optionally verify."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..quant.layout import check_blocksize
from . import bnb_format, dcp_format, deepspeed_format, loading, optimizers, torch_format, weight_errors
from .atomic import atomic_output, check_destination
from .canonical import OptimizerState
from .errors import CheckpointError
from .plan import PRECISION_BITS, Plan, Target, passthrough, plan_optimizer
from .progress import Report, bar, finished
from .verify import Agreement, compare_buffer, compare_carried, compare_optimizer
from .writer import save_streaming

TARGETS = tuple(PRECISION_BITS)  # fp32, 8bit, 4bit
DEEPSPEED_RANK_KEYS = ("ds_config", "ds_version", "zero_stage", "partition_count")


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    optimizer: str | None = None,
    world_size: int | None = None,
    blocksize: int | None = None,
    min_8bit_size: int | None = None,
    keep_fp32: Iterable[Any] = (),
    shapes: Mapping[Any, tuple[int, ...]] | None = None,
    error_bits: int | str | None = None,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """Convert an optimizer checkpoint between 4-bit, 8-bit and fp32 states.

    src: a torch.save file holding an optimizer state dict (torch.optim, dist8bit 8/32-bit,
         bitsandbytes 8-bit), alone or inside a training checkpoint (everything else is carried over);
         or a DeepSpeed checkpoint directory (ZeRO 0/1/2/3), written back for `world_size` ranks;
         or a torch.distributed.checkpoint (DCP) directory from FSDP2 (any world size: DCP reshards on load).
    to: "fp32" (torch names; loads into torch.optim and dist8bit 32-bit optimizers), "8bit" or "4bit"
        (dist8bit's quantized layout; loads into dist8bit optimizers with that optim_bits).
    optimizer: the optimizer kind (adamw, sgd, ...); needed for bitsandbytes sources, checked otherwise.
    blocksize: block size (default: the source's at that precision, else 256 for 8-bit, 128 for 4-bit);
        min_8bit_size: smaller parameters stay fp32 (default: the source's setting, else 4096);
        keep_fp32: parameter indices (names for DeepSpeed) that stay fp32.
    shapes: parameter index -> shape, for a torch state dict with 4-bit state whose shapes nothing
        else says (packed codes are 1-D); DeepSpeed and DCP checkpoints record their shapes.
    error_bits: compensated bf16 parameters' weight_error (int8/int16 per element): None carries it as the
        source has it, 8 or 16 converts its width, "none" drops it with a warning (weight_errors.py).
    verify: re-read the output and check it against the source before moving it into place.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    target = _target(to, blocksize, min_8bit_size, keep_fp32, error_bits)
    kind = optimizers.check_kind(optimizer)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise CheckpointError(f"{src}: the source and the destination are the same; write to a new path")
    check_destination(dst, overwrite)
    if src.is_dir():
        if shapes is not None:
            raise CheckpointError("shapes applies to torch state dict files; DeepSpeed and DCP checkpoints record their shapes")
        return _convert_directory(src, dst, target, kind, world_size, verify, overwrite, progress, started)
    if world_size is not None:
        raise CheckpointError("--world-size applies to DeepSpeed and DCP checkpoint directories, not to a single file")
    if deepspeed_format.OPTIM_PATTERN.fullmatch(src.name):
        raise CheckpointError(
            f"{src} is one rank's file of a DeepSpeed checkpoint; its states are flat ZeRO partitions. Convert the "
            f"checkpoint directory instead: dist8bit convert {src.parent} DST --to ..."
        )
    # DeepSpeed without ZeRO keeps the optimizer state dict in its model states file (with DeepSpeed's classes)
    allowed = deepspeed_format.safe_globals() if deepspeed_format.MODEL_PATTERN.fullmatch(src.name) else []
    with torch.serialization.safe_globals(allowed):
        return _convert_file(src, dst, target, kind, verify, overwrite, progress, started, shapes)


def _convert_file(
    src: Path,
    dst: Path,
    target: Target,
    kind: str | None,
    verify: bool,
    overwrite: bool,
    progress: bool,
    started: float,
    shapes: Mapping[Any, tuple[int, ...]] | None = None,
) -> Report:
    source = loading.load(src)
    read = loading.FileReader()
    try:
        read.add(src, source)
        states = _read_optimizers(source, kind, str(src), shapes, target.error_bits == weight_errors.DROP)
        plan = Plan(tree=None, read=read)
        plans = {path: plan_optimizer(state, target, _where(src, path), read) for path, state in states.items()}
        plan.tree = _rebuild(source, (), plans, plan)
        errors = weight_errors.Tally.of((p for s in states.values() for p in s.params.values()), target.error_bits)
        errors.warn(src)
        jobs = [job for p in plans.values() for job in p.jobs] + plan.jobs
        total_in = sum(job.bytes_in for job in jobs)
        agreement = None
        with atomic_output(dst, overwrite) as tmp:
            with bar(total_in, f"convert {src.name}", progress) as meter:
                bytes_out = save_streaming(tmp, plan.tree, lambda sink: [job.run(sink) for job in jobs], meter.update)
            if verify:
                agreement = _verify(source, states, tmp, read, src, progress, total_in, target)
    finally:
        read.close()
    first = next(iter(states.values()))
    return finished(
        started,
        agreement,
        source=src,
        destination=dst,
        source_format=first.source_format if len(states) == 1 else "+".join(s.source_format for s in states.values()),
        target=f"{target.describe()} (blocksize {_blocksizes(plans)})" if target.quantized else "fp32 (torch names)",
        optimizer=first.optimizer,
        params=sum(len(s.params) for s in states.values()),
        tensors=len(jobs),
        bytes_in=total_in,
        bytes_out=bytes_out,
        weight_errors=errors.describe(),
    )


def _target(
    to: str, blocksize: int | None, min_8bit_size: int | None, keep_fp32: Iterable[Any], error_bits: int | str | None
) -> Target:
    if to not in TARGETS:
        raise CheckpointError(f"--to must be one of {TARGETS}, got {to!r}")
    if blocksize is not None:
        try:
            check_blocksize(blocksize, "--blocksize")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    if min_8bit_size is not None and (not isinstance(min_8bit_size, int) or min_8bit_size < 0):
        raise CheckpointError(f"--min-8bit-size must be a non-negative integer, got {min_8bit_size!r}")
    if to == "fp32" and (blocksize is not None or min_8bit_size is not None or keep_fp32):
        raise CheckpointError("--blocksize, --min-8bit-size and --keep-fp32 only apply with --to 8bit or --to 4bit")
    return Target(to, blocksize, min_8bit_size, frozenset(keep_fp32), error_bits=weight_errors.check_choice(error_bits))


def _where(src: Path, path: tuple) -> str:
    return str(src) + "".join(f"[{p!r}]" for p in path)


def find_optimizer_state_dicts(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every optimizer state dict in a checkpoint (the top level, or nested in dicts)."""
    if torch_format.is_optimizer_state_dict(tree):
        return [path]
    if isinstance(tree, dict):
        return [found for key, value in tree.items() for found in find_optimizer_state_dicts(value, (*path, key))]
    return []


def _read_optimizers(
    source: Any,
    kind: str | None,
    where: str,
    shapes: Mapping[Any, tuple[int, ...]] | None = None,
    drop_errors: bool = False,
) -> dict[tuple, OptimizerState]:
    if isinstance(source, dict) and any(key in source for key in DEEPSPEED_RANK_KEYS) and "optimizer_state_dict" in source:
        raise CheckpointError(
            f"{where} is one rank's file of a DeepSpeed checkpoint; its states are flat ZeRO partitions. Convert the "
            "checkpoint directory instead"
        )
    paths = find_optimizer_state_dicts(source)
    if not paths:
        raise CheckpointError(
            f"{where} holds no optimizer state dict (a dict with 'state' and 'param_groups', at the top level or inside "
            "a training checkpoint); pass the file written from optimizer.state_dict()"
        )
    states = {}
    for path in paths:
        sd = _at(source, path)
        label = _where(Path(where), path)
        if bnb_format.is_bnb(sd):
            states[path] = bnb_format.read(sd, kind, label)
        else:
            states[path] = torch_format.read(sd, kind, label, {**_named_shapes(source, sd), **(shapes or {})}, drop_errors)
    return states


def _named_shapes(source: Any, sd: dict[str, Any]) -> dict[Any, tuple[int, ...]]:
    """Parameter key -> shape from the groups' `param_names` (optimizers built from named_parameters())
    and a model state dict in the same checkpoint holding tensors under those names."""
    names = {
        key: name
        for group in sd["param_groups"]
        if isinstance(group, dict) and isinstance(group.get("param_names"), list)
        for key, name in zip(group["params"], group["param_names"], strict=False)
    }
    if not names:
        return {}
    for _, tensors in _tensor_dicts(source):
        if all(isinstance(tensors.get(name), torch.Tensor) for name in names.values()):
            return {key: tuple(tensors[name].shape) for key, name in names.items()}
    return {}


def _tensor_dicts(tree: Any, path: tuple = ()) -> Iterable[tuple[tuple, dict]]:
    if isinstance(tree, dict):
        if any(isinstance(v, torch.Tensor) for v in tree.values()):
            yield path, tree
        for key, value in tree.items():
            yield from _tensor_dicts(value, (*path, key))


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _rebuild(node: Any, path: tuple, plans: dict[tuple, Plan], carried: Plan) -> Any:
    """The source tree with converted optimizer state dicts in place and everything else carried over."""
    if path in plans:
        return plans[path].tree
    if isinstance(node, dict) and any(p[: len(path)] == path for p in plans):
        return type(node)((k, _rebuild(v, (*path, k), plans, carried)) for k, v in node.items())
    return passthrough(carried, node, "".join(f"[{p!r}]" for p in path) or "checkpoint")


def _blocksizes(plans: dict[tuple, Plan]) -> str:
    sizes = sorted({g["blocksize"] for p in plans.values() for g in p.tree["param_groups"] if "blocksize" in g})
    return "/".join(map(str, sizes))


def _verify(
    source: Any,
    states: dict[tuple, OptimizerState],
    written: Path,
    read: loading.FileReader,
    src: Path,
    progress: bool,
    total: int,
    target: Target,
) -> Agreement:
    output = loading.load(written)
    read.add(written, output)
    agreement = Agreement()
    with bar(total, "verify", progress) as meter:
        for path, state in states.items():
            shapes = {key: param.shape for key, param in state.params.items()}
            converted = torch_format.read(_at(output, path), state.optimizer, _where(src, path), shapes)
            result = compare_optimizer(state, converted, _where(src, path), meter.update, read, target.error_bits)
            agreement.add(result.max_error, result.bound_ratio)
        compare_carried(source, output, set(states), meter.update, read)
    return agreement


# ------------------------------------------------------------ directories
def _convert_directory(
    src: Path,
    dst: Path,
    target: Target,
    kind: str | None,
    world_size: int | None,
    verify: bool,
    overwrite: bool,
    progress: bool,
    started: float,
) -> Report:
    if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
        raise CheckpointError(f"--world-size must be a positive integer, got {world_size!r}")
    if dcp_format.find_checkpoint(src) is not None:
        return dcp_format.convert(src, dst, target, kind, world_size, verify, overwrite, progress, started)
    found = deepspeed_format.find_tag_dir(src)
    if found is None:
        raise CheckpointError(
            f"{src} is a directory but neither a DeepSpeed checkpoint (zero_pp_rank_*_optim_states.pt, latest) nor DCP"
        )
    tag_dir, tag = found
    if deepspeed_format.is_zero0(tag_dir):
        return _convert_zero0(src, dst, tag_dir, tag, target, kind, verify, overwrite, progress, started)
    read = loading.FileReader()
    try:
        checkpoint = deepspeed_format.read(tag_dir, tag, kind, read)
        world = world_size or checkpoint.world
        errors = weight_errors.Tally.of(checkpoint.state.params.values(), target.error_bits)
        errors.warn(src)
        agreement = None
        with atomic_output(dst, overwrite, directory=True) as tmp:
            out_tag = tmp / tag if tag is not None else tmp
            out_tag.mkdir(exist_ok=True)
            outputs = deepspeed_format.plan_output(checkpoint, target, world, out_tag, read, str(src))
            deepspeed_format.copy_unchanged(checkpoint, world, tmp, out_tag)
            files = [(out.path, out.tree, out.jobs) for out in outputs]
            planned = []
            for path, tree, file_jobs in files:  # tensors carried over (e.g. the weights) get copy jobs per file
                carried = Plan(tree=None, read=read)
                planned.append((path, passthrough(carried, tree, path.name), file_jobs + carried.jobs))
            jobs = [job for _, _, file_jobs in planned for job in file_jobs]
            total_in = sum(job.bytes_in for job in jobs)
            bytes_out = 0
            # the reserved files hold DeepSpeed's classes too: allow them when the writer reads them back
            with (
                bar(total_in, f"convert {src.name}", progress) as meter,
                torch.serialization.safe_globals(deepspeed_format.safe_globals()),
            ):
                for path, tree, file_jobs in planned:
                    bytes_out += save_streaming(
                        path, tree, lambda sink, todo=file_jobs: [job.run(sink) for job in todo], meter.update
                    )
            if verify:
                agreement = _verify_deepspeed(checkpoint, out_tag, kind, read, progress, total_in, str(src), target)
    finally:
        read.close()
    return finished(
        started,
        agreement,
        source=src,
        destination=dst,
        source_format=f"{checkpoint.state.source_format}, {checkpoint.world} ranks",
        target=f"{target.describe()} DeepSpeed ZeRO, {world} ranks",
        optimizer=checkpoint.state.optimizer,
        params=len(checkpoint.state.params),
        tensors=len(jobs),
        bytes_in=total_in,
        bytes_out=bytes_out,
        weight_errors=errors.describe(),
    )


def _convert_zero0(
    src: Path,
    dst: Path,
    tag_dir: Path,
    tag: str | None,
    target: Target,
    kind: str | None,
    verify: bool,
    overwrite: bool,
    progress: bool,
    started: float,
) -> Report:
    """DeepSpeed without ZeRO: every rank loads the one model states file, whose optimizer state dict is whole."""
    model_file = tag_dir / deepspeed_format.MODEL_FILE
    with atomic_output(dst, overwrite, directory=True) as tmp:
        out_tag = tmp / tag if tag is not None else tmp
        out_tag.mkdir(exist_ok=True)
        with torch.serialization.safe_globals(deepspeed_format.safe_globals()):
            report = _convert_file(model_file, out_tag / model_file.name, target, kind, verify, False, progress, started)
        if tag is not None:
            for path in tag_dir.parent.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        for path in tag_dir.iterdir():
            if path.is_file() and path.name != model_file.name:
                shutil.copy2(path, out_tag / path.name)
    report.source, report.destination = src, dst
    report.source_format += ", DeepSpeed without ZeRO"
    return report


def _verify_deepspeed(
    checkpoint: deepspeed_format.ZeroCheckpoint,
    out_tag: Path,
    kind: str | None,
    read,
    progress: bool,
    total: int,
    where: str,
    target: Target,
) -> Agreement:
    written = deepspeed_format.read(out_tag, None, checkpoint.state.optimizer or kind, read)
    agreement = Agreement()
    with bar(total, "verify", progress) as meter:
        result = compare_optimizer(checkpoint.state, written.state, where, meter.update, read, target.error_bits)
        agreement.add(result.max_error, result.bound_ratio)
        for name, weights in checkpoint.master.items():
            error, ratio = compare_buffer(weights, written.master[name], f"{where} {name} fp32 weights", meter.update, read)
            if ratio > 0:
                raise CheckpointError(f"verify: the fp32 master weights of {name} changed (max error {error:.3g})")
    return agreement
