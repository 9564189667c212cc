"""Argument checks shared by every backend, with torch-style messages.

Every check raises at construction (never inside a kernel) and names the argument and the
value, e.g. ``ValueError("Invalid learning rate: -1.0")``. One policy for every family:

* a value of the wrong type (a string, ``None``, a sequence where a number belongs, a number
  where a bool belongs) raises ``TypeError`` naming the argument and the value;
* a number outside its range raises ``ValueError`` naming the argument and the value. Ranges
  follow each reference's documented range; every real hyper-parameter must also be finite
  (NaN and infinities are errors);
* momentum-like coefficients (``momentum``, ``betas``) share one range, ``[0, 1)``;
* flags (``maximize``, ``decouple_weight_decay``, ``has_aux``) must be ``bool`` (a NumPy
  bool is accepted), not ``0``/``1`` or a string;
* counts (``maxiter``) must be integers (``2.5`` and ``1e3`` are ``TypeError``), not bools.

Checks of a value that cannot be known at construction (a JAX tracer under ``jit`` or
``optax.inject_hyperparams``, an optax schedule) are skipped through the ``skip`` and
``schedules`` arguments of the ``check_*`` functions; the framework faces say which values
those are, since this module imports no framework.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import numpy as np

from .rules.polyak import VARIANTS as POLYAK_VARIANTS

__all__ = [
    "real",
    "nonnegative",
    "finite",
    "nonnegative_finite",
    "unit_interval",
    "pair",
    "choice",
    "boolean",
    "integer",
    "check_qhm",
    "check_qhadam",
    "pair_or_scalars",
    "check_polyak",
    "check_minimize",
    "WEIGHT_DECAY_TYPES",
    "check_ialm_size",
    "check_ialm_dual_range",
    "check_ialm_group",
    "check_ialm_group_name",
    "check_ialm_init_array",
    "check_penalty",
    "nonfinite_constraints_error",
    "NUPI_INIT_TYPES",
    "nupi_init_type",
    "check_nupi",
    "check_projected_ascent",
    "check_penalty_updater",
    "check_bilevel_dynamic",
    "check_step_coefficients",
    "check_conversion",
    "NONFINITE_POLICIES",
    "check_nonfinite",
    "nonfinite_error",
]

WEIGHT_DECAY_TYPES = ("grad", "direct")
NONFINITE_POLICIES = ("propagate", "raise", "skip")


def real(what: str, value: Any) -> float:
    """``value`` as a float; TypeError unless it is a real number (or a 0-d tensor/array)."""
    if (isinstance(value, (str, bytes)) or value is None or isinstance(value, complex)
            or getattr(value, "ndim", 0)):  # a 1-element tensor is not a number (float() is)
        raise TypeError(f"Invalid {what}: {value!r} (expected a real number)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {what}: {value!r} (expected a real number)") from None


def nonnegative(what: str, value: Any) -> float:
    """``value >= 0`` (``inf`` allowed, NaN rejected)."""
    v = real(what, value)
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {what}: {value}")
    return v


def nonnegative_finite(what: str, value: Any) -> float:
    """``0 <= value < inf``."""
    v = nonnegative(what, value)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {what}: {value}")
    return v


def finite(what: str, value: Any) -> float:
    """Any finite real number."""
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
    """``value`` as a 2-tuple; TypeError if it is not a sequence, ValueError if not of length 2."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"Invalid {what}: {value!r} (expected a pair of numbers)")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"Invalid {what}: {value!r} (expected a pair of numbers)") from None
    if len(items) != 2:
        raise ValueError(f"Invalid {what}: {value!r} (expected a pair of numbers)")
    return items


def choice(what: str, value: Any, allowed: tuple) -> Any:
    """``value`` must be one of the strings in ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Invalid {what}: {value!r} (expected one of {', '.join(map(repr, allowed))})")
    return value


def boolean(what: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (a NumPy bool too); TypeError otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Invalid {what}: {value!r} (expected True or False)")
    return bool(value)


def integer(what: str, value: Any, minimum: int = 0) -> int:
    """An integer ``>= minimum``: TypeError for bools and non-integers (``2.5``, ``"3"``).

    An integer-valued float (``1e3``) is accepted as that integer, as SciPy's ``maxiter`` is.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_, numbers.Integral)):
        if math.isfinite(value) and float(value).is_integer():
            value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {what}: {value!r} (expected an integer)")
    if value < minimum:
        raise ValueError(f"Invalid {what}: {value}")
    return int(value)


