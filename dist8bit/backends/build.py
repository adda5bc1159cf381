"""Just-in-time build of the C++/CUDA extensions, cached and safe under torchrun.

Why JIT: one wheel-free install serves every CPU flag set and GPU arch, and
the CPU kernels can use `-march=native`. The cache directory is keyed by
torch, Python and the machine (CPU flags; for CUDA the nvcc version, the
target architecture list and the GPU's arch), so a shared home directory
across different machines or toolkits never loads a foreign binary. An
exclusive file lock serialises concurrent builds (all torchrun ranks import
at once); torch's own source hashing rebuilds when a source file changes.

A failed build raises `BuildError`, which names the step that failed
(compiler check, nvcc check, compile, link, load) and how to force a backend,
so the fallback warning can say what actually went wrong. The checks that
decide those messages are pure functions of their inputs (nvcc's version
text, the arch list, the ninja log) so they are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

CACHE_ENV = "DIST8BIT_CACHE_DIR"
VERBOSE_ENV = "DIST8BIT_VERBOSE_BUILD"
ARCH_ENV = "TORCH_CUDA_ARCH_LIST"

# The steps a build goes through, in order; BuildError.step is one of them.
BUILD_STEPS = ("compiler check", "nvcc check", "compile", "link", "load")
# How many lines of a compiler's output a failure message quotes.
ERROR_LINES = 8


def _find_csrc() -> Path:
    """Kernel sources: copied into the package by a wheel build, else the repo's csrc/."""
    packaged = Path(__file__).resolve().parents[1] / "_csrc"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "csrc"


CSRC = _find_csrc()


class BuildError(RuntimeError):
    """An extension that could not be had: which one, the step that failed, why, and the way out.

    Why a type of its own: the fallback warning and a forced backend's error
    must tell "no compiler" from "your toolkit does not match torch" from
    "the compiler rejected the code", and all must say how to pick a backend.
    """

    def __init__(self, kind: str, step: str, detail: str) -> None:
        if step not in BUILD_STEPS:
            raise ValueError(f"unknown build step {step!r}; one of {BUILD_STEPS}")
        self.kind, self.step, self.detail = kind, step, detail
        self.summary = f"the {kind.upper()} extension failed at the {step} step: {detail}"
        super().__init__(f"{self.summary}\n{backend_hint()}")


def backend_hint() -> str:
    """How to force a backend; the selector lives in the package, imported late to avoid a cycle."""
    from . import BACKEND_ENV

    return (
        f"To choose a backend explicitly set {BACKEND_ENV}=reference (plain PyTorch: always works, slow) "
        f"or {BACKEND_ENV}=cpu / {BACKEND_ENV}=cuda (compiled kernels: an error if they cannot be built); "
        f"{VERBOSE_ENV}=1 prints the full build log."
    )


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


def _machine_tag(kind: str, device_tag: str) -> str:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_tag = "torch" + torch.__version__.replace("+", "_")
    return f"{kind}-{torch_tag}-{py}-{device_tag}"


def build_directory(kind: str, device_tag: str | None = None) -> Path:
    """The cache folder for one kind of extension on this machine (created if missing).

    `device_tag` names what the binary depends on beyond torch and Python;
    CPU builds default to the CPU's flags, CUDA builds must pass `cuda_cache_tag`.
    """
    if device_tag is None:
        if kind == "cuda":
            raise ValueError("a CUDA build directory needs device_tag=cuda_cache_tag(...)")
        device_tag = f"cpu-{_cpu_signature()}"
    path = cache_root() / _machine_tag(kind, device_tag)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sources(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix in {".cpp", ".cu"})


# ---------------------------------------------------------------- nvcc and arch


