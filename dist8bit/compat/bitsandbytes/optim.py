"""bitsandbytes 0.50.2's optimizer classes, computed by dist8bit's kernels.

`import dist8bit.compat.bitsandbytes as bnb` lets a bitsandbytes script run
unchanged: every class of `bitsandbytes.optim` exists here with bitsandbytes'
positional signature, defaults, errors and update rule, which in places differ
from dist8bit's own (torch-like) classes. What bitsandbytes 0.50.2 computes,
read from its optimizer classes and its CPU update functions:

- `Adam`, `Adam8bit`, ... apply *decoupled* weight decay (`p *= 1 - lr*wd`):
  bitsandbytes' Adam is torch's AdamW (dist8bit's Adam is torch's Adam, L2).
- `SGD` / `LARS` need momentum > 0 and ignore `dampening` and `nesterov`:
  the buffer starts as the gradient, then `buf = momentum*buf + (g + wd*p)`.
- `LARS` is that momentum SGD with the update norm clipped to
  `max_unorm * ||p||` (default 0.02); there is no trust ratio.
- `LAMB` is Adam with decoupled decay whose update `m / (sqrt(v) + eps*sqrt(bc2))`
  has its norm clipped to `max_unorm * ||p||` (default 1.0); no trust ratio,
  and `bias_correction` / `adam_w_mode` are ignored.
- The clipping of LAMB and LARS happens only for parameters with 32-bit state:
  bitsandbytes' 8-bit update has no `max_unorm`, so `LAMB8bit` and `LARS8bit`
  never clip a parameter of `min_8bit_size` elements or more.
- `RMSprop` ignores `momentum`; `Adagrad` refuses `lr_decay` and
  `initial_accumulator_value` (ValueError).
- `Lion` and `AdEMAMix` are dist8bit's (their rules already agree).

Where bitsandbytes silently ignores an argument (amsgrad, dampening, nesterov,
RMSprop momentum, LAMB's bias_correction and adam_w_mode) this module ignores
it too, with a warning. Arguments beyond bitsandbytes 0.50.2's:
`optim_bits=8` on an 8-bit class (older releases accepted it; 8-bit states),
`optim_bits=8` on a 32-bit class (ignored, as bitsandbytes does, with a
warning), and the keyword-only `percentile_clipping` and `block_wise` of
releases before 0.45. An `args` object is honoured as bitsandbytes reads it:
its optim_bits, min_8bit_size and max_unorm (and percentile_clipping, where
present) replace the constructor's; `skip_zeros=True` is refused.

Differences that remain (docs/optimizers.md, "Coming from bitsandbytes"):
8-bit states of RMSprop and Adagrad use the unsigned dynamic map (bitsandbytes
wastes the sign bit on them), quantization rounds to the nearest code, non-finite
gradient elements are skipped, and state dicts are dist8bit's.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ... import optim as d8
from ...optim import GlobalOptimManager as GlobalOptimManager  # re-exported, as bitsandbytes.optim does
from ...optim.norms import clip_update_norm

_REQUIRED = inspect.Parameter.empty
# Keyword-only options of bitsandbytes releases before 0.45 (gone from 0.50.2's signatures).
_LEGACY_OPTIONS = (("percentile_clipping", 100), ("block_wise", True))
# Fields bitsandbytes reads from an `args` object instead of the constructor's arguments.
_ARGS_FIELDS = ("optim_bits", "min_8bit_size", "max_unorm", "percentile_clipping")


def _signature(fields: tuple[tuple[str, Any], ...]) -> inspect.Signature:
    """`params`, then `fields` in bitsandbytes' positional order, then the legacy keyword-only options."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("params", positional)]
    parameters += [inspect.Parameter(name, positional, default=default) for name, default in fields]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d) for name, d in _LEGACY_OPTIONS]
    return inspect.Signature(parameters)


def _ignored(cls_name: str, what: str) -> None:
    warnings.warn(f"{cls_name}: {what} is ignored, as bitsandbytes ignores it", UserWarning, stacklevel=4)


def _check_beta(cls_name: str, name: str, value: float) -> None:
    """bitsandbytes checks every value it passes as a beta (SGD's momentum and dampening, RMSprop's alpha and momentum)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{cls_name}: {name} must be in [0, 1), got {value!r}")


def _betas(betas: Any) -> tuple[float, ...]:
    """bitsandbytes' two-state optimizers also take betas as a string such as "(0.9, 0.999)"."""
    if isinstance(betas, str):
        return tuple(float(b) for b in betas.replace("(", "").replace(")", "").strip().split(","))
    return tuple(betas)


