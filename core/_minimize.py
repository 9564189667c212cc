"""``scipy.optimize.minimize``-shaped drivers for every uniopt method, in one module.

``uniopt.minimize(fun, x0, method="qhm", jac=True, options={...})`` returns a
:class:`scipy.optimize.OptimizeResult`. The per-method functions (:func:`minimize_qhm`,
:func:`minimize_qhadam`, :func:`minimize_polyak`) have the signature SciPy expects of a custom
method, so they can also be handed to SciPy itself:
``scipy.optimize.minimize(fun, x0, method=uniopt.minimize_qhm, jac=True, options={...})``.
Both entry points behave alike, as SciPy 1.17's own unconstrained methods (``"BFGS"``) do:

* ``bounds`` or ``constraints`` (which SciPy hands to every custom method) cannot be honoured:
  a ``RuntimeWarning("Method qhm cannot handle bounds.")`` (``... constraints.``) says so and
  the run is unconstrained; ``hess``/``hessp`` are ignored with SciPy's warning too;
* ``tol`` sets ``gtol`` unless ``gtol`` is given (SciPy maps ``tol`` to ``gtol`` for BFGS);
* a ``callback`` raising ``StopIteration`` ends the run with ``status=99``,
  ``success=False`` and SciPy's message "`callback` raised `StopIteration`.". A callback
  returning ``True`` also stops the run (SciPy's ``minimize`` methods ignore the return value),
  with ``status=99`` and the message "`callback` returned `True`.";
* unknown options raise SciPy's ``OptimizeWarning``; ``maxiter`` must be an integer.

SciPy is imported on first use (``scipy.optimize`` costs ~0.3 s to import).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Callable

import numpy as np

from ._validation import check_minimize, check_polyak, nonnegative
from .polyak import polyak_stepsize, squared_norm, step_
from .qh import QHM, QHAdam

__all__ = ["minimize", "minimize_qhm", "minimize_qhadam", "minimize_polyak", "METHODS"]

_DEFAULT_GTOL = 1e-5

STOP_ITERATION_MESSAGE = "`callback` raised `StopIteration`."  # SciPy 1.17's words
CALLBACK_TRUE_MESSAGE = "`callback` returned `True`."
SUCCESS_MESSAGE = "Optimization terminated successfully."
MAXITER_MESSAGE = "Maximum number of iterations has been exceeded."
NAN_MESSAGE = "NaN or Inf encountered in the objective or its gradient."


# ----------------------------------------------------------------------------------------------
# What every method shares: arguments, warnings, the loop
# ----------------------------------------------------------------------------------------------
def _stacklevel() -> int:
    """The stack level of the first frame outside uniopt and SciPy (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == "uniopt" or module.startswith(("uniopt.", "scipy."))):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _warn(message: str, category) -> None:
    warnings.warn(message, category, stacklevel=_stacklevel())


def _has_constraints(constraints) -> bool:
    if constraints is None:
        return False
    if isinstance(constraints, (list, tuple)):
        return len(constraints) > 0
    return True  # a dict or a Constraint object


def _prepare(name: str, unknown_options: dict, hess, hessp, bounds, constraints, maxiter,
             gtol, tol) -> tuple:
    """SciPy's warnings for what ``name`` cannot use; returns the checked ``(maxiter, gtol)``."""
    if unknown_options:
        from scipy.optimize import OptimizeWarning

        _warn(f"Unknown solver options: {', '.join(map(str, unknown_options))}", OptimizeWarning)
    if hess is not None:
        _warn(f"Method {name} does not use Hessian information (hess).", RuntimeWarning)
    if hessp is not None:
        _warn(f"Method {name} does not use Hessian-vector product information (hessp).",
              RuntimeWarning)
    if _has_constraints(constraints):
        _warn(f"Method {name} cannot handle constraints.", RuntimeWarning)
    if bounds is not None:
        _warn(f"Method {name} cannot handle bounds.", RuntimeWarning)
    if tol is not None:
        tol = nonnegative("tol value", tol)
    if gtol is None:
        gtol = _DEFAULT_GTOL if tol is None else tol
    return check_minimize(maxiter, gtol)


