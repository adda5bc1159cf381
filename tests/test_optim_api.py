"""torch conventions, overrides, errors and edge cases of the optimizer family."""

from __future__ import annotations

import io
import math

import pytest
import torch

import dist8bit
import dist8bit.optim as d8
from dist8bit.optim import GlobalOptimManager

ALL_8BIT = [
    d8.Adam8bit,
    d8.AdamW8bit,
    d8.SGD8bit,
    d8.RMSprop8bit,
    d8.Adagrad8bit,
    d8.Lion8bit,
    d8.LAMB8bit,
    d8.LARS8bit,
    d8.AdEMAMix8bit,
]
EXTRA_KWARGS = {d8.SGD8bit: {"momentum": 0.9}, d8.RMSprop8bit: {"momentum": 0.5}}


@pytest.fixture(autouse=True)
def clean_overrides():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


def _train_steps(model, optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("cls", ALL_8BIT, ids=lambda c: c.__name__)
def test_state_dict_round_trip_is_exact_through_torch_save(backend, cls):
    model = _model().to(backend)
    optimizer = cls(model.parameters(), lr=1e-3, **EXTRA_KWARGS.get(cls, {}))
    _train_steps(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    clone = _model().to(backend)
    clone.load_state_dict(saved["model"])
    restored = cls(clone.parameters(), lr=1e-3, **EXTRA_KWARGS.get(cls, {}))
    restored.load_state_dict(saved["optimizer"])
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, restored.state[q][key]), key
            assert value.dtype == restored.state[q][key].dtype
    assert isinstance(restored.state[next(clone.parameters())]["step"], torch.Tensor)
    _train_steps(model, optimizer, 2, seed=5)
    _train_steps(clone, restored, 2, seed=5)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q), "resumed training must continue bit for bit"


def test_bf16_params_keep_fp32_state_after_load():
    model = _model().to(torch.bfloat16)
    optimizer = d8.AdamW8bit(model.parameters(), min_8bit_size=2000)
    _train_steps_bf16(model, optimizer)
    state_dict = optimizer.state_dict()
    restored = d8.AdamW8bit(model.parameters(), min_8bit_size=2000)
    restored.load_state_dict(state_dict)
    bias = model[0].bias
    assert restored.state[bias]["exp_avg"].dtype == torch.float32, "torch would cast it to bf16"
    assert restored.state[model[0].weight]["exp_avg_absmax"].dtype == torch.float32


def _train_steps_bf16(model, optimizer) -> None:
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()


def test_loading_8bit_state_into_32bit_optimizer_is_an_error():
    model = _model()
    optimizer = d8.AdamW8bit(model.parameters())
    _train_steps(model, optimizer, 1)
    with pytest.raises(ValueError, match=r"8-bit state .* keeps 32-bit state .*dist8bit convert --to fp32"):
        d8.AdamW32bit(model.parameters()).load_state_dict(optimizer.state_dict())
    thirty_two = d8.AdamW32bit(model.parameters())
    _train_steps(model, thirty_two, 1)
    with pytest.raises(ValueError, match=r"32-bit state .* keeps 8-bit state"):
        d8.AdamW8bit(model.parameters()).load_state_dict(thirty_two.state_dict())


def test_loading_another_optimizers_state_is_an_error():
    model = _model()
    sgd = d8.SGD8bit(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, sgd, 1)
    with pytest.raises(ValueError, match="saved by another optimizer"):
        d8.AdamW8bit(model.parameters()).load_state_dict(sgd.state_dict())
    adam = d8.Adam8bit(model.parameters())
    _train_steps(model, adam, 1)
    with pytest.raises(ValueError, match="expects"):
        d8.RMSprop8bit(model.parameters(), momentum=0.0).load_state_dict(
            {**adam.state_dict(), "param_groups": d8.RMSprop8bit(model.parameters()).state_dict()["param_groups"]}
        )


def test_loading_mismatched_shapes_or_groups_is_an_error():
    model = _model()
    optimizer = d8.AdamW8bit(model.parameters())
    _train_steps(model, optimizer, 1)
    state_dict = optimizer.state_dict()
    state_dict["state"][0]["exp_avg_absmax"] = state_dict["state"][0]["exp_avg_absmax"][:-1]
    with pytest.raises(ValueError, match="exp_avg_absmax must be float32 with 32 scales"):
        d8.AdamW8bit(model.parameters()).load_state_dict(state_dict)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="parameters but the optimizer's has"):
        d8.AdamW8bit(other.parameters()).load_state_dict(optimizer.state_dict())
    newer = optimizer.state_dict()
    newer["param_groups"][0]["dist8bit_state_version"] = 99
    with pytest.raises(ValueError, match="newer than this dist8bit supports"):
        d8.AdamW8bit(model.parameters()).load_state_dict(newer)


