"""One rank of tests/test_deepspeed.py: DeepSpeed runs of a dist8bit optimizer named in the config.

Started WORLD_SIZE times by the test (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
in the environment, DS_ACCELERATOR=cpu, gloo). Several configurations run in one
process so DeepSpeed's start-up is paid once per launch.

    python deepspeed_worker.py train     OUT WORKDIR   every case: 20 steps, checkpoint at 10, resume;
                                                      1 rank: also bad configs; more ranks: resume the 1-rank checkpoint
    python deepspeed_worker.py precision OUT WORKDIR   which pieces each rank holds, and their precision, after one step

Rank 0 writes a dict of plain tensors / lists / strings to OUT (torch.save).
"""

from __future__ import annotations

import logging
import os
import sys

import deepspeed
import deepspeed.ops
import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_optimizer_state
from torch import nn

import dist8bit  # registers with DeepSpeed (already imported: at once)
import dist8bit.deepspeed
from dist8bit.integrations.deepspeed import get_full_optimizer_state
from dist8bit.nn import StableEmbedding
from dist8bit.optim import state as state_layout
from tests.distributed_ranks import leave_together

# DeepSpeed's shared-memory all-reduce for CPU is a speed-up of its own collectives
# (a C++ op built on first use, ~1 minute): irrelevant to what is tested here.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

VOCAB, DIM, HIDDEN, SEQ = 100, 48, 111, 6
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks
STEPS, SAVE_AT = 20, 10
LR = 3e-3
WATCHED = ("emb.weight", "fc1.weight", "fc2.weight", "fc2.bias")

# name, ZeRO stage, bf16, extra zero_optimization keys, extra top-level keys, optimizer type
CASES = [
    ("z0", 0, False, {}, {}, "AdamW8bit"),
    ("z1", 1, False, {}, {}, "AdamW8bit"),
    ("z2", 2, False, {}, {}, "AdamW8bit"),
    ("z3", 3, False, {"sub_group_size": 8000}, {}, "AdamW8bit"),
    ("z2_bf16", 2, True, {}, {}, "AdamW8bit"),
    ("z1_bf16_fp32acc", 1, True, {}, {"data_types": {"grad_accum_dtype": "fp32"}}, "AdamW8bit"),
    ("z3_bf16", 3, True, {"sub_group_size": 8000}, {}, "AdamW8bit"),
    ("z0_bf16", 0, True, {}, {}, "AdamW8bit"),
    ("z2_4bit", 2, False, {}, {}, "AdamW4bit"),  # 4-bit segments cut at the same partition boundaries
    ("z1_4bit", 1, False, {}, {}, "AdamW4bit"),
    ("z3_4bit", 3, False, {"sub_group_size": 8000}, {}, "AdamW4bit"),
]
REFERENCE_ONLY = [("z0_32bit", 0, False, {}, {}, "AdamW32bit")]  # measures the 8-bit vs 32-bit gap


class TinyLM(nn.Module):
    """Embedding (32-bit state via StableEmbedding, 4800 elements), two Linear layers
    (8-bit weights of 5328 and 11100 elements, 32-bit biases). Sizes are chosen so that
    ZeRO partition boundaries fall inside parameters, at offsets that are not multiples of 256."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = StableEmbedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.emb(tokens))))


def rank() -> int:
    return int(os.environ["RANK"])


def world() -> int:
    return int(os.environ["WORLD_SIZE"])


def config(stage: int, bf16: bool, zero_extra: dict, extra: dict, optimizer: str) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world(),
        "optimizer": {"type": optimizer, "params": {"lr": LR, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 5, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": stage, **zero_extra},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        **extra,
    }


def build(cfg: dict):
    torch.manual_seed(0)
    model = TinyLM()
    decay = [model.emb.weight, model.fc1.weight, model.fc2.weight]
    no_decay = [p for p in model.parameters() if all(p is not d for d in decay)]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    return model, engine, scheduler


def batches() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=generator)


def train(engine, data: torch.Tensor, steps: range, lrs: list | None = None) -> list[float]:
    per_rank = GLOBAL_BATCH // world()
    losses = []
    for step in steps:
        batch = data[step, rank() * per_rank : (rank() + 1) * per_rank]
        logits = engine(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if lrs is not None:
            lrs.append((engine.get_lr()[0], engine.basic_optimizer.param_groups[0]["lr"]))
    return losses


def holders(engine) -> list[torch.Tensor]:
    """The tensors the dist8bit optimizer keeps state for, in DeepSpeed's order."""
    wrapper = engine.optimizer
    for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        if hasattr(wrapper, attribute):
            return list(getattr(wrapper, attribute))
    if hasattr(wrapper, "fp32_groups"):
        return [p for group in wrapper.fp32_groups for p in group]
    return [p for group in engine.basic_optimizer.param_groups for p in group["params"]]


