"""How one parameter's optimizer state is stored and named.

A state buffer named N (torch's name, e.g. exp_avg) is kept at one of three
precisions (`bits`):
    32: N            float32, shaped like the parameter
     8: N_codes      uint8, shaped like the parameter, one code per element
     4: N_codes      uint8, 1-D, ceil(numel / 2) bytes: two codes per byte
                     (dist8bit.quant.packing, in the parameter's element order)
    8 and 4 also:    N_absmax  float32, one scale per block of `blocksize` elements
plus `step` (a float32 scalar tensor, as in torch.optim). The 32-bit names
are torch's, so a torch.optim state dict loads into a 32-bit dist8bit
optimizer. The separate quantized names make it impossible to mistake codes
for values (DeepSpeed's tooling reads any `exp_avg` as float data). 8-bit and
4-bit states have the same names: the optimizer's resolved config says which
precision a parameter has, and loading checks the sizes against it.
"""

from __future__ import annotations

import torch

from ..backends.rules import StateSpec
from ..paging.allocation import new_state_tensor
from ..quant.layout import num_blocks
from ..quant.maps import create_dynamic_map, create_dynamic_map_4bit, create_linear_map_4bit
from ..quant.packing import code_bytes

# Saved in every param group as `dist8bit_state_version`. 1: the first format;
# 2: flat (ZeRO) buffers' packed state pads each segment's run to 16 bytes
# (see segments.py); 3: a flat buffer's `segment_table` stores each segment's
# bits (32, 8 or 4) where versions 1-2 stored 0/1 for 32/8. Per-parameter
# state is the same in all three.
STATE_FORMAT_VERSION = 3
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"

# The precisions a state can have, in bits per element.
PRECISIONS = (32, 8, 4)
# Fill byte of a quantized state that starts at a non-zero value (Adagrad's
# initial_accumulator_value): a block of equal values encodes as the map's 1.0
# times that value, and 1.0 is the last entry of every state map (code 255 in
# the 8-bit maps, 15 in the 4-bit ones, and 0xFF is two 15s).
FILL_AT_ONE = 0xFF


def is_quantized(bits: int) -> bool:
    return bits != 32


def precision_name(bits: int) -> str:
    """ "32-bit", "8-bit" or "4-bit", for messages."""
    return f"{bits}-bit"


def as_bits(value: int | bool) -> int:
    """A precision as bits: 32, 8 or 4 as they are, and the 0/1 (False/True) flags that state
    format versions 1-2 (and older callers) used for 32-bit/8-bit."""
    if value is True or value is False or value in (0, 1):
        return 8 if value else 32
    if value not in PRECISIONS:
        raise ValueError(f"a state precision is one of {PRECISIONS} bits (or a 0/1 flag for 32/8), got {value!r}")
    return int(value)


def state_map(signed: bool, bits: int) -> torch.Tensor:
    """The map a quantized state slot is coded with: the dynamic map (signed for
    first moments, unsigned for second moments and sums) at 8 bits; at 4 bits the
    signed dynamic map for signed slots and the linear map without zero for
    unsigned ones (Li, Chen, Zhu 2023: a second moment must never decode to 0)."""
    if bits == 8:
        return create_dynamic_map(signed=signed)
    if bits == 4:
        return create_dynamic_map_4bit(True) if signed else create_linear_map_4bit()
    raise ValueError(f"only 8-bit and 4-bit states have a map, got {bits}")


def expected_entries(spec: StateSpec, bits: int) -> tuple[str, ...]:
    return (spec.name + CODES_SUFFIX, spec.name + ABSMAX_SUFFIX) if is_quantized(as_bits(bits)) else (spec.name,)


def codes_shape(shape: torch.Size, bits: int) -> tuple[int, ...]:
    """Shape of a parameter's codes: the parameter's at 8 bits, 1-D ceil(numel / 2) at 4 bits."""
    return tuple(shape) if bits == 8 else (code_bytes(shape.numel(), bits),)


def allocate(
    param: torch.Tensor,
    specs: tuple[StateSpec, ...],
    bits: int,
    blocksize: int,
    initial: float = 0.0,
    *,
    paged: bool = False,
) -> dict[str, torch.Tensor]:
    """Fresh zero state (or `initial`, Adagrad's accumulator) for one parameter
    at `bits` (32, 8 or 4); in managed memory when `paged` (see
    dist8bit.paging.new_state_tensor)."""
    bits = as_bits(bits)
    state: dict[str, torch.Tensor] = {}
    device = param.device
    for spec in specs:
        if not is_quantized(bits):
            state[spec.name] = new_state_tensor(param.shape, torch.float32, device, initial, paged=paged)
            continue
        codes_fill = FILL_AT_ONE if initial != 0.0 else 0
        blocks = (num_blocks(param.numel(), blocksize),)
        codes = codes_shape(param.shape, bits)
        state[spec.name + CODES_SUFFIX] = new_state_tensor(codes, torch.uint8, device, codes_fill, paged=paged)
        state[spec.name + ABSMAX_SUFFIX] = new_state_tensor(blocks, torch.float32, device, initial, paged=paged)
    return state


def allocate_packed(
    device: torch.device,
    specs: tuple[StateSpec, ...],
    codes_numel: int,
    blocks: int,
    values_numel: int,
    initial: float = 0.0,
    *,
    paged: bool = False,
) -> dict[str, torch.Tensor]:
    """Fresh packed state of a flat buffer (see segments.py): quantized segments'
    code bytes and scales, and 32-bit segments' values, each run at the offset
    segments.packed_layout gives it; in managed memory when `paged`."""
    state: dict[str, torch.Tensor] = {}
    codes_fill = FILL_AT_ONE if initial != 0.0 else 0
    for spec in specs:
        if codes_numel:
            state[spec.name + CODES_SUFFIX] = new_state_tensor((codes_numel,), torch.uint8, device, codes_fill, paged=paged)
            state[spec.name + ABSMAX_SUFFIX] = new_state_tensor((blocks,), torch.float32, device, initial, paged=paged)
        if values_numel:
            state[spec.name] = new_state_tensor((values_numel,), torch.float32, device, initial, paged=paged)
    return state


def stored_bits(state: dict[str, object], specs: tuple[StateSpec, ...], shape: torch.Size, expected: int) -> int:
    """The precision a parameter's allocated state has (it keeps the one it was created
    with, whatever later overrides say): 32 without codes, else 8 when the codes are
    shaped like the parameter and 4 when they are packed. `expected` (the config's
    precision) decides the one shape both share, a 1-element 1-D parameter."""
    if not specs or (specs[0].name + CODES_SUFFIX) not in state:
        return 32
    codes = state[specs[0].name + CODES_SUFFIX]
    fits = [bits for bits in (8, 4) if tuple(codes.shape) == codes_shape(shape, bits)]
    return expected if expected in fits else fits[0] if fits else 8


def state_bytes(state: dict[str, object]) -> int:
    """Bytes held by a parameter's state tensors (what the memory bars measure)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
