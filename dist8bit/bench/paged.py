"""Paged optimizer states: step time when everything fits, and with part of the states evicted.

Rows:
    unpaged          the ordinary optimizer (ordinary device memory)
    paged, resident  the Paged* optimizer with every state on the GPU: the overhead bar is <= 5%
    paged, f evicted the coldest fraction f of the paged bytes moved to host memory (by a budget of
                     1 - f, lifted again before timing) and updated there in place
For evicted rows, `bus_MB` is the nominal traffic over the host link per step: every
evicted state byte is read and written once (2 x evicted bytes), and `bus_GB/s` is
that traffic over the time the step gained against the resident row. `pinned_GB/s`
is a plain pinned host-to-device copy, the link's practical ceiling.

Without a GPU that can page (no CUDA, or no concurrent managed access) it says so,
times the fallback (paged classes on ordinary memory) against the unpaged ones, and
exits normally.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .. import optim as d8
from .. import paging
from .optim import PRESETS
from .report import format_table, machine_description, pyplot, save_figure, write_json
from .timing import time_call

OPTIMIZERS = {
    "AdamW8bit": (d8.AdamW8bit, d8.PagedAdamW8bit),
    "AdamW32bit": (d8.AdamW32bit, d8.PagedAdamW32bit),
    "Lion8bit": (d8.Lion8bit, d8.PagedLion8bit),
    "AdEMAMix8bit": (d8.AdEMAMix8bit, d8.PagedAdEMAMix8bit),
}
OVERHEAD_BAR = 0.05
SAFE_FRACTION = 0.5  # of free GPU memory the benchmark may use in all (parameters, gradients, states)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt125m", help="parameter shapes to step")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="AdamW8bit")
    parser.add_argument("--evict", default="0.25,0.5,1.0", help="comma-separated fractions of paged bytes to evict")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))


def _fractions(text: str) -> list[float]:
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError as error:
        raise SystemExit(f"--evict must be comma-separated fractions in (0, 1], got {text!r}") from error
    if not all(0.0 < f <= 1.0 for f in fractions):
        raise SystemExit(f"--evict must be comma-separated fractions in (0, 1], got {text!r}")
    return fractions


def _pinned_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    timing = time_call(lambda: target.copy_(host, non_blocking=True), device, min_repeats=10, budget_s=1.0)
    return nbytes / (timing.median_ms * 1e-3) / 1e9


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def _interleaved_medians_ms(fns: list[Callable[[], object]], device: torch.device, budget_s: float) -> list[float]:
    """Median time of each function, calling them in turn (after one warm-up call each)."""
    for fn in fns:
        _once_ms(fn, device)
    samples: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    while len(samples[0]) < 5 or (time.perf_counter() - started < budget_s * len(fns) and len(samples[0]) < 200):
        for fn, times in zip(fns, samples, strict=True):
            times.append(_once_ms(fn, device))
    return [statistics.median(times) for times in samples]


def _paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    where = paging.residency(optimizer)
    return where.device_bytes + where.host_bytes


def _parameters(preset: str, device: torch.device) -> list[torch.nn.Parameter]:
    """The preset's shapes as parameters with gradients; refuses a preset the GPU cannot hold safely."""
    shapes = PRESETS[preset]()
    numel = sum(torch.Size(s).numel() for s in shapes)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        # parameters + gradients (fp32) + two optimizers' fp32 states (the 32-bit worst case: two per parameter)
        if numel * 24 > SAFE_FRACTION * free:
            raise SystemExit(
                f"paged bench: {preset} needs about {numel * 24 / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free; "
                "pick a smaller --preset (the benchmark never oversubscribes the GPU)"
            )
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _resident_rows(plain: torch.optim.Optimizer, paged: torch.optim.Optimizer, device, budget_s: float, reason) -> list[dict]:
    """The unpaged and the all-resident paged step, interleaved so that drift in the machine's
    speed hits both alike (the overhead bar is 5%)."""
    unpaged_ms, resident_ms = _interleaved_medians_ms([plain.step, paged.step], device, budget_s)
    label = "paged, resident" if reason is None else "paged (fallback: ordinary memory)"
    return [
        {"config": "unpaged", "ms": unpaged_ms},
        {"config": label, "ms": resident_ms, "overhead": resident_ms / unpaged_ms - 1.0},
    ]


