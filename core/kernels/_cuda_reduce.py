"""numba.cuda device helpers shared by the reduction kernels (imported on first use).

A block of :data:`THREADS_PER_BLOCK` threads reduces the values its threads wrote to a shared
array by a tree (halving the width each round, a barrier between rounds); the block's result
is then in element 0, for thread 0 to add to a global accumulator with ``cuda.atomic``.
Used by :mod:`uniopt.kernels.ialm_cuda` and :mod:`uniopt.kernels.polyak_cuda`.
"""

from __future__ import annotations

from numba import cuda

__all__ = ["THREADS_PER_BLOCK", "block_sum_", "block_sum_max_"]

THREADS_PER_BLOCK = 256  # a power of 2 (the trees halve it)


@cuda.jit(device=True)
def block_sum_(partial, tid):
    """``partial[0] = sum(partial[:THREADS_PER_BLOCK])`` (every thread of the block calls this
    after writing ``partial[tid]``; the other elements are overwritten)."""
    cuda.syncthreads()
    width = THREADS_PER_BLOCK // 2
    while width > 0:
        if tid < width:
            partial[tid] += partial[tid + width]
        cuda.syncthreads()
        width //= 2


@cuda.jit(device=True)
def block_sum_max_(partial, largest, tid):
    """:func:`block_sum_` of ``partial`` and, in the same rounds, ``largest[0] =
    max(largest[:THREADS_PER_BLOCK])``."""
    cuda.syncthreads()
    width = THREADS_PER_BLOCK // 2
    while width > 0:
        if tid < width:
            partial[tid] += partial[tid + width]
            if largest[tid + width] > largest[tid]:
                largest[tid] = largest[tid + width]
        cuda.syncthreads()
        width //= 2
