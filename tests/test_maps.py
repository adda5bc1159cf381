"""Quantization maps and the rounding rule's thresholds / lookup table."""

from __future__ import annotations

import pytest
import torch

from dist8bit.functional import create_dynamic_map, create_linear_map, create_quantile_map
from dist8bit.quant.codebook import build_codebook, midpoint_thresholds, nearest_code_index
from dist8bit.quant.encoder_table import SLOTS, TABLE_SIZE, build_encoder_table
from dist8bit.quant.maps import validate_map


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape_and_range(signed):
    code = create_dynamic_map(signed)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1]), "8-bit dynamic map has 256 distinct sorted values"
    assert code.max() == 1.0 and (code == 0).sum() == 1
    if signed:
        assert code.min() < -0.99
    else:
        assert code.min() == 0.0


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes_bit_for_bit(signed):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(create_dynamic_map(signed), bnb_functional.create_dynamic_map(signed))


def test_dynamic_map_fewer_bits_is_zero_padded_and_sorted():
    code = create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    assert code.numel() == 256
    assert torch.all(code[1:] >= code[:-1])
    assert (code != 0).sum() == 15  # 2**4 values, one of which is the zero


def test_linear_maps():
    signed = create_linear_map(True)
    values = torch.cat([signed[:127], signed[128:]])  # drop the padding zero
    assert torch.allclose(values, torch.linspace(-1, 1, 255), atol=1e-7, rtol=0)
    assert (signed == 0).sum() == 2, "an exact zero plus the padding zero"
    assert torch.equal(signed, -signed.flip(0)), "the signed map is exactly symmetric"
    assert torch.allclose(create_linear_map(False), torch.linspace(0, 1, 256), atol=1e-7, rtol=0)


def test_quantile_map_equalises_code_usage():
    torch.manual_seed(0)
    data = torch.randn(1 << 16)
    code = create_quantile_map(data)
    validate_map(code)
    assert code.abs().max() == 1.0 and (code == 0).any()
    # Codes of a quantile map are used far more evenly than the dynamic map's.
    scaled = data / data.abs().max()
    usage = torch.bincount(nearest_code_index(scaled, midpoint_thresholds(code)), minlength=256).float()
    dynamic_usage = torch.bincount(nearest_code_index(scaled, midpoint_thresholds(create_dynamic_map())), minlength=256).float()
    assert (usage > 0).sum() > 200
    assert usage.std() < 0.5 * dynamic_usage.std()


@pytest.mark.parametrize(
    "code",
    [create_dynamic_map(True), create_dynamic_map(False), create_linear_map(True), create_linear_map(False)],
    ids=["dynamic-signed", "dynamic-unsigned", "linear-signed", "linear-unsigned"],
)
def test_thresholds_give_exactly_the_nearest_code(code):
    thresholds = midpoint_thresholds(code)
    torch.manual_seed(1)
    probes = torch.cat(
        [
            torch.rand(20000) * 2 - 1,
            thresholds[:-1],
            torch.nextafter(thresholds[:-1], torch.tensor(2.0)),
            torch.nextafter(thresholds[:-1], torch.tensor(-2.0)),
            code,
        ]
    ).clamp(-1, 1)
    index = nearest_code_index(probes, thresholds)
    chosen = (code[index].double() - probes.double()).abs()
    best = (code.double()[None, :] - probes.double()[:, None]).abs().min(dim=1).values
    assert torch.equal(chosen, best), "the rule must pick a nearest code"
    # Ties (a probe exactly on a midpoint) go to the lower code.
    exact_mid = (code.double()[:-1] + code.double()[1:]) / 2
    on_midpoint = exact_mid.float().double() == exact_mid
    tie_values = exact_mid[on_midpoint].float()
    assert torch.equal(nearest_code_index(tie_values, thresholds), torch.nonzero(on_midpoint).flatten()), (
        "ties must round to the lower code"
    )


@pytest.mark.parametrize(
    "code",
    [create_dynamic_map(True), create_dynamic_map(False), create_linear_map(True)],
    ids=["dynamic-signed", "dynamic-unsigned", "linear-signed"],
)
def test_encoder_table_serves_every_slot_of_the_standard_maps(code):
    """The optimizer-state maps and the linear map get a line for every binade of |s|."""
    book = build_codebook(code)
    assert book.encoder.numel() == TABLE_SIZE
    _, stats = build_encoder_table(book.thresholds)
    assert stats.fast_slots == SLOTS


def test_pathological_map_falls_back_to_binary_search():
    crowded = torch.sort(torch.cat([torch.linspace(0.5, 0.5001, 200), torch.linspace(-1, 1, 56)])).values
    book = build_codebook(crowded)
    assert book.encoder.numel() == 0


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.linspace(-1, 1, 255), ValueError, "exactly 256"),
        (torch.linspace(1, -1, 256), ValueError, "sorted"),
        (torch.linspace(-1, 1, 256).double(), TypeError, "float32"),
        (torch.full((256,), float("nan")), ValueError, "NaN"),
        ([0.0] * 256, TypeError, "torch.Tensor"),
    ],
)
def test_validate_map_rejects_bad_maps(bad, error, match):
    with pytest.raises(error, match=match):
        validate_map(bad)


def test_map_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="total_bits"):
        create_dynamic_map(total_bits=9)
    with pytest.raises(ValueError, match="max_exponent_bits"):
        create_dynamic_map(max_exponent_bits=9)
    with pytest.raises(ValueError, match="total_bits"):
        create_linear_map(total_bits=0)
