"""Import megatron-core ``GPTModel`` checkpoints (Megatron's per-rank "legacy" format).

What Megatron-LM / ModelLink write with ``--ckpt-format torch`` (the format ModelLink users
bring)::

    <dir>/latest_checkpointed_iteration.txt          "<iteration>" or "release"
    <dir>/iter_0000123/mp_rank_00/model_optim_rng.pt      (pp 1: mp_rank_<tp>)
    <dir>/iter_0000123/mp_rank_01_003/model_optim_rng.pt  (pp > 1: mp_rank_<tp>_<pp>)

each file a dict ``{"args": Namespace, "iteration", "checkpoint_version", "model": state dict
(or "model0", "model1", ... with virtual pipeline stages), "optimizer", "rng_state", ...}``
holding that rank's tensor-parallel shards of the modules of megatron-core's *local* layer spec
(``get_gpt_layer_local_spec``; the Transformer-Engine spec's fused norm names
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` are read too).

**Never unpickles.** Every file is read with ``torch.load(weights_only=True)``: torch's restricted
unpickler, which builds tensors and plain containers and nothing else. Admitted on top of its
defaults, because Megatron's files need them and they only hold data: ``argparse.Namespace`` /
``types.SimpleNamespace`` (``args``) and NumPy's array reconstruction (``np.random.get_state()``
in ``rng_state``), the subset of megatron-core's own ``safe_globals.SAFE_GLOBALS`` that is not a
megatron class. Anything else (a megatron enum in ``args``, Transformer Engine's ``BytesIO``
extra state, a custom class) is refused, naming the file and the globals it would need: re-save
the file where its code is trusted. megatron-core's dist-checkpointing format (``torch_dist``:
``.metadata``, ``common.pt``) stores pickled metadata and is refused likewise.

Mapping (per layer ``i``; tp-shards concatenated along Megatron's partition dims):

=============================================  ==========================================
``embedding.word_embeddings.weight``           ``embed.weight`` (vocab rows, padded vocab)
``embedding.position_embeddings.weight``       ``pos_embed.weight`` (learned_absolute)
``decoder.layers.i.input_layernorm``           ``layers.i.input_norm``
``...self_attention.linear_qkv``               q / k / v: per query group ``[q heads, k, v]``
``...self_attention.linear_proj``              ``attn.o_proj`` (row-parallel: input dim)
``decoder.layers.i.pre_mlp_layernorm``         ``layers.i.post_attn_norm``
``...mlp.linear_fc1``                          gated: each shard ``[gate_r; up_r]``; else up
``...mlp.linear_fc2``                          ``mlp.down_proj`` (row-parallel)
``decoder.final_layernorm``                    ``final_norm``
``output_layer.weight``                        ``lm_head.weight`` (untied)
=============================================  ==========================================

Layers are numbered per pipeline stage (and per virtual chunk) in the files; global numbers
follow Megatron's order (chunk-major, then stage), counted from the files, so uneven stages work.
The model config comes from the checkpoint's ``args``. Not read: MoE layers, ``qk_layernorm``,
multi-latent attention, expert-parallel folders (refused), optimizer and RNG state (parameters
only: train on with ``--no-load-optim``).
"""
from __future__ import annotations

import os
import re
import types
from pathlib import Path

import torch

from ..model import ModelConfig

__all__ = ["McoreError", "load_mcore", "read_rank_file", "config_from_args", "find_iteration_dir"]

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


class McoreError(ValueError):
    """A megatron-core checkpoint that cannot be imported (the message says which file and why)."""


class Namespace(types.SimpleNamespace):
    """What an ``argparse.Namespace`` in a Megatron file loads as: an attribute bag (the library
    parses no flags, so it maps the pickled name onto this data-only class instead of importing
    argparse). If the process has registered ``argparse.Namespace`` itself as a safe global
    (megatron-core does on import), torch uses that class instead; both are read with ``vars``."""


