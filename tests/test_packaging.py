"""Packaging and isolation: the layout the pyproject declares is the layout on disk, the core
imports no framework, and only the distinctive import name is importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, **kwargs)


def test_import_uniopt_loads_neither_torch_nor_jax():
    code = (
        "import sys, json, uniopt, uniopt.adapters, uniopt.rules.qh, uniopt.kernels.qh_cpu\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'jax', 'jaxlib', 'optax', 'tensorflow'))))"
    )
    out = _run(code, cwd="/")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_importing_uniopt_compiles_nothing():
    code = (
        "import uniopt, numba\n"
        "from uniopt.kernels import qh_cpu\n"
        "print(sum(len(k.signatures) for k in (qh_cpu.qhm_table_, qh_cpu.qhadam_table_)))"
    )
    out = _run(code, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_pyproject_packages_match_folders():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    mapping = config["package-dir"]
    on_disk = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base)
            on_disk.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert declared == on_disk


def test_bare_core_and_adapters_are_not_importable():
    out = _run("import importlib.util as u; print(u.find_spec('core'), u.find_spec('adapters'))", cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None None"


def test_cli_info_runs():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-m", "uniopt", "info"], capture_output=True, text=True,
                         timeout=300, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    for needle in ("uniopt", "numba", "backends:", "numba threading layer", "cuda:"):
        assert needle in out.stdout


@pytest.mark.parametrize("argv", [["nope"], [], ["demo"], ["bench", "--quick"]])
def test_cli_rejects_unknown_commands(argv):
    out = subprocess.run([sys.executable, "-m", "uniopt", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2


# -- the kernel cache key -------------------------------------------------------------------------
def test_kernel_fingerprint_covers_exactly_rules_kernels_and_jit():
    from uniopt import _jit

    package = Path(_jit.__file__).resolve().parent
    hashed = {path.relative_to(package).as_posix() for path in _jit.fingerprinted_files()}
    expected = {p.relative_to(package).as_posix() for folder in ("rules", "kernels")
                for p in (package / folder).glob("*.py")} | {"_jit.py"}
    assert hashed == expected
    assert "rules/qh.py" in hashed and "kernels/qh_cpu.py" in hashed
    assert not any(name in hashed for name in ("qh.py", "polyak.py", "__main__.py", "__init__.py"))
    assert _jit.source_fingerprint() == _jit.fingerprint_of(package)


def test_kernel_fingerprint_changes_with_kernel_sources_only(tmp_path):
    import shutil

    from uniopt import _jit

    package = Path(_jit.__file__).resolve().parent
    copy = tmp_path / "uniopt"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _jit.fingerprint_of(copy)
    assert before == _jit.source_fingerprint()

    face = copy / "qh.py"
    face.write_text(face.read_text() + "\n# a face edit\n")
    (copy / "__main__.py").write_text("# the command line, rewritten\n")
    assert _jit.fingerprint_of(copy) == before

    for name in ("rules/qh.py", "kernels/qh_cpu.py", "_jit.py"):
        edited = copy / name
        original = edited.read_bytes()
        edited.write_bytes(original + b"\n# an edit\n")
        assert _jit.fingerprint_of(copy) != before, name
        edited.write_bytes(original)
        assert _jit.fingerprint_of(copy) == before
    (copy / "kernels" / "new_cpu.py").write_text("# a new kernel module\n")
    assert _jit.fingerprint_of(copy) != before


# -- the core imports no framework, anywhere --------------------------------------------------------
_FORBIDDEN_ROOTS = ("torch", "jax", "jaxlib", "optax")


def _forbidden_imports(source: str, module: str) -> list[str]:
    """Every import in ``source`` (module ``module`` of the core package, dotted, relative to
    ``uniopt``) of a framework or of ``uniopt.adapters``, at any depth (inside functions, classes,
    ``try`` blocks, ``if TYPE_CHECKING``): ``"line: name"`` for each."""
    import ast

    package = module.split(".")[:-1]  # the package the module's relative imports start from
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against uniopt.<package>
                base = ["uniopt", *package]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in _FORBIDDEN_ROOTS or parts[:2] == ["uniopt", "adapters"]:
                found.append(f"{node.lineno}: {name}")
                break
    return found


def test_core_imports_no_framework_anywhere():
    core = ROOT / "core"
    modules = sorted(p for p in core.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(modules) > 20 and core / "kernels" / "bandwidth.py" in modules
    offenders = {}
    for path in modules:
        module = ".".join(path.relative_to(core).with_suffix("").parts)
        found = _forbidden_imports(path.read_text(), module)
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


@pytest.mark.parametrize("source, module", [
    ("def f():\n    import torch\n", "qh"),
    ("class A:\n    def m(self):\n        from jax import numpy\n", "qh"),
    ("try:\n    import optax as o\nexcept ImportError:\n    pass\n", "polyak"),
    ("import numpy, jaxlib.xla_client\n", "ialm"),
    ("from uniopt.adapters.torch import QHAdam\n", "qh"),
    ("import uniopt.adapters\n", "qh"),
    ("def f():\n    from .adapters import torch\n", "qh"),
    ("from ..adapters.jax import qhadam\n", "kernels.qh_cpu"),
    ("from .. import adapters\n", "rules.qh"),
])
def test_import_checker_catches(source, module):
    assert _forbidden_imports(source, module)


@pytest.mark.parametrize("source, module", [
    ("import numpy as np\nfrom numba import njit\nimport scipy.optimize\n", "qh"),
    ("from . import _jit\nfrom .rules import qh\n", "qh"),
    ("from .. import _jit\nfrom ._pointers import view\n", "kernels.qh_cpu"),
    ("import torchvision_like_name_is_not_torch\n", "qh"),
])
def test_import_checker_passes(source, module):
    assert _forbidden_imports(source, module) == []
