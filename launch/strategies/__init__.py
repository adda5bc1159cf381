"""Parallelism strategies for the pretraining launcher: none / ddp, fsdp, deepspeed (see base.Strategy)."""

from __future__ import annotations

import argparse

import torch

from launch.distributed import DistEnv
from launch.strategies.base import Strategy

NAMES = ("none", "ddp", "fsdp", "deepspeed")


def create(name: str, env: DistEnv, device: torch.device, args: argparse.Namespace) -> Strategy:
    """The strategy called `name`; FSDP and DeepSpeed are imported only when chosen."""
    if name in ("none", "ddp"):
        from launch.strategies.local import LocalStrategy

        return LocalStrategy(name, env, device, args)
    if name == "fsdp":
        from launch.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(env, device, args)
    if name == "deepspeed":
        from launch.strategies.deepspeed_engine import DeepSpeedStrategy

        return DeepSpeedStrategy(env, device, args)
    raise ValueError(f"unknown strategy {name!r}; choose one of {NAMES}")
