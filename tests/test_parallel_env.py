"""UNIOPT_PARALLEL_MIN_SIZE: how it is read at import, and parallel kernels across fork().

Both need a fresh interpreter (the variable is read when ``uniopt`` is imported; a fork after
the parallel threads started is the situation under test), so every test runs a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "UNIOPT_PARALLEL_MIN_SIZE"}
    environ.update(env)
    # cwd: a folder without core/ or adapters/, so only the installed uniopt is importable
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("text, value", [("1e6", 1_000_000), ("250000", 250_000), ("0", 0),
                                         (" 42 ", 42), ("", 2**62)])
def test_parallel_min_size_values(text, value, tmp_path):
    done = _python("import uniopt; print(uniopt._jit.PARALLEL_MIN_SIZE)", tmp_path,
                   UNIOPT_PARALLEL_MIN_SIZE=text)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == value


@pytest.mark.parametrize("text", ["-5", "abc", "2.5", "nan", "inf", "-1e3"])
def test_bad_parallel_min_size_is_a_clear_error(text, tmp_path):
    done = _python("import uniopt", tmp_path, UNIOPT_PARALLEL_MIN_SIZE=text)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Invalid UNIOPT_PARALLEL_MIN_SIZE:"), done.stderr
    assert repr(text) in last
    assert "int()" not in done.stderr and "invalid literal" not in last


FORK_SCRIPT = """
import multiprocessing as mp
import numpy as np
import torch
import uniopt
from numba.np.ufunc import parallel as numba_parallel
from uniopt.adapters.torch import QHAdam

def train(n_steps=4):
    w = torch.nn.Parameter(torch.linspace(-1.0, 2.0, 3000, dtype=torch.float64))
    opt = QHAdam([w], lr=0.05, betas=(0.9, 0.99), nus=(0.7, 1.0))
    for _ in range(n_steps):
        opt.zero_grad()
        (w ** 4 - w).sum().backward()
        opt.step()
    table = opt._dispatcher._plans[id(opt.param_groups[0])].tables[0]
    return w.detach().numpy().copy(), table.parallel

def naive(n_steps=4):  # QHAdam by hand (float64, bias-corrected moments as qhoptim does)
    w = np.linspace(-1.0, 2.0, 3000)
    m = np.zeros_like(w); v = np.zeros_like(w); w1 = w2 = 0.0
    for _ in range(n_steps):
        g = 4 * w ** 3 - 1
        w1 = 1 + 0.9 * w1; w2 = 1 + 0.99 * w2
        a1, a2 = 1 - 1 / w1, 1 - 1 / w2
        m = a1 * m + (1 - a1) * g; v = a2 * v + (1 - a2) * g * g
        w = w - 0.05 * (0.7 * m + 0.3 * g) / (np.sqrt(v) + 1e-8)
    return w

def child(queue):
    w, parallel = train()
    queue.put((w, parallel, uniopt._jit.FORKED_SERIAL, uniopt._jit.PARALLEL_MIN_SIZE))

if __name__ == "__main__":
    parent, parallel = train()
    assert parallel and numba_parallel._is_initialized  # the parent ran the parallel kernel
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(timeout=240)  # the result (24 kB) fits in the pipe: the child can exit first
    assert proc.exitcode == 0, proc.exitcode
    w, child_parallel, forked_serial, min_size = queue.get(timeout=10)
    assert forked_serial and not child_parallel and min_size == 2**62
    assert not uniopt._jit.FORKED_SERIAL and uniopt._jit.PARALLEL_MIN_SIZE == 1000
    np.testing.assert_allclose(w, naive(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(w, parent)  # serial child == parallel parent
    print("ok")
"""


def test_forked_child_after_parallel_kernel_runs_serially(tmp_path):
    script = tmp_path / "fork_after_parallel.py"
    script.write_text(FORK_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "UNIOPT_PARALLEL_MIN_SIZE": "1000"})
    assert "fork() called from a process already using GNU OpenMP" not in done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