def _evicted_row(paged: torch.optim.Optimizer, fraction: float, rows: list[dict], device, budget_s: float) -> dict:
    """The step with the coldest `fraction` of the paged bytes in host memory."""
    unpaged_ms, resident_ms = rows[0]["ms"], rows[1]["ms"]
    paging.set_budget(int(_paged_bytes(paged) * (1.0 - fraction)))
    paged.step()  # the policy evicts before this step
    # Lifted again: without limits evicted states stay put, so the timing shows the
    # cost of host-resident states alone, not that of the policy pass.
    paging.set_budget(None)
    torch.cuda.synchronize(device)
    where = paging.residency(paged)
    ms = time_call(paged.step, device, min_repeats=5, budget_s=budget_s).median_ms
    bus = 2 * where.host_bytes
    extra_s = (ms - resident_ms) * 1e-3
    paging.prefetch_all(paged)
    return {
        "config": f"paged, {fraction:.0%} evicted",
        "ms": ms,
        "overhead": ms / unpaged_ms - 1.0,
        "host_MB": where.host_bytes / 1e6,
        "bus_MB": bus / 1e6,
        "bus_GB/s": bus / extra_s / 1e9 if extra_s > 0 else None,
    }


def run(args: argparse.Namespace) -> dict:
    fractions = _fractions(args.evict)
    plain_cls, paged_cls = OPTIMIZERS[args.optimizer]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = paging.get_manager().backend.unavailable_reason(device)
    if reason is not None:
        print(f"paged bench: paged states cannot be measured here ({reason}).")
        print("Timing the fallback instead: Paged* classes on ordinary memory against the unpaged classes.")
        fractions = []
    params = _parameters(args.preset, device)
    pinned = _pinned_bandwidth_gbs(device) if reason is None else None
    steps = tqdm(total=1 + len(fractions), desc="paged bench", unit="row")
    paged = paged_cls(params, lr=1e-3)
    rows = _resident_rows(plain_cls(params, lr=1e-3), paged, device, args.budget, reason)
    gc.collect()  # the unpaged optimizer's states
    steps.update()
    try:
        for fraction in fractions:
            rows.append(_evicted_row(paged, fraction, rows, device, args.budget))
            steps.update()
    finally:
        paging.set_budget(None)
        steps.close()
    result = {
        "benchmark": "paged",
        "preset": args.preset,
        "optimizer": args.optimizer,
        "numel": sum(p.numel() for p in params),
        "device": device.type,
        "paging": "unavailable: " + reason if reason else "managed memory",
        "paged_bytes": _paged_bytes(paged),
        "pinned_h2d_GBps": pinned,
        "overhead_bar": OVERHEAD_BAR,
        "machine": machine_description(),
        "rows": rows,
    }
    _report(result, args.out, reason)
    return result


def _report(result: dict, out: Path, reason: str | None) -> None:
    """The JSON, the plot (when paging was measured) and the printed table with the verdict."""
    rows, name, numel = result["rows"], f"paged-{result['preset']}-{result['optimizer']}", result["numel"]
    write_json(out / f"{name}.json", result)
    if reason is None:
        _plot(rows, out / f"{name}.png", f"{result['optimizer']}, {result['preset']} ({numel / 1e6:.0f}M params)")
    pinned = result["pinned_h2d_GBps"]
    print(
        f"\n{result['optimizer']} step, {numel / 1e6:.1f}M params on {result['device']}; "
        f"paged state {result['paged_bytes'] / 1e6:.1f} MB" + (f"; pinned host->device copy {pinned:.1f} GB/s" if pinned else "")
    )
    print(format_table(rows, ["config", "ms", "overhead", "host_MB", "bus_MB", "bus_GB/s"]))
    overhead = rows[1]["overhead"]
    if reason is None:
        verdict = "within" if overhead <= OVERHEAD_BAR else "OVER"
        print(f"overhead when everything fits: {overhead:+.1%} ({verdict} the {OVERHEAD_BAR:.0%} bar)")
    else:
        print(f"fallback overhead: {overhead:+.1%}; paged states themselves were not measured ({reason})")


def _plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axis = plt.subplots(figsize=(8, 4))
    axis.barh([r["config"] for r in rows], [r["ms"] for r in rows], color="C0")
    axis.set_xlabel("optimizer step time (ms, lower is better)")
    axis.invert_yaxis()
    save_figure(fig, path, title)
