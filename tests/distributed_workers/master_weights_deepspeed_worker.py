"""One rank of tests/test_master_weights_distributed.py: compensated bf16 weights under DeepSpeed.

Started WORLD_SIZE times by the test (see distributed_ranks.run_worker_ranks).

    python master_weights_deepspeed_worker.py train OUT WORKDIR

Every case trains STEPS steps on the same batch on every rank, saves a DeepSpeed
checkpoint at SAVE_AT, and a new engine resumes it. One rank also trains the same
model without DeepSpeed (the oracle) and builds the configs that must be refused.
Rank 0 writes a dict of plain tensors / lists / strings to OUT (torch.save).
"""

from __future__ import annotations

import logging
import os
import sys

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from dist8bit.optim.master_weights import ERROR_KEY
from tests.distributed_ranks import leave_together
from tests.distributed_workers.deepspeed_worker import Zero3Visible, all_ranks, capture, holders, same_state, state_snapshot

VOCAB, DIM, MICRO_BATCH, SEQ = 64, 128, 4, 8
STEPS, SAVE_AT, LR = 6, 3, 1e-3
BF16_NO_MASTER = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}

# name: ZeRO stage, "bf16" section (None: bf16 disabled, the model is cast to bf16 by the worker), error_bits
CASES = {
    "z1": (1, BF16_NO_MASTER, 8),
    "z2_int16": (2, BF16_NO_MASTER, 16),
    "z3": (3, BF16_NO_MASTER, 8),
    "z0_bf16_model": (0, None, 8),
}


class TinyLM(nn.Module):
    """Sizes that put every ZeRO boundary on 8-bit block boundaries: ZeRO 1/2 on 2 ranks cut the
    flat (8192 + 128 + 128 + 8192) between the LayerNorm's weight and bias, ZeRO-3 halves each
    8-bit weight into 16 blocks of 256. So 2 ranks quantize the same blocks as 1 rank."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)  # 8192: 8-bit state
        self.norm = nn.LayerNorm(DIM)  # 2 x 128: 32-bit state
        self.out = nn.Linear(DIM, VOCAB, bias=False)  # 8192: 8-bit state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(tokens)))


def world() -> int:
    return int(os.environ["WORLD_SIZE"])


def bf16_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(torch.bfloat16)


def batch(step: int) -> torch.Tensor:
    """The same tokens on every rank, so the averaged bf16 gradient is exactly one rank's."""
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tokens[:, :-1]).float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def config(stage: int, bf16: dict | None, bits: int, **changes) -> dict:
    cfg = {
        "train_batch_size": MICRO_BATCH * world(),
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "AdamW8bit", "params": {"lr": LR, "master_weights": "compensated", "error_bits": bits}},
        "zero_optimization": {"stage": stage},
        "bf16": bf16 or {"enabled": False},
        "steps_per_print": 10**9,
    }
    cfg.update(changes)
    return cfg


def train(engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = loss_of(engine, batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    """The whole bf16 parameters (ZeRO-3 gathers its partitions)."""
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: param.detach().clone() for name, param in model.named_parameters()}


def errors(engine) -> list[tuple[str, int, str, int, bool]]:
    """Per tensor the optimizer steps: (its dtype, numel, weight_error dtype, numel, any nonzero)."""
    found = []
    with Zero3Visible(engine):
        for holder in holders(engine):
            error = engine.basic_optimizer.state[holder].get(ERROR_KEY)
            described = (str(error.dtype), error.numel(), bool(error.ne(0).any())) if error is not None else ("none", 0, False)
            found.append((str(holder.dtype), holder.numel(), *described))
    return found


def snapshot(engine) -> list[dict[str, torch.Tensor]]:
    with Zero3Visible(engine):
        return state_snapshot(engine)


def run_case(name: str, workdir: str) -> dict:
    stage, bf16, bits = CASES[name]
    cfg = config(stage, bf16, bits)
    model = bf16_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    losses = train(engine, range(SAVE_AT))
    checkpoint = os.path.join(workdir, f"ws{world()}", name)
    engine.save_checkpoint(checkpoint, tag="saved")
    saved = snapshot(engine)
    losses += train(engine, range(SAVE_AT, STEPS))
    result = {
        "losses": losses,
        "params": full_params(model),
        "errors": errors(engine),
        "wrapper": type(engine.optimizer).__name__,
    }
    gathered: list = [None] * world()
    torch.distributed.all_gather_object(gathered, result["errors"])
    result["errors"] = gathered
    resumed_model = bf16_model()
    resumed, _, _, _ = deepspeed.initialize(model=resumed_model, model_parameters=resumed_model.parameters(), config=cfg)
    resumed.load_checkpoint(checkpoint, tag="saved")
    result["save_at"] = SAVE_AT
    result["loaded_state_equal"] = all_ranks(same_state(saved, snapshot(resumed)))
    result["resumed_losses"] = train(resumed, range(SAVE_AT, STEPS))
    result["resumed_params"] = full_params(resumed_model)
    return result


def refusals() -> dict[str, tuple[str, str]]:
    """Configs where the compensated mode could not act (or DeepSpeed would stop on its own CPU Adam)."""

    def init(stage: int, bf16: dict | None, mode: str = "compensated", model_dtype=torch.bfloat16, **changes):
        torch.manual_seed(0)
        model = TinyLM().to(model_dtype)
        cfg = config(stage, bf16, 8, **changes)
        cfg["optimizer"]["params"]["master_weights"] = mode
        return capture(lambda: deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg))

    bf16 = {"enabled": True}
    return {
        "zero2_fp32_master": init(2, bf16),
        "zero3_fp32_master": init(3, bf16),
        "bf16_optimizer": init(1, bf16, data_types={"grad_accum_dtype": "fp32"}),
        "zero0_bf16": init(0, bf16),
        "zero2_bf16_model_bf16_disabled": init(2, None),
        "stochastic_fp32_master": init(2, bf16, mode="stochastic"),
        "no_bf16_optimizer_states": init(2, {**BF16_NO_MASTER, "bf16_optimizer_states": False}),
        "offload": init(2, BF16_NO_MASTER, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}),
        "fp32_over_bf16_partitions": init(2, BF16_NO_MASTER, mode="fp32"),
        "fp32_master_mode": init(2, bf16, mode="fp32"),  # DeepSpeed's master, as asked: accepted
        "float32_model": init(2, None, model_dtype=torch.float32),  # float32 weights are their own master: accepted
    }


def main() -> None:
    phase, out, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
    if phase != "train":
        raise SystemExit(f"unknown phase {phase!r}")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict = {"cases": {name: run_case(name, workdir) for name in CASES}}
    if world() == 1:
        results["refusals"] = refusals()
    if int(os.environ["RANK"]) == 0:
        torch.save(results, out)
    leave_together()


if __name__ == "__main__":
    main()
