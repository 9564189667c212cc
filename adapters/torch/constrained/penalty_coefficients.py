r"""Penalty coefficients and their feasibility-driven updaters (the names of
``cooper.penalty_coefficients``).

A penalty coefficient :math:`c` weighs the quadratic term of the
:class:`~uniopt.adapters.torch.constrained.formulations.QuadraticPenalty` and
:class:`~uniopt.adapters.torch.constrained.formulations.AugmentedLagrangian` formulations. It is
not trained by gradients; an updater changes it after each step from the observed (strict)
violations: with measure :math:`m` = ``relu(g)`` (inequality) or ``|h|`` (equality), entry by
entry for a vector coefficient and its 2-norm for a scalar one,

.. math::
   c \leftarrow \begin{cases} c\,\kappa + \delta & m > \text{tol} \\ c & \text{otherwise}
   \end{cases}, \qquad c \leftarrow c_0 \ \text{where}\ m = 0 \ \text{(inequality, restart)},

with :math:`(\kappa, \delta)` = ``(growth_factor, 0)`` for
:class:`MultiplicativePenaltyCoefficientUpdater` and ``(1, increment)`` for
:class:`AdditivePenaltyCoefficientUpdater`. The arithmetic is
:func:`uniopt.rules.constrained.penalty_measure` and :func:`~uniopt.rules.constrained.penalty_update`:
a vector coefficient held in a plain contiguous float32/float64 CPU tensor is updated by the core
kernels (:func:`uniopt.constrained.update_penalty_coefficients_`; an indexed one reads and
writes only the observed entries, in place, as Cooper does), anything else with torch ops.

References:
  Nocedal & Wright, *Numerical Optimization* (2006), Algorithm 17.4.

Example:
  >>> import torch
  >>> import uniopt.adapters.torch.constrained as cooper
  >>> rho = cooper.penalty_coefficients.DensePenaltyCoefficient(torch.tensor([1.0, 1.0]))
  >>> c = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
  ...                       formulation_type=cooper.formulations.QuadraticPenalty, penalty_coefficient=rho)
  >>> updater = cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=2.0)
  >>> updater.step({c: cooper.ConstraintState(violation=torch.tensor([0.5, -0.5]))})
  >>> rho.value
  tensor([2., 1.])
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import torch

from uniopt import _validation
from uniopt import constrained as _core

from .._dispatch import group_average, is_plain, resolve_process_group
from .utils import ConstraintType, torch_rules

if TYPE_CHECKING:
    from .constraints import Constraint, ConstraintState

__all__ = [
    "PenaltyCoefficient",
    "DensePenaltyCoefficient",
    "IndexedPenaltyCoefficient",
    "PenaltyCoefficientUpdater",
    "FeasibilityDrivenPenaltyCoefficientUpdater",
    "MultiplicativePenaltyCoefficientUpdater",
    "AdditivePenaltyCoefficientUpdater",
]


def _check_indices(indices: Any) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long:
        # boolean "indices" would be read as indices 0/1, not as a mask
        raise ValueError("Indices must be of type torch.long.")


class PenaltyCoefficient(abc.ABC):
    """A constant (non-trainable) penalty coefficient: a scalar or one entry per constraint.

    Args:
      init: the initial value, a 0-d or 1-D tensor with non-negative entries and no gradient.
        It is copied (``init`` keeps the copy used by restarts).

    Raises:
      TypeError: ``init`` is not a tensor.
      ValueError: ``init`` has two or more dimensions, requires grad, or has a negative entry.
    """

    expects_constraint_features: bool
    _value: torch.Tensor | None = None

    def __init__(self, init: torch.Tensor) -> None:
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"Invalid init: {init!r} (expected a 0-d or 1-D torch.Tensor)")
        if init.dim() > 1:
            raise ValueError("init must either be a scalar or a 1D tensor of shape `(num_constraints,)`.")
        if init.is_floating_point() and not bool(torch.all(torch.isfinite(init))):
            raise ValueError(f"Invalid init: {init!r} (penalty coefficients must be finite and "
                             f"non-negative)")
        self.value = init
        self.init = init.clone()

    @property
    def value(self) -> torch.Tensor:
        """The current value (setting it copies the given tensor and checks it)."""
        return self._value

    @value.setter
    def value(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Invalid value: {value!r} (expected a torch.Tensor)")
        if value.requires_grad:
            raise ValueError("PenaltyCoefficient should not require gradients.")
        if self._value is not None and value.shape != self._value.shape:
            raise ValueError(
                f"New shape {value.shape} of PenaltyCoefficient does not match existing shape {self._value.shape}."
            )
        self._value = value.clone()
        self.sanity_check()

    def to(self, *args: Any, **kwargs: Any) -> PenaltyCoefficient:
        """Move the value (and the initial value used by restarts) to a device and/or dtype."""
        self._value = self._value.to(*args, **kwargs)
        self.init = self.init.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict:
        """``{"value": tensor}``, as Cooper's."""
        return {"value": self._value}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load ``state_dict["value"]`` (copied: the coefficient never aliases the source)."""
        self._value = state_dict["value"].detach().clone()

    def sanity_check(self) -> None:
        """Raises ValueError if some entry is negative."""
        if torch.any(self._value < 0):
            raise ValueError("All entries of the penalty coefficient must be non-negative.")

    def __repr__(self) -> str:
        if self.value.numel() <= 10:
            return f"{type(self).__name__}({self.value})"
        return f"{type(self).__name__}(shape={self.value.shape})"

    @abc.abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the current value of the penalty coefficient."""


