"""Optimizer step time and state memory: dist8bit vs torch, bitsandbytes and torchao.

Bytes moved per parameter per step (the floor a memory-bound step can reach):
    32-bit Adam:            p, g read + p write + 2 states read and written = 3*P + 16
    8-bit Adam (block 256): 3*P + 2 codes read/written + 4 absmax           ~ 3*P + 4.06
    4-bit Adam (block 128): 3*P + 2 half-byte codes read/written + 4 absmax ~ 3*P + 2.13
where P is the parameter/gradient element size (4 for fp32, 2 for bf16).
A compensated bf16 step (master_weights="compensated") also reads and writes
its error buffer: + 2 bytes (int8) or + 4 (int16).

--master-weights times AdamW8bit on bf16 parameters under each master-weights
mode instead (none, stochastic, compensated with int8 and int16 errors), each
row's time as a ratio of the `none` row's; issue 16's bar (the compensated
step costs at most 1.25x the plain bf16 8-bit step) goes into the JSON's "bars".

--norm-passes times the 8-bit steps that need a norm of the update first
(LAMB8bit's trust ratio, AdamW8bit with max_unorm): the kernel runs a second,
read-only pass over p, g and the states (+ 2*P + 2.03 bytes), and each row's
time is given as a ratio of plain AdamW8bit's.

torchao's optimizers (when torchao is installed; never a dependency) are plain
PyTorch under torch.compile: their first step compiles (on a CPU that needs a
C++ compiler), so the warm-up step's time is reported apart, and a peer whose
import, compilation or step fails gets a row with the error instead of a time.
The issue's 4-bit speed bars (AdamW4bit no slower than AdamW8bit, at least 10x
faster than torchao's AdamW4bit) are computed into the JSON's "bars".
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import optim as d8
from ..optim.optimizer import default_blocksize
from .report import format_table, machine_description, plot_time_and_bytes, write_json
from .timing import busy_cores, copy_bandwidth_gbs, rmw_bandwidth_gbs, time_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gpt_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder (layers=12, width=768: the 124M model)."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return [*shapes, (width,), (width,)]


PRESETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt125m": gpt_shapes,
    "gpt-small-test": lambda: gpt_shapes(layers=2, width=256, vocab=4096, context=256),
    "one-2^24": lambda: [(1 << 24,)],
    # 512 small tensors: the host cost per parameter (config, state lookup, launch batching), which is
    # what a GPU step of a many-tensor model pays while the kernel itself takes well under a millisecond.
    "many-4096": lambda: [(4096,)] * 512,
    # 2^28 elements (1 GiB of fp32 parameters): the GPU bar size, run by gpu-check; slow on a CPU.
    "one-2^28": lambda: [(1 << 28,)],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt125m", help="parameter shapes to step")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter and gradient dtype")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timing per optimizer")
    parser.add_argument("--only", default="", help="comma-separated subset of implementation names")
    parser.add_argument(
        "--master-weights",
        action="store_true",
        help="time AdamW8bit on bf16 parameters under each master_weights mode (implies --dtype bf16)",
    )
    parser.add_argument(
        "--norm-passes",
        action="store_true",
        help="time the 8-bit steps with a norm pass (LAMB8bit, AdamW8bit max_unorm) against plain AdamW8bit",
    )
    parser.add_argument(
        "--busy-cores", type=int, default=0, help="keep this many other processes spinning while timing (a loaded machine)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"))


def _candidates(dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    lr = 1e-3
    candidates: dict[str, Callable] = {
        "dist8bit AdamW4bit": lambda ps: d8.AdamW4bit(ps, lr=lr),
        "dist8bit AdamW8bit": lambda ps: d8.AdamW8bit(ps, lr=lr),
        "dist8bit AdamW32bit": lambda ps: d8.AdamW32bit(ps, lr=lr),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True),
    }
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        candidates["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=lr)
    if importlib.util.find_spec("torchao") is not None:
        candidates.update(_torchao_candidates(lr))
    return candidates


# --master-weights rows: name -> (master_weights, error_bits); the name also keys error_bytes.
MASTER_WEIGHT_ROWS: dict[str, tuple[str, int | None]] = {
    "dist8bit AdamW8bit none": ("none", None),
    "dist8bit AdamW8bit stochastic": ("stochastic", None),
    "dist8bit AdamW8bit compensated-8": ("compensated", 8),
    "dist8bit AdamW8bit compensated-16": ("compensated", 16),
}
BASELINE_ROW = "dist8bit AdamW8bit none"
COMPENSATED_BAR = 1.25  # issue 16: compensated step time / plain bf16 8-bit step time


def _master_weight_candidates() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    def make(mode: str, error_bits: int | None) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        extra = {} if error_bits is None else {"error_bits": error_bits}
        return lambda ps: d8.AdamW8bit(ps, lr=1e-3, master_weights=mode, **extra)

    return {name: make(mode, bits) for name, (mode, bits) in MASTER_WEIGHT_ROWS.items()}


# --norm-passes rows: name -> constructor; the first is the baseline of the ratios.
NORM_PASS_ROWS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "dist8bit AdamW8bit": lambda ps: d8.AdamW8bit(ps, lr=1e-3),
    "dist8bit LAMB8bit": lambda ps: d8.LAMB8bit(ps, lr=1e-3),
    "dist8bit AdamW8bit max_unorm": lambda ps: d8.AdamW8bit(ps, lr=1e-3, max_unorm=1.0),
}
NORM_PASS_BASELINE = "dist8bit AdamW8bit"


def _torchao_candidates(lr: float) -> dict[str, Callable]:
    """torchao's AdamW8bit and AdamW4bit; an import that fails (a torchao built for another torch) becomes
    a constructor that raises, so the row reports it."""
    try:
        from torchao import optim as torchao_optim
    except Exception as error:  # any import failure of an optional peer is reported, not fatal
        message = f"import torchao.optim failed: {type(error).__name__}: {error}"

        def unavailable(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            raise RuntimeError(message)

        return {"torchao AdamW8bit": unavailable, "torchao AdamW4bit": unavailable}
    return {
        "torchao AdamW8bit": lambda ps: torchao_optim.AdamW8bit(ps, lr=lr),
        "torchao AdamW4bit": lambda ps: torchao_optim.AdamW4bit(ps, lr=lr),
    }


def state_bits(name: str) -> int:
    """The state precision an implementation's name says (AdamW4bit, AdamW8bit; anything else 32)."""
    return 4 if "4bit" in name else 8 if "8bit" in name else 32


