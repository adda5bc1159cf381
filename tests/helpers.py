"""What several test modules share: whether a compiled backend builds here, a bit-exact tensor
comparison, and a tiny model for the FSDP2 / DCP tests (its parameters are chosen so that
sharding meets every precision rule).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dist8bit.backends import load_backend
from dist8bit.backends.build import CPU_VARIANT_FLAGS


@functools.cache
def build_failure(name: str) -> str | None:
    """Why the compiled backend `name` cannot be had here, or None when it loads (built once per process)."""
    try:
        load_backend(name)
    except RuntimeError as error:
        return str(error)
    return None


def needs_compiled(name: str) -> pytest.MarkDecorator:
    """Skip where the `name` extension cannot be built (under CI conftest.py fails the run instead)."""
    failure = build_failure(name)
    reason = f"the {name} extension could not be built: {failure.splitlines()[0] if failure else ''}"
    return pytest.mark.skipif(failure is not None, reason=reason)


# The CPU kernels' other builds (build.CPU_VARIANT_FLAGS), each checked against the reference
# in a fresh process: the scalar loops of any CPU, the 8-lane path of x86 CPUs without AVX-512, and
# AVX-512 without VBMI (Skylake-SP, Cascade Lake).
KERNEL_VARIANTS = sorted(CPU_VARIANT_FLAGS)

BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "", *, any_nan: bool = False) -> None:
    """Equal dtype, shape and bits. With any_nan, a NaN only has to meet a NaN (the CUDA kernels
    need not write torch's NaN payload); without it, NaN payloads must match too."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    actual, expected = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    if not actual.is_floating_point():
        mismatch = actual != expected
    else:
        differ = actual.view(BITS_DTYPE[actual.dtype]) != expected.view(BITS_DTYPE[expected.dtype])
        if any_nan:
            nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
            differ = (nan_a != nan_e) | (~nan_a & differ)
        mismatch = differ
    if bool(mismatch.any()):
        where = mismatch.nonzero().flatten()[:8].tolist()
        raise AssertionError(
            f"{what}: {int(mismatch.sum())} of {actual.numel()} differ, first at {where}: "
            f"got {actual[where].tolist()}, expected {expected[where].tolist()}"
        )


# ------------------------------------------------------------- tiny model
VOCAB = 96


class TinyModel(torch.nn.Module):
    """Every precision rule under FSDP2 in four parameters (blocks are row-aligned when sharded)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 128)  # 12288 elements, rows of 128: 8-bit, blocks of 128
        self.up = torch.nn.Linear(128, 256)  # weight 8-bit (blocks of 128), bias 32-bit (< 4096)
        self.down = torch.nn.Linear(256, VOCAB)  # weight rows of 256: blocks of 256
        self.scale = torch.nn.Parameter(torch.ones(4608))  # 1-D, >= 4096: 32-bit when sharded (no row layout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.up(self.embed(tokens)))
        return self.down(hidden * self.scale[:256])


def tiny_model(fsdp: bool, dtype: torch.dtype = torch.float32) -> TinyModel:
    """The same initial model on every rank (seed 0), its parameters in `dtype` (cast before
    sharding); with fsdp, fully_shard per layer and at the root."""
    torch.manual_seed(0)
    model = TinyModel().to(dtype)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.up)
        fully_shard(model.down)
        fully_shard(model)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank: 8 sequences of 16 tokens, the targets shifted by one."""
    tokens = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(step))
    return tokens, torch.roll(tokens, 1, dims=1)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    """One optimizer step per batch; the losses."""
    losses = []
    for step in steps:
        tokens, targets = batch(step)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
