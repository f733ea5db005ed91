"""pmodel: a functional, JAX-style library for large language models in PyTorch.

Importing pmodel has no side effects on torch.
"""
from . import families, lora, ops, optim, precision, train, tree
from .autodiff import value_and_grad
from .checkpoint import load_hf, save_hf
from .generate import generate
from .model import Context, KVCache, Model, ModelConfig
from .params import P, abstract, init
from .parallel.pipeline import pipeline
from .recompute import recompute

__version__ = "0.1.0"
