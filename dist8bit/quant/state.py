"""QuantState: what dequantization needs besides the codes.

One class serves dist8bit.functional and the bitsandbytes compatibility
namespace: its fields, positional order, list view (`state[i]`) and
`as_dict` / `from_dict` layout are bitsandbytes' (`QuantState` of
bitsandbytes.functional), so a state saved by either library loads in the
other. Double quantization ("nested") stores the absmax itself as 8-bit
codes: `absmax` then holds those uint8 codes, `state2` their own state and
`offset` the mean that was subtracted before quantizing them.
"""

from __future__ import annotations

import json
from typing import Any

import torch

NESTED_KEYS = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")
VALID_KEYS = ("absmax", "quant_map", "quant_state", "quant_type", "blocksize", "dtype", "shape", *NESTED_KEYS)
PACKED_PREFIX = "quant_state.bitsandbytes__"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling bitsandbytes serialises."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a quant state dict")
    return dtype


def pack_dict(values: dict[str, Any]) -> torch.Tensor:
    """Non-tensor items as UTF-8 JSON in a uint8 tensor (safetensors holds only tensors)."""
    return torch.tensor(list(json.dumps(values).encode("utf-8")), dtype=torch.uint8)


def unpack_dict(packed: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(packed.cpu().tolist()).decode("utf-8"))


class QuantState:
    """Scales, map and layout of one quantized tensor (bitsandbytes' fields and order)."""

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ) -> None:
        self.absmax = absmax  # float32 scales, or uint8 codes of them when nested
        self.shape = None if shape is None else torch.Size(shape)
        self.code = code  # the 256-value map
        self.blocksize = blocksize
        self.quant_type = quant_type  # None for 8-bit block-wise states
        self.dtype = dtype  # dtype of the original tensor
        self.offset = offset  # nested: the mean subtracted from absmax before quantizing it
        self.state2 = state2  # nested: the state of the quantized absmax

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def __getitem__(self, index: int | slice) -> Any:
        """The older list layout: [absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][index]

    def __eq__(self, other: object) -> bool:
        """Exact equality of every field (bitsandbytes compares tensors with atol 1e-6)."""
        if not isinstance(other, QuantState):
            return NotImplemented

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
            return a == b

        fields = ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2")
        return all(same(getattr(self, name), getattr(other, name)) for name in fields)

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        nested = f", nested(offset={float(self.offset):.6g}, blocksize={self.state2.blocksize})" if self.nested else ""
        return (
            f"QuantState(absmax={tuple(self.absmax.shape)} {self.absmax.dtype}, shape={self.shape}, "
            f"blocksize={self.blocksize}, dtype={self.dtype}, quant_type={self.quant_type}{nested})"
        )

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to `device`, in place (as bitsandbytes does), and return self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Tensors and plain values for a state dict, in bitsandbytes' layout.

        With `packed=True` and a quant_type (4-bit states), the non-tensor items
        are packed into one uint8 tensor under 'quant_state.bitsandbytes__<type>',
        so the dict is all tensors (safetensors); 8-bit states have no
        quant_type and are returned unpacked, as bitsandbytes does.
        """
        values: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": None if self.dtype is None else dtype_name(self.dtype),
            "shape": None if self.shape is None else tuple(self.shape),
        }
        if self.nested:
            values.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors drops tensors that share storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset),
                }
            )
        if not packed or self.quant_type is None:
            return values
        tensors = {key: value for key, value in values.items() if isinstance(value, torch.Tensor)}
        plain = {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
        tensors[PACKED_PREFIX + self.quant_type] = pack_dict(plain)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str) -> QuantState:
        """Rebuild a state from `as_dict` output (packed or not, keys may carry a module prefix)."""
        items = dict(qs_dict)  # never modify the caller's dict
        packed_keys = [key for key, value in items.items() if "quant_state" in key and isinstance(value, torch.Tensor)]
        if len(packed_keys) > 1:
            raise ValueError(f"expected at most one packed 'quant_state.bitsandbytes__<type>' item, got {packed_keys}")
        if packed_keys:
            items.update(unpack_dict(items.pop(packed_keys[0])))
        items = {key.split(".")[-1]: value for key, value in items.items()}
        unknown = sorted(set(items) - set(VALID_KEYS))
        if unknown:
            raise ValueError(f"unknown quant state keys {unknown}; expected a subset of {list(VALID_KEYS)}")
        missing = [key for key in ("absmax", "quant_map", "blocksize", "dtype") if key not in items]
        if missing:
            raise ValueError(f"quant state dict lacks {missing}")
        offset = state2 = None
        if "nested_absmax" in items:
            missing = [key for key in NESTED_KEYS if key not in items]
            if missing:
                raise ValueError(f"nested quant state dict lacks {missing}")
            offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=items["nested_absmax"].to(device),
                shape=items["absmax"].shape,  # the nested state quantized the absmax: its codes' shape
                code=items["nested_quant_map"].to(device),
                blocksize=int(items["nested_blocksize"]),
                dtype=dtype_from_name(items["nested_dtype"]),
            )
        shape = items.get("shape")
        return cls(
            absmax=items["absmax"].to(device),
            shape=None if shape is None else torch.Size(shape),
            code=items["quant_map"].to(device),
            blocksize=int(items["blocksize"]),
            quant_type=items.get("quant_type"),
            dtype=dtype_from_name(items["dtype"]),
            offset=offset,
            state2=state2,
        )