def nvcc_version(version_text: str) -> str:
    """The toolkit version in `nvcc --version` output: '12.4.131' (or '12.4' if only the release is printed)."""
    full = re.search(r"release \d+\.\d+, V(\d+\.\d+\.\d+)", version_text)
    if full:
        return full.group(1)
    release = re.search(r"release (\d+\.\d+)", version_text)
    if release:
        return release.group(1)
    last = version_text.strip().splitlines()[-1:] or ["<no output>"]
    raise BuildError("cuda", "nvcc check", f"cannot read a CUDA release from `nvcc --version` ({last[0]!r})")


def check_nvcc_matches_torch(version_text: str, torch_cuda: str | None, nvcc: str = "nvcc") -> str:
    """nvcc's version if its CUDA major matches torch's, else a BuildError naming both.

    Why: torch checks this only for setup.py builds, not for JIT loads; a
    toolkit of another major version fails deep in the compile or builds a
    library that cannot load against torch's CUDA runtime. Checking first
    gives one clear message instead of a page of compiler output.
    """
    version = nvcc_version(version_text)
    if torch_cuda is None:
        raise BuildError(
            "cuda",
            "nvcc check",
            f"torch {torch.__version__} was built without CUDA (torch.version.cuda is None); "
            "install a CUDA build of torch to build the CUDA kernels",
        )
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        release = ".".join(version.split(".")[:2])
        major = torch_cuda.split(".")[0]
        raise BuildError(
            "cuda",
            "nvcc check",
            f"{nvcc} is CUDA {release} but torch {torch.__version__} was built with CUDA {torch_cuda}; "
            f"the major versions must match. Install a CUDA {major}.x toolkit (ideally {torch_cuda}), "
            f"or set CUDA_HOME to one (e.g. CUDA_HOME=/usr/local/cuda-{torch_cuda}), "
            "or install the torch build for your toolkit",
        )
    return version


def find_nvcc() -> str:
    """The nvcc torch's extension builder will run: $CUDA_HOME/bin/nvcc as torch resolved it."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc)
        raise BuildError("cuda", "nvcc check", f"CUDA_HOME is {home} but {nvcc} does not exist; set CUDA_HOME to a CUDA toolkit")
    raise BuildError(
        "cuda",
        "nvcc check",
        f"no CUDA toolkit found (CUDA_HOME is unset and nvcc is not on PATH); install the CUDA {torch.version.cuda} "
        "toolkit and set CUDA_HOME to it",
    )


def run_nvcc_version(nvcc: str) -> str:
    """`nvcc --version` output; a BuildError at the nvcc check step if it cannot run."""
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError("cuda", "nvcc check", f"`{nvcc} --version` failed: {error}") from error


def _arch_entries(arch_list: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST entries; torch accepts both ';' and ' ' as separators."""
    return [entry for entry in arch_list.replace(" ", ";").split(";") if entry]


def _covers(entry: str, device_arch: str) -> bool:
    """Whether one list entry yields SASS for the device ('9.0', '9.0+PTX', '9.0a')."""
    return entry.removesuffix("+PTX").removesuffix("a") == device_arch


def cuda_arch_list(requested: str | None, capability: tuple[int, int]) -> tuple[str, bool]:
    """The arch list to build for, and whether the device's arch had to be added to the user's.

    Why: with a TORCH_CUDA_ARCH_LIST that lacks the running GPU, the build
    succeeds and the first launch dies with "no kernel image is available";
    adding the device's arch costs one more compile and never breaks a launch.
    """
    device_arch = f"{capability[0]}.{capability[1]}"
    if requested is None or not requested.strip():
        return device_arch, False
    if requested.strip() == "native":  # torch builds for every visible GPU, this one included
        return "native", False
    entries = _arch_entries(requested)
    if any(_covers(entry, device_arch) for entry in entries):
        return ";".join(entries), False
    return ";".join([*entries, device_arch]), True