def check_nonfinite(value: Any) -> str:
    """The ``nonfinite`` policy of every optimizer: ``"propagate"``, ``"raise"`` or ``"skip"``.

    Raises:
      ValueError: anything else (``Invalid nonfinite policy: 'x' (expected 'propagate', 'raise'
        or 'skip')``).
    """
    if not isinstance(value, str) or value not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite policy: {value!r} (expected 'propagate', 'raise' "
                         f"or 'skip')")
    return value


def nonfinite_error(optimizer: str, where: str) -> FloatingPointError:
    """The error of a step under ``nonfinite="raise"``: ``optimizer`` met non-finite values in
    ``where`` (the first parameter/group/value found); nothing was changed."""
    return FloatingPointError(f"{optimizer}: non-finite (inf or NaN) values in {where}; "
                              f"nothing was updated (nonfinite='raise')")


def _never(value: Any) -> bool:
    return False


def _checker(skip: Callable[[Any], bool], schedules: bool):
    """``check(fn, what, value, schedule=False)``: ``fn(what, value)`` unless it is skipped."""

    def check(fn, what, value, schedule=False):
        if skip(value) or (schedule and schedules and callable(value)):
            return value
        return fn(what, value)

    return check


# ----------------------------------------------------------------------------------------------
# QH family (qhoptim 1.1.0 checks signs; the documented ranges are momentum/betas in [0, 1))
# ----------------------------------------------------------------------------------------------
def check_qhm(lr, momentum, nu, weight_decay=0.0, weight_decay_type="grad", maximize=False, *,
              skip: Callable[[Any], bool] = _never, schedules: bool = False) -> None:
    """QHM's checks, for every backend.

    ``lr`` finite and >= 0; ``momentum`` in [0, 1) (as QHAdam's betas); ``nu`` any finite
    number (values outside [0, 1] come out of the ``from_*`` conversions); ``weight_decay``
    finite and >= 0; ``weight_decay_type`` ``"grad"`` or ``"direct"``; ``maximize`` a bool.

    Args:
      skip: values for which it returns true (JAX tracers) are not checked.
      schedules: accept callables (optax schedules) for ``lr`` and ``weight_decay``.
    """
    check = _checker(skip, schedules)
    check(nonnegative_finite, "learning rate", lr, schedule=True)
    check(unit_interval, "momentum value", momentum)
    check(finite, "nu value", nu)
    check(nonnegative_finite, "weight_decay value", weight_decay, schedule=True)
    choice("weight_decay_type value", weight_decay_type, WEIGHT_DECAY_TYPES)
    boolean("maximize value", maximize)


def _pair_of(what: str, value: Any, skip: Callable[[Any], bool]) -> tuple:
    if skip(value):  # a traced pair: unpack it without checking
        return value[0], value[1]
    return pair(what, value)


def pair_or_scalars(what: str, value: Any, names: tuple, scalars: tuple,
                    unset: Callable[[int, Any], bool]) -> tuple:
    """One of two spellings of a pair: ``betas=(b1, b2)`` or ``b1=..., b2=...``, not both.

    Args:
      what: the pair's name (``"betas"``); ``value`` is it, ``None`` when not given.
      names, scalars: the scalars' names (``("b1", "b2")``) and values.
      unset: ``unset(i, scalar)`` is true when scalar ``i`` was left at its default.

    Returns:
      ``(pair, from_scalars)``: the two values, and whether they came from the scalars.
    """
    if value is None:
        return tuple(scalars), True
    given = [f"{n}={s!r}" for i, (n, s) in enumerate(zip(names, scalars)) if not unset(i, s)]
    if given:
        raise ValueError(f"Invalid {what}: {value!r} given together with {', '.join(given)} "
                         f"(give either {what} or {'/'.join(names)}, not both)")
    return value, False


