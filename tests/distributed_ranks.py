"""Running code on several CPU ranks (gloo), for the multi-process tests.

Two ways: `run_worker_ranks` starts a worker script as separate processes with
the per-rank environment torchrun or the DeepSpeed launcher would set, per-rank
logs, and a failure message that shows every rank's log tail (a failing
collective is only readable from all sides); `spawn_gloo` runs a function of a
test module on torch.multiprocessing workers inside one gloo process group.
One place for the rendezvous port either way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def leave_together() -> None:
    """End a worker rank whose results are already written: wait for every rank, tear the
    process group down, and exit without the interpreter's teardown.

    On a loaded machine a rank sometimes aborted (SIGABRT, "terminate called without an
    active exception") in the C++ teardown of gloo/DeepSpeed communication objects after
    every rank had passed the final barrier, so after all of its work was done and saved.
    os._exit skips that teardown: the exit code then reports the work, not the destructors."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def spawn_gloo(fn: Callable[..., Any], world: int, *args: object) -> Any:
    """Run `fn(rank, world, *args)` on `world` spawned processes that share one gloo process group;
    return what it returned on rank 0 (tensors, lists, dicts: through torch.save). `fn` must be a
    module-level function (the workers import it by name)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory(prefix="spawn_gloo") as folder:
        result = Path(folder) / "rank0.pt"
        mp.spawn(_gloo_rank, args=(world, free_port(), fn, args, result), nprocs=world, join=True)
        return torch.load(result, weights_only=True)


def _gloo_rank(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, result: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        value = fn(rank, world, *args)
        dist.barrier()  # leave together: a rank gone early can make gloo abort its peers on a loaded machine
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(value, result)
