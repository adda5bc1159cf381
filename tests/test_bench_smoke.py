"""Every `python -m dist8bit.bench` benchmark runs end to end at its smallest size and writes its JSON.

In-process through dist8bit.bench.__main__.main (the convert benchmark starts
its own subprocesses, one per conversion, as it always does). Timings are
meaningless at these sizes; what is checked is that each benchmark runs on
this machine (CPU only included) and reports what docs/benchmarks.md reads
from it. gpu-check has its own tests (tests/test_gpu_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dist8bit.bench.__main__ import BENCHMARKS, main

# benchmark -> (tiny options, JSON file, top-level keys, keys of every row, row label key, expected labels)
CASES = {
    "quantize": (
        ["--log2-numel", "12", "--dtypes", "fp32,bf16", "--budget", "0"],
        "quantize.json",
        {"benchmark", "numel", "blocksize", "copy_bandwidth_GBps", "machine", "rows"},
        {"impl", "device", "dtype", "op", "ms", "GB/s", "of_copy_bw", "vs_bnb"},
        "impl",
        {"cpu", "reference"},
    ),
    "optim": (
        ["--preset", "gpt-small-test", "--budget", "0"],
        "optim-gpt-small-test-fp32.json",
        {"benchmark", "preset", "numel", "tensors", "dtype", "device", "copy_bandwidth_GBps", "rmw_bandwidth_GBps", "rows"},
        {"impl"},
        "impl",
        {"dist8bit AdamW4bit", "dist8bit AdamW8bit", "dist8bit AdamW32bit", "torch AdamW fused", "torch AdamW foreach"},
    ),
    "offload": (
        ["--presets", "gpt-small-test", "--budget", "0"],
        "offload-gpt-small-test.json",
        {"benchmark", "preset", "numel", "copy_bandwidth_GBps", "rmw_bandwidth_GBps", "machine", "bars", "rows"},
        {"impl"},
        "impl",
        {"dist8bit AdamW8bit", "dist8bit AdamW32bit", "DeepSpeedCPUAdam", "torch AdamW fused", "torch AdamW foreach"},
    ),
    "quantiles": (
        ["--log2-numel", "14", "--budget", "0"],
        "quantiles.json",
        {"benchmark", "numel", "machine", "rows"},
        {"impl", "device", "ms", "max_abs_err_inner"},
        "impl",
        {"dist8bit.estimate_quantiles", "full sort", "torch.quantile"},
    ),
    "paged": (
        ["--preset", "gpt-small-test", "--evict", "0.5", "--budget", "0"],
        "paged-gpt-small-test-AdamW8bit.json",
        {"benchmark", "preset", "optimizer", "numel", "device", "paging", "paged_bytes", "overhead_bar", "rows"},
        {"config", "ms"},
        "config",
        {"unpaged"},
    ),
    "convert": (
        ["--params", "1e5", "--width", "64", "--vocab", "256", "--context", "64"],
        "convert.json",
        {"machine", "params", "tensors", "rows"},
        {"conversion", "input MB", "output MB", "seconds", "peak RSS MB", "peak private MB", "max error / bound"},
        "conversion",
        {"tiny checkpoint (fixed cost)", "fp32 -> 8bit", "8bit -> fp32", "fp32 -> 8bit --verify"},
    ),
}


def test_every_benchmark_but_gpu_check_is_covered():
    assert set(BENCHMARKS) - {"gpu-check"} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.filterwarnings("ignore:dist8bit. is_paged=True:RuntimeWarning")  # the paged bench's CPU fallback
def test_benchmark_writes_its_json(name, tmp_path):
    options, filename, top_keys, row_keys, label, labels = CASES[name]
    argv = [name, *options, "--out", str(tmp_path / "out")]
    if name == "convert":
        argv += ["--data", str(tmp_path / "data")]
    main(argv)
    result = json.loads((tmp_path / "out" / filename).read_text())
    assert top_keys <= set(result), top_keys - set(result)
    rows = result["rows"]
    assert rows and all(row_keys <= set(row) for row in rows), rows
    assert labels <= {row[label] for row in rows}
    for row in rows:
        assert "error" in row or row.get("ms", 1.0) > 0 or row.get("seconds", 1.0) > 0, row
    if name == "optim":  # ours must run (a peer that cannot is reported in its row)
        ours = [row for row in rows if row["impl"].startswith("dist8bit")]
        assert all(row["ms"] > 0 and row["state_bytes_per_param"] > 0 for row in ours), ours
    if name == "offload":  # master + state from the real tensors: 4 + 2.03 (8-bit) / 4 + 8 (32-bit), small tensors 32-bit
        hosts = {row["impl"]: row.get("host_bytes_per_param") for row in rows}
        assert 6.0 < hosts["dist8bit AdamW8bit"] < 6.1 and hosts["dist8bit AdamW32bit"] == pytest.approx(12.0, abs=1e-9)
        assert result["bars"]["host_bytes_per_param_met"] is True
    if name == "quantiles":
        assert result["numel"] == 1 << 14
        exact = {row["impl"]: row["max_abs_err_inner"] for row in rows}
        assert exact["full sort"] == 0.0 and exact["dist8bit.estimate_quantiles"] < 0.05
    if name == "convert":
        by_name = {row["conversion"]: row for row in rows}
        assert by_name["fp32 -> 8bit --verify"]["max error / bound"] <= 1.0
        assert by_name["fp32 -> 8bit"]["output MB"] < by_name["fp32 -> 8bit"]["input MB"] / 2
        assert not list((tmp_path / "data").glob("*.pt"))  # the benchmark removes its checkpoints


def test_four_bit_bars_are_time_ratios_and_none_without_both_rows():
    from dist8bit.bench.optim import four_bit_bars

    rows = [
        {"impl": "dist8bit AdamW4bit", "ms": 10.0},
        {"impl": "dist8bit AdamW8bit", "ms": 12.0},
        {"impl": "torchao AdamW4bit", "ms": 90.0},
    ]
    bars = four_bit_bars(rows)
    assert bars["adamw8bit_ms_over_adamw4bit_ms"] == pytest.approx(1.2, rel=1e-12)
    assert bars["no_slower_than_8bit_met"] is True
    assert bars["torchao_ms_over_adamw4bit_ms"] == pytest.approx(9.0, rel=1e-12)
    assert bars["torchao_speedup_met"] is False  # 9x < 10x
    failed_peer = [rows[0], rows[1], {"impl": "torchao AdamW4bit", "error": "RuntimeError: no compiler"}]
    assert four_bit_bars(failed_peer)["torchao_speedup_met"] is None


def test_a_torchao_that_cannot_import_or_compile_is_an_error_row(monkeypatch, tmp_path):
    """torchao is optional: a broken import or a failing torch.compile costs its row, not the benchmark."""
    import builtins

    from dist8bit.bench import optim as optim_bench

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("torchao built for another torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    broken = optim_bench._torchao_candidates(1e-3)
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(RuntimeError, match=r"import torchao\.optim failed: ImportError: torchao built for another torch"):
        broken["torchao AdamW4bit"]([])
    monkeypatch.setattr(
        optim_bench,
        "_candidates",
        lambda dtype, device: {"dist8bit AdamW32bit": lambda ps: optim_bench.d8.AdamW32bit(ps), **broken},
    )
    main(["optim", "--preset", "gpt-small-test", "--budget", "0", "--out", str(tmp_path)])
    rows = {row["impl"]: row for row in json.loads((tmp_path / "optim-gpt-small-test-fp32.json").read_text())["rows"]}
    assert rows["dist8bit AdamW32bit"]["ms"] > 0 and rows["dist8bit AdamW32bit"]["first_step_ms"] > 0
    assert rows["torchao AdamW4bit"]["error"].startswith("RuntimeError: import torchao.optim failed")


def test_optim_master_weights_rows_and_bar(tmp_path):
    """--master-weights: bf16 AdamW8bit under each mode, error buffers in the state bytes and the bytes bound,
    paired ratios to the `none` row, and issue 16's compensated bar computed from them."""
    from dist8bit.bench.optim import bytes_per_param, master_weight_bars

    main(["optim", "--preset", "gpt-small-test", "--master-weights", "--budget", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "optim-gpt-small-test-bf16-master-weights.json").read_text())
    rows = {row["impl"]: row for row in result["rows"]}
    assert result["dtype"] == "bf16" and set(rows) == {
        "dist8bit AdamW8bit none",
        "dist8bit AdamW8bit stochastic",
        "dist8bit AdamW8bit compensated-8",
        "dist8bit AdamW8bit compensated-16",
    }
    extra = {
        name: row["state_bytes_per_param"] - rows["dist8bit AdamW8bit none"]["state_bytes_per_param"]
        for name, row in rows.items()
    }
    assert extra["dist8bit AdamW8bit compensated-8"] == pytest.approx(1.0, abs=0.01)
    assert extra["dist8bit AdamW8bit compensated-16"] == pytest.approx(2.0, abs=0.01)
    assert bytes_per_param("dist8bit AdamW8bit compensated-16", 2) - bytes_per_param("dist8bit AdamW8bit none", 2) == 4
    assert rows["dist8bit AdamW8bit none"]["ms_over_none"] == 1.0
    assert result["bars"] == master_weight_bars(result["rows"])
    ratio = rows["dist8bit AdamW8bit compensated-8"]["ms_over_none"]
    assert result["bars"]["compensated_8_met"] is (ratio <= 1.25)


