"""QHM, QHAdam and QHAdamW over NumPy arrays (the NumPy face of :mod:`uniopt.rules.qh`)."""

from __future__ import annotations

import numpy as np

from . import _jit
from ._optimizer import Optimizer
from ._validation import check_qhadam, check_qhm
from .kernels import qh_cpu
from .kernels._pointers import addresses
from .rules import qh as _rules
from .rules.qh_convert import QHAdamConversions, QHMConversions

__all__ = ["QHM", "QHAdam", "QHAdamW"]


def _table(arrays):
    return addresses(arrays), np.array([a.size for a in arrays], dtype=np.int64)


class QHM(QHMConversions, Optimizer):
    r"""Quasi-hyperbolic momentum on NumPy arrays, updated in place.

    .. math::
       b_{t+1} = \beta b_t + (1 - \beta) g_t, \qquad
       \theta_{t+1} = \theta_t - \alpha\left[(1 - \nu) g_t + \nu b_{t+1}\right]

    with :math:`\alpha` = ``lr``, :math:`\beta` = ``momentum``, :math:`\nu` = ``nu``. ``nu=0`` is
    plain SGD; ``nu=1`` is (dampened) momentum SGD; ``nu=momentum`` is Nesterov's.

    Args:
      params: a list of float32/float64 C-contiguous arrays, or a list of param-group dicts.
      lr: learning rate :math:`\alpha` (finite, >= 0).
      momentum: :math:`\beta`, in [0, 1) (as QHAdam's betas).
      nu: immediate discount :math:`\nu` (any finite number).
      weight_decay: :math:`\lambda` (finite, >= 0).
      weight_decay_type: ``"grad"`` adds :math:`\lambda\theta` to the gradient; ``"direct"``
        multiplies the parameter by :math:`1 - \alpha\lambda` first.
      maximize: (bool) ascend instead of descend.
      nonfinite: ``"propagate"`` (default: NaN/inf gradients flow into the update, as in
        torch.optim), ``"raise"`` (``FloatingPointError``, nothing changed) or ``"skip"`` (the
        step changes nothing and increments each group's ``nonfinite_skips``); docs/faults.md.

    Example:
      >>> import numpy as np, uniopt
      >>> x = np.array([1.0, -2.0])
      >>> opt = uniopt.QHM([x], lr=0.5, momentum=0.9, nu=0.7)
      >>> for _ in range(200):
      ...     opt.step([2 * x])          # gradient of ||x||^2
      >>> bool(np.abs(x).max() < 1e-6)
      True

    References:
      Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019,
      https://arxiv.org/abs/1810.06801
    """

    def __init__(self, params, lr, momentum, nu, weight_decay=0.0, weight_decay_type="grad", *,
                 maximize=False, nonfinite="propagate"):
        check_qhm(lr, momentum, nu, weight_decay, weight_decay_type, maximize)
        defaults = dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                        weight_decay_type=weight_decay_type, maximize=bool(maximize))
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _check_group(self, group):
        check_qhm(group["lr"], group["momentum"], group["nu"], group["weight_decay"],
                  group["weight_decay_type"], group["maximize"])

    def _step_group(self, group, indices, grads, dtype):
        params = [self._params[i] for i in indices]
        for i, p in zip(indices, params):
            if i not in self.state:
                self.state[i] = {"momentum_buffer": np.zeros_like(p)}
        bufs = [self.state[i]["momentum_buffer"] for i in indices]
        p_addrs, sizes = _table(params)
        coef = np.array(_rules.qhm_coefficients(group["lr"], group["momentum"], group["nu"],
                                                group["weight_decay"], group["weight_decay_type"],
                                                group["maximize"]), dtype=dtype)
        kernel = qh_cpu.qhm_table(parallel=int(sizes.sum()) >= _jit.PARALLEL_MIN_SIZE)
        kernel(p_addrs, addresses([grads[i] for i in indices]), addresses(bufs), sizes, coef)


