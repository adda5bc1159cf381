"""dist8bit plan (docs/planner.md) against DeepSpeed's own estimators, against optimizer state
measured on real dist8bit optimizers after a step (compensated bf16 error buffers included), against
a real 2-rank FSDP2 run (parameter, gradient, state and error bytes per rank), and the CLI against
the documented formulas, with and without an fp32 master."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.distributed as dist
from distributed_ranks import spawn_gloo

from dist8bit.cli import main
from dist8bit.integrations import zero_partition
from dist8bit.optim import AdamW4bit, AdamW8bit, AdamW32bit
from dist8bit.optim.master_weights import ERROR_KEY
from dist8bit.optim.segments import Segment
from dist8bit.planner import Cluster, Option, plan, preset
from dist8bit.planner.model_shapes import gpt_shapes
from dist8bit.planner.report import option_rows
from dist8bit.planner.state_bytes import STATE_PRECISIONS, StateCounter, owned_numel
from launch.model import GPT, GPTConfig
from launch.optimizers import optimizer_state_bytes

STATE_TOLERANCE = 0.02  # the bar for planned vs measured optimizer state
# DeepSpeed divides P by N exactly; ZeRO pads each flat to 2N elements and dist8bit pads each
# packed run to 16 bytes, so the planner may exceed DeepSpeed's figure by this relative amount.
PADDING_TOLERANCE = 1e-5


# ------------------------------------------------------------------ DeepSpeed's estimators
@pytest.fixture(scope="module")
def deepspeed_estimators():
    stage12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    return stage12.estimate_zero2_model_states_mem_needs, stage3.estimate_zero3_model_states_mem_needs


FP32_ADAM = {"optimizer": "adamw", "states": "fp32", "mixed_precision": "fp16"}  # what DeepSpeed's estimators assume


@pytest.mark.parametrize("gpus", [4, 8])
def test_zero2_matches_deepspeed(deepspeed_estimators, gpus):
    estimate_zero2, _ = deepspeed_estimators
    model = preset("gpt2-124m")
    total = model.num_params
    ours = plan(model, Cluster(gpus), Option("zero2", **FP32_ADAM))
    _, gpu = estimate_zero2(total, gpus, 1, cpu_offload=False, additional_buffer_factor=1)
    assert ours.gpu_total == pytest.approx(gpu, rel=PADDING_TOLERANCE) and ours.gpu_total >= gpu
    assert ours.host_total == 0
    offloaded = plan(model, Cluster(gpus), Option("zero2", offload="optimizer", **FP32_ADAM))
    cpu, gpu = estimate_zero2(total, gpus, 1, cpu_offload=True, additional_buffer_factor=1)
    assert offloaded.gpu_total == gpu
    if gpus <= 4:  # above, DeepSpeed's host figure is each rank's fp32 model at start-up (4 B x GPUs), not modelled
        assert offloaded.host_total * gpus == pytest.approx(cpu, rel=PADDING_TOLERANCE)


@pytest.mark.parametrize(("gpus", "nodes"), [(8, 1), (4, 2)])
def test_zero3_matches_deepspeed(deepspeed_estimators, gpus, nodes):
    _, estimate_zero3 = deepspeed_estimators
    model = preset("gpt2-124m")
    total, largest = model.num_params, model.largest_module_params
    cluster = Cluster(gpus * nodes, nodes)
    ours = plan(model, cluster, Option("zero3", **FP32_ADAM))
    _, gpu, _ = estimate_zero3(total, largest, gpus, nodes, cpu_offload=False, additional_buffer_factor=1)
    # DeepSpeed's no-offload ZeRO-3 figure (18 B/param/N) leaves out the 16-bit parameter partition
    # (2 B/param/N) that its own offload branch counts (gpu = 4 x largest + 2 P / N); the planner keeps it.
    assert ours.gpu_total - ours.gpu["params"] == pytest.approx(gpu, rel=PADDING_TOLERANCE)
    assert ours.gpu["params"] == 2 * sum(math.ceil(t.numel / cluster.gpus) for t in model.tensors)
    offloaded = plan(model, cluster, Option("zero3", offload="optimizer", **FP32_ADAM))
    cpu, gpu, _ = estimate_zero3(
        total, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=False, additional_buffer_factor=1
    )
    assert offloaded.gpu_total == pytest.approx(gpu, rel=PADDING_TOLERANCE)
    assert offloaded.host_total * cluster.gpus_per_node == pytest.approx(cpu, rel=PADDING_TOLERANCE)


# ------------------------------------------------------------------ measured on real optimizers
CONFIG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)


# Under FSDP2 on 2 ranks: odd row counts (vocab 255, context 33), so rank 1's shards are a row short and
# FSDP2 pads them; the planner counts the fullest rank (rank 0, ceil(rows / N) rows per tensor).
FSDP_CONFIG = GPTConfig(vocab_size=255, block_size=33, n_layer=2, n_head=4, n_embd=128)


def small_gpt(stable_embedding: bool = False, config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**config.to_dict(), "stable_embedding": stable_embedding}))


def planned_shapes(stable_embedding: bool = False, config: GPTConfig = CONFIG):
    model = gpt_shapes("small", config.n_layer, config.n_embd, config.vocab_size, context=config.block_size)
    return model.with_stable_embedding() if stable_embedding else model


def one_step(model: GPT, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(tokens, tokens)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("config", [CONFIG, FSDP_CONFIG], ids=["even", "odd-rows"])
def test_shapes_are_the_models(config):
    """The planner's GPT shapes are launch/model.py's parameters, in order."""
    shapes = [t.shape for t in planned_shapes(config=config).tensors]
    assert shapes == [tuple(p.shape) for p in small_gpt(config=config).parameters()]


@pytest.fixture
def step_anywhere(monkeypatch):
    """State bytes do not depend on the backend that steps: the reference backend runs
    every precision (4-bit included) on every machine."""
    monkeypatch.setenv("DIST8BIT_BACKEND", "reference")


@pytest.mark.parametrize(("optimizer_class", "states"), [(AdamW8bit, "8bit"), (AdamW4bit, "4bit"), (AdamW32bit, "fp32")])
@pytest.mark.parametrize("stable_embedding", [False, True])
def test_state_bytes_match_measured(optimizer_class, states, stable_embedding, step_anywhere):
    """DDP-style (whole tensors): the launcher's 'optimizer state per rank' after one step."""
    model = small_gpt(stable_embedding)
    optimizer = optimizer_class(model.parameter_groups(0.1), lr=1e-3)
    one_step(model, optimizer)
    measured = optimizer_state_bytes(optimizer)
    planned = StateCounter("adamw", STATE_PRECISIONS[states], planned_shapes(stable_embedding)).per_rank("whole", 1)
    assert planned == pytest.approx(measured, rel=STATE_TOLERANCE)


