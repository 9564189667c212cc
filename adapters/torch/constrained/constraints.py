"""Constraints and their observed states (``cooper.Constraint``, ``cooper.ConstraintState``).

Example:
  >>> import torch
  >>> import uniopt.adapters.torch.constrained as cooper
  >>> c = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
  ...                       multiplier=cooper.multipliers.DenseMultiplier(num_constraints=2))
  >>> state = cooper.ConstraintState(violation=torch.tensor([0.1, -0.2]))
  >>> c.compute_contribution_to_lagrangian(state, "dual").lagrangian_contribution
  tensor(0., grad_fn=<ViewBackward0>)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from uniopt._validation import boolean

from .formulations import ContributionStore, Formulation, Lagrangian
from .multipliers import Multiplier
from .penalty_coefficients import PenaltyCoefficient
from .utils import ConstraintType

__all__ = ["Constraint", "ConstraintState"]


@dataclass
class ConstraintState:
    """The observed state of one constraint at the current primal point.

    Args:
      violation: the violation (:math:`g(x)`, :math:`\\le 0` feasible, or :math:`h(x)`),
        differentiable in the primal parameters; it enters the primal Lagrangian. It may be a
        differentiable surrogate of the true violation.
      constraint_features: the features of the observed constraints: the indices for an
        :class:`~.multipliers.IndexedMultiplier`, model inputs for an
        :class:`~.multipliers.ImplicitMultiplier`.
      strict_violation: the (possibly non-differentiable) violation used for the dual update
        and the penalty updates; defaults to ``violation``.
      strict_constraint_features: the features of ``strict_violation``; defaults to
        ``constraint_features``. Requires ``strict_violation``.
      contributes_to_primal_update: include this constraint in the primal Lagrangian.
      contributes_to_dual_update: include this constraint in the dual Lagrangian.

    Raises:
      ValueError: ``strict_constraint_features`` without ``strict_violation``.
      TypeError: a ``contributes_to_*`` flag that is not a bool.
    """

    violation: torch.Tensor
    constraint_features: Optional[torch.Tensor] = None
    strict_violation: Optional[torch.Tensor] = None
    strict_constraint_features: Optional[torch.Tensor] = None
    contributes_to_primal_update: bool = True
    contributes_to_dual_update: bool = True

    def __post_init__(self) -> None:
        if self.strict_constraint_features is not None and self.strict_violation is None:
            raise ValueError("`strict_violation` must be provided if `strict_constraint_features` is provided.")
        boolean("contributes_to_primal_update", self.contributes_to_primal_update)
        boolean("contributes_to_dual_update", self.contributes_to_dual_update)

    def extract_violations(self, do_unsqueeze: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(violation, strict_violation)``, the latter falling back to ``violation``.

        Args:
          do_unsqueeze: make 0-d violations 1-D.
        """
        violation = self.violation
        strict = self.strict_violation if self.strict_violation is not None else violation
        if do_unsqueeze:
            if violation.dim() == 0:
                violation = violation.unsqueeze(0)
            if strict.dim() == 0:
                strict = strict.unsqueeze(0)
        return violation, strict

    def extract_constraint_features(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(constraint_features, strict_constraint_features)``, the latter falling back to the
        former."""
        strict = self.strict_constraint_features
        return self.constraint_features, (strict if strict is not None else self.constraint_features)


class Constraint:
    """A (block of) constraint(s) of a constrained minimization problem.

    Args:
      constraint_type: ``ConstraintType.EQUALITY`` or ``ConstraintType.INEQUALITY``.
      formulation_type: a :class:`~.formulations.Formulation` subclass (default
        :class:`~.formulations.Lagrangian`).
      multiplier: the multiplier; required exactly when the formulation expects one.
      penalty_coefficient: the penalty coefficient; required exactly when the formulation
        expects one.

    Raises:
      ValueError: a bad ``constraint_type``, a missing or unexpected multiplier or penalty
        coefficient, a negative multiplier for an inequality constraint.
      TypeError: ``formulation_type`` is not a Formulation subclass.
    """

    def __init__(
        self,
        constraint_type: ConstraintType,
        formulation_type: type[Formulation] = Lagrangian,
        multiplier: Optional[Multiplier] = None,
        penalty_coefficient: Optional[PenaltyCoefficient] = None,
    ) -> None:
        if not (isinstance(formulation_type, type) and issubclass(formulation_type, Formulation)):
            raise TypeError(f"Invalid formulation_type: {formulation_type!r} (expected a Formulation subclass)")
        self._name = None
        self.constraint_type = constraint_type
        self.formulation_type = formulation_type
        self.formulation = formulation_type(constraint_type=constraint_type)

        self.multiplier = multiplier
        self.formulation.sanity_check_multiplier(multiplier)
        if multiplier is not None:
            multiplier.set_constraint_type(constraint_type)

        self.penalty_coefficient = penalty_coefficient
        self.formulation.sanity_check_penalty_coefficient(penalty_coefficient)

    @property
    def name(self) -> Optional[str]:
        """The name under which the constraint is registered in a CMP (set once)."""
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        if self._name is not None:
            raise ValueError("Cannot set the name of a constraint more than once.")
        self._name = name

    def compute_contribution_to_lagrangian(
        self, constraint_state: ConstraintState, primal_or_dual: Literal["primal", "dual"]
    ) -> Optional[ContributionStore]:
        """The constraint's contribution to the primal or dual Lagrangian (``None`` if none).

        Raises:
          ValueError: ``primal_or_dual`` is neither ``"primal"`` nor ``"dual"``.
        """
        if primal_or_dual not in ("primal", "dual"):
            raise ValueError(f"Invalid primal_or_dual: {primal_or_dual!r} (expected 'primal' or 'dual')")
        compute = getattr(self.formulation, f"compute_contribution_to_{primal_or_dual}_lagrangian")
        kwargs = {"constraint_state": constraint_state}
        if self.formulation.expects_penalty_coefficient:
            kwargs["penalty_coefficient"] = self.penalty_coefficient
        if self.formulation.expects_multiplier:
            kwargs["multiplier"] = self.multiplier
        return compute(**kwargs)

    def __repr__(self) -> str:
        text = f"constraint_type={self.constraint_type}, formulation={self.formulation}"
        if self.multiplier is not None:
            text += f", multiplier={self.multiplier}"
        if self.penalty_coefficient is not None:
            text += f", penalty_coefficient={self.penalty_coefficient}"
        return f"Constraint({text})"