def check_qhadam(lr, betas, nus, weight_decay=0.0, eps=1e-8, decouple_weight_decay=False,
                 maximize=False, *, skip: Callable[[Any], bool] = _never,
                 schedules: bool = False, scalar_names: tuple = (False, False)) -> tuple:
    """QHAdam's checks, for every backend; returns ``(beta1, beta2), (nu1, nu2)`` unpacked.

    ``lr`` finite and >= 0; ``betas`` a pair, each in [0, 1); ``nus`` a pair of finite numbers;
    ``weight_decay`` and ``eps`` finite and >= 0; ``decouple_weight_decay`` and ``maximize``
    bools. ``skip``/``schedules`` as :func:`check_qhm`. ``scalar_names``: whether the betas
    (and the nus) were given as the scalars ``b1, b2`` (``nu1, nu2``), which the messages then
    name.
    """
    check = _checker(skip, schedules)
    check(nonnegative_finite, "learning rate", lr, schedule=True)
    check(nonnegative_finite, "epsilon value", eps)
    betas = _pair_of("betas", betas, skip)
    for i, beta in enumerate(betas):
        what = f"b{i + 1} value" if scalar_names[0] else f"beta parameter at index {i}"
        check(unit_interval, what, beta)
    nus = _pair_of("nus", nus, skip)
    for i, nu in enumerate(nus):
        what = f"nu{i + 1} value" if scalar_names[1] else f"nu parameter at index {i}"
        check(finite, what, nu)
    check(nonnegative_finite, "weight_decay value", weight_decay, schedule=True)
    boolean("decouple_weight_decay value", decouple_weight_decay)
    boolean("maximize value", maximize)
    return betas, nus


# ----------------------------------------------------------------------------------------------
# Polyak SGD
# ----------------------------------------------------------------------------------------------
_UNSET = object()  # an optional check that was not asked for


def check_polyak(fun_min, variant, max_stepsize, delta, momentum, *, has_aux=_UNSET,
                 maxiter=_UNSET, tol=_UNSET, verbose=_UNSET) -> None:
    """Polyak SGD's checks, for every backend.

    ``fun_min`` must be finite; ``max_stepsize``, ``delta`` and ``momentum`` finite and
    non-negative (an infinite ``max_stepsize`` would turn a zero gradient into ``inf * 0``);
    ``variant`` one of ``"SPS_max"``, ``"SPS+"``. ``momentum=False`` is accepted as 0 (jaxopt's
    own tests pass it). The solver's other fields, checked when given: ``has_aux`` a bool,
    ``maxiter`` an integer >= 0, ``tol`` >= 0, ``verbose`` a bool or an integer (jaxopt's).
    """
    finite("fun_min value", fun_min)
    choice("variant value", variant, POLYAK_VARIANTS)
    nonnegative_finite("max_stepsize value", max_stepsize)
    nonnegative_finite("delta value", delta)
    nonnegative_finite("momentum value", momentum)
    if has_aux is not _UNSET:
        boolean("has_aux value", has_aux)
    if maxiter is not _UNSET:
        integer("maxiter value", maxiter)
    if tol is not _UNSET:
        nonnegative("tol value", tol)
    if verbose is not _UNSET and not isinstance(verbose, (bool, np.bool_, numbers.Integral)):
        raise TypeError(f"Invalid verbose value: {verbose!r} (expected a bool or an integer)")


# ----------------------------------------------------------------------------------------------
# scipy.optimize.minimize options
# ----------------------------------------------------------------------------------------------
def check_minimize(maxiter, gtol) -> tuple:
    """``maxiter`` an integer >= 0, ``gtol`` >= 0 (``inf`` stops at once); returns them."""
    return integer("maxiter value", maxiter), nonnegative("gtol value", gtol)


# ----------------------------------------------------------------------------------------------
# iALM (uniopt.ialm and its torch / JAX faces)
# ----------------------------------------------------------------------------------------------
def check_ialm_size(m: Any) -> int | None:
    """A group's number of multipliers ``m``: ``None`` or a positive integer (not a bool)."""
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise TypeError(f"Invalid m: {m!r} (expected a positive integer)")
    if m < 1 or m > np.iinfo(np.intp).max // 8:  # more float64s than memory can address
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
    boolean("is_ineq", is_ineq)
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


