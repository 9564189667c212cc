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


# ----------------------------------------------------------------------------------------------
# iALM (uniopt.ialm and its torch / JAX faces)
# ----------------------------------------------------------------------------------------------
import numbers  # noqa: E402 (this block's own imports: the blocks above are other families')

import numpy as np  # noqa: E402

__all__ += [
    "check_ialm_size",
    "check_ialm_dual_range",
    "check_ialm_group",
    "check_ialm_group_name",
    "check_ialm_init_array",
    "check_penalty",
    "nonfinite_constraints_error",
]


def check_ialm_size(m: Any) -> int | None:
    """A group's number of multipliers ``m``: ``None`` or a positive integer (not a bool)."""
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise TypeError(f"Invalid m: {m!r} (expected a positive integer)")
    if m < 1:
        raise ValueError(f"Invalid m: {m}")
    return int(m)


def check_ialm_dual_range(value: Any) -> tuple:
    """``dual_range`` as floats ``(lo, hi)``, ``None`` entries meaning unbounded (``-inf`` /
    ``inf``); ``lo <= hi``, no NaN, no empty range at infinity."""
    items = pair("dual_range", value)
    lo = -math.inf if items[0] is None else real("dual_range", items[0])
    hi = math.inf if items[1] is None else real("dual_range", items[1])
    if math.isnan(lo) or math.isnan(hi) or lo > hi or lo == math.inf or hi == -math.inf:
        raise ValueError(f"Invalid dual_range: {value!r}")
    return lo, hi


def _is_bool(value: Any) -> bool:
    """A Python bool or a NumPy bool scalar (not an int, not an array)."""
    return isinstance(value, (bool, np.bool_))


def check_ialm_group(*, beta, sigma, gamma, momentum, dampening, dual_range, is_ineq) -> dict:
    """Validate one iALM constraint group's hyper-parameters; return them as floats and bounds.

    ``beta`` and ``gamma`` finite and >= 0, ``sigma`` finite and > 0, ``momentum`` and
    ``dampening`` in [0, 1], ``dual_range`` a pair ``(low, high)`` (``None``: unbounded) with
    ``low <= high``, ``is_ineq`` a bool (``TypeError`` otherwise, also for 0 / 1). Inequality
    groups are bounded below by ``max(low, 0)``.

    Returns:
      ``{"beta", "sigma", "gamma", "momentum", "dampening", "dual_range": (lo, hi), "is_ineq",
      "lower_bound", "upper_bound"}``.
    """
    out = {
        "beta": nonnegative_finite("beta value", beta),
        "sigma": nonnegative_finite("sigma value", sigma),
        "gamma": nonnegative_finite("gamma value", gamma),
        "momentum": unit_interval("momentum value", momentum, closed=True),
        "dampening": unit_interval("dampening value", dampening, closed=True),
    }
    if out["sigma"] == 0:
        raise ValueError(f"Invalid sigma value: {sigma}")
    if not _is_bool(is_ineq):
        raise TypeError(f"Invalid is_ineq: {is_ineq!r} (expected a bool)")
    lo, hi = check_ialm_dual_range(dual_range)
    out["dual_range"] = (lo, hi)
    out["is_ineq"] = bool(is_ineq)
    out["lower_bound"] = max(lo, 0.0) if is_ineq else lo
    out["upper_bound"] = hi
    if out["lower_bound"] > hi:
        raise ValueError(f"Invalid dual_range: {dual_range!r} (an inequality group's multipliers "
                         f"are >= 0, above the upper bound)")
    return out


def check_ialm_group_name(name: Any, existing: Any) -> str:
    """A new group's ``name``: a str not among ``existing`` (the names of the other groups)."""
    if not isinstance(name, str):
        raise TypeError(f"Invalid name: {name!r} (expected a str)")
    if name in existing:
        raise ValueError(f"Invalid name: {name!r} (a group of that name exists)")
    return name


def check_ialm_init_array(dtype: Any, ndim: int, shape: Any) -> None:
    """``init_duals`` given as an array: 1-D float32 or float64 (``dtype`` a NumPy dtype)."""
    if str(dtype) not in ("float32", "float64") or ndim != 1:
        raise TypeError(f"Invalid init_duals: expected a number or a 1-D float32/float64 "
                        f"array, got {dtype} of shape {tuple(shape)}")


def check_penalty(penalty: Any) -> float | None:
    """iALM's ``penalty``: ``None`` (each group's ``beta``) or a finite number >= 0."""
    return None if penalty is None else nonnegative_finite("penalty value", penalty)


def nonfinite_constraints_error(name: Any) -> ValueError:
    """The error of an iALM step given non-finite constraint values in group ``name`` (raised
    by the torch and NumPy faces before anything changes)."""
    return ValueError(f"constraints: the values of group {name!r} are not finite (inf or NaN); "
                      f"nothing was updated")
