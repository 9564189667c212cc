"""The numba.cuda kernels of the dual side of constrained learning
(``uniopt.kernels.constrained_cuda``) against the CPU kernels and a naive oracle.

They run on numba-cuda's simulator (conftest sets NUMBA_ENABLE_CUDASIM=1); where libNVVM and
NVRTC are present, every kernel is also compiled to real PTX (in a subprocess without the
simulator). Tests marked ``gpu`` need a real device. The simulator runs each CUDA thread as a
Python thread: sizes stay small.
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

from refimpl import naive_constrained as naive

from uniopt.kernels import constrained_cpu as K


def _coef(dtype, ki=1.1, kpn=0.6, nu=0.25, signed_lr=0.1, lr_decay=0.01, lower=-np.inf):
    return np.array([ki, kpn, nu, 1 - nu, signed_lr, lr_decay, lower], dtype=dtype)


@pytest.mark.parametrize("lower", [0.0, -np.inf])
def test_sgd_projected_matches_cpu(dtype, lower, rng):
    from uniopt.kernels import constrained_cuda as C

    p = rng.standard_normal(300).astype(dtype)
    g = rng.standard_normal(300).astype(dtype)
    coef = np.array([0.4, lower], dtype)
    cpu = p.copy()
    K.sgd_projected_(cpu, g, coef)
    dev = _device(p.copy())
    C.sgd_projected_(dev, _device(g), coef)
    np.testing.assert_array_equal(_host(dev), cpu)


def test_indexed_sgd_projected_matches_oracle_and_leaves_other_rows(dtype, rng):
    from uniopt.kernels import constrained_cuda as C

    m, w = 60, 2
    p = rng.standard_normal((m, w)).astype(dtype)
    p[50:] = np.nan
    rows = np.array([3, 17, 0, 44, 9], dtype=np.int64)
    assert C.unique_rows(rows) and not C.unique_rows(np.array([1, 1]))
    values = rng.standard_normal((5, w)).astype(dtype)
    dev = _device(p.copy())
    C.indexed_sgd_projected_(dev, _device(rows), _device(values), np.array([0.3, 0.0], dtype))
    out = _host(dev)
    cpu = p.copy()
    K.indexed_sgd_projected_(cpu, rows, values, np.array([0.3, 0.0], dtype))
    np.testing.assert_array_equal(out[:50], cpu[:50])
    expected = naive.indexed_projected_step(p[:50].astype(np.float64), rows, values, 0.3, 0.0)
    np.testing.assert_allclose(out[:50], expected, **tolerance(dtype))
    assert np.isnan(out[50:]).all()
    C.indexed_sgd_projected_(dev, _device(np.zeros(0, np.int64)), _device(np.zeros((0, w), dtype)),
                             np.array([0.3, 0.0], dtype))  # empty: nothing launched
    np.testing.assert_array_equal(_host(dev)[:50], out[:50])


@pytest.mark.parametrize("fresh", [0, 1])
@pytest.mark.parametrize("per_entry", [False, True])
def test_nupi_matches_cpu(dtype, fresh, per_entry, rng):
    from uniopt.kernels import constrained_cuda as C

    n = 200
    p, g, xi = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    ki = (np.abs(rng.standard_normal(n)) if per_entry else np.array([1.1])).astype(dtype)
    kpn = (np.abs(rng.standard_normal(n)) if per_entry else np.array([0.6])).astype(dtype)
    coef = _coef(dtype)
    flags = np.array([fresh], dtype=np.int64)
    cp, cx = p.copy(), xi.copy()
    K.nupi_(cp, g, cx, ki, kpn, coef, flags)
    dp, dx = _device(p.copy()), _device(xi.copy())
    C.nupi_(dp, _device(g), dx, ki, kpn, coef, flags)
    np.testing.assert_allclose(_host(dp), cp, **tolerance(dtype))
    np.testing.assert_allclose(_host(dx), cx, **tolerance(dtype))
    if dtype == np.float64:
        np.testing.assert_allclose(_host(dp), cp, rtol=1e-15, atol=0)


@pytest.mark.parametrize("use_mask", [0, 1])
def test_indexed_nupi_matches_cpu(dtype, use_mask, rng):
    from uniopt.kernels import constrained_cuda as C

    m, w = 40, 3
    p = rng.standard_normal((m, w)).astype(dtype)
    xi = rng.standard_normal((m, w)).astype(dtype)
    mask = rng.random((m, w)) < 0.5
    rows = rng.choice(m, size=12, replace=False).astype(np.int64)
    values = rng.standard_normal((12, w)).astype(dtype)
    kpn = np.abs(rng.standard_normal((m, w))).astype(dtype)
    ki = np.full((1, 1), 0.9, dtype)
    coef = _coef(dtype, lower=0.0)
    flags = np.array([use_mask], dtype=np.int64)
    cp, cx, cm = p.copy(), xi.copy(), mask.copy()
    K.indexed_nupi_(cp, rows, values, cx, cm, ki, kpn, coef, flags)
    dp, dx, dm = _device(p.copy()), _device(xi.copy()), _device(mask.copy())
    C.indexed_nupi_(dp, _device(rows), _device(values), dx, dm, ki, kpn, coef, flags)
    np.testing.assert_allclose(_host(dp), cp, **tolerance(dtype))
    np.testing.assert_allclose(_host(dx), cx, **tolerance(dtype))
    np.testing.assert_array_equal(_host(dm), cm)
    others = np.setdiff1d(np.arange(m), rows)
    np.testing.assert_array_equal(_host(dp)[others], p[others])


@pytest.mark.parametrize("is_ineq", [0, 1])
def test_penalty_updates_match_cpu(dtype, is_ineq, rng):
    from uniopt.kernels import constrained_cuda as C

    n = 64
    v = rng.standard_normal(n).astype(dtype)
    v[:4] = 0
    init = np.abs(rng.standard_normal(n)).astype(dtype)
    value = (init * 2).astype(dtype)
    coef = np.array([0.1, 1.5, 0.0], dtype)
    flags = np.array([is_ineq, 1], dtype=np.int64)
    cpu = value.copy()
    K.penalty_update_(cpu, init, v, coef, flags)
    dev = _device(value.copy())
    C.penalty_update_(dev, _device(init), _device(v), coef, flags)
    np.testing.assert_array_equal(_host(dev), cpu)
    rows = np.array([5, 0, 63, 2], dtype=np.int64)
    cpu = value.copy()
    K.indexed_penalty_update_(cpu, init, rows, v[rows], coef, flags)
    dev = _device(value.copy())
    C.indexed_penalty_update_(dev, _device(init), _device(rows), _device(v[rows].copy()), coef,
                              flags)
    np.testing.assert_array_equal(_host(dev), cpu)
    assert not np.array_equal(cpu, value)


_PTX_BODY = """
    from numba import int64, boolean
    from uniopt.kernels import constrained_cuda as k
    i64 = int64[::1]
    for ty in (float32, float64):
        a, a2 = ty[::1], ty[:, ::1]
        b2 = boolean[:, ::1]
        for fn, sig in ((k._sgd_projected_kernel, (a, a, a)),
                        (k._indexed_sgd_projected_kernel, (a2, i64, a2, a)),
                        (k._nupi_kernel, (a, a, a, a, a, a, i64)),
                        (k._indexed_nupi_kernel, (a2, i64, a2, a2, b2, a2, a2, a, i64)),
                        (k._penalty_kernel, (a, a, a, a, i64)),
                        (k._indexed_penalty_kernel, (a, a, i64, a, a, i64))):
            ptx, _ = cuda.compile_ptx(fn, sig, cc=(8, 0))
            assert ".entry" in ptx and ("f32" if ty is float32 else "f64") in ptx
            print("OK", fn.__name__, ty, len(ptx))
"""


def test_cuda_kernels_compile_to_ptx():
    stdout = compile_ptx_script(_PTX_BODY)
    assert stdout.count("OK") == 12, stdout


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="needs a real CUDA device (run with UNIOPT_TEST_REAL_CUDA=1)")
def test_real_device_matches_cpu():
    if not cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        test_sgd_projected_matches_cpu(dtype, 0.0, rng)
        test_indexed_sgd_projected_matches_oracle_and_leaves_other_rows(dtype, rng)
        for fresh in (0, 1):
            test_nupi_matches_cpu(dtype, fresh, True, rng)
        test_indexed_nupi_matches_cpu(dtype, 1, rng)
        test_penalty_updates_match_cpu(dtype, 1, rng)
