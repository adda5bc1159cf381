"""The encoder table's builder on maps other than the optimizer's: exact, or absent.

tests/test_encoder_exhaustive.py covers the three standard maps in depth; here a
wider set of maps (fewer bits, duplicated codes, quantile maps, random maps)
each gets a smaller sample, on every backend, against the same independent
oracle (the nearest code by float64 midpoints). A map the builder cannot prove
must still encode exactly: its table then sends values to the binary search.
"""

from __future__ import annotations

import pytest
import torch
from test_encoder_exhaustive import in_unit_blocks, nearest_code_oracle, special_values, stratified_sample

import dist8bit.functional as F
from dist8bit.quant.codebook import build_codebook
from dist8bit.quant.encoder_table import SLOT_SCALES, SLOTS, TABLE_SIZE, build_encoder_table


def _random_map(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.rand(255, generator=generator) * 2 - 1, torch.zeros(1)])
    return torch.sort(values).values


MAPS = {
    "dynamic-4bit-signed": lambda: F.create_dynamic_map(signed=True, max_exponent_bits=2, total_bits=4),
    "dynamic-6bit-unsigned": lambda: F.create_dynamic_map(signed=False, max_exponent_bits=4, total_bits=6),
    "dynamic-8bit-5exp": lambda: F.create_dynamic_map(signed=True, max_exponent_bits=5, total_bits=8),
    "linear-unsigned": lambda: F.create_linear_map(signed=False),
    "linear-4bit": lambda: F.create_linear_map(signed=True, total_bits=4),
    "quantile-randn": lambda: F.create_quantile_map(torch.randn(20000, generator=torch.Generator().manual_seed(3))),
    "random": lambda: _random_map(5),
}


@pytest.mark.parametrize("name", list(MAPS))
def test_codes_are_the_nearest_on_any_map(backend, name):
    code = MAPS[name]().to(backend)
    values = torch.cat([special_values(code.cpu()), stratified_sample(1 << 18, seed=7)])
    x, mask = in_unit_blocks(values)
    codes, _ = F.quantize_blockwise(x.to(backend), code=code, blocksize=64)
    got = codes.cpu().long()[mask]
    expected = nearest_code_oracle(code, x[mask])
    assert int((got != expected).sum()) == 0


def test_table_layout_and_scale():
    """The optimizer maps get a full table; the slot scale is one of the candidates."""
    for signed in (True, False):
        book = build_codebook(F.create_dynamic_map(signed=signed))
        table, stats = build_encoder_table(book.thresholds)
        assert table.numel() == TABLE_SIZE and stats.fast_slots == SLOTS
        assert float(table[TABLE_SIZE - 1]) in SLOT_SCALES
    # The signed map needs one split point per slot (the CPU kernel then skips the second lookup).
    signed_table, _ = build_encoder_table(build_codebook(F.create_dynamic_map(signed=True)).thresholds)
    assert bool(torch.isnan(signed_table[SLOTS : 2 * SLOTS]).all())
