"""Drop-in for `deepspeed.initialize` that makes sure dist8bit is registered first.

    import dist8bit.deepspeed
    engine, optimizer, _, scheduler = dist8bit.deepspeed.initialize(model=model, config="ds_config.json")

Plain `deepspeed.initialize` works as well after `import dist8bit`; this
wrapper only removes the ordering question (and raises the version error from
`register()` instead of the import hook's warning).
"""

from __future__ import annotations

from typing import Any

import torch

from .integrations.consistency import check_same_parameters
from .integrations.deepspeed import get_full_optimizer_state, register

__all__ = ["get_full_optimizer_state", "initialize"]


def initialize(*args: Any, **kwargs: Any) -> Any:
    """`register()`, then `deepspeed.initialize(*args, **kwargs)` (same arguments and return value).

    When torch.distributed is already initialized, ranks whose models differ get
    one clear error first (DeepSpeed would fail inside its parameter broadcast).
    """
    import deepspeed

    register()
    model = kwargs.get("model")
    if isinstance(model, torch.nn.Module):
        check_same_parameters(model.named_parameters())
    return deepspeed.initialize(*args, **kwargs)
