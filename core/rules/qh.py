r"""Quasi-hyperbolic momentum (QHM) and QHAdam: the arithmetic, written once.

QHM (Ma & Yarats, 2019) with learning rate :math:`\alpha`, momentum :math:`\beta` and immediate
discount :math:`\nu`:

.. math::
   g_t' = \pm g_t + \lambda_g \theta_t, \qquad
   b_{t+1} = \beta b_t + (1 - \beta) g_t', \qquad
   \theta_{t+1} = s\,\theta_t - \alpha \left[(1 - \nu) g_t' + \nu b_{t+1}\right]

QHAdam with betas :math:`(\beta_1, \beta_2)`, nus :math:`(\nu_1, \nu_2)` and :math:`\epsilon`,
using running bias-correction weights :math:`w_{i,t} = 1 + \beta_i w_{i,t-1}` (exact also when
the betas change between steps), :math:`a_i = 1 - 1/w_{i,t}`:

.. math::
   m_t = a_1 m_{t-1} + (1 - a_1) g_t', \qquad v_t = a_2 v_{t-1} + (1 - a_2) g_t'^2, \\
   \theta_{t+1} = s\,\theta_t - \alpha\,
     \frac{\nu_1 m_t + (1 - \nu_1) g_t'}{\sqrt{\nu_2 v_t + (1 - \nu_2) g_t'^2} + \epsilon}

Weight decay :math:`\lambda`: either added to the gradient (:math:`\lambda_g = \lambda`, "grad"
or coupled) or applied to the parameter (:math:`s = 1 - \alpha\lambda`, "direct" or decoupled).
The sign of :math:`g_t` is flipped for ``maximize``.

Every coefficient that does not change within a step is computed once on the host, in float64,
and passed in (``one_minus_beta`` rather than ``1 - beta``): inside a float32 kernel a literal
would promote the arithmetic to float64.

References:
  Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019,
  https://arxiv.org/abs/1810.06801
"""

from __future__ import annotations

import math
from typing import NamedTuple

sqrt = math.sqrt

RULES = (
    "effective_gradient",
    "descend",
    "qhm_direction",
    "qhm_update",
    "qhadam_bias_weights",
    "qhadam_direction_coefficients",
    "qhadam_update_coefficients",
    "qhadam_direction",
    "qhadam_update",
)


# ----------------------------------------------------------------------------------------------
# Elementwise arithmetic (bound to each backend by uniopt.rules.bind)
# ----------------------------------------------------------------------------------------------
def effective_gradient(g, p, grad_sign, wd_grad):
    """The gradient after ``maximize`` (``grad_sign = -1``) and coupled weight decay."""
    return grad_sign * g + wd_grad * p


def descend(p, direction, p_scale, lr):
    """``p_scale * p - lr * direction``; ``p_scale = 1 - lr * wd`` for decoupled decay."""
    return p_scale * p - lr * direction


def qhm_direction(g, buf, beta, one_minus_beta, nu, one_minus_nu):
    """QHM's step direction and new momentum buffer (dampened EMA of the gradient)."""
    buf = beta * buf + one_minus_beta * g
    return nu * buf + one_minus_nu * g, buf


def qhm_update(p, g, buf, grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu, one_minus_nu, lr):
    """One QHM step of one element: returns the new parameter and momentum buffer."""
    g = effective_gradient(g, p, grad_sign, wd_grad)
    direction, buf = qhm_direction(g, buf, beta, one_minus_beta, nu, one_minus_nu)
    return descend(p, direction, p_scale, lr), buf


def qhadam_bias_weights(beta1_weight, beta2_weight, beta1, beta2):
    """Advance QHAdam's running normalisers; returns ``(w1, w2, a1, a2)``."""
    beta1_weight = 1.0 + beta1 * beta1_weight
    beta2_weight = 1.0 + beta2 * beta2_weight
    return beta1_weight, beta2_weight, 1.0 - 1.0 / beta1_weight, 1.0 - 1.0 / beta2_weight


# The order of QHAdam's per-step coefficients is defined here and only here: every face and
# kernel builds them with these two functions (after qhadam_bias_weights gave a1, a2).
def qhadam_direction_coefficients(a1, a2, nu1, one_minus_nu1, nu2, one_minus_nu2, eps):
    """This step's scalars of :func:`qhadam_direction`, in its order (after ``exp_avg_sq``).

    ``a1, a2`` come from :func:`qhadam_bias_weights`; ``one_minus_nu*`` are computed once on
    the host (see the module docstring).
    """
    return a1, 1.0 - a1, a2, 1.0 - a2, nu1, one_minus_nu1, nu2, one_minus_nu2, eps


