"""Run one gpu-check step as a subprocess: its own timeout, its output into the shared log.

Why a subprocess per step: a crash (a CUDA fault, a hung NCCL rendezvous, an
out-of-memory kill) ends that step only, and the timeout can kill the whole
process group (torchrun's workers too) without touching the check itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

KEEP_LINES = 4000  # the output tail kept in memory for parsing and for the error excerpt
GRACE_S = 5.0  # between SIGTERM and SIGKILL when a step runs out of time


@dataclass
class CommandResult:
    """What one subprocess did: exit status (None if it never started or was killed), output tail, seconds."""

    returncode: int | None
    output: str
    seconds: float
    timed_out: bool
    start_error: str | None = None


def _pump(stream: TextIO, log: TextIO, lines: deque[str]) -> None:
    """Copy the child's output line by line into the log (flushed, so a killed run keeps it) and the tail."""
    for line in stream:
        log.write(line)
        log.flush()
        lines.append(line)


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM then SIGKILL to the step's own process group (it was started in a new session)."""
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(command: list[str], timeout_s: float, log: TextIO, cwd: Path, env: dict[str, str] | None = None) -> CommandResult:
    """Run `command` in `cwd` with `env` added to this environment; never raises for the child's failures."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    begin = time.perf_counter()
    try:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
    except OSError as error:
        message = f"{type(error).__name__}: {error}"
        log.write(message + "\n")
        return CommandResult(None, message, time.perf_counter() - begin, False, start_error=message)
    lines: deque[str] = deque(maxlen=KEEP_LINES)
    assert process.stdout is not None
    reader = threading.Thread(target=_pump, args=(process.stdout, log, lines), daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(timeout_s, 0.01))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
    reader.join(timeout=GRACE_S)
    seconds = time.perf_counter() - begin
    return CommandResult(None if timed_out else process.returncode, "".join(lines), seconds, timed_out)