@pytest.mark.parametrize(("optimizer_class", "states"), [(AdamW8bit, "8bit"), (AdamW4bit, "4bit")])
@pytest.mark.parametrize("stable_embedding", [False, True])
def test_sharded_state_bytes_match_measured(optimizer_class, states, stable_embedding, step_anywhere):
    """ZeRO-1/2 on 2 ranks: each rank's flat partitions stepped by a real AdamW8bit / AdamW4bit."""
    model = small_gpt(stable_embedding)
    groups = model.parameter_groups(0.1)
    world = 2
    counter = StateCounter("adamw", STATE_PRECISIONS[states], planned_shapes(stable_embedding))
    for rank in range(world):
        flats = flat_partitions(groups, world, rank, torch.float32)
        optimizer = optimizer_class([f for f, _ in flats], lr=1e-3)
        for flat, segments in flats:
            optimizer.set_segments(flat, segments)
        optimizer.step()
        assert counter.zero12(world, rank) == pytest.approx(optimizer.state_bytes(), rel=STATE_TOLERANCE), rank


def flat_partitions(groups: list[dict], world: int, rank: int, dtype: torch.dtype) -> list[tuple]:
    """Rank `rank`'s ZeRO-1/2 flat partition of each group, with a gradient, and its segments (DeepSpeed's arithmetic)."""
    flats = []
    for group in groups:
        params = group["params"]
        spans = zero_partition.zero12_spans([p.numel() for p in params], world, rank)
        numel = zero_partition.zero12_partition_numel([p.numel() for p in params], world)
        flat = torch.zeros(numel, dtype=dtype, requires_grad=True)
        flat.grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
        segments = [Segment(params[s.index], s.start, s.length, s.param_offset, params[s.index].numel()) for s in spans]
        flats.append((flat, segments))
    return flats


