"""convert(): detect the source format, plan, stream the output atomically, optionally verify."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..quant.layout import check_blocksize
from . import bnb_format, loading, optimizers, torch_format
from .atomic import atomic_output, check_destination
from .canonical import OptimizerState
from .errors import CheckpointError
from .plan import Plan, Target, passthrough, plan_optimizer
from .progress import Report, bar
from .verify import Agreement, compare_carried, compare_optimizer
from .writer import save_streaming

TARGETS = ("fp32", "8bit")
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
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """Convert an optimizer checkpoint between 8-bit and fp32 states.

    src: a torch.save file holding an optimizer state dict (torch.optim, dist8bit 8/32-bit,
         bitsandbytes 8-bit), alone or inside a training checkpoint (everything else is carried over).
    to: "fp32" (torch names; loads into torch.optim and dist8bit 32-bit optimizers) or "8bit"
        (dist8bit's 8-bit layout; loads into dist8bit 8-bit optimizers).
    optimizer: the optimizer kind (adamw, sgd, ...); needed for bitsandbytes sources, checked otherwise.
    blocksize: 8-bit block size (default: the source's, else 256); min_8bit_size: smaller parameters
        stay fp32 (default: the source's setting, else 4096); keep_fp32: parameter indices that stay fp32.
    verify: re-read the output and check it against the source before moving it into place.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    target = _target(to, blocksize, min_8bit_size, keep_fp32)
    kind = optimizers.check_kind(optimizer)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise CheckpointError(f"{src}: the source and the destination are the same; write to a new path")
    check_destination(dst, overwrite)
    if src.is_dir():
        raise CheckpointError(
            f"{src} is a directory: converting DeepSpeed and torch.distributed.checkpoint (DCP) directories is not "
            "supported yet; convert a single torch.save file (consolidate first, e.g. with torch.distributed.checkpoint's "
            "dcp_to_torch_save or DeepSpeed's zero_to_fp32 for the weights)"
        )
    if world_size is not None:
        raise CheckpointError("--world-size applies to DeepSpeed and DCP checkpoint directories, not to a single file")
    source = loading.load(src)
    read = loading.FileReader()
    try:
        read.add(src, source)
        states = _read_optimizers(source, kind, str(src))
        plan = Plan(tree=None, read=read)
        plans = {path: plan_optimizer(state, target, _where(src, path), read) for path, state in states.items()}
        plan.tree = _rebuild(source, (), plans, plan)
        jobs = [job for p in plans.values() for job in p.jobs] + plan.jobs
        total_in = sum(job.bytes_in for job in jobs)
        agreement = None
        with atomic_output(dst, overwrite) as tmp:
            with bar(total_in, f"convert {src.name}", progress) as meter:
                bytes_out = save_streaming(tmp, plan.tree, lambda sink: [job.run(sink) for job in jobs], meter.update)
            if verify:
                agreement = _verify(source, states, tmp, read, src, progress, total_in)
    finally:
        read.close()
    first = next(iter(states.values()))
    return Report(
        source=src,
        destination=dst,
        source_format=first.source_format if len(states) == 1 else "+".join(s.source_format for s in states.values()),
        target=f"dist8bit-8bit (blocksize {_blocksizes(plans)})" if target.precision == "8bit" else "fp32 (torch names)",
        optimizer=first.optimizer,
        params=sum(len(s.params) for s in states.values()),
        tensors=len(jobs),
        bytes_in=total_in,
        bytes_out=bytes_out,
        seconds=time.perf_counter() - started,
        max_error=None if agreement is None else agreement.max_error,
        bound_ratio=None if agreement is None else agreement.bound_ratio,
    )


def _target(to: str, blocksize: int | None, min_8bit_size: int | None, keep_fp32: Iterable[Any]) -> Target:
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
        raise CheckpointError("--blocksize, --min-8bit-size and --keep-fp32 only apply with --to 8bit")
    return Target(to, blocksize, min_8bit_size, frozenset(keep_fp32))


def _where(src: Path, path: tuple) -> str:
    return str(src) + "".join(f"[{p!r}]" for p in path)


def find_optimizer_state_dicts(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every optimizer state dict in a checkpoint (the top level, or nested in dicts)."""
    if torch_format.is_optimizer_state_dict(tree):
        return [path]
    if isinstance(tree, dict):
        return [found for key, value in tree.items() for found in find_optimizer_state_dicts(value, (*path, key))]
    return []


def _read_optimizers(source: Any, kind: str | None, where: str) -> dict[tuple, OptimizerState]:
    if isinstance(source, dict) and any(key in source for key in DEEPSPEED_RANK_KEYS) and "optimizer_state_dict" in source:
        raise CheckpointError(
            f"{where} is one rank's file of a DeepSpeed checkpoint; its states are flat ZeRO partitions. Converting "
            "DeepSpeed checkpoint directories is not supported yet"
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
        reader = bnb_format.read if bnb_format.is_bnb(sd) else torch_format.read
        states[path] = reader(sd, kind, label)
    return states


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
) -> Agreement:
    output = loading.load(written)
    read.add(written, output)
    agreement = Agreement()
    with bar(total, "verify", progress) as meter:
        for path, state in states.items():
            converted = torch_format.read(_at(output, path), state.optimizer, _where(src, path))
            result = compare_optimizer(state, converted, _where(src, path), meter.update, read)
            agreement.add(result.max_error, result.bound_ratio)
        compare_carried(source, output, set(states), meter.update, read)
    return agreement
