"""Read each gpu-check step's results (pytest summary and junit XML, bench JSON, launcher metrics).

Every parser returns a small dict for gpu_check.json with a one-line
`headline` for the printed table. They read files the steps wrote, so that
the numbers in the summary are the ones the benchmarks themselves recorded.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

RESULT_MARK = "GPU_CHECK_RESULT "  # a step script prints this prefix and one JSON object
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)")
# The closing line, with or without the ===== rule around it (-q drops it): "1 failed, 2 passed in 0.05s".
PYTEST_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+|no tests ran)(?:, \d+ \w+)*) in [\d.]+s\b.*?\s*=*$")
MAX_LISTED_FAILURES = 50

# The bars (docs/gpu_check.md says where each comes from).
BOUND_FRACTION_BAR = 0.8
VS_FUSED_BAR = 1.5
PAGED_OVERHEAD_BAR = 0.05
LAUNCH_LOSS_SPREAD_BAR = 0.02
COMPENSATED_BAR = 1.25  # issue 16: a compensated bf16 step costs at most 1.25x the plain bf16 8-bit step


def marked_result(output: str) -> dict:
    """The last `GPU_CHECK_RESULT {...}` line a step script printed."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise ValueError(f"no {RESULT_MARK.strip()} line in the output")


def build(output: str) -> dict:
    result = marked_result(output)
    parts = [f"{kind} {result[f'{kind}_build_s']:.1f} s" for kind in ("cpu", "cuda") if result.get(f"{kind}_build_s") is not None]
    result["headline"] = "build " + ", ".join(parts) if parts else "no extension built"
    return result


def pytest_summary_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line (`== 3 passed, 1 skipped in 2.0s ==`); {} if there is none."""
    for line in reversed(output.splitlines()):
        match = PYTEST_SUMMARY.match(line.strip())
        if match:
            counts: dict[str, int] = {}
            for number, word in PYTEST_COUNT.findall(match.group(1)):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return {}


def _case_id(case: ET.Element) -> str:
    return f"{case.get('classname', '')}::{case.get('name', '')}"


def _failed(case: ET.Element) -> bool:
    return case.find("failure") is not None or case.find("error") is not None


def junit_counts(path: Path) -> dict:
    """tests/failures/errors/skipped summed over every testsuite, and the ids of the failing cases."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failing = [_case_id(case) for case in root.iter("testcase") if _failed(case)]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing[:MAX_LISTED_FAILURES]
    return counts


def junit_subset(path: Path, module: str, contains: str) -> dict:
    """The counts of junit_counts over the cases of test module `module` whose name contains `contains`
    (e.g. the 4-bit cases of the CUDA fused step), so that a run says how that family fared on its own."""
    cases = [
        case
        for case in ET.parse(path).getroot().iter("testcase")
        if case.get("classname", "").split(".")[-1] == module and contains in case.get("name", "")
    ]
    counts = {
        "tests": len(cases),
        "failures": sum(case.find("failure") is not None for case in cases),
        "errors": sum(case.find("error") is not None for case in cases),
        "skipped": sum(case.find("skipped") is not None for case in cases),
    }
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = [_case_id(case) for case in cases if _failed(case)][:MAX_LISTED_FAILURES]
    return counts


def tests(output: str, junit: Path, subsets: Mapping[str, tuple[str, str]] | None = None) -> dict:
    """The pytest step's counts; `subsets` (name -> (test module, substring of the test name)) are
    also counted on their own from the junit XML (junit_subset) and named in the headline."""
    summary = pytest_summary_counts(output)
    result: dict = {"summary_line": summary}
    if junit.exists():
        result["junit"] = junit_counts(junit)
        for name, (module, contains) in (subsets or {}).items():
            result[name] = junit_subset(junit, module, contains)
    counts = result.get("junit") or summary
    result["headline"] = (
        f"{counts.get('passed', 0)} passed, {counts.get('failures', counts.get('failed', 0))} failed, "
        f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped"
    )
    for name in subsets or {}:
        part = result.get(name)
        if part and part["tests"]:
            result["headline"] += f"; {name} {part['passed']}/{part['tests']} passed"
    return result


