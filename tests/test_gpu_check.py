"""gpu-check's orchestration on a CPU: dry run, failures and timeouts recorded, no-GPU skips, parsers.

The GPU run itself cannot happen here; these tests make sure that when it
does, a failing step cannot stop the others and the JSON always says what
ran, and that the parsers read what the real steps write.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist8bit.bench import gpu_check, gpu_check_compensated, gpu_check_parse, gpu_check_steps
from dist8bit.bench.gpu_check_steps import Step
from dist8bit.bench.optim import bytes_per_param

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _load(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_records_every_planned_step_as_ok(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torchao-0.18.0-py3-none-any.whl").write_bytes(b"")
    (wheels / "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"")
    out = tmp_path / "out"
    gpu_check.run(argparse.Namespace(out=out, time_budget_s=600.0, wheels=wheels, dry_run=True))
    summary = _load(out)
    names = [step.name for step in gpu_check_steps.plan(out, 600.0, wheels)]
    assert [s["name"] for s in summary["steps"]] == names
    assert names[:4] == ["wheels", "build", "tests", "tests-slow"]
    assert {"quantize", "paged", "launch ddp", "launch fsdp", "launch deepspeed"} <= set(names)
    assert {f"optim {p} {d}" for p in ("one-2^24", "one-2^28", "gpt125m") for d in ("fp32", "bf16")} <= set(names)
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert summary["finished"] and summary["dry_run"]
    assert "pydantic-core torchao" in summary["steps"][0]["command"]
    log = (out / "gpu_check.log").read_text()
    assert sum(line.startswith("dry run: ") for line in log.splitlines()) == len(names)


def test_a_failing_and_a_timed_out_step_are_recorded_and_the_next_step_runs(tmp_path):
    steps = [
        Step("fails", [PYTHON, "-c", "import sys; print('boom'); sys.exit(3)"], 30.0, needs_gpu=False),
        Step("hangs", [PYTHON, "-c", "import time; print('waiting', flush=True); time.sleep(60)"], 1.0, needs_gpu=False),
        Step("missing", ["/nonexistent/program"], 30.0, needs_gpu=False),
        Step("bad output", [PYTHON, "-c", "print('no result')"], 30.0, needs_gpu=False, parse=gpu_check_parse.build),
        Step("runs", [PYTHON, "-c", "print('fine')"], 30.0, needs_gpu=False, parse=lambda out: {"said": out.strip()}),
    ]
    begin = time.monotonic()
    summary = gpu_check.check(steps, tmp_path, time_budget_s=120.0, gpu=False)
    assert time.monotonic() - begin < 15
    records = {r["name"]: r for r in _load(tmp_path)["steps"]}
    assert records == {r["name"]: r for r in summary["steps"]}
    assert records["fails"]["status"] == "failed" and records["fails"]["returncode"] == 3
    assert "boom" in records["fails"]["error"]
    assert records["hangs"]["status"] == "timeout" and records["hangs"]["returncode"] is None
    assert "waiting" in records["hangs"]["error"]
    assert records["missing"]["status"] == "failed" and "FileNotFoundError" in records["missing"]["error"]
    assert records["bad output"]["status"] == "ok" and "GPU_CHECK_RESULT" in records["bad output"]["parse_error"]
    assert records["runs"]["status"] == "ok" and records["runs"]["metrics"] == {"said": "fine"}
    log = (tmp_path / "gpu_check.log").read_text()
    assert "boom" in log and "waiting" in log and "fine" in log


def test_the_time_budget_skips_steps_that_no_longer_fit(tmp_path):
    steps = [
        Step("long", [PYTHON, "-c", "import time; time.sleep(60)"], 60.0, needs_gpu=False),
        Step("after", [PYTHON, "-c", "pass"], 60.0, needs_gpu=False),
    ]
    summary = gpu_check.check(steps, tmp_path, time_budget_s=1.5, gpu=False)
    statuses = [(r["status"], r.get("reason")) for r in summary["steps"]]
    assert statuses == [("timeout", None), ("skipped", gpu_check.OUT_OF_TIME)]


def test_without_a_gpu_every_gpu_step_is_skipped_and_the_command_exits_0(tmp_path):
    begin = time.monotonic()
    result = subprocess.run(
        [PYTHON, "-m", "dist8bit.bench", "gpu-check", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert time.monotonic() - begin < 10
    assert result.returncode == 0, result.stderr
    steps = _load(tmp_path)["steps"]
    assert steps[0] == {**steps[0], "name": "wheels", "status": "skipped", "reason": "no --wheels given"}
    assert len(steps) > 10
    assert all(s["status"] == "skipped" and s["reason"] == "no CUDA device" for s in steps[1:])
    assert "no CUDA device" in result.stdout


def test_budgets_fit_the_ten_minutes_and_scale():
    def total(budget: float) -> float:
        return sum(step.budget_s for step in gpu_check_steps.plan(Path("out"), budget, Path("/nonexistent")))

    assert total(600.0) <= 600.0
    assert total(300.0) == pytest.approx(total(600.0) / 2)


def test_pytest_summary_and_junit_parsers(tmp_path):
    test_file = tmp_path / "test_sample.py"
    test_file.write_text(
        "import pytest\ndef test_ok(): pass\ndef test_bad(): assert False\n@pytest.mark.skip(reason='x')\ndef test_skip(): pass\n"
    )
    junit = tmp_path / "junit.xml"
    command = [PYTHON, "-m", "pytest", str(test_file), "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path)]
    output = subprocess.run([*command, "--junitxml", str(junit)], capture_output=True, text=True, timeout=60).stdout
    result = gpu_check_parse.tests(output, junit)
    assert result["summary_line"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert {k: result["junit"][k] for k in ("tests", "passed", "failures", "skipped")} == {
        "tests": 3,
        "passed": 1,
        "failures": 1,
        "skipped": 1,
    }
    assert result["junit"]["failing"] == ["test_sample::test_bad"]
    assert result["headline"].startswith("1 passed, 1 failed")


def test_tests_step_counts_the_4bit_fused_step_cases_on_their_own(tmp_path):
    """The `tests` step's parser reports the CUDA fused step's 4-bit cases apart (gpu_check_steps.TEST_SUBSETS)."""
    module, _ = gpu_check_steps.TEST_SUBSETS["fused_step_4bit"]
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / f"{module}.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('bits', [8, 4, 32], ids=lambda b: f'{b}bit')\n"
        "def test_step(bits): assert bits != 4\n"
        "def test_4bit_ok(): pass\n"
    )
    (cases / "test_other.py").write_text("def test_4bit_elsewhere(): pass\n")
    out = tmp_path / "out"
    step = next(s for s in gpu_check_steps.plan(out, 600.0) if s.name == "tests")
    junit = out / "tests" / "tests.xml"
    junit.parent.mkdir(parents=True)
    command = [PYTHON, "-m", "pytest", str(cases), "-p", "no:cacheprovider", "-q", "--rootdir", str(cases)]
    output = subprocess.run([*command, "--junitxml", str(junit)], capture_output=True, text=True, timeout=60).stdout
    result = step.parse(output)
    part = result["fused_step_4bit"]
    assert {k: part[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == {
        "tests": 2,
        "passed": 1,
        "failures": 1,
        "errors": 0,
        "skipped": 0,
    }
    assert part["failing"] == [f"{module}::test_step[4bit]"]
    assert result["junit"]["tests"] == 5
    assert result["headline"].endswith("; fused_step_4bit 1/2 passed")
    assert "fused_step_4bit" not in gpu_check_parse.tests(output, junit)


def test_bench_and_launcher_parsers(tmp_path):
    optim = tmp_path / "optim.json"
    rows = [
        {"impl": "dist8bit AdamW8bit", "ms": 2.0, "state_bytes_per_param": 2.03, "of_copy_bw": 0.85, "vs_torch_fused": 1.6},
        {"impl": "torch AdamW fused", "ms": 3.2, "state_bytes_per_param": 8.0, "of_copy_bw": 0.9, "vs_torch_fused": 1.0},
        {"impl": "torchao AdamW8bit", "ms": 2.5, "state_bytes_per_param": 2.03, "of_copy_bw": 0.6},
        {"impl": "bitsandbytes AdamW8bit", "error": "ImportError: no"},
    ]
    optim.write_text(json.dumps({"numel": 1 << 28, "dtype": "fp32", "copy_bandwidth_GBps": 3000.0, "rows": rows}))
    bound = bytes_per_param("AdamW8bit", 4)
    assert bound == pytest.approx(16.0625)
    assert bytes_per_param("AdamW8bit", 2) == pytest.approx(10.0625)
    result = gpu_check_parse.optim(optim, bound)
    assert result["bars"] == {
        "of_bound_at_least_0.8": True,
        "vs_torch_fused_at_least_1.5": True,
        "faster_than_torchao": True,
        "faster_than_bitsandbytes": None,
    }
    assert result["impls"]["bitsandbytes AdamW8bit"] == {"error": "ImportError: no"}

    paged = tmp_path / "paged.json"
    paged_rows = [{"config": "unpaged", "ms": 10.0}, {"config": "paged, resident", "ms": 10.3, "overhead": 0.03}]
    paged.write_text(json.dumps({"paging": "managed memory", "rows": paged_rows}))
    assert gpu_check_parse.paged(paged)["bar_overhead_at_most_5pct"] is True

    runs = {}
    for name, loss in (("launch ddp", 2.00), ("launch fsdp", 2.01), ("launch deepspeed", 2.05)):
        metrics = tmp_path / f"{name}.json"
        metrics.write_text(json.dumps({"summary": {"steps": 200, "final_val_loss": loss, "tokens_per_s": 1e5}}))
        runs[name] = gpu_check_parse.launch(metrics)
    spread = gpu_check_parse.launch_loss_spread(runs)
    assert spread["spread"] == pytest.approx(0.025) and spread["within_2pct"] is False


def test_compensated_step_times_every_mode_and_parses():
    """gpu_check_compensated on the CPU with a tiny model (the GPU step times gpt125m the same way):
    every mode ran with its error buffer, ratios to the plain step, the bar; its parser's headline."""
    result = gpu_check_compensated.measure([(4096,), (300, 7)], torch.device("cpu"), budget_s=0.05)
    assert result["error_bytes_per_param"] == {"none": 0.0, "compensated-int8": 1.0, "compensated-int16": 2.0}
    assert all(ms > 0 for ms in result["ms"].values())
    assert result["ratio"] == {
        name: result["ms"][name] / result["ms"]["none"] for name in ("compensated-int8", "compensated-int16")
    }
    assert result["within_bar"] == {name: ratio <= 1.25 for name, ratio in result["ratio"].items()}
    parsed = gpu_check_parse.compensated("noise\n" + gpu_check_parse.RESULT_MARK + json.dumps(result) + "\n")
    assert parsed["headline"].startswith("compensated-int8 ") and parsed["headline"].endswith("; bar 1.25x)")
    step = next(s for s in gpu_check_steps.plan(Path("out"), 600.0) if s.name == "compensated")
    assert "dist8bit.bench.gpu_check_compensated" in step.command and step.parse is gpu_check_parse.compensated
