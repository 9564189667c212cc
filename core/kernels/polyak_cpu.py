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

Precision of the norm: squares are formed in float64 (exact for float32 inputs) and summed
pairwise in blocks of ``BLOCK`` elements (a fixed tree, vectorised by LLVM without
``fastmath``); the block sums are added with Neumaier's compensated summation. The
relative error is a few float64 ulps whatever the number of elements (about 1e-15 on 1e7
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

__all__ = [
    "BLOCK",
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

BLOCK = 1024  # elements per block sum (a power of 2; the work array fits in L1)
CHUNKS = 64  # the parallel norm splits each tensor's blocks into at most this many tasks

_rules = bind(_polyak, wrap=_jit.elementwise)
_sgd_update = _rules.sgd_update
_heavy_ball_update = _rules.heavy_ball_update


# ----------------------------------------------------------------------------------------------
# The reduction
# ----------------------------------------------------------------------------------------------
def _block_sq_sum(block, buf):
    """Pairwise sum of ``float64(block[i])**2`` (``block.size <= buf.size``, a power of 2).

    The squares go to the float64 work array ``buf`` (zero-padded), which is then halved in
    place until one number is left: a fixed summation tree, written as plain loops over
    non-negative ``range`` indices so that LLVM vectorises every pass without ``fastmath``
    (a scalar reduction loop cannot be vectorised without re-association).
    """
    m = block.size
    for i in range(m):
        x = np.float64(block[i])
        buf[i] = x * x
    for i in range(m, buf.size):
        buf[i] = 0
    width = buf.size // 2
    while width >= 1:
        head = buf[:width]
        rest = buf[width:2 * width]
        for i in range(width):
            head[i] += rest[i]
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
def sq_norm_table(g_addrs, sizes, like):
    """Sum of squares (float64) of every tensor of the table with a gradient (serial).

    ``like`` is any array of the tensors' dtype. Returns 0.0 for an empty table.
    """
    total = np.float64(0)
    compensation = np.float64(0)
    buf = np.empty(BLOCK, dtype=np.float64)
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        g = view(g_addrs[t], n, like)
        for start in range(0, n, BLOCK):
            block_sum = _block_sq_sum(g[start:min(start + BLOCK, n)], buf)
            total, compensation = _neumaier_add(total, compensation, block_sum)
    return total + compensation


@_jit.cpu_kernel(parallel=True)
def sq_block_sums_parallel(g):
    """The block sums of squares of one flat array (float64, one per ``BLOCK``), threaded."""
    n = g.size
    blocks = (n + BLOCK - 1) // BLOCK
    out = np.empty(blocks, dtype=np.float64)
    chunks = min(blocks, CHUNKS)  # one work array per chunk of blocks
    for c in prange(chunks):
        buf = np.empty(BLOCK, dtype=np.float64)
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
