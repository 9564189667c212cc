"""Numba CPU kernels for Polyak step-size SGD over a table of tensors.

A Polyak step is a reduction followed by an elementwise update:

1. :func:`sq_norm_table` -- :math:`s = \\sum_t \\|g_t\\|^2` over every tensor of the table,
   returned as a float64;
2. the step size :math:`\\gamma` from ``s`` and the objective value, on the host, with
   :mod:`uniopt.rules.polyak` (one scalar: no kernel needed);
3. :func:`polyak_sgd_table_` (``p -= gamma * g``) or :func:`polyak_heavy_ball_table_`
   (``v = mu * v - gamma * g; p += v``).

Memory contract (every kernel here):

* ``*_addrs`` are int64 data addresses of C-contiguous 1-D views of one dtype (float32 or
  float64); entry ``t`` of each table has ``sizes[t]`` elements. Parameters and velocities are
  updated in place; gradients are only read. A zero gradient address means "no gradient": that
  tensor is skipped entirely (it adds nothing to the norm, its parameter and velocity do not
  change), as torch optimizers skip params whose ``.grad`` is None.
* ``like`` (norm) and ``coef`` (updates) are arrays of the tensors' dtype; their dtype selects
  the compiled variant. ``coef`` holds ``(stepsize,)`` or ``(stepsize, momentum)`` already cast
  to that dtype on the host (no float64 promotion inside float32 kernels).

Precision of the norm: squares are formed in float64 (exact for float32 inputs) and summed in
blocks of ``BLOCK`` elements, each over ``LANES`` interleaved accumulators of at most
``BLOCK // LANES`` terms whose sums are then added pairwise (a fixed order, vectorised by
LLVM without ``fastmath``); the block sums are added with Neumaier's compensated summation,
in block order (the serial kernel reads two blocks ``SPAN`` blocks apart in turn: two memory
streams reach about the read bandwidth of a core, one does not). The relative error is a few
float64 ulps whatever the number of elements (about 1e-15 on 1e7
float32 values, against :func:`math.fsum`). The parallel variant computes the same block sums
in parallel and adds them in the same order, so it returns bit-identical results.

Each kernel exists as a serial and a ``prange`` variant (separate top-level definitions, as the
on-disk cache requires). The ``prange`` loops live in flat functions taking arrays as arguments:
Numba's parfor pass treats arrays made from raw pointers inside the parallel function as dead.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .. import _jit
from ..rules import bind
from ..rules import polyak as _polyak
from ._pointers import view
from ._reduce import BLOCK, LANES, _block_sq_sum, _neumaier_add

__all__ = [
    "BLOCK",
    "LANES",
    "SPAN",
    "sq_norm_table",
    "sq_norm_table_parallel",
    "polyak_sgd_table_",
    "polyak_sgd_table_parallel_",
    "polyak_heavy_ball_table_",
    "polyak_heavy_ball_table_parallel_",
    "sq_norm_kernel",
    "sgd_kernel",
    "heavy_ball_kernel",
]

SPAN = 256  # the serial norm reads spans of 2 * SPAN blocks as two streams SPAN blocks apart
CHUNKS = 64  # the parallel norm splits each tensor's blocks into at most this many tasks

_rules = bind(_polyak, wrap=_jit.elementwise)
_sgd_update = _rules.sgd_update
_heavy_ball_update = _rules.heavy_ball_update


# ----------------------------------------------------------------------------------------------
# The reduction
# ----------------------------------------------------------------------------------------------


def _span_sq_sums(g, first, stop, sums, buf, buf2):
    """The block sums of blocks ``first..stop-1`` of ``g`` into ``sums[:stop - first]``.

    Two memory streams: the first and the second half of the span are read alternately, a block
    of each in turn (one stream leaves a single core short of the read bandwidth); each block
    sum is :func:`_block_sq_sum`, the same value whatever the order they are computed in.
    """
    n = g.size
    k = stop - first
    half = k // 2
    for i in range(half):
        a = (first + i) * BLOCK  # never the last block: always full
        b = (first + half + i) * BLOCK
        sums[i] = _block_sq_sum(g[a:a + BLOCK], buf)
        sums[half + i] = _block_sq_sum(g[b:min(b + BLOCK, n)], buf2)
    if k % 2:
        a = (stop - 1) * BLOCK
        sums[k - 1] = _block_sq_sum(g[a:min(a + BLOCK, n)], buf)


_span_sq_sums = _jit.elementwise(_span_sq_sums)


@_jit.cpu_kernel
def sq_norm_table(g_addrs, sizes, like):
    """Sum of squares (float64) of every tensor of the table with a gradient (serial).

    ``like`` is any array of the tensors' dtype. Returns 0.0 for an empty table. The block sums
    of each span of ``2 * SPAN`` blocks are computed two streams at a time, then added in
    block order.
    """
    total = np.float64(0)
    compensation = np.float64(0)
    buf = np.empty(LANES, dtype=np.float64)
    buf2 = np.empty(LANES, dtype=np.float64)
    sums = np.empty(2 * SPAN, dtype=np.float64)
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        g = view(g_addrs[t], n, like)
        blocks = (n + BLOCK - 1) // BLOCK
        for first in range(0, blocks, 2 * SPAN):
            stop = min(first + 2 * SPAN, blocks)
            _span_sq_sums(g, first, stop, sums, buf, buf2)
            for i in range(stop - first):
                total, compensation = _neumaier_add(total, compensation, sums[i])
    return total + compensation


@_jit.cpu_kernel(parallel=True)
def sq_block_sums_parallel(g):
    """The block sums of squares of one flat array (float64, one per ``BLOCK``), threaded."""
    n = g.size
    blocks = (n + BLOCK - 1) // BLOCK
    out = np.empty(blocks, dtype=np.float64)
    chunks = min(blocks, CHUNKS)  # one work array per chunk of blocks
    for c in prange(chunks):
        buf = np.empty(LANES, dtype=np.float64)
        for b in range(c * blocks // chunks, (c + 1) * blocks // chunks):
            start = b * BLOCK
            out[b] = _block_sq_sum(g[start:min(start + BLOCK, n)], buf)
    return out


@_jit.cpu_kernel
def sq_norm_table_parallel(g_addrs, sizes, like):
    """:func:`sq_norm_table` with each tensor's blocks summed by threads (same result, bitwise)."""
    total = np.float64(0)
    compensation = np.float64(0)
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        partial = sq_block_sums_parallel(view(g_addrs[t], sizes[t], like))
        for b in range(partial.size):
            total, compensation = _neumaier_add(total, compensation, partial[b])
    return total + compensation


