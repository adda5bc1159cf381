"""Configurations the DeepSpeed integration refuses, and how it tells the user.

Each refusal is triggered on a real 1-rank DeepSpeed engine on the CPU (gloo,
reference kernels), all in one worker process (tests/distributed_workers/
deepspeed_refusals_worker.py, about 12 s), and the test checks the exception type
and that the message names the offending setting and the way out. Controls run
the same call without the refused setting and must go through, so a refusal that
fired on everything would fail them. The import hook's version warning runs in a
subprocess, since registration happens once per interpreter.

Covered elsewhere: elastic_checkpoint=true in the config and resuming on another
world size (test_deepspeed.py::test_clear_errors), a changed DeepSpeed signature
(test_deepspeed.py::test_changed_signature_is_refused_naming_the_function).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from distributed_ranks import run_worker_ranks

from dist8bit import optim
from dist8bit.integrations import deepspeed as integration
from dist8bit.integrations import deepspeed_segments

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_workers" / "deepspeed_refusals_worker.py"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e .[deepspeed])"
)
READ_INSTEAD = "dist8bit.integrations.deepspeed.get_full_optimizer_state"


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, tuple[str, str]]:
    folder = tmp_path_factory.mktemp("deepspeed_refusals")
    out = folder / "refusals.pt"
    return run_worker_ranks(1, WORKER, [str(out), str(folder)], folder, "refusals", out)


# (case, exception type, fragments the message must contain: the setting, then the fix)
REFUSALS = [
    ("partial_offload", "DeepSpeedLayoutError", ["offload_optimizer.ratio < 1", "offload the whole optimizer to the CPU"]),
    ("nvme_offload", "DeepSpeedLayoutError", ["offload_optimizer.device=nvme", "offload the whole optimizer to the CPU"]),
    ("super_offload", "NotImplementedError", ["SuperOffload", "use them without dist8bit"]),
    ("zenflow", "NotImplementedError", ["ZenFlow", "use them without dist8bit"]),
    ("z3_get_local_state", "NotImplementedError", ["local optimizer-state partition by key", READ_INSTEAD]),
    ("z3_set_local_state", "NotImplementedError", ["setting optimizer state through DeepSpeed's fragment API", READ_INSTEAD]),
    ("z3_set_full_state", "NotImplementedError", ["setting optimizer state through DeepSpeed's fragment API", READ_INSTEAD]),
    ("z2_set_full_state", "NotImplementedError", ["setting optimizer state through DeepSpeed's fragment API", READ_INSTEAD]),
    (
        "universal_load",
        "DeepSpeedCheckpointError",
        ["checkpoint.load_universal=true", "Set load_universal to false", "dist8bit convert", "--world-size 1"],
    ),
    ("elastic_load", "DeepSpeedCheckpointError", ["elastic_checkpoint=true", "load only the rigid ZeRO checkpoints"]),
    ("padding_load", "DeepSpeedCheckpointError", ["alignment padding", "keep zero_optimization.parameter_alignment"]),
]


@pytest.mark.parametrize(("case", "kind", "fragments"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal_names_setting_and_fix(refused, case, kind, fragments):
    got_kind, message = refused[case]
    assert got_kind == kind, f"{case}: expected {kind}, got {got_kind}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


@pytest.mark.parametrize("case", ["whole_cpu_offload", "z3_get_local_fp32_param", "rigid_load"])
def test_controls_go_through(refused, case):
    """Whole-optimizer CPU offload, reading local weights (no state key) and loading a
    rigid dist8bit checkpoint are allowed: the refusals above are specific."""
    assert refused[case] == ("no error", "")


def test_zero3_offload_backstop_refuses_a_built_optimizer():
    """Should a ZeRO-3 optimizer reach the segment layout with NVMe swapping or a partial-offload
    backup optimizer (the config check bypassed), the layout refuses it too."""
    optimizer = optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4))])
    for zero in (SimpleNamespace(swap_optimizer=True), SimpleNamespace(swap_optimizer=False, backup_optimizer=object())):
        with pytest.raises(deepspeed_segments.DeepSpeedLayoutError, match=r"offload_optimizer\.ratio < 1"):
            deepspeed_segments.attach_zero3(optimizer, zero)


# ------------------------------------------------------------- import hook
# A finder placed behind dist8bit's import hook that makes the DeepSpeed being
# imported report another version, as an installed 0.20 would.
HOOK_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings
    import dist8bit
    from dist8bit.integrations import deepspeed as integration

    class Loader(importlib.abc.Loader):
        def __init__(self, real):
            self.real = real
        def create_module(self, spec):
            return self.real.create_module(spec)
        def exec_module(self, module):
            self.real.exec_module(module)
            module.__version__ = VERSION

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "deepspeed":
                return None
            for finder in sys.meta_path[2:]:
                spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
                if spec is not None:
                    spec.loader = Loader(spec.loader)
                    return spec

    sys.meta_path.insert(1, Finder())  # behind dist8bit's AfterImportFinder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import deepspeed
    try:
        integration.register()
        direct = "no error"
    except integration.DeepSpeedVersionError as error:
        direct = str(error)
    print(json.dumps({
        "version": deepspeed.__version__,
        "warnings": [str(w.message) for w in caught if "dist8bit" in str(w.message)],
        "registered": integration.is_registered(),
        "direct": direct,
    }))
    """
)


def run_hook(version: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop(integration.ALLOW_UNTESTED_ENV, None)
    script = f"VERSION = {version!r}\n" + HOOK_SCRIPT
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_hook_warns_on_untested_deepspeed_and_does_not_break_the_import():
    result = run_hook("0.20.1")
    assert result["version"] == "0.20.1"  # the import itself went through
    assert not result["registered"]
    assert len(result["warnings"]) == 1, result["warnings"]
    warning = result["warnings"][0]
    assert warning.startswith("dist8bit did not register with DeepSpeed")
    for fragment in ("0.19.x", f"tested on {integration.TESTED_VERSION}", "DeepSpeed 0.20.1 is installed"):
        assert fragment in warning, warning
    assert f"pip install deepspeed=={integration.TESTED_VERSION}" in warning
    assert integration.ALLOW_UNTESTED_ENV in warning
    assert "0.20.1 is installed" in result["direct"]  # an explicit register() raises instead


def test_import_hook_registers_silently_on_the_tested_series():
    """Control: the same harness reporting a 0.19 version registers, without a warning."""
    result = run_hook("0.19.3")
    assert result == {"version": "0.19.3", "warnings": [], "registered": True, "direct": "no error"}
