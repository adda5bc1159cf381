"""Paged optimizer states (dist8bit.paging): fallback, policy, manager, CUDA.

Three layers of tests:
  * the fallback that CI machines take (no CUDA, or states on the CPU): one
    warning per process, ordinary tensors, results bit-identical to unpaged
    optimizers, state dicts interchangeable;
  * the page manager itself on the CPU, with a fake backend that records where
    it was told to place each allocation and simulates device memory: the
    allocation entry point, the step hook, load_state_dict adoption, the
    budget/threshold policy and residency are all exercised without a GPU;
  * failures and stream safety on the CPU: a fake native layer whose driver
    calls fail (ordinary memory, one warning, no exception out of step()),
    graph capture refused, no per-step allocation;
  * CUDA tests (skipped without a GPU) for what only a GPU can show: managed
    memory really allocated, really evicted (free device memory grows), really
    released on deletion, without the deleter waiting for the device. They stay
    far below the card's free memory and simulate pressure with a budget, never
    by oversubscribing the GPU.
"""

from __future__ import annotations

import gc
import io
import shutil
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import pytest
import torch

import dist8bit.optim as d8
from dist8bit import paging
from dist8bit.paging import fallback, manager, native, policy
from dist8bit.paging.policy import Candidate, Limits

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")

# Each paged class beside the unpaged class it must match, by bitsandbytes' names.
PAGED_PAIRS = [
    (getattr(d8, "Paged" + name), getattr(d8, name))
    for name in ("Adam8bit", "AdamW8bit", "Adam32bit", "AdamW32bit", "Lion8bit", "Lion32bit", "AdEMAMix8bit")
]


# ------------------------------------------------------------------ helpers
def _params(shapes, device="cpu", seed=0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.1).to(device)) for s in shapes]


def _set_grads(params, step: int, skip: frozenset[int] = frozenset()) -> None:
    """Gradients that depend only on the step, so two optimizers see the same ones."""
    generator = torch.Generator().manual_seed(1000 + step)
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator).to(param.device)
        param.grad = None if index in skip else grad


def _train(optimizer, params, steps: int, first: int = 0, skip: frozenset[int] = frozenset()) -> None:
    for step in range(first, first + steps):
        _set_grads(params, step, skip)
        optimizer.step()


def _states_equal(a: torch.optim.Optimizer, pa, b: torch.optim.Optimizer, pb) -> bool:
    for x, y in zip(pa, pb, strict=True):
        sa, sb = a.state[x], b.state[y]
        if sa.keys() != sb.keys():
            return False
        for key in sa:
            if not torch.equal(sa[key].cpu(), sb[key].cpu()):
                return False
    return True


