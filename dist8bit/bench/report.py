"""Benchmark output: a printed table, a JSON file and (with matplotlib) a PNG."""

from __future__ import annotations

import json
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

# The CPU kernel build the dist8bit operators run ("native", or a variant chosen
# with python -m dist8bit.bench --cpu-kernels).
CPU_KERNELS = "native"


def machine_description() -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_kernels": CPU_KERNELS,
    }
    info.update(_cpu_identity())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_identity() -> dict[str, object]:
    """CPU model name plus family/model/stepping and the AVX-512 features the kernels use.

    Virtual machines often report a bare "AMD EPYC" or "Intel Xeon"; the
    family and model numbers still tell the generation (e.g. AMD family 25
    model 17 is Zen 4 Genoa, Intel family 6 model 143 is Sapphire Rapids).
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {}
    if "model name" not in fields:
        return {}
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx512f", "avx512bw", "avx512vbmi", "avx512_vbmi2", "avx512_bf16", "avx512_fp16") if f in flags]
    family, model, stepping = (fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return {
        "cpu": f"{fields['model name']} (family {family} model {model} stepping {stepping})",
        "cpu_isa": " ".join(isa),
    }


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(r[i]) for r in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(w) for column, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(value.ljust(w) for value, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def pyplot():
    """matplotlib.pyplot with a headless backend, or None (with a warning) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the plot (pip install 'dist8bit[bench]')", stacklevel=2)
        return None
    return plt


def save_figure(figure, path: Path, title: str | None = None, dpi: int = 120) -> None:
    """Title, tight layout, write the PNG (creating its folder) and free the figure: how every plot here ends."""
    import matplotlib.pyplot as plt

    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def plot_time_and_bytes(
    rows: Sequence[dict[str, object]],
    path: Path,
    title: str,
    time_label: str,
    bytes_key: str,
    bytes_label: str,
    bytes_bar: float | None = None,
) -> None:
    """Two bar charts per implementation: step time (left) and bytes per parameter (right, with an optional bar line).

    One figure layout for the optimizer benchmarks (bench optim, bench offload); rows without
    a time (failed or skipped implementations) are left out. No-op without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    timed = [r for r in rows if "ms" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [str(r["impl"]).replace(" ", "\n", 1) for r in timed]
    left.barh(names, [r["ms"] for r in timed], color="C0")
    left.set_xlabel(time_label)
    right.barh(names, [r[bytes_key] for r in timed], color="C2")
    if bytes_bar is not None:
        right.axvline(bytes_bar, color="k", linestyle="--", linewidth=1)
    right.set_xlabel(bytes_label)
    save_figure(fig, path, title)
