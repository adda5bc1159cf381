"""JIT build machinery: cache location, concurrent ranks, rebuilds, fallback.

Also the checks that make the build tell the truth (nvcc against torch's
CUDA, the cache key, the arch list, failure messages naming the step) and
the CI rule that a failed build fails the suite: all without a GPU.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dist8bit.backends as backends
from dist8bit.backends import build


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIST8BIT_CACHE_DIR", str(tmp_path / "custom"))
    assert build.cache_root() == tmp_path / "custom"
    monkeypatch.delenv("DIST8BIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "dist8bit"


def test_build_directory_is_keyed_by_torch_python_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("DIST8BIT_CACHE_DIR", str(tmp_path))
    directory = build.build_directory("cpu")
    assert directory.parent == tmp_path and directory.is_dir()
    name = directory.name
    assert name.startswith("cpu-torch") and f"py{sys.version_info.major}{sys.version_info.minor}" in name


def test_unknown_forced_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DIST8BIT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="DIST8BIT_BACKEND='tpu' is not a backend"):
        backends.backend_for(torch.device("cpu"))


def test_failed_build_falls_back_to_reference_with_one_warning(monkeypatch):
    def broken_build() -> str:
        raise build.BuildError("cpu", "compiler check", "no C++ compiler found ('c++' is not on PATH)")

    monkeypatch.setattr(build, "load_cpu_extension", broken_build)
    backends._load_compiled.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning,
            match=r"(?s)compiler check step: no C\+\+ compiler found.*reference backend.*DIST8BIT_BACKEND=reference",
        ):
            assert backends.backend_for(torch.device("cpu")) is backends.REFERENCE
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backends.backend_for(torch.device("cpu")) is backends.REFERENCE
        monkeypatch.setenv("DIST8BIT_BACKEND", "cpu")
        with pytest.raises(
            RuntimeError, match="unavailable on this machine: the CPU extension failed at the compiler check step"
        ):
            backends.load_backend("cpu")
    finally:
        backends._load_compiled.cache_clear()


def test_forced_backend_that_fails_to_build_is_an_error_naming_the_step(monkeypatch):
    def broken_build() -> str:
        raise RuntimeError("Error building extension 'dist8bit_cpu': " + NINJA_COMPILE_FAILURE)

    monkeypatch.setattr(build, "load_cpu_extension", broken_build)
    monkeypatch.setenv("DIST8BIT_BACKEND", "cpu")
    backends._load_compiled.cache_clear()
    try:
        with pytest.raises(
            RuntimeError,
            match=r"(?s)DIST8BIT_BACKEND=cpu but the CPU extension failed at the compile step.*quantize\.cpp:3:1: error",
        ):
            backends.backend_for(torch.device("cpu"))
    finally:
        backends._load_compiled.cache_clear()


# ---- 1a: nvcc against torch's CUDA

NVCC_12_4 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Cuda compilation tools, release 12.4, V12.4.131
Build cuda_12.4.r12.4/compiler.34097967_0
"""


def test_nvcc_version_is_read_from_version_text():
    assert build.nvcc_version(NVCC_12_4) == "12.4.131"
    assert build.nvcc_version("Cuda compilation tools, release 11.8") == "11.8"
    with pytest.raises(build.BuildError, match="nvcc check step: cannot read a CUDA release"):
        build.nvcc_version("command not found")


def test_matching_major_version_passes():
    assert build.check_nvcc_matches_torch(NVCC_12_4, "12.8") == "12.4.131"
    assert build.check_nvcc_matches_torch(NVCC_12_4, "12.4") == "12.4.131"


def test_major_version_mismatch_is_one_clear_error():
    with pytest.raises(build.BuildError) as raised:
        build.check_nvcc_matches_torch(NVCC_12_4, "13.0", nvcc="/opt/cuda/bin/nvcc")
    error = raised.value
    assert error.kind == "cuda" and error.step == "nvcc check"
    message = str(error)
    assert "/opt/cuda/bin/nvcc is CUDA 12.4" in message and "built with CUDA 13.0" in message
    assert "Install a CUDA 13.x toolkit" in message and "CUDA_HOME" in message
    assert "DIST8BIT_BACKEND=reference" in message and "DIST8BIT_BACKEND=cpu" in message


