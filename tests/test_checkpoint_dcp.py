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
from distributed_ranks import spawn_gloo
from helpers import tiny_model, train

from dist8bit.checkpoint import CheckpointError, convert
from dist8bit.checkpoint.codec import error_bound
from dist8bit.checkpoint.dcp_io import open_source
from dist8bit.optim import AdamW8bit
from dist8bit.quant.maps import create_dynamic_map

STEPS, SAVE_AFTER, LR = 8, 4, 1e-2
TAG = "step_000004"


def build(optimizer: str):
    model = tiny_model(fsdp=True)
    opt = AdamW8bit(model.parameters(), lr=LR) if optimizer == "8bit" else torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt


def worker(rank: int, world: int, job: str, directory: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

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
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dcp")
    result = {
        "dir": directory,
        "8bit": spawn_gloo(worker, 2, "8bit-train", str(directory)),
        "32bit": spawn_gloo(worker, 2, "32bit-train", str(directory)),
    }
    # the 8-bit run resumes in torch AdamW (optimizer named: dist8bit's groups do not say Adam or AdamW)
    result["to32"] = convert(directory / "src8", directory / "to32", to="fp32", optimizer="adamw", verify=True, progress=False)
    result["to8"] = convert(directory / "src32", directory / "to8", to="8bit", world_size=2, verify=True, progress=False)
    result["resumed32"] = spawn_gloo(worker, 1, "32bit-resume", str(directory))
    result["resumed8"] = spawn_gloo(worker, 2, "8bit-resume", str(directory))
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