def test_optim_norm_passes_rows(tmp_path):
    """--norm-passes: AdamW8bit, LAMB8bit and AdamW8bit with max_unorm, the norm pass's reads in the bytes
    bound, and paired ratios to plain AdamW8bit."""
    from dist8bit.bench.optim import bytes_per_param

    main(["optim", "--preset", "gpt-small-test", "--norm-passes", "--budget", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "optim-gpt-small-test-fp32-norm-passes.json").read_text())
    rows = {row["impl"]: row for row in result["rows"]}
    assert set(rows) == {"dist8bit AdamW8bit", "dist8bit LAMB8bit", "dist8bit AdamW8bit max_unorm"}
    assert all(row["ms"] > 0 and row["ms_over_adamw8bit"] > 0 for row in rows.values())
    assert rows["dist8bit AdamW8bit"]["ms_over_adamw8bit"] == 1.0
    # The norm pass reads p and g (fp32) and both 8-bit states with their absmax once more.
    extra = bytes_per_param("dist8bit LAMB8bit", 4) - bytes_per_param("dist8bit AdamW8bit", 4)
    assert extra == pytest.approx(2 * 4 + 2 * (1 + 4 / 256))
    assert bytes_per_param("dist8bit AdamW8bit max_unorm", 4) == bytes_per_param("dist8bit LAMB8bit", 4)
    with pytest.raises(SystemExit, match="separate runs"):
        main(["optim", "--norm-passes", "--master-weights", "--budget", "0", "--out", str(tmp_path)])


