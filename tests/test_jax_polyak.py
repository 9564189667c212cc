"""Polyak step-size SGD in JAX: ``PolyakSGD`` (jaxopt-style solver) and the optax transforms.

Oracles: jaxopt 0.8.5's ``PolyakSGD`` and optax's ``polyak_sgd`` (test-only dependencies; the
tests that need them skip without them), closed-form derivatives of least-squares / ridge
solutions, and hand-derived steps on ``f(w) = ||w||^2`` (there the Polyak step is exactly 1/4,
so every step halves ``w``). Everything runs in float64 unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest

import jax
import optax
import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from uniopt.adapters.jax.polyak import (  # noqa: E402
    OptStep,
    PolyakSGD,
    PolyakSGDState,
    ScaleByPolyakState,
    polyak_sgd,
    scale_by_polyak,
)

TRAJ_TOL = dict(rtol=1e-12, atol=1e-14)
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def jaxopt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt

        return jaxopt


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------
def _data(n=8, d=4, seed=0, noise=0.1):
    """``y = X w + 0.5 + noise``: with noise the minimum of :func:`lsq` is > 0 (about 0.009)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = X @ rng.standard_normal(d) + 0.5 + noise * rng.standard_normal(n)
    return jnp.asarray(X), jnp.asarray(y)


def lsq(params, X, y):
    """Affine least squares on a dict pytree of parameters."""
    residual = X @ params["w"] + params["b"] - y
    return 0.5 * jnp.sum(residual ** 2)


def lsq_aux(params, X, y):
    residual = X @ params["w"] + params["b"] - y
    return 0.5 * jnp.sum(residual ** 2), {"residual": residual}


# NumPy float64 (module import runs before x64 is switched on, jnp.zeros would be float32)
P0 = {"b": np.zeros(()), "w": np.zeros(4)}


def _max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max((float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
                for x, y in zip(leaves_a, leaves_b)), default=0.0)


def _assert_tree_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TRAJ_TOL))


def _assert_states_close(ours, theirs):
    for field in ("iter_num", "error", "value", "stepsize", "num_fun_eval", "num_grad_eval"):
        np.testing.assert_allclose(np.asarray(getattr(ours, field)),
                                   np.asarray(getattr(theirs, field)), **TRAJ_TOL, err_msg=field)
    if theirs.velocity is None:
        assert ours.velocity is None
    else:
        _assert_tree_close(ours.velocity, theirs.velocity)
    _assert_tree_close(ours.aux, theirs.aux)


def _trajectory(solver, params, *args, steps=STEPS, **kwargs):
    """``(init_state, [(params, state) after each of ``steps`` updates])``."""
    state = init = solver.init_state(params, *args, **kwargs)
    out = []
    for _ in range(steps):
        params, state = solver.update(params, state, *args, **kwargs)
        out.append((params, state))
    return init, out


