"""The numbers README.md and docs/ state about the code, recomputed from the code (issue 12).

Each claim names a doc, a regular expression whose groups capture numbers as the doc
writes them, and a function that computes those numbers from dist8bit (or, for what the
docs say about a test's tolerance, from that test's own constant). A written number agrees
when it is the computed value rounded to the digits written ("0.00703" covers
[0.006025, 0.007035)); a power such as "2^24" must be exact. So the test fails when a doc
drifts from the code, when the code changes under a doc, and when the sentence is gone
(then update its claim here). `test_a_drifted_number_is_caught` proves every claim can
fail: three units of its last written digit off is rejected.

Not here, on purpose: measured numbers (timings, throughputs, losses of a run, benchmark
rows). The docs mark those as measured, with the machine and the command that made them.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import needs_compiled
from test_functional import BLOCKSIZES, DTYPES, ERROR_BOUNDS, round_trip_errors

import dist8bit.compat.bitsandbytes.functional as CF
import dist8bit.functional as F
from dist8bit import optim
from dist8bit.bench import gpu_check, gpu_check_parse, gpu_check_steps, paged
from dist8bit.bench.convert import shapes_for
from dist8bit.bench.optim import bytes_per_param, gpt_shapes
from dist8bit.checkpoint import codec, plan, verify
from dist8bit.integrations import deepspeed as ds_integration
from dist8bit.integrations import zero_partition
from dist8bit.optim import norms, segments
from dist8bit.optim.adam import ADAM_STATES
from dist8bit.optim.ademamix import ADEMAMIX_STATES
from dist8bit.optim.optimizer import Optimizer8bit
from dist8bit.optim.state import STATE_FORMAT_VERSION
from dist8bit.paging.manager import MIN_PAGED_BYTES
from dist8bit.quant import encoder_table, layout, quantiles
from dist8bit.quant.codebook import build_codebook
from dist8bit.quant.maps import MAP_SIZE

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# ---------------------------------------------------------------------------------------- reading


@functools.cache
def doc_text(name: str) -> str:
    """The doc with every run of whitespace collapsed to one space, so claims ignore line wrapping."""
    return " ".join((ROOT / name).read_text().split())


WORDS = {"half": 0.5}
POWER = re.compile(r"^(-?\d+)\^(-?\d+)$")
DECIMAL = re.compile(r"^-?\d[\d,]*(?:\.(\d+))?(?:e([+-]?\d+))?$")


def parse_written(written: str) -> tuple[float, float]:
    """(value, half a unit of the last written digit); a power "b^e" is exact (0)."""
    if written in WORDS:
        return WORDS[written], 0.0
    power = POWER.match(written)
    if power:
        return float(int(power.group(1)) ** int(power.group(2))), 0.0
    decimal = DECIMAL.match(written)
    assert decimal, f"not a number as the docs write them: {written!r}"
    decimals, exponent = len(decimal.group(1) or ""), int(decimal.group(2) or 0)
    return float(written.replace(",", "")), 0.5 * 10.0 ** (exponent - decimals)


def agrees(written: float, half_unit: float, actual: float) -> bool:
    """`actual` rounds to `written` (a float's own rounding error aside)."""
    return abs(actual - written) <= half_unit + 1e-9 * max(abs(written), abs(actual), 1e-30)


@dataclass(frozen=True)
class Claim:
    """`pattern` (over the whitespace-collapsed doc) captures numbers; `values()` gives the code's, in order."""

    id: str
    doc: str
    pattern: str
    values: Callable[[], Sequence[float]]

    def written(self) -> list[str]:
        match = re.search(self.pattern, doc_text(self.doc))
        assert match, f"{self.doc}: the sentence of claim {self.id!r} is gone or reworded; update tests/test_doc_claims.py"
        return list(match.groups())


# ---------------------------------------------------------------------------------------- the code's numbers


def quantize_state_bytes_per_param(eight_bit: bool, numel: int = 1 << 16) -> float:
    """AdamW state bytes per parameter element, counted by the optimizer itself after one step."""
    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.full_like(param, 1e-3)
    optimizer = (optim.AdamW8bit if eight_bit else optim.AdamW32bit)([param])
    optimizer.step()
    return optimizer.state_bytes() / numel


@functools.cache
def round_trip_table() -> dict[int, tuple[float, float]]:
    """Mean abs / rel round-trip error of randn(1024, 1024) (seed 0), worst of float32/16/bf16 per blocksize."""
    table = {}
    for blocksize in BLOCKSIZES:
        worst = (0.0, 0.0)
        for dtype in DTYPES:
            torch.manual_seed(0)
            errors = round_trip_errors(torch.randn(1024, 1024).to(dtype), blocksize)
            worst = (max(worst[0], errors[0]), max(worst[1], errors[1]))
        table[blocksize] = worst
    return table


def bound_margins() -> list[float]:
    """How far (%) above the measured round-trip errors each bound of test_functional.ERROR_BOUNDS sits."""
    bounds, measured = ERROR_BOUNDS, round_trip_table()
    return [100 * (bounds[b][i] / measured[b][i] - 1) for b in BLOCKSIZES for i in (0, 1)]


def readme_round_trip_error() -> float:
    torch.manual_seed(0)
    A = torch.randn(1024, 1024)
    codes, state = F.quantize_blockwise(A)
    return float((A - F.dequantize_blockwise(codes, state)).abs().mean())


@functools.cache
def nested_cost() -> tuple[float, float, float, float, float]:
    """Extra mean abs error of nested=True over plain, in % (min/max over dtypes at blocksize 256 and at
    4096), and the largest % difference from bitsandbytes' own nested round trip, on the data of
    test_compat_functional.test_nested_matches_bitsandbytes."""
    import bitsandbytes.functional as BF

    extra: dict[int, list[float]] = {256: [], 4096: []}
    versus_bnb = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(1)
        A = (torch.randn(1 << 20) * torch.linspace(0.01, 5, 1 << 20)).to(dtype)
        for blocksize in extra:
            error = CF.dequantize_blockwise(*CF.quantize_blockwise(A, blocksize=blocksize, nested=True)).float() - A.float()
            plain = F.dequantize_blockwise(*F.quantize_blockwise(A, blocksize=blocksize)).float() - A.float()
            theirs = BF.dequantize_blockwise(*BF.quantize_blockwise(A, blocksize=blocksize, nested=True)).float() - A.float()
            mean, plain_mean, bnb_mean = error.abs().mean(), plain.abs().mean(), theirs.abs().mean()
            extra[blocksize].append(100 * float(mean / plain_mean - 1))
            versus_bnb.append(100 * abs(float(mean / bnb_mean - 1)))
    return min(extra[256]), max(extra[256]), min(extra[4096]), max(extra[4096]), max(versus_bnb)


@functools.cache
def bitsandbytes_non_nearest() -> tuple[float, float, float, float]:
    """% of codes where bitsandbytes' CPU path differs from the nearest code: randn at blocksize 256
    (float32), the min and max over the grid of test_quantize_blockwise_against_bitsandbytes, and
    second moments (g^2, unsigned map, blocksize 256)."""
    import bitsandbytes.functional as BF

    def differ(A: torch.Tensor, **kwargs) -> float:
        return 100 * float((CF.quantize_blockwise(A, **kwargs)[0] != BF.quantize_blockwise(A, **kwargs)[0]).float().mean())

    grid = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for blocksize in (256, 4096, 16384, 65536):
            torch.manual_seed(0)
            grid.append(differ((torch.randn(3 * 65536 + 17) * torch.rand(1) * 10).to(dtype), blocksize=blocksize))
    torch.manual_seed(0)
    squares = torch.randn(1 << 20) ** 2
    second = differ(squares, code=F.create_dynamic_map(signed=False), blocksize=256)
    return grid[0], min(grid), max(grid), second


def linear_map_against_bitsandbytes() -> tuple[float, float]:
    """bitsandbytes' value where ours has an exact 0, and the largest difference elsewhere."""
    import bitsandbytes.functional as BF

    ours = F.create_linear_map(signed=True, total_bits=8, add_zero=True)
    theirs = BF.create_linear_map(signed=True, total_bits=8, add_zero=True).cpu().float()
    zero = ours == 0
    return float(theirs[zero].abs().max()), float((ours - theirs)[~zero].abs().max())


@functools.cache
def few_quantile_errors() -> tuple[float, float]:
    """15 quantiles of randn(2^20) (seed 0) against the exact ones at linspace(1/30, 29/30): max error with a
    fixed offset 1/512, and with the default rule."""
    torch.manual_seed(0)
    A = torch.randn(1 << 20)
    exact = torch.quantile(A.double(), torch.linspace(1 / 30, 29 / 30, 15, dtype=torch.float64)).float()
    fixed = F.estimate_quantiles(A, offset=1 / 512, num_quantiles=15)
    rule = F.estimate_quantiles(A, num_quantiles=15)
    return float((fixed - exact).abs().max()), float((rule - exact).abs().max())


def constant_of_test(module: str, name: str):
    """A constant of another test module (what a doc says a test allows is read from that test), imported
    when the claim is checked so that one module's heavy imports stay out of the others' claims."""
    return getattr(importlib.import_module(module), name)


def bitsandbytes():
    """bitsandbytes itself (installed with the test extras): what the docs say about it is read from it."""
    import bitsandbytes

    return bitsandbytes


def default_of(function: Callable, name: str):
    return inspect.signature(function).parameters[name].default


def csrc_constant(path: str, name: str) -> int:
    """An integer `constexpr ... name = N;` of a C++/CUDA source, or a reference to another such constant."""
    text = (ROOT / "csrc" / path).read_text()
    match = re.search(rf"constexpr\s+[\w:]+\s+{name}\s*=\s*(\w+)\s*;", text)
    assert match, f"csrc/{path} has no constexpr {name}"
    value = match.group(1)
    return int(value) if value.isdigit() else csrc_constant("common/op_contract.h", value)


@functools.cache
def launcher_model() -> tuple[int, float, float]:
    """Parameters of the launcher's default GPT (vocab 80: Shakespeare's characters) and its AdamW
    state in MiB per rank without sharding, 8-bit and 32-bit, counted by the optimizer."""
    from launch.model import GPT, GPTConfig
    from launch.optimizers import optimizer_state_bytes

    model = GPT(GPTConfig(vocab_size=80))
    mib = []
    for constructor in (optim.AdamW8bit, optim.AdamW32bit):
        optimizer = constructor(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        mib.append(optimizer_state_bytes(optimizer) / MIB)
    return sum(p.numel() for p in model.parameters()), mib[0], mib[1]


def launcher_defaults() -> tuple[int, int, float]:
    """Default steps, tokens per step on 2 ranks, and AdamW8bit's default lr of launch/pretrain.py."""
    from launch.optimizers import OPTIMIZERS
    from launch.pretrain import build_parser

    args = build_parser().parse_args([])
    return args.steps, args.batch_size * args.block_size * 2, OPTIMIZERS["adamw8bit"][1]


def numel(shapes: Sequence[tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes)


def convert_bench_model() -> tuple[int, int, int, float, int, float]:
    width, vocab = default_of(shapes_for, "width"), default_of(shapes_for, "vocab")
    shapes = shapes_for(100e6)
    layers = (len(shapes) - 4) // 12  # two embeddings and the final norm's two vectors, 12 tensors per layer
    assert gpt_shapes(layers, width, vocab) == shapes
    return width, layers, vocab, numel(shapes) / 1e6, len(shapes), 2 * 4 * numel(shapes) / 1e6


def memory_test_sizes() -> tuple[float, float, float, float]:
    """tests/test_checkpoint_memory.py: 8M vs 2M elements, the extra fp32 state (exp_avg + exp_avg_sq),
    one extra state tensor, and the growth it allows, in MiB."""
    from test_checkpoint_memory import ALLOWED_GROWTH, LARGE, SMALL

    extra = 2 * 4 * (LARGE - SMALL)
    return LARGE / MIB, SMALL / MIB, extra / MIB, extra / 2 / MIB, ALLOWED_GROWTH * extra / MIB


def roofline() -> list[float]:
    """docs/cuda_encoder.md's HBM table: 132 SMs at 1.755 GHz, H100 3.35 TB/s, H200 4.8 TB/s, the
    optimizer benchmark's bytes per parameter."""
    clock = 132 * 1.755e9
    fp32, bf16 = bytes_per_param("dist8bit AdamW8bit", 4), bytes_per_param("dist8bit AdamW8bit", 2)
    rows = [3.35e12 / clock, 4.8e12 / clock]
    for per_param in (fp32, bf16):
        rows += [per_param, per_param / 3.35e12 * 1e12, per_param / 4.8e12 * 1e12]
        rows += [per_param / (3.35e12 / clock), per_param / (4.8e12 / clock)]
    return rows


def private_code_words() -> int:
    """Words of one lane-private copy of a map in CUDA shared memory (word c * 32 + lane)."""
    return csrc_constant("cuda/device_quant.cuh", "kCodeSize") * csrc_constant("cuda/device_quant.cuh", "kWarpSize")


def fused_step_slot_bytes() -> int:
    """Shared memory per 8-bit state slot of the CUDA fused step: the private code, the thresholds and the
    encoder table padded to whole 16-byte rows (device_quant.cuh's kEncoderWords)."""
    encoder_words = 4 * math.ceil(csrc_constant("common/code_search.h", "kEncoderTableSize") / 4)
    return 4 * (private_code_words() + csrc_constant("cuda/device_quant.cuh", "kCodeSize") + encoder_words)


def gpu_check_total() -> float:
    return sum(step.budget_s for step in gpu_check_steps.plan(Path("unused"), gpu_check_steps.TOTAL_BUDGET_S))


DIAGRAM_NUMELS = (4800, 5328, 111)  # docs/deepspeed.md's ZeRO diagram: emb, w, b
GUARD_P = 2 * encoder_table.GUARD  # fraction of values whose h lies within the guard of an integer
MIN_8BIT_SIZE = default_of(Optimizer8bit.__init__, "min_8bit_size")


def row(label: str, count: int, number: str = r"(\d\.\d+)") -> str:
    """A markdown table row: `| label | n | n | ... |` with `count` captured numbers."""
    return re.escape(f"| {label}") + "".join(rf" \| {number}" for _ in range(count)) + r" \|"


CLAIMS = [
    # README.md
    Claim(
        "readme-state-bytes",
        "README.md",
        r"costs (\d+) bytes per parameter instead of (\d+)",
        lambda: (quantize_state_bytes_per_param(True), quantize_state_bytes_per_param(False)),
    ),
    Claim(
        "readme-absmax-per",
        "README.md",
        r"one fp32 absmax per (\d+) values",
        lambda: [default_of(F.quantize_blockwise, "blocksize")],
    ),
    Claim("readme-round-trip", "README.md", r"\(A - A_hat\)\.abs\(\)\.mean\(\) # ~(0\.\d+)", lambda: [readme_round_trip_error()]),
    Claim(
        "readme-quantiles",
        "README.md",
        r"# (\d+) quantiles without a full sort",
        lambda: [F.estimate_quantiles(torch.randn(5000)).numel()],
    ),
    # docs/architecture.md
    Claim(
        "arch-map-size",
        "docs/architecture.md",
        r"quantization maps \(the (\d+) values\)",
        lambda: [F.create_dynamic_map().numel()],
    ),
    # docs/quantization.md
    Claim(
        "quant-blocksizes",
        "docs/quantization.md",
        r"powers of two from (\d+) to (\d+) \(default (\d+), the optimizers' block size\)",
        lambda: (layout.QUANTIZE_BLOCKSIZES[0], layout.QUANTIZE_BLOCKSIZES[-1], layout.DEFAULT_BLOCKSIZE),
    ),
    Claim("quant-map-values", "docs/quantization.md", r"\| `code` \| (\d+) sorted finite float32 values", lambda: [MAP_SIZE]),
    Claim(
        "quant-bnb-default-blocksize",
        "docs/quantization.md",
        r"bitsandbytes' `quantize_blockwise` defaults to `blocksize=(\d+)`",
        lambda: [default_of(bitsandbytes().functional.quantize_blockwise, "blocksize")],
    ),
    Claim(
        "quant-256-vs-4096",
        "docs/quantization.md",
        r"the round-trip error at (\d+) is (\d+)% lower than at (\d+)",
        lambda: (256, 100 * (1 - round_trip_table()[256][0] / round_trip_table()[4096][0]), 4096),
    ),
    Claim(
        "quant-compat-default",
        "docs/quantization.md",
        r"`dist8bit\.compat\.bitsandbytes\.functional` defaults to (\d+)",
        lambda: [default_of(CF.quantize_blockwise, "blocksize")],
    ),
    Claim(
        "quant-large-blocks",
        "docs/quantization.md",
        r"the CPU kernel splits blocks above (\d+) into pieces .*? the CUDA kernel takes blocks above (\d+) in two kernels",
        lambda: (csrc_constant("cpu/quantize.cpp", "kFusedMaxBlock"), csrc_constant("cuda/quantize_kernels.cu", "kLargeBlock")),
    ),
    Claim(
        "quant-state-blocksizes",
        "docs/quantization.md",
        r"accepts powers of two up to (\d+), .*? states\* still take (\d+) to (\d+)",
        lambda: (layout.MAX_QUANTIZE_BLOCKSIZE, layout.SUPPORTED_BLOCKSIZES[0], layout.SUPPORTED_BLOCKSIZES[-1]),
    ),
    Claim(
        "quant-kernel-block-buffers",
        "docs/quantization.md",
        r"CPU: a (\d+)-float buffer per state in `fused_step\.cpp`; CUDA: one block per (\d+)-thread CUDA block",
        lambda: (
            csrc_constant("cpu/fused_step.cpp", "kMaxBlock"),
            csrc_constant("cuda/fused_step_kernels.cu", "kMaxBlockThreads"),
        ),
    ),
    Claim(
        "quant-linear-map-vs-bnb",
        "docs/quantization.md",
        r"linspace` leaves (\d\.\de-\d) there; the other values agree within (\de-\d)\)",
        linear_map_against_bitsandbytes,
    ),
    Claim(
        "quant-padded-maps",
        "docs/quantization.md",
        r"zero-padded to (\d+) entries",
        lambda: [F.create_fp8_map(True, 2, 1, 4).numel()],
    ),
    Claim(
        "quant-nested-bytes",
        "docs/quantization.md",
        r"scales then cost about (\d) byte per block instead of (\d)",
        lambda: (
            F.quantize_blockwise(torch.randn(4096), nested=True)[1].absmax.element_size(),
            F.quantize_blockwise(torch.randn(4096))[1].absmax.element_size(),
        ),
    ),
    Claim(
        "quant-nested-cost",
        "docs/quantization.md",
        r"(\d\.\d)-(\d\.\d)% \(blocksize 256\) and (\d+\.\d)-(\d+\.\d)% \(4096\) more mean absolute error than without "
        r"nesting, and within (0\.\d+)% of bitsandbytes' own nested round trip",
        nested_cost,
    ),
    Claim(
        "quant-bnb-non-nearest",
        "docs/quantization.md",
        r"non-nearest code for about (\d+)% of second-moment values \(squared `randn`, unsigned map\) and (0\.\d+)% of `randn` values",
        lambda: (bitsandbytes_non_nearest()[3], bitsandbytes_non_nearest()[0]),
    ),
    Claim(
        "quant-bnb-non-nearest-range",
        "docs/quantization.md",
        r"another code for (0\.\d+)-(0\.\d+)% of `randn` values",
        lambda: bitsandbytes_non_nearest()[1:3],
    ),
    Claim(
        "quant-encoder-layout",
        "docs/quantization.md",
        r"The table holds (\d+) lines, and per binade of `\|s\| \* c` \((\d+) slots, one per float32 exponent from (2\^-\d+) up;"
        r" the builder picks the scale `c` in \[(0\.5), 1\)",
        lambda: (
            encoder_table.LINES,
            encoder_table.SLOTS,
            2.0 ** (encoder_table.SLOT_BASE_EXPONENT - 127),
            min(encoder_table.SLOT_SCALES),
        ),
    ),
    Claim(
        "quant-encoder-slot",
        "docs/quantization.md",
        r"`slot = max\(exponent\(\|s\| \* c\), (\d+)\) - (\d+)`",
        lambda: (encoder_table.SLOT_BASE_EXPONENT, encoder_table.SLOT_BASE_EXPONENT),
    ),
    Claim(
        "quant-encoder-clamp",
        "docs/quantization.md",
        r"clamped to \[(0), (\d+)\]",
        lambda: (0, encoder_table.MAP_LAST),
    ),
    Claim(
        "quant-encoder-guard",
        "docs/quantization.md",
        r"When `h` lies within (2\^-\d+) of an integer \(about (0\.\d+)% of values: .*? by the (\d+)-step binary search",
        lambda: (encoder_table.GUARD, 100 * GUARD_P, math.log2(MAP_SIZE)),
    ),
    Claim(
        "quant-exhaustive-samples",
        "docs/quantization.md",
        r"and (2\^\d+) stratified values in \[-1, 1\]",
        lambda: [constant_of_test("test_encoder_exhaustive", "SAMPLES")],
    ),
    Claim(
        "quant-accuracy-abs",
        "docs/quantization.md",
        row("mean abs error, measured", 7),
        lambda: [round_trip_table()[b][0] for b in BLOCKSIZES],
    ),
    Claim(
        "quant-accuracy-rel",
        "docs/quantization.md",
        row("mean rel error, measured", 7),
        lambda: [round_trip_table()[b][1] for b in BLOCKSIZES],
    ),
    Claim(
        "quant-bound-abs",
        "docs/quantization.md",
        row("mean abs error, tested bound", 7),
        lambda: [ERROR_BOUNDS[b][0] for b in BLOCKSIZES],
    ),
    Claim(
        "quant-bound-rel",
        "docs/quantization.md",
        row("mean rel error, tested bound", 7),
        lambda: [ERROR_BOUNDS[b][1] for b in BLOCKSIZES],
    ),
    Claim(
        "quant-bound-margin",
        "docs/quantization.md",
        r"(\d)-(\d)% above the measurements",
        lambda: (min(bound_margins()), max(bound_margins())),
    ),
    Claim(
        "quant-quantile-chunks",
        "docs/quantization.md",
        r"into chunks of (\d,\d+) values, .*? O\(n log (\d+)\)",
        lambda: (quantiles.DEFAULT_CHUNK, quantiles.DEFAULT_CHUNK),
    ),
    Claim(
        "quant-quantile-offset",
        "docs/quantization.md",
        r"`1 / \(2 \* num_quantiles\)` \(1/(\d+) for (\d+)\)",
        lambda: (1 / quantiles.default_offset(256), default_of(F.estimate_quantiles, "num_quantiles")),
    ),
    Claim(
        "quant-few-quantiles",
        "docs/quantization.md",
        r"max error (\d\.\d+) against the quantiles at `linspace\(1/30, 29/30, 15\)` of `randn\(2\^20\)`; (0\.\d+) with the rule;"
        r" `tests/test_compat_functional\.py` bounds it by (0\.\d+)\)",
        lambda: (*few_quantile_errors(), constant_of_test("test_compat_functional", "QUANTILE_LIMIT")),
    ),
    # docs/optimizers.md
    Claim(
        "optim-state-bytes",
        "docs/optimizers.md",
        r"\((\d) bytes per parameter instead of (\d) for Adam\)",
        lambda: (quantize_state_bytes_per_param(True), quantize_state_bytes_per_param(False)),
    ),
    Claim(
        "optim-blocks",
        "docs/optimizers.md",
        r"\(blocks of (\d+) starting at each parameter's first element\)",
        lambda: [layout.DEFAULT_BLOCKSIZE],
    ),
    Claim(
        "optim-percentile-history", "docs/optimizers.md", r"percentile of its last (\d+) gradient norms", lambda: [norms.HISTORY]
    ),
    Claim(
        "optim-state-version",
        "docs/optimizers.md",
        r"`dist8bit_state_version` \(currently (\d+)\)",
        lambda: [STATE_FORMAT_VERSION],
    ),
    Claim(
        "optim-compat-state-tolerance",
        "docs/optimizers.md",
        r"32-bit states agree within (\de-\d) \(relative\)",
        lambda: [constant_of_test("test_compat_optim", "STATE_RTOL")],
    ),
    Claim(
        "optim-bnb-max-unorm",
        "docs/optimizers.md",
        r"\| default `max_unorm` \| (\d\.\d) \(LAMB\), (0\.\d+) \(LARS\) \| (\d) \(off\)",
        lambda: (
            default_of(bitsandbytes().optim.LAMB, "max_unorm"),
            default_of(bitsandbytes().optim.LARS, "max_unorm"),
            default_of(Optimizer8bit.__init__, "max_unorm"),
        ),
    ),
    Claim(
        "optim-bnb-functional-blocksize",
        "docs/optimizers.md",
        r"`functional\.quantize_blockwise` blocksize \| default (\d+) \| default (\d+)",
        lambda: (default_of(bitsandbytes().functional.quantize_blockwise, "blocksize"), layout.DEFAULT_BLOCKSIZE),
    ),
    # docs/benchmarks.md
    Claim(
        "bench-gpt125m",
        "docs/benchmarks.md",
        r"over the (\d+) tensors of GPT-2 small \((\d+\.\d)M parameters",
        lambda: (len(gpt_shapes()), numel(gpt_shapes()) / 1e6),
    ),
    Claim(
        "bench-bound-bytes",
        "docs/benchmarks.md",
        r"of (\d+\.\d+) B/param bound at copy bw",
        lambda: [bytes_per_param("dist8bit AdamW8bit", 4)],
    ),
    Claim(
        "bench-convert-model",
        "docs/benchmarks.md",
        r"\(width (\d+), (\d+) layers, vocab (\d+): (\d+\.\d)M parameters, (\d+) tensors, (\d+) MB of exp_avg/exp_avg_sq\)",
        convert_bench_model,
    ),
    Claim(
        "bench-launcher-model",
        "docs/benchmarks.md",
        r"a (0\.\d+)M parameter char-level GPT .*? optimizer state (\d\.\d+) MiB vs (\d\.\d+) MiB per rank",
        lambda: (launcher_model()[0] / 1e6, *launcher_model()[1:]),
    ),
    Claim(
        "bench-quantile-bound",
        "docs/benchmarks.md",
        r"tests/test_quantiles\.py bounds it by (0\.\d+) on randn\(2\^20\) and randn\(2\^22\)",
        lambda: [max(constant_of_test("test_quantiles", "INNER_BOUNDS")[n] for n in (1 << 20, 1 << 22))],
    ),
    Claim(
        "bench-quantile-chunk",
        "docs/benchmarks.md",
        r"exact for inputs up to one chunk of (\d,\d+)",
        lambda: [quantiles.DEFAULT_CHUNK],
    ),
    Claim("bench-convert-chunk", "docs/benchmarks.md", r"Memory stays at one (\d+)M-element chunk", lambda: [plan.CHUNK / MIB]),
    Claim(
        "bench-memory-test",
        "docs/benchmarks.md",
        r"a checkpoint with (\d+) MiB more fp32 state \(one (\d+)M- instead of one (\d+)M-element parameter\) may raise peak RSS by"
        r" under (\d+) MiB",
        lambda: (memory_test_sizes()[2], memory_test_sizes()[0], memory_test_sizes()[1], memory_test_sizes()[4]),
    ),
    # docs/checkpoints.md
    Claim(
        "ckpt-usage-defaults",
        "docs/checkpoints.md",
        r"\[--blocksize (\d+)\] \[--min-8bit-size (\d+)\]",
        lambda: (layout.DEFAULT_BLOCKSIZE, MIN_8BIT_SIZE),
    ),
    Claim(
        "ckpt-min-8bit",
        "docs/checkpoints.md",
        r"Parameters with fewer than (\d,\d+) elements keep fp32 state",
        lambda: [MIN_8BIT_SIZE],
    ),
    Claim(
        "ckpt-zero-padding",
        "docs/checkpoints.md",
        r"padded to a multiple of (\d) x world size",
        lambda: [zero_partition.ALIGNMENT_FACTOR],
    ),
    Claim(
        "ckpt-packed-layout",
        "docs/checkpoints.md",
        r"state version (\d): every segment's run starts on a (\d+)-byte boundary",
        lambda: (STATE_FORMAT_VERSION, segments.PACKED_ALIGNMENT),
    ),
    Claim("ckpt-dcp-min-8bit", "docs/checkpoints.md", r"`--min-8bit-size` \((\d+)\) elements or more", lambda: [MIN_8BIT_SIZE]),
    Claim(
        "ckpt-error-bound",
        "docs/checkpoints.md",
        r": (0\.\d+) \(signed map\) and (0\.\d+) \(unsigned map\)\. `--verify` checks every block against it \(plus (2\^-\d+) x absmax",
        lambda: (
            codec.error_bound(F.create_dynamic_map(signed=True)),
            codec.error_bound(F.create_dynamic_map(signed=False)),
            verify.ROUNDING,
        ),
    ),
    Claim(
        "ckpt-scale-recovery",
        "docs/checkpoints.md",
        r"most negative value is (-0\.\d+), not -1, .*? shrink that block's scale by (0\.\d)% .*? tries the scales absmax / (0\.\d+)"
        r" \+- (\d) ulps, .*? a probe of (\d+) blocks per (\d+)M-element chunk",
        lambda: (
            float(F.create_dynamic_map().min()),
            100 * (1 + float(F.create_dynamic_map().min())),
            -float(F.create_dynamic_map().min()),
            max(codec.CANDIDATE_ULPS),
            codec.PROBE,
            plan.CHUNK / MIB,
        ),
    ),
    Claim(
        "ckpt-bnb-state-dict",
        "docs/checkpoints.md",
        r"after (\d) bitsandbytes steps, .*? \(bounds (1e-4) and (\d)%\)",
        lambda: (
            constant_of_test("test_bnb_state_dict", "STEPS"),
            constant_of_test("test_bnb_state_dict", "RELATIVE_BOUND")[32],
            100 * constant_of_test("test_bnb_state_dict", "RELATIVE_BOUND")[8],
        ),
    ),
    Claim("ckpt-chunks", "docs/checkpoints.md", r"processed in chunks of (\d+)M elements", lambda: [plan.CHUNK / MIB]),
    Claim(
        "ckpt-memory-test",
        "docs/checkpoints.md",
        r"one parameter has (\d+)M instead of (\d+)M elements \((\d+) MiB more fp32 state; a converter holding a whole state tensor"
        r" would need (\d+) MiB more\) may raise peak RSS \(VmHWM\) by under (\d+) MiB",
        memory_test_sizes,
    ),
    Claim(
        "ckpt-dcp-test",
        "docs/checkpoints.md",
        r"2 gloo CPU ranks, lr (1e-2), (\d+) steps, DCP checkpoint after step (\d+),",
        lambda: (
            constant_of_test("test_checkpoint_dcp", "LR"),
            constant_of_test("test_checkpoint_dcp", "STEPS"),
            constant_of_test("test_checkpoint_dcp", "SAVE_AFTER"),
        ),
    ),
    # docs/deepspeed.md
    Claim(
        "ds-version",
        "docs/deepspeed.md",
        r"Supported DeepSpeed: \*\*0\.(\d+)\.x, tested on 0\.19\.(\d+)\*\*",
        lambda: (ds_integration.SUPPORTED_SERIES[1], int(ds_integration.TESTED_VERSION.split(".")[2])),
    ),
    Claim(
        "ds-diagram-sizes",
        "docs/deepspeed.md",
        r"\[emb (\d+) \| w (\d+) \| b (\d+)\] \((\d+) elements, padded to (\d+)\) .*? (\d+) elements .*? (\d+) elements",
        lambda: (
            *DIAGRAM_NUMELS,
            sum(DIAGRAM_NUMELS),
            2 * zero_partition.zero12_partition_numel(DIAGRAM_NUMELS, 2),
            zero_partition.zero12_partition_numel(DIAGRAM_NUMELS, 2),
            zero_partition.zero12_partition_numel(DIAGRAM_NUMELS, 2),
        ),
    ),
    Claim("ds-diagram-8bit", "docs/deepspeed.md", r"8-bit \(5328 >= (\d+)\)", lambda: [MIN_8BIT_SIZE]),
    Claim(
        "ds-packed-layout",
        "docs/deepspeed.md",
        r"start on a (\d+)-byte boundary of their packed tensor.* `dist8bit_state_version: (\d)`",
        lambda: (segments.PACKED_ALIGNMENT, STATE_FORMAT_VERSION),
    ),
    # docs/distributed.md
    Claim(
        "dist-row-blocks",
        "docs/distributed.md",
        r"at most `blocksize` \((\d+)\) and at least (\d+), .*? not a multiple of (\d+) elements \(1-D parameters of (\d+) or more"
        r" elements, odd widths\) .*? Parameters under (\d+) elements",
        lambda: (layout.DEFAULT_BLOCKSIZE, layout.MIN_BLOCKSIZE, layout.MIN_BLOCKSIZE, MIN_8BIT_SIZE, MIN_8BIT_SIZE),
    ),
    Claim(
        "dist-fsdp-test",
        "docs/distributed.md",
        r"parameters equal within 1e-5 after (\d+) steps\)\. .*? saved on 2 ranks at step (\d+), resumed",
        lambda: (constant_of_test("test_fsdp", "STEPS"), constant_of_test("test_fsdp", "SAVE_AT")),
    ),
    # docs/gpu_check.md
    Claim(
        "gpu-check-timeouts",
        "docs/gpu_check.md",
        r".*?".join([r"\| (\d+) s \|"] * 5 + [r"\| (\d+) s each \|", r"\| (\d+) s \|", r"\| (\d+) s each \|"]),
        lambda: (
            gpu_check_steps.WHEELS_S,
            gpu_check_steps.BUILD_S,
            gpu_check_steps.TESTS_S,
            gpu_check_steps.SLOW_TESTS_S,
            gpu_check_steps.QUANTIZE_S,
            gpu_check_steps.OPTIM_RUN_S,
            gpu_check_steps.PAGED_S,
            gpu_check_steps.LAUNCH_RUN_S,
        ),
    ),
    Claim(
        "gpu-check-launch-steps",
        "docs/gpu_check.md",
        r"--optim adamw8bit --steps (\d+) --no-checkpoint",
        lambda: [gpu_check_steps.LAUNCH_STEPS],
    ),
    Claim(
        "gpu-check-budget",
        "docs/gpu_check.md",
        r"they add up to (\d+) s and scale with `--time-budget-s` \(default (\d+)\)",
        lambda: (gpu_check_total(), gpu_check_steps.TOTAL_BUDGET_S),
    ),
    Claim(
        "gpu-check-record",
        "docs/gpu_check.md",
        r"the last (\d,\d+) characters of its output .*? `failing`: up to (\d+) test ids",
        lambda: (gpu_check.ERROR_TAIL_CHARS, gpu_check_parse.MAX_LISTED_FAILURES),
    ),
    Claim(
        "gpu-check-bound",
        "docs/gpu_check.md",
        r"\((\d+\.\d+) for fp32, (\d+\.\d+) for bf16: (\d) x element \+ (\d\.\d+)\)",
        lambda: (
            bytes_per_param("dist8bit AdamW8bit", 4),
            bytes_per_param("dist8bit AdamW8bit", 2),
            (bytes_per_param("dist8bit AdamW8bit", 4) - bytes_per_param("dist8bit AdamW8bit", 2)) / 2,
            bytes_per_param("dist8bit AdamW8bit", 0),
        ),
    ),
    Claim(
        "gpu-check-bars",
        "docs/gpu_check.md",
        r"`of_copy_bw` >= (\d\.\d+) .*? `vs_torch_fused` >= (\d\.\d+), .*? overhead <= (\d+)% .*? losses within (\d+)%",
        lambda: (
            gpu_check_parse.BOUND_FRACTION_BAR,
            gpu_check_parse.VS_FUSED_BAR,
            100 * gpu_check_parse.PAGED_OVERHEAD_BAR,
            100 * gpu_check_parse.LAUNCH_LOSS_SPREAD_BAR,
        ),
    ),
    # docs/paging.md
    Claim(
        "paging-min-bytes", "docs/paging.md", r"States under `MIN_PAGED_BYTES` \((\d+) KiB\)", lambda: [MIN_PAGED_BYTES / 1024]
    ),
    Claim(
        "paging-bench",
        "docs/paging.md",
        r"\(the overhead bar is ≤ (\d+)%\), .*? more than (half) the free GPU memory",
        lambda: (100 * paged.OVERHEAD_BAR, paged.SAFE_FRACTION),
    ),
    # docs/pretraining.md
    Claim(
        "pretrain-main-job",
        "docs/pretraining.md",
        r"(\d+) steps, (\d,\d+) tokens per step, (0\.\d+) M parameters",
        lambda: (launcher_defaults()[0], launcher_defaults()[1], launcher_model()[0] / 1e6),
    ),
    Claim(
        "pretrain-banner",
        "docs/pretraining.md",
        r"model (0\.\d+)M params \| adamw8bit \(AdamW8bit\) lr (0\.\d+) \| (\d+) tokens/step",
        lambda: (launcher_model()[0] / 1e6, launcher_defaults()[2], launcher_defaults()[1]),
    ),
    Claim(
        "pretrain-ddp-state",
        "docs/pretraining.md",
        r"\| ddp \| adamw8bit \| [\d.]+ \| [\d.]+ \| (\d\.\d+) MiB \| .*? \| ddp \| adamw32bit \| [\d.]+ \| [\d.]+ \| (\d\.\d+) MiB",
        lambda: launcher_model()[1:],
    ),
    # docs/cuda_encoder.md
    Claim(
        "cuda-table-size",
        "docs/cuda_encoder.md",
        r"(\d+) floats padded to (\d+)\.",
        lambda: (encoder_table.TABLE_SIZE, 4 * math.ceil(encoder_table.TABLE_SIZE / 4)),
    ),
    Claim(
        "cuda-encoder-in-csrc",
        "docs/cuda_encoder.md",
        r"(\d+) floats padded to",
        lambda: [csrc_constant("common/code_search.h", "kEncoderTableSize")],
    ),
    Claim(
        "cuda-shared-memory",
        "docs/cuda_encoder.md",
        r"The fused step stores (\d+,\d+) B per slot: .*? That is (\d+\.\d) KB for Adam and (\d+) KB for AdEMAMix",
        lambda: (
            fused_step_slot_bytes(),
            len(ADAM_STATES) * fused_step_slot_bytes() / 1000,
            len(ADEMAMIX_STATES) * fused_step_slot_bytes() / 1000,
        ),
    ),
    Claim(
        "cuda-quantize-bounds",
        "docs/cuda_encoder.md",
        r"\| quantize_fast \(BS 64\.\.4096, all dtypes, \+SR\) \| \((\d+), (\d)\) .*? \| \((\d+), (\d)\) .*? "
        r"\| dequantize \| \((\d+), (\d)\) \| [\d.]+, (\d+) KB smem",
        lambda: (
            csrc_constant("cuda/quantize_kernels.cu", "kThreads"),
            csrc_constant("cuda/quantize_kernels.cu", "kFastBlocksPerSM"),
            csrc_constant("cuda/quantize_kernels.cu", "kThreads"),
            csrc_constant("cuda/quantize_kernels.cu", "kScalarBlocksPerSM"),
            csrc_constant("cuda/quantize_kernels.cu", "kThreads"),
            csrc_constant("cuda/quantize_kernels.cu", "kDequantBlocksPerSM"),
            private_code_words() * 4 / 1024,
        ),
    ),
    Claim(
        "cuda-fallback-rate",
        "docs/cuda_encoder.md",
        r"within `guard = (2\^-\d+)` of an integer, .*? about 2 x guard = (0\.\d+)% of values\. .*? with p = (\d\.\de-\d), .*? about (\d\.\d)%\.",
        lambda: (encoder_table.GUARD, 100 * GUARD_P, GUARD_P, 100 * (1 - (1 - GUARD_P) ** 32)),
    ),
    Claim(
        "cuda-private-codes",
        "docs/cuda_encoder.md",
        r"holds `code\[c\]`, which is (\d+) words \((\d+) KB\) per codebook",
        lambda: (MAP_SIZE * 32, MAP_SIZE * 32 * 4 / 1024),
    ),
    Claim(
        "cuda-roofline",
        "docs/cuda_encoder.md",
        row("HBM bytes per clock per SM", 2, r"(\d+\.\d)")
        + " "
        + re.escape("| fp32 params, ")
        + r"(\d+\.\d+) B/param: HBM time per 10\^9 params \| (\d\.\d+) ms \| (\d\.\d+) ms \| \| \.\.\. clocks per param per SM at"
        r" that rate \| (\d\.\d+) \| (\d\.\d+) \| \| bf16 params, (\d+\.\d+) B/param: HBM time per 10\^9 params \| (\d\.\d+) ms \|"
        r" (\d\.\d+) ms \| \| \.\.\. clocks per param per SM \| (\d\.\d+) \| (\d\.\d+) \|",
        roofline,
    ),
    Claim(
        "cuda-old-smem",
        "docs/cuda_encoder.md",
        r"2 slots x \(decode 3/32 \+ encode 31/32\) = (\d\.\d+) clk/param\. That is (\d\.\d) ms per 10\^9 params",
        lambda: (2 * (3 + 31) / 32, 2 * (3 + 31) / 32 / (132 * 1.755e9) * 1e12),
    ),
]


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_doc_states_what_the_code_gives(claim: Claim):
    written = claim.written()
    actual = list(claim.values())
    assert len(actual) == len(written), (claim.id, written, actual)
    for text, value in zip(written, actual, strict=True):
        number, half_unit = parse_written(text)
        assert agrees(number, half_unit, float(value)), f"{claim.doc} says {text}, the code gives {value} ({claim.id})"


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_a_drifted_number_is_caught(claim: Claim):
    """Three units of the last written digit off (or 1 off an exact power) must fail the comparison."""
    for text, value in zip(claim.written(), claim.values(), strict=True):
        number, half_unit = parse_written(text)
        drift = 6 * half_unit if half_unit else 1.0
        assert not agrees(number + drift, half_unit, float(value)), (claim.id, text)
        assert not agrees(number - drift, half_unit, float(value)), (claim.id, text)


# ---------------------------------------------------------------------------------------- signatures and defaults


@dataclass(frozen=True)
class SignatureClaim:
    """A call written in a doc as `name(arg, ..., key=default, ...)`: its names in order and defaults
    must be the function's."""

    doc: str
    call: str
    function: Callable


SIGNATURES = [
    SignatureClaim(
        "docs/quantization.md",
        "F.quantize_blockwise(A, code=None, absmax=None, out=None, blocksize=256, stochastic_rounding=False, seed=None, nested=False)",
        F.quantize_blockwise,
    ),
    SignatureClaim(
        "docs/quantization.md", "create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)", F.create_dynamic_map
    ),
    SignatureClaim("docs/quantization.md", "create_linear_map(signed=True, total_bits=8, add_zero=True)", F.create_linear_map),
    SignatureClaim(
        "docs/quantization.md", "create_fp8_map(signed=True, exponent_bits=5, precision_bits=2, total_bits=8)", F.create_fp8_map
    ),
    SignatureClaim("docs/quantization.md", "create_normal_map(offset=0.9677083, use_extra_value=True)", F.create_normal_map),
    SignatureClaim("docs/quantization.md", "create_quantile_map(A, total_bits=8)", F.create_quantile_map),
    SignatureClaim("docs/quantization.md", "estimate_quantiles(A, offset=None, num_quantiles=256)", F.estimate_quantiles),
    SignatureClaim(
        "docs/quantization.md", "quantize_blockwise(A, code, absmax, out, blocksize=4096, nested=False)", CF.quantize_blockwise
    ),
    SignatureClaim(
        "docs/quantization.md",
        "dequantize_blockwise(A, quant_state, absmax, code, out, blocksize=4096, nested=False)",
        CF.dequantize_blockwise,
    ),
    SignatureClaim("docs/quantization.md", "estimate_quantiles(A, out, offset=1/512, num_quantiles=256)", CF.estimate_quantiles),
]


def written_call(call: str) -> tuple[list[str], dict[str, object]]:
    """Argument names in order and the keyword defaults of a call as written (arithmetic such as 1/512 allowed)."""
    node = ast.parse(call, mode="eval").body
    assert isinstance(node, ast.Call)
    names = [arg.id for arg in node.args]  # positional arguments are written as their parameter's name
    defaults = {kw.arg: eval(compile(ast.Expression(kw.value), "<doc>", "eval"), {"__builtins__": {}}) for kw in node.keywords}
    return names + list(defaults), defaults


@pytest.mark.parametrize("claim", SIGNATURES, ids=[f"{c.function.__module__}.{c.call.split('(')[0]}" for c in SIGNATURES])
def test_documented_signature_is_the_code_s(claim: SignatureClaim):
    assert claim.call in doc_text(claim.doc), f"{claim.doc} no longer shows {claim.call}"
    names, defaults = written_call(claim.call)
    parameters = inspect.signature(claim.function).parameters
    assert list(parameters)[: len(names)] == names, (claim.call, list(parameters))
    for name, value in defaults.items():
        assert parameters[name].default == value, (claim.call, name, parameters[name].default)


OPTIMIZER_FAMILIES = (
    optim.Adam,
    optim.AdamW,
    optim.SGD,
    optim.RMSprop,
    optim.Adagrad,
    optim.Lion,
    optim.LAMB,
    optim.LARS,
    optim.AdEMAMix,
)


def test_documented_common_optimizer_arguments_are_every_optimizer_s_defaults():
    """docs/optimizers.md's "Common arguments": each `name=value` is the default every family's optimizer gets."""
    sentence = re.search(r"Common arguments \(bitsandbytes' names\): (.*?error_bits=8`)", doc_text("docs/optimizers.md"))
    assert sentence, "docs/optimizers.md: the Common arguments sentence is gone"
    written = dict(re.findall(r"`(\w+)=([\w.]+)`", sentence.group(1)))
    assert len(written) == 10, written
    base = inspect.signature(Optimizer8bit.__init__).parameters
    for name, text in written.items():
        assert base[name].default == ast.literal_eval(text), (name, text, base[name].default)
    for family in OPTIMIZER_FAMILIES:
        optimizer = family([torch.nn.Parameter(torch.zeros(2))])
        for name, text in written.items():
            if name == "master_weights":  # None resolves to the group's mode
                assert optimizer.defaults[name] == "none", (family.__name__, optimizer.defaults[name])
            elif name in optimizer.defaults:  # stochastic_rounding is an attribute, not a group key
                assert optimizer.defaults[name] == ast.literal_eval(text), (family.__name__, name)
            else:
                assert getattr(optimizer, name) == ast.literal_eval(text), (family.__name__, name)


# ---------------------------------------------------------------------------------------- the ZeRO diagram


SEGMENT = re.compile(r"Segment\((\w+), start=(\d+), length=(\d+), param_offset=(\d+), logical_numel=(\d+)\)")


def test_deepspeed_diagram_segments_are_zero_partitions():
    """docs/deepspeed.md's diagram: [emb 4800 | w 5328 | b 111] on 2 ranks, ZeRO 1/2 (rank 0, rank 1) then
    ZeRO-3 (rank 1), segment for segment as dist8bit/integrations/zero_partition.py cuts them."""
    names = ("emb", "w", "b")
    written = [(name, *map(int, rest)) for name, *rest in SEGMENT.findall(doc_text("docs/deepspeed.md"))]
    expected = []
    for rank in (0, 1):
        for span in zero_partition.zero12_spans(DIAGRAM_NUMELS, 2, rank):
            expected.append((names[span.index], span.start, span.length, span.param_offset, DIAGRAM_NUMELS[span.index]))
    partitions = [zero_partition.zero3_partition_numel(n, 2) for n in DIAGRAM_NUMELS[1:]]  # the diagram's sub-group: w, b
    spans, _ = zero_partition.zero3_spans(DIAGRAM_NUMELS[1:], partitions, [1, 1])
    for span in spans:
        expected.append((names[span.index + 1], span.start, span.length, span.param_offset, DIAGRAM_NUMELS[span.index + 1]))
    assert written == expected
    w, b = partitions
    assert f"|w[{w}:{2 * w}]|b[{b}:{DIAGRAM_NUMELS[2]}] p|" in doc_text("docs/deepspeed.md")


# ---------------------------------------------------------------------------------------- a planted encoder defect


CORRUPTION = re.compile(
    r"Corrupting the table's offsets by (0\.\d) makes the CPU kernel miss the nearest code for (\d[\d,]*) of (2\^\d+)"
)


@needs_compiled("cpu")
def test_a_corrupted_encoder_table_is_caught_by_the_oracle():
    """docs/quantization.md: the encoder-table shortcut is checked against the nearest-code oracle of
    tests/test_encoder_exhaustive.py; offsets moved by 0.3 make the CPU kernel fail it that many times
    (uniform values in [-1, 1], seed 0, blocks of 64 whose first value is 1, so s is the value itself)."""
    from test_encoder_exhaustive import nearest_code_oracle

    from dist8bit.backends import load_backend
    from dist8bit.quant.codebook import Codebook

    shift, written_count, written_total = CORRUPTION.search(doc_text("docs/quantization.md")).groups()
    total = int(parse_written(written_total)[0])
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(total, generator=generator) * 2 - 1
    x.view(-1, 64)[:, 0] = 1.0
    codebook = build_codebook(F.create_dynamic_map(signed=True))
    encoder = codebook.encoder.clone()
    first, last = 2 * encoder_table.SLOTS + encoder_table.LINES, 2 * encoder_table.SLOTS + 2 * encoder_table.LINES
    encoder[first:last] += float(shift)  # every line's offset
    cpu = load_backend("cpu")

    def encode(book: Codebook) -> torch.Tensor:
        codes, absmax = torch.empty(total, dtype=torch.uint8), torch.empty(total // 64)
        cpu.quantize_blockwise(x, book, 64, None, codes, absmax)
        assert torch.all(absmax == 1)
        return codes.long()

    oracle = nearest_code_oracle(codebook.code, x)
    assert torch.equal(encode(codebook), oracle)  # the intact table gives the nearest code everywhere
    misses = int((encode(Codebook(codebook.code, codebook.thresholds, encoder)) != oracle).sum())
    assert misses == int(written_count.replace(",", "")), f"docs/quantization.md says {written_count}, the kernel misses {misses}"
