r"""Vector-Jacobian products of the QH update rules, for differentiable unrolling.

An unrolled optimizer (bilevel ``Dynamic``: RAD, T-RAD, BDA, IAPTT-GM) back-propagates through
every step :math:`(\theta, g, s) \mapsto (\theta', s')` of the lower-level optimizer. Only the
*first* derivative of the update is needed (second-order terms come from the autograd graph of
the gradient :math:`g` itself), so each rule of :mod:`uniopt.rules.qh` has here its VJP:
given the cotangents of the step's outputs, the cotangents of its inputs. Like every rule
module, the arithmetic is written once on scalars and bound to each backend by
:func:`uniopt.rules.bind` (Numba CPU and numba.cuda kernels, NumPy, torch ops).

Rules and their VJPs (coefficients as in :mod:`uniopt.rules.qh`; :math:`\sigma` = ``grad_sign``,
:math:`\lambda_g` = ``wd_grad``, :math:`s` = ``p_scale``, :math:`\alpha` = ``lr``;
:math:`\bar x` is the cotangent of :math:`x`):

* SGD (:func:`sgd_update`): :math:`g' = \sigma g + \lambda_g \theta`,
  :math:`\theta' = s\theta - \alpha g'`. Linear, so its VJP needs no inputs:
  :math:`\bar g' = -\alpha\bar\theta'`, :math:`\bar\theta = s\bar\theta' + \lambda_g\bar g'`,
  :math:`\bar g = \sigma\bar g'`.
* QHM (``qh.qhm_update``): linear as well (:func:`qhm_vjp` takes only the cotangents).
* QHAdam (``qh.qhadam_update``): :func:`qhadam_vjp` recomputes the step's intermediates from
  its inputs (nothing is saved by the forward) and back-propagates through
  :math:`d = n / (\sqrt{r} + \epsilon)` with :math:`r = \nu_2 v_t + (1 - \nu_2) g'^2`.

**The derivative of the square root at exactly 0 is taken as 0.** Where an element's gradient
and second moment are both exactly zero (a frozen weight, a fresh state with a zero gradient),
:math:`r = 0` and :math:`\sqrt{r}` has an infinite one-sided derivative; every autodiff of the
plain formula then produces ``inf``/``NaN`` cotangents (``0 * inf``), which poison a whole
hypergradient. Here :math:`\partial\sqrt{r}/\partial r` is defined as 0 at :math:`r = 0`, so
such an element contributes no cotangent through the denominator (its numerator path is kept):
the cotangents stay finite. Everywhere else the VJP is the exact derivative.

No float literal appears in the arithmetic (``2 x`` is written ``x + x``), so a float32 kernel
computes in float32 (see the module docstring of :mod:`uniopt.rules.qh`).
"""

from __future__ import annotations

import math

from ._scalar import where  # noqa: F401 (a rule, rebound by bind)
from .qh import descend, effective_gradient  # noqa: F401 (rules, rebound by bind)

sqrt = math.sqrt

RULES = (
    "where",
    "effective_gradient",
    "descend",
    "sgd_update",
    "sgd_vjp",
    "qhm_vjp",
    "qhadam_vjp",
)


def sgd_update(p, g, grad_sign, wd_grad, p_scale, lr):
    """One plain SGD step of one element (QHM with momentum 0 and no buffer): the new parameter.

    The coefficients are those of :class:`uniopt.rules.qh.QHMCoefficients` (its ``beta`` and
    ``nu`` are unused).
    """
    return descend(p, effective_gradient(g, p, grad_sign, wd_grad), p_scale, lr)


def sgd_vjp(ct_p_new, grad_sign, wd_grad, p_scale, lr):
    """VJP of :func:`sgd_update`: ``(ct_p, ct_g)`` from the new parameter's cotangent."""
    ct_g_eff = -lr * ct_p_new
    return p_scale * ct_p_new + wd_grad * ct_g_eff, grad_sign * ct_g_eff


def qhm_vjp(ct_p_new, ct_buf_new, grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu,
            one_minus_nu, lr):
    """VJP of ``qh.qhm_update``: ``(ct_p, ct_g, ct_buf)`` from the outputs' cotangents.

    The step is linear in ``(p, g, buf)``, so the inputs are not needed.
    """
    ct_direction = -lr * ct_p_new
    ct_buf_total = ct_buf_new + nu * ct_direction  # the new buffer feeds the output and the step
    ct_g_eff = one_minus_nu * ct_direction + one_minus_beta * ct_buf_total
    return (p_scale * ct_p_new + wd_grad * ct_g_eff, grad_sign * ct_g_eff,
            beta * ct_buf_total)


def qhadam_vjp(p, g, exp_avg, exp_avg_sq, ct_p_new, ct_exp_avg_new, ct_exp_avg_sq_new,
               grad_sign, wd_grad, p_scale, a1, one_minus_a1, a2, one_minus_a2,
               nu1, one_minus_nu1, nu2, one_minus_nu2, eps, lr):
    """VJP of ``qh.qhadam_update``: ``(ct_p, ct_g, ct_exp_avg, ct_exp_avg_sq)``.

    ``p, g, exp_avg, exp_avg_sq`` are the step's inputs (the intermediates are recomputed from
    them); the three cotangents are those of the new parameter and moments; the 13 coefficients
    are those of the forward step (``qh.qhadam_coefficients``). The square root's derivative
    at exactly 0 is taken as 0 (see the module docstring).
    """
    g_eff = effective_gradient(g, p, grad_sign, wd_grad)
    g_sq = g_eff * g_eff
    m_new = a1 * exp_avg + one_minus_a1 * g_eff
    v_new = a2 * exp_avg_sq + one_minus_a2 * g_sq
    numerator = nu1 * m_new + one_minus_nu1 * g_eff
    root = sqrt(nu2 * v_new + one_minus_nu2 * g_sq)
    denominator = root + eps
    # backward through p_new = p_scale * p - lr * numerator / denominator
    ct_numerator = (-lr * ct_p_new) / denominator
    ct_denominator = -ct_numerator * (numerator / denominator)
    positive = root > 0
    # d sqrt(r)/dr = 1 / (2 sqrt(r)), defined as 0 at r = 0 (the divisor is never 0 when chosen)
    ct_r = where(positive, ct_denominator / where(positive, root + root, denominator), root - root)
    ct_m_new = ct_exp_avg_new + nu1 * ct_numerator
    ct_v_new = ct_exp_avg_sq_new + nu2 * ct_r
    ct_g_sq = one_minus_a2 * ct_v_new + one_minus_nu2 * ct_r
    ct_g_eff = one_minus_a1 * ct_m_new + one_minus_nu1 * ct_numerator + (g_eff + g_eff) * ct_g_sq
    return (p_scale * ct_p_new + wd_grad * ct_g_eff, grad_sign * ct_g_eff, a1 * ct_m_new,
            a2 * ct_v_new)
