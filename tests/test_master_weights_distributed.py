"""Compensated bfloat16 parameters (master_weights="compensated", no fp32 master) under FSDP2 and DeepSpeed ZeRO.

FSDP2: each rank keeps the weight_error of its own shard. The compensated write is
elementwise and the 8-bit blocks are row-aligned, and every rank trains on the same
batch (the gradient average of identical bf16 gradients is exact), so 2 ranks and 1
rank must agree bit for bit, in the parameters and in the error buffers. The state
dict exports weight_error as a DTensor laid out like its parameter, so DCP reshards
it: a checkpoint saved on 2 ranks resumes on 1 bit-exactly, for error_bits 8 and 16.

DeepSpeed (0.19.8, CPU, tests/distributed_workers/master_weights_deepspeed_worker.py on 1 and 2
ranks): with "bf16_master_weights_and_grads" and "bf16_optimizer_states" ZeRO 1, 2 and 3 hand
the optimizer bf16 flat partitions, and ZeRO 0 with bf16 disabled a bf16 model's own
parameters; each gets a weight_error, 2 ranks equal 1 rank bit for bit, and DeepSpeed's
save_checkpoint / load_checkpoint resume exactly. Configs where DeepSpeed keeps a float32
master are refused when the engine is built (dist8bit/integrations/deepspeed_masters.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from distributed_ranks import run_worker_ranks, spawn_gloo
from helpers import tiny_model, train
from test_fsdp import full_params

from dist8bit.optim import AdamW8bit
from dist8bit.optim.master_weights import ERROR_KEY

STEPS, SAVE_AT, LR = 8, 4, 1e-2
ERROR_BITS = (8, 16)
ERROR_DTYPE = {8: torch.int8, 16: torch.int16}


# ---------------------------------------------------------------------- FSDP2
def fsdp_optimizer(model: torch.nn.Module, bits: int, mode: str = "compensated") -> AdamW8bit:
    return AdamW8bit(model.parameters(), lr=LR, master_weights=mode, error_bits=bits)


def exported_errors(optim_sd: dict, model: torch.nn.Module) -> dict[str, tuple]:
    """How get_state_dict exports each parameter's weight_error: (is a DTensor, global shape,
    placements, dtype) beside the parameter's (shape, placements)."""
    from torch.distributed.tensor import DTensor

    described = {}
    for name, param in model.named_parameters():
        error = optim_sd["state"][name][ERROR_KEY]
        described[name] = (
            isinstance(error, DTensor),
            tuple(error.shape),
            str(getattr(error, "placements", None)),
            str(error.dtype),
            tuple(param.shape),
            str(param.placements),
        )
    return described