@pytest.mark.slow
def test_cpu_kernels_flag_runs_and_records_the_variant(tmp_path):
    """--cpu-kernels avx2 loads that build over the native one (in a fresh process: the override is for the
    whole process) and says so in the JSON's machine."""
    command = [sys.executable, "-m", "dist8bit.bench", "--cpu-kernels", "avx2", "quantize", "--log2-numel", "12"]
    command += ["--dtypes", "fp32", "--budget", "0", "--skip-reference", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run the avx2 build of the kernels" in result.stdout
    machine = json.loads((tmp_path / "quantize.json").read_text())["machine"]
    assert machine["cpu_kernels"] == "avx2"


def test_quantize_stochastic_rows(tmp_path):
    """--stochastic: a quantize-stochastic row per dist8bit backend and dtype, with quantize's bytes; none for
    bitsandbytes (no CPU stochastic quantize)."""
    main(["quantize", "--log2-numel", "12", "--dtypes", "fp32", "--budget", "0", "--out", str(tmp_path)])
    plain = json.loads((tmp_path / "quantize.json").read_text())["rows"]
    assert not any(row["op"] == "quantize-stochastic" for row in plain)
    main(["quantize", "--log2-numel", "12", "--dtypes", "fp32,bf16", "--budget", "0", "--stochastic", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "quantize.json").read_text())["rows"]
    stochastic = {(row["impl"], row["dtype"]): row for row in rows if row["op"] == "quantize-stochastic"}
    nearest = {(row["impl"], row["dtype"]): row for row in rows if row["op"] == "quantize"}
    assert {impl for impl, _ in stochastic} == {impl for impl, _ in nearest} - {"bitsandbytes"}
    assert {dtype for _, dtype in stochastic} == {"float32", "bfloat16"}
    assert all(row["ms"] > 0 and row["bytes"] == nearest[key]["bytes"] for key, row in stochastic.items())
