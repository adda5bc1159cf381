"""Paged* optimizers: the same optimizers with is_paged=True fixed (bitsandbytes' names).

Their large states live in CUDA managed memory and can spill to host memory
under GPU pressure (dist8bit.paging, docs/paging.md); results are identical to
the unpaged classes. Where paging is unavailable they use ordinary memory
after one warning per process.
"""

from __future__ import annotations

from .adam import Adam, Adam4bit, Adam8bit, Adam32bit, AdamW, AdamW4bit, AdamW8bit, AdamW32bit
from .ademamix import AdEMAMix, AdEMAMix4bit, AdEMAMix8bit, AdEMAMix32bit
from .lion import Lion, Lion4bit, Lion8bit, Lion32bit
from .variants import Paged


class PagedAdam(Paged, Adam):
    """Adam with its states in paged (CUDA managed) memory."""


class PagedAdam8bit(Paged, Adam8bit):
    """Adam8bit with its states in paged (CUDA managed) memory."""


class PagedAdam4bit(Paged, Adam4bit):
    """Adam4bit with its states in paged (CUDA managed) memory."""


class PagedAdam32bit(Paged, Adam32bit):
    """Adam32bit with its states in paged (CUDA managed) memory."""


class PagedAdamW(Paged, AdamW):
    """AdamW with its states in paged (CUDA managed) memory."""


class PagedAdamW8bit(Paged, AdamW8bit):
    """AdamW8bit with its states in paged (CUDA managed) memory."""


class PagedAdamW4bit(Paged, AdamW4bit):
    """AdamW4bit with its states in paged (CUDA managed) memory."""


class PagedAdamW32bit(Paged, AdamW32bit):
    """AdamW32bit with its states in paged (CUDA managed) memory."""


class PagedLion(Paged, Lion):
    """Lion with its states in paged (CUDA managed) memory."""


class PagedLion8bit(Paged, Lion8bit):
    """Lion8bit with its states in paged (CUDA managed) memory."""


class PagedLion4bit(Paged, Lion4bit):
    """Lion4bit with its states in paged (CUDA managed) memory."""


class PagedLion32bit(Paged, Lion32bit):
    """Lion32bit with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix(Paged, AdEMAMix):
    """AdEMAMix with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix8bit(Paged, AdEMAMix8bit):
    """AdEMAMix8bit with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix4bit(Paged, AdEMAMix4bit):
    """AdEMAMix4bit with its states in paged (CUDA managed) memory."""


class PagedAdEMAMix32bit(Paged, AdEMAMix32bit):
    """AdEMAMix32bit with its states in paged (CUDA managed) memory."""
