r"""The machinery every jaxopt-style solver of uniopt shares: loops, implicit differentiation.

:class:`IterativeSolver` gives a solver jaxopt's protocol (``run``, ``run_iterator``,
``l2_optimality_error``, ``attribute_names``/``attribute_values``, hashing, ``jit``/``unroll``
modes, differentiation through the unrolled loop and implicit differentiation); a solver only
says what one step is. A subclass is a ``dataclasses.dataclass(eq=False)`` that

* declares its fields in the order its users expect (jaxopt's, for a drop-in), among them the
  solver fields ``maxiter``, ``tol``, ``verbose``, ``implicit_diff``, ``implicit_diff_solve``,
  ``jit`` and ``unroll`` (the base cannot declare them: dataclass fields of a base class come
  first, and a drop-in keeps the reference's positional order);
* defines ``init_state(init_params, *args, **kwargs)`` returning a state with ``iter_num`` and
  ``error`` (``run`` continues while ``state.error > tol``; start it at +inf),
  ``update(params, state, *args, **kwargs)`` returning an :class:`OptStep`, and
  ``optimality_fun(params, *args, **kwargs)``, a pytree shaped like ``params`` that is zero at
  a solution (implicit differentiation solves the linear system of its Jacobian);
* optionally overrides ``_check_fields`` (its own checks, then ``super()._check_fields()``)
  and ``_prepare`` (set-up after the checks, before ``update`` is jitted).

Functions of the objective (``fun`` with ``value_and_grad`` and ``has_aux``) go through
:func:`make_funs`; the construction-time checks and pytree helpers here are shared too.

Example (plain gradient descent with a fixed step; ``tests/test_jax_solver.py`` has it):

.. code-block:: python

   @dataclasses.dataclass(eq=False)
   class GradientDescent(IterativeSolver):
       fun: Callable
       stepsize: float = 0.1
       maxiter: int = 100
       tol: float = 1e-6
       verbose: bool = False
       implicit_diff: bool = True
       implicit_diff_solve: Optional[Callable] = None
       jit: bool = True
       unroll: Union[str, bool] = "auto"

       def init_state(self, params, *args, **kwargs):
           return State(iter_num=jnp.asarray(0), error=jnp.asarray(jnp.inf))

       def optimality_fun(self, params, *args, **kwargs):
           return jax.grad(self.fun)(params, *args, **kwargs)

       def update(self, params, state, *args, **kwargs):
           grad = self.optimality_fun(params, *args, **kwargs)
           params = jax.tree.map(lambda p, g: p - self.stepsize * g, params, grad)
           return OptStep(params, State(state.iter_num + 1, jnp.sqrt(tree_sq_norm(grad))))
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from uniopt import _validation

__all__ = [
    "OptStep",
    "IterativeSolver",
    "make_funs",
    "check_fun_fields",
    "solve_normal_cg",
    "tree_sq_norm",
    "safe_sqrt",
    "single_dtype",
    "check_axis_name",
    "mean_over",
    "extra",
    "data_parallel",
]


class OptStep(NamedTuple):
    """What ``update`` and ``run`` return (jaxopt's ``OptStep``)."""

    params: Any
    state: Any


# ----------------------------------------------------------------------------------------------
# Construction-time checks
# ----------------------------------------------------------------------------------------------
def traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def host_number(value: Any) -> Any:
    """A Python ``int`` (not a bool) as a Python ``float``; anything else unchanged.

    The JAX faces keep a validated real hyper-parameter given as a Python number as a float:
    JAX parses a Python int argument of a jitted step as int32/int64 and overflows on a larger
    one (``learning_rate=2**64``). Schedules, arrays and traced values are kept as they are.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check(check_fn: Callable, what: str, value: Any) -> Any:
    """``check_fn(what, value)`` unless ``value`` is traced (unknown until run time).

    Returns:
      ``value``, a Python int as a float (:func:`host_number`).
    """
    if not traced(value):
        check_fn(what, value)
    return host_number(value)


def check_bool(what: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Invalid {what}: {value!r} (expected True or False)")


def check_callable(what: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not callable(value):
        raise TypeError(f"Invalid {what}: {value!r} (expected a callable)")


def check_count(what: str, value: Any) -> None:
    """A non-negative integer (``bool`` is refused: ``maxiter=True`` is a mistake)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Invalid {what}: {value!r} (expected a non-negative integer)")
    if value < 0:
        raise ValueError(f"Invalid {what}: {value}")


def is_zero(value: Any) -> bool:
    """``value == 0`` for concrete numbers; False for traced values (they may be non-zero)."""
    if traced(value):
        return False
    return bool(value == 0)


def check_fun_fields(fun: Any, value_and_grad: Any, has_aux: Any) -> bool:
    """Check ``fun``, ``value_and_grad`` and ``has_aux``; return ``value_and_grad`` normalised.

    Returns:
      ``value_and_grad`` as a Python bool, or the callable unchanged.
    """
    check_callable("fun", fun)
    if not isinstance(value_and_grad, (bool, np.bool_)):
        check_callable("value_and_grad value", value_and_grad)
    else:
        value_and_grad = bool(value_and_grad)
    check_bool("has_aux value", has_aux)
    return value_and_grad


def check_axis_name(value: Any) -> Any:
    """``value`` if it is a valid ``axis_name``: None, a str, or a non-empty tuple of str.

    Raises:
      TypeError: anything else (``Invalid axis_name: 3 (expected None, a str or a tuple of
        str)``).
    """
    if value is None or isinstance(value, str):
        return value
    if (isinstance(value, tuple) and value
            and all(isinstance(name, str) for name in value)):
        return value
    raise TypeError(f"Invalid axis_name: {value!r} (expected None, a str or a tuple of str)")


def mean_over(tree: Any, axis_name: Any) -> Any:
    """Every leaf of ``tree`` averaged over the devices of ``axis_name`` (None: ``tree``).

    ``jax.lax.pmean``, for values measured on each device's share of a batch (a loss,
    constraint values, a gradient) under ``shard_map``/``pmap`` data parallelism. Its
    derivative is JAX's: averaging the values inside the function that is differentiated and
    the gradients after it gives the full-batch gradient whether or not ``shard_map`` checks
    replication (``check_vma``); the solvers here do both.
    """
    if axis_name is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), tree)


