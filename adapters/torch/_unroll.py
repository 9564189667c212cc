r"""Differentiable inner-optimizer steps for unrolled bilevel optimization (torch).

A lower-level (LL) optimizer -- ``torch.optim.SGD`` (momentum, Nesterov, weight decay,
``maximize``; ``dampening=0``), ``torch.optim.Adam`` / ``torch.optim.AdamW`` (no ``amsgrad``),
or uniopt's :class:`~uniopt.adapters.torch.QHM`, :class:`~uniopt.adapters.torch.QHAdam`,
:class:`~uniopt.adapters.torch.QHAdamW` -- is read as one of the QH rules of
:mod:`uniopt.rules.qh`, per param group:

* ``SGD(lr, momentum=0)`` is the plain step ``p <- p_scale * p - lr * (sign * g + wd * p)``
  (``"sgd"``);
* ``SGD(lr, momentum=β)`` is QHM with ``nu = 1`` (``nu = β`` with ``nesterov``) and learning
  rate ``lr / (1 - β)``: torch's buffer is QHM's dampened buffer divided by ``1 - β``
  (:mod:`uniopt.rules.qh_convert`), so the iterates are the same;
* ``Adam`` is QHAdam with ``nus = (1, 1)`` (QHAdam's running bias-correction weights give
  Adam's bias-corrected moments); ``AdamW`` (or ``Adam(decoupled_weight_decay=True)``) adds
  decoupled decay ``p_scale = 1 - lr * wd``;
* uniopt's QHM and QHAdam(W) are their own rules.

The hyper-parameters are read from the optimizer's param groups at every LL solve (so learning
rate schedulers work); the optimizer's state is never read or written: every solve starts from
fresh (zero) state, as the issue asks.

One step is executed either

* with torch ops: the rule functions of :mod:`uniopt.rules.qh` re-bound over torch tensors
  (``uniopt.rules.bind``), differentiable to any order, on any device and dtype. The square
  root of QHAdam's denominator is :func:`safe_sqrt`, whose derivative at exactly 0 is taken as 0
  (no NaN/Inf when a gradient entry and its moments are exactly zero; ``torch.sqrt`` would give
  ``inf * 0 = NaN`` there); or
* with the Numba kernels of :mod:`uniopt.adapters.torch._unroll_kernel` (``sgd_step``,
  ``qhm_step``, ``qhadam_step``: a forward kernel plus a VJP kernel in a
  ``torch.autograd.Function``, first derivative only),
  when the module is present and ``_unroll_kernel.supported(...)`` accepts the tensors (plain,
  1-D contiguous float32/float64 CPU or CUDA tensors).

Both take the iterate of one param group as ONE flat vector (one call per group per step).

The truncated (not differentiated) steps of T-RAD run in place, under ``no_grad``, on the
shared dispatcher (:mod:`uniopt.adapters.torch._dispatch`) by a uniopt QHM / QHAdam over the
detached flat vectors (:class:`TruncatedRunner`); its state is then carried into the
differentiable phase (:meth:`TruncatedRunner.carry`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from uniopt._validation import check_qhadam, check_qhm
from uniopt.rules import bind
from uniopt.rules import qh as _qh

from . import _unroll_kernel  # the Numba forward + VJP kernels (None: torch ops only, in tests)

__all__ = ["safe_sqrt", "GroupRule", "group_rules", "initial_state", "diff_step", "kernel_available",
           "kernel_supported", "TruncatedRunner", "SUPPORTED"]

SUPPORTED = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW", "uniopt QHM",
             "uniopt QHAdam", "uniopt QHAdamW")


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 (not ``inf``)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.sqrt(x)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        # differentiable torch ops, so a second derivative (not needed here) would also work
        return torch.where(r > 0, grad / (2 * torch.where(r > 0, r, torch.ones_like(r))),
                           torch.zeros_like(grad))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Elementwise square root with derivative 0 at exactly 0 (see the module docstring)."""
    return _SafeSqrt.apply(x)


_rules = bind(_qh, sqrt=safe_sqrt)


class GroupRule(NamedTuple):
    """The update rule of one LL param group, as read at the start of a solve.

    ``kind`` is ``"sgd"``, ``"qhm"`` or ``"qhadam"``; ``coef`` is a
    :class:`uniopt.rules.qh.QHMCoefficients` (``"sgd"``, ``"qhm"``) or a
    :class:`uniopt.rules.qh.QHAdamHyper` (``"qhadam"``); ``kwargs`` builds the same rule as a
    uniopt QHM / QHAdam param group (for the truncated steps).
    """

    kind: str
    coef: tuple
    kwargs: dict


