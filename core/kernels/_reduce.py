"""Reductions shared by the CPU kernels: an exactly ordered float64 sum of squares.

:func:`_block_sq_sum` sums the squares of one block of at most ``BLOCK`` elements in float64
over ``LANES`` interleaved accumulators (vectorised by LLVM without ``fastmath``), and
:func:`_neumaier_add` adds block sums with Neumaier's compensated summation. Together they give
a sum of squares within a few float64 ulps whatever the length (see
:mod:`uniopt.kernels.polyak_cpu`). :func:`all_finite` checks an array for inf/NaN in one pass.
"""

from __future__ import annotations

import numpy as np

from .. import _jit

BLOCK = 1024  # elements per block sum
LANES = 64  # float64 accumulators per block sum (a power of 2 dividing BLOCK)
#: the smallest float64 sum of squares the iALM kernels take as is: below it, squares may have
#: lost bits to underflow (a subnormal square is below 2**-1022; at most 2**40 of them err by
#: under 2**-1074 each, 2**-64 of SMALL_SQ); above it, only an overflow (inf) or a non-finite
#: value (NaN) sends a kernel to its scaled, overflow-safe norm
SMALL_SQ = 2.0 ** -970


def _block_sq_sum(block, buf):
    """Sum of ``float64(block[i])**2`` over one block (``block.size <= BLOCK``), ``buf`` of ``LANES``.

    ``LANES`` independent float64 accumulators in the work array ``buf``: element ``i`` of the
    block goes to lane ``i % LANES`` (at most ``BLOCK // LANES`` terms per lane, added in
    order), then the lanes are halved pairwise down to one number. A fixed summation order,
    written as loops of constant trip count over non-negative indices so that LLVM vectorises
    them without ``fastmath`` (a single scalar accumulator cannot be vectorised without
    re-association, and squaring the whole block into a buffer before a pairwise tree costs a
    store and a reload per element).
    """
    m = block.size
    for j in range(LANES):
        buf[j] = 0
    full = m - m % LANES
    for start in range(0, full, LANES):
        row = block[start:start + LANES]
        for j in range(LANES):
            x = np.float64(row[j])
            buf[j] += x * x
    for j in range(m - full):
        x = np.float64(block[full + j])
        buf[j] += x * x
    width = LANES // 2
    while width >= 1:
        for i in range(width):
            buf[i] += buf[width + i]
        width //= 2
    return buf[0]


def _neumaier_add(total, compensation, x):
    """Neumaier's compensated ``total + x``; returns ``(total, compensation)``."""
    t = total + x
    if abs(total) >= abs(x):
        compensation += (total - t) + x
    else:
        compensation += (x - t) + total
    return t, compensation


_block_sq_sum = _jit.elementwise(_block_sq_sum)
_neumaier_add = _jit.elementwise(_neumaier_add)


@_jit.cpu_kernel
def all_finite(a):
    """Whether every element of the 1-D array ``a`` is finite (no inf, no NaN); one read pass.

    ``x - x`` is 0 for a finite ``x`` and NaN otherwise; it is summed over ``LANES``
    accumulators (a loop LLVM vectorises without ``fastmath``), checked once per block.
    """
    n = a.size
    lanes = np.zeros(LANES, dtype=a.dtype)
    full = n - n % LANES
    for start in range(0, full, LANES):
        row = a[start:start + LANES]
        for j in range(LANES):
            lanes[j] += row[j] - row[j]
        if start % BLOCK == 0:
            for j in range(LANES):
                if lanes[j] != 0:
                    return False
    for j in range(LANES):
        if lanes[j] != 0:
            return False
    for i in range(full, n):
        if a[i] - a[i] != 0:
            return False
    return True
