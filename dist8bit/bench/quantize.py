"""quantize / dequantize throughput per backend, against bitsandbytes and the copy roofline.

Bytes moved per call (what bounds a memory-bound kernel):
    quantize:   n * input_bytes (read) + n (codes) + 4 * n / blocksize (absmax)
    dequantize: n + 4 * n / blocksize (read) + n * output_bytes (write)
--stochastic adds quantize-stochastic rows (stochastic rounding with a seed,
the same bytes as quantize) for dist8bit's backends; bitsandbytes has no CPU
stochastic quantize to compare with.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .. import functional as F
from ..backends import available_backends
from ..quant.layout import num_blocks
from .report import format_table, machine_description, pyplot, save_figure, write_json
from .timing import copy_bandwidth_gbs, forced_backend, time_call

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log2-numel", type=int, default=24, help="tensor size as a power of two (default 24)")
    parser.add_argument("--blocksize", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32", help="comma-separated subset of fp32,fp16,bf16")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the slow plain-PyTorch backend")
    parser.add_argument(
        "--stochastic",
        action="store_true",
        help="also time quantize with stochastic rounding (op quantize-stochastic; dist8bit backends only)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="directory for JSON and PNG")


def _bitsandbytes_functions() -> tuple[Callable, Callable] | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes.functional as bnb

    return bnb.quantize_blockwise, bnb.dequantize_blockwise


def _cases(args: argparse.Namespace) -> list[tuple[str, torch.device, str]]:
    """(implementation, device, dtype name) for everything this machine can run."""
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    backends = available_backends()
    cases = []
    for device_type in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        device = torch.device(device_type)
        names = [name for name in backends if name in ("reference", device_type)]
        if args.skip_reference:
            names.remove("reference")
        if _bitsandbytes_functions() is not None:
            names.append("bitsandbytes")
        cases += [(name, device, dtype) for name in names for dtype in dtypes]
    return cases


def _time_case(
    name: str, device: torch.device, dtype: torch.dtype, numel: int, blocksize: int, budget: float, stochastic: bool
) -> list[dict]:
    torch.manual_seed(0)
    A = torch.randn(numel, device=device).to(dtype)
    if name == "bitsandbytes":
        bnb_quantize, bnb_dequantize = _bitsandbytes_functions()
        codes, state = bnb_quantize(A, blocksize=blocksize)
        timings = {
            "quantize": time_call(lambda: bnb_quantize(A, blocksize=blocksize), device, budget_s=budget),
            "dequantize": time_call(lambda: bnb_dequantize(codes, state), device, budget_s=budget),
        }
    else:
        codes = torch.empty(numel, dtype=torch.uint8, device=device)
        absmax = torch.empty(num_blocks(numel, blocksize), device=device)
        restored = torch.empty_like(A)
        with forced_backend(name):
            F.quantize_blockwise(A, out=codes, absmax=absmax, blocksize=blocksize)
            timings = {
                "quantize": time_call(
                    lambda: F.quantize_blockwise(A, out=codes, absmax=absmax, blocksize=blocksize), device, budget_s=budget
                ),
                "dequantize": time_call(
                    lambda: F.dequantize_blockwise(codes, absmax=absmax, blocksize=blocksize, out=restored),
                    device,
                    budget_s=budget,
                ),
            }
            if stochastic:
                timings["quantize-stochastic"] = time_call(
                    lambda: F.quantize_blockwise(
                        A, out=codes, absmax=absmax, blocksize=blocksize, stochastic_rounding=True, seed=1
                    ),
                    device,
                    budget_s=budget,
                )
    element = A.element_size()
    scale_bytes = 4 * num_blocks(numel, blocksize)
    quantize_bytes = numel * element + numel + scale_bytes
    moved = {
        "quantize": quantize_bytes,
        "quantize-stochastic": quantize_bytes,
        "dequantize": numel + scale_bytes + numel * element,
    }
    rows = []
    for op, timing in timings.items():
        rows.append(
            {
                "impl": name,
                "device": device.type,
                "dtype": str(dtype).removeprefix("torch."),
                "op": op,
                "ms": timing.median_ms,
                "min_ms": timing.min_ms,
                "repeats": timing.repeats,
                "bytes": moved[op],
                "GB/s": moved[op] / (timing.median_ms * 1e-3) / 1e9,
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict:
    numel = 1 << args.log2_numel
    cases = _cases(args)
    bandwidth = {}
    for device_type in sorted({device.type for _, device, _ in cases}):
        bandwidth[device_type] = copy_bandwidth_gbs(torch.device(device_type))
    rows: list[dict] = []
    for name, device, dtype_name in tqdm(cases, desc="quantize bench", unit="case"):
        rows += _time_case(name, device, DTYPES[dtype_name], numel, args.blocksize, args.budget, args.stochastic)
    for row in rows:
        row["of_copy_bw"] = row["GB/s"] / bandwidth[row["device"]]
        peer = next(
            (
                r
                for r in rows
                if r["impl"] == "bitsandbytes" and (r["device"], r["dtype"], r["op"]) == (row["device"], row["dtype"], row["op"])
            ),
            None,
        )
        row["vs_bnb"] = peer["ms"] / row["ms"] if peer else None
    result = {
        "benchmark": "quantize",
        "numel": numel,
        "blocksize": args.blocksize,
        "copy_bandwidth_GBps": bandwidth,
        "machine": machine_description(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "quantize.json", result)
    _plot(rows, bandwidth, args.out / "quantize.png", numel, args.blocksize)
    print(
        f"\nquantize_blockwise / dequantize_blockwise, n = 2^{args.log2_numel}, blocksize {args.blocksize}; "
        + ", ".join(f"{d} copy bandwidth {bw:.1f} GB/s" for d, bw in bandwidth.items())
    )
    print(format_table(rows, ["impl", "device", "dtype", "op", "ms", "GB/s", "of_copy_bw", "vs_bnb"]))
    print(f"\nwrote {args.out / 'quantize.json'} and {args.out / 'quantize.png'}")
    return result


def _plot(rows: list[dict], bandwidth: dict[str, float], path: Path, numel: int, blocksize: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    devices = sorted(bandwidth)
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4), squeeze=False)
    for ax, device in zip(axes[0], devices, strict=True):
        subset = [r for r in rows if r["device"] == device]
        short = {"quantize": "q", "dequantize": "dq", "quantize-stochastic": "q-stoch"}
        labels = [f"{r['impl']}\n{r['dtype']} {short[r['op']]}" for r in subset]
        colors = {"quantize": "C0", "dequantize": "C1", "quantize-stochastic": "C2"}
        ax.bar(range(len(subset)), [r["GB/s"] for r in subset], color=[colors[r["op"]] for r in subset])
        ax.axhline(bandwidth[device], color="k", linestyle="--", label=f"copy bandwidth {bandwidth[device]:.0f} GB/s")
        ax.set_xticks(range(len(subset)), labels, fontsize=7)
        ax.set_ylabel("GB/s (bytes moved / time)")
        ax.set_title(f"{device}: n=2^{numel.bit_length() - 1}, blocksize {blocksize}")
        ax.legend(fontsize=8)
    save_figure(fig, path)
