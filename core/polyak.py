r"""Polyak step-size SGD on NumPy arrays: a jaxopt-shaped solver.

:class:`PolyakSGD` has the API of ``jaxopt.PolyakSGD`` (jaxopt 0.8.5): ``init_state``,
``update``, ``run``, ``run_iterator``, ``optimality_fun``, ``l2_optimality_error`` and a
:class:`PolyakSGDState` with jaxopt's fields, over ndarrays or nested lists/tuples/dicts of
ndarrays. Its SciPy custom-method form, :func:`uniopt.minimize_polyak`
(``uniopt.minimize(..., method="polyak")``), lives with every other method in
:mod:`uniopt._minimize`, which builds on :func:`squared_norm`, :func:`step_` and
:func:`polyak_stepsize`.

The arithmetic is :mod:`uniopt.rules.polyak`; the norm and the update run as the Numba table
kernels of :mod:`uniopt.kernels.polyak_cpu` (one call for the norm, one for the update, over
every leaf at once).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np

from . import _jit
from ._validation import check_nonfinite, check_polyak, nonfinite_error
from .kernels import polyak_cpu
from .kernels._pointers import addresses
from .rules import polyak as _rules

__all__ = [
    "PolyakSGD",
    "PolyakSGDState",
    "OptStep",
    "polyak_stepsize",
    "check_polyak",
    "squared_norm",
    "step_",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------------------------
# Validation and the step size (shared with the torch adapter)
# ----------------------------------------------------------------------------------------------
def polyak_stepsize(value: float, sq_norm: float, fun_min: float = 0.0, variant: str = "SPS_max",
                    max_stepsize: float = 1.0, delta: float = 0.0, dtype=np.float64,
                    eps: float | None = None) -> float:
    r"""The step size of one Polyak step, in float64 (:func:`uniopt.rules.polyak.polyak_stepsize`).

    Args:
      value: the objective value :math:`f(x_k)`.
      sq_norm: :math:`\|\nabla f(x_k)\|^2` over every parameter.
      fun_min, variant, max_stepsize, delta: as :class:`PolyakSGD`.
      dtype: the parameters' dtype; ``"SPS+"`` takes a zero step when ``sq_norm`` is at most
        its machine epsilon (or at most ``eps``, when given).

    Raises:
      ValueError: an unknown ``variant``.
    """
    is_plus = _rules.is_plus(variant)
    tiny = float(np.finfo(dtype).eps) if eps is None else float(eps)
    return float(_rules.polyak_stepsize(float(value), float(fun_min), float(sq_norm), float(delta),
                                        float(max_stepsize), tiny, is_plus))


# ----------------------------------------------------------------------------------------------
# Pytree-lite: nested lists, tuples (named or not) and dicts of arrays
# ----------------------------------------------------------------------------------------------
_LEAF = ("leaf",)
_NONE = ("none",)


def _flatten(tree, leaves: list):
    """Append the leaves of ``tree`` to ``leaves``; return its structure (comparable with ==).

    Dict keys are visited in sorted order and ``None`` is an empty node, as in JAX.
    """
    if tree is None:
        return _NONE
    if isinstance(tree, dict):
        keys = sorted(tree)
        return ("dict", type(tree), tuple(keys), tuple(_flatten(tree[k], leaves) for k in keys))
    if isinstance(tree, (list, tuple)):
        return ("seq", type(tree), tuple(_flatten(x, leaves) for x in tree))
    leaves.append(tree)
    return _LEAF


def _unflatten(structure, leaves):
    iterator = iter(leaves)

    def build(node):
        if node is _LEAF or node == _LEAF:
            return next(iterator)
        if node == _NONE:
            return None
        if node[0] == "dict":
            _, kind, keys, children = node
            return kind(zip(keys, (build(c) for c in children)))
        _, kind, children = node
        items = [build(c) for c in children]
        if kind is list or kind is tuple:
            return kind(items)
        if hasattr(kind, "_fields"):  # a NamedTuple
            return kind(*items)
        return kind(items)

    return build(structure)


class _Params:
    """The leaves of a parameter tree as float32/float64 arrays of one dtype."""

    def __init__(self, tree):
        leaves: list = []
        self.structure = _flatten(tree, leaves)
        arrays = []
        for i, leaf in enumerate(leaves):
            a = np.asarray(leaf)
            if a.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"Invalid parameter leaf {i}: dtype {a.dtype} (expected float32 or float64)")
            arrays.append(a)
        dtypes = {a.dtype for a in arrays}
        if len(dtypes) > 1:
            raise ValueError("Found more than one dtype in the tree.")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
        self.leaves = arrays

    def copies(self) -> list:
        """Contiguous copies of the leaves (the kernels then update them in place)."""
        return [np.array(a, dtype=self.dtype, order="C", copy=True) for a in self.leaves]

    def matching(self, tree, what: str) -> list:
        """The leaves of ``tree`` (a gradient or velocity) as contiguous arrays of our dtype."""
        leaves: list = []
        structure = _flatten(tree, leaves)
        if structure != self.structure:
            raise ValueError(f"the {what} does not have the structure of the parameters")
        out = []
        for i, (leaf, p) in enumerate(zip(leaves, self.leaves)):
            a = np.asarray(leaf, dtype=self.dtype)
            if not a.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
                a = a.copy(order="C")
            if a.shape != p.shape:
                raise ValueError(f"Invalid {what} leaf {i}: shape {a.shape} != parameter shape {p.shape}")
            out.append(a)
        return out

    def tree(self, leaves):
        return _unflatten(self.structure, leaves)


_LIKE = {dt: np.zeros(1, dtype=dt) for dt in _FLOAT_DTYPES}


def _table(arrays):
    return addresses(arrays), np.array([a.size for a in arrays], dtype=np.int64)


def squared_norm(arrays, dtype) -> float:
    """``sum ||a||^2`` over ``arrays`` in float64 (one kernel call).

    ``arrays``: C-contiguous arrays of ``dtype`` (float32 or float64); only read.
    """
    if not arrays:
        return 0.0
    addrs, sizes = _table(arrays)
    kernel = polyak_cpu.sq_norm_kernel(int(sizes.sum()) >= _jit.PARALLEL_MIN_SIZE)
    return float(kernel(addrs, sizes, _LIKE[np.dtype(dtype)]))


def step_(params, grads, velocities, stepsize, momentum, dtype) -> None:
    """``params -= stepsize * grads`` (or the heavy-ball step) in place, one kernel call.

    ``params``, ``grads`` and ``velocities`` (``None`` without momentum): lists of
    C-contiguous arrays of ``dtype`` with matching sizes; ``params`` and ``velocities`` are
    updated in place, ``grads`` only read.
    """
    if not params:
        return
    p_addrs, sizes = _table(params)
    parallel = int(sizes.sum()) >= _jit.PARALLEL_MIN_SIZE
    if velocities is None:
        polyak_cpu.sgd_kernel(parallel)(p_addrs, addresses(grads), sizes,
                                        np.array([stepsize], dtype=dtype))
    else:
        polyak_cpu.heavy_ball_kernel(parallel)(p_addrs, addresses(grads), addresses(velocities),
                                               sizes, np.array([stepsize, momentum], dtype=dtype))


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
class PolyakSGDState(NamedTuple):
    """The state of :class:`PolyakSGD` (jaxopt's fields, in jaxopt's order).

    ``error``, ``value`` and ``aux`` describe the parameters *before* the last update (as in
    jaxopt): ``error`` is the gradient norm there, the stopping criterion of ``run``.
    """

    iter_num: int
    error: Any
    value: Any
    aux: Any
    stepsize: Any
    velocity: Optional[Any]
    num_fun_eval: int = 0
    num_grad_eval: int = 0
    nonfinite_skips: int = 0


class OptStep(NamedTuple):
    params: Any
    state: Any


@dataclasses.dataclass(eq=False)
class PolyakSGD:
    r"""SGD with the Polyak step size, over NumPy arrays (the API of ``jaxopt.PolyakSGD``).

    .. math::
       \gamma_k = \min\left(\frac{f(x_k) - f^*}{\|\nabla f(x_k)\|^2 + \delta},
       \gamma_{\max}\right) \ (\text{SPS\_max}), \qquad
       \gamma_k = \max\left(\frac{f(x_k) - f^*}{\|\nabla f(x_k)\|^2}, 0\right) \ (\text{SPS+}),

       v_{k+1} = \mu v_k - \gamma_k \nabla f(x_k), \qquad x_{k+1} = x_k + v_{k+1}

    with :math:`f^*` = ``fun_min``, :math:`\delta` = ``delta``, :math:`\gamma_{\max}` =
    ``max_stepsize``, :math:`\mu` = ``momentum`` (``momentum=0``: :math:`x_{k+1} = x_k -
    \gamma_k \nabla f(x_k)`). The norm is over every leaf of the parameters.

    Attributes:
      fun: the objective. NumPy cannot differentiate, so by default (``value_and_grad=True``)
        ``fun(params, *args, **kwargs)`` returns ``(value, grad)`` -- or ``((value, aux),
        grad)`` with ``has_aux=True`` -- with ``grad`` shaped like ``params``.
      value_and_grad: ``True`` (default; jaxopt's default is ``False``, which would need
        autodiff and is rejected here), or a callable returning ``(value, grad)`` (or
        ``((value, aux), grad)``) while ``fun`` returns the value (or ``(value, aux)``) alone;
        ``init_state`` then calls only ``fun``.
      has_aux: whether the value comes with auxiliary data (stored in ``state.aux``).
      fun_min: :math:`f^*`, a lower bound on ``fun`` (0 for interpolating models).
      variant: ``"SPS_max"`` or ``"SPS+"`` (which ignores ``max_stepsize`` and ``delta``).
      max_stepsize: :math:`\gamma_{\max}` (finite, >= 0).
      delta: :math:`\delta` (>= 0), added to the squared gradient norm.
      momentum: heavy-ball :math:`\mu` (>= 0).
      pre_update: optional ``params, state = pre_update(params, state, *args, **kwargs)``,
        called at the start of every update.
      maxiter: the maximum number of updates of ``run`` (and of ``run_iterator``).
      tol: ``run`` stops once the gradient norm at the last pre-update point is <= ``tol``.
      verbose: print one line per update.
      nonfinite: ``"propagate"`` (default: a NaN/inf loss or gradient flows into the step, as
        in jaxopt), ``"raise"`` (``FloatingPointError`` from ``update``) or ``"skip"``:
        ``update`` returns the parameters and the state's values unchanged, with
        ``state.nonfinite_skips`` incremented (``iter_num`` and the evaluation counts advance,
        so ``run`` stays bounded by ``maxiter``). The check is on the loss and the squared
        gradient norm (docs/faults.md).

    Parameters are an ndarray or a nested list/tuple/dict of ndarrays (dict keys in sorted
    order, as in JAX), all float32 or all float64. ``update`` never mutates its inputs: it
    returns new arrays.

    Deviations from jaxopt 0.8.5 (``docs/deviations.md``): the step size is 0 -- not NaN -- at
    an exact minimiser with ``delta=0`` (0/0), and 0 -- not an ascent step -- when
    ``f(x) < fun_min``; the step size is computed in float64 from a float64 norm, then cast to
    the parameters' dtype; hyper-parameters are validated at construction; ``value_and_grad``
    defaults to ``True``; counters are Python ints; ``run`` with ``maxiter=0`` does not
    evaluate the (discarded) first update.

    Example:
      >>> import numpy as np, uniopt
      >>> solver = uniopt.PolyakSGD(lambda x: (float(x @ x), 2 * x))   # f = ||x||^2, f* = 0
      >>> x0 = np.array([1.0, -2.0])
      >>> params, state = solver.update(x0, solver.init_state(x0))
      >>> params, float(state.stepsize)     # gamma = f / ||2x||^2 = 1/4 halves x
      (array([ 0.5, -1. ]), 0.25)
      >>> params, state = solver.run(x0)    # until ||grad|| <= tol at the pre-update point
      >>> int(state.iter_num), bool(np.abs(params).max() < 1e-3)
      (14, True)

    References:
      Loizou, Vaswani, Laradji & Lacoste-Julien, "Stochastic Polyak step-size for SGD: an
      adaptive learning rate for fast convergence", AISTATS 2021, https://arxiv.org/abs/2002.10542
      Berrada, Zisserman & Kumar, "Training neural networks for and by interpolation", ICML
      2020, https://arxiv.org/abs/1906.05661
      Garrigos, Gower & Schaipp, "Function value learning: adaptive learning rates based on the
      Polyak stepsize and function splitting in ERM", 2023, https://arxiv.org/abs/2307.14528
    """

    fun: Callable
    value_and_grad: Union[bool, Callable] = True
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
    nonfinite: str = "propagate"

    def __post_init__(self):
        check_nonfinite(self.nonfinite)
        if not callable(self.fun):
            raise TypeError(f"Invalid fun: {self.fun!r} (expected a callable)")
        vg = self.value_and_grad
        if not callable(vg):
            if not isinstance(vg, (bool, np.bool_)):
                raise TypeError(f"Invalid value_and_grad value: {vg!r} (expected True or a callable)")
            if not vg:
                raise ValueError(
                    "Invalid value_and_grad value: False (NumPy cannot differentiate fun: make "
                    "fun return (value, grad) with value_and_grad=True, or pass a callable "
                    "value_and_grad)")
        if self.pre_update is not None and not callable(self.pre_update):
            raise TypeError(f"Invalid pre_update value: {self.pre_update!r} (expected a callable or None)")
        check_polyak(self.fun_min, self.variant, self.max_stepsize, self.delta, self.momentum,
                     has_aux=self.has_aux, maxiter=self.maxiter, tol=self.tol, verbose=self.verbose)

    # -- jaxopt's bookkeeping ------------------------------------------------------------------
    def attribute_names(self) -> tuple:
        """jaxopt's solver fields (``nonfinite``, uniopt's own, is left out)."""
        return tuple(field.name for field in dataclasses.fields(self) if field.name != "nonfinite")

    def attribute_values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.attribute_names())

    # -- evaluating fun --------------------------------------------------------------------------
    def _split_aux(self, out):
        if self.has_aux:
            value, aux = out
            return value, aux
        return out, None

    def _value_fun(self, params, *args, **kwargs):
        """``(value, aux)`` at ``params`` (the value-only function where there is one)."""
        if callable(self.value_and_grad):
            return self._split_aux(self.fun(params, *args, **kwargs))
        return self._value_and_grad(params, *args, **kwargs)[0]

    def _value_and_grad(self, params, *args, **kwargs):
        """``((value, aux), grad)`` at ``params``."""
        f = self.value_and_grad if callable(self.value_and_grad) else self.fun
        out = f(params, *args, **kwargs)
        try:
            value, grad = out
        except (TypeError, ValueError):
            raise TypeError("fun must return (value, grad) (((value, aux), grad) with has_aux=True); "
                            f"got {type(out).__name__}") from None
        return self._split_aux(value), grad

    # -- the solver ------------------------------------------------------------------------------
    def init_state(self, init_params, *args, **kwargs) -> PolyakSGDState:
        """The state before the first update (evaluates ``fun`` once, for ``aux``)."""
        params = _Params(init_params)
        value, aux = self._value_fun(init_params, *args, **kwargs)
        value_dtype = np.asarray(value).dtype
        if value_dtype.kind != "f":
            value_dtype = np.dtype(np.float64)
        velocity = None
        if self.momentum != 0:
            velocity = params.tree([np.zeros(a.shape, dtype=params.dtype) for a in params.leaves])
        return PolyakSGDState(iter_num=0,
                              error=params.dtype.type(np.inf),
                              value=value_dtype.type(np.inf),
                              aux=aux,
                              stepsize=params.dtype.type(1.0),
                              velocity=velocity,
                              num_fun_eval=1,
                              num_grad_eval=0)

    def update(self, params, state: PolyakSGDState, *args, **kwargs) -> OptStep:
        """One Polyak step from ``params``; returns ``OptStep(new_params, new_state)``.

        ``new_state.value``/``error``/``aux`` are the value, gradient norm and aux at
        ``params`` (before the step), as in jaxopt.
        """
        if self.pre_update is not None:
            params, state = self.pre_update(params, state, *args, **kwargs)
        tree = _Params(params)
        (value, aux), grad = self._value_and_grad(params, *args, **kwargs)
        grads = tree.matching(grad, "gradient")
        dtype = tree.dtype
        sq_norm = squared_norm(grads, dtype)
        if self.nonfinite != "propagate" and not (bool(np.all(np.isfinite(value)))
                                                  and math.isfinite(sq_norm)):
            where = (f"the gradients (squared norm {sq_norm})" if np.all(np.isfinite(value))
                     else f"the loss ({value})")
            if self.nonfinite == "raise":
                raise nonfinite_error("PolyakSGD", where)
            return OptStep(params=params, state=state._replace(
                iter_num=int(state.iter_num) + 1, num_fun_eval=int(state.num_fun_eval) + 1,
                num_grad_eval=int(state.num_grad_eval) + 1,
                nonfinite_skips=int(state.nonfinite_skips) + 1))
        stepsize = polyak_stepsize(value, sq_norm, self.fun_min, self.variant,
                                   self.max_stepsize, self.delta, dtype)
        stepsize = dtype.type(stepsize)
        new_params = tree.copies()
        if self.momentum == 0:
            velocities = None
            new_velocity = None
        else:
            if state.velocity is None:
                velocities = [np.zeros(a.shape, dtype=dtype) for a in tree.leaves]
            else:
                velocities = [np.array(v, dtype=dtype, order="C", copy=True)
                              for v in tree.matching(state.velocity, "velocity")]
        step_(new_params, grads, velocities, stepsize, self.momentum, dtype)
        if velocities is not None:
            new_velocity = tree.tree(velocities)
        value_out = np.asarray(value)
        if value_out.dtype.kind != "f":
            value_out = value_out.astype(np.float64)
        new_state = PolyakSGDState(iter_num=int(state.iter_num) + 1,
                                   error=dtype.type(math.sqrt(sq_norm)),
                                   value=value_out[()],
                                   aux=aux,
                                   stepsize=stepsize,
                                   velocity=new_velocity,
                                   num_fun_eval=int(state.num_fun_eval) + 1,
                                   num_grad_eval=int(state.num_grad_eval) + 1,
                                   nonfinite_skips=int(getattr(state, "nonfinite_skips", 0)))
        if self.verbose:
            print(f"INFO: uniopt.PolyakSGD: Iter: {new_state.iter_num} Gradient Norm (stopping "
                  f"criterion): {new_state.error} Objective Value:{new_state.value}  "
                  f"Stepsize:{stepsize} ")
        return OptStep(params=tree.tree(new_params), state=new_state)

    def run(self, init_params, *args, **kwargs) -> OptStep:
        """Update until the gradient norm is <= ``tol`` or ``maxiter`` updates were made.

        As jaxopt: one update is always made (``state.error`` starts at ``inf``), so the
        returned parameters are one step past the point whose gradient norm met ``tol``;
        ``maxiter=0`` returns ``init_params`` and the initial state.
        """
        state = self.init_state(init_params, *args, **kwargs)
        if int(self.maxiter) == 0:
            return OptStep(params=init_params, state=state)
        params, state = self.update(init_params, state, *args, **kwargs)
        while state.iter_num < self.maxiter and state.error > self.tol:
            params, state = self.update(params, state, *args, **kwargs)
        return OptStep(params=params, state=state)

    def run_iterator(self, init_params, iterator, *args, **kwargs) -> OptStep:
        """Run over mini-batches passed to ``fun`` as ``data=batch`` (jaxopt's semantics).

        The first batch only initialises the state; each of the next (at most ``maxiter``)
        batches makes one update. ``tol`` is not checked. ``iterator`` must be an iterator
        (``iter(list)``, a generator).
        """
        data = next(iterator)
        state = self.init_state(init_params, *args, **kwargs, data=data)
        params = init_params
        for data in itertools.islice(iterator, 0, int(self.maxiter)):
            params, state = self.update(params, state, *args, **kwargs, data=data)
        return OptStep(params=params, state=state)

    def optimality_fun(self, params, *args, **kwargs):
        """The gradient of ``fun`` at ``params`` (zero at a stationary point)."""
        _, grad = self._value_and_grad(params, *args, **kwargs)
        tree = _Params(params)
        return tree.tree(tree.matching(grad, "gradient"))

    def l2_optimality_error(self, params, *args, **kwargs):
        """The L2 norm of :meth:`optimality_fun` (a scalar of the parameters' dtype)."""
        tree = _Params(params)
        _, grad = self._value_and_grad(params, *args, **kwargs)
        return tree.dtype.type(math.sqrt(squared_norm(tree.matching(grad, "gradient"), tree.dtype)))
