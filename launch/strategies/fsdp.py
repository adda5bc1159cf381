"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over the ranks.

Each transformer block is sharded by its own fully_shard call (its parameters
are all-gathered just for its forward and backward), and the root holds the
rest (embeddings, final norm, the head tied to the token embedding). The optimizer is built
after sharding, so it sees DTensor parameters whose local shard is the rows
this rank owns: dist8bit keeps 8-bit state for that shard only, with the
precision decided from the full parameter.

Checkpoints go through torch.distributed.checkpoint (DCP): `get_state_dict`
gives the model and optimizer state keyed by parameter name with DTensor
values, DCP writes each rank's shards, and `set_state_dict` after `dcp.load`
redistributes them to whatever mesh loads them, so a run saved on N ranks
resumes on M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from launch.model import GPT
from launch.optimizers import build_optimizer
from launch.strategies.base import Strategy, state_dict_checksum


class FSDPStrategy(Strategy):
    name = "fsdp"

    def setup(self, model: GPT) -> None:
        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = self.module = model
        # After sharding: the optimizer must hold the DTensor parameters, not the originals.
        self.optimizer = build_optimizer(self.args.optim, model.parameter_groups(self.args.weight_decay), self.args)

    def info(self) -> dict[str, Any]:
        return {
            "fsdp": {
                "mesh": [self.env.world_size],
                "sharded_modules": [f"blocks.{i}" for i in range(len(self.model.blocks))] + ["root"],
            }
        }

    def shards_optimizer_state(self) -> bool:
        return True

    def model_checksum(self) -> str:
        """Rank 0 hashes the gathered full model (on the CPU, so a large model does not need a full
        copy per GPU) and every rank reports that digest: under FSDP no rank holds a replica to compare."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        digest = [state_dict_checksum(full) if self.env.is_main else None]
        dist.broadcast_object_list(digest, src=0)
        return digest[0]

    def save(self, directory: Path) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)

    def load(self, directory: Path) -> None:
        # get_state_dict on the fresh optimizer gives the target layout (it initialises empty
        # state with a zero-lr step); dcp.load fills it in place from whatever mesh saved it.
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
