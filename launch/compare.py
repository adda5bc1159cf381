"""Train the same model twice, 8-bit vs 32-bit AdamW (same seed, data and steps), and compare the loss curves.

    python launch/compare.py --nproc 2 --steps 400
    python launch/compare.py --nproc 2 --strategy fsdp --out-dir results/compare-fsdp
    python launch/compare.py --nproc 2 --strategy deepspeed -- --deepspeed_config launch/configs/zero2_adamw8bit.json
    python launch/compare.py --nproc 1 --steps 100 -- --n-layer 2     # after --: passed on to pretrain.py

Under --strategy deepspeed each run's --optim replaces the config's optimizer
type (its params, scheduler and ZeRO settings stay), so both runs differ only
in the optimizer's precision.

Writes OUT_DIR/<optim>/metrics.json (+ ckpt.pt) per run, OUT_DIR/loss.png
(train and validation curves) and OUT_DIR/summary.json, and prints the final
losses with their relative difference. --plot-only redraws from existing runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python launch/compare.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist8bit.bench.report import save_figure
from launch.atomic import write_json_atomic

PRETRAIN = Path(__file__).resolve().with_name("pretrain.py")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="8-bit vs 32-bit AdamW on the same pretraining run; extra arguments go to pretrain.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun --standalone when > 1)")
    parser.add_argument(
        "--strategy",
        choices=("auto", "none", "ddp", "fsdp", "deepspeed"),
        default="auto",
        help="pretrain.py's --strategy for both runs (auto: ddp with --nproc > 1, else none)",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--optims", default="adamw8bit,adamw32bit", help="the two --optim values to compare, the first against the second"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results/compare"))
    parser.add_argument("--plot-only", action="store_true", help="do not train; plot and summarise the runs already in OUT_DIR")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    args.optims = [name.strip() for name in args.optims.split(",") if name.strip()]
    if len(args.optims) != 2:
        parser.error(f"--optims takes exactly two names, got {args.optims}")
    if args.nproc < 1 or args.steps < 1:
        parser.error("--nproc and --steps must be >= 1")
    return args, extra


def pretrain_command(args: argparse.Namespace, optim: str, extra: list[str]) -> list[str]:
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    run_args = ["--strategy", args.strategy, "--optim", optim, "--steps", str(args.steps), "--seed", str(args.seed)]
    run_args += ["--out-dir", str(args.out_dir / optim)]
    return [*launcher, str(PRETRAIN), *run_args, *extra]


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of the values (at least one): a less noisy final training loss."""
    count = max(1, round(len(values) * fraction))
    return sum(values[-count:]) / count


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so that it follows the fast early drop."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = decay * average + (1 - decay) * value
        smoothed.append(average / (1 - decay**count))
    return smoothed


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    train = [e["loss"] for e in metrics["train"]]
    summary = metrics.get("summary", {})
    return {
        "final_val_loss": metrics["val"][-1]["loss"],
        "final_train_loss": tail_mean(train),
        "train_loss_window": max(1, round(len(train) * 0.1)),
        "steps": metrics["train"][-1]["step"],
        "state_bytes_per_rank": summary.get("state_bytes"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "world_size": metrics.get("world_size"),
        "strategy": metrics.get("strategy"),
        "parameters": metrics.get("parameters"),
    }


def plot(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Three panels: training loss (raw, faint, and EMA), validation loss, and the first run minus the second."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("compare.py plots with matplotlib: pip install matplotlib (or pip install -e '.[train]')") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (train_axes, val_axes, diff_axes) = plt.subplots(1, 3, figsize=(16, 4.5))
    curves = {}
    for (name, metrics), color, style in zip(runs.items(), ("tab:red", "tab:blue"), ("-", "--"), strict=False):
        steps = [e["step"] for e in metrics["train"]]
        smoothed = ema([e["loss"] for e in metrics["train"]])
        val_steps, val_losses = [e["step"] for e in metrics["val"]], [e["loss"] for e in metrics["val"]]
        curves[name] = (steps, smoothed, val_steps, val_losses)
        mib = (metrics.get("summary", {}).get("state_bytes") or 0) / 2**20
        train_axes.plot(steps, [e["loss"] for e in metrics["train"]], color=color, alpha=0.15, linewidth=0.8)
        train_axes.plot(steps, smoothed, style, color=color, label=f"{name} (state {mib:.2f} MiB/rank)")
        val_axes.plot(val_steps, val_losses, "o" + style, color=color, label=name)
    train_axes.set_title("training loss (faint: per step; line: EMA 0.9)")
    val_axes.set_title("validation loss")
    (first, (steps, train_a, val_steps, val_a)), (second, (steps_b, train_b, val_steps_b, val_b)) = curves.items()
    if steps == steps_b:
        diff_axes.plot(steps, [a - b for a, b in zip(train_a, train_b, strict=True)], color="tab:purple", label="training (EMA)")
    if val_steps == val_steps_b:
        diff_axes.plot(val_steps, [a - b for a, b in zip(val_a, val_b, strict=True)], "o-", color="tab:green", label="validation")
    diff_axes.axhline(0.0, color="black", linewidth=0.8)
    diff_axes.set_title(f"{first} minus {second}")
    for axes in (train_axes, val_axes, diff_axes):
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats/char)")
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(figure, path, title, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    commands = {optim: pretrain_command(args, optim, extra) for optim in args.optims}
    seconds: dict[str, float] = {}
    previous = args.out_dir / "summary.json"
    if args.plot_only:
        if previous.exists():  # keep the wall times of the runs being re-plotted
            seconds = {name: run.get("seconds") for name, run in json.loads(previous.read_text()).get("runs", {}).items()}
    else:
        for optim, command in commands.items():
            print(f"== {optim}: {' '.join(command)}", flush=True)
            started = time.perf_counter()
            env = dict(os.environ)
            if args.nproc > 1:  # torchrun's default (and its warning about it); pretrain.py sets its threads itself
                env.setdefault("OMP_NUM_THREADS", "1")
            result = subprocess.run(command, check=False, env=env)
            seconds[optim] = time.perf_counter() - started
            if result.returncode != 0:
                print(f"error: the {optim} run failed (exit code {result.returncode}); see its output above", file=sys.stderr)
                return 1

    runs: dict[str, dict[str, Any]] = {}
    for optim in args.optims:
        path = args.out_dir / optim / "metrics.json"
        if not path.exists():
            print(f"error: no metrics at {path}; run without --plot-only first", file=sys.stderr)
            return 1
        runs[optim] = json.loads(path.read_text())
    finals = {optim: summarise(metrics) for optim, metrics in runs.items()}
    first, second = args.optims
    relative = {
        key: (finals[first][key] - finals[second][key]) / finals[second][key] for key in ("final_val_loss", "final_train_loss")
    }
    # "ddp x2", or "fsdp x2 / fsdp x1" when the runs differ (e.g. a run resumed on another world size)
    setups = dict.fromkeys(f"{finals[optim]['strategy']} x{finals[optim]['world_size']}" for optim in args.optims)
    plot_path = args.out_dir / "loss.png"
    title = f"{first} vs {second}: {finals[first]['steps']} steps, {' / '.join(setups)}, same seed and data"
    plot(runs, plot_path, title)
    summary = {
        "optims": args.optims,
        "runs": {optim: {**finals[optim], "seconds": seconds.get(optim), "command": commands[optim]} for optim in args.optims},
        "relative_difference": relative,
        "relative_difference_means": f"({first} - {second}) / {second}",
        "plot": str(plot_path),
    }
    write_json_atomic(summary, args.out_dir / "summary.json")

    window = finals[first]["train_loss_window"]
    print(f"{'':12} {'val loss':>10} {f'train loss (last {window})':>24} {'state MiB/rank':>15} {'tokens/s':>10}")
    for optim in args.optims:
        final = finals[optim]
        state = final["state_bytes_per_rank"]
        tokens = final["tokens_per_s"]
        print(
            f"{optim:12} {final['final_val_loss']:10.4f} {final['final_train_loss']:24.4f} "
            f"{'n/a' if state is None else f'{state / 2**20:.2f}':>15} {'n/a' if tokens is None else f'{tokens:,.0f}':>10}"
        )
    print(
        f"relative difference ({first} vs {second}): val {relative['final_val_loss']:+.2%}, train {relative['final_train_loss']:+.2%} "
        f"| plot {plot_path} | summary {args.out_dir / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
