"""The numba.cuda kernels of differentiable unrolling (uniopt.kernels.unroll_cuda).

Here they run on numba-cuda's simulator (conftest sets NUMBA_ENABLE_CUDASIM=1) and are compared
with the CPU kernels, whose own oracles are in test_core_unroll.py. Where libNVVM and NVRTC
are present, every kernel is also compiled to real PTX. Tests marked ``gpu`` need a device.
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

from uniopt.kernels import unroll_cpu  # noqa: E402
from uniopt.rules import qh  # noqa: E402

N_INPUTS = {"sgd": 2, "qhm": 3, "qhadam": 4}
N_OUTPUTS = {"sgd": 1, "qhm": 2, "qhadam": 3}


def _qhadam_coef(step, **kwargs):
    hyper = qh.qhadam_hyper(0.05, (0.9, 0.99), **kwargs)
    w1 = w2 = 0.0
    for _ in range(step):
        w1, w2, a1, a2 = qh.qhadam_bias_weights(w1, w2, hyper.beta1, hyper.beta2)
    return qh.qhadam_coefficients(hyper, a1, a2)


COEFFICIENTS = {
    "sgd": qh.qhm_coefficients(0.1, 0.0, 0.0, weight_decay=0.2, weight_decay_type="direct", maximize=True),
    "qhm": qh.qhm_coefficients(0.1, 0.9, 0.7, weight_decay=0.1),
    "qhadam": _qhadam_coef(3, nus=(0.7, 0.8), weight_decay=0.1),
}


def _arrays(rule, n, dtype, seed):
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(n).astype(dtype) for _ in range(N_INPUTS[rule])]
    if rule == "qhadam":
        inputs[3] = np.abs(inputs[3])
        inputs[1][: n // 3] = inputs[2][: n // 3] = inputs[3][: n // 3] = 0  # zero moments too
    cts = [rng.standard_normal(n).astype(dtype) for _ in range(N_OUTPUTS[rule])]
    return inputs, cts


def _vjp_inputs(rule, inputs, cts):
    return (*inputs, *cts) if rule == "qhadam" else tuple(cts)


@pytest.mark.parametrize("n", [1, 300, 1000])
@pytest.mark.parametrize("rule", list(N_INPUTS))
def test_cuda_matches_cpu(rule, n, dtype):
    from uniopt.kernels import unroll_cuda

    inputs, cts = _arrays(rule, n, dtype, seed=n)
    c = COEFFICIENTS[rule]
    coef = np.array(c, dtype)
    # CPU
    outs = [np.empty(n, dtype) for _ in range(N_OUTPUTS[rule])]
    unroll_cpu.forward(rule, False)(*inputs, *outs, coef)
    grads = [np.empty(n, dtype) for _ in inputs]
    unroll_cpu.vjp(rule, False)(*_vjp_inputs(rule, inputs, cts), *grads, coef)
    # device
    d_outs = [_device(np.full(n, np.nan, dtype)) for _ in outs]
    getattr(unroll_cuda, f"{rule}_forward")(*map(_device, inputs), *d_outs, c)
    d_grads = [_device(np.full(n, np.nan, dtype)) for _ in grads]
    getattr(unroll_cuda, f"{rule}_vjp")(*map(_device, _vjp_inputs(rule, inputs, cts)), *d_grads, c)
    for got, want in zip([*d_outs, *d_grads], [*outs, *grads]):
        got = _host(got)
        assert got.dtype == dtype and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, **tolerance(dtype))


def test_empty_arrays_launch_nothing():
    from uniopt.kernels import unroll_cuda

    z = np.zeros(0)
    unroll_cuda.qhadam_vjp(*(z,) * 11, COEFFICIENTS["qhadam"])
    unroll_cuda.sgd_forward(z, z, z, COEFFICIENTS["sgd"])
    assert z.size == 0


def test_an_output_may_be_an_input():
    from uniopt.kernels import unroll_cuda

    inputs, cts = _arrays("qhm", 257, np.float64, seed=1)
    want = [np.empty(257) for _ in range(3)]
    unroll_cpu.vjp("qhm", False)(*cts, *want, np.array(COEFFICIENTS["qhm"]))
    d_ct_p, d_ct_buf = _device(cts[0].copy()), _device(cts[1].copy())
    d_ct_g = _device(np.empty(257))
    unroll_cuda.qhm_vjp(d_ct_p, d_ct_buf, d_ct_p, d_ct_g, d_ct_buf, COEFFICIENTS["qhm"])
    for got, w_ in zip((d_ct_p, d_ct_g, d_ct_buf), want):
        np.testing.assert_allclose(_host(got), w_, **tolerance(np.float64))


_PTX_BODY = """
    from uniopt.kernels import unroll_cuda as U
    kernels = ((U._sgd_forward_kernel, 3, 8), (U._sgd_vjp_kernel, 3, 8),
               (U._qhm_forward_kernel, 5, 8), (U._qhm_vjp_kernel, 5, 8),
               (U._qhadam_forward_kernel, 7, 13), (U._qhadam_vjp_kernel, 11, 13))
    for ty in (float32, float64):
        for fn, n_arrays, n_scalars in kernels:
            ptx, _ = cuda.compile_ptx(fn, (ty[::1],) * n_arrays + (ty,) * n_scalars, cc=(8, 0))
            assert ".entry" in ptx and ("f32" if ty is float32 else "f64") in ptx
            if ty is float32:  # float32 kernels compute in float32
                assert ".f64" not in ptx, fn.__name__
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
    for rule in N_INPUTS:
        test_cuda_matches_cpu(rule, 4099, np.float32)
        test_cuda_matches_cpu(rule, 4099, np.float64)
