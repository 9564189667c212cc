"""The numba.cuda kernels of iALM's dual step.

They run on numba-cuda's simulator (conftest sets NUMBA_ENABLE_CUDASIM=1) and are compared with
the CPU kernel (:func:`uniopt.kernels.ialm_cpu.ialm_dual_step_`); where libNVVM and NVRTC are
present, every kernel is also compiled to real PTX (in a subprocess without the simulator).
Tests marked ``gpu`` need a real device. The simulator runs each CUDA thread as a Python
thread: sizes stay small.
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

from refimpl.naive_ialm import EXTREME64, closed_form_step  # noqa: E402

from uniopt.kernels import ialm_cpu  # noqa: E402


def _inputs(n, dtype, seed, zero_some=True):
    """Multipliers, a momentum buffer and constraints; some constraints inside ``ctol`` = 0.1."""
    rng = np.random.default_rng(seed)
    dual = rng.standard_normal(n).astype(dtype)
    buffer = (0.1 * rng.standard_normal(n)).astype(dtype)
    c = rng.standard_normal(n).astype(dtype)
    if zero_some and n > 3:
        c[:3] = np.array([0.05, -0.05, 0.0], dtype)  # within ctol (and an exact 0)
    return dual, buffer, c


def _compare(n, dtype, momentum, is_ineq, ctol, lower=-np.inf, upper=np.inf, beta=1.0,
             gamma=0.5, steps=2, seed=0, c_scale=1.0):
    """Run ``steps`` dual steps on the device and with the CPU kernel.

    Returns the largest absolute difference of the multipliers and buffers, and the last
    step's ``out`` and multipliers (from the device).
    """
    from uniopt.kernels import ialm_cuda

    dual, buffer, c0 = _inputs(n, dtype, seed)
    d_cpu, b_cpu = dual.copy(), buffer.copy()
    d_dev, b_dev = _device(dual.copy()), _device(buffer.copy())
    hyper = np.array([beta, gamma], dtype=np.float64)
    flags = np.array([momentum != 0, is_ineq], dtype=np.int64)
    worst = 0.0
    for step in range(steps):
        c = (c0 * c_scale * (1.0 + 0.5 * step)).astype(dtype)
        coef_cpu = ialm_cpu.coefficients(dtype, momentum, 0.1, lower, upper, ctol)
        coef_dev = coef_cpu.copy()
        sq_cpu, s_cpu, norm_cpu = ialm_cpu.ialm_dual_step_(d_cpu, b_cpu, c, coef_cpu, hyper, flags)
        out = _host(ialm_cuda.dual_step_(d_dev, b_dev, _device(c), coef_dev, hyper, flags))
        assert out.dtype == np.float64 and out.shape == (ialm_cuda.OUT_SIZE,)
        assert out[0] == pytest.approx(sq_cpu, rel=1e-14, abs=0.0)
        assert out[1] == pytest.approx(s_cpu, rel=1e-14, abs=0.0)
        assert out[2] == pytest.approx(norm_cpu, rel=1e-14, abs=0.0)
        if SIMULATOR:  # the host coef is the device coef: the step size landed in coef[5]
            assert coef_dev[5] == pytest.approx(coef_cpu[5], rel=1e-7 if dtype == np.float32 else 1e-14)
        hd, hb = _host(d_dev), _host(b_dev)
        assert hd.dtype == dtype and hb.dtype == dtype
        np.testing.assert_allclose(hd, d_cpu, **tolerance(dtype))
        np.testing.assert_allclose(hb, b_cpu, **tolerance(dtype))
        assert np.all(hd >= lower) and np.all(hd <= upper)
        if not momentum:
            np.testing.assert_array_equal(hb, buffer)  # untouched without momentum
        worst = max(worst, float(np.max(np.abs(hd.astype(np.float64) - d_cpu), initial=0.0)),
                    float(np.max(np.abs(hb.astype(np.float64) - b_cpu), initial=0.0)))
    return worst, out, hd


@pytest.mark.parametrize("n, momentum, is_ineq, ctol, steps", [
    (1, 0.0, False, 0.1, 1),
    (1, 0.9, True, 0.0, 1),
    (200, 0.9, True, 0.1, 2),  # one block
    (200, 0.0, False, 0.0, 1),
    (300, 0.9, False, 0.1, 2),  # two blocks whose partial sums add atomically
], ids=["n1-plain-eq-ctol", "n1-momentum-ineq", "n200-momentum-ineq-ctol", "n200-plain-eq",
        "n300-momentum-eq-ctol"])
def test_dual_step_matches_cpu(n, momentum, is_ineq, ctol, steps, dtype):
    lower = 0.0 if is_ineq else -np.inf
    _compare(n, dtype, momentum, is_ineq, ctol=ctol, lower=lower, steps=steps)


@pytest.mark.parametrize("is_ineq", [False, True], ids=["eq", "ineq"])
def test_ctol_filter_matches_cpu_and_zeroes_small_violations(is_ineq, dtype):
    from uniopt.kernels import ialm_cuda

    c = np.array([0.05, -0.05, 0.2, -0.2, 0.1, 0.0], dtype)
    dual = np.zeros(6, dtype)
    coef = ialm_cpu.coefficients(dtype, 0.0, 0.0, -np.inf, np.inf, 0.1)
    hyper = np.array([1.0, 1e9])  # s = beta = 1: dual = filtered c
    flags = np.array([0, is_ineq], dtype=np.int64)
    d_dev = _device(dual.copy())
    ialm_cuda.dual_step_(d_dev, _device(np.zeros(0, dtype)), _device(c), coef, hyper, flags)
    cpu = dual.copy()
    ialm_cpu.ialm_dual_step_(cpu, np.zeros(0, dtype), c, coef.copy(), hyper, flags)
    expected = np.array([0, -0.05, 0.2, -0.2, 0, 0] if is_ineq else [0, 0, 0.2, -0.2, 0, 0], dtype)
    np.testing.assert_array_equal(_host(d_dev), expected)
    np.testing.assert_array_equal(_host(d_dev), cpu)


def test_binding_bounds_and_capped_step(dtype):
    """Tight bounds clamp most multipliers; a large direction makes gamma / ||d|| bind."""
    _, out, dual = _compare(100, dtype, 0.5, True, ctol=0.1, lower=0.0, upper=0.3, beta=10.0,
                            gamma=0.5, c_scale=5.0, steps=1)
    assert out[1] == pytest.approx(0.5 / np.sqrt(out[0]), rel=1e-14) and out[1] < 10.0
    assert np.any(dual == 0.0) and np.any(dual == np.array(0.3, dtype))
    _, out, dual = _compare(100, dtype, 0.0, False, ctol=0.0, lower=-0.2, upper=0.2, beta=0.01,
                            gamma=100.0, steps=1)
    assert out[1] == 0.01
    assert np.any(dual == np.array(-0.2, dtype)) and np.any(dual == np.array(0.2, dtype))


def test_grid_stride_with_fewer_blocks(monkeypatch):
    """A grid narrower than the array (MAX_BLOCKS = 1): each thread strides over several elements."""
    from uniopt.kernels import ialm_cuda

    monkeypatch.setattr(ialm_cuda, "MAX_BLOCKS", 1)
    _compare(300, np.float64, 0.9, False, ctol=0.1, steps=1)


def test_zero_direction_gives_a_zero_step_and_no_nan():
    from uniopt.kernels import ialm_cuda

    for dtype, momentum, ctol in ((np.float64, 0.0, 0.0), (np.float32, 0.9, 0.0),
                                  (np.float64, 0.0, 0.5)):
        dual = np.full(5, 0.25, dtype)
        buffer = np.zeros(5, dtype)
        c = np.zeros(5, dtype) if ctol == 0 else np.full(5, 0.3, dtype)  # all within ctol
        coef = ialm_cpu.coefficients(dtype, momentum, 0.0, -np.inf, np.inf, ctol)
        coef[5] = np.nan
        flags = np.array([momentum != 0, 0], dtype=np.int64)
        d_dev = _device(dual)
        out = _host(ialm_cuda.dual_step_(d_dev, _device(buffer), _device(c), coef,
                                         np.array([1.0, 1.0]), flags))
        np.testing.assert_array_equal(out[:3], [0.0, 0.0, 0.0])
        if SIMULATOR:
            assert coef[5] == 0
        np.testing.assert_array_equal(_host(d_dev), np.full(5, 0.25, dtype))


def test_empty_group_launches_only_the_step_size(dtype):
    from uniopt.kernels import ialm_cuda

    e = np.zeros(0, dtype)
    coef = ialm_cpu.coefficients(dtype, 0.9, 0.0, 0.0, np.inf, 0.0)
    out = _host(ialm_cuda.dual_step_(_device(e), _device(e), _device(e), coef,
                                     np.array([1.0, 1.0]), np.array([1, 1])))
    np.testing.assert_array_equal(out[:3], [0.0, 0.0, 0.0])
    assert ialm_cpu.ialm_dual_step_(e, e, e, coef.copy(), np.array([1.0, 1.0]),
                                    np.array([1, 1], dtype=np.int64)) == (0.0, 0.0, 0.0)


def test_device_resident_coefficients(dtype):
    """coef, hyper and flags already on the device (int64 flags): the same result, coef[5] set."""
    from uniopt.kernels import ialm_cuda

    n = 40
    dual, buffer, c = _inputs(n, dtype, 3)
    coef = ialm_cpu.coefficients(dtype, 0.9, 0.0, -np.inf, np.inf, 0.1)
    hyper = np.array([0.7, 0.3])
    flags = np.array([1, 0], dtype=np.int64)
    d_cpu, b_cpu, coef_cpu = dual.copy(), buffer.copy(), coef.copy()
    sq, s, _ = ialm_cpu.ialm_dual_step_(d_cpu, b_cpu, c, coef_cpu, hyper, flags)
    d_dev, b_dev, coef_dev = _device(dual.copy()), _device(buffer.copy()), cuda.to_device(coef)
    out = ialm_cuda.dual_step_(d_dev, b_dev, _device(c), coef_dev, cuda.to_device(hyper),
                               cuda.to_device(flags))
    got = out.copy_to_host() if hasattr(out, "copy_to_host") else out
    assert got[0] == pytest.approx(sq, rel=1e-14) and got[1] == pytest.approx(s, rel=1e-14)
    assert coef_dev.copy_to_host()[5] == coef_cpu[5]
    np.testing.assert_allclose(_host(d_dev), d_cpu, **tolerance(dtype))
    np.testing.assert_allclose(_host(b_dev), b_cpu, **tolerance(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the simulator's plain sum
@pytest.mark.parametrize("case", EXTREME64)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_huge_and_tiny_float64_constraints_give_the_closed_form(case, momentum):
    """The scaled fallback on the device: the closed form, and the CPU kernel's numbers."""
    from uniopt.kernels import ialm_cuda

    c, gamma = EXTREME64[case]
    c = np.array(c)
    coef = ialm_cpu.coefficients(np.float64, momentum, 0.0, -np.inf, np.inf, 0.0)
    hyper, flags = np.array([1.0, gamma]), np.array([momentum != 0, 0], np.int64)
    d_dev, b_dev = _device(np.zeros(c.size)), _device(np.zeros(c.size))
    out = _host(ialm_cuda.dual_step_(d_dev, b_dev, _device(c), coef.copy(), hyper, flags))
    dual = _host(d_dev)
    np.testing.assert_allclose(dual, closed_form_step(c.tolist(), 1.0, gamma), rtol=1e-14, atol=0)
    d_cpu = np.zeros(c.size)
    sq, step, norm = ialm_cpu.ialm_dual_step_(d_cpu, np.zeros(c.size), c, coef.copy(), hyper, flags)
    np.testing.assert_allclose(dual, d_cpu, rtol=1e-15, atol=0)
    assert out[1] == pytest.approx(step, rel=1e-15) and out[2] == pytest.approx(norm, rel=1e-15)
    if momentum:
        np.testing.assert_array_equal(_host(b_dev), c)


