r""":class:`UnconstrainedOptimizer`: Cooper's interface for a problem without multipliers.

Drop-in for ``cooper.optim.UnconstrainedOptimizer`` (cooper-optim 1.0.1). Use it for an
unconstrained problem or one whose constraints all use a formulation without multipliers
(``QuadraticPenalty``).
"""

from __future__ import annotations

from typing import Any, Optional

from .optimizer import CooperOptimizer, RollOut

__all__ = ["UnconstrainedOptimizer"]


class UnconstrainedOptimizer(CooperOptimizer):
    r"""Primal steps only: :math:`x_{t+1} = \mathrm{primal\_update}(x_t, \nabla_x L_{primal}(x_t))`.

    Args:
      cmp: the problem (``compute_cmp_state``).
      primal_optimizers: one :class:`torch.optim.Optimizer` or a sequence of them.
      dual_optimizers: normally ``None``; optimizers given here (Cooper's signature allows it)
        are zeroed by :meth:`zero_grad` and saved by :meth:`state_dict`, never stepped.
      nonfinite: (keyword) ``"propagate"``, ``"raise"`` or ``"skip"``: see
        :class:`~uniopt.adapters.torch.constrained.optim.optimizer.CooperOptimizer` and
        docs/faults.md.

    Example:
      >>> # opt = UnconstrainedOptimizer(cmp, torch.optim.SGD(model.parameters(), lr=1e-2))
      >>> # roll_out = opt.roll(compute_cmp_state_kwargs={"inputs": x})
    """

    def roll(self, compute_cmp_state_kwargs: Optional[dict] = None) -> RollOut:
        """Evaluate the problem and take one primal step.

        Args:
          compute_cmp_state_kwargs: keyword arguments of ``cmp.compute_cmp_state``.

        Returns:
          ``RollOut(loss, cmp_state, primal_store, dual_store)`` with an empty dual store
          (a ``LagrangianStore()`` of the problem's own class, ``lagrangian`` ``None``).
        """
        kwargs = {} if compute_cmp_state_kwargs is None else compute_cmp_state_kwargs
        self.zero_grad()
        cmp_state = self.cmp.compute_cmp_state(**kwargs)
        primal_store = cmp_state.compute_primal_lagrangian()
        primal_store.backward()
        if self.nonfinite == "propagate" or self._finite(cmp_state):
            self.primal_step()
        # the problem's own LagrangianStore class, empty (duck-typed: no import of the problem side)
        dual_store = type(primal_store)()
        return RollOut(cmp_state.loss, cmp_state, primal_store, dual_store)
