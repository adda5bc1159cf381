"""Which 4-bit normalization for Adam's second moment? Train the launcher's GPT with emulated 4-bit states and compare.

    python launch/quantization_study.py                                   # every variant, seed 1337, 400 steps
    python launch/quantization_study.py --variants fp32,b128 --seeds 1337,1338
    python launch/quantization_study.py --plot-only                       # re-plot the runs already in OUT_DIR

Each variant is AdamW in plain PyTorch (the kernels' formulas, dist8bit.optim.AdamW)
whose first and second moments are quantized and dequantized after every step
with one scheme each, so a scheme's quality can be measured before any kernel
implements it. The update itself uses the float32 moments of the step, as the
fused kernels do; only what is stored between steps is rounded. Parameters
smaller than --min-size elements keep float32 state (min_8bit_size).

The runs are pretrain.py's own (launch.pretrain.main in this process, one after
another, --no-checkpoint), written as OUT_DIR/<variant>/seed-<seed>/metrics.json,
and summarised and plotted by launch/compare.py's report. Runs that already
reached --steps are not repeated, so a stopped study continues where it was. The result and the
decision: docs/four_bit.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dist8bit.functional import create_dynamic_map_4bit, create_linear_map_4bit, dequantize_blockwise, quantize_blockwise
from dist8bit.quant.codebook import midpoint_thresholds, nearest_code_index
from dist8bit.quant.packing import code_bytes
from launch import compare, pretrain
from launch.optimizers import register_optimizer

# ------------------------------------------------------------------ schemes


class Scheme:
    """How one state tensor is stored between steps: `roundtrip` is what survives a step, `nbytes` what it costs."""

    name: str

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, shape: torch.Size) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class Float32(Scheme):
    name: str = "fp32"

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def nbytes(self, shape: torch.Size) -> int:
        return 4 * math.prod(shape)


@dataclass(frozen=True)
class Blockwise(Scheme):
    """dist8bit's block-wise quantizer: one float32 absmax per `blocksize` elements, a 16-value map."""

    code: torch.Tensor
    blocksize: int
    name: str

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        codes, state = quantize_blockwise(x, code=self.code, blocksize=self.blocksize)
        return dequantize_blockwise(codes, state)

    def nbytes(self, shape: torch.Size) -> int:
        numel = math.prod(shape)
        return code_bytes(numel, 4) + 4 * math.ceil(numel / self.blocksize)


@dataclass(frozen=True)
class RankOne(Scheme):
    """Li, Chen, Zhu (2023)'s rank-1 normalization for a non-negative matrix: element (i, j) is scaled by
    min(max of row i, max of column j), then rounded to the nearest value of `code` (dist8bit's rounding
    rule); tensors that are not matrices fall back to `vectors`. Costs (rows + columns) float32 scales."""

    code: torch.Tensor
    vectors: Scheme
    name: str

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.vectors.roundtrip(x)
        scale = torch.minimum(x.amax(dim=1, keepdim=True), x.amax(dim=0, keepdim=True))
        normalized = torch.nan_to_num(x * scale.reciprocal(), nan=0.0)  # an all-zero row or column: 0 * inf
        index = nearest_code_index(normalized, midpoint_thresholds(self.code))
        return self.code[index] * scale

    def nbytes(self, shape: torch.Size) -> int:
        if len(shape) != 2:
            return self.vectors.nbytes(shape)
        return code_bytes(math.prod(shape), 4) + 4 * (shape[0] + shape[1])


def schemes() -> dict[str, tuple[Scheme, Scheme]]:
    """variant -> (first-moment scheme, second-moment scheme); the last one is the baseline."""
    signed_de = Blockwise(create_dynamic_map_4bit(True), 128, "B128 DE")
    linear = create_linear_map_4bit()
    b128_linear = Blockwise(linear, 128, "B128 linear (no zero)")
    return {
        "b128-linear": (signed_de, b128_linear),
        "rank1-linear": (signed_de, RankOne(linear, b128_linear, "rank-1 linear (no zero)")),
        "b2048-linear": (signed_de, Blockwise(linear, 2048, "B2048 linear (no zero)")),
        "b128-de-zero": (signed_de, Blockwise(create_dynamic_map_4bit(False), 128, "B128 unsigned DE (with zero)")),
        "fp32": (Float32(), Float32()),  # last: the baseline of the comparison
    }