def cuda_cache_tag(torch_cuda: str | None, nvcc: str, arch_list: str, capability: tuple[int, int]) -> str:
    """The CUDA part of the cache folder name: torch's CUDA, nvcc's version, the arch list and the GPU.

    Why all four: a binary from another nvcc or another arch list is a
    different binary, and torch's source hashing does not see either.
    """
    tokens = sorted({re.sub(r"[^0-9a-z]", "", entry.lower().replace("+ptx", "ptx")) for entry in _arch_entries(arch_list)})
    archs = "-".join(tokens)
    if len(archs) > 40:
        archs = hashlib.sha1(archs.encode()).hexdigest()[:10]
    return f"cu{torch_cuda}-nvcc{nvcc}-sm{capability[0]}{capability[1]}-arch{archs}"


# ---------------------------------------------------------------- failures


def check_compiler(kind: str) -> None:
    """A missing compiler or ninja, said plainly before torch buries it in a build log."""
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    program = compiler.split()[0] if compiler.strip() else "c++"
    if shutil.which(program) is None:
        raise BuildError(kind, "compiler check", f"no C++ compiler found ({compiler!r} is not on PATH); install g++ or set CXX")
    if not cpp_extension.is_ninja_available():
        raise BuildError(kind, "compiler check", "ninja is not installed (pip install ninja)")


_FAILED = re.compile(r"^FAILED: (?:\[code=\d+\] )?(\S+)")
_ERROR_LINE = re.compile(r"error|undefined reference|undefined symbol|cannot find|not found", re.IGNORECASE)
_LIBRARY_SUFFIXES = (".so", ".dylib", ".pyd", ".dll")


def ninja_failure(log: str) -> tuple[str, list[str]]:
    """From torch's 'Error building extension' text: ('compile' | 'link', first compiler error lines).

    ninja prints `FAILED: target`, the command, then the tool's output: a
    failed library target is the link step, anything else a compile.
    """
    lines = log.splitlines()
    step, start = "compile", 0
    for index, line in enumerate(lines):
        failed = _FAILED.match(line.strip())
        if failed:
            step = "link" if failed.group(1).endswith(_LIBRARY_SUFFIXES) else "compile"
            start = index + 2  # the echoed command line follows the FAILED line
            break
    output = [line.rstrip() for line in lines[start:] if line.strip() and not line.startswith("ninja: ")]
    errors = [line for line in output if _ERROR_LINE.search(line)]
    return step, (errors or output or [lines[0] if lines else "no output"])[:ERROR_LINES]


def as_build_error(kind: str, error: BaseException) -> BuildError:
    """Any exception out of a build as a BuildError naming the step it came from."""
    if isinstance(error, BuildError):
        return error
    text = str(error)
    if text.startswith("Error building extension"):
        step, lines = ninja_failure(text)
        verb = "compilation" if step == "compile" else "linking"
        return BuildError(kind, step, f"{verb} failed:\n" + "\n".join("  " + line for line in lines))
    if "Ninja is required" in text:
        return BuildError(kind, "compiler check", "ninja is not installed (pip install ninja)")
    # torch loads the library with ctypes (OSError) once ninja has succeeded.
    step = "load" if isinstance(error, (OSError, ImportError)) else "compile"
    return BuildError(kind, step, _first_lines(error))


def _first_lines(error: BaseException) -> str:
    """The first line of an error and of its cause: torch wraps ctypes' 'undefined symbol' in a vaguer OSError."""
    lines: list[str] = []
    current: BaseException | None = error
    while current is not None and len(lines) < 3:
        text = str(current).strip()
        lines.append(f"{type(current).__name__}: {text.splitlines()[0] if text else ''}")
        current = current.__cause__ or current.__context__
    return " <- ".join(lines)


# ---------------------------------------------------------------- building