# ----------------------------------------------------------------------------------------------
# Constrained learning (Cooper 1.0.1's checks and warnings, plus the uniform type/finite policy)
# ----------------------------------------------------------------------------------------------
NUPI_INIT_TYPES = ("ZEROS", "SGD")


def nupi_init_type(value: Any) -> str:
    """nuPI's ``init_type`` as ``"ZEROS"`` or ``"SGD"``.

    Accepts an enum member named ``ZEROS``/``SGD`` (uniopt's ``nuPIInitType`` or Cooper's) or
    the strings ``"zeros"``/``"sgd"`` (any case); anything else raises
    ``ValueError("Invalid init_type: ...")`` (Cooper's message).
    """
    name = getattr(value, "name", value)
    if isinstance(name, str) and name.upper() in NUPI_INIT_TYPES:
        return name.upper()
    raise ValueError(f"Invalid init_type: {value}")


def _gain(what: str, value: Any) -> np.ndarray:
    """A nuPI gain as a float64 array (a number, or an array of per-entry gains), all finite."""
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Invalid {what}: {value!r} (expected a real number or an array of them)")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {what}: {value!r} (expected a real number or an array of "
                        f"them)") from None
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"Invalid {what}: {value}")
    return array


def check_nupi(lr, weight_decay=0.0, Kp=0.0, Ki=1.0, ema_nu=0.0, init_type="SGD",
               maximize=False) -> str:
    """nuPI's checks (Cooper's order and messages), for every backend; returns the init type.

    ``lr`` and ``weight_decay`` finite and >= 0 (``Invalid learning rate: -1.0``, ``Invalid
    weight_decay value: ...``); ``ema_nu`` in (-1, 1) (``Invalid nu value: ...``);
    ``init_type`` as :func:`nupi_init_type`; ``Kp``/``Ki`` finite numbers or arrays (NumPy or
    anything ``np.asarray`` reads: the torch face passes CPU copies); ``maximize`` a bool.
    Warns (``UserWarning``, as Cooper) on a negative gain entry, on all-zero gains and on a
    negative ``ema_nu``.
    """
    nonnegative_finite("learning rate", lr)
    nonnegative_finite("weight_decay value", weight_decay)
    nu = real("nu value", ema_nu)
    if not -1.0 < nu < 1.0:
        raise ValueError(f"Invalid nu value: {ema_nu}")
    kind = nupi_init_type(init_type)
    kp, ki = _gain("Kp value", Kp), _gain("Ki value", Ki)
    boolean("maximize value", maximize)
    if np.any(kp < 0.0):
        warnings.warn(f"Using a negative Kp coefficient: {Kp}", stacklevel=3)
    if np.any(ki < 0.0):
        warnings.warn(f"Using a negative Ki coefficient: {Ki}", stacklevel=3)
    if np.all(kp == 0.0) and np.all(ki == 0.0):
        warnings.warn("All PI coefficients are zero", stacklevel=3)
    if nu < 0:
        warnings.warn("nuPI optimizer instantiated with negative EMA coefficient", stacklevel=3)
    return kind


def check_projected_ascent(lr: Any, nonnegative: Any) -> float:
    """A projected dual step's ``lr`` (finite, >= 0) and ``nonnegative`` flag (a bool)."""
    boolean("nonnegative value", nonnegative)
    return nonnegative_finite("learning rate", lr)


def check_penalty_updater(kind: Any, growth_factor: Any, increment: Any,
                          violation_tolerance: Any, has_restart: Any) -> tuple:
    """A feasibility-driven penalty updater's settings as ``(factor, increment)`` of
    :func:`uniopt.rules.constrained.penalty_update`.

    ``kind`` ``"multiplicative"`` (``growth_factor`` finite and > 0) or ``"additive"``
    (``increment`` finite and >= 0); ``violation_tolerance`` finite and >= 0 (Cooper: "Violation tolerance must be
    non-negative."); ``has_restart`` a bool.
    """
    choice("kind", kind, ("multiplicative", "additive"))
    tolerance = real("violation_tolerance value", violation_tolerance)
    if not (tolerance >= 0.0 and math.isfinite(tolerance)):
        raise ValueError(f"Invalid violation_tolerance value: {violation_tolerance} (Violation "
                         f"tolerance must be non-negative.)")
    boolean("has_restart value", has_restart)
    if kind == "multiplicative":
        if not finite("growth_factor value", growth_factor) > 0.0:
            raise ValueError(f"Invalid growth_factor value: {growth_factor}")
        return growth_factor, 0.0
    return 1.0, nonnegative_finite("increment value", increment)


