"""estimate_quantiles against torch.quantile and an exact full sort."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from .. import functional as F
from ..quant.quantiles import quantile_levels
from .report import format_table, machine_description, write_json
from .timing import time_call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log2-numel", type=int, default=24)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))


def _exact_by_sort(A: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    ordered = torch.sort(A).values
    position = levels * (A.numel() - 1)
    below = position.floor().long()
    above = (below + 1).clamp(max=A.numel() - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below).float()


def _bench_device(device: torch.device, numel: int, budget: float) -> list[dict]:
    torch.manual_seed(0)
    A = torch.randn(numel, device=device)
    levels = quantile_levels(256, 1 / 512, device)
    exact = _exact_by_sort(A, levels)
    candidates = {
        "dist8bit.estimate_quantiles": lambda: F.estimate_quantiles(A),
        "full sort": lambda: _exact_by_sort(A, levels),
    }
    if numel <= 1 << 24:  # torch.quantile refuses larger inputs
        candidates["torch.quantile"] = lambda: torch.quantile(A, levels.float())
    rows = []
    for name, fn in candidates.items():
        timing = time_call(fn, device, min_repeats=3, budget_s=budget)
        error = float((fn().double() - exact.double()).abs()[8:-8].max())
        rows.append({"impl": name, "device": device.type, "ms": timing.median_ms, "max_abs_err_inner": error})
    return rows


def run(args: argparse.Namespace) -> dict:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    numel = 1 << args.log2_numel
    rows = []
    for device in tqdm(devices, desc="quantile bench", unit="device"):
        rows += _bench_device(device, numel, args.budget)
    result = {"benchmark": "quantiles", "numel": numel, "machine": machine_description(), "rows": rows}
    write_json(args.out / "quantiles.json", result)
    print(f"\n256 quantiles of randn(2^{args.log2_numel}); error vs exact, quantiles 8..247")
    print(format_table(rows, ["impl", "device", "ms", "max_abs_err_inner"]))
    return result
