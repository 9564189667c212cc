r"""Extragradient optimizers: :class:`ExtraSGD` and :class:`ExtraAdam`, for
:class:`~uniopt.adapters.torch.constrained.optim.ExtrapolationConstrainedOptimizer`.

An :class:`ExtragradientOptimizer` has two steps. :meth:`~ExtragradientOptimizer.extrapolation`
saves the parameters :math:`\theta_t` (on the first call after a :meth:`~ExtragradientOptimizer.step`)
and moves them by the update computed from the current gradients, to
:math:`\theta_{t+1/2}`; :meth:`~ExtragradientOptimizer.step` computes the update from the
gradients then present (those at :math:`\theta_{t+1/2}`) and applies it to the saved
:math:`\theta_t`. Both calls advance the optimizer's state (the momentum buffer, Adam's moments
and step count), as in Cooper and in Gidel et al.'s implementation.

Written with plain torch ops on the stock :class:`torch.optim.Optimizer` machinery (param groups,
``state``, ``state_dict``, step hooks). Drop-in for ``cooper.optim.ExtraSGD`` / ``ExtraAdam``
(cooper-optim 1.0.1). Deviations (``docs/deviations.md``): gradients are never modified (Cooper's
``ExtraSGD`` adds the weight decay into ``p.grad`` in place when ``maximize=False``); parameters are
updated in place (Cooper rebinds ``p.data`` in ``step``); a parameter without a gradient at
``step`` returns to its saved value :math:`\theta_t` (Cooper leaves it at :math:`\theta_{t+1/2}`);
``ExtraAdam`` checks for sparse gradients before changing anything and rejects a negative
``weight_decay``; NaN hyper-parameters are rejected; an unpickled optimizer works (Cooper's
``ExtraSGD.__setstate__`` raises).

References:
  Korpelevich, "The extragradient method for finding saddle points and other problems",
  Matecon 12 (1976). Gidel, Berard, Vignoud, Vincent & Lacoste-Julien, "A Variational
  Inequality Perspective on Generative Adversarial Networks", ICLR 2019,
  https://arxiv.org/abs/1802.10551.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from uniopt._validation import boolean, check_nonfinite, pair, real

from ..._dispatch import grad_labels, nonfinite_gate

__all__ = ["ExtraAdam", "ExtraSGD", "ExtragradientOptimizer"]


def _axpy(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x + alpha * y`` as a new tensor (``x`` may be sparse, ``y`` is dense)."""
    if x.is_sparse:
        x = x.to_dense()
    return x.add(y, alpha=alpha)


def _nonnegative(what: str, value: Any) -> None:
    if not real(what, value) >= 0.0:  # NaN fails too; TypeError for a non-number
        raise ValueError(f"Invalid {what}: {value}")