def test_huge_and_tiny_float32_constraints_on_the_device():
    from uniopt.kernels import ialm_cuda

    c = np.array([3e38, 1e-40, -2e38], np.float32)
    coef = ialm_cpu.coefficients(np.float32, 0.0, 0.0, -np.inf, np.inf, 0.0)
    d_dev = _device(np.zeros(3, np.float32))
    ialm_cuda.dual_step_(d_dev, _device(np.zeros(3, np.float32)), _device(c), coef,
                         np.array([1.0, 1.0]), np.array([0, 0]))
    expected = closed_form_step(c.astype(np.float64).tolist(), 1.0, 1.0).astype(np.float32)
    np.testing.assert_allclose(_host(d_dev), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_direction_leaves_the_multipliers(dtype, bad):
    from uniopt.kernels import ialm_cuda

    c = np.array([1.0, bad, 2.0], dtype)
    dual = np.array([0.5, -0.5, 1.0], dtype)
    d_dev = _device(dual.copy())
    coef = ialm_cpu.coefficients(dtype, 0.0, 0.0, -np.inf, np.inf, 0.0)
    out = _host(ialm_cuda.dual_step_(d_dev, _device(np.zeros(3, dtype)), _device(c), coef,
                                     np.array([1.0, 1.0]), np.array([0, 0])))
    assert np.all(np.isnan(out[:3])) and out[5] == 1
    np.testing.assert_array_equal(_host(d_dev), dual)


_PTX_BODY = """
    from numba import int64
    from uniopt.kernels import ialm_cuda as k
    f64, i64 = float64[::1], int64[::1]
    for ty in (float32, float64):
        a = ty[::1]
        for flags in (i64, f64):
            for fn, sig in ((k._direction_kernel, (a, a, a, flags, f64)),
                            (k._scaled_kernel, (a, a, a, flags, f64)),
                            (k._update_kernel, (a, a, a, a, flags))):
                ptx, _ = cuda.compile_ptx(fn, sig, cc=(8, 0))
                assert ".entry" in ptx and ("f32" if ty is float32 else "f64") in ptx
                if fn is k._direction_kernel:
                    assert "atom.global.add.f64" in ptx and ".shared" in ptx
                print("OK", fn.__name__, ty, flags, len(ptx))
        ptx, _ = cuda.compile_ptx(k._stepsize_kernel, (f64, f64, a), cc=(8, 0))
        assert "sqrt" in ptx
        print("OK _stepsize_kernel", ty)
    ptx, _ = cuda.compile_ptx(k._zero_kernel, (f64,), cc=(8, 0))
    print("OK _zero_kernel")
"""


def test_cuda_kernels_compile_to_ptx():
    stdout = compile_ptx_script(_PTX_BODY)
    assert stdout.count("OK") == 15, stdout


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="needs a real CUDA device (run with UNIOPT_TEST_REAL_CUDA=1)")
def test_real_device_matches_cpu():
    if not cuda.is_available():
        pytest.skip("no CUDA device")
    for dtype in (np.float32, np.float64):
        for momentum, is_ineq in ((0.0, False), (0.9, True)):
            _compare(5000, dtype, momentum, is_ineq, ctol=0.1, lower=0.0 if is_ineq else -np.inf)
    test_device_resident_coefficients(np.float64)
