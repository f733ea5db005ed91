"""Dependency direction and library rules, read from the source (AST; nothing is imported).

* the decoder (``pmodel/model.py``) knows no family;
* ``pmodel/ops/`` knows nothing of data, parallelism, families or LoRA (weight wrappers reach it
  through the written protocol, never by import);
* ``pmodel/parallel/`` does not import LoRA;
* the library never imports ``scripts/``, ``benchmarks/``, ``tests/`` or a test oracle;
* ``torch.cuda`` is touched only by the CUDA kernels (``ops/cuda.py``) and ``device.py``;
* no ``global``, no ``argparse``, no ``os.environ`` / ``os.getenv`` in the library (scripts
  translate flags and the environment into explicit arguments).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "pmodel"
TORCH_CUDA_ALLOWED = {"pmodel/ops/cuda.py", "pmodel/device.py"}


def _sources(under: str = "pmodel") -> list[Path]:
    return sorted((ROOT / under).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for every import in ``path``, relative ones resolved.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (``name`` may be a submodule),
    so a rule on ``pmodel.lora`` also catches ``from .. import lora``.
    """
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    source = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return out


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = {}  # one entry per import statement
    for f in files:
        for line, mod in imported_modules(f):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden):
                bad.setdefault(f"{_rel(f)}:{line}", f"{_rel(f)}:{line}: imports {mod}")
    return list(bad.values())


def test_import_resolution_sees_relative_and_absolute_imports():
    # the checker itself: relative imports resolve against the file's package
    src = ("from .. import lora\nfrom ..families import llama\nimport pmodel.data.tokenizers as t\n"
           "from . import comm\nfrom .tensor import ColumnParallel\n")
    got = {m for _, m in imported_modules(LIB / "parallel" / "probe.py", src)}
    assert {"pmodel.lora", "pmodel.families", "pmodel.families.llama", "pmodel.data.tokenizers",
            "pmodel.parallel.comm", "pmodel.parallel.tensor"} <= got, got
    got = {m for _, m in imported_modules(LIB / "ops" / "__init__.py", "from ..lora import LoRA\n")}
    assert "pmodel.lora" in got, got


def test_decoder_imports_no_family():
    bad = _violations([LIB / "model.py"], ("pmodel.families",))
    assert not bad, "\n".join(bad)


def test_ops_import_no_data_parallel_family_or_lora():
    forbidden = ("pmodel.data", "pmodel.parallel", "pmodel.families", "pmodel.lora")
    bad = _violations(_sources("pmodel/ops"), forbidden)
    assert not bad, "\n".join(bad)


def test_parallel_does_not_import_lora():
    bad = _violations(_sources("pmodel/parallel"), ("pmodel.lora",))
    assert not bad, "\n".join(bad)


def test_library_imports_no_scripts_benchmarks_tests_or_oracles():
    # test helpers live in tests/ as top-level modules (sys.path), so name them too; tiktoken is a
    # runtime dependency (the rank-file tokenizers run on it, issue 15), no longer only an oracle
    forbidden = ("scripts", "benchmarks", "tests", "conftest", "_dist", "_parallel_checks", "_data_helpers",
                 "npu_standins", "transformers", "peft", "megatron")
    bad = _violations(_sources(), forbidden)
    assert not bad, "\n".join(bad)


def _torch_aliases(tree_: ast.AST) -> set[str]:
    names = {"torch"}
    for node in ast.walk(tree_):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch" and a.asname}
    return names


def test_torch_cuda_only_in_cuda_kernels_and_device():
    bad = []
    for f in _sources():
        if _rel(f) in TORCH_CUDA_ALLOWED:
            continue
        tree_ = ast.parse(f.read_text())
        torch_names = _torch_aliases(tree_)
        for node in ast.walk(tree_):
            if isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name) \
                    and node.value.id in torch_names:
                bad.append(f"{_rel(f)}:{node.lineno}: torch.cuda")
            elif isinstance(node, ast.Import) and any(a.name.startswith("torch.cuda") for a in node.names):
                bad.append(f"{_rel(f)}:{node.lineno}: import torch.cuda")
            elif isinstance(node, ast.ImportFrom) and not node.level and (
                    (node.module or "").startswith("torch.cuda")
                    or (node.module == "torch" and any(a.name == "cuda" for a in node.names))):
                bad.append(f"{_rel(f)}:{node.lineno}: from {node.module} import ...")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _sources(), ids=_rel)
def test_no_global_argparse_or_environment(path):
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Global):
            bad.append(f"{node.lineno}: global {', '.join(node.names)}")
        elif isinstance(node, ast.Import):
            bad += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "argparse"]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if (node.module or "").split(".")[0] == "argparse":
                bad.append(f"{node.lineno}: from {node.module} import ...")
            if node.module == "os" and any(a.name in ("environ", "environb", "getenv", "getenvb") for a in node.names):
                bad.append(f"{node.lineno}: from os import environ/getenv")
        elif isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "getenvb") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            bad.append(f"{node.lineno}: os.{node.attr}")
    assert not bad, f"{_rel(path)}:\n" + "\n".join(bad)
