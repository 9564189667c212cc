"""Polyak step-size SGD on NumPy: table kernels, the jaxopt-shaped solver, minimize.

The solver is compared with the naive oracle (tests/refimpl/naive_polyak.py) and with
jaxopt.PolyakSGD (float64, 1e-12), whose documented NaN / ascent cases are the deviations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uniopt
from conftest import tolerance
from refimpl.naive_polyak import NaivePolyakSGD, naive_sq_norm, naive_stepsize
from uniopt import polyak as core_polyak
from uniopt.kernels import polyak_cpu
from uniopt.kernels._pointers import addresses

PolyakSGD = core_polyak.PolyakSGD
minimize_polyak = uniopt.minimize_polyak

SIZES = [0, 1, 7, 1023, 1024, 1025, 5000]


def _table(arrays):
    return addresses(arrays), np.array([a.size for a in arrays], dtype=np.int64)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------
def test_sq_norm_table_matches_naive(rng, dtype):
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(dtype) for n in SIZES]
    like = np.zeros(1, dtype)
    expected = naive_sq_norm(grads)
    for kernel in (polyak_cpu.sq_norm_table, polyak_cpu.sq_norm_table_parallel):
        got = kernel(*_table(grads), like)
        assert got == pytest.approx(expected, rel=4e-16)
    # Each size alone (0 and 1 included), and a table whose tensors have no gradient.
    for g in grads:
        assert polyak_cpu.sq_norm_table(*_table([g]), like) == pytest.approx(naive_sq_norm([g]), rel=4e-16)
    addrs, sizes = _table(grads)
    assert polyak_cpu.sq_norm_table(np.zeros_like(addrs), sizes, like) == 0.0
    assert polyak_cpu.sq_norm_table(addrs[:0], sizes[:0], like) == 0.0


def test_sq_norm_spans_and_partial_blocks(rng, dtype):
    """Tensors over several two-stream spans (odd and even block counts, partial last blocks):
    the serial kernel equals the parallel one bitwise (same block sums in the same order) and
    the exactly rounded sum to a few ulps, alone and in one table with gaps."""
    span = 2 * polyak_cpu.SPAN * polyak_cpu.BLOCK  # elements of one span
    sizes = [span, span + 1, span + polyak_cpu.BLOCK, 2 * span - 5,
             span + 3 * polyak_cpu.BLOCK + 7, 2 * span + polyak_cpu.SPAN * polyak_cpu.BLOCK + 1]
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(dtype) for n in sizes]
    like = np.zeros(1, dtype)

    def exact(gs):
        return math.fsum(math.fsum(np.square(g, dtype=np.float64)) for g in gs)

    for g in grads:
        serial = polyak_cpu.sq_norm_table(*_table([g]), like)
        assert serial == pytest.approx(exact([g]), rel=4e-16)
        assert polyak_cpu.sq_norm_table_parallel(*_table([g]), like) == serial
    addrs, lengths = _table(grads)
    addrs[1] = addrs[4] = 0  # no gradient
    kept = [g for i, g in enumerate(grads) if i not in (1, 4)]
    serial = polyak_cpu.sq_norm_table(addrs, lengths, like)
    assert serial == pytest.approx(exact(kept), rel=4e-16)
    assert polyak_cpu.sq_norm_table_parallel(addrs, lengths, like) == serial


def test_sq_norm_float32_1e7_loses_no_precision():
    """1e7 float32 values of mixed magnitudes: the float64 result is within ~1 ulp of fsum."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal(10**7, dtype=np.float32)
    g *= np.float32(10.0) ** rng.integers(-2, 3, size=g.size).astype(np.float32)
    exact = math.fsum(np.square(g, dtype=np.float64))  # float32 squares are exact in float64
    like = np.zeros(1, np.float32)
    serial = polyak_cpu.sq_norm_table(*_table([g]), like)
    parallel = polyak_cpu.sq_norm_table_parallel(*_table([g]), like)
    assert abs(serial - exact) / exact <= 1e-15, abs(serial - exact) / exact
    assert parallel == serial  # same block sums, added in the same order
    # What a float32 accumulator would give (the reason for float64).
    assert abs(float(np.dot(g, g)) - exact) / exact > 1e-9


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_update_kernels_match_naive(momentum, rng, dtype):
    params = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    twins = [p.copy() for p in params]
    vel = [np.zeros(n, dtype) for n in SIZES]
    vel_twin = [v.copy() for v in vel]
    oracle = NaivePolyakSGD(momentum=momentum)
    expected = [p.astype(np.float64) for p in params]
    for _ in range(4):
        grads = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        coef = np.array([rng.uniform(0.01, 0.5), momentum], dtype)
        oracle.max_stepsize = float(coef[0])  # fun_min = 0 and a huge value: the step is the cap
        oracle.momentum = float(coef[1])
        expected = oracle.step(expected, grads, value=1e30)
        p_addrs, sizes = _table(params)
        if momentum:
            polyak_cpu.polyak_heavy_ball_table_(p_addrs, addresses(grads), addresses(vel), sizes, coef)
            polyak_cpu.polyak_heavy_ball_table_parallel_(addresses(twins), addresses(grads),
                                                         addresses(vel_twin), sizes, coef)
        else:
            polyak_cpu.polyak_sgd_table_(p_addrs, addresses(grads), sizes, coef[:1])
            polyak_cpu.polyak_sgd_table_parallel_(addresses(twins), addresses(grads), sizes, coef[:1])
    tol = tolerance(dtype) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    for p, t, e in zip(params, twins, expected):
        assert p.dtype == dtype
        np.testing.assert_array_equal(p, t)  # parallel == serial, bitwise
        np.testing.assert_allclose(p, e, **tol)