# ----------------------------------------------------------------------------------------------
# Pytree helpers
# ----------------------------------------------------------------------------------------------
def single_dtype(tree: Any, who: str = "the solver"):
    """The one dtype shared by every array leaf of ``tree`` (None for a tree without leaves).

    Raises:
      ValueError: leaves of several dtypes (``who`` names the solver in the message).
    """
    dtypes = {jnp.asarray(leaf).dtype for leaf in jax.tree.leaves(tree)
              if isinstance(leaf, (bool, int, float, complex, np.ndarray, np.generic, jax.Array))}
    if not dtypes:
        return None
    if len(dtypes) > 1:
        found = sorted(map(str, dtypes))
        raise ValueError(f"{who}: every parameter leaf must have the same dtype, got {found}")
    return dtypes.pop()


def _leaf_sq_norm(leaf):
    if jnp.iscomplexobj(leaf):
        return jnp.sum(jnp.square(leaf.real) + jnp.square(leaf.imag))
    return jnp.sum(jnp.square(leaf))


def tree_sq_norm(tree: Any):
    """``sum_i ||leaf_i||^2``: per-leaf sums added in tree order (jaxopt's and optax's order)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(0.0)
    return functools.reduce(operator.add, [_leaf_sq_norm(leaf) for leaf in leaves])


def safe_sqrt(x):
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0, not inf (so no 0 * inf = NaN)."""
    positive = x > 0
    root = jnp.sqrt(jnp.where(positive, x, jnp.ones_like(x)))
    return jnp.where(positive, root, jnp.zeros_like(x))


def _tree_neg(tree: Any):
    return jax.tree.map(operator.neg, tree)


def solve_normal_cg(matvec: Callable, b: Any) -> Any:
    """Solve ``A x = b`` by conjugate gradient on the normal equations ``A^T A x = A^T b``.

    ``matvec(x) = A x`` must be linear; ``A^T`` comes from :func:`jax.linear_transpose`.
    This is the default ``implicit_diff_solve`` (as jaxopt's ``solve_normal_cg``): it works
    whether or not ``A`` is symmetric positive definite.
    """
    transpose = jax.linear_transpose(matvec, b)

    def rmatvec(y):
        return transpose(y)[0]

    def normal_matvec(x):
        return rmatvec(matvec(x))

    return jax.scipy.sparse.linalg.cg(normal_matvec, rmatvec(b))[0]