# ----------------------------------------------------------------------------------------------
# Trajectories against jaxopt
# ----------------------------------------------------------------------------------------------
SETTINGS = {
    "default": dict(),
    "delta": dict(delta=0.3),
    "max_stepsize": dict(max_stepsize=0.1),
    "fun_min": dict(fun_min=0.005),
    "momentum": dict(momentum=0.6),
    "sps_plus": dict(variant="SPS+"),
    "sps_plus_momentum": dict(variant="SPS+", momentum=0.3),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_update_trajectory_matches_jaxopt(jaxopt, name):
    kwargs = SETTINGS[name]
    X, y = _data()
    _, ours = _trajectory(PolyakSGD(lsq, **kwargs), P0, X, y)
    _, theirs = _trajectory(jaxopt.PolyakSGD(lsq, **kwargs), P0, X, y)
    for (p, s), (q, t) in zip(ours, theirs):
        _assert_tree_close(p, q)
        _assert_states_close(s, t)
    assert isinstance(ours[-1][1], PolyakSGDState)
    steps = np.array([float(s.stepsize) for _, s in ours])
    values = np.array([float(s.value) for _, s in ours])
    # The comparison is in the ordinary regime (the gap stays positive) ...
    assert np.all(values > kwargs.get("fun_min", 0.0))
    # ... and the hyper-parameter under test matters on this problem.
    if name == "max_stepsize":
        assert np.any(steps == 0.1) and np.any(steps < 0.1)
    if name == "default":
        assert np.any(steps == 1.0) and np.any(steps < 1.0)
    if name == "sps_plus":
        assert np.any(steps > 1.0)  # SPS+ is uncapped


@pytest.mark.parametrize("value_and_grad", [False, True, "callable"])
@pytest.mark.parametrize("has_aux", [False, True])
def test_fun_signatures_match_jaxopt(jaxopt, value_and_grad, has_aux):
    X, y = _data()
    base = lsq_aux if has_aux else lsq
    if value_and_grad is True:
        fun, vg = jax.value_and_grad(base, has_aux=has_aux), True
    elif value_and_grad == "callable":
        fun, vg = base, jax.value_and_grad(base, has_aux=has_aux)
    else:
        fun, vg = base, False
    kwargs = dict(value_and_grad=vg, has_aux=has_aux, momentum=0.5)
    state0, ours = _trajectory(PolyakSGD(fun, **kwargs), P0, X, y, steps=3)
    _, theirs = _trajectory(jaxopt.PolyakSGD(fun, **kwargs), P0, X, y, steps=3)
    for (p, s), (q, t) in zip(ours, theirs):
        _assert_tree_close(p, q)
        _assert_states_close(s, t)
    # aux keeps its type from init_state to update (jaxopt's test_aux_consistency)
    state1 = ours[0][1]
    assert type(state0.aux) is type(state1.aux)
    assert (state1.aux is None) == (not has_aux)


def test_pre_update_matches_jaxopt(jaxopt):
    X, y = _data()

    def pre_update(params, state, X, y):
        return jax.tree.map(lambda p: jnp.clip(p, -0.05, 0.05), params), state

    _, ours = _trajectory(PolyakSGD(lsq, pre_update=pre_update), P0, X, y, steps=5)
    _, theirs = _trajectory(jaxopt.PolyakSGD(lsq, pre_update=pre_update), P0, X, y, steps=5)
    for (p, s), (q, t) in zip(ours, theirs):
        _assert_tree_close(p, q)
        _assert_states_close(s, t)
    _, plain = _trajectory(PolyakSGD(lsq), P0, X, y, steps=5)
    assert _max_diff(plain[-1][0], ours[-1][0]) > 1e-3  # the clipping did change the path


def test_run_stops_by_tol_like_jaxopt_in_every_loop_mode(jaxopt):
    X, y = _data(noise=0.0)  # realisable: fun_min = 0 is the minimum
    kwargs = dict(maxiter=400, tol=2e-3)
    theirs = jaxopt.PolyakSGD(lsq, **kwargs).run(P0, X, y)
    iters = int(theirs.state.iter_num)
    assert 1 < iters < 400  # stopped by tol, not by maxiter
    # scan (jit, unrolled), Python loop (no jit), lax.while_loop (jit, not unrolled)
    for mode in (dict(), dict(jit=False), dict(unroll=False)):
        ours = PolyakSGD(lsq, **kwargs, **mode).run(P0, X, y)
        assert isinstance(ours, OptStep)
        assert int(ours.state.iter_num) == iters, mode
        _assert_tree_close(ours.params, theirs.params)
        _assert_states_close(ours.state, theirs.state)
    # state.error is the gradient norm *before* the last update: the first one <= tol.
    assert float(ours.state.error) <= 2e-3
    _, traj = _trajectory(PolyakSGD(lsq), P0, X, y, steps=iters)
    assert float(traj[-2][1].error) > 2e-3
    _assert_tree_close(traj[-1][0], ours.params)


def test_run_maxiter_zero_and_one_match_jaxopt(jaxopt):
    X, y = _data()
    for maxiter in (0, 1):
        ours = PolyakSGD(lsq, maxiter=maxiter).run(P0, X, y)
        theirs = jaxopt.PolyakSGD(lsq, maxiter=maxiter).run(P0, X, y)
        assert int(ours.state.iter_num) == maxiter
        _assert_tree_close(ours.params, theirs.params)
        _assert_states_close(ours.state, theirs.state)
    assert float(ours.state.error) < np.inf  # maxiter=1 did take a step


def test_num_evals_and_real_call_counts(jaxopt):
    X, y = _data(noise=0.0)
    calls = {"n": 0}

    def counted(params, X, y):
        calls["n"] += 1
        return lsq(params, X, y)

    _, state = PolyakSGD(counted, jit=False, maxiter=30, tol=0.0).run(P0, X, y)
    assert int(state.num_fun_eval) == calls["n"] == 31  # init_state + 30 updates
    assert int(state.num_grad_eval) == 30
    calls["n"] = 0
    _, state = PolyakSGD(counted, jit=False, maxiter=30).run(P0, X, y)
    ours_calls = calls["n"]
    assert int(state.num_fun_eval) == ours_calls < 31  # stopped early by tol
    calls["n"] = 0
    _, theirs = jaxopt.PolyakSGD(counted, jit=False, maxiter=30).run(P0, X, y)
    assert int(theirs.num_fun_eval) == calls["n"] == ours_calls


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dtypes_and_weak_types(jaxopt, momentum):
    X, y = _data(n=10, d=5)
    init = jnp.zeros(5)

    def fun(w, X, y):
        return jnp.sum((X @ w - y) ** 2)

    for cls in (PolyakSGD, jaxopt.PolyakSGD):
        solver = cls(fun, momentum=momentum)
        hash(solver)
        state0 = solver.init_state(init, X=X, y=y)
        _, state1 = jax.jit(solver.update)(init, state0, X=X, y=y)
        for field in state0._fields:
            f0, f1 = getattr(state0, field), getattr(state1, field)
            assert type(f0).__name__ == type(f1).__name__, field
            assert getattr(f0, "weak_type", None) == getattr(f1, "weak_type", None), field
        if cls is PolyakSGD:
            ours = (state0, state1)
        else:
            theirs = (state0, state1)
    for a, b in zip(ours, theirs):
        for field in a._fields:
            fa, fb = getattr(a, field), getattr(b, field)
            assert getattr(fa, "weak_type", None) == getattr(fb, "weak_type", None), field
            assert getattr(fa, "dtype", None) == getattr(fb, "dtype", None), field

    # bfloat16 objective, float16 parameters (jaxopt's test_dtype_consistency)
    Xb, yb = X.astype(jnp.bfloat16), y.astype(jnp.bfloat16)

    def fun16(w, X, y):
        return jnp.sum((X @ w.astype(jnp.bfloat16) - y) ** 2)

    init16 = jnp.zeros(5, dtype=jnp.float16)
    solver = PolyakSGD(fun16, momentum=momentum)
    state = solver.init_state(init16, X=Xb, y=yb)
    params, state = solver.update(init16, state, X=Xb, y=yb)
    assert params.dtype == jnp.float16
    assert state.value.dtype == jnp.bfloat16
    assert state.error.dtype == state.stepsize.dtype == jnp.float16
    assert bool(jnp.all(jnp.isfinite(params)))


def test_run_iterator_matches_jaxopt(jaxopt):
    X, y = _data(n=30)
    batches = [(X[i:i + 5], y[i:i + 5]) for i in range(0, 30, 5)]  # 6 batches

    def fun(params, data):
        return lsq(params, *data)

    ours = PolyakSGD(fun, maxiter=100, momentum=0.2).run_iterator(P0, batches)  # a list works
    theirs = jaxopt.PolyakSGD(fun, maxiter=100, momentum=0.2).run_iterator(P0, iter(batches))
    assert int(ours.state.iter_num) == int(theirs.state.iter_num) == 5  # batch 0 only inits
    _assert_tree_close(ours.params, theirs.params)
    _assert_states_close(ours.state, theirs.state)
    short = PolyakSGD(fun, maxiter=2).run_iterator(P0, iter(batches))
    assert int(short.state.iter_num) == 2
    with pytest.raises(ValueError, match="no batch"):
        PolyakSGD(fun).run_iterator(P0, iter([]))


# ----------------------------------------------------------------------------------------------
# Against optax.polyak_sgd
# ----------------------------------------------------------------------------------------------
def _optax_run(opt, params, X, y, steps=STEPS):
    state = opt.init(params)
    update = jax.jit(opt.update)
    path = []
    for _ in range(steps):
        value, grad = jax.value_and_grad(lsq)(params, X, y)
        updates, state = update(grad, state, params, value=value)
        params = optax.apply_updates(params, updates)
        path.append(params)
    return path


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(max_learning_rate=0.3, eps=0.01),
    dict(f_min=0.05, variant="sps+"),
    dict(max_learning_rate=5.0, variant="sps"),
], ids=["default", "capped_eps", "f_min_plus", "sps"])
def test_polyak_sgd_matches_optax(kwargs):
    X, y = _data()
    ours = _optax_run(polyak_sgd(**kwargs), P0, X, y)
    theirs = _optax_run(optax.polyak_sgd(**kwargs), P0, X, y)
    for p, q in zip(ours, theirs):
        _assert_tree_close(p, q)
    assert _max_diff(ours[-1], P0) > 0.05