def error_bytes(name: str) -> int:
    """Bytes a compensated row's error buffer moves per parameter: read and written, 1 or 2 bytes each."""
    error_bits = MASTER_WEIGHT_ROWS.get(name, ("", None))[1]
    return 0 if error_bits is None else 2 * error_bits // 8


def bytes_per_param(name: str, element: int) -> float:
    """Bytes a step must move per parameter (see the module docstring): two states, each read and written,
    with one float32 absmax per block (256 elements at 8 bits, 128 at 4), a compensated row's errors, and
    a norm pass's reads of p, g and the states."""
    bits = state_bits(name)
    if bits == 32:
        return 3 * element + 16
    state = 2 * (bits / 8 + 4 / default_blocksize(bits))  # both states, read once
    norm_pass = 2 * element + state if name in NORM_PASS_ROWS and name != NORM_PASS_BASELINE else 0
    return 3 * element + 2 * state + error_bytes(name) + norm_pass


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += _tensor_bytes(value)
    return total


def _tensor_bytes(value: torch.Tensor) -> int:
    """Storage bytes, also for tensor subclasses (torchao keeps codes and scales inside)."""
    inner = getattr(value, "__tensor_flatten__", None)
    if inner is not None and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()


@dataclass(frozen=True)
class InterleavedMode:
    """A run (--master-weights, --norm-passes) whose optimizers are timed in turns, each row's time also
    given as a ratio of one baseline row's."""

    suffix: str  # of the output files
    candidates: Callable[[], dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]]
    baseline: str
    ratio_key: str
    bars: Callable[[list[dict]], dict]


def interleaved_mode(args: argparse.Namespace) -> InterleavedMode | None:
    """The interleaved mode the arguments ask for; None for the default run (one optimizer after another)."""
    if args.master_weights and args.norm_passes:
        raise SystemExit("--master-weights and --norm-passes are separate runs: pass one of them")
    if args.master_weights:
        return InterleavedMode("-master-weights", _master_weight_candidates, BASELINE_ROW, "ms_over_none", master_weight_bars)
    if args.norm_passes:
        return InterleavedMode(
            "-norm-passes", lambda: dict(NORM_PASS_ROWS), NORM_PASS_BASELINE, "ms_over_adamw8bit", lambda rows: {}
        )
    return None


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = interleaved_mode(args)
    if args.master_weights:
        args.dtype = "bf16"
    dtype = DTYPES[args.dtype]
    shapes = PRESETS[args.preset]()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    with busy_cores(args.busy_cores):
        return _measure(args, mode, device, dtype, shapes, params)


