"""CPUOffloadOptimizer: on CPU the copies degenerate but hooks, host step and state dicts run.

Oracles: plain dist8bit AdamW8bit on the same model (fp32, bit for bit), and
for bf16 parameters an fp32 master model stepped by AdamW8bit with the bf16
gradients and rounded back to bf16 (also bit for bit).
"""

from __future__ import annotations

import copy
import threading
import time
import traceback

import pytest
import torch

import dist8bit
from dist8bit.offload import CPUOffloadOptimizer
from dist8bit.offload.overlap import Buckets

STEPS = 10
KWARGS = {"lr": 1e-2, "weight_decay": 0.1, "min_8bit_size": 256}


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 32, generator=generator).to(dtype)


def backward(model: torch.nn.Module, step: int, dtype: torch.dtype = torch.float32) -> None:
    model(batch(step, dtype)).float().square().mean().backward()


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, dtype=torch.float32) -> None:
    for step in steps:
        backward(model, step, dtype)
        optimizer.step()
        optimizer.zero_grad()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def test_fp32_matches_plain_adamw8bit_bit_for_bit():
    model, reference = tiny_model(), tiny_model()
    offload = CPUOffloadOptimizer(model.parameters(), dist8bit.optim.AdamW8bit, **KWARGS)
    plain = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    train(model, offload, range(STEPS))
    train(reference, plain, range(STEPS))
    assert not torch.equal(flat(model), flat(tiny_model())), "the optimizer must have moved the parameters"
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)
    assert any(k.endswith("_codes") for k in next(iter(offload.state.values()))), "states must be 8-bit"


def test_bf16_params_keep_fp32_master_on_host():
    model = tiny_model(torch.bfloat16)
    masters = [p.detach().float().clone() for p in model.parameters()]
    offload = CPUOffloadOptimizer(model.parameters(), dist8bit.optim.AdamW8bit, **KWARGS)
    reference = dist8bit.optim.AdamW8bit(masters, **KWARGS)
    for step in range(STEPS):
        backward(model, step, torch.bfloat16)
        for master, param in zip(masters, model.parameters(), strict=True):
            master.grad = param.grad.float()
        reference.step()
        offload.step()
        offload.zero_grad()
        for master, param in zip(masters, model.parameters(), strict=True):
            torch.testing.assert_close(param.detach(), master.to(torch.bfloat16), rtol=0, atol=0)
    host = [offload.inner.param_groups[0]["params"][i] for i in range(len(masters))]
    for master, mirror in zip(masters, host, strict=True):
        assert mirror.dtype == torch.float32
        torch.testing.assert_close(mirror, master, rtol=1e-6, atol=1e-6)  # bf16 grads vs fp32 grads in the kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_exactly(dtype):
    model = tiny_model(dtype)
    optimizer = CPUOffloadOptimizer(model.parameters(), **KWARGS)
    train(model, optimizer, range(4), dtype)
    saved_model, saved_optim = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, range(4, STEPS), dtype)

    resumed = tiny_model(dtype)
    resumed.load_state_dict(saved_model)
    resumed_optim = CPUOffloadOptimizer(resumed.parameters(), **KWARGS)
    resumed_optim.load_state_dict(saved_optim)
    train(resumed, resumed_optim, range(4, STEPS), dtype)
    torch.testing.assert_close(flat(resumed), flat(model), rtol=0, atol=0)


def test_state_dict_loads_into_plain_optimizer():
    model = tiny_model()
    optimizer = CPUOffloadOptimizer(model.parameters(), **KWARGS)
    train(model, optimizer, range(2))
    plain = dist8bit.optim.AdamW8bit(tiny_model().parameters(), **KWARGS)
    plain.load_state_dict(optimizer.state_dict())
    assert float(plain.state[next(iter(plain.state))]["step"]) == 2


def test_lr_scheduler_reaches_inner_optimizer():
    model, reference = tiny_model(), tiny_model()
    offload = CPUOffloadOptimizer(model.parameters(), **KWARGS)
    plain = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (offload, plain)]
    for step in range(6):
        for net, optimizer, schedule in zip((model, reference), (offload, plain), schedules, strict=True):
            backward(net, step)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    assert offload.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert offload.state_dict()["param_groups"][0]["lr"] == pytest.approx(1e-5)  # saved with the scheduled lr
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)