def test_torch_without_cuda_is_named():
    with pytest.raises(build.BuildError, match="built without CUDA"):
        build.check_nvcc_matches_torch(NVCC_12_4, None)


# ---- 1b: the CUDA cache is keyed on nvcc and the arch list


def test_cuda_cache_tag_names_nvcc_arch_list_and_device():
    tag = build.cuda_cache_tag("12.4", "12.4.131", "8.0;9.0+PTX", (9, 0))
    assert tag == "cu12.4-nvcc12.4.131-sm90-arch80-90ptx"
    assert build.cuda_cache_tag("12.4", "12.6.20", "8.0;9.0+PTX", (9, 0)) != tag
    assert build.cuda_cache_tag("12.4", "12.4.131", "9.0", (9, 0)) != tag
    assert build.cuda_cache_tag("12.4", "12.4.131", "9.0+PTX 8.0", (9, 0)) == tag  # order and separator do not matter


def test_cuda_cache_tag_stays_short_for_long_arch_lists():
    long_list = ";".join(f"{major}.{minor}" for major in range(5, 13) for minor in range(3))
    tag = build.cuda_cache_tag("12.4", "12.4.131", long_list, (9, 0))
    assert len(tag) < 80 and "nvcc12.4.131" in tag


def test_cuda_build_directory_is_keyed_by_the_cache_tag(monkeypatch, tmp_path):
    monkeypatch.setenv("DIST8BIT_CACHE_DIR", str(tmp_path))
    first = build.build_directory("cuda", build.cuda_cache_tag("12.4", "12.4.131", "9.0", (9, 0)))
    second = build.build_directory("cuda", build.cuda_cache_tag("12.4", "12.6.20", "9.0", (9, 0)))
    assert first != second and first.name.endswith("nvcc12.4.131-sm90-arch90")
    with pytest.raises(ValueError, match="device_tag"):
        build.build_directory("cuda")


# ---- 1c: the running GPU's arch is always built


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (None, ("9.0", False)),
        ("", ("9.0", False)),
        ("native", ("native", False)),
        ("9.0", ("9.0", False)),
        ("8.0;9.0+PTX", ("8.0;9.0+PTX", False)),
        ("8.0 9.0a", ("8.0;9.0a", False)),
        ("8.0", ("8.0;9.0", True)),
        ("8.0;8.6+PTX", ("8.0;8.6+PTX;9.0", True)),
        ("7.5 8.0", ("7.5;8.0;9.0", True)),
    ],
)
def test_arch_list_always_includes_the_device(requested, expected):
    assert build.cuda_arch_list(requested, (9, 0)) == expected


def test_two_digit_majors_are_matched_exactly():
    assert build.cuda_arch_list("10.0", (1, 0)) == ("10.0;1.0", True)
    assert build.cuda_arch_list("12.0", (12, 0)) == ("12.0", False)


class _CapturedBuild:
    """Stands in for load_extension: records what load_cuda_extension would build, and the arch env then."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, kind, name, source_dir, cflags, cuda_cflags=None, ldflags=None, device_tag=None) -> str:
        self.calls.append({"kind": kind, "device_tag": device_tag, "arch_env": os.environ.get("TORCH_CUDA_ARCH_LIST")})
        return "/nowhere/dist8bit_cuda.so"


def _fake_cuda_machine(monkeypatch, tmp_path, release: str, torch_cuda: str) -> _CapturedBuild:
    """A fake nvcc printing `release`, torch built for `torch_cuda`, and an sm_90 GPU: no GPU needed."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(build, "find_nvcc", lambda: str(nvcc))
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    captured = _CapturedBuild()
    monkeypatch.setattr(build, "load_extension", captured)
    return captured


def test_cuda_load_checks_nvcc_before_building(monkeypatch, tmp_path):
    captured = _fake_cuda_machine(monkeypatch, tmp_path, "12.4", "13.0")
    with pytest.raises(build.BuildError, match=r"nvcc check step: .*nvcc is CUDA 12\.4 but torch .* built with CUDA 13\.0"):
        build.load_cuda_extension()
    assert captured.calls == []