# --------------------------------------------------------------- optimizer


class EmulatedAdamW(torch.optim.Optimizer):
    """AdamW with the fused kernels' arithmetic and quantize-dequantized moments (a study tool, not a product).

    Per element at step t: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2, p <- p (1 - lr wd)
    - lr (m / (sqrt(v) / sqrt(bc2) + eps)) / bc1; then m <- first(m), v <- second(v) for the next step.
    """

    def __init__(self, params: Iterable, first: Scheme, second: Scheme, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_size: int = 4096) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.first, self.second, self.min_size = first, second, min_size

    def schemes_for(self, param: torch.Tensor) -> tuple[Scheme, Scheme]:
        return (self.first, self.second) if param.numel() >= self.min_size else (Float32(), Float32())

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        assert closure is None, "the launcher passes no closure"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                state["step"] += 1
                t, m, v, grad = state["step"], state["exp_avg"], state["exp_avg_sq"], param.grad
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = v.sqrt().mul_(1 / math.sqrt(1 - beta2**t)).add_(group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
                first, second = self.schemes_for(param)
                state["exp_avg"], state["exp_avg_sq"] = first.roundtrip(m), second.roundtrip(v)

    def state_bytes(self) -> int:
        """What the states would take stored as their schemes say (the launcher shows this per rank)."""
        total = 0
        for param in self.state:
            first, second = self.schemes_for(param)
            total += first.nbytes(param.shape) + second.nbytes(param.shape)
        return total


# -------------------------------------------------------------------- runs


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Emulated 4-bit AdamW state schemes on the launcher's GPT; extra arguments go to pretrain.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variants", default=",".join(schemes()), help="comma-separated, of: " + ", ".join(schemes()))
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds; every variant runs each")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--min-size", type=int, default=4096, help="smaller parameters keep float32 state")
    parser.add_argument("--out-dir", type=Path, default=Path("results/quantization-study"))
    parser.add_argument("--plot-only", action="store_true", help="do not train; summarise and plot the runs in OUT_DIR")
    args, extra = parser.parse_known_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in args.variants if name not in schemes()]
    if unknown or not args.variants:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(schemes())}")
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    return args, [a for a in extra if a != "--"]


def optim_name(variant: str) -> str:
    return f"emulated-{variant}"


def register_variants(min_size: int) -> None:
    """Make every variant a pretrain.py --optim (AdamW's launcher lr and weight decay)."""
    for variant, (first, second) in schemes().items():
        constructor = functools.partial(EmulatedAdamW, first=first, second=second, min_size=min_size)
        register_optimizer(optim_name(variant), constructor, lr=2e-3, weight_decay=0.1, replace=True)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    register_variants(args.min_size)
    layout = compare.RunLayout(args.out_dir, args.variants, args.seeds, per_seed=True)
    commands = {}
    for variant in args.variants:
        for seed in args.seeds:
            run_args = ["--optim", optim_name(variant), "--steps", str(args.steps), "--seed", str(seed)]
            run_args += ["--out-dir", str(layout.run_dir(variant, seed)), "--no-checkpoint", "--no-progress", *extra]
            commands[variant, seed] = ["launch/pretrain.py", *run_args]
            if args.plot_only or compare.finished(layout.run_dir(variant, seed), args.steps):
                continue
            print(f"== {variant} seed {seed}: {' '.join(commands[variant, seed])}", flush=True)
            if pretrain.main(run_args) != 0:
                return 1
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"mean of seeds {', '.join(map(str, args.seeds))}"
    variants = "; ".join(
        f"{v}: m {first.name}, v {second.name}" for v, (first, second) in schemes().items() if v in args.variants
    )
    title = f"emulated 4-bit AdamW states, {args.steps} steps, 1 process, {seeds}\n{variants}"
    return compare.report(layout, commands, {}, title=title)


if __name__ == "__main__":
    sys.exit(main())
