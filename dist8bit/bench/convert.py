"""Checkpoint conversion throughput and peak memory on a synthetic AdamW checkpoint.

A torch.optim.AdamW state dict for GPT-2-style shapes of about --params
parameters (exp_avg, exp_avg_sq: 8 bytes per parameter) is converted to 8-bit,
back to fp32, and to 8-bit with --verify. Each conversion runs in a fresh
subprocess that reports its wall time and memory:

    peak RSS        VmHWM: every page the process touched, including the clean,
                    file-backed pages of the memory-mapped input (the kernel can
                    drop those at any time; they are page cache, not allocations)
    peak private    the largest RssAnon sampled every 2 ms: memory the
                    converter itself allocated (also shown above what the
                    interpreter held after importing torch and dist8bit)

A tiny checkpoint shows the fixed cost of a conversion (loading the compiled
kernels, torch's fake-tensor machinery for the streaming writer: ~2-3 s here).

For scale, the same is measured for what a non-streaming tool needs just to
read and rewrite the file: torch.load (not mapped) + torch.save.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .optim import gpt_shapes
from .report import format_table, machine_description, write_json

WIDTH, VOCAB, CONTEXT = 768, 32000, 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=float, default=100e6, help="approximate parameter count of the checkpoint")
    parser.add_argument("--width", type=int, default=WIDTH, help="model width of the GPT-2-style shapes")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (the embedding is vocab x width)")
    parser.add_argument("--context", type=int, default=CONTEXT, help="context length (the position embedding)")
    parser.add_argument("--data", type=Path, default=Path("results/bench/convert-data"), help="where the checkpoints go")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))


def shapes_for(params: float, width: int = WIDTH, vocab: int = VOCAB, context: int = CONTEXT) -> list[tuple[int, ...]]:
    """GPT-2-style shapes (default width 768, vocab 32000) with the fewest layers reaching `params`."""
    layers = 1
    while sum(torch.Size(s).numel() for s in gpt_shapes(layers, width, vocab, context)) < params:
        layers += 1
    return gpt_shapes(layers, width, vocab, context)


def write_adamw_checkpoint(path: Path, shapes: list[tuple[int, ...]]) -> int:
    """An AdamW state dict as torch writes it after 100 steps, with plausible moment magnitudes."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(0)) for _ in shapes]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    state = {}
    for index, shape in enumerate(shapes):
        scale = torch.rand((), generator=generator) * 1e-3
        state[index] = {
            "step": torch.tensor(100.0),
            "exp_avg": torch.randn(shape, generator=generator) * scale,
            "exp_avg_sq": (torch.randn(shape, generator=generator) * scale) ** 2,
        }
    sd = optimizer.state_dict()
    sd["state"] = state
    sd["param_groups"][0]["params"] = list(range(len(shapes)))
    torch.save(sd, path)
    return sum(torch.Size(s).numel() for s in shapes)


def _measure(command: dict) -> dict:
    """Run one conversion in a fresh interpreter; returns its report."""
    completed = subprocess.run(
        [sys.executable, "-m", "dist8bit.bench.convert", json.dumps(command)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"conversion subprocess failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    args.data.mkdir(parents=True, exist_ok=True)
    src = args.data / "adamw-fp32.pt"
    shapes = shapes_for(args.params, args.width, args.vocab, args.context)
    print(f"writing a synthetic AdamW checkpoint ({len(shapes)} tensors) to {src} ...", flush=True)
    numel = write_adamw_checkpoint(src, shapes)
    eight, back, verified = args.data / "adamw-8bit.pt", args.data / "adamw-back.pt", args.data / "adamw-8bit-verified.pt"
    tiny = args.data / "tiny.pt"
    write_adamw_checkpoint(tiny, [(64, 64)])
    cases = [
        ("tiny checkpoint (fixed cost)", {"src": tiny, "dst": args.data / "tiny-8bit.pt", "to": "8bit"}),
        ("fp32 -> 8bit", {"src": src, "dst": eight, "to": "8bit"}),
        ("8bit -> fp32", {"src": eight, "dst": back, "to": "fp32"}),
        ("fp32 -> 8bit --verify", {"src": src, "dst": verified, "to": "8bit", "verify": True}),
        ("torch.load + torch.save (for scale)", {"src": src, "dst": args.data / "resaved.pt", "baseline": True}),
    ]
    rows = []
    for name, command in cases:
        result = _measure({k: str(v) if isinstance(v, Path) else v for k, v in command.items()})
        size_in = Path(command["src"]).stat().st_size
        rows.append(
            {
                "conversion": name,
                "input MB": size_in / 1e6,
                "output MB": Path(command["dst"]).stat().st_size / 1e6,
                "seconds": result["seconds"],
                "MB/s (input)": size_in / 1e6 / result["seconds"],
                "peak RSS MB": result["vmhwm"] / 1e6,
                "peak private MB": result["peak_anon"] / 1e6,
                "private over import MB": (result["peak_anon"] - result["start_anon"]) / 1e6,
                "max error / bound": result.get("bound_ratio", ""),
            }
        )
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
    print(f"\n{numel / 1e6:.1f}M parameters, {len(shapes)} tensors; {machine_description()}")
    print(format_table(rows, list(rows[0])))
    write_json(
        args.out / "convert.json", {"machine": machine_description(), "params": numel, "tensors": len(shapes), "rows": rows}
    )
    for path in (src, eight, back, verified, args.data / "resaved.pt", tiny, args.data / "tiny-8bit.pt"):
        path.unlink(missing_ok=True)


# --------------------------------------------------------------- the child
def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _child(command: dict) -> None:
    start_anon = _status("RssAnon")  # the interpreter with torch imported
    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status("RssAnon"))
            time.sleep(0.002)

    from ..checkpoint import convert

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = {}
    if command.get("baseline"):
        torch.save(torch.load(command["src"], weights_only=True), command["dst"])
    else:
        report = convert(
            command["src"], command["dst"], to=command["to"], verify=command.get("verify", False), overwrite=True, progress=False
        )
        result["bound_ratio"] = report.bound_ratio
    result["seconds"] = time.perf_counter() - started
    done.set()
    sampler.join()
    result |= {"vmhwm": _status("VmHWM"), "peak_anon": max(peak["anon"], _status("RssAnon")), "start_anon": start_anon}
    print(json.dumps(result))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
