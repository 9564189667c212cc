r"""Cooper's constrained optimizers: simultaneous, alternating and extrapolation updates.

Each is a :class:`ConstrainedOptimizer`: stock :class:`torch.optim.Optimizer`\s on the primal
variables (minimising the primal Lagrangian) and on the multipliers (every param group with
``maximize=True``: gradient *ascent* on the dual Lagrangian, whose gradient in the multipliers
is the constraint violation), followed by each multiplier's ``post_step_()`` (the projection
of inequality multipliers onto :math:`\lambda \ge 0`). They differ in the order of the
updates and in where the constraints are evaluated; each ``roll()`` returns Cooper's
:class:`~uniopt.adapters.torch.constrained.optim.RollOut`.

Drop-in for ``cooper.optim.constrained_optimizers`` (cooper-optim 1.0.1). Deviations
(``docs/deviations.md``): a dual optimizer whose param groups have no ``maximize`` key is a
``ValueError`` (Cooper: ``KeyError``); a multiplier shared by several constraints gets one
``post_step_()`` per dual step (Cooper: one per constraint); the ``RuntimeError`` of
:class:`AlternatingPrimalDualOptimizer` for a ``compute_violations`` that returns a loss
leaves the primal variables and optimizers as they were (Cooper raises after the primal step).
"""

from __future__ import annotations

import abc
import copy
from typing import Any, Optional

import torch

from ..._dispatch import group_average, resolve_process_group
from . import _fused
from .optimizer import CooperOptimizer, RollOut

__all__ = [
    "AlternatingDualPrimalOptimizer",
    "AlternatingPrimalDualOptimizer",
    "ConstrainedOptimizer",
    "ExtrapolationConstrainedOptimizer",
    "SimultaneousOptimizer",
]


