r"""iALM's dual step (adaptive, capped dual ascent): the arithmetic, written once.

One update of constraint group :math:`k` with constraint values :math:`c_k` (its slice of the
constraint vector), multipliers :math:`\lambda_k`, and optional momentum buffer :math:`b_k`:

1. violations within ``ctol`` count as satisfied: :math:`c \leftarrow 0` where
   :math:`|c| \le` ``ctol`` (equality groups) or :math:`0 < c \le` ``ctol`` (inequality groups);
   ``ctol = 0`` changes nothing;
2. the direction :math:`d_k = c_k`, or with momentum :math:`\mu`:
   :math:`b_k \leftarrow \mu b_k + (1 - \text{dampening})\, c_k`, :math:`d_k = b_k`;
3. the step :math:`s_k = \min(\beta_k, \gamma_k / \|d_k\|_2)`, and :math:`s_k = 0` when
   :math:`\|d_k\| = 0` (the update is zero then anyway: never ``0 * inf``). Where
   :math:`\sum d_i^2` overflows or underflows, the norm is taken scaled, as BLAS ``nrm2``
   does: :math:`\|d\| = s\sqrt{\sum (d_i/s)^2}` with :math:`s` = :func:`norm_scale` of
   :math:`\max_i |d_i|` (:func:`scaled_dual_stepsize`);
4. :math:`\lambda_k \leftarrow \operatorname{clamp}(\lambda_k + s_k d_k, lo_k, hi_k)`;
5. (host side, after every group) :math:`\beta_k \leftarrow \sigma_k \beta_k`.

The augmented Lagrangian the primal side minimises is
:math:`L = f + \sum_k \lambda_k^\top c_k + \frac{\rho_k}{2}\|\tilde c_k\|^2` with
:math:`\tilde c_k` = :func:`penalty_violation` of the (``ctol``-filtered) :math:`c_k`.

``where``, ``minimum``, ``maximum``, ``sqrt`` (and ``frexp``, ``ldexp`` for
:func:`norm_scale`) are the backend's (bound by
:func:`uniopt.rules.bind`); the defaults here work on Python and Numba scalars.

References:
  Li, Chen, Liu, Lu & Xu, "Stochastic inexact augmented Lagrangian method for nonconvex
  expectation constrained optimization", Comput. Optim. Appl. 87 (2024),
  https://doi.org/10.1007/s10589-023-00521-z (Algorithm 1).
"""

from __future__ import annotations

import math

from ._scalar import maximum, minimum, where  # noqa: F401 (rules, rebound by bind)

sqrt = math.sqrt
frexp = math.frexp
ldexp = math.ldexp

RULES = (
    "where",
    "minimum",
    "maximum",
    "equality_filter",
    "inequality_filter",
    "momentum_direction",
    "filtered",
    "dual_stepsize",
    "norm_scale",
    "scaled_dual_stepsize",
    "dual_update",
    "penalty_violation",
    "penalty_part",
)


def equality_filter(c, ctol):
    """``c``, or 0 where ``|c| <= ctol`` (an equality satisfied within the tolerance).

    ``c - c`` is an exact zero of ``c``'s dtype wherever it is chosen (``c`` is finite there,
    ``ctol`` being finite), with no numeric literal to promote a float32 kernel to float64.
    """
    return where(abs(c) <= ctol, c - c, c)


def inequality_filter(c, ctol):
    """``c``, or 0 where ``0 < c <= ctol`` (an inequality violated by at most the tolerance)."""
    return where((c > 0) & (c <= ctol), c - c, c)


def filtered(c, ctol, is_ineq):
    """The ``ctol`` filter of the group's kind: :func:`inequality_filter` (``is_ineq``) or
    :func:`equality_filter`; the identity, bit for bit, for ``ctol <= 0``.

    ``ctol`` and ``is_ineq`` are a Python/Numba scalar and bool (static under tracing).
    """
    if ctol <= 0:
        return c
    if is_ineq:
        return inequality_filter(c, ctol)
    return equality_filter(c, ctol)


