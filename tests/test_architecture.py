"""The layering of ARCHITECTURE.md holds: every file its tables name exists, no layer imports one
above it (imports parsed with ``ast``, function-level ones included), and triton is optional at
import (a subprocess where it cannot be imported builds and runs a tiny RecTok on the reference path)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "rectok_fast")
KERNELS = os.path.join(ROOT, "kernels")


def _table_paths() -> list[str]:
    text = open(os.path.join(ROOT, "ARCHITECTURE.md"), encoding="utf-8").read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    paths = {p for row in rows for p in re.findall(r"`([\w./]+\.(?:py|cpp|cu))`", row)}
    return sorted(paths)


def test_table_names_existing_files():
    paths = _table_paths()
    assert len(paths) >= 20, paths  # the op table and the shared-pieces table were parsed
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"


def test_every_op_module_is_in_the_table():
    paths = set(_table_paths())
    ops = {
        f"rectok_fast/ops/{f}"
        for f in os.listdir(os.path.join(PKG, "ops"))
        if f.endswith(".py") and f not in ("__init__.py", "_common.py")  # _common: alias of _rowloss
    }
    assert not ops - paths, f"op modules missing from ARCHITECTURE.md: {sorted(ops - paths)}"


def _module_name(path: str) -> str:
    if path.startswith(KERNELS):
        rel = "rectok_fast/kernels" + path[len(KERNELS) :]
    else:
        rel = os.path.relpath(path, ROOT)
    rel = rel[: -len(".py")].replace(os.sep, "/")
    if rel.endswith("/__init__"):
        rel = rel[: -len("/__init__")]
    return rel.replace("/", ".")


def _imports(path: str) -> set[str]:
    """Every rectok_fast module ``path`` imports (absolute, relative, at any depth of the file)."""
    mod = _module_name(path)
    is_pkg = path.endswith("__init__.py")
    package = mod if is_pkg else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` imports a module
    return {m for m in out if m == "rectok_fast" or m.startswith("rectok_fast.")}


def _files(folder: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(folder):
        found += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    return sorted(found)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


# layer -> the layers (first component under rectok_fast) it must never import
FORBIDDEN = {
    "reference": {"ops", "nn", "models", "train", "sampling", "eval", "data", "cli", "kernels"},
    "ops": {"nn", "models", "train", "sampling", "eval", "data", "cli"},
    "nn": {"models", "train", "sampling", "eval", "data", "cli"},
    "models": {"train", "eval", "sampling", "cli"},
    "eval": {"train"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_higher_one(layer):
    bad = []
    for path in _files(os.path.join(PKG, layer)):
        for m in sorted(_imports(path)):
            if _layer(m) in FORBIDDEN[layer]:
                bad.append(f"{os.path.relpath(path, ROOT)} imports {m}")
    assert not bad, "\n".join(bad)


def test_kernels_import_only_kernels():
    bad = []
    for path in _files(KERNELS):
        for m in sorted(_imports(path)):
            if not (m == "rectok_fast.kernels" or m.startswith("rectok_fast.kernels.")):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {m}")
    assert not bad, "\n".join(bad)


def test_ops_import_triton_only_inside_functions():
    """No op module imports triton (or a kernel module) when it is imported."""
    bad = []
    for path in _files(os.path.join(PKG, "ops")):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                kernel_module = "kernels." in n and not n.endswith("kernels._stream") and "_stream." not in n
                if n == "triton" or n.startswith("triton.") or kernel_module:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {n}")
    assert not bad, "\n".join(bad)


def test_the_import_checker_sees_a_back_edge(tmp_path):
    """The checker can fail: a relative import two levels up into models is found."""
    f = tmp_path / "x.py"
    f.write_text("from ..models.rectok import RecTok\nimport rectok_fast.train.dit\n")
    real = _module_name
    try:
        globals()["_module_name"] = lambda p: "rectok_fast.ops.x"
        found = _imports(str(f))
    finally:
        globals()["_module_name"] = real
    assert "rectok_fast.models.rectok" in found and "rectok_fast.train.dit" in found


NO_TRITON = textwrap.dedent(
    """
    import importlib.abc
    import sys

    import torch  # first: torch probes for triton with importlib.util.find_spec while it imports


    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"triton is not installed here ({name} blocked by the test)")
            return None


    sys.meta_path.insert(0, NoTriton())

    import rectok_fast
    import rectok_fast.models
    import rectok_fast.nn
    from rectok_fast.models.rectok import RecTok, RecTokConfig

    cfg = RecTokConfig(img_size=32, token_channels=4, encoder=(32, 1, 2), decoder=(32, 1, 2),
                       sem_decoder=(32, 1, 2), teachers={"tiny": 8}, ops_backend="reference")
    torch.manual_seed(0)
    model = RecTok(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, teacher_features={"tiny": torch.randn(2, cfg.num_tokens, 8)})
    assert out.reconstruction.shape == x.shape and bool(torch.isfinite(out.reconstruction).all())
    out.reconstruction.mean().backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == x.shape
    ids = torch.zeros(2, 2, dtype=torch.long)
    try:
        rectok_fast.ops.gather_tokens(torch.randn(2, 4, 3), ids, backend="triton")
    except RuntimeError as e:
        assert "triton is not importable" in str(e), e
    else:
        raise AssertionError("backend='triton' ran without triton")
    assert rectok_fast.ops.gather_tokens(torch.randn(2, 4, 3), ids, backend="auto").shape == (2, 2, 3)
    assert rectok_fast.last_backend("gather_tokens") == "reference"
    loaded = sorted(k for k in sys.modules if k == "triton" or k.startswith("triton."))
    assert not loaded, loaded
    print("OK")
    """
)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_triton_optional_at_import(interpret):
    """Without triton, the package, the models and nn import, a tiny RecTok trains a step on the
    reference path, and ``backend="triton"`` raises a clear error (also under TRITON_INTERPRET=1)."""
    env = dict(os.environ, TRITON_INTERPRET=interpret, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", NO_TRITON], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
