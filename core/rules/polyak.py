r"""Polyak step-size SGD (SPS): the arithmetic, written once.

With objective value :math:`f(x_k)`, an estimate :math:`f^*` of its minimum (``fun_min``) and
:math:`s = \|\nabla f(x_k)\|^2` summed over every parameter:

* ``"SPS_max"`` (Loizou et al., 2021): :math:`\gamma = \min\left(\frac{f(x_k) - f^*}{s +
  \delta}, \gamma_{\max}\right)`;
* ``"SPS+"`` (Garrigos et al., 2023): :math:`\gamma = \max\left(\frac{f(x_k) - f^*}{s}, 0\right)`,
  uncapped, and 0 when :math:`s` is at most the machine epsilon of the parameters' dtype.

:func:`polyak_stepsize` makes the choice between the two (the one place any backend does).
Then :math:`x_{k+1} = x_k - \gamma \nabla f(x_k)`, or with heavy-ball momentum :math:`\mu`:
:math:`v_{k+1} = \mu v_k - \gamma \nabla f(x_k)`, :math:`x_{k+1} = x_k + v_{k+1}`.

Deviation from jaxopt 0.8.5 (``docs/deviations.md``): where jaxopt divides 0 by 0 (an exact
minimiser with ``delta=0``) and returns NaN, or takes an ascent step because
:math:`f(x_k) < f^*`, the step size here is 0. The ratio never divides by a zero denominator,
so the traced versions have finite derivatives too.

``where``, ``minimum`` and ``maximum`` are the backend's (bound by :func:`uniopt.rules.bind`);
the defaults here work on Python and Numba scalars.

References:
  Loizou, Vaswani, Laradji & Lacoste-Julien, "Stochastic Polyak step-size for SGD: an adaptive
  learning rate for fast convergence", AISTATS 2021, https://arxiv.org/abs/2002.10542
  Berrada, Zisserman & Kumar, "Training neural networks for and by interpolation", ICML 2020,
  https://arxiv.org/abs/1906.05661
  Garrigos, Gower & Schaipp, "Function value learning: adaptive learning rates based on the
  Polyak stepsize and function splitting in ERM", 2023, https://arxiv.org/abs/2307.14528
"""

from __future__ import annotations

from ._scalar import maximum, minimum, where  # noqa: F401 (rules, rebound by bind)

VARIANTS = ("SPS_max", "SPS+")

RULES = (
    "where",
    "minimum",
    "maximum",
    "sps_max_stepsize",
    "sps_plus_stepsize",
    "polyak_stepsize",
    "zero_below",
    "sgd_update",
    "heavy_ball_update",
)


def sps_max_stepsize(value, fun_min, sq_norm, delta, max_stepsize):
    """``min((value - fun_min) / (sq_norm + delta), max_stepsize)``, 0 unless the gap is > 0.

    A positive gap over a zero denominator gives ``max_stepsize`` (jaxopt's ``min(inf, max)``);
    the gradient is then zero, so the parameters do not move either way.
    """
    gap = value - fun_min
    denominator = sq_norm + delta
    has_denominator = denominator > 0
    ratio = gap / where(has_denominator, denominator, denominator + 1)
    capped = where(has_denominator, minimum(ratio, max_stepsize), max_stepsize)
    return where(gap > 0, capped, gap * 0)


def sps_plus_stepsize(value, fun_min, sq_norm, tiny):
    """``max((value - fun_min) / sq_norm, 0)``, 0 when ``sq_norm <= tiny`` (the dtype's eps)."""
    gap = value - fun_min
    big_enough = sq_norm > tiny
    ratio = gap / where(big_enough, sq_norm, sq_norm + 1)
    return where(big_enough, maximum(ratio, gap * 0), gap * 0)


def polyak_stepsize(value, fun_min, sq_norm, delta, max_stepsize, tiny, is_plus):
    """The variant choice: ``"SPS+"`` when ``is_plus``, else ``"SPS_max"``.

    The one place every backend picks the variant (NumPy, torch, JAX, the CUDA step-size
    kernel). ``is_plus`` is a bool (from :func:`is_plus`), or a traced/device flag: the choice is
    a ``where``, so both step sizes are computed (each is finite for every input) and it traces
    in JAX. ``delta`` and ``max_stepsize`` are used by ``"SPS_max"`` only, ``tiny`` (the zero
    guard, the machine epsilon of the parameters' dtype) by ``"SPS+"`` only.
    """
    return where(is_plus, sps_plus_stepsize(value, fun_min, sq_norm, tiny),
                 sps_max_stepsize(value, fun_min, sq_norm, delta, max_stepsize))


def zero_below(stepsize, denominator, tiny):
    """``stepsize``, or 0 where ``0 <= denominator <= tiny`` (optax's guard on ``||u||^2 + eps``).

    The zero is ``denominator * 0``: exactly 0 even where ``stepsize`` is NaN (a NaN loss).
    """
    return where(denominator <= tiny, denominator * 0, stepsize)


def is_plus(variant: str) -> bool:
    """The ``is_plus`` flag of :func:`polyak_stepsize` for a variant name of :data:`VARIANTS`.

    Raises:
      ValueError: an unknown variant (``Invalid variant value: 'x'``).
    """
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"Invalid variant value: {variant!r} (expected one of {', '.join(map(repr, VARIANTS))})")
    return variant == "SPS+"


def sgd_update(p, g, stepsize):
    """``p - stepsize * g``."""
    return p - stepsize * g


def heavy_ball_update(p, g, velocity, stepsize, momentum):
    """Heavy ball: ``v = momentum * v - stepsize * g``, ``p = p + v``; returns ``(p, v)``."""
    velocity = momentum * velocity - stepsize * g
    return p + velocity, velocity
