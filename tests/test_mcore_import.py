"""Import of megatron-core GPTModel checkpoints (``scripts/convert_ckpt.py --loader mcore``,
``pmodel.checkpoint.mcore``) against megatron-core itself.

megatron-core builds and runs a tiny ``GPTModel`` (local layer spec) at TP2 on CPU (gloo) here,
with three CPU accommodations, none of which touches its numerics: ``torch.cuda.current_device``
answers ``"cpu"`` (megatron-core hard-codes it for RoPE's ``inv_freq`` and the attention's
scratch buffer), the causal mask is passed explicitly (its default mask is built with
``device="cuda"``), and the RNG tracker is megatron-core's own inference tracker (its training
tracker forks the CUDA generator even for dropout 0). Each rank saves what Megatron's
``save_checkpoint`` writes with ``--ckpt-format torch`` (``{"args": Namespace, "checkpoint_version",
"iteration", "model": state_dict_for_save_checkpoint(), "rng_state": [... np.random.get_state()
...]}`` into ``iter_0000007/mp_rank_0T/model_optim_rng.pt`` and ``latest_checkpointed_iteration.txt``)
and the TP-gathered logits of megatron-core's forward; pmodel's logits on the imported weights
must equal them (fp32, 1e-5)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import pmodel
from pmodel import tree
from pmodel.checkpoint import sharded
from pmodel.checkpoint.mcore import McoreError, load_mcore, read_rank_file
from pmodel.model import ModelConfig, build

from _dist import launch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

pytest.importorskip("megatron.core")
# megatron-core runs on two gloo ranks twice (module fixture, ~60 s of the ~75 s)
pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

VARIANTS = {
    # LLaMA-style: RMSNorm, SwiGLU, RoPE, GQA (4 heads, 2 groups), no biases, untied output layer
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                  untie_embeddings_and_output_weights=True, num_query_groups=2, group_query_attention=True),
    # GPT-style (Megatron's defaults): LayerNorm, exact GeLU, learned positions, biases, tied embeddings
    "gpt": dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
                add_bias_linear=True, untie_embeddings_and_output_weights=False, num_query_groups=None,
                group_query_attention=False),
}
TOKENS = [[3, 17, 99, 5, 64, 2, 77, 31, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def _megatron_args(v, tp):
    o = VARIANTS[v]
    return argparse.Namespace(
        num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=96,
        padded_vocab_size=128, max_position_embeddings=64, seq_length=64, norm_epsilon=1e-5,
        rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False, add_qkv_bias=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, params_dtype=torch.float32,
        transformer_impl="local", ckpt_format="torch", **o)


def _mcore_worker(rank, world, out_dir, variant):
    import random
    import zlib
    import warnings

    import numpy as np
    warnings.filterwarnings("ignore")
    torch.cuda.current_device = lambda: "cpu"  # megatron-core hard-codes CUDA placement (see module doc)
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    a = _megatron_args(variant, world)
    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups, ffn_hidden_size=a.ffn_hidden_size, kv_channels=a.kv_channels,
        use_cpu_initialization=True, normalization=a.normalization, gated_linear_unit=a.swiglu,
        activation_func=F.silu if a.swiglu else F.gelu, add_bias_linear=a.add_bias_linear,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        layernorm_epsilon=a.norm_epsilon, params_dtype=torch.float32, tensor_model_parallel_size=world)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization=a.normalization),
                     vocab_size=a.padded_vocab_size, max_sequence_length=a.max_position_embeddings,
                     position_embedding_type=a.position_embedding_type,
                     share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights)
    model.eval()
    # Every parameter random (norm weights are 1 and biases 0 at init, which would hide mapping
    # errors); replicated ones equal on every tp rank, shards different per rank.
    with torch.no_grad():
        for name, p in model.named_parameters():
            rep = getattr(p, "tensor_model_parallel", False) is False
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + (0 if rep else 1000 * rank))
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.15) + (1.0 if "norm" in name else 0))
    tokens = torch.tensor(TOKENS)
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s), diagonal=1).bool()[None, None]
    with torch.no_grad():
        local = model(tokens, pos, attention_mask=mask)  # (b, s, vocab / tp)
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local.contiguous())
    logits = torch.cat(parts, -1)
    # What Megatron-LM's save_checkpoint writes with --ckpt-format torch (no optimizer: --no-save-optim)
    state = {"args": a, "checkpoint_version": 3.0, "iteration": 7, "model": model.state_dict_for_save_checkpoint(),
             "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                            "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]}
    d = Path(out_dir) / "iter_0000007" / f"mp_rank_{rank:02d}"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / "model_optim_rng.pt")
    if rank == 0:
        (Path(out_dir) / "latest_checkpointed_iteration.txt").write_text("7")
        torch.save(logits, Path(out_dir) / "reference_logits.pt")
    keys = {k: tuple(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    return {"keys": keys}


@pytest.fixture(scope="module")
def mcore_ckpts(tmp_path_factory):
    out = {}
    for v in VARIANTS:
        d = tmp_path_factory.mktemp(f"mcore_{v}")
        res = launch(_mcore_worker, 2, str(d), v, timeout_s=240)
        out[v] = (d, res)
    return out


def _pmodel_logits(model, params):
    with torch.no_grad():
        return model.apply(params, torch.tensor(TOKENS)).float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_weights_give_megatron_cores_logits(mcore_ckpts, variant):
    d, res = mcore_ckpts[variant]
    ref = torch.load(d / "reference_logits.pt", weights_only=True)
    keys = res[0]["keys"]
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in keys
    if variant == "llama":  # (groups/tp * (heads/groups + 2) * head_dim, hidden): 1 * (2 + 2) * 16
        assert keys["decoder.layers.0.self_attention.linear_qkv.weight"] == (64, 64)
        assert keys["decoder.layers.0.mlp.linear_fc1.weight"] == (96, 64)  # [gate_r; up_r]: 2 * 96 / 2
        assert keys["output_layer.weight"] == (64, 64)
    else:
        assert "embedding.position_embeddings.weight" in keys and "output_layer.weight" not in keys
    cfg, flat, info = load_mcore(d)
    assert (info["tp"], info["pp"], info["iteration"]) == (2, 1, 7)
    model = build(cfg)
    params = tree.map_with_path(lambda p, _: flat[p], model.defs, is_leaf=pmodel.params.is_decl)
    got = _pmodel_logits(model, params)
    assert got.shape == ref.shape == (2, 10, 128)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_convert_ckpt_loader_mcore_to_training_checkpoint_and_hf(mcore_ckpts, variant, tmp_path, capsys):
    import convert_ckpt
    d, _ = mcore_ckpts[variant]
    ref = torch.load(d / "reference_logits.pt", weights_only=True)
    out = tmp_path / "native"
    assert convert_ckpt.main(["--model-type", "GPT", "--loader", "mcore", "--saver", "megatron", "--load-dir", str(d),
                              "--save-dir", str(out), "--target-tensor-parallel-size", "2"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["loader"] == "mcore" and rep["step"] == 7 and rep["ranks"] == 2
    ck = sharded.read_full(out, state=False)
    cfg = ModelConfig.from_dict(ck.manifest["config"])
    fam = ck.manifest["extra"]["family"]
    assert fam == ("llama" if variant == "llama" else None)
    model = build(cfg, family=fam)
    params = tree.map_with_path(lambda p, _: ck.params[p], model.defs, is_leaf=pmodel.params.is_decl)
    torch.testing.assert_close(_pmodel_logits(model, params), ref, rtol=0, atol=1e-5)
    if variant == "llama":  # and on to Hugging Face (the family expresses it)
        hf = tmp_path / "hf"
        assert convert_ckpt.main(["--model-type", "GPT", "--loader", "mcore", "--saver", "hf", "--load-dir",
                                  str(d), "--save-dir", str(hf)]) == 0
        m2, p2 = pmodel.load_hf(hf)
        torch.testing.assert_close(_pmodel_logits(m2, p2), ref, rtol=0, atol=1e-5)
    else:
        with pytest.raises(SystemExit, match="no Hugging Face family expresses"):
            convert_ckpt.main(["--model-type", "GPT", "--loader", "mcore", "--saver", "hf", "--load-dir", str(d),
                               "--save-dir", str(tmp_path / "hf")])


class _Payload:
    """Unpickling this would run os.system-like code: it must never be built."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_anything_needing_unpickling_is_refused_naming_the_file(mcore_ckpts, tmp_path):
    import convert_ckpt
    src, _ = mcore_ckpts["llama"]
    good = read_rank_file(src / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt")
    marker = tmp_path / "EXECUTED"
    for name, extra in (("code", {"payload": _Payload(str(marker))}),
                        ("enum", {"args": argparse.Namespace(**{**vars(good["args"]),
                                                               "x": os.environ.__class__})})):
        d = tmp_path / name
        for r in range(2):
            sd = read_rank_file(src / "iter_0000007" / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
            (d / f"mp_rank_{r:02d}").mkdir(parents=True)
            torch.save({**sd, **extra}, d / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
        with pytest.raises(SystemExit) as e:
            convert_ckpt.main(["--model-type", "GPT", "--loader", "mcore", "--load-dir", str(d),
                               "--save-dir", str(tmp_path / "o")])
        msg = str(e.value)
        assert f"{d}/mp_rank_00/model_optim_rng.pt: refused" in msg and "without unpickling" in msg, msg
        assert ("_Payload" in msg or "pathlib" in msg) if name == "code" else "_Environ" in msg, msg
        assert not marker.exists()
    # megatron-core's dist-checkpointing folder (pickled .metadata / common.pt)
    dist = tmp_path / "torch_dist"
    dist.mkdir()
    (dist / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (dist / ".metadata").write_bytes(b"")
    with pytest.raises(SystemExit, match="dist-checkpointing .* Python pickles"):
        convert_ckpt.main(["--model-type", "GPT", "--loader", "mcore", "--load-dir", str(dist), "--save-dir",
                           str(tmp_path / "o")])


def test_layout_problems_are_refused(mcore_ckpts, tmp_path):
    import shutil
    src, _ = mcore_ckpts["llama"]
    d = tmp_path / "one_rank"
    shutil.copytree(src / "iter_0000007", d)
    shutil.rmtree(d / "mp_rank_01")
    with pytest.raises(McoreError, match="args say tp 2 x pp 1 but the folder holds tp 1"):
        load_mcore(d)
    with pytest.raises(SystemExit, match="--saver mcore: megatron-core checkpoints are read"):
        import convert_ckpt
        convert_ckpt.main(["--model-type", "GPT", "--loader", "hf", "--saver", "mcore", "--load-dir", "x",
                           "--save-dir", "y"])
