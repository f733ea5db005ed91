"""Checkpoints: HF import/export (:mod:`.hf`)."""
from .hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
