"""Differentiable unrolling on NumPy: uniopt.unroll and the kernels of uniopt.kernels.unroll_cpu.

Oracles, all independent of the code under test:

* the forward steps: the update equations written out below in plain NumPy (from Ma & Yarats'
  definitions, not through ``uniopt.rules``);
* the VJPs: complex-step derivatives of those NumPy equations (exact to rounding: every
  operation is analytic, ``sqrt`` away from 0), to 1e-12 in float64, and central finite
  differences as a coarse second check;
* float32: the float64 equations, within a few float32 ulps.
"""

from __future__ import annotations

import numpy as np
import pytest

from uniopt import unroll
from uniopt.kernels import unroll_cpu
from uniopt.rules import qh

# ----------------------------------------------------------------------------------------------
# The oracle: the three steps written directly from their definitions (complex-safe)
# ----------------------------------------------------------------------------------------------


def naive_sgd(p, g, c):
    grad_sign, wd_grad, p_scale, lr = c[0], c[1], c[2], c[7]
    g_eff = grad_sign * g + wd_grad * p
    return (p_scale * p - lr * g_eff,)


def naive_qhm(p, g, buf, c):
    grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu, one_minus_nu, lr = c
    g_eff = grad_sign * g + wd_grad * p
    buf_new = beta * buf + one_minus_beta * g_eff
    return p_scale * p - lr * ((1 - nu) * g_eff + nu * buf_new), buf_new


def naive_qhadam(p, g, m, v, c):
    grad_sign, wd_grad, p_scale, a1, _, a2, _, nu1, _, nu2, _, eps, lr = c
    g_eff = grad_sign * g + wd_grad * p
    m_new = a1 * m + (1 - a1) * g_eff
    v_new = a2 * v + (1 - a2) * g_eff * g_eff
    direction = (nu1 * m_new + (1 - nu1) * g_eff) / (np.sqrt(nu2 * v_new + (1 - nu2) * g_eff * g_eff) + eps)
    return p_scale * p - lr * direction, m_new, v_new


NAIVE = {"sgd": naive_sgd, "qhm": naive_qhm, "qhadam": naive_qhadam}
N_INPUTS = {"sgd": 2, "qhm": 3, "qhadam": 4}


def qhm_coef(**kwargs):
    settings = dict(lr=0.1, momentum=0.9, nu=0.7) | kwargs
    return qh.qhm_coefficients(**settings)


def qhadam_coef(step=1, **kwargs):
    settings = dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 0.8)) | kwargs
    hyper = qh.qhadam_hyper(**settings)
    w1 = w2 = 0.0
    for _ in range(step):
        w1, w2, a1, a2 = qh.qhadam_bias_weights(w1, w2, hyper.beta1, hyper.beta2)
    return qh.qhadam_coefficients(hyper, a1, a2)


SETTINGS = {
    "sgd": [qhm_coef(), qhm_coef(weight_decay=0.3), qhm_coef(weight_decay=0.2, weight_decay_type="direct",
                                                             maximize=True)],
    "qhm": [qhm_coef(), qhm_coef(weight_decay=0.3, nu=1.3),
            qhm_coef(momentum=0.5, weight_decay=0.2, weight_decay_type="direct", maximize=True)],
    "qhadam": [qhadam_coef(), qhadam_coef(step=3, weight_decay=0.3, nus=(1.0, 1.0)),
               qhadam_coef(step=2, nus=(0.3, 0.5), weight_decay=0.1, decouple_weight_decay=True,
                           maximize=True, eps=1e-3)],
}
CASES = [(rule, k) for rule in SETTINGS for k in range(len(SETTINGS[rule]))]


def make_inputs(rule, n, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(n) for _ in range(N_INPUTS[rule])]
    if rule == "qhadam":
        arrays[3] = rng.random(n) + 0.05  # a second moment is >= 0
    return [a.astype(dtype) for a in arrays]


def face_step(rule, inputs, c, **kw):
    out = getattr(unroll, f"{rule}_step")(*inputs, c, **kw)
    return (out,) if rule == "sgd" else out


def face_vjp(rule, inputs, c, cts, **kw):
    if rule == "qhadam":
        return unroll.qhadam_step_vjp(*inputs, c, *cts, **kw)
    return getattr(unroll, f"{rule}_step_vjp")(c, *cts, **kw)


