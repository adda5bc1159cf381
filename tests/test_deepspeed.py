"""DeepSpeed integration: dist8bit optimizers named in a DeepSpeed config, ZeRO 0-3, fp32 and bf16.

The distributed part launches tests/distributed_workers/deepspeed_worker.py as 1, 2
and 3 CPU processes (gloo, DS_ACCELERATOR=cpu), each running every configuration
in one process: 20 steps of a small model (StableEmbedding + two Linear layers)
with AdamW8bit and a WarmupLR scheduler from the config, a checkpoint at step 10
and a resumed engine that repeats steps 10-20. The workers use the plain-PyTorch
reference kernels (kernel parity is tested elsewhere) and skip DeepSpeed's
shared-memory CPU all-reduce op (a C++ build of its own collectives).

Tolerance for "2 ranks match 1 rank": twice the 8-bit vs 32-bit parameter gap of
the same 1-rank run (AdamW8bit vs AdamW32bit, same data). Measured on this
machine (20 steps, lr 3e-3): 8-bit vs 32-bit max 3.45e-3, mean 1.9e-4; 2 ranks
vs 1 rank under ZeRO 1/2/3 max 3.5e-3 to 3.6e-3, mean 1.3e-4 (fp32), up to 5.3e-3
/ 1.9e-4 with bf16. Under ZeRO a parameter's piece on rank 1 starts its
quantization blocks at its own first element, so the 8-bit rounding differs from
the 1-rank run by the same kind of error as 8-bit vs 32-bit; without ZeRO
(stage 0) the runs agree to 2e-8 on average (float order of the gradient reduction).
"""

from __future__ import annotations

import importlib.util
import itertools
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
from dist8bit.integrations import deepspeed_patches, patching, zero_partition
from dist8bit.integrations.deepspeed_config import DeepSpeedConfigError, check_params, resolve
from dist8bit.integrations.deepspeed_segments import DeepSpeedLayoutError, zero3_segments

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_workers" / "deepspeed_worker.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install -e .[deepspeed])")

CASES = ["z0", "z1", "z2", "z3", "z2_bf16", "z1_bf16_fp32acc", "z3_bf16", "z0_bf16", "z2_4bit", "z1_4bit", "z3_4bit"]
EXPECTED_8BIT = {
    "emb.weight": 32,  # StableEmbedding: 32-bit state although it has 4800 >= 4096 elements
    "emb.norm.weight": 32,
    "emb.norm.bias": 32,
    "fc1.weight": 8,
    "fc1.bias": 32,
    "fc2.weight": 8,  # its piece on rank 0 under ZeRO 1/2 has 486 < 4096 elements: still 8-bit
    "fc2.bias": 32,
}
EXPECTED_4BIT = {name: 4 if bits == 8 else 32 for name, bits in EXPECTED_8BIT.items()}  # AdamW4bit: same rules


def expected_bits(case: str) -> dict[str, int]:
    return EXPECTED_4BIT if case.endswith("4bit") else EXPECTED_8BIT


SHAPES = {
    "emb.weight": (100, 48),
    "emb.norm.weight": (48,),
    "emb.norm.bias": (48,),
    "fc1.weight": (111, 48),
    "fc1.bias": (111,),
    "fc2.weight": (100, 111),
    "fc2.bias": (100,),
}
NUMEL = {name: torch.Size(shape).numel() for name, shape in SHAPES.items()}
STEPS, SAVE_AT, LR, WARMUP = 20, 10, 3e-3, 5
# Cosine similarity of the 2-rank and the 1-rank full state after 20 steps, whose blocks differ where
# the partition cuts fc2.weight: 8-bit measured >= 0.9996; 4-bit, with 16 values per map, >= 0.92.
SIMILARITY = {False: 0.995, True: 0.9}


