"""Where the launcher's checkpoints live, what they hold besides the weights, and when one may be resumed.

One layout for every strategy:

    OUT_DIR/checkpoints/latest              the name of the newest complete checkpoint (written last, atomically)
    OUT_DIR/checkpoints/step_000100/
        launch.pt                           step, metrics, every rank's RNG state, arguments, model config (rank 0)
        ...                                 the strategy's own files: state.pt (none/ddp), DCP shards (fsdp),
                                            DeepSpeed's model and ZeRO files (deepspeed)

A checkpoint counts only once `latest` names it, and `latest` is replaced only
after every rank has finished writing, so a run killed mid-save resumes from
the previous checkpoint. Older step directories are removed after that.
Everything is loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch

from launch.atomic import torch_save_atomic, write_text_atomic
from launch.data import stream_seed
from launch.optimizers import LaunchError, optimizer_family

FORMAT = "dist8bit-launch-checkpoint"
VERSION = 2  # 2: one directory per checkpoint for every strategy (1 was a single ckpt.pt for none/ddp)
META_FILE = "launch.pt"
LATEST_FILE = "latest"
# Strategies whose checkpoints are interchangeable: none and ddp both hold the whole model and optimizer.
FAMILIES = {"none": "local", "ddp": "local", "fsdp": "fsdp", "deepspeed": "deepspeed"}


def root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = root(out_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    directory = root(out_dir) / pointer.read_text().strip()
    if not (directory / META_FILE).exists():
        raise LaunchError(f"{pointer} names {directory.name}, which has no {META_FILE}: the checkpoint directory is damaged")
    return directory


def prepare(out_dir: Path, step: int) -> Path:
    """The directory for the checkpoint of `step`, emptied of any half-written earlier attempt (call on rank 0)."""
    directory = root(out_dir) / tag_for(step)
    if directory.exists() and directory != latest(out_dir):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def publish(out_dir: Path, directory: Path, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank has written its part: the metadata, then `latest`, then remove older checkpoints."""
    torch_save_atomic(meta, directory / META_FILE)
    write_text_atomic(directory.name + "\n", root(out_dir) / LATEST_FILE)
    for other in root(out_dir).iterdir():
        if other.is_dir() and other.name.startswith("step_") and other != directory:
            shutil.rmtree(other, ignore_errors=True)


def build_meta(
    *, step: int, world_size: int, strategy: str, optim: str, model_config: dict, rng: list, metrics: dict, args: dict
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "world_size": world_size,
        "strategy": strategy,
        "optim": optim,
        "model_config": model_config,
        "rng": rng,
        "metrics": metrics,
        "args": args,
    }


def read_meta(out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint's directory and metadata; a clear error when there is none."""
    directory = latest(out_dir)
    if directory is None:
        hint = " (a ckpt.pt from an older launcher cannot be resumed)" if (out_dir / "ckpt.pt").exists() else ""
        raise LaunchError(
            f"--resume: no checkpoint under {root(out_dir)}{hint}; run without --resume first, or point --out-dir at the run"
        )
    meta = torch.load(directory / META_FILE, map_location="cpu", weights_only=True)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LaunchError(
            f"{directory / META_FILE} is not a checkpoint this launcher can read "
            f"(format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} version {VERSION})"
        )
    return directory, meta


def check_resumable(
    meta: dict[str, Any],
    directory: Path,
    *,
    strategy: str,
    world_size: int,
    same_world_size: bool,
    optim: str,
    model_config: dict,
) -> None:
    """Refuse a checkpoint this run cannot continue, saying what differs and what to pass instead."""
    saved = meta["strategy"]
    if FAMILIES[saved] != FAMILIES[strategy]:
        raise LaunchError(f"{directory} was written by --strategy {saved}; resume it with --strategy {saved}")
    if same_world_size and meta["world_size"] != world_size:
        raise LaunchError(
            f"world size mismatch: {directory} was written by a {meta['world_size']}-process {saved} run but this run has "
            f"{world_size} process(es); --strategy {strategy} partitions the optimizer state by rank, so resume it with "
            f"{meta['world_size']} processes (--strategy fsdp checkpoints reshard to any number of processes)"
        )
    if optimizer_family(meta["optim"]) != optimizer_family(optim):
        raise LaunchError(f"{directory} was trained with optimizer {meta['optim']}; resume with the same --optim")
    # The same optimizer at another state precision resumes once the checkpoint was
    # converted (dist8bit convert --to 4bit|8bit|fp32); the optimizer refuses unconverted state.
    saved_config = meta["model_config"]
    if saved_config != model_config:
        differences = {k: (saved_config.get(k), v) for k, v in model_config.items() if saved_config.get(k) != v}
        raise LaunchError(f"{directory} holds a different model (checkpoint vs now: {differences}); pass the same model flags")


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(meta: dict[str, Any], rank: int, world_size: int, args: argparse.Namespace, device: torch.device) -> bool:
    """This rank's saved RNG state when the world size is unchanged (True); otherwise a fresh seed from
    (seed, rank, step), since a rank's saved stream has no counterpart on another mesh (False)."""
    if meta["world_size"] == world_size:
        state = meta["rng"][rank]
        torch.set_rng_state(state["cpu"])
        if device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], device)
        return True
    torch.manual_seed(stream_seed(args.seed, rank, "resume", meta["step"]))
    return False
