"""Compiling CUDA kernels to real PTX without a GPU (a test helper, not a test module).

numba.cuda.compile_ptx needs libNVVM (the machine's CUDA toolkit) and NVRTC (pip's
``nvidia-cuda-nvrtc``); the compilation runs in a subprocess without the simulator that
conftest.py turns on. Device functions are compiled for "the current device", so the script
names one (compute capability 8.0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_PREAMBLE = textwrap.dedent(
    """
    import sys, types
    import numpy as np
    try:
        from numba import cuda, float32, float64
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()  # loads libNVVM or raises
        from cuda.bindings import nvrtc  # noqa: F401  (NVRTC bindings)
        import nvidia.cu13  # noqa: F401
    except Exception as exc:  # depends on the machine
        print("SKIP", type(exc).__name__, exc)
        sys.exit(0)
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(8, 0))
    """
)


def compile_ptx_script(body: str) -> str:
    """Run ``body`` after the preamble; its stdout, or skip the test if PTX cannot be made."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    script = _PREAMBLE + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"libNVVM/NVRTC not available: {out.stdout.strip()}")
    return out.stdout