def complex_step_vjp(rule, inputs, c, cts, h=1e-30):
    """Cotangents of the inputs by complex-step differentiation of the (elementwise) oracle."""
    result = []
    for k in range(len(inputs)):
        perturbed = [a.astype(complex) for a in inputs]
        perturbed[k] = perturbed[k] + 1j * h
        outs = NAIVE[rule](*perturbed, c)
        result.append(sum(ct * out.imag / h for ct, out in zip(cts, outs)))
    return result


def central_difference_vjp(rule, inputs, c, cts, h=1e-6):
    result = []
    for k in range(len(inputs)):
        up = [a.copy() for a in inputs]
        down = [a.copy() for a in inputs]
        up[k] += h
        down[k] -= h
        outs_up, outs_down = NAIVE[rule](*up, c), NAIVE[rule](*down, c)
        result.append(sum(ct * (u - d) / (2 * h) for ct, u, d in zip(cts, outs_up, outs_down)))
    return result


# ----------------------------------------------------------------------------------------------
# Forward steps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 10001])
@pytest.mark.parametrize("rule,k", CASES)
def test_forward_matches_the_equations(rule, k, n):
    c = SETTINGS[rule][k]
    inputs = make_inputs(rule, n)
    before = [a.copy() for a in inputs]
    got = face_step(rule, inputs, c)
    want = NAIVE[rule](*inputs, c)
    assert len(got) == len(want)
    for g_, w_ in zip(got, want):
        assert g_.shape == (n,) and g_.dtype == np.float64
        np.testing.assert_allclose(g_, w_, rtol=1e-13, atol=1e-15)
    for a, b in zip(inputs, before):  # out of place
        np.testing.assert_array_equal(a, b)


def vjp_magnitude(rule, inputs, c, cts):
    """Per element, the size of the largest intermediate of the VJP (float64): the scale of
    float32 rounding. QHAdam's cotangent of the numerator, ``lr * ct_p / (sqrt(r) + eps)``, can
    be far larger than the result it cancels down to (a small ``sqrt(r)``)."""
    size = max(1.0, *(abs(x) for x in c)) * sum(np.abs(ct) for ct in cts)
    if rule != "qhadam":
        return size
    p, g, m, v = inputs
    grad_sign, wd_grad, _, a1, _, a2, _, nu1, _, nu2, _, eps, lr = c
    g_eff = grad_sign * g + wd_grad * p
    m_new, v_new = a1 * m + (1 - a1) * g_eff, a2 * v + (1 - a2) * g_eff ** 2
    denominator = np.sqrt(nu2 * v_new + (1 - nu2) * g_eff ** 2) + eps
    direction = (nu1 * m_new + (1 - nu1) * g_eff) / denominator
    return size + max(1.0, abs(wd_grad)) * lr * np.abs(cts[0]) / denominator * (1 + np.abs(direction))


@pytest.mark.parametrize("rule,k", CASES)
def test_float32_within_a_few_ulps_of_float64(rule, k):
    c = SETTINGS[rule][k]
    inputs32 = make_inputs(rule, 2001, np.float32, seed=3)
    inputs64 = [a.astype(np.float64) for a in inputs32]
    cts32 = make_inputs(rule, 2001, np.float32, seed=4)[: len(NAIVE[rule](*inputs64, c))]
    cts64 = [a.astype(np.float64) for a in cts32]
    ulp = np.finfo(np.float32).eps
    for got, want in zip(face_step(rule, inputs32, c), NAIVE[rule](*inputs64, c)):
        assert got.dtype == np.float32
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= 8 * ulp * (np.abs(want) + 0.5 * np.abs(want).max()))
    magnitude = vjp_magnitude(rule, inputs64, c, cts64)
    for got, want in zip(face_vjp(rule, inputs32, c, cts32), complex_step_vjp(rule, inputs64, c, cts64)):
        assert got.dtype == np.float32
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= 4 * ulp * magnitude), np.max(err / (ulp * magnitude))


