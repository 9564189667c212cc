r"""Polyak step-size SGD in JAX: a jaxopt-style solver and optax transforms.

* :class:`PolyakSGD` has the public surface of ``jaxopt.PolyakSGD`` (jaxopt 0.8.5): the same
  constructor fields in the same order, ``init_state``/``update``/``run``/``run_iterator``,
  :class:`PolyakSGDState`, :class:`OptStep`, ``jit``/``unroll`` modes, differentiation through
  the unrolled loop and implicit differentiation. jaxopt is not imported.
* :func:`scale_by_polyak` and :func:`polyak_sgd` are optax transforms with ``optax``'s
  signatures (their ``update`` needs ``value=``), plus heavy-ball ``momentum``.

Both trace the rules of :mod:`uniopt.rules.polyak` bound to ``jax.numpy``; the step size is
never computed anywhere else. Deviations from jaxopt and optax are listed in
``docs/deviations.md`` ("Polyak SGD (JAX)").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import _validation
from uniopt.rules import bind
from uniopt.rules import polyak as _polyak

from . import _ffi
from ._faults import all_finite, nonfinite_raise, select, with_nonfinite
from ._solver import (
    IterativeSolver,
    host_number,
    OptStep,
    check,
    check_callable,
    check_axis_name,
    check_fun_fields,
    data_parallel,
    extra,
    is_zero,
    make_funs,
    mean_over,
    safe_sqrt,
    single_dtype,
    tree_sq_norm,
)

__all__ = [
    "OptStep",
    "PolyakSGDState",
    "PolyakSGDSkipState",
    "PolyakSGD",
    "ScaleByPolyakState",
    "scale_by_polyak",
    "polyak_sgd",
]

_rules = bind(_polyak, where=jnp.where, minimum=jnp.minimum, maximum=jnp.maximum)

#: optax's zero guard: no step when ``||g||^2 + eps`` is at most float64's machine epsilon.
_OPTAX_TINY = float(np.finfo(np.float64).eps)

_NUM_EVAL_DTYPE = jnp.int32
_OPTAX_VARIANTS = ("sps", "sps+")


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
class PolyakSGDState(NamedTuple):
    """State of :class:`PolyakSGD` (jaxopt's field order).

    ``error``, ``value``, ``aux`` and ``stepsize`` describe the point *before* the last update
    (the gradient norm, objective value and auxiliary output at the parameters the step was
    taken from), as in jaxopt. ``velocity`` is None when ``momentum == 0``.
    """

    iter_num: Any
    error: Any
    value: Any
    aux: Any
    stepsize: Any
    velocity: Optional[Any]
    num_fun_eval: Any = 0
    num_grad_eval: Any = 0


class PolyakSGDSkipState(NamedTuple):
    """State of :class:`PolyakSGD` with ``nonfinite="skip"``: :class:`PolyakSGDState`'s fields
    and ``nonfinite_skips`` (int32, the updates skipped for a non-finite loss or gradient)."""

    iter_num: Any
    error: Any
    value: Any
    aux: Any
    stepsize: Any
    velocity: Optional[Any]
    num_fun_eval: Any = 0
    num_grad_eval: Any = 0
    nonfinite_skips: Any = 0


@dataclasses.dataclass(eq=False)
class PolyakSGD(IterativeSolver):
    r"""SGD with the (stochastic) Polyak step size: a drop-in for ``jaxopt.PolyakSGD``.

    With :math:`f` the objective, :math:`f^\star` a lower bound of it and
    :math:`s_k = \|\nabla f(x_k)\|^2` (summed over every leaf of the parameter pytree):

    .. math::
       \gamma_k = \begin{cases}
         \min\left(\frac{f(x_k) - f^\star}{s_k + \delta}, \gamma_{\max}\right)
           & \text{``"SPS_max"`` (Loizou et al., 2021)} \\
         \max\left(\frac{f(x_k) - f^\star}{s_k}, 0\right)
           & \text{``"SPS+"`` (Garrigos et al., 2023), 0 if } s_k \le \epsilon_{\text{dtype}}
       \end{cases}
       \qquad v_{k+1} = \mu v_k - \gamma_k \nabla f(x_k), \quad x_{k+1} = x_k + v_{k+1}

    with :math:`f^\star` = ``fun_min``, :math:`\delta` = ``delta``, :math:`\gamma_{\max}` =
    ``max_stepsize`` and :math:`\mu` = ``momentum`` (:math:`\mu = 0`: plain SGD, no velocity).
    Under ``"SPS_max"`` the step is 0 whenever :math:`f(x_k) \le f^\star`; jaxopt instead
    returns NaN at an exact minimiser with ``delta=0`` (0/0) and takes an ascent step when
    :math:`f(x_k) < f^\star`. Everywhere else the trajectories are jaxopt's.

    The method needs a good ``fun_min``: 0 for models that interpolate the data (zero loss is
    reachable); a value above the true minimum stalls it, one far below slows it down.

    Differences from jaxopt (``docs/deviations.md``): arguments are validated here, at
    construction (jaxopt checks nothing; an unknown variant fails when ``update`` is traced,
    ``unroll=False, jit=False`` when ``run`` is called); ``run_iterator`` also accepts an
    iterable; ``implicit_diff=True`` also works with a ``fun`` taking catch-all ``**kwargs``;
    ``run`` with ``maxiter=0`` does not evaluate the discarded first update.

    Attributes:
      fun: ``fun(params, *args, **kwargs)``; what it returns depends on ``value_and_grad``
        and ``has_aux`` (value; ``(value, aux)``; ``(value, grad)``; ``((value, aux), grad)``).
      value_and_grad: False: ``fun`` returns the value (JAX differentiates it); True: ``fun``
        returns value and gradient; a callable: it returns them, ``fun`` returns the value.
      has_aux: whether the value comes with auxiliary output (stored in ``state.aux``).
      fun_min: :math:`f^\star`, a lower bound on ``fun`` (finite).
      variant: ``"SPS_max"`` or ``"SPS+"``.
      max_stepsize: :math:`\gamma_{\max} \ge 0` (``"SPS_max"`` only).
      delta: :math:`\delta \ge 0`, added to the denominator (``"SPS_max"`` only).
      momentum: heavy-ball coefficient :math:`\mu \ge 0`.
      pre_update: optional ``params, state = pre_update(params, state, *args, **kwargs)``,
        called at the start of every ``update``.
      maxiter: maximum number of updates in ``run`` (>= 0).
      tol: ``run`` stops once the gradient norm ``state.error`` is ``<= tol`` (>= 0).
      verbose: print one line per update (``jax.debug.print``, works under ``jit``).
      implicit_diff: differentiate ``run`` by the implicit function theorem on
        :math:`\nabla f(x^\star, \theta) = 0` instead of through the iterations.
      implicit_diff_solve: ``x = solve(matvec, b)`` for the linear system of implicit
        differentiation; None: conjugate gradient on the normal equations.
      jit: compile ``update`` and the loop of ``run``.
      unroll: ``"auto"`` (= ``not implicit_diff or not jit``), True (a ``lax.scan`` of
        ``maxiter - 1`` steps, no-ops once converged: reverse-differentiable; a Python loop
        when ``jit=False``) or False (``lax.while_loop``: exits early, needs ``jit=True``).
      axis_name: None, or the mapped axis (a name or a tuple of names) of ``shard_map``/
        ``pmap`` data parallelism, keyword only: ``fun`` sees each device's batch shard, and
        ``update`` averages its value over these devices (``lax.pmean``, inside the
        differentiated function when JAX differentiates ``fun``) and the gradient after, so
        every device takes the full-batch step and ``run``'s stopping test agrees on every
        device; ``aux`` stays per device. With equal shards of a mean loss this is the
        full-batch run. A gradient that ``fun`` returns itself (``value_and_grad=True``) is
        averaged too: it must be the device's own under ``check_vma=False`` and that of the
        averaged value under ``check_vma=True`` (``docs/distributed.md``). Not needed for
        parameters sharded under ``jit`` (``NamedSharding``): XLA reduces global arrays
        itself. (New; jaxopt has no such field.)
      nonfinite: ``"propagate"`` (default: a NaN/inf loss or gradient flows into the step, as
        in jaxopt), ``"raise"`` (``FloatingPointError`` from ``update``, nothing returned; needs
        ``jit=False``, since a compiled update cannot raise) or ``"skip"`` (traced, works in
        ``run`` under ``jit``: the parameters and the state's values are kept, ``iter_num``
        and the evaluation counts advance, and the state is a :class:`PolyakSGDSkipState`
        counting the skips in ``nonfinite_skips``). See docs/faults.md.

    Raises:
      ValueError: an unknown ``variant``; a negative (or NaN) ``max_stepsize``, ``delta``,
        ``momentum``, ``maxiter`` or ``tol``; a non-finite ``fun_min``; ``unroll=False``
        with ``jit=False``. TypeError: an argument of the wrong type (an ``axis_name`` that
        is not None, a str or a tuple of str; an ``unroll`` that is not ``"auto"`` or a bool).
        A Python int given for a real field is stored as a float. Traced values (a solver
        built inside ``jit``/``vmap``) are not checked.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.polyak import PolyakSGD
      >>> X = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]])
      >>> y = X @ jnp.array([1.0, -1.0])        # realisable: the minimum is 0
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2)
      >>> params, state = PolyakSGD(loss, maxiter=2000, tol=1e-6).run(jnp.zeros(2), X, y)
      >>> bool(state.error <= 1e-6), bool(jnp.allclose(params, jnp.array([1.0, -1.0]), atol=1e-3))
      (True, True)

    References:
      Loizou, Vaswani, Laradji & Lacoste-Julien, `Stochastic Polyak step-size for SGD: an
      adaptive learning rate for fast convergence <https://arxiv.org/abs/2002.10542>`_,
      AISTATS 2021.
      Berrada, Zisserman & Kumar, `Training neural networks for and by interpolation
      <https://arxiv.org/abs/1906.05661>`_, ICML 2020.
      Garrigos, Gower & Schaipp, `Function value learning: adaptive learning rates based on the
      Polyak stepsize and function splitting in ERM <https://arxiv.org/abs/2307.14528>`_, 2023.
    """

    fun: Callable
    value_and_grad: Union[bool, Callable] = False
    has_aux: bool = False
    fun_min: float = 0.0

    variant: str = "SPS_max"
    max_stepsize: float = 1.0
    delta: float = 0.0
    momentum: float = 0.0
    pre_update: Optional[Callable] = None

    maxiter: int = 500
    tol: float = 1e-3
    verbose: Union[bool, int] = False

    implicit_diff: bool = False
    implicit_diff_solve: Optional[Callable] = None

    jit: bool = True
    unroll: Union[str, bool] = "auto"

    axis_name: Any = extra()
    nonfinite: str = extra("propagate")

    # -- construction ------------------------------------------------------------------------
    def _check_fields(self) -> None:
        _validation.check_nonfinite(self.nonfinite)
        if self.nonfinite == "raise" and self.jit is True:
            raise ValueError("Invalid nonfinite policy: 'raise' with jit=True (a compiled update "
                             "cannot raise); use jit=False, or nonfinite='skip' under jit")
        self.value_and_grad = check_fun_fields(self.fun, self.value_and_grad, self.has_aux)
        self.fun_min = check(_validation.finite, "fun_min value", self.fun_min)
        _validation.choice("variant value", self.variant, _polyak.VARIANTS)
        self.max_stepsize = check(_validation.nonnegative_finite, "max_stepsize value",
                                  self.max_stepsize)
        self.delta = check(_validation.nonnegative_finite, "delta value", self.delta)
        self.momentum = check(_validation.nonnegative_finite, "momentum value", self.momentum)
        check_callable("pre_update value", self.pre_update, optional=True)
        self.axis_name = check_axis_name(self.axis_name)
        super()._check_fields()

    def _prepare(self) -> None:
        self._fun, self._value_and_grad_fun = make_funs(
            self.fun, self.value_and_grad, self.has_aux)
        # shard_map data parallelism: the whole batch's value and gradient on every device
        self._value_and_grad_fun = data_parallel(
            self._fun, self._value_and_grad_fun, self.value_and_grad is False, self.axis_name)
        # jaxopt's AndersonWrapper and custom_root look for this attribute.
        self.reference_signature = self.fun

    # -- the solver's problem ------------------------------------------------------------------
    def optimality_fun(self, params, *args, **kwargs):
        """The gradient of ``fun`` at ``params`` (zero at a stationary point); aux dropped.

        With ``axis_name``, the whole batch's (averaged over the devices of that axis).
        """
        return self._value_and_grad_fun(params, *args, **kwargs)[1]

    # -- one step -----------------------------------------------------------------------------
    def init_state(self, init_params: Any, *args, **kwargs) -> PolyakSGDState:
        """The state before the first update.

        Evaluates ``fun`` once at ``init_params`` (for the structure of ``aux`` and the dtype
        of the value); ``error`` and ``value`` start at +inf, ``stepsize`` at 1.

        Args:
          init_params: pytree of parameters (one dtype for every leaf).
          *args, **kwargs: passed on to ``fun``.
        """
        value, aux = self._fun(init_params, *args, **kwargs)
        dtype = single_dtype(init_params, "PolyakSGD")
        velocity = None if is_zero(self.momentum) else jax.tree.map(jnp.zeros_like, init_params)
        state = PolyakSGDState(
            iter_num=jnp.asarray(0),
            error=jnp.asarray(jnp.inf, dtype=dtype),
            value=jnp.asarray(jnp.inf, dtype=jnp.asarray(value).dtype),
            aux=aux,
            stepsize=jnp.asarray(1.0, dtype=dtype),
            velocity=velocity,
            num_fun_eval=jnp.array(1, _NUM_EVAL_DTYPE),
            num_grad_eval=jnp.array(0, _NUM_EVAL_DTYPE),
        )
        if self.nonfinite == "skip":
            return PolyakSGDSkipState(*state, nonfinite_skips=jnp.array(0, jnp.int32))
        return state

    def _stepsize(self, value, grad_sq_norm, dtype):
        """The rule's variant choice; ``tiny`` (SPS+'s zero guard) is ``dtype``'s epsilon.

        (float64's for parameters without a floating dtype, e.g. an empty pytree.)
        """
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            dtype = np.float64
        return _rules.polyak_stepsize(value, self.fun_min, grad_sq_norm, self.delta,
                                      self.max_stepsize, float(jnp.finfo(dtype).eps),
                                      _polyak.is_plus(self.variant))

    def update(self, params: Any, state: PolyakSGDState, *args, **kwargs) -> OptStep:
        """One Polyak step from ``params``.

        Args:
          params: pytree of parameters.
          state: the state from :meth:`init_state` or the previous :meth:`update`.
          *args, **kwargs: passed on to ``pre_update`` and ``fun``.

        Returns:
          ``OptStep(params, state)``: the new parameters, and a state whose ``error``,
          ``value``, ``aux`` and ``stepsize`` belong to the parameters the step started from.
        """
        dtype = single_dtype(params, "PolyakSGD")
        if self.pre_update is not None:
            params, state = self.pre_update(params, state, *args, **kwargs)

        (value, aux), grad = self._value_and_grad_fun(params, *args, **kwargs)
        if self.nonfinite == "raise":
            nonfinite_raise("PolyakSGD", {"the loss": value, "the gradient": grad})
        grad_sq_norm = tree_sq_norm(grad)
        stepsize = self._stepsize(value, grad_sq_norm, dtype).astype(state.stepsize.dtype)

        if is_zero(self.momentum):
            new_params = jax.tree.map(
                lambda p, g: _rules.sgd_update(p, g, stepsize), params, grad)
            new_velocity = None
        else:
            pairs = jax.tree.map(
                lambda p, g, v: _rules.heavy_ball_update(p, g, v, stepsize, self.momentum),
                params, grad, state.velocity)
            treedef = jax.tree.structure(params)
            new_params, new_velocity = jax.tree.transpose(
                treedef, jax.tree.structure((0, 0)), pairs)

        error = safe_sqrt(grad_sq_norm)
        value = jnp.asarray(value)
        new_state = PolyakSGDState(
            iter_num=state.iter_num + 1,
            error=jnp.asarray(error, dtype=dtype),
            value=jnp.asarray(value, dtype=value.dtype),
            aux=aux,
            stepsize=jnp.asarray(stepsize, dtype=dtype),
            velocity=new_velocity,
            num_fun_eval=state.num_fun_eval + 1,
            num_grad_eval=state.num_grad_eval + 1,
        )
        if self.nonfinite == "skip":  # traced: keep the parameters and values, count the skip
            ok = all_finite(value, grad)
            kept = ("error", "value", "aux", "stepsize", "velocity")
            new_params = select(ok, new_params, params)
            new_state = PolyakSGDSkipState(
                *new_state._replace(**{k: select(ok, getattr(new_state, k), getattr(state, k))
                                       for k in kept}),
                nonfinite_skips=state.nonfinite_skips + jnp.where(ok, 0, 1).astype(jnp.int32))
        if self.verbose:
            jax.debug.print(
                "INFO: uniopt.PolyakSGD: Iter: {} Gradient Norm (stopping criterion): {} "
                "Objective Value: {} Stepsize: {}",
                new_state.iter_num, new_state.error, value, stepsize, ordered=True)
        return OptStep(params=new_params, state=new_state)


# ----------------------------------------------------------------------------------------------
# optax
# ----------------------------------------------------------------------------------------------
class ScaleByPolyakState(NamedTuple):
    """State of :func:`scale_by_polyak`: the heavy-ball ``velocity`` (None without momentum).

    ``velocity`` is the last returned direction ``mu * velocity + gamma * u``, the same sign as
    the incoming updates ``u``.
    """

    velocity: Optional[optax.Updates]


def scale_by_polyak(
    f_min: Any = 0.0,
    max_learning_rate: Any = 1.0,
    eps: Any = 0.0,
    variant: str = "sps",
    momentum: Any = 0.0,
    *,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale updates by the Polyak step size, with optional heavy-ball momentum.

    With incoming updates :math:`u` (usually the gradient) and the loss ``value``
    :math:`f(x)`:

    .. math::
       \gamma = \min\left(\frac{f(x) - f^\star}{\|u\|^2 + \epsilon}, \gamma_{\max}\right)
       \text{ if } f(x) > f^\star \text{ and } \|u\|^2 + \epsilon > \epsilon_{64},
       \text{ else } 0; \qquad d = \mu d_{\text{prev}} + \gamma u

    with :math:`f^\star` = ``f_min``, :math:`\gamma_{\max}` = ``max_learning_rate``,
    :math:`\epsilon` = ``eps``, :math:`\mu` = ``momentum`` and :math:`\epsilon_{64}` the float64
    machine epsilon (optax's zero guard). The arguments come in :func:`optax.scale_by_polyak`'s
    order; ``momentum`` is new. With ``momentum=0`` this equals optax's transform wherever
    :math:`f(x) \ge f^\star`; below it optax takes an ascent step (``"sps"``) where this one takes
    none, so ``"sps"`` and ``"sps+"`` coincide here (``docs/deviations.md``).

    Args:
      f_min: :math:`f^\star`, a lower bound of the loss (finite).
      max_learning_rate: :math:`\gamma_{\max} \ge 0`.
      eps: :math:`\epsilon \ge 0`, added to the denominator.
      variant: ``"sps"`` or ``"sps+"``.
      momentum: :math:`\mu \ge 0` (a traced value, e.g. from :func:`optax.inject_hyperparams`,
        always gets a velocity buffer).
      axis_name: None, or the mapped axis of ``shard_map``/``pmap`` data parallelism: the
        ``value`` each device passes (its batch shard's loss) is averaged over these devices
        (``lax.pmean``). The updates are not: average the gradients yourself, as in any
        optax data-parallel loop (differentiate the ``lax.pmean``'d loss under
        ``shard_map``'s default ``check_vma=True``; ``lax.pmean`` the gradients under
        ``check_vma=False``; ``docs/distributed.md``). Not needed under ``jit`` with sharded
        parameters.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state,
      params=None, *, value)`` needs the loss ``value`` (TypeError without it).
    """
    f_min = check(_validation.finite, "f_min value", f_min)
    max_learning_rate = check(_validation.nonnegative_finite, "max_learning_rate value",
                              max_learning_rate)
    eps = check(_validation.nonnegative, "eps value", eps)
    _validation.choice("variant value", variant, _OPTAX_VARIANTS)
    momentum = check(_validation.nonnegative_finite, "momentum value", momentum)
    axis_name = check_axis_name(axis_name)
    use_velocity = isinstance(momentum, jax.Array) or not is_zero(momentum)

    def init_fn(params):
        if not use_velocity:
            return ScaleByPolyakState(velocity=None)
        return ScaleByPolyakState(velocity=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None, *, value, **extra_args):
        del params, extra_args
        sq_norm = tree_sq_norm(updates)
        loss = mean_over(jnp.asarray(value), axis_name).astype(sq_norm.dtype)
        # optax's "sps" and "sps+" are both SPS_max here (the rule never ascends).
        step = _rules.polyak_stepsize(loss, f_min, sq_norm, eps, max_learning_rate,
                                      _OPTAX_TINY, False)
        step = _rules.zero_below(step, sq_norm + eps, _OPTAX_TINY)
        leaves, treedef = jax.tree.flatten(updates)
        # The rule descends along -u (``p - gamma * g`` from p = 0 with g = -u); -u is exact.
        if not use_velocity:
            out = [_rules.sgd_update(0.0, -u, step.astype(u.dtype)).astype(u.dtype)
                   for u in leaves]
            return treedef.unflatten(out), state
        velocities = treedef.flatten_up_to(state.velocity)
        out = []
        for u, v in zip(leaves, velocities):
            _, new_v = _rules.heavy_ball_update(
                0.0, -u, v, step.astype(v.dtype), jnp.asarray(momentum, dtype=v.dtype))
            out.append(new_v.astype(v.dtype))
        new = treedef.unflatten(out)
        return new, ScaleByPolyakState(velocity=new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def polyak_sgd(
    max_learning_rate: Any = 1.0,
    scaling: optax.ScalarOrSchedule = 1.0,
    f_min: Any = 0.0,
    eps: Any = 0.0,
    variant: str = "sps",
    momentum: Any = 0.0,
    *,
    axis_name: Any = None,
    nonfinite: str = "propagate",
    ffi: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with the Polyak step size (:func:`optax.polyak_sgd`'s signature, plus momentum).

    .. math::
       d_t = \mu d_{t-1} + \gamma_t \nabla f(x_t), \qquad x_{t+1} = x_t - s_t d_t,
       \qquad \gamma_t = \min\left(\frac{f(x_t) - f^\star}{\|\nabla f(x_t)\|^2 + \epsilon},
       \gamma_{\max}\right)_{\ge 0}

    with :math:`s_t` = ``scaling`` (a float or an optax schedule) and the rest as in
    :func:`scale_by_polyak` (this is ``chain(scale_by_polyak(...), scale_by_learning_rate(
    scaling))``). ``scaling`` multiplies the Polyak step, as optax's docstring formula says;
    optax's code applies it to the gradient *before* the step is computed, which changes the
    step when ``scaling != 1``. That behaviour is ``optax.chain(optax.sgd(scaling),
    scale_by_polyak(...))`` (``docs/deviations.md``). ``momentum > 0`` gives jaxopt's heavy
    ball: :math:`x_{t+1} = x_t + v_{t+1}`, :math:`v_{t+1} = \mu v_t - \gamma_t \nabla f(x_t)`.

    Args:
      max_learning_rate: :math:`\gamma_{\max} \ge 0`.
      scaling: :math:`s \ge 0`, a float or a schedule.
      f_min: :math:`f^\star`, a lower bound of the loss (0 for interpolating models).
      eps: :math:`\epsilon \ge 0`.
      variant: ``"sps"`` or ``"sps+"`` (the same here: the step is never negative).
      momentum: :math:`\mu \ge 0`.
      axis_name: None, or the ``shard_map``/``pmap`` axis over which the loss ``value`` is
        averaged (see :func:`scale_by_polyak`; average the gradients yourself).
      nonfinite: (keyword) ``"propagate"`` (default), ``"raise"`` (outside ``jit``) or
        ``"skip"`` (traced; the state becomes ``NonFiniteState(inner_state,
        nonfinite_skips)``): what an update does when the gradient or ``value`` is NaN/inf
        (docs/faults.md).
      ffi: (keyword) the execution of the fused step
        ``uniopt.adapters.jax.update_and_apply(tx, grads, state, params, value=loss)``:
        ``None`` (default) takes one XLA FFI call of a Numba kernel (norm, step size, update of
        every leaf, parameters and velocity in place: :mod:`uniopt.kernels.polyak_ffi`) where
        it applies (under ``jit`` on CPU, float32/float64 leaves of one dtype whose parameters
        and velocity have their dtype, ``nonfinite="propagate"``, from
        :data:`POLYAK_APPLY_MIN_SIZE` elements), else ``update`` then ``apply_updates``;
        ``True`` forces the FFI call, ``False`` the traced pair. ``update`` itself is always
        traced (an FFI call there would write the updates for ``apply_updates`` to read back:
        more memory traffic than XLA's fused traced step). The squared norm of the FFI call is
        the NumPy core's (float64, blocked order): float64 parameters equal
        :class:`uniopt.PolyakSGD`'s bit for bit when ``scaling`` is 1, float32 ones are within
        a few ulps of the traced path.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``value=``.

    Raises:
      TypeError: an ``ffi`` other than None/True/False; at a fused step, ``ffi=True`` with
        leaves other than float32/float64, of two dtypes, or parameters/velocity of another
        dtype than their gradients.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax.polyak import polyak_sgd
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> solver, params = polyak_sgd(), jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(2):
      ...     value, grad = jax.value_and_grad(f)(params)
      ...     updates, state = solver.update(grad, state, params, value=value)
      ...     params = optax.apply_updates(params, updates)
      >>> float(f(params))
      0.875

    References:
      Loizou et al., `Stochastic Polyak step-size for SGD
      <https://arxiv.org/abs/2002.10542>`_, 2021; Garrigos et al., `Function value learning
      <https://arxiv.org/abs/2307.14528>`_, 2023.
    """
    _ffi.check_flag(ffi)
    if not callable(scaling):
        scaling = check(_validation.nonnegative, "scaling value", scaling)
    chain = optax.chain(
        scale_by_polyak(f_min=f_min, max_learning_rate=max_learning_rate, eps=eps,
                        variant=variant, momentum=momentum, axis_name=axis_name),
        optax.scale_by_learning_rate(scaling),
    )
    # (scale_by_polyak checked them: the same conversions, no second message)
    hyper = dict(f_min=host_number(f_min), max_learning_rate=host_number(max_learning_rate),
                 eps=host_number(eps), momentum=host_number(momentum))
    return with_nonfinite(_with_fused_ffi(chain, ffi, scaling, axis_name, **hyper), nonfinite,
                          "polyak_sgd", ("value",), axis_name)


# ----------------------------------------------------------------------------------------------
# The fused step through XLA's FFI (update_and_apply)
# ----------------------------------------------------------------------------------------------
#: Total element count from which ``ffi=None`` runs :func:`uniopt.adapters.jax.update_and_apply`
#: of :func:`polyak_sgd` through the fused FFI call (under ``jit`` on CPU). Default: the QH
#: steps' threshold, :data:`uniopt.adapters.jax._ffi.APPLY_MIN_SIZE` (0), read at each trace.
POLYAK_APPLY_MIN_SIZE = None


def _traced_apply(hyper, grads, params, velocities):
    """The fused handler's arithmetic in ``jax.numpy`` (its derivative rule; same signature).

    ``hyper``: :mod:`uniopt.kernels.polyak_ffi`'s scalars in the leaves' dtype. The norm is the
    traced face's (``tree_sq_norm`` in the leaves' dtype), so the values are within a few ulps
    of the handler's, not bit for bit.
    """
    from uniopt.kernels import polyak_ffi as k

    sq_norm = tree_sq_norm(grads)
    h = [hyper[i] for i in range(k.POLYAK_SCALARS)]
    step = _rules.polyak_stepsize(h[k.VALUE], h[k.F_MIN], sq_norm, h[k.EPS],
                                  h[k.MAX_LEARNING_RATE], h[k.TINY], h[k.IS_PLUS] != 0)
    step = jnp.where(h[k.GUARD] >= 0, _rules.zero_below(step, sq_norm + h[k.EPS], h[k.GUARD]),
                     step)
    new_params, new_velocities = [], []
    for t, (p, g) in enumerate(zip(params, grads)):
        if velocities:
            _, v = _rules.heavy_ball_update(0.0, -g, velocities[t], step, h[k.MOMENTUM])
            new_velocities.append(v)
            new_params.append(p + h[k.NEG_SCALING] * v)
        else:
            new_params.append(p + h[k.NEG_SCALING] * _rules.sgd_update(0.0, -g, step))
    return new_params, new_velocities, jnp.stack([step, sq_norm]).astype(hyper.dtype)


def _ffi_apply(hyper, grads, params, velocities):
    """One FFI call: ``(new_params, new_velocities, [step size, squared norm])``."""
    name = _ffi.ensure_registered("polyak_apply")
    n = len(grads)
    results = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
               for x in (*params, *velocities)]
    results.append(jax.ShapeDtypeStruct((2,), jnp.result_type(hyper)))
    aliases = {1 + n + k: k for k in range(n + len(velocities))}  # params, then velocities
    out = jax.ffi.ffi_call(name, results, input_output_aliases=aliases,
                           vmap_method="sequential")(hyper, *grads, *params, *velocities)
    return list(out[:n]), list(out[n:-1]), out[-1]


def fused_polyak_step(hyper, grads, params, velocities):
    """The fused step of leaves of one dtype through the FFI call, with traced derivatives.

    Args:
      hyper: the :data:`uniopt.kernels.polyak_ffi.POLYAK_SCALARS` scalars (module docs there).
      grads, params: lists of leaves of one dtype (float32 or float64).
      velocities: the heavy-ball buffers (the optax face's sign), or ``[]``.

    Returns:
      ``(new_params, new_velocities, step)``, ``step`` = ``[step size, squared norm]``.
    """
    return _ffi.with_traced_derivatives(_ffi_apply, _traced_apply)(hyper, grads, params,
                                                                   velocities)


def _with_fused_ffi(chain, ffi, scaling, axis_name, *, f_min, max_learning_rate, eps,
                    momentum):
    """``chain`` (``polyak_sgd``'s) whose update has an ``update_and_apply`` attribute.

    ``update`` stays ``chain.update`` (traced); ``update.update_and_apply(grads, state, params,
    value=...)`` returns ``(params, state)`` through one fused FFI call where
    :func:`_ffi.choose` says, else through ``chain.update`` and ``optax.apply_updates``.
    """
    from uniopt.kernels import polyak_ffi as k

    def fused(grads, state, params, *, value, **extra_args):
        def fallback():
            return _ffi.apply_pair(chain.update, grads, state, params, value=value,
                                   **extra_args)

        polyak_state, lr_state = state
        leaves, treedef = jax.tree.flatten(grads)
        if not leaves or params is None:
            return fallback()  # (optax raises, or nothing to do)
        ps = treedef.flatten_up_to(params)
        vs = (treedef.flatten_up_to(polyak_state.velocity)
              if polyak_state.velocity is not None else [])
        neg_scaling = -1 * _ffi.schedule_value(scaling, lr_state)
        scalars = [value, neg_scaling, f_min, max_learning_rate, eps, momentum,
                   *jax.tree.leaves(lr_state)]
        per_leaf = [[ps[t]] + ([vs[t]] if vs else []) for t in range(len(leaves))]
        min_size = _ffi.APPLY_MIN_SIZE if POLYAK_APPLY_MIN_SIZE is None else POLYAK_APPLY_MIN_SIZE
        if not _ffi.choose(ffi, leaves, per_leaf, scalars, min_size):
            return fallback()
        dtypes = sorted({str(jnp.result_type(g)) for g in leaves})
        if len(dtypes) > 1:  # the norm couples every leaf: one call, one dtype
            if ffi:
                raise TypeError(f"Invalid ffi=True: the fused Polyak step runs leaves of one "
                                f"dtype, got {', '.join(dtypes)}")
            return fallback()
        dtype = jnp.dtype(dtypes[0])
        loss = mean_over(jnp.asarray(value), axis_name)
        numbers = [0.0] * k.POLYAK_SCALARS
        numbers[k.VALUE], numbers[k.F_MIN], numbers[k.EPS] = loss, f_min, eps
        numbers[k.MAX_LEARNING_RATE], numbers[k.NEG_SCALING] = max_learning_rate, neg_scaling
        numbers[k.MOMENTUM], numbers[k.TINY], numbers[k.IS_PLUS] = momentum, _OPTAX_TINY, 0.0
        numbers[k.GUARD] = _OPTAX_TINY  # optax's zero guard (zero_below)
        hyper = jnp.stack([jnp.asarray(x).astype(dtype) for x in numbers])
        new_ps, new_vs, _ = fused_polyak_step(hyper, leaves, ps, vs)
        if vs:
            polyak_state = polyak_state._replace(velocity=treedef.unflatten(new_vs))
        return treedef.unflatten(new_ps), (polyak_state, _ffi.advanced(lr_state))

    def update_fn(updates, state, params=None, **extra_args):
        return chain.update(updates, state, params, **extra_args)

    update_fn.update_and_apply = fused
    return optax.GradientTransformationExtraArgs(chain.init, update_fn)