def momentum_direction(buffer, c, momentum, one_minus_dampening):
    """The new momentum buffer ``momentum * buffer + (1 - dampening) * c`` (the direction).

    ``one_minus_dampening`` is computed by the caller (in float64, as torch's ``alpha=1 - d``).
    """
    return momentum * buffer + one_minus_dampening * c


def dual_stepsize(beta, gamma, sq_norm):
    """``min(beta, gamma / sqrt(sq_norm))``, and 0 when ``sq_norm == 0`` (no division by 0)."""
    positive = sq_norm > 0
    norm = sqrt(where(positive, sq_norm, sq_norm + 1))  # traced backends: no sqrt'(0)
    return where(positive, minimum(beta, gamma / norm), sq_norm * 0)


def norm_scale(amax, lowest=-1021, highest=1021):
    r"""A power of two :math:`s = 2^k` to divide a direction by before squaring (as BLAS nrm2).

    :math:`k = \operatorname{clip}(e - 1, lowest, highest)` for ``amax`` = :math:`m 2^e`,
    :math:`m \in [0.5, 1)` (``frexp``): ``amax / s`` is in [1, 2) within the clip (and
    :math:`s` = 0.5 for ``amax == 0``). The clip keeps both :math:`s` and :math:`1/s` normal
    numbers of the dtype (defaults: float64; float32 takes (-125, 125)), so dividing by
    :math:`s` is exact even where a compiler turns it into a product with :math:`1/s` or
    flushes subnormals, and a norm taken as :math:`s\sqrt{\sum (d_i/s)^2}` equals the plain
    :math:`\sqrt{\sum d_i^2}` bit for bit wherever the plain one neither overflows nor
    underflows. ``amax = max |d_i| >= 0``, finite.
    """
    _, exponent = frexp(amax)
    return ldexp(amax * 0 + 1, minimum(maximum(exponent - 1, lowest), highest))


def scaled_dual_stepsize(beta, gamma, scale, sq_scaled):
    r"""``min(beta, gamma / (scale * sqrt(sq_scaled)))``: :func:`dual_stepsize` for the norm
    :math:`\|d\| = s\sqrt{\sum (d_i/s)^2}`, ``scale`` = :math:`s > 0` (e.g.
    :math:`\max_i |d_i|` or :func:`norm_scale` of it), ``sq_scaled`` = :math:`\sum (d_i/s)^2`.

    0 when ``scale == 0`` or ``sq_scaled == 0`` (a zero direction: no division by 0).
    Computed as ``(gamma / scale) / sqrt(sq_scaled)``, which stays finite where the norm
    itself would overflow; with a power-of-two ``scale`` it equals
    ``dual_stepsize(beta, gamma, scale**2 * sq_scaled)`` bit for bit wherever that product
    and ``gamma / scale`` neither overflow nor underflow.
    """
    positive = (scale > 0) & (sq_scaled > 0)
    # traced backends: no sqrt'(0) and no division by 0 in the branch not taken
    safe_scale = where(positive, scale, scale + 1)
    root = sqrt(where(positive, sq_scaled, sq_scaled + 1))
    return where(positive, minimum(beta, gamma / safe_scale / root), sq_scaled * 0)


def dual_update(dual, direction, stepsize, lower, upper):
    """``clamp(dual + stepsize * direction, lower, upper)`` (bounds may be -inf / inf)."""
    return minimum(maximum(dual + stepsize * direction, lower), upper)


def penalty_violation(c):
    """``max(c, 0)``: what an inequality constraint's quadratic penalty acts on."""
    return maximum(c, c * 0)


def penalty_part(c, ctol, is_ineq):
    r""":math:`\tilde c`: the ``ctol``-filtered constraints (:func:`filtered`), their positive
    part (:func:`penalty_violation`) for an inequality group."""
    c = filtered(c, ctol, is_ineq)
    if is_ineq:
        return penalty_violation(c)
    return c
