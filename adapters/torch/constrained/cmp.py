r"""Constrained minimization problems (``cooper.ConstrainedMinimizationProblem``, ``cooper.CMPState``,
``cooper.LagrangianStore``).

The problem :math:`\min_x f(x)` s.t. :math:`g(x) \le 0,\ h(x) = 0` is played as a min-max game
on two Lagrangians built from a :class:`CMPState` (the loss and the observed constraint states
at :math:`x_t`): the *primal* Lagrangian :math:`f + \sum` primal contributions (differentiable
in :math:`x`) and the *dual* Lagrangian :math:`\sum` dual contributions (differentiable in the
multipliers; its gradient is the violation, ascended by a ``maximize=True`` optimizer).

Example:
  >>> import torch
  >>> import uniopt.adapters.torch.constrained as cooper
  >>> class Problem(cooper.ConstrainedMinimizationProblem):
  ...     def __init__(self):
  ...         super().__init__()
  ...         self.norm = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
  ...                                       multiplier=cooper.multipliers.DenseMultiplier(num_constraints=1))
  ...     def compute_cmp_state(self, x):
  ...         return cooper.CMPState(loss=(x - 2).pow(2).sum(),
  ...                                observed_constraints={self.norm: cooper.ConstraintState(x.sum() - 1)})
  >>> cmp = Problem()
  >>> x = torch.zeros(1, requires_grad=True)
  >>> dual = torch.optim.SGD(cmp.dual_parameters(), lr=0.5, maximize=True)
  >>> state = cmp.compute_cmp_state(x)
  >>> state.compute_dual_lagrangian().backward(); dual.step(); cmp.norm.multiplier.post_step_()
  >>> cmp.norm.multiplier.weight  # max(0 + 0.5 * (0 - 1), 0)
  Parameter containing:
  tensor([0.], requires_grad=True)
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from .constraints import Constraint
from .multipliers import Multiplier
from .penalty_coefficients import PenaltyCoefficient

__all__ = ["LagrangianStore", "CMPState", "ConstrainedMinimizationProblem"]


@dataclass
class LagrangianStore:
    """A (primal or dual) Lagrangian and the factor values of the constraints that entered it.

    Args:
      lagrangian: the Lagrangian's value (``None`` when nothing contributes).
      multiplier_values: ``{constraint: multiplier value}``.
      penalty_coefficient_values: ``{constraint: penalty coefficient value}``.
    """

    lagrangian: Optional[torch.Tensor] = None
    multiplier_values: dict = field(default_factory=dict)
    penalty_coefficient_values: dict = field(default_factory=dict)

    def backward(self) -> None:
        """Back-propagate the Lagrangian (no-op when it is ``None``)."""
        if self.lagrangian is not None:
            self.lagrangian.backward()

    def observed_multiplier_values(self) -> Iterator[torch.Tensor]:
        """The multiplier values, in the order the constraints were observed."""
        yield from self.multiplier_values.values()

    def observed_penalty_coefficient_values(self) -> Iterator[torch.Tensor]:
        """The penalty coefficient values, in the order the constraints were observed."""
        yield from self.penalty_coefficient_values.values()


@dataclass
class CMPState:
    """The state of a problem at a primal point: the loss and the observed constraints.

    Args:
      loss: the objective :math:`f(x_t)` (may be ``None``, e.g. when only constraints are
        evaluated).
      observed_constraints: ``{Constraint: ConstraintState}``.
      misc: free storage for anything worth keeping (logits, metrics).
    """

    loss: Optional[torch.Tensor] = None
    observed_constraints: dict = field(default_factory=dict)
    misc: Optional[dict] = None

    def _compute_primal_or_dual_lagrangian(self, primal_or_dual: Literal["primal", "dual"]) -> LagrangianStore:
        flag = f"contributes_to_{primal_or_dual}_update"
        contributing = [(c, cs) for c, cs in self.observed_constraints.items() if getattr(cs, flag)]
        with_loss = primal_or_dual == "primal" and self.loss is not None
        if not contributing:
            return LagrangianStore(lagrangian=self.loss.clone() if with_loss else None)
        lagrangian = self.loss.clone() if with_loss else 0.0
        multiplier_values, penalty_values = {}, {}
        for constraint, constraint_state in contributing:
            store = constraint.compute_contribution_to_lagrangian(constraint_state, primal_or_dual)
            if store is None:
                continue
            lagrangian = lagrangian + store.lagrangian_contribution
            multiplier_values[constraint] = store.multiplier_value
            if store.penalty_coefficient_value is not None:
                penalty_values[constraint] = store.penalty_coefficient_value
        return LagrangianStore(lagrangian, multiplier_values, penalty_values)

    def compute_primal_lagrangian(self) -> LagrangianStore:
        """The loss plus the primal contributions of the constraints that contribute to the
        primal update (the loss alone, or ``None``, when none does)."""
        return self._compute_primal_or_dual_lagrangian("primal")

    def compute_dual_lagrangian(self) -> LagrangianStore:
        """The dual contributions of the constraints that contribute to the dual update (the
        loss never enters; ``None`` when no constraint contributes)."""
        return self._compute_primal_or_dual_lagrangian("dual")

    def named_observed_violations(self) -> Iterator[tuple]:
        """``(constraint name, violation)`` for each observed constraint."""
        for constraint, state in self.observed_constraints.items():
            yield constraint.name, state.violation

    def named_observed_strict_violations(self) -> Iterator[tuple]:
        """``(constraint name, strict_violation)`` for each observed constraint."""
        for constraint, state in self.observed_constraints.items():
            yield constraint.name, state.strict_violation

    def named_observed_constraint_features(self) -> Iterator[tuple]:
        """``(constraint name, constraint_features)`` for each observed constraint."""
        for constraint, state in self.observed_constraints.items():
            yield constraint.name, state.constraint_features

    def named_observed_strict_constraint_features(self) -> Iterator[tuple]:
        """``(constraint name, strict_constraint_features)`` for each observed constraint."""
        for constraint, state in self.observed_constraints.items():
            yield constraint.name, state.strict_constraint_features


class ConstrainedMinimizationProblem(abc.ABC):
    """Base class of a constrained problem: a registry of constraints and ``compute_cmp_state``.

    Assigning a :class:`Constraint` to an attribute registers it under that name (in
    registration order); subclasses must call ``super().__init__()`` first and implement
    :meth:`compute_cmp_state`. Unlike Cooper, :meth:`dual_parameters` yields in registration
    order (Cooper iterates a set, whose order can change between processes and would misalign
    a stateful dual optimizer's checkpoint).
    """

    def __init__(self) -> None:
        self._constraints = OrderedDict()

    def _register_constraint(self, name: str, constraint: Constraint) -> None:
        """Register ``constraint`` under ``name``.

        Raises:
          TypeError: ``constraint`` is not a :class:`Constraint`.
          ValueError: a constraint named ``name`` exists already.
        """
        if not isinstance(constraint, Constraint):
            raise TypeError(f"Expected a Constraint instance, got {type(constraint)}")
        if name in self._constraints:
            raise ValueError(f"Constraint with name {name} already exists")
        self._constraints[name] = constraint
        constraint.name = name

    def constraints(self) -> Iterator[Constraint]:
        """The registered constraints."""
        yield from self._constraints.values()

    def named_constraints(self) -> Iterator[tuple]:
        """``(name, constraint)`` pairs."""
        yield from self._constraints.items()

    def multipliers(self) -> Iterator[Multiplier]:
        """The multipliers of the registered constraints (one per constraint that has one)."""
        for constraint in self.constraints():
            if constraint.multiplier is not None:
                yield constraint.multiplier

    def named_multipliers(self) -> Iterator[tuple]:
        """``(constraint name, multiplier)`` pairs."""
        for name, constraint in self.named_constraints():
            if constraint.multiplier is not None:
                yield name, constraint.multiplier

    def penalty_coefficients(self) -> Iterator[PenaltyCoefficient]:
        """The penalty coefficients of the registered constraints."""
        for constraint in self.constraints():
            if constraint.penalty_coefficient is not None:
                yield constraint.penalty_coefficient

    def named_penalty_coefficients(self) -> Iterator[tuple]:
        """``(constraint name, penalty coefficient)`` pairs."""
        for name, constraint in self.named_constraints():
            if constraint.penalty_coefficient is not None:
                yield name, constraint.penalty_coefficient

    def dual_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters of the multipliers, for the dual optimizer: in registration order, a
        multiplier shared by several constraints (and a parameter shared by several
        multipliers) only once."""
        seen_modules, seen_params = set(), set()
        for multiplier in self.multipliers():
            if id(multiplier) in seen_modules:
                continue
            seen_modules.add(id(multiplier))
            for param in multiplier.parameters():
                if id(param) not in seen_params:
                    seen_params.add(id(param))
                    yield param

    def to(self, *args: Any, **kwargs: Any) -> ConstrainedMinimizationProblem:
        """Move the multipliers and penalty coefficients to a device and/or dtype."""
        for constraint in self.constraints():
            if constraint.multiplier is not None:
                constraint.multiplier = constraint.multiplier.to(*args, **kwargs)
            if constraint.penalty_coefficient is not None:
                constraint.penalty_coefficient = constraint.penalty_coefficient.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict:
        """``{"multipliers": {name: state}, "penalty_coefficients": {name: state}}`` (Cooper's
        layout)."""
        return {
            "multipliers": {name: m.state_dict() for name, m in self.named_multipliers()},
            "penalty_coefficients": {name: pc.state_dict() for name, pc in self.named_penalty_coefficients()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load multipliers and penalty coefficients by constraint name, then sanity-check them.

        Raises:
          KeyError: a name in ``state_dict`` is not a registered constraint.
        """
        for name, state in state_dict["multipliers"].items():
            self._constraints[name].multiplier.load_state_dict(state)
            self._constraints[name].multiplier.sanity_check()
        for name, state in state_dict["penalty_coefficients"].items():
            self._constraints[name].penalty_coefficient.load_state_dict(state)
            self._constraints[name].penalty_coefficient.sanity_check()

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Constraint):
            self._register_constraint(name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "_constraints":  # __init__ not called: no registry yet
            raise AttributeError(
                f"'{type(self).__name__}' has no constraint registry: call super().__init__() in its __init__"
            )
        if name in self._constraints:
            return self._constraints[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        if name in self._constraints:
            del self._constraints[name]
        else:
            super().__delattr__(name)

    def __repr__(self) -> str:
        text = type(self).__name__
        if len(self._constraints) < 5:
            text += "\n\t(constraints=[\n"
            for i, (name, constraint) in enumerate(self.named_constraints()):
                suffix = ",\n" if i < len(self._constraints) - 1 else "\n"
                text += f"\t\t{name}: {constraint}{suffix}"
            text += "\t\t]\n\t)"
        return text

    @abc.abstractmethod
    def compute_cmp_state(self, *args: Any, **kwargs: Any) -> CMPState:
        """The loss and the observed constraint states at the current primal parameters (may be
        stochastic estimates from a minibatch)."""

    def compute_violations(self, *args: Any, **kwargs: Any) -> CMPState:
        """The constraint states only (``loss`` may be ``None``); optional, used by the
        alternating optimizers to re-evaluate the constraints cheaply.

        Raises:
          NotImplementedError: not overridden.
        """
        raise NotImplementedError

    @staticmethod
    def sanity_check_cmp_state(cmp_state: CMPState) -> None:
        """Debug check after a backward pass of the primal Lagrangian.

        Raises:
          ValueError: the loss or a violation has no gradient, a strict violation has one, or a
            constraint without multipliers contributes to the dual update.
        """
        if cmp_state.loss is not None and cmp_state.loss.grad is None:
            raise ValueError("The loss tensor must have a valid gradient.")
        for constraint, state in cmp_state.observed_constraints.items():
            if state.violation.grad is None:
                raise ValueError(f"The violation tensor of constraint {constraint} must have a valid gradient.")
            if state.strict_violation is not None and state.strict_violation.grad is not None:
                raise ValueError(f"The strict violation tensor of constraint {constraint} must not have a gradient.")
            if not constraint.formulation.expects_multiplier and state.contributes_to_dual_update:
                raise ValueError(
                    f"ConstraintState contributes to dual update but formulation {constraint.formulation} "
                    f"associated with constraint {constraint} does not expect a multiplier."
                )