# ----------------------------------------------------------------------------------------------
# The four signatures of ``fun`` -> one ``value_and_grad(params, ...) -> ((value, aux), grad)``
# ----------------------------------------------------------------------------------------------
def make_funs(fun: Callable, value_and_grad: Union[bool, Callable], has_aux: bool):
    """Return ``(fun_with_aux, value_and_grad_with_aux)``; aux is None without ``has_aux``.

    =================  =======  ============================================================
    value_and_grad     has_aux  what ``fun`` (and the callable) return
    =================  =======  ============================================================
    False              False    ``value``
    False              True     ``(value, aux)``
    True               False    ``(value, grad)``
    True               True     ``((value, aux), grad)``
    a callable         False    ``fun``: value; the callable: ``(value, grad)``
    a callable         True     ``fun``: ``(value, aux)``; the callable: ``((value, aux), grad)``
    =================  =======  ============================================================
    """
    if value_and_grad is True:
        if has_aux:
            vg = fun
        else:
            def vg(*a, **kw):
                value, grad = fun(*a, **kw)
                return (value, None), grad

        def f(*a, **kw):
            return vg(*a, **kw)[0]

        return f, vg

    if value_and_grad is False:
        if has_aux:
            f = fun
        else:
            def f(*a, **kw):
                return fun(*a, **kw), None
        return f, jax.value_and_grad(f, has_aux=True)

    # a user-supplied value_and_grad callable next to a value-only ``fun``
    if has_aux:
        return fun, value_and_grad

    def f(*a, **kw):
        return fun(*a, **kw), None

    def vg(*a, **kw):
        value, grad = value_and_grad(*a, **kw)
        return (value, None), grad

    return f, vg


_EXTRA = "uniopt_extra"


def extra(default: Any = None) -> Any:
    """A keyword-only dataclass field of a solver that its reference does not have (e.g.
    ``axis_name``): it comes after the reference's fields and stays out of
    :meth:`IterativeSolver.attribute_names`, so a drop-in keeps the reference's protocol."""
    return dataclasses.field(default=default, kw_only=True, metadata={_EXTRA: True})


def data_parallel(fun: Callable, value_and_grad_fun: Callable, differentiate: bool,
                  axis_name: Any) -> Callable:
    """``value_and_grad_fun`` over batch shards: the value and gradient of the whole batch.

    Args:
      fun, value_and_grad_fun: the pair of :func:`make_funs`.
      differentiate: whether JAX differentiates ``fun`` (``value_and_grad=False``): then the
        value is averaged over ``axis_name`` inside the differentiated function and the
        gradient after it (right with and without ``shard_map``'s ``check_vma``); else the
        user's value and gradient are both averaged (the gradient should be that of the
        averaged value, or the device's own: averaging an average changes nothing).
      axis_name: the mapped axis (None: ``value_and_grad_fun`` itself).

    Returns:
      ``value_and_grad(params, ...) -> ((value, aux), grad)``; ``aux`` stays per device.
    """
    if axis_name is None:
        return value_and_grad_fun
    if differentiate:
        def averaged(*a, **kw):
            value, aux = fun(*a, **kw)
            return mean_over(value, axis_name), aux

        inner = jax.value_and_grad(averaged, has_aux=True)

        def vg(*a, **kw):
            (value, aux), grad = inner(*a, **kw)
            return (value, aux), mean_over(grad, axis_name)

        return vg

    def vg(*a, **kw):
        (value, aux), grad = value_and_grad_fun(*a, **kw)
        return (mean_over(value, axis_name), aux), mean_over(grad, axis_name)

    return vg


