"""Update rules, each written once as plain arithmetic on scalars or arrays.

A rule module holds the arithmetic of one family of optimizers as ordinary Python functions
whose only non-arithmetic helpers (``sqrt``, ...) are module globals. :func:`bind` re-creates
those functions over another set of helpers, so the very same code runs

* compiled by Numba on scalars inside the CPU kernels (``uniopt.kernels``),
* compiled by ``numba.cuda`` as device functions,
* on NumPy arrays, on torch tensors (differentiable) and traced by JAX.
"""

from __future__ import annotations

import types
from types import SimpleNamespace
from typing import Callable

__all__ = ["bind"]


def bind(module: types.ModuleType, wrap: Callable | None = None, **ops) -> SimpleNamespace:
    """Return the rules of ``module`` re-bound to the helpers in ``ops``.

    Args:
      module: a rule module listing its rule functions in ``RULES``.
      wrap: applied to every re-bound function (for example a Numba decorator); rules that call
        each other then call the wrapped versions.
      **ops: replacements for the module's helper globals, e.g. ``sqrt=torch.sqrt``; a rule
        named here (e.g. a scalar ``where``) is replaced by the given function.

    Returns:
      A namespace with one attribute per rule.
    """
    namespace = dict(module.__dict__)
    namespace.update(ops)
    bound = {}
    for name in module.RULES:
        if name in ops:  # the backend brings its own version of this helper
            bound[name] = ops[name]
            continue
        original = module.__dict__[name]
        fn = types.FunctionType(
            original.__code__, namespace, original.__name__, original.__defaults__, original.__closure__
        )
        fn.__qualname__ = original.__qualname__
        fn.__doc__ = original.__doc__
        fn.__module__ = original.__module__
        if wrap is not None:
            fn = wrap(fn)
        namespace[name] = fn
        bound[name] = fn
    return SimpleNamespace(**bound)
