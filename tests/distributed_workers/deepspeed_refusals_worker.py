"""One rank of tests/test_deepspeed_refusals.py: configurations dist8bit refuses, on real DeepSpeed engines.

Started once, as a single rank (RANK=0, WORLD_SIZE=1, MASTER_ADDR/PORT, DS_ACCELERATOR=cpu,
gloo) so DeepSpeed's start-up is paid once. Each case builds a small engine (one Linear
layer) with a dist8bit optimizer and records what the refused call raised, as
(exception type, message); controls record that the same call without the refused
setting goes through, so a refusal that fired on everything would show.

    python deepspeed_refusals_worker.py OUT WORKDIR

Writes a dict {case: (type name, message)} to OUT (torch.save).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import deepspeed
import deepspeed.ops
import torch
from deepspeed.checkpoint.constants import PARAM_ALIGNMENT_PADDINGS
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_optimizer_state,
    safe_set_local_optimizer_state,
)
from torch import nn

import dist8bit  # noqa: F401  registers with DeepSpeed
from tests.distributed_ranks import leave_together

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see deepspeed_worker.py

BATCH, DIM, OUT = 2, 64, 80


def build(zero: dict, optimizer: str = "AdamW8bit", **extra) -> deepspeed.DeepSpeedEngine:
    torch.manual_seed(0)
    model = nn.Linear(DIM, OUT)
    config = {
        "train_batch_size": BATCH,
        "optimizer": {"type": optimizer, "params": {"lr": 1e-3}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        **extra,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def step(engine) -> None:
    loss = engine(torch.randn(BATCH, DIM)).square().mean()
    engine.backward(loss)
    engine.step()


def capture(function: Callable[[], object]) -> tuple[str, str]:
    try:
        function()
    except Exception as error:  # the test inspects the type and message
        return type(error).__name__, str(error)
    return "no error", ""


def offload_cases(workdir: str) -> dict:
    stage3 = {"stage": 3}
    return {
        "partial_offload": capture(lambda: build({**stage3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}})),
        "nvme_offload": capture(
            lambda: build({**stage3, "offload_optimizer": {"device": "nvme", "nvme_path": os.path.join(workdir, "nvme")}})
        ),
        "whole_cpu_offload": capture(lambda: build({**stage3, "offload_optimizer": {"device": "cpu"}})),  # control
        "super_offload": capture(lambda: build({**stage3, "offload_optimizer": {"device": "cpu", "super_offload": True}})),
        "zenflow": capture(lambda: build({"stage": 2, "zenflow": {"topk_ratio": 0.5}})),
    }


def zero3_accessor_cases() -> dict:
    engine = build({"stage": 3})
    step(engine)
    weight = engine.module.weight
    zeros = torch.zeros(weight.ds_tensor.ds_numel)
    return {
        "z3_get_local_state": capture(lambda: safe_get_local_optimizer_state(weight, "exp_avg")),
        "z3_set_local_state": capture(lambda: safe_set_local_optimizer_state(weight, zeros, "exp_avg")),
        "z3_set_full_state": capture(lambda: safe_set_full_optimizer_state(weight, torch.zeros(weight.ds_shape), "exp_avg")),
        "z3_get_local_fp32_param": capture(lambda: safe_get_local_fp32_param(weight)),  # control: weights, not state
    }


def checkpoint_cases(workdir: str) -> dict:
    folder = os.path.join(workdir, "z2")
    engine = build({"stage": 2})
    step(engine)
    engine.save_checkpoint(folder, tag="t")
    results = {
        "z2_set_full_state": capture(
            lambda: safe_set_full_optimizer_state(engine.module.weight, torch.zeros(OUT, DIM), "exp_avg")
        ),
        "rigid_load": capture(lambda: build({"stage": 2}).load_checkpoint(folder, tag="t")),  # control
        "universal_load": capture(
            lambda: build({"stage": 2}, checkpoint={"load_universal": True}).load_checkpoint(folder, tag="t")
        ),
    }
    other = os.path.join(workdir, "elastic")  # an elastic ZeRO-2 checkpoint of another optimizer
    sgd = build({"stage": 2, "elastic_checkpoint": True}, optimizer="SGD", zero_allow_untested_optimizer=True)
    step(sgd)
    sgd.save_checkpoint(other, tag="t")
    results["elastic_load"] = capture(lambda: build({"stage": 2}).load_checkpoint(other, tag="t"))
    fresh = build({"stage": 2})
    saved = fresh.optimizer.state_dict()
    saved[PARAM_ALIGNMENT_PADDINGS] = [[padding + 2 for padding in group] for group in saved[PARAM_ALIGNMENT_PADDINGS]]
    results["padding_load"] = capture(lambda: fresh.optimizer._load_legacy_checkpoint([saved]))
    return results


def main() -> None:
    out, workdir = sys.argv[1], sys.argv[2]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {**offload_cases(workdir), **zero3_accessor_cases(), **checkpoint_cases(workdir)}
    torch.save(results, out)
    leave_together()


if __name__ == "__main__":
    main()