def _safe_globals() -> list:
    out = [(Namespace, "argparse.Namespace"), types.SimpleNamespace]
    try:  # NumPy's array reconstruction: np.random.get_state() in Megatron's rng_state
        import numpy as np
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        out += [_reconstruct, np.ndarray, np.dtype]
        out += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
    except ImportError:
        pass
    return out


def read_rank_file(path: str | os.PathLike) -> dict:
    """One rank's ``model_optim_rng.pt`` through ``torch.load(weights_only=True)``; refused
    (:class:`McoreError` naming the file and the globals it needs) when that is not enough."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError) for unsafe globals
        needed = []
        try:
            allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()}
            needed = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except Exception:
            pass
        what = f"it needs these Python globals: {needed}" if needed else f"torch.load(weights_only=True) failed: {e}"
        raise McoreError(
            f"{path}: refused, it cannot be read without unpickling arbitrary objects; {what}. pmodel reads "
            "megatron checkpoints only with torch.load(weights_only=True) (tensors, plain containers, argparse "
            "Namespace, NumPy arrays). Re-save it where its code is trusted, e.g. "
            "torch.save({'model': sd['model'], 'args': vars(sd['args']), 'iteration': sd['iteration']}, ...)"
        ) from None
    if not isinstance(sd, dict):
        raise McoreError(f"{path}: expected a dict (Megatron's checkpoint), got {type(sd).__name__}")
    return sd


def find_iteration_dir(d: str | os.PathLike) -> Path:
    """The folder holding the ``mp_rank_*`` folders: ``d`` itself, or the iteration named by
    ``latest_checkpointed_iteration.txt`` (``iter_%07d`` or ``release``)."""
    d = Path(d)
    if not d.is_dir():
        raise McoreError(f"{d}: not a folder")
    if (d / ".metadata").exists() or (d / "common.pt").exists() or (d / "metadata.json").exists():
        raise McoreError(
            f"{d}: megatron-core dist-checkpointing (torch_dist / zarr) format; its .metadata / common.pt "
            "are Python pickles, which pmodel does not unpickle. Save with Megatron's --ckpt-format torch "
            "(per-rank mp_rank_XX/model_optim_rng.pt), e.g. Megatron-LM's --ckpt-convert-format torch")
    if any(_RANK_DIR.match(p.name) for p in d.iterdir()):
        return d
    if (d / TRACKER).is_file():
        it = (d / TRACKER).read_text().strip()
        sub = d / ("release" if it == "release" else f"iter_{int(it):07d}")
        if not sub.is_dir():
            raise McoreError(f"{d / TRACKER} names iteration {it!r} but {sub} does not exist")
        return find_iteration_dir(sub)
    iters = sorted(p for p in d.iterdir() if p.is_dir() and (p.name.startswith("iter_") or p.name == "release"))
    if len(iters) == 1:
        return find_iteration_dir(iters[0])
    raise McoreError(f"{d}: no mp_rank_XX folders, no {TRACKER} (found {sorted(p.name for p in d.iterdir())[:8]})")


def _a(args, name, default=None):
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def config_from_args(args, *, dtype: torch.dtype | None = None) -> ModelConfig:
    """pmodel's :class:`ModelConfig` from Megatron's ``args`` (Namespace or dict); refuses
    settings pmodel's decoder does not express."""
    if args is None:
        raise McoreError("the checkpoint records no 'args' (Megatron always saves them): the model config is unknown")
    bad = {
        "num_experts": bool(_a(args, "num_experts")), "qk_layernorm": bool(_a(args, "qk_layernorm")),
        "multi_latent_attention": bool(_a(args, "multi_latent_attention")),
        "apply_layernorm_1p": bool(_a(args, "apply_layernorm_1p")),
        "squared_relu": bool(_a(args, "squared_relu")), "use_rope_scaling": bool(_a(args, "use_rope_scaling")),
        "rotary_seq_len_interpolation_factor": _a(args, "rotary_seq_len_interpolation_factor") not in (None, 1, 1.0),
        "transformer_impl": _a(args, "transformer_impl", "local") not in ("local", "transformer_engine", None),
        "expert_model_parallel_size": (_a(args, "expert_model_parallel_size") or 1) != 1,
    }
    bad = [k for k, v in bad.items() if v]
    if bad:
        raise McoreError(f"megatron args set {bad}, which pmodel's decoder does not implement")
    hidden, heads = int(_a(args, "hidden_size")), int(_a(args, "num_attention_heads"))
    groups = int(_a(args, "num_query_groups") or heads) if _a(args, "group_query_attention") else heads
    pos = _a(args, "position_embedding_type", "learned_absolute")
    position = {"rope": "rope", "learned_absolute": "learned", "none": "none"}.get(pos)
    if position is None:
        raise McoreError(f"position_embedding_type {pos!r}: pmodel reads rope, learned_absolute or none")
    norm = _a(args, "normalization", "LayerNorm")
    if norm not in ("LayerNorm", "RMSNorm"):
        raise McoreError(f"normalization {norm!r}: pmodel reads LayerNorm or RMSNorm")
    if _a(args, "swiglu"):
        act = "swiglu"
    elif _a(args, "openai_gelu") or _a(args, "onnx_safe"):
        act = "gelu"
    else:
        act = "gelu_exact"  # Megatron's default activation_func is F.gelu (erf)
    bias = bool(_a(args, "add_bias_linear", True))
    qkv_bias = bias or bool(_a(args, "add_qkv_bias", False))
    vocab = _a(args, "padded_vocab_size")
    if vocab is None:
        raise McoreError("args lack padded_vocab_size (the embedding's row count)")
    dt = dtype or _a(args, "params_dtype") or torch.float32
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=int(_a(args, "num_layers")), num_heads=heads,
        num_kv_heads=groups, head_dim=int(_a(args, "kv_channels") or hidden // heads),
        ffn_hidden_size=int(_a(args, "ffn_hidden_size") or 4 * hidden),
        max_position_embeddings=int(_a(args, "max_position_embeddings") or _a(args, "seq_length") or 2048),
        norm="rms" if norm == "RMSNorm" else "layer", norm_eps=float(_a(args, "norm_epsilon",
                                                                        _a(args, "layernorm_epsilon", 1e-5))),
        position=position, rope_theta=float(_a(args, "rotary_base", 10000) or 10000),
        rotary_fraction=float(_a(args, "rotary_percent", 1.0) or 1.0),
        rope_interleaved=bool(_a(args, "rotary_interleaved", False)), qkv_bias=qkv_bias, o_bias=bias,
        mlp_bias=bias, activation=act, tie_embeddings=not _a(args, "untie_embeddings_and_output_weights", False),
        dtype=dt,
    )