def _objective(fun: Callable, jac, args: tuple, counts: dict) -> Callable:
    """A function returning ``(f, g)`` whatever the form of ``jac``."""
    if jac is True:
        def value_and_grad(x):
            counts["nfev"] += 1
            counts["njev"] += 1
            f, g = fun(x, *args)
            return float(f), np.asarray(g, dtype=x.dtype)
    elif callable(jac):
        def value_and_grad(x):
            counts["nfev"] += 1
            counts["njev"] += 1
            return float(fun(x, *args)), np.asarray(jac(x, *args), dtype=x.dtype)
    elif jac is None or jac is False or jac in ("2-point", "3-point", "cs"):
        from scipy.optimize import approx_fprime

        def value_and_grad(x):
            counts["nfev"] += 1 + x.size
            f = float(fun(x, *args))
            return f, np.asarray(approx_fprime(x, lambda y: fun(y, *args)), dtype=x.dtype)
    else:
        raise TypeError(f"Invalid jac: {jac!r} (expected True, a callable or None)")
    return value_and_grad


def _call_back(callback, x, f):
    """Call ``callback`` as SciPy does; the stop message, or ``None`` to go on."""
    if callback is None:
        return None
    try:
        params = set(inspect.signature(callback).parameters)
    except (TypeError, ValueError):
        params = set()
    try:
        if params == {"intermediate_result"}:
            from scipy.optimize import OptimizeResult

            result = callback(intermediate_result=OptimizeResult(x=np.copy(x), fun=f))
        else:
            result = callback(np.copy(x))
    except StopIteration:
        return STOP_ITERATION_MESSAGE
    if isinstance(result, (bool, np.bool_)) and result:
        return CALLBACK_TRUE_MESSAGE
    return None


def run(make_step, fun, x0, args, jac, callback, maxiter: int, gtol: float):
    """The shared driver loop of every method (arguments already checked by :func:`_prepare`).

    ``make_step(x)`` receives the flat working copy of ``x0`` (float32 kept, otherwise
    float64) and returns ``step(f, g)``, which updates it in place from the objective value and
    the flat gradient at the current point. The loop stops when the largest gradient component
    is at most ``gtol`` (status 0), after ``maxiter`` steps (1), on NaN/Inf (3), or when the
    callback asks (99).
    """
    from scipy.optimize import OptimizeResult

    x0 = np.asarray(x0)
    dtype = x0.dtype if x0.dtype in (np.float32, np.float64) else np.float64
    x = np.array(x0, dtype=dtype, copy=True).reshape(-1)
    counts = {"nfev": 0, "njev": 0}
    value_and_grad = _objective(fun, jac, args if isinstance(args, tuple) else (args,), counts)
    step = make_step(x)
    shape = x0.shape
    status, message, nit = 1, MAXITER_MESSAGE, 0
    f, g = value_and_grad(x.reshape(shape))
    for nit in range(maxiter + 1):
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            status, message = 3, NAN_MESSAGE
            break
        if np.max(np.abs(g), initial=0.0) <= gtol:
            status, message = 0, SUCCESS_MESSAGE
            break
        if nit == maxiter:
            break
        step(f, g.reshape(-1))
        f, g = value_and_grad(x.reshape(shape))
        stop = _call_back(callback, x.reshape(shape), f)
        if stop is not None:
            status, message = 99, stop
            nit += 1
            break
    return OptimizeResult(x=x.reshape(shape), fun=f, jac=g, nit=nit, nfev=counts["nfev"],
                          njev=counts["njev"], status=status, success=status == 0, message=message)


def _optimizer_steps(optimizer_cls, hyper: dict):
    """``make_step`` for a stateful NumPy optimizer built on the working copy."""

    def make_step(x):
        opt = optimizer_cls([x], **hyper)
        return lambda f, g: opt.step([g])

    return make_step


