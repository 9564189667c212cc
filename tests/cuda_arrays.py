"""Arrays for the CUDA tests (a test helper, not a test module): on numba-cuda's simulator the
kernels take host arrays as they are; on a real device they get device copies."""

from __future__ import annotations

import os

#: conftest.py turns the simulator on unless UNIOPT_TEST_REAL_CUDA=1
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def to_device(a):
    """``a`` itself on the simulator, else a device copy."""
    if SIMULATOR:
        return a
    from numba import cuda

    return cuda.to_device(a)


def to_host(a):
    """``a`` itself on the simulator, else a host copy of the device array."""
    return a if SIMULATOR else a.copy_to_host()
