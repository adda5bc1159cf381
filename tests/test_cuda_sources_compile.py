"""The CUDA sources compile with nvcc on a machine without a GPU (CI has no GPU).

Every csrc/**/*.cu is compiled for sm_90 with only the CUDA runtime and the
project's own headers on the include path: a .cu file must not include torch
headers (the CPU torch wheel lacks torch's CUDA headers; the torch binding
lives in a .cpp file). The launcher headers of the CUDA kernels and of paging
must also be usable from host C++ (the .cpp bindings include them).

The torch bindings csrc/cuda/*.cpp are compiled too (to an object, with the
host flags the JIT build uses, torch's include paths and the CUDA include
dir). They include c10/cuda headers, and the CPU torch wheel lacks the one
header torch's CMake generates for CUDA builds (c10/cuda/impl/cuda_cmake_macros.h):
a stub with the same content is written to a temporary include dir, only
when the real one is missing.

Under CI (CI=true / CI=1) a missing nvcc fails test_ci_has_nvcc instead of
leaving every compile test silently skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import running_in_ci

from dist8bit.backends import build

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc")
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
BINDING_SOURCES = sorted((CSRC / "cuda").glob("*.cpp"))
TORCH_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"](torch|ATen|c10)/", re.MULTILINE)

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")


def test_ci_has_nvcc():
    """CI must compile the CUDA sources (nvcc is installed there); a skip would hide that."""
    if running_in_ci() and NVCC is None:
        pytest.fail("CI=true but nvcc is not on PATH: the CUDA sources would go uncompiled")


def _source_id(path: Path) -> str:
    return str(path.relative_to(CSRC))


def compile_object(source: Path, output: Path, *flags: str) -> None:
    """nvcc -c FLAGS -I csrc -I <source's folder> SOURCE -o OUTPUT, run from the repository root; must succeed."""
    assert NVCC is not None
    command = [NVCC, "-c", *flags, "-I", str(CSRC), "-I", str(source.parent), str(source), "-o", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    assert output.stat().st_size > 0


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "no csrc/**/*.cu found"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=_source_id)
def test_cuda_source_includes_no_torch_header(source):
    for path in [source, *sorted(source.parent.glob("*.cuh"))]:
        match = TORCH_INCLUDE.search(path.read_text())
        assert match is None, f"{path.relative_to(REPO)} includes a torch header ({match.group(0).strip()})"


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=_source_id)
def test_cuda_source_compiles(source, tmp_path):
    compile_object(source, tmp_path / (source.name + ".o"), "-std=c++17", "-gencode", "arch=compute_90,code=sm_90")


# Headers that host C++ includes (bindings.cpp, fused_step_binding.cpp, paging_binding.cpp), each with a
# probe calling its launchers: they must compile without nvcc's device passes.
HOST_HEADER_PROBES = {
    "quantize_kernels.cuh": (
        "cudaError_t probe(cudaStream_t stream) {\n"
        "  using namespace dist8bit::cuda;\n"
        "  cudaError_t a = launch_quantize_blockwise(FloatType::kBFloat16, nullptr, 0, nullptr, nullptr, nullptr, 64,\n"
        "                                            true, 7u, nullptr, nullptr, stream);\n"
        "  cudaError_t b = launch_dequantize_blockwise(FloatType::kFloat16, nullptr, 0, nullptr, nullptr, 64,\n"
        "                                              nullptr, stream);\n"
        "  return a != cudaSuccess ? a : b;\n"
        "}\n"
    ),
    "fused_step_kernels.cuh": (
        "cudaError_t probe(cudaStream_t stream) {\n"
        "  using namespace dist8bit::cuda;\n"
        "  FusedStepConfig config{};\n"
        "  config.rule = dist8bit::Rule::kAdam;\n"
        "  config.num_states = 2;\n"
        "  FusedSegment segment{};\n"
        "  alignas(16) unsigned char table[256];\n"
        "  if (fused_step_table_bytes(1) > sizeof(table)) return cudaErrorInvalidValue;\n"
        "  if (!fused_step_supported(config.rule, config.num_states, true, 256)) return cudaErrorInvalidValue;\n"
        "  const int64_t units = fill_fused_step_table(config, &segment, 1, table);\n"
        "  return launch_fused_step(config, nullptr, 1, units, stream);\n"
        "}\n"
    ),
    "paging.cuh": (
        "cudaError_t probe(void* p, cudaStream_t s) {\n"
        "  using namespace dist8bit::cuda::paging;\n"
        "  int a = 0, b = 0; bool ok = false; long long n = 0, bytes = 0;\n"
        "  cudaError_t e = managed_alloc(&p, 4096, 0, s);\n"
        "  if (e == cudaSuccess) e = prefetch(p, 4096, kHost, s);\n"
        "  if (e == cudaSuccess) e = prefer_host(p, 4096, 0);\n"
        "  if (e == cudaSuccess) e = prefer_device(p, 4096, 0);\n"
        "  if (e == cudaSuccess) e = range_locations(p, 4096, &a, &b);\n"
        "  if (e == cudaSuccess) e = concurrent_managed_access(0, &ok);\n"
        "  live(&n, &bytes);\n"
        "  if (e == cudaSuccess) e = managed_release(p, 4096, 0, s);\n"
        "  return e == cudaSuccess ? reclaim(0, s, true) : e;\n"
        "}\n"
    ),
}


