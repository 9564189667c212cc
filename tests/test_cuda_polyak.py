"""The numba.cuda kernels of Polyak step-size SGD.

They run on numba-cuda's simulator (conftest sets NUMBA_ENABLE_CUDASIM=1) and are compared with
the CPU table kernels and the naive oracle; where libNVVM and NVRTC are present, every kernel is
also compiled to real PTX (in a subprocess without the simulator). Tests marked ``gpu`` need a
real device. The simulator runs each CUDA thread as a Python thread: sizes stay small.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tolerance
from cuda_arrays import SIMULATOR
from cuda_arrays import to_device as _device
from cuda_arrays import to_host as _host
from cuda_ptx import compile_ptx_script
from refimpl.naive_polyak import NaivePolyakSGD, naive_sq_norm

from numba import cuda

from uniopt.kernels import polyak_cpu  # noqa: E402
from uniopt.kernels._pointers import addresses  # noqa: E402


def _table(arrays):
    return addresses(arrays), np.array([a.size for a in arrays], dtype=np.int64)


def test_sq_norm_matches_cpu_and_naive(dtype):
    from uniopt.kernels import polyak_cuda

    rng = np.random.default_rng(0)
    # 0 and 1 elements, and one array wider than a block (several blocks add atomically).
    grads = [rng.standard_normal(n).astype(dtype) for n in (0, 1, 600)]
    got = polyak_cuda.sq_norm([_device(g) for g in grads])
    cpu = polyak_cpu.sq_norm_table(*_table(grads), np.zeros(1, dtype))
    assert got == pytest.approx(cpu, rel=1e-15)
    assert got == pytest.approx(naive_sq_norm(grads), rel=1e-15)
    assert polyak_cuda.sq_norm([]) == 0.0


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(variant="SPS+", fun_min=0.5),
    dict(momentum=0.9, delta=0.5, max_stepsize=0.05),
    dict(variant="SPS+", momentum=0.5),
])
def test_polyak_step_on_device_matches_cpu_and_naive(kwargs, dtype):
    """The whole device step (norm, step size, update) against the CPU kernels and the oracle."""
    from uniopt.kernels import polyak_cuda
    from uniopt.polyak import polyak_stepsize

    n = 300
    rng = np.random.default_rng(1)
    momentum = kwargs.get("momentum", 0.0)
    hyper_kwargs = {k: v for k, v in kwargs.items() if k != "momentum"}
    p = rng.standard_normal(n).astype(dtype)
    v = np.zeros(n, dtype)
    p_cpu, v_cpu = p.copy(), v.copy()
    dp, dv = _device(p), _device(v)
    acc = _device(np.zeros(1))
    coef = _device(np.array([0.0, momentum], dtype))
    hyper = _device(polyak_cuda.hyper_array(hyper_kwargs.get("variant", "SPS_max"),
                                            hyper_kwargs.get("fun_min", 0.0),
                                            hyper_kwargs.get("delta", 0.0),
                                            hyper_kwargs.get("max_stepsize", 1.0), dtype))
    oracle = NaivePolyakSGD(dtype=dtype, **kwargs)
    expected = p.astype(np.float64)
    for step in range(2):
        g = (rng.standard_normal(n) * 0.1).astype(dtype)
        value = 1.0 + step
        # device
        polyak_cuda.zero_(acc)
        polyak_cuda.sq_norm_accumulate_(_device(g), acc)
        polyak_cuda.stepsize_(_device(np.array([value], dtype)), acc, hyper, coef)
        if momentum:
            polyak_cuda.heavy_ball_(dp, _device(g), dv, coef)
        else:
            polyak_cuda.sgd_(dp, _device(g), coef)
        # CPU kernels, with the host step size
        sq = polyak_cpu.sq_norm_table(*_table([g]), np.zeros(1, dtype))
        gamma = polyak_stepsize(value, sq, dtype=dtype, **hyper_kwargs)
        assert float(_host(coef)[0]) == pytest.approx(float(np.array(gamma, dtype)), rel=1e-15)
        c = np.array([gamma, momentum], dtype)
        if momentum:
            polyak_cpu.polyak_heavy_ball_table_(addresses([p_cpu]), addresses([g]), addresses([v_cpu]),
                                                np.array([n]), c)
        else:
            polyak_cpu.polyak_sgd_table_(addresses([p_cpu]), addresses([g]), np.array([n]), c)
        expected = oracle.step([expected], [g], value)[0]
    np.testing.assert_allclose(_host(dp), p_cpu, **tolerance(dtype))
    np.testing.assert_allclose(_host(dv), v_cpu, **tolerance(dtype))
    tol = tolerance(dtype) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_host(dp), expected, **tol)
    assert _host(dp).dtype == dtype


def test_zero_gradient_gives_a_zero_step_on_device():
    from uniopt.kernels import polyak_cuda

    p = np.ones(4)
    for variant, value in (("SPS_max", 0.0), ("SPS+", 1.0), ("SPS_max", -1.0)):
        acc = np.zeros(1)  # ||g||^2 = 0
        coef = np.array([np.nan, 0.0])
        polyak_cuda.stepsize_(np.array([value]), acc, polyak_cuda.hyper_array(variant, 0.0, 0.0, 1.0, np.float64), coef)
        assert coef[0] == 0.0
        polyak_cuda.sgd_(p, np.zeros(4), coef)
        np.testing.assert_array_equal(p, 1.0)


def test_empty_arrays_launch_nothing():
    from uniopt.kernels import polyak_cuda

    p = np.zeros(0)
    acc = np.zeros(1)
    polyak_cuda.sq_norm_accumulate_(p, acc)
    polyak_cuda.sgd_(p, p, np.ones(2))
    polyak_cuda.heavy_ball_(p, p, p, np.ones(2))
    assert acc[0] == 0.0


_PTX_BODY = """
    from uniopt.kernels import polyak_cuda as k
    f64 = float64[::1]
    for ty in (float32, float64):
        a = ty[::1]
        for fn, sig in ((k._sq_norm_kernel, (a, f64)), (k._stepsize_kernel, (a, f64, f64, a)),
                        (k._sgd_kernel, (a, a, a)), (k._heavy_ball_kernel, (a, a, a, a))):
            ptx, _ = cuda.compile_ptx(fn, sig, cc=(8, 0))
            assert ".entry" in ptx and ("f32" if ty is float32 else "f64") in ptx
            if fn is k._sq_norm_kernel:
                assert "atom.global.add.f64" in ptx and ".shared" in ptx
            print("OK", fn.__name__, ty, len(ptx))
    ptx, _ = cuda.compile_ptx(k._zero_kernel, (float64[::1],), cc=(8, 0))
    print("OK _zero_kernel")
"""


def test_cuda_kernels_compile_to_ptx():
    stdout = compile_ptx_script(_PTX_BODY)
    assert stdout.count("OK") == 9, stdout


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="needs a real CUDA device (run with UNIOPT_TEST_REAL_CUDA=1)")
def test_real_device_matches_cpu():
    if not cuda.is_available():
        pytest.skip("no CUDA device")
    test_sq_norm_matches_cpu_and_naive(np.float32)
    test_polyak_step_on_device_matches_cpu_and_naive(dict(momentum=0.9), np.float64)
