"""32-bit dist8bit optimizers against torch.optim: atol 1e-6 / rtol 1e-5 over 20 steps."""

from __future__ import annotations

import pytest
import torch

import dist8bit.optim as d8

CASES = [
    ("Adam", d8.Adam32bit, torch.optim.Adam, {"lr": 1e-2}),
    ("Adam-l2", d8.Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)}),
    ("AdamW", d8.AdamW32bit, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ("SGD", d8.SGD32bit, torch.optim.SGD, {"lr": 1e-2}),
    ("SGD-momentum", d8.SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD-nesterov", d8.SGD32bit, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    ("RMSprop", d8.RMSprop32bit, torch.optim.RMSprop, {"lr": 1e-3, "weight_decay": 0.1}),
    ("RMSprop-momentum", d8.RMSprop32bit, torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5, "alpha": 0.9}),
    (
        "Adagrad",
        d8.Adagrad32bit,
        torch.optim.Adagrad,
        {"lr": 1e-2, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
    ),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_32bit_matches_torch_optim(backend, name, ours, theirs, kwargs):
    torch.manual_seed(0)
    shapes = [(64, 65), (300,), (7, 3, 5)]
    params = [torch.randn(s, device=backend) for s in shapes]
    mine = [p.clone().requires_grad_(True) for p in params]
    reference = [p.clone().requires_grad_(True) for p in params]
    optimizer = ours(mine, **kwargs)
    torch_optimizer = theirs(reference, foreach=False, **kwargs)
    for _ in range(20):
        for a, b in zip(mine, reference, strict=True):
            grad = torch.randn_like(a)
            a.grad, b.grad = grad.clone(), grad.clone()
        optimizer.step()
        torch_optimizer.step()
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    state_names = {k for s in torch_optimizer.state.values() for k in s if k != "step"}
    for a, b in zip(mine, reference, strict=True):
        for key in state_names:
            torch.testing.assert_close(optimizer.state[a][key], torch_optimizer.state[b][key], atol=1e-6, rtol=1e-5)
        assert float(optimizer.state[a]["step"]) == 20.0
        if "step" in torch_optimizer.state[b]:
            assert float(torch_optimizer.state[b]["step"]) == 20.0


def test_torch_adamw_state_dict_loads_into_adamw32bit():
    """32-bit state uses torch's names, so torch checkpoints resume directly."""
    torch.manual_seed(0)
    theirs = torch.nn.Parameter(torch.randn(50, 50))
    mine = torch.nn.Parameter(theirs.detach().clone())
    torch_optimizer = torch.optim.AdamW([theirs], lr=1e-2)
    for _ in range(3):
        theirs.grad = torch.randn_like(theirs)
        torch_optimizer.step()
    mine.data.copy_(theirs.data)
    optimizer = d8.AdamW32bit([mine], lr=1e-2)
    optimizer.load_state_dict(torch_optimizer.state_dict())
    grad = torch.randn_like(theirs)
    theirs.grad, mine.grad = grad.clone(), grad.clone()
    torch_optimizer.step()
    optimizer.step()
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
