"""CPUOffloadOptimizer: on CPU the copies degenerate but hooks, host step and state dicts run.

Oracles: plain dist8bit AdamW8bit on the same model (fp32, bit for bit), and
for bf16 parameters an fp32 master model stepped by AdamW8bit with the bf16
gradients and rounded back to bf16 (also bit for bit).
"""

from __future__ import annotations

import copy

import pytest
import torch

import dist8bit
from dist8bit.offload import CPUOffloadOptimizer

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


def fsdp_worker(rank: int, world: int) -> dict:
    from helpers import tiny_model as fsdp_model
    from helpers import train as fsdp_train

    model = fsdp_model(fsdp=True)
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    losses = fsdp_train(model, optimizer, range(5))
    return {
        "params": {name: p.full_tensor().detach() for name, p in model.named_parameters()},
        "eight_bit": {
            name: "exp_avg_codes" in optimizer.state[optimizer._mirrors[p].master] for name, p in model.named_parameters()
        },
        "losses": losses,
    }


def test_fsdp2_shards_step_on_host_like_one_unsharded_optimizer():
    """Every shard of the tiny model holds whole 256-value blocks, so the host steps of the two shards
    quantize the same blocks as one plain AdamW8bit over the unsharded model: equal to float rounding."""
    from distributed_ranks import spawn_gloo
    from helpers import tiny_model as unsharded_model
    from helpers import train as unsharded_train

    sharded = spawn_gloo(fsdp_worker, 2)
    model = unsharded_model(fsdp=False)
    optimizer = dist8bit.optim.AdamW8bit(model.parameters(), lr=1e-2)
    losses = unsharded_train(model, optimizer, range(5))
    for name, param in model.named_parameters():
        # Precision follows min_8bit_size of the full parameter, not of the shard (scale: 4608 -> 2304 per rank).
        assert sharded["eight_bit"][name] == ("exp_avg_codes" in optimizer.state[param]), name
        torch.testing.assert_close(sharded["params"][name], param.detach(), rtol=0, atol=1e-5, msg=name)
    assert sharded["eight_bit"]["scale"]
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
