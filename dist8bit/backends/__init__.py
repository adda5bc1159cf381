"""Backend selection: which implementation of the kernel contract runs a call.

Order of preference per device: the compiled extension for that device, else
the plain-PyTorch reference (with one warning naming the build step that
failed and why). DIST8BIT_BACKEND (reference | cpu | cuda) forces one; a
forced compiled backend that cannot be built is an error, not a fallback.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from types import SimpleNamespace

import torch

from . import build, ops, reference, reference_optim
from .build import BuildError
from .compiled import compiled_backend

# The plain-PyTorch backend, with the same interface as the compiled ones.
REFERENCE = SimpleNamespace(
    name="reference",
    quantize_blockwise=reference.quantize_blockwise,
    dequantize_blockwise=reference.dequantize_blockwise,
    fused_step=reference_optim.fused_step,
)

BACKEND_ENV = "DIST8BIT_BACKEND"
BACKEND_NAMES = ("reference", "cpu", "cuda")

__all__ = ["BACKEND_ENV", "BACKEND_NAMES", "REFERENCE", "available_backends", "backend_for", "load_backend", "ops"]


def _forced_backend() -> str | None:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower() or None
    if forced is not None and forced not in BACKEND_NAMES:
        raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; use one of {BACKEND_NAMES} or unset it")
    return forced


# Why each compiled backend that failed is missing, for load_backend's error.
_BUILD_FAILURES: dict[str, BuildError] = {}


@cache
def _load_compiled(kind: str) -> SimpleNamespace | None:
    """Build and load one extension once per process; None (and one warning) on failure."""
    loader = build.load_cpu_extension if kind == "cpu" else build.load_cuda_extension
    try:
        loader()
        return compiled_backend(kind)
    except Exception as error:  # any build failure: compiler, nvcc, ninja, headers, loading
        failure = build.as_build_error(kind, error)
        _BUILD_FAILURES[kind] = failure
        if _forced_backend() == kind:
            raise RuntimeError(f"{BACKEND_ENV}={kind} but {failure}") from error
        warnings.warn(fallback_warning(failure), RuntimeWarning, stacklevel=3)
        return None


def fallback_warning(failure: BuildError) -> str:
    """The one warning a silent fallback gets: what failed, at which step, and how to choose instead."""
    return (
        f"dist8bit: {failure.summary}\nFalling back to the slow plain-PyTorch reference backend for "
        f"{failure.kind} tensors. {build.backend_hint()}"
    )


def load_backend(name: str) -> SimpleNamespace:
    """The backend module called `name`, building it if needed (raises if it cannot be had)."""
    if name == "reference":
        return REFERENCE
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the cuda backend needs a CUDA GPU, but torch.cuda.is_available() is False")
    backend = _load_compiled(name)
    if backend is None:
        failure = _BUILD_FAILURES.get(name)
        raise RuntimeError(f"the {name} backend is unavailable on this machine: {failure}") from failure
    return backend


def use_cpu_variant(variant: str) -> None:
    """Run the dist8bit CPU operators of this process on another build of the kernels.

    `variant` is "native" (the default build) or a build.CPU_VARIANT_FLAGS key:
    "avx2" (the path of x86 CPUs without AVX-512), "avx512-novbmi" (AVX-512
    without VBMI: Skylake-SP/Cascade Lake Xeons) or "portable" (the scalar
    loops). Results are the same bits on every build; the point is to time or
    test, on one machine, the path another machine takes. The native build is
    loaded first: a later load of it would register its kernels over the variant's.
    """
    load_backend("cpu")
    if variant != "native":
        build.load_cpu_variant_extension(variant)


def backend_for(device: torch.device) -> SimpleNamespace:
    """The backend that should run kernels for tensors on `device`."""
    forced = _forced_backend()
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"dist8bit supports CPU and CUDA tensors, got a tensor on {device.type!r}; move it with .cpu() or .cuda()"
        )
    if forced == "reference":
        return REFERENCE
    if forced is not None and forced != device.type:
        raise ValueError(f"{BACKEND_ENV}={forced} cannot run tensors on {device.type}; unset it or use 'reference'")
    return _load_compiled(device.type) or REFERENCE


def available_backends() -> list[str]:
    """Backends usable on this machine (building the extensions if needed)."""
    names = ["reference"]
    if _load_compiled("cpu") is not None:
        names.append("cpu")
    if torch.cuda.is_available() and _load_compiled("cuda") is not None:
        names.append("cuda")
    return names
