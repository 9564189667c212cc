"""The JAX face of iALM (uniopt.adapters.jax.ialm): parity with the NumPy uniopt.iALM, jit and
vmap, gradients of the Lagrangian, an end-to-end constrained problem, bad inputs.

float64 is switched on per test with ``jax.enable_x64`` (the ``x64`` fixture), so it never
leaks into other test files; module-level data are NumPy arrays for the same reason.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

import jax
import optax
import jax.numpy as jnp  # noqa: E402

import uniopt  # noqa: E402
from uniopt.adapters.jax import IALMState, ialm  # noqa: E402

from conftest import tolerance  # noqa: E402
from refimpl.naive_ialm import EXTREME64, closed_form_step  # noqa: E402

STEPS = 20


# ----------------------------------------------------------------------------------------------
# Four groups: equality and inequality, unequal sizes (one 2-D), momentum (heavy-ball and EMA),
# sigma > 1, clamps that bind (upper, the inequality's 0, a tight box), gamma/||d|| binding.
# ----------------------------------------------------------------------------------------------
NAMES = ("g0", "g1", "g2", "g3")  # dict keys: jax.tree.leaves order is this order
SHAPES = {"g0": (3,), "g1": (1,), "g2": (5,), "g3": (2, 1)}
GROUPS = {
    "g0": dict(beta=0.5, sigma=1.1, gamma=2.0, momentum=0.0, dampening=0.0,
               dual_range=(-100.0, 100.0), is_ineq=False),
    "g1": dict(beta=2.0, sigma=1.0, gamma=0.3, momentum=0.9, dampening=0.0,
               dual_range=(-1.0, 0.8), is_ineq=True),
    "g2": dict(beta=1.0, sigma=1.3, gamma=1.0, momentum=0.5, dampening=0.5,
               dual_range=(-0.4, 0.4), is_ineq=False),
    "g3": dict(beta=0.8, sigma=1.05, gamma=5.0, momentum=0.0, dampening=0.0,
               dual_range=(None, None), is_ineq=True),
}
INIT = {"g0": np.array([0.1, -0.2, 0.3]), "g1": None, "g2": 0.05, "g3": np.array([0.5, 0.0])}

_rng = np.random.default_rng(20240611)
#: constraint values per step (about one in eight within the ctol used below); g1 is violated
#: for 10 steps (its multiplier rises to the upper bound 0.8), then satisfied (back to 0)
DRIFT = {"g0": 0.0, "g1": 0.3, "g2": 0.0, "g3": 0.1}
C_SEQ = [{k: _rng.normal(DRIFT[k] if t < STEPS // 2 else -DRIFT[k], 0.3, size=SHAPES[k])
          for k in NAMES} for t in range(STEPS)]
LOSS_SEQ = _rng.normal(0.0, 1.0, size=STEPS)
CTOL = 0.05


def _init_for(dtype):
    return {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in INIT.items()}


def make_numpy(dtype, penalty, ctol):
    init = _init_for(dtype)
    first = GROUPS["g0"]
    opt = uniopt.iALM(m=3, beta=first["beta"], sigma=first["sigma"], gamma=first["gamma"],
                      init_duals=init["g0"], penalty=penalty, dual_range=first["dual_range"],
                      momentum=first["momentum"], dampening=first["dampening"],
                      is_ineq=first["is_ineq"], ctol=ctol)
    for k in NAMES[1:]:
        g = GROUPS[k]
        opt.add_constraint_group(int(np.prod(SHAPES[k])), g["beta"], g["sigma"], g["gamma"],
                                 g["momentum"], g["dampening"], init[k], g["dual_range"],
                                 g["is_ineq"])
    return opt


def make_jax(dtype, penalty, ctol):
    """The same groups, hyper-parameters given in each accepted form (list, dict, single)."""
    per = {h: [GROUPS[k][h] for k in NAMES] for h in GROUPS["g0"]}
    return ialm(beta=per["beta"],                                         # list, leaf order
                sigma=tuple(per["sigma"]),                                # tuple
                gamma={k: GROUPS[k]["gamma"] for k in NAMES},             # dict like the tree
                penalty=penalty, ctol=ctol,
                dual_range={k: GROUPS[k]["dual_range"] for k in NAMES},   # dict of pairs
                momentum=per["momentum"], dampening=per["dampening"],
                is_ineq={k: GROUPS[k]["is_ineq"] for k in NAMES},
                init_duals=_init_for(dtype))


def run_both(dtype, penalty, ctol, idiom, *, jit=False):
    """20 steps of each; returns per-step records (NumPy, JAX) of every state field and L."""
    opt = make_numpy(dtype, penalty, ctol)
    t = make_jax(dtype, penalty, ctol)
    update = jax.jit(t.update) if jit else t.update
    lagrangian = jax.jit(t.lagrangian) if jit else t.lagrangian
    forward_update = jax.jit(t.forward_update) if jit else t.forward_update
    state = t.init({k: jnp.asarray(v.astype(dtype)) for k, v in C_SEQ[0].items()})
    rec_np, rec_jx = [], []
    for step in range(STEPS):
        c_np = [C_SEQ[step][k].astype(dtype).reshape(-1) for k in NAMES]
        c_jx = {k: jnp.asarray(C_SEQ[step][k].astype(dtype)) for k in NAMES}
        loss = dtype(LOSS_SEQ[step])
        if idiom == "forward_update":
            l_np = opt.forward_update(loss, c_np)
            l_jx, state = forward_update(jnp.asarray(loss), c_jx, state)
        else:  # forward, then update (the simultaneous idiom)
            l_np = opt.forward(loss, c_np)
            opt.update(c_np)
            l_jx = lagrangian(jnp.asarray(loss), c_jx, state)
            state = update(c_jx, state)
        groups = opt.param_groups
        rec_np.append(dict(
            duals=[g["duals"].copy() for g in groups],
            buffer=[g["momentum_buffer"].copy() for g in groups],
            beta=[g["beta"] for g in groups],
            stepsize=[s["stepsize"] for s in opt.last_step], L=l_np))
        rec_jx.append(dict(
            duals=[np.asarray(state.duals[k]).reshape(-1) for k in NAMES],
            buffer=[np.asarray(state.momentum_buffer[k]).reshape(-1) for k in NAMES],
            beta=[float(state.beta[k]) for k in NAMES],
            stepsize=[float(state.stepsize[k]) for k in NAMES], L=float(l_jx)))
    assert int(state.count) == STEPS
    return rec_np, rec_jx, state


def parity_errors(rec_np, rec_jx) -> tuple:
    """(worst relative error where |reference| >= 0.01, worst absolute error elsewhere)."""
    rel, small = 0.0, 0.0
    for a, b in zip(rec_np, rec_jx):
        pairs = [(x, y) for field in ("duals", "buffer", "beta", "stepsize")
                 for x, y in zip(a[field], b[field])] + [(a["L"], b["L"])]
        for x, y in pairs:
            x = np.atleast_1d(np.asarray(x, np.float64))
            y = np.atleast_1d(np.asarray(y, np.float64))
            big = np.abs(x) >= 0.01
            if big.any():
                rel = max(rel, float(np.max(np.abs(x - y)[big] / np.abs(x)[big])))
            if (~big).any():
                small = max(small, float(np.max(np.abs(x - y)[~big])))
    return rel, small


def assert_records_close(rec_np, rec_jx, dtype):
    tol = tolerance(dtype)
    for step, (a, b) in enumerate(zip(rec_np, rec_jx)):
        for field in ("duals", "buffer", "beta", "stepsize"):
            for k, (x, y) in enumerate(zip(a[field], b[field])):
                np.testing.assert_allclose(y, x, **tol, err_msg=f"step {step} {field} group {k}")
        np.testing.assert_allclose(b["L"], a["L"], **tol, err_msg=f"step {step} L")


PARITY = [(penalty, ctol, idiom) for penalty in (None, 0.7) for ctol in (0.0, CTOL)
          for idiom in ("forward_update", "forward_then_update")]


def _ids(case):
    penalty, ctol, idiom = case
    return f"penalty={penalty}-ctol={ctol}-{idiom}"


@pytest.mark.parametrize("case", PARITY, ids=[_ids(c) for c in PARITY])
def test_float64_parity_with_numpy_ialm(x64, case):
    penalty, ctol, idiom = case
    rec_np, rec_jx, _ = run_both(np.float64, penalty, ctol, idiom)
    assert_records_close(rec_np, rec_jx, np.float64)


def test_parity_case_exercises_every_branch(x64):
    """The parity data really bind the clamps, both step branches and the ctol filter."""
    rec_np, _, _ = run_both(np.float64, None, CTOL, "forward_update")
    duals = [np.stack([r["duals"][k] for r in rec_np]) for k in range(4)]
    assert np.any(duals[1] == 0.8) and np.any(duals[1] == 0.0)       # g1: upper and the 0 of ineq
    assert np.any(np.abs(duals[2]) == 0.4)                           # g2: the tight box
    steps = np.array([r["stepsize"] for r in rec_np])
    betas_before = np.array([[GROUPS[k]["beta"] * GROUPS[k]["sigma"] ** t for k in NAMES]
                             for t in range(STEPS)])
    assert np.any(steps < betas_before * (1 - 1e-9))                 # gamma/||d|| chosen
    assert np.any(np.isclose(steps, betas_before, rtol=1e-12, atol=0))  # beta chosen
    filtered = sum(int(np.sum(np.abs(c[k]) <= CTOL)) for c in C_SEQ for k in NAMES)
    assert filtered > 10
    # beta grows by sigma per update: beta_20 = beta_0 * sigma^20 (g2: 1.3^20)
    assert rec_np[-1]["beta"][2] == pytest.approx(1.3 ** STEPS, rel=1e-12)


@pytest.mark.parametrize("case", [PARITY[1], PARITY[7]], ids=[_ids(PARITY[1]), _ids(PARITY[7])])
def test_float32_parity_with_numpy_ialm(case):
    penalty, ctol, idiom = case
    with jax.enable_x64(False):
        rec_np, rec_jx, state = run_both(np.float32, penalty, ctol, idiom)
        assert all(state.duals[k].dtype == jnp.float32 for k in NAMES)
        assert all(state.beta[k].dtype == jnp.float32 for k in NAMES)
    assert rec_np[-1]["duals"][0].dtype == np.float32
    assert_records_close(rec_np, rec_jx, np.float32)


def test_measured_parity_errors(x64, capsys):
    """The worst errors over all parity cases, printed (one line) and held to the tolerances."""
    e64 = [parity_errors(*run_both(np.float64, p, c, i)[:2]) for p, c, i in PARITY]
    rel64, abs64 = max(e[0] for e in e64), max(e[1] for e in e64)
    with jax.enable_x64(False):
        rel32, abs32 = parity_errors(*run_both(np.float32, 0.7, CTOL, "forward_then_update")[:2])
    with capsys.disabled():
        print(f"\n[ialm parity] worst relative error (|x| >= 0.01) / absolute error (|x| < 0.01):"
              f" float64 {rel64:.2e} / {abs64:.2e}, float32 {rel32:.2e} / {abs32:.2e}")
    assert rel64 < 1e-12 and abs64 < 1e-14
    assert rel32 < 2e-5 and abs32 < 1e-6


# ----------------------------------------------------------------------------------------------
# jit and vmap
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["forward_update", "forward_then_update"])
def test_jit_equals_eager(x64, idiom):
    _, eager, _ = run_both(np.float64, None, CTOL, idiom)
    _, jitted, _ = run_both(np.float64, None, CTOL, idiom, jit=True)
    assert_records_close(eager, jitted, np.float64)


def test_vmap_over_independent_problems_equals_separate_runs(x64):
    t = ialm(beta=0.7, sigma=1.2, gamma=0.5, penalty=None, momentum=0.6, dampening=0.3,
             dual_range=(-0.5, 0.5), ctol=0.02)
    batch = _rng.normal(0.0, 0.4, size=(8, 3, 4))  # 8 steps, 3 problems, 4 constraints
    losses = _rng.normal(size=(8, 3))

    batched_init = jax.jit(jax.vmap(t.init))
    batched_step = jax.jit(jax.vmap(t.forward_update))
    state = batched_init(jnp.asarray(batch[0]))
    values = []
    for step in range(8):
        value, state = batched_step(jnp.asarray(losses[step]), jnp.asarray(batch[step]), state)
        values.append(value)
    assert state.duals.shape == (3, 4) and state.beta.shape == (3,)
    for p in range(3):
        single = t.init(jnp.asarray(batch[0, p]))
        for step in range(8):
            value, single = t.forward_update(jnp.asarray(losses[step, p]),
                                             jnp.asarray(batch[step, p]), single)
            np.testing.assert_allclose(values[step][p], value, **tolerance(np.float64))
        for field in IALMState._fields:
            np.testing.assert_allclose(np.asarray(getattr(state, field))[p],
                                       np.asarray(getattr(single, field)),
                                       **tolerance(np.float64), err_msg=field)
    # the three problems really differ
    assert not np.allclose(state.duals[0], state.duals[1])


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
A_TARGET = np.array([0.3, -0.7, 1.1])


def f_of(theta):
    return jnp.sum((theta - A_TARGET) ** 2)


def cons_of(theta):
    """Equality [t0^2 + t1 - 1, t1 t2] and inequality [t0 + t2 - 0.5, -t1] groups."""
    t0, t1, t2 = theta[0], theta[1], theta[2]
    return {"eq": jnp.stack([t0 ** 2 + t1 - 1.0, t1 * t2]),
            "ineq": jnp.stack([t0 + t2 - 0.5, -t1])}


def analytic_grad(theta, duals, rhos, ctol):
    """grad f + J_eq^T (l_eq + rho_eq c~_eq) + J_in^T (l_in + rho_in max(c~_in, 0)), by hand."""
    t0, t1, t2 = theta
    c_eq = np.array([t0 ** 2 + t1 - 1.0, t1 * t2])
    c_in = np.array([t0 + t2 - 0.5, -t1])
    j_eq = np.array([[2 * t0, 1.0, 0.0], [0.0, t2, t1]])
    j_in = np.array([[1.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    ct_eq = np.where(np.abs(c_eq) <= ctol, 0.0, c_eq)
    ct_in = np.maximum(np.where((c_in > 0) & (c_in <= ctol), 0.0, c_in), 0.0)
    w_eq = np.asarray(duals["eq"]) + rhos["eq"] * ct_eq
    w_in = np.asarray(duals["ineq"]) + rhos["ineq"] * ct_in
    return 2 * (np.asarray(theta) - A_TARGET) + j_eq.T @ w_eq + j_in.T @ w_in


# theta: c_eq = [0.2025 + 0.04 - 1, 0.04 * 0.37] = [-0.7575, 0.0148] (the 2nd within ctol 0.05),
# c_in = [0.45 + 0.37 - 0.5, -0.04] = [0.32, -0.04] (violated, satisfied)
THETA = np.array([0.45, 0.04, 0.37])


@pytest.mark.parametrize("penalty", [None, 0.6])
@pytest.mark.parametrize("ctol", [0.0, 0.05])
def test_grad_of_lagrangian_is_the_analytic_gradient(x64, penalty, ctol):
    t = ialm(beta={"eq": 0.9, "ineq": 1.5}, sigma=1.4, gamma=3.0, penalty=penalty, ctol=ctol,
             is_ineq={"eq": False, "ineq": True}, dual_range=(-10.0, 10.0),
             init_duals={"eq": np.array([0.2, -0.3]), "ineq": np.array([0.0, 0.25])})
    theta = jnp.asarray(THETA)
    state = t.init(cons_of(theta))
    state = t.update(cons_of(theta + 0.1), state)  # move duals and beta off their initial values

    def rhos_of(st):
        return {k: (float(st.beta[k]) if penalty is None else penalty) for k in ("eq", "ineq")}

    got = jax.grad(lambda th: t.lagrangian(f_of(th), cons_of(th), state))(theta)
    np.testing.assert_allclose(got, analytic_grad(THETA, state.duals, rhos_of(state), ctol),
                               rtol=1e-13, atol=1e-14)

    # forward_update: the new multipliers, the pre-growth beta
    (value, new_state), grad_fu = jax.value_and_grad(
        lambda th: t.forward_update(f_of(th), cons_of(th), state), has_aux=True)(theta)
    np.testing.assert_allclose(grad_fu, analytic_grad(THETA, new_state.duals, rhos_of(state), ctol),
                               rtol=1e-13, atol=1e-14)
    assert not np.allclose(new_state.duals["ineq"], state.duals["ineq"])
    np.testing.assert_allclose(
        value, t.lagrangian(f_of(theta), cons_of(theta), state._replace(duals=new_state.duals)),
        rtol=1e-15)

    # the state is a constant of the Lagrangian
    grad_state = jax.grad(lambda st: t.lagrangian(f_of(theta), cons_of(theta), st),
                          allow_int=True)(state)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_state.duals))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_state.beta))


def test_ctol_filter_changes_the_gradient_where_expected(x64):
    """The analytic reference itself distinguishes ctol (so the test above could fail)."""
    duals = {"eq": np.array([0.2, -0.3]), "ineq": np.array([0.0, 0.25])}
    rhos = {"eq": 1.0, "ineq": 1.0}
    diff = analytic_grad(THETA, duals, rhos, 0.0) - analytic_grad(THETA, duals, rhos, 0.05)
    # only c_eq[1] = 0.0148 is filtered: its weight changes by rho * 0.0148 along J_eq[1]
    np.testing.assert_allclose(diff, 0.0148 * np.array([0.0, THETA[2], THETA[1]]), rtol=1e-12)


def test_zero_direction_gives_zero_step_and_finite_gradients(x64):
    t = ialm(beta=2.0, sigma=1.5, gamma=1.0, penalty=None, momentum=[0.0, 0.9],
             init_duals=[np.array([0.3, -0.1]), np.array([0.2, 0.4, 0.5])])
    zeros = [jnp.zeros(2), jnp.zeros(3)]
    state = t.init(zeros)
    new = t.update(zeros, state)
    for k in range(2):
        assert float(new.stepsize[k]) == 0.0
        np.testing.assert_array_equal(new.duals[k], state.duals[k])
        np.testing.assert_array_equal(new.momentum_buffer[k], 0.0)
    assert [float(b) for b in new.beta] == [3.0, 3.0]  # beta still grows

    # d(new duals)/dc at c = 0: lambda + s(c) c with s(0) = 0 and c = 0 gives exactly 0
    def total_duals(c):
        return sum(jnp.sum(d) for d in t.update(c, state).duals)

    grads = jax.grad(total_duals)(zeros)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, 0.0)

    # the Lagrangian's primal gradient through forward_update at a point where c(x) = 0:
    # grad = grad f + J^T lambda = 2 (x - a) + lambda (J = I)
    a = np.array([1.0, 2.0])
    grad_x = jax.grad(lambda x: t.forward_update(jnp.sum((x - a) ** 2),
                                                 [x - 0.5, jnp.zeros(3)], state)[0])(
        jnp.full(2, 0.5))
    np.testing.assert_allclose(grad_x, 2 * (0.5 - a) + np.array([0.3, -0.1]), rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# End to end: the Euclidean projection onto the probability simplex
# ----------------------------------------------------------------------------------------------
def project_onto_simplex(a):
    """Closed form (Held, Wolfe & Crowder; Duchi et al. 2008): x = max(a - tau, 0)."""
    u = np.sort(a)[::-1]
    cumulative = np.cumsum(u) - 1.0
    rho = np.nonzero(u - cumulative / np.arange(1, a.size + 1) > 0)[0][-1]
    tau = cumulative[rho] / (rho + 1)
    return np.maximum(a - tau, 0.0), tau


def test_solves_the_projection_onto_the_simplex(x64):
    r"""min ||x - a||^2 s.t. sum(x) = 1, -x <= 0, by optax.sgd on L and ialm dual updates.

    a = (0.9, 0.4, -0.3, 0.2, 1.3): sorted (1.3, 0.9, 0.4, ...), tau = (1.3 + 0.9 - 1)/2 = 0.6,
    x* = (0.3, 0, 0, 0, 0.7). KKT of L = ||x-a||^2 + lam (1^T x - 1) - mu^T x:
    lam* = 2 tau = 1.2, mu*_i = lam* - 2 a_i on x*_i = 0: (0, 0.4, 1.8, 0.8, 0).

    Tolerance: with penalty=None, gamma large, step = beta = rho, this is the method of
    multipliers; its fixed points are exactly the KKT points and it converges linearly. Each
    outer step runs 60 gradient steps with lr = 1/14 (L is 2-strongly convex and at most
    2 + 6 rho = 14-smooth), contracting the inner error by (1 - 2/14)^60 < 1e-4; the outer
    iteration contracts the error by 0.74 per step (measured). 150 outer steps take the
    initial error 0.3 below float64 rounding (0.3 * 0.74^150 ~ 1e-20; ~1e-16 is reached), so
    1e-9 leaves a wide margin while any wrong sign, clamp or weight leaves an error of order
    0.1 (the unconstrained minimiser a, or clipping a to [0, 1], is >= 0.3 away).
    """
    a = np.array([0.9, 0.4, -0.3, 0.2, 1.3])
    x_star, tau = project_onto_simplex(a)
    np.testing.assert_allclose(x_star, [0.3, 0.0, 0.0, 0.0, 0.7], atol=1e-15)
    lam_star, mu_star = 2 * tau, np.where(x_star > 0, 0.0, 2 * tau - 2 * a)

    dual = ialm(beta=2.0, gamma=100.0, penalty=None, is_ineq={"sum": False, "nonneg": True})
    primal = optax.sgd(1.0 / 14.0)

    def constraints(x):
        return {"sum": jnp.sum(x, keepdims=True) - 1.0, "nonneg": -x}

    def loss(x):
        return jnp.sum((x - a) ** 2)

    def outer(carry, _):
        x, opt_state, dual_state = carry

        def inner(_, inner_carry):
            x, opt_state = inner_carry
            grad = jax.grad(lambda x: dual.lagrangian(loss(x), constraints(x), dual_state))(x)
            updates, opt_state = primal.update(grad, opt_state)
            return optax.apply_updates(x, updates), opt_state

        x, opt_state = jax.lax.fori_loop(0, 60, inner, (x, opt_state))
        dual_state = dual.update(constraints(x), dual_state)
        return (x, opt_state, dual_state), None

    x0 = jnp.full(5, 0.2)
    carry = (x0, primal.init(x0), dual.init(constraints(x0)))
    (x, _, dual_state), _ = jax.jit(lambda c: jax.lax.scan(outer, c, None, length=150))(carry)

    np.testing.assert_allclose(x, x_star, atol=1e-9)
    np.testing.assert_allclose(dual_state.duals["sum"], [lam_star], atol=1e-9)
    np.testing.assert_allclose(dual_state.duals["nonneg"], mu_star, atol=1e-9)
    assert int(dual_state.count) == 150


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
BAD = [
    (dict(beta=-1.0), ValueError, r"Invalid beta value: -1\.0"),
    (dict(beta="1"), TypeError, r"Invalid beta value: '1'"),
    (dict(beta=float("nan")), ValueError, r"Invalid beta value: nan"),
    (dict(sigma=0.0), ValueError, r"Invalid sigma value: 0\.0"),
    (dict(gamma=float("inf")), ValueError, r"Invalid gamma value: inf"),
    (dict(momentum=1.5), ValueError, r"Invalid momentum value: 1\.5"),
    (dict(dampening=-0.1), ValueError, r"Invalid dampening value: -0\.1"),
    (dict(penalty=-2.0), ValueError, r"Invalid penalty value: -2\.0"),
    (dict(ctol=-1e-3), ValueError, r"Invalid ctol value: -0\.001"),
    (dict(dual_range=(1.0, 0.0)), ValueError, r"Invalid dual_range: \(1\.0, 0\.0\)"),
    (dict(dual_range=(0.0,)), ValueError, r"Invalid dual_range: \(0\.0,\)"),
    (dict(dual_range=5.0), TypeError, r"Invalid dual_range: 5\.0"),
    (dict(dual_range=(-5.0, -1.0), is_ineq=True), ValueError,
     r"Invalid dual_range: \(-5\.0, -1\.0\)"),
    (dict(is_ineq=1), TypeError, r"Invalid is_ineq: 1"),
    (dict(init_duals="zero"), TypeError, r"Invalid init_duals: 'zero'"),
    (dict(init_duals=True), TypeError, r"Invalid init_duals: True"),
    (dict(init_duals=np.array([1, 2])), TypeError, r"Invalid init_duals: expected a float array"),
    (dict(init_duals=float("inf")), ValueError, r"Invalid init_duals: inf"),
    (dict(beta=[1.0, -0.5]), ValueError, r"Invalid beta value: -0\.5"),          # one group bad
    (dict(momentum={"a": 0.5, "b": 2.0}), ValueError, r"Invalid momentum value: 2\.0"),
    (dict(dual_range=[(0.0, 1.0), (3.0, 2.0)]), ValueError, r"Invalid dual_range: \(3\.0, 2\.0\)"),
    (dict(is_ineq=[True, "no"]), TypeError, r"Invalid is_ineq: 'no'"),
    (dict(init_duals=[]), ValueError, r"Invalid init_duals: \[\] \(no entry for any group"),
    (dict(init_duals=()), ValueError, r"Invalid init_duals: \(\) \(no entry for any group"),
    (dict(dual_range=np.array([-1.0, 0.0, 1.0])), ValueError, r"Invalid dual_range: array"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ialm(**kwargs)


def test_a_1d_numpy_dual_range_is_the_pair_it_holds():
    """``dual_range=np.array([lo, hi])`` is ``(lo, hi)``: the same clamped multipliers."""
    c = jnp.array([5.0, -5.0, 0.25])
    out = []
    for dual_range in (np.array([-0.5, 0.5]), (-0.5, 0.5)):
        t = ialm(beta=10.0, dual_range=dual_range)
        out.append(np.asarray(t.update(c, t.init(c)).duals))
    np.testing.assert_array_equal(out[0], out[1])
    assert out[1].min() == -0.5 and out[1].max() == 0.5  # the clamp was reached


def test_per_group_combination_checked_at_init():
    t = ialm(is_ineq=[False, True], dual_range=[(-1.0, 1.0), (-3.0, -2.0)])
    with pytest.raises(ValueError, match=r"Invalid dual_range: \(-3\.0, -2\.0\)"):
        t.init([jnp.zeros(2), jnp.zeros(1)])


@pytest.mark.parametrize("spec", [dict(beta=[1.0, 2.0, 3.0]), dict(gamma={"x": 1.0, "z": 1.0}),
                                  dict(init_duals=[np.zeros(2)])])
def test_per_group_value_not_matching_the_constraints(spec):
    t = ialm(**spec)
    name = next(iter(spec))
    with pytest.raises(ValueError, match=rf"Invalid {name}: .* does not match the constraints"):
        t.init({"x": jnp.zeros(2), "y": jnp.zeros(1)})


def test_init_duals_of_the_wrong_size():
    t = ialm(init_duals={"x": np.zeros(3), "y": None})
    with pytest.raises(ValueError, match=r"Invalid init_duals: 3 values for group \['x'\] of 2"):
        t.init({"x": jnp.zeros(2), "y": jnp.zeros(1)})


def test_mismatched_constraints_at_update_and_lagrangian():
    t = ialm()
    state = t.init({"x": jnp.zeros(2), "y": jnp.zeros(1)})
    with pytest.raises(ValueError, match=r"constraints of structure .* do not match the state"):
        t.update({"x": jnp.zeros(2)}, state)
    with pytest.raises(ValueError, match=r"constraints of structure .* do not match the state"):
        t.update([jnp.zeros(2), jnp.zeros(1)], state)
    with pytest.raises(ValueError, match=r"group \['y'\] has 1 multipliers but got 3"):
        t.update({"x": jnp.zeros(2), "y": jnp.zeros(3)}, state)
    with pytest.raises(ValueError, match=r"do not match the state"):
        t.lagrangian(0.0, jnp.zeros(3), state)
    with pytest.raises(ValueError, match=r"group \['x'\] has 2 multipliers but got 4"):
        jax.jit(t.forward_update)(0.0, {"x": jnp.zeros(4), "y": jnp.zeros(1)}, state)


# ----------------------------------------------------------------------------------------------
# Forms of input, rule sharing, docstrings
# ----------------------------------------------------------------------------------------------
def test_input_forms_and_dtypes(x64):
    # one array = one group; its init_duals an array; integer constraints give float duals
    t = ialm(init_duals=np.array([0.5, -0.5]), dual_range=(None, None), gamma=10.0)
    state = t.init(jnp.array([1, -3], dtype=jnp.int32))
    assert state.duals.dtype == jnp.float64 and state.beta.shape == ()
    state = t.update(jnp.array([1, -3], dtype=jnp.int32), state)
    # ||c|| = sqrt(10) > 0, step = min(1, 10 / sqrt(10)) = 1: duals = init + c
    np.testing.assert_allclose(state.duals, [1.5, -3.5], rtol=1e-15)

    # a tuple of groups, one a 0-d leaf; per-group values as a list (leaf order)
    t = ialm(beta=[1.0, 0.25], is_ineq=[False, True], init_duals=[None, 2.0])
    cons = (jnp.array([3.0, 4.0]), jnp.asarray(-1.0))
    state = t.init(cons)
    assert state.duals[1].shape == () and float(state.duals[1]) == 2.0
    state = t.update(cons, state)
    # group 0: step min(1, 1/5) = 0.2, duals 0.2 * (3, 4); group 1: step min(0.25, 1/1),
    # duals 2 - 0.25 = 1.75 (ineq lower bound 0 not reached)
    np.testing.assert_allclose(state.duals[0], [0.6, 0.8], rtol=1e-15)
    assert float(state.duals[1]) == 1.75 and float(state.stepsize[0]) == pytest.approx(0.2)
    # float32 constraints keep float32 duals and beta even with x64 on
    state32 = t.init((jnp.zeros(2, jnp.float32), jnp.zeros((), jnp.float32)))
    assert {leaf.dtype for leaf in jax.tree.leaves(state32[:4])} == {jnp.dtype(jnp.float32)}


def test_the_dual_step_traces_the_shared_rules():
    _ialm = importlib.import_module("uniopt.adapters.jax.ialm")  # the attribute is the function
    from uniopt.rules import ialm as rules

    for name in ("equality_filter", "inequality_filter", "momentum_direction", "dual_stepsize",
                 "dual_update", "penalty_violation"):
        assert getattr(_ialm._rules, name).__code__ is getattr(rules, name).__code__, name
    assert _ialm._rules.where is jnp.where and _ialm._rules.minimum is jnp.minimum
    assert _ialm._rules.dual_stepsize.__globals__["sqrt"] is jnp.sqrt


def test_docstring_example_runs():
    import doctest

    _ialm = importlib.import_module("uniopt.adapters.jax.ialm")  # the attribute is the function

    result = doctest.testmod(_ialm, raise_on_error=False, report=True)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("idiom", ["forward_update", "forward+update"])
def test_float64_parity_with_the_torch_ialm(x64, idiom):
    """The same four groups through uniopt's torch iALM and through ialm: duals, buffers and
    Lagrangian values agree to 1e-12 (float64) over STEPS steps, in both idioms."""
    import torch
    from uniopt.adapters.torch import iALM as TorchIALM

    def init(k):
        v = INIT[k]
        return torch.tensor(v) if isinstance(v, np.ndarray) else v

    first, *rest = NAMES
    ours = TorchIALM(int(np.prod(SHAPES[first])), penalty=None, ctol=CTOL,
                     init_duals=init(first), **GROUPS[first])
    for k in rest:
        ours.add_constraint_group(int(np.prod(SHAPES[k])), init_duals=init(k), name=k,
                                  **GROUPS[k])
    dual = ialm(penalty=None, ctol=CTOL, init_duals=[INIT[k] for k in NAMES],
                **{h: [GROUPS[k][h] for k in NAMES] for h in GROUPS[first]})
    state = dual.init({k: jnp.asarray(C_SEQ[0][k]) for k in NAMES})
    for c, loss in zip(C_SEQ, LOSS_SEQ):
        flat = torch.tensor(np.concatenate([c[k].ravel() for k in NAMES]))
        cj = {k: jnp.asarray(c[k]) for k in NAMES}
        if idiom == "forward_update":
            got = ours.forward_update(torch.tensor(float(loss), dtype=torch.float64), flat)
            want, state = dual.forward_update(loss, cj, state)
        else:
            got = ours.forward(torch.tensor(float(loss), dtype=torch.float64), flat)
            want = dual.lagrangian(loss, cj, state)
            ours.update(flat)
            state = dual.update(cj, state)
        assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(
            ours.duals.numpy(), np.concatenate([np.ravel(state.duals[k]) for k in NAMES]),
            rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(
            np.concatenate([g["momentum_buffer"].numpy() for g in ours.param_groups]),
            np.concatenate([np.ravel(state.momentum_buffer[k]) for k in NAMES]),
            rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Huge, tiny and non-finite constraint values (issue 8)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", EXTREME64)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_huge_and_tiny_float64_constraints_give_the_closed_form(x64, case, momentum):
    c, gamma = EXTREME64[case]
    t = ialm(beta=1.0, gamma=gamma, momentum=momentum, dual_range=(None, None))
    state = t.init(jnp.zeros(len(c)))
    for update in (t.update, jax.jit(t.update)):
        new = update(jnp.asarray(c), state)
        assert new.duals.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(new.duals), closed_form_step(c, 1.0, gamma),
                                   rtol=1e-14, atol=0)
        assert bool(new.last_finite) and int(new.notfinite_count) == 0
    # the same number as uniopt.iALM (the CPU kernel)
    opt = uniopt.iALM(m=len(c), beta=1.0, gamma=gamma, momentum=momentum, dual_range=(None, None))
    opt.update(np.array(c))
    np.testing.assert_allclose(np.asarray(new.duals), opt.duals, rtol=1e-15, atol=0)
    assert float(new.stepsize) == pytest.approx(opt.last_step[0]["stepsize"], rel=1e-15)


def test_huge_and_tiny_float32_constraints_stay_finite():
    c = [3e38, 1e-40, -2e38]  # float32: the plain sum of squares would overflow
    t = ialm(dual_range=(None, None))
    new = jax.jit(t.update)(jnp.asarray(c, jnp.float32), t.init(jnp.zeros(3, jnp.float32)))
    expected = closed_form_step(np.array(c, np.float32).astype(np.float64), 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(new.duals), expected.astype(np.float32), rtol=1e-6)


def test_huge_constraints_keep_finite_gradients_and_vmap(x64):
    t = ialm(beta=1.0, gamma=1.0, dual_range=(None, None))
    state = t.init(jnp.zeros(2))

    def first_dual(c):
        return t.update(c, state).duals[0]

    c = jnp.array([1e200, 1e200])
    # lambda_0 = gamma c_0 / ||c||: d/dc_0 = gamma (||c||^2 - c_0^2) / ||c||^3 and
    # d/dc_1 = -gamma c_0 c_1 / ||c||^3; at c = (a, a): +-gamma / (2 sqrt(2) a)
    g = jax.grad(first_dual)(c)
    expected = 1.0 / (2.0 * math.sqrt(2.0) * 1e200)
    np.testing.assert_allclose(np.asarray(g), [expected, -expected], rtol=1e-12)
    batch = jnp.array([[1e200, 1e200], [3.0, 4.0], [1e-200, 1e-200]])
    out = jax.vmap(lambda cc: t.update(cc, state))(batch)
    for k in range(3):
        np.testing.assert_allclose(np.asarray(out.duals[k]),
                                   closed_form_step(np.asarray(batch[k]).tolist(), 1.0, 1.0),
                                   rtol=1e-14)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_constraints_skip_the_whole_step_and_are_counted(x64, bad, jit):
    t = ialm(beta=1.0, sigma=2.0, momentum=[0.0, 0.5], is_ineq=[False, True])
    update = jax.jit(t.update) if jit else t.update
    good = {"a": jnp.array([0.5, -1.0]), "b": jnp.array([2.0, 0.25, 3.0])}
    state = update(good, t.init(good))
    state = update(jax.tree.map(lambda x: 2 * x, good), state)
    bad_c = {"a": good["a"], "b": good["b"].at[1].set(bad)}  # one value, in one group
    skipped = update(bad_c, state)
    for field in ("duals", "momentum_buffer", "beta", "stepsize", "count"):
        for old, new in zip(jax.tree.leaves(getattr(state, field)),
                            jax.tree.leaves(getattr(skipped, field))):
            assert np.asarray(old).tobytes() == np.asarray(new).tobytes(), field  # bitwise
    assert not bool(skipped.last_finite)
    assert int(skipped.notfinite_count) == 1 and int(skipped.total_notfinite) == 1
    again = update(bad_c, skipped)
    assert int(again.notfinite_count) == 2 and int(again.total_notfinite) == 2
    resumed = update(good, again)
    assert bool(resumed.last_finite) and int(resumed.notfinite_count) == 0
    assert int(resumed.total_notfinite) == 2 and int(resumed.count) == int(state.count) + 1
    np.testing.assert_array_equal(np.asarray(resumed.duals["b"]),
                                  np.asarray(update(good, state).duals["b"]))
    # the NumPy face raises instead, naming the group, and changes nothing
    opt = uniopt.iALM(m=2, beta=1.0, sigma=2.0)
    opt.add_constraint_group(3, momentum=0.5, is_ineq=True, name="b")
    with pytest.raises(ValueError, match="group 'b' are not finite"):
        opt.update(np.concatenate([np.asarray(bad_c["a"]), np.asarray(bad_c["b"])]))
    np.testing.assert_array_equal(opt.duals, 0.0)


def test_non_finite_constraints_under_vmap_skip_only_their_problem(x64):
    t = ialm(beta=1.0, momentum=0.5)
    state = t.init(jnp.zeros(2))
    batch = jnp.array([[1.0, 2.0], [jnp.nan, 1.0], [3.0, jnp.inf]])
    out = jax.vmap(lambda cc: t.update(cc, state))(batch)
    assert np.asarray(out.last_finite).tolist() == [True, False, False]
    assert np.asarray(out.notfinite_count).tolist() == [0, 1, 1]
    assert np.asarray(out.count).tolist() == [1, 0, 0]
    np.testing.assert_array_equal(np.asarray(out.duals[1:]), 0.0)
    np.testing.assert_array_equal(np.asarray(out.momentum_buffer[1:]), 0.0)
    single = t.update(batch[0], state)
    np.testing.assert_array_equal(np.asarray(out.duals[0]), np.asarray(single.duals))
