"""One rank of the DeepSpeed end-to-end tests in tests/test_checkpoint_convert.py.

Started WORLD_SIZE times (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the
environment, DS_ACCELERATOR=cpu, gloo), like tests/distributed_workers/deepspeed_worker.py.

    python convert_worker.py train  OUT WORKDIR   for each ZeRO stage (2, 3) and optimizer: 6 steps, checkpoint after 3
                                                  (WORKDIR/z<stage>-<optimizer>), losses of steps 4-6
    python convert_worker.py resume OUT WORKDIR   for each: load WORKDIR/resume-z<stage>-<optimizer> (a converted
                                                  checkpoint), losses of steps 4-6; also from a fresh optimizer state

ZeRO-3 runs with sub_group_size 8000, so the 1-rank layout has two sub-groups
where the 2-rank one has one.

The optimizers are dist8bit's AdamW8bit and AdamW4bit and DeepSpeed's own AdamW
("AdamW" with torch_adam: DeepSpeed's config path with torch's implementation,
which needs no C++ build). Rank 0 writes a dict of plain lists to OUT (torch.save).
"""

from __future__ import annotations

import logging
import os
import sys

import deepspeed
import deepspeed.ops
import torch
import torch.nn.functional as F
from torch import nn

import dist8bit  # registers dist8bit's optimizers with DeepSpeed
import dist8bit.optim
from tests.distributed_ranks import leave_together

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip DeepSpeed's C++ CPU all-reduce build

VOCAB, DIM, HIDDEN, SEQ, GLOBAL_BATCH = 100, 48, 111, 8, 8
STEPS, SAVE_AFTER, LR = 6, 3, 3e-3
OPTIMIZERS = ("AdamW8bit", "AdamW", "AdamW4bit")
STAGES = (2, 3)


class TinyLM(nn.Module):
    """Two 8-bit-sized weights (4800 and 5328 elements) whose ZeRO pieces split at offsets that are not block multiples."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.emb(tokens))))


def step_4bit_anywhere() -> None:
    """A compiled backend without 4-bit states yet (BackendInfo.four_bit) leaves them to the reference
    backend, the kernels' bit-identical oracle: what is tested here is the checkpoint, not the kernel."""
    probe = torch.nn.Parameter(torch.zeros(4096))
    probe.grad = torch.ones(4096)
    try:
        dist8bit.optim.AdamW4bit([probe]).step()
    except RuntimeError:
        os.environ["DIST8BIT_BACKEND"] = "reference"


def build(stage: int, optimizer: str):
    world = int(os.environ["WORLD_SIZE"])
    params = {"lr": LR, "betas": [0.9, 0.99], "weight_decay": 0.01, **({"torch_adam": True} if optimizer == "AdamW" else {})}
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": stage, **({"sub_group_size": 8000} if stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    torch.manual_seed(0)
    model = TinyLM()
    decay = [model.emb.weight, model.fc1.weight, model.fc2.weight]
    groups = [
        {"params": decay},
        {"params": [p for p in model.parameters() if all(p is not d for d in decay)], "weight_decay": 0.0},
    ]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine


def train(engine, steps: range) -> list[float]:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    data = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        batch = data[step, rank * per_rank : (rank + 1) * per_rank]
        loss = F.cross_entropy(engine(batch[:, :-1]).float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def main() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    phase, out, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    step_4bit_anywhere()
    result = {}
    for stage in STAGES:
        for optimizer in OPTIMIZERS:
            name = f"z{stage}-{optimizer}"
            engine = build(stage, optimizer)
            if phase == "train":
                train(engine, range(SAVE_AFTER))
                # universal_checkpoint_info: what DeepSpeed's ds_to_universal requires from a client
                engine.save_checkpoint(os.path.join(workdir, name), tag="step3", client_state={"universal_checkpoint_info": {}})
                result[name] = train(engine, range(SAVE_AFTER, STEPS))
            else:
                engine.load_checkpoint(os.path.join(workdir, f"resume-{name}"))
                result[name] = train(engine, range(SAVE_AFTER, STEPS))
                result[f"{name} steps"] = sorted({float(s["step"]) for s in engine.basic_optimizer.state.values()})
                fresh = build(stage, optimizer)
                fresh.load_checkpoint(os.path.join(workdir, f"resume-{name}"), load_optimizer_states=False)
                result[f"{name} fresh"] = train(fresh, range(SAVE_AFTER, STEPS))
    if int(os.environ["RANK"]) == 0:
        torch.save(result, out)
    leave_together()


if __name__ == "__main__":
    main()