def test_lr_scheduler_closure_zero_grad_and_hooks():
    model = _model()
    optimizer = d8.AdamW8bit(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    x = torch.randn(4, 64)

    def closure():
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_and_group_level_optim_bits():
    first, second = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64, 64))
    optimizer = d8.Adam8bit([first])
    optimizer.add_param_group({"params": [second], "optim_bits": 32, "lr": 0.5})
    first.grad, second.grad = torch.randn_like(first), torch.randn_like(second)
    optimizer.step()
    assert "exp_avg_codes" in optimizer.state[first]
    assert optimizer.state[second]["exp_avg"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"optim_bits must be one of \(32, 8, 4\)"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "optim_bits": 16})


def test_global_manager_overrides_by_parameter_and_module():
    model = _model()
    manager = GlobalOptimManager.get_instance()
    manager.register_parameters(model.parameters())
    manager.override_config(model[0].weight, "optim_bits", 32)
    manager.register_module_override(model[2], "weight", {"optim_bits": 32, "lr": 0.0})
    optimizer = d8.Adam8bit(model.parameters(), min_8bit_size=0)
    before = model[2].weight.detach().clone()
    _train_steps(model, optimizer, 1)
    assert optimizer.state[model[0].weight]["exp_avg"].dtype == torch.float32
    assert optimizer.state[model[2].weight]["exp_avg"].dtype == torch.float32
    assert "exp_avg_codes" in optimizer.state[model[0].bias]
    assert torch.equal(model[2].weight, before), "the per-parameter lr override applies"
    manager.override_config([model[0].bias], key_value_dict={"betas_typo": 1})
    with pytest.raises(ValueError, match="unknown keys \\['betas_typo'\\]"):
        _train_steps(model, optimizer, 1)


def test_module_override_survives_parameter_replacement():
    """What FSDP does: the module gets a new Parameter object after the override."""
    embedding = dist8bit.nn.StableEmbedding(1000, 16)
    embedding.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    optimizer = d8.Adam8bit(embedding.parameters())
    embedding(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    assert optimizer.state[embedding.weight]["exp_avg"].dtype == torch.float32


def test_stable_embedding_normalises_in_fp32_and_initialises_xavier():
    torch.manual_seed(0)
    embedding = dist8bit.nn.StableEmbedding(5000, 64)
    bound = math.sqrt(6 / (5000 + 64))
    assert embedding.weight.abs().max() <= bound
    out = embedding(torch.arange(10))
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(10), atol=1e-5, rtol=0)
    half = dist8bit.nn.StableEmbedding(100, 8).to(torch.bfloat16)
    assert half(torch.arange(3)).dtype == torch.bfloat16
    plain = dist8bit.nn.Embedding(5000, 8)
    optimizer = d8.AdamW8bit(plain.parameters())
    plain(torch.arange(4)).sum().backward()
    optimizer.step()
    assert optimizer.state[plain.weight]["exp_avg"].dtype == torch.float32


def test_precision_uses_the_full_parameter_size_recorded_at_construction():
    param = torch.nn.Parameter(torch.randn(8192))
    optimizer = d8.Adam8bit([param])
    param.data = param.data[:100]  # what sharding does to the local tensor
    param.grad = torch.randn(100)
    optimizer.step()
    assert "exp_avg_codes" in optimizer.state[param]


def test_nonfinite_gradient_elements_are_skipped_and_counted():
    param = torch.nn.Parameter(torch.ones(8192))
    optimizer = d8.AdamW8bit([param], lr=0.1, weight_decay=0.0)
    grad = torch.full_like(param, 0.5)
    grad[7] = float("nan")
    grad[300] = float("inf")
    param.grad = grad
    optimizer.step()
    assert param[7] == 1.0 and param[300] == 1.0
    assert torch.all(param[:7] < 1.0)
    assert int(optimizer.nonfinite_counts[param.device]) == 2
    state = optimizer.state[param]
    assert torch.isfinite(state["exp_avg_absmax"]).all() and torch.isfinite(state["exp_avg_sq_absmax"]).all()