def _measure(
    args: argparse.Namespace,
    mode: InterleavedMode | None,
    device: torch.device,
    dtype: torch.dtype,
    shapes: list[tuple[int, ...]],
    params: list[torch.nn.Parameter],
) -> dict:
    """Bandwidths and every optimizer's step, all under the same load, so the ratios compare like with like."""
    numel = sum(p.numel() for p in params)
    bandwidth = copy_bandwidth_gbs(device)
    rmw_bandwidth = rmw_bandwidth_gbs(device)
    candidates = mode.candidates() if mode else _candidates(dtype, device)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in wanted if n not in candidates]
        if unknown:
            raise SystemExit(f"--only: unknown implementation(s) {unknown}; choose from {sorted(candidates)}")
        candidates = {n: f for n, f in candidates.items() if n in wanted}
    bandwidths = (bandwidth, rmw_bandwidth)
    if mode:
        rows = _interleaved_rows(candidates, params, device, args.budget, bandwidths, mode.baseline, mode.ratio_key)
    else:
        rows = _sequential_rows(candidates, params, device, args.budget, bandwidths)
    fused = next((r for r in rows if r["impl"] == "torch AdamW fused" and "ms" in r), None)
    bnb_row = next((r for r in rows if r["impl"] == "bitsandbytes AdamW8bit" and "ms" in r), None)
    for row in rows:
        if "ms" in row:
            row["vs_torch_fused"] = fused["ms"] / row["ms"] if fused else None
            row["vs_bnb"] = bnb_row["ms"] / row["ms"] if bnb_row else None
    result = {
        "benchmark": "optim",
        "preset": args.preset,
        "numel": numel,
        "tensors": len(shapes),
        "dtype": args.dtype,
        "device": device.type,
        "copy_bandwidth_GBps": bandwidth,
        "rmw_bandwidth_GBps": rmw_bandwidth,
        "busy_cores": args.busy_cores,
        "machine": machine_description(),
        "bars": mode.bars(rows) if mode else four_bit_bars(rows),
        "rows": rows,
    }
    suffix = (mode.suffix if mode else "") + (f"-busy{args.busy_cores}" if args.busy_cores else "")
    write_json(args.out / f"optim-{args.preset}-{args.dtype}{suffix}.json", result)
    _plot(
        rows,
        args.out / f"optim-{args.preset}-{args.dtype}{suffix}.png",
        f"{args.preset} ({numel / 1e6:.0f}M params, {args.dtype}, {device.type})",
    )
    machine = result["machine"]
    print(
        f"\nAdamW step over {len(shapes)} tensors, {numel / 1e6:.1f}M params, {args.dtype} on {device.type}"
        f" ({machine.get('gpu') or machine['cpu']}, {machine['threads']} threads, {args.busy_cores} busy cores);"
        f" copy bandwidth {bandwidth:.1f} GB/s, read-modify-write bandwidth {rmw_bandwidth:.1f} GB/s"
    )
    columns = ["impl", "ms", "first_step_ms", "state_bytes_per_param", "GB/s", "of_copy_bw", "of_rmw_bw"]
    bars = result["bars"]
    if mode:
        print(format_table(rows, [*columns, mode.ratio_key, "error"]))
        for bits in (8, 16) if args.master_weights else ():
            ratio = bars[f"compensated_{bits}_ms_over_none_ms"]
            print(
                f"master-weights bar: compensated ({bits}-bit errors) step = {_ratio(ratio)} the plain bf16 step"
                f" (<= {COMPENSATED_BAR:g}x: {bars[f'compensated_{bits}_met']})"
            )
        return result
    print(format_table(rows, [*columns, "vs_torch_fused", "vs_bnb", "error"]))
    print(
        f"4-bit bars: AdamW4bit step = {_ratio(bars['adamw8bit_ms_over_adamw4bit_ms'])} AdamW8bit's speed"
        f" (no slower: {bars['no_slower_than_8bit_met']}); {_ratio(bars['torchao_ms_over_adamw4bit_ms'])} torchao"
        f" AdamW4bit's (>= {TORCHAO_SPEEDUP_BAR:g}x: {bars['torchao_speedup_met']})"
    )
    return result


Maker = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
Params = list[torch.nn.Parameter]
Bandwidths = tuple[float, float]  # copy, read-modify-write (GB/s)
INTERLEAVED_ROUNDS = 5  # --master-weights, --norm-passes: timing turns per row


def _row(
    name: str, optimizer: torch.optim.Optimizer, ms: float, first_step_ms: float, params: Params, bandwidths: Bandwidths
) -> dict:
    """A timed row: step time, state bytes and the bytes-moved bound's bandwidth (of copy and of read-modify-write)."""
    numel = sum(p.numel() for p in params)
    gbs = bytes_per_param(name, params[0].element_size()) * numel / (ms * 1e-3) / 1e9
    return {
        "impl": name,
        "ms": ms,
        "first_step_ms": first_step_ms,
        "state_bytes_per_param": state_bytes(optimizer) / numel,
        "GB/s": gbs,
        "of_copy_bw": gbs / bandwidths[0],
        "of_rmw_bw": gbs / bandwidths[1],
    }


