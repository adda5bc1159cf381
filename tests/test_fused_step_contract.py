"""FusedStepCall refuses a malformed call before any backend sees it, and every backend runs a well-formed one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fused_step_cases import CASES_BY_NAME, StepTensors

from dist8bit.backends import REFERENCE


def adamw_call(segments: int = 2):
    tensors = StepTensors(
        [torch.ones(5) for _ in range(segments)],
        [torch.full((5,), 0.5) for _ in range(segments)],
        [[torch.zeros(5) for _ in range(segments)], [torch.zeros(5) for _ in range(segments)], []],
        [[], [], []],
        (True, False),
        False,
        256,
    )
    return tensors, tensors.call(CASES_BY_NAME["adamw"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"states": [[], []]}, "states must hold 3 slots"),
        ({"codebooks": [None]}, "codebooks must hold 3 slots"),
        ({"grads": [torch.ones(5)]}, "grads has 1 entries for 2 segments"),
        ({"segment_offsets": [0, 0, 0]}, "segment_offsets has 3 entries"),
        ({"states": [[torch.zeros(5)], [], []]}, r"states\[0\] has 1 entries"),
        ({"absmaxes": [[], [torch.zeros(1)], []]}, r"absmaxes\[1\] has 1 entries"),
    ],
)
def test_malformed_calls_are_refused(override, message):
    _, call = adamw_call()
    with pytest.raises(ValueError, match=message):
        replace(call, **override)


def test_reference_runs_a_call():
    tensors, call = adamw_call()
    REFERENCE.fused_step(call)
    assert call.used_slots() == [0, 1]
    assert all(not torch.equal(p, torch.ones(5)) for p in tensors.params)  # the call updated the parameters in place