class DensePenaltyCoefficient(PenaltyCoefficient):
    """A penalty coefficient for constraints that are all observed at every step."""

    expects_constraint_features = False

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """A copy of the current value."""
        return self.value.clone()


class IndexedPenaltyCoefficient(PenaltyCoefficient):
    """A penalty coefficient for constraints of which only a subset is observed per step."""

    expects_constraint_features = True

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """The value at ``indices`` (1-D); a scalar coefficient is returned as is.

        Raises:
          ValueError: ``indices`` is not a ``torch.long`` tensor.
        """
        _check_indices(indices)
        if self.value.dim() == 0:
            return self.value.clone()
        return self.value[indices].reshape(-1)


class PenaltyCoefficientUpdater(abc.ABC):
    """Base class of the penalty-coefficient updaters; call :meth:`step` after each step."""

    def step(self, observed_constraints: dict[Constraint, ConstraintState]) -> None:
        """Update the penalty coefficients of the observed constraints.

        A constraint whose formulation has multipliers (Augmented Lagrangian) is updated when its
        state contributes to the dual update, or to the primal update with a ``strict_violation``
        (a bare ``violation`` might be a surrogate); one without multipliers (Quadratic
        Penalty) when it contributes to the primal update. Constraints without a penalty
        coefficient are skipped.

        Args:
          observed_constraints: ``{constraint: constraint_state}``, e.g.
            ``cmp_state.observed_constraints``.

        With a ``process_group`` (a keyword-only argument of the feasibility-driven updaters;
        a uniopt extension), the strict violations of the constraints to update are first
        averaged over its ranks in one packed ``all_reduce``, so every replica grows the same
        coefficients: every rank must observe the same constraints (an indexed coefficient's
        rows may differ: a row some ranks did not observe is averaged with zeros for them, and
        repeated rows of one rank add up).
        """
        chosen = []
        for constraint, constraint_state in observed_constraints.items():
            if constraint.penalty_coefficient is None:
                continue
            if constraint.formulation.expects_multiplier:
                update = constraint_state.contributes_to_dual_update or (
                    constraint_state.contributes_to_primal_update and constraint_state.strict_violation is not None
                )
            else:
                update = constraint_state.contributes_to_primal_update
            if update:
                chosen.append((constraint, constraint_state))
        process_group = self.__dict__.get("process_group")
        if process_group is not None:
            chosen = _averaged_states(chosen, process_group)
        for constraint, constraint_state in chosen:
            self.update_penalty_coefficient_(constraint, constraint_state)

    @abc.abstractmethod
    def update_penalty_coefficient_(self, constraint: Constraint, constraint_state: ConstraintState) -> None:
        """Update the penalty coefficient of ``constraint`` from ``constraint_state``."""


