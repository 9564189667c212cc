r"""Constrained learning with Lagrange multipliers in JAX: Cooper's concepts, functionally.

The problem is :math:`\min_x f(x)` subject to :math:`g(x) \le 0` and :math:`h(x) = 0`, played
as a min-max game on a Lagrangian. This module is the JAX face of
``uniopt.adapters.torch.constrained`` (Cooper's API, cooper-optim 1.0.1): the same objects as
pytrees and pure functions, so that a whole constrained training step is one ``jax.jit``.

* Multipliers: :class:`DenseMultiplier` (one per constraint) and :class:`IndexedMultiplier`
  (a table read at the observed rows, for many constraints sampled per batch) are immutable
  pytrees holding the ``weight`` array (a leaf) and the :class:`ConstraintType` (static);
  ``value(indices)`` evaluates them and :meth:`~Multiplier.project` keeps inequality
  multipliers non-negative. :class:`DensePenaltyCoefficient` /
  :class:`IndexedPenaltyCoefficient` hold penalty coefficients the same way.
* :class:`ConstraintState` (violation, strict violation, features; the ``contributes_to_*``
  flags static) and :class:`CMPState` (loss, observed constraints by name) are what a user's
  ``compute_cmp_state(params, *args)`` returns; :class:`Constraint` ties a constraint type and
  a formulation to its multiplier and penalty coefficient.
* Formulations :func:`lagrangian`, :func:`quadratic_penalty` and
  :func:`augmented_lagrangian` give ``(primal, dual)`` contributions with Cooper's detach
  rules (``stop_gradient`` on the multiplier in the primal term, on the violation in the dual
  term); :func:`primal_lagrangian` and :func:`dual_lagrangian` sum them.
* Dual optimizers are optax transformations that *ascend* (the dual gradient is the
  violation) and project: :func:`projected_ascent`, :func:`nupi` (``maximize=True``), or any
  optax optimizer turned into an ascent by :func:`as_ascent`. They take the multipliers as
  ``params`` (where the constraint types live) and an optional ``observed`` extra argument
  (which rows of an indexed multiplier were sampled); :func:`projected_ascent` and
  :func:`nupi` also have a row-wise update that :class:`ConstrainedOptimizer` uses for indexed
  multipliers (only the sampled rows are read and written).
* :class:`ConstrainedOptimizer` runs one roll (simultaneous, alternating primal-dual,
  alternating dual-primal, extrapolation) as a pure ``step``; penalty coefficient updaters
  (:class:`MultiplicativePenaltyCoefficientUpdater`,
  :class:`AdditivePenaltyCoefficientUpdater`) are pure too.

The dual-side arithmetic (projection, the fused projected step, nuPI, the penalty updates, the
augmented-Lagrangian term) traces the rules of :mod:`uniopt.rules.constrained` bound to
``jax.numpy``; it is not written again here.

Where this face differs from cooper-optim 1.0.1 on purpose (see ``docs/deviations.md``):
nuPI's ``SGD`` initialisation follows its docstring on dense and indexed multipliers alike
(:math:`\xi_{-1} = e_0`); the augmented Lagrangian at a zero penalty is its limit (the
Lagrangian term), not NaN; a multiplier keeps its ``init``'s dtype unless ``dtype`` is given;
the dual gradient of the augmented Lagrangian is the raw violation, as in Cooper's code (its
docs say the penalty scales it: the classical ALM update needs a dual learning rate equal to
the penalty); in an extrapolation roll the second update receives :math:`x_t` as ``params``
(the point it is applied to), so a weight decay in that update is taken at :math:`x_t`, where
Cooper's ``ExtraSGD`` takes it at the extrapolated point.

References:
  Gallego-Posada, Ramirez, Hashemizadeh & Lacoste-Julien, "Cooper: A Library for Constrained
  Optimization in Deep Learning", 2025, https://arxiv.org/abs/2504.01212.
  Sohrabi, Ramirez, Zhang, Lacoste-Julien & Gallego-Posada, "On PI controllers for updating
  Lagrange multipliers in constrained optimization", ICML 2024,
  https://arxiv.org/abs/2406.04558.
  Nocedal & Wright, *Numerical Optimization* (2006), chapter 17.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import _validation
from uniopt.rules import bind
from uniopt.rules import constrained as _constrained

from ._faults import NonFiniteState, agreed, all_finite, nonfinite_raise, select, with_nonfinite
from ._solver import check_axis_name, mean_over

__all__ = [
    "ConstraintType",
    "Multiplier",
    "DenseMultiplier",
    "IndexedMultiplier",
    "PenaltyCoefficient",
    "DensePenaltyCoefficient",
    "IndexedPenaltyCoefficient",
    "ConstraintState",
    "CMPState",
    "Constraint",
    "lagrangian",
    "quadratic_penalty",
    "augmented_lagrangian",
    "primal_lagrangian",
    "dual_lagrangian",
    "project",
    "observed_rows",
    "ProjectedAscentState",
    "projected_ascent",
    "NuPIInitType",
    "NuPIState",
    "nupi",
    "as_ascent",
    "MultiplicativePenaltyCoefficientUpdater",
    "AdditivePenaltyCoefficientUpdater",
    "RollOut",
    "ConstrainedOptimizerState",
    "ConstrainedOptimizer",
    "ROLLS",
]

_rules = bind(_constrained, where=jnp.where, maximum=jnp.maximum, minimum=jnp.minimum)

#: the roll orders of :class:`ConstrainedOptimizer`
ROLLS = ("simultaneous", "alternating_primal_dual", "alternating_dual_primal", "extrapolation")


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _concrete(value: Any) -> bool:
    """Whether ``value``'s numbers can be read now (not a tracer, not a callable)."""
    return not _traced(value) and not callable(value)


# ----------------------------------------------------------------------------------------------
# Immutable pytree classes: data fields are children, meta fields are static (hashable)
# ----------------------------------------------------------------------------------------------
class _Node:
    """An immutable pytree node; ``_data`` are children, ``_meta`` static aux data."""

    _data: tuple = ()
    _meta: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)

        def flatten_with_keys(obj):
            return (tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in cls._data),
                    tuple(getattr(obj, n) for n in cls._meta))

        def flatten(obj):
            return tuple(getattr(obj, n) for n in cls._data), tuple(getattr(obj, n) for n in cls._meta)

        def unflatten(aux, children):
            return cls._make(**dict(zip(cls._data, children)), **dict(zip(cls._meta, aux)))

        jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)

    @classmethod
    def _make(cls, **fields):
        """An instance with these fields, not validated (``__init__`` is not called)."""
        obj = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(obj, name, value)
        return obj

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace({name}=...)")

    def replace(self, **changes):
        """A copy with some fields replaced (not validated again)."""
        fields = {n: getattr(self, n) for n in self._data + self._meta}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"{type(self).__name__}.replace: unknown field(s) {sorted(unknown)}")
        fields.update(changes)
        return self._make(**fields)


class ConstraintType(enum.Enum):
    """A constraint is an equality :math:`h(x) = 0` or an inequality :math:`g(x) \\le 0`."""

    EQUALITY = enum.auto()
    INEQUALITY = enum.auto()


def _check_constraint_type(value: Any, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, ConstraintType):
        raise TypeError(f"Invalid constraint_type: {value!r} (expected ConstraintType.EQUALITY or "
                        f"ConstraintType.INEQUALITY)")
    return value


def _lower(constraint_type) -> float:
    """The multipliers' lower bound: 0 for inequalities, ``-inf`` otherwise."""
    return 0.0 if constraint_type is ConstraintType.INEQUALITY else -math.inf


def _init_array(init: Any, expected: str):
    """``init`` (of a multiplier or a penalty coefficient) as an array of real numbers.

    JAX arrays and tracers are taken as they are. Anything else goes through NumPy first, with
    Python ints (any size) as floats, so that a value JAX cannot hold, a string, ``None`` or an
    object raises an error naming ``init``, as the torch face's pieces do.

    Raises:
      TypeError: ``init`` is not a real number or an array (or list) of real numbers
        (``Invalid init: ... (expected ...)``).
    """
    if isinstance(init, jax.Array):
        return jnp.asarray(init)
    error = TypeError(f"Invalid init: {init!r} ({expected})")
    try:
        array = np.asarray(init)
        if array.dtype.kind == "O":  # e.g. a Python int beyond int64, or None, or an object
            items = array.ravel().tolist()
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items):
                raise error
            array = array.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        raise error from None
    if array.dtype.kind not in "biuf":  # strings, complex numbers
        raise error
    if array.dtype.kind in "iu":  # as floats: JAX would wrap an int64 into int32
        array = array.astype(np.float64)
    return jnp.asarray(array)


def _float_dtype(dtype: Any, what: str = "dtype"):
    try:
        d = jnp.dtype(dtype)
    except (TypeError, ValueError):  # e.g. a tuple NumPy reads as a structured dtype
        raise TypeError(f"Invalid {what}: {dtype!r} (expected a floating-point dtype)") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise TypeError(f"Invalid {what}: {dtype!r} (expected a floating-point dtype)")
    return d


def _check_indices(indices: Any, who: str):
    if indices is None:
        raise ValueError(f"{who} needs constraint features: the integer indices of the observed "
                         f"constraints")
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"Invalid indices: dtype {indices.dtype} (expected an integer array)")
    return indices


