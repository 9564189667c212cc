"""Every example script and every Python snippet of the README runs, and the demo agrees."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
_ENV = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}


def _python(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env=_ENV, cwd=ROOT, **kwargs)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    out = _python([str(script)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


def _readme_snippets():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_readme_snippets())))
def test_readme_snippet_runs(index):
    out = _python(["-c", _readme_snippets()[index]])
    assert out.returncode == 0, out.stderr[-3000:]


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert text.index("```bash") < text.index("## ")


def test_demo_backends_agree():
    out = _python(["examples/demo.py", "--steps", "40"])
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "all backends agree" in out.stdout
    sections = ("qhadam-digits", "polyak-interpolation", "neyman-pearson")
    for section in sections:
        assert f"== {section} ==" in out.stdout
    for backend in ("numpy (core)", "torch", "jax"):  # one row per section
        rows = re.findall(rf"^{re.escape(backend)}\s+-?\d", out.stdout, flags=re.M)
        assert len(rows) == len(sections), out.stdout
    # iALM's section: the false-positive-rate bound holds on every backend
    assert len(re.findall(r"\bsatisfied$", out.stdout, flags=re.M)) == 3, out.stdout