def test_cuda_load_adds_the_device_arch_and_keys_the_cache(monkeypatch, tmp_path):
    captured = _fake_cuda_machine(monkeypatch, tmp_path, "13.0", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with pytest.warns(RuntimeWarning, match="lacks this GPU's architecture 9.0"):
        build.load_cuda_extension()
    (call,) = captured.calls
    assert call["arch_env"] == "8.0;9.0" and call["device_tag"] == "cu13.0-nvcc13.0.1-sm90-arch80-90"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"  # the user's setting is restored after the build


def test_cuda_load_defaults_to_the_device_arch_without_warning(monkeypatch, tmp_path):
    captured = _fake_cuda_machine(monkeypatch, tmp_path, "13.0", "13.0")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build.load_cuda_extension()
    assert captured.calls[0]["arch_env"] == "9.0" and "TORCH_CUDA_ARCH_LIST" not in os.environ


# ---- 1d: failures name the step and the way out

NINJA_COMPILE_FAILURE = """[1/3] c++ -MMD -MF quantize.o.d -O3 -c /src/quantize.cpp -o quantize.o
FAILED: [code=1] quantize.o
c++ -MMD -MF quantize.o.d -O3 -c /src/quantize.cpp -o quantize.o
/src/quantize.cpp: In function 'void f()':
/src/quantize.cpp:3:1: error: expected ';' before '}' token
ninja: build stopped: subcommand failed.
"""

NINJA_LINK_FAILURE = """[2/2] c++ quantize.o -shared -o dist8bit_cpu.so
FAILED: dist8bit_cpu.so
c++ quantize.o -shared -o dist8bit_cpu.so
/usr/bin/ld: quantize.o: in function `g()':
quantize.cpp:(.text+0x5): undefined reference to `missing()'
collect2: error: ld returned 1 exit status
ninja: build stopped: subcommand failed.
"""


def test_ninja_log_tells_compile_from_link():
    step, lines = build.ninja_failure(NINJA_COMPILE_FAILURE)
    assert step == "compile" and lines == ["/src/quantize.cpp:3:1: error: expected ';' before '}' token"]
    step, lines = build.ninja_failure(NINJA_LINK_FAILURE)
    assert step == "link" and lines[0] == "quantize.cpp:(.text+0x5): undefined reference to `missing()'"


@pytest.mark.parametrize(
    ("error", "step", "detail"),
    [
        (RuntimeError("Error building extension 'x': " + NINJA_COMPILE_FAILURE), "compile", "compilation failed:"),
        (RuntimeError("Error building extension 'x': " + NINJA_LINK_FAILURE), "link", "linking failed:"),
        (RuntimeError("Ninja is required to load C++ extensions"), "compiler check", "ninja is not installed"),
        (OSError("x.so: undefined symbol: _Z7missingv"), "load", "undefined symbol"),
    ],
)
def test_failure_message_names_step_and_backend_env(error, step, detail):
    failure = build.as_build_error("cpu", error)
    assert failure.step == step and detail in failure.detail
    message = str(failure)
    assert f"the CPU extension failed at the {step} step" in message
    for value in ("reference", "cpu", "cuda"):
        assert f"{backends.BACKEND_ENV}={value}" in message


def test_fallback_warning_is_truthful_about_compiler_errors():
    failure = build.as_build_error("cpu", RuntimeError("Error building extension 'x': " + NINJA_COMPILE_FAILURE))
    warning = backends.fallback_warning(failure)
    assert "compilation failed" in warning and "expected ';'" in warning
    assert "Install a C++ compiler" not in warning and "no C++ compiler" not in warning
    assert "DIST8BIT_BACKEND=reference" in warning


def test_missing_compiler_is_found_before_the_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.BuildError, match="compiler check step: no C\\+\\+ compiler found"):
        build.check_compiler("cpu")


def test_registered_no_kernel_is_a_load_failure(monkeypatch):
    from dist8bit.backends.compiled import compiled_backend

    monkeypatch.setattr(backends.ops, "has_kernel", lambda op_name, device_type: False)
    with pytest.raises(build.BuildError, match=r"CPU extension failed at the load step.*registered no"):
        compiled_backend("cpu")


