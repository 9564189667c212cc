"""Scalar defaults of the helpers every rule module re-exports (and each backend rebinds).

``where``, ``minimum`` and ``maximum`` written for Python and Numba scalars; a rule module
imports them and lists them in its ``RULES``, so :func:`uniopt.rules.bind` re-creates them
over that module's namespace (``minimum`` then calls the bound ``where``) or replaces them by
a backend's own (``jnp.where``, ``torch.minimum``, ...).
"""

from __future__ import annotations


def where(condition, a, b):
    """``a`` where ``condition`` holds, else ``b`` (scalar default; rebound per backend)."""
    if condition:
        return a
    return b


def minimum(a, b):
    return where(b < a, b, a)


def maximum(a, b):
    return where(b > a, b, a)