def _roundtrip(state_dict: dict) -> dict:
    """Through torch.save and a weights_only load, as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture
def fresh_warning(monkeypatch):
    """Forget that this process already warned, so the test sees the warning."""
    monkeypatch.setattr(fallback, "_warned", False)
    monkeypatch.setattr(fallback, "_warned_failure", False)


def _failure_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "paged-memory call failed" in str(w.message)]


class FakePaging:
    """A paging backend on the CPU: 'managed' tensors are ordinary CPU tensors.

    It records where the manager placed each allocation (what cudaMemAdvise and
    cudaMemPrefetchAsync would be told) and reports device memory as a fixed
    total minus the bytes placed on the device.
    """

    def __init__(self, total: int = 64 << 20) -> None:
        self.total = total
        self.on_device: dict[int, int] = {}  # ptr -> bytes, of allocations placed on the device
        self.where: dict[int, bool] = {}  # ptr -> on host
        self.calls: list[str] = []
        self.live_count = 0
        self.live_bytes = 0

    def unavailable_reason(self, device):
        return None  # pages whatever it is given (the tests give it CPU tensors only)

    def allocate(self, nbytes, device, on_device):
        self.calls.append("allocate")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        ptr = raw.data_ptr()
        self.where[ptr] = not on_device
        if on_device:
            self.on_device[ptr] = nbytes
        self.live_count += 1
        self.live_bytes += nbytes
        weakref.finalize(raw.untyped_storage(), self._freed, ptr, nbytes)
        return raw

    def _freed(self, ptr, nbytes):
        self.live_count -= 1
        self.live_bytes -= nbytes
        self.on_device.pop(ptr, None)

    def place(self, ranges, device, to_host):
        self.calls.append("place")
        for ptr, nbytes in ranges:
            self.where[ptr] = to_host
            if to_host:
                self.on_device.pop(ptr, None)
            else:
                self.on_device[ptr] = nbytes

    def on_host(self, ranges):
        return [self.where[ptr] for ptr, _ in ranges]

    def memory(self, device):
        self.calls.append("memory")
        return self.total - sum(self.on_device.values()), self.total

    def live(self):
        return self.live_count, self.live_bytes

    def reclaim(self, wait):
        self.calls.append("reclaim")


@pytest.fixture
def fake(monkeypatch) -> FakePaging:
    """A fresh page manager over FakePaging for the test (the process-wide one is restored after)."""
    backend = FakePaging()
    monkeypatch.setattr(manager, "_manager", manager.PageManager(backend))
    return backend


# Big enough that every Adam state of the (256, 256) parameter is paged
# (codes: 64 KiB = MIN_PAGED_BYTES; fp32 values: 256 KiB), small enough to be fast.
PAGED_SHAPES = [(256, 256), (256, 256), (256, 256), (256,)]


# ------------------------------------------------------------------ classes
@pytest.mark.parametrize(("paged", "plain"), PAGED_PAIRS, ids=lambda c: c.__name__)
def test_paged_classes_fix_is_paged(paged, plain, fresh_warning):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer = paged(_params([(8,)]), lr=1e-3)
    assert optimizer.defaults["is_paged"] is True
    assert isinstance(optimizer, plain.__mro__[1])
    assert optimizer.defaults["optim_bits"] == (8 if "8bit" in paged.__name__ else 32)
    with pytest.raises(TypeError, match="is_paged=True"):
        paged(_params([(8,)]), lr=1e-3, is_paged=False)


def test_every_bitsandbytes_paged_name_is_exported():
    names = ["PagedAdam", "PagedAdamW", "PagedLion", "PagedAdEMAMix"]
    names += [n + bits for n in names for bits in ("8bit", "32bit")]
    assert all(hasattr(d8, n) and n in d8.__all__ for n in names)


# ---------------------------------------------------------------- fallback
def test_fallback_warns_once_per_process_and_uses_ordinary_memory(fresh_warning):
    """CPU parameters can never be paged: every paged optimizer falls back, with one warning in all."""
    params = _params([(64, 80), (80,)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizers = [d8.PagedAdamW8bit(params, lr=1e-3), d8.PagedLion32bit(params), d8.AdamW(params, is_paged=True)]
        for optimizer in optimizers:
            _train(optimizer, params, 2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "paged" in str(w.message)]
    assert len(messages) == 1, messages
    assert "ordinary memory" in messages[0] and "once per process" in messages[0]
    for optimizer in optimizers:
        where = paging.residency(optimizer)
        assert where.device_bytes == where.host_bytes == where.allocations == 0
        assert where.unpaged_bytes == optimizer.state_bytes() > 0


@pytest.mark.parametrize(("paged", "plain"), PAGED_PAIRS, ids=lambda c: c.__name__)
def test_fallback_matches_unpaged_bit_for_bit_after_100_steps(paged, plain, fresh_warning):
    shapes = [(64, 80), (80,)]
    pa, pb = _params(shapes), _params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, b = paged(pa, lr=1e-3), plain(pb, lr=1e-3)
    _train(a, pa, 100)
    _train(b, pb, 100)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert _states_equal(a, pa, b, pb)


@pytest.mark.parametrize("direction", ["paged->unpaged", "unpaged->paged"])
def test_fallback_state_dicts_load_across_paging(direction, fresh_warning):
    shapes = [(64, 80), (80,)]
    source_paged = direction == "paged->unpaged"
    ps, pt, pr = _params(shapes), _params(shapes), _params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        source = d8.AdamW8bit(ps, lr=1e-3, is_paged=source_paged)
        target = d8.AdamW8bit(pt, lr=1e-3, is_paged=not source_paged)
    reference = d8.AdamW8bit(pr, lr=1e-3)
    _train(source, ps, 5)
    _train(reference, pr, 5)
    saved = _roundtrip(source.state_dict())
    assert all(type(v) is torch.Tensor for s in saved["state"].values() for v in s.values())
    for x, y in zip(pt, ps, strict=True):
        x.data.copy_(y.data)
    target.load_state_dict(saved)
    _train(target, pt, 5, first=5)
    _train(reference, pr, 5, first=5)
    assert all(torch.equal(x, y) for x, y in zip(pt, pr, strict=True))
    assert _states_equal(target, pt, reference, pr)


# ------------------------------------------------------------------ policy
def test_policy_deficit_and_headroom():
    mib = 1 << 20
    assert policy.deficit(Limits(), 10 * mib, 1 * mib, 100 * mib) == 0
    assert policy.deficit(Limits(budget=4 * mib), 10 * mib, 50 * mib, 100 * mib) == 6 * mib
    assert policy.deficit(Limits(threshold=0.25), 10 * mib, 20 * mib, 100 * mib) == 5 * mib
    assert policy.deficit(Limits(budget=4 * mib, threshold=0.25), 10 * mib, 20 * mib, 100 * mib) == 6 * mib
    assert policy.headroom(Limits(budget=16 * mib), 10 * mib, 50 * mib, 100 * mib) == 6 * mib
    assert policy.headroom(Limits(threshold=0.25), 10 * mib, 30 * mib, 100 * mib) == 5 * mib
    assert policy.headroom(Limits(budget=64 * mib), 0, 3 * mib, 100 * mib) == 3 * mib  # never more than is free
    assert policy.headroom(Limits(budget=4 * mib), 10 * mib, 50 * mib, 100 * mib) == 0


def test_policy_coldest_first_and_hottest_that_fit():
    cands = [Candidate(1, 10, last_use=5, order=0), Candidate(2, 10, 3, 1), Candidate(3, 10, 5, 2), Candidate(4, 10, 3, 0)]
    assert [c.key for c in policy.coldest_first(cands, 15)] == [4, 2]
    assert [c.key for c in policy.coldest_first(cands, 0)] == []
    assert [c.key for c in policy.coldest_first(cands, 100)] == [4, 2, 1, 3]
    assert [c.key for c in policy.hottest_that_fit(cands, 25)] == [3, 1]
    sized = [Candidate(1, 30, 9, 0), Candidate(2, 10, 8, 0)]
    assert [c.key for c in policy.hottest_that_fit(sized, 20)] == [2]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
def test_set_budget_rejects_bad_values(bad, fake):
    with pytest.raises(ValueError, match="budget"):
        paging.set_budget(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, False, "10%"])
def test_set_threshold_rejects_bad_values(bad, fake):
    with pytest.raises(ValueError, match="threshold"):
        paging.set_threshold(bad)


# ------------------------------------------------- manager (fake backend)
def _paged_bytes(optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.numel() * v.element_size() >= paging.MIN_PAGED_BYTES
    )


def test_paged_states_go_through_the_manager(fake):
    params = _params(PAGED_SHAPES)
    optimizer = d8.PagedAdamW8bit(params, lr=1e-3)
    _train(optimizer, params, 1)
    where = paging.residency(optimizer)
    # Codes of the three matrices are paged; their scales and the bias states are too small.
    assert where.allocations == 6
    assert where.device_bytes == 6 * 256 * 256 and where.host_bytes == 0
    assert where.unpaged_bytes == optimizer.state_bytes() - where.device_bytes > 0
    assert paging.managed_memory() == (6, 6 * 256 * 256)


@pytest.mark.parametrize(("paged", "plain"), PAGED_PAIRS, ids=lambda c: c.__name__)
def test_managed_states_under_pressure_match_unpaged_bit_for_bit(paged, plain, fake):
    """100 steps with evictions and restores in between: values never change."""
    _check_paged_matches_unpaged(paged, plain, PAGED_SHAPES, "cpu", range(30, 70), lambda a: _paged_bytes(a) // 2)


def _check_paged_matches_unpaged(paged, plain, shapes, device: str, evicting: range, budget) -> None:
    """100 steps of `paged` and `plain` from the same start; during the steps in `evicting` the paging
    budget is `budget(paged optimizer)` bytes, so some states live in host memory. Parameters and states
    must end bit-identical."""
    pa, pb = _params(shapes, device), _params(shapes, device)
    a, b = paged(pa, lr=1e-3), plain(pb, lr=1e-3)
    _train(a, pa, evicting.start)
    paging.set_budget(budget(a))
    _train(a, pa, len(evicting), first=evicting.start)
    assert paging.residency(a).host_bytes > 0
    paging.set_budget(None)
    paging.prefetch_all()
    _train(a, pa, 100 - evicting.stop, first=evicting.stop)
    _train(b, pb, 100)
    if device == "cuda":
        torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert _states_equal(a, pa, b, pb)


def test_budget_evicts_least_recently_used_states_and_restores_them(fake):
    params = _params(PAGED_SHAPES)
    optimizer = d8.PagedAdam32bit(params, lr=1e-3)
    _train(optimizer, params, 2)
    state_bytes = 256 * 256 * 4
    assert paging.residency(optimizer).device_bytes == 6 * state_bytes
    paging.set_budget(4 * state_bytes)
    _train(optimizer, params, 1, first=2, skip=frozenset({1}))  # parameter 1 gets no gradient: coldest
    _train(optimizer, params, 1, first=3)  # the policy runs before each step
    cold = {v.data_ptr() for v in optimizer.state[params[1]].values() if v.dim() > 0}
    evicted = {ptr for ptr, on_host in fake.where.items() if on_host}
    assert evicted == cold
    assert paging.residency(optimizer).host_bytes == 2 * state_bytes
    # Room for one more state: one of the pair comes back, and the budget still holds.
    paging.set_budget(5 * state_bytes)
    _train(optimizer, params, 1, first=4)
    assert paging.residency(optimizer).device_bytes == 5 * state_bytes
    paging.set_budget(6 * state_bytes)
    _train(optimizer, params, 1, first=5)
    assert paging.residency(optimizer).host_bytes == 0


def test_threshold_evicts_until_enough_device_memory_is_free(fake):
    params = _params(PAGED_SHAPES)
    optimizer = d8.PagedAdam32bit(params, lr=1e-3)
    _train(optimizer, params, 1)
    state_bytes = 256 * 256 * 4
    fake.total = 8 * state_bytes  # 6 states resident: 2 of 8 free
    paging.set_threshold(0.5)  # 4 must stay free: 2 states leave
    _train(optimizer, params, 1, first=1)
    assert paging.residency(optimizer).host_bytes == 2 * state_bytes
    free, total = fake.memory(torch.device("cpu"))
    assert free >= total // 2
    paging.set_threshold(None)


def test_evict_all_and_prefetch_all(fake):
    params = _params(PAGED_SHAPES)
    optimizer = d8.PagedLion32bit(params)
    _train(optimizer, params, 1)
    total = _paged_bytes(optimizer)
    paging.evict_all(optimizer)
    assert paging.residency(optimizer) == paging.Residency(0, total, paging.residency(optimizer).unpaged_bytes, 3)
    _train(optimizer, params, 3, first=1)  # without limits, evicted states stay evicted
    assert paging.residency().host_bytes == total
    paging.prefetch_all()
    assert paging.residency().device_bytes == total and paging.residency().host_bytes == 0


def test_no_device_calls_per_step_without_limits(fake):
    """With no budget or threshold, paged states cost nothing per step: no driver calls at all."""
    params = _params(PAGED_SHAPES)
    optimizer = d8.PagedAdamW8bit(params, lr=1e-3)
    _train(optimizer, params, 1)
    fake.calls.clear()
    _train(optimizer, params, 10, first=1)
    assert fake.calls == []


def test_load_state_dict_moves_states_into_managed_memory(fake):
    pa, pb = _params(PAGED_SHAPES), _params(PAGED_SHAPES)
    unpaged = d8.AdamW8bit(pa, lr=1e-3)
    _train(unpaged, pa, 3)
    paged = d8.PagedAdamW8bit(pb, lr=1e-3)
    for x, y in zip(pb, pa, strict=True):
        x.data.copy_(y.data)
    paged.load_state_dict(_roundtrip(unpaged.state_dict()))
    assert paging.residency(paged).allocations == 0  # load_state_dict copies into ordinary tensors
    _train(paged, pb, 1, first=3)  # ... which the next step's hook moves into managed memory
    _train(unpaged, pa, 1, first=3)
    assert paging.residency(paged).allocations == 6
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    saved = paged.state_dict()
    assert all(type(v) is torch.Tensor for s in saved["state"].values() for v in s.values())


def test_memory_is_released_when_the_optimizer_is_deleted(fake):
    params = _params(PAGED_SHAPES)
    optimizer = d8.PagedAdamW32bit(params, lr=1e-3)
    _train(optimizer, params, 2)
    assert paging.managed_memory()[0] == 6
    alive = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert alive() is None, "the page manager must not keep optimizers alive"
    assert paging.managed_memory() == (0, 0)
    assert paging.residency().allocations == 0


# ------------------------------------------- failures, streams, capture (CPU)
MALLOC_FAILED = "cudaMallocManaged failed: out of memory"
ADVISE_FAILED = "cudaMemAdvise (prefer host) failed: invalid argument"
PREFETCH_FAILED = "cudaMemPrefetchAsync failed: invalid device ordinal"
STREAM = 7  # the handle the fake "current stream" has


class FailingOperators:
    """torch.ops.dist8bit_paging as the binding answers when the driver refuses: statuses, never exceptions."""

    def __init__(self, alloc_fails: bool) -> None:
        self.alloc_fails = alloc_fails
        self.calls: list[tuple] = []

    def alloc(self, nbytes, device, location, stream):
        self.calls.append(("alloc", location, stream))
        if self.alloc_fails:
            return None, MALLOC_FAILED
        return torch.empty(nbytes, dtype=torch.uint8), PREFETCH_FAILED

    def advise(self, ptrs, sizes, device, to_host):
        self.calls.append(("advise", to_host))
        return ADVISE_FAILED

    def prefetch(self, ptrs, sizes, location, stream):
        self.calls.append(("prefetch", location, stream))
        return PREFETCH_FAILED


class CpuCudaPaging(native.CudaPaging):
    """The CUDA backend's Python layer over CPU tensors: only the device queries are faked."""

    def unavailable_reason(self, device):
        return None

    def memory(self, device):
        return 64 << 20, 64 << 20

    def on_host(self, ranges):
        return [False] * len(ranges)


