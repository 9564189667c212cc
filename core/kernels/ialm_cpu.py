"""Numba CPU kernel of iALM's dual step: one call per constraint group and update.

:func:`ialm_dual_step_` makes two passes over the group's constraints, both in one call:

1. read-only, block by block: the direction -- the ``ctol`` filter, and with momentum the new
   buffer values :math:`\\mu b + (1 - \\delta) c` -- into work blocks in L1 (with momentum and
   no ``ctol``, squared where they are made instead; nothing is written to ``buffer`` or
   ``dual``), whose float64 sum of squares is added to the running total
   (:mod:`uniopt.kernels._reduce`: exactly ordered, compensated);
2. the step size :math:`\\min(\\beta, \\gamma / \\|d\\|)` (0 for a zero direction) from that
   total, then block by block the same direction again (bit for bit), written to the
   momentum buffer, and :math:`\\lambda \\leftarrow \\operatorname{clamp}(\\lambda + s d, lo, hi)`.

Only when that sum is not in ``[SMALL_SQ, inf)`` -- it overflowed (float64 entries beyond
~1e154), underflowed (entries below ~1e-146, or a zero direction), or the direction is not
finite -- does the kernel take the overflow-safe route between the two, as BLAS ``nrm2``
would: one pass for :math:`m = \\max_i |d_i|` (and whether every :math:`d_i` is finite), one
for :math:`\\sum (d_i/s)^2` with :math:`s` = :func:`uniopt.rules.ialm.norm_scale` of
:math:`m`, and the step :func:`uniopt.rules.ialm.scaled_dual_stepsize`. The scale is a power
of two, so the result is the one the plain sum would give without over/underflow. In float32
the float64 sum cannot overflow or lose bits to underflow: only a zero direction takes the
extra (max) pass. A direction that is not finite (constraints with inf/NaN, or a momentum
buffer that overflowed) returns ``(nan, nan, nan)`` before pass 2: nothing has been written
(``dual``, ``buffer`` and ``coef[5]`` unchanged), so a face needs no check of its own before
the call for a step that raises to change nothing.

The arithmetic is :mod:`uniopt.rules.ialm`.

Memory contract: ``dual``, ``buffer`` and ``c`` are C-contiguous 1-D arrays of one dtype
(float32 or float64) and equal length (``buffer`` is only touched when ``flags[0]`` is set and
may then not alias ``c``); ``dual`` and ``buffer`` are updated in place, ``c`` is only read.
``coef`` is an array of that dtype holding ``(momentum, 1 - dampening, lower, upper, ctol,
_)``; the kernel writes the step size, cast to the dtype, into ``coef[5]`` (so the update runs
in the dtype with no float64 promotion). ``hyper`` is float64 ``(beta, gamma)``; ``flags`` is
int64 ``(use_momentum, is_ineq)``. Returns ``(sq_norm, stepsize, norm)`` in float64 (``norm``
the direction's 2-norm, accurate where ``sq_norm`` itself over/underflows).
"""

from __future__ import annotations

import math

import numpy as np

from .. import _jit
from ..rules import bind
from ..rules import ialm as _ialm
from ._reduce import BLOCK, LANES, SMALL_SQ, _block_sq_sum, _neumaier_add

__all__ = ["ialm_dual_step_", "ialm_dual_norm_", "ialm_dual_apply_", "coefficients",
           "group_arguments", "SMALL_SQ"]

_rules = bind(_ialm, wrap=_jit.elementwise)
_equality_filter = _rules.equality_filter
_inequality_filter = _rules.inequality_filter
_momentum_direction = _rules.momentum_direction
_dual_stepsize = _rules.dual_stepsize
_scaled_dual_stepsize = _rules.scaled_dual_stepsize
_norm_scale = _rules.norm_scale
_dual_update = _rules.dual_update


def _filter_block_(c, out, ctol, is_ineq):
    """``out[i] = filter(c[i])`` (the ``ctol`` filter of the group's kind); one loop each kind."""
    if is_ineq:
        for i in range(c.size):
            out[i] = _inequality_filter(c[i], ctol)
    else:
        for i in range(c.size):
            out[i] = _equality_filter(c[i], ctol)