def test_optax_docstring_anchor_and_missing_value():
    # f = ||x||^2 from (1, 2, 3): the step is exactly 1/4, so x halves and f quarters.
    f = lambda x: jnp.sum(x ** 2)  # noqa: E731
    params = jnp.array([1.0, 2.0, 3.0])
    solver = polyak_sgd()
    state = solver.init(params)
    for k in range(1, 6):
        value, grad = jax.value_and_grad(f)(params)
        updates, state = solver.update(grad, state, params, value=value)
        params = optax.apply_updates(params, updates)
        assert float(f(params)) == 14.0 / 4 ** k
    with pytest.raises(TypeError):
        solver.update(grad, state, params)
    with pytest.raises(TypeError):
        scale_by_polyak().update(grad, scale_by_polyak().init(params))


def test_scaling_follows_the_documented_formula():
    """optax's docstring: step = s * min(gap / ||g||^2, max); its code scales g first."""
    X, y = _data()
    s = 0.5
    value, grad = jax.value_and_grad(lsq)(P0, X, y)
    sq = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grad))
    gamma = min(float(value) / sq, 1.0)
    ours, _ = polyak_sgd(scaling=s).update(grad, polyak_sgd(scaling=s).init(P0), P0, value=value)
    _assert_tree_close(ours, jax.tree.map(lambda g: -s * gamma * g, grad))
    scheduled = polyak_sgd(scaling=optax.constant_schedule(s))
    from_schedule, _ = scheduled.update(grad, scheduled.init(P0), P0, value=value)
    _assert_tree_close(from_schedule, ours)
    # optax's behaviour stays reachable: sgd(s) first, then our scale_by_polyak.
    theirs_opt = optax.polyak_sgd(scaling=s)
    theirs, _ = theirs_opt.update(grad, theirs_opt.init(P0), P0, value=value)
    chained = optax.chain(optax.sgd(s), scale_by_polyak())
    reached, _ = chained.update(grad, chained.init(P0), P0, value=value)
    _assert_tree_close(reached, theirs)
    assert _max_diff(ours, theirs) > 1e-3


