"""The encoder against an independent oracle: the nearest code, found in float64.

Every backend (reference, CPU, CUDA where present) must give, for every
float32 s, the index of the nearest code of the map, the lower one on a tie.
The oracle does not use the codebook's thresholds or encoder table: it
compares s with the exact midpoints of neighbouring codes in float64 (a
float32 midpoint is exact there). The values cover every threshold and its
float32 neighbours, every slot and piece boundary of the encoder table, +-0,
subnormals, and a stratified sample of 2^24 values in [-1, 1]; +-inf and NaN
go through the rule's non-finite path.

To see s exactly, each test value sits in a block whose absmax is exactly 1:
the first element of every block is +-1, so s = x * (1 / 1) = x.
"""

from __future__ import annotations

import pytest
import torch

import dist8bit.functional as F
from dist8bit.quant.codebook import build_codebook
from dist8bit.quant.encoder_table import SLOTS, TABLE_SIZE

BLOCK = 64
SAMPLES = 1 << 24
MAPS = {
    "dynamic-signed": lambda: F.create_dynamic_map(signed=True),
    "dynamic-unsigned": lambda: F.create_dynamic_map(signed=False),
    "linear-signed": lambda: F.create_linear_map(signed=True),
}


def nearest_code_oracle(code: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """argmin_j |code[j] - s| with ties to the lower j, in float64 (s finite)."""
    code64 = code.double().cpu()
    midpoints = (code64[:-1] + code64[1:]) / 2
    return torch.searchsorted(midpoints, s.double().cpu(), side="left")


def _neighbours(values: torch.Tensor) -> torch.Tensor:
    up = torch.nextafter(values, torch.tensor(float("inf")))
    down = torch.nextafter(values, torch.tensor(-float("inf")))
    return torch.cat([values, up, down])


def special_values(code: torch.Tensor) -> torch.Tensor:
    """Thresholds, table boundaries, slot edges, zeros and subnormals, with their float32 neighbours."""
    book = build_codebook(code)
    finite = book.thresholds[:-1]
    edges = [finite, -finite]
    if book.encoder.numel() == TABLE_SIZE:
        splits = book.encoder[: 2 * SLOTS]
        splits = splits[torch.isfinite(splits)]
        edges += [splits, -splits]
    binades = torch.exp2(torch.arange(-40, 1, dtype=torch.float32))
    edges += [binades, -binades]
    tiny = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754944e-38, -1.1754944e-38, 1.0, -1.0])
    values = _neighbours(torch.cat([*edges, tiny]))
    return values[values.abs() <= 1.0]


def stratified_sample(count: int, seed: int = 0) -> torch.Tensor:
    """Half uniform in [-1, 1], half log-uniform magnitudes over [2^-40, 1] with random signs."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(count // 2, generator=generator) * 2 - 1
    magnitude = torch.exp2(-40 * torch.rand(count - count // 2, generator=generator))
    sign = torch.where(torch.rand(magnitude.shape, generator=generator) < 0.5, -1.0, 1.0)
    return torch.cat([uniform, sign * magnitude]).clamp(-1.0, 1.0)


def in_unit_blocks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of BLOCK elements led by +-1 (so absmax = 1), and the mask of the test values."""
    per_block = BLOCK - 1
    blocks = -(-values.numel() // per_block)
    padded = torch.zeros(blocks * per_block)
    padded[: values.numel()] = values
    leaders = torch.where(torch.arange(blocks) % 2 == 0, 1.0, -1.0).unsqueeze(1)
    x = torch.cat([leaders, padded.view(blocks, per_block)], dim=1).reshape(-1)
    mask = torch.zeros(blocks, BLOCK, dtype=torch.bool)
    mask[:, 1:] = True
    mask = mask.reshape(-1)
    mask[mask.nonzero()[values.numel() :]] = False
    return x, mask


@pytest.mark.parametrize("name", list(MAPS))
def test_every_code_is_the_nearest(backend, name):
    code = MAPS[name]().to(backend)
    values = torch.cat([special_values(code.cpu()), stratified_sample(SAMPLES)])
    x, mask = in_unit_blocks(values)
    codes, state = F.quantize_blockwise(x.to(backend), code=code, blocksize=BLOCK)
    assert torch.equal(state.absmax.cpu(), torch.ones_like(state.absmax.cpu())), "every block must scale by exactly 1"
    got = codes.cpu().long()[mask]
    expected = nearest_code_oracle(code, x[mask])
    wrong = (got != expected).nonzero()
    assert wrong.numel() == 0, (
        f"{wrong.numel()} codes differ from the nearest code, e.g. s={x[mask][wrong[:5, 0]].tolist()}: "
        f"got {got[wrong[:5, 0]].tolist()}, nearest {expected[wrong[:5, 0]].tolist()}"
    )


@pytest.mark.parametrize("name", list(MAPS))
def test_non_finite_values_take_the_code_of_zero(backend, name):
    """Inf or NaN in a block makes absmax non-finite, so every s of the block is NaN or 0: the code of 0."""
    code = MAPS[name]().to(backend)
    zero_code = int(nearest_code_oracle(code, torch.zeros(1)))
    blocks = [
        [float("inf"), 0.5, -0.25],
        [-float("inf"), 0.5, 1e-30],
        [float("nan"), 0.5, -1.0],
        [0.5, float("nan"), float("inf")],
    ]
    x = torch.tensor([v for block in blocks for v in block + [0.0] * (BLOCK - len(block))])
    codes, state = F.quantize_blockwise(x.to(backend), code=code, blocksize=BLOCK)
    assert bool((~torch.isfinite(state.absmax.cpu())).all())
    assert bool((codes.cpu().long() == zero_code).all()), codes.cpu().view(len(blocks), BLOCK)[:, :4]