def test_update_kernels_skip_tensors_without_gradient(rng):
    p = [rng.standard_normal(5), rng.standard_normal(3)]
    v = [np.ones(5), np.ones(3)]
    before = [a.copy() for a in p + v]
    g_addrs = addresses([np.ones(5), None])
    _, sizes = _table(p)
    polyak_cpu.polyak_heavy_ball_table_(addresses(p), g_addrs, addresses(v), sizes, np.array([0.1, 0.5]))
    np.testing.assert_array_equal(p[1], before[1])
    np.testing.assert_array_equal(v[1], before[3])
    np.testing.assert_allclose(v[0], 0.5 - 0.1)
    np.testing.assert_allclose(p[0], before[0] + 0.4)


# ------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------
def _regression(seed=0, n=20, d=4, k=2, noise=0.3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, k)) + noise * rng.standard_normal((n, k))
    return x, y


def _np_fun(x, y):
    """Mean squared error of a linear model with params {"W": (d, k), "b": (k,)}."""
    n = x.shape[0]

    def fun(params):
        r = x @ params["W"] + params["b"] - y
        return 0.5 * float(np.sum(r * r)) / n, {"W": x.T @ r / n, "b": r.sum(axis=0) / n}

    return fun


def _jax_fun(x, y):
    import jax.numpy as jnp

    n = x.shape[0]
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def fun(params):
        r = xj @ params["W"] + params["b"] - yj
        return 0.5 * jnp.sum(r * r) / n

    return fun


def _init(d=4, k=2, seed=1):
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((d, k)), "b": rng.standard_normal(k)}


@pytest.fixture
def x64():
    import jax
    import jaxopt  # noqa: F401  (the test extra)
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield jax
    finally:
        jax.config.update("jax_enable_x64", previous)


def _jaxopt():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
    return jaxopt


def _to_np(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


MAX_ERRORS: dict = {}


def _assert_tree_close(ours, theirs, rtol=1e-12, atol=None, record="jaxopt"):
    """Leafwise ``rtol``, with ``atol = rtol * max|theirs|`` (components that cancel to ~0)."""
    import jax

    a, sa = jax.tree_util.tree_flatten(ours)
    b, sb = jax.tree_util.tree_flatten(_to_np(theirs))
    assert sa == sb
    scale = max((float(np.max(np.abs(v), initial=0.0)) for v in b), default=0.0)
    atol = rtol * scale if atol is None else atol
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)
        if scale:
            err = float(np.max(np.abs(np.asarray(u) - v), initial=0.0)) / scale
            MAX_ERRORS[record] = max(MAX_ERRORS.get(record, 0.0), err)


JAXOPT_SETTINGS = [
    dict(),
    dict(delta=0.5),
    dict(max_stepsize=0.05),  # clipping active at every step
    dict(fun_min=0.02),
    dict(momentum=0.9),
    dict(momentum=0.5, delta=0.1, max_stepsize=0.3),
    dict(variant="SPS+"),
    dict(variant="SPS+", momentum=0.7, fun_min=0.01),
]


