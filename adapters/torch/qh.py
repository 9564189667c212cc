r"""QHM, QHAdam and QHAdamW as ``torch.optim`` optimizers (drop-in for ``qhoptim.pyt``).

Same constructor signatures, defaults, param-group keys and state keys as qhoptim 1.1.0, so a
qhoptim checkpoint loads into these classes and theirs into qhoptim. The arithmetic is
:mod:`uniopt.rules.qh`; :mod:`uniopt.adapters.torch._dispatch` runs it as a Numba kernel over
all CPU tensors of a group at once, as numba.cuda kernels on CUDA tensors, or with torch ops.

Deviations from qhoptim (also in ``docs/deviations.md``):

* coupled weight decay (``weight_decay_type="grad"``, ``decouple_weight_decay=False``) does not
  modify ``p.grad`` in place (qhoptim leaves the decayed gradient in ``.grad``);
* sparse gradients raise ``RuntimeError("QHM does not support sparse gradients")`` (or
  ``"QHAdam ..."``) before anything is changed (qhoptim's QHM half-works on them);
* validation follows :mod:`uniopt._validation`'s one policy: NaN, infinite and non-numeric
  hyper-parameters are rejected (``nu`` and ``nus`` must be finite), ``momentum`` must be in
  [0, 1) like ``betas``, flags must be bools, and every param group is validated, not only
  the defaults;
* omitting ``momentum`` is allowed when every param group gives one (like ``lr`` and ``nu``);
* :class:`QHAdamW` is a class (a subclass of :class:`QHAdam`), not a factory function;
* keyword-only ``maximize``; a step that raises leaves parameters and state unchanged.

As in ``torch.optim``: complex parameters are optimized as pairs of real numbers
(``torch.view_as_real``; the state is complex like the parameter), so ``QHAdam(nus=(1, 1))`` on
a complex parameter is ``torch.optim.Adam`` on it; NaN/inf gradients are not checked and
propagate element by element (see each class). DTensor parameters (FSDP2 ``fully_shard``) are
stepped on their local shards; other tensor subclasses with torch ops (see
:mod:`uniopt.adapters.torch._dispatch`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.optim.optimizer import Optimizer, required

from uniopt._validation import check_nonfinite, check_qhadam, check_qhm
from uniopt.kernels import qh_cpu
from uniopt.rules import bind
from uniopt.rules import qh as _qh
from uniopt.rules.qh_convert import QHAdamConversions, QHMConversions

from ._dispatch import Dispatcher, Rule, grad_labels, nonfinite_gate, owned_copy

__all__ = ["QHM", "QHAdam", "QHAdamW"]

_torch_rules = bind(_qh, sqrt=torch.sqrt)


def _given(value, placeholder):
    """``value``, or a valid placeholder when it is torch's ``required`` (checked per group)."""
    return placeholder if value is required else value


# ----------------------------------------------------------------------------------------------
# The rules, as the dispatcher sees them
# ----------------------------------------------------------------------------------------------
class _QHMRule(Rule):
    name = "QHM"
    buffers = ("momentum_buffer",)

    def init_state(self, p):
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.contiguous_format)}

    def constants(self, group):
        return _qh.qhm_coefficients(group["lr"], group["momentum"], group["nu"],
                                    group["weight_decay"], group["weight_decay_type"],
                                    group.get("maximize", False))

    def run_table(self, c, table):
        qh_cpu.qhm_table(table.parallel)(table.p_addrs, table.g_addrs, table.buffer_addrs[0],
                                         table.sizes, np.array(c, dtype=table.np_dtype))

    def run_cuda(self, c, p, g, buffers, state, stream):
        from uniopt.kernels import qh_cuda

        qh_cuda.qhm_step_(p, g, buffers[0], c, stream)

    def run_torch(self, c, p, g, buffers, state):
        (buf,) = buffers
        new_p, new_buf = _torch_rules.qhm_update(p, g, buf, *c)
        buf.copy_(new_buf)
        p.copy_(new_p)


