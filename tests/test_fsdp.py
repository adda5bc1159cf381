"""FSDP2 (fully_shard) and DDP with dist8bit optimizers: 2 ranks on CPU (gloo).

Row-aligned blocks make the sharded run and the 1-rank run quantize the same
blocks, so they agree to float rounding, not just to 8-bit tolerance; DCP
checkpoints carry each rank's own scales as DTensors and reshard 2 -> 1 and
2 -> 2 ranks exactly. The same holds for 4-bit states (AdamW4bit), whose packed
codes travel as [rows, row_elems / 2] byte DTensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_ranks import spawn_gloo
from helpers import tiny_model, train

from dist8bit.optim import AdamW4bit, AdamW8bit

STEPS = 20
SAVE_AT = 10


def build(strategy: str, optimizer_class=AdamW8bit):
    model = tiny_model(fsdp=strategy == "fsdp")
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, optimizer_class(model.parameters(), lr=1e-2)


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = value.detach().clone()
    return out


def precisions(model, optimizer) -> dict[str, bool]:
    return {name: "exp_avg_codes" in optimizer.state[param] for name, param in model.named_parameters()}


def state_bits(model, optimizer) -> dict[str, int]:
    group = optimizer.param_groups[0]
    return {name: optimizer.state_bits(param, group) for name, param in model.named_parameters()}


def worker(rank: int, world_size: int, job: str, directory: str, optimizer_class=AdamW8bit) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    out = Path(directory)
    model, optimizer = build("ddp" if job == "ddp" else "fsdp", optimizer_class)
    if job == "ddp":
        losses = train(model, optimizer, range(STEPS))
        result = {"params": full_params(model.module), "losses": losses, "state_bytes": optimizer.state_bytes()}
    elif job == "train":
        losses = train(model, optimizer, range(SAVE_AT))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
        losses += train(model, optimizer, range(SAVE_AT, STEPS))
        result = {
            "params": full_params(model),
            "losses": losses,
            "state_bytes": optimizer.state_bytes(),
            "precisions": precisions(model, optimizer),
            "bits": state_bits(model, optimizer),
        }
        result["full_optim"] = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))[
            1
        ]
    else:  # resume from the DCP checkpoint written by the 2-rank run
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(out / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        losses = train(model, optimizer, range(SAVE_AT, STEPS))
        result = {"params": full_params(model), "losses": losses}
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp")
    return {
        "two": spawn_gloo(worker, 2, "train", str(directory)),
        "one": spawn_gloo(worker, 1, "train", str(directory / "one")),
        "resume-1": spawn_gloo(worker, 1, "resume", str(directory)),
        "resume-2": spawn_gloo(worker, 2, "resume", str(directory)),
        "ddp": spawn_gloo(worker, 2, "ddp", str(directory)),
    }


def test_two_ranks_match_one_rank(runs):
    for name, value in runs["one"]["params"].items():
        torch.testing.assert_close(runs["two"]["params"][name], value, rtol=0, atol=1e-5, msg=name)


def test_ddp_works_as_is(runs):
    """DDP replicates the optimizer: same parameters as 1 rank, full state on every rank."""
    model, optimizer = build("none")
    assert runs["ddp"]["losses"] == pytest.approx(train(model, optimizer, range(STEPS)), rel=1e-5)
    for name, value in full_params(model).items():
        torch.testing.assert_close(runs["ddp"]["params"][name], value, rtol=0, atol=1e-5, msg=name)
    assert runs["ddp"]["state_bytes"] == optimizer.state_bytes()


def test_state_bytes_halve_per_rank(runs):
    one, two = runs["one"]["state_bytes"], runs["two"]["state_bytes"]
    assert two == pytest.approx(one / 2, rel=0.1)


def test_precision_comes_from_the_global_shape(runs):
    expected = {
        "embed.weight": True,
        "up.weight": True,
        "up.bias": False,
        "down.weight": True,
        "down.bias": False,
        "scale": False,
    }
    assert runs["one"]["precisions"] == expected
    assert runs["two"]["precisions"] == expected


def test_full_state_dict_gathers_codes_and_scales(runs):
    state = runs["two"]["full_optim"]["state"]
    embed = state["embed.weight"]
    assert embed["exp_avg_codes"].shape == (96, 128) and embed["exp_avg_codes"].dtype == torch.uint8
    assert embed["exp_avg_absmax"].shape == (96, 1)  # one block of 128 per row
    assert state["down.weight"]["exp_avg_absmax"].shape == (96, 1)
    assert state["scale"]["exp_avg"].shape == (4608,)


@pytest.mark.parametrize("resume", ["resume-1", "resume-2"])
def test_dcp_checkpoint_resumes_on_any_world_size(runs, resume):
    """Saved on 2 ranks at step 10, resumed on 1 or 2: the curve continues exactly."""
    expected = runs["two"]
    got = runs[resume]
    assert got["losses"] == pytest.approx(expected["losses"][SAVE_AT:], rel=1e-5)
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-5, msg=name)


def mismatch_worker(rank: int, world_size: int, directory: str) -> None:
    from dist8bit.integrations.consistency import check_same_parameters

    model = torch.nn.Linear(8, 8 + rank)  # rank 1 builds a wider layer
    try:
        check_same_parameters(model.named_parameters())
        message = "no error"
    except ValueError as error:
        message = str(error)
    Path(directory, f"mismatch-{rank}.txt").write_text(message)


def test_ranks_with_different_parameters_get_a_clear_error(tmp_path):
    spawn_gloo(mismatch_worker, 2, str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"mismatch-{rank}.txt").read_text()
        assert "parameter #0 is ('weight', (8, 8)" in message and "(9, 8)" in message and "same model" in message


# ------------------------------------------------------------------ 4-bit states
@pytest.fixture(scope="module")
def runs_4bit(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp4bit")
    return {
        "two": spawn_gloo(worker, 2, "train", str(directory), AdamW4bit),
        "one": spawn_gloo(worker, 1, "train", str(directory / "one"), AdamW4bit),
        "resume-1": spawn_gloo(worker, 1, "resume", str(directory), AdamW4bit),
    }


def test_4bit_two_ranks_match_one_rank_with_the_same_precision(runs_4bit):
    """Row-aligned 4-bit blocks: the sharded run quantizes the same blocks as 1 rank (float rounding apart)."""
    for name, value in runs_4bit["one"]["params"].items():
        torch.testing.assert_close(runs_4bit["two"]["params"][name], value, rtol=0, atol=1e-5, msg=name)
    expected = {"embed.weight": 4, "up.weight": 4, "up.bias": 32, "down.weight": 4, "down.bias": 32, "scale": 32}
    assert runs_4bit["one"]["bits"] == runs_4bit["two"]["bits"] == expected
    assert runs_4bit["two"]["state_bytes"] == pytest.approx(runs_4bit["one"]["state_bytes"] / 2, rel=0.1)


def test_4bit_full_state_dict_gathers_packed_codes_by_row(runs_4bit):
    state = runs_4bit["two"]["full_optim"]["state"]
    embed = state["embed.weight"]
    assert embed["exp_avg_codes"].shape == (96, 64) and embed["exp_avg_codes"].dtype == torch.uint8
    assert embed["exp_avg_absmax"].shape == (96, 1)  # one block of 128 per row
    assert state["down.weight"]["exp_avg_sq_codes"].shape == (96, 128)
    assert state["down.weight"]["exp_avg_sq_absmax"].shape == (96, 2)  # rows of 256: two 4-bit blocks of 128


def test_4bit_dcp_checkpoint_resumes_on_one_rank(runs_4bit):
    """Saved on 2 ranks at step 10, resumed on 1: the curve continues exactly."""
    expected, got = runs_4bit["two"], runs_4bit["resume-1"]
    assert got["losses"] == pytest.approx(expected["losses"][SAVE_AT:], rel=1e-5)
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-5, msg=name)