@pytest.fixture
def failing_native(monkeypatch, fresh_warning):
    """The process-wide manager over CpuCudaPaging, with failing operators; returns a setter for the failure kind."""

    def install(alloc_fails: bool) -> FailingOperators:
        ops = FailingOperators(alloc_fails)
        monkeypatch.setattr(native, "operators", lambda: ops)
        monkeypatch.setattr(native, "_index", lambda device: 0)
        monkeypatch.setattr(native, "_current_stream", lambda index: STREAM)
        monkeypatch.setattr(manager, "_manager", manager.PageManager(CpuCudaPaging()))
        return ops

    yield install
    paging.set_budget(None)


def test_native_layer_turns_a_failed_allocation_into_paging_failure(failing_native):
    failing_native(alloc_fails=True)
    with pytest.raises(paging.PagingFailure, match="cudaMallocManaged failed"):
        CpuCudaPaging().allocate(1 << 16, torch.device("cpu"), on_device=True)


def test_failed_managed_allocation_falls_back_to_ordinary_memory_with_one_warning(failing_native):
    ops = failing_native(alloc_fails=True)
    pa, pb = _params(PAGED_SHAPES), _params(PAGED_SHAPES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = d8.PagedAdamW8bit(pa, lr=1e-3), d8.AdamW8bit(pb, lr=1e-3)
        _train(a, pa, 5)  # never raises out of step()
    _train(b, pb, 5)
    assert _failure_warnings(caught) == [_failure_warnings(caught)[0]] and MALLOC_FAILED in _failure_warnings(caught)[0]
    assert sum(call[0] == "alloc" for call in ops.calls) == 6  # each state tried managed memory once
    assert paging.residency(a).allocations == 0 and paging.residency(a).unpaged_bytes == a.state_bytes()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert _states_equal(a, pa, b, pb)


def test_failed_advice_and_prefetch_warn_once_and_moves_go_on_in_stream_order(failing_native):
    ops = failing_native(alloc_fails=False)
    pa, pb = _params(PAGED_SHAPES), _params(PAGED_SHAPES)
    a, b = d8.PagedAdamW8bit(pa, lr=1e-3), d8.AdamW8bit(pb, lr=1e-3)  # states are allocated by the first step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(a, pa, 2)
        paging.set_budget(0)  # every step now evicts or restores: advice and prefetch fail each time
        _train(a, pa, 2, first=2)
        paging.set_budget(None)
        paging.evict_all()
        paging.prefetch_all()
        _train(a, pa, 2, first=4)
    _train(b, pb, 6)
    failures = _failure_warnings(caught)
    assert len(failures) == 1 and PREFETCH_FAILED in failures[0], failures
    assert paging.residency(a).allocations == 6  # the memory stayed managed
    moves = [call for call in ops.calls if call[0] == "prefetch"]
    assert moves and all(stream == STREAM for _, _, stream in moves)  # on the current stream, no side stream
    assert any(call[0] == "advise" for call in ops.calls)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert _states_equal(a, pa, b, pb)


def test_failure_warning_is_issued_once_per_process_apart_from_unavailability(fresh_warning):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback.warn_failed(MALLOC_FAILED)
        fallback.warn_failed(PREFETCH_FAILED)
        fallback.warn_unavailable("no CUDA device is available")
        fallback.warn_unavailable("no CUDA device is available")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert MALLOC_FAILED in messages[0] and "once per process" in messages[0]
    assert "unavailable" in messages[1]


@pytest.fixture
def capturing(monkeypatch):
    """Make the current stream look as if it were capturing a CUDA graph."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("optimizer_class", [d8.PagedAdamW8bit, d8.AdamW8bit, d8.Lion32bit])
def test_graph_capture_of_a_step_is_refused_with_the_reason_and_the_fix(optimizer_class, fake, request):
    params = _params(PAGED_SHAPES)
    optimizer = optimizer_class(params, lr=1e-3)
    _train(optimizer, params, 1)
    paging.set_budget(0)  # a paged step would place states first: it must not get that far
    before = [p.detach().clone() for p in params]
    fake.calls.clear()
    request.getfixturevalue("capturing")
    _set_grads(params, 1)
    try:
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph") as refused:
            optimizer.step()
    finally:
        paging.set_budget(None)
    assert "stale" in str(refused.value) and "outside torch.cuda.graph" in str(refused.value)
    assert fake.calls == []
    assert all(torch.equal(x, y) for x, y in zip(params, before, strict=True))


def test_no_per_step_allocation_of_the_nonfinite_counter():
    """The counter is allocated at the first step and reused: no torch.zeros per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CounterAllocations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten.zeros.default and list(args[0]) == [1] and kwargs.get("dtype") == torch.int64:
                self.count += 1
            return func(*args, **kwargs)

    params = _params([(64, 80), (80,)])
    optimizer = d8.AdamW8bit(params, lr=1e-3)
    _train(optimizer, params, 1)
    counter = optimizer.nonfinite_counts[params[0].device]
    with CounterAllocations() as allocations:
        _train(optimizer, params, 3, first=1)
    assert allocations.count == 0
    assert optimizer.nonfinite_counts[params[0].device] is counter


# ------------------------------------------------------------ CUDA sources
@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_paging_binding_builds_against_torch_and_registers_its_operators(tmp_path):
    """Without a GPU: the binding compiles against torch, links with paging.cu, registers
    dist8bit_paging, returns CUDA failures of allocation and placement as statuses that name the
    failing call, and still raises for bad arguments."""
    from torch.utils import cpp_extension

    cuda = REPO / "csrc" / "cuda"
    library = tmp_path / "libpaging_probe.so"
    # nvcc drives the host compiler for the .cpp too, so the CUDA headers and cudart are found wherever CUDA lives.
    command = [NVCC, "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-w", "-I", str(cuda)]
    command += [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-L{p}" for p in cpp_extension.library_paths()]
    command += [str(cuda / "paging.cu"), str(cuda / "paging_binding.cpp"), "-lc10", "-ltorch_cpu", "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    script = (
        "import torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "ops = torch.ops.dist8bit_paging\n"
        "assert ops.live() == [0, 0]\n"
        "for call, match in [(lambda: ops.prefetch([1], [0], 0, 0), 'range sizes must be positive'),\n"
        "                    (lambda: ops.advise([1, 2], [8], 0, True), '2 pointers but 1 sizes'),\n"
        "                    (lambda: ops.alloc(0, 0, 0, 0), 'positive size')]:\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as error:\n"
        "        assert match in str(error), error\n"
        "    else:\n"
        "        raise AssertionError(match)\n"
        "assert str(ops.alloc.default._schema).endswith('-> (Tensor?, str)')\n"
        "if not torch.cuda.is_available():\n"
        "    tensor, status = ops.alloc(4096, 0, 0, 0)\n"
        "    assert tensor is None and status.startswith('cudaMallocManaged failed: '), status\n"
        "    assert ops.prefetch([4096], [4096], 0, 0).startswith('cudaMemPrefetchAsync failed: ')\n"
        "    assert ops.advise([4096], [4096], 0, True).startswith('cudaMemAdvise (prefer host) failed: ')\n"
        "    assert ops.reclaim(0, 0, True) != ''\n"
        "    assert ops.live() == [0, 0]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --------------------------------------------------------------------- CUDA
def _safe_elements(fraction: float = 0.005, cap: int = 1 << 24) -> int:
    """Parameter size for CUDA tests: a small fraction of the free memory (never oversubscribe)."""
    free, _ = torch.cuda.mem_get_info()
    return max(1 << 16, min(cap, int(free * fraction) // 4))


@pytest.fixture
def paging_gpu():
    """Skips without a GPU that can page (CUDA with concurrent managed access); afterwards resets the
    process-wide manager's limits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not paging.available("cuda"):
        pytest.skip("this GPU cannot page (no concurrent managed access)")
    yield
    paging.set_budget(None)
    paging.set_threshold(None)


@pytest.mark.parametrize(("paged", "plain"), PAGED_PAIRS, ids=lambda c: c.__name__)
@pytest.mark.usefixtures("paging_gpu")
@pytest.mark.gpu
def test_cuda_paged_matches_unpaged_bit_for_bit_after_100_steps(paged, plain):
    # Budget 0: everything paged goes to host memory and is updated there.
    _check_paged_matches_unpaged(paged, plain, [(512, 512), (512,)], "cuda", range(40, 70), lambda a: 0)


@pytest.mark.usefixtures("paging_gpu")
@pytest.mark.gpu
def test_cuda_evicted_states_are_on_the_host_and_device_memory_is_freed():
    numel = _safe_elements()
    params = _params([(numel,)], "cuda")
    optimizer = d8.PagedAdam32bit(params, lr=1e-3)
    _train(optimizer, params, 2)
    torch.cuda.synchronize()
    paged_bytes = 2 * numel * 4
    where = paging.residency(optimizer)
    assert (where.device_bytes, where.host_bytes) == (paged_bytes, 0)
    free_before, _ = torch.cuda.mem_get_info()
    paging.set_budget(0)
    _train(optimizer, params, 2, first=2)  # evicted at the first of these steps, trained in host memory
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    where = paging.residency(optimizer)
    assert (where.device_bytes, where.host_bytes) == (0, paged_bytes)
    assert free_after - free_before >= 0.9 * paged_bytes, (free_before, free_after, paged_bytes)
    paging.set_budget(None)
    paging.prefetch_all()
    torch.cuda.synchronize()
    assert paging.residency(optimizer).host_bytes == 0
    assert torch.cuda.mem_get_info()[0] <= free_after - 0.9 * paged_bytes


@pytest.mark.usefixtures("paging_gpu")
@pytest.mark.gpu
def test_cuda_memory_is_released_when_the_optimizer_is_deleted():
    numel = _safe_elements()
    params = _params([(numel,)], "cuda")
    gc.collect()  # earlier tests' garbage must not be freed inside the measurement
    live_before = paging.managed_memory()
    optimizer = d8.PagedAdamW32bit(params, lr=1e-3)
    _train(optimizer, params, 2)
    torch.cuda.synchronize()
    free_with, _ = torch.cuda.mem_get_info()
    assert paging.managed_memory() == (live_before[0] + 2, live_before[1] + 2 * numel * 4)
    del optimizer
    gc.collect()
    paging.free_pending()  # the release is stream-ordered: freed once its last kernels have run
    assert paging.managed_memory() == live_before
    free_without, _ = torch.cuda.mem_get_info()
    assert free_without - free_with >= 0.9 * 2 * numel * 4, (free_with, free_without)


@pytest.mark.usefixtures("paging_gpu")
@pytest.mark.gpu
def test_cuda_deleting_paged_states_does_not_wait_for_the_device():
    """The deleter records an event and returns; the memory is freed after the kernels queued before it."""
    params = _params([(_safe_elements(),)], "cuda")
    optimizer = d8.PagedAdamW32bit(params, lr=1e-3)
    _train(optimizer, params, 1)
    torch.cuda.synchronize()
    gc.collect()
    paging.free_pending()
    live_with = paging.managed_memory()
    torch.cuda._sleep(4_000_000_000)  # about two seconds of GPU work queued before the deletion
    start = time.perf_counter()
    del optimizer
    gc.collect()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"deleting the optimizer waited {elapsed:.2f} s for the device"
    assert paging.managed_memory() == live_with  # still pending: the sleep has not finished
    paging.free_pending()  # waits for the sleep, then frees
    assert paging.managed_memory() == (live_with[0] - 2, live_with[1] - 2 * params[0].numel() * 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_a_step_is_refused():
    params = _params([(256, 256)], "cuda")
    optimizer = d8.AdamW8bit(params, lr=1e-3)
    _train(optimizer, params, 1)  # warm-up outside the capture, as torch.cuda.graph asks
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the CUDA graph is empty"
        graph.capture_begin()
        try:
            with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
                optimizer.step()
        finally:
            graph.capture_end()
    _train(optimizer, params, 1, first=1)  # and eager steps still work afterwards
    torch.cuda.synchronize()


@pytest.mark.usefixtures("paging_gpu")
@pytest.mark.gpu
def test_cuda_failed_advice_is_a_status_and_leaves_no_cuda_error_behind():
    ops = native.operators()
    status = ops.advise([4096], [4096], torch.cuda.current_device(), True)  # an address nothing is mapped at
    if not status:
        pytest.skip("the driver accepted advice for an unmapped range on this system")
    assert status.startswith("cudaMemAdvise (prefer host) failed: ")
    x = torch.ones(1 << 20, device="cuda")
    assert float((x * 2).sum()) == 2 * (1 << 20)  # no stale error surfaces in torch's launch checks