def load_extension(
    kind: str,
    name: str,
    source_dir: Path,
    cflags: list[str],
    cuda_cflags: list[str] | None = None,
    ldflags: list[str] | None = None,
    device_tag: str | None = None,
) -> str:
    """Build every .cpp/.cu in `source_dir` into a torch-op library and load it.

    Returns the shared library path. Rebuilds when a source or flag changes
    (torch hashes them) and serialises concurrent builds with a file lock.
    Raises BuildError naming the failed step.
    """
    from torch.utils import cpp_extension

    check_compiler(kind)
    directory = build_directory(kind, device_tag) / name
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(directory):
        try:
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
        except Exception as error:
            raise as_build_error(kind, error) from error


# -fopenmp: at::parallel_for is an inline header that runs its OpenMP pragma in
# the extension's own code; without the flag it runs every range on one thread.
# The library then binds to the libgomp.so.1 torch has already loaded.
CPU_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
CPU_LDFLAGS = ["-fopenmp"]
# Host-compiler flags for the CUDA extension's .cpp bindings.
CUDA_HOST_FLAGS = ["-O3", "-std=c++17"]
# --fmad=false: the kernels must round like the reference, bit for bit.
CUDA_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "-lineinfo"]


def load_cpu_extension() -> str:
    """Build (if needed) and load the CPU kernels."""
    return load_extension("cpu", "dist8bit_cpu", CSRC / "cpu", CPU_FLAGS, ldflags=CPU_LDFLAGS)


# Other builds of the CPU kernels, for measuring and testing on one machine the
# paths other machines take: "avx2" (x86 CPUs without AVX-512, e.g. AMD EPYC
# Zen 2/3), "avx512-novbmi" (AVX-512 without the byte permutes of VBMI/VBMI2:
# Intel Skylake-SP and Cascade Lake Xeons) and "portable" (the scalar loops of
# any other CPU). On a machine that lacks what a variant leaves out, the
# variant builds the same code as the native build.
CPU_VARIANT_FLAGS = {
    "avx2": ["-mno-avx512f"],
    "avx512-novbmi": ["-mno-avx512vbmi", "-mno-avx512vbmi2"],
    "portable": ["-DD8_PORTABLE"],
}


def load_cpu_variant_extension(variant: str) -> str:
    """Build (if needed) and load the CPU kernels as `variant` (a CPU_VARIANT_FLAGS key)."""
    if variant not in CPU_VARIANT_FLAGS:
        raise ValueError(f"unknown CPU kernel variant {variant!r}; choose from {sorted(CPU_VARIANT_FLAGS)}")
    flags = CPU_FLAGS + CPU_VARIANT_FLAGS[variant]
    module = "dist8bit_cpu_" + variant.replace("-", "_")
    return load_extension("cpu", module, CSRC / "cpu", flags, ldflags=CPU_LDFLAGS)


def load_cuda_extension() -> str:
    """Build (if needed) and load the CUDA kernels for the current GPU's arch.

    Checks nvcc against torch's CUDA first, builds for the user's arch list
    plus this GPU's arch, and keys the cache on nvcc and that list.
    """
    nvcc = find_nvcc()
    version = check_nvcc_matches_torch(run_nvcc_version(nvcc), torch.version.cuda, nvcc)
    capability = torch.cuda.get_device_capability()
    requested = os.environ.get(ARCH_ENV)
    arch_list, added = cuda_arch_list(requested, capability)
    if added:
        warnings.warn(
            f"dist8bit: {ARCH_ENV}={requested!r} lacks this GPU's architecture "
            f"{capability[0]}.{capability[1]}; building the CUDA kernels for {arch_list!r} so they can launch here.",
            RuntimeWarning,
            stacklevel=2,
        )
    tag = cuda_cache_tag(torch.version.cuda, version, arch_list, capability)
    with _environment(ARCH_ENV, arch_list):
        return load_extension("cuda", "dist8bit_cuda", CSRC / "cuda", CUDA_HOST_FLAGS, CUDA_FLAGS, device_tag=tag)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the build only: torch reads the arch list from the environment."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


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

    def __exit__(self, *_exc_info: object) -> None:
        assert self._handle is not None
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
