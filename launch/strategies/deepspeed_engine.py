"""DeepSpeed: `deepspeed.initialize` with the optimizer (and LR scheduler) named in a JSON config.

`import dist8bit` registers dist8bit's optimizer names with DeepSpeed, so a
config such as launch/configs/zero2_adamw8bit.json,

    {"optimizer": {"type": "AdamW8bit", "params": {"lr": 2e-3, ...}}, "zero_optimization": {"stage": 2}, ...}

builds the 8-bit optimizer inside DeepSpeed (over ZeRO's flat partitions for
stages 1-3), the same way HF Trainer or Accelerate would. The launcher only
fills in what its own flags define (see `effective_config`; with
`--dtype bf16 --master-weights compensated` that includes the bf16 keys that
give the optimizer bf16 partitions without an fp32 master: `resolve_master`), runs
engine.backward / engine.step, and checkpoints with engine.save_checkpoint /
load_checkpoint. ZeRO partitions the optimizer state by rank, so a checkpoint
resumes on the world size that wrote it.

DeepSpeed is imported only when this strategy runs (it is slow to import and
optional); on a machine without CUDA, DS_ACCELERATOR defaults to `cpu`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from launch import precision
from launch.model import GPT
from launch.optimizers import DEEPSPEED_TYPES, OPTIMIZERS, LaunchError
from launch.strategies.base import Strategy, state_dict_checksum

# Schedulers whose length the launcher fills in from --steps when the config leaves it out.
SCHEDULERS_WITH_TOTAL_STEPS = ("WarmupCosineLR", "WarmupDecayLR")
QUIET_STEPS_PER_PRINT = 1 << 30  # DeepSpeed logs every steps_per_print steps; the progress bar already shows them
# The "bf16" keys that make ZeRO 1-3 hand the optimizer bf16 partitions with no fp32 master (DeepSpeed 0.19;
# bf16_optimizer_states only stops DeepSpeed demanding its CPU Adam: see dist8bit/integrations/deepspeed_masters.py).
NO_MASTER_KEYS = ("bf16_master_weights_and_grads", "bf16_optimizer_states")


def read_config(path: Path | None) -> dict[str, Any]:
    """The JSON config at `path`, or an empty one (everything then comes from the launcher's flags)."""
    if path is None:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LaunchError(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise LaunchError(f"--deepspeed_config {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise LaunchError(f"--deepspeed_config {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _resolve(args: argparse.Namespace, explicit: set[str], flag: str, section: dict[str, Any], key: str) -> None:
    """An explicit flag overrides the config; otherwise the config's value, when present, becomes the flag's."""
    if flag in explicit or key not in section:
        section[key] = getattr(args, flag)
    else:
        setattr(args, flag, section[key])


def effective_config(raw: dict[str, Any], args: argparse.Namespace, explicit: set[str], world_size: int) -> dict[str, Any]:
    """The config DeepSpeed gets, and `args` updated to match it.

    Precedence: a flag given on the command line, then the JSON, then the
    launcher's default, key by key (batch size, clipping, ZeRO stage,
    optimizer type, lr, weight decay, betas, --dtype, --master-weights,
    --error-bits; `resolve_master` has the precision). The launcher runs one
    micro-batch per rank per step, so gradient_accumulation_steps must be 1
    and train_batch_size is derived; the scheduler and the other sections
    (precision, ZeRO options) pass through as written.
    Without a "scheduler" section the launcher's own warm-up + cosine schedule
    sets the learning rate; with one, DeepSpeed's scheduler does.
    """
    config = copy.deepcopy(raw)
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise LaunchError(
            f"the DeepSpeed config sets gradient_accumulation_steps={config['gradient_accumulation_steps']}; "
            "this launcher runs one micro-batch per step: set it to 1 and raise --batch-size instead"
        )
    _resolve(args, explicit, "batch_size", config, "train_micro_batch_size_per_gpu")
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = args.batch_size * world_size
    _resolve(args, explicit, "grad_clip", config, "gradient_clipping")
    _resolve(args, explicit, "zero_stage", config.setdefault("zero_optimization", {}), "stage")
    resolve_bf16(config, args, explicit)

    optimizer = config.setdefault("optimizer", {})
    if "optim" in explicit or "type" not in optimizer:
        if args.optim not in DEEPSPEED_TYPES:
            raise LaunchError(
                f"--optim {args.optim} has no DeepSpeed optimizer type; under --strategy deepspeed use one of "
                f"{', '.join(DEEPSPEED_TYPES)} (or name any registered type in the config's optimizer.type)"
            )
        optimizer["type"] = DEEPSPEED_TYPES[args.optim]
    else:
        by_type = {ds_type.lower(): name for name, ds_type in DEEPSPEED_TYPES.items()}
        args.optim = by_type.get(str(optimizer["type"]).lower(), str(optimizer["type"]))
    params = optimizer.setdefault("params", {})
    if args.optim in OPTIMIZERS:  # launcher defaults for the optimizer the config names
        _, default_lr, default_wd = OPTIMIZERS[args.optim]
        args.lr = default_lr if args.lr is None else args.lr
        args.weight_decay = default_wd if args.weight_decay is None else args.weight_decay
    for flag, key in (("lr", "lr"), ("weight_decay", "weight_decay")):
        if getattr(args, flag) is None and key not in params:
            raise LaunchError(
                f"the DeepSpeed config's optimizer {optimizer['type']} has no params.{key}; set it there or pass --{flag}"
            )
        _resolve(args, explicit, flag, params, key)
    betas = [float(b) for b in params.get("betas", (args.beta1, args.beta2))]
    for index, flag in enumerate(("beta1", "beta2")):
        if flag in explicit:
            betas[index] = getattr(args, flag)
    params["betas"] = betas
    args.beta1, args.beta2 = betas
    resolve_master(config, params, args, explicit)

    scheduler = config.get("scheduler")
    if scheduler and scheduler.get("type") in SCHEDULERS_WITH_TOTAL_STEPS:
        scheduler.setdefault("params", {}).setdefault("total_num_steps", args.steps)
    config.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    return config


def resolve_bf16(config: dict[str, Any], args: argparse.Namespace, explicit: set[str]) -> None:
    """--dtype and the config's "bf16" section, with the usual precedence: an explicit --dtype sets
    bf16.enabled, else the config's bf16.enabled sets --dtype (`resolve_master` then fits the section
    to the master mode)."""
    section = config.get("bf16", {})
    if "dtype" in explicit or not isinstance(section, dict) or "enabled" not in section:
        if args.dtype == "bf16" or "bf16" in config:
            config["bf16"] = {**(section if isinstance(section, dict) else {}), "enabled": args.dtype == "bf16"}
    else:
        args.dtype = "bf16" if section["enabled"] else "fp32"


def resolve_master(config: dict[str, Any], params: dict[str, Any], args: argparse.Namespace, explicit: set[str]) -> None:
    """--master-weights and --error-bits against the optimizer's params (flag, then JSON, then default),
    settled by launch/precision.py, then written where DeepSpeed and the optimizer read them.

    The default master is DeepSpeed's own fp32 one, unless the bf16 section asks for bf16 master
    weights (then "compensated"). A bf16 mode without a master ("none", "stochastic", "compensated")
    gets, under ZeRO 1-3, the bf16 keys that hand the optimizer bf16 partitions (NO_MASTER_KEYS);
    under ZeRO 0, whose bf16 mode always keeps float32 master copies, bf16 is disabled instead and
    DeepSpeed trains the bf16 model the launcher built as it is. "fp32" with --dtype bf16 is
    DeepSpeed's bf16 mode with its fp32 master (the JSON's bf16 master keys, if any, are turned off).
    """
    section = config.get("bf16") if isinstance(config.get("bf16"), dict) else {}
    if "master_weights" not in explicit and "master_weights" in params:
        args.master_weights = params["master_weights"]
    if "error_bits" not in explicit and "error_bits" in params:
        args.error_bits = params["error_bits"]
    wants_bf16_master = args.dtype == "bf16" and bool(section.get(NO_MASTER_KEYS[0]))
    precision.settle(args, default_bf16_master=precision.DEFAULT_BF16_MASTER if wants_bf16_master else "fp32")
    if args.master_weights != "fp32" or "master_weights" in params:
        params["master_weights"] = args.master_weights
    if args.error_bits is not None:
        params["error_bits"] = args.error_bits
    if args.dtype == "bf16":
        config["bf16"] = bf16_section(section, args.master_weights, config["zero_optimization"])


def bf16_section(section: dict[str, Any], master_weights: str, zero: dict[str, Any]) -> dict[str, Any]:
    """The "bf16" section for --dtype bf16 with `master_weights` under the ZeRO settings `zero`."""
    if master_weights == "fp32":  # DeepSpeed's bf16 mode and its fp32 master
        return {**section, "enabled": True, **{key: False for key in NO_MASTER_KEYS if key in section}}
    if zero["stage"] == 0:
        return {**{k: v for k, v in section.items() if k not in NO_MASTER_KEYS}, "enabled": False}
    offload = zero.get("offload_optimizer") or {}
    if str(offload.get("device", "none")).lower() != "none":
        raise LaunchError(
            f"--master-weights {master_weights} under ZeRO with offload_optimizer ({offload.get('device')}): DeepSpeed "
            "trains bf16 partitions without an fp32 master there only with its own DeepSpeedCPUAdam; drop "
            "offload_optimizer from the config (8-bit states are small enough to stay on the device) or use "
            "--master-weights fp32"
        )
    return {**section, "enabled": True, **dict.fromkeys(NO_MASTER_KEYS, True)}


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed built from the config, under its ZeRO / mixed-precision wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    resume_needs_same_world_size = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config: dict[str, Any] = {}  # set by configure(), before setup()
        self.engine = None
        self.scheduler = None

    def configure(self, explicit: set[str]) -> None:
        """Read the JSON and settle the effective config (and the args it changes) before anything is built."""
        self.config = effective_config(read_config(self.args.deepspeed_config), self.args, explicit, self.env.world_size)

    def setup(self, model: GPT) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed asserts these exist even when the process group is already up (a plain 1-process run has none).
        for name, value in (("RANK", self.env.rank), ("WORLD_SIZE", self.env.world_size), ("LOCAL_RANK", self.env.local_rank)):
            os.environ.setdefault(name, str(value))
        import deepspeed  # optional and slow to import: only when this strategy runs

        deepspeed.utils.logger.setLevel(logging.WARNING)
        # dist8bit's optimizer types are registered with DeepSpeed by `import dist8bit` (launch.optimizers).

        self.model = model
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.parameter_groups(self.args.weight_decay), config=self.config
        )
        self.module = self.engine

    def info(self) -> dict[str, Any]:
        import deepspeed

        return {
            "deepspeed": {
                "version": deepspeed.__version__,
                "zero_stage": self.engine.zero_optimization_stage(),
                "optimizer": type(self.base_optimizer()).__name__,
                "wrapper": type(self.engine.optimizer).__name__,
                "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
                "config": self.config,
            }
        }

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = self.engine(x, y)
        self.engine.backward(loss)
        self.engine.step()  # clips (gradient_clipping), steps, zeroes the gradients and steps the scheduler
        return loss

    @property
    def schedules_lr(self) -> bool:
        return self.scheduler is not None

    def set_lr(self, lr: float) -> None:
        if self.scheduler is None:
            super().set_lr(lr)

    def base_optimizer(self) -> torch.optim.Optimizer:
        return base_optimizer(self.engine.optimizer)

    def shards_optimizer_state(self) -> bool:
        return self.engine.zero_optimization_stage() >= 1

    def model_checksum(self) -> str:
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                return state_dict_checksum(self.model.state_dict())
        return state_dict_checksum(self.model.state_dict())

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise LaunchError(f"DeepSpeed found no checkpoint in {directory}")