class ConstrainedOptimizer(CooperOptimizer, abc.ABC):
    r"""Base class of the optimizers of a constrained minimization problem.

    Args:
      cmp: the constrained minimization problem (``compute_cmp_state``, ``multipliers()``).
      primal_optimizers: one :class:`torch.optim.Optimizer` or a sequence of them, for the
        primal variables.
      dual_optimizers: one optimizer or a sequence of them for the multipliers (e.g.
        ``torch.optim.SGD(cmp.dual_parameters(), lr=..., maximize=True)``); every param group
        must have ``maximize=True``. For a problem without multipliers use
        :class:`~uniopt.adapters.torch.constrained.optim.UnconstrainedOptimizer`.
      nonfinite: (keyword) ``"propagate"`` (default), ``"raise"`` or ``"skip"``: checked on
        the loss, the constraint values and every gradient before each step of a roll; a roll
        that raises or skips changes nothing (docs/faults.md; :class:`CooperOptimizer`).
      process_group: the ``torch.distributed`` process group over which the gradients of the
        dual parameters -- the constraint violations each rank observed on its own batch --
        are averaged before every dual step (and extrapolation), in one ``all_reduce`` of every
        dual parameter, packed; DDP averages the primal gradients the same way, so every rank
        takes the dual step of a single process on the whole batch. ``None``: the world group
        when ``torch.distributed`` is initialised at construction, else none (a single
        process). A multiplier row observed by some ranks only gets the average with zeros
        for the others (what DDP does to a parameter a rank did not reach); a sparse
        (IndexedMultiplier) gradient stays sparse, over the rows some rank observed. Every
        rank must call ``roll``. A uniopt extension (Cooper has no ``process_group``).

    Raises:
      TypeError: ``primal_optimizers`` or ``dual_optimizers`` is ``None``.
      ValueError: a dual param group does not have ``maximize=True`` (or has no ``maximize``).
    """

    def __init__(self, cmp: Any, primal_optimizers: Any, dual_optimizers: Any, *,
                 nonfinite: str = "propagate", process_group: Any = None) -> None:
        super().__init__(cmp=cmp, primal_optimizers=primal_optimizers, dual_optimizers=dual_optimizers,
                         nonfinite=nonfinite)
        self.process_group = resolve_process_group(process_group)
        self.base_sanity_checks()
        self.custom_sanity_checks()

    def base_sanity_checks(self) -> None:
        """Check that there are primal and dual optimizers and that the dual ones maximise.

        Raises:
          TypeError: no primal or no dual optimizer.
          ValueError: a dual param group without ``maximize=True``.
        """
        if self.primal_optimizers is None:
            raise TypeError("No primal optimizer(s) was provided for building a ConstrainedOptimizer.")
        if self.dual_optimizers is None:
            raise TypeError("No dual optimizer(s) was provided for building a ConstrainedOptimizer.")
        for i, dual_optimizer in enumerate(self.dual_optimizers):
            for k, group in enumerate(dual_optimizer.param_groups):
                if not group.get("maximize", False):
                    value = group["maximize"] if "maximize" in group else "<missing>"
                    raise ValueError(
                        "Dual optimizers must be set to carry out maximization steps."
                        f" (dual optimizer {i} ({type(dual_optimizer).__name__}), param group {k}:"
                        f" maximize={value})"
                    )

    def custom_sanity_checks(self) -> None:
        """Checks of a subclass (none here)."""

    def _multipliers(self) -> list:
        """The problem's multipliers, each once, in registration order."""
        seen, unique = set(), []
        for multiplier in self.cmp.multipliers():
            if id(multiplier) not in seen:
                seen.add(id(multiplier))
                unique.append(multiplier)
        return unique

    def _post_step(self) -> None:
        for multiplier in self._multipliers():
            multiplier.post_step_()

    @torch.no_grad()
    def _average_dual_grads(self) -> None:
        """Average the dual parameters' gradients over ``process_group`` (one ``all_reduce``).

        Every dual parameter takes part on every rank (zeros and "not observed" where this rank
        has no gradient), so the packed buffers agree in size whatever each rank observed.
        """
        if self.process_group is None:
            return
        params, seen = [], set()
        for opt in self.dual_optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        if not params:
            return
        rows = []
        for p in params:
            g = p.grad
            values = torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            observed = torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            sparse = 0.0
            if g is not None:
                if g.is_sparse:
                    sparse = 1.0
                    g = g.coalesce()
                    mask = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
                    mask[g.indices()[0]] = 1.0
                    observed = mask.reshape(-1)
                    g = g.to_dense()
                else:
                    observed.fill_(1.0)
                values = g.detach().reshape(-1).to(torch.float64)
            rows += [values, observed, torch.tensor([sparse], dtype=torch.float64, device=p.device)]
        mean = group_average(torch.cat(rows), self.process_group)
        offset = 0
        for p in params:
            n = p.numel()
            values = mean[offset:offset + n].to(p.dtype).reshape(p.shape)
            observed = mean[offset + n:offset + 2 * n] > 0
            sparse = bool(mean[offset + 2 * n] > 0)
            offset += 2 * n + 1
            if not bool(observed.any()):
                p.grad = None
            elif sparse:
                hit = observed.reshape(p.shape[0], -1).any(dim=1).nonzero().reshape(-1)
                p.grad = torch.sparse_coo_tensor(hit.unsqueeze(0), values[hit], p.shape).coalesce()
            else:
                p.grad = values

    @torch.no_grad()
    def dual_step(self) -> None:
        """Step every dual optimizer, then ``post_step_()`` every multiplier (the projection
        of inequality multipliers onto :math:`\\lambda \\ge 0`). Multipliers of constraints that
        were not observed have no gradient, and the step leaves them alone. With a
        ``process_group``, the dual gradients are first averaged over its ranks (one
        ``all_reduce``).

        Where that is exactly this step, a dual parameter takes uniopt's fused kernels instead
        (:mod:`uniopt.adapters.torch.constrained.optim._fused`): ``torch.optim.SGD`` without
        momentum or weight decay on a Dense/Indexed multiplier is one pass of step and
        projection (an IndexedMultiplier's: only the sampled rows, however many rows it has),
        and uniopt's :class:`~uniopt.adapters.torch.constrained.optim.nuPI` fuses the
        projection into its own kernels. Every other optimizer (Adam, momentum, step hooks,
        subclasses, implicit multipliers...) runs its ordinary ``step()`` followed by the
        multipliers' ``post_step_()``. The route each parameter took is in
        ``self._fused_dual.last_routes``.
        """
        self._average_dual_grads()
        stepper = self.__dict__.get("_fused_dual")
        if stepper is None:
            stepper = self._fused_dual = _fused.DualStep()
        stepper.step(self.dual_optimizers, self._multipliers())

    @abc.abstractmethod
    def roll(self, *args: Any, **kwargs: Any) -> RollOut:
        """One full update of the primal and dual variables."""