# ------------------------------------------------------------- config rules
def deepspeed_knows(name: str) -> bool:
    """What DeepSpeed 0.19 resolves by itself (its lower-cased names and torch.optim)."""
    return name in ("adam", "adamw", "lamb", "lion", "adagrad") or hasattr(torch.optim, name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("AdamW8bit", optim.AdamW8bit),
        ("adam8bit", optim.Adam8bit),
        ("Lion8bit", optim.Lion8bit),
        ("AdEMAMix8bit", optim.AdEMAMix8bit),
        ("AdamW32bit", optim.AdamW32bit),
        ("AdamW4bit", optim.AdamW4bit),
        ("pagedadam4bit", optim.PagedAdam4bit),
        ("PagedAdamW8bit", optim.PagedAdamW8bit),
        ("AdEMAMix", optim.AdEMAMix),  # DeepSpeed has no AdEMAMix: ours
        ("dist8bit.AdamW", optim.AdamW),
        ("adamw", None),  # DeepSpeed's own names stay DeepSpeed's
        ("lamb", None),
        ("SGD", None),  # torch.optim's
    ],
)
def test_config_type_resolution(name, expected):
    assert resolve(name, deepspeed_knows) is expected


@pytest.mark.parametrize("name", ["AdamW8bitt", "Adamw9bit8bit", "Foo32bit", "PagedSomething", "dist8bit.Nope"])
def test_config_type_that_looks_like_ours_is_a_clear_error(name):
    with pytest.raises(DeepSpeedConfigError, match=r"Known dist8bit optimizers: .*AdamW8bit"):
        resolve(name, deepspeed_knows)


def test_config_type_typo_suggests_the_name():
    with pytest.raises(DeepSpeedConfigError, match="Did you mean 'AdamW8bit'"):
        resolve("AdamW8bitt", deepspeed_knows)


def test_config_params_unknown_key_names_key_and_accepted_arguments():
    with pytest.raises(DeepSpeedConfigError, match=r"'foo'.*AdamW8bit accepts: lr, betas, eps, weight_decay"):
        check_params(optim.AdamW8bit, {"lr": 1e-3, "foo": 1})
    with pytest.raises(DeepSpeedConfigError, match="optim_bits is fixed by the name AdamW8bit"):
        check_params(optim.AdamW8bit, {"optim_bits": 32})
    with pytest.raises(DeepSpeedConfigError, match="gradient_clipping"):
        check_params(optim.AdamW8bit, {"max_grad_norm": 1.0})
    assert check_params(optim.AdamW8bit, {"lr": 1e-3, "betas": [0.9, 0.95], "min_8bit_size": 16}) == {
        "lr": 1e-3,
        "betas": [0.9, 0.95],
        "min_8bit_size": 16,
    }


def test_version_pin(monkeypatch):
    monkeypatch.delenv(integration.ALLOW_UNTESTED_ENV, raising=False)
    integration.check_version("0.19.8")
    integration.check_version("0.19.0")
    with pytest.raises(integration.DeepSpeedVersionError, match=r"0\.19\.x \(tested on 0\.19\.8\).*0\.20\.1 is installed"):
        integration.check_version("0.20.1")
    monkeypatch.setenv(integration.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="0.18.3 is installed"):
        integration.check_version("0.18.3")


