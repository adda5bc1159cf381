"""The optimizer loop shared by every dist8bit optimizer.

A step groups the parameters that can share one kernel launch (same device,
dtypes, precision and constants), turns each group into a list of segments
and calls the backend's fused multi-tensor step once per group: no per-
parameter launches and no host synchronisation. Subclasses only say which
states their rule keeps and which constants it needs.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..backends import backend_for
from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay, constants
from ..functional import codebook_for
from ..quant.codebook import Codebook
from ..quant.layout import DEFAULT_BLOCKSIZE, check_blocksize, num_blocks
from ..quant.maps import create_dynamic_map
from . import state as state_layout
from .overrides import GlobalOptimManager

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HISTORY = 100  # steps of gradient norms kept for percentile clipping
SEGMENT_STRIDE = 1 << 40  # random-number counter range reserved per parameter
# Flags torch.optim groups carry that dist8bit optimizers do not implement; a
# torch state dict loads only when they are off.
TORCH_ONLY_FLAGS = ("foreach", "maximize", "capturable", "differentiable", "fused", "amsgrad", "decoupled_weight_decay")
PRECISION_KEYS = ("optim_bits", "min_8bit_size", "blocksize")


def _check_common(optim_bits: int, min_8bit_size: int, percentile_clipping: int, max_unorm: float, block_wise: bool) -> None:
    if optim_bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
    if not isinstance(percentile_clipping, int) or not 1 <= percentile_clipping <= 100:
        raise ValueError(f"percentile_clipping must be an int in [1, 100] (100 = off), got {percentile_clipping!r}")
    if not max_unorm >= 0.0:
        raise ValueError(f"max_unorm must be >= 0 (0 = off), got {max_unorm!r}")
    if not block_wise:
        raise ValueError("block_wise=False is not supported: dist8bit always quantizes block-wise (see `blocksize`)")


def check_lr(lr: float) -> None:
    if not isinstance(lr, (float, int)) or not lr >= 0.0:
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")


def check_betas(betas: Iterable[float], count: int) -> tuple[float, ...]:
    betas = tuple(betas)
    if len(betas) != count:
        raise ValueError(f"betas must hold {count} values, got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{index}] must be in [0, 1), got {beta!r}")
    return betas


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


class Optimizer8bit(torch.optim.Optimizer):
    """Base class: state layout, grouping into fused launches, state dicts."""

    rule: Rule

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        is_paged: bool = False,
        blocksize: int = DEFAULT_BLOCKSIZE,
        stochastic_rounding: bool = False,
    ) -> None:
        """Options every optimizer takes as keywords (bitsandbytes' names, plus
        `blocksize` and `stochastic_rounding`); subclasses pass them through."""
        if args is not None:
            raise ValueError("args= (bitsandbytes' argument namespace) is not supported; pass keyword arguments")
        check_lr(defaults["lr"])
        _check_common(optim_bits, min_8bit_size, percentile_clipping, max_unorm, block_wise)
        check_blocksize(blocksize)
        if is_paged:
            warnings.warn(
                "is_paged=True: paged (CUDA unified memory) states are not available in this build; "
                "states use ordinary device memory",
                RuntimeWarning,
                stacklevel=3,
            )
        defaults = {
            **defaults,
            "optim_bits": optim_bits,
            "min_8bit_size": min_8bit_size,
            "percentile_clipping": percentile_clipping,
            "max_unorm": float(max_unorm),
            "block_wise": True,
            "is_paged": bool(is_paged),
            "blocksize": blocksize,
        }
        self._logical_numel: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._param_uid: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.stochastic_rounding = stochastic_rounding
        self._rounding_seed = torch.initial_seed() % (1 << 62)
        self.nonfinite_counts: dict[torch.device, torch.Tensor] = {}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen: set[int] = set()
        for param in params:
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"optimizer params must be tensors, got {type(param).__name__}")
            if id(param) in seen:
                raise ValueError(f"a parameter of shape {tuple(param.shape)} is listed twice in one param group")
            seen.add(id(param))
            if param.is_complex() or param.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} has dtype {param.dtype}; dist8bit optimizers "
                    "support float32, float16 and bfloat16 parameters (view complex tensors with torch.view_as_real)"
                )
            # Precision is decided by the full parameter's size, recorded now so
            # that later sharding (ZeRO, FSDP) cannot change it.
            self._logical_numel.setdefault(param, param.numel())
            self._param_uid.setdefault(param, len(self._param_uid))
        for key in ("optim_bits", "min_8bit_size", "percentile_clipping", "max_unorm", "block_wise"):
            if key in param_group:
                _check_common(
                    param_group.get("optim_bits", self.defaults["optim_bits"]),
                    param_group.get("min_8bit_size", self.defaults["min_8bit_size"]),
                    param_group.get("percentile_clipping", self.defaults["percentile_clipping"]),
                    param_group.get("max_unorm", self.defaults["max_unorm"]),
                    param_group.get("block_wise", True),
                )
                break
        if "lr" in param_group:
            check_lr(param_group["lr"])
        super().add_param_group({**param_group, "params": params})

    # ------------------------------------------------------ subclass contract
    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        raise NotImplementedError

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        raise NotImplementedError

    def weight_decay_mode(self, config: dict[str, Any]) -> WeightDecay:
        return WeightDecay.L2

    def implied_torch_flags(self) -> dict[str, Any]:
        """torch.optim group flags this optimizer's semantics fix (accepted when equal)."""
        return {}

    def initial_state_value(self, config: dict[str, Any]) -> float:
        return 0.0

    def update_scale(
        self,
        config: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        direction_norms: Callable[[], torch.Tensor],
    ) -> torch.Tensor | None:
        """Per-segment multiplier of the step (trust ratios, max_unorm); None when 1."""
        if config["max_unorm"] <= 0.0:
            return None
        return clip_update_norm(config["max_unorm"], parameter_norms(params), direction_norms().sqrt().float())

    # ----------------------------------------------------------- the config
    def resolved_config(self, param: torch.Tensor, group: dict[str, Any], overrides: WeakIdKeyDictionary) -> dict[str, Any]:
        """The group's settings with this parameter's overrides on top."""
        override = overrides.get(param)
        if not override:
            return group
        unknown = sorted(set(override) - set(group))
        if unknown:
            raise ValueError(
                f"override for parameter of shape {tuple(param.shape)} has unknown keys {unknown}; "
                f"{type(self).__name__} understands {sorted(k for k in group if k != 'params')}"
            )
        return {**group, **override}

    def uses_eight_bit(self, param: torch.Tensor, config: dict[str, Any]) -> bool:
        numel = self._logical_numel.get(param, param.numel())
        return config["optim_bits"] == 8 and numel >= config["min_8bit_size"]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        overrides = GlobalOptimManager.get_instance().overrides()
        batches: dict[tuple, list] = defaultdict(list)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._check_grad(param)
                config = self.resolved_config(param, group, overrides)
                state = self.state[param]
                if not state:
                    self._init_state(param, state, config)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor: no device sync
                specs = self.state_specs(config)
                eight_bit = state_layout.is_eight_bit(state, specs)
                hyper = tuple(constants(self.step_constants(config, step)))
                key = (param.device, param.dtype, param.grad.dtype, eight_bit, hyper, step, _batch_key(config))
                batches[key].append((param, state, config, specs))
        for (device, _, _, eight_bit, hyper, step, _), members in batches.items():
            self._launch(device, eight_bit, list(hyper), step, members)
        return loss

    def _check_grad(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter of shape {tuple(param.shape)}); "
                "use torch.nn.Embedding(sparse=False) or torch.optim.SparseAdam"
            )
        if grad.dtype not in FLOAT_DTYPES or grad.shape != param.shape or grad.device != param.device:
            raise RuntimeError(
                f"gradient of parameter of shape {tuple(param.shape)} has dtype {grad.dtype}, shape {tuple(grad.shape)} "
                f"and device {grad.device}; it must be a float tensor shaped like the parameter on {param.device}"
            )

    def _init_state(self, param: torch.Tensor, state: dict[str, Any], config: dict[str, Any]) -> None:
        specs = self.state_specs(config)
        eight_bit = self.uses_eight_bit(param, config)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state.update(state_layout.allocate(param, specs, eight_bit, config["blocksize"], self.initial_state_value(config)))
        if config["percentile_clipping"] < 100:
            state["grad_norm_history"] = torch.full((HISTORY,), math.inf, dtype=torch.float32, device=param.device)

    def _launch(self, device: torch.device, eight_bit: bool, hyper: list[float], step: int, members: list) -> None:
        config, specs = members[0][2], members[0][3]
        params = [m[0] for m in members]
        states = [m[1] for m in members]
        blocksize = config["blocksize"]
        grads = [p.grad.contiguous() for p in params]
        contiguous = [p if p.is_contiguous() else p.contiguous() for p in params]
        slots: list[list[torch.Tensor]] = [[], [], []]
        scales: list[list[torch.Tensor]] = [[], [], []]
        codebooks = [None, None, None]
        for slot, spec in enumerate(specs):
            if eight_bit:
                slots[slot] = [s[spec.name + state_layout.CODES_SUFFIX] for s in states]
                scales[slot] = [s[spec.name + state_layout.ABSMAX_SUFFIX] for s in states]
                codebooks[slot] = _state_codebook(spec.signed, device)
            else:
                slots[slot] = [s[spec.name] for s in states]
        offsets = [self._param_uid.get(p, 0) * SEGMENT_STRIDE for p in params]
        backend = backend_for(device)
        seed = None
        if self.stochastic_rounding and params[0].dtype == torch.bfloat16:
            seed = (self._rounding_seed ^ (step * 0x9E3779B97F4A7C15)) & ((1 << 62) - 1)

        def run(grad_scale, update_scale, norm_out=None, nonfinite=None):
            backend.fused_step(
                self.rule,
                self.weight_decay_mode(config),
                hyper,
                contiguous,
                grads,
                slots,
                scales,
                codebooks,
                grad_scale,
                update_scale,
                norm_out,
                nonfinite,
                offsets,
                blocksize,
                seed,
            )

        grad_scale = None
        if config["percentile_clipping"] < 100:
            grad_scale = percentile_clip(states, grads, step, config["percentile_clipping"])

        def direction_norms() -> torch.Tensor:
            norms = torch.zeros(len(params), dtype=torch.float64, device=device)
            run(grad_scale, None, norm_out=norms)
            return norms

        update_scale = self.update_scale(config, contiguous, grads, direction_norms)
        counter = self.nonfinite_counts.setdefault(device, torch.zeros(1, dtype=torch.int64, device=device))
        run(grad_scale, update_scale, nonfinite=counter)
        for param, updated in zip(params, contiguous, strict=True):
            if updated is not param:
                param.copy_(updated)

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["dist8bit_state_version"] = state_layout.STATE_FORMAT_VERSION
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups but {type(self).__name__} has {len(self.param_groups)}"
            )
        for group in saved_groups:
            version = group.get("dist8bit_state_version", state_layout.STATE_FORMAT_VERSION)
            if version > state_layout.STATE_FORMAT_VERSION:
                raise ValueError(
                    f"state dict format version {version} is newer than this dist8bit supports "
                    f"({state_layout.STATE_FORMAT_VERSION}); upgrade dist8bit"
                )
        merged_groups = [
            self._merge_saved_group(saved, current) for saved, current in zip(saved_groups, self.param_groups, strict=True)
        ]
        id_to_param = {}
        for saved, current in zip(saved_groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(
                    f"a saved param group has {len(saved['params'])} parameters but the optimizer's has {len(current['params'])}"
                )
            id_to_param.update(zip(saved["params"], current["params"], strict=True))
        overrides = GlobalOptimManager.get_instance().overrides()
        group_of = {id(p): merged for merged, g in zip(merged_groups, self.param_groups, strict=True) for p in g["params"]}
        for saved_id, saved_state in state_dict["state"].items():
            param = id_to_param.get(saved_id)
            if param is None:
                raise ValueError(f"the state dict holds state for parameter id {saved_id}, which no param group lists")
            self._check_saved_state(param, saved_state, self.resolved_config(param, group_of[id(param)], overrides))
        state_dict = {**state_dict, "param_groups": merged_groups}
        originals = {key: dict(value) for key, value in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype; dist8bit keeps
        # float32 states and scales whatever the parameter dtype is.
        for saved_id, entries in originals.items():
            param = id_to_param[saved_id]
            for key, value in entries.items():
                if key == "step":
                    # A fresh CPU tensor: torch would share the loaded one, so two
                    # optimizers loaded from one dict would count each other's steps.
                    self.state[param][key] = torch.tensor(float(value), dtype=torch.float32)
                elif isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device, copy=True)

    def _merge_saved_group(self, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """Saved hyper-parameters over current defaults; torch-only flags must be off."""
        merged = {**{k: v for k, v in current.items() if k != "params"}, **saved}
        # Precision is this optimizer's choice, not the checkpoint's: a mismatch
        # must surface as an error below, never silently switch the precision.
        for key in PRECISION_KEYS:
            merged[key] = current[key]
        implied = self.implied_torch_flags()
        for key in set(saved) - set(current):
            if key in implied and saved[key] != implied[key]:
                raise ValueError(
                    f"the state dict's param group sets {key}={saved[key]!r}, but {type(self).__name__} implies {implied[key]!r}"
                )
            if key in TORCH_ONLY_FLAGS and key not in implied and saved[key] not in (False, None):
                raise ValueError(
                    f"the state dict's param group sets {key}={saved[key]!r}, which {type(self).__name__} does not support"
                )
            if key not in TORCH_ONLY_FLAGS and key not in ("params", "param_names", "dist8bit_state_version", "initial_lr"):
                raise ValueError(
                    f"the state dict's param group has key {key!r}, which {type(self).__name__} does not have: "
                    "was it saved by another optimizer?"
                )
            if key in TORCH_ONLY_FLAGS:
                del merged[key]
        return merged

    def _check_saved_state(self, param: torch.Tensor, saved: dict[str, Any], config: dict[str, Any]) -> None:
        where = f"parameter of shape {tuple(param.shape)}"
        if not saved:
            return
        specs = self.state_specs(config)
        eight_bit = self.uses_eight_bit(param, config)
        expected = {name for spec in specs for name in state_layout.expected_entries(spec, eight_bit)}
        other = {name for spec in specs for name in state_layout.expected_entries(spec, not eight_bit)}
        present = {k for k, v in saved.items() if isinstance(v, torch.Tensor) and k not in ("step", "grad_norm_history")}
        if present & other and specs:
            have, want = ("8-bit", "32-bit") if eight_bit is False else ("32-bit", "8-bit")
            raise ValueError(
                f"{where}: the state dict holds {have} state ({sorted(present & other)}) but {type(self).__name__} keeps "
                f"{want} state for it (optim_bits={config['optim_bits']}, min_8bit_size={config['min_8bit_size']}); "
                f"convert the checkpoint (dist8bit convert --to {'fp32' if want == '32-bit' else '8bit'}) "
                f"or construct the optimizer with matching optim_bits"
            )
        if present != expected:
            raise ValueError(
                f"{where}: the state dict holds {sorted(present)} but {type(self).__name__} expects {sorted(expected)}; "
                "was it saved by another optimizer or with other settings (momentum, centered, ...)?"
            )
        if "step" not in saved:
            raise ValueError(f"{where}: the state dict has no 'step'")
        for spec in specs:
            if eight_bit:
                codes = saved[spec.name + state_layout.CODES_SUFFIX]
                absmax = saved[spec.name + state_layout.ABSMAX_SUFFIX]
                blocks = num_blocks(param.numel(), config["blocksize"])
                if codes.dtype != torch.uint8 or codes.shape != param.shape:
                    raise ValueError(
                        f"{where}: {spec.name}_codes must be uint8 of shape {tuple(param.shape)}, got {codes.dtype} {tuple(codes.shape)}"
                    )
                if absmax.dtype != torch.float32 or absmax.numel() != blocks:
                    raise ValueError(
                        f"{where}: {spec.name}_absmax must be float32 with {blocks} scales (blocksize {config['blocksize']}), "
                        f"got {absmax.dtype} with {absmax.numel()}"
                    )
            else:
                value = saved[spec.name]
                if not value.is_floating_point() or value.shape != param.shape:
                    raise ValueError(
                        f"{where}: {spec.name} must be a float tensor of shape {tuple(param.shape)}, got {value.dtype} {tuple(value.shape)}"
                    )

    # ---------------------------------------------------------- reporting
    def state_bytes(self) -> int:
        """Bytes held by all optimizer state tensors (excluding the scalar steps)."""
        return sum(state_layout.state_bytes(s) for s in self.state.values())


def _batch_key(config: dict[str, Any]) -> tuple:
    """Settings that change the launch itself (beyond the constant vector)."""
    return tuple((k, repr(config[k])) for k in sorted(config) if k != "params")


@lru_cache(maxsize=16)
def _state_codebook(signed: bool, device: torch.device) -> Codebook:
    """The dynamic map's codebook for a state slot, built once per device (not per step)."""
    return codebook_for(create_dynamic_map(signed=signed), device)


def parameter_norms(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([n.float() for n in torch._foreach_norm(params)])


def clip_update_norm(max_unorm: float, param_norms: torch.Tensor, update_norms: torch.Tensor) -> torch.Tensor:
    """Scale that limits each update's norm to max_unorm * ||p|| (bitsandbytes' max_unorm)."""
    limit = max_unorm * param_norms
    return torch.where(update_norms > limit, limit / update_norms, torch.ones_like(update_norms))


def percentile_clip(states: list[dict], grads: list[torch.Tensor], step: int, percentile: int) -> torch.Tensor:
    """Gradient scale clipping each norm to the given percentile of its last 100 norms."""
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    histories = [s["grad_norm_history"] for s in states]
    slot = (step - 1) % HISTORY
    stacked = torch.stack(histories)
    stacked[:, slot] = norms
    torch._foreach_copy_(histories, list(stacked.unbind(0)))
    observed = min(step, HISTORY)
    rank = max(math.ceil(percentile / 100 * observed) - 1, 0)
    clip_value = torch.sort(stacked, dim=1).values[:, rank]
    return torch.where(norms > clip_value, clip_value / norms, torch.ones_like(norms))
