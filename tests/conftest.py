"""Shared fixtures: run functional tests on every backend this machine has."""

from __future__ import annotations

import pytest
import torch

from dist8bit.backends import BACKEND_ENV, load_backend


def _compiled_available(name: str) -> bool:
    try:
        load_backend(name)
    except RuntimeError:
        return False
    return True


def _backend_params() -> list:
    params = [pytest.param(("reference", "cpu"), id="reference-cpu")]
    params.append(
        pytest.param(
            ("cpu", "cpu"),
            id="cpu",
            marks=pytest.mark.skipif(not _compiled_available("cpu"), reason="CPU extension could not be built"),
        )
    )
    cuda_marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    params.append(pytest.param(("reference", "cuda"), id="reference-cuda", marks=cuda_marks))
    params.append(pytest.param(("cuda", "cuda"), id="cuda", marks=cuda_marks))
    return params


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch) -> torch.device:
    """Force one backend for the test and return the device its tensors live on."""
    name, device = request.param
    monkeypatch.setenv(BACKEND_ENV, name)
    return torch.device(device)
