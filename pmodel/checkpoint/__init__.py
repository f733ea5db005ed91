"""Checkpoints: HF import/export (:mod:`.hf`) and training state with exact resume (:mod:`.state`)."""
from . import state
from .hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf", "state"]