# ----------------------------------------------------------------------------------------------
# Multipliers
# ----------------------------------------------------------------------------------------------
class Multiplier(_Node):
    """Base of the multiplier pytrees: a ``weight`` array (a leaf) and a static
    ``constraint_type`` (``None`` until the multiplier is given to a :class:`Constraint`)."""

    _data = ("weight",)
    _meta = ("constraint_type",)
    expects_constraint_features: bool = False

    def __init__(self, num_constraints: Optional[int] = None, init: Any = None, *,
                 dtype: Any = None, constraint_type: Optional[ConstraintType] = None) -> None:
        if num_constraints is None and init is None:
            raise ValueError("At least one of `num_constraints` and `init` must be provided.")
        if num_constraints is not None:
            num_constraints = _validation.integer("num_constraints", num_constraints, minimum=1)
        if dtype is not None:
            dtype = _float_dtype(dtype)
        if init is None:
            weight = jnp.zeros((num_constraints,), dtype=dtype or jnp.result_type(float))
        else:
            if isinstance(init, (bool, np.bool_)) or not hasattr(init, "shape") and not isinstance(
                    init, (list, tuple)):
                raise TypeError(f"Invalid init: {init!r} (expected a 1-D array of shape "
                                f"(num_constraints,))")
            weight = _init_array(init, "expected a 1-D array of shape (num_constraints,)")
            if weight.ndim != 1:
                raise ValueError(f"Invalid init: shape {tuple(weight.shape)} (expected a 1-D array "
                                 f"of shape (num_constraints,))")
            if num_constraints is not None and weight.shape[0] != num_constraints:
                raise ValueError(f"Invalid init: shape {tuple(weight.shape)} is inconsistent with "
                                 f"num_constraints={num_constraints}")
            if dtype is None:
                dtype = (weight.dtype if jnp.issubdtype(weight.dtype, jnp.floating)
                         else jnp.result_type(float))
            weight = weight.astype(dtype)
            if _concrete(weight) and not bool(jnp.all(jnp.isfinite(weight))):
                raise ValueError("Invalid init: not every value is finite")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "constraint_type", _check_constraint_type(constraint_type, True))
        self.sanity_check()

    def sanity_check(self) -> None:
        """An inequality multiplier must be non-negative (ValueError otherwise)."""
        if (self.constraint_type is ConstraintType.INEQUALITY and _concrete(self.weight)
                and bool(jnp.any(self.weight < 0))):
            raise ValueError(f"Invalid init: an inequality multiplier must be non-negative, got "
                             f"minimum {float(jnp.min(self.weight))}")

    @property
    def num_constraints(self) -> int:
        return int(self.weight.shape[0])

    @property
    def lower(self) -> float:
        """The lower bound of the feasible multipliers (0 for inequalities, else ``-inf``)."""
        return _lower(self.constraint_type)

    def with_constraint_type(self, constraint_type: ConstraintType):
        """This multiplier, typed (its values checked against the type)."""
        out = self.replace(constraint_type=_check_constraint_type(constraint_type))
        out.sanity_check()
        return out

    def project(self):
        """The projection onto the feasible set: ``max(weight, 0)`` for an inequality
        multiplier, itself otherwise (Cooper's ``post_step_``)."""
        if self.constraint_type is not ConstraintType.INEQUALITY:
            return self
        return self.replace(weight=_rules.projected(self.weight, jnp.zeros((), self.weight.dtype)))

    def value(self, indices: Any = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, indices: Any = None):
        return self.value(indices)

    def __repr__(self) -> str:
        shape = getattr(self.weight, "shape", None)
        n = shape[0] if shape else "?"
        return f"{type(self).__name__}(num_constraints={n})"


class DenseMultiplier(Multiplier):
    r"""One multiplier per constraint, all read at every step.

    Args:
      num_constraints: the number of constraints :math:`m` (or give ``init``).
      init: the initial values, a 1-D array of shape ``(m,)`` (default zeros).
      dtype: the weight's dtype; by default ``init``'s (a float ``init``), else JAX's default
        float dtype. (Cooper casts a float64 ``init`` to float32 unless ``dtype`` is given.)
      constraint_type: usually left ``None``: :class:`Constraint` sets it.

    Raises:
      ValueError: neither ``num_constraints`` nor ``init``, an ``init`` that is not 1-D or not
        of length ``num_constraints``, non-finite values, a negative inequality multiplier.
      TypeError: a non-integer ``num_constraints``, a non-float ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import DenseMultiplier, ConstraintType
      >>> lam = DenseMultiplier(init=jnp.array([0.5, 0.0]),
      ...                       constraint_type=ConstraintType.INEQUALITY)
      >>> lam.value().tolist()
      [0.5, 0.0]
    """

    expects_constraint_features = False

    def value(self, indices: Any = None):
        """The multipliers, all of them (``indices`` must be ``None``)."""
        if indices is not None:
            raise ValueError("DenseMultiplier takes no constraint features (use IndexedMultiplier)")
        return self.weight


class IndexedMultiplier(Multiplier):
    r"""A table of multipliers read at the observed rows, ``weight[indices]``.

    Its gradient is a scatter-add at ``indices`` (duplicates summed, as torch's sparse COO
    gradient of Cooper's ``IndexedMultiplier``), so a dual step moves only the sampled rows.
    The weight is 1-D (Cooper keeps an ``(m, 1)`` table).

    Args: as :class:`DenseMultiplier`; an empty ``init`` is a ValueError (no row to index).

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import IndexedMultiplier
      >>> lam = IndexedMultiplier(init=jnp.array([1.0, 2.0, 3.0]))
      >>> lam.value(jnp.array([2, 0])).tolist()
      [3.0, 1.0]
    """

    expects_constraint_features = True

    def __init__(self, num_constraints: Optional[int] = None, init: Any = None, *,
                 dtype: Any = None, constraint_type: Optional[ConstraintType] = None) -> None:
        super().__init__(num_constraints, init, dtype=dtype, constraint_type=constraint_type)
        if self.weight.shape[0] == 0:  # every index would be out of range (found by the fuzz)
            raise ValueError(f"Invalid init: shape {tuple(self.weight.shape)} (an "
                             f"IndexedMultiplier needs at least one row to index)")

    def value(self, indices: Any = None):
        """The multipliers at the integer ``indices``."""
        return self.weight[_check_indices(indices, type(self).__name__)]


def _is_multiplier(node: Any) -> bool:
    return isinstance(node, Multiplier)


def project(tree: Any) -> Any:
    """Every multiplier in ``tree`` projected (inequality ones clamped at 0), the rest as is.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import DenseMultiplier, ConstraintType, project
      >>> lam = DenseMultiplier(init=jnp.array([0.5, 0.0]),
      ...                       constraint_type=ConstraintType.INEQUALITY)
      >>> project({"g": lam.replace(weight=jnp.array([-1.0, 2.0]))})["g"].weight.tolist()
      [0.0, 2.0]
    """
    return jax.tree.map(lambda m: m.project() if _is_multiplier(m) else m, tree,
                        is_leaf=_is_multiplier)


def _lowers(params: Any) -> list:
    """One lower bound per leaf of ``params``: the multiplier's (0 / -inf), -inf for others."""
    tree = jax.tree.map(lambda m: m.replace(weight=m.lower) if _is_multiplier(m) else -math.inf,
                        params, is_leaf=_is_multiplier)
    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------------------------
# Penalty coefficients
# ----------------------------------------------------------------------------------------------
class PenaltyCoefficient(_Node):
    """Base of the penalty coefficient pytrees: ``value`` (the current coefficients) and
    ``init`` (kept for restarts), both arrays of at most one dimension, non-negative."""

    _data = ("value", "init")
    expects_constraint_features: bool = False

    def __init__(self, init: Any, *, dtype: Any = None) -> None:
        if isinstance(init, (bool, np.bool_)) or isinstance(init, str) or init is None:
            raise TypeError(f"Invalid init: {init!r} (expected a number or a 0-d or 1-D array)")
        value = _init_array(init, "expected a number or a 0-d or 1-D array")
        if dtype is not None:
            value = value.astype(_float_dtype(dtype))
        elif not jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(jnp.result_type(float))
        if value.ndim > 1:
            raise ValueError(f"Invalid init: shape {tuple(value.shape)} (expected a 0-d or 1-D "
                             f"array)")
        if _concrete(value) and not bool(jnp.all(jnp.isfinite(value) & (value >= 0))):
            raise ValueError(f"Invalid init: {init!r} (penalty coefficients must be finite and "
                             f"non-negative)")
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "init", value)

    def __call__(self, indices: Any = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(init={np.asarray(self.init).tolist()!r})"


class DensePenaltyCoefficient(PenaltyCoefficient):
    """Penalty coefficients read whole: one per constraint, or a single (0-d) one for all.

    Example:
      >>> from uniopt.adapters.jax.constrained import DensePenaltyCoefficient
      >>> float(DensePenaltyCoefficient(2.0)())
      2.0
    """

    def __call__(self, indices: Any = None):
        if indices is not None:
            raise ValueError("DensePenaltyCoefficient takes no constraint features")
        return self.value


class IndexedPenaltyCoefficient(PenaltyCoefficient):
    """Penalty coefficients read at the observed rows (a 0-d value is shared by all rows).

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import IndexedPenaltyCoefficient
      >>> IndexedPenaltyCoefficient(jnp.array([1.0, 2.0, 4.0]))(jnp.array([2, 2])).tolist()
      [4.0, 4.0]
    """

    expects_constraint_features = True

    def __call__(self, indices: Any = None):
        indices = _check_indices(indices, type(self).__name__)
        return self.value if self.value.ndim == 0 else self.value[indices]


# ----------------------------------------------------------------------------------------------
# Constraint states and the CMP state
# ----------------------------------------------------------------------------------------------
class ConstraintState(_Node):
    r"""A constraint's measurement at the current point (a pytree; the flags are static).

    Args:
      violation: :math:`g(x)` or :math:`h(x)` (or a differentiable surrogate), any shape; it
        drives the primal update.
      constraint_features: the indices of the observed rows (indexed multipliers/penalties).
      strict_violation: the (possibly non-differentiable) violation for the dual update and
        the penalty updaters; defaults to ``violation``.
      strict_constraint_features: the features of ``strict_violation``; defaults to
        ``constraint_features``; needs ``strict_violation``.
      contributes_to_primal_update: whether the primal Lagrangian includes this constraint.
      contributes_to_dual_update: whether the dual Lagrangian includes it.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import ConstraintState
      >>> s = ConstraintState(jnp.array(0.3))
      >>> [v.shape for v in s.extract_violations()]
      [(1,), (1,)]
    """

    _data = ("violation", "constraint_features", "strict_violation", "strict_constraint_features")
    _meta = ("contributes_to_primal_update", "contributes_to_dual_update")

    def __init__(self, violation: Any, constraint_features: Any = None,
                 strict_violation: Any = None, strict_constraint_features: Any = None,
                 contributes_to_primal_update: bool = True,
                 contributes_to_dual_update: bool = True) -> None:
        if violation is None:
            raise TypeError("Invalid violation: None (expected an array)")
        if strict_constraint_features is not None and strict_violation is None:
            raise ValueError("`strict_violation` must be provided if `strict_constraint_features` "
                             "is provided.")
        _validation.boolean("contributes_to_primal_update", contributes_to_primal_update)
        _validation.boolean("contributes_to_dual_update", contributes_to_dual_update)
        for name, value in (("violation", violation), ("constraint_features", constraint_features),
                            ("strict_violation", strict_violation),
                            ("strict_constraint_features", strict_constraint_features)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "contributes_to_primal_update", bool(contributes_to_primal_update))
        object.__setattr__(self, "contributes_to_dual_update", bool(contributes_to_dual_update))

    def extract_violations(self) -> tuple:
        """``(violation, strict_violation)``, at least 1-D; the strict one defaults to the
        violation."""
        v = jnp.asarray(self.violation)
        s = v if self.strict_violation is None else jnp.asarray(self.strict_violation)
        return jnp.atleast_1d(v), jnp.atleast_1d(s)

    def extract_constraint_features(self) -> tuple:
        """``(constraint_features, strict_constraint_features)``; the strict ones default to the
        features."""
        strict = (self.constraint_features if self.strict_constraint_features is None
                  else self.strict_constraint_features)
        return self.constraint_features, strict


class CMPState(_Node):
    """The state of a constrained minimisation problem at a point (a pytree).

    Args:
      loss: the objective :math:`f(x)` (a scalar), or ``None``.
      observed_constraints: ``{name: ConstraintState}`` for the constraints measured now; the
        names are those of the constraints mapping given to the formulations/solver.
      misc: anything else the user wants to carry (a pytree).

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import CMPState, ConstraintState
      >>> state = CMPState(loss=jnp.array(1.0), observed_constraints={"g": ConstraintState(
      ...     jnp.array([0.2]))})
      >>> list(state.observed_constraints)
      ['g']
    """

    _data = ("loss", "observed_constraints", "misc")

    def __init__(self, loss: Any = None, observed_constraints: Optional[Mapping] = None,
                 misc: Any = None) -> None:
        observed = {} if observed_constraints is None else observed_constraints
        if not isinstance(observed, Mapping):
            raise TypeError(f"Invalid observed_constraints: {observed!r} (expected a mapping from "
                            f"constraint names to ConstraintState)")
        for name, state in observed.items():
            if not isinstance(state, ConstraintState):
                raise TypeError(f"Invalid observed_constraints[{name!r}]: {state!r} (expected a "
                                f"ConstraintState)")
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "observed_constraints", dict(observed))
        object.__setattr__(self, "misc", misc)


