"""pmodel: a functional, JAX-style library for large language models in PyTorch.

Importing pmodel has no side effects on torch.
"""
from . import families, ops, tree
from .checkpoint import load_hf, save_hf
from .generate import generate
from .model import Context, KVCache, Model, ModelConfig
from .params import P, abstract, init

__version__ = "0.1.0"