def _error_row(name: str, error: Exception) -> dict:
    return {"impl": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}


def _sequential_rows(
    candidates: dict[str, Maker], params: Params, device: torch.device, budget: float, bandwidths: Bandwidths
) -> list[dict]:
    """One optimizer at a time (built, timed, freed): peers need not fit in memory together."""
    rows = []
    for name, make in tqdm(candidates.items(), desc="optim bench", unit="optimizer"):
        try:
            optimizer = make(params)
            timing = time_call(optimizer.step, device, min_repeats=3, budget_s=budget)
        except Exception as error:  # a peer that cannot run here is reported, not fatal
            rows.append(_error_row(name, error))
            continue
        rows.append(_row(name, optimizer, timing.median_ms, timing.warmup_ms, params, bandwidths))
        del optimizer
        gc.collect()
    return rows


def _interleaved_rows(
    candidates: dict[str, Maker],
    params: Params,
    device: torch.device,
    budget: float,
    bandwidths: Bandwidths,
    baseline: str,
    ratio_key: str,
) -> list[dict]:
    """--master-weights, --norm-passes: every optimizer built and warmed up, then timed in turns
    (INTERLEAVED_ROUNDS rounds), so that a load that changes during the run (shared CPUs) weighs on every row
    alike. A row's ms is the median of its round medians; `ratio_key` the median of its per-round ratios to
    the `baseline` row's (paired rounds)."""
    optimizers: dict[str, torch.optim.Optimizer] = {}
    first_step: dict[str, float] = {}
    rows = {}
    for name, make in candidates.items():
        try:
            optimizers[name] = make(params)
            first_step[name] = time_call(optimizers[name].step, device, min_repeats=1, budget_s=0).warmup_ms
        except Exception as error:  # reported in its row, the others still run
            optimizers.pop(name, None)
            rows[name] = _error_row(name, error)
    rounds: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in tqdm(range(INTERLEAVED_ROUNDS), desc="optim bench (rounds)", unit="round"):
        for name, optimizer in optimizers.items():
            timing = time_call(optimizer.step, device, min_repeats=1, budget_s=budget / INTERLEAVED_ROUNDS)
            rounds[name].append(timing.median_ms)
    for name, optimizer in optimizers.items():
        rows[name] = _row(name, optimizer, statistics.median(rounds[name]), first_step[name], params, bandwidths)
        if baseline in rounds:
            paired = [ms / base for ms, base in zip(rounds[name], rounds[baseline], strict=True)]
            rows[name][ratio_key] = statistics.median(paired)
    return [rows[name] for name in candidates]


# The speed bars for the 4-bit CPU step.
TORCHAO_SPEEDUP_BAR = 10.0


def four_bit_bars(rows: list[dict]) -> dict:
    """AdamW4bit vs AdamW8bit (bar: no slower) and vs torchao AdamW4bit (bar: >= 10x faster), as time ratios
    (> 1: AdamW4bit is faster); a bar whose rows did not both run is None (neither met nor failed)."""
    times = {row["impl"]: row["ms"] for row in rows if "ms" in row}
    ours = times.get("dist8bit AdamW4bit")
    eight, torchao = times.get("dist8bit AdamW8bit"), times.get("torchao AdamW4bit")
    versus_8bit = eight / ours if ours and eight else None
    versus_torchao = torchao / ours if ours and torchao else None
    return {
        "adamw8bit_ms_over_adamw4bit_ms": versus_8bit,
        "no_slower_than_8bit_met": None if versus_8bit is None else versus_8bit >= 1.0,
        "torchao_ms_over_adamw4bit_ms": versus_torchao,
        "torchao_speedup_bar": TORCHAO_SPEEDUP_BAR,
        "torchao_speedup_met": None if versus_torchao is None else versus_torchao >= TORCHAO_SPEEDUP_BAR,
    }


def master_weight_bars(rows: list[dict]) -> dict:
    """Compensated (int8 and int16 errors) step time over the plain bf16 step's, the rows' paired ms_over_none
    (bar: <= 1.25x); None when either row did not run."""
    ratios = {row["impl"]: row.get("ms_over_none") for row in rows}
    bars: dict = {"compensated_bar": COMPENSATED_BAR}
    for name, (mode, bits) in MASTER_WEIGHT_ROWS.items():
        if mode != "compensated":
            continue
        ratio = ratios.get(name)
        bars[f"compensated_{bits}_ms_over_none_ms"] = ratio
        bars[f"compensated_{bits}_met"] = None if ratio is None else ratio <= COMPENSATED_BAR
    return bars


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    plot_time_and_bytes(
        rows, path, title, "step time (ms, lower is better)", "state_bytes_per_param", "optimizer state bytes per parameter"
    )