# ----------------------------------------------------------------------------------------------
# Formulations
# ----------------------------------------------------------------------------------------------
def _factor(module, features, shape, is_multiplier: bool):
    """A multiplier's or penalty coefficient's value at ``features``, at least 1-D; a single
    penalty coefficient is broadcast to the violation's ``shape`` (multipliers never are)."""
    value = module(features) if module.expects_constraint_features else module()
    value = jnp.atleast_1d(value)
    if not is_multiplier and value.size == 1 and math.prod(shape) > 1:
        value = jnp.broadcast_to(jnp.reshape(value, (1,) * len(shape)), shape)
    return value


def _prepare(state: ConstraintState, multiplier, penalty, side: str):
    violation, strict = state.extract_violations()
    features, strict_features = state.extract_constraint_features()
    if side == "dual":
        violation, features = strict, strict_features
    lam = None if multiplier is None else _factor(multiplier, features, violation.shape, True)
    c = (None if penalty is None
         else jax.lax.stop_gradient(_factor(penalty, features, violation.shape, False)))
    return violation, lam, c


def _check_state(state):
    if not isinstance(state, ConstraintState):
        raise TypeError(f"Invalid constraint_state: {state!r} (expected a ConstraintState)")


def _need(what: str, value, cls, formulation: str):
    if value is None:
        raise ValueError(f"{formulation} expects a {what} but none was provided.")
    if not isinstance(value, cls):
        raise TypeError(f"Invalid {what.replace(' ', '_')}: {value!r} (expected a {cls.__name__})")


def _weighted(weight, violation):
    return jnp.sum(weight * violation)


def lagrangian(constraint_state: ConstraintState, multiplier: Multiplier,
               penalty_coefficient: None = None, *,
               constraint_type: Optional[ConstraintType] = None) -> tuple:
    r"""The Lagrangian formulation's contributions of one constraint.

    .. math::
       \mathcal{L}_{\text{primal}} = \operatorname{sg}(\lambda)^\top \tilde g(x), \qquad
       \mathcal{L}_{\text{dual}} = \lambda^\top \operatorname{sg}(g(x))

    with :math:`\tilde g` the ``violation``, :math:`g` the ``strict_violation`` and
    :math:`\operatorname{sg}` ``jax.lax.stop_gradient`` (Cooper's detaches), so
    :math:`\nabla_\lambda \mathcal{L}_{\text{dual}} = g`.

    Args:
      constraint_state: the constraint's :class:`ConstraintState`.
      multiplier: its multiplier (read at the constraint features if indexed).
      penalty_coefficient: must be ``None``.
      constraint_type: unused (accepted for a uniform signature).

    Returns:
      ``(primal, dual)``: 0-d arrays, each ``None`` where the state's
      ``contributes_to_primal_update`` / ``contributes_to_dual_update`` is false.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (ConstraintState, DenseMultiplier,
      ...                                              lagrangian)
      >>> lam = DenseMultiplier(init=jnp.array([2.0]))
      >>> primal, dual = lagrangian(ConstraintState(jnp.array([0.5])), lam)
      >>> float(primal), float(dual)
      (1.0, 1.0)
    """
    del constraint_type
    _check_state(constraint_state)
    _need("multiplier", multiplier, Multiplier, "Lagrangian")
    if penalty_coefficient is not None:
        raise ValueError("Received unexpected penalty coefficient for Lagrangian.")
    primal = dual = None
    if constraint_state.contributes_to_primal_update:
        violation, lam, _ = _prepare(constraint_state, multiplier, None, "primal")
        primal = _weighted(jax.lax.stop_gradient(lam), violation)
    if constraint_state.contributes_to_dual_update:
        violation, lam, _ = _prepare(constraint_state, multiplier, None, "dual")
        dual = _weighted(lam, jax.lax.stop_gradient(violation))
    return primal, dual


lagrangian.expects_multiplier = True
lagrangian.expects_penalty_coefficient = False


def _quadratic(c, violation, constraint_type):
    """Half the penalty-weighted squared :func:`~uniopt.rules.constrained.penalty_measure`."""
    measure = _rules.penalty_measure(violation, constraint_type is ConstraintType.INEQUALITY)
    return 0.5 * jnp.sum(c * jnp.square(measure))


def quadratic_penalty(constraint_state: ConstraintState, multiplier: None = None,
                      penalty_coefficient: Optional[PenaltyCoefficient] = None, *,
                      constraint_type: Optional[ConstraintType] = None) -> tuple:
    r"""The quadratic-penalty formulation's contributions of one constraint.

    .. math::
       \mathcal{L}_{\text{primal}} = \tfrac12 c^\top \max(\tilde g(x), 0)^2
       \ \text{(inequality)}, \qquad \tfrac12 c^\top \tilde h(x)^2 \ \text{(equality)};

    no dual contribution (``None``): use it with ``dual_optimizer=None``.

    Args:
      constraint_state: the constraint's :class:`ConstraintState`.
      multiplier: must be ``None``.
      penalty_coefficient: its penalty coefficient :math:`c` (read at the features if indexed).
      constraint_type: the constraint's :class:`ConstraintType` (required).

    Returns:
      ``(primal, None)`` (``primal`` is ``None`` when the state does not contribute to it).

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (ConstraintState, ConstraintType,
      ...     DensePenaltyCoefficient, quadratic_penalty)
      >>> primal, dual = quadratic_penalty(ConstraintState(jnp.array([2.0, -1.0])),
      ...     penalty_coefficient=DensePenaltyCoefficient(3.0),
      ...     constraint_type=ConstraintType.INEQUALITY)
      >>> float(primal), dual
      (6.0, None)
    """
    _check_state(constraint_state)
    if multiplier is not None:
        raise ValueError("Received unexpected multiplier for QuadraticPenalty.")
    _need("penalty coefficient", penalty_coefficient, PenaltyCoefficient, "QuadraticPenalty")
    constraint_type = _check_constraint_type(constraint_type)
    if not constraint_state.contributes_to_primal_update:
        return None, None
    violation, _, c = _prepare(constraint_state, None, penalty_coefficient, "primal")
    return _quadratic(c, violation, constraint_type), None


quadratic_penalty.expects_multiplier = False
quadratic_penalty.expects_penalty_coefficient = True


def augmented_lagrangian(constraint_state: ConstraintState, multiplier: Multiplier,
                         penalty_coefficient: Optional[PenaltyCoefficient] = None, *,
                         constraint_type: Optional[ConstraintType] = None) -> tuple:
    r"""The augmented-Lagrangian formulation's contributions of one constraint.

    .. math::
       \mathcal{L}_{\text{primal}} =
       \sum_i \tfrac{1}{2c_i}\bigl(\max(\lambda_i + c_i \tilde g_i, 0)^2 - \lambda_i^2\bigr)
       \ \text{(inequality)}, \qquad
       \mu^\top \tilde h + \tfrac12 c^\top \tilde h^2 \ \text{(equality)};
       \qquad \mathcal{L}_{\text{dual}} = \lambda^\top \operatorname{sg}(g)

    (multipliers under ``stop_gradient`` in the primal term). An inequality entry with
    :math:`c_i = 0` contributes its limit :math:`\lambda_i \tilde g_i` (Cooper gives NaN).
    The dual gradient is the raw violation :math:`g`, as in Cooper's code: the classical ALM
    update :math:`\lambda \leftarrow [\lambda + c\,g]_+` is :func:`projected_ascent` with a
    learning rate equal to the penalty :math:`c` (Cooper's documentation says the formulation
    scales the dual step by :math:`c`; its code does not, and neither does this).

    Args:
      constraint_state: the constraint's :class:`ConstraintState`.
      multiplier: its multiplier :math:`\lambda` / :math:`\mu`.
      penalty_coefficient: its penalty coefficient :math:`c`.
      constraint_type: the constraint's type; by default the multiplier's.

    Returns:
      ``(primal, dual)``, each ``None`` where the state does not contribute to it.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (ConstraintState, ConstraintType,
      ...     DenseMultiplier, DensePenaltyCoefficient, augmented_lagrangian)
      >>> lam = DenseMultiplier(init=jnp.array([1.0]), constraint_type=ConstraintType.INEQUALITY)
      >>> primal, dual = augmented_lagrangian(ConstraintState(jnp.array([0.5])), lam,
      ...                                     DensePenaltyCoefficient(0.0))
      >>> float(primal), float(dual)        # the c -> 0 limit: the Lagrangian term
      (0.5, 0.5)
    """
    _check_state(constraint_state)
    _need("multiplier", multiplier, Multiplier, "AugmentedLagrangian")
    _need("penalty coefficient", penalty_coefficient, PenaltyCoefficient, "AugmentedLagrangian")
    constraint_type = _check_constraint_type(
        multiplier.constraint_type if constraint_type is None else constraint_type)
    primal = dual = None
    if constraint_state.contributes_to_primal_update:
        violation, lam, c = _prepare(constraint_state, multiplier, penalty_coefficient, "primal")
        lam = jax.lax.stop_gradient(lam)
        if constraint_type is ConstraintType.INEQUALITY:
            primal = jnp.sum(_rules.augmented_ineq_term(lam, c.astype(lam.dtype), violation))
        else:
            primal = _weighted(lam, violation) + _quadratic(c, violation, constraint_type)
    if constraint_state.contributes_to_dual_update:
        violation, lam, _ = _prepare(constraint_state, multiplier, None, "dual")
        dual = _weighted(lam, jax.lax.stop_gradient(violation))
    return primal, dual


augmented_lagrangian.expects_multiplier = True
augmented_lagrangian.expects_penalty_coefficient = True

_FORMULATIONS = {lagrangian: "Lagrangian", quadratic_penalty: "QuadraticPenalty",
                 augmented_lagrangian: "AugmentedLagrangian"}