class ExtragradientOptimizer(torch.optim.Optimizer):
    r"""Base class of optimizers with an extrapolation step.

    A subclass implements :meth:`update`, the additive update of one parameter computed from
    its current gradient (advancing that parameter's state).

    Args:
      params: an iterable of tensors or of dicts defining param groups.
      defaults: the default hyper-parameters of the param groups.
      nonfinite: ``"propagate"`` (default, Cooper's behaviour), ``"raise"`` or ``"skip"``:
        what :meth:`extrapolation` and :meth:`step` do with non-finite gradients
        (docs/faults.md). Checked before anything changes; a skipped call changes neither the
        parameters nor the state (nor the saved :math:`\theta_t`, so a later ``step`` still
        completes the pair) and increments every group's ``nonfinite_skips``.

    Attributes:
      params_copy: the parameters saved by the first :meth:`extrapolation` since the last
        :meth:`step` (one tensor per parameter, in param-group order), else empty.
    """

    def __init__(self, params: Iterable, defaults: dict, nonfinite: str = "propagate") -> None:
        self.nonfinite = check_nonfinite(nonfinite)
        if self.nonfinite != "propagate":  # the counter (the default keeps Cooper's groups)
            defaults = {**defaults, "nonfinite_skips": 0}
        super().__init__(params, defaults)
        self.params_copy: list = []

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("params_copy", [])
        self.__dict__.setdefault("nonfinite", "propagate")

    def _go_ahead(self) -> bool:
        """The ``nonfinite`` policy on the current gradients (True: the call goes ahead)."""
        if self.nonfinite == "propagate":
            return True
        return nonfinite_gate(self, grad_labels(self.param_groups), self.param_groups)

    def update(self, p: torch.Tensor, group: dict) -> Optional[torch.Tensor]:
        """The update to add to ``p`` (``None`` when ``p`` has no gradient); advances ``p``'s
        state. Implemented by subclasses."""
        raise NotImplementedError

    def _check_gradients(self) -> None:
        """Raise before anything changes if a gradient cannot be handled (no check here)."""

    def _params(self) -> list:
        return [(p, group) for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def extrapolation(self) -> None:
        r"""Move the parameters by the update computed from their gradients, to
        :math:`\theta_{t+1/2}`; the first call after a :meth:`step` saves :math:`\theta_t`."""
        self._check_gradients()
        if not self._go_ahead():
            return
        save = len(self.params_copy) == 0
        for p, group in self._params():
            u = self.update(p, group)
            if save:
                self.params_copy.append(p.detach().clone())
            if u is not None:
                p.add_(u)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Optional[torch.Tensor]:
        r"""Apply the update computed from the current gradients to the parameters saved by
        :meth:`extrapolation`: :math:`\theta_{t+1} = \theta_t + u(\nabla(\theta_{t+1/2}))`.
        A parameter without a gradient goes back to :math:`\theta_t`.

        Args:
          closure: re-evaluates the model and returns the loss (run with autograd enabled).

        Returns:
          The closure's loss, or ``None``.

        Raises:
          RuntimeError: :meth:`extrapolation` was not called since the last ``step``.
        """
        if len(self.params_copy) == 0:
            raise RuntimeError("Need to call extrapolation before calling step.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        if not self._go_ahead():
            return loss
        for (p, group), saved in zip(self._params(), self.params_copy):
            u = self.update(p, group)
            if u is not None:
                saved.add_(u)
            p.copy_(saved)
        self.params_copy = []
        return loss


class ExtraSGD(ExtragradientOptimizer):
    r"""SGD (with momentum, Nesterov, weight decay) with an extrapolation step.

    With :math:`g` the gradient (:math:`-g` when ``maximize``) plus :math:`w \theta`:

    .. math::
       b \leftarrow \mu b + (1 - \tau) g\ \ (b = g \text{ at first}),\qquad
       d = g + \mu b \text{ (Nesterov) or } b,\qquad u = -\eta d

    (:math:`d = g` without momentum). Symbols: :math:`\eta` = ``lr``, :math:`\mu` =
    ``momentum``, :math:`\tau` = ``dampening``, :math:`w` = ``weight_decay``. This is
    :class:`torch.optim.SGD`'s update; the velocity is not scaled by the learning rate.

    Args:
      params: parameters or param-group dicts.
      lr: learning rate :math:`\eta \ge 0`.
      momentum: momentum factor :math:`\mu \ge 0`.
      dampening: dampening :math:`\tau` of the momentum.
      weight_decay: L2 penalty :math:`w \ge 0`.
      nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
      maximize: ascend instead of descend (the dual side of a constrained problem).
      nonfinite: ``"propagate"`` (default), ``"raise"`` or ``"skip"``
        (:class:`ExtragradientOptimizer`, docs/faults.md).

    Raises:
      ValueError: a negative or NaN ``lr``, ``momentum`` or ``weight_decay``; ``nesterov``
        without momentum or with dampening.

    Example:
      >>> import torch
      >>> x = torch.nn.Parameter(torch.tensor([1.0]))
      >>> opt = ExtraSGD([x], lr=0.1)
      >>> (x ** 2).sum().backward(); opt.extrapolation()        # x_{1/2} = 0.8
      >>> x.grad = None; (x ** 2).sum().backward(); opt.step()  # x_1 = 1 - 0.1 * 1.6
      >>> round(x.item(), 6)
      0.84
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, maximize: bool = False, *,
                 nonfinite: str = "propagate") -> None:
        _nonnegative("learning rate", lr)
        _nonnegative("momentum value", momentum)
        _nonnegative("weight_decay value", weight_decay)
        real("dampening value", dampening)
        boolean("nesterov", nesterov)
        if nesterov and (momentum == 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize}
        super().__init__(params, defaults, nonfinite)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def update(self, p: torch.Tensor, group: dict) -> Optional[torch.Tensor]:
        """SGD's update of ``p`` (``None`` without a gradient); advances its momentum buffer."""
        grad = p.grad
        if grad is None:
            return None
        d_p = -grad if group["maximize"] else grad
        if group["weight_decay"] != 0:
            d_p = _axpy(d_p, p, group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p).add_(d_p)
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - group["dampening"])
            d_p = _axpy(d_p, buf, momentum) if group["nesterov"] else buf
        return d_p.mul(-group["lr"])


class ExtraAdam(ExtragradientOptimizer):
    r"""Adam (optionally AMSGrad) with an extrapolation step.

    With :math:`g` the gradient (:math:`-g` when ``maximize``) plus :math:`w \theta`, at step
    :math:`k` (counted over extrapolations and steps):

    .. math::
       m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
       u = -\eta \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k} \frac{m}{\sqrt{\hat v} + \epsilon}

    with :math:`\hat v = v`, or its running maximum under AMSGrad. (:math:`\epsilon` is added
    to :math:`\sqrt{v}` before the bias correction, as in Cooper; :class:`torch.optim.Adam`
    adds it after.)

    Args:
      params: parameters or param-group dicts.
      lr: learning rate :math:`\eta \ge 0`.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
      eps: :math:`\epsilon \ge 0`.
      weight_decay: L2 penalty :math:`w \ge 0`.
      amsgrad: use the AMSGrad variant.
      maximize: ascend instead of descend.
      nonfinite: ``"propagate"`` (default), ``"raise"`` or ``"skip"``
        (:class:`ExtragradientOptimizer`, docs/faults.md).

    Raises:
      ValueError: a hyper-parameter out of range (or NaN).
      RuntimeError: (at a step) a sparse gradient; nothing is changed then.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, maximize: bool = False, *,
                 nonfinite: str = "propagate") -> None:
        _nonnegative("learning rate", lr)
        _nonnegative("epsilon value", eps)
        for i, beta in enumerate(pair("betas", betas)):
            if not 0.0 <= real(f"beta parameter at index {i}", beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        _nonnegative("weight_decay value", weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad, "maximize": maximize}
        super().__init__(params, defaults, nonfinite)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def _check_gradients(self) -> None:
        for p, _ in self._params():
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")

    def update(self, p: torch.Tensor, group: dict) -> Optional[torch.Tensor]:
        """Adam's update of ``p`` (``None`` without a gradient); advances its moments and step."""
        grad = p.grad
        if grad is None:
            return None
        if group["maximize"]:
            grad = -grad
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsgrad"]:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = max_exp_avg_sq.sqrt().add_(group["eps"])
        else:
            denom = exp_avg_sq.sqrt().add_(group["eps"])
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        return exp_avg.mul(-step_size).div_(denom)