def _rank_files(d: Path) -> dict[tuple[int, int], Path]:
    out = {}
    for p in sorted(d.iterdir()):
        m = _RANK_DIR.match(p.name)
        if not m:
            continue
        if m.group(3) is not None:
            raise McoreError(f"{p}: an expert-parallel rank folder (mp_rank_TT_PPP_EEE); MoE checkpoints are not read")
        if not (p / FILE).is_file():
            raise McoreError(f"{p}: no {FILE}")
        out[(int(m.group(1)), int(m.group(2) or 0))] = p / FILE
    tps = sorted({t for t, _ in out})
    pps = sorted({q for _, q in out})
    missing = [(t, q) for t in tps for q in pps if (t, q) not in out]
    if tps != list(range(len(tps))) or pps != list(range(len(pps))) or missing:
        raise McoreError(f"{d}: incomplete set of rank folders (tp {tps}, pp {pps}, missing {missing})")
    return out


_NORM_ALIASES = {  # Transformer-Engine spec: the norm fused into the next linear
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _model_dicts(sd: dict, path: Path) -> list[dict]:
    if "model" in sd:
        return [sd["model"]]
    chunks = sorted((int(k[5:]), v) for k, v in sd.items() if re.fullmatch(r"model\d+", k))
    if not chunks:
        raise McoreError(f"{path}: no 'model' (or 'model0', ...) state dict (keys: {sorted(sd)[:8]})")
    return [v for _, v in chunks]


def load_mcore(d: str | os.PathLike, *, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict, dict]:
    """Read a megatron-core GPTModel checkpoint (all TP / PP rank files) into whole tensors.

    Returns:
      ``(config, {pmodel parameter path: tensor}, info)``; info holds ``iteration``, ``tp``,
      ``pp``, ``dir`` and ``args`` (a dict).
    """
    it_dir = find_iteration_dir(d)
    files = _rank_files(it_dir)
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(q for _, q in files)
    loaded = {k: read_rank_file(f) for k, f in sorted(files.items())}
    first = loaded[(0, 0)]
    args = first.get("args")
    cfg = config_from_args(args, dtype=dtype)
    ftp, fpp = _a(args, "tensor_model_parallel_size"), _a(args, "pipeline_model_parallel_size")
    if (ftp not in (None, tp)) or (fpp not in (None, pp)):
        raise McoreError(f"{it_dir}: args say tp {ftp} x pp {fpp} but the folder holds tp {tp} x pp {pp} rank files")
    # every rank's (chunk, stage) -> {local key: tensor}, with the layer numbers made global
    per = {(t, q): _model_dicts(sd, files[(t, q)]) for (t, q), sd in loaded.items()}
    nchunks = {len(v) for v in per.values()}
    if len(nchunks) != 1:
        raise McoreError(f"{it_dir}: ranks hold different numbers of model chunks {sorted(nchunks)}")
    v = nchunks.pop()
    layer_re = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
    offset, merged = 0, {}  # merged[(global key)][t] = tensor
    for c in range(v):
        for q in range(pp):
            counts = set()
            for t in range(tp):
                sd = per[(t, q)][c]
                local = {int(m.group(1)) for k in sd if (m := layer_re.match(k))}
                counts.add(len(local))
                if local and local != set(range(len(local))):
                    raise McoreError(f"{files[(t, q)]}: layer numbers {sorted(local)} are not 0..n-1")
                for k, x in sd.items():
                    if k.endswith("_extra_state"):
                        continue  # None in the local spec; Transformer Engine's fp8 metadata: not parameters
                    if not isinstance(x, torch.Tensor):
                        raise McoreError(f"{files[(t, q)]}: '{k}' is {type(x).__name__}, not a tensor")
                    m = layer_re.match(k)
                    if m:
                        rest = _NORM_ALIASES.get(m.group(2), m.group(2))
                        k = f"decoder.layers.{offset + int(m.group(1))}.{rest}"
                    merged.setdefault(k, {})[t] = x
            if len(counts) != 1:
                raise McoreError(f"{it_dir}: the tp ranks of stage {q} hold different layer counts {sorted(counts)}")
            offset += counts.pop()
    if offset != cfg.num_layers:
        raise McoreError(f"{it_dir}: the files hold {offset} layers, args say num_layers {cfg.num_layers}")
    flat = _to_pmodel(cfg, merged, tp, str(it_dir))
    info = {"iteration": int(first.get("iteration", 0) or 0), "tp": tp, "pp": pp, "dir": str(it_dir),
            "virtual_chunks": v, "args": dict(args) if isinstance(args, dict) else dict(vars(args))}
    return cfg, flat, info


def _to_pmodel(cfg: ModelConfig, merged: dict, tp: int, where: str) -> dict:
    used, out = set(), {}

    def whole(key, dim):
        """The tp shards of ``key`` joined along ``dim`` (None: replicated, must be equal)."""
        if key not in merged:
            raise McoreError(f"{where}: no '{key}'")
        used.add(key)
        parts = merged[key]
        if sorted(parts) != list(range(tp)):
            raise McoreError(f"{where}: '{key}' is on tp ranks {sorted(parts)} of {tp}")
        xs = [parts[t] for t in range(tp)]
        if dim is None:
            for t, x in enumerate(xs[1:], 1):
                if not torch.equal(x, xs[0]):
                    raise McoreError(f"{where}: replicated '{key}' differs between tp rank 0 and {t}")
            return xs[0]
        return torch.cat(xs, dim)

    def shards(key):
        used.add(key)
        return [merged[key][t] for t in range(tp)]

    def opt(key):
        return key in merged

    dt = cfg.dtype
    put = lambda p, x: out.__setitem__(p, x.to(dt).contiguous())  # noqa: E731
    put("embed.weight", whole("embedding.word_embeddings.weight", 0))
    if cfg.position == "learned":
        put("pos_embed.weight", whole("embedding.position_embeddings.weight", None))
    nh, ng, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if ng % tp or nh % tp:
        raise McoreError(f"{where}: {nh} heads / {ng} query groups do not split over tp {tp}")
    per_g = nh // ng
    bias_names = ("weight", "bias")
    for i in range(cfg.num_layers):
        L = f"decoder.layers.{i}."
        P = f"layers.{i}."
        for mc, pm in (("input_layernorm", "input_norm"), ("pre_mlp_layernorm", "post_attn_norm")):
            put(P + pm + ".weight", whole(L + mc + ".weight", None))
            if cfg.norm == "layer":
                put(P + pm + ".bias", whole(L + mc + ".bias", None))
        for what in bias_names:
            key = L + "self_attention.linear_qkv." + what
            if what == "bias" and not cfg.qkv_bias:
                continue
            qs, ks, vs = [], [], []
            for x in shards(key):  # (groups_r * (per_g + 2) * hd, ...) in [q..., k, v] per group
                g = x.reshape(ng // tp, per_g + 2, hd, *x.shape[1:])
                qs.append(g[:, :per_g].reshape(-1, *x.shape[1:]))
                ks.append(g[:, per_g].reshape(-1, *x.shape[1:]))
                vs.append(g[:, per_g + 1].reshape(-1, *x.shape[1:]))
            for name, parts in (("q_proj", qs), ("k_proj", ks), ("v_proj", vs)):
                put(P + f"attn.{name}.{what}", torch.cat(parts, 0))
        put(P + "attn.o_proj.weight", whole(L + "self_attention.linear_proj.weight", 1))
        if cfg.o_bias:
            put(P + "attn.o_proj.bias", whole(L + "self_attention.linear_proj.bias", None))
        for what in bias_names:
            key = L + "mlp.linear_fc1." + what
            if what == "bias" and not cfg.mlp_bias:
                continue
            if cfg.activation in ("swiglu", "geglu"):
                gs, us = zip(*(x.chunk(2, 0) for x in shards(key)))  # each shard is [gate_r; up_r]
                put(P + f"mlp.gate_proj.{what}", torch.cat(gs, 0))
                put(P + f"mlp.up_proj.{what}", torch.cat(us, 0))
            else:
                put(P + f"mlp.up_proj.{what}", whole(key, 0))
        put(P + "mlp.down_proj.weight", whole(L + "mlp.linear_fc2.weight", 1))
        if cfg.mlp_bias:
            put(P + "mlp.down_proj.bias", whole(L + "mlp.linear_fc2.bias", None))
    put("final_norm.weight", whole("decoder.final_layernorm.weight", None))
    if cfg.norm == "layer":
        put("final_norm.bias", whole("decoder.final_layernorm.bias", None))
    if not cfg.tie_embeddings:
        put("lm_head.weight", whole("output_layer.weight", 0))
    elif opt("output_layer.weight"):
        used.add("output_layer.weight")  # the last stage's copy of the tied embedding
    extra = sorted(set(merged) - used)
    if extra:
        raise McoreError(f"{where}: tensors pmodel's decoder has no place for (e.g. MoE, qk_layernorm): {extra[:6]}")
    return out