class FeasibilityDrivenPenaltyCoefficientUpdater(PenaltyCoefficientUpdater, abc.ABC):
    """Grow a coefficient where the strict violation exceeds a tolerance (module docstring).

    Args:
      violation_tolerance: violations up to this value do not grow the coefficient (>= 0).
      has_restart: reset a satisfied inequality's coefficient to its initial value.
      process_group: the ``torch.distributed`` process group the strict violations are averaged
        over before each update (:meth:`PenaltyCoefficientUpdater.step`). ``None``: the world
        group when ``torch.distributed`` is initialised at construction, else none.

    Raises:
      ValueError: a negative or non-finite ``violation_tolerance``.
      TypeError: a non-number ``violation_tolerance``, a non-bool ``has_restart``.
    """

    #: (factor, increment) of :func:`uniopt.rules.constrained.penalty_update`.
    _factor: float = 1.0
    _increment: float = 0.0
    _kind = "additive"  # the updater kind of uniopt.constrained.update_penalty_coefficients_

    def __init__(self, violation_tolerance: float, has_restart: bool, *, process_group: Any = None) -> None:
        # uniopt's one policy (the JAX and NumPy faces' messages; Cooper's sentence kept)
        _validation.check_penalty_updater("additive", 0.0, 0.0, violation_tolerance, has_restart)
        self.violation_tolerance = violation_tolerance
        self.has_restart = bool(has_restart)
        self.process_group = resolve_process_group(process_group)

    def update_penalty_coefficient_(self, constraint: Constraint, constraint_state: ConstraintState) -> None:
        """Grow/restart the coefficient of ``constraint`` from its strict violation.

        An :class:`IndexedPenaltyCoefficient` with one entry per constraint changes only the
        observed rows (a restart resets them to their own initial values).

        Raises:
          TypeError: the coefficient is neither dense nor indexed.
        """
        _, strict_violation = constraint_state.extract_violations()
        _, features = constraint_state.extract_constraint_features()
        coefficient = constraint.penalty_coefficient
        is_ineq = constraint.constraint_type == ConstraintType.INEQUALITY
        if self._kernel_update_(coefficient, strict_violation, features, is_ineq):
            return
        if isinstance(coefficient, DensePenaltyCoefficient):
            current = coefficient()
            init = coefficient.init
        elif isinstance(coefficient, IndexedPenaltyCoefficient):
            current = coefficient(features)
            init = coefficient.init if coefficient.init.dim() == 0 else coefficient.init[features].reshape(-1)
        else:
            raise TypeError(f"Unsupported penalty coefficient type: {type(coefficient)}")

        with torch.no_grad():
            measure = torch_rules.penalty_measure(strict_violation.detach(), is_ineq)
            if current.dim() == 0:
                measure = measure.norm()
            restart = self.has_restart and is_ineq
            new = torch_rules.penalty_update(current, init, measure, self.violation_tolerance, self._factor,
                                             self._increment, restart)
        if isinstance(coefficient, IndexedPenaltyCoefficient) and new.dim() > 0:
            value = coefficient.value.clone()
            value[features] = new
            coefficient.value = value
        else:
            coefficient.value = new

    def _kernel_update_(self, coefficient, violation, features, is_ineq: bool) -> bool:
        """The update on the core kernels when the tensors allow it (plain contiguous CPU
        float32/float64 vectors of one dtype; an indexed coefficient with one initial value per
        entry): a dense coefficient gets a new value tensor (as through the ``value`` setter), an
        indexed one is changed in place at the observed entries only. Returns whether it ran."""
        if not isinstance(coefficient, (DensePenaltyCoefficient, IndexedPenaltyCoefficient)):
            return False
        value, init = coefficient.value, coefficient.init
        indexed = isinstance(coefficient, IndexedPenaltyCoefficient)
        violation = violation.detach()
        if not (value.dim() == 1 and value.dtype in (torch.float32, torch.float64)
                and (indexed or violation.numel() == value.numel())
                and is_plain(value, violation, init) and value.device.type == "cpu"
                and violation.device.type == "cpu" and init.device.type == "cpu"
                and violation.dtype == value.dtype and init.dtype == value.dtype
                and value.is_contiguous() and init.is_contiguous() and init.shape == value.shape):
            return False
        if indexed:
            _check_indices(features)  # Cooper's error for non-long indices, as the call would give
            if not (is_plain(features) and features.device.type == "cpu"):
                return False
        target = value if indexed else value.clone()
        with torch.no_grad():
            _core.update_penalty_coefficients_(
                target.numpy(), violation.contiguous().numpy().reshape(-1), init=init.numpy(),
                is_ineq=is_ineq, kind=self._kind, growth_factor=self._factor,
                increment=self._increment, violation_tolerance=self.violation_tolerance,
                has_restart=self.has_restart,
                indices=features.reshape(-1).numpy() if indexed else None)
        if not indexed:  # the value setter's copy and check are not needed: c >= 0 stays so
            coefficient._value = target
        return True


