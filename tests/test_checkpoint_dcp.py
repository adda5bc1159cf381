"""DCP (FSDP2) checkpoints through `dist8bit convert`: 2 gloo ranks on CPU, resumed across precisions and world sizes.

Runs (each an mp.spawn): dist8bit AdamW8bit and torch AdamW, both FSDP2 on 2 ranks, 8 steps with a DCP
checkpoint after step 4 (the 8-bit one in the launcher's layout: `latest`, step dir, launch.pt, key
"optimizer"; the fp32 one as a plain dcp.save({"model", "optim"})). The 8-bit checkpoint converted to fp32
resumes in torch AdamW on 1 rank; the fp32 one converted to 8-bit resumes in AdamW8bit on 2 ranks. Each
resumed curve must continue its own run closer than the 8-bit run and the 32-bit run are to each other,
while a resume from a fresh optimizer state must not.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_ranks import free_port

from dist8bit.checkpoint import CheckpointError, convert
from dist8bit.checkpoint.codec import error_bound
from dist8bit.checkpoint.dcp_io import open_source
from dist8bit.optim import AdamW8bit
from dist8bit.quant.maps import create_dynamic_map

STEPS, SAVE_AFTER, LR = 8, 4, 1e-2
TAG = "step_000004"


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(96, 128)  # 8-bit, row-aligned blocks of 128
        self.up = torch.nn.Linear(128, 256)  # weight 8-bit (blocks of 128); bias < 4096: 32-bit
        self.down = torch.nn.Linear(256, 96)  # weight 8-bit (blocks of 256)
        self.scale = torch.nn.Parameter(torch.ones(4608))  # 1-D >= 4096: 32-bit under FSDP2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.up(self.embed(tokens)))
        return self.down(hidden * self.scale[:256])


def build(optimizer: str):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyModel()
    fully_shard(model.up)
    fully_shard(model.down)
    fully_shard(model)
    opt = AdamW8bit(model.parameters(), lr=LR) if optimizer == "8bit" else torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt


def train(model, optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 96, (8, 16), generator=generator)  # the same batch on every rank
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), torch.roll(tokens, 1, dims=1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def worker(rank: int, world: int, port: int, job: str, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = Path(directory)
        precision, action = job.split("-")
        model, optimizer = build(precision)
        # the 8-bit run saves in the launcher's layout (key "optimizer"), the 32-bit run as a plain dcp.save
        key = "optimizer" if (precision == "8bit") == (action == "train") else "optim"
        if action == "train":
            losses = train(model, optimizer, range(SAVE_AFTER))
            model_sd, optim_sd = get_state_dict(model, optimizer)
            where = out / "src8" / TAG if precision == "8bit" else out / "src32"
            dcp.save({"model": model_sd, key: optim_sd}, checkpoint_id=str(where))
            if precision == "8bit" and rank == 0:
                torch.save({"step": SAVE_AFTER}, where / "launch.pt")
                (out / "src8" / "latest").write_text(TAG + "\n")
            dist.barrier()
            result = {"losses": losses + train(model, optimizer, range(SAVE_AFTER, STEPS))}
        else:  # resume from a converted checkpoint, and (control) from its weights with a fresh optimizer state
            where = out / "to32" / TAG if precision == "32bit" else out / "to8"
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, key: optim_sd}
            dcp.load(state, checkpoint_id=str(where))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state[key])
            result = {"losses": train(model, optimizer, range(SAVE_AFTER, STEPS))}
            model, optimizer = build(precision)
            model_sd = get_model_state_dict(model)
            dcp.load({"model": model_sd}, checkpoint_id=str(where))
            set_model_state_dict(model, model_sd)
            result["fresh"] = train(model, optimizer, range(SAVE_AFTER, STEPS))
        if rank == 0:
            torch.save(result, out / f"{job}.pt")
    finally:
        dist.destroy_process_group()


def launch(world: int, job: str, directory: Path) -> dict:
    mp.spawn(worker, args=(world, free_port(), job, str(directory)), nprocs=world, join=True)
    return torch.load(directory / f"{job}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    directory = tmp_path_factory.mktemp("dcp")
    result = {"dir": directory, "8bit": launch(2, "8bit-train", directory), "32bit": launch(2, "32bit-train", directory)}
    # the 8-bit run resumes in torch AdamW (optimizer named: dist8bit's groups do not say Adam or AdamW)
    result["to32"] = convert(directory / "src8", directory / "to32", to="fp32", optimizer="adamw", verify=True, progress=False)
    result["to8"] = convert(directory / "src32", directory / "to8", to="8bit", world_size=2, verify=True, progress=False)
    result["resumed32"] = launch(1, "32bit-resume", directory)
    result["resumed8"] = launch(2, "8bit-resume", directory)
    return result


def gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("resumed", "original"), [("resumed32", "8bit"), ("resumed8", "32bit")])
def test_converted_checkpoint_continues_the_loss_curve(runs, resumed, original):
    precision_gap = gap(runs["8bit"]["losses"][SAVE_AFTER:], runs["32bit"]["losses"][SAVE_AFTER:])
    continued = gap(runs[resumed]["losses"], runs[original]["losses"][SAVE_AFTER:])
    fresh = gap(runs[resumed]["fresh"], runs[original]["losses"][SAVE_AFTER:])
    print(f"{resumed}: off by {continued:.2e}; 8-bit vs 32-bit run {precision_gap:.2e}; fresh optimizer state {fresh:.2e}")
    assert continued <= precision_gap
    assert fresh > 5 * precision_gap  # the check can fail: without the converted state the curve jumps


def test_summary_and_layouts(runs):
    assert "--world-size 2 changes nothing" in runs["to8"].summary()
    assert runs["to32"].max_error == 0.0 and runs["to8"].bound_ratio <= 1.0
    out = runs["dir"] / "to32"
    assert (out / "latest").read_text().strip() == TAG
    assert torch.load(out / TAG / "launch.pt", weights_only=True) == {"step": SAVE_AFTER}
    keys = set(open_source(out / TAG).paths)
    assert "optimizer.state.embed.weight.exp_avg" in keys and "optimizer.param_groups.0.amsgrad" in keys
    assert not any(k.endswith(("_codes", "_absmax")) for k in keys)


def all_entries(directory: Path) -> dict:
    source = open_source(directory)
    return source.load(source.paths)


def test_8bit_to_fp32_to_8bit_gives_back_the_same_codes_and_scales(runs, tmp_path):
    convert(runs["dir"] / "to32", tmp_path / "back", to="8bit", progress=False)
    before, after = all_entries(runs["dir"] / "src8" / TAG), all_entries(tmp_path / "back" / TAG)
    assert any(k.endswith("_codes") for k in before)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
        elif "param_groups" not in key:
            assert after[key] == value, key
    assert {k for k in after if "param_groups" not in k} == {k for k in before if "param_groups" not in k}


def test_fp32_to_8bit_to_fp32_is_within_the_quantizer_bound(runs, tmp_path):
    back = convert(runs["dir"] / "to8", tmp_path / "back", to="fp32", verify=True, progress=False)
    assert back.max_error == 0.0  # dequantization is exact; the 8-bit step carried the whole error
    before, after = all_entries(runs["dir"] / "src32"), all_entries(tmp_path / "back")
    scales = all_entries(runs["dir"] / "to8")
    for name in ("embed.weight", "up.weight", "down.weight"):
        for state, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            bound = error_bound(create_dynamic_map(signed))
            key = f"optim.state.{name}.{state}"
            absmax = scales[key + "_absmax"]
            error = (after[key] - before[key]).abs().reshape(absmax.shape[0], absmax.shape[1], -1).amax(2)
            assert bool((error <= absmax * (bound + 2**-22)).all()), key
            assert error.max() > 0, key  # really quantized
    for key in ("optim.state.scale.exp_avg", "optim.state.up.bias.exp_avg_sq", "model.up.weight"):
        assert torch.equal(after[key], before[key]), key  # 32-bit state (1-D, small) and weights untouched


class RunsCode:
    """A pickle that runs a command when loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_errors(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["dir"] / "src32", broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="shard file is missing or truncated"):
        convert(broken, tmp_path / "out", to="8bit", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no temporary left behind
    marker = tmp_path / "code-ran"
    (broken / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(CheckpointError, match="not readable DCP metadata"):
        convert(broken, tmp_path / "out", to="8bit", progress=False)
    assert not marker.exists()  # DCP's own reader would have unpickled it (and run the command)
    with pytest.raises(CheckpointError, match="already exists"):
        convert(runs["dir"] / "src32", runs["dir"] / "to8", to="8bit", progress=False)
    assert not (tmp_path / "out").exists()
