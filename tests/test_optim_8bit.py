"""8-bit optimizers against 32-bit references: per step, over a trajectory, and in memory."""

from __future__ import annotations

import math

import pytest
import torch

import dist8bit.functional as F
import dist8bit.optim as d8

# (optimizer, kwargs, 32-bit reference factory or None for dist8bit's own 32-bit path)
ALGORITHMS = {
    "Adam": (d8.Adam, {"lr": 1e-3}, lambda p, kw: torch.optim.Adam(p, foreach=False, **kw)),
    "AdamW": (d8.AdamW, {"lr": 1e-3, "weight_decay": 0.01}, lambda p, kw: torch.optim.AdamW(p, foreach=False, **kw)),
    "SGD": (d8.SGD, {"lr": 1e-2, "momentum": 0.9}, lambda p, kw: torch.optim.SGD(p, foreach=False, **kw)),
    "RMSprop": (d8.RMSprop, {"lr": 1e-3}, lambda p, kw: torch.optim.RMSprop(p, foreach=False, **kw)),
    "Adagrad": (d8.Adagrad, {"lr": 1e-2}, lambda p, kw: torch.optim.Adagrad(p, foreach=False, **kw)),
    "Lion": (d8.Lion, {"lr": 1e-4, "weight_decay": 0.1}, None),
    "LAMB": (d8.LAMB, {"lr": 1e-3, "weight_decay": 0.01}, None),
    "LARS": (d8.LARS, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}, None),
    "AdEMAMix": (d8.AdEMAMix, {"lr": 1e-3, "t_alpha": 20, "t_beta3": 20}, None),
}


def dequantized_states(optimizer, param) -> dict[str, torch.Tensor]:
    state = optimizer.state[param]
    config = optimizer.param_groups[0]
    result = {}
    for spec in optimizer.state_specs(config):
        code = F.create_dynamic_map(signed=spec.signed).to(param.device)
        result[spec.name] = F.dequantize_blockwise(
            state[spec.name + "_codes"], absmax=state[spec.name + "_absmax"], code=code, blocksize=config["blocksize"]
        ).view(param.shape)
    return result


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_step_tracks_the_32bit_reference(backend, name):
    """bitsandbytes' protocol: both start every step from the same (8-bit) state."""
    cls, kwargs, make_reference = ALGORITHMS[name]
    torch.manual_seed(0)
    size = (1024, 1024) if backend.type == "cuda" or name in ("Adam", "AdamW") else (256, 512)
    p8 = torch.nn.Parameter(torch.randn(size, device=backend) * 0.1)
    p32 = torch.nn.Parameter(p8.detach().clone())
    optimizer = cls([p8], optim_bits=8, **kwargs)
    reference = make_reference([p32], kwargs) if make_reference else cls([p32], optim_bits=32, **kwargs)
    for _ in range(50):
        grad = torch.randn_like(p8) * 0.01
        p8.grad, p32.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        error = (p8 - p32).abs()
        assert error.mean() < 6e-5, name
        assert (error / (p32.abs() + 1e-9)).mean() < 6e-4, name
        states = dequantized_states(optimizer, p8)
        for key, value in states.items():
            expected = reference.state[p32][key]
            mismatched = (~torch.isclose(value, expected, atol=3e-3, rtol=1e-3)).sum().item()
            assert mismatched <= max(10, value.numel() // 5000), (name, key, mismatched)
            reference.state[p32][key].copy_(value)  # the same state for the next step
        with torch.no_grad():
            p32.copy_(p8)


def _classification_task(seed: int = 0):
    """A teacher network's labels with 20% of them flipped: the loss plateaus well above 0."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4096, 64, generator=generator)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        targets = teacher(inputs).argmax(dim=1)
    noisy = torch.rand(len(targets), generator=generator) < 0.2
    targets[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=generator)
    return inputs, targets


def _train(optimizer_cls, optim_bits: int, steps: int = 300, **kwargs) -> float:
    """Training-set loss after `steps` steps (same seed, data and batches for both precisions)."""
    inputs, targets = _classification_task()
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    )
    optimizer = optimizer_cls(model.parameters(), optim_bits=optim_bits, **kwargs)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        batch = torch.randint(0, inputs.shape[0], (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(inputs), targets).item()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(d8.AdamW, {"lr": 3e-3}), (d8.Lion, {"lr": 3e-4}), (d8.AdEMAMix, {"lr": 2e-3}), (d8.SGD, {"lr": 0.05, "momentum": 0.9})],
    ids=["AdamW", "Lion", "AdEMAMix", "SGD"],
)
def test_300_step_trajectory_final_loss_within_one_percent(backend, cls, kwargs):
    if backend.type != "cpu":
        pytest.skip("the trajectory runs on CPU")
    loss32 = _train(cls, 32, **kwargs)
    loss8 = _train(cls, 8, **kwargs)
    assert loss32 < 0.8 * math.log(10), "the task must actually be learned"
    assert abs(loss8 - loss32) <= 0.01 * loss32, (loss8, loss32)


def test_adamw8bit_state_is_at_most_2_05_bytes_per_parameter():
    param = torch.nn.Parameter(torch.zeros(1 << 24))
    param.grad = torch.zeros_like(param)
    optimizer = d8.AdamW8bit([param])
    optimizer._init_state(param, optimizer.state[param], optimizer.param_groups[0])
    bytes_per_param = optimizer.state_bytes() / param.numel()
    assert bytes_per_param <= 2.05
    assert bytes_per_param == pytest.approx(2 + 2 * 4 / 256)


def test_small_tensors_and_overrides_keep_32bit_state():
    big = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: 8-bit
    small = torch.nn.Parameter(torch.randn(4095))  # below min_8bit_size: 32-bit
    optimizer = d8.Adam8bit([big, small])
    for p in (big, small):
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert optimizer.state[small]["exp_avg"].dtype == torch.float32
