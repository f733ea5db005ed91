"""The public face: every entry point of the design document's "Public entry points" block
exists and works with the documented call shape; subpackages are modules, no function shadows a
module, and ``__all__`` is exactly the public surface.

The block (keep in sync with the design document)::

    model = pmodel.families.preset("llama2-7b")        # a Model (nothing allocated); also "debug"
    params = pmodel.init(model, seed=0)                # materialised params pytree
    logits = model.apply(params, tokens)               # tokens (B, T) int64 -> (B, T, V)
    loss, aux = model.loss(params, batch)              # batch: tokens, labels, loss_mask, ...
    model, params = pmodel.load_hf(hf_dir, dtype=torch.float32)   # any supported family
    pmodel.save_hf(model, params, out_dir)             # loadable by transformers
    ids = pmodel.generate(model, params, prompt_ids, max_new_tokens=64, temperature=0.0)
    tok = pmodel.data.load_tokenizer(path_or_dir)      # encode / decode / bos_id / eos_id
    plan = pmodel.parallel.parallelize(model, tx, mesh, ...)   # plan.step has train_step's contract
    state = pmodel.train.train(step, params, opt_state, data, ...)  # the one loop
"""
from __future__ import annotations

import inspect
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import pmodel

ROOT = Path(__file__).resolve().parents[1]

SUBPACKAGES = ("checkpoint", "data", "device", "evaluation", "families", "inference", "lora", "ops", "optim", "parallel", "precision",
               "train", "tree")
FUNCTIONS = ("init", "abstract", "load_hf", "save_hf", "generate", "recompute", "pipeline", "value_and_grad")
TYPES = ("Model", "ModelConfig", "P", "Context", "KVCache")


def _batch(V=512, B=2, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(B, T)}


def test_all_is_exactly_the_public_surface():
    assert sorted(pmodel.__all__) == sorted(SUBPACKAGES + FUNCTIONS + TYPES)
    for name in pmodel.__all__:
        assert hasattr(pmodel, name), name
    for name in SUBPACKAGES:
        assert isinstance(getattr(pmodel, name), types.ModuleType), name
    for name in FUNCTIONS:
        assert callable(getattr(pmodel, name)) and not isinstance(getattr(pmodel, name), types.ModuleType), name


def test_no_function_shadows_a_module():
    # every submodule / subpackage name: pmodel.<name>, when bound, is that module
    import importlib
    for info in pkgutil.iter_modules(pmodel.__path__):
        mod = importlib.import_module(f"pmodel.{info.name}")
        assert getattr(pmodel, info.name) is mod, f"pmodel.{info.name} is not the module pmodel/{info.name}"
    # the two transforms that once shadowed their modules live in modules of other names
    from pmodel import generation, remat
    assert pmodel.generate is generation.generate and pmodel.recompute is remat.recompute


def test_import_pmodel_then_data_in_a_fresh_process():
    code = "import pmodel; pmodel.data.load_tokenizer; pmodel.parallel.parallelize; pmodel.checkpoint.load_hf"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_preset_init_apply_loss():
    model = pmodel.families.preset("debug")
    assert isinstance(model, pmodel.Model)
    assert isinstance(pmodel.families.preset("llama2-7b"), pmodel.Model)  # nothing allocated
    params = pmodel.init(model, seed=0)
    batch = _batch(model.config.vocab_size)
    logits = model.apply(params, batch["tokens"])
    assert logits.shape == (2, 8, model.config.vocab_size)
    loss, aux = model.loss(params, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and isinstance(aux, dict)


def test_save_hf_then_load_hf(tmp_path):
    model = pmodel.families.preset("debug")
    params = pmodel.init(model, seed=0)
    pmodel.save_hf(model, params, tmp_path)
    assert (tmp_path / "config.json").exists()
    model2, params2 = pmodel.load_hf(tmp_path, dtype=torch.float32)
    tokens = _batch(model.config.vocab_size)["tokens"]
    torch.testing.assert_close(model2.apply(params2, tokens), model.apply(params, tokens), rtol=0, atol=0)


def test_generate():
    model = pmodel.families.preset("debug")
    params = pmodel.init(model, seed=0)
    prompt = torch.tensor([[1, 5, 9]])
    ids = pmodel.generate(model, params, prompt, max_new_tokens=4, temperature=0.0)
    assert ids.shape == (1, 7) and torch.equal(ids[:, :3], prompt)  # prompt + new tokens
    assert torch.equal(pmodel.generate(model, params, [1, 5, 9], max_new_tokens=4), ids[0])  # 1-D in, 1-D out


def test_load_tokenizer_bytes():
    tok = pmodel.data.load_tokenizer("bytes")
    ids = tok.encode("hi")
    assert tok.decode(ids) == "hi"
    assert isinstance(tok.bos_id, (int, type(None))) and isinstance(tok.eos_id, (int, type(None)))


def test_load_hf_and_tokenizer_from_a_real_folder(shared_data):
    hf_dir = shared_data / "models" / "stories260K"
    model, params = pmodel.load_hf(hf_dir, dtype=torch.float32)
    tok = pmodel.data.load_tokenizer(hf_dir)
    ids = tok.encode("Once upon a time")
    assert tok.decode(ids) == "Once upon a time" and tok.bos_id is not None and tok.eos_id is not None
    out = pmodel.generate(model, params, torch.tensor([[tok.bos_id, *ids]]), max_new_tokens=3, temperature=0.0)
    assert out.shape[0] == 1


def test_train_step_and_parallelize_share_the_step_contract():
    from pmodel import optim
    from pmodel.parallel import Mesh
    model = pmodel.families.preset("debug")
    batch = _batch(model.config.vocab_size)
    tx = optim.adamw(1e-3)

    step = pmodel.train.train_step(model, tx)
    params = pmodel.init(model, seed=0)
    p1, s1, m1 = step(params, step.init(params), [batch])
    assert p1 is params and {"loss", "grad_norm", "lr", "num_tokens"} <= set(m1)

    plan = pmodel.parallel.parallelize(model, tx, Mesh.single())
    params2 = pmodel.init(model, seed=0)
    p2, s2, m2 = plan.step(params2, plan.tx.init(params2), [batch])
    assert p2 is params2 and set(m2) == set(m1)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6)


def test_train_loop_call_shape():
    sig = inspect.signature(pmodel.train.train)
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional[:3] == ["step", "params", "opt_state"] and len(positional) >= 4, positional
    sig = inspect.signature(pmodel.parallel.parallelize)
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional[:3] == ["model", "tx", "mesh"], positional
