"""Shared fixtures. The CUDA tests run on numba-cuda's simulator unless a real device is asked
for with UNIOPT_TEST_REAL_CUDA=1 (the simulator must be chosen before numba.cuda is imported)."""

import os

if os.environ.get("UNIOPT_TEST_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numba
import numpy as np
import pytest

# Numba's thread count is read from the environment, or else from the CPU affinity, whenever
# its configuration reloads (at compiles), and may not change once its threads run. Tests that
# import a benchmark module or run the table may pin the process to one CPU and restore the
# affinity afterwards: fix the count now so such a test cannot change it under the next one.
os.environ.setdefault("NUMBA_NUM_THREADS", str(numba.config.NUMBA_NUM_THREADS))
from fuzz_profiles import register as register_hypothesis_profiles
from hypothesis import settings

# property-based tests: the few, reproducible examples of "ci" unless HYPOTHESIS_PROFILE says
# otherwise (`make fuzz`: "fuzz")
register_hypothesis_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "").strip() or "ci")


def tolerance(dtype) -> dict:
    """rtol/atol for comparing two executions of the same rule (a few ulps of accumulation)."""
    if np.dtype(dtype) == np.float32:
        return dict(rtol=2e-5, atol=1e-6)
    return dict(rtol=1e-12, atol=1e-14)


@pytest.fixture
def x64():
    """float64 in JAX for one test (restored afterwards)."""
    import jax

    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param
