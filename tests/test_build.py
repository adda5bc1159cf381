"""JIT build machinery: cache location, concurrent ranks, rebuilds, fallback."""

from __future__ import annotations

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
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(build, "load_cpu_extension", broken_build)
    backends._load_compiled.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*no C\\+\\+ compiler found.*reference backend"):
            assert backends.backend_for(torch.device("cpu")) is backends.REFERENCE
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backends.backend_for(torch.device("cpu")) is backends.REFERENCE
        monkeypatch.setenv("DIST8BIT_BACKEND", "cpu")
        with pytest.raises(RuntimeError, match="unavailable"):
            backends.load_backend("cpu")
    finally:
        backends._load_compiled.cache_clear()


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
    import os

    return {k: v for k, v in os.environ.items() if k != "DIST8BIT_BACKEND"}