class Zero3Visible:
    """ZeRO-3 puts its flat buffers into the optimizer's param groups only around step()."""

    def __init__(self, engine) -> None:
        self.zero = engine.optimizer if hasattr(engine.optimizer, "fp32_partitioned_groups_flat") else None

    def __enter__(self) -> None:
        if self.zero is not None:
            self.zero._set_fp32_optimizer_param_groups()

    def __exit__(self, *exc) -> None:
        if self.zero is not None:
            self.zero._clear_fp32_optimizer_param_groups()


def pieces(engine, model, stage: int) -> list[list[tuple[str, int, int, int]]]:
    """Per rank: (parameter name, first element, length, bits of its state: 32, 8 or 4) of every
    piece of optimizer state the rank holds (a whole parameter without ZeRO)."""
    names = {id(p): n for n, p in model.named_parameters()}
    local = []
    optimizer = engine.basic_optimizer
    if stage == 0:
        wrapper = engine.optimizer
        if hasattr(wrapper, "fp32_groups"):  # bf16: state lives on the fp32 master copies
            pairs = [
                (p, m) for g, ms in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True) for p, m in zip(g, ms, strict=True)
            ]
        else:
            pairs = [(p, p) for p in holders(engine)]
        specs = optimizer.state_specs(optimizer.defaults)
        for param, holder in pairs:
            bits = state_layout.stored_bits(optimizer.state[holder], specs, holder.shape, 32)
            local.append((names[id(param)], 0, param.numel(), bits))
    else:
        with Zero3Visible(engine):
            for flat in holders(engine):
                for segment, bits, _ in optimizer.segment_states(flat):
                    local.append((names[id(segment.source)], segment.param_offset, segment.length, bits))
    gathered = [None] * world()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def gathered_matches_local(engine, model, stage: int, full_state: dict) -> bool:
    """Every piece this rank holds appears bit for bit in the gathered full state."""
    if stage == 0:
        return True  # nothing is gathered without ZeRO
    names = {id(p): n for n, p in model.named_parameters()}
    with Zero3Visible(engine):
        for flat in holders(engine):
            for segment, _, values in engine.basic_optimizer.segment_states(flat):
                full = full_state.get(names[id(segment.source)])
                for key in full or {}:
                    piece = full[key].flatten().narrow(0, segment.param_offset, segment.length)
                    if not torch.equal(piece, values[key].float().cpu()):
                        return False
    return True


def full_params(engine, model) -> dict[str, torch.Tensor]:
    """Full fp32 master weights (DeepSpeed's own API; the module's weights without a master copy)."""
    copies = {}
    if hasattr(engine.optimizer, "fp32_groups"):  # bf16 without ZeRO: fp32 master copies
        for group, masters in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True):
            copies.update({id(p): m for p, m in zip(group, masters, strict=True)})
    result = {}
    for name, param in model.named_parameters():
        value = copies.get(id(param))
        if value is None:
            value = safe_get_full_fp32_param(param)
        if value is None:
            value = param
        result[name] = value.detach().float().clone().cpu()
    return result


def state_snapshot(engine) -> list[dict[str, torch.Tensor]]:
    optimizer = engine.basic_optimizer
    return [{k: v.clone() for k, v in optimizer.state[h].items()} for h in holders(engine)]


