"""Checkpoints: HF import/export (:mod:`.hf`), PEFT adapters (:mod:`.peft`) and the one training
checkpoint format, sharded and reshardable under any parallel layout (:mod:`.sharded`, with the
RNG / atomic-write helpers of :mod:`.state`)."""
from . import sharded, state
from .hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf", "state", "sharded"]
