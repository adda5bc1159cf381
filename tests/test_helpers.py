"""The shared comparison helper can fail: one flipped bit, or a NaN payload where payloads count."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_bits


def test_assert_same_bits_catches_one_bit_and_nan_payloads():
    values = torch.tensor([1.0, -0.0, float("nan")], dtype=torch.float16)
    assert_same_bits(values, values.clone())
    flipped = values.clone()
    flipped.view(torch.int16)[0] ^= 1
    with pytest.raises(AssertionError, match="1 of 3 differ, first at \\[0\\]"):
        assert_same_bits(flipped, values)
    with pytest.raises(AssertionError, match="differ"):
        assert_same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # equal as numbers, not as bits
    other_nan = values.clone()
    other_nan.view(torch.int16)[2] = 0x7E01
    with pytest.raises(AssertionError, match="first at \\[2\\]"):
        assert_same_bits(other_nan, values)
    assert_same_bits(other_nan, values, any_nan=True)
    with pytest.raises(AssertionError):
        assert_same_bits(values.float(), values.float().reshape(3, 1))
