"""4-bit maps, nibble packing and 4-bit block-wise quantization against float64 oracles."""

from __future__ import annotations

import pytest
import torch

import dist8bit.functional as F
from dist8bit.quant.codebook import build_codebook
from dist8bit.quant.maps import create_dynamic_map, map_bits
from dist8bit.quant.packing import code_bytes, pack_nibbles, unpack_nibbles

MAPS_4BIT = {"dynamic-signed": F.create_dynamic_map_4bit(True), "linear-no-zero": F.create_linear_map_4bit()}


def test_first_moment_map_is_the_dynamic_recipe_at_4_bits():
    code = F.create_dynamic_map_4bit(True)
    assert code.numel() == 16 and map_bits(code) == 4
    padded = create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    # The 256-entry bitsandbytes-style map holds the same 16 values plus 240 padding zeros.
    assert torch.equal(code[code != 0], padded[padded != 0])
    assert int((code == 0).sum()) == 1 and code.max() == 1.0
    assert torch.allclose(code[8:11].double(), torch.tensor([0.0055, 0.0325, 0.0775], dtype=torch.float64), rtol=1e-6)


def test_second_moment_map_excludes_zero():
    code = F.create_linear_map_4bit()
    expected = torch.arange(1, 17, dtype=torch.float64) / 16
    assert torch.equal(code.double(), expected)
    assert bool((code > 0).all())
    assert F.create_linear_map_4bit(add_zero=True)[0] == 0


@pytest.mark.parametrize("numel", [0, 1, 2, 7, 64, 129])
def test_nibble_packing_round_trips_with_element_0_in_the_low_nibble(numel):
    codes = torch.randint(0, 16, (numel,), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.numel() == code_bytes(numel, 4)
    assert torch.equal(unpack_nibbles(packed, numel), codes)
    if numel >= 2:
        assert int(packed[0]) == int(codes[0]) | (int(codes[1]) << 4)
    if numel % 2:
        assert int(packed[-1]) >> 4 == 0


def _nearest_codes(s: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Float64 oracle: index of the nearest map value, ties to the lower one."""
    distance = (s.double().unsqueeze(1) - code.double().unsqueeze(0)).abs()
    best = distance.min(dim=1, keepdim=True).values
    return (distance == best).int().argmax(dim=1)


@pytest.mark.parametrize("name", sorted(MAPS_4BIT))
def test_4bit_codes_are_the_nearest_map_value(name):
    code = MAPS_4BIT[name]
    thresholds = build_codebook(code).thresholds[:-1]
    edges = torch.cat([thresholds, thresholds.nextafter(torch.tensor(2.0)), thresholds.nextafter(torch.tensor(-2.0))])
    # Values that land on the thresholds and their neighbours after scaling by absmax 1.
    values = torch.cat([edges, torch.rand(20000) * 2 - 1, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    if name == "linear-no-zero":
        values = values.abs()
    blocksize = 128
    padded = torch.cat([values, torch.zeros(-values.numel() % blocksize)]).view(-1, blocksize)
    padded[:, 0] = 1.0  # absmax 1 in every block: s is the value itself
    flat = padded.reshape(-1)
    codes, state = F.quantize_blockwise(flat, code=code, blocksize=blocksize)
    assert codes.numel() == code_bytes(flat.numel(), 4)
    got = unpack_nibbles(codes, flat.numel()).long()
    assert torch.equal(got, _nearest_codes(flat, code))
    restored = F.dequantize_blockwise(codes, state)
    assert torch.equal(restored, code[got])


def test_4bit_dequantize_error_is_within_half_the_widest_gap():
    x = torch.randn(4099)
    code = F.create_dynamic_map_4bit()
    codes, state = F.quantize_blockwise(x, code=code, blocksize=128)
    restored = F.dequantize_blockwise(codes, state)
    assert restored.shape == x.shape
    bound = (code[1:] - code[:-1]).max() / 2 * state.absmax.repeat_interleave(128)[: x.numel()]
    assert bool(((restored - x).abs() <= bound * (1 + 1e-6)).all())
    # out= and the bare absmax path decode the same bits.
    out = torch.empty(4099)
    F.dequantize_blockwise(codes, absmax=state.absmax, code=code, blocksize=128, out=out)
    assert torch.equal(out, restored)


def test_4bit_rejects_mismatched_sizes():
    code = F.create_dynamic_map_4bit()
    codes, state = F.quantize_blockwise(torch.randn(100), code=code, blocksize=64)
    with pytest.raises(ValueError, match="code bytes but quant_state describes"):
        F.dequantize_blockwise(codes[:-1], state)
    with pytest.raises(ValueError, match="quantize\\(\\) takes 256-value maps"):
        F.quantize(torch.randn(4), code=code)