class _Compat:
    """Mixin: binds bitsandbytes' arguments and passes dist8bit's to the optimizer class after it.

    A public class names its bitsandbytes parameters (name, default, in
    bitsandbytes' positional order) and the settings it pins as class keywords,
    `class Adam8bit(_Adam, fields=_ADAM, optim_bits=8)`, kept in `bnb_fields`
    and `fixed`; its family turns the bound values into the dist8bit class's
    hyper-parameters in `_hyper`.
    """

    bnb_fields: ClassVar[tuple[tuple[str, Any], ...]] = ()
    fixed: ClassVar[dict[str, Any]] = {}
    __signature__: ClassVar[inspect.Signature]

    def __init_subclass__(cls, fields: tuple[tuple[str, Any], ...] | None = None, **fixed: Any) -> None:
        super().__init_subclass__()
        if fields is not None:
            cls.bnb_fields, cls.fixed = fields, fixed
        cls.__signature__ = _signature(cls.bnb_fields)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = type(self).__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        params = values.pop("params")
        hyper = self._hyper(values)
        super().__init__(params, **hyper, **self._options(values))

    # ------------------------------------------------------------- families
    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # -------------------------------------------------------------- options
    def _options(self, values: dict[str, Any]) -> dict[str, Any]:
        """dist8bit's options from bitsandbytes' optim_bits, args, min_8bit_size, max_unorm, is_paged."""
        name = type(self).__name__
        options = {
            "optim_bits": self._optim_bits(values),
            "min_8bit_size": values["min_8bit_size"],
            "percentile_clipping": values["percentile_clipping"],
            "block_wise": values["block_wise"],
        }
        if "max_unorm" in values:
            options["max_unorm"] = values["max_unorm"]
        is_paged = self.fixed.get("is_paged", values.get("is_paged", False))
        if not isinstance(is_paged, bool):
            raise TypeError(
                f"{name}: is_paged must be a bool, got {is_paged!r} (bitsandbytes releases before 0.45 had "
                "percentile_clipping in this position; pass it by keyword)"
            )
        options["is_paged"] = is_paged
        args = values.get("args")
        if args is not None:
            if getattr(args, "skip_zeros", False):
                raise ValueError(f"{name}: args.skip_zeros=True is not supported (dist8bit updates every element)")
            options.update({field: getattr(args, field) for field in _ARGS_FIELDS if hasattr(args, field)})
        return options

    def _optim_bits(self, values: dict[str, Any]) -> int:
        """The precision: the class's own, else the optim_bits argument."""
        name = type(self).__name__
        fixed = self.fixed.get("optim_bits")
        given = values.get("optim_bits")
        if fixed is None:
            return given if given is not None else 32
        default = dict(self.bnb_fields).get("optim_bits")
        if given is None or given == fixed or (given == default and fixed == 8):
            return fixed
        if fixed == 8:
            raise ValueError(f"{name} keeps 8-bit states: optim_bits may be 8 or its default {default}, got {given!r}")
        if given == 8:
            _ignored(name, "optim_bits=8 (it keeps 32-bit states)")
            return fixed
        raise ValueError(f"{name} keeps 32-bit states: optim_bits may only be 32, got {given!r}")


class _MaxUnormClipping:
    """bitsandbytes' max_unorm: the step is scaled so that the update's norm is at most max_unorm * ||p||,
    with ||p|| taken before the step. Its 8-bit update has no max_unorm: only 32-bit states clip.
    """

    clips_eight_bit_states: ClassVar[bool] = False

    def update_scale(self, config: dict[str, Any], norms: Any, step: int, bits: int) -> torch.Tensor | None:
        if config["max_unorm"] <= 0.0 or (bits != 32 and not self.clips_eight_bit_states):
            return None
        update_norms = norms.directions * self._norm_ratio(config, step)
        return clip_update_norm(config["max_unorm"], norms.params, update_norms)

    def _norm_ratio(self, config: dict[str, Any], step: int) -> float:
        """The norm of what bitsandbytes clips, over the norm of dist8bit's direction."""
        return 1.0