def test_optax_momentum_matches_solver_and_inject_hyperparams(jaxopt):
    X, y = _data()
    kwargs = dict(fun_min=0.005, delta=0.1, max_stepsize=0.7, momentum=0.5)
    solver_path = [p for p, _ in _trajectory(PolyakSGD(lsq, **kwargs), P0, X, y)[1]]
    jaxopt_path = [p for p, _ in _trajectory(jaxopt.PolyakSGD(lsq, **kwargs), P0, X, y)[1]]
    opt = polyak_sgd(max_learning_rate=0.7, f_min=0.005, eps=0.1, momentum=0.5)
    optax_path = _optax_run(opt, P0, X, y)
    injected = optax.inject_hyperparams(polyak_sgd)(
        max_learning_rate=0.7, f_min=0.005, eps=0.1, momentum=0.5)
    injected_path = _optax_run(injected, P0, X, y)
    for a, b, c, d in zip(solver_path, jaxopt_path, optax_path, injected_path):
        _assert_tree_close(a, b)
        _assert_tree_close(c, a)
        _assert_tree_close(d, a)
    state = opt.init(P0)
    assert isinstance(state[0], ScaleByPolyakState)
    assert state[0].velocity is not None and polyak_sgd().init(P0)[0].velocity is None


# ----------------------------------------------------------------------------------------------
# JAX transformations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verbose", [False, True])
def test_run_under_jit_with_static_solver(capsys, verbose):
    solver = PolyakSGD(lambda p: p @ p, verbose=verbose, maxiter=4, tol=0.0)

    @functools.partial(jax.jit, static_argnums=1)
    def run_solver(p0, solver):
        return solver.run(p0)

    params, state = jax.block_until_ready(run_solver(jnp.arange(1.0, 3.0), solver))
    eager = PolyakSGD(lambda p: p @ p, maxiter=4, tol=0.0).run(jnp.arange(1.0, 3.0))
    _assert_tree_close(params, eager.params)
    # f = ||p||^2: the step is 1/4, p halves at each of the 4 updates
    np.testing.assert_allclose(np.asarray(params), np.arange(1.0, 3.0) / 16, rtol=1e-15)
    lines = [line for line in capsys.readouterr().out.splitlines() if "uniopt.PolyakSGD" in line]
    assert len(lines) == (4 if verbose else 0)


def test_vmap_over_run():
    X, _ = _data()
    ys = jnp.stack([X @ jnp.arange(4.0) + 1.0, X @ jnp.ones(4) - 2.0, jnp.zeros(8)])
    solver = PolyakSGD(lsq, maxiter=50, tol=1e-4)
    params, state = jax.vmap(lambda y: solver.run(P0, X, y))(ys)
    for i in range(3):
        single = solver.run(P0, X, ys[i])
        # batched reductions may round differently: agreement to ~1e-12 of the solution's scale
        _assert_tree_close(jax.tree.map(lambda p: p[i], params), single.params, rtol=1e-10,
                           atol=1e-10)
        assert int(state.iter_num[i]) == int(single.state.iter_num)


def _underdetermined(seed=1):
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.standard_normal((3, 6)))
    y = jnp.asarray(rng.standard_normal(3))
    return X, y


def lsq_plain(w, X, y):
    return 0.5 * jnp.sum((X @ w - y) ** 2)


def _jacrev_run(solver, init, *args, **kwargs):
    """``y -> (d params / d y, OptStep)`` of ``solver.run(init, *args, y, **kwargs)``."""

    def run(y):
        step = solver.run(init, *args, y, **kwargs)
        return step.params, step

    return jax.jacrev(run, has_aux=True)