class MultiplicativePenaltyCoefficientUpdater(FeasibilityDrivenPenaltyCoefficientUpdater):
    """Multiply the coefficient by ``growth_factor`` where the violation exceeds the tolerance.

    Args:
      growth_factor: the multiplier (finite, > 0; default 1.01).
      violation_tolerance: see :class:`FeasibilityDrivenPenaltyCoefficientUpdater` (default 1e-4).
      has_restart: see :class:`FeasibilityDrivenPenaltyCoefficientUpdater` (default True).
      process_group: see :class:`FeasibilityDrivenPenaltyCoefficientUpdater`.

    Raises:
      ValueError: ``growth_factor`` not finite and positive; a bad tolerance.
    """

    def __init__(self, growth_factor: float = 1.01, violation_tolerance: float = 1e-4,
                 has_restart: bool = True, *, process_group: Any = None) -> None:
        _validation.check_penalty_updater("multiplicative", growth_factor, 0.0, violation_tolerance,
                                          has_restart)
        super().__init__(violation_tolerance, has_restart, process_group=process_group)
        self.growth_factor = growth_factor

    _kind = "multiplicative"

    @property
    def _factor(self) -> float:
        return self.growth_factor


class AdditivePenaltyCoefficientUpdater(FeasibilityDrivenPenaltyCoefficientUpdater):
    """Add ``increment`` to the coefficient where the violation exceeds the tolerance.

    Args:
      increment: the amount added (finite, >= 0; default 1.0).
      violation_tolerance: see :class:`FeasibilityDrivenPenaltyCoefficientUpdater` (default 1e-4).
      has_restart: see :class:`FeasibilityDrivenPenaltyCoefficientUpdater` (default True).
      process_group: see :class:`FeasibilityDrivenPenaltyCoefficientUpdater`.

    Raises:
      ValueError: ``increment`` negative or not finite; a bad tolerance.
    """

    def __init__(self, increment: float = 1.0, violation_tolerance: float = 1e-4, has_restart: bool = True,
                 *, process_group: Any = None) -> None:
        _validation.check_penalty_updater("additive", 0.0, increment, violation_tolerance, has_restart)
        super().__init__(violation_tolerance, has_restart, process_group=process_group)
        self.increment = increment

    @property
    def _increment(self) -> float:
        return self.increment


def _averaged_states(chosen: list, process_group) -> list:
    """``(constraint, state)`` pairs whose strict violations are averaged over the ranks.

    One ``all_reduce`` of every pair, packed in float64: a dense coefficient's violations as
    they are (the same size on every rank), an indexed coefficient's scattered to one entry per
    constraint (repeated rows add up) with a mask of the rows observed. The new states carry the
    averages as their violation (rows observed by some rank, for an indexed coefficient).
    """
    from .constraints import ConstraintState

    rows, layout = [], []
    for constraint, state in chosen:
        _, strict = state.extract_violations()
        _, features = state.extract_constraint_features()
        strict = strict.detach().reshape(-1)
        if isinstance(constraint.penalty_coefficient, IndexedPenaltyCoefficient) and features is not None:
            n = constraint.penalty_coefficient.value.numel()
            index = features.reshape(-1).to(device=strict.device)
            dense = torch.zeros(n, dtype=torch.float64, device=strict.device)
            dense.index_add_(0, index, strict.to(torch.float64))
            mask = torch.zeros(n, dtype=torch.float64, device=strict.device).index_fill_(0, index, 1.0)
            rows += [dense, mask]
            layout.append((n, True, strict.dtype))
        else:
            rows.append(strict.to(torch.float64))
            layout.append((strict.numel(), False, strict.dtype))
    if not rows:
        return chosen
    mean = group_average(torch.cat(rows), process_group)
    out, offset = [], 0
    for (constraint, _), (n, indexed, dtype) in zip(chosen, layout):
        values = mean[offset:offset + n]
        offset += n
        if indexed:
            observed = (mean[offset:offset + n] > 0).nonzero().reshape(-1)
            offset += n
            out.append((constraint, ConstraintState(values[observed].to(dtype), constraint_features=observed)))
        else:
            out.append((constraint, ConstraintState(values.to(dtype))))
    return out
