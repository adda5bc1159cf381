"""State of DTensor parameters (FSDP2 `fully_shard`, or any dim-0 sharded DTensor).

The optimizer updates each rank's local shard. For 8-bit and 4-bit state the block size
is chosen so that blocks never cross a dim-0 row (the largest power of two,
at most the configured block size and at least 64, that divides the row
length). FSDP2 cuts shards at row boundaries, so every shard starts on a block
boundary: the per-rank scales then form a [rows, row_elems / blocksize]
tensor that shards exactly like the parameter along dim 0. The state dict
exposes codes and scales as DTensors with the parameter's placements, so
torch.distributed.checkpoint saves every rank's own scales (never a "replicated"
plain tensor, which DCP would de-duplicate) and reshards them to any number of
ranks, and the precision and the blocks are the same on 1, 2 or N ranks.
4-bit codes (two per byte, dist8bit.quant.packing) are exported the same way as
a [rows, row_elems / 2] byte tensor: a row holds a whole number of blocks of
even size, so every row's codes are whole bytes and shard with their rows.

Parameters whose rows are not a multiple of 64 elements (1-D parameters, odd
widths) keep 32-bit state when they are DTensors: no block layout exists for
them that survives resharding.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..quant.layout import MIN_BLOCKSIZE
from .state import ABSMAX_SUFFIX, CODES_SUFFIX


def is_dtensor(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def row_elems(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) >= 1 else 1


def check_placements(param: DTensor) -> None:
    for placement in param.placements:
        if not isinstance(placement, (Replicate, Shard)) or (isinstance(placement, Shard) and placement.dim != 0):
            raise ValueError(
                f"DTensor parameter of shape {tuple(param.shape)} has placements {param.placements}; dist8bit optimizers "
                "support dim-0 sharding (Shard(0), FSDP2's default) and Replicate; use fully_shard without a custom "
                "shard_placement_fn"
            )


def row_aligned_blocksize(shape: torch.Size, blocksize: int) -> int | None:
    """Largest power-of-two block size in [64, blocksize] dividing a dim-0 row, or None."""
    if len(shape) < 2:
        return None
    elems = row_elems(shape)
    size = blocksize
    while size >= MIN_BLOCKSIZE:
        if elems % size == 0:
            return size
        size //= 2
    return None


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements) and param.device_mesh.size() > 1


def _local_rows(param: DTensor) -> tuple[int, int]:
    """(first global row, number of rows) of this rank's shard."""
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], shape[0]


def state_to_dtensor(param: DTensor, value: torch.Tensor, per_entry: int | None) -> DTensor:
    """A local state tensor as a DTensor laid out like `param`: shaped like it for `per_entry`
    None (8-bit codes, 32-bit values), else [rows, row_elems / per_entry], one entry per
    `per_entry` elements of a row (scales: per_entry = blocksize; 4-bit codes: 2)."""
    if per_entry is None:
        shape, stride = param.shape, param.stride()
        local_value = value.view(param.to_local().shape)
    else:
        columns = row_elems(param.shape) // per_entry
        shape, stride = torch.Size((param.shape[0], columns)), (columns, 1)
        local_value = value.view(-1, columns)
    return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride)


def local_state(param: DTensor, value: torch.Tensor, per_entry: int | None, name: str) -> torch.Tensor:
    """This rank's part of a saved state tensor (laid out as state_to_dtensor says for `per_entry`):
    a DTensor's local shard, or rows sliced from a full tensor."""
    local_param = param.to_local()
    first, count = _local_rows(param)
    if per_entry is None:
        expected_global, expected_local = tuple(param.shape), tuple(local_param.shape)
    else:
        columns = row_elems(param.shape) // per_entry
        expected_global, expected_local = (param.shape[0], columns), (count, columns)
    if isinstance(value, DTensor):
        if tuple(value.shape) != expected_global or value.placements != param.placements:
            raise ValueError(
                f"{name}: saved DTensor of shape {tuple(value.shape)} with placements {value.placements} does not match "
                f"the parameter's layout (shape {expected_global}, placements {param.placements})"
            )
        part = value.to_local()
    else:
        if tuple(value.shape) != expected_global:
            raise ValueError(f"{name}: saved tensor has shape {tuple(value.shape)}, expected the full shape {expected_global}")
        part = value.narrow(0, first, count) if len(expected_global) else value
    if tuple(part.shape) != expected_local:
        raise ValueError(f"{name}: this rank's part has shape {tuple(part.shape)}, expected {expected_local}")
    return part.reshape(-1) if per_entry is not None else part.reshape(local_param.shape)


def elements_per_entry(key: str, bits: int, blocksize: int | None) -> int | None:
    """How a DTensor parameter's state entry `key` is laid out (state_to_dtensor's `per_entry`):
    scales one per block, 4-bit codes one byte per 2 elements, anything else like the parameter."""
    if key.endswith(ABSMAX_SUFFIX):
        return blocksize
    if key.endswith(CODES_SUFFIX) and bits == 4:
        return 2
    return None
