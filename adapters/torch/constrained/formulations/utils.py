r"""The terms formulations add to the primal and dual Lagrangians (``cooper.formulations.utils``).

Notation: :math:`\lambda` multiplier values, :math:`c` penalty coefficients, :math:`g` the
violations of inequality constraints (:math:`g \le 0` feasible), :math:`h` of equality ones.
Primal terms carry gradient to the primal parameters only (multipliers detached); dual terms
carry gradient to the multipliers only (violations detached).

References:
  Nocedal & Wright, *Numerical Optimization* (2006), Eqs. 17.7, 17.36, 17.64-17.65.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..utils import ConstraintType, torch_rules

__all__ = [
    "evaluate_constraint_factor",
    "compute_primal_weighted_violation",
    "compute_dual_weighted_violation",
    "compute_quadratic_penalty",
    "compute_primal_quadratic_augmented_contribution",
]


def evaluate_constraint_factor(module: Any, constraint_features: Optional[torch.Tensor],
                               expand_shape: tuple) -> torch.Tensor:
    """The value of a multiplier or penalty coefficient for the observed constraints.

    The module is called with ``constraint_features`` when it ``expects_constraint_features``,
    else without arguments. A 0-d value becomes 1-D; a single value that does not require grad
    (a scalar penalty coefficient) is expanded to ``expand_shape`` (multipliers never are: one
    multiplier value per violation).

    Args:
      module: a multiplier or penalty coefficient.
      constraint_features: the observed constraints' features (indices), or ``None``.
      expand_shape: the shape of the violation tensor.
    """
    value = module(constraint_features) if module.expects_constraint_features else module()
    if value.dim() == 0:
        value = value.unsqueeze(0)
    if not value.requires_grad and value.numel() == 1 and math.prod(expand_shape) > 1:
        value = value.expand(expand_shape)
    return value


def compute_primal_weighted_violation(constraint_factor_value: torch.Tensor, violation: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda.\mathrm{detach}()^\top g(x)`: the weighted violations, differentiable in the
    primal parameters only."""
    return torch.einsum("i...,i...->", constraint_factor_value.detach(), violation)


def compute_dual_weighted_violation(multiplier_value: torch.Tensor, violation: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda^\top g(x).\mathrm{detach}()`: differentiable in the multipliers only, so the
    gradient of a multiplier is its constraint's violation (no penalty-coefficient factor)."""
    return torch.einsum("i...,i...->", multiplier_value, violation.detach())


def compute_quadratic_penalty(penalty_coefficient_value: torch.Tensor, violation: torch.Tensor,
                              constraint_type: ConstraintType) -> torch.Tensor:
    r""":math:`\tfrac12 c^\top \mathrm{relu}(g)^2` (inequality) or :math:`\tfrac12 c^\top h^2`
    (equality): half the penalty-weighted squared :func:`uniopt.rules.constrained.penalty_measure`
    (``relu(g)`` / ``|h|``, the measure the penalty updaters use)."""
    measure = torch_rules.penalty_measure(violation, constraint_type == ConstraintType.INEQUALITY)
    return 0.5 * torch.einsum("i...,i...->", penalty_coefficient_value, measure**2)


def compute_primal_quadratic_augmented_contribution(
    multiplier_value: torch.Tensor,
    penalty_coefficient_value: torch.Tensor,
    violation: torch.Tensor,
    constraint_type: ConstraintType,
) -> Optional[torch.Tensor]:
    r"""The augmented-Lagrangian term of one constraint (multipliers detached).

    Inequality: :math:`\sum_i \frac{1}{2c_i}\left(\mathrm{relu}(\lambda_i + c_i g_i)^2 -
    \lambda_i^2\right)` (:func:`uniopt.rules.constrained.augmented_ineq_term`, the JAX face's
    term too: :math:`\lambda_i g_i + \tfrac{c_i}{2} g_i^2` where :math:`\lambda_i + c_i g_i > 0`,
    :math:`-\lambda_i^2 / (2c_i)` elsewhere), whose limit at :math:`c_i \to 0` is the Lagrangian
    term :math:`\lambda_i g_i`; entries with :math:`c_i = 0` use that limit (Cooper divides by
    zero and returns NaN). Equality: :math:`\lambda^\top h + \tfrac12 c^\top h^2`.
    """
    if constraint_type == ConstraintType.INEQUALITY:
        lam = multiplier_value.detach()
        return torch_rules.augmented_ineq_term(lam, penalty_coefficient_value, violation).sum()
    if constraint_type == ConstraintType.EQUALITY:
        return compute_primal_weighted_violation(multiplier_value, violation) + compute_quadratic_penalty(
            penalty_coefficient_value, violation, constraint_type
        )
    return None