_COMMON_DOC = """
    Stops when the largest gradient component is at most ``gtol`` (``success=True``), after
    ``maxiter`` steps, on NaN/Inf, or when ``callback`` raises ``StopIteration`` or returns
    ``True`` (``status=99``). ``tol`` sets ``gtol`` when ``gtol`` is not given. ``bounds``,
    ``constraints``, ``hess`` and ``hessp`` (which SciPy passes to every custom method) are
    not used: given, they raise SciPy's ``RuntimeWarning`` ("Method ... cannot handle
    bounds."); unknown options raise an ``OptimizeWarning``. See :func:`minimize`.
"""


# ----------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------
def minimize_qhm(fun, x0, args=(), jac=None, callback=None, lr=0.1, momentum=0.9, nu=0.7,
                 weight_decay=0.0, weight_decay_type="grad", maxiter=1000, gtol=None, *,
                 tol=None, hess=None, hessp=None, bounds=None, constraints=(),
                 **unknown_options):
    """Minimise ``fun`` with :class:`uniopt.QHM` (SciPy custom-method signature).

    Options: ``lr``, ``momentum``, ``nu``, ``weight_decay``, ``weight_decay_type`` (as
    :class:`uniopt.QHM`), ``maxiter`` (integer, default 1000), ``gtol`` (default ``tol``, else
    1e-5).
    """
    maxiter, gtol = _prepare("qhm", unknown_options, hess, hessp, bounds, constraints, maxiter,
                             gtol, tol)
    hyper = dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                 weight_decay_type=weight_decay_type)
    return run(_optimizer_steps(QHM, hyper), fun, x0, args, jac, callback, maxiter, gtol)


def minimize_qhadam(fun, x0, args=(), jac=None, callback=None, lr=1e-3, betas=(0.9, 0.999),
                    nus=(1.0, 1.0), weight_decay=0.0, decouple_weight_decay=False, eps=1e-8,
                    maxiter=1000, gtol=None, *, tol=None, hess=None, hessp=None, bounds=None,
                    constraints=(), **unknown_options):
    """Minimise ``fun`` with :class:`uniopt.QHAdam` (SciPy custom-method signature).

    Options: ``lr``, ``betas``, ``nus``, ``weight_decay``, ``decouple_weight_decay``, ``eps``
    (as :class:`uniopt.QHAdam`), ``maxiter`` (integer, default 1000), ``gtol`` (default
    ``tol``, else 1e-5).
    """
    maxiter, gtol = _prepare("qhadam", unknown_options, hess, hessp, bounds, constraints,
                             maxiter, gtol, tol)
    hyper = dict(lr=lr, betas=betas, nus=nus, weight_decay=weight_decay,
                 decouple_weight_decay=decouple_weight_decay, eps=eps)
    return run(_optimizer_steps(QHAdam, hyper), fun, x0, args, jac, callback, maxiter, gtol)


def minimize_polyak(fun, x0, args=(), jac=None, callback=None, max_stepsize=1.0, delta=0.0,
                    fun_min=0.0, variant="SPS_max", momentum=0.0, maxiter=1000, gtol=None, *,
                    tol=None, hess=None, hessp=None, bounds=None, constraints=(),
                    **unknown_options):
    """Minimise ``fun`` with Polyak step-size SGD (SciPy custom-method signature).

    Each iteration evaluates ``fun`` and its gradient once, then steps with
    :func:`uniopt.polyak.polyak_stepsize` (options ``max_stepsize``, ``delta``, ``fun_min``,
    ``variant``, ``momentum`` as :class:`uniopt.PolyakSGD`), ``maxiter`` (integer, default
    1000), ``gtol`` (default ``tol``, else 1e-5). At success ``x`` is the point whose gradient
    met ``gtol``.

    Returns:
      A :class:`scipy.optimize.OptimizeResult` with ``x, fun, jac, nit, nfev, njev, status,
      success, message``.
    """
    maxiter, gtol = _prepare("polyak", unknown_options, hess, hessp, bounds, constraints,
                             maxiter, gtol, tol)
    check_polyak(fun_min, variant, max_stepsize, delta, momentum)

    def make_step(x):
        dtype = x.dtype
        velocity = [np.zeros_like(x)] if momentum != 0 else None

        def step(f, g):
            g = np.ascontiguousarray(g, dtype=dtype)
            if g.size != x.size:
                raise ValueError(f"Invalid gradient: {g.size} elements for {x.size} parameters")
            stepsize = polyak_stepsize(f, squared_norm([g], dtype), fun_min, variant,
                                       max_stepsize, delta, dtype)
            step_([x], [g], velocity, stepsize, momentum, dtype)

        return step

    return run(make_step, fun, x0, args, jac, callback, maxiter, gtol)