def test_jacrev_through_unrolled_run(jaxopt):
    """From w0 = 0 the iterates stay in X's row space and tend to pinv(X) @ y, for every y.

    With the step capped at every iteration (max_stepsize below the smallest possible Polyak
    ratio 1 / (2 lambda_max)) the run is gradient descent with a fixed step, and the derivative
    of the unrolled iterations tends to pinv(X). With the adaptive step it only approximates it
    (the step size depends on y; d(gamma)/dy does not vanish at the limit), exactly as jaxopt's.
    """
    X, y = _underdetermined()
    pinv = np.linalg.pinv(np.asarray(X))
    lam_max = float(np.linalg.eigvalsh(np.asarray(X @ X.T)).max())
    capped = PolyakSGD(lsq_plain, max_stepsize=0.99 / (2 * lam_max), maxiter=600, tol=1e-11)
    jac, (params, state) = _jacrev_run(capped, jnp.zeros(6), X)(y)
    assert float(state.error) <= 1e-11 and float(state.stepsize) == capped.max_stepsize
    np.testing.assert_allclose(np.asarray(params), pinv @ np.asarray(y), atol=1e-10)
    np.testing.assert_allclose(np.asarray(jac), pinv, atol=1e-9)

    adaptive = dict(maxiter=300, tol=1e-11)
    ours = jax.jacrev(lambda y: PolyakSGD(lsq_plain, **adaptive).run(jnp.zeros(6), X, y).params)(y)
    theirs = jax.jacrev(
        lambda y: jaxopt.PolyakSGD(lsq_plain, **adaptive).run(jnp.zeros(6), X, y).params)(y)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ours), pinv, atol=1e-2)


def test_implicit_diff_is_the_pseudo_inverse_positional_and_keyword():
    """The Hessian X^T X is singular here; CG on the normal equations finds the min-norm
    solution, which gives pinv(X), the derivative of the min-norm limit."""
    X, y = _underdetermined()
    solver = PolyakSGD(lsq_plain, maxiter=300, tol=1e-11, implicit_diff=True)
    pinv = np.linalg.pinv(np.asarray(X))
    jac_pos, (_, state) = _jacrev_run(solver, jnp.zeros(6), X)(y)
    assert float(state.error) <= 1e-11
    np.testing.assert_allclose(np.asarray(jac_pos), pinv, atol=1e-10)
    # keyword arguments, to a fun taking catch-all **kwargs (jaxopt's custom_root cannot bind
    # those to positions)
    catch_all = dataclasses.replace(solver, fun=lambda w, **kw: lsq_plain(w, kw["X"], kw["y"]))
    jac_kw = jax.jacrev(lambda y: catch_all.run(jnp.zeros(6), X=X, y=y).params)(y)
    np.testing.assert_allclose(np.asarray(jac_kw), np.asarray(jac_pos), atol=1e-12)