class Constraint(_Node):
    r"""A constraint: its type, its formulation and the dual objects the formulation needs.

    A pytree whose children are the multiplier and the penalty coefficient (``None`` where the
    formulation has none); the type and formulation are static.

    Args:
      constraint_type: :class:`ConstraintType`.
      formulation: :func:`lagrangian` (default), :func:`augmented_lagrangian` or
        :func:`quadratic_penalty`.
      multiplier: a :class:`Multiplier` (its type is set to ``constraint_type``), iff the
        formulation expects one.
      penalty_coefficient: a :class:`PenaltyCoefficient`, iff the formulation expects one.

    Raises:
      TypeError: a ``constraint_type`` that is not a :class:`ConstraintType`, an unknown
        ``formulation``, a multiplier/penalty of the wrong class.
      ValueError: a missing or unexpected multiplier / penalty coefficient (Cooper's
        messages), a negative inequality multiplier, a multiplier typed otherwise.

    Example:
      >>> from uniopt.adapters.jax.constrained import (Constraint, ConstraintType,
      ...                                              DenseMultiplier)
      >>> c = Constraint(ConstraintType.INEQUALITY, multiplier=DenseMultiplier(2))
      >>> c.multiplier.constraint_type is ConstraintType.INEQUALITY
      True
    """

    _data = ("multiplier", "penalty_coefficient")
    _meta = ("constraint_type", "formulation")

    def __init__(self, constraint_type: ConstraintType, formulation: Callable = lagrangian,
                 multiplier: Optional[Multiplier] = None,
                 penalty_coefficient: Optional[PenaltyCoefficient] = None) -> None:
        _check_constraint_type(constraint_type)
        if not callable(formulation) or formulation not in _FORMULATIONS:
            raise TypeError(f"Invalid formulation: {formulation!r} (expected lagrangian, "
                            f"augmented_lagrangian or quadratic_penalty)")
        name = _FORMULATIONS[formulation]
        if formulation.expects_multiplier and multiplier is None:
            raise ValueError(f"{name} expects a multiplier but none was provided.")
        if not formulation.expects_multiplier and multiplier is not None:
            raise ValueError(f"Received unexpected multiplier for {name}.")
        if formulation.expects_penalty_coefficient and penalty_coefficient is None:
            raise ValueError(f"{name} expects a penalty coefficient but none was provided.")
        if not formulation.expects_penalty_coefficient and penalty_coefficient is not None:
            raise ValueError(f"Received unexpected penalty coefficient for {name}.")
        if multiplier is not None:
            if not isinstance(multiplier, Multiplier):
                raise TypeError(f"Invalid multiplier: {multiplier!r} (expected a Multiplier)")
            if multiplier.constraint_type not in (None, constraint_type):
                raise ValueError(f"Invalid multiplier: typed {multiplier.constraint_type} for a "
                                 f"{constraint_type} constraint")
            multiplier = multiplier.with_constraint_type(constraint_type)
        if penalty_coefficient is not None and not isinstance(penalty_coefficient,
                                                              PenaltyCoefficient):
            raise TypeError(f"Invalid penalty_coefficient: {penalty_coefficient!r} (expected a "
                            f"PenaltyCoefficient)")
        for field, value in (("constraint_type", constraint_type), ("formulation", formulation),
                             ("multiplier", multiplier),
                             ("penalty_coefficient", penalty_coefficient)):
            object.__setattr__(self, field, value)

    def contributions(self, constraint_state: ConstraintState) -> tuple:
        """``(primal, dual)`` contributions of this constraint at ``constraint_state``."""
        return self.formulation(constraint_state, self.multiplier, self.penalty_coefficient,
                                constraint_type=self.constraint_type)

    def __repr__(self) -> str:
        return (f"Constraint(constraint_type={self.constraint_type}, formulation="
                f"{_FORMULATIONS[self.formulation]}, multiplier={self.multiplier!r}, "
                f"penalty_coefficient={self.penalty_coefficient!r})")


def _check_constraints(constraints: Any) -> Mapping:
    if not isinstance(constraints, Mapping) or not all(
            isinstance(c, Constraint) for c in constraints.values()):
        raise TypeError(f"Invalid constraints: {constraints!r} (expected a mapping from names to "
                        f"Constraint)")
    return constraints


def _observed(cmp_state: CMPState, constraints: Mapping):
    if not isinstance(cmp_state, CMPState):
        raise TypeError(f"Invalid cmp_state: {cmp_state!r} (expected a CMPState)")
    _check_constraints(constraints)
    for name, state in cmp_state.observed_constraints.items():
        if name not in constraints:
            raise ValueError(f"Invalid observed_constraints: {name!r} is not among the "
                             f"constraints {sorted(constraints)}")
        yield name, constraints[name], state


def primal_lagrangian(cmp_state: CMPState, constraints: Mapping[str, Constraint]):
    r"""The primal Lagrangian: the loss plus the primal contributions of the observed
    constraints (Cooper's ``CMPState.compute_primal_lagrangian``).

    Its gradient in the parameters is the primal update direction; the multipliers are
    constants in it. ``None`` when there is no loss and no contribution.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (CMPState, Constraint, ConstraintState,
      ...     ConstraintType, DenseMultiplier, primal_lagrangian)
      >>> cons = {"g": Constraint(ConstraintType.INEQUALITY,
      ...                         multiplier=DenseMultiplier(init=jnp.array([2.0])))}
      >>> s = CMPState(jnp.array(1.0), {"g": ConstraintState(jnp.array([0.5]))})
      >>> float(primal_lagrangian(s, cons))
      2.0
    """
    total = cmp_state.loss if isinstance(cmp_state, CMPState) else None
    for _, constraint, state in _observed(cmp_state, constraints):
        primal, _ = constraint.contributions(state)
        if primal is not None:
            total = primal if total is None else total + primal
    return total


def dual_lagrangian(cmp_state: CMPState, constraints: Mapping[str, Constraint]):
    r"""The dual Lagrangian: the dual contributions of the observed constraints (no loss);
    ``None`` when no observed constraint contributes to the dual update. Its gradient in the
    multipliers is the (strict) violation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (CMPState, Constraint, ConstraintState,
      ...     ConstraintType, DenseMultiplier, dual_lagrangian)
      >>> cons = {"g": Constraint(ConstraintType.INEQUALITY, multiplier=DenseMultiplier(1))}
      >>> s = CMPState(jnp.array(1.0), {"g": ConstraintState(jnp.array([0.5]))})
      >>> grad = jax.grad(lambda m: dual_lagrangian(s, {"g": cons["g"].replace(multiplier=m)}))
      >>> grad(cons["g"].multiplier).weight.tolist()
      [0.5]
    """
    total = None
    contributes = False
    for _, constraint, state in _observed(cmp_state, constraints):
        contributes = contributes or state.contributes_to_dual_update
        _, dual = constraint.contributions(state)
        if dual is not None:
            total = dual if total is None else total + dual
    if contributes and total is None:
        return jnp.zeros(())
    return total


def observed_rows(cmp_state: CMPState, constraints: Mapping[str, Constraint]) -> dict:
    """Which multiplier entries the dual Lagrangian reads: ``{name: Multiplier}`` with boolean
    weights, as the multipliers of :func:`ConstrainedOptimizer` pass them (``observed``) to the
    dual optimizer. All entries of a dense multiplier of an observed constraint contributing to
    the dual update, the strict features' rows of an indexed one, none otherwise (torch leaves
    their ``.grad`` ``None``).

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (CMPState, Constraint, ConstraintState,
      ...     ConstraintType, IndexedMultiplier, observed_rows)
      >>> cons = {"g": Constraint(ConstraintType.EQUALITY, multiplier=IndexedMultiplier(3))}
      >>> s = CMPState(None, {"g": ConstraintState(jnp.zeros(2), jnp.array([2, 0]))})
      >>> observed_rows(s, cons)["g"].weight.tolist()
      [True, False, True]
    """
    out = {}
    states = dict(cmp_state.observed_constraints)
    for name, constraint in _check_constraints(constraints).items():
        m = constraint.multiplier
        if m is None:
            continue
        state = states.get(name)
        mask = jnp.zeros(m.weight.shape, bool)
        if state is not None and state.contributes_to_dual_update:
            if m.expects_constraint_features:
                _, features = state.extract_constraint_features()
                mask = mask.at[_check_indices(features, type(m).__name__)].set(True)
            else:
                mask = jnp.ones(m.weight.shape, bool)
        out[name] = m.replace(weight=mask)
    return out


# ----------------------------------------------------------------------------------------------
# Dual optimizers (optax transformations that ascend and project)
# ----------------------------------------------------------------------------------------------
def _check_lr(learning_rate):
    if callable(learning_rate) or _traced(learning_rate):
        return
    if isinstance(learning_rate, (jax.Array, np.ndarray)) and learning_rate.ndim == 0:
        learning_rate = float(learning_rate)
    _validation.nonnegative_finite("learning rate", learning_rate)


