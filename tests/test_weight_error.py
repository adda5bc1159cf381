"""The error encoding of compensated bfloat16 parameters (dist8bit/quant/weight_error.py), by its properties.

The kernels are tested bit for bit against this Python reference
(test_cpu_fused_step.py), so here the reference itself is held to what the
encoding promises, over float32 values of every exponent: every bfloat16
pattern as the high half, with low halves at the rounding ties, next to
them, at the ends and at random. Writing x as p = x.bfloat16() (round to
nearest even) and keeping q = weight_errors(x, p):
  - int16: the restored value is x itself, except at exact ties (one bit off);
  - int8: the restored bits are within 128 of x's (half of the 2^8 the shift
    drops) unless q is clamped near a tie (then within 256), and where x and
    p share a binade q and the restored value are the float64 oracle's
    round((x - p) / 2^8 ulp) and p + q * 2^8 ulp
    (with p's sign);
  - the restored value always rounds back to p and re-encodes to the same q
    (what lets a skipped element keep both);
  - q lies in the symmetric range [-max, max] and reaches both ends; negating
    x and p negates nothing in q (it measures magnitudes);
  - non-finite p carries q = 0; a negative q under +-0 restores +-0.
"""

from __future__ import annotations

import pytest
import torch

from dist8bit.quant.weight_error import compensated_values, error_dtype, weight_errors

SHIFT = {8: 8, 16: 0}
LOW_HALVES = [0x0000, 0x0001, 0x007F, 0x0080, 0x0081, 0x7F80, 0x7FFF, 0x8000, 0x8001, 0x80FF, 0xFFFF]


def bits_of(x: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as int64 in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def sample() -> torch.Tensor:
    """float32 values: every high half (all exponents, subnormals, +-0, Inf, NaN) x chosen and random low halves."""
    gen = torch.Generator().manual_seed(0)
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    low = torch.tensor(LOW_HALVES + torch.randint(0, 1 << 16, (4,), generator=gen).tolist(), dtype=torch.int64)
    return from_bits((high[:, None] | low[None, :]).reshape(-1))


@pytest.fixture(scope="module")
def values():
    x = sample()
    p = x.bfloat16()
    finite = torch.isfinite(p.float())
    return x, p, finite


@pytest.fixture(scope="module")
def encoded(values):
    """Per buffer width: (q, restored) of every sampled x."""
    x, p, _ = values
    out = {}
    for error_bits in (8, 16):
        q = weight_errors(x, p, error_dtype(error_bits))
        out[error_bits] = (q, compensated_values(p, q))
    return out


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    return bits_of(t.float()) & 0x7FFFFFFF


def test_bfloat16_rounding_is_nearest_even(values):
    """The contract's p (torch's float32 -> bfloat16) is round to nearest even on the bits, ties to even."""
    x, p, _ = values
    b = bits_of(x)
    expected = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    finite_x = torch.isfinite(x)
    assert torch.equal((bits_of(p.float()) >> 16)[finite_x], expected[finite_x])


@pytest.mark.parametrize("error_bits", [8, 16])
def test_restored_rounds_back_and_reencodes(values, encoded, error_bits):
    x, p, finite = values
    dtype = error_dtype(error_bits)
    q, restored = encoded[error_bits]
    assert torch.equal(bits_of(restored.bfloat16().float())[finite], bits_of(p.float())[finite])
    assert torch.equal(weight_errors(restored, p, dtype), q)
    top = torch.iinfo(dtype).max
    assert q.min().item() == -top and q.max().item() == top  # symmetric, both ends reached
    assert torch.equal(weight_errors(-x, -p, dtype), q)
    assert torch.all(q[~finite] == 0)
    assert torch.equal(bits_of(restored)[~finite], bits_of(p.float())[~finite])


def test_sixteen_bits_restore_x_but_for_ties(values, encoded):
    x, _, finite = values
    restored = encoded[16][1]
    distance = (bits_of(restored) - bits_of(x)).abs()
    tie = (bits_of(x) & 0xFFFF) == 0x8000
    assert torch.all(distance[finite & ~tie] == 0)
    assert torch.all(distance[finite & tie] == 1)  # delta +-2^15 is clamped to +-(2^15 - 1)
    assert (finite & tie).sum() > 60000


def test_eight_bits_within_half_a_step(values, encoded):
    """|bits(restored) - bits(x)| <= 128 (the shift drops 8 bits and rounds half up) while q is inside
    [-127, 127]; within 2^15 of a tie the clamp (which keeps restored off the tie) costs up to 256."""
    x, p, finite = values
    restored = encoded[8][1]
    distance = (bits_of(restored) - bits_of(x)).abs()
    delta = (magnitude_bits(x) - magnitude_bits(p)).abs()
    unclamped = finite & (delta <= 127 * 256)
    assert distance[unclamped].max().item() == 128
    assert distance[finite].max().item() == 256  # an exact tie: delta +-2^15, q +-127
    assert unclamped.sum() > 0.5 * finite.sum()  # the sample crowds the ties on purpose


def test_eight_bits_match_a_float64_oracle(values, encoded):
    """Where x and p share a binade (a float32 ulp u), q = floor((|x| - |p|) / (2^8 u) + 1/2) clamped to
    [-127, 127] and the restored value is p + sign(p) q 2^8 u, computed in float64 from values, not bits."""
    x, p, finite = values
    exponent = (bits_of(x) >> 23) & 0xFF
    same_binade = finite & (exponent == ((bits_of(p.float()) >> 23) & 0xFF)) & (exponent < 0xFF)
    x64, p64 = x.double()[same_binade], p.double()[same_binade]
    e = exponent[same_binade].double()
    ulp = torch.exp2(torch.clamp(e, min=1.0) - 150.0)  # subnormals (exponent 0) share the smallest normal's ulp
    q64 = torch.floor((x64.abs() - p64.abs()) / (256 * ulp) + 0.5).clamp(-127, 127)
    q, restored = (t[same_binade] for t in encoded[8])
    assert torch.equal(q.double(), q64)
    restored = restored.double()
    oracle = torch.copysign(p64.abs() + q64 * 256 * ulp, p64)
    nonnegative = p64.abs() + q64 * 256 * ulp >= 0
    assert torch.equal(restored[nonnegative], oracle[nonnegative])
    assert same_binade.sum() > 0.8 * finite.sum()


@pytest.mark.parametrize("error_bits", [8, 16])
def test_stale_codes_under_zero_restore_zero(error_bits):
    """A negative q under +-0 would make the magnitude negative: it is floored at 0, keeping p's sign."""
    dtype = error_dtype(error_bits)
    p = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=torch.bfloat16)
    q = torch.tensor([-1, -torch.iinfo(dtype).max, 5, 5], dtype=dtype)
    restored = compensated_values(p, q)
    assert bits_of(restored).tolist() == [0, 0x80000000, 5 << SHIFT[error_bits], 0x80000000 | (5 << SHIFT[error_bits])]