# ------------------------------------------------------------ ZeRO-3 layout
def zero3_param(numel: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(ds_numel=numel, ds_tensor=SimpleNamespace(ds_numel=-(-numel // world)))


def test_zero3_segments_skip_tail_padding():
    params = [zero3_param(10, 3), zero3_param(1, 3), zero3_param(7, 3)]  # partitions of 4, 1, 3 elements
    by_rank = {rank: zero3_segments(params, lambda p, r=rank: r, 8) for rank in range(3)}
    spans = {rank: [(s.start, s.length, s.param_offset) for s in segments] for rank, segments in by_rank.items()}
    assert spans[0] == [(0, 4, 0), (4, 1, 0), (5, 3, 0)]
    assert spans[1] == [(0, 4, 4), (5, 3, 3)]  # the 1-element parameter has nothing on rank 1
    assert spans[2] == [(0, 2, 8), (5, 1, 6)]  # tails: 2 of 4 and 1 of 3 elements are real
    assert all(s.source is params[i] for i, s in zip((0, 2), by_rank[2], strict=True))
    with pytest.raises(DeepSpeedLayoutError, match="add up to 8 elements but its flat buffer has 9"):
        zero3_segments(params, lambda p: 0, 9)


# -------------------------------------------- partition formulas vs DeepSpeed
PARTITION_CASES = [[4800, 5328, 111], [1], [7, 3, 1000, 2], [4096, 1, 4095, 33]]


@needs_deepspeed
@pytest.mark.parametrize("numels", PARTITION_CASES, ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zero12_spans_are_deepspeeds_fragment_mapping(numels, world):
    """DeepSpeed's own code pads the group (align_dense_tensors), sizes the partitions as
    _link_all_hp_params does and maps each parameter's fragment (link_hp_params)."""
    from deepspeed.runtime.utils import align_dense_tensors
    from deepspeed.utils.mixed_precision_linkage import link_hp_params

    deepspeed_alignment = 2  # DeepSpeedZeroOptimizer.nccl_start_alignment_factor in 0.19
    assert deepspeed_alignment == zero_partition.ALIGNMENT_FACTOR
    lps = [torch.zeros(n) for n in numels]
    padded = sum(t.numel() for t in align_dense_tensors(lps, deepspeed_alignment * world))
    partition = padded // world
    assert zero_partition.zero12_partition_numel(numels, world) == partition
    for rank in range(world):
        link_hp_params(lps, torch.zeros(partition), {}, {}, False, 0, rank * partition, partition, None)
        expected = [
            (
                i,
                lp._hp_mapping.hp_fragment_address.start,
                lp._hp_mapping.hp_fragment_address.numel,
                lp._hp_mapping.lp_fragment_address.start,
            )
            for i, lp in enumerate(lps)
            if lp._hp_mapping is not None
        ]
        got = [(s.index, s.start, s.length, s.param_offset) for s in zero_partition.zero12_spans(numels, world, rank)]
        assert got == expected, (numels, world, rank)


@needs_deepspeed
@pytest.mark.parametrize("numels", PARTITION_CASES, ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zero3_partitions_and_sub_groups_are_deepspeeds(numels, world):
    """Partition sizes from DeepSpeed's Init._aligned_size, sub-groups from its
    _create_fp16_sub_groups; each rank's slice is [rank * size, ...) cut at the parameter's end
    (Init._partition_param copies `ds_numel - start` elements into the last partition)."""
    from deepspeed.runtime.zero.partition_parameters import Init
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    class Partitioner:
        _aligned_size, _padding_size = Init._aligned_size, Init._padding_size

        def _partition_world_size(self, param):
            return world

    params = [SimpleNamespace(ds_numel=n) for n in numels]
    sizes = [Init._aligned_size(Partitioner(), p) // world for p in params]
    assert [zero_partition.zero3_partition_numel(n, world) for n in numels] == sizes
    for rank in range(world):
        spans, flat = zero_partition.zero3_spans(numels, sizes, [rank] * len(numels))
        assert flat == sum(sizes)
        starts = [rank * size for size in sizes]
        expected = [
            (i, min(size, n - start)) for i, (n, size, start) in enumerate(zip(numels, sizes, starts, strict=True)) if start < n
        ]
        assert [(s.index, s.length) for s in spans] == expected
        assert all(s.param_offset == starts[s.index] and s.start == sum(sizes[: s.index]) for s in spans)
    for sub_group_size in (1, 5, 1000, 10**9):
        items = [SimpleNamespace(partition_numel=lambda size=size: size) for size in sizes]
        stage3 = SimpleNamespace(sub_group_size=sub_group_size)
        theirs = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(stage3, items)
        ours = zero_partition.zero3_sub_groups(sizes, sub_group_size)
        assert [[items.index(x) for x in group] for group in theirs] == [list(r) for r in ours]


# ------------------------------------------------------ patch signatures
def test_wrap_forwards_args_and_names_them():
    def original(self, first, second=2, *, flag=False):
        return (self, first, second, flag)

    seen = []
    wrapped = patching.wrap(original, lambda call: seen.append(call) or call.proceed())
    assert wrapped("s", 1, flag=True) == ("s", 1, 2, True)
    call = seen[0]
    assert call.args == ("s", 1) and call.kwargs == {"flag": True}
    assert call["first"] == 1 and call["second"] == 2 and call["flag"] is True
    assert getattr(wrapped, patching.ORIGINAL) is original
    assert patching.signature_of(wrapped) == "(self, first, second=2, *, flag=False)"


@needs_deepspeed
def test_recorded_signatures_match_the_installed_deepspeed():
    assert deepspeed_patches.missing_targets() == []
    assert deepspeed_patches.signature_mismatches() == []
    assert len({p.path for p in deepspeed_patches.PATCHES}) == len(deepspeed_patches.PATCHES) >= 16


@needs_deepspeed
def test_changed_signature_is_refused_naming_the_function(monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    for entry in deepspeed_patches.PATCHES:  # start unpatched; monkeypatch restores whatever was there
        owner, name = deepspeed_patches.PATCHES.owner_and_name(entry)
        current = getattr(owner, name)
        monkeypatch.setattr(owner, name, getattr(current, patching.ORIGINAL, current))

    def changed(self, optimizer, extra_argument=None):  # what a new DeepSpeed might look like
        return optimizer

    monkeypatch.setattr(DeepSpeedEngine, "_configure_zero_optimizer", changed)
    with pytest.raises(deepspeed_patches.DeepSpeedSignatureError) as raised:
        deepspeed_patches.apply()
    message = str(raised.value)
    assert "runtime.engine:DeepSpeedEngine._configure_zero_optimizer" in message
    assert "recorded (self, optimizer), found (self, optimizer, extra_argument=None)" in message
    assert f"pip install deepspeed=={integration.TESTED_VERSION}" in message
    assert isinstance(raised.value, integration.DeepSpeedVersionError)  # the import hook warns instead of breaking
    for entry in deepspeed_patches.PATCHES:  # nothing was patched
        owner, name = deepspeed_patches.PATCHES.owner_and_name(entry)
        assert getattr(getattr(owner, name), patching.ORIGINAL, None) is None, entry.path


# ----------------------------------------------------------- registration
@needs_deepspeed
def test_import_dist8bit_does_not_import_deepspeed_and_registers_after():
    script = textwrap.dedent(
        """
        import importlib.util
        import sys
        import dist8bit
        assert "deepspeed" not in sys.modules
        from dist8bit.integrations import deepspeed as integration
        assert not integration.is_registered()
        assert importlib.util.find_spec("deepspeed") is not None  # an availability check must not disarm the hook
        assert "deepspeed" not in sys.modules
        import deepspeed
        assert integration.is_registered()
        from deepspeed.runtime.engine import DeepSpeedEngine
        patched = DeepSpeedEngine._configure_zero_optimizer
        integration.register()
        assert DeepSpeedEngine._configure_zero_optimizer is patched  # idempotent
        assert deepspeed.__spec__.loader.__class__.__name__ != "_CallbackLoader"
        assert not any(type(f).__name__ == "AfterImportFinder" for f in sys.meta_path)
        print("ok")
        """
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ------------------------------------------------------------ distributed
def launch(world: int, phase: str, folder: Path) -> dict:
    """Run the worker on `world` processes and return rank 0's results."""
    out = folder / f"{phase}_{world}.pt"
    return run_worker_ranks(world, WORKER, [phase, str(out), str(folder / "checkpoints")], folder, f"{phase}_{world}", out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    folder = tmp_path_factory.mktemp("deepspeed")
    one = launch(1, "train", folder)  # also saves the checkpoints the 2-rank run must refuse
    two = launch(2, "train", folder)
    three = launch(3, "precision", folder)
    return SimpleNamespace(one=one, two=two, three=three)


def gap(a: dict, b: dict) -> tuple[float, float]:
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    return diff.max().item(), diff.mean().item()


@needs_deepspeed
def test_workers_registered_without_untested_optimizer_flag(runs):
    assert runs.one["registered"] and runs.two["registered"] and runs.three["registered"]
    wrappers = {name: runs.two["cases"][name]["wrapper"] for name in CASES}
    assert wrappers["z0"] == "AdamW8bit"
    assert wrappers["z1"] == wrappers["z2"] == wrappers["z2_bf16"] == "DeepSpeedZeroOptimizer"
    assert wrappers["z3"] == wrappers["z3_bf16"] == "DeepSpeedZeroOptimizer_Stage3"
    assert wrappers["z1_bf16_fp32acc"] == "BF16_Optimizer"
    assert wrappers["z0_bf16"] == "FP16_UnfusedOptimizer"
    assert wrappers["z1_4bit"] == wrappers["z2_4bit"] == "DeepSpeedZeroOptimizer"
    assert wrappers["z3_4bit"] == "DeepSpeedZeroOptimizer_Stage3"
    assert {runs.two["cases"][name]["optimizer"] for name in ("z1_4bit", "z2_4bit", "z3_4bit")} == {"AdamW4bit"}


@needs_deepspeed
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_one_rank(runs, case):
    quantized = "z2_4bit" if case.endswith("4bit") else "z0"  # the same precision as the case
    gap_max, gap_mean = gap(runs.one["cases"][quantized]["params"], runs.one["cases"]["z0_32bit"]["params"])
    assert gap_max > 0  # quantized and 32-bit runs differ: the tolerance below is a measured one
    one, two = runs.one["cases"][case], runs.two["cases"][case]
    diff_max, diff_mean = gap(two["params"], one["params"])
    assert diff_max <= 2 * gap_max and diff_mean <= 2 * gap_mean, (
        f"{case}: 2 ranks vs 1 rank max {diff_max:.2e} mean {diff_mean:.2e}; quantized vs 32-bit max {gap_max:.2e} mean {gap_mean:.2e}"
    )
    assert one["losses"][-1] < one["losses"][0]


def covered(pieces: list, name: str) -> list[tuple[int, int]]:
    return sorted((offset, offset + length) for offset, length in ((p[1], p[2]) for p in pieces if p[0] == name))


@needs_deepspeed
@pytest.mark.parametrize("case", CASES)
def test_pieces_cover_each_parameter_once_with_one_precision(runs, case):
    """Each parameter's state is split over the ranks without gap or overlap (ZeRO), or held
    whole by every rank (stage 0), and its precision is the same everywhere: the one its
    full size and overrides decide, on 1, 2 and 3 ranks (8-bit or 4-bit by the optimizer)."""
    for result in (runs.one, runs.two):
        per_rank = result["cases"][case]["pieces"]
        groups = per_rank if case.startswith("z0") else [[p for rank in per_rank for p in rank]]
        for pieces in groups:
            for name, numel in NUMEL.items():
                spans = covered(pieces, name)
                assert spans[0][0] == 0 and spans[-1][1] == numel, (case, name, spans)
                assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), (case, name, spans)
            precision = {}
            for name, _, _, bits in pieces:
                assert precision.setdefault(name, bits) == bits, (case, name)
            assert precision == expected_bits(case), case
    if case in runs.three["precision"]:
        pieces = [p for rank in runs.three["precision"][case] for p in rank]
        assert {name: bits for name, _, _, bits in pieces} == expected_bits(case)
        assert all(covered(pieces, name)[-1][1] == numel for name, numel in NUMEL.items())
    if case in ("z1", "z2", "z2_4bit", "z1_4bit"):  # the partition boundary cuts fc2.weight after 486 elements on rank 0
        rank0 = [p for p in runs.two["cases"][case]["pieces"][0] if p[0] == "fc2.weight"]
        assert rank0 == [("fc2.weight", 0, 486, expected_bits(case)["fc2.weight"])]


@needs_deepspeed
def test_client_optimizer_gets_segments_too(runs):
    pieces = [p for rank in runs.two["client_optimizer_pieces"] for p in rank]
    assert {name: bits for name, _, _, bits in pieces} == EXPECTED_8BIT
    assert all(covered(pieces, name)[-1][1] == numel for name, numel in NUMEL.items())


def expected_bytes(pieces: list) -> int:
    """Two Adam states: 8-bit = 1 byte per element + one float32 scale per 256-element block;
    4-bit = 1 byte per 2 elements + one float32 scale per 128-element block; 32-bit = 4 bytes."""
    total = 0
    for _, _, length, bits in pieces:
        if bits == 8:
            total += 2 * (length + 4 * -(-length // 256))
        elif bits == 4:
            total += 2 * (-(-length // 2) + 4 * -(-length // 128))
        else:
            total += 2 * 4 * length
    return total


@needs_deepspeed
@pytest.mark.parametrize("case", CASES)
def test_state_bytes_per_rank(runs, case):
    single = runs.one["cases"][case]["state_bytes"][0]
    per_rank = runs.two["cases"][case]["state_bytes"]
    pieces = runs.two["cases"][case]["pieces"]
    if case.startswith("z0"):  # no partitioning: every rank holds everything
        assert per_rank == [single, single]
        return
    # ZeRO: the ranks share the state (a few more block scales where a parameter is cut).
    assert sum(per_rank) == pytest.approx(single, rel=0.01)
    for rank, count in enumerate(per_rank):
        # plus each piece's alignment padding: up to 15 bytes before its run in codes or values and 12 in absmax, per state
        padding = 2 * (15 + 12) * len(pieces[rank])
        assert count == pytest.approx(expected_bytes(pieces[rank]), rel=0.01, abs=padding), (case, rank)
    if case.startswith("z3"):  # every parameter is halved
        assert per_rank == [pytest.approx(single / 2, rel=0.02)] * 2
    elif not case.endswith("4bit"):  # ZeRO 1/2 halve the elements; the 32-bit embedding (8 bytes/element) sits on rank 0
        assert max(per_rank) < 0.75 * single


@needs_deepspeed
def test_lr_scheduler_from_config_drives_the_optimizer(runs):
    expected = [LR * min(step, WARMUP) / WARMUP for step in range(STEPS)]  # WarmupLR, linear
    for result in (runs.one, runs.two):
        for case in CASES:
            lrs = result["cases"][case]["lrs"]
            assert [engine_lr for engine_lr, _ in lrs] == pytest.approx(expected), case
            assert all(engine_lr == optimizer_lr for engine_lr, optimizer_lr in lrs), case


@needs_deepspeed
@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trip_continues_identically(runs, case):
    for result in (runs.one, runs.two):
        run = result["cases"][case]
        assert run["loaded_state_equal"], f"{case}: optimizer state after load_checkpoint differs from the saved one"
        assert run["resumed_losses"] == run["losses"][SAVE_AT:], case
        for name, value in run["params"].items():
            assert torch.equal(run["resumed_params"][name], value), (case, name)


@needs_deepspeed
@pytest.mark.parametrize("case", CASES)
def test_full_optimizer_state(runs, case):
    two, one = runs.two["cases"][case], runs.one["cases"][case]
    assert two["full_state_exact"], f"{case}: gathered state differs from a rank's own pieces"
    for name, states in two["full_state"].items():
        for key, value in states.items():
            assert value.shape == SHAPES[name]
            similarity = torch.nn.functional.cosine_similarity(value.flatten(), one["full_state"][name][key].flatten(), dim=0)
            assert similarity > SIMILARITY[case.endswith("4bit")], (case, name, key, similarity.item())
        deepspeed_value = two["deepspeed_full_exp_avg"][name]
        if case.startswith("z0"):
            assert deepspeed_value is None  # DeepSpeed keeps no fragments without ZeRO
        else:  # DeepSpeed's safe_get_full_optimizer_state reads dist8bit's state
            assert torch.equal(deepspeed_value, states["exp_avg"]), (case, name)
    if not case.startswith("z0"):  # writing packed state through DeepSpeed's fragment API is refused
        kind, message = two["set_state"]
        assert kind == "NotImplementedError" and "get_full_optimizer_state" in message


@needs_deepspeed
def test_clear_errors(runs):
    errors = runs.one["errors"]
    kind, message = errors["unknown_name"]
    assert kind == "DeepSpeedConfigError" and "'AdamW8bitt'" in message and "Did you mean 'AdamW8bit'" in message
    kind, message = errors["unknown_key"]
    assert kind == "DeepSpeedConfigError" and "'foo_bar'" in message and "AdamW8bit accepts: lr" in message
    kind, message = errors["elastic"]
    assert kind == "DeepSpeedCheckpointError" and "elastic_checkpoint" in message
    assert errors["torch_name_untouched"] == "torch.optim.sgd.SGD"
    assert "zero_allow_untested_optimizer" in errors["torch_name_under_zero"][1]
    kind, message = runs.two["world_size_mismatch"]
    assert kind == "DeepSpeedCheckpointError"
    assert "world size 1, this run has 2" in message and "--world-size 2" in message and "dist8bit convert" in message
