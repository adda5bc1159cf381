"""Paged* optimizers: the same optimizers with is_paged=True fixed (bitsandbytes' names).

Their large states live in CUDA managed memory and can spill to host memory
under GPU pressure (dist8bit.paging, docs/paging.md); results are identical to
the unpaged classes. Where paging is unavailable they use ordinary memory
after one warning per process.
"""

from __future__ import annotations

from .adam import Adam, AdamW
from .ademamix import AdEMAMix
from .lion import Lion
from .variants import FixedSettings


class PagedAdam(FixedSettings, Adam, is_paged=True):
    """Adam with its states in paged (CUDA managed) memory."""


class PagedAdam8bit(FixedSettings, Adam, optim_bits=8, is_paged=True):
    """Adam8bit with its states in paged (CUDA managed) memory."""


class PagedAdam32bit(FixedSettings, Adam, optim_bits=32, is_paged=True):
    """Adam32bit with its states in paged (CUDA managed) memory."""


class PagedAdamW(FixedSettings, AdamW, is_paged=True):
    """AdamW with its states in paged (CUDA managed) memory."""


class PagedAdamW8bit(FixedSettings, AdamW, optim_bits=8, is_paged=True):
    """AdamW8bit with its states in paged (CUDA managed) memory."""


class PagedAdamW32bit(FixedSettings, AdamW, optim_bits=32, is_paged=True):
    """AdamW32bit with its states in paged (CUDA managed) memory."""


class PagedLion(FixedSettings, Lion, is_paged=True):
    """Lion with its states in paged (CUDA managed) memory."""


class PagedLion8bit(FixedSettings, Lion, optim_bits=8, is_paged=True):
    """Lion8bit with its states in paged (CUDA managed) memory."""


class PagedLion32bit(FixedSettings, Lion, optim_bits=32, is_paged=True):
    """Lion32bit with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix(FixedSettings, AdEMAMix, is_paged=True):
    """AdEMAMix with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix8bit(FixedSettings, AdEMAMix, optim_bits=8, is_paged=True):
    """AdEMAMix8bit with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix32bit(FixedSettings, AdEMAMix, optim_bits=32, is_paged=True):
    """AdEMAMix32bit with its states in paged (CUDA managed) memory."""
