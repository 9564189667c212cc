"""The shared JAX solver machinery (``uniopt.adapters.jax._solver``) on a second, tiny solver.

``GradientDescent`` below is plain gradient descent with a fixed step written as an
:class:`IterativeSolver` subclass: it supplies only ``init_state``, ``update`` and
``optimality_fun``; ``run`` (every loop mode), ``run_iterator``, validation, hashing and
implicit differentiation come from the base. The oracles are ridge regression's closed forms:
``x*(lam) = (A^T A + lam I)^{-1} A^T b``, ``dx*/dlam = -(A^T A + lam I)^{-1} x*`` and
``dx*/db = (A^T A + lam I)^{-1} A^T``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import pytest

import jax
import jax.numpy as jnp  # noqa: E402

from uniopt.adapters.jax import OptStep as PublicOptStep  # noqa: E402
from uniopt.adapters.jax import PolyakSGD  # noqa: E402
from uniopt.adapters.jax._solver import (  # noqa: E402
    IterativeSolver,
    OptStep,
    solve_normal_cg,
    tree_sq_norm,
)


class GDState(NamedTuple):
    iter_num: Any
    error: Any


@dataclasses.dataclass(eq=False)
class GradientDescent(IterativeSolver):
    """``x <- x - stepsize * grad f(x)``: the whole solver, on top of the shared machinery."""

    fun: Callable
    stepsize: float = 0.1
    maxiter: int = 500
    tol: float = 1e-6
    verbose: bool = False
    implicit_diff: bool = True
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    unroll: Union[str, bool] = "auto"

    def init_state(self, init_params, *args, **kwargs):
        dtype = jax.tree.leaves(init_params)[0].dtype
        return GDState(iter_num=jnp.asarray(0), error=jnp.asarray(jnp.inf, dtype=dtype))

    def optimality_fun(self, params, *args, **kwargs):
        return jax.grad(self.fun)(params, *args, **kwargs)

    def update(self, params, state, *args, **kwargs):
        grad = self.optimality_fun(params, *args, **kwargs)
        new = jax.tree.map(lambda p, g: p - self.stepsize * g, params, grad)
        return OptStep(new, GDState(state.iter_num + 1, jnp.sqrt(tree_sq_norm(grad))))


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def ridge(x, lam, A, b):
    return 0.5 * jnp.sum((A @ x - b) ** 2) + 0.5 * lam * jnp.sum(x ** 2)


def _problem(seed=0, n=7, d=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(n)


def _closed_form(lam, A, b):
    H = A.T @ A + lam * np.eye(A.shape[1])
    x = np.linalg.solve(H, A.T @ b)
    return x, -np.linalg.solve(H, x), np.linalg.solve(H, A.T)


def _stepsize(lam, A):
    return 1.0 / (np.linalg.norm(A, 2) ** 2 + lam)


LAM = 0.7
MODES = [dict(jit=True, unroll=True), dict(jit=True, unroll=False), dict(jit=False, unroll=True),
         dict(jit=True, unroll="auto"), dict(jit=False, unroll="auto")]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"jit={m['jit']}-unroll={m['unroll']}")
def test_run_reaches_the_ridge_solution_in_every_loop_mode(mode):
    A, b = _problem()
    x_star, _, _ = _closed_form(LAM, A, b)
    solver = GradientDescent(ridge, stepsize=_stepsize(LAM, A), maxiter=3000, tol=1e-10,
                             implicit_diff=False, **mode)
    params, state = solver.run(jnp.zeros(3), LAM, A, b)
    np.testing.assert_allclose(np.asarray(params), x_star, rtol=1e-9, atol=1e-10)
    # it stopped on tol, before maxiter: the loop's early exit (or its no-op steps) worked
    assert float(state.error) <= 1e-10
    assert 1 < int(state.iter_num) < 3000
    # one more step from the previous point would be the returned one: the error is the
    # gradient norm at the point the last step started from, as in jaxopt
    assert float(solver.l2_optimality_error(params, LAM, A, b)) <= 1e-10


def test_loop_modes_agree_and_stop_at_the_same_iteration():
    A, b = _problem(1)
    results = []
    for mode in MODES:
        solver = GradientDescent(ridge, stepsize=_stepsize(LAM, A), maxiter=400, tol=1e-8,
                                 implicit_diff=False, **mode)
        results.append(solver.run(jnp.ones(3), LAM, A, b))
    iters = {int(r.state.iter_num) for r in results}
    assert len(iters) == 1
    for r in results[1:]:
        np.testing.assert_allclose(np.asarray(r.params), np.asarray(results[0].params),
                                   rtol=1e-13, atol=1e-15)


def test_run_counts_match_a_naive_loop():
    """maxiter=0: the initial point; maxiter=k (tol=0): exactly k naive GD steps."""
    A, b = _problem(2)
    eta = _stepsize(LAM, A)
    x0 = np.array([1.0, -2.0, 0.5])
    solver0 = GradientDescent(ridge, stepsize=eta, maxiter=0)
    params, state = solver0.run(jnp.asarray(x0), LAM, A, b)
    np.testing.assert_array_equal(np.asarray(params), x0)
    assert int(state.iter_num) == 0 and np.isinf(float(state.error))
    for maxiter in (1, 5):
        for mode in MODES:
            solver = GradientDescent(ridge, stepsize=eta, maxiter=maxiter, tol=0.0,
                                     implicit_diff=False, **mode)
            params, state = solver.run(jnp.asarray(x0), LAM, A, b)
            x = x0.copy()
            for _ in range(maxiter):
                x = x - eta * (A.T @ (A @ x - b) + LAM * x)
            np.testing.assert_allclose(np.asarray(params), x, rtol=1e-13, atol=1e-15)
            assert int(state.iter_num) == maxiter


def test_run_iterator_uses_the_first_batch_for_init_and_the_next_maxiter_for_updates():
    A, b = _problem(3, n=12)
    batches = [(A[i:i + 4], b[i:i + 4]) for i in (0, 4, 8, 0, 4, 8)]

    def fun(x, lam, data):
        A_i, b_i = data
        return ridge(x, lam, A_i, b_i)

    eta = 0.05
    seen = []

    def iterator():
        for batch in batches:
            seen.append(batch)
            yield batch

    solver = GradientDescent(fun, stepsize=eta, maxiter=3)
    params, state = solver.run_iterator(jnp.zeros(3), iterator(), LAM)
    x = np.zeros(3)
    for A_i, b_i in batches[1:4]:
        x = x - eta * (A_i.T @ (A_i @ x - b_i) + LAM * x)
    np.testing.assert_allclose(np.asarray(params), x, rtol=1e-13, atol=1e-15)
    assert int(state.iter_num) == 3
    assert len(seen) == 4  # the iterator is not consumed beyond maxiter + 1 batches
    # any iterable works; an empty one is an error
    params_list, _ = solver.run_iterator(jnp.zeros(3), batches, LAM)
    np.testing.assert_allclose(np.asarray(params_list), x, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="no batch"):
        solver.run_iterator(jnp.zeros(3), [], LAM)


@pytest.mark.parametrize("jit", [True, False])
def test_implicit_diff_matches_the_ridge_closed_form(jit):
    A, b = _problem(4)
    x_star, dx_dlam, dx_db = _closed_form(LAM, A, b)
    solver = GradientDescent(ridge, stepsize=_stepsize(LAM, A), maxiter=5000, tol=1e-12,
                             implicit_diff=True, jit=jit)

    def solution(lam, b):
        return solver.run(jnp.zeros(3), lam, A, b).params

    np.testing.assert_allclose(np.asarray(solution(LAM, b)), x_star, rtol=1e-9, atol=1e-11)
    jac_lam, jac_b = jax.jacrev(solution, argnums=(0, 1))(LAM, jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(jac_lam), dx_dlam, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(jac_b), dx_db, rtol=1e-7, atol=1e-9)

    # keyword arguments are differentiated too
    def solution_kw(lam):
        return solver.run(jnp.zeros(3), A=A, b=b, lam=lam).params

    np.testing.assert_allclose(np.asarray(jax.jacrev(solution_kw)(LAM)), dx_dlam,
                               rtol=1e-7, atol=1e-9)


def test_unrolled_differentiation_approaches_the_closed_form():
    A, b = _problem(5)
    _, dx_dlam, _ = _closed_form(LAM, A, b)
    solver = GradientDescent(ridge, stepsize=_stepsize(LAM, A), maxiter=600, tol=0.0,
                             implicit_diff=False, unroll=True)
    jac = jax.jacrev(lambda lam: solver.run(jnp.zeros(3), lam, A, b).params)(LAM)
    np.testing.assert_allclose(np.asarray(jac), dx_dlam, rtol=1e-6, atol=1e-8)


def test_implicit_diff_solve_is_the_one_given():
    A, b = _problem(6)
    _, dx_dlam, _ = _closed_form(LAM, A, b)
    calls = []

    def solve(matvec, rhs):
        calls.append(1)
        return solve_normal_cg(matvec, rhs)

    solver = GradientDescent(ridge, stepsize=_stepsize(LAM, A), maxiter=5000, tol=1e-12,
                             implicit_diff_solve=solve)
    jac = jax.jacrev(lambda lam: solver.run(jnp.zeros(3), lam, A, b).params)(LAM)
    assert calls
    np.testing.assert_allclose(np.asarray(jac), dx_dlam, rtol=1e-7, atol=1e-9)


BAD = [
    (dict(maxiter=-1), ValueError, r"Invalid maxiter value: -1"),
    (dict(maxiter=True), TypeError, r"Invalid maxiter value: True"),
    (dict(tol=-1.0), ValueError, r"Invalid tol value: -1\.0"),
    (dict(verbose="loud"), TypeError, r"Invalid verbose value: 'loud'"),
    (dict(implicit_diff=None), TypeError, r"Invalid implicit_diff value: None"),
    (dict(implicit_diff_solve=3), TypeError, r"Invalid implicit_diff_solve value: 3"),
    (dict(jit="yes"), TypeError, r"Invalid jit value: 'yes'"),
    (dict(unroll="sometimes"), ValueError, r"Invalid unroll value: 'sometimes'"),
    (dict(unroll=False, jit=False), ValueError, r"unroll=False and jit=False"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(k) for k, _, _ in BAD])
def test_the_base_checks_the_solver_fields_of_any_subclass(kwargs, error, message):
    with pytest.raises(error, match=message):
        GradientDescent(ridge, **kwargs)


def test_protocol_and_hashing_come_from_the_base():
    solver = GradientDescent(ridge, stepsize=0.2)
    assert solver.attribute_names() == ("fun", "stepsize", "maxiter", "tol", "verbose",
                                        "implicit_diff", "implicit_diff_solve", "jit", "unroll")
    assert solver.attribute_values()[1] == 0.2
    assert hash(solver) == hash(GradientDescent(ridge, stepsize=0.2))
    assert solver != GradientDescent(ridge, stepsize=0.2)  # equality is identity, as in jaxopt
    # jit=True compiled update; the solver can be a static argument of jax.jit
    A, b = _problem(7)

    @jax.jit
    def solve(b):
        return GradientDescent(ridge, stepsize=_stepsize(LAM, A), maxiter=3000,
                               tol=1e-10).run(jnp.zeros(3), LAM, A, b).params

    np.testing.assert_allclose(np.asarray(solve(jnp.asarray(b))), _closed_form(LAM, A, b)[0],
                               rtol=1e-9, atol=1e-10)


def test_polyak_sgd_is_built_on_the_shared_machinery():
    assert issubclass(PolyakSGD, IterativeSolver)
    assert PublicOptStep is OptStep
    for name in ("run", "run_iterator", "l2_optimality_error", "attribute_names", "__hash__"):
        assert getattr(PolyakSGD, name) is getattr(IterativeSolver, name)
