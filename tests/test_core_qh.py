"""The NumPy face of the QH family: kernels vs naive oracles, qhoptim, converters, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uniopt
from refimpl.naive_qh import NaiveQHAdam, NaiveQHM
from conftest import tolerance

QHM_SETTINGS = [
    dict(lr=0.1, momentum=0.9, nu=0.7),
    dict(lr=0.5, momentum=0.99, nu=1.3),
    dict(lr=0.05, momentum=0.5, nu=-0.2, weight_decay=0.1),
    dict(lr=0.05, momentum=0.8, nu=0.6, weight_decay=0.3, weight_decay_type="direct"),
    dict(lr=0.1, momentum=0.9, nu=0.7, maximize=True),
]
QHADAM_SETTINGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99), nus=(0.7, 0.9)),
    dict(lr=3e-2, betas=(0.95, 0.98), nus=(1.2, 0.5), weight_decay=0.1),
    dict(lr=3e-2, nus=(0.7, 1.0), weight_decay=0.2, decouple_weight_decay=True, eps=1e-3),
    dict(lr=1e-2, nus=(0.5, 0.5), maximize=True),
]
SHAPES = [(7,), (3, 4), (1,), (33,)]


def _problem(rng, dtype, steps=25):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def _run_naive(oracle_cls, kwargs, params, grads):
    oracles = [oracle_cls(**kwargs) for _ in params]
    out = [p.astype(np.float64) for p in params]
    for step_grads in grads:
        out = [o.step(p, g.astype(np.float64)) for o, p, g in zip(oracles, out, step_grads)]
    return out


@pytest.mark.parametrize("kwargs", QHM_SETTINGS)
def test_qhm_matches_naive(kwargs, rng, dtype):
    params, grads = _problem(rng, dtype)
    expected = _run_naive(NaiveQHM, kwargs, params, grads)
    opt = uniopt.QHM(params, **kwargs)
    for g in grads:
        opt.step(g)
    for p, e in zip(params, expected):
        assert p.dtype == dtype
        np.testing.assert_allclose(p, e, **tolerance(dtype))


@pytest.mark.parametrize("kwargs", QHADAM_SETTINGS)
def test_qhadam_matches_naive(kwargs, rng, dtype):
    params, grads = _problem(rng, dtype)
    expected = _run_naive(NaiveQHAdam, kwargs, params, grads)
    opt = uniopt.QHAdam(params, **kwargs)
    for g in grads:
        opt.step(g)
    tol = tolerance(dtype) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, **tol)


def test_qhm_nu_zero_is_sgd(rng):
    x = rng.standard_normal(10)
    y = x.copy()
    opt = uniopt.QHM([x], lr=0.3, momentum=0.9, nu=0.0)
    for _ in range(10):
        g = rng.standard_normal(10)
        opt.step([g])
        y -= 0.3 * g
    np.testing.assert_allclose(x, y, rtol=1e-14)


def test_qhadamw_is_decoupled_qhadam(rng):
    x, y = rng.standard_normal(5), None
    y = x.copy()
    a = uniopt.QHAdamW([x], lr=0.1, weight_decay=0.5, nus=(0.7, 0.9))
    b = uniopt.QHAdam([y], lr=0.1, weight_decay=0.5, nus=(0.7, 0.9), decouple_weight_decay=True)
    assert isinstance(a, uniopt.QHAdam)
    for _ in range(5):
        g = rng.standard_normal(5)
        a.step([g])
        b.step([g])
    np.testing.assert_array_equal(x, y)
    with pytest.raises(TypeError):
        uniopt.QHAdamW([x], decouple_weight_decay=True)


def test_params_without_grad_are_untouched(rng):
    a, b = rng.standard_normal(4), rng.standard_normal(3)
    b0 = b.copy()
    opt = uniopt.QHAdam([a, b], lr=0.1, weight_decay=0.1)
    opt.step([rng.standard_normal(4), None])
    np.testing.assert_array_equal(b, b0)
    assert 1 not in opt.state and 0 in opt.state
    # The second parameter's bias correction starts at its own first step.
    opt.step([rng.standard_normal(4), np.ones(3)])
    assert opt.state[0]["beta1_weight"] == pytest.approx(1 + 0.9)
    assert opt.state[1]["beta1_weight"] == pytest.approx(1.0)


def test_param_groups_and_mixed_dtypes(rng):
    a = rng.standard_normal(4).astype(np.float32)
    b = rng.standard_normal(3)
    c = rng.standard_normal(2)
    groups = [{"params": [a, b], "nu": 0.3}, {"params": [c], "lr": 0.01, "momentum": 0.5}]
    opt = uniopt.QHM(groups, lr=0.1, momentum=0.9, nu=0.7)
    oracles = [NaiveQHM(0.1, 0.9, 0.3), NaiveQHM(0.1, 0.9, 0.3), NaiveQHM(0.01, 0.5, 0.7)]
    expected = [a.astype(np.float64), b.copy(), c.copy()]
    for _ in range(5):
        grads = [rng.standard_normal(4).astype(np.float32), rng.standard_normal(3), rng.standard_normal(2)]
        opt.step(grads)
        expected = [o.step(e, g.astype(np.float64)) for o, e, g in zip(oracles, expected, grads)]
    np.testing.assert_allclose(a, expected[0], **tolerance(np.float32))
    np.testing.assert_allclose(b, expected[1], **tolerance(np.float64))
    np.testing.assert_allclose(c, expected[2], **tolerance(np.float64))


@pytest.mark.parametrize("cls,kwargs", [(uniopt.QHM, QHM_SETTINGS[2]), (uniopt.QHAdam, QHADAM_SETTINGS[2])])
def test_state_dict_round_trip(cls, kwargs, rng):
    params, grads = _problem(rng, np.float64, steps=10)
    twin = [p.copy() for p in params]
    opt = cls(params, **kwargs)
    for g in grads[:5]:
        opt.step(g)
    saved = opt.state_dict()
    for p, t in zip(params, twin):
        t[...] = p
    resumed = cls(twin, **kwargs)
    resumed.load_state_dict(saved)
    # Loading copies: mutating the saved dict afterwards changes nothing.
    for s in saved["state"].values():
        for v in s.values():
            if isinstance(v, np.ndarray):
                v[...] = np.nan
    for g in grads[5:]:
        opt.step(g)
        resumed.step(g)
    for p, t in zip(params, twin):
        np.testing.assert_array_equal(p, t)


def test_load_state_dict_changes_group_hyperparameters(rng):
    x = rng.standard_normal(3)
    opt = uniopt.QHM([x], lr=0.1, momentum=0.9, nu=0.7)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5
    sd["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5


def test_failed_step_changes_nothing(rng):
    a, b = rng.standard_normal(4), rng.standard_normal(3)
    opt = uniopt.QHAdam([a, b], lr=0.1)
    opt.step([np.ones(4), np.ones(3)])
    before = ([a.copy(), b.copy()], opt.state_dict())
    for bad in ([np.ones(4), np.ones(2)], [np.ones(4), np.ones(3, np.float32)], [np.ones(4)]):
        with pytest.raises((ValueError, TypeError)):
            opt.step(bad)
    np.testing.assert_array_equal(a, before[0][0])
    np.testing.assert_array_equal(b, before[0][1])
    after = opt.state_dict()
    for i in before[1]["state"]:
        for k, v in before[1]["state"][i].items():
            np.testing.assert_array_equal(after["state"][i][k], v)


BAD_INPUTS = [
    (uniopt.QHM, dict(lr=-1.0, momentum=0.9, nu=0.7), ValueError, r"Invalid learning rate: -1\.0"),
    (uniopt.QHM, dict(lr="0.1", momentum=0.9, nu=0.7), TypeError, r"Invalid learning rate: '0\.1'"),
    (uniopt.QHM, dict(lr=0.1, momentum=-0.5, nu=0.7), ValueError, r"Invalid momentum value: -0\.5"),
    (uniopt.QHM, dict(lr=0.1, momentum=0.9, nu=float("nan")), ValueError, r"Invalid nu value: nan"),
    (uniopt.QHM, dict(lr=0.1, momentum=0.9, nu=None), TypeError, r"Invalid nu value: None"),
    (uniopt.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=-1e-4), ValueError, r"Invalid weight_decay value: -0\.0001"),
    (uniopt.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay_type="foo"), ValueError, r"Invalid weight_decay_type value: 'foo'"),
    (uniopt.QHAdam, dict(lr=-1e-3), ValueError, r"Invalid learning rate: -0\.001"),
    (uniopt.QHAdam, dict(eps=-1.0), ValueError, r"Invalid epsilon value: -1\.0"),
    (uniopt.QHAdam, dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    (uniopt.QHAdam, dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0\.1"),
    (uniopt.QHAdam, dict(betas=(0.9,)), ValueError, r"Invalid betas: \(0\.9,\)"),
    (uniopt.QHAdam, dict(betas=0.9), TypeError, r"Invalid betas: 0\.9"),
    (uniopt.QHAdam, dict(nus=(0.7, float("inf"))), ValueError, r"Invalid nu parameter at index 1: inf"),
    (uniopt.QHAdam, dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1"),
]


@pytest.mark.parametrize("cls,kwargs,error,message", BAD_INPUTS)
def test_bad_input(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls([np.zeros(3)], **kwargs)


@pytest.mark.parametrize("param,error,message", [
    (np.zeros(3, np.int64), TypeError, "dtype int64"),
    (np.zeros((3, 4))[:, 1], ValueError, "C-contiguous"),
    ([1.0, 2.0], TypeError, "expected a numpy.ndarray"),
])
def test_bad_params(param, error, message):
    with pytest.raises(error, match=message):
        uniopt.QHM([param], lr=0.1, momentum=0.9, nu=0.7)
    with pytest.raises(ValueError, match="empty parameter list"):
        uniopt.QHM([], lr=0.1, momentum=0.9, nu=0.7)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    lr=st.floats(0.0, 1.0), momentum=st.floats(0.0, 0.999), nu=st.floats(-1.0, 2.0),
    weight_decay=st.floats(0.0, 0.5), direct=st.booleans(), seed=st.integers(0, 2**16),
)
def test_qhm_property_matches_naive(sizes, lr, momentum, nu, weight_decay, direct, seed):
    rng = np.random.default_rng(seed)
    kwargs = dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                  weight_decay_type="direct" if direct else "grad")
    params = [rng.standard_normal(n) for n in sizes]
    grads = [[rng.standard_normal(n) for n in sizes] for _ in range(3)]
    expected = _run_naive(NaiveQHM, kwargs, params, grads)
    opt = uniopt.QHM(params, **kwargs)
    for g in grads:
        opt.step(g)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-11, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    lr=st.floats(0.0, 0.5), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.0, 0.999),
    nu1=st.floats(-0.5, 1.5), nu2=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
)
def test_qhadam_property_matches_naive(sizes, lr, beta1, beta2, nu1, nu2, seed):
    rng = np.random.default_rng(seed)
    kwargs = dict(lr=lr, betas=(beta1, beta2), nus=(nu1, nu2), eps=1e-3)
    params = [rng.standard_normal(n) for n in sizes]
    grads = [[rng.standard_normal(n) for n in sizes] for _ in range(3)]
    expected = _run_naive(NaiveQHAdam, kwargs, params, grads)
    opt = uniopt.QHAdam(params, **kwargs)
    for g in grads:
        opt.step(g)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-10, atol=1e-12)


def test_parallel_kernels_match_serial(rng, dtype):
    from uniopt.kernels import qh_cpu
    from uniopt.kernels._pointers import addresses
    from uniopt.rules import qh

    sizes = np.array([1000, 1, 0, 4097], dtype=np.int64)
    for serial, parallel in [(qh_cpu.qhm_table_, qh_cpu.qhm_table_parallel_),
                             (qh_cpu.qhadam_table_, qh_cpu.qhadam_table_parallel_)]:
        results = []
        for kernel in (serial, parallel):
            r = np.random.default_rng(0)
            p = [r.standard_normal(n).astype(dtype) for n in sizes]
            g = [r.standard_normal(n).astype(dtype) for n in sizes]
            s1 = [np.zeros(n, dtype) for n in sizes]
            s2 = [np.zeros(n, dtype) for n in sizes]
            if kernel in (qh_cpu.qhm_table_, qh_cpu.qhm_table_parallel_):
                coef = np.array(qh.qhm_coefficients(0.1, 0.9, 0.7, 0.1), dtype)
                kernel(addresses(p), addresses(g), addresses(s1), sizes, coef)
            else:
                hyper = np.array(qh.qhadam_hyper(0.1, (0.9, 0.99), (0.7, 0.8), 0.1), np.float64)
                kernel(addresses(p), addresses(g), addresses(s1), addresses(s2), sizes,
                       np.zeros(4), np.zeros(4), hyper, np.empty(16, dtype))
            results.append(p + s1 + s2)
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Against qhoptim (through torch, float64)
# ------------------------------------------------------------------------------------------
def _qhoptim_run(opt_name, kwargs, params, grads, beta_change=None):
    import torch
    import qhoptim.pyt as qhoptim
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    opt = getattr(qhoptim, opt_name)(tensors, **kwargs)
    for k, step_grads in enumerate(grads):
        if beta_change and k == beta_change[0]:
            opt.param_groups[0]["betas"] = beta_change[1]
        for t, g in zip(tensors, step_grads):
            t.grad = torch.tensor(g)
        opt.step()
    return [t.detach().numpy() for t in tensors]


@pytest.mark.parametrize("kwargs", QHM_SETTINGS[:4])
def test_qhm_matches_qhoptim(kwargs, rng):
    params, grads = _problem(rng, np.float64)
    expected = _qhoptim_run("QHM", kwargs, params, grads)
    opt = uniopt.QHM(params, **kwargs)
    for g in grads:
        opt.step(g)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs", QHADAM_SETTINGS[:4])
def test_qhadam_matches_qhoptim(kwargs, rng):
    params, grads = _problem(rng, np.float64)
    expected = _qhoptim_run("QHAdam", kwargs, params, grads)
    opt = uniopt.QHAdam(params, **kwargs)
    for g in grads:
        opt.step(g)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-12, atol=1e-14)


def test_qhadam_beta_change_matches_qhoptim(rng):
    """Running normalisers (not 1 - beta**t) when betas change mid-run, as qhoptim."""
    params, grads = _problem(rng, np.float64)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), nus=(0.7, 0.9))
    expected = _qhoptim_run("QHAdam", kwargs, params, grads, beta_change=(6, (0.5, 0.9)))
    opt = uniopt.QHAdam(params, **kwargs)
    for k, g in enumerate(grads):
        if k == 6:
            opt.param_groups[0]["betas"] = (0.5, 0.9)
        opt.step(g)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Converters
# ------------------------------------------------------------------------------------------
CONVERSIONS = [
    ("from_pid", dict(k_p=0.2, k_i=0.1, k_d=0.5)),
    ("from_synthesized_nesterov", dict(alpha=0.1, beta1=0.9, beta2=0.6)),
    ("from_robust_momentum", dict(l=10.0, kappa=25.0)),
    ("from_robust_momentum", dict(l=10.0, kappa=25.0, rho=0.85)),
    ("from_accsgd", dict(delta=0.1, kappa=100.0, xi=10.0)),
    ("from_accsgd", dict(delta=0.1, kappa=100.0, xi=10.0, eps=0.5)),
    ("from_two_state_optimizer", dict(h=0.9, k=0.0, l=0.1, m=0.5, q=1.0, z=-0.05)),
]


@pytest.mark.parametrize("name,kwargs", CONVERSIONS)
def test_conversions_match_qhoptim(name, kwargs):
    import qhoptim.pyt as qhoptim
    ours = getattr(uniopt.QHM, name)(**kwargs)
    theirs = getattr(qhoptim.QHM, name)(**kwargs)
    assert ours.keys() == theirs.keys() == {"lr", "momentum", "nu"}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-12)


def test_from_nadam_matches_qhoptim():
    import qhoptim.pyt as qhoptim
    for kwargs in ({}, dict(lr=0.01, betas=(0.8, 0.99))):
        assert uniopt.QHAdam.from_nadam(**kwargs) == qhoptim.QHAdam.from_nadam(**kwargs)
    assert uniopt.QHAdamW.from_nadam() == uniopt.QHAdam.from_nadam()


def _qhm_trajectory(hyper, x0, grad, steps):
    x = x0.copy()
    opt = uniopt.QHM([x], **hyper)
    out = [x.copy()]
    for _ in range(steps):
        opt.step([grad(x)])
        out.append(x.copy())
    return np.array(out)


def _quadratic(rng, n=5):
    a = rng.standard_normal((n, n))
    h = a @ a.T / n + 0.1 * np.eye(n)
    return h, (lambda x: h @ x)


@pytest.mark.parametrize("tso", [
    dict(h=0.8, k=0.3, q=0.95, l=0.2, z=-0.05),
    dict(h=1.0, k=0.0, q=0.6, l=-0.3, z=-0.1, m=0.5),
    dict(h=0.9, k=0.0, q=1.0, l=-0.1, z=-0.05, m=0.5),
])
def test_two_state_optimizer_recurrence(tso, rng):
    """Iterate the TSO directly and compare with QHM(**from_two_state_optimizer(...))."""
    tso = dict(tso)
    if "m" not in tso:  # make the TSO regular: (1 - h)(1 - q) = k m
        tso["m"] = (1 - tso["h"]) * (1 - tso["q"]) / tso["k"]
    h, k, l, m, q, z = (tso[c] for c in "hklmqz")
    assert math.isclose((1 - h) * (1 - q), k * m, abs_tol=1e-15)
    _, grad = _quadratic(rng)
    theta = rng.standard_normal(5)
    a = (1 - q) * theta / m
    tso_traj = [theta.copy()]
    for _ in range(40):
        g = grad(theta)
        a, theta = h * a + k * theta + l * g, m * a + q * theta + z * g
        tso_traj.append(theta.copy())
    tso_traj = np.array(tso_traj)
    ours = _qhm_trajectory(uniopt.QHM.from_two_state_optimizer(**tso), tso_traj[0], grad, 40)
    np.testing.assert_allclose(ours, tso_traj, rtol=1e-10, atol=1e-12)
    import qhoptim.pyt as qhoptim
    theirs = qhoptim.QHM.from_two_state_optimizer(**tso)
    if q == 1.0:
        assert theirs["nu"] == pytest.approx(uniopt.QHM.from_two_state_optimizer(**tso)["nu"], rel=1e-12)
    else:  # the documented deviation: qhoptim's nu gives another trajectory
        traj = _qhm_trajectory(theirs, tso_traj[0], grad, 40)
        assert np.abs(traj - tso_traj).max() > 1e-3 * np.abs(tso_traj).max()


def test_synthesized_nesterov_recurrence(rng):
    """QHM's iterates are SNV's gradient points y_k (Lessard et al. 2016, Section 6)."""
    alpha, beta1, beta2 = 0.05, 0.8, 0.5
    _, grad = _quadratic(rng)
    xi_prev = xi = rng.standard_normal(5)
    ys = []
    for _ in range(30):
        y = xi + beta2 * (xi - xi_prev)
        ys.append(y)
        xi_prev, xi = xi, xi + beta1 * (xi - xi_prev) - alpha * grad(y)
    ours = _qhm_trajectory(uniopt.QHM.from_synthesized_nesterov(alpha, beta1, beta2), ys[0], grad, 29)
    np.testing.assert_allclose(ours, np.array(ys), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# minimize
# ------------------------------------------------------------------------------------------
def _least_squares(rng):
    a = rng.standard_normal((20, 4))
    b = rng.standard_normal(20)
    solution = np.linalg.lstsq(a, b, rcond=None)[0]

    def fun(x):
        r = a @ x - b
        return 0.5 * float(r @ r), a.T @ r

    return fun, solution


@pytest.mark.parametrize("method,options", [
    ("qhm", dict(lr=0.02, momentum=0.9, nu=0.7, maxiter=5000, gtol=1e-9)),
    ("QHAdam", dict(lr=0.05, nus=(0.7, 1.0), eps=1.0, maxiter=20000, gtol=1e-8)),
])
def test_minimize_reaches_least_squares_solution(method, options, rng):
    from scipy.optimize import OptimizeResult

    fun, solution = _least_squares(rng)
    result = uniopt.minimize(fun, np.zeros(4), method=method, jac=True, options=options)
    assert isinstance(result, OptimizeResult)
    assert result.success and result.status == 0, result.message
    np.testing.assert_allclose(result.x, solution, atol=1e-6)
    assert result.nfev == result.njev == result.nit + 1
    assert np.max(np.abs(result.jac)) <= options["gtol"]


def test_minimize_as_scipy_custom_method(rng):
    from scipy.optimize import minimize

    fun, solution = _least_squares(rng)
    result = minimize(lambda x: fun(x)[0], np.zeros(4), method=uniopt.minimize_qhm,
                      jac=lambda x: fun(x)[1], options=dict(lr=0.02, maxiter=5000, gtol=1e-9))
    assert result.success
    np.testing.assert_allclose(result.x, solution, atol=1e-6)
    # jac=True goes through SciPy's MemoizeJac.
    result2 = minimize(fun, np.zeros(4), method=uniopt.minimize_qhm, jac=True,
                       options=dict(lr=0.02, maxiter=5000, gtol=1e-9))
    np.testing.assert_allclose(result2.x, result.x, rtol=1e-12)


def test_minimize_finite_differences_callback_and_errors(rng):
    fun, solution = _least_squares(rng)
    seen = []
    result = uniopt.minimize(lambda x: fun(x)[0], np.zeros(4), method="qhm",
                             callback=lambda xk: seen.append(xk) or len(seen) >= 5,
                             options=dict(lr=0.02))
    assert result.status == 99 and result.nit == 5 and len(seen) == 5
    result = uniopt.minimize(lambda x: fun(x)[0], np.zeros(4), method="qhm",
                             options=dict(lr=0.02, maxiter=5000, gtol=1e-6))
    np.testing.assert_allclose(result.x, solution, atol=1e-4)
    with pytest.raises(ValueError, match="Invalid method: 'bfgs'"):
        uniopt.minimize(fun, np.zeros(4), method="bfgs", jac=True)
    with pytest.warns(Warning, match="Unknown solver options: learning_rate"):
        uniopt.minimize(fun, np.zeros(4), method="qhm", jac=True, options=dict(learning_rate=0.1, maxiter=1))
    result = uniopt.minimize(lambda x: (float("nan"), x), np.zeros(2), method="qhm", jac=True)
    assert not result.success and "NaN" in result.message


def test_disable_jit_runs_the_same_kernels_as_python():
    """NUMBA_DISABLE_JIT=1 (coverage, debugging) executes the kernels' Python source."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, numpy as np, uniopt\n"
        "x, y = np.linspace(-1, 1, 7), np.linspace(2, 3, 5).astype(np.float32)\n"
        "a = uniopt.QHM([x], lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1)\n"
        "b = uniopt.QHAdam([y], lr=0.1, nus=(0.7, 0.9), weight_decay=0.1, decouple_weight_decay=True)\n"
        "for k in range(3):\n"
        "    a.step([np.cos(x + k)]); b.step([np.sin(y + k)])\n"
        "print(json.dumps([x.tolist(), y.tolist()]))\n"
    )
    results = []
    for disable in ("1", "0"):
        env = dict(os.environ, NUMBA_DISABLE_JIT=disable)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-14)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# QHAdam's per-step coefficient order: defined once, in uniopt.rules.qh
