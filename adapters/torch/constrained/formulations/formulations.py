r"""Formulations: how a constraint enters the primal and dual Lagrangians (``cooper.formulations``).

With :math:`\tilde g, \tilde h` the (possibly surrogate, differentiable) ``violation`` and
:math:`g, h` the ``strict_violation`` (defaults to ``violation``) of a
:class:`~uniopt.adapters.torch.constrained.ConstraintState`:

* :class:`Lagrangian`: primal :math:`\lambda^\top \tilde g` (:math:`\mu^\top \tilde h`), dual
  :math:`\lambda^\top g` (:math:`\mu^\top h`);
* :class:`QuadraticPenalty`: primal :math:`\tfrac12 c^\top \mathrm{relu}(\tilde g)^2`
  (:math:`\tfrac12 c^\top \tilde h^2`), no dual contribution;
* :class:`AugmentedLagrangian`: primal :math:`\sum_i \tfrac{1}{2c_i}(\mathrm{relu}(\lambda_i +
  c_i\tilde g_i)^2 - \lambda_i^2)` (:math:`\mu^\top \tilde h + \tfrac12 c^\top \tilde h^2`), dual
  :math:`\lambda^\top g` (:math:`\mu^\top h`).

Multiplier values are detached in primal terms, violations in dual terms.

The dual contribution of the Augmented Lagrangian is the Lagrangian's: the gradient of a
multiplier is the raw violation, **not** scaled by the penalty coefficient (Cooper's code; its
documentation says otherwise). The classical method of multipliers
:math:`\lambda \leftarrow \lambda + c\,g` is therefore SGD on the multipliers with learning rate
:math:`c` (e.g. ``torch.optim.SGD(..., lr=c, maximize=True)`` with the alternating
primal-dual update). A zero penalty coefficient in the inequality case gives the
:math:`c \to 0` limit, the Lagrangian term (Cooper returns NaN). See docs/deviations.md.
"""

from __future__ import annotations

import abc
from typing import Any, Literal, NamedTuple, Optional

import torch

from ..multipliers import Multiplier
from ..penalty_coefficients import PenaltyCoefficient
from ..utils import ConstraintType
from . import utils as formulation_utils

__all__ = ["ContributionStore", "Formulation", "Lagrangian", "QuadraticPenalty", "AugmentedLagrangian"]


class ContributionStore(NamedTuple):
    """One constraint's contribution to a Lagrangian and the factor values it used."""

    lagrangian_contribution: torch.Tensor
    multiplier_value: Optional[torch.Tensor] = None
    penalty_coefficient_value: Optional[torch.Tensor] = None


class Formulation(abc.ABC):
    """How a constraint contributes to the primal- and dual-differentiable Lagrangians.

    Args:
      constraint_type: ``ConstraintType.EQUALITY`` or ``ConstraintType.INEQUALITY``.

    Attributes:
      expects_multiplier: whether the constraint needs a multiplier.
      expects_penalty_coefficient: whether the constraint needs a penalty coefficient.

    Raises:
      ValueError: ``constraint_type`` is not a :class:`ConstraintType` member.
    """

    expects_multiplier: bool
    expects_penalty_coefficient: bool

    def __init__(self, constraint_type: ConstraintType) -> None:
        if not isinstance(constraint_type, ConstraintType) or constraint_type not in (
                ConstraintType.EQUALITY, ConstraintType.INEQUALITY):
            raise ValueError(f"{type(self).__name__} requires either an equality or inequality constraint. "
                             f"Invalid constraint_type: {constraint_type!r}")
        self.constraint_type = constraint_type

    def __repr__(self) -> str:
        return f"{type(self).__name__}(constraint_type={self.constraint_type})"

    def sanity_check_multiplier(self, multiplier: Optional[Multiplier]) -> None:
        """A multiplier must be given if and only if the formulation expects one.

        Raises:
          ValueError: a missing or unexpected multiplier.
          TypeError: a multiplier that is not a :class:`Multiplier`.
        """
        if self.expects_multiplier and multiplier is None:
            raise ValueError(f"{type(self).__name__} expects a multiplier but none was provided.")
        if not self.expects_multiplier and multiplier is not None:
            raise ValueError(f"Received unexpected multiplier for {type(self).__name__}.")
        if multiplier is not None and not isinstance(multiplier, Multiplier):
            raise TypeError(f"Invalid multiplier: {multiplier!r} (expected a Multiplier)")

    def sanity_check_penalty_coefficient(self, penalty_coefficient: Optional[PenaltyCoefficient]) -> None:
        """A penalty coefficient must be given if and only if the formulation expects one.

        Raises:
          ValueError: a missing or unexpected penalty coefficient.
          TypeError: a penalty coefficient that is not a :class:`PenaltyCoefficient`.
        """
        if self.expects_penalty_coefficient and penalty_coefficient is None:
            raise ValueError(f"{type(self).__name__} expects a penalty coefficient but none was provided.")
        if not self.expects_penalty_coefficient and penalty_coefficient is not None:
            raise ValueError(f"Received unexpected penalty coefficient for {type(self).__name__}.")
        if penalty_coefficient is not None and not isinstance(penalty_coefficient, PenaltyCoefficient):
            raise TypeError(f"Invalid penalty_coefficient: {penalty_coefficient!r} (expected a PenaltyCoefficient)")

    def _prepare_kwargs_for_lagrangian_contribution(
        self,
        constraint_state: Any,
        multiplier: Optional[Multiplier],
        penalty_coefficient: Optional[PenaltyCoefficient],
        primal_or_dual: Literal["primal", "dual"],
    ) -> tuple:
        """``(violation, multiplier_value, penalty_coefficient_value)`` for one side.

        The primal side uses ``violation``/``constraint_features``, the dual side
        ``strict_violation``/``strict_constraint_features`` (each falling back to the former).
        Factors the formulation does not expect are ``None``.
        """
        violation, strict_violation = constraint_state.extract_violations()
        features, strict_features = constraint_state.extract_constraint_features()
        if primal_or_dual == "dual":
            violation, features = strict_violation, strict_features
        kwargs = {"constraint_features": features, "expand_shape": violation.shape}
        multiplier_value = None
        if self.expects_multiplier:
            multiplier_value = formulation_utils.evaluate_constraint_factor(module=multiplier, **kwargs)
        penalty_value = None
        if self.expects_penalty_coefficient:
            penalty_value = formulation_utils.evaluate_constraint_factor(module=penalty_coefficient, **kwargs)
        return violation, multiplier_value, penalty_value

    @abc.abstractmethod
    def compute_contribution_to_primal_lagrangian(
        self, *args: Any, **kwargs: Any
    ) -> Optional[ContributionStore]:
        """The constraint's primal contribution, or ``None`` when its state does not contribute
        to the primal update."""

    @abc.abstractmethod
    def compute_contribution_to_dual_lagrangian(
        self, *args: Any, **kwargs: Any
    ) -> Optional[ContributionStore]:
        """The constraint's dual contribution, or ``None`` when its state does not contribute to
        the dual update (or the formulation has no dual variables)."""


