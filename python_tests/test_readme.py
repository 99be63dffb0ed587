"""README.md against the code: every Python snippet parses, every package name it uses exists,
every ``python -m`` module it names can be found, every env switch it names is read somewhere.
(The snippets themselves need a loader and a GPU-sized model; audit 58 ran them by hand. This
catches the rot a rename leaves behind.)"""
import ast
import importlib
import importlib.util
import pathlib
import re

import pytest

import effssl_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def _resolve(dotted: str):
    """The object ``effssl_kernels.<dotted>``, importing submodules on the way."""
    obj, path = effssl_kernels, "effssl_kernels"
    for part in dotted.split("."):
        path += "." + part
        if not hasattr(obj, part):
            importlib.import_module(path)  # a submodule not imported by the package
        obj = getattr(obj, part)
    return obj


def _package_names(tree: ast.AST) -> set[str]:
    """Dotted names under ``ek.`` / ``effssl_kernels.`` and the names imported from the package."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in ("ek", "effssl_kernels"):
                names.add(".".join(reversed(chain)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("effssl_kernels"):
            sub = node.module[len("effssl_kernels"):].lstrip(".")
            names.update(f"{sub}.{a.name}" if sub else a.name for a in node.names)
    return names


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 5  # the regex finds them (a test that finds none checks nothing)


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_snippet_parses_and_its_names_exist(i):
    tree = ast.parse(SNIPPETS[i])
    for name in sorted(_package_names(tree)):  # a call ends the chain: ek.f().g gives "f"
        _resolve(name)


def test_backticked_package_names_exist():
    names = set(re.findall(r"`(?:ek|effssl_kernels)\.([A-Za-z_][\w.]*)", README))
    assert len(names) > 10
    for name in sorted(names):
        if name.startswith("_C."):  # the compiled extension's CUDA-build functions
            continue
        _resolve(name.rstrip("."))


def test_python_m_modules_exist():
    mods = set(re.findall(r"python\s+-m\s+([\w.]+)", README)) - {"pytest", "pip"}
    assert {"bench", "effssl_kernels.info"} <= mods
    old = list(importlib.sys.path)
    importlib.sys.path.insert(0, str(ROOT))  # bench/ is not installed: run from the checkout
    try:
        for m in sorted(mods):
            assert importlib.util.find_spec(m) is not None, f"README names python -m {m}"
    finally:
        importlib.sys.path[:] = old


def test_env_switches_are_read():
    switches = set(re.findall(r"\bEFFSSL_[A-Z_]+[A-Z]\b", README))
    assert {"EFFSSL_BACKEND", "EFFSSL_SKIP_CUDA"} <= switches
    code = "\n".join(p.read_text() for d in ("effssl_kernels", "bench") for p in (ROOT / d).rglob("*.py"))
    code += (ROOT / "setup.py").read_text()
    for s in sorted(switches):
        assert re.search(rf"[\"']{s}[\"']", code), f"README names {s}, which no code reads"