class SimultaneousOptimizer(ConstrainedOptimizer):
    r"""Simultaneous (projected) gradient descent-ascent: both updates from :math:`(x_t, \lambda_t)`.

    .. math::
       x_{t+1} = \mathrm{primal\_update}\big(x_t, \nabla_x L_{primal}(x_t, \lambda_t)\big),\qquad
       \lambda_{t+1} = \big[\mathrm{dual\_update}\big(\lambda_t, \nabla_\lambda L_{dual}(x_t, \lambda)\big)\big]_+

    (:math:`[\cdot]_+` for inequality multipliers only). With SGD on both sides and the
    Lagrangian formulation: :math:`x_{t+1} = x_t - \eta_x(\nabla f(x_t) + \lambda_t^\top
    \nabla g(x_t))`, :math:`\lambda_{t+1} = [\lambda_t + \eta_\lambda g(x_t)]_+`.

    Args: see :class:`ConstrainedOptimizer`.

    Example:
      >>> # opt = SimultaneousOptimizer(cmp, torch.optim.SGD(model.parameters(), lr=1e-2),
      >>> #                             torch.optim.SGD(cmp.dual_parameters(), lr=1e-2, maximize=True))
      >>> # roll_out = opt.roll(compute_cmp_state_kwargs={"inputs": x, "targets": y})
    """

    def roll(self, compute_cmp_state_kwargs: Optional[dict] = None) -> RollOut:
        """Evaluate the problem at :math:`x_t` and take the primal and dual steps from it.

        Args:
          compute_cmp_state_kwargs: keyword arguments of ``cmp.compute_cmp_state``.

        Returns:
          ``RollOut(loss, cmp_state, primal_store, dual_store)``, all at :math:`(x_t, \\lambda_t)`.
        """
        kwargs = {} if compute_cmp_state_kwargs is None else compute_cmp_state_kwargs
        self.zero_grad()
        cmp_state = self.cmp.compute_cmp_state(**kwargs)
        primal_store = cmp_state.compute_primal_lagrangian()
        dual_store = cmp_state.compute_dual_lagrangian()
        primal_store.backward()
        dual_store.backward()
        if self.nonfinite == "propagate" or self._finite(cmp_state):
            self.primal_step()
            self.dual_step()
        return RollOut(cmp_state.loss, cmp_state, primal_store, dual_store)