def _float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def group_rule(optimizer: torch.optim.Optimizer, group: dict) -> GroupRule:
    """Read one param group of ``optimizer`` as a QH rule (raises for what has none).

    Raises:
      TypeError: an optimizer class that is not supported.
      ValueError: ``SGD`` with ``dampening != 0`` or ``momentum >= 1``, ``Adam`` with
        ``amsgrad=True``, or hyper-parameters the QH checks reject.
    """
    from .qh import QHM, QHAdam  # a sibling module; imported here to keep import order simple

    maximize = bool(group.get("maximize", False))
    if isinstance(optimizer, QHM):
        kwargs = {"lr": _float(group["lr"]), "momentum": _float(group["momentum"]),
                  "nu": _float(group["nu"]), "weight_decay": _float(group["weight_decay"]),
                  "weight_decay_type": group["weight_decay_type"], "maximize": maximize}
        check_qhm(**kwargs)
        return GroupRule("qhm", _qh.qhm_coefficients(**kwargs), kwargs)
    if isinstance(optimizer, QHAdam):
        kwargs = {"lr": _float(group["lr"]), "betas": tuple(map(_float, group["betas"])),
                  "nus": tuple(map(_float, group["nus"])),
                  "weight_decay": _float(group["weight_decay"]),
                  "decouple_weight_decay": bool(group["decouple_weight_decay"]),
                  "eps": _float(group["eps"]), "maximize": maximize}
        check_qhadam(**kwargs)
        return GroupRule("qhadam", _qh.qhadam_hyper(**kwargs), kwargs)
    if isinstance(optimizer, torch.optim.SGD):
        lr, momentum = _float(group["lr"]), _float(group["momentum"])
        dampening, wd = _float(group["dampening"]), _float(group["weight_decay"])
        if dampening != 0.0:
            raise ValueError(f"Invalid dampening value: {group['dampening']} (the differentiable "
                             "inner SGD of Dynamic supports dampening=0 only)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']} (expected 0 <= "
                             "momentum < 1 for the differentiable inner SGD)")
        if momentum == 0.0:
            kwargs = {"lr": lr, "momentum": 0.0, "nu": 1.0, "weight_decay": wd,
                      "weight_decay_type": "grad", "maximize": maximize}
            check_qhm(**kwargs)
            return GroupRule("sgd", _qh.qhm_coefficients(**kwargs), kwargs)
        nu = momentum if group.get("nesterov", False) else 1.0
        kwargs = {"lr": lr / (1.0 - momentum), "momentum": momentum, "nu": nu,
                  "weight_decay": wd, "weight_decay_type": "grad", "maximize": maximize}
        check_qhm(**kwargs)
        return GroupRule("qhm", _qh.qhm_coefficients(**kwargs), kwargs)
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass in torch >= 2.6
        if group.get("amsgrad", False):
            raise ValueError("Invalid amsgrad value: True (the differentiable inner Adam of "
                             "Dynamic does not support amsgrad)")
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
            group.get("decoupled_weight_decay", False))
        kwargs = {"lr": _float(group["lr"]), "betas": tuple(map(_float, group["betas"])),
                  "nus": (1.0, 1.0), "weight_decay": _float(group["weight_decay"]),
                  "decouple_weight_decay": decoupled, "eps": _float(group["eps"]),
                  "maximize": maximize}
        check_qhadam(**kwargs)
        return GroupRule("qhadam", _qh.qhadam_hyper(**kwargs), kwargs)
    raise TypeError(f"Invalid ll_opt: {type(optimizer).__name__} (expected one of "
                    f"{', '.join(SUPPORTED)})")


def group_rules(optimizer: torch.optim.Optimizer) -> list:
    """:func:`group_rule` of every param group, in order."""
    return [group_rule(optimizer, group) for group in optimizer.param_groups]


def initial_state(rule: GroupRule, w: torch.Tensor) -> tuple:
    """Fresh state of one group: ``(tensors, scalars)``; tensors zeros like ``w``."""
    if rule.kind == "sgd":
        return (), ()
    if rule.kind == "qhm":
        return (torch.zeros_like(w),), ()
    return (torch.zeros_like(w), torch.zeros_like(w)), (0.0, 0.0)