for _method in (minimize_qhm, minimize_qhadam, minimize_polyak):
    _method.__doc__ = _method.__doc__.rstrip() + "\n" + _COMMON_DOC
del _method

METHODS = {"qhm": minimize_qhm, "qhadam": minimize_qhadam, "polyak": minimize_polyak}


def minimize(fun, x0, args=(), method="qhadam", jac=None, hess=None, hessp=None, bounds=None,
             constraints=(), tol=None, callback=None, options=None):
    """Minimise a scalar function with one of uniopt's optimizers, SciPy style.

    The signature is :func:`scipy.optimize.minimize`'s.

    Args:
      fun: ``fun(x, *args) -> float`` (or ``(float, gradient)`` with ``jac=True``).
      x0: initial point (any shape; float32 is kept, other dtypes become float64).
      args: extra arguments for ``fun`` and ``jac``.
      method: one of ``"qhm"``, ``"qhadam"``, ``"polyak"`` (case-insensitive), or a
        SciPy-style custom method (a callable).
      jac: ``True`` if ``fun`` returns the gradient too, a callable ``jac(x, *args)``, or
        ``None`` for finite differences.
      hess, hessp: not used (a ``RuntimeWarning`` if given, as SciPy's BFGS).
      bounds, constraints: not handled (a ``RuntimeWarning`` if given, as SciPy's BFGS; the
        run is unconstrained).
      tol: sets the ``gtol`` option when it is not given.
      callback: called after each step as ``callback(xk)`` or, when its only parameter is
        ``intermediate_result``, as ``callback(intermediate_result=OptimizeResult)``. Raising
        ``StopIteration`` or returning ``True`` stops the run (``status=99``).
      options: the method's hyper-parameters plus ``maxiter`` (an integer) and ``gtol``.

    Returns:
      A :class:`scipy.optimize.OptimizeResult` with ``x, fun, jac, nit, nfev, njev, status,
      success, message``; ``status`` 0 (converged), 1 (``maxiter``), 3 (NaN/Inf) or 99
      (stopped by the callback).

    Raises:
      ValueError: an unknown ``method``, or an invalid option value. TypeError: an option of
        the wrong type (``maxiter=2.5``).

    Example:
      >>> import numpy as np, uniopt
      >>> res = uniopt.minimize(lambda x: (float(x @ x), 2 * x), np.ones(3), method="qhm",
      ...                       jac=True, tol=1e-8, options=dict(lr=0.1))
      >>> bool(res.success), bool(np.abs(res.x).max() < 1e-8)
      (True, True)
    """
    if callable(method):
        meth = method
    elif isinstance(method, str) and method.lower() in METHODS:
        meth = METHODS[method.lower()]
    else:
        expected = ", ".join(map(repr, METHODS))
        raise ValueError(f"Invalid method: {method!r} (expected one of {expected} or a callable)")
    options = dict(options or {})
    if tol is not None:
        options.setdefault("tol", tol)
    if not isinstance(args, tuple):
        args = (args,)
    return meth(fun, x0, args=args, jac=jac, hess=hess, hessp=hessp, bounds=bounds,
                constraints=constraints, callback=callback, **options)