# ----------------------------------------------------------------------------------------------
# VJPs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 9, 10001])
@pytest.mark.parametrize("rule,k", CASES)
def test_vjp_matches_complex_step_derivatives(rule, k, n):
    c = SETTINGS[rule][k]
    inputs = make_inputs(rule, n, seed=n)
    cts = make_inputs(rule, n, seed=n + 1)[: len(NAIVE[rule](*inputs, c))]
    got = face_vjp(rule, inputs, c, cts)
    want = complex_step_vjp(rule, inputs, c, cts)
    assert len(got) == len(inputs)
    for g_, w_ in zip(got, want):
        assert g_.shape == (n,)
        np.testing.assert_allclose(g_, w_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule,k", CASES)
def test_vjp_matches_central_differences(rule, k):
    c = SETTINGS[rule][k]
    inputs = make_inputs(rule, 51, seed=7)
    cts = make_inputs(rule, 51, seed=8)[: len(NAIVE[rule](*inputs, c))]
    got = face_vjp(rule, inputs, c, cts)
    for g_, w_ in zip(got, central_difference_vjp(rule, inputs, c, cts)):
        np.testing.assert_allclose(g_, w_, rtol=1e-6, atol=1e-8)


def test_qhadam_vjp_at_zero_gradient_and_moments_is_finite_and_drops_the_sqrt_term():
    """Where g' = m = v = 0 the sqrt's derivative is taken as 0; elsewhere the exact VJP."""
    c = qhadam_coef(weight_decay=0.0)
    n = 6
    p, g, m, v = make_inputs("qhadam", n, seed=11)
    g[:3] = 0.0
    m[:3] = 0.0
    v[:3] = 0.0
    ct_p, ct_m, ct_v = make_inputs("qhadam", n, seed=12)[:3]
    outs = unroll.qhadam_step(p, g, m, v, c)
    got = unroll.qhadam_step_vjp(p, g, m, v, c, ct_p, ct_m, ct_v)
    assert all(np.isfinite(a).all() for a in (*outs, *got))
    np.testing.assert_array_equal(outs[0][:3], p[:3])  # a zero step
    # the closed form at r = 0: only the numerator path and the moments' own cotangents
    grad_sign, wd_grad, p_scale, a1, one_minus_a1, a2, one_minus_a2, nu1, one_minus_nu1, nu2, \
        one_minus_nu2, eps, lr = c
    ct_num = -lr * ct_p[:3] / eps
    ct_m_new = ct_m[:3] + nu1 * ct_num
    ct_g_eff = one_minus_a1 * ct_m_new + one_minus_nu1 * ct_num
    np.testing.assert_allclose(got[0][:3], p_scale * ct_p[:3], rtol=1e-15)
    np.testing.assert_allclose(got[1][:3], grad_sign * ct_g_eff, rtol=1e-14)
    np.testing.assert_allclose(got[2][:3], a1 * ct_m_new, rtol=1e-14)
    np.testing.assert_allclose(got[3][:3], a2 * ct_v[:3], rtol=1e-15)
    want = complex_step_vjp("qhadam", [a[3:] for a in (p, g, m, v)], c, [a[3:] for a in (ct_p, ct_m, ct_v)])
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_[3:], w_, rtol=1e-12, atol=1e-14)


def test_zero_inputs_give_finite_cotangents_in_float32():
    c = qhadam_coef()
    z = np.zeros(33, np.float32)
    ones = np.ones(33, np.float32)
    got = unroll.qhadam_step_vjp(z, z, z, z, c, ones, ones, ones)
    assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in got)


# ----------------------------------------------------------------------------------------------
# Kernels: serial and parallel variants agree bit for bit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["sgd", "qhm", "qhadam"])
def test_serial_and_parallel_kernels_agree(rule, dtype):
    c = SETTINGS[rule][-1]
    n = 10001
    inputs = make_inputs(rule, n, dtype, seed=21)
    n_out = len(NAIVE[rule](*inputs, c))
    cts = make_inputs(rule, n, dtype, seed=22)[:n_out]
    coef = np.array(c, dtype)
    results = []
    for parallel in (False, True):
        outs = [np.full(n, np.nan, dtype) for _ in range(n_out)]
        unroll_cpu.forward(rule, parallel)(*inputs, *outs, coef)
        grads = [np.full(n, np.nan, dtype) for _ in inputs]
        vjp_in = (*inputs, *cts) if rule == "qhadam" else tuple(cts)
        unroll_cpu.vjp(rule, parallel)(*vjp_in, *grads, coef)
        results.append(outs + grads)
    assert unroll_cpu.forward(rule, True) is not unroll_cpu.forward(rule, False)
    for serial, threaded in zip(*results):
        assert np.isfinite(serial).all()
        np.testing.assert_array_equal(serial, threaded)


