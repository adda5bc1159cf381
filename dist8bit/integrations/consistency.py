"""Refuse to train when ranks disagree about the model's parameters.

Ranks built from different code or configs (another model size, a parameter
frozen on one rank only) otherwise fail deep inside a collective, or hang, or
worse, pair up the wrong tensors silently. One small all-gather of a
fingerprint before training turns that into an error that names the first
difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.distributed as dist


def parameter_signature(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, full shape, dtype) per parameter, in order; DTensors report their global shape."""
    return [(name, tuple(param.shape), str(param.dtype)) for name, param in named_params]


def check_same_parameters(named_params: Iterable[tuple[str, torch.Tensor]], group: dist.ProcessGroup | None = None) -> None:
    """Raise ValueError on every rank if the ranks' parameter lists differ (no-op without torch.distributed)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    signature = parameter_signature(named_params)
    digest = hashlib.sha256(repr(signature).encode()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) == 1:
        return
    signatures: list[list | None] = [None] * len(digests)
    dist.all_gather_object(signatures, signature, group=group)
    raise ValueError(_describe_difference(signatures))


def _describe_difference(signatures: list) -> str:
    reference = signatures[0]
    for rank, signature in enumerate(signatures[1:], start=1):
        if signature == reference:
            continue
        for index, (mine, theirs) in enumerate(zip(reference, signature, strict=False)):
            if mine != theirs:
                return (
                    f"ranks 0 and {rank} build different models: parameter #{index} is {mine} on rank 0 but {theirs} "
                    f"on rank {rank}; every rank must construct the same model with the same config"
                )
        return (
            f"ranks 0 and {rank} build different models: rank 0 has {len(reference)} parameters, rank {rank} has "
            f"{len(signature)}; every rank must construct the same model with the same config"
        )
    return "ranks build different models"
