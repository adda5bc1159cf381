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
from dist8bit.optim import AdamW4bit, AdamW8bit
from dist8bit.quant.maps import create_dynamic_map

STEPS, SAVE_AFTER, LR = 8, 4, 1e-2
TAG = "step_000004"


def build(optimizer: str):
    model = tiny_model(fsdp=True)
    classes = {"8bit": AdamW8bit, "4bit": AdamW4bit}
    opt = classes[optimizer](model.parameters(), lr=LR) if optimizer in classes else torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt


def worker(rank: int, world: int, job: str, directory: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    out = Path(directory)
    precision, action = job.split("-")
    model, optimizer = build(precision)
    # the 8-bit run saves in the launcher's layout (key "optimizer"), the 32-bit run as a plain dcp.save
    key = "optimizer" if (precision == "8bit") == (action == "train") else "optim"
    key = "optim" if precision == "4bit" else key  # trained and resumed from plain dcp.save directories
    if action == "train":
        losses = train(model, optimizer, range(SAVE_AFTER))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        where = {"8bit": out / "src8" / TAG, "32bit": out / "src32", "4bit": out / "src4"}[precision]
        dcp.save({"model": model_sd, key: optim_sd}, checkpoint_id=str(where))
        if precision == "8bit" and rank == 0:
            torch.save({"step": SAVE_AFTER}, where / "launch.pt")
            (out / "src8" / "latest").write_text(TAG + "\n")
        dist.barrier()
        result = {"losses": losses + train(model, optimizer, range(SAVE_AFTER, STEPS))}
    else:  # resume from a converted checkpoint, and (control) from its weights with a fresh optimizer state
        where = {"32bit": out / "to32" / TAG, "8bit": out / "to8", "4bit": out / "to4"}[precision]
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


@pytest.fixture(scope="module")
def runs4(runs):
    """AdamW4bit under FSDP2 on 2 ranks (DCP per-rank scales and packed codes), and the fp32 run converted
    to 4-bit and resumed by AdamW4bit on 2 ranks."""
    directory = runs["dir"]
    with pytest.MonkeyPatch.context() as patch:
        # the checkpoints are under test, not the kernels: the reference backend (their bit-identical
        # oracle) steps 4-bit states on every machine; the spawned ranks inherit the setting
        patch.setenv("DIST8BIT_BACKEND", "reference")
        result = {"4bit": spawn_gloo(worker, 2, "4bit-train", str(directory))}
        result["to4"] = convert(directory / "src32", directory / "to4", to="4bit", verify=True, progress=False)
        result["resumed4"] = spawn_gloo(worker, 2, "4bit-resume", str(directory))
    return {**runs, **result}


def test_4bit_dcp_keeps_per_rank_scales_and_packed_rows(runs4):
    """Codes [rows, row / 2] and scales [rows, row / 128] are DTensors sharded by rows like the parameter:
    each rank's scales are its own, and 4-bit -> fp32 -> 4-bit gives back the same bytes."""
    entries = all_entries(runs4["dir"] / "src4")
    assert entries["optim.param_groups.0.optim_bits"] == 4
    for name in ("embed.weight", "up.weight", "down.weight"):
        codes, absmax = entries[f"optim.state.{name}.exp_avg_codes"], entries[f"optim.state.{name}.exp_avg_absmax"]
        weight = entries[f"model.{name}"]
        assert codes.shape == (weight.shape[0], weight[0].numel() // 2) and codes.dtype == torch.uint8
        assert absmax.shape == (weight.shape[0], weight[0].numel() // 128)


def test_4bit_dcp_round_trips_and_resumes(runs4, tmp_path):
    """4-bit -> fp32 -> 4-bit gives back every code and scale; the fp32 run converted to 4-bit resumes in
    AdamW4bit on 2 ranks within the 4-bit vs fp32 gap of the original curve (measured 1.7e-2 vs 2.7e-2),
    and well inside where a fresh optimizer state lands (6.4e-2)."""
    to32 = convert(runs4["dir"] / "src4", tmp_path / "fp32", to="fp32", optimizer="adamw", verify=True, progress=False)
    assert to32.max_error == 0.0 and "dist8bit-4bit" in to32.source_format
    convert(tmp_path / "fp32", tmp_path / "back", to="4bit", progress=False)
    before, after = all_entries(runs4["dir"] / "src4"), all_entries(tmp_path / "back")
    for key, value in before.items():
        if isinstance(value, torch.Tensor) and "param_groups" not in key:
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert 0 < runs4["to4"].bound_ratio <= 1.0
    precision_gap = gap(runs4["4bit"]["losses"][SAVE_AFTER:], runs4["32bit"]["losses"][SAVE_AFTER:])
    continued = gap(runs4["resumed4"]["losses"], runs4["32bit"]["losses"][SAVE_AFTER:])
    fresh = gap(runs4["resumed4"]["fresh"], runs4["32bit"]["losses"][SAVE_AFTER:])
    print(f"resumed4: off by {continued:.2e}; 4-bit vs 32-bit run {precision_gap:.2e}; fresh optimizer state {fresh:.2e}")
    assert continued <= precision_gap
    # a lost optimizer state is told apart from the converted one (measured 3.8x; the 4-bit vs fp32 gap
    # itself is 2.7e-2 at this lr, so the 8-bit test's 5x-the-precision-gap margin does not apply)
    assert fresh > 3 * continued


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