def advance(rule: GroupRule, scalars: tuple) -> tuple:
    """This step's coefficients of one group and its next scalar state."""
    if rule.kind != "qhadam":
        return rule.coef, scalars
    w1, w2, coefficients = _qh.qhadam_step(rule.coef, scalars[0], scalars[1])
    return coefficients, (w1, w2)


def kernel_available() -> bool:
    """Whether the unroll kernels are in use (a test sets ``_unroll_kernel`` to ``None``)."""
    return _unroll_kernel is not None


def kernel_supported(*tensors) -> bool:
    """Whether the unroll kernels can take these tensors (False without the kernels)."""
    return _unroll_kernel is not None and bool(_unroll_kernel.supported(*tensors))


def diff_step(kind: str, coefficients, w: torch.Tensor, g: torch.Tensor, buffers: tuple,
              kernel: bool) -> tuple:
    """One differentiable step of one group: ``(w_new, buffers_new)`` (out of place).

    Args:
      kind: ``"sgd"``, ``"qhm"`` or ``"qhadam"``.
      coefficients: this step's coefficients (:func:`advance`).
      w, g: the group's flat iterate and gradient.
      buffers: the state tensors (``()``, ``(buf,)`` or ``(exp_avg, exp_avg_sq)``).
      kernel: run the Numba kernels instead of torch ops when they accept these tensors
        (checked here, with the gradient: an unusual gradient layout falls back to torch ops).
    """
    kernel = kernel and _unroll_kernel is not None and _unroll_kernel.supported(w, g, *buffers)
    if kind == "sgd":
        if kernel:
            return _unroll_kernel.sgd_step(w, g, coefficients), ()
        c = coefficients
        if c.grad_sign == 1.0 and c.wd_grad == 0.0 and c.p_scale == 1.0:
            # the rule with its unit coefficients dropped (the same numbers): one torch op,
            # one pass forward and backward -- faster than any kernel call for an axpy
            return torch.add(w, g, alpha=-c.lr), ()
        direction = _rules.effective_gradient(g, w, c.grad_sign, c.wd_grad)
        return _rules.descend(w, direction, c.p_scale, c.lr), ()
    if kind == "qhm":
        if kernel:
            w_new, buf = _unroll_kernel.qhm_step(w, g, buffers[0], coefficients)
        else:
            w_new, buf = _rules.qhm_update(w, g, buffers[0], *coefficients)
        return w_new, (buf,)
    if kernel:
        w_new, m, v = _unroll_kernel.qhadam_step(w, g, buffers[0], buffers[1], tuple(coefficients))
    else:
        w_new, m, v = _rules.qhadam_update(w, g, buffers[0], buffers[1], *coefficients)
    return w_new, (m, v)


class TruncatedRunner:
    """Graph-free steps on detached flat vectors through a uniopt QHM / QHAdam (the dispatcher).

    ``flats`` are fresh leaves (one per LL group), updated in place by :meth:`step`; the
    optimizer holds one param group per LL group with that group's :attr:`GroupRule.kwargs`,
    so a CPU float32/float64 vector is updated by one Numba table-kernel call per group.
    """

    def __init__(self, rules: list, flats: list):
        from .qh import QHM, QHAdam

        self.rules, self.flats = rules, flats
        groups = [{"params": [f], **r.kwargs} for r, f in zip(rules, flats)]
        if rules[0].kind == "qhadam":
            self.opt = QHAdam(groups)
        else:
            self.opt = QHM(groups, lr=0.0, momentum=0.0, nu=1.0)

    def step(self, grads: list) -> None:
        """One in-place step with the given (detached) gradients, one per flat vector."""
        for f, g in zip(self.flats, grads):
            f.grad = g
        self.opt.step()
        for f in self.flats:
            f.grad = None

    def carry(self) -> list:
        """The state of each group as :func:`initial_state` lays it out, after the steps taken."""
        out = []
        for r, f in zip(self.rules, self.flats):
            s = self.opt.state.get(f)
            if r.kind == "sgd":
                out.append(((), ()))
            elif s is None:  # no step taken
                out.append(initial_state(r, f))
            elif r.kind == "qhm":
                out.append(((s["momentum_buffer"],), ()))
            else:
                out.append(((s["exp_avg"], s["exp_avg_sq"]),
                            (float(s["beta1_weight"]), float(s["beta2_weight"]))))
        return out
