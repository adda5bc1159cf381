"""Whether a dist8bit optimizer's `master_weights` mode can act under a DeepSpeed config.

The modes "stochastic" and "compensated" change how bfloat16 weights are written
(dist8bit/optim/master_weights.py); they act only where the optimizer itself holds
bf16 tensors. DeepSpeed 0.19 decides which tensors the optimizer holds:

    ZeRO 1/2/3, "bf16": {"enabled": true, "bf16_master_weights_and_grads": true,
                         "bf16_optimizer_states": true}      bf16 flat partitions: no fp32 master
    ZeRO 1/2/3, bf16 otherwise                               float32 master partitions
    ZeRO 1, bf16, data_types.grad_accum_dtype fp32           BF16_Optimizer: float32 master partitions
    ZeRO 0, bf16 enabled                                     FP16_UnfusedOptimizer: float32 master copies
    ZeRO 0, bf16 disabled, bfloat16 model                    the model's own bf16 parameters
    ZeRO 1/2/3, bf16 disabled, bfloat16 model                float32 master partitions

Under a float32 master the optimizer writes float32 and DeepSpeed rounds it to bf16
itself, so a bf16 write mode would do nothing while the 4 B/param master it exists to
remove stays: asking for it there is an error, raised when the engine is built, that
names the config that works. So is "fp32" over bf16 partitions (the optimizer would
refuse them at its first step anyway), and the two DeepSpeed settings that stop
bf16_master_weights_and_grads with an assertion about its own CPU Adam
(bf16_optimizer_states missing, or optimizer offload).

Pure rules over plain facts (no DeepSpeed import), so they can be read and tested
alone; deepspeed_patches.py collects the facts from the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .deepspeed_config import DeepSpeedConfigError

BF16_WRITES = ("stochastic", "compensated")  # modes that act only on bf16 tensors the optimizer writes
NO_MASTER_CONFIG = (
    'ZeRO stage 1, 2 or 3 with "bf16": {"enabled": true, "bf16_master_weights_and_grads": true, '
    '"bf16_optimizer_states": true} and no offload_optimizer'
)


@dataclass(frozen=True)
class Setup:
    """What a DeepSpeed engine does with the weights, as far as the optimizer is concerned."""

    weights: torch.dtype  # dtype DeepSpeed trains the model's parameters in
    master: torch.dtype | None  # dtype of the tensors it gives the optimizer; None: the parameters themselves
    wrapper: str  # how DeepSpeed wraps the optimizer, in words (for messages)
    bf16_master: bool  # bf16_master_weights_and_grads
    bf16_optimizer_states: bool
    offload: bool  # offload_optimizer to the CPU or NVMe


def master_dtype(kind: str | None, zero_bf16_master: bool, zero_fp16_master: bool) -> torch.dtype | None:
    """The dtype of DeepSpeed's master for its optimizer-wrapper kind (its _do_optimizer_sanity_check
    answer: "zero_optimization", "bf16", "fp16", "ddp_bf16" or None for no wrapper)."""
    if kind is None:
        return None
    if kind == "zero_optimization":
        return torch.bfloat16 if zero_bf16_master else torch.float16 if zero_fp16_master else torch.float32
    return torch.float32  # BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer


def check(modes: Iterable[str], setup: Setup) -> None:
    """Raise DeepSpeedConfigError where `modes` (the param groups' master_weights) cannot act as asked."""
    if setup.bf16_master and setup.offload:
        raise DeepSpeedConfigError(
            "bf16_master_weights_and_grads with offload_optimizer: DeepSpeed runs that only with its own "
            "DeepSpeedCPUAdam, not with a dist8bit optimizer; drop offload_optimizer (dist8bit's 8-bit states are "
            "small enough to stay on the device) or drop bf16_master_weights_and_grads"
        )
    if setup.bf16_master and not setup.bf16_optimizer_states:
        raise DeepSpeedConfigError(
            'bf16_master_weights_and_grads needs "bf16_optimizer_states": true beside it: without it DeepSpeed '
            "requires its own CPU Adam under ZeRO-Offload. For a dist8bit optimizer the flag changes nothing else: "
            "its states keep the precision its name and optim_bits give them"
        )
    if setup.master is None:
        return  # the optimizer writes the model's parameters: master_weights.check_parameter decides per tensor
    for mode in sorted(set(modes)):
        if mode in BF16_WRITES and setup.master == torch.float32 and setup.weights != torch.float32:
            raise DeepSpeedConfigError(
                f"master_weights={mode!r} writes bfloat16 weights without a float32 master, but under this DeepSpeed "
                f"config ({setup.wrapper}) the optimizer updates a float32 master that DeepSpeed keeps and rounds to "
                f"{setup.weights} itself: the mode would do nothing and the 4 B/param master would stay. For bf16 "
                f"partitions without a master use {NO_MASTER_CONFIG}; to keep DeepSpeed's master set master_weights "
                '"fp32" (see docs/master_weights.md)'
            )
        if mode == "fp32" and setup.master != torch.float32:
            raise DeepSpeedConfigError(
                f"master_weights='fp32' updates float32 master weights, but this DeepSpeed config ({setup.wrapper}) "
                f"gives the optimizer {setup.master} partitions (bf16_master_weights_and_grads); drop that key to "
                "keep DeepSpeed's float32 master, or train without one with master_weights 'compensated'"
            )


def describe(kind: str | None, stage: int) -> str:
    """The wrapper DeepSpeed builds for `kind`, in words."""
    return {
        None: "no ZeRO, no mixed precision: the optimizer steps the parameters",
        "zero_optimization": f"ZeRO stage {stage}",
        "bf16": f"ZeRO stage {stage} with BF16_Optimizer (bf16 with grad_accum_dtype fp32)",
        "fp16": "no ZeRO, fp16 mode: FP16_Optimizer's float32 master copies",
        "ddp_bf16": "no ZeRO, bf16 mode: float32 master copies",
    }.get(kind, str(kind))