# ----------------------------------------------------------------------------------------------
# The updates
# ----------------------------------------------------------------------------------------------
@_jit.cpu_kernel
def polyak_sgd_table_(p_addrs, g_addrs, sizes, coef):
    """``p -= stepsize * g`` for every tensor of the table (serial); ``coef = (stepsize,)``."""
    stepsize = coef[0]
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        p = view(p_addrs[t], n, coef)
        g = view(g_addrs[t], n, coef)
        for i in range(n):
            p[i] = _sgd_update(p[i], g[i], stepsize)


@_jit.cpu_kernel(parallel=True)
def polyak_sgd_flat_parallel_(p, g, coef):
    """``p -= stepsize * g`` on one flat array, threads splitting it."""
    stepsize = coef[0]
    for i in prange(p.size):
        p[i] = _sgd_update(p[i], g[i], stepsize)


@_jit.cpu_kernel
def polyak_sgd_table_parallel_(p_addrs, g_addrs, sizes, coef):
    """:func:`polyak_sgd_table_`, each tensor split across threads."""
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        polyak_sgd_flat_parallel_(view(p_addrs[t], n, coef), view(g_addrs[t], n, coef), coef)


@_jit.cpu_kernel
def polyak_heavy_ball_table_(p_addrs, g_addrs, v_addrs, sizes, coef):
    """Heavy ball ``v = momentum * v - stepsize * g; p += v`` for every tensor (serial).

    ``coef = (stepsize, momentum)``.
    """
    stepsize, momentum = coef[0], coef[1]
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        p = view(p_addrs[t], n, coef)
        g = view(g_addrs[t], n, coef)
        v = view(v_addrs[t], n, coef)
        for i in range(n):
            p[i], v[i] = _heavy_ball_update(p[i], g[i], v[i], stepsize, momentum)


@_jit.cpu_kernel(parallel=True)
def polyak_heavy_ball_flat_parallel_(p, g, v, coef):
    """Heavy-ball step on one flat array, threads splitting it."""
    stepsize, momentum = coef[0], coef[1]
    for i in prange(p.size):
        p[i], v[i] = _heavy_ball_update(p[i], g[i], v[i], stepsize, momentum)


@_jit.cpu_kernel
def polyak_heavy_ball_table_parallel_(p_addrs, g_addrs, v_addrs, sizes, coef):
    """:func:`polyak_heavy_ball_table_`, each tensor split across threads."""
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        polyak_heavy_ball_flat_parallel_(view(p_addrs[t], n, coef), view(g_addrs[t], n, coef),
                                         view(v_addrs[t], n, coef), coef)


# ----------------------------------------------------------------------------------------------
# Choosing a variant
# ----------------------------------------------------------------------------------------------
def sq_norm_kernel(parallel: bool):
    return sq_norm_table_parallel if parallel else sq_norm_table


def sgd_kernel(parallel: bool):
    return polyak_sgd_table_parallel_ if parallel else polyak_sgd_table_


def heavy_ball_kernel(parallel: bool):
    return polyak_heavy_ball_table_parallel_ if parallel else polyak_heavy_ball_table_