def test_hooks_copy_grads_and_zero_grad_clears_them():
    model = tiny_model(torch.bfloat16)
    optimizer = CPUOffloadOptimizer(model.parameters(), **KWARGS)
    backward(model, 0, torch.bfloat16)
    for param in model.parameters():
        torch.testing.assert_close(optimizer.host_grad(param), param.grad, rtol=0, atol=0)
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters()), "torch semantics: step keeps grads"
    optimizer.zero_grad()
    assert all(p.grad is None and optimizer.host_grad(p) is None for p in model.parameters())


def test_assigned_grads_without_hook_are_copied_at_step():
    model, reference = tiny_model(), tiny_model()
    offload = CPUOffloadOptimizer(model.parameters(), **KWARGS)
    plain = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    for step in range(3):
        backward(reference, step)
        for param, source in zip(model.parameters(), reference.parameters(), strict=True):
            param.grad = source.grad.clone()  # assigned: autograd's hook never fires
        offload.step()
        plain.step()
        offload.zero_grad()
        plain.zero_grad()
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)
    assert not torch.equal(flat(model), flat(tiny_model()))


def test_offload_gradients_frees_device_grads_at_copy():
    model, reference = tiny_model(), tiny_model()
    offload = CPUOffloadOptimizer(model.parameters(), offload_gradients=True, **KWARGS)
    plain = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    backward(model, 0)
    assert all(p.grad is None and offload.host_grad(p) is not None for p in model.parameters())
    offload.step()
    backward(reference, 0)
    plain.step()
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)


def test_rejects_non_dist8bit_optimizer_class():
    with pytest.raises(TypeError, match="dist8bit optimizer class"):
        CPUOffloadOptimizer(tiny_model().parameters(), torch.optim.AdamW, lr=1e-3)


def test_rejects_sparse_gradients():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    optimizer = CPUOffloadOptimizer(embedding.parameters(), **KWARGS)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        embedding(torch.tensor([1, 2])).sum().backward()
    assert optimizer.host_grad(embedding.weight) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_params_step_on_pinned_host_copies(dtype):
    model, reference = tiny_model(dtype).cuda(), tiny_model(dtype)
    offload = CPUOffloadOptimizer(model.parameters(), **KWARGS)
    cpu = CPUOffloadOptimizer(reference.parameters(), **KWARGS)
    for mirror in offload._mirrors.values():
        assert mirror.master.is_pinned() and mirror.master.dtype == torch.float32
    for step in range(STEPS):
        model(batch(step, dtype).cuda()).float().square().mean().backward()
        offload.step()
        offload.zero_grad()
        backward(reference, step, dtype)
        cpu.step()
        cpu.zero_grad()
    assert all(p.is_cuda for p in model.parameters())
    # The same host kernel steps both; only the GPU vs CPU forward/backward differs.
    torch.testing.assert_close(flat(model).cpu(), flat(reference), rtol=0.05, atol=0.02)


def fsdp_worker(rank: int, world: int, overlap: bool) -> dict:
    from helpers import tiny_model as fsdp_model
    from helpers import train as fsdp_train

    model = fsdp_model(fsdp=True)
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=1e-2, overlap_step=overlap, bucket_mb=0)
    threads: list[str] = []
    original = optimizer.inner.step_params

    def recording(params):
        threads.append(threading.current_thread().name)
        original(params)

    optimizer.inner.step_params = recording
    losses = fsdp_train(model, optimizer, range(5))
    return {
        "worker_steps": sum(name.startswith("dist8bit-offload-step") for name in threads),
        "params": {name: p.full_tensor().detach() for name, p in model.named_parameters()},
        "eight_bit": {
            name: "exp_avg_codes" in optimizer.state[optimizer._mirrors[p].master] for name, p in model.named_parameters()
        },
        "losses": losses,
    }