@pytest.mark.parametrize("kwargs", JAXOPT_SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_update_matches_jaxopt(kwargs, x64):
    jaxopt = _jaxopt()
    x, y = _regression()
    ours = PolyakSGD(_np_fun(x, y), **kwargs)
    theirs = jaxopt.PolyakSGD(_jax_fun(x, y), jit=False, **kwargs)
    params = _init()
    p_ours, s_ours = params, ours.init_state(params)
    p_theirs, s_theirs = params, theirs.init_state(params)
    assert s_ours.velocity is None if not kwargs.get("momentum") else s_ours.velocity is not None
    stepsizes = []
    for _ in range(15):
        p_ours, s_ours = ours.update(p_ours, s_ours)
        p_theirs, s_theirs = theirs.update(p_theirs, s_theirs)
        _assert_tree_close(p_ours, p_theirs)
        for field in ("error", "value", "stepsize"):
            np.testing.assert_allclose(getattr(s_ours, field), np.asarray(getattr(s_theirs, field)),
                                       rtol=1e-12, err_msg=field)
        if kwargs.get("momentum"):
            _assert_tree_close(s_ours.velocity, s_theirs.velocity)
        assert s_ours.iter_num == int(s_theirs.iter_num)
        assert (s_ours.num_fun_eval, s_ours.num_grad_eval) == (int(s_theirs.num_fun_eval), int(s_theirs.num_grad_eval))
        stepsizes.append(float(s_ours.stepsize))
    if kwargs.get("max_stepsize") == 0.05:
        assert max(stepsizes) == 0.05  # the cap is reached
    if "max_stepsize" not in kwargs:
        assert len(set(stepsizes)) > 1  # adaptive
    # Functional: the caller's arrays are untouched.
    np.testing.assert_array_equal(params["W"], _init()["W"])


@pytest.mark.parametrize("kwargs", [dict(tol=1e-3), dict(tol=1e-4, momentum=0.5), dict(tol=1e-3, variant="SPS+"),
                                    dict(tol=1e-8, maxiter=7)])
def test_run_matches_jaxopt_with_same_iteration_count(kwargs, x64):
    jaxopt = _jaxopt()
    x, y = _regression(noise=0.0)  # realisable: f* = 0, so the gradient norm goes to 0
    ours = PolyakSGD(_np_fun(x, y), **kwargs)
    theirs = jaxopt.PolyakSGD(_jax_fun(x, y), jit=False, **kwargs)
    p_ours, s_ours = ours.run(_init())
    p_theirs, s_theirs = theirs.run(_init())
    assert s_ours.iter_num == int(s_theirs.iter_num) > 1
    if "maxiter" in kwargs:
        assert s_ours.iter_num == kwargs["maxiter"] and s_ours.error > kwargs["tol"]
    else:
        assert s_ours.error <= kwargs["tol"]
    _assert_tree_close(p_ours, p_theirs, rtol=1e-11)
    assert s_ours.num_fun_eval == int(s_theirs.num_fun_eval) == s_ours.iter_num + 1
    assert s_ours.num_grad_eval == int(s_theirs.num_grad_eval) == s_ours.iter_num


def test_has_aux_callable_value_and_grad_pre_update_match_jaxopt(x64):
    import jax.numpy as jnp

    jaxopt = _jaxopt()
    x, y = _regression()
    np_fun, jax_fun = _np_fun(x, y), _jax_fun(x, y)

    def ours_fun(params):  # ((value, aux), grad)
        value, grad = np_fun(params)
        return (value, {"b_norm": float(np.abs(params["b"]).sum())}), grad

    def theirs_fun(params):
        return jax_fun(params), {"b_norm": jnp.abs(params["b"]).sum()}

    def ours_pre(params, state):
        return {"W": np.clip(params["W"], -0.5, 0.5), "b": params["b"]}, state

    def theirs_pre(params, state):
        return {"W": jnp.clip(params["W"], -0.5, 0.5), "b": params["b"]}, state

    solvers = [
        (PolyakSGD(ours_fun, has_aux=True, pre_update=ours_pre, momentum=0.3),
         jaxopt.PolyakSGD(theirs_fun, has_aux=True, pre_update=theirs_pre, momentum=0.3, jit=False)),
        # value_and_grad as a separate callable: fun gives the value (and aux) alone.
        (PolyakSGD(lambda p: ours_fun(p)[0], value_and_grad=ours_fun, has_aux=True),
         jaxopt.PolyakSGD(theirs_fun, has_aux=True, jit=False)),
        (PolyakSGD(lambda p: np_fun(p)[0], value_and_grad=np_fun, delta=0.1),
         jaxopt.PolyakSGD(jax_fun, delta=0.1, jit=False)),
    ]
    for ours, theirs in solvers:
        _assert_tree_close(ours.init_state(_init()).aux, theirs.init_state(_init()).aux)
        a, sa = ours.run(_init())
        b, sb = theirs.run(_init())
        assert sa.iter_num == int(sb.iter_num)
        _assert_tree_close(a, b, rtol=1e-11)
        _assert_tree_close(sa.aux, sb.aux, rtol=1e-11)
        assert sa.num_fun_eval == int(sb.num_fun_eval)


def test_run_iterator_matches_jaxopt(x64):
    import jax.numpy as jnp

    jaxopt = _jaxopt()
    x, y = _regression(n=30)
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 30, 5)]

    def ours_fun(params, data):
        return _np_fun(*data)(params)

    def theirs_fun(params, data):
        return _jax_fun(*data)(params)

    for maxiter in (3, 100):
        a, sa = PolyakSGD(ours_fun, maxiter=maxiter, momentum=0.2).run_iterator(_init(), iter(batches))
        b, sb = jaxopt.PolyakSGD(theirs_fun, maxiter=maxiter, momentum=0.2, jit=False).run_iterator(
            {k: jnp.asarray(v) for k, v in _init().items()}, iter(batches))
        assert sa.iter_num == int(sb.iter_num) == min(maxiter, len(batches) - 1)
        _assert_tree_close(a, b)


