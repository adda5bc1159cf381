"""Prove the GPU path in one run: build, GPU tests, benchmarks, paging and one-GPU launcher runs.

Every step is a subprocess with its own timeout; a failed or timed-out step is
recorded and the next one runs. OUT/gpu_check.json is rewritten after every
step (so a killed run still leaves what it had), OUT/gpu_check.log holds every
subprocess's output. Without a CUDA device every GPU step is recorded as
skipped ("no CUDA device") and the command exits 0; --dry-run replaces every
command by a trivial one to exercise the orchestration anywhere.
See docs/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from . import gpu_check_parse
from .gpu_check_runner import run_command
from .gpu_check_steps import TOTAL_BUDGET_S, Step, plan, repo_root
from .report import format_table

NO_GPU = "no CUDA device"
OUT_OF_TIME = "time budget spent"
MIN_STEP_S = 1.0  # a step with less time than this left is skipped, not started
ERROR_TAIL_CHARS = 3000
FAILED = ("failed", "timeout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"), help="gpu_check.json, gpu_check.log, bench/")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=TOTAL_BUDGET_S,
        help="wall-clock budget of the whole check; every step's timeout scales with it",
    )
    parser.add_argument("--wheels", type=Path, default=None, help="first pip install --no-index every wheel in this folder")
    parser.add_argument("--dry-run", action="store_true", help="replace each step's command by a trivial successful one")


def dry_command(step: Step) -> list[str]:
    """A command that succeeds at once and says what it stands for."""
    return [sys.executable, "-c", f"print({('dry run: ' + shlex.join(step.command))!r})"]


def _write_json(path: Path, payload: dict) -> None:
    """Atomically, so a reader (or a kill) never sees half a file."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def _record(step: Step, status: str, **fields: object) -> dict:
    return {
        "name": step.name,
        "status": status,
        "command": shlex.join(step.command),
        "timeout_s": round(step.budget_s, 1),
        **fields,
    }


def run_step(step: Step, log: TextIO, cwd: Path, deadline: float, gpu: bool, dry_run: bool) -> dict:
    """Run one step (or say why not) and return its record; never raises."""
    if step.skip_reason is not None:
        return _record(step, "skipped", reason=step.skip_reason)
    if step.needs_gpu and not gpu and not dry_run:
        return _record(step, "skipped", reason=NO_GPU)
    timeout_s = min(step.budget_s, deadline - time.monotonic())
    if timeout_s < MIN_STEP_S:
        return _record(step, "skipped", reason=OUT_OF_TIME)
    command = dry_command(step) if dry_run else step.command
    log.write(f"\n===== {step.name}: {shlex.join(command)} (timeout {timeout_s:.0f} s) =====\n")
    log.flush()
    result = run_command(command, timeout_s, log, cwd, step.env)
    status = "timeout" if result.timed_out else "ok" if result.returncode == 0 else "failed"
    record = _record(step, status, returncode=result.returncode, seconds=round(result.seconds, 2), timeout_s=round(timeout_s, 1))
    if status != "ok":
        record["error"] = result.start_error or result.output[-ERROR_TAIL_CHARS:]
    if step.parse is not None and not dry_run:
        try:
            record["metrics"] = step.parse(result.output)
        except Exception as error:  # missing or partial output: the step's status already says what happened
            record["parse_error"] = f"{type(error).__name__}: {error}"
    log.write(f"===== {step.name}: {status} (exit {result.returncode}, {result.seconds:.1f} s) =====\n")
    log.flush()
    return record


def _checks(records: list[dict]) -> dict:
    launches = {r["name"]: r.get("metrics", {}) for r in records if r["name"].startswith("launch ")}
    return {"launch_val_loss_spread": gpu_check_parse.launch_loss_spread(launches)}


def check(steps: list[Step], out: Path, time_budget_s: float, dry_run: bool = False, gpu: bool | None = None) -> dict:
    """Run `steps` in order, rewriting OUT/gpu_check.json after each; return the final summary."""
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    deadline = time.monotonic() + time_budget_s
    summary: dict = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "dist8bit.bench", *sys.argv[1:]]),
        "dry_run": dry_run,
        "time_budget_s": time_budget_s,
        "cuda_available": gpu,
        "gpu": torch.cuda.get_device_name() if gpu and torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "finished": False,
        "steps": [_record(step, "pending") for step in steps],
    }
    json_path = out / "gpu_check.json"
    _write_json(json_path, summary)
    begin = time.monotonic()
    with open(out / "gpu_check.log", "w") as log, tqdm(steps, desc="gpu-check", unit="step") as progress:
        for index, step in enumerate(progress):
            progress.set_postfix_str(step.name)
            record = run_step(step, log, repo_root(), deadline, gpu, dry_run)
            summary["steps"][index] = record
            _write_json(json_path, summary)
            progress.write(f"{step.name}: {record['status']} {record.get('reason', '')}".rstrip())
    summary["checks"] = _checks(summary["steps"])
    summary["seconds"] = round(time.monotonic() - begin, 1)
    summary["finished"] = True
    _write_json(json_path, summary)
    return summary


def summary_table(summary: dict) -> str:
    rows = [
        {
            "step": r["name"],
            "status": r["status"],
            "s": r.get("seconds", ""),
            "result": r.get("metrics", {}).get("headline", "") or r.get("reason", "") or r.get("parse_error", ""),
        }
        for r in summary["steps"]
    ]
    return format_table(rows, ["step", "status", "s", "result"])


def run(args: argparse.Namespace) -> dict:
    steps = plan(args.out, args.time_budget_s, args.wheels)
    summary = check(steps, args.out, args.time_budget_s, dry_run=args.dry_run)
    print(f"\ngpu-check ({'dry run, ' if args.dry_run else ''}{summary['gpu'] or NO_GPU}) in {summary['seconds']} s")
    print(summary_table(summary))
    spread = summary["checks"]["launch_val_loss_spread"]
    if spread["spread"] is not None:
        print(f"launcher val loss spread {spread['spread']:.2%} (bar 2%)")
    print(f"results: {args.out / 'gpu_check.json'}, log: {args.out / 'gpu_check.log'}")
    if any(r["status"] in FAILED for r in summary["steps"]):
        raise SystemExit(1)
    return summary