@pytest.mark.parametrize("overlap", [False, True])
def test_fsdp2_shards_step_on_host_like_one_unsharded_optimizer(overlap):
    """Every shard of the tiny model holds whole 256-value blocks, so the host steps of the two shards
    quantize the same blocks as one plain AdamW8bit over the unsharded model: equal to float rounding.
    With overlap_step the sharded parameters' hooks hand every shard to the worker thread."""
    from distributed_ranks import spawn_gloo
    from helpers import tiny_model as unsharded_model
    from helpers import train as unsharded_train

    sharded = spawn_gloo(fsdp_worker, 2, overlap)
    model = unsharded_model(fsdp=False)
    optimizer = dist8bit.optim.AdamW8bit(model.parameters(), lr=1e-2)
    losses = unsharded_train(model, optimizer, range(5))
    for name, param in model.named_parameters():
        # Precision follows min_8bit_size of the full parameter, not of the shard (scale: 4608 -> 2304 per rank).
        assert sharded["eight_bit"][name] == ("exp_avg_codes" in optimizer.state[param]), name
        torch.testing.assert_close(sharded["params"][name], param.detach(), rtol=0, atol=1e-5, msg=name)
    assert sharded["eight_bit"]["scale"]
    parameters = len(list(model.parameters()))
    assert sharded["worker_steps"] == (5 * parameters if overlap else 0), sharded["worker_steps"]
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)


# ------------------------------------------------------------ overlapped step
OVERLAP_STEPS = 6
BUCKETS_MB = [0.0, 0.004, 25.0]  # every parameter alone; ~4 KB (the 8 KB weight alone, the rest together); all in one