class _QHAdamRule(Rule):
    name = "QHAdam"
    buffers = ("exp_avg", "exp_avg_sq")
    scalars = ("beta1_weight", "beta2_weight")

    def init_state(self, p):
        return {"beta1_weight": 0.0, "beta2_weight": 0.0,
                "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format)}

    def constants(self, group):
        return _qh.qhadam_hyper(group["lr"], group["betas"], group["nus"], group["weight_decay"],
                                group["decouple_weight_decay"], group["eps"],
                                group.get("maximize", False))

    def run_table(self, hyper, table):
        m_addrs, v_addrs = table.buffer_addrs
        w1, w2 = table.scalars
        qh_cpu.qhadam_table(table.parallel)(table.p_addrs, table.g_addrs, m_addrs, v_addrs,
                                            table.sizes, w1, w2, np.array(hyper, dtype=np.float64),
                                            table.scratch)

    @staticmethod
    def _advance(hyper, state):
        """Advance one tensor's bias-correction weights; this step's kernel coefficients."""
        w1, w2, coefficients = _qh.qhadam_step(hyper, float(state["beta1_weight"]),
                                               float(state["beta2_weight"]))
        state["beta1_weight"], state["beta2_weight"] = w1, w2
        return coefficients

    def run_cuda(self, hyper, p, g, buffers, state, stream):
        from uniopt.kernels import qh_cuda

        qh_cuda.qhadam_step_(p, g, buffers[0], buffers[1], self._advance(hyper, state), stream)

    def run_torch(self, hyper, p, g, buffers, state):
        m, v = buffers
        new_p, new_m, new_v = _torch_rules.qhadam_update(p, g, m, v, *self._advance(hyper, state))
        m.copy_(new_m)
        v.copy_(new_v)
        p.copy_(new_p)


# ----------------------------------------------------------------------------------------------
# The optimizers
# ----------------------------------------------------------------------------------------------
class _Base(Optimizer):
    """What QHM and QHAdam share: dispatch, closures, state-dict handling."""

    _rule: Rule

    def __init__(self, params, defaults, backend, nonfinite="propagate"):
        self.nonfinite = check_nonfinite(nonfinite)
        self._dispatcher = Dispatcher(self._rule, backend)
        if self.nonfinite != "propagate":  # the counter (the default keeps qhoptim's groups)
            defaults = {**defaults, "nonfinite_skips": 0}
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._dispatcher.invalidate()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_backend": self._dispatcher.backend}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        backend = state.pop("_backend", "auto")  # absent when called by load_state_dict
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "propagate")
        for group in self.param_groups:
            group.setdefault("maximize", False)  # groups saved by qhoptim have no "maximize"
            if self.nonfinite != "propagate":
                group.setdefault("nonfinite_skips", 0)
        if "_dispatcher" not in self.__dict__:  # unpickled or deep-copied
            self._dispatcher = Dispatcher(self._rule, backend)
        self._dispatcher.invalidate()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict (ours or qhoptim's), copying its tensors: the source is never aliased."""
        super().load_state_dict(owned_copy(state_dict))

    def step(self, closure=None):
        """Perform one optimization step.

        Args:
          closure: optional callable that re-evaluates the model and returns the loss; it is
            called once, with gradients enabled, before the update.

        Returns:
          The closure's return value (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite == "propagate":
            self._dispatcher.step(self.param_groups, self.state)
            return loss
        work = self._dispatcher.collect(self.param_groups, self.state)  # checks, changes nothing
        if nonfinite_gate(self, grad_labels(self.param_groups), self.param_groups):
            self._dispatcher.run(work)
        return loss


class QHM(QHMConversions, _Base):
    r"""Quasi-hyperbolic momentum (QHM), a drop-in replacement for ``qhoptim.pyt.QHM``.

    .. math::
       g_t' = g_t + \lambda\theta_t, \qquad
       b_{t+1} = \beta b_t + (1 - \beta) g_t', \qquad
       \theta_{t+1} = \theta_t - \alpha\left[(1 - \nu) g_t' + \nu b_{t+1}\right]

    with :math:`\alpha` = ``lr``, :math:`\beta` = ``momentum``, :math:`\nu` = ``nu``,
    :math:`\lambda` = ``weight_decay`` (for ``weight_decay_type="direct"`` instead
    :math:`\theta_t \leftarrow (1 - \alpha\lambda)\theta_t` first and :math:`g_t' = g_t`).
    The momentum buffer :math:`b` starts at zero and is *dampened*: ``nu=1`` is
    ``torch.optim.SGD(momentum=β, lr=α(1-β))``, ``nu=β`` is Nesterov's, ``nu=0`` is plain SGD.

    Args:
      params: an iterable of parameters, or of dicts defining parameter groups.
      lr: learning rate :math:`\alpha` (finite, >= 0); may be a 0-d tensor.
      momentum: :math:`\beta`, in [0, 1).
      nu: immediate discount :math:`\nu` (any finite number; ``nu > 1`` and ``nu < 0`` are
        meaningful, see the ``from_*`` converters).
      weight_decay: :math:`\lambda` (finite, >= 0).
      weight_decay_type: ``"grad"`` (add :math:`\lambda\theta` to the gradient, as
        ``torch.optim.SGD``) or ``"direct"`` (shrink the parameter by :math:`1 - \alpha\lambda`).
      maximize: (bool) ascend the objective instead of descending it.
      nonfinite: ``"propagate"`` (default, torch.optim's behaviour below), ``"raise"``
        (``FloatingPointError`` before anything changes) or ``"skip"`` (the step changes
        nothing and increments every group's ``nonfinite_skips``); see docs/faults.md.

    Hyper-parameters are re-read from each param group at every step (schedulers work).
    State per parameter: ``momentum_buffer``. Parameters whose ``.grad`` is ``None`` are
    skipped (no decay, no state). Unlike qhoptim, ``"grad"`` decay leaves ``p.grad`` unchanged,
    and sparse gradients raise ``RuntimeError`` before anything is modified. Complex parameters
    are updated as real pairs (``torch.optim.SGD``'s convention).

    NaN and inf gradients are not checked (as in ``torch.optim.SGD``): the update is
    elementwise, so an entry whose gradient is NaN or inf becomes non-finite in the parameter
    and the momentum buffer (inf can give NaN through the :math:`(1 - \nu) g` term, where SGD
    gives inf), and every other entry is updated normally. Skip such steps yourself (e.g. with
    ``torch.amp.GradScaler``) if they can happen.

    Example:
      >>> import torch
      >>> from uniopt.adapters.torch import QHM
      >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> opt = QHM([w], lr=0.5, momentum=0.9, nu=0.7)
      >>> for _ in range(200):
      ...     opt.zero_grad()
      ...     (w ** 2).sum().backward()
      ...     _ = opt.step()
      >>> bool(w.abs().max() < 1e-5)
      True

    References:
      Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019,
      https://arxiv.org/abs/1810.06801
    """

    _rule = _QHMRule()

    def __init__(self, params, lr=required, momentum=required, nu=required, weight_decay=0.0,
                 weight_decay_type="grad", *, maximize=False, nonfinite="propagate",
                 _backend="auto"):
        defaults = {"lr": lr, "momentum": momentum, "nu": nu, "weight_decay": weight_decay,
                    "weight_decay_type": weight_decay_type, "maximize": maximize}
        self._check_group(defaults)
        defaults["maximize"] = bool(maximize)
        super().__init__(params, defaults, _backend, nonfinite)

    def _check_group(self, group):
        check_qhm(_given(group["lr"], 0.0), _given(group["momentum"], 0.0),
                  _given(group["nu"], 0.0), group["weight_decay"], group["weight_decay_type"],
                  group.get("maximize", False))


class QHAdam(QHAdamConversions, _Base):
    r"""QHAdam, a drop-in replacement for ``qhoptim.pyt.QHAdam``.

    .. math::
       m_t = a_{1,t} m_{t-1} + (1 - a_{1,t}) g_t, \qquad
       v_t = a_{2,t} v_{t-1} + (1 - a_{2,t}) g_t^2, \\
       \theta_{t+1} = \theta_t - \alpha\,
       \frac{\nu_1 m_t + (1 - \nu_1) g_t}{\sqrt{\nu_2 v_t + (1 - \nu_2) g_t^2} + \epsilon}

    with :math:`\alpha` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``,
    :math:`(\nu_1, \nu_2)` = ``nus``, :math:`\epsilon` = ``eps``. The moments are bias-corrected
    as they are accumulated: :math:`a_{i,t} = 1 - 1/w_{i,t}` with running weights
    :math:`w_{i,t} = 1 + \beta_i w_{i,t-1}`, :math:`w_{i,0} = 0` (exact also when the betas
    change between steps). ``nus=(1, 1)`` is Adam; ``nus=(β1, 1)`` is close to NAdam.
    Weight decay :math:`\lambda` either adds :math:`\lambda\theta_t` to :math:`g_t` or, with
    ``decouple_weight_decay=True`` (QHAdamW), shrinks :math:`\theta_t` by
    :math:`1 - \alpha\lambda` first.

    Args:
      params: an iterable of parameters, or of dicts defining parameter groups.
      lr: :math:`\alpha` (finite, >= 0); may be a 0-d tensor.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
      nus: :math:`(\nu_1, \nu_2)` (finite).
      weight_decay: :math:`\lambda` (finite, >= 0).
      decouple_weight_decay: (bool) decay the parameter directly (AdamW style) instead of the
        gradient.
      eps: :math:`\epsilon` (>= 0), added outside the square root.
      maximize: (bool) ascend the objective instead of descending it.
      nonfinite: ``"propagate"`` (default), ``"raise"`` or ``"skip"``: what a step does with
        NaN/inf gradients (as :class:`QHM`; docs/faults.md).

    Note the argument order (qhoptim's): ``eps`` comes last, so positional calls do not line up
    with ``torch.optim.Adam``. State per parameter: ``beta1_weight``, ``beta2_weight`` (Python
    floats), ``exp_avg``, ``exp_avg_sq`` (the bias-corrected moments). Unlike qhoptim, coupled
    decay leaves ``p.grad`` unchanged. Complex parameters are updated as real pairs, as
    ``torch.optim.Adam`` does (``nus=(1, 1)`` gives Adam's trajectory on them).

    NaN and inf gradients are not checked (as in ``torch.optim.Adam``): an entry whose gradient
    is NaN or inf gets non-finite moments and a NaN parameter from then on; the other entries
    are unaffected. Skip such steps yourself (e.g. ``torch.amp.GradScaler``) if they can happen.

    Example:
      >>> import torch
      >>> from uniopt.adapters.torch import QHAdam
      >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> opt = QHAdam([w], lr=0.05, nus=(0.7, 1.0), betas=(0.995, 0.999))
      >>> for _ in range(300):
      ...     opt.zero_grad()
      ...     (w ** 2).sum().backward()
      ...     _ = opt.step()
      >>> bool(w.abs().max() < 0.1)
      True

    References:
      Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019,
      https://arxiv.org/abs/1810.06801
    """

    _rule = _QHAdamRule()

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.0,
                 decouple_weight_decay=False, eps=1e-8, *, maximize=False, nonfinite="propagate",
                 _backend="auto"):
        defaults = {"lr": lr, "betas": betas, "nus": nus, "weight_decay": weight_decay,
                    "decouple_weight_decay": decouple_weight_decay, "eps": eps,
                    "maximize": maximize}
        self._check_group(defaults)
        defaults["decouple_weight_decay"] = bool(decouple_weight_decay)
        defaults["maximize"] = bool(maximize)
        super().__init__(params, defaults, _backend, nonfinite)

    def _check_group(self, group):
        check_qhadam(_given(group["lr"], 0.0), group["betas"], group["nus"],
                     group["weight_decay"], group["eps"], group["decouple_weight_decay"],
                     group.get("maximize", False))


class QHAdamW(QHAdam):
    r"""QHAdam with decoupled weight decay (``decouple_weight_decay=True``), as a class.

    qhoptim's ``QHAdamW`` is a factory returning a ``QHAdam``; this is a subclass of
    :class:`QHAdam`, so ``isinstance`` works and everything else is the same. As in qhoptim,
    passing ``decouple_weight_decay`` raises ``TypeError``. ``nus=(1, 1)`` is
    ``torch.optim.AdamW``.

    References:
      Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019,
      https://arxiv.org/abs/1810.06801; Loshchilov & Hutter, "Decoupled weight decay
      regularization", ICLR 2019, https://arxiv.org/abs/1711.05101
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.0,
                 eps=1e-8, *, maximize=False, nonfinite="propagate", _backend="auto"):
        super().__init__(params, lr, betas, nus, weight_decay, True, eps, maximize=maximize,
                         nonfinite=nonfinite, _backend=_backend)