def _lr_at(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _need_params(params, who):
    if params is None:
        raise ValueError(f"{who}: params (the multipliers being updated) are required, to "
                         f"project them and to keep the constraint types")


def _leaves(updates, *trees):
    leaves, treedef = jax.tree.flatten(updates)
    return treedef, leaves, [None if t is None else treedef.flatten_up_to(t) for t in trees]


def _coalesce(rows, values, m):
    """The distinct entries of ``rows`` (negative ones wrapped, as JAX indexing does; padded
    with ``m``, out of range) and the sum of ``values`` at each: O(k log k) for k rows, whatever
    the table size ``m``. Repeated rows are summed before any step, as a coalesced sparse
    gradient."""
    rows = jnp.reshape(rows, (-1,))
    values = jnp.reshape(values, (-1,))
    rows = jnp.where(rows < 0, rows + m, rows)
    k = rows.shape[0]
    unique, inverse = jnp.unique(rows, size=k, fill_value=m, return_inverse=True)
    summed = jnp.zeros((k,), values.dtype).at[jnp.reshape(inverse, (-1,))].add(values)
    return unique, summed


def _at_rows(a, rows, fill=0):
    """``a[rows]``, ``fill`` for out-of-range rows (the padding of :func:`_coalesce`)."""
    return a.at[rows].get(mode="fill", fill_value=fill)


def _set_rows(a, rows, values):
    """``a`` with ``a[rows] = values``; out-of-range rows dropped."""
    return a.at[rows].set(values, mode="drop")


def _split_rows(params, rows, who):
    """Check the row-wise call and return the multipliers left to the dense path."""
    _need_params(params, who)
    if not isinstance(params, Mapping) or not all(_is_multiplier(m) for m in params.values()):
        raise TypeError(f"{who}.update_rows: params must map names to multipliers")
    unknown = set(rows) - set(params)
    if unknown:
        raise ValueError(f"{who}.update_rows: rows for unknown multipliers {sorted(unknown)}")
    return {n: m for n, m in params.items() if n not in rows}


class ProjectedAscentState(NamedTuple):
    """State of :func:`projected_ascent`: the number of updates (for schedules)."""

    count: jax.Array


def projected_ascent(learning_rate: optax.ScalarOrSchedule, *,
                     nonfinite: str = "propagate") -> optax.GradientTransformationExtraArgs:
    r"""Projected gradient ascent on the multipliers (SGD with ``maximize=True`` and Cooper's
    ``post_step_``, fused).

    .. math::
       \lambda \leftarrow \max(\lambda + \eta_t\, \nabla_\lambda \mathcal{L}_{\text{dual}},\ lo)

    with :math:`lo = 0` for inequality multipliers and :math:`-\infty` for equality ones (and
    for plain arrays). The updates are ``new - params``, so
    :func:`optax.apply_updates` lands on the projected value (non-negative exactly, as
    :func:`optax.keep_params_nonnegative`).

    Args:
      learning_rate: :math:`\eta` (finite, >= 0), a float or an optax schedule.
      nonfinite: (keyword) ``"propagate"`` (default), ``"raise"`` (outside ``jit``) or
        ``"skip"`` (traced; state ``NonFiniteState``, no ``update_rows``): what an update with
        NaN/inf gradients does (docs/faults.md).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update(grads, state, params, *,
      observed=None)`` needs ``params`` (the multipliers); ``observed`` (boolean pytree like
      ``params``, see :func:`observed_rows`) limits the step to the observed entries.
      ``update.update_rows(grads, state, params, *, observed=None, rows)`` is the row-wise
      form :class:`ConstrainedOptimizer` uses: ``params`` maps names to multipliers, ``rows``
      maps some of them to ``(row indices, gradient values)`` (or ``None``: unchanged), which
      change at those rows only (repeats summed first, O(k log k)); it returns the new
      multipliers (not updates) and state.

    Raises:
      ValueError: a negative or non-finite ``learning_rate``; ``update`` without ``params``.
      TypeError: a ``learning_rate`` that is not a number.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax.constrained import (ConstraintType, DenseMultiplier,
      ...                                              projected_ascent)
      >>> lam = DenseMultiplier(init=jnp.array([0.5, 0.5]),
      ...                       constraint_type=ConstraintType.INEQUALITY)
      >>> opt = projected_ascent(1.0)
      >>> u, _ = opt.update(lam.replace(weight=jnp.array([1.0, -2.0])), opt.init(lam), lam)
      >>> optax.apply_updates(lam, u).weight.tolist()
      [1.5, 0.0]
    """
    _check_lr(learning_rate)

    def init_fn(params):
        del params
        return ProjectedAscentState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, observed=None, **extra_args):
        del extra_args
        _need_params(params, "projected_ascent")
        lr = _lr_at(learning_rate, state.count)
        treedef, grads, (ws, obs) = _leaves(updates, params, observed)
        lowers = _lowers(params)
        out = []
        for k, (g, w, lo) in enumerate(zip(grads, ws, lowers)):
            new = _ascent(w, g, lr, lo)
            if obs is not None:
                new = jnp.where(obs[k], new, w)
            out.append(new - w)
        return (treedef.unflatten(out),
                ProjectedAscentState(count=optax.safe_int32_increment(state.count)))

    def update_rows(updates, state, params, *, observed=None, rows):
        """The step on ``params`` (``{name: Multiplier}``) with the multipliers named in
        ``rows`` (``{name: (row indices, gradient values)}``, or ``None``: not observed)
        changed at those rows only, in O(k log k) (repeated rows summed first); the others as
        :func:`update_fn` (``updates``/``observed`` hold those). Returns ``(new params, new
        state)``: new values, not updates, so that no pass over a whole table is needed."""
        dense = _split_rows(params, rows, "projected_ascent")
        new = {}
        if dense:
            u, _ = update_fn(updates, state, dense, observed=observed)
            new.update(optax.apply_updates(dense, u))
        lr = _lr_at(learning_rate, state.count)
        for name, sampled in rows.items():
            m = params[name]
            if sampled is not None:
                at, g = _coalesce(*sampled, m.weight.shape[0])
                step = _ascent(_at_rows(m.weight, at), g, lr, m.lower)
                m = m.replace(weight=_set_rows(m.weight, at, step))
            new[name] = m
        return ({n: new[n] for n in params},
                ProjectedAscentState(count=optax.safe_int32_increment(state.count)))

    update_fn.update_rows = update_rows
    return with_nonfinite(optax.GradientTransformationExtraArgs(init_fn, update_fn), nonfinite,
                          "projected_ascent")


def _ascent(w, g, lr, lo):
    """The fused projected step of one leaf (:func:`uniopt.rules.constrained.sgd_projected`)."""
    return _rules.sgd_projected(w, g.astype(w.dtype), jnp.asarray(lr, w.dtype),
                                jnp.asarray(lo, w.dtype))


class NuPIInitType(enum.Enum):
    r"""nuPI's initialisation of :math:`\xi_{-1}`: ``ZEROS`` (:math:`\xi_{-1} = 0`, a first
    step of :math:`(K_I + K_P(1-\nu)) e_0`) or ``SGD`` (:math:`\xi_{-1} = e_0`, a first step
    of :math:`K_I e_0`)."""

    ZEROS = 0
    SGD = 1


def _check_init_type(init_type):
    """``init_type`` as a :class:`NuPIInitType` (uniopt's policy: a member named ``SGD`` or
    ``ZEROS`` of any nuPI enum, or the strings ``"sgd"``/``"zeros"``; Cooper's message)."""
    return NuPIInitType[_validation.nupi_init_type(init_type)]


class NuPIState(NamedTuple):
    r"""State of :func:`nupi`.

    Attributes:
      count: the number of updates (for schedules).
      xi: the smoothed error :math:`\xi` (zeros at init), like the params.
      fresh: booleans like the params: entries not yet updated (``SGD`` initialisation: their
        first step is :math:`K_I e_0` and sets :math:`\xi_0 = e_0`); all false under ``ZEROS``.
    """

    count: jax.Array
    xi: optax.Updates
    fresh: optax.Updates


def _check_nupi(weight_decay, Kp, Ki, ema_nu, init_type, maximize):
    """nuPI's checks: uniopt's one policy (the torch and NumPy faces' messages and Cooper's
    warnings) where the values are concrete; traced ones are checked where they are known."""
    values = (weight_decay, Kp, Ki, ema_nu)
    if all(_concrete(v) for v in values):
        _validation.check_nupi(0.0, weight_decay, Kp, Ki, ema_nu, init_type, maximize)
    else:  # e.g. traced by optax.inject_hyperparams: check the concrete ones
        if _concrete(weight_decay):
            _validation.nonnegative_finite("weight_decay value", weight_decay)
        if _concrete(ema_nu) and not -1.0 < _validation.real("nu value", ema_nu) < 1.0:
            raise ValueError(f"Invalid nu value: {ema_nu}")
        for what, gain in (("Kp value", Kp), ("Ki value", Ki)):
            if _concrete(gain):
                _validation._gain(what, gain)
    return _check_init_type(init_type), _validation.boolean("maximize value", maximize)


def _check_gain_shapes(params, **gains):
    """Each gain (``Kp``, ``Ki``) must broadcast to every leaf of ``params`` without changing
    the leaf's shape: known only at ``init``, where the multipliers are seen.

    Raises:
      ValueError: ``Invalid Kp value: shape (2,) does not broadcast to a leaf of shape (3,)``.
    """
    for leaf in jax.tree.leaves(params):
        for name, gain in gains.items():
            gain_shape, leaf_shape = tuple(np.shape(gain)), tuple(jnp.shape(leaf))
            try:
                fits = np.broadcast_shapes(gain_shape, leaf_shape) == leaf_shape
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(f"Invalid {name} value: shape {gain_shape} does not broadcast "
                                 f"to a leaf of shape {leaf_shape}")


