"""Shared fixtures: run functional tests on every backend this machine has.

On a developer machine a compiled backend that cannot be built is skipped
with the reason. Under CI (CI=true or CI=1) the same failure fails the run
at collection: a broken C++ build must not turn into a green, all-skipped
suite. GPU tests skip cleanly wherever torch sees no GPU, CI included (the
CUDA extension is built by the GPU tests themselves, which fail, not skip,
when it cannot be built).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import build_failure

from dist8bit.backends import BACKEND_ENV

CI_ENV = "CI"


def running_in_ci() -> bool:
    """CI=true / CI=1 (what CI services set): builds must succeed there, not skip."""
    return os.environ.get(CI_ENV, "").strip().lower() in {"true", "1", "yes"}


def require_build_in_ci(name: str, failure: str | None, ci: bool) -> None:
    """Under CI a failed build ends the run as failed, with the build error; elsewhere nothing.

    Why at session start and not per test: the kernel test modules skip
    themselves when the extension is missing, so a per-test check would
    never run and CI would report an all-skipped, green suite.
    """
    if failure is not None and ci:
        pytest.exit(
            f"{CI_ENV}=true and the {name} extension failed to build:\n{failure}", returncode=pytest.ExitCode.TESTS_FAILED
        )


# Built once at collection (build_failure caches it per process).
CPU_BUILD_FAILURE = build_failure("cpu")


def pytest_sessionstart(session: pytest.Session) -> None:
    require_build_in_ci("cpu", CPU_BUILD_FAILURE, running_in_ci())


def _backend_params() -> list:
    cpu_skip = None if CPU_BUILD_FAILURE is None else f"CPU extension could not be built: {CPU_BUILD_FAILURE.splitlines()[0]}"
    cuda_marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    return [
        pytest.param(("reference", "cpu"), id="reference-cpu"),
        pytest.param(("cpu", "cpu"), id="cpu", marks=pytest.mark.skipif(cpu_skip is not None, reason=str(cpu_skip))),
        pytest.param(("reference", "cuda"), id="reference-cuda", marks=cuda_marks),
        pytest.param(("cuda", "cuda"), id="cuda", marks=cuda_marks),
    ]


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch) -> torch.device:
    """Force one backend for the test and return the device its tensors live on."""
    name, device = request.param
    monkeypatch.setenv(BACKEND_ENV, name)
    return torch.device(device)
