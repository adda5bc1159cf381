"""DeepSpeed integration: dist8bit optimizers from a DeepSpeed JSON config, on ZeRO 0-3.

After `import dist8bit` (or an explicit `register()`), a config such as

    "optimizer": {"type": "AdamW8bit", "params": {"lr": 3e-4, "weight_decay": 0.1}}

works through plain `deepspeed.initialize(...)`, and therefore through HF
Trainer and Accelerate, with ZeRO stages 0-3, fp32 or bf16. Each rank keeps
8-bit state only for its own ZeRO partition, with every parameter's precision
decided from its full size and overrides (see deepspeed_segments.py).

`import dist8bit` does not import DeepSpeed: if DeepSpeed is already imported
the patches go in at once, otherwise an import hook installs them right after
DeepSpeed is imported. Supported: DeepSpeed 0.19.x (tested on 0.19.8).
"""

from __future__ import annotations

import os
import re
import sys
import warnings

import torch

from . import deepspeed_segments
from .deepspeed_config import DeepSpeedConfigError
from .import_hook import call_after_import

SUPPORTED_SERIES = (0, 19)
TESTED_VERSION = "0.19.8"
ALLOW_UNTESTED_ENV = "DIST8BIT_ALLOW_UNTESTED_DEEPSPEED"

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "TESTED_VERSION",
    "DeepSpeedConfigError",
    "DeepSpeedVersionError",
    "get_full_optimizer_state",
    "is_registered",
    "register",
    "register_on_import",
]


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is not a version this integration supports."""


def check_version(version: str) -> None:
    """Raise unless `version` is a supported DeepSpeed (warn only with DIST8BIT_ALLOW_UNTESTED_DEEPSPEED=1)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match.group(1)), int(match.group(2))) == SUPPORTED_SERIES:
        return
    series = ".".join(map(str, SUPPORTED_SERIES))
    message = (
        f"dist8bit's DeepSpeed integration supports DeepSpeed {series}.x (tested on {TESTED_VERSION}), but DeepSpeed "
        f"{version} is installed. Install a supported one (pip install deepspeed=={TESTED_VERSION}), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this version anyway."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise DeepSpeedVersionError(message)


def register() -> None:
    """Teach DeepSpeed about dist8bit optimizers (idempotent; imports DeepSpeed)."""
    import deepspeed

    check_version(getattr(deepspeed, "__version__", "unknown"))
    from . import deepspeed_patches

    missing = deepspeed_patches.missing_targets()
    if missing:
        raise DeepSpeedVersionError(
            f"DeepSpeed {deepspeed.__version__} lacks {', '.join(missing)}, which dist8bit patches; install "
            f"deepspeed=={TESTED_VERSION}"
        )
    deepspeed_patches.apply()


def is_registered() -> bool:
    """Whether DeepSpeed is imported and patched (never imports it)."""
    if "deepspeed.runtime.engine" not in sys.modules:
        return False
    from . import deepspeed_patches

    return deepspeed_patches.is_applied()


def _register_after_import() -> None:
    """Registration triggered by someone else's `import deepspeed`: never break that import."""
    try:
        register()
    except DeepSpeedVersionError as error:
        warnings.warn(f"dist8bit did not register with DeepSpeed: {error}", RuntimeWarning, stacklevel=2)


def register_on_import() -> None:
    """Register now if DeepSpeed is imported, else as soon as it is (called by `import dist8bit`)."""
    call_after_import("deepspeed", _register_after_import)


def get_full_optimizer_state(param: torch.Tensor, optim_state_key: str) -> torch.Tensor:
    """The float32 (dequantized) optimizer state of a whole original parameter.

    The dist8bit counterpart of DeepSpeed's `safe_get_full_optimizer_state`,
    which cannot read packed 8-bit state: each rank dequantizes its pieces of
    `param` and the pieces are summed over the data-parallel group, so every
    rank of that group must call it (like DeepSpeed's). `optim_state_key` is
    the torch name of the state, e.g. "exp_avg" or "exp_avg_sq". Works for
    ZeRO 0-3, fp32 and bf16, after the first optimizer step. (After
    registration DeepSpeed's `safe_get_full_optimizer_state` routes here too.)
    """
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    return deepspeed_segments.full_optimizer_state(param, optim_state_key, device)