# ---- CI: a failed build fails the suite instead of skipping it


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("TRUE", True), ("false", False), ("", False)])
def test_running_in_ci_reads_the_ci_variable(monkeypatch, value, expected):
    import conftest

    monkeypatch.setenv("CI", value)
    assert conftest.running_in_ci() is expected


def test_ci_turns_a_build_failure_into_a_failure(monkeypatch):
    import conftest
    import helpers

    def broken(name: str) -> None:
        raise RuntimeError(f"the {name} backend is unavailable on this machine: compile step failed")

    monkeypatch.setattr(helpers, "load_backend", broken)
    failure = helpers.build_failure.__wrapped__("cpu")  # past the per-process cache
    assert failure is not None and "compile step failed" in failure
    conftest.require_build_in_ci("cpu", failure, ci=False)  # a developer machine skips instead
    with pytest.raises(pytest.exit.Exception, match="CI=true and the cpu extension failed to build") as raised:
        conftest.require_build_in_ci("cpu", failure, ci=True)
    assert raised.value.returncode == pytest.ExitCode.TESTS_FAILED
    conftest.require_build_in_ci("cpu", None, ci=True)


@pytest.mark.parametrize(("ci", "returncode", "text"), [("true", 1, "CI=true and the cpu extension failed"), ("", 0, "1 passed")])
def test_suite_under_ci_fails_when_the_cpu_build_fails(tmp_path, ci, returncode, text):
    """End to end: with no compiler, CI=true ends pytest as failed; without CI the run passes (kernels skip)."""
    env = {**_clean_env(), "CXX": str(tmp_path / "no-such-compiler"), "CI": ci, "DIST8BIT_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_cache_root_follows_environment"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == returncode, run.stdout + run.stderr
    assert text in run.stdout + run.stderr


TINY_OP = """
#include <torch/library.h>
#include <ATen/core/Tensor.h>
int64_t answer(const at::Tensor&) { return ANSWER; }
TORCH_LIBRARY(NAMESPACE, m) { m.def("answer(Tensor x) -> int", &answer); }
"""

LOADER = """
import sys, torch
from pathlib import Path
from dist8bit.backends import build
build.load_extension("cpu", "tiny_ext", Path(sys.argv[1]), ["-O0"])
print(torch.ops.NAMESPACE.answer(torch.zeros(1)))
"""


def _write_tiny_op(folder, namespace: str, answer: int) -> None:
    (folder / "tiny.cpp").write_text(TINY_OP.replace("ANSWER", str(answer)).replace("NAMESPACE", namespace))


@pytest.mark.slow
def test_concurrent_builds_share_one_cache_and_sources_changes_rebuild(tmp_path):
    """Two 'ranks' build at once into one cache; editing the source triggers a rebuild."""
    source = tmp_path / "src"
    source.mkdir()
    namespace = "dist8bit_build_test"
    _write_tiny_op(source, namespace, 41)
    env = {**_clean_env(), "DIST8BIT_CACHE_DIR": str(tmp_path / "cache")}
    script = textwrap.dedent(LOADER).replace("NAMESPACE", namespace)
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(source)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, err
        assert out.strip() == "41"
    _write_tiny_op(source, namespace, 42)
    rebuilt = subprocess.run([sys.executable, "-c", script, str(source)], env=env, capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == "42"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DIST8BIT_BACKEND"}


BATON_HOLDER = """
import sys, time
from pathlib import Path
from dist8bit.backends import build
directory = Path(sys.argv[1])
build._exclusive_lock(directory).__enter__()
(directory / "lock").touch()  # torch's build baton, as cpp_extension.load creates it
print("building", flush=True)
time.sleep(600)
"""


def test_killed_build_leaves_no_stale_lock(tmp_path):
    """A rank killed mid-build leaves torch's baton file; the next build removes it instead of waiting forever."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(BATON_HOLDER), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "building"
        assert (tmp_path / "lock").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, as for a rank killed by the launcher
        holder.wait(timeout=60)
        holder.stdout.close()
    assert (tmp_path / "lock").exists()  # the stale baton torch would wait on
    with open(tmp_path / ".dist8bit-build.lock", "a") as handle:  # fail, not hang, if the flock outlived the process
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    with build._exclusive_lock(tmp_path):  # the flock died with the process: no wait
        assert not (tmp_path / "lock").exists()