def gathered_errors(model: torch.nn.Module, optimizer: AdamW8bit, bits: int) -> dict[str, torch.Tensor]:
    """Every parameter's whole weight_error (on rank 0). int8 errors through DCP's full state dict;
    int16 ones through int32 (gloo and NCCL have no int16 collectives, see docs/master_weights.md)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if bits == 8:
        full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))[1]
        return {name: state[ERROR_KEY] for name, state in full.get("state", {}).items()}  # empty off rank 0
    exported = get_state_dict(model, optimizer)[1]["state"]
    return {name: state[ERROR_KEY].to(torch.int32).full_tensor().to(torch.int16) for name, state in exported.items()}


def fsdp_worker(rank: int, world_size: int, jobs: tuple[str, ...], directory: str) -> dict:
    """Each job for both error_bits: "train", STEPS steps with a DCP checkpoint at SAVE_AT;
    "resume-from-N", load the checkpoint an N-rank train job wrote and repeat the steps after it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results: dict = {}
    for job in jobs:
        for bits in ERROR_BITS:
            model = tiny_model(True, torch.bfloat16)
            optimizer = fsdp_optimizer(model, bits)
            if job == "train":
                checkpoint = Path(directory, f"ws{world_size}", f"bits{bits}")
                losses = train(model, optimizer, range(SAVE_AT))
                model_sd, optim_sd = get_state_dict(model, optimizer)
                exported = exported_errors(optim_sd, model)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(checkpoint))
                losses += train(model, optimizer, range(SAVE_AT, STEPS))
                errors = gathered_errors(model, optimizer, bits)
                result = {"params": full_params(model), "losses": losses, "errors": errors, "exported": exported}
            else:
                checkpoint = Path(directory, f"ws{job.removeprefix('resume-from-')}", f"bits{bits}")
                model_sd, optim_sd = get_state_dict(model, optimizer)  # allocates the state DCP loads into
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=str(checkpoint))
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
                losses = train(model, optimizer, range(SAVE_AT, STEPS))
                result = {"params": full_params(model), "losses": losses}
            results.setdefault(job, {})[bits] = result
    if "train" in jobs and world_size == 1:  # the same run writing bf16 by round-to-nearest: what compensation changes
        model = tiny_model(True, torch.bfloat16)
        train(model, fsdp_optimizer(model, 8, "none"), range(STEPS))
        results["none"] = full_params(model)
    return results


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Two launches: 2 ranks train; 1 rank trains and resumes the 2-rank checkpoint."""
    directory = str(tmp_path_factory.mktemp("fsdp_compensated"))
    two = spawn_gloo(fsdp_worker, 2, ("train",), directory)
    one = spawn_gloo(fsdp_worker, 1, ("train", "resume-from-2"), directory)
    return {"one": one["train"], "two": two["train"], "none": one["none"], "one<-two": one["resume-from-2"]}


def assert_equal_tensors(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), what
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), f"{what}: {name}"


@pytest.mark.parametrize("bits", ERROR_BITS)
def test_fsdp_two_ranks_match_one_rank_bit_for_bit(fsdp_runs, bits):
    one, two = fsdp_runs["one"][bits], fsdp_runs["two"][bits]
    assert two["losses"] == one["losses"]
    assert_equal_tensors(two["params"], one["params"], f"parameters, error_bits={bits}")
    assert all(value.dtype == torch.bfloat16 for value in one["params"].values())
    assert_equal_tensors(two["errors"], one["errors"], f"gathered weight_error, error_bits={bits}")


def test_fsdp_compensation_is_active(fsdp_runs):
    """The error buffers hold something, and the parameters differ from round-to-nearest bf16 writes."""
    for bits in ERROR_BITS:
        errors = fsdp_runs["one"][bits]["errors"]
        assert all(bool(error.ne(0).any()) for error in errors.values()), bits
    compensated, nearest = fsdp_runs["one"][8]["params"], fsdp_runs["none"]
    assert any(not torch.equal(compensated[name], nearest[name]) for name in nearest)


@pytest.mark.parametrize("bits", ERROR_BITS)
def test_fsdp_state_dict_exports_weight_error_like_its_parameter(fsdp_runs, bits):
    for run in ("one", "two"):
        for name, (is_dtensor, shape, placements, dtype, param_shape, param_placements) in fsdp_runs[run][bits][
            "exported"
        ].items():
            assert is_dtensor and shape == param_shape and placements == param_placements, (run, name)
            assert dtype == str(ERROR_DTYPE[bits]), (run, name)
        for name, error in fsdp_runs["one"][bits]["errors"].items():  # full_state_dict gathers the parameter's shape
            assert tuple(error.shape) == fsdp_runs["one"][bits]["exported"][name][4] and error.dtype == ERROR_DTYPE[bits]


@pytest.mark.parametrize("bits", ERROR_BITS)
def test_fsdp_dcp_checkpoint_resumes_exactly_on_another_world_size(fsdp_runs, bits):
    """Saved on 2 ranks, resumed on 1: DCP reshards the DTensor weight_error like the states."""
    got, expected = fsdp_runs["one<-two"][bits], fsdp_runs["two"][bits]
    assert got["losses"] == expected["losses"][SAVE_AT:]
    assert_equal_tensors(got["params"], expected["params"], f"2 -> 1 ranks, error_bits={bits}")


# ------------------------------------------------------------------ DeepSpeed
DEEPSPEED_WORKER = Path(__file__).resolve().parent / "distributed_workers" / "master_weights_deepspeed_worker.py"
DEEPSPEED_CASES = ("z1", "z2_int16", "z3", "z0_bf16_model")
NO_MASTER_FIX = '"bf16_master_weights_and_grads": true'


def launch_deepspeed(world: int, folder: Path) -> dict:
    out = folder / f"deepspeed_{world}.pt"
    return run_worker_ranks(world, DEEPSPEED_WORKER, ["train", str(out), str(folder)], folder, f"deepspeed_{world}", out)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e .[deepspeed])")
    folder = tmp_path_factory.mktemp("deepspeed_compensated")
    return {1: launch_deepspeed(1, folder), 2: launch_deepspeed(2, folder)}


@pytest.mark.parametrize("case", DEEPSPEED_CASES)
def test_deepspeed_optimizer_steps_bf16_partitions_with_a_weight_error(deepspeed_runs, case):
    """Every tensor the optimizer steps is bf16 (no fp32 master) and has an error buffer of its size."""
    bits = 16 if case.endswith("int16") else 8
    for world, run in deepspeed_runs.items():
        per_rank = run["cases"][case]["errors"]
        assert len(per_rank) == world
        for tensors in per_rank:
            assert tensors, (world, case)
            for dtype, numel, error_dtype, error_numel, nonzero in tensors:
                assert dtype == "torch.bfloat16" and error_dtype == str(ERROR_DTYPE[bits]), (world, case)
                assert error_numel == numel and nonzero, (world, case)
    wrappers = {case: deepspeed_runs[2]["cases"][case]["wrapper"] for case in DEEPSPEED_CASES}
    assert wrappers == {
        "z1": "DeepSpeedZeroOptimizer",
        "z2_int16": "DeepSpeedZeroOptimizer",
        "z3": "DeepSpeedZeroOptimizer_Stage3",
        "z0_bf16_model": "AdamW8bit",
    }


@pytest.mark.parametrize("case", DEEPSPEED_CASES)
def test_deepspeed_two_ranks_match_one_rank_bit_for_bit(deepspeed_runs, case):
    """Same batch on both ranks and ZeRO boundaries on block boundaries (the worker's TinyLM): the
    compensated write is elementwise, so sharding changes nothing."""
    one, two = deepspeed_runs[1]["cases"][case], deepspeed_runs[2]["cases"][case]
    assert two["losses"] == one["losses"]
    assert_equal_tensors(two["params"], one["params"], case)
    assert all(value.dtype == torch.bfloat16 for value in one["params"].values())


@pytest.mark.parametrize("case", DEEPSPEED_CASES)
def test_deepspeed_checkpoint_keeps_the_weight_error(deepspeed_runs, case):
    """save_checkpoint/load_checkpoint carry weight_error with the states: the resumed run is the same run."""
    for world, run in deepspeed_runs.items():
        result = run["cases"][case]
        assert result["loaded_state_equal"], (world, case)
        assert result["resumed_losses"] == result["losses"][result["save_at"] :], (world, case)
        assert_equal_tensors(result["resumed_params"], result["params"], f"{case} on {world} ranks")


def test_deepspeed_configs_that_keep_an_fp32_master_are_refused(deepspeed_runs):
    refusals = deepspeed_runs[1]["refusals"]
    no_effect = [
        "zero2_fp32_master",
        "zero3_fp32_master",
        "bf16_optimizer",
        "zero0_bf16",
        "zero2_bf16_model_bf16_disabled",
        "stochastic_fp32_master",
    ]
    for name in no_effect:
        kind, message = refusals[name]
        assert kind == "DeepSpeedConfigError" and "would do nothing" in message and NO_MASTER_FIX in message, name
    assert "BF16_Optimizer" in refusals["bf16_optimizer"][1]
    assert "'stochastic'" in refusals["stochastic_fp32_master"][1]
    kind, message = refusals["no_bf16_optimizer_states"]
    assert kind == "DeepSpeedConfigError" and '"bf16_optimizer_states": true' in message
    kind, message = refusals["offload"]
    assert kind == "DeepSpeedConfigError" and "offload_optimizer" in message and "DeepSpeedCPUAdam" in message
    kind, message = refusals["fp32_over_bf16_partitions"]
    assert kind == "DeepSpeedConfigError" and "master_weights='fp32'" in message and "bf16_master_weights_and_grads" in message
    assert refusals["fp32_master_mode"][0] == refusals["float32_model"][0] == "no error"
