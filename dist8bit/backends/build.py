"""Just-in-time build of the C++/CUDA extensions, cached and safe under torchrun.

Why JIT: one wheel-free install serves every CPU flag set and GPU arch, and
the CPU kernels can use `-march=native`. The cache directory is keyed by
torch, Python and the machine (CPU flags or GPU arch), so a shared home
directory across different machines never loads a foreign binary. An
exclusive file lock serialises concurrent builds (all torchrun ranks import
at once); torch's own source hashing rebuilds when a source file changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

CACHE_ENV = "DIST8BIT_CACHE_DIR"
VERBOSE_ENV = "DIST8BIT_VERBOSE_BUILD"


def _find_csrc() -> Path:
    """Kernel sources: copied into the package by a wheel build, else the repo's csrc/."""
    packaged = Path(__file__).resolve().parents[1] / "_csrc"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "csrc"


CSRC = _find_csrc()


def cache_root() -> Path:
    """$DIST8BIT_CACHE_DIR, else $XDG_CACHE_HOME/dist8bit, else ~/.cache/dist8bit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dist8bit"


def _cpu_signature() -> str:
    """Model name and ISA flags: binaries built with -march=native only run where these match."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "model name", "Features")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _machine_tag(kind: str) -> str:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_tag = "torch" + torch.__version__.replace("+", "_")
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability()
        device_tag = f"cu{torch.version.cuda}-sm{major}{minor}"
    else:
        device_tag = f"cpu-{_cpu_signature()}"
    return f"{kind}-{torch_tag}-{py}-{device_tag}"


def build_directory(kind: str) -> Path:
    path = cache_root() / _machine_tag(kind)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sources(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix in {".cpp", ".cu"})


def load_extension(
    kind: str,
    name: str,
    source_dir: Path,
    cflags: list[str],
    cuda_cflags: list[str] | None = None,
    ldflags: list[str] | None = None,
) -> str:
    """Build every .cpp/.cu in `source_dir` into a torch-op library and load it.

    Returns the shared library path. Rebuilds when a source or flag changes
    (torch hashes them) and serialises concurrent builds with a file lock.
    """
    from torch.utils import cpp_extension

    directory = build_directory(kind) / name
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(directory):
        return cpp_extension.load(
            name=name,
            sources=_sources(source_dir),
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(CSRC), str(source_dir)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=bool(os.environ.get(VERBOSE_ENV)),
        )


# -fopenmp: at::parallel_for is an inline header that runs its OpenMP pragma in
# the extension's own code; without the flag it runs every range on one thread.
# The library then binds to the libgomp.so.1 torch has already loaded.
CPU_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
CPU_LDFLAGS = ["-fopenmp"]
# --fmad=false: the kernels must round like the reference, bit for bit.
CUDA_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "-lineinfo"]


def load_cpu_extension() -> str:
    """Build (if needed) and load the CPU kernels."""
    return load_extension("cpu", "dist8bit_cpu", CSRC / "cpu", CPU_FLAGS, ldflags=CPU_LDFLAGS)


def load_cuda_extension() -> str:
    """Build (if needed) and load the CUDA kernels for the current GPU's arch."""
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return load_extension("cuda", "dist8bit_cuda", CSRC / "cuda", ["-O3", "-std=c++17"], CUDA_FLAGS)


class _exclusive_lock:
    """flock on a file in the build directory; released by the OS if a rank dies."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / ".dist8bit-build.lock"
        self._handle = None

    def __enter__(self) -> None:
        self._handle = open(self._path, "a")
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX)
        # torch's own build baton is a plain file that a killed rank leaves behind
        # (and every later build then waits forever); holding the flock, nobody
        # else can be building, so any baton left here is stale.
        (self._path.parent / "lock").unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        assert self._handle is not None
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
