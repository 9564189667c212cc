"""The numba.cuda kernels of the QH family.

Here they run on numba-cuda's simulator (conftest sets NUMBA_ENABLE_CUDASIM=1) and are compared
with the CPU table kernels. Where libNVVM and NVRTC are present, every kernel is also compiled
to real PTX (in a subprocess without the simulator). Tests marked ``gpu`` need a real device.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tolerance
from cuda_arrays import SIMULATOR
from cuda_arrays import to_device as _device
from cuda_arrays import to_host as _host
from cuda_ptx import compile_ptx_script

from numba import cuda

from uniopt.kernels import qh_cpu  # noqa: E402
from uniopt.kernels._pointers import addresses  # noqa: E402
from uniopt.rules import qh  # noqa: E402


@pytest.mark.parametrize("n", [1, 300, 1000])
@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1), dict(weight_decay=0.2, weight_decay_type="direct", maximize=True)])
def test_qhm_cuda_matches_cpu(n, kwargs, dtype):
    from uniopt.kernels import qh_cuda

    rng = np.random.default_rng(n)
    p, buf = rng.standard_normal(n).astype(dtype), np.zeros(n, dtype)
    p_cpu, buf_cpu = p.copy(), buf.copy()
    dp, dbuf = _device(p), _device(buf)
    coefficients = qh.qhm_coefficients(0.1, 0.9, 0.7, **kwargs)
    for _ in range(3):
        g = rng.standard_normal(n).astype(dtype)
        qh_cuda.qhm_step_(dp, _device(g), dbuf, coefficients)
        qh_cpu.qhm_table_(addresses([p_cpu]), addresses([g]), addresses([buf_cpu]),
                          np.array([n]), np.array(coefficients, dtype))
    np.testing.assert_allclose(_host(dp), p_cpu, **tolerance(dtype))
    np.testing.assert_allclose(_host(dbuf), buf_cpu, **tolerance(dtype))
    assert _host(dp).dtype == dtype


@pytest.mark.parametrize("kwargs", [dict(nus=(0.7, 0.9), weight_decay=0.1),
                                    dict(nus=(1.0, 1.0), weight_decay=0.1, decouple_weight_decay=True)])
def test_qhadam_cuda_matches_cpu(kwargs, dtype):
    from uniopt.kernels import qh_cuda

    n = 517
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(dtype)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    p_cpu, m_cpu, v_cpu = p.copy(), m.copy(), v.copy()
    dp, dm, dv = _device(p), _device(m), _device(v)
    hyper = qh.qhadam_hyper(0.01, (0.9, 0.99), **kwargs)
    w1 = w2 = 0.0
    w_cpu = (np.zeros(1), np.zeros(1))
    for _ in range(4):
        g = rng.standard_normal(n).astype(dtype)
        w1, w2, a1, a2 = qh.qhadam_bias_weights(w1, w2, hyper.beta1, hyper.beta2)
        qh_cuda.qhadam_step_(dp, _device(g), dm, dv, qh.qhadam_coefficients(hyper, a1, a2))
        qh_cpu.qhadam_table_(addresses([p_cpu]), addresses([g]), addresses([m_cpu]), addresses([v_cpu]),
                             np.array([n]), *w_cpu, np.array(hyper), np.empty(16, dtype))
    assert w_cpu[0][0] == pytest.approx(w1) and w_cpu[1][0] == pytest.approx(w2)
    for got, want in ((dp, p_cpu), (dm, m_cpu), (dv, v_cpu)):
        np.testing.assert_allclose(_host(got), want, **tolerance(dtype))


def test_empty_array_launches_nothing():
    from uniopt.kernels import qh_cuda

    p = np.zeros(0)
    qh_cuda.qhm_step_(p, p, p, qh.qhm_coefficients(0.1, 0.9, 0.7))
    assert p.size == 0


_PTX_BODY = """
    from uniopt.kernels import qh_cuda
    for ty in (float32, float64):
        for fn, n_arrays, n_scalars in ((qh_cuda._qhm_kernel, 3, 8), (qh_cuda._qhadam_kernel, 4, 13)):
            ptx, _ = cuda.compile_ptx(fn, (ty[::1],) * n_arrays + (ty,) * n_scalars, cc=(8, 0))
            assert ".entry" in ptx and ("f32" if ty is float32 else "f64") in ptx
            print("OK", fn.__name__, ty, len(ptx))
"""


def test_cuda_kernels_compile_to_ptx():
    stdout = compile_ptx_script(_PTX_BODY)
    assert stdout.count("OK") == 4, stdout


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="needs a real CUDA device (run with UNIOPT_TEST_REAL_CUDA=1)")
def test_real_device_matches_cpu():
    if not cuda.is_available():
        pytest.skip("no CUDA device")
    test_qhm_cuda_matches_cpu(4096, dict(weight_decay=0.1), np.float32)
    test_qhadam_cuda_matches_cpu(dict(nus=(0.7, 0.9)), np.float64)