# ------------------------------------------------------------------- Adam
class _Adam(_Compat, d8.AdamW):
    """bitsandbytes' Adam and AdamW: torch's AdamW rule (decoupled weight decay) whatever the name."""

    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        if values["amsgrad"]:
            if self.fixed.get("optim_bits") == 8:
                raise ValueError(f"{type(self).__name__} does not support amsgrad=True")
            _ignored(type(self).__name__, "amsgrad=True")
        return {
            "lr": values["lr"],
            "betas": _betas(values["betas"]),
            "eps": values["eps"],
            "weight_decay": values["weight_decay"],
        }


def _adam_fields(weight_decay: float, *, optim_bits: bool = True, is_paged: bool = True) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", 1e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", weight_decay), ("amsgrad", False)]
    fields += [("optim_bits", 32)] if optim_bits else []
    fields += [("args", None), ("min_8bit_size", 4096)]
    return tuple(fields + ([("is_paged", False)] if is_paged else []))


_ADAM = _adam_fields(0)
_ADAMW = _adam_fields(1e-2)
_PAGED_ADAMW = _adam_fields(1e-2, is_paged=False)


# Adam and AdamW side by side, variant by variant: their signatures differ only in AdamW's weight_decay default
# and, as in bitsandbytes, in the is_paged parameter that PagedAdam* keep and PagedAdamW* lack.
class Adam(_Adam, fields=_ADAM):
    """bitsandbytes.optim.Adam: AdamW's rule (decoupled weight decay), 8-bit with optim_bits=8."""


class AdamW(_Adam, fields=_ADAMW):
    """bitsandbytes.optim.AdamW (weight_decay=1e-2 by default)."""


class Adam8bit(_Adam, fields=_ADAM, optim_bits=8): ...


class AdamW8bit(_Adam, fields=_ADAMW, optim_bits=8): ...


class Adam32bit(_Adam, fields=_ADAM, optim_bits=32): ...


class AdamW32bit(_Adam, fields=_ADAMW, optim_bits=32): ...


class PagedAdam(_Adam, fields=_ADAM, is_paged=True): ...


class PagedAdamW(_Adam, fields=_PAGED_ADAMW, is_paged=True): ...


class PagedAdam8bit(_Adam, fields=_ADAM, optim_bits=8, is_paged=True): ...


class PagedAdamW8bit(_Adam, fields=_PAGED_ADAMW, optim_bits=8, is_paged=True): ...


class PagedAdam32bit(_Adam, fields=_ADAM, optim_bits=32, is_paged=True): ...


class PagedAdamW32bit(_Adam, fields=_PAGED_ADAMW, optim_bits=32, is_paged=True): ...


# ------------------------------------------------------------------- LAMB
class _LAMB(_MaxUnormClipping, _Adam):
    """bitsandbytes' LAMB: Adam with decoupled decay and max_unorm clipping (32-bit states), no trust ratio."""

    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        if self.fixed.get("optim_bits") == 8 and values["max_unorm"] != 1.0:
            raise ValueError(f"{name} only supports max_unorm=1.0, as bitsandbytes' LAMB8bit")
        if not values["bias_correction"]:
            _ignored(name, "bias_correction=False")
        if not values["adam_w_mode"]:
            _ignored(name, "adam_w_mode=False")
        return super()._hyper(values)

    def _norm_ratio(self, config: dict[str, Any], step: int) -> float:
        """bitsandbytes measures m / (sqrt(v) + eps*sqrt(bc2)), which is bc1 / sqrt(bc2) times dist8bit's
        direction m_hat / (sqrt(v_hat) + eps)."""
        beta1, beta2 = config["betas"]
        return (1.0 - beta1**step) / math.sqrt(1.0 - beta2**step)


def _lamb_fields(*, optim_bits: bool) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0)]
    fields += [("amsgrad", False), ("adam_w_mode", True)] + ([("optim_bits", 32)] if optim_bits else [])
    return (*fields, ("args", None), ("min_8bit_size", 4096), ("max_unorm", 1.0))


class LAMB(_LAMB, fields=_lamb_fields(optim_bits=True)):
    """bitsandbytes.optim.LAMB: Adam (decoupled decay) with the update norm clipped to max_unorm * ||p||."""


class LAMB8bit(_LAMB, fields=_lamb_fields(optim_bits=False), optim_bits=8): ...


class LAMB32bit(_LAMB, fields=_lamb_fields(optim_bits=False), optim_bits=32): ...


