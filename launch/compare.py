"""Train the same model with several optimizers or master-weight modes (same seeds, data and steps), and compare the loss curves.

    python launch/compare.py --nproc 2 --steps 400                       # adamw8bit vs adamw32bit
    python launch/compare.py --nproc 1 --optims adamw4bit,adamw8bit,adamw32bit --seeds 1337,1338,1339
    python launch/compare.py --nproc 1 --master-weights compensated,stochastic,none,fp32 --seeds 1337,1338,1339
    python launch/compare.py --nproc 2 --strategy fsdp --out-dir results/compare-fsdp
    python launch/compare.py --nproc 2 --strategy deepspeed -- --deepspeed_config launch/configs/zero2_adamw8bit.json
    python launch/compare.py --nproc 1 --steps 100 -- --n-layer 2     # after --: passed on to pretrain.py

Under --strategy deepspeed each run's --optim replaces the config's optimizer
type (its params, scheduler and ZeRO settings stay), so both runs differ only
in the optimizer's precision. Every optimizer is compared with the last one
of --optims (the baseline).

With --master-weights the runs are one optimizer (--optims, default
adamw8bit) with --dtype bf16 and each mode, named <optim>-<mode> (e.g.
adamw8bit-compensated); the fp32-master run is the baseline when it is
among them (else the last mode). Each run's state bytes per parameter
(error buffers included) are in the table and summary.json.

Writes OUT_DIR/<name>/ per run (OUT_DIR/<name>/seed-<seed>/ with several
--seeds), OUT_DIR/loss.png (train and validation curves, averaged over the
seeds) and OUT_DIR/summary.json, and prints the final losses (mean and spread
over the seeds) with their relative difference from the baseline. --plot-only
redraws from existing runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python launch/compare.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist8bit.bench.report import save_figure
from dist8bit.optim.master_weights import MODES as MASTER_MODES
from launch.atomic import write_json_atomic

PRETRAIN = Path(__file__).resolve().with_name("pretrain.py")
DEFAULT_OPTIMS = "adamw8bit,adamw32bit"
DEFAULT_MASTER_OPTIM = "adamw8bit"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Compare optimizers on the same pretraining runs; extra arguments go to pretrain.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun --standalone when > 1)")
    parser.add_argument(
        "--strategy",
        choices=("auto", "none", "ddp", "fsdp", "deepspeed"),
        default="auto",
        help="pretrain.py's --strategy for every run (auto: ddp with --nproc > 1, else none)",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1337, help="the seed of every run (unless --seeds)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: every optimizer runs each, results are averaged")
    parser.add_argument(
        "--optims",
        default=None,
        help="comma-separated --optim values (two or more; the last is the baseline; default adamw8bit,adamw32bit), "
        "or one with --master-weights (default adamw8bit)",
    )
    parser.add_argument(
        "--master-weights",
        default=None,
        help="comma-separated modes (two or more of fp32,none,stochastic,compensated): one --dtype bf16 run per mode "
        "instead of one per optimizer; fp32 is the baseline",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results/compare"))
    parser.add_argument("--plot-only", action="store_true", help="do not train; plot and summarise the runs already in OUT_DIR")
    parser.add_argument(
        "--skip-finished",
        action="store_true",
        help="keep runs whose metrics.json already reached --steps (continue a comparison)",
    )
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    try:
        args.variants, args.baseline = variants(args.optims, args.master_weights)
    except ValueError as error:
        parser.error(str(error))
    args.seeds = [args.seed] if args.seeds is None else [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds takes one or more distinct seeds, got {args.seeds}")
    if args.nproc < 1 or args.steps < 1:
        parser.error("--nproc and --steps must be >= 1")
    return args, extra


def split(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def variants(optims: str | None, master_weights: str | None) -> tuple[dict[str, list[str]], str]:
    """The runs to compare, name -> the pretrain.py flags that make them, and the baseline's name: one run per
    optimizer (the last is the baseline), or with master_weights one bf16 run of one optimizer per mode (the
    fp32-master run is the baseline when present, else the last)."""
    if master_weights is None:
        names = split(optims or DEFAULT_OPTIMS)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"--optims takes two or more distinct names, got {names}")
        return {name: ["--optim", name] for name in names}, names[-1]
    names, modes = split(optims or DEFAULT_MASTER_OPTIM), split(master_weights)
    if len(names) != 1:
        raise ValueError(f"--master-weights compares the modes of one optimizer; --optims must name one, got {names}")
    if len(modes) < 2 or len(set(modes)) != len(modes) or not set(modes) <= set(MASTER_MODES):
        raise ValueError(f"--master-weights takes two or more distinct modes of {', '.join(MASTER_MODES)}, got {modes}")
    runs = {f"{names[0]}-{mode}": ["--optim", names[0], "--dtype", "bf16", "--master-weights", mode] for mode in modes}
    return runs, f"{names[0]}-{'fp32' if 'fp32' in modes else modes[-1]}"


@dataclass(frozen=True)
class RunLayout:
    """Where each (run name, seed) run lives: OUT_DIR/<name>, or OUT_DIR/<name>/seed-<seed> when there are
    several seeds (or `per_seed`), so that one-seed comparisons keep the directories they always had.
    The baseline is `baseline_name`, or the last name."""

    out_dir: Path
    optims: list[str]  # the run names (optimizers, or <optim>-<mode> with --master-weights)
    seeds: list[int]
    per_seed: bool = False
    baseline_name: str | None = None

    def run_dir(self, optim: str, seed: int) -> Path:
        if len(self.seeds) == 1 and not self.per_seed:
            return self.out_dir / optim
        return self.out_dir / optim / f"seed-{seed}"

    @property
    def baseline(self) -> str:
        return self.baseline_name or self.optims[-1]


def layout_for(args: argparse.Namespace) -> RunLayout:
    return RunLayout(args.out_dir, list(args.variants), args.seeds, baseline_name=args.baseline)


def pretrain_command(args: argparse.Namespace, name: str, extra: list[str], seed: int | None = None) -> list[str]:
    """The command that trains run `name` (a key of args.variants) with `seed`."""
    seed = args.seeds[0] if seed is None else seed
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    run_args = ["--strategy", args.strategy, *args.variants[name], "--steps", str(args.steps), "--seed", str(seed)]
    run_args += ["--out-dir", str(layout_for(args).run_dir(name, seed))]
    return [*launcher, str(PRETRAIN), *run_args, *extra]


def finished(run_dir: Path, steps: int) -> bool:
    """A run that already reached `steps`: its metrics.json has a summary (written at the end of a run)."""
    path = run_dir / "metrics.json"
    return path.exists() and json.loads(path.read_text()).get("summary", {}).get("steps") == steps


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
    """One run's final numbers."""
    train = [e["loss"] for e in metrics["train"]]
    summary = metrics.get("summary", {})
    return {
        "final_val_loss": metrics["val"][-1]["loss"],
        "final_train_loss": tail_mean(train),
        "train_loss_window": max(1, round(len(train) * 0.1)),
        "steps": metrics["train"][-1]["step"],
        "state_bytes_per_rank": summary.get("state_bytes"),
        "state_bytes_per_param": summary.get("state_bytes_per_param"),  # error buffers included
        "dtype": metrics.get("dtype", "fp32"),  # metrics from before --dtype were fp32 runs
        "master_weights": metrics.get("master_weights", "fp32"),
        "error_bits": metrics.get("error_bits"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "world_size": metrics.get("world_size"),
        "strategy": metrics.get("strategy"),
        "parameters": metrics.get("parameters"),
    }


LOSSES = ("final_val_loss", "final_train_loss")


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One optimizer over its seeds: the mean of each loss with its sample standard deviation (0 for one seed)
    and range; the rest (state bytes, strategy, ...) from the first seed, tokens/s averaged."""
    runs = list(per_seed.values())
    result = {key: value for key, value in runs[0].items() if key not in LOSSES}
    for key in LOSSES:
        values = [run[key] for run in runs]
        result[key] = statistics.fmean(values)
        result[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        result[f"{key}_range"] = [min(values), max(values)]
    speeds = [run["tokens_per_s"] for run in runs if run["tokens_per_s"] is not None]
    result["tokens_per_s"] = statistics.fmean(speeds) if speeds else None
    result["seeds"] = per_seed
    return result


def mean_curve(curves: list[list[dict[str, float]]]) -> tuple[list[int], list[float]]:
    """Steps and the per-step mean loss over the seeds (the steps all runs share)."""
    steps = sorted(set.intersection(*({e["step"] for e in curve} for curve in curves)))
    by_step = [{e["step"]: e["loss"] for e in curve} for curve in curves]
    return steps, [statistics.fmean(run[step] for run in by_step) for step in steps]


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, title: str, baseline: str) -> None:
    """Three panels: training loss (raw, faint, and EMA), validation loss, and each run minus the baseline;
    with several seeds every curve is the mean over them."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("compare.py plots with matplotlib: pip install matplotlib (or pip install -e '.[train]')") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (train_axes, val_axes, diff_axes) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = {}
    for index, (name, seeds) in enumerate(runs.items()):
        color, style = colors[index % len(colors)], ("-", "--", "-.", ":")[index % 4]
        steps, train = mean_curve([metrics["train"] for metrics in seeds])
        val_steps, val = mean_curve([metrics["val"] for metrics in seeds])
        curves[name] = (steps, ema(train), val_steps, val)
        summary = seeds[0].get("summary", {})
        state = f"state {(summary.get('state_bytes') or 0) / 2**20:.2f} MiB/rank"
        if summary.get("state_bytes_per_param") is not None:
            state += f", {summary['state_bytes_per_param']:.2f} B/param"
        train_axes.plot(steps, train, color=color, alpha=0.15, linewidth=0.8)
        train_axes.plot(steps, curves[name][1], style, color=color, label=f"{name} ({state})")
        val_axes.plot(val_steps, val, "o" + style, color=color, label=name)
    seeds_note = f", mean of {len(next(iter(runs.values())))} seeds" if len(next(iter(runs.values()))) > 1 else ""
    train_axes.set_title(f"training loss (faint: per step; line: EMA 0.9{seeds_note})")
    val_axes.set_title(f"validation loss{seeds_note}")
    base_steps, base_train, base_val_steps, base_val = curves[baseline]
    for index, (name, (steps, train, val_steps, val)) in enumerate(curves.items()):
        if name == baseline:
            continue
        color = colors[index % len(colors)]
        if steps == base_steps:
            diff_axes.plot(steps, [a - b for a, b in zip(train, base_train, strict=True)], color=color, alpha=0.6)
        if val_steps == base_val_steps:
            diff = [a - b for a, b in zip(val, base_val, strict=True)]
            diff_axes.plot(val_steps, diff, "o-", color=color, label=f"{name} (line: training EMA, dots: validation)")
    diff_axes.axhline(0.0, color="black", linewidth=0.8)
    diff_axes.set_title(f"minus {baseline}")
    for axes in (train_axes, val_axes, diff_axes):
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats/char)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    save_figure(figure, path, title, dpi=110)