def same_state(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if set(x) != set(y) or any(not torch.equal(x[k].cpu(), y[k].cpu()) for k in x):
            return False
    return True


def all_ranks(flag: bool) -> bool:
    value = torch.tensor([int(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def run_case(case: tuple, workdir: str) -> dict:
    name, stage, bf16, zero_extra, extra, optimizer_type = case
    cfg = config(stage, bf16, zero_extra, extra, optimizer_type)
    data = batches()
    model, engine, _ = build(cfg)
    lrs: list = []
    losses = train(engine, data, range(SAVE_AT), lrs)
    checkpoint = os.path.join(workdir, f"ws{world()}", name)
    engine.save_checkpoint(checkpoint, tag="step10")
    saved_state = state_snapshot(engine)
    losses += train(engine, data, range(SAVE_AT, STEPS), lrs)
    result = {
        "losses": losses,
        "lrs": lrs,
        "params": full_params(engine, model),
        "pieces": pieces(engine, model, stage),
        "optimizer": type(engine.basic_optimizer).__name__,
        "wrapper": type(engine.optimizer).__name__,
    }
    byte_counts = [None] * world()
    torch.distributed.all_gather_object(byte_counts, engine.basic_optimizer.state_bytes())
    result["state_bytes"] = byte_counts
    names = dict(model.named_parameters())
    result["full_state"] = {
        n: {key: get_full_optimizer_state(names[n], key).float().cpu() for key in ("exp_avg", "exp_avg_sq")} for n in WATCHED
    }
    result["full_state_exact"] = all_ranks(gathered_matches_local(engine, model, stage, result["full_state"]))
    # DeepSpeed's own fragment API (ZeRO 1-3 and bf16 wrappers; None where it has no fragments, e.g. ZeRO 0).
    ds_state = {n: safe_get_full_optimizer_state(names[n], "exp_avg") for n in WATCHED}
    result["deepspeed_full_exp_avg"] = {n: None if v is None else v.float().cpu() for n, v in ds_state.items()}
    weight = names["fc2.weight"]
    result["set_state"] = capture(
        lambda: safe_set_full_optimizer_state(weight, torch.zeros(weight.ds_shape if stage == 3 else weight.shape), "exp_avg")
    )
    _, resumed, _ = build(cfg)
    resumed.load_checkpoint(checkpoint, tag="step10")
    result["loaded_state_equal"] = all_ranks(same_state(saved_state, state_snapshot(resumed)))
    result["resumed_losses"] = train(resumed, data, range(SAVE_AT, STEPS))
    result["resumed_params"] = full_params(resumed, resumed.module)
    return result


def capture(function) -> tuple[str, str]:
    try:
        function()
    except Exception as error:  # the test inspects the type and message
        return type(error).__name__, str(error)
    return "no error", ""


def errors_phase() -> dict:
    def init(**changes):
        cfg = config(2, False, {}, {}, "AdamW8bit")
        for key, value in changes.items():
            cfg[key] = value
        return build(cfg)

    results = {
        "unknown_name": capture(lambda: init(optimizer={"type": "AdamW8bitt", "params": {"lr": LR}})),
        "unknown_key": capture(lambda: init(optimizer={"type": "AdamW8bit", "params": {"lr": LR, "foo_bar": 1}})),
        "elastic": capture(lambda: init(zero_optimization={"stage": 2, "elastic_checkpoint": True})),
    }
    # torch.optim's SGD stays torch's (and DeepSpeed's untested-optimizer check still applies to it).
    results["torch_name_under_zero"] = capture(lambda: init(optimizer={"type": "SGD", "params": {"lr": LR}}))
    _, engine, _ = init(optimizer={"type": "SGD", "params": {"lr": LR}}, zero_optimization={"stage": 0})
    results["torch_name_untouched"] = type(engine.basic_optimizer).__module__ + "." + type(engine.basic_optimizer).__name__
    return results


def world_size_mismatch(workdir: str) -> tuple[str, str]:
    """Resume the 1-rank ZeRO-2 checkpoint (saved by the 1-rank launch) on this world size."""
    case = next(c for c in CASES if c[0] == "z2")
    _, engine, _ = build(config(*case[1:]))
    return capture(lambda: engine.load_checkpoint(os.path.join(workdir, "ws1", "z2"), tag="step10"))


def client_optimizer_pieces() -> list:
    """A dist8bit optimizer passed to deepspeed.initialize (as HF Trainer does with its own optimizer),
    through dist8bit.deepspeed.initialize."""
    torch.manual_seed(0)
    model = TinyLM()
    cfg = config(2, False, {}, {}, "AdamW8bit")
    del cfg["optimizer"]
    optimizer = dist8bit.optim.AdamW8bit(model.parameters(), lr=LR)
    engine, _, _, _ = dist8bit.deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)  # the drop-in
    train(engine, batches(), range(1))
    return pieces(engine, model, 2)


def main() -> None:
    phase, out, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict = {"world_size": world(), "registered": dist8bit.integrations.deepspeed.is_registered()}
    if phase == "train":
        cases = CASES + (REFERENCE_ONLY if world() == 1 else [])
        results["cases"] = {case[0]: run_case(case, workdir) for case in cases}
        if world() == 1:
            results["errors"] = errors_phase()
        else:
            results["world_size_mismatch"] = world_size_mismatch(workdir)
            results["client_optimizer_pieces"] = client_optimizer_pieces()
    elif phase == "precision":
        results["precision"] = {}
        for case in (c for c in CASES if c[0] in ("z2", "z3", "z2_4bit")):
            model, engine, _ = build(config(*case[1:]))
            train(engine, batches(), range(1))
            results["precision"][case[0]] = pieces(engine, model, case[1])
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    if rank() == 0:
        torch.save(results, out)
    leave_together()


if __name__ == "__main__":
    main()