class QHAdam(QHAdamConversions, Optimizer):
    r"""QHAdam on NumPy arrays, updated in place.

    .. math::
       m_t = a_1 m_{t-1} + (1 - a_1) g_t, \quad v_t = a_2 v_{t-1} + (1 - a_2) g_t^2, \quad
       \theta_{t+1} = \theta_t - \alpha
       \frac{\nu_1 m_t + (1 - \nu_1) g_t}{\sqrt{\nu_2 v_t + (1 - \nu_2) g_t^2} + \epsilon}

    with bias corrections :math:`a_i = 1 - 1/w_{i,t}`, :math:`w_{i,t} = 1 + \beta_i w_{i,t-1}`
    (stored as ``beta1_weight``/``beta2_weight``, as in qhoptim). ``nus=(1, 1)`` is Adam.

    Args:
      params: a list of float32/float64 C-contiguous arrays, or a list of param-group dicts.
      lr: :math:`\alpha` (finite, >= 0).
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
      nus: :math:`(\nu_1, \nu_2)` (finite).
      weight_decay: :math:`\lambda` (finite, >= 0).
      decouple_weight_decay: (bool) if true, decay the parameter by :math:`1 - \alpha\lambda`
        (QHAdamW) instead of adding :math:`\lambda\theta` to the gradient.
      eps: :math:`\epsilon` (finite, >= 0), added outside the square root.
      maximize: (bool) ascend instead of descend.
      nonfinite: ``"propagate"`` (default), ``"raise"`` or ``"skip"``: what a step does with
        NaN/inf gradients (docs/faults.md); as :class:`QHM`.

    References:
      Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019,
      https://arxiv.org/abs/1810.06801
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.0,
                 decouple_weight_decay=False, eps=1e-8, *, maximize=False, nonfinite="propagate"):
        check_qhadam(lr, betas, nus, weight_decay, eps, decouple_weight_decay, maximize)
        defaults = dict(lr=lr, betas=tuple(betas), nus=tuple(nus), weight_decay=weight_decay,
                        decouple_weight_decay=bool(decouple_weight_decay), eps=eps,
                        maximize=bool(maximize))
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _check_group(self, group):
        check_qhadam(group["lr"], group["betas"], group["nus"], group["weight_decay"], group["eps"],
                     group["decouple_weight_decay"], group["maximize"])

    def _step_group(self, group, indices, grads, dtype):
        params = [self._params[i] for i in indices]
        for i, p in zip(indices, params):
            if i not in self.state:
                self.state[i] = {"beta1_weight": 0.0, "beta2_weight": 0.0,
                                 "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        states = [self.state[i] for i in indices]
        w1 = np.array([s["beta1_weight"] for s in states], dtype=np.float64)
        w2 = np.array([s["beta2_weight"] for s in states], dtype=np.float64)
        hyper = np.array(_rules.qhadam_hyper(group["lr"], group["betas"], group["nus"],
                                             group["weight_decay"], group["decouple_weight_decay"],
                                             group["eps"], group["maximize"]), dtype=np.float64)
        p_addrs, sizes = _table(params)
        kernel = qh_cpu.qhadam_table(parallel=int(sizes.sum()) >= _jit.PARALLEL_MIN_SIZE)
        kernel(p_addrs, addresses([grads[i] for i in indices]),
               addresses([s["exp_avg"] for s in states]), addresses([s["exp_avg_sq"] for s in states]),
               sizes, w1, w2, hyper, np.empty(16, dtype=dtype))
        for s, a, b in zip(states, w1.tolist(), w2.tolist()):
            s["beta1_weight"], s["beta2_weight"] = a, b


class QHAdamW(QHAdam):
    """QHAdam with decoupled weight decay (``decouple_weight_decay=True``), as a class.

    qhoptim's ``QHAdamW`` is a factory function returning a ``QHAdam``; here it is a subclass,
    so ``isinstance`` works. Passing ``decouple_weight_decay`` is a TypeError, as in qhoptim.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.0,
                 eps=1e-8, *, maximize=False, nonfinite="propagate"):
        super().__init__(params, lr, betas, nus, weight_decay, True, eps, maximize=maximize,
                         nonfinite=nonfinite)
