"""The progress bar (bytes, rate, ETA) and the one-line summary a conversion ends with."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from .verify import Agreement


def bar(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled, dynamic_ncols=True
    )


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


@dataclass
class Report:
    """What a conversion did (returned by convert(); its summary() is the CLI's last line)."""

    source: Path
    destination: Path
    source_format: str
    target: str
    optimizer: str | None
    params: int
    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    max_error: float | None = None
    bound_ratio: float | None = None
    weight_errors: str | None = None  # what happened to compensated bf16 parameters' weight_error (None: none held)

    def summary(self) -> str:
        rate = self.bytes_in / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"converted {self.source} ({self.source_format}{', ' + self.optimizer if self.optimizer else ''}) -> "
            f"{self.destination} ({self.target}): {self.params} parameters, {self.tensors} tensors, "
            f"{human(self.bytes_in)} in, {human(self.bytes_out)} out, {self.seconds:.1f} s ({human(rate)}/s)"
        )
        if self.max_error is not None:
            line += f"; verified: max error {self.max_error:.3g} ({self.bound_ratio:.3g} x the quantizer bound)"
        if self.weight_errors:
            line += f"; {self.weight_errors}"
        return line


def finished(started: float, agreement: Agreement | None, **fields: object) -> Report:
    """The Report of a conversion begun at `started` (time.perf_counter()), with what `agreement`
    found when the output was verified (None: not verified)."""
    return Report(
        **fields,
        seconds=time.perf_counter() - started,
        max_error=None if agreement is None else agreement.max_error,
        bound_ratio=None if agreement is None else agreement.bound_ratio,
    )