def states(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every state tensor, in parameter and key order (for a bit-exact comparison)."""
    saved = optimizer.state_dict()["state"]
    return [saved[index][key] for index in sorted(saved) for key in sorted(saved[index])]


def assert_same_training(model, optimizer, reference, reference_optimizer) -> None:
    assert not torch.equal(flat(model), flat(tiny_model(flat(model).dtype))), "the optimizer must have moved the parameters"
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)
    ours, theirs = states(optimizer), states(reference_optimizer)
    assert len(ours) == len(theirs) > 0
    for mine, other in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, other, rtol=0, atol=0)


def train_scheduled(model, optimizer, micro_batches: int = 1, steps: int = OVERLAP_STEPS, dtype=torch.float32) -> None:
    """Steps under a StepLR schedule; all but the last micro-batch's backward run inside accumulating()
    (a no-op context for a plain optimizer)."""
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for step in range(steps):
        for micro in range(micro_batches):
            last = micro == micro_batches - 1
            with optimizer.accumulating() if hasattr(optimizer, "accumulating") and not last else _nothing():
                backward(model, step * micro_batches + micro, dtype)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("bucket_mb", BUCKETS_MB)
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_overlapped_step_equals_step_at_step_and_plain_optimizer(bucket_mb, micro_batches):
    """Mixed 8/32-bit parameters (min_8bit_size=256: weights 8-bit, biases 32-bit), an LR schedule and,
    with 2 micro-batches, declared accumulation: three ways to step give the same bits."""
    runs = {}
    for name in ("overlapped", "at_step", "plain"):
        model = tiny_model()
        if name == "plain":
            optimizer = dist8bit.optim.AdamW8bit(model.parameters(), **KWARGS)
        else:
            optimizer = CPUOffloadOptimizer(model.parameters(), overlap_step=name == "overlapped", bucket_mb=bucket_mb, **KWARGS)
        train_scheduled(model, optimizer, micro_batches)
        runs[name] = (model, optimizer)
    assert {"exp_avg_codes" in v for v in runs["overlapped"][1].state.values()} == {True, False}, "8-bit and 32-bit states"
    assert_same_training(*runs["overlapped"], *runs["plain"])
    assert_same_training(*runs["at_step"], *runs["plain"])
    assert runs["overlapped"][1].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_overlapped_bf16_params_write_back_from_worker():
    model, reference = tiny_model(torch.bfloat16), tiny_model(torch.bfloat16)
    overlapped = CPUOffloadOptimizer(model.parameters(), overlap_step=True, bucket_mb=0, **KWARGS)
    at_step = CPUOffloadOptimizer(reference.parameters(), **KWARGS)
    train_scheduled(model, overlapped, dtype=torch.bfloat16)
    train_scheduled(reference, at_step, dtype=torch.bfloat16)
    assert_same_training(model, overlapped, reference, at_step)
    for ours, theirs in zip(overlapped._mirrors.values(), at_step._mirrors.values(), strict=True):
        torch.testing.assert_close(ours.master, theirs.master, rtol=0, atol=0)


def test_host_steps_run_on_the_worker_during_backward():
    """With one parameter per bucket every bucket is handed over by the hooks: the host steps run on the
    worker thread before step() is called (waited for here with a deadline, not a sleep)."""
    model = tiny_model()
    optimizer = CPUOffloadOptimizer(model.parameters(), overlap_step=True, bucket_mb=0, **KWARGS)
    calls: list[tuple[str, int]] = []
    original = optimizer.inner.step_params

    def recording(params):
        params = list(params)
        calls.append((threading.current_thread().name, len(params)))
        original(params)

    optimizer.inner.step_params = recording
    before = flat(model)
    backward(model, 0)
    deadline = time.monotonic() + 30
    while len(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [count for _, count in calls] == [1, 1, 1, 1], calls
    assert all(name.startswith("dist8bit-offload-step") for name, _ in calls), calls
    optimizer.step()
    assert len(calls) == 4, "step() must not step the parameters again"
    assert not torch.equal(flat(model), before)


def test_undeclared_accumulation_is_refused_at_the_second_backward():
    model = tiny_model()
    optimizer = CPUOffloadOptimizer(model.parameters(), overlap_step=True, bucket_mb=0, **KWARGS)
    backward(model, 0)
    assert all(mirror.submitted for mirror in optimizer._mirrors.values()), "the first backward handed every parameter over"
    with pytest.raises(RuntimeError, match="accumulating"):
        backward(model, 1)


def test_accumulating_keeps_offloaded_gradients_on_device():
    """offload_gradients=True frees each gradient when copied; inside accumulating() nothing is copied or freed."""
    model, reference = tiny_model(), tiny_model()
    offload = CPUOffloadOptimizer(model.parameters(), offload_gradients=True, overlap_step=True, bucket_mb=0, **KWARGS)
    plain = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    with offload.accumulating():
        backward(model, 0)
    assert all(p.grad is not None and offload.host_grad(p) is None for p in model.parameters())
    train_scheduled(model, offload, micro_batches=2)
    backward(reference, 0)
    train_scheduled(reference, plain, micro_batches=2)
    assert_same_training(model, offload, reference, plain)


def test_overlapped_step_covers_assigned_gradients_at_step():
    """A parameter outside the graph gets its gradient assigned (no hook fires): step() steps it on the main thread."""
    runs = []
    for overlap in (True, False):
        model = tiny_model()
        extra = torch.nn.Parameter(torch.linspace(-1, 1, 300))  # >= min_8bit_size: 8-bit state
        params = [*model.parameters(), extra]
        optimizer = (
            CPUOffloadOptimizer(params, overlap_step=True, bucket_mb=0, **KWARGS)
            if overlap
            else dist8bit.optim.AdamW8bit(params, **KWARGS)
        )
        for step in range(4):
            backward(model, step)
            extra.grad = torch.full_like(extra, 0.1 * (step + 1))
            optimizer.step()
            optimizer.zero_grad()
        runs.append((torch.cat([flat(model), extra.detach()]), states(optimizer)))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for ours, theirs in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [(dist8bit.optim.AdamW8bit, {"percentile_clipping": 5}), (dist8bit.optim.LAMB8bit, {}), (dist8bit.optim.Lion8bit, {})],
)
def test_per_parameter_scales_overlap_exactly(optimizer_class, options):
    """Percentile clipping and trust ratios are per parameter: stepping buckets changes nothing."""
    kwargs = {**KWARGS, "lr": 1e-3, **options}
    model, reference = tiny_model(), tiny_model()
    overlapped = CPUOffloadOptimizer(model.parameters(), optimizer_class, overlap_step=True, bucket_mb=0, **kwargs)
    assert overlapped.overlap_step
    plain = optimizer_class(reference.parameters(), **kwargs)
    train_scheduled(model, overlapped)
    train_scheduled(reference, plain)
    assert_same_training(model, overlapped, reference, plain)


class _GlobalScaleAdamW(dist8bit.optim.AdamW8bit):
    """An update_scale from outside dist8bit: it could mix parameters' statistics."""

    def update_scale(self, config, norms, step, bits):
        return None


def test_optimizer_with_foreign_update_scale_falls_back_to_step_at_step():
    with pytest.warns(RuntimeWarning, match="update_scale"):
        optimizer = CPUOffloadOptimizer(tiny_model().parameters(), _GlobalScaleAdamW, overlap_step=True, **KWARGS)
    assert not optimizer.overlap_step


def test_hyper_parameters_are_those_at_backward_time():
    """Changing lr between backward and step() (a scheduler stepped too early) warns; the step used the old lr,
    which is the value a non-overlapped step with a scheduler stepped after step() uses too."""
    model, reference = tiny_model(), tiny_model()
    overlapped = CPUOffloadOptimizer(model.parameters(), overlap_step=True, bucket_mb=0, **KWARGS)
    plain = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    backward(model, 0)
    overlapped.param_groups[0]["lr"] = 123.0
    with pytest.warns(RuntimeWarning, match="backward time"):
        overlapped.step()
    backward(reference, 0)
    plain.step()
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)


