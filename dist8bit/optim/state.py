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
from ..quant.layout import num_blocks

STATE_FORMAT_VERSION = 1
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"


def expected_entries(spec: StateSpec, eight_bit: bool) -> tuple[str, ...]:
    return (spec.name + CODES_SUFFIX, spec.name + ABSMAX_SUFFIX) if eight_bit else (spec.name,)


def allocate(
    param: torch.Tensor, specs: tuple[StateSpec, ...], eight_bit: bool, blocksize: int, initial: float = 0.0
) -> dict[str, torch.Tensor]:
    """Fresh zero state (or `initial`, Adagrad's accumulator) for one parameter."""
    state: dict[str, torch.Tensor] = {}
    for spec in specs:
        if not eight_bit:
            state[spec.name] = torch.full(param.shape, initial, dtype=torch.float32, device=param.device)
            continue
        codes = torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
        absmax = torch.zeros(num_blocks(param.numel(), blocksize), dtype=torch.float32, device=param.device)
        if initial != 0.0:
            # A block filled with `initial` encodes as the map's 1.0 scaled by it.
            codes.fill_(255)
            absmax.fill_(initial)
        state[spec.name + CODES_SUFFIX] = codes
        state[spec.name + ABSMAX_SUFFIX] = absmax
    return state


def is_eight_bit(state: dict[str, object], specs: tuple[StateSpec, ...]) -> bool:
    return bool(specs) and (specs[0].name + CODES_SUFFIX) in state


def state_bytes(state: dict[str, object]) -> int:
    """Bytes held by a parameter's state tensors (what the memory bars measure)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