def test_parallel_threshold_is_read_at_call_time(monkeypatch):
    from uniopt import _jit

    calls = []
    original = unroll_cpu.forward

    def spy(rule, parallel):
        calls.append(parallel)
        return original(rule, parallel)

    monkeypatch.setattr(unroll_cpu, "forward", spy)
    p, g = make_inputs("sgd", 100)
    monkeypatch.setattr(_jit, "PARALLEL_MIN_SIZE", 100)
    unroll.sgd_step(p, g, qhm_coef())
    monkeypatch.setattr(_jit, "PARALLEL_MIN_SIZE", 101)
    unroll.sgd_step(p, g, qhm_coef())
    assert calls == [True, False]


# ----------------------------------------------------------------------------------------------
# The NumPy face: shapes, out=, errors
# ----------------------------------------------------------------------------------------------
def test_any_shape_and_non_contiguous_inputs():
    c = qhadam_coef()
    rng = np.random.default_rng(5)
    big = rng.standard_normal((4, 6, 10))
    p, g, m = big[0, :, ::2], big[1, :, ::2], big[2, :, ::2]  # (6, 5), not contiguous
    v = np.abs(big[3, :, ::2])
    outs = unroll.qhadam_step(p, g, m, v, c)
    want = naive_qhadam(p, g, m, v, c)
    for got, w_ in zip(outs, want):
        assert got.shape == (6, 5) and got.flags.c_contiguous
        np.testing.assert_allclose(got, w_, rtol=1e-13, atol=1e-15)
    cts = [rng.standard_normal((6, 5)) for _ in range(3)]
    got = unroll.qhadam_step_vjp(p, g, m, v, c, *cts)
    want = complex_step_vjp("qhadam", [p, g, m, v], c, cts)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=1e-12, atol=1e-14)


def test_out_arrays_are_filled_and_returned_and_may_be_the_inputs():
    c = qhm_coef(weight_decay=0.1)
    p, g, buf = make_inputs("qhm", 13, seed=2)
    want = naive_qhm(p, g, buf, c)
    p_out, buf_out = np.empty(13), np.empty(13)
    got = unroll.qhm_step(p, g, buf, c, out=(p_out, buf_out))
    assert got[0] is p_out and got[1] is buf_out
    np.testing.assert_allclose(p_out, want[0], rtol=1e-14)
    got = unroll.qhm_step(p, g, buf, c, out=(p, buf))  # in place
    assert got[0] is p
    np.testing.assert_allclose(p, want[0], rtol=1e-14)
    np.testing.assert_allclose(buf, want[1], rtol=1e-14)
    single = np.empty(13)
    assert unroll.sgd_step(p, g, c, out=single) is single
    # a VJP written over its own cotangent inputs
    cts = make_inputs("qhadam", 13, seed=9)[:3]
    inputs = make_inputs("qhadam", 13, seed=10)
    want = complex_step_vjp("qhadam", inputs, c=qhadam_coef(), cts=cts)
    ct_p, ct_m, ct_v = (a.copy() for a in cts)
    ct_g = np.empty(13)
    unroll.qhadam_step_vjp(*inputs, qhadam_coef(), ct_p, ct_m, ct_v, out=(ct_p, ct_g, ct_m, ct_v))
    for g_, w_ in zip((ct_p, ct_g, ct_m, ct_v), want):
        np.testing.assert_allclose(g_, w_, rtol=1e-12, atol=1e-14)


p3, g3, b3 = np.ones(3), np.ones(3), np.ones(3)