def test_optimality_fun_and_l2_error_match_jaxopt(x64):
    jaxopt = _jaxopt()
    x, y = _regression()
    ours = PolyakSGD(_np_fun(x, y))
    theirs = jaxopt.PolyakSGD(_jax_fun(x, y), jit=False)
    _assert_tree_close(ours.optimality_fun(_init()), theirs.optimality_fun(_init()))
    assert ours.l2_optimality_error(_init()) == pytest.approx(float(theirs.l2_optimality_error(_init())), rel=1e-13)
    assert ours.attribute_names() == theirs.attribute_names()[:len(ours.attribute_names())]


def test_maxiter_zero_returns_the_initial_point(x64):
    jaxopt = _jaxopt()
    x, y = _regression()
    a, sa = PolyakSGD(_np_fun(x, y), maxiter=0).run(_init())
    b, sb = jaxopt.PolyakSGD(_jax_fun(x, y), maxiter=0, jit=False).run(_init())
    _assert_tree_close(a, b)
    assert sa.iter_num == int(sb.iter_num) == 0 and sa.error == np.inf == float(sb.error)


def test_jaxopt_nan_and_ascent_are_zero_steps_here(x64):
    """The documented deviations: jaxopt divides 0 by 0, and steps uphill when f < fun_min."""
    import jax.numpy as jnp

    jaxopt = _jaxopt()
    zero = np.zeros(3)
    theirs = jaxopt.PolyakSGD(lambda w: jnp.sum(w * w), jit=False)
    p, _ = theirs.update(jnp.asarray(zero), theirs.init_state(jnp.asarray(zero)))
    assert np.isnan(np.asarray(p)).all()
    ours = PolyakSGD(lambda w: (float(w @ w), 2 * w))
    p, s = ours.update(zero, ours.init_state(zero))
    np.testing.assert_array_equal(p, zero)
    assert s.stepsize == 0.0

    w = np.ones(3)
    theirs = jaxopt.PolyakSGD(lambda w: jnp.sum(w * w), fun_min=10.0, jit=False)
    p, st_ = theirs.update(jnp.asarray(w), theirs.init_state(jnp.asarray(w)))
    assert float(st_.stepsize) < 0 and np.all(np.asarray(p) > 1)
    ours = PolyakSGD(lambda w: (float(w @ w), 2 * w), fun_min=10.0)
    p, s = ours.update(w, ours.init_state(w))
    np.testing.assert_array_equal(p, w)
    assert s.stepsize == 0.0


# ------------------------------------------------------------------------------------------
# Against the naive oracle (no jax needed), float32 and float64
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", JAXOPT_SETTINGS[::2] + [dict(momentum=0.9, variant="SPS+")])
def test_update_matches_naive(kwargs, dtype):
    x, y = _regression(seed=3)
    fun = _np_fun(x, y)
    params = {k: v.astype(dtype) for k, v in _init().items()}
    solver = PolyakSGD(lambda p: (lambda v, g: (v, {k: a.astype(dtype) for k, a in g.items()}))(*fun(p)), **kwargs)
    oracle = NaivePolyakSGD(dtype=dtype, **kwargs)
    state = solver.init_state(params)
    expected = [params["W"].astype(np.float64), params["b"].astype(np.float64)]
    for _ in range(10):
        value, grad = fun({"W": expected[0], "b": expected[1]})
        expected = oracle.step(expected, [grad["W"], grad["b"]], value)
        params, state = solver.update(params, state)
        assert params["W"].dtype == params["b"].dtype == dtype
        assert state.stepsize.dtype == state.error.dtype == dtype
        if dtype == np.float64:
            assert float(state.stepsize) == pytest.approx(oracle.last_stepsize, rel=1e-12)
    tol = tolerance(dtype) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(params["W"], expected[0], **tol)
    np.testing.assert_allclose(params["b"], expected[1], **tol)