# ----------------------------------------------------------------------------------------------
# The base class
# ----------------------------------------------------------------------------------------------
class IterativeSolver:
    """jaxopt's iterative-solver protocol on top of a subclass's ``init_state``/``update``.

    See the module docstring for what a subclass supplies. The solver fields it must declare:

    Attributes:
      maxiter: maximum number of updates in ``run`` and ``run_iterator`` (>= 0).
      tol: ``run`` stops once ``state.error <= tol`` (>= 0).
      verbose: a bool or an int (the subclass's ``update`` decides what to print).
      implicit_diff: differentiate ``run`` by the implicit function theorem on
        ``optimality_fun(x*, theta) = 0`` instead of through the iterations.
      implicit_diff_solve: ``x = solve(matvec, b)`` for the linear system of implicit
        differentiation; None: conjugate gradient on the normal equations.
      jit: compile ``update`` and the loop of ``run``.
      unroll: ``"auto"`` (= ``not implicit_diff or not jit``), True (a ``lax.scan`` of
        ``maxiter - 1`` steps, no-ops once converged: reverse-differentiable; a Python loop
        when ``jit=False``) or False (``lax.while_loop``: exits early, needs ``jit=True``).
    """

    # -- construction (called by the dataclass __init__ of the subclass) ----------------------
    def __post_init__(self):
        self._check_fields()
        self._prepare()
        if self.jit:
            self.update = jax.jit(self.update)

    def _check_fields(self) -> None:
        """Check the solver fields (subclasses check theirs, then call this)."""
        check_count("maxiter value", self.maxiter)
        self.tol = check(_validation.nonnegative, "tol value", self.tol)
        if not isinstance(self.verbose, (bool, int, np.integer)):
            raise TypeError(f"Invalid verbose value: {self.verbose!r} (expected a bool or an int)")
        check_bool("implicit_diff value", self.implicit_diff)
        check_callable("implicit_diff_solve value", self.implicit_diff_solve, optional=True)
        check_bool("jit value", self.jit)
        if isinstance(self.unroll, str):
            if self.unroll != "auto":
                raise ValueError(
                    f"Invalid unroll value: {self.unroll!r} (expected 'auto', True or False)")
        elif not isinstance(self.unroll, (bool, np.bool_)):
            raise TypeError(
                f"Invalid unroll value: {self.unroll!r} (expected 'auto', True or False)")
        if self.unroll is False and not self.jit:
            raise ValueError("unroll=False and jit=False cannot be used together")

    def _prepare(self) -> None:
        """Set-up after the checks and before ``update`` is jitted (nothing by default)."""

    # -- jaxopt's solver protocol -------------------------------------------------------------
    def attribute_names(self) -> tuple:
        """The constructor fields, in order (not the keyword-only extras of :func:`extra`)."""
        return tuple(field.name for field in dataclasses.fields(self)
                     if not field.metadata.get(_EXTRA))

    def attribute_values(self) -> tuple:
        """The values of :meth:`attribute_names`."""
        return tuple(getattr(self, name) for name in self.attribute_names())

    def __hash__(self):
        # The fields determine the solver, so it can be a static argument of jax.jit (equality
        # stays identity, as in jaxopt).
        return hash(tuple(getattr(self, field.name) for field in dataclasses.fields(self)))

    def l2_optimality_error(self, params, *args, **kwargs):
        """The L2 norm of ``optimality_fun`` (over the whole pytree)."""
        return jnp.sqrt(tree_sq_norm(self.optimality_fun(params, *args, **kwargs)))

    # -- loops --------------------------------------------------------------------------------
    def _unroll(self) -> bool:
        if self.unroll == "auto":
            return (not self.implicit_diff) or (not self.jit)
        return bool(self.unroll)

    def _run(self, init_params: Any, *args, **kwargs) -> OptStep:
        state = self.init_state(init_params, *args, **kwargs)
        if self.maxiter == 0:
            return OptStep(params=init_params, state=state)
        # The first update is unconditional (state.error starts at +inf) and fixes the types
        # of the loop carry; at most maxiter - 1 more follow while error > tol.
        step = self.update(init_params, state, *args, **kwargs)
        if self.maxiter == 1:
            return step
        if not self.jit:
            for _ in range(self.maxiter - 1):
                if not bool(_converging(self, step)):
                    break
                step = self.update(step.params, step.state, *args, **kwargs)
            return step
        loop = _scan_loop if self._unroll() else _while_loop
        return loop(_Static(self), step, args, kwargs)

    def run(self, init_params: Any, *args, **kwargs) -> OptStep:
        """Run the solver from ``init_params``.

        One update always happens (for ``maxiter >= 1``); further updates follow while
        ``state.error > tol``, up to ``maxiter`` in all (``maxiter=0`` returns
        ``init_params`` and the initial state). Differentiable with respect to
        ``args``/``kwargs``: through the iterations (``unroll``), or implicitly
        (``implicit_diff=True``; reverse mode only, the initial parameters get a zero
        cotangent).

        Args:
          init_params: pytree of initial parameters.
          *args, **kwargs: passed on to ``init_state`` and ``update`` (and to
            ``optimality_fun`` for implicit differentiation).

        Returns:
          ``OptStep(params, state)``.
        """
        if self.implicit_diff:
            return _implicit_run(_Static(self), init_params, args, kwargs)
        return self._run(init_params, *args, **kwargs)

    def run_iterator(self, init_params: Any, iterator, *args, **kwargs) -> OptStep:
        """Run over mini-batches, passed to ``init_state``/``update`` as the keyword ``data``.

        As in jaxopt, the first batch only initialises the state (``init_state(...,
        data=batch)``); each of the next ``maxiter`` batches (fewer if the iterable runs out)
        gives one update. ``tol`` is not used. Any iterable is accepted (jaxopt needs an
        iterator).

        Raises:
          ValueError: an empty iterable.
        """
        iterator = iter(iterator)
        try:
            data = next(iterator)
        except StopIteration:
            raise ValueError("run_iterator: the iterator yielded no batch") from None
        state = self.init_state(init_params, *args, **kwargs, data=data)
        params = init_params
        for data in itertools.islice(iterator, self.maxiter):
            params, state = self.update(params, state, *args, **kwargs, data=data)
        return OptStep(params=params, state=state)