class AlternatingPrimalDualOptimizer(ConstrainedOptimizer):
    r"""Alternating updates, primal first; the dual step sees the constraints at :math:`x_{t+1}`.

    .. math::
       x_{t+1} = \mathrm{primal\_update}\big(x_t, \nabla_x L_{primal}(x_t, \lambda_t)\big),\qquad
       \lambda_{t+1} = \big[\mathrm{dual\_update}\big(\lambda_t, \nabla_\lambda L_{dual}(x_{t+1}, \lambda)\big)\big]_+

    The constraints are evaluated twice: at :math:`x_t` (primal Lagrangian) and, without
    autograd, at :math:`x_{t+1}` with ``cmp.compute_violations(**compute_violations_kwargs)``
    when the problem implements it (it must not compute the loss), else with
    ``cmp.compute_cmp_state(**compute_cmp_state_kwargs)``. With the augmented Lagrangian, SGD
    on both sides and dual ``lr`` equal to the penalty coefficient this is the classical
    method of multipliers.

    Args: see :class:`ConstrainedOptimizer`.
    """

    def __init__(self, cmp: Any, primal_optimizers: Any, dual_optimizers: Any, *,
                 nonfinite: str = "propagate", process_group: Any = None) -> None:
        super().__init__(cmp, primal_optimizers, dual_optimizers, nonfinite=nonfinite,
                         process_group=process_group)
        self._violations_checked = False

    def _primal_snapshot(self) -> list:
        """Copies of the primal variables and optimizer states (taken until one roll has shown
        that ``compute_violations`` does not return a loss)."""
        params = [p for opt in self.primal_optimizers for g in opt.param_groups for p in g["params"]]
        return [[(p, p.detach().clone()) for p in params],
                [(opt, copy.deepcopy(opt.state_dict())) for opt in self.primal_optimizers]]

    @staticmethod
    @torch.no_grad()
    def _restore(snapshot: list) -> None:
        params, states = snapshot
        for p, saved in params:
            p.copy_(saved)
        for opt, saved in states:
            opt.load_state_dict(saved)

    def roll(self, compute_cmp_state_kwargs: Optional[dict] = None,
             compute_violations_kwargs: Optional[dict] = None) -> RollOut:
        r"""Primal step from :math:`(x_t, \lambda_t)`, then dual step with the constraints at
        :math:`x_{t+1}`.

        Args:
          compute_cmp_state_kwargs: keyword arguments of ``cmp.compute_cmp_state``.
          compute_violations_kwargs: keyword arguments of ``cmp.compute_violations`` (used for
            the dual step when the problem implements it).

        Returns:
          ``RollOut(loss, cmp_state, primal_store, dual_store)``: the state at :math:`x_{t+1}`
          (its loss is ``None`` when it comes from ``compute_violations``); ``loss`` is the
          loss at :math:`x_{t+1}` when ``compute_cmp_state`` was re-evaluated, else
          :math:`f(x_t)`; the primal store at :math:`(x_t, \lambda_t)`, the dual store at
          :math:`(x_{t+1}, \lambda_t)`.

        Raises:
          RuntimeError: ``compute_violations`` returned a state with a loss (the primal
            variables and optimizers are then as before the call).
        """
        cmp_kwargs = {} if compute_cmp_state_kwargs is None else compute_cmp_state_kwargs
        violations_kwargs = {} if compute_violations_kwargs is None else compute_violations_kwargs
        self.zero_grad()
        cmp_state = self.cmp.compute_cmp_state(**cmp_kwargs)
        primal_store = cmp_state.compute_primal_lagrangian()
        primal_store.backward()
        if self.nonfinite != "propagate" and not self._finite(cmp_state):
            return RollOut(cmp_state.loss, cmp_state, primal_store, type(primal_store)())
        snapshot = None if self._violations_checked else self._primal_snapshot()
        restore = self._snapshot() if self.nonfinite != "propagate" else None
        self.primal_step()

        with torch.no_grad():
            try:
                new_state = self.cmp.compute_violations(**violations_kwargs)
            except NotImplementedError:
                new_state = self.cmp.compute_cmp_state(**cmp_kwargs)
            else:
                if new_state.loss is not None:
                    if snapshot is not None:
                        self._restore(snapshot)
                    raise RuntimeError(
                        "Expected `compute_violations` to not populate the loss. "
                        "Please provide this value for the `compute_cmp_state` instead."
                    )
        self._violations_checked = True

        dual_store = new_state.compute_dual_lagrangian()
        dual_store.backward()
        if self.nonfinite == "propagate" or self._finite_or_restore(restore, new_state):
            self.dual_step()
        loss = new_state.loss if new_state.loss is not None else cmp_state.loss
        return RollOut(loss, new_state, primal_store, dual_store)


class AlternatingDualPrimalOptimizer(ConstrainedOptimizer):
    r"""Alternating updates, dual first; the primal step uses the new multipliers.

    .. math::
       \lambda_{t+1} = \big[\mathrm{dual\_update}\big(\lambda_t,
       \nabla_\lambda L_{dual}(x_t, \lambda)\big)\big]_+,\qquad
       x_{t+1} = \mathrm{primal\_update}\big(x_t, \nabla_x L_{primal}(x_t, \lambda_{t+1})\big)

    One evaluation of the problem (at :math:`x_t`) serves both steps, so it costs what
    :class:`SimultaneousOptimizer` costs.

    Args: see :class:`ConstrainedOptimizer`.
    """

    def roll(self, compute_cmp_state_kwargs: Optional[dict] = None) -> RollOut:
        r"""Dual step at :math:`x_t`, then primal step with :math:`\lambda_{t+1}`.

        Args:
          compute_cmp_state_kwargs: keyword arguments of ``cmp.compute_cmp_state``.

        Returns:
          ``RollOut(loss, cmp_state, primal_store, dual_store)``: loss and state at
          :math:`x_t`, the primal store at :math:`(x_t, \lambda_{t+1})`, the dual store at
          :math:`(x_t, \lambda_t)`.
        """
        kwargs = {} if compute_cmp_state_kwargs is None else compute_cmp_state_kwargs
        self.zero_grad()
        cmp_state = self.cmp.compute_cmp_state(**kwargs)
        dual_store = cmp_state.compute_dual_lagrangian()
        dual_store.backward()
        if self.nonfinite != "propagate" and not self._finite(cmp_state):
            return RollOut(cmp_state.loss, cmp_state, type(dual_store)(), dual_store)
        restore = self._snapshot() if self.nonfinite != "propagate" else None
        self.dual_step()
        primal_store = cmp_state.compute_primal_lagrangian()
        primal_store.backward()
        if self.nonfinite == "propagate" or self._finite_or_restore(restore):
            self.primal_step()
        return RollOut(cmp_state.loss, cmp_state, primal_store, dual_store)