def test_pytree_kinds_and_functional_update():
    from typing import NamedTuple

    class Weights(NamedTuple):
        a: np.ndarray
        b: list

    tree = {"z": Weights(np.ones(2), [np.full(3, 2.0), 4.0]), "a": (np.zeros((2, 2)),), "n": None}

    def fun(p):
        leaves = [p["z"].a, p["z"].b[0], np.asarray(p["z"].b[1]), p["a"][0]]
        value = 0.5 * sum(float(np.sum(v * v)) for v in leaves)
        grad = {"z": Weights(p["z"].a, [p["z"].b[0], np.asarray(p["z"].b[1])]), "a": (p["a"][0],), "n": None}
        return value, grad

    solver = PolyakSGD(fun, momentum=0.5)
    state = solver.init_state(tree)
    new, state = solver.update(tree, state)
    assert isinstance(new["z"], Weights) and isinstance(new["z"].b, list) and isinstance(new["a"], tuple)
    assert new["n"] is None and isinstance(state.velocity["z"], Weights)
    # f = ||x||^2 / 2, f* = 0: gamma = min(f / ||x||^2, 1) = 1/2, v = -x/2, x <- x/2.
    np.testing.assert_allclose(new["z"].b[0], 1.0)
    np.testing.assert_allclose(new["z"].b[1], 2.0)
    np.testing.assert_allclose(state.velocity["z"].a, -0.5)
    assert float(state.stepsize) == 0.5
    # The input tree is untouched, and so is the previous state's velocity.
    np.testing.assert_array_equal(tree["z"].b[0], 2.0)
    velocity = state.velocity["z"].a.copy()
    solver.update(new, state)
    np.testing.assert_array_equal(state.velocity["z"].a, velocity)


def test_single_array_and_scalar_params():
    solver = PolyakSGD(lambda x: (float(x @ x), 2 * x))
    x0 = np.array([1.0, -2.0])
    params, state = solver.update(x0, solver.init_state(x0))
    np.testing.assert_array_equal(params, [0.5, -1.0])  # the optax/jaxopt docstring anchor
    assert state.value == 5.0 and state.error == pytest.approx(math.sqrt(20.0))
    params, state = solver.run(x0)
    assert state.iter_num == 14 and state.error <= 1e-3
    scalar = PolyakSGD(lambda w: (w * w, 2 * w))
    w, _ = scalar.update(3.0, scalar.init_state(3.0))
    assert float(w) == 1.5


def test_verbose_prints_one_line_per_update(capsys):
    solver = PolyakSGD(lambda x: (float(x @ x), 2 * x), verbose=True, maxiter=3, tol=0.0)
    solver.run(np.array([1.0, -2.0]))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("INFO: uniopt.PolyakSGD: Iter: 1 Gradient Norm (stopping criterion): 4.47")
    assert "Objective Value:5.0" in lines[0] and "Stepsize:0.25" in lines[0]


# ------------------------------------------------------------------------------------------
# Convergence on interpolation problems
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,tol", [
    (dict(max_stepsize=10.0), 1e-10),
    (dict(max_stepsize=10.0, momentum=0.5), 1e-10),
    # SPS+ stops moving once ||g||^2 <= eps (2.2e-16): the gradient norm cannot go below 1.5e-8.
    (dict(variant="SPS+"), 2e-8),
])
def test_realisable_least_squares_reaches_the_solution(kwargs, tol):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 6))
    x_star = rng.standard_normal(6)
    b = a @ x_star

    def fun(x):
        r = a @ x - b
        return 0.5 * float(r @ r) / len(b), a.T @ r / len(b)

    x, state = PolyakSGD(fun, tol=tol, maxiter=5000, **kwargs).run(np.zeros(6))
    assert state.error <= tol and state.iter_num < 5000
    np.testing.assert_allclose(x, x_star, atol=100 * tol)


def test_separable_logistic_regression_reaches_zero_loss():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((60, 3))
    w_true = np.array([2.0, -1.0, 0.5])
    y = np.where(x @ w_true > 0, 1.0, -1.0)
    x = x + 0.3 * y[:, None] * w_true / np.linalg.norm(w_true)  # a margin

    def fun(w):
        z = y * (x @ w)
        loss = float(np.mean(np.logaddexp(0.0, -z)))
        grad = -(x.T @ (y * 0.5 * (1 - np.tanh(0.5 * z)))) / len(y)  # sigmoid(-z) = (1 - tanh(z/2)) / 2
        return loss, grad

    w, state = PolyakSGD(fun, max_stepsize=100.0, maxiter=300, tol=0.0).run(np.zeros(3))
    assert fun(w)[0] < 1e-3
    assert np.all(np.sign(x @ w) == y)
    assert np.isfinite(w).all()


