r"""Lagrange multipliers for constrained learning: the dual-side arithmetic, written once.

The problem is :math:`\min_x f(x)` subject to :math:`g(x) \le 0` and :math:`h(x) = 0`, solved as
the min-max game on the Lagrangian :math:`L(x, \lambda, \mu) = f(x) + \lambda^\top g(x) +
\mu^\top h(x)` with :math:`\lambda \ge 0`. The gradient of :math:`L` in the multipliers is the
constraint violation, so a dual step is a gradient *ascent* step on the multipliers, followed
(for inequality multipliers) by the projection onto :math:`\lambda \ge 0`.

Rules (each elementwise; ``lower`` is 0 for inequality multipliers and ``-inf`` for equality
multipliers, so one code path serves both):

* :func:`projected`: :math:`\max(v, lo)`;
* :func:`sgd_projected`: one (signed) SGD step fused with the projection,
  :math:`\max(\lambda + \eta_s g, lo)` with :math:`\eta_s = +\eta` to ascend (the dual side)
  and :math:`-\eta` to descend;
* nuPI (Sohrabi et al., ICML 2024), a PI controller on the error :math:`e_t` (the gradient):
  :math:`\xi_t = \nu \xi_{t-1} + (1-\nu) e_t`, update direction
  :math:`u_t = K_I e_t + K_P(\xi_t - \xi_{t-1}) = K_I e_t + K_P (1-\nu)(e_t - \xi_{t-1})`,
  :math:`\theta_{t+1} = \theta_t + \eta_s u_t - \eta\, w\, \theta_t` (decoupled weight decay
  :math:`w`). Initialisation ``ZEROS``: :math:`\xi_{-1} = 0`. Initialisation ``SGD``:
  :math:`\xi_{-1} = e_0`, so the first step is :math:`K_I e_0` (SGD's) and :math:`\xi_0 = e_0`
  (:func:`nupi_direction`, :func:`nupi_average` with ``fresh`` true on an entry's first step);
* the augmented-Lagrangian term of an inequality constraint (:func:`augmented_ineq_term`),
  :math:`\frac{1}{2c}(\max(\lambda + c g, 0)^2 - \lambda^2)`, written without the division
  where the shift is active and with its :math:`c \to 0` limit :math:`\lambda g`;
* feasibility-driven penalty coefficients: where the violation measure exceeds the tolerance
  the coefficient grows, :math:`c \leftarrow c\,\kappa + \delta` (multiplicative updater:
  :math:`\kappa` = growth factor, :math:`\delta = 0`; additive: :math:`\kappa = 1`,
  :math:`\delta` = increment); with restart, a satisfied inequality (measure 0) goes back to
  its initial coefficient (:func:`penalty_measure`, :func:`penalty_update`).

``where``, ``minimum`` and ``maximum`` are the backend's (bound by :func:`uniopt.rules.bind`);
the defaults here work on Python and Numba scalars.

References:
  Sohrabi, Ramirez, Zhang, Lacoste-Julien & Gallego-Posada, "On PI controllers for updating
  Lagrange multipliers in constrained optimization", ICML 2024, https://arxiv.org/abs/2406.04558.
  Nocedal & Wright, *Numerical Optimization* (2006), Algorithm 17.4 (penalty growth).
"""

from __future__ import annotations

from ._scalar import maximum, minimum, where  # noqa: F401 (rules, rebound by bind)

RULES = (
    "where",
    "minimum",
    "maximum",
    "projected",
    "sgd_projected",
    "nupi_direction",
    "nupi_average",
    "nupi_param",
    "penalty_measure",
    "penalty_update",
    "augmented_ineq_term",
)


def projected(value, lower):
    """``max(value, lower)``: the projection of a multiplier onto its feasible set
    (``lower`` = 0 for an inequality multiplier, ``-inf`` for an equality one)."""
    return maximum(value, lower)


def sgd_projected(param, grad, signed_lr, lower):
    """One SGD step and the projection, fused: ``max(param + signed_lr * grad, lower)``.

    ``signed_lr`` is ``+lr`` for ascent (``maximize=True``, the dual side) and ``-lr`` for
    descent.
    """
    return projected(param + signed_lr * grad, lower)


def nupi_direction(error, xi, fresh, ki, kp_one_minus_nu):
    r"""nuPI's update direction :math:`K_I e + K_P (1-\nu)(e - \xi_{prev})`, or :math:`K_I e`
    on an entry's first step under the ``SGD`` initialisation (``fresh``: :math:`\xi_{-1} = e`).

    ``kp_one_minus_nu`` is :math:`K_P (1 - \nu)`, computed by the caller.
    """
    return where(fresh, ki * error, ki * error + kp_one_minus_nu * (error - xi))


def nupi_average(xi, error, fresh, nu, one_minus_nu):
    r"""nuPI's smoothed error :math:`\xi_t = \nu \xi_{t-1} + (1-\nu) e_t`; :math:`e_t` itself
    on an entry's first step under the ``SGD`` initialisation (``fresh``)."""
    return where(fresh, error, nu * xi + one_minus_nu * error)


def nupi_param(param, direction, signed_lr, lr_decay, lower):
    r"""The nuPI step :math:`\max(\theta + \eta_s u - \eta w \theta, lo)` (decoupled weight decay
    ``lr_decay`` = :math:`\eta w`; ``lower = -inf`` when no projection is fused in)."""
    return projected(param - lr_decay * param + signed_lr * direction, lower)


def penalty_measure(violation, is_ineq):
    """How far a constraint is from feasible, entry by entry: ``max(v, 0)`` for an inequality
    (``is_ineq``, a static bool), ``|v|`` for an equality."""
    if is_ineq:
        return maximum(violation, violation * 0)
    return abs(violation)


def penalty_update(value, init, measure, tolerance, factor, increment, restart):
    r"""A feasibility-driven penalty coefficient update.

    ``value * factor + increment`` where ``measure > tolerance``, else ``value``; then, with
    ``restart`` (true only for inequality constraints), ``init`` where ``measure == 0``.
    The multiplicative updater is ``(factor, increment) = (growth_factor, 0)``, the additive
    one ``(1, increment)``: both products/sums are then exact.
    """
    grown = where(measure > tolerance, value * factor + increment, value)
    return where(restart & (measure == 0), init, grown)


def augmented_ineq_term(multiplier, penalty, violation):
    r"""An inequality constraint's augmented-Lagrangian term, entry by entry (Nocedal & Wright,
    eqs. 17.64-17.65, in the :math:`g \le 0` convention):

    .. math::
       \frac{1}{2c}\left(\max(\lambda + c g, 0)^2 - \lambda^2\right) =
       \begin{cases} \lambda g + \tfrac{c}{2} g^2 & \lambda + c g > 0 \\
       -\lambda^2 / (2c) & \text{otherwise} \end{cases}

    and, at a zero penalty :math:`c = 0`, its limit :math:`\lambda g` (for :math:`\lambda \ge
    0`): the Lagrangian term, never ``0/0``. Its derivative in :math:`g` is
    :math:`\max(\lambda + c g, 0)` (:math:`\lambda` at :math:`c = 0`).
    """
    shifted = multiplier + penalty * violation
    safe = where(penalty > 0, penalty, penalty * 0 + 1)
    term = where(shifted > 0, multiplier * violation + 0.5 * penalty * (violation * violation),
                 -(multiplier * multiplier) / (2 * safe))
    return where(penalty > 0, term, multiplier * violation)
