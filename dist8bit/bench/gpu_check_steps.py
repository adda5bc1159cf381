"""The gpu-check plan: which commands run, in which order, with which time budget.

The budgets add up to TOTAL_BUDGET_S (the issue's 10 minutes) and are scaled
by --time-budget-s, so one run fits its wall-clock limit even when every step
hangs. Each step's parser turns what the step wrote into gpu_check.json
entries (see gpu_check_parse).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import gpu_check_parse as parse
from .optim import bytes_per_param

TOTAL_BUDGET_S = 600.0
# Seconds per step at --time-budget-s 600 (593 in all: the rest is the check's own start and writing).
WHEELS_S = 20.0
BUILD_S = 120.0
TESTS_S = 130.0
SLOW_TESTS_S = 30.0
QUANTIZE_S = 40.0
OPTIM_RUN_S = 18.0  # each of the 6 (preset, dtype) runs
PAGED_S = 40.0
LAUNCH_RUN_S = 30.0  # each of the 3 strategies
COMPENSATED_S = 15.0  # the compensated bf16 step vs the plain one (issue 16), last

OPTIM_PRESETS = ("one-2^28", "one-2^24", "gpt125m")  # the 2^28 run first: it carries the bars
OPTIM_DTYPES = {"fp32": 4, "bf16": 2}  # parameter element bytes
OPTIM_IMPLS = (
    "dist8bit AdamW8bit,dist8bit AdamW4bit,dist8bit AdamW32bit,torch AdamW fused,torchao AdamW8bit,bitsandbytes AdamW8bit"
)
OPTIM_TIMING_S = 1.0  # optim bench --budget: seconds of timing per optimizer
QUANTIZE_TIMING_S = 0.5
PAGED_TIMING_S = 1.0
COMPENSATED_TIMING_S = 3.0  # gpu_check_compensated --budget: seconds of timing over its three modes
LAUNCH_STRATEGIES = ("ddp", "fsdp", "deepspeed")
LAUNCH_STEPS = 200
ZERO2_CONFIG = "launch/configs/zero2_adamw8bit.json"
GPU_TEST_FILES = (
    "tests/test_compat_functional.py",
    "tests/test_cuda_kernels.py",
    "tests/test_cuda_fused_step.py",
    "tests/test_encoder_exhaustive.py",
    "tests/test_functional.py",
    "tests/test_oracles.py",
    "tests/test_optim_*.py",
    "tests/test_paging.py",
)
# pyproject.toml declares both markers; the >2^31-element cases are marked slow.
FAST_GPU_TESTS = "gpu and not slow"
SLOW_GPU_TESTS = "gpu and slow"
# Families counted on their own in the tests steps' metrics: name -> (test module, substring of
# the test name). The CUDA fused step's 4-bit cases (issue 15) and compensated bf16 cases (issue
# 16) run in the `tests` step with the rest of tests/test_cuda_fused_step.py; their ids contain
# "4bit" and "compensated".
TEST_SUBSETS = {
    "fused_step_4bit": ("test_cuda_fused_step", "4bit"),
    "fused_step_compensated": ("test_cuda_fused_step", "compensated"),
}


@dataclass(frozen=True)
class Step:
    """One subprocess of the check; `skip_reason` set means it is recorded as skipped without running."""

    name: str
    command: list[str]
    budget_s: float
    needs_gpu: bool = True
    parse: Callable[[str], dict] | None = None
    env: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None


def repo_root() -> Path:
    """The checkout holding tests/ and launch/ (dist8bit/bench/ is two levels below it)."""
    return Path(__file__).resolve().parents[2]


def gpu_test_files(root: Path) -> list[str]:
    files: list[str] = []
    for pattern in GPU_TEST_FILES:
        matches = sorted(str(p.relative_to(root)) for p in root.glob(pattern))
        files += matches or [pattern]
    return files


def wheel_packages(folder: Path) -> list[str]:
    """Distribution names of the wheels in `folder` (the first field of a wheel's file name)."""
    return sorted({p.name.split("-")[0].replace("_", "-").lower() for p in folder.glob("*.whl")})


def wheels_step(folder: Path | None, scale: float) -> Step:
    python = sys.executable
    if folder is None:
        return Step("wheels", [], WHEELS_S * scale, needs_gpu=False, skip_reason="no --wheels given")
    packages = wheel_packages(folder)
    if not packages:
        return Step("wheels", [], WHEELS_S * scale, needs_gpu=False, skip_reason=f"no .whl files in {folder}")
    command = [python, "-m", "pip", "install", "--no-index", "--find-links", str(folder), *packages]
    return Step("wheels", command, WHEELS_S * scale, needs_gpu=False, parse=lambda _: {"packages": packages})


def _pytest(name: str, marker: str, out: Path, root: Path, budget_s: float) -> Step:
    junit = out / "tests" / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", *gpu_test_files(root), "-m", marker, "-p", "no:cacheprovider"]
    command += ["-q", "--junitxml", str(junit)]
    return Step(name, command, budget_s, parse=lambda output: parse.tests(output, junit, TEST_SUBSETS))


def _optim(preset: str, dtype: str, element: int, bench: Path, budget_s: float) -> Step:
    command = [sys.executable, "-m", "dist8bit.bench", "optim", "--preset", preset, "--dtype", dtype]
    command += ["--budget", str(OPTIM_TIMING_S), "--only", OPTIM_IMPLS, "--out", str(bench)]
    bound = bytes_per_param("AdamW8bit", element)
    path = bench / f"optim-{preset}-{dtype}.json"
    return Step(f"optim {preset} {dtype}", command, budget_s, parse=lambda _: parse.optim(path, bound))


def _launch(strategy: str, out: Path, budget_s: float) -> Step:
    run_dir = out / "launch" / strategy
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += ["launch/pretrain.py", "--strategy", strategy, "--optim", "adamw8bit", "--steps", str(LAUNCH_STEPS)]
    command += ["--out-dir", str(run_dir), "--no-checkpoint", "--no-progress"]
    if strategy == "deepspeed":
        command += ["--deepspeed_config", ZERO2_CONFIG]
    return Step(f"launch {strategy}", command, budget_s, parse=lambda _: parse.launch(run_dir / "metrics.json"))


def plan(out: Path, time_budget_s: float = TOTAL_BUDGET_S, wheels: Path | None = None) -> list[Step]:
    """Every step in the issue's order: wheels, build, tests (slow last), quantize, optim, paged, launcher,
    then the compensated bf16 step's timing (issue 16)."""
    scale = time_budget_s / TOTAL_BUDGET_S
    root = repo_root()
    bench = out / "bench"
    python = sys.executable
    bench_cmd = [python, "-m", "dist8bit.bench"]
    quantize_cmd = [*bench_cmd, "quantize", "--dtypes", "fp32,bf16", "--skip-reference", "--budget", str(QUANTIZE_TIMING_S)]
    paged_cmd = [*bench_cmd, "paged", "--preset", "gpt125m", "--optimizer", "AdamW8bit", "--budget", str(PAGED_TIMING_S)]
    steps = [
        wheels_step(wheels, scale),
        Step("build", [python, "-m", "dist8bit.bench.gpu_check_build"], BUILD_S * scale, parse=parse.build),
        _pytest("tests", FAST_GPU_TESTS, out, root, TESTS_S * scale),
        _pytest("tests-slow", SLOW_GPU_TESTS, out, root, SLOW_TESTS_S * scale),
        Step(
            "quantize",
            [*quantize_cmd, "--out", str(bench)],
            QUANTIZE_S * scale,
            parse=lambda _: parse.quantize(bench / "quantize.json"),
        ),
    ]
    steps += [
        _optim(preset, dtype, element, bench, OPTIM_RUN_S * scale)
        for dtype, element in OPTIM_DTYPES.items()
        for preset in OPTIM_PRESETS
    ]
    paged_path = bench / "paged-gpt125m-AdamW8bit.json"
    steps.append(
        Step(
            "paged",
            [*paged_cmd, "--out", str(bench)],
            PAGED_S * scale,
            parse=lambda _: parse.paged(paged_path),
        )
    )
    steps += [_launch(strategy, out, LAUNCH_RUN_S * scale) for strategy in LAUNCH_STRATEGIES]
    compensated_cmd = [python, "-m", "dist8bit.bench.gpu_check_compensated", "--budget", str(COMPENSATED_TIMING_S)]
    steps.append(Step("compensated", compensated_cmd, COMPENSATED_S * scale, parse=parse.compensated))
    return steps
