"""Which encoding should the compensated-bf16 error buffer use? A measurement.

Every candidate stores bf16 weights plus (for the compensated ones) a per-element
record of what rounding dropped, and is fed the same AdamW directions as an
fp32 master for `--steps` steps with a cosine learning rate. Weights follow
GPT-2's scales: matrices N(0, 0.02), norm gains near 1, biases near 0, so one
block of 256 elements mixes magnitudes as real flat ZeRO partitions do.

Candidates (bytes per element beyond the bf16 weight):
    none                 0    round to nearest even
    stochastic           0    stochastic rounding
    bitdelta-int8        1    dist8bit's: the dropped low 16 bits of the float32, >> 8 (quant/weight_error.py)
    bitdelta-int16       2    the same, all 16 bits
    absmax-linear-int8   1+   x - p per block of 256 scaled by the block's absmax, 255 linear levels
    absmax-dynamic-int8  1+   the same with the signed dynamic map of the 8-bit states
    bf16-error           2    x - p stored as a bfloat16 (Collage's "two bf16 numbers")

Reported per candidate, relative to the RMS distance the master travelled
(0: the master's trajectory; 1: as far off as not training at all): the RMS
distance between the bf16 weights the model uses and the master (all weights,
and the norm gains alone), the same for the float32 value the next update
starts from (`restored`: what the error record buys), the fraction of weights
that differ from the master rounded to bf16 (0 is the best any bf16 storage
can do), and the share of the gains' mean drift kept. Writes a JSON summary
and a PNG of the restored error over the steps.

    python launch/weight_error_study.py --out docs/images/weight_error_study.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import dist8bit from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dist8bit.functional import create_dynamic_map
from dist8bit.quant.weight_error import compensated_values, weight_errors

BLOCK = 256


def initial_weights(numel: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, is_gain): 90% matrix entries N(0, 0.02), 5% norm gains near 1, 5% biases near 0, interleaved
    in runs of 64 like the parameters of a flat partition."""
    kind = torch.randint(0, 20, (numel // 64,), generator=generator).repeat_interleave(64)
    weights = torch.randn(numel, generator=generator) * 0.02
    gains = kind == 0
    weights[gains] = 1.0 + 0.05 * torch.randn(int(gains.sum()), generator=generator)
    weights[kind == 1] = 0.001 * torch.randn(int((kind == 1).sum()), generator=generator)
    return weights.bfloat16().float(), gains


class Storage:
    """A way to keep the weights: `read` gives the float32 the update starts from, `write` stores it."""

    def __init__(self, name: str, start: torch.Tensor, write: Callable[[Storage, torch.Tensor, int], None]):
        self.name = name
        self.weights = start.bfloat16()
        self.extra: torch.Tensor | None = None  # the error record, whatever form the candidate keeps
        self.restore: Callable[[Storage], torch.Tensor] = lambda s: s.weights.float()
        self._write = write

    def read(self) -> torch.Tensor:
        return self.restore(self)

    def write(self, x: torch.Tensor, step: int) -> None:
        self._write(self, x, step)


def _nearest(storage: Storage, x: torch.Tensor, step: int) -> None:
    storage.weights = x.bfloat16()


def _stochastic(storage: Storage, x: torch.Tensor, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int64)
    bits = (x.view(torch.int32).long() & 0xFFFFFFFF) + noise
    rounded = bits & 0xFFFF0000
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    storage.weights = rounded.bfloat16()


def _bit_delta(dtype: torch.dtype) -> tuple[Callable, Callable]:
    def write(storage: Storage, x: torch.Tensor, step: int) -> None:
        storage.weights = x.bfloat16()
        storage.extra = weight_errors(x, storage.weights, dtype)

    def restore(storage: Storage) -> torch.Tensor:
        if storage.extra is None:
            return storage.weights.float()
        return compensated_values(storage.weights, storage.extra)

    return write, restore


def _absmax(levels: torch.Tensor) -> tuple[Callable, Callable]:
    """x - p per block scaled by the block's absmax and coded to the nearest of `levels` (in [-1, 1])."""

    def write(storage: Storage, x: torch.Tensor, step: int) -> None:
        storage.weights = x.bfloat16()
        error = (x - storage.weights.float()).view(-1, BLOCK)
        scale = error.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
        codes = (error / scale).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
        storage.extra = (codes, scale)

    def restore(storage: Storage) -> torch.Tensor:
        if storage.extra is None:
            return storage.weights.float()
        codes, scale = storage.extra
        return storage.weights.float() + (levels[codes] * scale).view(-1)

    return write, restore


def _bf16_error(storage: Storage, x: torch.Tensor, step: int) -> None:
    storage.weights = x.bfloat16()
    storage.extra = (x - storage.weights.float()).bfloat16()


CANDIDATES = ("none", "stochastic", "bitdelta-int8", "bitdelta-int16", "absmax-linear-int8", "absmax-dynamic-int8", "bf16-error")
BYTES = {
    "none": 0.0,
    "stochastic": 0.0,
    "bitdelta-int8": 1.0,
    "bitdelta-int16": 2.0,
    "absmax-linear-int8": 1 + 4 / BLOCK,
    "absmax-dynamic-int8": 1 + 4 / BLOCK,
    "bf16-error": 2.0,
}


def storage_for(name: str, start: torch.Tensor) -> Storage:
    if name == "none":
        return Storage(name, start, _nearest)
    if name == "stochastic":
        return Storage(name, start, _stochastic)
    if name == "bf16-error":
        storage = Storage(name, start, _bf16_error)
        storage.restore = lambda s: s.weights.float() + (0 if s.extra is None else s.extra.float())
        return storage
    if name.startswith("bitdelta"):
        write, restore = _bit_delta(torch.int8 if name.endswith("int8") else torch.int16)
    else:
        levels = torch.linspace(-1, 1, 255) if "linear" in name else create_dynamic_map(signed=True)
        write, restore = _absmax(levels)
    storage = Storage(name, start, write)
    storage.restore = restore
    return storage


def run(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    start, gains = initial_weights(args.numel, generator)
    drift = torch.randn(args.numel, generator=generator) * 0.3  # a consistent direction per element
    master = start.clone()
    storages = [storage_for(name, start) for name in CANDIDATES]
    m, v = torch.zeros(args.numel), torch.zeros(args.numel)
    beta1, beta2, eps = 0.9, 0.95, 1e-8
    curves: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    checkpoints = []
    for step in range(1, args.steps + 1):
        lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * (step - 1) / args.steps))
        grad = drift + torch.randn(args.numel, generator=generator)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        direction = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
        decay = 1 - lr * args.weight_decay
        master = master * decay - lr * direction
        for storage in storages:
            storage.write(storage.read() * decay - lr * direction, step)
        if step % max(1, args.steps // 50) == 0 or step == args.steps:
            travelled = (master - start).pow(2).mean().sqrt()
            for storage in storages:
                curves[storage.name].append(float((storage.read() - master).pow(2).mean().sqrt() / travelled))
            checkpoints.append(step)
    travelled_gains = (master - start)[gains]
    summary = {}
    for storage in storages:
        used = storage.weights.float()
        summary[storage.name] = {
            "extra_bytes_per_param": BYTES[storage.name],
            "relative_rms_error": float((used - master).pow(2).mean().sqrt() / (master - start).pow(2).mean().sqrt()),
            "restored_rms_error": float((storage.read() - master).pow(2).mean().sqrt() / (master - start).pow(2).mean().sqrt()),
            "weights_off_rounded_master": float((storage.weights != master.bfloat16()).float().mean()),
            "relative_rms_error_gains": float((used - master)[gains].pow(2).mean().sqrt() / travelled_gains.pow(2).mean().sqrt()),
            "drift_kept_gains": float((used - start)[gains].mean() / travelled_gains.mean()),
        }
    return {"steps": checkpoints, "curves": curves, "summary": summary, "settings": vars(args) | {"out": str(args.out)}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, curve in result["curves"].items():
        axes.plot(result["steps"], curve, label=f"{name} (+{BYTES[name]:.2f} B/param)")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("RMS(restored - fp32 master) / RMS(master travelled)")
    axes.set_title("bf16 weights against an fp32 master, same AdamW directions")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--min-lr", type=float, default=6e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/weight_error_study.png"))
    args = parser.parse_args()
    result = run(args)
    plot(result, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(
        f"{'candidate':22} {'+B/param':>8} {'weights':>9} {'gains':>9} {'restored':>9} {'off round(master)':>18} "
        f"{'gain drift kept':>16}"
    )
    for name, row in result["summary"].items():
        print(
            f"{name:22} {row['extra_bytes_per_param']:8.3f} {row['relative_rms_error']:9.2e} "
            f"{row['relative_rms_error_gains']:9.2e} {row['restored_rms_error']:9.2e} "
            f"{row['weights_off_rounded_master']:18.4f} {row['drift_kept_gains']:16.3f}"
        )
    print(f"plot {args.out} | summary {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