@needs_nvcc
@pytest.mark.parametrize("header", sorted(HOST_HEADER_PROBES))
def test_launcher_header_compiles_as_host_cpp(header, tmp_path):
    """The launcher headers are included by host C++ files: they must need no nvcc."""
    probe = tmp_path / "probe.cpp"
    probe.write_text(f'#include "{header}"\n' + HOST_HEADER_PROBES[header])
    compile_object(probe, tmp_path / "probe.o", "-std=c++17", "-I", str(CSRC / "cuda"))


# What torch's CMake writes for a CUDA build (c10/cuda/impl/cuda_cmake_macros.h.in):
# c10/cuda/CUDAMacros.h includes it for the export macros of libc10_cuda.
CUDA_CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"
CUDA_CMAKE_MACROS_STUB = """#pragma once
// Stub written by tests/test_cuda_sources_compile.py: the CPU torch wheel ships
// c10/cuda headers but not this CMake-generated one.
#define C10_CUDA_BUILD_SHARED_LIBS
"""


def _torch_include_dirs() -> list[Path]:
    from torch.utils import cpp_extension

    return [Path(path) for path in cpp_extension.include_paths()]


def _cuda_include_dir() -> Path | None:
    """The toolkit's include dir (nvcc adds it for .cu files; torch's build passes it for .cpp)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC is not None:
        homes.insert(2, str(Path(NVCC).resolve().parents[1]))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


def missing_header_stub(include_dirs: list[Path], folder: Path) -> Path | None:
    """An include dir with a stub cuda_cmake_macros.h, or None when torch ships the real one."""
    if any((directory / CUDA_CMAKE_MACROS).is_file() for directory in include_dirs):
        return None
    header = folder / CUDA_CMAKE_MACROS
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text(CUDA_CMAKE_MACROS_STUB)
    return folder


@pytest.fixture(scope="module")
def binding_include_flags(tmp_path_factory) -> list[str]:
    """-isystem flags for torch's headers, the stub (if needed) and CUDA's, in the JIT build's order."""
    torch_dirs = _torch_include_dirs()
    stub = missing_header_stub(torch_dirs, tmp_path_factory.mktemp("cuda_stub_include"))
    cuda = _cuda_include_dir()
    dirs = [*torch_dirs, *([stub] if stub else []), *([cuda] if cuda else [])]
    return [flag for directory in dirs for flag in ("-isystem", str(directory))]


def test_stub_header_only_when_missing(tmp_path):
    real = tmp_path / "real"
    (real / CUDA_CMAKE_MACROS).parent.mkdir(parents=True)
    (real / CUDA_CMAKE_MACROS).write_text("#pragma once\n")
    assert missing_header_stub([real], tmp_path / "stub") is None
    stub = missing_header_stub([tmp_path / "empty"], tmp_path / "stub")
    assert stub is not None and "C10_CUDA_BUILD_SHARED_LIBS" in (stub / CUDA_CMAKE_MACROS).read_text()


def test_binding_sources_exist():
    assert BINDING_SOURCES, "no csrc/cuda/*.cpp found"


@needs_nvcc
@pytest.mark.parametrize("source", BINDING_SOURCES, ids=_source_id)
def test_binding_source_compiles(source, tmp_path, binding_include_flags):
    """The host-compiled torch bindings build against torch's headers, as the JIT build compiles them."""
    flags = [
        *build.CUDA_HOST_FLAGS,
        "-Xcompiler",
        "-fPIC",
        "-DTORCH_EXTENSION_NAME=dist8bit_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    compile_object(source, tmp_path / (source.name + ".o"), *flags, *binding_include_flags)