def test_zero_gradient_and_gap_below_fun_min_never_nan(dtype):
    zero = np.zeros(4, dtype)
    for variant in ("SPS_max", "SPS+"):
        for fun_min, value in ((0.0, 0.0), (5.0, 1.0), (0.0, 2.0)):
            solver = PolyakSGD(lambda w, v=value: (v, np.zeros_like(w)), fun_min=fun_min, variant=variant, momentum=0.5)
            p, s = solver.update(zero, solver.init_state(zero))
            np.testing.assert_array_equal(p, zero)
            assert np.isfinite(s.stepsize) and s.error == 0
            if value > fun_min and variant == "SPS_max":
                assert s.stepsize == 1.0  # positive gap, zero denominator: the cap (nothing moves)
            else:
                assert s.stepsize == 0.0
        # Nonzero gradient but f < fun_min: zero step.
        w = np.ones(4, dtype)
        solver = PolyakSGD(lambda w: (float(w @ w), 2 * w), fun_min=100.0, variant=variant)
        p, s = solver.update(w, solver.init_state(w))
        np.testing.assert_array_equal(p, w)
        assert s.stepsize == 0.0


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------
def _f(x):
    return float(x @ x), 2 * x


BAD_INPUTS = [
    (dict(fun=None), TypeError, r"Invalid fun: None \(expected a callable\)"),
    (dict(variant="SPS"), ValueError, r"Invalid variant value: 'SPS' \(expected one of 'SPS_max', 'SPS\+'\)"),
    (dict(max_stepsize=-1.0), ValueError, r"Invalid max_stepsize value: -1\.0"),
    (dict(max_stepsize=float("inf")), ValueError, r"Invalid max_stepsize value: inf"),
    (dict(max_stepsize="1"), TypeError, r"Invalid max_stepsize value: '1'"),
    (dict(delta=-0.1), ValueError, r"Invalid delta value: -0\.1"),
    (dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0\.5"),
    (dict(momentum=float("nan")), ValueError, r"Invalid momentum value: nan"),
    (dict(fun_min=float("nan")), ValueError, r"Invalid fun_min value: nan"),
    (dict(fun_min=None), TypeError, r"Invalid fun_min value: None"),
    (dict(tol=-1e-3), ValueError, r"Invalid tol value: -0\.001"),
    (dict(maxiter=-1), ValueError, r"Invalid maxiter value: -1"),
    (dict(maxiter=2.5), TypeError, r"Invalid maxiter value: 2\.5"),
    (dict(maxiter=True), TypeError, r"Invalid maxiter value: True"),
    (dict(value_and_grad=False), ValueError, r"Invalid value_and_grad value: False \(NumPy cannot differentiate"),
    (dict(value_and_grad="yes"), TypeError, r"Invalid value_and_grad value: 'yes'"),
    (dict(has_aux=None), TypeError, r"Invalid has_aux value: None"),
    (dict(pre_update=3), TypeError, r"Invalid pre_update value: 3"),
    (dict(verbose="loud"), TypeError, r"Invalid verbose value: 'loud'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS)
def test_bad_input(kwargs, error, message):
    kwargs = {"fun": _f, **kwargs}
    with pytest.raises(error, match=message):
        PolyakSGD(**kwargs)


def test_bad_params_and_gradients():
    solver = PolyakSGD(_f)
    with pytest.raises(TypeError, match="dtype int64"):
        solver.init_state(np.arange(3))
    mixed = PolyakSGD(lambda p: (0.0, p))
    with pytest.raises(ValueError, match="more than one dtype"):
        mixed.init_state([np.ones(2), np.ones(2, np.float32)])
    wrong_shape = PolyakSGD(lambda x: (1.0, np.ones(3)))
    with pytest.raises(ValueError, match=r"Invalid gradient leaf 0: shape \(3,\) != parameter shape \(2,\)"):
        wrong_shape.update(np.ones(2), wrong_shape.init_state(np.ones(2)))
    wrong_tree = PolyakSGD(lambda p: (1.0, [p[0]]))
    with pytest.raises(ValueError, match="gradient does not have the structure"):
        wrong_tree.update([np.ones(2), np.ones(1)], wrong_tree.init_state([np.ones(2), np.ones(1)]))
    no_grad = PolyakSGD(lambda x: 1.0)
    with pytest.raises(TypeError, match=r"fun must return \(value, grad\)"):
        no_grad.update(np.ones(2), PolyakSGDState_like())


def PolyakSGDState_like():
    return core_polyak.PolyakSGDState(0, np.inf, np.inf, None, 1.0, None, 1, 0)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(value=st.floats(-1e6, 1e6), fun_min=st.floats(-1e6, 1e6), sq_norm=st.floats(0.0, 1e6),
       delta=st.floats(0.0, 1e3), max_stepsize=st.floats(0.0, 1e3), plus=st.booleans())
def test_stepsize_is_within_bounds(value, fun_min, sq_norm, delta, max_stepsize, plus):
    variant = "SPS+" if plus else "SPS_max"
    gamma = core_polyak.polyak_stepsize(value, sq_norm, fun_min, variant, max_stepsize, delta)
    assert not math.isnan(gamma) and gamma >= 0.0
    if not plus:
        assert gamma <= max_stepsize
    assert gamma == pytest.approx(naive_stepsize(value, sq_norm, fun_min, variant, max_stepsize, delta), rel=1e-15)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=4), scale=st.floats(0.0, 1e3),
       value=st.floats(-10.0, 1e3), fun_min=st.floats(-10.0, 10.0), max_stepsize=st.floats(0.0, 10.0),
       delta=st.floats(0.0, 1.0), plus=st.booleans(), momentum=st.sampled_from([0.0, 0.9]),
       seed=st.integers(0, 2**16))
def test_solver_steps_are_bounded_and_finite(sizes, scale, value, fun_min, max_stepsize, delta, plus,
                                             momentum, seed):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n) for n in sizes]
    grads = [scale * rng.standard_normal(n) for n in sizes]
    variant = "SPS+" if plus else "SPS_max"
    solver = PolyakSGD(lambda p: (value, grads), fun_min=fun_min, variant=variant,
                       max_stepsize=max_stepsize, delta=delta, momentum=momentum)
    new, state = solver.update(params, solver.init_state(params))
    gamma = float(state.stepsize)
    assert gamma >= 0.0 and math.isfinite(gamma)
    if not plus:
        assert gamma <= max_stepsize
    for p, q, g in zip(new, params, grads):
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p, q - gamma * g, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# minimize
# ------------------------------------------------------------------------------------------
def _least_squares(seed=8):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((30, 4))
    solution = rng.standard_normal(4)
    b = a @ solution

    def fun(x):
        r = a @ x - b
        return 0.5 * float(r @ r) / 30, a.T @ r / 30

    return fun, solution