def qhadam_update_coefficients(grad_sign, wd_grad, p_scale, a1, a2, nu1, one_minus_nu1, nu2,
                               one_minus_nu2, eps, lr):
    """This step's scalars of :func:`qhadam_update`, in its order (after ``exp_avg_sq``)."""
    d = qhadam_direction_coefficients(a1, a2, nu1, one_minus_nu1, nu2, one_minus_nu2, eps)
    return (grad_sign, wd_grad, p_scale, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], lr)


def qhadam_direction(g, exp_avg, exp_avg_sq, a1, one_minus_a1, a2, one_minus_a2,
                     nu1, one_minus_nu1, nu2, one_minus_nu2, eps):
    """QHAdam's step direction and new (bias-corrected) moments."""
    g_sq = g * g
    exp_avg = a1 * exp_avg + one_minus_a1 * g
    exp_avg_sq = a2 * exp_avg_sq + one_minus_a2 * g_sq
    numerator = nu1 * exp_avg + one_minus_nu1 * g
    denominator = sqrt(nu2 * exp_avg_sq + one_minus_nu2 * g_sq) + eps
    return numerator / denominator, exp_avg, exp_avg_sq


def qhadam_update(p, g, exp_avg, exp_avg_sq, grad_sign, wd_grad, p_scale, a1, one_minus_a1, a2,
                  one_minus_a2, nu1, one_minus_nu1, nu2, one_minus_nu2, eps, lr):
    """One QHAdam step of one element: returns the new parameter and moments."""
    g = effective_gradient(g, p, grad_sign, wd_grad)
    direction, exp_avg, exp_avg_sq = qhadam_direction(
        g, exp_avg, exp_avg_sq, a1, one_minus_a1, a2, one_minus_a2,
        nu1, one_minus_nu1, nu2, one_minus_nu2, eps,
    )
    return descend(p, direction, p_scale, lr), exp_avg, exp_avg_sq


# ----------------------------------------------------------------------------------------------
# Host-side coefficients (float64), in the order the kernels take them
# ----------------------------------------------------------------------------------------------
def decay_coefficients(lr, weight_decay, decoupled, maximize=False):
    """``(grad_sign, wd_grad, p_scale)`` for the chosen weight-decay style."""
    grad_sign = -1.0 if maximize else 1.0
    if decoupled:
        return grad_sign, 0.0, 1.0 - lr * weight_decay
    return grad_sign, float(weight_decay), 1.0


class QHMCoefficients(NamedTuple):
    grad_sign: float
    wd_grad: float
    p_scale: float
    beta: float
    one_minus_beta: float
    nu: float
    one_minus_nu: float
    lr: float


def qhm_coefficients(lr, momentum, nu, weight_decay=0.0, weight_decay_type="grad",
                     maximize=False) -> QHMCoefficients:
    """The scalars of one QHM step, in the argument order of :func:`qhm_update` (after ``buf``)."""
    lr, momentum, nu = float(lr), float(momentum), float(nu)
    decay = decay_coefficients(lr, float(weight_decay), weight_decay_type == "direct", maximize)
    return QHMCoefficients(*decay, momentum, 1.0 - momentum, nu, 1.0 - nu, lr)


class QHAdamHyper(NamedTuple):
    """The group-constant scalars of one QHAdam step (the kernels derive ``a1``, ``a2``)."""

    grad_sign: float
    wd_grad: float
    p_scale: float
    beta1: float
    beta2: float
    nu1: float
    one_minus_nu1: float
    nu2: float
    one_minus_nu2: float
    eps: float
    lr: float


def qhadam_hyper(lr, betas, nus, weight_decay=0.0, decouple_weight_decay=False, eps=1e-8,
                 maximize=False) -> QHAdamHyper:
    lr = float(lr)
    beta1, beta2 = float(betas[0]), float(betas[1])
    nu1, nu2 = float(nus[0]), float(nus[1])
    decay = decay_coefficients(lr, float(weight_decay), decouple_weight_decay, maximize)
    return QHAdamHyper(*decay, beta1, beta2, nu1, 1.0 - nu1, nu2, 1.0 - nu2, float(eps), lr)


def qhadam_coefficients(hyper: QHAdamHyper, a1, a2) -> tuple:
    """The scalars of :func:`qhadam_update` after ``exp_avg_sq``, given this step's ``a1, a2``."""
    h = hyper
    return qhadam_update_coefficients(h.grad_sign, h.wd_grad, h.p_scale, a1, a2, h.nu1,
                                      h.one_minus_nu1, h.nu2, h.one_minus_nu2, h.eps, h.lr)


def qhadam_step(hyper: QHAdamHyper, beta1_weight, beta2_weight) -> tuple:
    """Advance one tensor's bias weights: ``(w1, w2, coefficients of qhadam_update)``."""
    w1, w2, a1, a2 = qhadam_bias_weights(beta1_weight, beta2_weight, hyper.beta1, hyper.beta2)
    return w1, w2, qhadam_coefficients(hyper, a1, a2)
