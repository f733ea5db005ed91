"""Checkpoints: HF import/export (:mod:`.hf`), training state with exact resume (:mod:`.state`)
and sharded multi-process checkpoints (:mod:`.distributed`)."""
from . import distributed, state
from .hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf", "state", "distributed"]
