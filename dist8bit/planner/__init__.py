"""`dist8bit plan`: per-GPU and per-host memory of a training run, before anyone rents a cluster (docs/planner.md)."""

from .bytes_model import OPTIONS_ORDER, Cluster, Option, Plan, plan
from .model_shapes import PRESETS, ModelShape, model_from_params, preset

__all__ = ["OPTIONS_ORDER", "PRESETS", "Cluster", "ModelShape", "Option", "Plan", "model_from_params", "plan", "preset"]
