"""The checkpoint converter's peak memory does not grow with the checkpoint (docs/checkpoints.md).

A synthetic torch.optim.AdamW checkpoint with one parameter of 2M and one of 8M
elements (exp_avg + exp_avg_sq: 16 MB and 64 MB of fp32 state) is converted to
8-bit and back, each conversion in a fresh interpreter (the child of
`python -m dist8bit.bench convert`, which reports VmHWM, the peak resident set).
The larger checkpoint may raise the peak by far less than its extra bytes: a
converter that held one whole state tensor would add 24 MB or more; measured
here +1 to +5 MB (one 1M-element chunk is 4 MB of float32).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dist8bit.bench import convert as bench

SMALL, LARGE = 1 << 21, 1 << 23  # parameter elements; the states are twice as many
ALLOWED_GROWTH = 0.25  # of the extra fp32 state bytes


def _convert_both_sizes(tmp_path: Path, to: str, suffix_in: str, suffix_out: str) -> dict[int, int]:
    commands = {
        n: {"src": str(tmp_path / f"{n}{suffix_in}.pt"), "dst": str(tmp_path / f"{n}{suffix_out}.pt"), "to": to}
        for n in (SMALL, LARGE)
    }
    with ThreadPoolExecutor(2) as pool:  # each in its own process: the peaks do not mix
        reports = dict(zip(commands, pool.map(bench._measure, commands.values()), strict=True))
    return {n: report["vmhwm"] for n, report in reports.items()}


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_checkpoint(tmp_path):
    for n in (SMALL, LARGE):
        bench.write_adamw_checkpoint(tmp_path / f"{n}-fp32.pt", [(n,)])
    extra_fp32_bytes = 2 * 4 * (LARGE - SMALL)
    to_8bit = _convert_both_sizes(tmp_path, "8bit", "-fp32", "-8bit")
    to_fp32 = _convert_both_sizes(tmp_path, "fp32", "-8bit", "-back")
    assert (tmp_path / f"{LARGE}-back.pt").stat().st_size > extra_fp32_bytes
    for direction, peaks in (("fp32 -> 8bit", to_8bit), ("8bit -> fp32", to_fp32)):
        growth = peaks[LARGE] - peaks[SMALL]
        assert growth < ALLOWED_GROWTH * extra_fp32_bytes, (
            f"{direction}: peak RSS {peaks[SMALL] / 1e6:.1f} MB -> {peaks[LARGE] / 1e6:.1f} MB "
            f"for {extra_fp32_bytes / 1e6:.0f} MB more fp32 state"
        )