def _momentum_into_(buffer, d, out, momentum, keep):
    """``out = momentum * buffer + (1 - dampening) * d`` (``buffer`` only read; ``out`` is a
    work block distinct from both)."""
    for i in range(out.size):
        out[i] = _momentum_direction(buffer[i], d[i], momentum, keep)


def _momentum_over_(d, buffer, momentum, keep):
    """``d = momentum * buffer + (1 - dampening) * d`` in place (``buffer`` only read)."""
    for i in range(d.size):
        d[i] = _momentum_direction(buffer[i], d[i], momentum, keep)


def _momentum_update_block_(dual, buffer, d, momentum, keep, s, lower, upper):
    """``buffer = momentum * buffer + (1 - dampening) * d``, then ``dual = clamp(dual + s *
    buffer, lower, upper)``, in one loop (one read of each array)."""
    for i in range(dual.size):
        b = _momentum_direction(buffer[i], d[i], momentum, keep)
        buffer[i] = b
        dual[i] = _dual_update(dual[i], b, s, lower, upper)


def _update_block_(dual, d, s, lower, upper):
    """``dual = clamp(dual + s * d, lower, upper)`` in place."""
    for i in range(dual.size):
        dual[i] = _dual_update(dual[i], d[i], s, lower, upper)


def _amax_block(d, amax, finite):
    """``(max(amax, max |d|), finite and every d finite)`` in float64 (NaN-safe: a flag)."""
    for i in range(d.size):
        a = abs(np.float64(d[i]))
        if not a < np.inf:
            finite = False
        elif a > amax:
            amax = a
    return amax, finite


def _scale_block_(d, out, scale):
    """``out[i] = float64(d[i]) / scale`` (exact for a power-of-two ``scale``, short of underflow)."""
    for i in range(d.size):
        out[i] = np.float64(d[i]) / scale


_filter_block_ = _jit.elementwise(_filter_block_)
_momentum_into_ = _jit.elementwise(_momentum_into_)
_momentum_over_ = _jit.elementwise(_momentum_over_)
_update_block_ = _jit.elementwise(_update_block_)
_momentum_update_block_ = _jit.elementwise(_momentum_update_block_)
_amax_block = _jit.elementwise(_amax_block)
_scale_block_ = _jit.elementwise(_scale_block_)


def _direction_block(buffer, c, work, spare, start, stop, momentum, keep, ctol, use_momentum,
                     is_ineq, use_ctol):
    """The direction on ``[start, stop)``, read-only: ``c`` itself, its ``ctol`` filter (in
    ``work``), or the new momentum buffer values (in ``work`` after the filter, else in
    ``spare``); nothing else is written."""
    if use_ctol:
        block = work[:stop - start]
        _filter_block_(c[start:stop], block, ctol, is_ineq)
        if use_momentum:
            _momentum_over_(block, buffer[start:stop], momentum, keep)
        return block
    if use_momentum:
        block = spare[:stop - start]
        _momentum_into_(buffer[start:stop], c[start:stop], block, momentum, keep)
        return block
    return c[start:stop]


def _scaled_norm(buffer, c, work, spare, lanes, momentum, keep, ctol, use_momentum, is_ineq,
                 use_ctol):
    """The overflow-safe route: ``(scale, sum((d/scale)**2))`` of the direction (two passes,
    read-only, :func:`_direction_block`), ``scale`` = norm_scale(max |d|); ``(nan, nan)`` when
    some ``d`` is not finite, ``(scale, 0)`` for a zero direction."""
    n = c.size
    amax = np.float64(0)
    finite = True
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        d = _direction_block(buffer, c, work, spare, start, stop, momentum, keep, ctol,
                             use_momentum, is_ineq, use_ctol)
        amax, finite = _amax_block(d, amax, finite)
    if not finite:
        return np.nan, np.nan
    scale = _norm_scale(amax, -1021, 1021)  # float64 (amax is)
    total = np.float64(0)
    compensation = np.float64(0)
    if amax == 0:
        return scale, total
    scaled = np.empty(BLOCK, dtype=np.float64)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        d = _direction_block(buffer, c, work, spare, start, stop, momentum, keep, ctol,
                             use_momentum, is_ineq, use_ctol)
        block = scaled[:stop - start]
        _scale_block_(d, block, scale)
        total, compensation = _neumaier_add(total, compensation, _block_sq_sum(block, lanes))
    return scale, total + compensation


