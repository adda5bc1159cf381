"""One process (`none`) or torch DDP (`ddp`): every rank holds the whole model and the whole optimizer.

The checkpoint is therefore one file, `state.pt`, written by rank 0; any number
of processes can resume it (each loads the same full state).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from launch.atomic import torch_save_atomic
from launch.model import GPT
from launch.optimizers import build_optimizer
from launch.strategies.base import Strategy

STATE_FILE = "state.pt"


class LocalStrategy(Strategy):
    """`none` (one process) or `ddp` (DistributedDataParallel, gradients all-reduced)."""

    def __init__(self, name: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = name

    def needs_process_group(self) -> bool:
        return self.name == "ddp"

    def setup(self, model: GPT) -> None:
        self.model = model
        self.optimizer = build_optimizer(self.args.optim, model.parameter_groups(self.args.weight_decay), self.args)
        if self.name == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.module = model

    def save(self, directory: Path) -> None:
        if self.env.is_main:
            torch_save_atomic(
                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / STATE_FILE
            )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