def test_minimize_polyak_as_scipy_custom_method():
    from scipy.optimize import OptimizeResult, minimize

    fun, solution = _least_squares()
    options = dict(max_stepsize=10.0, maxiter=5000, gtol=1e-10)
    result = minimize(fun, np.zeros(4), method=minimize_polyak, jac=True, options=options)
    assert isinstance(result, OptimizeResult)
    assert result.success and result.status == 0, result.message
    np.testing.assert_allclose(result.x, solution, atol=1e-8)
    assert result.nfev == result.njev == result.nit + 1
    assert np.max(np.abs(result.jac)) <= 1e-10
    result2 = minimize(lambda x: fun(x)[0], np.zeros(4), method=minimize_polyak,
                       jac=lambda x: fun(x)[1], options=dict(options, momentum=0.5))
    assert result2.success
    np.testing.assert_allclose(result2.x, solution, atol=1e-8)
    # The same trajectory as the solver (which stops on the pre-update gradient norm).
    short = minimize(fun, np.zeros(4), method=minimize_polyak, jac=True, options=dict(maxiter=5))
    x5, _ = PolyakSGD(fun, maxiter=5, tol=0.0).run(np.zeros(4))
    np.testing.assert_allclose(short.x, x5, rtol=1e-14)
    assert short.status == 1 and short.nit == 5


def test_minimize_polyak_callback_float32_and_errors():
    fun, solution = _least_squares()
    seen = []
    result = minimize_polyak(fun, np.zeros(4), jac=True, callback=lambda xk: seen.append(xk) or len(seen) >= 3)
    assert result.status == 99 and result.nit == 3 and len(seen) == 3
    result = minimize_polyak(fun, np.zeros(4, np.float32), jac=True, max_stepsize=10.0, gtol=1e-5)
    assert result.x.dtype == np.float32 and result.success
    np.testing.assert_allclose(result.x, solution, atol=1e-4)
    result = minimize_polyak(lambda x: fun(x)[0], np.zeros(4), max_stepsize=10.0, maxiter=3000, gtol=1e-6)
    np.testing.assert_allclose(result.x, solution, atol=1e-4)  # finite differences
    with pytest.warns(Warning, match="Unknown solver options: lr"):
        minimize_polyak(fun, np.zeros(4), jac=True, lr=0.1, maxiter=1)
    with pytest.raises(ValueError, match="Invalid variant value: 'sps'"):
        minimize_polyak(fun, np.zeros(4), jac=True, variant="sps")
    result = minimize_polyak(lambda x: (float("nan"), x), np.ones(2), jac=True)
    assert not result.success and "NaN" in result.message
    result = minimize_polyak(lambda x: (float(x @ x), 2 * x), np.ones(2), jac=True, fun_min=5.0, maxiter=3)
    np.testing.assert_array_equal(result.x, np.ones(2))  # f < fun_min: zero steps