def test_noncontiguous_parameters_are_updated_in_place():
    base = torch.randn(128, 64)
    param = torch.nn.Parameter(base.t())
    assert not param.is_contiguous()
    optimizer = d8.SGD32bit([param], lr=0.1)
    param.grad = torch.ones_like(param)
    expected = param.detach() - 0.1
    optimizer.step()
    torch.testing.assert_close(param.detach(), expected)


def test_bf16_parameters_with_stochastic_rounding_are_unbiased():
    param = torch.nn.Parameter(torch.ones(1 << 14, dtype=torch.bfloat16))
    optimizer = d8.SGD32bit([param], lr=1e-3, stochastic_rounding=True)
    for _ in range(50):
        param.grad = torch.ones_like(param)
        optimizer.step()
    # Nearest rounding would never move: 1 - 1e-3 rounds back to 1 in bf16.
    assert abs(param.float().mean().item() - (1 - 50e-3)) < 2e-3
    plain = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    nearest = d8.SGD32bit([plain], lr=1e-3)
    plain.grad = torch.ones_like(plain)
    nearest.step()
    assert torch.all(plain == 1)


def test_percentile_clipping_limits_gradient_spikes():
    param = torch.nn.Parameter(torch.zeros(4096))
    optimizer = d8.SGD32bit([param], lr=1.0, percentile_clipping=50)
    for _ in range(10):
        param.grad = torch.full_like(param, 1e-3)
        optimizer.step()
    before = param.detach().clone()
    param.grad = torch.full_like(param, 1.0)  # a 1000x spike
    optimizer.step()
    assert torch.allclose(before - param.detach(), torch.full_like(param, 1e-3), rtol=1e-4)


def test_max_unorm_clips_the_update_norm():
    param = torch.nn.Parameter(torch.ones(4096))
    optimizer = d8.SGD32bit([param], lr=1.0, max_unorm=0.01)
    param.grad = torch.ones_like(param)
    optimizer.step()
    step_norm = (torch.ones(4096) - param.detach()).norm()
    assert step_norm == pytest.approx(0.01 * torch.ones(4096).norm().item(), rel=1e-5)


@pytest.mark.parametrize("bits", [8, 32])
def test_lamb_trust_ratio(bits):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = d8.LAMB(
        [param], lr=0.01, weight_decay=0.0, optim_bits=bits, min_8bit_size=0, betas=(0.0, 0.0), eps=0.0, bias_correction=False
    )
    grad = torch.randn_like(param)
    param.grad = grad
    before = param.detach().clone()
    optimizer.step()
    # betas 0: the Adam direction is sign(g); the trust ratio scales it to ||p|| per step.
    direction = torch.sign(grad)
    expected = before - 0.01 * (before.norm() / direction.norm()) * direction
    torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5)


def test_lars_trust_ratio():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4096))
    optimizer = d8.LARS32bit([param], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.01)
    grad = torch.randn_like(param)
    param.grad = grad
    before = param.detach().clone()
    optimizer.step()
    trust = 0.01 * before.norm() / grad.norm()
    torch.testing.assert_close(param.detach(), before - 0.1 * trust * grad, atol=1e-6, rtol=1e-5)


