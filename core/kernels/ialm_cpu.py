"""Numba CPU kernel of iALM's dual step: one call per constraint group and update.

:func:`ialm_dual_step_` makes two passes over the group's constraints, both in one call:

1. block by block: the ``ctol`` filter, the momentum buffer update (when the group has
   momentum) and the direction into a work block, whose float64 sum of squares is added to
   the running total (:mod:`uniopt.kernels._reduce`: exactly ordered, compensated);
2. the step size :math:`\\min(\\beta, \\gamma / \\|d\\|)` (0 for a zero direction) from that
   total, then :math:`\\lambda \\leftarrow \\operatorname{clamp}(\\lambda + s d, lo, hi)`.

The arithmetic is :mod:`uniopt.rules.ialm`.

Memory contract: ``dual``, ``buffer`` and ``c`` are C-contiguous 1-D arrays of one dtype
(float32 or float64) and equal length (``buffer`` is only touched when ``flags[0]`` is set and
may then not alias ``c``); ``dual`` and ``buffer`` are updated in place, ``c`` is only read.
``coef`` is an array of that dtype holding ``(momentum, 1 - dampening, lower, upper, ctol,
_)``; the kernel writes the step size, cast to the dtype, into ``coef[5]`` (so the update runs
in the dtype with no float64 promotion). ``hyper`` is float64 ``(beta, gamma)``; ``flags`` is
int64 ``(use_momentum, is_ineq)``. Returns ``(sq_norm, stepsize)`` in float64.
"""

from __future__ import annotations

import numpy as np

from .. import _jit
from ..rules import bind
from ..rules import ialm as _ialm
from ._reduce import BLOCK, LANES, _block_sq_sum, _neumaier_add

__all__ = ["ialm_dual_step_", "coefficients"]

_rules = bind(_ialm, wrap=_jit.elementwise)
_equality_filter = _rules.equality_filter
_inequality_filter = _rules.inequality_filter
_momentum_direction = _rules.momentum_direction
_dual_stepsize = _rules.dual_stepsize
_dual_update = _rules.dual_update


def _filter_block_(c, out, ctol, is_ineq):
    """``out[i] = filter(c[i])`` (the ``ctol`` filter of the group's kind); one loop each kind."""
    if is_ineq:
        for i in range(c.size):
            out[i] = _inequality_filter(c[i], ctol)
    else:
        for i in range(c.size):
            out[i] = _equality_filter(c[i], ctol)


def _momentum_block_(buffer, d, momentum, keep):
    """``buffer = momentum * buffer + (1 - dampening) * d`` in place."""
    for i in range(buffer.size):
        buffer[i] = _momentum_direction(buffer[i], d[i], momentum, keep)


def _update_block_(dual, d, s, lower, upper):
    """``dual = clamp(dual + s * d, lower, upper)`` in place."""
    for i in range(dual.size):
        dual[i] = _dual_update(dual[i], d[i], s, lower, upper)


_filter_block_ = _jit.elementwise(_filter_block_)
_momentum_block_ = _jit.elementwise(_momentum_block_)
_update_block_ = _jit.elementwise(_update_block_)


@_jit.cpu_kernel
def ialm_dual_step_(dual, buffer, c, coef, hyper, flags):
    """One iALM dual update of one group, in place; returns ``(sq_norm, stepsize)``.

    Each pass goes block by block: with ``ctol`` the filtered constraints go to a work block
    in L1 first, then (with momentum) the buffer is updated from them; the sum of squares is
    taken of the block just written (or of the constraints themselves), so no loop stores to
    two arrays (which keeps LLVM's vectoriser on).
    """
    n = dual.size
    momentum, keep, lower, upper, ctol = coef[0], coef[1], coef[2], coef[3], coef[4]
    use_momentum, is_ineq = flags[0] != 0, flags[1] != 0
    lanes = np.empty(LANES, dtype=np.float64)
    work = np.empty(BLOCK, dtype=dual.dtype)
    total = np.float64(0)
    compensation = np.float64(0)
    use_ctol = ctol >= 0  # coefficients() passes ctol = 0 as -1: no filter
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        d = c[start:stop]
        if use_ctol:
            _filter_block_(d, work, ctol, is_ineq)
            d = work[:stop - start]
        if use_momentum:
            _momentum_block_(buffer[start:stop], d, momentum, keep)
            d = buffer[start:stop]
        total, compensation = _neumaier_add(total, compensation, _block_sq_sum(d, lanes))
    sq_norm = total + compensation
    stepsize = _dual_stepsize(hyper[0], hyper[1], sq_norm)
    coef[5] = stepsize
    s = coef[5]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        if use_momentum:
            d = buffer[start:stop]
        elif use_ctol:
            d = work[:stop - start]
            _filter_block_(c[start:stop], d, ctol, is_ineq)
        else:
            d = c[start:stop]
        _update_block_(dual[start:stop], d, s, lower, upper)
    return sq_norm, stepsize


def coefficients(dtype, momentum: float, dampening: float, lower: float, upper: float,
                 ctol: float) -> np.ndarray:
    """The ``coef`` array of :func:`ialm_dual_step_` in ``dtype`` (``coef[5]`` is the output).

    ``ctol = 0`` is passed as -1: the filters are then the identity (no value satisfies
    ``|c| <= -1``), bit for bit, where ``ctol = 0`` would turn ``-0.0`` into ``+0.0``.
    """
    return np.array([momentum, 1.0 - dampening, lower, upper, ctol if ctol > 0 else -1.0, 0.0],
                    dtype=dtype)