@pytest.mark.parametrize("error_bits", [8, 16])
def test_compensated_bytes_match_measured(error_bits):
    """bf16 parameters without a master (DDP, whole tensors): the planner's states + error per GPU against
    state_bytes() (states plus error buffers) of a real AdamW8bit(master_weights="compensated") after a step."""
    model = small_gpt().to(torch.bfloat16)
    optimizer = AdamW8bit(model.parameter_groups(0.1), lr=1e-3, master_weights="compensated", error_bits=error_bits)
    one_step(model, optimizer)
    option = Option("ddp", master_weights="compensated", error_bits=error_bits)
    planned = plan(planned_shapes(), Cluster(1), option)
    assert planned.gpu["error"] == error_bits // 8 * planned.model.num_params
    assert planned.gpu["states"] + planned.gpu["error"] == pytest.approx(optimizer.state_bytes(), rel=STATE_TOLERANCE)


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_sharded_compensated_bytes_match_measured(strategy):
    """ZeRO-1/2 on 2 ranks: bf16 flat partitions stepped with master_weights="compensated" keep one error
    buffer per segment; the planner's per-GPU states + error equal the fullest rank's state_bytes()."""
    model = small_gpt()
    groups = model.parameter_groups(0.1)
    world = 2
    measured = []
    for rank in range(world):
        flats = flat_partitions(groups, world, rank, torch.bfloat16)
        optimizer = AdamW8bit([f for f, _ in flats], lr=1e-3, master_weights="compensated")
        for flat, segments in flats:
            optimizer.set_segments(flat, segments)
        optimizer.step()
        measured.append(optimizer.state_bytes())
    planned = plan(planned_shapes(), Cluster(world), Option(strategy, master_weights="compensated"))
    assert planned.gpu["error"] == owned_numel(planned_shapes(), "zero12", world)
    assert planned.gpu["states"] + planned.gpu["error"] == pytest.approx(max(measured), rel=STATE_TOLERANCE)


# ------------------------------------------------------------------ a real FSDP2 run
FSDP_WORLD = 2
FSDP_RUNS = {
    # name: (parameter dtype, optimizer arguments, the planner's option for the same run)
    "fp32-master": (torch.float32, {}, Option("fsdp2")),  # fp32 shards (the master), bf16 autocast compute
    "compensated": (torch.bfloat16, {"master_weights": "compensated"}, Option("fsdp2", master_weights="compensated")),
    "compensated-16": (
        torch.bfloat16,
        {"master_weights": "compensated", "error_bits": 16},
        Option("fsdp2", master_weights="compensated", error_bits=16),
    ),
}