def _momentum_sq_sum(buffer, c, lanes, momentum, keep):
    """:func:`uniopt.kernels._reduce._block_sq_sum` of the new momentum buffer values
    ``momentum * buffer + (1 - dampening) * c`` (the same lanes, order and bits), read-only:
    the values are squared where they are made, never stored."""
    m = c.size
    for j in range(LANES):
        lanes[j] = 0
    full = m - m % LANES
    for start in range(0, full, LANES):
        b = buffer[start:start + LANES]
        row = c[start:start + LANES]
        for j in range(LANES):
            x = np.float64(_momentum_direction(b[j], row[j], momentum, keep))
            lanes[j] += x * x
    for j in range(m - full):
        x = np.float64(_momentum_direction(buffer[full + j], c[full + j], momentum, keep))
        lanes[j] += x * x
    width = LANES // 2
    while width >= 1:
        for i in range(width):
            lanes[i] += lanes[width + i]
        width //= 2
    return lanes[0]


_direction_block = _jit.elementwise(_direction_block)
_scaled_norm = _jit.elementwise(_scaled_norm)
_momentum_sq_sum = _jit.elementwise(_momentum_sq_sum)


def _dual_norm(buffer, c, coef, hyper, flags):
    """Pass 1 of :func:`ialm_dual_step_`, read-only: ``(sq_norm, stepsize, norm)`` of the
    group's direction (``(nan, nan, nan)`` for a direction that is not finite).

    The direction goes into work blocks in L1 (:func:`_direction_block`, one array stored per
    loop, which keeps LLVM's vectoriser on), or with momentum and no ``ctol`` is squared where
    it is made (:func:`_momentum_sq_sum`); the overflow-safe route when the sum is not in
    ``[SMALL_SQ, inf)``.
    """
    n = c.size
    momentum, keep, ctol = coef[0], coef[1], coef[4]
    use_momentum, is_ineq = flags[0] != 0, flags[1] != 0
    lanes = np.empty(LANES, dtype=np.float64)
    work = np.empty(BLOCK, dtype=c.dtype)
    spare = np.empty(BLOCK if use_momentum else 0, dtype=c.dtype)
    total = np.float64(0)
    compensation = np.float64(0)
    use_ctol = ctol >= 0  # coefficients() passes ctol = 0 as -1: no filter
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        if use_momentum and not use_ctol:  # the new buffer values squared as they are made
            block_sum = _momentum_sq_sum(buffer[start:stop], c[start:stop], lanes, momentum, keep)
        else:
            d = _direction_block(buffer, c, work, spare, start, stop, momentum, keep, ctol,
                                 use_momentum, is_ineq, use_ctol)
            block_sum = _block_sq_sum(d, lanes)
        total, compensation = _neumaier_add(total, compensation, block_sum)
    sq_norm = total + compensation
    if sq_norm >= SMALL_SQ and sq_norm < np.inf:  # the common case: no over/underflow
        return sq_norm, _dual_stepsize(hyper[0], hyper[1], sq_norm), math.sqrt(sq_norm)
    # overflow, underflow, a zero or a non-finite direction
    scale, sq_scaled = _scaled_norm(buffer, c, work, spare, lanes, momentum, keep, ctol,
                                    use_momentum, is_ineq, use_ctol)
    if not sq_scaled < np.inf:  # NaN: a direction that is not finite
        return np.nan, np.nan, np.nan
    norm = scale * math.sqrt(sq_scaled)
    return norm * norm, _scaled_dual_stepsize(hyper[0], hyper[1], scale, sq_scaled), norm


def _dual_apply(dual, buffer, c, coef, flags, stepsize):
    """Pass 2 of :func:`ialm_dual_step_`: ``coef[5] = stepsize`` (cast to the dtype), then block
    by block the direction again (bit for bit pass 1's), written to the momentum buffer, and
    the multipliers from it (measured: one loop is faster than two, the buffer and constraints
    being read once)."""
    n = dual.size
    momentum, keep, lower, upper, ctol = coef[0], coef[1], coef[2], coef[3], coef[4]
    use_momentum, is_ineq = flags[0] != 0, flags[1] != 0
    use_ctol = ctol >= 0
    work = np.empty(BLOCK if use_ctol else 0, dtype=dual.dtype)
    coef[5] = stepsize
    s = coef[5]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        d = c[start:stop]
        if use_ctol:
            _filter_block_(d, work, ctol, is_ineq)
            d = work[:stop - start]
        if use_momentum:
            _momentum_update_block_(dual[start:stop], buffer[start:stop], d, momentum, keep, s,
                                    lower, upper)
        else:
            _update_block_(dual[start:stop], d, s, lower, upper)