# -------------------------------------------------------------- SGD, LARS
class _SGD(_Compat, d8.SGD):
    """bitsandbytes' momentum SGD: needs momentum > 0, ignores dampening and nesterov."""

    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        if values["momentum"] == 0:
            raise NotImplementedError(f"{name} without momentum is not supported (as in bitsandbytes)")
        _check_beta(name, "momentum", values["momentum"])
        _check_beta(name, "dampening", values["dampening"])
        if values["dampening"] != 0:
            _ignored(name, f"dampening={values['dampening']}")
        if values["nesterov"]:
            _ignored(name, "nesterov=True")
        return {"lr": values["lr"], "momentum": values["momentum"], "weight_decay": values["weight_decay"]}


def _sgd_fields(*, optim_bits: bool, max_unorm: float | None = None) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", _REQUIRED), ("momentum", 0), ("dampening", 0), ("weight_decay", 0), ("nesterov", False)]
    fields += [("optim_bits", 32)] if optim_bits else []
    fields += [("args", None), ("min_8bit_size", 4096)]
    return tuple(fields + ([("max_unorm", max_unorm)] if max_unorm is not None else []))


class SGD(_SGD, fields=_sgd_fields(optim_bits=True)):
    """bitsandbytes.optim.SGD: momentum SGD (momentum > 0 required)."""


class SGD8bit(_SGD, fields=_sgd_fields(optim_bits=False), optim_bits=8): ...


class SGD32bit(_SGD, fields=_sgd_fields(optim_bits=False), optim_bits=32): ...


class _LARS(_MaxUnormClipping, _SGD):
    """bitsandbytes' LARS: momentum SGD with ||buffer|| clipped to max_unorm * ||p|| (32-bit states); no trust ratio."""


class LARS(_LARS, fields=_sgd_fields(optim_bits=True, max_unorm=0.02)):
    """bitsandbytes.optim.LARS (max_unorm=0.02)."""


class LARS8bit(_LARS, fields=_sgd_fields(optim_bits=False, max_unorm=0.02), optim_bits=8): ...


class LARS32bit(_LARS, fields=_sgd_fields(optim_bits=False, max_unorm=0.02), optim_bits=32): ...


class PytorchLARS(_MaxUnormClipping, d8.SGD):
    """bitsandbytes.optim.PytorchLARS: torch's SGD (dampening and nesterov honoured) with the update
    norm clipped to max_unorm * ||p||; 32-bit states."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        max_unorm: float = 0.02,
    ) -> None:
        if momentum == 0:
            raise NotImplementedError("PytorchLARS without momentum is not supported (bitsandbytes' fails on it)")
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, max_unorm=max_unorm)


# ---------------------------------------------------------- Lion, AdEMAMix
class _Lion(_Compat, d8.Lion):
    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        return {"lr": values["lr"], "betas": tuple(values["betas"]), "weight_decay": values["weight_decay"]}


def _lion_fields(*, optim_bits: bool, is_paged: bool) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", 1e-4), ("betas", (0.9, 0.99)), ("weight_decay", 0)] + ([("optim_bits", 32)] if optim_bits else [])
    return (*fields, ("args", None), ("min_8bit_size", 4096), *([("is_paged", False)] if is_paged else []))


class _AdEMAMix(_Compat, d8.AdEMAMix):
    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        keys = ("lr", "alpha", "t_alpha", "t_beta3", "eps", "weight_decay")
        return {"betas": _betas(values["betas"]), **{key: values[key] for key in keys}}


def _ademamix_fields(*, optim_bits: bool, is_paged: bool) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", 1e-3), ("betas", (0.9, 0.999, 0.9999)), ("alpha", 5.0), ("t_alpha", None), ("t_beta3", None)]
    fields += [("eps", 1e-8), ("weight_decay", 1e-2)] + ([("optim_bits", 32)] if optim_bits else [])
    return (*fields, ("min_8bit_size", 4096), *([("is_paged", False)] if is_paged else []))


# Lion and AdEMAMix side by side, variant by variant: bitsandbytes gives both the same six variants.
class Lion(_Lion, fields=_lion_fields(optim_bits=True, is_paged=True)):
    """bitsandbytes.optim.Lion."""


class AdEMAMix(_AdEMAMix, fields=_ademamix_fields(optim_bits=True, is_paged=True)):
    """bitsandbytes.optim.AdEMAMix."""


class Lion8bit(_Lion, fields=_lion_fields(optim_bits=False, is_paged=True), optim_bits=8): ...


class AdEMAMix8bit(_AdEMAMix, fields=_ademamix_fields(optim_bits=False, is_paged=True), optim_bits=8): ...


class Lion32bit(_Lion, fields=_lion_fields(optim_bits=False, is_paged=True), optim_bits=32): ...


class AdEMAMix32bit(_AdEMAMix, fields=_ademamix_fields(optim_bits=False, is_paged=True), optim_bits=32): ...


class PagedLion(_Lion, fields=_lion_fields(optim_bits=True, is_paged=False), is_paged=True): ...


class PagedAdEMAMix(_AdEMAMix, fields=_ademamix_fields(optim_bits=True, is_paged=False), is_paged=True): ...


class PagedLion8bit(_Lion, fields=_lion_fields(optim_bits=False, is_paged=False), optim_bits=8, is_paged=True): ...


class PagedAdEMAMix8bit(_AdEMAMix, fields=_ademamix_fields(optim_bits=False, is_paged=False), optim_bits=8, is_paged=True): ...


class PagedLion32bit(_Lion, fields=_lion_fields(optim_bits=False, is_paged=False), optim_bits=32, is_paged=True): ...


class PagedAdEMAMix32bit(_AdEMAMix, fields=_ademamix_fields(optim_bits=False, is_paged=False), optim_bits=32, is_paged=True): ...


# ---------------------------------------------------------------- RMSprop
class _RMSprop(_Compat, d8.RMSprop):
    """bitsandbytes' RMSprop: ignores momentum; alpha=0 and centered=True are refused."""

    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        if values["alpha"] == 0:
            raise NotImplementedError(f"{name} with alpha=0 is not supported (as in bitsandbytes)")
        if values["centered"]:
            raise NotImplementedError(f"{name}: centered RMSprop is not supported (as in bitsandbytes)")
        _check_beta(name, "alpha", values["alpha"])
        _check_beta(name, "momentum", values["momentum"])
        if values["momentum"] != 0:
            _ignored(name, f"momentum={values['momentum']}")
        return {"lr": values["lr"], "alpha": values["alpha"], "eps": values["eps"], "weight_decay": values["weight_decay"]}