def report(layout: RunLayout, commands: dict[tuple[str, int], list[str]], seconds: dict[tuple[str, int], float],
           title: str | None = None) -> int:  # fmt: skip
    """Read every run's metrics.json, write OUT_DIR/summary.json and OUT_DIR/loss.png, print the table."""
    previous = layout.out_dir / "summary.json"
    if not seconds and previous.exists():  # keep the wall times of the runs being re-plotted
        old = json.loads(previous.read_text()).get("runs", {})
        seconds = {(optim, int(seed)): run.get("seconds") for optim in old for seed, run in old[optim].get("seeds", {}).items()}
    runs: dict[str, list[dict[str, Any]]] = {}
    for optim in layout.optims:
        runs[optim] = []
        for seed in layout.seeds:
            path = layout.run_dir(optim, seed) / "metrics.json"
            if not path.exists():
                print(f"error: no metrics at {path}; run without --plot-only first", file=sys.stderr)
                return 1
            runs[optim].append(json.loads(path.read_text()))
    finals = {
        optim: aggregate(
            {
                seed: {**summarise(metrics), "seconds": seconds.get((optim, seed)), "command": commands.get((optim, seed))}
                for seed, metrics in zip(layout.seeds, runs[optim], strict=True)
            }
        )
        for optim in layout.optims
    }
    base = finals[layout.baseline]
    relative = {
        optim: {key: (finals[optim][key] - base[key]) / base[key] for key in LOSSES}
        for optim in layout.optims
        if optim != layout.baseline
    }
    # "ddp x2", or "fsdp x2 / fsdp x1" when the runs differ (e.g. a run resumed on another world size)
    setups = dict.fromkeys(f"{finals[optim]['strategy']} x{finals[optim]['world_size']}" for optim in layout.optims)
    seeds = f"seed {layout.seeds[0]}" if len(layout.seeds) == 1 else f"{len(layout.seeds)} seeds"
    plot_path = layout.out_dir / "loss.png"
    title = title or f"{' vs '.join(layout.optims)}: {base['steps']} steps, {' / '.join(setups)}, same data, {seeds}"
    plot(runs, plot_path, title, layout.baseline)
    summary = {
        "optims": layout.optims,
        "seeds": layout.seeds,
        "baseline": layout.baseline,
        "runs": finals,
        "relative_difference": relative,
        "relative_difference_means": f"(mean of optim - mean of {layout.baseline}) / mean of {layout.baseline}",
        "plot": str(plot_path),
    }
    write_json_atomic(summary, layout.out_dir / "summary.json")

    window = base["train_loss_window"]
    spread = len(layout.seeds) > 1
    width = max(12, *(len(optim) for optim in layout.optims))
    val_header = "val loss ± std" if spread else "val loss"
    print(
        f"{'':{width}} {val_header:>{19 if spread else 10}} {f'train loss (last {window})':>24} {'state MiB/rank':>15} "
        f"{'state B/param':>14} {'tokens/s':>10} {'vs ' + layout.baseline:>20}"
    )
    for optim in layout.optims:
        final, state, tokens = finals[optim], finals[optim]["state_bytes_per_rank"], finals[optim]["tokens_per_s"]
        per_param = final["state_bytes_per_param"]
        std = f" ± {final['final_val_loss_std']:.4f}" if spread else ""
        versus = "baseline" if optim == layout.baseline else f"val {relative[optim]['final_val_loss']:+.2%}"
        print(
            f"{optim:{width}} {final['final_val_loss']:10.4f}{std} {final['final_train_loss']:24.4f} "
            f"{'n/a' if state is None else f'{state / 2**20:.2f}':>15} {'n/a' if per_param is None else f'{per_param:.3f}':>14} "
            f"{'n/a' if tokens is None else f'{tokens:,.0f}':>10} {versus:>20}"
        )
    print(f"seeds {layout.seeds} | plot {plot_path} | summary {layout.out_dir / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    layout = layout_for(args)
    commands = {(name, seed): pretrain_command(args, name, extra, seed) for name in layout.optims for seed in args.seeds}
    seconds: dict[tuple[str, int], float] = {}
    if not args.plot_only:
        for (optim, seed), command in commands.items():
            if args.skip_finished and finished(layout.run_dir(optim, seed), args.steps):
                print(f"== {optim} seed {seed}: already finished in {layout.run_dir(optim, seed)}", flush=True)
                continue
            print(f"== {optim} seed {seed}: {' '.join(command)}", flush=True)
            started = time.perf_counter()
            env = dict(os.environ)
            if args.nproc > 1:  # torchrun's default (and its warning about it); pretrain.py sets its threads itself
                env.setdefault("OMP_NUM_THREADS", "1")
            result = subprocess.run(command, check=False, env=env)
            seconds[optim, seed] = time.perf_counter() - started
            if result.returncode != 0:
                print(f"error: the {optim} run (seed {seed}) failed (exit code {result.returncode}); see above", file=sys.stderr)
                return 1
    return report(layout, commands, seconds)


if __name__ == "__main__":
    sys.exit(main())