_dual_norm = _jit.elementwise(_dual_norm)
_dual_apply = _jit.elementwise(_dual_apply)


def _dual_step(dual, buffer, c, coef, hyper, flags):
    """The body of :func:`ialm_dual_step_`; returns ``(sq_norm, stepsize, norm)``:
    :func:`_dual_norm` (read-only), then :func:`_dual_apply` unless the direction is not
    finite."""
    sq_norm, stepsize, norm = _dual_norm(buffer, c, coef, hyper, flags)
    if stepsize != stepsize:  # NaN: a direction that is not finite; nothing written
        return sq_norm, stepsize, norm
    _dual_apply(dual, buffer, c, coef, flags, stepsize)
    return sq_norm, stepsize, norm


_dual_step = _jit.elementwise(_dual_step)


@_jit.cpu_kernel
def ialm_dual_step_(dual, buffer, c, coef, hyper, flags):
    """One iALM dual update of one group, in place; returns ``(sq_norm, stepsize, norm)``.

    For a direction that is not finite it returns ``(nan, nan, nan)`` having written nothing
    (``dual``, ``buffer`` and ``coef`` unchanged).
    """
    return _dual_step(dual, buffer, c, coef, hyper, flags)


@_jit.cpu_kernel
def ialm_dual_norm_(buffer, c, coef, hyper, flags):
    """The first, read-only pass of :func:`ialm_dual_step_` alone: ``(sq_norm, stepsize,
    norm)``, NaNs for a direction that is not finite; nothing is written."""
    return _dual_norm(buffer, c, coef, hyper, flags)


@_jit.cpu_kernel
def ialm_dual_apply_(dual, buffer, c, coef, flags, stepsize):
    """The writing pass of :func:`ialm_dual_step_` alone, with the ``stepsize``
    :func:`ialm_dual_norm_` returned: ``coef[5]``, the momentum buffer and the multipliers."""
    _dual_apply(dual, buffer, c, coef, flags, stepsize)


def coefficients(dtype, momentum: float, dampening: float, lower: float, upper: float,
                 ctol: float) -> np.ndarray:
    """The ``coef`` array of :func:`ialm_dual_step_` in ``dtype`` (``coef[5]`` is the output).

    ``ctol = 0`` is passed as -1: the filters are then the identity (no value satisfies
    ``|c| <= -1``), bit for bit, where ``ctol = 0`` would turn ``-0.0`` into ``+0.0``.
    """
    return np.array([momentum, 1.0 - dampening, lower, upper, ctol if ctol > 0 else -1.0, 0.0],
                    dtype=dtype)


def group_arguments(cache: dict, group: dict, dtype, ctol: float) -> tuple:
    """``(coef, hyper, flags)`` of the kernels for an iALM constraint group (a dict with
    ``momentum``, ``dampening``, ``lower_bound``, ``upper_bound``, ``beta``, ``gamma``,
    ``is_ineq``), made again only when its settings, ``ctol`` or the dtype change; ``hyper[0]``
    (``beta``, which grows every update) is refreshed at every call. ``cache`` maps
    ``id(group)`` to the arguments last made for it (the caller owns it: one per optimizer).
    """
    key = (dtype, group["momentum"], group["dampening"], group["lower_bound"],
           group["upper_bound"], group["gamma"], group["is_ineq"], ctol)
    hit = cache.get(id(group))
    if hit is None or hit[0] != key:
        coef = coefficients(dtype, group["momentum"], group["dampening"], group["lower_bound"],
                            group["upper_bound"], ctol)
        hyper = np.array([group["beta"], group["gamma"]], dtype=np.float64)
        flags = np.array([group["momentum"] != 0, group["is_ineq"]], dtype=np.int64)
        hit = cache[id(group)] = (key, coef, hyper, flags)
    hit[2][0] = group["beta"]
    return hit[1:]
