"""One rank of tests/test_deepspeed_offload.py: ZeRO-Offload (offload_optimizer cpu) with a dist8bit optimizer.

Started WORLD_SIZE times by the test like deepspeed_worker.py (DS_ACCELERATOR=cpu, gloo,
reference kernels), whose model, config, training loop and checkpoint round trip it reuses:
every case of CASES runs 20 steps, saves a checkpoint at step 10 (WORKDIR/ws<world>/<name>/step10)
and resumes it in a fresh engine for steps 10-20. The offload cases differ from their
no-offload twins only by `offload_optimizer`, so the two can be compared element for element.

    python deepspeed_offload_worker.py OUT WORKDIR

Rank 0 writes a dict of plain tensors / lists / strings to OUT (torch.save).
"""

from __future__ import annotations

import logging
import os
import sys

import deepspeed
import deepspeed_worker
import torch
from deepspeed_worker import TinyLM, batches, capture, config, pieces, rank, run_case, train, world

import dist8bit
from dist8bit.optim import GlobalOptimManager
from tests.distributed_ranks import leave_together

OFFLOAD = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
Z3 = {"sub_group_size": 8000}  # two sub-groups on 1 rank, one on 2: as in deepspeed_worker.py

# name, ZeRO stage, bf16, extra zero_optimization keys, extra top-level keys, optimizer type
CASES = [
    ("z2", 2, False, {}, {}, "AdamW8bit"),
    ("z2_offload", 2, False, OFFLOAD, {}, "AdamW8bit"),
    ("z1_offload", 1, False, OFFLOAD, {}, "AdamW8bit"),
    ("z3", 3, False, Z3, {}, "AdamW8bit"),
    ("z3_offload", 3, False, {**Z3, **OFFLOAD}, {}, "AdamW8bit"),
    ("z2_bf16", 2, True, {}, {}, "AdamW8bit"),
    ("z2_offload_bf16", 2, True, OFFLOAD, {}, "AdamW8bit"),
]
OVERRIDE_STEPS = 2


class OverriddenLM(TinyLM):
    """TinyLM whose fc1.weight (5328 elements: 8-bit by size) is forced to 32-bit state by an override."""

    def __init__(self) -> None:
        super().__init__()
        GlobalOptimManager.get_instance().register_module_override(self.fc1, "weight", {"optim_bits": 32})


def offload_facts(engine) -> dict:
    """Whether DeepSpeed's ZeRO wrapper took its offload path (the flags its step() branches on),
    and on which devices the optimizer's flat buffers and its state live."""
    wrapper, optimizer = engine.optimizer, engine.basic_optimizer
    zero3 = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    flats = list(zero3) if zero3 is not None else [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "offload": bool(getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False)),
        "flat_devices": sorted({p.device.type for p in flats}),
        "state_devices": sorted({t.device.type for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}),
    }


BUILT: list = []  # the engines deepspeed_worker.run_case builds (trained, resumed), for offload_facts after it
_build = deepspeed_worker.build


def _recording_build(cfg: dict):
    """deepspeed_worker.build, also keeping each engine (run_case keeps its engines to itself)."""
    model, engine, scheduler = _build(cfg)
    BUILT.append(engine)
    return model, engine, scheduler


deepspeed_worker.build = _recording_build  # run_case looks `build` up in its module at call time


def override_case(workdir: str) -> dict:
    """ZeRO-2 offload with a GlobalOptimManager override on fc1.weight: its pieces keep 32-bit state,
    also in a fresh engine resumed from the checkpoint."""
    cfg = config(2, False, OFFLOAD, {}, "AdamW8bit")
    checkpoint = os.path.join(workdir, f"ws{world()}", "z2_offload_override")
    result = {}
    for phase in ("trained", "resumed"):
        torch.manual_seed(0)
        model = OverriddenLM()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        if phase == "resumed":
            engine.load_checkpoint(checkpoint, tag="step")
        train(engine, batches(), range(OVERRIDE_STEPS))
        if phase == "trained":
            engine.save_checkpoint(checkpoint, tag="step")
        result[phase] = {"pieces": pieces(engine, model, 2), **offload_facts(engine)}
    return result


def client_optimizer_case(kind: str) -> dict:
    """A dist8bit optimizer passed to deepspeed.initialize under ZeRO-Offload, as an object (HF Trainer's
    way) or as a class DeepSpeed instantiates, without zero_force_ds_cpu_optimizer=false in the config."""
    torch.manual_seed(0)
    model = TinyLM()
    cfg = config(2, False, OFFLOAD, {}, "AdamW8bit")
    del cfg["optimizer"]
    optimizer = dist8bit.optim.AdamW8bit(model.parameters(), lr=1e-3) if kind == "object" else dist8bit.optim.AdamW8bit

    def run() -> dict:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        train(engine, batches(), range(1))
        return offload_facts(engine)

    facts: dict = {}
    error = capture(lambda: facts.update(run()))
    return {"error": error, **facts}


def main() -> None:
    out, workdir = sys.argv[1], sys.argv[2]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict = {"world_size": world(), "cases": {}}
    for case in CASES:
        result = run_case(case, workdir)
        results["cases"][case[0]] = {**result, "facts": [offload_facts(engine) for engine in BUILT]}  # trained, resumed
        BUILT.clear()
    results["override"] = override_case(workdir)
    results["client_optimizer"] = {kind: client_optimizer_case(kind) for kind in ("object", "class")}
    if rank() == 0:
        torch.save(results, out)
    leave_together()


if __name__ == "__main__":
    main()
