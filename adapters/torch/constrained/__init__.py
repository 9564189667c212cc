"""Constrained learning with Lagrange multipliers in PyTorch, with Cooper's API.

A drop-in for the problem side of `Cooper <https://github.com/cooper-org/cooper>`_
(cooper-optim 1.0.1): ``import uniopt.adapters.torch.constrained as cooper`` gives
:class:`ConstraintType`, :class:`Constraint`, :class:`ConstraintState`,
:class:`ConstrainedMinimizationProblem`, :class:`CMPState`, :class:`LagrangianStore` and the
modules :mod:`.multipliers`, :mod:`.formulations` and :mod:`.penalty_coefficients`, with
Cooper's names, signatures, state-dict layouts and error messages. The dual-side arithmetic is
:mod:`uniopt.rules.constrained` (bound to torch ops here). Deliberate differences (each in
docs/deviations.md): a float64 ``init`` keeps its dtype in a multiplier; an Augmented
Lagrangian inequality term with a zero penalty coefficient is the Lagrangian term (Cooper: NaN);
``ImplicitMultiplier.expects_constraint_features`` is defined; ``dual_parameters()`` is in
registration order; torch-style errors for arguments Cooper does not check.

Example:
  >>> import torch
  >>> import uniopt.adapters.torch.constrained as cooper
  >>> class Problem(cooper.ConstrainedMinimizationProblem):
  ...     def __init__(self):
  ...         super().__init__()
  ...         lam = cooper.multipliers.DenseMultiplier(num_constraints=1, dtype=torch.float64)
  ...         self.budget = cooper.Constraint(cooper.ConstraintType.INEQUALITY, multiplier=lam)
  ...     def compute_cmp_state(self, x):
  ...         violation = (x.sum() - 1).reshape(1)       # x_1 + x_2 <= 1
  ...         return cooper.CMPState(loss=(x - 1).pow(2).sum(),
  ...                                observed_constraints={self.budget: cooper.ConstraintState(violation)})
  >>> cmp = Problem()
  >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
  >>> primal = torch.optim.SGD([x], lr=0.1)
  >>> dual = torch.optim.SGD(cmp.dual_parameters(), lr=0.1, maximize=True)
  >>> for _ in range(2000):
  ...     primal.zero_grad(); dual.zero_grad()
  ...     state = cmp.compute_cmp_state(x)
  ...     state.compute_primal_lagrangian().backward(); state.compute_dual_lagrangian().backward()
  ...     primal.step(); dual.step(); cmp.budget.multiplier.post_step_()
  >>> [round(v, 4) for v in x.tolist()], round(cmp.budget.multiplier.weight.item(), 4)
  ([0.5, 0.5], 1.0)
"""

from . import formulations, multipliers, optim, penalty_coefficients
from .cmp import CMPState, ConstrainedMinimizationProblem, LagrangianStore
from .constraints import Constraint, ConstraintState
from .utils import ConstraintType

#: The Cooper release whose API this package follows.
__cooper_version__ = "1.0.1"

__all__ = [
    "CMPState",
    "ConstrainedMinimizationProblem",
    "Constraint",
    "ConstraintState",
    "ConstraintType",
    "LagrangianStore",
    "formulations",
    "multipliers",
    "optim",
    "penalty_coefficients",
]
