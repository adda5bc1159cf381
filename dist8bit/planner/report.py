"""What `dist8bit plan` prints and draws: one option's breakdown, every option side by side, a plot."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..bench.report import format_table, pyplot, save_figure
from .bytes_model import (
    COMPONENTS,
    KEEPS_MASTER,
    OFFLOADS,
    OPTIONS_ORDER,
    Cluster,
    Option,
    Plan,
    largest_fitting_params,
    plan,
)
from .model_shapes import ModelShape
from .state_bytes import STATE_PRECISIONS

GIB = 2**30
_UNITS = {
    "": GIB,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": GIB,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141 GB' or a bare number of GiB."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GiB or 80GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(value: int) -> float:
    return value / GIB


def breakdown_table(result: Plan) -> str:
    """Components per GPU, per host (node) and over the cluster, in GiB."""
    node = result.host_per_node
    world, nodes = result.cluster.gpus, result.cluster.nodes
    rows = []
    for name in (*COMPONENTS, "total"):
        on_gpu = result.gpu_total if name == "total" else result.gpu[name]
        on_host = sum(node.values()) if name == "total" else node[name]
        rows.append(
            {
                "component": name,
                "GiB/GPU": f"{gib(on_gpu):.2f}",
                "B/param/GPU": f"{on_gpu / result.model.num_params:.3f}",
                "GiB/host": f"{gib(on_host):.2f}",
                "GiB cluster GPUs": f"{gib(on_gpu * world):.1f}",
                "GiB cluster hosts": f"{gib(on_host * nodes):.1f}",
            }
        )
    return format_table(rows, list(rows[0]))


def no_master_mode(base: Option) -> str | None:
    """The mode of the table's rows without a master: the chosen one, else compensated (the one that follows
    the fp32 trajectory); None where bf16 weights without a master are not an option (fp16, fp32 training)."""
    if base.mixed_precision != "bf16":
        return None
    return "compensated" if base.keeps_master else base.master_weights


def option_rows(model: ModelShape, cluster: Cluster, base: Option, gpu_memory: int, host_memory: int | None) -> list[dict]:
    """Every strategy x state precision x memory choice (bytes_model.MEMORY_CHOICES) for `base`'s optimizer and
    mixed precision; the rows without a master take `no_master_mode(base)` and base's error_bits."""
    rows = []
    without_master = no_master_mode(base)
    for strategy, states, offload, keeps_master in OPTIONS_ORDER:
        if not keeps_master and without_master is None:
            continue
        mode = KEEPS_MASTER if keeps_master else without_master
        option = replace(base, strategy=strategy, states=states, offload=offload, master_weights=mode)
        row: dict[str, object] = {"strategy": strategy, "states": states, "offload": offload, "master": option.master_label}
        if not STATE_PRECISIONS[states].available:
            if offload == OFFLOADS[0] and keeps_master:  # one row per strategy says why
                rows.append({**row, "GiB/GPU": "n/a", "note": STATE_PRECISIONS[states].note})
            continue
        result = plan(model, cluster, option)
        largest = largest_fitting_params(result, gpu_memory, host_memory)
        rows.append(
            {
                **row,
                "GiB/GPU": f"{gib(result.gpu_total):.2f}",
                "states GiB/GPU": f"{gib(result.gpu['states']):.2f}",
                "error GiB/GPU": f"{gib(result.gpu['error']):.2f}",
                "GiB/host": f"{gib(result.host_total * cluster.gpus_per_node):.1f}",
                "fits": "yes" if largest >= model.num_params else "no",
                "largest model (B params)": f"{largest / 1e9:.2f}",
                "largest": largest,
                "label": option.label,
            }
        )
    return rows


def options_table(rows: list[dict]) -> str:
    columns = [
        "strategy",
        "states",
        "offload",
        "master",
        "GiB/GPU",
        "states GiB/GPU",
        "error GiB/GPU",
        "GiB/host",
        "fits",
        "largest model (B params)",
    ]
    if any("note" in row for row in rows):  # a precision not offered, with the reason
        columns.append("note")
    return format_table(rows, columns)


def plot_largest(rows: list[dict], path: Path, title: str) -> bool:
    """Horizontal bars: the largest model each option fits (False when matplotlib is missing)."""
    plt = pyplot()
    if plt is None:
        return False
    shown = [r for r in rows if "largest" in r]
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(shown) + 1.5))
    colours = {"fp32": "tab:gray", "8bit": "tab:blue", "4bit": "tab:green"}
    axes.barh(
        [r["label"] for r in shown],
        [r["largest"] / 1e9 for r in shown],
        color=[colours.get(str(r["states"]), "tab:orange") for r in shown],
        hatch=["" if r["master"] == KEEPS_MASTER else "//" for r in shown],  # no master: hatched
    )
    axes.invert_yaxis()
    axes.set_xlabel("largest model that fits (billions of parameters)")
    axes.grid(axis="x", alpha=0.3)
    save_figure(figure, path, title)
    return True