# ----------------------------------------------------------------------------------------------
# Bilevel Dynamic (every face)
# ----------------------------------------------------------------------------------------------
def check_bilevel_dynamic(ll_objective, ul_objective, lower_loop, acquire_max_loss, alpha,
                          truncate_iters, alpha_decay, init_aux, warm_start, checkpoint) -> tuple:
    """The bilevel ``Dynamic``'s checks; returns the values normalised.

    Objectives callable (``TypeError``); ``lower_loop`` an integer >= 1; ``truncate_iters`` an
    integer in ``[0, lower_loop)``; T-RAD (``truncate_iters > 0``) and PTT
    (``acquire_max_loss``) are exclusive; ``alpha`` in [0, 1]; ``alpha_decay`` in (0, 1];
    flags bools.

    Returns:
      ``(lower_loop, acquire_max_loss, alpha, truncate_iters, alpha_decay, init_aux,
      warm_start, checkpoint)``.
    """
    for what, fn in (("ll_objective", ll_objective), ("ul_objective", ul_objective)):
        if not callable(fn):
            raise TypeError(f"Invalid {what}: {fn!r} (expected a callable)")
    lower_loop = integer("lower_loop value", lower_loop, minimum=1)
    truncate_iters = integer("truncate_iters value", truncate_iters, minimum=0)
    if truncate_iters >= lower_loop:
        raise ValueError(f"Invalid truncate_iters value: {truncate_iters} (expected "
                         f"0 <= truncate_iters < lower_loop = {lower_loop})")
    acquire_max_loss = boolean("acquire_max_loss value", acquire_max_loss)
    if acquire_max_loss and truncate_iters > 0:
        raise ValueError(f"Invalid truncate_iters value: {truncate_iters} with "
                         "acquire_max_loss=True (T-RAD and PTT are exclusive truncations)")
    alpha = unit_interval("alpha value", alpha, closed=True)
    decay = real("alpha_decay value", alpha_decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"Invalid alpha_decay value: {alpha_decay} (expected 0 < alpha_decay <= 1)")
    flags = [boolean(f"{what} value", v) for what, v in
             (("init_aux", init_aux), ("warm_start", warm_start), ("checkpoint", checkpoint))]
    return (lower_loop, acquire_max_loss, alpha, truncate_iters, decay, *flags)


# ----------------------------------------------------------------------------------------------
# Differentiable unrolling (uniopt.unroll)
# ----------------------------------------------------------------------------------------------
def check_step_coefficients(value: Any, count: int, source: str) -> tuple:
    """A rule's step coefficients as a tuple of ``count`` finite floats.

    ``source`` names the function that makes them (for the message), e.g.
    ``"uniopt.rules.qh.qhm_coefficients"``. TypeError unless ``value`` is a sequence of real
    numbers; ValueError for a wrong length or a non-finite entry.
    """
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise TypeError(f"Invalid coefficients: {value!r} (expected the {count} numbers of "
                        f"{source})")
    items = tuple(value)
    if len(items) != count:
        raise ValueError(f"Invalid coefficients: {value!r} (expected the {count} numbers of "
                         f"{source}, got {len(items)})")
    return tuple(finite(f"coefficient at index {i}", c) for i, c in enumerate(items))


def check_conversion(name: str, convert: Callable, optional: tuple = (), **arguments: Any):
    """``convert(**arguments)`` for a ``from_*`` hyper-parameter converter, its arguments checked.

    Every argument must be a real number (``None`` too for those in ``optional``): TypeError
    naming it otherwise. The converter gets them as floats; where its formula has no value (a
    division by zero, the square root of a negative number, an overflow) ValueError names the
    converter and every argument with its value.
    """
    values = {key: None if (key in optional and value is None) else real(key, value)
              for key, value in arguments.items()}
    try:
        return convert(**values)
    except (ArithmeticError, ValueError) as error:
        shown = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
        raise ValueError(f"Invalid arguments of {name}: {shown} (no such hyper-parameters: "
                         f"{error})") from None
