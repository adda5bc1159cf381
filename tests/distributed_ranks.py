"""Running a worker script on several CPU ranks (gloo), for the multi-process tests.

One place for the rendezvous port, the per-rank environment torchrun or the
DeepSpeed launcher would set, per-rank logs, and a failure message that shows
every rank's log tail (a failing collective is only readable from all sides).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker_ranks(world: int, script: Path, args: list[str], log_dir: Path, label: str, result: Path) -> dict:
    """Run `script *args` on `world` ranks (DeepSpeed on CPU, reference kernels); return what it saved to `result`."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "DIST8BIT_BACKEND": "reference",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        logs.append(log_dir / f"{label}_rank{rank}.log")
        with open(logs[-1], "w") as handle:
            command = [sys.executable, str(script), *args]
            procs.append(subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if any(codes):
        tails = "\n".join(f"--- {log.name} ---\n{log.read_text()[-4000:]}" for log in logs)
        raise AssertionError(f"{world}-rank {label} run failed (exit codes {codes}):\n{tails}")
    return torch.load(result, weights_only=True)