def _rmsprop_fields(*, optim_bits: bool) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", 1e-2), ("alpha", 0.99), ("eps", 1e-8), ("weight_decay", 0), ("momentum", 0), ("centered", False)]
    return (*fields, *([("optim_bits", 32)] if optim_bits else []), ("args", None), ("min_8bit_size", 4096))


class RMSprop(_RMSprop, fields=_rmsprop_fields(optim_bits=True)):
    """bitsandbytes.optim.RMSprop (no momentum)."""


class RMSprop8bit(_RMSprop, fields=_rmsprop_fields(optim_bits=False), optim_bits=8): ...


class RMSprop32bit(_RMSprop, fields=_rmsprop_fields(optim_bits=False), optim_bits=32): ...


# ---------------------------------------------------------------- Adagrad
class _Adagrad(_Compat, d8.Adagrad):
    """bitsandbytes' Adagrad: lr_decay and initial_accumulator_value must be 0 (ValueError otherwise)."""

    def _hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        for key in ("initial_accumulator_value", "lr_decay"):
            if values[key] != 0:
                raise ValueError(f"{type(self).__name__}: {key} != 0 is not supported (as in bitsandbytes)")
        return {"lr": values["lr"], "weight_decay": values["weight_decay"], "eps": values["eps"]}


def _adagrad_fields(optim_bits: int) -> tuple[tuple[str, Any], ...]:
    fields = [("lr", 1e-2), ("lr_decay", 0), ("weight_decay", 0), ("initial_accumulator_value", 0), ("eps", 1e-10)]
    return (*fields, ("optim_bits", optim_bits), ("args", None), ("min_8bit_size", 4096))


class Adagrad(_Adagrad, fields=_adagrad_fields(32)):
    """bitsandbytes.optim.Adagrad."""


class Adagrad8bit(_Adagrad, fields=_adagrad_fields(8), optim_bits=8): ...


class Adagrad32bit(_Adagrad, fields=_adagrad_fields(32), optim_bits=32): ...


# dist8bit.optim's public names (bitsandbytes' names) less its base class, plus bitsandbytes' PytorchLARS.
__all__ = sorted((set(d8.__all__) - {"Optimizer8bit"}) | {"PytorchLARS"})