# ----------------------------------------------------------------------------------------------
def _after(rule, first):
    import inspect

    names = list(inspect.signature(rule).parameters)
    return names[names.index(first) + 1:]


def test_qhadam_coefficient_order_matches_the_rules_signatures():
    """The order helpers return each value where qhadam_update/qhadam_direction expect it."""
    from uniopt.rules import qh

    given_values = dict(grad_sign=-1.0, wd_grad=0.125, p_scale=0.96875, a1=0.25, a2=0.375,
                        nu1=0.7, one_minus_nu1=0.3, nu2=-0.5, one_minus_nu2=1.5, eps=1e-6,
                        lr=0.01)
    want = dict(given_values, one_minus_a1=0.75, one_minus_a2=0.625)
    update = qh.qhadam_update_coefficients(**given_values)
    assert dict(zip(_after(qh.qhadam_update, "exp_avg_sq"), update)) == want
    direction_args = {k: given_values[k] for k in ("a1", "a2", "nu1", "one_minus_nu1", "nu2",
                                                   "one_minus_nu2", "eps")}
    direction = qh.qhadam_direction_coefficients(**direction_args)
    assert dict(zip(_after(qh.qhadam_direction, "exp_avg_sq"), direction)) == {
        k: want[k] for k in _after(qh.qhadam_direction, "exp_avg_sq")}
    # The host helpers used by the faces are built from it.
    hyper = qh.qhadam_hyper(0.01, (0.9, 0.99), (0.7, -0.5), 0.125, False, 1e-6, maximize=True)
    w1, w2, coefficients = qh.qhadam_step(hyper, 0.0, 1.0)
    assert (w1, w2) == (1.0, 1.99)
    assert coefficients == qh.qhadam_coefficients(hyper, 0.0, 1.0 - 1.0 / 1.99)
    assert dict(zip(_after(qh.qhadam_update, "exp_avg_sq"), coefficients))["one_minus_a2"] == \
        1.0 - (1.0 - 1.0 / 1.99)


def test_qhadam_coefficient_order_compiles_for_the_kernels():
    """The order helpers are rules: Numba compiles them (for the CPU kernels) unchanged."""
    from uniopt import _jit
    from uniopt.rules import bind, qh

    compiled = bind(qh, wrap=_jit.elementwise)
    args = (1.0, 0.0, 1.0, 0.25, 0.375, 0.7, 0.3, 0.9, 0.1, 1e-8, 0.01)
    assert compiled.qhadam_update_coefficients(*args) == qh.qhadam_update_coefficients(*args)


def test_faces_do_not_build_qhadam_coefficients_themselves():
    """No face spells the order out (1 - a1, ...): they call uniopt.rules.qh."""
    import pathlib

    import uniopt.qh

    root = pathlib.Path(uniopt.qh.__file__).resolve().parent.parent
    for face in ("core/qh.py", "adapters/torch/qh.py", "adapters/jax/qh.py"):
        source = (root / face).read_text(encoding="utf-8")
        for spelling in ("1.0 - a1", "1 - a1", "_complement(a1)", "one_minus_a1"):
            assert spelling not in source, (face, spelling)
    rules = (root / "core/rules/qh.py").read_text(encoding="utf-8")
    assert "1.0 - a1" in rules
