"""What the training loop needs from a parallelism strategy, and the parts most strategies share.

The loop in launch/pretrain.py is written once against this interface; each
strategy decides how the model is wrapped, where the optimizer comes from,
how a step runs and how its checkpoint is written and read.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import torch

from launch import precision
from launch.distributed import DistEnv
from launch.model import GPT
from launch.optimizers import optimizer_state_bytes


def state_dict_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name and bytes, in order: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Strategy:
    """Base class. After `setup`, `module` runs the forward pass (training and evaluation) and
    `optimizer` is the optimizer whose param_groups carry the learning rate."""

    name = ""
    # Whether a checkpoint can only resume on the world size that wrote it.
    resume_needs_same_world_size = False

    def __init__(self, env: DistEnv, device: torch.device, args: argparse.Namespace) -> None:
        self.env, self.device, self.args = env, device, args
        self.model: GPT | None = None
        self.module: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # ----------------------------------------------------------- set-up
    def needs_process_group(self) -> bool:
        return True

    def setup(self, model: GPT) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Strategy-specific facts for metrics.json."""
        return {}

    # ------------------------------------------------------------ steps
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward (under the run's autocast, if any), backward, gradient clipping and the optimizer step;
        returns the (local) loss."""
        with precision.forward_context(self.args, self.device):
            _, loss = self.module(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.optimizer.step()
        return loss

    @property
    def schedules_lr(self) -> bool:
        """True when the strategy's own LR scheduler drives the learning rate (DeepSpeed's, from its config)."""
        return False

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def base_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that holds the state (under any wrapper the strategy adds)."""
        return self.optimizer

    def shards_optimizer_state(self) -> bool:
        """Whether each rank holds only its part of the optimizer state (else every rank holds all of it)."""
        return False

    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank."""
        return optimizer_state_bytes(self.base_optimizer())

    def model_checksum(self) -> str:
        """Digest of the full model as this rank sees it (sharded strategies gather it first)."""
        return state_dict_checksum(self.model.state_dict())

    # ----------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """Collective: write model and optimizer state into `directory` (which exists on every rank's view)."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        """Collective: read what `save` wrote, possibly on another world size when the strategy allows it."""
        raise NotImplementedError
