"""How one parameter's optimizer state is stored and named.

A state buffer named N (torch's name, e.g. exp_avg) is kept either as
    N            float32, shaped like the parameter         (32-bit)
or as
    N_codes      uint8, shaped like the parameter           (8-bit)
    N_absmax     float32, one scale per block of `blocksize` elements
plus `step` (a float32 scalar tensor, as in torch.optim). The 32-bit names
are torch's, so a torch.optim state dict loads into a 32-bit dist8bit
optimizer. The separate 8-bit names make it impossible to mistake codes for
values (DeepSpeed's tooling reads any `exp_avg` as float data).
"""

from __future__ import annotations

import torch

from ..backends.rules import StateSpec
from ..paging.allocation import new_state_tensor
from ..quant.layout import num_blocks

# Saved in every param group as `dist8bit_state_version`. 1: the first format;
# 2: flat (ZeRO) buffers' packed state pads each segment's run to 16 bytes
# (see segments.py). Per-parameter state is the same in both.
STATE_FORMAT_VERSION = 2
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"


def expected_entries(spec: StateSpec, eight_bit: bool) -> tuple[str, ...]:
    return (spec.name + CODES_SUFFIX, spec.name + ABSMAX_SUFFIX) if eight_bit else (spec.name,)


def allocate(
    param: torch.Tensor,
    specs: tuple[StateSpec, ...],
    eight_bit: bool,
    blocksize: int,
    initial: float = 0.0,
    *,
    paged: bool = False,
) -> dict[str, torch.Tensor]:
    """Fresh zero state (or `initial`, Adagrad's accumulator) for one parameter;
    in managed memory when `paged` (see dist8bit.paging.new_state_tensor)."""
    state: dict[str, torch.Tensor] = {}
    device = param.device
    for spec in specs:
        if not eight_bit:
            state[spec.name] = new_state_tensor(param.shape, torch.float32, device, initial, paged=paged)
            continue
        # A block filled with `initial` encodes as the map's 1.0 (code 255) scaled by it.
        codes_fill = 255 if initial != 0.0 else 0
        blocks = (num_blocks(param.numel(), blocksize),)
        state[spec.name + CODES_SUFFIX] = new_state_tensor(param.shape, torch.uint8, device, codes_fill, paged=paged)
        state[spec.name + ABSMAX_SUFFIX] = new_state_tensor(blocks, torch.float32, device, initial, paged=paged)
    return state


def allocate_packed(
    device: torch.device,
    specs: tuple[StateSpec, ...],
    codes_numel: int,
    blocks: int,
    values_numel: int,
    initial: float = 0.0,
    *,
    paged: bool = False,
) -> dict[str, torch.Tensor]:
    """Fresh packed state of a flat buffer (see segments.py): 8-bit segments'
    codes and scales, and 32-bit segments' values, each run at the offset
    segments.packed_layout gives it; in managed memory when `paged`."""
    state: dict[str, torch.Tensor] = {}
    codes_fill = 255 if initial != 0.0 else 0
    for spec in specs:
        if codes_numel:
            state[spec.name + CODES_SUFFIX] = new_state_tensor((codes_numel,), torch.uint8, device, codes_fill, paged=paged)
            state[spec.name + ABSMAX_SUFFIX] = new_state_tensor((blocks,), torch.float32, device, initial, paged=paged)
        if values_numel:
            state[spec.name] = new_state_tensor((values_numel,), torch.float32, device, initial, paged=paged)
    return state


def is_eight_bit(state: dict[str, object], specs: tuple[StateSpec, ...]) -> bool:
    return bool(specs) and (specs[0].name + CODES_SUFFIX) in state


def state_bytes(state: dict[str, object]) -> int:
    """Bytes held by a parameter's state tensors (what the memory bars measure)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