def test_implicit_diff_ridge_matches_closed_form():
    """w*(lam) = (X^T X + lam I)^-1 X^T y, so dw*/dlam = -(X^T X + lam I)^-1 w*."""
    X, y = _data(n=10, d=4, seed=3)
    lam = 0.7
    A = np.asarray(X.T @ X) + lam * np.eye(4)
    w_star = np.linalg.solve(A, np.asarray(X.T @ y))
    expected = -np.linalg.solve(A, w_star)

    def ridge(w, X, y, lam):
        return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w ** 2)

    f_star = float(ridge(jnp.asarray(w_star), X, y, lam))
    solver = PolyakSGD(ridge, fun_min=f_star, maxiter=500, tol=1e-7, implicit_diff=True)
    jac, (params, state) = _jacrev_run(solver, jnp.zeros(4), X, y)(lam)
    assert float(state.error) <= 1e-7
    np.testing.assert_allclose(np.asarray(params), w_star, atol=1e-8)
    np.testing.assert_allclose(np.asarray(jac), expected, rtol=1e-6, atol=1e-8)

    # implicit_diff_solve replaces the linear solver: here a dense solve, marked by a counter
    calls = []

    def dense_solve(matvec, b):
        calls.append(1)
        A = jax.jacfwd(matvec)(jnp.zeros_like(b))
        return jnp.linalg.solve(A, b)

    dense = dataclasses.replace(solver, implicit_diff_solve=dense_solve)
    jac_dense = jax.jacrev(lambda lam: dense.run(jnp.zeros(4), X, y, lam=lam).params)(lam)  # kw
    assert calls
    np.testing.assert_allclose(np.asarray(jac_dense), expected, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Convergence under interpolation
# ----------------------------------------------------------------------------------------------
def test_realisable_least_squares_reaches_the_optimum():
    rng = np.random.default_rng(5)
    X = jnp.asarray(rng.standard_normal((20, 5)))
    w_true = jnp.asarray(rng.standard_normal(5))
    params, state = PolyakSGD(lsq_plain, maxiter=500, tol=1e-9).run(jnp.zeros(5), X, X @ w_true)
    assert float(state.error) <= 1e-9 and int(state.iter_num) < 500
    np.testing.assert_allclose(np.asarray(params), np.asarray(w_true), atol=1e-8)


def test_separable_logistic_regression_reaches_zero_loss():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((40, 3))
    labels = np.sign(X @ np.array([1.0, -2.0, 0.5]))
    X, labels = jnp.asarray(X), jnp.asarray(labels)

    def logistic(w, X, labels):
        return jnp.mean(jnp.logaddexp(0.0, -labels * (X @ w)))

    solver = PolyakSGD(logistic, max_stepsize=100.0, maxiter=300, tol=0.0)
    params, state = solver.run(jnp.zeros(3), X, labels)
    assert float(logistic(params, X, labels)) < 1e-2 * float(logistic(jnp.zeros(3), X, labels))
    assert bool(jnp.all(jnp.sign(X @ params) == labels))


# ----------------------------------------------------------------------------------------------
# Degenerate points: zero steps, never NaN (where jaxopt gives NaN or ascends)
# ----------------------------------------------------------------------------------------------
def test_zero_gradient_at_exact_minimiser_gives_zero_step(jaxopt):
    f = lambda w: jnp.sum(w ** 2)  # noqa: E731
    zero = jnp.zeros(3)
    for variant in ("SPS_max", "SPS+"):
        solver = PolyakSGD(f, variant=variant, momentum=0.5)
        params, state = solver.update(zero, solver.init_state(zero))
        assert float(state.stepsize) == 0.0
        np.testing.assert_array_equal(np.asarray(params), np.zeros(3))
    theirs = jaxopt.PolyakSGD(f, jit=False)
    assert bool(jnp.all(jnp.isnan(theirs.update(zero, theirs.init_state(zero)).params)))
    # the traced rule has finite derivatives there as well, and so has the gradient norm
    solver = PolyakSGD(f, jit=False)
    state = solver.init_state(zero)
    jac = jax.jacrev(lambda w: solver.update(w, state).params)(zero)
    assert bool(jnp.all(jnp.isfinite(jac)))
    d_error = jax.grad(lambda w: solver.update(w, state).state.error)(zero)
    np.testing.assert_array_equal(np.asarray(d_error), np.zeros(3))
    assert bool(jnp.all(jnp.isnan(jax.grad(
        lambda w: theirs.update(w, theirs.init_state(w)).state.error)(zero))))
    # optax transform: zero gradient and zero gap -> zero update
    updates, _ = polyak_sgd(momentum=0.5).update(zero, polyak_sgd(momentum=0.5).init(zero), zero,
                                                 value=f(zero))
    np.testing.assert_array_equal(np.asarray(updates), np.zeros(3))


def test_value_below_fun_min_gives_zero_step(jaxopt):
    f = lambda w: jnp.sum(w ** 2)  # noqa: E731
    w = jnp.full(2, 0.1)  # f = 0.02 < fun_min = 1
    solver = PolyakSGD(f, fun_min=1.0, jit=False)
    params, state = solver.update(w, solver.init_state(w))
    assert float(state.stepsize) == 0.0
    np.testing.assert_array_equal(np.asarray(params), np.asarray(w))
    theirs = jaxopt.PolyakSGD(f, fun_min=1.0, jit=False)
    ascended = theirs.update(w, theirs.init_state(w)).params
    assert bool(jnp.all(jnp.abs(ascended) > jnp.abs(w)))  # jaxopt steps uphill
    value, grad = jax.value_and_grad(f)(w)
    ours_update, _ = polyak_sgd(f_min=1.0).update(grad, polyak_sgd().init(w), w, value=value)
    np.testing.assert_array_equal(np.asarray(ours_update), np.zeros(2))
    reference = optax.polyak_sgd(f_min=1.0)
    optax_update, _ = reference.update(grad, reference.init(w), w, value=value)
    assert bool(jnp.all(optax_update * w > 0))  # optax steps uphill as well


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
f_sq = lambda w: jnp.sum(w ** 2)  # noqa: E731

BAD_SOLVER = [
    (dict(variant="SPS"), ValueError, r"variant value: 'SPS'"),
    (dict(max_stepsize=-1.0), ValueError, r"max_stepsize value: -1\.0"),
    (dict(max_stepsize=float("nan")), ValueError, r"max_stepsize value: nan"),
    (dict(max_stepsize=float("inf")), ValueError, r"max_stepsize value: inf"),  # inf * 0 = NaN
    (dict(delta=-0.1), ValueError, r"delta value: -0\.1"),
    (dict(momentum=-0.5), ValueError, r"momentum value: -0\.5"),
    (dict(maxiter=-1), ValueError, r"maxiter value: -1"),
    (dict(maxiter=2.5), TypeError, r"maxiter value: 2\.5"),
    (dict(tol=-1e-3), ValueError, r"tol value: -0\.001"),
    (dict(fun_min=float("inf")), ValueError, r"fun_min value: inf"),
    (dict(fun_min="0"), TypeError, r"fun_min value: '0'"),
    (dict(fun=None), TypeError, r"fun: None"),
    (dict(value_and_grad="yes"), TypeError, r"value_and_grad value: 'yes'"),
    (dict(has_aux=None), TypeError, r"has_aux value: None"),
    (dict(pre_update=3), TypeError, r"pre_update value: 3"),
    (dict(implicit_diff_solve="cg"), TypeError, r"implicit_diff_solve value: 'cg'"),
    (dict(unroll="yes"), ValueError, r"unroll value: 'yes'"),
    (dict(unroll=np.array([])), TypeError, r"unroll value: array\(\[\]"),
    (dict(unroll=None), TypeError, r"unroll value: None"),
    (dict(unroll=False, jit=False), ValueError, r"unroll=False and jit=False"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_SOLVER,
                         ids=[f"{next(iter(k))}-{i}" for i, (k, _, _) in enumerate(BAD_SOLVER)])
def test_solver_rejects_bad_arguments_at_construction(kwargs, error, message):
    kwargs = {"fun": f_sq, **kwargs}
    with pytest.raises(error, match=message):
        PolyakSGD(**kwargs)


BAD_OPTAX = [
    (scale_by_polyak, dict(variant="SPS_max"), ValueError, r"variant value: 'SPS_max'"),
    (scale_by_polyak, dict(max_learning_rate=-1.0), ValueError, r"max_learning_rate value: -1"),
    (scale_by_polyak, dict(eps=-1e-8), ValueError, r"eps value: -1e-08"),
    (scale_by_polyak, dict(momentum=-0.1), ValueError, r"momentum value: -0\.1"),
    (scale_by_polyak, dict(f_min=float("nan")), ValueError, r"f_min value: nan"),
    (polyak_sgd, dict(scaling=-1.0), ValueError, r"scaling value: -1\.0"),
    (polyak_sgd, dict(variant="plus"), ValueError, r"variant value: 'plus'"),
]


@pytest.mark.parametrize("factory, kwargs, error, message", BAD_OPTAX,
                         ids=[f"{f.__name__}-{next(iter(k))}" for f, k, _, _ in BAD_OPTAX])
def test_optax_rejects_bad_arguments(factory, kwargs, error, message):
    with pytest.raises(error, match=message):
        factory(**kwargs)


def test_python_ints_beyond_int64_are_the_real_numbers_they_equal():
    """``f_min=-2**63`` and ``max_learning_rate=2**70`` (Python ints beyond what a jitted step
    can take) are those floats: the step is the closed form (f - f_min) / |g|^2 < the cap
    (``scale_by_polyak`` scales the gradient by it; ``polyak_sgd`` descends)."""
    x = jnp.ones(3)
    value, grad = 3.0, 2 * x  # f = |x|^2 at ones(3); |g|^2 = 12
    step = (value + 2.0**63) / 12.0
    for t, sign in ((scale_by_polyak(f_min=-(2**63), max_learning_rate=2**70), 1.0),
                    (polyak_sgd(f_min=-(2**63), max_learning_rate=2**70), -1.0)):
        updates, _ = jax.jit(t.update)(grad, t.init(x), x, value=jnp.asarray(value))
        np.testing.assert_allclose(np.asarray(updates), sign * step * np.asarray(grad), rtol=1e-6)
    solver = PolyakSGD(f_sq, fun_min=-(2**63), max_stepsize=2**70)
    new, _ = solver.update(x, solver.init_state(x))
    np.testing.assert_allclose(np.asarray(new), np.asarray(x - step * grad), rtol=1e-6)


def test_solver_protocol_attributes(jaxopt):
    solver = PolyakSGD(f_sq, momentum=0.5)
    reference = jaxopt.PolyakSGD(f_sq, momentum=0.5)
    assert solver.attribute_names() == reference.attribute_names()
    assert solver.attribute_values() == reference.attribute_values()
    assert hash(solver) == hash(PolyakSGD(f_sq, momentum=0.5))
    assert solver != PolyakSGD(f_sq, momentum=0.5)  # equality is identity, as in jaxopt
    positional = PolyakSGD(f_sq, False, False, 0.1, "SPS+", 2.0, 0.2, 0.3)
    assert (positional.fun_min, positional.variant, positional.max_stepsize, positional.delta,
            positional.momentum) == (0.1, "SPS+", 2.0, 0.2, 0.3)
    w = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(np.asarray(solver.optimality_fun(w)), 2 * np.asarray(w))
    assert float(solver.l2_optimality_error(w)) == pytest.approx(2 * np.sqrt(5.0), rel=1e-15)


# ----------------------------------------------------------------------------------------------
# Property: 0 <= step size (<= max_stepsize for SPS_max), also for traced hyper-parameters
# ----------------------------------------------------------------------------------------------
def _quadratic(w, c, scale, offset):
    return scale * jnp.sum((w - c) ** 2) + offset


@functools.partial(jax.jit, static_argnums=0)
def _stepsizes(variant, w, c, scale, offset, fun_min, delta, max_stepsize):
    solver = PolyakSGD(_quadratic, variant=variant, fun_min=fun_min, delta=delta,
                       max_stepsize=max_stepsize, jit=False)
    state = solver.update(w, solver.init_state(w, c, scale, offset), c, scale, offset).state
    value, grad = jax.value_and_grad(_quadratic)(w, c, scale, offset)
    opt = scale_by_polyak(f_min=fun_min, max_learning_rate=max_stepsize, eps=delta)
    direction, _ = opt.update(grad, opt.init(w), value=value)
    sq = jnp.sum(grad ** 2)
    optax_step = jnp.where(sq > 0, jnp.vdot(direction, grad) / jnp.where(sq > 0, sq, 1.0), 0.0)
    return state.stepsize, optax_step


finite = dict(allow_nan=False, allow_infinity=False)
vector = st.lists(st.floats(-1e3, 1e3, **finite), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(w=vector, c=vector, scale=st.floats(0.0, 1e3, **finite),
       offset=st.floats(-10.0, 10.0, **finite), fun_min=st.floats(-10.0, 10.0, **finite),
       delta=st.floats(0.0, 10.0, **finite), max_stepsize=st.floats(0.0, 1e3, **finite))
def test_stepsize_is_never_negative_nor_above_max(w, c, scale, offset, fun_min, delta,
                                                   max_stepsize):
    with jax.enable_x64(True):
        w, c = jnp.asarray(w), jnp.asarray(c)
        args = (w, c, scale, offset, fun_min, delta, max_stepsize)
        step_max, optax_step = map(float, _stepsizes("SPS_max", *args))
        step_plus, _ = map(float, _stepsizes("SPS+", *args))
    assert 0.0 <= step_max <= max_stepsize
    assert 0.0 <= optax_step <= max_stepsize * (1 + 1e-12)
    assert step_plus >= 0.0 and np.isfinite(step_plus)


# ----------------------------------------------------------------------------------------------
# The variant choice is the rule's (rules/polyak.py), for the solver and the optax transforms
# ----------------------------------------------------------------------------------------------
def test_solver_and_optax_take_the_step_size_from_the_rule(monkeypatch):
    from uniopt.adapters.jax import polyak as jax_polyak

    calls = []
    rule = jax_polyak._rules.polyak_stepsize

    def spy(*args):
        calls.append(args[-1])
        return rule(*args)

    monkeypatch.setattr(jax_polyak._rules, "polyak_stepsize", spy)
    X, y = _data()
    for variant, plus in (("SPS_max", False), ("SPS+", True)):
        calls.clear()
        solver = PolyakSGD(lsq, variant=variant, jit=False)
        solver.update(P0, solver.init_state(P0, X, y), X, y)
        assert calls == [plus]
    for variant in ("sps", "sps+"):
        calls.clear()
        tx = polyak_sgd(variant=variant)
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.asarray(1.0))
        assert calls == [False]  # both optax names are SPS_max here (never an ascent step)


def test_traced_variant_flag_matches_the_numpy_face():
    """The rule with a traced ``is_plus`` (vmap, jit) gives the NumPy face's step sizes."""
    from uniopt.adapters.jax import polyak as jax_polyak
    from uniopt.polyak import polyak_stepsize

    rule = jax.jit(jax.vmap(jax_polyak._rules.polyak_stepsize,
                            in_axes=(0, None, 0, None, None, None, None)))
    values = np.array([2.0, 0.5, 0.0, -1.0, 3.0, 1.0])
    sq_norms = np.array([4.0, 0.25, 0.0, 1.0, 0.0, 1e-17])
    tiny = float(np.finfo(np.float64).eps)
    for plus, variant in ((False, "SPS_max"), (True, "SPS+")):
        got = np.asarray(rule(jnp.asarray(values), 0.1, jnp.asarray(sq_norms), 0.0, 0.7, tiny,
                              jnp.asarray(plus)))
        expected = [polyak_stepsize(v, s, 0.1, variant, 0.7, 0.0) for v, s in zip(values, sq_norms)]
        np.testing.assert_array_equal(got, np.array(expected))
        # finite derivatives everywhere, also at the zero denominators
        grads = jax.vmap(jax.grad(jax_polyak._rules.polyak_stepsize, argnums=(0, 2)),
                         in_axes=(0, None, 0, None, None, None, None))(
            jnp.asarray(values), 0.1, jnp.asarray(sq_norms), 0.0, 0.7, tiny, plus)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
