"""Helpers shared by the HF config readers (v4 ``rope_theta`` and v5 ``rope_parameters``)."""
from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rope(d: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """``(theta, scaling)`` from either config style."""
    rp = d.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", default_theta)) or default_theta)
    scaling = d.get("rope_scaling") or None
    if scaling is None and rp.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta",)}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    return theta, scaling


def rope_to_hf(theta: float, scaling: dict | None) -> dict:
    """Both styles at once, so transformers 4.x and 5.x read the same file."""
    params = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        params = {**scaling, "rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None, "rope_parameters": params}


def dtype(d: dict) -> torch.dtype:
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def activation(act: str) -> str:
    if act in ("silu", "swish"):
        return "swiglu"
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"):
        return "geglu"
    raise ValueError(f"unsupported gated activation {act!r} (expected silu or a gelu variant)")


def require(c, arch: str, **expected) -> None:
    """Raise when ``ModelConfig`` ``c`` differs from what checkpoint class ``arch`` can express.

    Args:
      expected: field -> required value, or a callable ``value -> bool``.
    """
    bad = []
    for k, want in expected.items():
        got = getattr(c, k)
        ok = want(got) if callable(want) else got == want
        if not ok:
            bad.append(f"{k}={got!r}" + ("" if callable(want) else f" (needs {want!r})"))
    if bad:
        raise ValueError(f"{arch} cannot express these ModelConfig settings: {', '.join(bad)}")


def unsupported(d: dict, arch: str, **allowed) -> None:
    """Raise when an HF config.json sets a key to a value pmodel does not implement.

    Args:
      allowed: key -> value(s) accepted (a tuple of values, or a callable); a missing key passes.
    """
    bad = []
    for k, ok in allowed.items():
        if k not in d:
            continue
        v = d[k]
        good = ok(v) if callable(ok) else v in (ok if isinstance(ok, tuple) else (ok,))
        if not good:
            bad.append(f"{k}={v!r}")
    if bad:
        raise ValueError(f"{arch} config.json: unsupported settings {', '.join(bad)} (pmodel implements "
                         f"{', '.join(f'{k} in {v}' if not callable(v) else k for k, v in allowed.items())})")