class Lagrangian(Formulation):
    r"""The Lagrangian: primal :math:`\lambda^\top \tilde g(x)` (+ :math:`\mu^\top \tilde h(x)`),
    dual :math:`\lambda^\top g(x)` (+ :math:`\mu^\top h(x)`)."""

    expects_multiplier = True
    expects_penalty_coefficient = False

    def compute_contribution_to_primal_lagrangian(
        self, constraint_state: Any, multiplier: Multiplier
    ) -> Optional[ContributionStore]:
        """Primal contribution (see the class docstring)."""
        if not constraint_state.contributes_to_primal_update:
            return None
        violation, multiplier_value, _ = self._prepare_kwargs_for_lagrangian_contribution(
            constraint_state, multiplier, None, "primal")
        value = formulation_utils.compute_primal_weighted_violation(multiplier_value, violation)
        return ContributionStore(value, multiplier_value, None)

    def compute_contribution_to_dual_lagrangian(
        self, constraint_state: Any, multiplier: Multiplier
    ) -> Optional[ContributionStore]:
        """Dual contribution (see the class docstring)."""
        if not constraint_state.contributes_to_dual_update:
            return None
        violation, multiplier_value, _ = self._prepare_kwargs_for_lagrangian_contribution(
            constraint_state, multiplier, None, "dual")
        value = formulation_utils.compute_dual_weighted_violation(multiplier_value, violation)
        return ContributionStore(value, multiplier_value, None)


class QuadraticPenalty(Formulation):
    r"""The quadratic penalty :math:`\tfrac12 c^\top \mathrm{relu}(\tilde g)^2` /
    :math:`\tfrac12 c^\top \tilde h^2`; no dual variables (use it with an unconstrained
    optimizer and a penalty-coefficient updater)."""

    expects_multiplier = False
    expects_penalty_coefficient = True

    def compute_contribution_to_primal_lagrangian(
        self, constraint_state: Any, penalty_coefficient: PenaltyCoefficient
    ) -> Optional[ContributionStore]:
        """Primal contribution (see the class docstring)."""
        if not constraint_state.contributes_to_primal_update:
            return None
        violation, _, penalty_value = self._prepare_kwargs_for_lagrangian_contribution(
            constraint_state, None, penalty_coefficient, "primal")
        value = formulation_utils.compute_quadratic_penalty(penalty_value, violation, self.constraint_type)
        return ContributionStore(value, None, penalty_value)

    def compute_contribution_to_dual_lagrangian(
        self, constraint_state: Any, penalty_coefficient: PenaltyCoefficient
    ) -> None:
        """Always ``None``: the formulation has no dual variables."""
        return None


class AugmentedLagrangian(Formulation):
    r"""The augmented Lagrangian (module docstring): the Lagrangian plus a quadratic penalty in
    the primal; the Lagrangian's dual contribution (multiplier gradient = raw violation)."""

    expects_multiplier = True
    expects_penalty_coefficient = True

    def compute_contribution_to_primal_lagrangian(
        self, constraint_state: Any, multiplier: Multiplier, penalty_coefficient: PenaltyCoefficient
    ) -> Optional[ContributionStore]:
        """Primal contribution (see the module docstring)."""
        if not constraint_state.contributes_to_primal_update:
            return None
        violation, multiplier_value, penalty_value = self._prepare_kwargs_for_lagrangian_contribution(
            constraint_state, multiplier, penalty_coefficient, "primal")
        value = formulation_utils.compute_primal_quadratic_augmented_contribution(
            multiplier_value, penalty_value, violation, self.constraint_type)
        return ContributionStore(value, multiplier_value, penalty_value)

    def compute_contribution_to_dual_lagrangian(
        self, constraint_state: Any, multiplier: Multiplier, penalty_coefficient: PenaltyCoefficient
    ) -> Optional[ContributionStore]:
        """Dual contribution: :math:`\\lambda^\\top g` (no penalty factor)."""
        if not constraint_state.contributes_to_dual_update:
            return None
        violation, multiplier_value, penalty_value = self._prepare_kwargs_for_lagrangian_contribution(
            constraint_state, multiplier, penalty_coefficient, "dual")
        value = formulation_utils.compute_dual_weighted_violation(multiplier_value, violation)
        return ContributionStore(value, multiplier_value, penalty_value)
