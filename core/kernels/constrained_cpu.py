"""Numba CPU kernels of the dual side of constrained learning (Lagrange multipliers).

Every kernel applies a rule of :mod:`uniopt.rules.constrained` element by element, in one pass
over the memory it touches:

* :func:`sgd_projected_` (dense): ``param = max(param + signed_lr * grad, lower)``, the SGD step
  and the projection fused;
* :func:`indexed_sgd_projected_`: the same on the sampled rows only;
* :func:`nupi_` / :func:`nupi_table_` (dense) and :func:`indexed_nupi_`: nuPI's direction, its
  ``xi`` update and the (optionally projected) parameter update in one pass;
* :func:`penalty_update_` / :func:`indexed_penalty_update_`: feasibility-driven penalty
  coefficients, measure computed per entry.

Memory contract (every kernel here):

* ``param``, ``grad``, ``xi``, ``value``, ``init``, ``violation`` and ``values`` are
  C-contiguous arrays of one dtype, float32 or float64: 1-D for the dense kernels, 2-D
  ``(m, width)`` (all ``m`` rows of the multipliers) and ``(k, width)`` (the sampled rows'
  values) for the indexed ones. Parameters, ``xi``, the ``mask`` and ``value`` are updated in
  place; gradients, violations and gains are only read.
* ``coef`` holds the step's scalars already cast to that dtype on the host (no float64
  promotion inside float32 kernels); ``flags`` is int64.
* ``rows`` is int64 ``(k,)`` with ``0 <= rows[j] < m`` (the faces check the range; the kernels
  do not). The indexed kernels read and write only the rows listed, so their cost is ``O(k)``
  whatever ``m`` (unsampled rows are never read: NaN there does not matter). Rows may repeat:
  as the sparse gradient of an embedding lookup, a row's values are summed (in the order
  given) and the row is then updated once (found with a hash table of ``2k`` slots, no sort;
  strictly increasing rows -- a coalesced sparse gradient -- skip even that).
  :func:`indexed_penalty_update_` is the exception: a repeated row gets the update computed
  from its last occurrence (Cooper's indexed assignment), each from the coefficient as it was
  before the call.
* nuPI's gains ``ki`` and ``kpn`` (:math:`K_I` and :math:`K_P(1-\\nu)`) are arrays of the
  dtype with one element (one gain for every entry) or one per entry (shape of ``param``).

Dense kernels exist as a serial and a ``prange`` variant (separate top-level definitions, as
the on-disk cache requires); the faces choose the parallel one from
:data:`uniopt._jit.PARALLEL_MIN_SIZE` elements on. The indexed kernels are serial (``k`` is
small).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .. import _jit
from ..rules import bind
from ..rules import constrained as _constrained
from ._pointers import view

__all__ = [
    "sgd_projected_",
    "sgd_projected_parallel_",
    "indexed_sgd_projected_",
    "nupi_",
    "nupi_parallel_",
    "nupi_table_",
    "nupi_table_parallel_",
    "indexed_nupi_",
    "penalty_update_",
    "penalty_update_parallel_",
    "indexed_penalty_update_",
    "coalesce",
    "first_out_of_range",
]

_rules = bind(_constrained, wrap=_jit.elementwise)
_sgd_projected = _rules.sgd_projected
_nupi_direction = _rules.nupi_direction
_nupi_average = _rules.nupi_average
_nupi_param = _rules.nupi_param
_penalty_measure = _rules.penalty_measure
_penalty_update = _rules.penalty_update


# ----------------------------------------------------------------------------------------------
# Coalescing sampled rows (duplicates summed, as a sparse COO gradient's coalesce())
# ----------------------------------------------------------------------------------------------
def _coalesce(rows, values):
    """``(unique_rows, summed_values)``: ``rows`` and ``values`` themselves when the rows are
    strictly increasing (a coalesced sparse gradient), else the distinct rows in order of first
    appearance with each one's values added in their given order. ``O(k)``: an open-addressing
    hash table of ``>= 2k`` slots (xor-folded row numbers, linear probing) finds repeats, with
    no sort."""
    k = rows.size
    increasing = True
    for j in range(1, k):
        if rows[j] <= rows[j - 1]:
            increasing = False
            break
    if increasing:
        return rows, values
    bits = 1
    while (1 << bits) < 2 * k:
        bits += 1
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, dtype=np.int64)
    width = values.shape[1]
    out_rows = np.empty(k, dtype=np.int64)
    out_values = np.empty((k, width), dtype=values.dtype)
    n = 0
    for j in range(k):
        r = rows[j]
        h = (r ^ (r >> bits) ^ (r >> (2 * bits)) ^ (r >> (3 * bits))) & mask  # xor-folded
        while True:
            slot = slots[h]
            if slot < 0:
                slots[h] = n
                out_rows[n] = r
                for c in range(width):
                    out_values[n, c] = values[j, c]
                n += 1
                break
            if out_rows[slot] == r:
                for c in range(width):
                    out_values[slot, c] += values[j, c]
                break
            h = (h + 1) & mask
    return out_rows[:n], out_values[:n]


_coalesce = _jit.elementwise(_coalesce)


@_jit.cpu_kernel
def coalesce(rows, values):
    """The distinct rows (in order of first appearance) and their summed values; ``rows`` and
    ``values`` ``(k, width)`` themselves when the rows are strictly increasing."""
    return _coalesce(rows, values)


@_jit.cpu_kernel
def first_out_of_range(rows, m):
    """The position of the first row outside ``[0, m)``, or -1 (the faces' O(k) check)."""
    for j in range(rows.size):
        if rows[j] < 0 or rows[j] >= m:
            return j
    return -1


# ----------------------------------------------------------------------------------------------
# Projected SGD (the plain dual step: SGD(maximize=True) then relu, fused)
# ----------------------------------------------------------------------------------------------
@_jit.cpu_kernel
def sgd_projected_(param, grad, coef):
    """``param = max(param + coef[0] * grad, coef[1])`` in place (serial)."""
    signed_lr, lower = coef[0], coef[1]
    for i in range(param.size):
        param[i] = _sgd_projected(param[i], grad[i], signed_lr, lower)


@_jit.cpu_kernel(parallel=True)
def sgd_projected_parallel_(param, grad, coef):
    """:func:`sgd_projected_`, threads splitting the array."""
    signed_lr, lower = coef[0], coef[1]
    for i in prange(param.size):
        param[i] = _sgd_projected(param[i], grad[i], signed_lr, lower)


@_jit.cpu_kernel
def indexed_sgd_projected_(param, rows, values, coef):
    """``param[r] = max(param[r] + coef[0] * sum of r's values, coef[1])`` for each sampled row
    ``r`` (``param`` ``(m, width)``, ``values`` ``(k, width)``); other rows are not touched."""
    signed_lr, lower = coef[0], coef[1]
    urows, uvalues = _coalesce(rows, values)
    width = param.shape[1]
    for j in range(urows.size):
        r = urows[j]
        for c in range(width):
            param[r, c] = _sgd_projected(param[r, c], uvalues[j, c], signed_lr, lower)


# ----------------------------------------------------------------------------------------------
# nuPI
# coef = (ki, kpn, nu, one_minus_nu, signed_lr, lr_decay, lower); kpn = Kp * (1 - nu)
# ----------------------------------------------------------------------------------------------
def _nupi_entry(p, e, x, fresh, ki, kpn, nu, one_minus_nu, signed_lr, lr_decay, lower):
    """One entry of a nuPI step: ``(new_param, new_xi)``."""
    direction = _nupi_direction(e, x, fresh, ki, kpn)
    return (_nupi_param(p, direction, signed_lr, lr_decay, lower),
            _nupi_average(x, e, fresh, nu, one_minus_nu))


_nupi_entry = _jit.elementwise(_nupi_entry)


def _nupi_flat(param, grad, xi, ki, kpn, coef, fresh):
    """A nuPI step over flat arrays, gains scalar (size 1) or per entry; serial."""
    nu, one_minus_nu, signed_lr, lr_decay, lower = coef[2], coef[3], coef[4], coef[5], coef[6]
    if ki.size == 1 and kpn.size == 1:
        k_i, k_pn = ki[0], kpn[0]
        if fresh:
            for i in range(param.size):
                param[i], xi[i] = _nupi_entry(param[i], grad[i], xi[i], True, k_i, k_pn, nu,
                                              one_minus_nu, signed_lr, lr_decay, lower)
        else:
            for i in range(param.size):
                param[i], xi[i] = _nupi_entry(param[i], grad[i], xi[i], False, k_i, k_pn, nu,
                                              one_minus_nu, signed_lr, lr_decay, lower)
    else:
        si = 0 if ki.size == 1 else 1
        sp = 0 if kpn.size == 1 else 1
        for i in range(param.size):
            param[i], xi[i] = _nupi_entry(param[i], grad[i], xi[i], fresh, ki[i * si],
                                          kpn[i * sp], nu, one_minus_nu, signed_lr, lr_decay,
                                          lower)


_nupi_flat = _jit.elementwise(_nupi_flat)


@_jit.cpu_kernel
def nupi_(param, grad, xi, ki, kpn, coef, flags):
    """One nuPI step of one flat array, in place (``flags[0]``: the SGD initialisation's first
    step, :math:`\\xi_{-1} = e_0`, for every entry)."""
    _nupi_flat(param, grad, xi, ki, kpn, coef, flags[0] != 0)


@_jit.cpu_kernel(parallel=True)
def nupi_parallel_(param, grad, xi, ki, kpn, coef, flags):
    """:func:`nupi_`, threads splitting the array."""
    nu, one_minus_nu, signed_lr, lr_decay, lower = coef[2], coef[3], coef[4], coef[5], coef[6]
    fresh = flags[0] != 0
    si = 0 if ki.size == 1 else 1
    sp = 0 if kpn.size == 1 else 1
    for i in prange(param.size):
        param[i], xi[i] = _nupi_entry(param[i], grad[i], xi[i], fresh, ki[i * si], kpn[i * sp],
                                      nu, one_minus_nu, signed_lr, lr_decay, lower)


@_jit.cpu_kernel
def nupi_table_(p_addrs, g_addrs, xi_addrs, sizes, fresh, coef):
    """One nuPI step of every tensor of a table (scalar gains ``coef[0]``, ``coef[1]``); a zero
    gradient address skips that tensor; ``fresh[t]``: tensor ``t``'s first SGD-init step."""
    gains = coef[:2]
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        _nupi_flat(view(p_addrs[t], n, coef), view(g_addrs[t], n, coef),
                   view(xi_addrs[t], n, coef), gains[0:1], gains[1:2], coef, fresh[t] != 0)


@_jit.cpu_kernel
def nupi_table_parallel_(p_addrs, g_addrs, xi_addrs, sizes, fresh, coef):
    """:func:`nupi_table_`, each tensor split across threads (the ``prange`` loop lives in
    :func:`nupi_parallel_`: arrays made from raw pointers inside a parallel function are dead to
    Numba's parfor pass)."""
    flags = np.zeros(1, dtype=np.int64)
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        flags[0] = fresh[t]
        nupi_parallel_(view(p_addrs[t], n, coef), view(g_addrs[t], n, coef),
                       view(xi_addrs[t], n, coef), coef[0:1], coef[1:2], coef, flags)


@_jit.cpu_kernel
def indexed_nupi_(param, rows, values, xi, mask, ki, kpn, coef, flags):
    """One nuPI step of the sampled rows of ``param`` ``(m, width)``, in place.

    ``values`` ``(k, width)`` are the errors (repeated rows summed first); ``xi`` is
    ``(m, width)``; ``mask`` (bool, ``(m, width)``) marks the entries whose next step is their
    first under the SGD initialisation when ``flags[0]`` is set (it is then cleared on the rows
    stepped; with ``flags[0] == 0`` it is neither read nor written). ``ki`` and ``kpn`` are
    ``(1, 1)`` or ``(m, width)``.
    """
    nu, one_minus_nu, signed_lr, lr_decay, lower = coef[2], coef[3], coef[4], coef[5], coef[6]
    use_mask = flags[0] != 0
    urows, uvalues = _coalesce(rows, values)
    width = param.shape[1]
    si = 0 if ki.size == 1 else 1
    sp = 0 if kpn.size == 1 else 1
    for j in range(urows.size):
        r = urows[j]
        for c in range(width):
            fresh = False
            if use_mask:
                fresh = mask[r, c]
                mask[r, c] = False
            param[r, c], xi[r, c] = _nupi_entry(param[r, c], uvalues[j, c], xi[r, c], fresh,
                                                ki[r * si, c * si], kpn[r * sp, c * sp], nu,
                                                one_minus_nu, signed_lr, lr_decay, lower)


# ----------------------------------------------------------------------------------------------
# Penalty coefficients; coef = (tolerance, factor, increment), flags = (is_ineq, restart)
# ----------------------------------------------------------------------------------------------
@_jit.cpu_kernel
def penalty_update_(value, init, violation, coef, flags):
    """``value`` grown where the violation's measure exceeds the tolerance (and, with restart
    on an inequality, reset to ``init`` where the measure is 0), in place (serial)."""
    tolerance, factor, increment = coef[0], coef[1], coef[2]
    is_ineq = flags[0] != 0
    restart = is_ineq and flags[1] != 0
    if is_ineq:
        for i in range(value.size):
            value[i] = _penalty_update(value[i], init[i], _penalty_measure(violation[i], True),
                                       tolerance, factor, increment, restart)
    else:
        for i in range(value.size):
            value[i] = _penalty_update(value[i], init[i], _penalty_measure(violation[i], False),
                                       tolerance, factor, increment, restart)


@_jit.cpu_kernel(parallel=True)
def penalty_update_parallel_(value, init, violation, coef, flags):
    """:func:`penalty_update_`, threads splitting the array."""
    tolerance, factor, increment = coef[0], coef[1], coef[2]
    is_ineq = flags[0] != 0
    restart = is_ineq and flags[1] != 0
    for i in prange(value.size):
        value[i] = _penalty_update(value[i], init[i], _penalty_measure(violation[i], is_ineq),
                                   tolerance, factor, increment, restart)


@_jit.cpu_kernel
def indexed_penalty_update_(value, init, rows, violation, coef, flags):
    """:func:`penalty_update_` on the sampled entries ``value[rows[j]]`` (``violation[j]``);
    every new value is computed from the coefficients as they were before the call, then
    written (a repeated row keeps its last occurrence's)."""
    tolerance, factor, increment = coef[0], coef[1], coef[2]
    is_ineq = flags[0] != 0
    restart = is_ineq and flags[1] != 0
    new = np.empty(rows.size, dtype=value.dtype)
    for j in range(rows.size):
        r = rows[j]
        new[j] = _penalty_update(value[r], init[r], _penalty_measure(violation[j], is_ineq),
                                 tolerance, factor, increment, restart)
    for j in range(rows.size):
        value[rows[j]] = new[j]
