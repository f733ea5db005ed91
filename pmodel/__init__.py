"""pmodel: a functional, JAX-style library for large language models in PyTorch.

Importing pmodel has no side effects on torch. The public surface is ``__all__``: the
entry points below and the subpackages ``families``, ``data``, ``inference``, ``evaluation``, ``ops``, ``optim``,
``parallel``, ``checkpoint``, ``lora``, ``precision``, ``train``, ``tree``, ``device``.
Functions and modules never share a name: ``pmodel.generate`` and ``pmodel.recompute`` are
functions, defined in :mod:`pmodel.generation` and :mod:`pmodel.remat`.
"""
from . import checkpoint, data, device, evaluation, families, inference, lora, ops, optim, parallel, precision, train, tree
from .autodiff import value_and_grad
from .checkpoint import load_hf, save_hf
from .generation import generate
from .model import Context, KVCache, Model, ModelConfig
from .params import P, abstract, init
from .parallel.pipeline import pipeline
from .remat import recompute

__version__ = "0.1.0"

__all__ = [
    # subpackages / modules
    "checkpoint", "data", "device", "evaluation", "families", "inference", "lora", "ops", "optim", "parallel", "precision", "train",
    "tree",
    # declarations, the model record, init
    "P", "abstract", "init", "Model", "ModelConfig", "Context", "KVCache",
    # transforms
    "value_and_grad", "recompute", "pipeline",
    # checkpoints and generation
    "load_hf", "save_hf", "generate",
]