def test_ademamix_schedules():
    from dist8bit.optim.ademamix import alpha_at, beta3_at

    assert alpha_at(5, 5.0, 10) == 2.5 and alpha_at(50, 5.0, 10) == 5.0 and alpha_at(1, 5.0, None) == 5.0
    assert beta3_at(0, 0.9, 0.9999, 100) == pytest.approx(0.9)
    assert beta3_at(100, 0.9, 0.9999, 100) == pytest.approx(0.9999)
    assert 0.9 < beta3_at(50, 0.9, 0.9999, 100) < 0.9999


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: d8.AdamW8bit(p, lr=-1.0), ValueError, "lr must be a non-negative"),
        (lambda p: d8.AdamW8bit(p, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
        (lambda p: d8.AdamW8bit(p, betas=(-0.1, 0.9)), ValueError, r"betas\[0\]"),
        (lambda p: d8.Adam(p, optim_bits=16), ValueError, r"optim_bits must be one of \(32, 8, 4\)"),
        (lambda p: d8.Adam(p, block_wise=False), ValueError, "block_wise=False is not supported"),
        (lambda p: d8.Adam(p, amsgrad=True), ValueError, "amsgrad"),
        (lambda p: d8.Adam(p, percentile_clipping=0), ValueError, "percentile_clipping"),
        (lambda p: d8.Adam(p, blocksize=100), ValueError, "blocksize must be one of"),
        (lambda p: d8.Adam8bit(p, optim_bits=32), TypeError, "Adam8bit fixes optim_bits=8"),
        (lambda p: d8.RMSprop(p, centered=True), ValueError, "centered"),
        (lambda p: d8.SGD(p, nesterov=True), ValueError, "nesterov"),
        (lambda p: d8.AdEMAMix(p, betas=(0.9, 0.99)), ValueError, "betas must hold 3 values"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make([torch.nn.Parameter(torch.randn(4))])


def test_a_fixed_setting_passed_with_its_own_value_is_accepted():
    """Scripts written for older bitsandbytes pass AdamW8bit(..., optim_bits=8); only a change is refused."""
    param = torch.nn.Parameter(torch.randn(8192))
    optimizer = d8.PagedAdamW8bit([param], optim_bits=8, is_paged=True)
    assert optimizer.defaults["optim_bits"] == 8 and optimizer.defaults["is_paged"]
    with pytest.raises(TypeError, match="PagedAdamW8bit fixes is_paged=True; use AdamW to choose"):
        d8.PagedAdamW8bit([param], optim_bits=8, is_paged=False)
    with pytest.raises(ValueError, match="Adagrad8bit fixes optim_bits=8"):  # bitsandbytes' error type too
        d8.Adagrad8bit([param], optim_bits=32)


def test_register_parameters_takes_tensors_and_param_groups():
    manager = d8.GlobalOptimManager.get_instance()
    first, second = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    manager.register_parameters([first, second])
    manager.register_parameters([{"params": [first]}, {"params": second, "lr": 0.1}])
    with pytest.raises(TypeError, match="expects tensors or param groups, got str"):
        manager.register_parameters([{"params": ["weight"]}])


def test_bad_parameters_and_gradients():
    with pytest.raises(ValueError, match="complex"):
        d8.Adam8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="float64"):
        d8.Adam8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))])
    param = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="listed twice"):
        d8.Adam8bit([param, param])
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    optimizer = d8.Adam8bit(embedding.parameters())
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()


def test_deepspeed_adam_groups_load_when_bias_correction_is_on():
    """DeepSpeed's Adam groups carry bias_correction; dist8bit's Adam always corrects, so True loads and False is refused."""
    param = torch.nn.Parameter(torch.randn(10))
    reference = torch.optim.AdamW([param])
    param.grad = torch.randn(10)
    reference.step()
    saved = reference.state_dict()
    saved["param_groups"][0]["bias_correction"] = True
    optimizer = dist8bit.optim.AdamW32bit([param])
    optimizer.load_state_dict(saved)
    assert "bias_correction" not in optimizer.param_groups[0]
    saved["param_groups"][0]["bias_correction"] = False
    with pytest.raises(ValueError, match="bias_correction=False"):
        optimizer.load_state_dict(saved)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(how):
    """torch.optim.Optimizer copies only defaults, state and param_groups; dist8bit's per-parameter
    records (recorded sizes, rounding streams, flat-buffer segments) must follow, keyed to the copies."""
    import copy
    import pickle

    from dist8bit.optim.segments import Segment

    torch.manual_seed(0)
    whole = torch.nn.Parameter(torch.randn(64, 96, dtype=torch.bfloat16))  # stochastic rounding: the uid and seed matter
    small = torch.nn.Parameter(torch.randn(10))  # under min_8bit_size: 32-bit state
    sources = [torch.randn(5000), torch.randn(3000)]
    flat = torch.nn.Parameter(torch.cat(sources))
    params = [whole, small, flat]
    opt = d8.AdamW8bit(params, lr=1e-2, master_weights="stochastic")
    opt.set_segments(flat, [Segment(sources[0], 0, 5000, 0, 5000), Segment(sources[1], 5000, 3000, 0, 3000)])
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(params, twin_params, strict=True))
    for step_grads in grads[1:]:
        for p, q, g in zip(params, twin_params, step_grads, strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
    for name in ("exp_avg_codes", "exp_avg_sq_absmax"):
        assert torch.equal(opt.state[whole][name], twin.state[twin_params[0]][name])
    assert sorted(twin.state[twin_params[2]]) == sorted(opt.state[flat])  # packed segment state, not per-parameter


def test_step_counters_advance_once_per_stepped_parameter():
    """The optimizer advances all step counters with one foreach add: parameters without a
    gradient, or outside step_params' subset, keep their count."""
    params = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    opt = d8.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[2].grad = None
    opt.step()
    opt.step_params([params[0]])
    assert [float(opt.state[p]["step"]) for p in params] == [3.0, 2.0, 1.0]