def test_uniopt_minimize_method_polyak():
    fun, solution = _least_squares()
    result = uniopt.minimize(fun, np.zeros(4), method="polyak", jac=True,
                             options=dict(max_stepsize=10.0, maxiter=5000, gtol=1e-10))
    assert result.success
    np.testing.assert_allclose(result.x, solution, atol=1e-8)


def test_disable_jit_runs_the_same_kernels_as_python():
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, numpy as np\n"
        "from uniopt.polyak import PolyakSGD\n"
        "f = lambda p: (0.5 * sum(float(a @ a) for a in p) + 1.0, [np.cos(a) for a in p])\n"
        "x = [np.linspace(-1, 1, 2500), np.linspace(2, 3, 5)]\n"
        "y = [a.astype(np.float32) for a in x]\n"
        "for s in (PolyakSGD(f, momentum=0.5, maxiter=3, tol=0.0), PolyakSGD(f, variant='SPS+', maxiter=3, tol=0.0)):\n"
        "    x = s.run(x).params\n"
        "    y = s.run(y).params\n"
        "print(json.dumps([[a.tolist() for a in x], [a.tolist() for a in y]]))\n"
    )
    results = []
    for disable in ("1", "0"):
        env = dict(os.environ, NUMBA_DISABLE_JIT=disable)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# The variant choice, written once in rules/
# ------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(value=st.floats(-1e3, 1e3), fun_min=st.floats(-1e3, 1e3),
       sq_norm=st.one_of(st.just(0.0), st.just(1e-17), st.floats(0.0, 1e3)),
       delta=st.one_of(st.just(0.0), st.floats(0.0, 10.0)), max_stepsize=st.floats(0.0, 10.0),
       plus=st.booleans())
def test_rule_variant_choice_is_one_of_the_two_rules(value, fun_min, sq_norm, delta, max_stepsize, plus):
    """``rules.polyak.polyak_stepsize`` picks SPS+ or SPS_max; the NumPy face is that rule."""
    from uniopt.rules import polyak as rules

    tiny = float(np.finfo(np.float64).eps)
    got = rules.polyak_stepsize(value, fun_min, sq_norm, delta, max_stepsize, tiny, plus)
    if plus:
        assert got == rules.sps_plus_stepsize(value, fun_min, sq_norm, tiny)
    else:
        assert got == rules.sps_max_stepsize(value, fun_min, sq_norm, delta, max_stepsize)
    variant = "SPS+" if plus else "SPS_max"
    expected = naive_stepsize(value, sq_norm, fun_min, variant, max_stepsize, delta, tiny)
    assert got == pytest.approx(expected, rel=1e-15, abs=0.0)
    assert core_polyak.polyak_stepsize(value, sq_norm, fun_min, variant, max_stepsize, delta) == got
    assert rules.is_plus(variant) is plus


def test_rule_variant_names_and_zero_guard():
    from uniopt.rules import polyak as rules

    for bad in ("sps", "SPS", None, 1):
        with pytest.raises(ValueError, match=f"Invalid variant value: {bad!r}"):
            rules.is_plus(bad)
        with pytest.raises(ValueError, match="Invalid variant value"):
            core_polyak.polyak_stepsize(1.0, 1.0, variant=bad)
    # SPS+'s guard is the dtype's epsilon (or eps): same norm, different dtypes
    sq = 1e-10  # > float64 eps, < float32 eps
    assert core_polyak.polyak_stepsize(1.0, sq, variant="SPS+", dtype=np.float64) == pytest.approx(1e10)
    assert core_polyak.polyak_stepsize(1.0, sq, variant="SPS+", dtype=np.float32) == 0.0
    assert core_polyak.polyak_stepsize(1.0, sq, variant="SPS+", eps=1e-9) == 0.0
    # optax's guard: 0 when the denominator is at most tiny, exactly 0 even for a NaN step
    assert rules.zero_below(0.5, 1e-20, 1e-16) == 0.0
    assert rules.zero_below(float("nan"), 0.0, 1e-16) == 0.0
    assert rules.zero_below(0.5, 1e-3, 1e-16) == 0.5
