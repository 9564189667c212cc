"""Argument checks shared by every backend, with torch-style messages.

Every check raises at construction (never inside a kernel) and names the argument and the
value, e.g. ``ValueError("Invalid learning rate: -1.0")``. A value of the wrong type (a string,
``None``, a sequence where a number belongs) raises ``TypeError`` naming the argument.
"""

from __future__ import annotations

import math
from typing import Any

from .rules.polyak import VARIANTS as POLYAK_VARIANTS

__all__ = [
    "real",
    "nonnegative",
    "finite",
    "nonnegative_finite",
    "unit_interval",
    "pair",
    "choice",
    "check_qhm",
    "check_qhadam",
    "check_polyak",
]


def real(what: str, value: Any) -> float:
    """``value`` as a float; TypeError unless it is a real number (or a 0-d tensor/array)."""
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, complex):
        raise TypeError(f"Invalid {what}: {value!r} (expected a real number)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {what}: {value!r} (expected a real number)") from None


def nonnegative(what: str, value: Any) -> float:
    v = real(what, value)
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {what}: {value}")
    return v


def nonnegative_finite(what: str, value: Any) -> float:
    v = nonnegative(what, value)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {what}: {value}")
    return v


def finite(what: str, value: Any) -> float:
    v = real(what, value)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {what}: {value}")
    return v


def unit_interval(what: str, value: Any, closed: bool = False) -> float:
    """``0 <= value < 1`` (``closed``: ``0 <= value <= 1``)."""
    v = real(what, value)
    if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
        raise ValueError(f"Invalid {what}: {value}")
    return v


def pair(what: str, value: Any) -> tuple:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"Invalid {what}: {value!r} (expected a pair of numbers)") from None
    if len(items) != 2:
        raise ValueError(f"Invalid {what}: {value!r} (expected a pair of numbers)")
    return items


def choice(what: str, value: Any, allowed: tuple) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Invalid {what}: {value!r} (expected one of {', '.join(map(repr, allowed))})")
    return value


def check_qhm(lr, momentum, nu, weight_decay, weight_decay_type) -> None:
    """QHM's checks (qhoptim's, plus type and NaN checks; ``nu`` may be any finite number)."""
    nonnegative("learning rate", lr)
    nonnegative("momentum value", momentum)
    finite("nu value", nu)
    nonnegative("weight_decay value", weight_decay)
    choice("weight_decay_type value", weight_decay_type, ("grad", "direct"))


def check_qhadam(lr, betas, nus, weight_decay, eps) -> None:
    """QHAdam's checks (qhoptim's, plus type and NaN checks on every number)."""
    nonnegative("learning rate", lr)
    nonnegative("epsilon value", eps)
    betas = pair("betas", betas)
    for i, beta in enumerate(betas):
        unit_interval(f"beta parameter at index {i}", beta)
    nus = pair("nus", nus)
    for i, nu in enumerate(nus):
        finite(f"nu parameter at index {i}", nu)
    nonnegative("weight_decay value", weight_decay)


def check_polyak(fun_min, variant, max_stepsize, delta, momentum) -> None:
    """Polyak SGD's checks, for every backend.

    ``fun_min`` must be finite; ``max_stepsize``, ``delta`` and ``momentum`` finite and
    non-negative (an infinite ``max_stepsize`` would turn a zero gradient into ``inf * 0``);
    ``variant`` one of ``"SPS_max"``, ``"SPS+"``.
    """
    finite("fun_min value", fun_min)
    choice("variant value", variant, POLYAK_VARIANTS)
    nonnegative_finite("max_stepsize value", max_stepsize)
    nonnegative_finite("delta value", delta)
    nonnegative_finite("momentum value", momentum)
