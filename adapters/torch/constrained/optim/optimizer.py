r"""The base of Cooper's optimizers: :class:`CooperOptimizer`, its state and :class:`RollOut`.

A Cooper optimizer drives a constrained minimization problem (CMP) through
:meth:`CooperOptimizer.roll`: it evaluates the CMP, builds the primal and dual Lagrangians,
back-propagates them and steps stock :class:`torch.optim.Optimizer`\s on the primal variables
(minimising) and on the multipliers (maximising). It talks to the problem only through
duck-typed calls (``cmp.compute_cmp_state(...)``, ``cmp.compute_violations(...)``,
``cmp.multipliers()``, ``cmp_state.compute_primal_lagrangian()`` /
``compute_dual_lagrangian()``, ``store.backward()``, ``multiplier.post_step_()``), so it works
with uniopt's problem classes and with cooper-optim's alike.

Drop-in for ``cooper.optim.optimizer`` (cooper-optim 1.0.1).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, TypedDict

import torch

from uniopt._validation import check_nonfinite

from ..._dispatch import nonfinite_gate

__all__ = ["CooperOptimizer", "CooperOptimizerState", "RollOut"]


def _checked(what: str, optimizers: Optional[list]) -> Optional[list]:
    """``optimizers`` (``None`` or a list); TypeError naming ``what`` if an entry is not an
    optimizer (an object with ``param_groups``, ``step`` and ``zero_grad``)."""
    for optimizer in optimizers or []:
        if not (hasattr(optimizer, "param_groups") and callable(getattr(optimizer, "step", None))
                and callable(getattr(optimizer, "zero_grad", None))):
            raise TypeError(f"Invalid {what}: {optimizer!r} (expected a torch optimizer or a "
                            f"sequence of them)")
    return optimizers


def _as_list(optimizers: Any) -> Optional[list]:
    """``None``, or the optimizer(s) as a new list (one optimizer or a sequence of them)."""
    if optimizers is None:
        return None
    if isinstance(optimizers, Sequence):
        return list(optimizers)
    return [optimizers]


class CooperOptimizerState(TypedDict):
    r"""The state of a :class:`CooperOptimizer` (what :meth:`CooperOptimizer.state_dict`
    returns).

    Attributes:
      primal_optimizer_states: the primal optimizers' ``state_dict``\s, in order.
      dual_optimizer_states: the dual optimizers' ``state_dict``\s, or ``None`` for an
        optimizer without dual optimizers (:class:`UnconstrainedOptimizer`).
    """

    primal_optimizer_states: list
    dual_optimizer_states: Optional[list]


class RollOut(NamedTuple):
    """What :meth:`CooperOptimizer.roll` returns.

    Attributes:
      loss: the objective's value (which evaluation it comes from is each ``roll``'s).
      cmp_state: the problem's state (``CMPState``) of that evaluation.
      primal_lagrangian_store: the ``LagrangianStore`` of the primal Lagrangian.
      dual_lagrangian_store: the ``LagrangianStore`` of the dual Lagrangian.
    """

    loss: Any
    cmp_state: Any
    primal_lagrangian_store: Any
    dual_lagrangian_store: Any


class CooperOptimizer(abc.ABC):
    r"""Base class of :class:`ConstrainedOptimizer` and :class:`UnconstrainedOptimizer`.

    Args:
      cmp: the constrained minimization problem; ``roll`` calls its ``compute_cmp_state``
        and the dual step calls ``post_step_()`` on each of its ``multipliers()``.
      primal_optimizers: one :class:`torch.optim.Optimizer` or a sequence of them, for the
        primal variables (e.g. a model's weights).
      dual_optimizers: one optimizer or a sequence of them for the multipliers (each param
        group with ``maximize=True``), or ``None``.
      nonfinite: (keyword) ``"propagate"`` (default: NaN/inf flow into the wrapped optimizers,
        as in Cooper), ``"raise"`` (``FloatingPointError``) or ``"skip"``: checked on the loss,
        the constraint values and every primal and dual gradient before each step of a roll;
        a roll that raises or skips leaves every parameter and optimizer state as it found
        them (a roll that steps before its last check restores a snapshot taken only under
        these policies), and a skip increments ``nonfinite_skips`` (in the state dict). See
        docs/faults.md.

    Attributes:
      cmp: the problem.
      primal_optimizers: the primal optimizers, as a list.
      dual_optimizers: the dual optimizers, as a list, or ``None``.
    """

    def __init__(self, cmp: Any, primal_optimizers: Any, dual_optimizers: Any = None, *,
                 nonfinite: str = "propagate") -> None:
        if not callable(getattr(cmp, "compute_cmp_state", None)):
            raise TypeError(f"Invalid cmp: {cmp!r} (expected a ConstrainedMinimizationProblem)")
        self.nonfinite = check_nonfinite(nonfinite)
        self.nonfinite_skips = 0
        self.cmp = cmp
        self.primal_optimizers = _checked("primal_optimizers", _as_list(primal_optimizers))
        self.dual_optimizers = _checked("dual_optimizers", _as_list(dual_optimizers))

    # -- the nonfinite policy (docs/faults.md) ----------------------------------------------------
    def _finite(self, cmp_state: Any = None) -> bool:
        """The ``nonfinite`` policy on the gradients now in every primal and dual parameter's
        ``.grad`` and on ``cmp_state``'s loss and constraint values, before a step.

        ``True``: go on. ``False`` (``"skip"``): ``nonfinite_skips`` was incremented; the caller
        changes nothing more. Raises ``FloatingPointError`` under ``"raise"``.
        """
        if self.nonfinite == "propagate":
            return True
        labelled = []
        if cmp_state is not None:
            labelled.append((cmp_state.loss, "the loss"))
            for constraint, state in cmp_state.observed_constraints.items():
                name = getattr(constraint, "name", None) or type(constraint).__name__
                labelled.append((state.violation, f"the violation of constraint {name}"))
                labelled.append((state.strict_violation, f"the strict violation of {name}"))
        for k, opt in enumerate(self._all_optimizers()):
            for j, group in enumerate(opt.param_groups):
                labelled.extend((p.grad, f"the gradient of parameter {i} of param group {j} of "
                                          f"{type(opt).__name__} {k}")
                                for i, p in enumerate(group["params"]) if p.grad is not None)
        labelled = [(t, label) for t, label in labelled if isinstance(t, torch.Tensor)]
        if nonfinite_gate(self, labelled, [], self.__dict__.get("process_group")):
            return True
        self.nonfinite_skips += 1
        return False

    def _snapshot(self) -> Any:
        """Copies of every primal and dual parameter and optimizer state (only under a policy
        other than ``"propagate"``, for a roll that steps before its last check)."""
        if self.nonfinite == "propagate":
            return None
        params = [p for opt in self._all_optimizers() for g in opt.param_groups for p in g["params"]]
        return ([(p, p.detach().clone()) for p in params],
                [(opt, copy.deepcopy(opt.state_dict())) for opt in self._all_optimizers()])

    @torch.no_grad()
    def _finite_or_restore(self, snapshot: Any, cmp_state: Any = None) -> bool:
        """:meth:`_finite`, putting ``snapshot`` back first when the roll stops here."""
        try:
            ok = self._finite(cmp_state)
        except FloatingPointError:
            self._put_back(snapshot)
            raise
        if not ok:
            self._put_back(snapshot)
        return ok

    @staticmethod
    @torch.no_grad()
    def _put_back(snapshot: Any) -> None:
        if snapshot is None:
            return
        params, states = snapshot
        for p, saved in params:
            p.copy_(saved)
        for opt, saved in states:
            opt.load_state_dict(saved)

    def _all_optimizers(self) -> list:
        return list(self.primal_optimizers or []) + list(self.dual_optimizers or [])

    def zero_grad(self) -> None:
        """Set the gradients of every primal and dual parameter to ``None``."""
        for optimizer in self._all_optimizers():
            optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def primal_step(self) -> None:
        """Step every primal optimizer (with the gradients already in ``.grad``)."""
        for optimizer in self.primal_optimizers:
            optimizer.step()

    def state_dict(self) -> CooperOptimizerState:
        """The ``state_dict`` of each primal and dual optimizer, under Cooper's keys."""
        dual_states = None
        if self.dual_optimizers is not None:
            dual_states = [optimizer.state_dict() for optimizer in self.dual_optimizers]
        state = CooperOptimizerState(
            primal_optimizer_states=[optimizer.state_dict() for optimizer in self.primal_optimizers],
            dual_optimizer_states=dual_states,
        )
        if self.__dict__.get("nonfinite", "propagate") != "propagate":
            state["nonfinite_skips"] = self.nonfinite_skips
        return state

    def load_state_dict(self, state: CooperOptimizerState) -> None:
        """Load the primal and dual optimizers' states from ``state``.

        The counts are checked before anything is loaded, and if one optimizer's
        ``load_state_dict`` raises, the optimizers already loaded get their previous state
        back: a failed load changes nothing.

        Args:
          state: a dict with ``primal_optimizer_states`` and ``dual_optimizer_states``, as
            returned by :meth:`state_dict`.

        Raises:
          ValueError: the number of primal (or dual) optimizer states is not the number of
            primal (dual) optimizers, or ``state`` has dual states and this optimizer has no
            dual optimizers.
        """
        primal_states = state["primal_optimizer_states"]
        dual_states = state["dual_optimizer_states"]
        if len(primal_states) != len(self.primal_optimizers):
            raise ValueError(
                "The number of primal optimizers does not match the number of primal optimizer states."
                f" (got {len(primal_states)} states for {len(self.primal_optimizers)} optimizers)"
            )
        if self.dual_optimizers is None:
            if dual_states is not None:
                raise ValueError(
                    "Optimizer state dict contains ``dual_optimizer_states`` but ``dual_optimizers`` is None."
                )
        elif dual_states is None or len(dual_states) != len(self.dual_optimizers):
            count = "no" if dual_states is None else len(dual_states)
            raise ValueError(
                "The number of dual optimizers does not match the number of dual optimizer states."
                f" (got {count} states for {len(self.dual_optimizers)} optimizers)"
            )
        pairs = list(zip(self.primal_optimizers, primal_states))
        if self.dual_optimizers is not None:
            pairs += list(zip(self.dual_optimizers, dual_states))
        loaded = []
        try:
            for optimizer, optimizer_state in pairs:
                before = copy.deepcopy(optimizer.state_dict())
                optimizer.load_state_dict(optimizer_state)
                loaded.append((optimizer, before))
        except Exception:
            for optimizer, before in reversed(loaded):
                optimizer.load_state_dict(before)
            raise
        if "nonfinite_skips" in state or self.nonfinite != "propagate":
            self.nonfinite_skips = int(state.get("nonfinite_skips", 0))

    @abc.abstractmethod
    def roll(self, *args: Any, **kwargs: Any) -> RollOut:
        """Evaluate the problem and update its variables; returns a :class:`RollOut`."""