BAD = [
    (lambda: unroll.sgd_step([1.0, 2.0], g3[:2], qhm_coef()), TypeError, "Invalid p: expected a NumPy array"),
    (lambda: unroll.sgd_step(np.arange(3), g3, qhm_coef()), TypeError, "Invalid p dtype: int64"),
    (lambda: unroll.sgd_step(p3, g3.astype(np.float32), qhm_coef()), TypeError,
     "Invalid g dtype: float32 (expected float64, the dtype of p)"),
    (lambda: unroll.qhm_step(p3, g3, np.ones(4), qhm_coef()), ValueError,
     "Invalid buf shape: (4,) (expected (3,), the shape of p)"),
    (lambda: unroll.sgd_step(p3, g3, qhadam_coef()), ValueError, "expected the 8 numbers of "
     "uniopt.rules.qh.qhm_coefficients, got 13"),
    (lambda: unroll.qhadam_step(p3, g3, b3, b3, qhm_coef()), ValueError, "expected the 13 numbers"),
    (lambda: unroll.qhm_step(p3, g3, b3, 0.1), TypeError, "Invalid coefficients: 0.1"),
    (lambda: unroll.qhm_step(p3, g3, b3, "abcdefgh"), TypeError, "Invalid coefficients: 'abcdefgh'"),
    (lambda: unroll.qhm_step(p3, g3, b3, qhm_coef()._replace(lr=float("nan"))), ValueError,
     "Invalid coefficient at index 7: nan"),
    (lambda: unroll.qhm_step(p3, g3, b3, qhm_coef()._replace(lr="x")), TypeError,
     "Invalid coefficient at index 7: 'x'"),
    (lambda: unroll.qhm_step_vjp(qhm_coef(), p3, g3, out=(np.empty(3), np.empty(3))), TypeError,
     "Invalid out: expected a tuple of 3 NumPy arrays"),
    (lambda: unroll.sgd_step(p3, g3, qhm_coef(), out=np.empty(3, np.float32)), ValueError,
     "Invalid out[0]: dtype float32 and shape (3,) (expected float64 and (3,))"),
    (lambda: unroll.sgd_step(p3, g3, qhm_coef(), out=np.empty(6)[::2]), ValueError,
     "Invalid out[0]: must be C-contiguous and writeable"),
    (lambda: unroll.qhm_step(p3, g3, b3, qhm_coef(), out=(np.empty(3), [0.0] * 3)), TypeError,
     "Invalid out[1]: expected a NumPy array, got list"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_overlapping_outputs_are_refused_and_nothing_is_written():
    c = qhm_coef()
    p, g, buf = make_inputs("qhm", 8, seed=4)
    storage = np.zeros(9)
    with pytest.raises(ValueError, match=r"Invalid out\[1\]: overlaps another output"):
        unroll.qhm_step(p, g, buf, c, out=(storage[:8], storage[1:]))
    shifted = np.zeros(9)
    shifted[:8] = p
    with pytest.raises(ValueError, match=r"Invalid out\[0\]: overlaps an input without being"):
        unroll.qhm_step(shifted[:8], g, buf, c, out=(shifted[1:], np.empty(8)))
    same = np.zeros(8)
    with pytest.raises(ValueError, match="overlaps another output"):
        unroll.qhm_step(p, g, buf, c, out=(same, same))
    np.testing.assert_array_equal(storage, 0.0)
    np.testing.assert_array_equal(shifted[:8], p)
    np.testing.assert_array_equal(same, 0.0)


def test_exported_from_uniopt():
    import uniopt

    assert uniopt.unroll is unroll and "unroll" in uniopt.__all__
    assert set(unroll.__all__) == {f"{r}_step{s}" for r in ("sgd", "qhm", "qhadam") for s in ("", "_vjp")}


@pytest.mark.parametrize("rule,k", CASES)
def test_numpy_binding_of_the_vjp_rules_matches_the_kernels(rule, k):
    """The rules of uniopt.rules.qh_vjp run on NumPy arrays as they are (one definition)."""
    from uniopt.rules import bind, qh_vjp

    rules = bind(qh_vjp, sqrt=np.sqrt, where=np.where)
    c = SETTINGS[rule][k]
    inputs = make_inputs(rule, 301, seed=31)
    if rule == "qhadam":
        for a in inputs[1:]:
            a[:50] = 0.0  # zero gradient and moments: the where() branch
    cts = make_inputs(rule, 301, seed=32)[: len(NAIVE[rule](*inputs, c))]
    if rule == "sgd":
        want = rules.sgd_vjp(cts[0], c[0], c[1], c[2], c[7])
        np.testing.assert_array_equal(rules.sgd_update(*inputs, c[0], c[1], c[2], c[7]),
                                      unroll.sgd_step(*inputs, c))
    elif rule == "qhm":
        want = rules.qhm_vjp(*cts, *c)
    else:
        with np.errstate(all="raise"):  # no division by zero in either branch
            want = rules.qhadam_vjp(*inputs, *cts, *c)
    for got, w_ in zip(face_vjp(rule, inputs, c, cts), want):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, w_, rtol=1e-15, atol=1e-15)
