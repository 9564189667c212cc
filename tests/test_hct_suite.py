"""humancompatible-train 0.4.1's own ``tests/test_ialm.py`` (vendored unchanged under
tests/reference_suites/) run against uniopt's torch iALM under the reference's module name.

A subprocess puts ``uniopt.adapters.torch.dual_optim`` into ``sys.modules`` as
``humancompatible.train.dual_optim`` (the parent packages are empty stand-ins, so the real
library is not imported), loads the suite and runs it with unittest. Every test of the suite
must pass, except the ones listed in ``DEVIATIONS`` (each a documented deviation in
docs/deviations.md); those must fail, so a list that goes stale is noticed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent / "reference_suites" / "humancompatible_train" / "test_ialm.py"

#: Tests of the suite that encode a behaviour uniopt changes on purpose: none.
DEVIATIONS: dict = {}

RUNNER = r"""
import importlib.util, json, sys, types, unittest

import uniopt.adapters.torch.dual_optim as ours

for name in ("humancompatible", "humancompatible.train"):
    stand_in = types.ModuleType(name)
    stand_in.__path__ = []
    sys.modules[name] = stand_in
sys.modules["humancompatible"].train = sys.modules["humancompatible.train"]
sys.modules["humancompatible.train"].dual_optim = ours
sys.modules["humancompatible.train.dual_optim"] = ours

spec = importlib.util.spec_from_file_location("hct_test_ialm", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = unittest.TestResult()
unittest.defaultTestLoader.loadTestsFromModule(module).run(result)
print(json.dumps({
    "class": f"{module.iALM.__module__}.{module.iALM.__qualname__}",
    "run": result.testsRun,
    "failed": {t.id().rsplit(".", 1)[-1]: tb for t, tb in result.failures + result.errors},
    "skipped": {t.id().rsplit(".", 1)[-1]: why for t, why in result.skipped},
}))
"""


def _suite_tests() -> list:
    """The test methods the vendored file defines (so a changed file changes this list)."""
    tree = ast.parse(SUITE.read_text())
    return [f.name for c in tree.body if isinstance(c, ast.ClassDef)
            for f in c.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")]


@pytest.fixture(scope="module")
def outcome():
    out = subprocess.run([sys.executable, "-c", RUNNER, str(SUITE)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_suite_ran_against_uniopt(outcome):
    assert outcome["class"] == "uniopt.adapters.torch.ialm.iALM"
    assert outcome["run"] == len(_suite_tests()) == 7
    assert outcome["skipped"] == {}
    assert set(DEVIATIONS) <= set(_suite_tests())


@pytest.mark.parametrize("name", _suite_tests())
def test_reference_test(outcome, name):
    if name in DEVIATIONS:
        assert name in outcome["failed"], f"{name} passes now: drop it from DEVIATIONS"
    else:
        assert name not in outcome["failed"], outcome["failed"].get(name)