def allocated_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: FSDP2's padded shards (each parameter owns one; a
    module's gradients are views of one reduce-scatter output), not the unpadded to_local() views."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def fsdp_memory_worker(rank: int, world: int) -> list[dict]:
    """Both FSDP_RUNS in one launch: launch/strategies/fsdp.py's sharding of the odd-rows GPT (fully_shard
    per block, then the root), one AdamW8bit step; every rank's bytes, gathered to rank 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ["DIST8BIT_BACKEND"] = "reference"  # the bytes do not depend on the backend that steps
    mesh = init_device_mesh("cpu", (world,))
    measured = {}
    for name, (dtype, arguments, _) in FSDP_RUNS.items():
        model = small_gpt(config=FSDP_CONFIG).to(dtype)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = AdamW8bit(model.parameter_groups(0.1), lr=1e-3, **arguments)
        tokens = torch.randint(0, FSDP_CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            _, loss = model(tokens, tokens)
        loss.backward()
        optimizer.step()
        params = [p.to_local() for p in model.parameters()]
        grads = [p.grad.to_local() for p in model.parameters()]
        errors = [state[ERROR_KEY] for state in optimizer.state.values() if ERROR_KEY in state]
        measured[name] = {
            "state_bytes": optimizer.state_bytes(),
            "error_bytes": sum(e.numel() * e.element_size() for e in errors),
            "params": allocated_bytes(params),
            "grads": allocated_bytes(grads),
            "params_local": sum(t.numel() * t.element_size() for t in params),
            "grads_local": sum(t.numel() * t.element_size() for t in grads),
            "dtypes": sorted({str(t.dtype) for t in params + grads}),
        }
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, measured)
    return per_rank


@pytest.fixture(scope="module")
def fsdp_measured() -> list[dict]:
    return spawn_gloo(fsdp_memory_worker, FSDP_WORLD)


@pytest.mark.parametrize("run", FSDP_RUNS)
def test_fsdp2_state_bytes_match_a_real_run(fsdp_measured, run):
    """Optimizer state (states + error buffers) per rank: within the issue's 2% of the planner's per-GPU
    states + error (the fullest rank); each rank's states equal the planner's count for that rank."""
    _, _, option = FSDP_RUNS[run]
    model = planned_shapes(config=FSDP_CONFIG)
    planned = plan(model, Cluster(FSDP_WORLD), option)
    counter = StateCounter("adamw", STATE_PRECISIONS["8bit"], model)
    owned = owned_numel(model, "fsdp2", FSDP_WORLD)
    for rank, measured in enumerate(fsdp_measured):
        got = measured[run]
        assert counter.fsdp2(FSDP_WORLD, rank) + got["error_bytes"] == got["state_bytes"], rank
        assert got["error_bytes"] <= planned.gpu["error"] == option.error_bytes * owned, rank
    fullest = max(m[run]["state_bytes"] for m in fsdp_measured)
    assert planned.gpu["states"] + planned.gpu["error"] == pytest.approx(fullest, rel=STATE_TOLERANCE)


@pytest.mark.parametrize("run", FSDP_RUNS)
def test_fsdp2_param_and_grad_shards_match_a_real_run(fsdp_measured, run):
    """Sharded parameters and gradients: FSDP2 allocates every rank ceil(rows / N) rows per tensor (the last
    ranks' shards padded), which is what the planner counts, so the allocated bytes agree exactly on every rank
    (tolerance 0); the unpadded to_local() views reach it on rank 0 and stay under it elsewhere. fp32-master: 4 B
    shards (the shard is the master, none besides); compensated: 2 B bf16 shards."""
    dtype, _, option = FSDP_RUNS[run]
    planned = plan(planned_shapes(config=FSDP_CONFIG), Cluster(FSDP_WORLD), option)
    assert planned.gpu["master"] == 0
    for rank, measured in enumerate(fsdp_measured):
        got = measured[run]
        assert got["dtypes"] == [str(dtype)], rank
        for component in ("params", "grads"):
            assert got[component] == planned.gpu[component], (rank, component)
            assert got[component + "_local"] <= planned.gpu[component], (rank, component)
    for component in ("params", "grads"):
        assert fsdp_measured[0][run][component + "_local"] == planned.gpu[component], component
    assert fsdp_measured[1][run]["params_local"] < planned.gpu["params"], "the odd rows leave rank 1 padded"


# ------------------------------------------------------------------ the CLI against the formula
def documented_zero3_8bit_bytes(model, gpus: int) -> float:
    """docs/planner.md, ZeRO-3 bf16 AdamW8bit without offload, bytes per GPU:
    (2 params + 2 grads + 4 fp32 grads + 4 master + 2 x (1 + 4/256) states) x P/N + 4 x largest module."""
    per_rank = math.ceil(model.num_params / gpus)
    return (2 + 2 + 4 + 4 + 2 * (1 + 4 / 256)) * per_rank + 4 * model.largest_module_params


def test_cli_zero3_llama7b_agrees_with_formula(capsys):
    assert main(["plan", "--model", "llama-7b", "--gpus", "8", "--strategy", "zero3", "--optim", "adamw8bit"]) == 0
    out = capsys.readouterr().out
    total_gib = float(re.search(r"^total\s+([0-9.]+)", out, re.M).group(1))
    assert out.strip().splitlines()[-1].startswith("summary:")
    expected = documented_zero3_8bit_bytes(preset("llama-7b"), 8) / 2**30
    assert total_gib == pytest.approx(expected, abs=0.005 + 1e-3 * expected)


def adamw_4bit_state_bytes(numel: int, min_quantized_size: int = 4096) -> int:
    """docs/planner.md, AdamW4bit state of one tensor of n elements: 2 slots x (ceil(n / 2) code bytes +
    4 x ceil(n / 128) scale bytes), or 2 x 4 B per element below min_8bit_size."""
    if numel < min_quantized_size:
        return 2 * 4 * numel
    return 2 * (math.ceil(numel / 2) + 4 * math.ceil(numel / 128))


def test_4bit_state_bytes_follow_the_documented_formula():
    """Whole tensors (odd sizes, partial blocks, tensors below min_8bit_size) against the formula."""
    model = preset("gpt2-124m")
    planned = StateCounter("adamw", STATE_PRECISIONS["4bit"], model).per_rank("whole", 1)
    assert planned == sum(adamw_4bit_state_bytes(t.numel) for t in model.tensors)
    assert planned / model.num_params <= 1.1  # issue 15's memory bar on GPT-2 124M's shapes
    odd = gpt_shapes("odd", 1, 65, 101, context=33)
    assert StateCounter("adamw", STATE_PRECISIONS["4bit"], odd).per_rank("whole", 1) == sum(
        adamw_4bit_state_bytes(t.numel) for t in odd.tensors
    )


def documented_zero3_4bit_bytes(model, gpus: int) -> float:
    """docs/planner.md, ZeRO-3 bf16 AdamW4bit without offload: as for 8-bit with 2 x (1/2 + 4/128) state bytes."""
    per_rank = math.ceil(model.num_params / gpus)
    return (2 + 2 + 4 + 4 + 2 * (1 / 2 + 4 / 128)) * per_rank + 4 * model.largest_module_params


def test_cli_4bit_agrees_with_formula_and_fits_more(capsys):
    assert main(["plan", "--model", "llama-7b", "--gpus", "8", "--strategy", "zero3", "--optim", "adamw4bit"]) == 0
    out = capsys.readouterr().out
    total_gib = float(re.search(r"^total\s+([0-9.]+)", out, re.M).group(1))
    expected = documented_zero3_4bit_bytes(preset("llama-7b"), 8) / 2**30
    assert total_gib == pytest.approx(expected, abs=0.005 + 1e-3 * expected)
    assert re.search(r"^\|?\s*zero3\s*\|?\s*4bit\s", out, re.M), "the options table has 4-bit rows"
    rows = option_rows(preset("llama-7b"), Cluster(8), Option("zero3", states="4bit"), 80 * 2**30, None)
    largest = {r["states"]: r["largest"] for r in rows if r["strategy"] == "zero3" and r["offload"] == "none"}
    assert largest["4bit"] > largest["8bit"] > largest["fp32"]


def test_cli_reads_params(capsys):
    assert main(["plan", "--params", "1e9", "--gpus", "2", "--strategy", "ddp", "--optim", "adamw32bit"]) == 0
    # ddp bf16 fp32-state AdamW: 2 + 2 + 4 + 8 = 16 B per parameter on every GPU
    per_param = float(re.search(r"^total\s+[0-9.]+\s+([0-9.]+)", capsys.readouterr().out, re.M).group(1))
    assert per_param == pytest.approx(16.0, abs=1e-3)


# ------------------------------------------------------------------ bf16 without an fp32 master
def documented_zero3_compensated_bytes(model, gpus: int, error_bits: int) -> float:
    """docs/planner.md, ZeRO-3 bf16 AdamW8bit, master_weights compensated: bytes per GPU =
    (2 params + 2 grads + 2 bf16 grad partition + 2 x (1 + 4/256) states + error_bits/8 error) x P/N + 4 x largest module."""
    per_rank = math.ceil(model.num_params / gpus)
    return (2 + 2 + 2 + 2 * (1 + 4 / 256) + error_bits / 8) * per_rank + 4 * model.largest_module_params


def printed_total_gib(out: str) -> float:
    return float(re.search(r"^total\s+([0-9.]+)", out, re.M).group(1))


@pytest.mark.parametrize("error_bits", [8, 16])
def test_cli_compensated_agrees_with_formula_and_fits_more(capsys, error_bits):
    command = ["plan", "--model", "llama-7b", "--gpus", "8", "--strategy", "zero3", "--optim", "adamw8bit"]
    assert main([*command, "--master-weights", "compensated", "--error-bits", str(error_bits)]) == 0
    out = capsys.readouterr().out
    model = preset("llama-7b")
    expected = documented_zero3_compensated_bytes(model, 8, error_bits) / 2**30
    assert printed_total_gib(out) == pytest.approx(expected, abs=0.005 + 1e-3 * expected)
    error_gib = float(re.search(r"^error\s+([0-9.]+)", out, re.M).group(1))
    assert error_gib == pytest.approx(error_bits / 8 * math.ceil(model.num_params / 8) / 2**30, abs=0.005)
    master = f"compensated-{error_bits}bit"
    assert re.search(rf"^zero3\s+8bit\s+none\s+{master}\s", out, re.M), "the options table has compensated rows"
    rows = option_rows(model, Cluster(8), Option("zero3", master_weights="compensated"), 80 * 2**30, None)
    largest = {(r["strategy"], r["master"]): r["largest"] for r in rows if r["states"] == "8bit" and r["offload"] == "none"}
    for strategy in ("ddp", "zero1", "zero2", "zero3", "fsdp2"):
        assert largest[strategy, "compensated-8bit"] > largest[strategy, "fp32"], strategy


def test_no_master_components_per_strategy():
    """Which copies exist without a master (docs/planner.md's table): FSDP2's sharded parameter is bf16, not the
    fp32 master; ZeRO's gradient partition is bf16; ZeRO-1/2 step a bf16 copy of the partition, ZeRO-3 the
    parameter partition itself; 'none' and 'stochastic' keep no error buffer."""
    model, world = preset("gpt2-124m"), 4
    for strategy, layout in (("ddp", "whole"), ("zero1", "zero12"), ("zero2", "zero12"), ("zero3", "zero3"), ("fsdp2", "fsdp2")):
        owned = owned_numel(model, layout, world)
        with_master = plan(model, Cluster(world), Option(strategy))
        for mode in ("none", "stochastic", "compensated"):
            result = plan(model, Cluster(world), Option(strategy, master_weights=mode))
            sharded = owned if strategy in ("zero3", "fsdp2") else model.num_params
            assert result.gpu["params"] == 2 * sharded, (strategy, mode)
            assert result.gpu["master"] == (2 * owned if strategy in ("zero1", "zero2") else 0), (strategy, mode)
            assert result.gpu["error"] == (owned if mode == "compensated" else 0), (strategy, mode)
            assert result.gpu["states"] == with_master.gpu["states"]
            assert result.gpu["grads"] == with_master.gpu["grads"] - 2 * (owned if strategy.startswith("zero") else 0) - (
                2 * owned if strategy == "fsdp2" else 0
            ), (strategy, mode)
            assert result.host_total == 0
        if strategy == "fsdp2":
            assert with_master.gpu["params"] == 4 * owned  # with a master the fp32 shard is the master


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--master-weights", "compensated", "--mixed-precision", "none"], "their own master"),
        (["--master-weights", "stochastic", "--mixed-precision", "fp16"], "bf16 weights only"),
        (["--master-weights", "compensated", "--offload", "optimizer"], "fp32 master copy by design"),
        (["--error-bits", "16"], "--error-bits sizes the error buffer of --master-weights compensated"),
    ],
)
def test_cli_refuses_plans_without_a_master_that_cannot_run(capsys, arguments, message):
    assert main(["plan", "--model", "gpt2-124m", *arguments]) == 1
    assert message in capsys.readouterr().err