def quantize(path: Path) -> dict:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("device") == "cuda"]
    result = {
        "copy_bandwidth_GBps": data.get("copy_bandwidth_GBps"),
        "cuda_rows": [{k: r.get(k) for k in ("impl", "dtype", "op", "ms", "GB/s", "of_copy_bw", "vs_bnb")} for r in rows],
    }
    ours = [r for r in rows if r.get("impl") == "cuda"]
    if ours:
        worst = min(ours, key=lambda r: r["of_copy_bw"])
        result["worst_of_copy_bw"] = worst["of_copy_bw"]
        result["bar_quantize_80pct_of_copy"] = worst["of_copy_bw"] >= BOUND_FRACTION_BAR
        result["headline"] = f"worst {worst['op']} {worst['dtype']}: {worst['of_copy_bw']:.2f} of copy bw"
    else:
        result["headline"] = "no CUDA rows"
    return result


def _faster(ours: dict, peer: dict | None) -> bool | None:
    if peer is None or "ms" not in peer:
        return None
    return ours["ms"] < peer["ms"]


def optim(path: Path, bound_bytes_per_param: float) -> dict:
    """Per implementation: ms, state bytes/param, fraction of the bytes-moved bound at the measured copy bandwidth."""
    data = json.loads(path.read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    keep = ("ms", "state_bytes_per_param", "GB/s", "of_copy_bw", "vs_torch_fused", "error")
    result: dict = {
        "numel": data.get("numel"),
        "dtype": data.get("dtype"),
        "copy_bandwidth_GBps": data.get("copy_bandwidth_GBps"),
        "bound_bytes_per_param": bound_bytes_per_param,
        "impls": {name: {k: row[k] for k in keep if k in row} for name, row in rows.items()},
    }
    ours = rows.get("dist8bit AdamW8bit")
    if ours is None or "ms" not in ours:
        result["headline"] = "dist8bit AdamW8bit did not run"
        return result
    result["bars"] = {
        "of_bound_at_least_0.8": ours["of_copy_bw"] >= BOUND_FRACTION_BAR,
        "vs_torch_fused_at_least_1.5": None if ours.get("vs_torch_fused") is None else ours["vs_torch_fused"] >= VS_FUSED_BAR,
        "faster_than_torchao": _faster(ours, rows.get("torchao AdamW8bit")),
        "faster_than_bitsandbytes": _faster(ours, rows.get("bitsandbytes AdamW8bit")),
    }
    fused = ours.get("vs_torch_fused")
    result["headline"] = (
        f"AdamW8bit {ours['ms']:.2f} ms, {ours['state_bytes_per_param']:.2f} B/param state, "
        f"{ours['of_copy_bw']:.2f} of {bound_bytes_per_param:.2f} B/param bound"
        + (f", {fused:.2f}x torch fused" if fused else "")
    )
    return result


def paged(path: Path) -> dict:
    data = json.loads(path.read_text())
    rows = data["rows"]
    resident = next((r for r in rows if r["config"].startswith("paged") and "evicted" not in r["config"]), None)
    result = {"paging": data.get("paging"), "pinned_h2d_GBps": data.get("pinned_h2d_GBps"), "rows": rows}
    if resident is not None:
        result["resident_overhead"] = resident["overhead"]
        result["bar_overhead_at_most_5pct"] = resident["overhead"] <= PAGED_OVERHEAD_BAR
        result["headline"] = f"resident overhead {resident['overhead']:+.1%}, {len(rows) - 2} evicted rows"
    return result


def launch(path: Path) -> dict:
    summary = json.loads(path.read_text())["summary"]
    keys = ("steps", "final_train_loss", "final_val_loss", "tokens_per_s", "state_bytes", "ranks_in_sync")
    result = {k: summary.get(k) for k in keys}
    loss, rate = result["final_val_loss"], result["tokens_per_s"]
    result["headline"] = f"{result['steps']} steps, val loss {loss:.4f}, {rate:,.0f} tokens/s" if loss and rate else "no summary"
    return result


def compensated(output: str) -> dict:
    """gpu_check_compensated's line: step ms per mode, the compensated/plain ratios and the bar."""
    result = marked_result(output)
    ratios = ", ".join(f"{name} {value:.2f}x" for name, value in result["ratio"].items())
    plain = result["ms"]["none"]
    result["headline"] = f"{ratios} the plain bf16 step ({plain:.2f} ms; bar {result['bar']:.2f}x)"
    return result


def launch_loss_spread(launch_results: dict[str, dict]) -> dict:
    """The issue's bar: the three launcher runs end with validation losses within 2% of each other."""
    losses = {name: r.get("final_val_loss") for name, r in launch_results.items() if r.get("final_val_loss")}
    if len(losses) < 2:
        return {"losses": losses, "spread": None, "within_2pct": None}
    spread = max(losses.values()) / min(losses.values()) - 1.0
    return {"losses": losses, "spread": spread, "within_2pct": spread <= LAUNCH_LOSS_SPREAD_BAR}