def test_worker_error_surfaces_at_step_with_its_traceback():
    model = tiny_model()
    optimizer = CPUOffloadOptimizer(model.parameters(), overlap_step=True, bucket_mb=0, **KWARGS)
    original = optimizer.inner.step_params

    def planted_failure(params):
        raise ValueError("planted host-step failure")

    optimizer.inner.step_params = planted_failure
    backward(model, 0)  # the hooks only queue work: the failure waits for step()
    with pytest.raises(ValueError, match="planted host-step failure") as raised:
        optimizer.step()
    frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert "planted_failure" in frames and "_host_step" in frames, frames
    optimizer.inner.step_params = original  # the optimizer is usable again
    optimizer.zero_grad()
    before = flat(model)
    backward(model, 1)
    optimizer.step()
    assert not torch.equal(flat(model), before)


def test_zero_grad_before_step_warns_that_the_host_step_already_ran():
    model = tiny_model()
    optimizer = CPUOffloadOptimizer(model.parameters(), overlap_step=True, bucket_mb=0, **KWARGS)
    backward(model, 0)
    with pytest.warns(RuntimeWarning, match=r"already ran for 4 parameter"):
        optimizer.zero_grad()
    backward(model, 1)  # a fresh iteration: not refused as undeclared accumulation
    optimizer.step()


def test_step_params_steps_a_subset_like_a_full_step():
    model, reference = tiny_model(), tiny_model()
    subsets = dist8bit.optim.AdamW8bit(model.parameters(), **KWARGS)
    full = dist8bit.optim.AdamW8bit(reference.parameters(), **KWARGS)
    params = list(model.parameters())
    for step in range(3):
        backward(model, step)
        backward(reference, step)
        subsets.step_params(params[2:])
        if step == 0:  # the other half has not moved yet
            torch.testing.assert_close(flat(model)[: params[0].numel()], flat(tiny_model())[: params[0].numel()], rtol=0, atol=0)
        subsets.step_params(params[:2])
        full.step()
        subsets.zero_grad()
        full.zero_grad()
    assert_same_training(model, subsets, reference, full)
    with pytest.raises(ValueError, match="no param group"):
        subsets.step_params([torch.zeros(3, requires_grad=True)])


def test_buckets_fill_to_capacity_in_order():
    buckets = Buckets(100)
    assert buckets.add("a", 60) is None
    assert buckets.add("b", 40) == ["a", "b"]
    assert buckets.add("c", 10) is None
    assert buckets.flush() == ["c"] and buckets.flush() is None
    assert Buckets(0).add("x", 4) == ["x"]
    with pytest.raises(ValueError):
        Buckets(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_overlapped_step_equals_step_at_step(dtype):
    """Side-stream gradient copies, host steps on the worker while backward runs, write-back on its own stream
    ordered before the next forward: the same bits as stepping everything at step()."""
    runs = []
    for overlap in (True, False):
        model = tiny_model(dtype).cuda()
        optimizer = CPUOffloadOptimizer(model.parameters(), overlap_step=overlap, bucket_mb=0, **KWARGS)
        for step in range(STEPS):
            for micro in range(2):
                with optimizer.accumulating() if micro == 0 else _nothing():
                    model(batch(2 * step + micro, dtype).cuda()).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.cuda.synchronize()
        runs.append((flat(model).cpu(), states(optimizer)))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for ours, theirs in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