class _Static:
    """A solver as a static ``jax.jit`` argument, hashed by identity.

    Compiled loops are cached per solver object, and a solver whose fields are not hashable
    (e.g. a ``fun_min`` given as an array) can still run.
    """

    __slots__ = ("solver",)

    def __init__(self, solver):
        self.solver = solver

    def __hash__(self):
        return id(self.solver)

    def __eq__(self, other):
        return isinstance(other, _Static) and other.solver is self.solver


def _converging(solver: IterativeSolver, step: OptStep):
    return step.state.error > solver.tol


@functools.partial(jax.jit, static_argnums=(0,))
def _scan_loop(static: _Static, step: OptStep, args: tuple, kwargs: dict) -> OptStep:
    """``maxiter - 1`` scan steps, each a no-op ``lax.cond`` branch once converged."""
    solver = static.solver

    def advance(s):
        return solver.update(s.params, s.state, *args, **kwargs)

    def body(carry, _):
        s, go_on = carry
        s = jax.lax.cond(go_on, advance, lambda s: s, s)
        return (s, _converging(solver, s)), None

    (step, _), _ = jax.lax.scan(body, (step, _converging(solver, step)), None,
                                length=solver.maxiter - 1)
    return step


@functools.partial(jax.jit, static_argnums=(0,))
def _while_loop(static: _Static, step: OptStep, args: tuple, kwargs: dict) -> OptStep:
    """``lax.while_loop`` with early exit (not reverse-differentiable)."""
    solver = static.solver

    def cond(carry):
        count, s = carry
        return jnp.logical_and(_converging(solver, s), count < solver.maxiter - 1)

    def body(carry):
        count, s = carry
        return count + 1, solver.update(s.params, s.state, *args, **kwargs)

    return jax.lax.while_loop(cond, body, (0, step))[1]


# ----------------------------------------------------------------------------------------------
# Implicit differentiation
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _implicit_run(static: _Static, init_params, args: tuple, kwargs: dict) -> OptStep:
    return static.solver._run(init_params, *args, **kwargs)


def _implicit_run_fwd(static, init_params, args, kwargs):
    step = static.solver._run(init_params, *args, **kwargs)
    return step, (step.params, args, kwargs)


def _implicit_run_bwd(static, residuals, cotangent):
    sol, args, kwargs = residuals
    d_args, d_kwargs = _implicit_vjp(static, sol, args, kwargs, cotangent.params)
    return None, d_args, d_kwargs


@functools.partial(jax.jit, static_argnums=(0,))
def _implicit_vjp(static: _Static, sol, args: tuple, kwargs: dict, cotangent):
    """Implicit function theorem on ``F(x, theta) = optimality_fun(x, theta) = 0`` at ``x*``.

    ``dx*/dtheta = -(dF/dx)^{-1} dF/dtheta``, so the VJP of a cotangent ``c`` is
    ``(dF/dtheta)^T u`` with ``(dF/dx)^T u = -c``. Compiled once per solver and shapes.
    """
    solver = static.solver
    solve = solver.implicit_diff_solve or solve_normal_cg

    def in_params(x):
        return solver.optimality_fun(x, *args, **kwargs)

    _, vjp_params = jax.vjp(in_params, sol)
    u = solve(lambda w: vjp_params(w)[0], _tree_neg(cotangent))

    def in_args(a, kw):
        return solver.optimality_fun(sol, *a, **kw)

    _, vjp_args = jax.vjp(in_args, args, kwargs)
    return vjp_args(u)


_implicit_run.defvjp(_implicit_run_fwd, _implicit_run_bwd)
