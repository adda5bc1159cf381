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
from .variants import with_fixed

_PAGED = "States in paged (CUDA managed) memory; see dist8bit.paging."

PagedAdam = with_fixed(Adam, "PagedAdam", f"Adam. {_PAGED}", is_paged=True)
PagedAdam8bit = with_fixed(Adam, "PagedAdam8bit", f"Adam with 8-bit block-wise states. {_PAGED}", optim_bits=8, is_paged=True)
PagedAdam32bit = with_fixed(Adam, "PagedAdam32bit", f"Adam with 32-bit states. {_PAGED}", optim_bits=32, is_paged=True)
PagedAdamW = with_fixed(AdamW, "PagedAdamW", f"AdamW. {_PAGED}", is_paged=True)
PagedAdamW8bit = with_fixed(AdamW, "PagedAdamW8bit", f"AdamW with 8-bit block-wise states. {_PAGED}", optim_bits=8, is_paged=True)
PagedAdamW32bit = with_fixed(AdamW, "PagedAdamW32bit", f"AdamW with 32-bit states. {_PAGED}", optim_bits=32, is_paged=True)
PagedLion = with_fixed(Lion, "PagedLion", f"Lion. {_PAGED}", is_paged=True)
PagedLion8bit = with_fixed(
    Lion, "PagedLion8bit", f"Lion with an 8-bit block-wise momentum. {_PAGED}", optim_bits=8, is_paged=True
)
PagedLion32bit = with_fixed(Lion, "PagedLion32bit", f"Lion with a 32-bit momentum. {_PAGED}", optim_bits=32, is_paged=True)
PagedAdEMAMix = with_fixed(AdEMAMix, "PagedAdEMAMix", f"AdEMAMix. {_PAGED}", is_paged=True)
PagedAdEMAMix8bit = with_fixed(
    AdEMAMix, "PagedAdEMAMix8bit", f"AdEMAMix with 8-bit block-wise states. {_PAGED}", optim_bits=8, is_paged=True
)
PagedAdEMAMix32bit = with_fixed(
    AdEMAMix, "PagedAdEMAMix32bit", f"AdEMAMix with 32-bit states. {_PAGED}", optim_bits=32, is_paged=True
)
