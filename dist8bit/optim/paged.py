"""Paged* optimizers: the same optimizers with is_paged=True fixed (bitsandbytes' names).

Their large states live in CUDA managed memory and can spill to host memory
under GPU pressure (dist8bit.paging, docs/paging.md); results are identical to
the unpaged classes. Where paging is unavailable they use ordinary memory
after one warning per process.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .adam import Adam, AdamW
from .ademamix import AdEMAMix
from .lion import Lion
from .variants import FixedSettings


class PagedAdam(FixedSettings, Adam):
    """Adam. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: Adam."""

    fixed_settings: ClassVar[dict[str, Any]] = {"is_paged": True}


class PagedAdam8bit(FixedSettings, Adam):
    """Adam with 8-bit block-wise states. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: Adam."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 8, "is_paged": True}


class PagedAdam32bit(FixedSettings, Adam):
    """Adam with 32-bit states. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: Adam."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 32, "is_paged": True}


class PagedAdamW(FixedSettings, AdamW):
    """AdamW. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: AdamW."""

    fixed_settings: ClassVar[dict[str, Any]] = {"is_paged": True}


class PagedAdamW8bit(FixedSettings, AdamW):
    """AdamW with 8-bit block-wise states. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: AdamW."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 8, "is_paged": True}


class PagedAdamW32bit(FixedSettings, AdamW):
    """AdamW with 32-bit states. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: AdamW."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 32, "is_paged": True}


class PagedLion(FixedSettings, Lion):
    """Lion. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: Lion."""

    fixed_settings: ClassVar[dict[str, Any]] = {"is_paged": True}


class PagedLion8bit(FixedSettings, Lion):
    """Lion with an 8-bit block-wise momentum. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: Lion."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 8, "is_paged": True}


class PagedLion32bit(FixedSettings, Lion):
    """Lion with a 32-bit momentum. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: Lion."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 32, "is_paged": True}


class PagedAdEMAMix(FixedSettings, AdEMAMix):
    """AdEMAMix. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: AdEMAMix."""

    fixed_settings: ClassVar[dict[str, Any]] = {"is_paged": True}


class PagedAdEMAMix8bit(FixedSettings, AdEMAMix):
    """AdEMAMix with 8-bit block-wise states. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: AdEMAMix."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 8, "is_paged": True}


class PagedAdEMAMix32bit(FixedSettings, AdEMAMix):
    """AdEMAMix with 32-bit states. States in paged (CUDA managed) memory; see dist8bit.paging. Rule and arguments: AdEMAMix."""

    fixed_settings: ClassVar[dict[str, Any]] = {"optim_bits": 32, "is_paged": True}