def nupi(learning_rate: optax.ScalarOrSchedule, weight_decay: Any = 0.0, Kp: Any = 0.0,
         Ki: Any = 1.0, ema_nu: Any = 0.0, init_type: Any = NuPIInitType.SGD,
         maximize: bool = False, *,
         nonfinite: str = "propagate") -> optax.GradientTransformationExtraArgs:
    r"""The nuPI controller (Sohrabi et al., 2024) as an optax transformation.

    With the error :math:`e_t` the incoming gradient (for multipliers: the violation),

    .. math::
       \xi_t = \nu \xi_{t-1} + (1-\nu) e_t, \qquad
       \theta_{t+1} = \theta_t \pm \eta_t \bigl(K_I e_t + K_P(\xi_t - \xi_{t-1})\bigr)
       - \eta_t w \theta_t

    (``+`` with ``maximize``), projected onto :math:`\theta \ge 0` for inequality multipliers
    found in ``params``. :math:`\eta, w, K_P, K_I, \nu` = ``learning_rate``,
    ``weight_decay`` (decoupled, as AdamW), ``Kp``, ``Ki``, ``ema_nu``. ``init_type``:
    ``ZEROS`` takes :math:`\xi_{-1} = 0`; ``SGD`` takes :math:`\xi_{-1} = e_0`, so an entry's
    first step is :math:`K_I e_0` (SGD's) and :math:`\xi_0 = e_0`, as Cooper's docstring says,
    on dense and indexed multipliers alike. (Cooper's dense path sets :math:`\xi_0 = 0` and its
    sparse path :math:`\xi_0 = (1-\nu)e_0`: both disagree with its docstring from the second
    step.) ``nupi(lr, Kp=0, Ki=1, ema_nu=0)`` is SGD; ``Kp=Ki=1, ema_nu=0`` is the optimistic
    gradient method.

    The extra argument ``observed`` (booleans like ``params``, see :func:`observed_rows`)
    restricts the step to the observed entries, as Cooper's sparse path: the others keep their
    value, :math:`\xi` and freshness, and are not decayed. With scalar gains,
    ``update.update_rows`` is the row-wise form (see :func:`projected_ascent`): the error of a
    sampled row is the sum of its violations, and only those rows of the value, :math:`\xi`
    and the freshness are read and written.

    Args:
      learning_rate: :math:`\eta` (finite, >= 0), a float or an optax schedule.
      weight_decay: :math:`w` (finite, >= 0).
      Kp: proportional gain :math:`K_P` (finite; a scalar, or an array broadcasting to each
        leaf); also with several leaves (Cooper refuses a scalar ``Kp`` with several param
        groups).
      Ki: integral gain :math:`K_I` (finite).
      ema_nu: :math:`\nu \in (-1, 1)`.
      init_type: :class:`NuPIInitType` or ``"sgd"`` / ``"zeros"``.
      maximize: ascend (``True``: the dual side) instead of descend.
      nonfinite: (keyword) ``"propagate"`` (default), ``"raise"`` (outside ``jit``) or
        ``"skip"`` (traced; state ``NonFiniteState``, no ``update_rows``): what an update with
        NaN/inf gradients does (docs/faults.md).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state :class:`NuPIState`;
      ``update(grads, state, params, *, observed=None)`` needs ``params``.

    Raises:
      ValueError: a negative or non-finite ``learning_rate``/``weight_decay``, ``ema_nu``
        outside (-1, 1), non-finite gains, an unknown ``init_type``; at ``init``, a gain
        whose shape does not broadcast to a leaf's shape.
      TypeError: a value that is not a number, a ``maximize`` that is not a bool.

    The checks, messages and warnings (negative gains, all-zero gains, a negative ``ema_nu``)
    are the torch face's (``uniopt._validation.check_nupi``, Cooper's).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax.constrained import nupi
      >>> opt = nupi(1.0, Kp=1.0, Ki=1.0, maximize=True)   # SGD init, nu = 0
      >>> x = jnp.zeros(1); state = opt.init(x)
      >>> for e in (1.0, 2.0):
      ...     u, state = opt.update(jnp.array([e]), state, x)
      ...     x = optax.apply_updates(x, u)
      >>> x.tolist()        # K_I e_0 + (K_I e_1 + K_P (e_1 - e_0)) = 1 + 3
      [4.0]
    """
    _check_lr(learning_rate)
    init_type, maximize = _check_nupi(weight_decay, Kp, Ki, ema_nu, init_type, maximize)
    sgd_init = init_type is NuPIInitType.SGD

    def leaf(e, w, xi, fresh, lo, lr):
        """``(new value, new xi)`` of one leaf (or of its sampled rows): the rules of
        :mod:`uniopt.rules.constrained`, in the leaf's dtype."""
        dt = w.dtype
        e = e.astype(dt)
        lr_k = jnp.asarray(lr, dt)
        ki, kp, nu_k = (jnp.asarray(v, dt) for v in (Ki, Kp, ema_nu))
        one_minus_nu = 1 - nu_k
        direction = _rules.nupi_direction(e, xi, fresh, ki, kp * one_minus_nu)
        new = _rules.nupi_param(w, direction, lr_k if maximize else -lr_k,
                                lr_k * jnp.asarray(weight_decay, dt), jnp.asarray(lo, dt))
        return new, _rules.nupi_average(xi, e, fresh, nu_k, one_minus_nu)

    def init_fn(params):
        _check_gain_shapes(params, Kp=Kp, Ki=Ki)
        return NuPIState(count=jnp.zeros([], jnp.int32), xi=optax.tree.zeros_like(params),
                         fresh=jax.tree.map(lambda p: jnp.full(jnp.shape(p), sgd_init), params))

    def update_fn(updates, state, params=None, *, observed=None, **extra_args):
        del extra_args
        _need_params(params, "nupi")
        lr = _lr_at(learning_rate, state.count)
        treedef, errors, (ws, xis, freshes, obs) = _leaves(updates, params, state.xi, state.fresh,
                                                           observed)
        lowers = _lowers(params)
        out, new_xis, new_fresh = [], [], []
        for k, (e, w, xi, fresh, lo) in enumerate(zip(errors, ws, xis, freshes, lowers)):
            new, new_xi = leaf(e, w, xi, fresh, lo, lr)
            now_fresh = jnp.zeros_like(fresh)
            if obs is not None:
                new = jnp.where(obs[k], new, w)
                new_xi = jnp.where(obs[k], new_xi, xi)
                now_fresh = fresh & ~obs[k]
            out.append(new - w)
            new_xis.append(new_xi.astype(xi.dtype))
            new_fresh.append(now_fresh)
        return treedef.unflatten(out), NuPIState(count=optax.safe_int32_increment(state.count),
                                                 xi=treedef.unflatten(new_xis),
                                                 fresh=treedef.unflatten(new_fresh))

    def update_rows(updates, state, params, *, observed=None, rows):
        """As ``projected_ascent(...).update.update_rows``: the multipliers named in ``rows``
        (and their xi and freshness) change at the sampled rows only, in O(k log k), the error
        of a repeated row being the sum of its violations; the others as :func:`update_fn`."""
        dense = _split_rows(params, rows, "nupi")
        new, xi, fresh = {}, dict(state.xi), dict(state.fresh)
        if dense:
            sub = NuPIState(state.count, {n: xi[n] for n in dense}, {n: fresh[n] for n in dense})
            u, sub = update_fn(updates, sub, dense, observed=observed)
            new.update(optax.apply_updates(dense, u))
            xi.update(sub.xi)
            fresh.update(sub.fresh)
        lr = _lr_at(learning_rate, state.count)
        for name, sampled in rows.items():
            m = params[name]
            if sampled is not None:
                at, e = _coalesce(*sampled, m.weight.shape[0])
                x, f = xi[name].weight, fresh[name].weight
                value, x_rows = leaf(e, _at_rows(m.weight, at), _at_rows(x, at),
                                     _at_rows(f, at, False), m.lower, lr)
                m = m.replace(weight=_set_rows(m.weight, at, value))
                xi[name] = xi[name].replace(weight=_set_rows(x, at, x_rows.astype(x.dtype)))
                fresh[name] = fresh[name].replace(weight=_set_rows(f, at, False))
            new[name] = m
        return ({n: new[n] for n in params},
                NuPIState(count=optax.safe_int32_increment(state.count),
                          xi={n: xi[n] for n in params}, fresh={n: fresh[n] for n in params}))

    if jnp.ndim(Kp) == 0 and jnp.ndim(Ki) == 0:  # per-entry gains: the dense path only
        update_fn.update_rows = update_rows
    return with_nonfinite(optax.GradientTransformationExtraArgs(init_fn, update_fn), nonfinite,
                          "nupi")


