"""The one function every optimizer state tensor is created by.

Ordinary memory (torch.full) or, when the optimizer asked for paged states
and the machine can page them, managed memory from the page manager. Keeping
the choice in one place is what lets is_paged apply to every state layout
(per-parameter states, packed flat-buffer states) without each one knowing
about CUDA unified memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .manager import get_manager


def new_state_tensor(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, fill: float = 0.0, *, paged: bool = False
) -> torch.Tensor:
    """A state tensor filled with `fill`: managed memory when `paged` and possible, else ordinary.

    Paged falls back to ordinary memory for states under MIN_PAGED_BYTES and,
    with one warning per process, wherever paging is unavailable.
    """
    if paged:
        managed = get_manager().allocate(shape, dtype, torch.device(device))
        if managed is not None:
            return managed.fill_(fill)
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)
