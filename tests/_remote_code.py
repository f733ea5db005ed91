"""Test-side loader for the official remote modeling code in ../shared/data/reference_code.

The files target transformers 4.x; this module imports them unchanged under transformers 5
with the smallest shims (stub modules for optional imports they never use on CPU: ``xformers``,
``accelerate``, ``transformers_stream_generator``), and builds a tiny random reference model
plus an HF-style checkpoint folder pmodel can load. Never imported by ``pmodel/``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from _data_helpers import SHARED

REF = SHARED / "reference_code"


def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def _shims() -> None:
    @contextlib.contextmanager
    def init_empty_weights(include_buffers=False):
        yield

    _stub("accelerate", init_empty_weights=init_empty_weights)


@contextlib.contextmanager
def _xformers_stub(enabled: bool):
    """Baichuan-7B imports xformers unconditionally (used only in training mode, which the tests
    do not run); Baichuan2 uses it whenever importable, so it must not see the stub."""
    if not enabled:
        yield
        return
    saved = {k: sys.modules.get(k) for k in ("xformers", "xformers.ops")}
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.LowerTriangularMask = None, object
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    sys.modules.update({"xformers": pkg, "xformers.ops": ops})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load(folder: str, module: str = "modeling"):
    """Import ``reference_code/<folder>/<module>*.py`` as a package module (relative imports work)."""
    d = REF / folder
    if not d.is_dir():
        pytest.skip(f"{d} not present (fresh clone)")
    _shims()
    pkg = f"_ref_{folder}"
    if pkg not in sys.modules:
        p = types.ModuleType(pkg)
        p.__path__ = [str(d)]
        sys.modules[pkg] = p
    # InternLM imports its config module by absolute name.
    for f in sorted(d.glob("configuration_*.py")):
        name = f"{pkg}.{f.stem}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, f)
            m = importlib.util.module_from_spec(spec)
            sys.modules[name] = m
            spec.loader.exec_module(m)
        sys.modules.setdefault(f.stem, sys.modules[name])
    if folder == "aquila2":
        # modeling_aquila.py star-imports a FlagAI `utils` module that is not part of the copied
        # files; it is used only by the chat helper `predict`, which the tests never call.
        sys.modules.setdefault(f"{pkg}.utils", types.ModuleType(f"{pkg}.utils"))
    f = next(d.glob(f"{module}_*.py"))
    name = f"{pkg}.{f.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, f)
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        with _xformers_stub(folder == "baichuan_7b_v1"):
            spec.loader.exec_module(m)
        _patch(folder, m)
    return sys.modules[name]


def _patch(folder: str, m) -> None:
    """transformers 4.x APIs the files call and transformers 5 removed (behaviour as in 4.x)."""
    if folder == "qwen":
        # PreTrainedModel.get_head_mask(None, n) returned [None] * n.
        def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
            if head_mask is not None:
                raise NotImplementedError("head_mask is not used by these tests")
            return [None] * num_hidden_layers
        m.QWenModel.get_head_mask = get_head_mask


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (norms and biases included, so the mapping is really tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in n or "ln" in n):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def write_checkpoint(model: torch.nn.Module, config: dict, out: Path, *, skip=()) -> Path:
    """``config.json`` + ``model.safetensors`` from a reference model's state dict."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith(tuple(skip))}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_state(model: torch.nn.Module, folder: Path) -> dict:
    """Load a pmodel-exported folder into a reference model; returns the missing / unexpected keys."""
    from safetensors.torch import load_file
    sd = load_file(folder / "model.safetensors")
    res = model.load_state_dict(sd, strict=False)
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
