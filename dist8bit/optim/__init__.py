"""Fused 8-bit, 4-bit and 32-bit optimizers with bitsandbytes-compatible names and arguments."""

from .adagrad import Adagrad, Adagrad4bit, Adagrad8bit, Adagrad32bit
from .adam import Adam, Adam4bit, Adam8bit, Adam32bit, AdamW, AdamW4bit, AdamW8bit, AdamW32bit
from .ademamix import AdEMAMix, AdEMAMix4bit, AdEMAMix8bit, AdEMAMix32bit
from .lamb import LAMB, LAMB4bit, LAMB8bit, LAMB32bit
from .lars import LARS, LARS4bit, LARS8bit, LARS32bit
from .lion import Lion, Lion4bit, Lion8bit, Lion32bit
from .optimizer import Optimizer8bit
from .overrides import GlobalOptimManager
from .paged import (
    PagedAdam,
    PagedAdam4bit,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW4bit,
    PagedAdamW8bit,
    PagedAdamW32bit,
    PagedAdEMAMix,
    PagedAdEMAMix4bit,
    PagedAdEMAMix8bit,
    PagedAdEMAMix32bit,
    PagedLion,
    PagedLion4bit,
    PagedLion8bit,
    PagedLion32bit,
)
from .rmsprop import RMSprop, RMSprop4bit, RMSprop8bit, RMSprop32bit
from .sgd import SGD, SGD4bit, SGD8bit, SGD32bit

__all__ = [
    "LAMB",
    "LARS",
    "SGD",
    "AdEMAMix",
    "AdEMAMix4bit",
    "AdEMAMix8bit",
    "AdEMAMix32bit",
    "Adagrad",
    "Adagrad4bit",
    "Adagrad8bit",
    "Adagrad32bit",
    "Adam",
    "Adam4bit",
    "Adam8bit",
    "Adam32bit",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "AdamW32bit",
    "GlobalOptimManager",
    "LAMB4bit",
    "LAMB8bit",
    "LAMB32bit",
    "LARS4bit",
    "LARS8bit",
    "LARS32bit",
    "Lion",
    "Lion4bit",
    "Lion8bit",
    "Lion32bit",
    "Optimizer8bit",
    "PagedAdEMAMix",
    "PagedAdEMAMix4bit",
    "PagedAdEMAMix8bit",
    "PagedAdEMAMix32bit",
    "PagedAdam",
    "PagedAdam4bit",
    "PagedAdam8bit",
    "PagedAdam32bit",
    "PagedAdamW",
    "PagedAdamW4bit",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "PagedLion",
    "PagedLion4bit",
    "PagedLion8bit",
    "PagedLion32bit",
    "RMSprop",
    "RMSprop4bit",
    "RMSprop8bit",
    "RMSprop32bit",
    "SGD4bit",
    "SGD8bit",
    "SGD32bit",
]
