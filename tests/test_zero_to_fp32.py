"""DeepSpeed's zero_to_fp32 reads ZeRO checkpoints of a dist8bit optimizer (docs/deepspeed.md).

zero_to_fp32 rebuilds the fp32 weights from the fp32 master copies in the
optimizer files; the 8-bit states sit next to them and must not get in the way.
Two gloo CPU ranks train the model of tests/distributed_workers/deepspeed_worker.py
(ZeRO-2, ZeRO-3 and bf16 ZeRO-2, AdamW8bit) for a few steps and save a checkpoint;
zero_to_fp32's consolidated weights must equal the engine's fp32 master weights.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
from distributed_ranks import ROOT, run_worker_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

CASES = ["z2", "z3", "z2_bf16"]
STEPS = 3

WORKER = """
import sys
sys.path.insert(0, WORKERS)
import torch
import deepspeed
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
import deepspeed_worker as w

out, workdir = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
results = {}
for case in (c for c in w.CASES if c[0] in NAMES):
    model, engine, _ = w.build(w.config(*case[1:]))
    w.train(engine, w.batches(), range(STEPS))
    folder = f"{workdir}/{case[0]}"
    engine.save_checkpoint(folder, tag="t")
    masters = w.full_params(engine, model)
    torch.distributed.barrier()
    if w.rank() == 0:
        consolidated = get_fp32_state_dict_from_zero_checkpoint(folder, tag="t")
        results[case[0]] = {
            "optimizer": type(engine.basic_optimizer).__name__,
            "masters": masters,
            "zero_to_fp32": {k: v.float().clone() for k, v in consolidated.items()},
        }
    torch.distributed.barrier()
if w.rank() == 0:
    torch.save(results, out)
torch.distributed.barrier()
"""


def test_zero_to_fp32_recovers_the_fp32_master_weights(tmp_path):
    script = tmp_path / "zero_to_fp32_worker.py"
    source = textwrap.dedent(WORKER)
    source = source.replace("WORKERS", repr(str(ROOT / "tests" / "distributed_workers")))
    source = source.replace("NAMES", repr(CASES)).replace("STEPS", str(STEPS))
    script.write_text(source)
    out = tmp_path / "results.pt"
    results = run_worker_ranks(2, script, [str(out), str(tmp_path / "checkpoints")], tmp_path, "zero_to_fp32", out)
    assert sorted(results) == sorted(CASES)
    for case, result in results.items():
        assert result["optimizer"] == "AdamW8bit", case
        masters, consolidated = result["masters"], result["zero_to_fp32"]
        assert sorted(consolidated) == sorted(masters), case
        for name, weight in masters.items():
            assert consolidated[name].shape == weight.shape, (case, name)
            assert torch.equal(consolidated[name], weight), (case, name)