class ExtrapolationConstrainedOptimizer(ConstrainedOptimizer):
    r"""Extragradient: an extrapolation step to :math:`(x_{t+1/2}, \lambda_{t+1/2})`, then the
    update of :math:`(x_t, \lambda_t)` with the gradients there.

    .. math::
       x_{t+1/2} = \mathrm{primal\_update}(x_t, \nabla_x L_{primal}(x_t, \lambda_t)),\quad
       \lambda_{t+1/2} = [\mathrm{dual\_update}(\lambda_t, \nabla_\lambda L_{dual}(x_t, \lambda))]_+,

       x_{t+1} = \mathrm{primal\_update}(x_t, \nabla_x L_{primal}(x_{t+1/2}, \lambda_{t+1/2})),\quad
       \lambda_{t+1} = [\mathrm{dual\_update}(\lambda_t, \nabla_\lambda L_{dual}(x_{t+1/2}, \lambda))]_+

    Every primal and dual optimizer needs ``extrapolation()`` (e.g.
    :class:`~uniopt.adapters.torch.constrained.optim.ExtraSGD`,
    :class:`~uniopt.adapters.torch.constrained.optim.ExtraAdam`).

    Args: see :class:`ConstrainedOptimizer`.

    Raises:
      RuntimeError: an optimizer has no ``extrapolation`` method.
    """

    def custom_sanity_checks(self) -> None:
        """Every optimizer must have ``extrapolation()``.

        Raises:
          RuntimeError: one has not.
        """
        lacking = [f"{side} optimizer {i} ({type(opt).__name__})"
                   for side, optimizers in (("primal", self.primal_optimizers), ("dual", self.dual_optimizers))
                   for i, opt in enumerate(optimizers) if not callable(getattr(opt, "extrapolation", None))]
        if lacking:
            raise RuntimeError(
                "Some of the provided optimizers do not have an extrapolation method. "
                "Please ensure that all optimizers are extrapolation capable. (" + ", ".join(lacking) + ")"
            )

    @torch.no_grad()
    def primal_extrapolation_step(self) -> None:
        """``extrapolation()`` of every primal optimizer."""
        for optimizer in self.primal_optimizers:
            optimizer.extrapolation()

    @torch.no_grad()
    def dual_extrapolation_step(self) -> None:
        """``extrapolation()`` of every dual optimizer, then ``post_step_()`` every multiplier."""
        self._average_dual_grads()
        for optimizer in self.dual_optimizers:
            optimizer.extrapolation()
        self._post_step()

    def roll(self, compute_cmp_state_kwargs: Optional[dict] = None) -> RollOut:
        r"""Extrapolate, re-evaluate at the extrapolated point, update from :math:`(x_t, \lambda_t)`.

        Args:
          compute_cmp_state_kwargs: keyword arguments of ``cmp.compute_cmp_state`` (both
            evaluations).

        Returns:
          ``RollOut`` of the first evaluation: loss, state and both stores at
          :math:`(x_t, \lambda_t)`.
        """
        kwargs = {} if compute_cmp_state_kwargs is None else compute_cmp_state_kwargs
        roll_out = None
        for extrapolate in (True, False):
            self.zero_grad()
            cmp_state = self.cmp.compute_cmp_state(**kwargs)
            primal_store = cmp_state.compute_primal_lagrangian()
            dual_store = cmp_state.compute_dual_lagrangian()
            if extrapolate:
                roll_out = RollOut(cmp_state.loss, cmp_state, primal_store, dual_store)
            primal_store.backward()
            dual_store.backward()
            if extrapolate:
                if self.nonfinite != "propagate":
                    if not self._finite(cmp_state):
                        return roll_out
                    restore = self._snapshot()
                self.primal_extrapolation_step()
                self.dual_extrapolation_step()
            elif self.nonfinite == "propagate" or self._finite_or_restore(restore, cmp_state):
                self.primal_step()
                self.dual_step()
        return roll_out