def as_ascent(transformation: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """An optax optimizer turned into an ascent: the gradients are negated before it, as
    torch's ``maximize=True`` does (so ``as_ascent(optax.sgd(lr))`` is Cooper's dual SGD).
    Extra arguments (``observed``) are accepted and ignored; unobserved entries get zero
    gradients (which a stateful optimizer such as Adam still counts, where torch skips a
    ``None`` gradient). :class:`ConstrainedOptimizer` projects the multipliers after it.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax.constrained import as_ascent
      >>> opt = as_ascent(optax.sgd(0.5))
      >>> u, _ = opt.update(jnp.array([2.0]), opt.init(jnp.zeros(1)))
      >>> u.tolist()
      [1.0]
    """
    if not isinstance(transformation, optax.GradientTransformation) and not (
            hasattr(transformation, "init") and hasattr(transformation, "update")):
        raise TypeError(f"Invalid transformation: {transformation!r} (expected an optax "
                        f"GradientTransformation)")
    return optax.chain(optax.scale(-1.0), transformation)


# ----------------------------------------------------------------------------------------------
# Penalty coefficient updaters
# ----------------------------------------------------------------------------------------------
def _should_update(constraint: Constraint, state: ConstraintState) -> bool:
    """Cooper's routing: multiplier formulations update on a dual contribution, or on a primal
    one with a strict violation; primal-only formulations on a primal contribution."""
    if constraint.formulation.expects_multiplier:
        return state.contributes_to_dual_update or (
            state.contributes_to_primal_update and state.strict_violation is not None)
    return state.contributes_to_primal_update


@dataclasses.dataclass(frozen=True)
class _FeasibilityDrivenUpdater:
    violation_tolerance: float = 1e-4
    has_restart: bool = True

    def _check(self, kind="additive", growth_factor=1.0, increment=0.0):
        # uniopt's one policy (the torch and NumPy faces' messages; Cooper's sentence kept)
        _validation.check_penalty_updater(kind, growth_factor, increment, self.violation_tolerance,
                                          self.has_restart)

    def _factor_increment(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_penalty_coefficient(self, constraint: Constraint,
                                   constraint_state: ConstraintState) -> Constraint:
        """``constraint`` with its penalty coefficient updated from ``constraint_state``."""
        penalty = constraint.penalty_coefficient
        _, strict = constraint_state.extract_violations()
        _, features = constraint_state.extract_constraint_features()
        strict = jax.lax.stop_gradient(strict)
        indexed = isinstance(penalty, IndexedPenaltyCoefficient)
        rows = _check_indices(features, "IndexedPenaltyCoefficient") if indexed else None
        scalar = penalty.value.ndim == 0
        current = penalty.value if (scalar or not indexed) else penalty.value[rows]
        init = penalty.init if (scalar or not indexed) else penalty.init[rows]
        is_ineq = constraint.constraint_type is ConstraintType.INEQUALITY
        measure = _rules.penalty_measure(strict, is_ineq)
        if scalar:
            measure = jnp.linalg.norm(measure)
        dt = current.dtype
        factor, increment = self._factor_increment()
        new = _rules.penalty_update(current, init, measure.astype(dt),
                                    jnp.asarray(self.violation_tolerance, dt),
                                    jnp.asarray(factor, dt), jnp.asarray(increment, dt),
                                    jnp.asarray(self.has_restart and is_ineq))
        value = penalty.value.at[rows].set(new) if (indexed and not scalar) else new
        return constraint.replace(penalty_coefficient=penalty.replace(value=value))

    def step(self, constraints: Mapping[str, Constraint],
             observed_constraints: Mapping[str, ConstraintState]) -> dict:
        """The constraints with the penalty coefficients of the observed ones updated (a new
        dict; pure, jit-able). Cooper's ``updater.step(cmp_state.observed_constraints)``."""
        out = dict(_check_constraints(constraints))
        for name, state in observed_constraints.items():
            if name not in out:
                raise ValueError(f"Invalid observed_constraints: {name!r} is not among the "
                                 f"constraints {sorted(out)}")
            constraint = out[name]
            if constraint.penalty_coefficient is None or not _should_update(constraint, state):
                continue
            out[name] = self.update_penalty_coefficient(constraint, state)
        return out


@dataclasses.dataclass(frozen=True)
class MultiplicativePenaltyCoefficientUpdater(_FeasibilityDrivenUpdater):
    r"""Grow a penalty coefficient by ``growth_factor`` where its constraint is violated.

    For each observed constraint with a penalty coefficient (Cooper's routing): with the
    strict violation :math:`v` (:math:`\max(v, 0)` for inequalities), the measure is
    :math:`|v_i|` per entry, or :math:`\|v\|_2` for a single (0-d) coefficient;
    :math:`c \leftarrow c\,\kappa` where the measure exceeds ``violation_tolerance``; with
    ``has_restart``, an inequality entry with measure 0 returns to its initial value. An
    indexed coefficient changes only at the observed rows. (Nocedal & Wright, Alg. 17.4.)

    Args:
      growth_factor: :math:`\kappa` (finite, > 0).
      violation_tolerance: the tolerance (finite, >= 0).
      has_restart: restart satisfied inequality constraints.

    Example:
      >>> import jax.numpy as jnp
      >>> from uniopt.adapters.jax.constrained import (Constraint, ConstraintState,
      ...     ConstraintType, DenseMultiplier, DensePenaltyCoefficient, augmented_lagrangian,
      ...     MultiplicativePenaltyCoefficientUpdater)
      >>> cons = {"g": Constraint(ConstraintType.INEQUALITY, augmented_lagrangian,
      ...     DenseMultiplier(2), DensePenaltyCoefficient(jnp.array([1.0, 1.0])))}
      >>> up = MultiplicativePenaltyCoefficientUpdater(growth_factor=2.0)
      >>> new = up.step(cons, {"g": ConstraintState(jnp.array([0.5, -0.5]))})
      >>> new["g"].penalty_coefficient.value.tolist()
      [2.0, 1.0]
    """

    growth_factor: float = 1.01
    violation_tolerance: float = 1e-4
    has_restart: bool = True

    def __post_init__(self):
        self._check("multiplicative", growth_factor=self.growth_factor)

    def _factor_increment(self):
        return self.growth_factor, 0.0


@dataclasses.dataclass(frozen=True)
class AdditivePenaltyCoefficientUpdater(_FeasibilityDrivenUpdater):
    r"""Grow a penalty coefficient by ``increment`` where its constraint is violated
    (:math:`c \leftarrow c + \delta`); otherwise as
    :class:`MultiplicativePenaltyCoefficientUpdater`.

    Args:
      increment: :math:`\delta` (finite, >= 0).
      violation_tolerance: the tolerance (finite, >= 0).
      has_restart: restart satisfied inequality constraints.

    Example:
      >>> from uniopt.adapters.jax.constrained import AdditivePenaltyCoefficientUpdater
      >>> AdditivePenaltyCoefficientUpdater(increment=0.5).increment
      0.5
    """

    increment: float = 1.0
    violation_tolerance: float = 1e-4
    has_restart: bool = True

    def __post_init__(self):
        self._check("additive", increment=self.increment)

    def _factor_increment(self):
        return 1.0, self.increment


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
class RollOut(NamedTuple):
    """What :meth:`ConstrainedOptimizer.step` reports (Cooper's ``RollOut``, with values).

    Attributes:
      loss: the loss (see each roll for the point).
      cmp_state: the :class:`CMPState` (see each roll for the point).
      primal_lagrangian: the primal Lagrangian that gave the primal gradient.
      dual_lagrangian: the dual Lagrangian that gave the dual gradient (``None`` without one,
        and always ``None`` without a dual optimizer, as the torch face's
        ``UnconstrainedOptimizer``).
    """

    loss: Any
    cmp_state: CMPState
    primal_lagrangian: Any
    dual_lagrangian: Any


class ConstrainedOptimizerState(NamedTuple):
    """State of :class:`ConstrainedOptimizer`: the primal and dual optimizers' states."""

    primal: Any
    dual: Any


def _multipliers(constraints: Mapping) -> dict:
    return {name: c.multiplier for name, c in constraints.items() if c.multiplier is not None}


def _with_multipliers(constraints: Mapping, multipliers: Mapping) -> dict:
    return {name: (c.replace(multiplier=multipliers[name]) if name in multipliers else c)
            for name, c in constraints.items()}


def _synced(cmp_state: CMPState, axis_name: Any) -> CMPState:
    """``cmp_state`` with its loss and violations averaged over the devices of ``axis_name``
    (``shard_map`` data parallelism: each device measured its batch shard); ``misc`` stays."""
    if axis_name is None:
        return cmp_state
    observed = {}
    for name, state in cmp_state.observed_constraints.items():
        if state.constraint_features is not None or state.strict_constraint_features is not None:
            raise ValueError(f"ConstrainedOptimizer: axis_name={axis_name!r} averages constraint "
                             f"values over devices, but constraint {name!r} has constraint "
                             f"features (indexed multipliers or penalty coefficients are not "
                             f"supported with axis_name)")
        strict = state.strict_violation
        observed[name] = state.replace(
            violation=mean_over(jnp.asarray(state.violation), axis_name),
            strict_violation=None if strict is None else mean_over(jnp.asarray(strict), axis_name))
    loss = cmp_state.loss
    return cmp_state.replace(loss=None if loss is None else mean_over(jnp.asarray(loss), axis_name),
                             observed_constraints=observed)


def _check_transformation(what, value, optional=False):
    if value is None and optional:
        return
    if not (hasattr(value, "init") and hasattr(value, "update")):
        raise TypeError(f"Invalid {what}: {value!r} (expected an optax GradientTransformation)")


@dataclasses.dataclass(frozen=True, eq=False)
class ConstrainedOptimizer:
    r"""One constrained training step (Cooper's ``roll``) as a pure function.

    ``compute_cmp_state(params, *args, **kwargs) -> CMPState`` measures the problem; the
    ``constraints`` mapping (``{name: Constraint}``, the same names as the CMP state's
    ``observed_constraints``) holds the multipliers and penalty coefficients. One
    :meth:`step` takes :math:`(x_t, \lambda_t)` to :math:`(x_{t+1}, \lambda_{t+1})`:

    * ``"simultaneous"``: both gradients at :math:`(x_t, \lambda_t)`, then both steps.
    * ``"alternating_primal_dual"``: primal step from :math:`(x_t, \lambda_t)`; the dual
      gradient at :math:`x_{t+1}` (``compute_violations(params, *args, **kwargs)`` if given
      -- its ``loss`` must be ``None`` -- else ``compute_cmp_state``); dual step. The roll-out
      holds the state at :math:`x_{t+1}` (its loss, or :math:`f(x_t)` if ``None``).
    * ``"alternating_dual_primal"``: dual step from the state at :math:`x_t`; the primal
      gradient at :math:`(x_t, \lambda_{t+1})`.
    * ``"extrapolation"``: both steps from :math:`(x_t, \lambda_t)` to a half point
      :math:`(x_{t+1/2}, \lambda_{t+1/2})` (projected), then both gradients there applied to
      :math:`(x_t, \lambda_t)` with the optimizers' states carried on (as Cooper's
      ``ExtraSGD``/``ExtraAdam``: any optax optimizer works here). The second update gets
      :math:`x_t` as ``params``. The roll-out is the first evaluation's.

    The dual optimizer receives :math:`\nabla_\lambda \mathcal{L}_{\text{dual}}` (the
    violations) with the multipliers (``{name: Multiplier}``) as ``params`` and the
    ``observed`` rows (:func:`observed_rows`) as an extra argument, and must *ascend*:
    :func:`projected_ascent`, :func:`nupi` with ``maximize=True``, or ``as_ascent(tx)``. The
    multipliers are projected after every dual step (Cooper's ``post_step_``). With
    ``dual_optimizer=None`` (e.g. only :func:`quadratic_penalty` constraints) the step is
    primal only (Cooper's ``UnconstrainedOptimizer``).

    Indexed multipliers under :func:`projected_ascent` or :func:`nupi` (scalar gains) take a
    row-wise step: their dual gradient (the strict violation at the strict features' rows) is
    read directly, repeated rows are summed (a sort of the k sampled rows), and the step and
    the projection read and write only those rows (``update.update_rows``): no computation of
    the step runs over the whole table but the scatters that write the rows. (XLA may still
    copy the table: on CPU it does, donated or not, when one step also reads the table
    elsewhere, as the Lagrangians do; the copy is a memory pass, not arithmetic.) Other dual
    optimizers get the dense gradient and the ``observed`` masks (O(m) arithmetic). Both paths
    give the same values (up to the rounding of ``w + (v - w)``).

    ``step`` is pure: ``jax.jit(solver.step)`` compiles one whole step (no retracing while the
    shapes stay the same), and it can be vmapped over a batch of problems.

    Args:
      compute_cmp_state: ``(params, *args, **kwargs) -> CMPState``.
      primal_optimizer: an optax transformation for the parameters (it descends).
      dual_optimizer: an optax transformation that ascends on the multipliers, or ``None``.
      roll: one of :data:`ROLLS`.
      compute_violations: optional ``(params, *args, **kwargs) -> CMPState`` without a loss,
        for ``"alternating_primal_dual"``.
      axis_name: None, or the mapped axis (a name or a tuple of names) of ``shard_map``/
        ``pmap`` data parallelism: ``compute_cmp_state`` sees each device's batch shard; the
        loss and the violations of every CMP state are averaged over these devices
        (``lax.pmean``, inside the differentiated primal Lagrangian) and so is the primal
        gradient, so every device takes the full-batch step and holds the same multipliers
        (``misc`` stays per device). Dense multipliers only (constraint features raise a
        ValueError at :meth:`step`). Not needed under ``jit`` with sharded arrays.
      nonfinite: ``"propagate"`` (default: NaN/inf flow into the updates), ``"raise"``
        (``FloatingPointError`` from ``step`` on concrete values; ``TypeError`` when traced,
        under ``jit``) or ``"skip"`` (traced: a step whose loss, constraint values or
        gradients -- primal and dual, at every evaluation of the roll -- are not all finite
        returns the parameters, constraints and optimizer states it was given; the state is
        then ``NonFiniteState(ConstrainedOptimizerState, nonfinite_skips)``). See
        docs/faults.md.

    Raises:
      TypeError: a non-callable ``compute_cmp_state``/``compute_violations``, optimizers that
        are not optax transformations, an ``axis_name`` that is not None, a str or a tuple of
        str.
      ValueError: an unknown ``roll``; at :meth:`init`, multipliers without a dual optimizer.
      RuntimeError: at :meth:`step`, a ``compute_violations`` that returns a loss (Cooper's
        error and message, as the torch face).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax.constrained import (CMPState, Constraint, ConstraintState,
      ...     ConstraintType, ConstrainedOptimizer, DenseMultiplier, projected_ascent)
      >>> def cmp(x):    # min x^2 subject to 1 - x <= 0: x* = 1, lambda* = 2
      ...     return CMPState(jnp.sum(x ** 2), {"g": ConstraintState(1.0 - x)})
      >>> cons = {"g": Constraint(ConstraintType.INEQUALITY, multiplier=DenseMultiplier(1))}
      >>> solver = ConstrainedOptimizer(cmp, optax.sgd(0.05), projected_ascent(0.05))
      >>> x = jnp.zeros(1); state = solver.init(x, cons); step = jax.jit(solver.step)
      >>> for _ in range(2000):
      ...     x, cons, state, _ = step(x, cons, state)
      >>> round(float(x[0]), 4), round(float(cons["g"].multiplier.weight[0]), 4)
      (1.0, 2.0)
    """

    compute_cmp_state: Callable
    primal_optimizer: Any
    dual_optimizer: Any = None
    roll: str = "simultaneous"
    compute_violations: Optional[Callable] = None
    axis_name: Any = None
    nonfinite: str = "propagate"

    def __post_init__(self):
        _validation.check_nonfinite(self.nonfinite)
        if not callable(self.compute_cmp_state):
            raise TypeError(f"Invalid compute_cmp_state: {self.compute_cmp_state!r} (expected a "
                            f"callable)")
        if self.compute_violations is not None and not callable(self.compute_violations):
            raise TypeError(f"Invalid compute_violations: {self.compute_violations!r} (expected "
                            f"a callable)")
        _check_transformation("primal_optimizer", self.primal_optimizer)
        _check_transformation("dual_optimizer", self.dual_optimizer, optional=True)
        _validation.choice("roll", self.roll, ROLLS)
        check_axis_name(self.axis_name)

    # -- pieces -------------------------------------------------------------------------------
    def init(self, params: Any, constraints: Mapping[str, Constraint]) -> ConstrainedOptimizerState:
        """The optimizers' initial states for ``params`` and the constraints' multipliers."""
        multipliers = _multipliers(_check_constraints(constraints))
        if multipliers and self.dual_optimizer is None:
            raise ValueError(f"Invalid dual_optimizer: None, but the constraints "
                             f"{sorted(multipliers)} have multipliers")
        dual = None if self.dual_optimizer is None else self.dual_optimizer.init(multipliers)
        state = ConstrainedOptimizerState(primal=self.primal_optimizer.init(params), dual=dual)
        if self.nonfinite == "skip":
            return NonFiniteState(state, jnp.zeros([], jnp.int32))
        return state

    def _primal(self, params, constraints, args, kwargs):
        """``(cmp_state, primal_lagrangian, gradient)`` at ``params``."""

        def f(p):
            cmp_state = self.compute_cmp_state(p, *args, **kwargs)
            if not isinstance(cmp_state, CMPState):
                raise TypeError(f"compute_cmp_state must return a CMPState, got {cmp_state!r}")
            cmp_state = _synced(cmp_state, self.axis_name)
            value = primal_lagrangian(cmp_state, constraints)
            if value is None:
                raise ValueError("The primal Lagrangian is empty: compute_cmp_state gave no loss "
                                 "and no constraint contributes to the primal update")
            return value, cmp_state

        (value, cmp_state), grads = jax.value_and_grad(f, has_aux=True)(params)
        return cmp_state, value, mean_over(grads, self.axis_name)

    def _update_rows(self):
        """The dual optimizer's row-wise update (:func:`projected_ascent`, :func:`nupi` with
        scalar gains), or ``None``."""
        if self.dual_optimizer is None:
            return None
        return getattr(self.dual_optimizer.update, "update_rows", None)

    def _sampled_rows(self, cmp_state, constraints) -> dict:
        """``{name: (rows, strict violations) or None}`` for the indexed multipliers a
        row-wise dual update can take: the dual gradient of an indexed multiplier under every
        formulation is its strict violation scattered at the strict features' rows, so it is
        read here directly, in O(k) (``None``: not observed or not contributing: unchanged)."""
        if self._update_rows() is None:
            return {}
        states = cmp_state.observed_constraints
        out = {}
        for name, constraint in constraints.items():
            if not isinstance(constraint.multiplier, IndexedMultiplier):
                continue
            state = states.get(name)
            if state is None or not state.contributes_to_dual_update:
                out[name] = None
                continue
            _, strict = state.extract_violations()
            _, features = state.extract_constraint_features()
            features = _check_indices(features, "IndexedMultiplier")
            if features.size != strict.size:  # an unusual broadcast: the dense path decides
                continue
            out[name] = (features, strict)
        return out

    def _dual_grads(self, cmp_state, constraints):
        """``(dual_lagrangian, gradient, observed, rows)`` at ``cmp_state``: the gradient and
        observed masks of the multipliers on the dense path, and the sampled rows of those on
        the row-wise path (:meth:`_sampled_rows`)."""
        cmp_state = jax.lax.stop_gradient(cmp_state)
        rows = self._sampled_rows(cmp_state, constraints)
        dense = {n: m for n, m in _multipliers(constraints).items() if n not in rows}

        def f(m):
            return dual_lagrangian(cmp_state, _with_multipliers(constraints, m))

        dense_constraints = {n: constraints[n] for n in dense}
        if f(dense) is None:
            return (None, jax.tree.map(jnp.zeros_like, dense),
                    observed_rows(CMPState(), dense_constraints), {n: None for n in rows})
        value, grads = jax.value_and_grad(f)(dense)
        return value, grads, observed_rows(cmp_state, dense_constraints), rows

    def _primal_update(self, grads, opt_state, params, apply_to):
        updates, opt_state = self.primal_optimizer.update(grads, opt_state, params)
        return optax.apply_updates(apply_to, updates), opt_state

    def _dual_update(self, dual, opt_state, constraints):
        """The dual step of the multipliers of ``constraints`` from ``dual`` (the last three of
        :meth:`_dual_grads`), then the projection (of the dense-path multipliers: the row-wise
        path projects the rows it writes, and the other rows were feasible already)."""
        grads, observed, rows = dual
        multipliers = _multipliers(constraints)
        if self.dual_optimizer is None or not multipliers:
            return constraints, opt_state
        if rows:
            new, opt_state = self._update_rows()(grads, opt_state, multipliers,
                                                 observed=observed, rows=rows)
            new = {n: (m if n in rows else m.project()) for n, m in new.items()}
        else:
            tx = optax.with_extra_args_support(self.dual_optimizer)
            updates, opt_state = tx.update(grads, opt_state, multipliers, observed=observed)
            new = project(optax.apply_updates(multipliers, updates))
        return _with_multipliers(constraints, new), opt_state

    # -- the step -----------------------------------------------------------------------------
    def step(self, params: Any, constraints: Mapping[str, Constraint],
             state: ConstrainedOptimizerState, *args, **kwargs) -> tuple:
        """One roll: ``(params, constraints, state, RollOut)`` after it (pure; jit it whole).

        ``args``/``kwargs`` go to ``compute_cmp_state`` (and ``compute_violations``).
        """
        if self.nonfinite == "propagate":
            return self._step(params, constraints, state, args, kwargs, [])
        seen: list = []  # every loss, constraint state and gradient the roll evaluates
        inner = state.inner_state if self.nonfinite == "skip" else state
        new_params, new_cons, new_state, rollout = self._step(params, constraints, inner, args,
                                                              kwargs, seen)
        if self.nonfinite == "raise":
            nonfinite_raise("ConstrainedOptimizer", {"the roll's values": seen})
            return new_params, new_cons, new_state, rollout
        ok = agreed(all_finite(*seen), self.axis_name)
        return (select(ok, new_params, params), select(ok, new_cons, dict(constraints)),
                NonFiniteState(select(ok, new_state, inner),
                               state.nonfinite_skips + jnp.where(ok, 0, 1).astype(jnp.int32)),
                rollout)

    def _step(self, params, constraints, state, args, kwargs, seen: list) -> tuple:
        constraints = dict(_check_constraints(constraints))
        if _multipliers(constraints) and self.dual_optimizer is None:
            raise ValueError(f"Invalid dual_optimizer: None, but the constraints "
                             f"{sorted(_multipliers(constraints))} have multipliers")
        primal_state, dual_state = state
        roll = self.roll if self.dual_optimizer is not None else "simultaneous"

        if self.dual_optimizer is None:  # Cooper's UnconstrainedOptimizer: no dual Lagrangian
            cmp_state, lp, gp = self._primal(params, constraints, args, kwargs)
            seen.extend((cmp_state, lp, gp))
            new_params, primal_state = self._primal_update(gp, primal_state, params, params)
            new_cons = constraints
            rollout = RollOut(cmp_state.loss, cmp_state, lp, None)
        elif roll == "simultaneous":
            cmp_state, lp, gp = self._primal(params, constraints, args, kwargs)
            seen.extend((cmp_state, lp, gp))
            ld, *dual = self._dual_grads(cmp_state, constraints)
            seen.extend((ld, dual[0], dual[2]))
            new_params, primal_state = self._primal_update(gp, primal_state, params, params)
            new_cons, dual_state = self._dual_update(dual, dual_state, constraints)
            rollout = RollOut(cmp_state.loss, cmp_state, lp, ld)
        elif roll == "alternating_primal_dual":
            cmp_state, lp, gp = self._primal(params, constraints, args, kwargs)
            seen.extend((cmp_state, lp, gp))
            new_params, primal_state = self._primal_update(gp, primal_state, params, params)
            if self.compute_violations is not None:
                new_state = self.compute_violations(new_params, *args, **kwargs)
                if not isinstance(new_state, CMPState):
                    raise TypeError(f"compute_violations must return a CMPState, got "
                                    f"{new_state!r}")
                if new_state.loss is not None:
                    raise RuntimeError("Expected `compute_violations` to not populate the loss. "
                                       "Please provide this value for the `compute_cmp_state` "
                                       "instead.")
            else:
                new_state = self.compute_cmp_state(new_params, *args, **kwargs)
            new_state = jax.lax.stop_gradient(_synced(new_state, self.axis_name))
            seen.append(new_state)
            ld, *dual = self._dual_grads(new_state, constraints)
            seen.extend((ld, dual[0], dual[2]))
            new_cons, dual_state = self._dual_update(dual, dual_state, constraints)
            loss = new_state.loss if new_state.loss is not None else cmp_state.loss
            rollout = RollOut(loss, new_state, lp, ld)
        elif roll == "alternating_dual_primal":
            cmp_state = jax.lax.stop_gradient(
                _synced(self.compute_cmp_state(params, *args, **kwargs), self.axis_name))
            seen.append(cmp_state)
            ld, *dual = self._dual_grads(cmp_state, constraints)
            seen.extend((ld, dual[0], dual[2]))
            new_cons, dual_state = self._dual_update(dual, dual_state, constraints)
            # the primal gradient at (x_t, lambda_{t+1}); under jit XLA shares the forward pass
            _, lp, gp = self._primal(params, new_cons, args, kwargs)
            seen.extend((lp, gp))
            new_params, primal_state = self._primal_update(gp, primal_state, params, params)
            rollout = RollOut(cmp_state.loss, cmp_state, lp, ld)
        else:  # extrapolation
            cmp_state, lp, gp = self._primal(params, constraints, args, kwargs)
            seen.extend((cmp_state, lp, gp))
            ld, *dual = self._dual_grads(cmp_state, constraints)
            seen.extend((ld, dual[0], dual[2]))
            rollout = RollOut(cmp_state.loss, cmp_state, lp, ld)
            half_params, primal_state = self._primal_update(gp, primal_state, params, params)
            half_cons, dual_state = self._dual_update(dual, dual_state, constraints)
            half_state, _, gp = self._primal(half_params, half_cons, args, kwargs)
            seen.extend((half_state, gp))
            # both gradients at the half point, both updates applied to (x_t, lambda_t)
            _, *dual = self._dual_grads(half_state, half_cons)
            seen.extend((dual[0], dual[2]))
            new_params, primal_state = self._primal_update(gp, primal_state, params, params)
            new_cons, dual_state = self._dual_update(dual, dual_state, constraints)
        return new_params, new_cons, ConstrainedOptimizerState(primal_state, dual_state), rollout
