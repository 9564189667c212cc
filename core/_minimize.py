"""``scipy.optimize.minimize``-shaped drivers for uniopt's optimizers.

``uniopt.minimize(fun, x0, method="qhm", jac=True, options={...})`` returns a
:class:`scipy.optimize.OptimizeResult`. The per-method functions (``minimize_qhm``, ...) have
the signature SciPy expects of a custom method (SciPy is imported on first use), so they can also be handed to SciPy itself:
``scipy.optimize.minimize(fun, x0, method=uniopt.minimize_qhm, jac=True, options={...})``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import numpy as np

from ._validation import nonnegative
from .qh import QHM, QHAdam

__all__ = ["minimize", "minimize_qhm", "minimize_qhadam"]


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


def _notify(callback, x, f):
    if callback is None:
        return False
    try:
        params = inspect.signature(callback).parameters
    except (TypeError, ValueError):
        params = {}
    if "intermediate_result" in params:
        from scipy.optimize import OptimizeResult

        result = callback(intermediate_result=OptimizeResult(x=x.copy(), fun=f))
    else:
        result = callback(x.copy())
    return result is True


# SciPy passes these to every custom method; anything else unknown is probably a typo.
_SCIPY_PASSES = frozenset({"hess", "hessp", "bounds", "constraints"})


def _warn_unknown(options: dict) -> None:
    unknown = sorted(set(options) - _SCIPY_PASSES)
    if unknown:
        from scipy.optimize import OptimizeWarning

        warnings.warn(f"Unknown solver options: {', '.join(unknown)}", OptimizeWarning, stacklevel=3)


def run(make_step, fun, x0, args, jac, callback, maxiter, gtol):
    """The shared driver loop of every method.

    ``make_step(x)`` receives the flat working copy of ``x0`` (float32 kept, otherwise
    float64) and returns ``step(f, g)``, which updates it in place from the objective value and
    the flat gradient at the current point.
    """
    from scipy.optimize import OptimizeResult  # scipy.optimize costs ~0.3 s to import

    maxiter = int(nonnegative("maxiter", maxiter))
    gtol = nonnegative("gtol", gtol)
    x0 = np.asarray(x0)
    dtype = x0.dtype if x0.dtype in (np.float32, np.float64) else np.float64
    x = np.array(x0, dtype=dtype, copy=True).reshape(-1)
    counts = {"nfev": 0, "njev": 0}
    value_and_grad = _objective(fun, jac, tuple(args), counts)
    step = make_step(x)
    shape = x0.shape
    status, message, nit = 1, "Maximum number of iterations has been exceeded.", 0
    f, g = value_and_grad(x.reshape(shape))
    for nit in range(maxiter + 1):
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            status, message = 3, "NaN or Inf encountered in the objective or its gradient."
            break
        if np.max(np.abs(g), initial=0.0) <= gtol:
            status, message = 0, "Optimization terminated successfully."
            break
        if nit == maxiter:
            break
        step(f, g.reshape(-1))
        f, g = value_and_grad(x.reshape(shape))
        if _notify(callback, x.reshape(shape), f):
            status, message = 99, "`callback` raised `StopIteration`."
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


def minimize_qhm(fun, x0, args=(), jac=None, callback=None, lr=0.1, momentum=0.9, nu=0.7,
                 weight_decay=0.0, weight_decay_type="grad", maxiter=1000, gtol=1e-5,
                 **unknown_options):
    """Minimise ``fun`` with :class:`uniopt.QHM` (SciPy custom-method signature).

    Stops when the largest gradient component is at most ``gtol`` (``success=True``) or after
    ``maxiter`` steps. Unknown options raise an ``OptimizeWarning``, as SciPy's own methods do
    (``hess``, ``bounds`` ..., which SciPy passes to every custom method, are ignored).
    """
    _warn_unknown(unknown_options)
    hyper = dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                 weight_decay_type=weight_decay_type)
    return run(_optimizer_steps(QHM, hyper), fun, x0, args, jac, callback, maxiter, gtol)


def minimize_qhadam(fun, x0, args=(), jac=None, callback=None, lr=1e-3, betas=(0.9, 0.999),
                    nus=(1.0, 1.0), weight_decay=0.0, decouple_weight_decay=False, eps=1e-8,
                    maxiter=1000, gtol=1e-5, **unknown_options):
    """Minimise ``fun`` with :class:`uniopt.QHAdam` (SciPy custom-method signature)."""
    _warn_unknown(unknown_options)
    hyper = dict(lr=lr, betas=betas, nus=nus, weight_decay=weight_decay,
                 decouple_weight_decay=decouple_weight_decay, eps=eps)
    return run(_optimizer_steps(QHAdam, hyper), fun, x0, args, jac, callback, maxiter, gtol)


def _methods() -> dict:
    from .polyak import minimize_polyak  # core/polyak.py builds on this module's helpers

    return {"qhm": minimize_qhm, "qhadam": minimize_qhadam, "polyak": minimize_polyak}


def minimize(fun, x0, args=(), method="qhadam", jac=None, callback=None, options=None):
    """Minimise a scalar function with one of uniopt's optimizers, SciPy style.

    Args:
      fun: ``fun(x, *args) -> float`` (or ``(float, gradient)`` with ``jac=True``).
      x0: initial point (any shape; float32 is kept, other dtypes become float64).
      args: extra arguments for ``fun`` and ``jac``.
      method: one of ``"qhm"``, ``"qhadam"``, ``"polyak"`` (case-insensitive).
      jac: ``True`` if ``fun`` returns the gradient too, a callable ``jac(x, *args)``, or
        ``None`` for finite differences.
      callback: called after each step as ``callback(xk)`` or
        ``callback(intermediate_result=OptimizeResult)``; returning ``True`` stops.
      options: the method's hyper-parameters plus ``maxiter`` and ``gtol``.

    Returns:
      A :class:`scipy.optimize.OptimizeResult` with ``x, fun, jac, nit, nfev, njev, status,
      success, message``.
    """
    methods = _methods()
    if not isinstance(method, str) or method.lower() not in methods:
        raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(map(repr, methods))})")
    return methods[method.lower()](fun, x0, args=args, jac=jac, callback=callback, **(options or {}))
