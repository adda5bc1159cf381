"""gpu-check step: the compensated bfloat16 step against the plain one (issue 16's speed bar).

Run as `python -m dist8bit.bench.gpu_check_compensated [--preset P] [--budget S]`.
Steps AdamW8bit on bfloat16 parameters and gradients of one of `bench optim`'s
presets with master_weights="none" (round to nearest, no buffer: the plain
bf16 8-bit step), then "compensated" with an int8 and with an int16 error
buffer. The three optimizers live in one process on one device and are timed
round-robin, so clock and load drift hit every mode alike; the bar compares
steps "in the same run". Prints one `GPU_CHECK_RESULT {json}` line: per mode
the median step in ms, its ratio to the plain step, and the error-buffer
bytes per parameter the optimizer holds (0, 1, 2: proof that the mode ran),
and whether each compensated ratio is within gpu_check_parse.COMPENSATED_BAR. Runs on the CPU
too (the CPU kernels implement the same step), with a small preset.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from .. import optim as d8
from ..optim.master_weights import ERROR_KEY
from .gpu_check_parse import COMPENSATED_BAR, RESULT_MARK
from .optim import PRESETS
from .timing import time_call

# Result name -> (master_weights, error_bits); "none" is the baseline every ratio divides by.
MODES = {"none": ("none", 8), "compensated-int8": ("compensated", 8), "compensated-int16": ("compensated", 16)}
BASELINE = "none"
ROUNDS = 3  # round-robin passes over the modes; each mode's time is the median of its rounds' medians


def make_optimizer(shapes: list[tuple[int, ...]], device: torch.device, mode: str, error_bits: int) -> torch.optim.Optimizer:
    """AdamW8bit over fresh bfloat16 parameters with gradients (the same values for every mode: seed 0)."""
    torch.manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device, dtype=torch.bfloat16))
        param.grad = torch.randn(shape, device=device, dtype=torch.bfloat16) * 1e-3
        params.append(param)
    return d8.AdamW8bit(params, lr=1e-3, master_weights=mode, error_bits=error_bits)


def error_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of error buffers (the `weight_error` state entries) per parameter element."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    errors = [optimizer.state[p][ERROR_KEY] for p in params if ERROR_KEY in optimizer.state[p]]
    return sum(e.numel() * e.element_size() for e in errors) / sum(p.numel() for p in params)


def measure(shapes: list[tuple[int, ...]], device: torch.device, budget_s: float) -> dict:
    """Median step ms per mode, ratios to the plain step and the bar (the GPU_CHECK_RESULT payload)."""
    optimizers = {name: make_optimizer(shapes, device, *MODES[name]) for name in MODES}
    per_call_s = budget_s / (ROUNDS * len(MODES))
    rounds: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(ROUNDS):
        for name, optimizer in optimizers.items():
            rounds[name].append(time_call(optimizer.step, device, min_repeats=5, budget_s=per_call_s).median_ms)
    ms = {name: statistics.median(samples) for name, samples in rounds.items()}
    ratio = {name: ms[name] / ms[BASELINE] for name in MODES if name != BASELINE}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "numel": sum(torch.Size(shape).numel() for shape in shapes),
        "ms": ms,
        "ratio": ratio,
        "error_bytes_per_param": {name: error_bytes_per_param(optimizer) for name, optimizer in optimizers.items()},
        "bar": COMPENSATED_BAR,
        "within_bar": {name: value <= COMPENSATED_BAR for name, value in ratio.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist8bit.bench.gpu_check_compensated", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt125m", help="parameter shapes to step")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing in all (every mode, every round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    result = {"preset": args.preset, **measure(PRESETS[args.preset](), torch.device(args.device), args.budget)}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
