"""numba.cuda kernels for Polyak step-size SGD on device arrays (imported on first use).

One step, all on the device (no host synchronisation; the loss may stay a device scalar):

1. :func:`sq_norm_accumulate_` once per gradient array: each block sums squares in float64
   (a grid-stride loop per thread, then a tree in shared memory:
   :mod:`uniopt.kernels._cuda_reduce`) and adds its partial sum to a float64 accumulator
   ``acc[0]`` with ``cuda.atomic.add`` (zero it first, :func:`zero_`);
2. :func:`stepsize_` (one thread): the step size from ``value[0]``, ``acc[0]`` and the
   hyper-parameters, with the rule's device functions, written to ``coef[0]`` in the
   parameters' dtype;
3. :func:`sgd_` or :func:`heavy_ball_` once per parameter array, reading ``coef``.

Memory contract: ``p``, ``g`` and ``velocity`` are 1-D device arrays of one dtype (float32 or
float64) and equal length -- a ``DeviceNDArray``, an object with ``__cuda_array_interface__``
such as a CUDA torch tensor via ``numba.cuda.as_cuda_array``, or a host array under the
simulator. ``p`` and ``velocity`` are updated in place; ``g`` is only read. ``acc`` is a float64
device array of length >= 1; ``coef`` a device array of the parameters' dtype holding
``(stepsize, momentum)`` (``stepsize_`` writes ``coef[0]``; the host sets ``coef[1]``);
``hyper`` a float64 device array from :func:`hyper_array`. The order of the atomic additions
is not fixed, so the norm may differ from run to run in its last bits.

Tested on numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``) against the CPU kernels; where
libNVVM and NVRTC are available, the tests also compile each kernel to PTX with
:func:`numba.cuda.compile_ptx`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float64

from ..rules import bind
from ..rules import polyak as _polyak
from ._cuda_reduce import THREADS_PER_BLOCK, block_sum_

__all__ = [
    "THREADS_PER_BLOCK",
    "MAX_BLOCKS",
    "VARIANT_CODES",
    "hyper_array",
    "zero_",
    "sq_norm_accumulate_",
    "sq_norm",
    "stepsize_",
    "sgd_",
    "heavy_ball_",
    "sq_norm_kernel",
    "stepsize_kernel",
    "sgd_kernel",
    "heavy_ball_kernel",
]

MAX_BLOCKS = 1024  # the reduction's grid is at most this wide (grid-stride beyond)
VARIANT_CODES = {"SPS_max": 0, "SPS+": 1}

_rules = bind(_polyak, wrap=cuda.jit(device=True))
_polyak_stepsize = _rules.polyak_stepsize
_sgd_update = _rules.sgd_update
_heavy_ball_update = _rules.heavy_ball_update


def _zero_kernel(acc):
    if cuda.grid(1) == 0:
        acc[0] = 0


def _sq_norm_kernel(g, acc):
    partial = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    s = float64(0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < g.size:
        x = float64(g[i])
        s += x * x
        i += stride
    partial[tid] = s
    block_sum_(partial, tid)
    if tid == 0:
        cuda.atomic.add(acc, 0, partial[0])


def _stepsize_kernel(value, acc, hyper, coef):
    """``coef[0] = stepsize`` (one thread); ``hyper = (variant, fun_min, delta, max_stepsize, tiny)``."""
    if cuda.grid(1) == 0:
        coef[0] = _polyak_stepsize(float64(value[0]), hyper[1], acc[0], hyper[2], hyper[3],
                                   hyper[4], hyper[0] != 0)


def _sgd_kernel(p, g, coef):
    i = cuda.grid(1)
    if i < p.size:
        p[i] = _sgd_update(p[i], g[i], coef[0])


def _heavy_ball_kernel(p, g, velocity, coef):
    i = cuda.grid(1)
    if i < p.size:
        p[i], velocity[i] = _heavy_ball_update(p[i], g[i], velocity[i], coef[0], coef[1])


zero_kernel = cuda.jit(_zero_kernel)
sq_norm_kernel = cuda.jit(_sq_norm_kernel)
stepsize_kernel = cuda.jit(_stepsize_kernel)
sgd_kernel = cuda.jit(_sgd_kernel)
heavy_ball_kernel = cuda.jit(_heavy_ball_kernel)


def hyper_array(variant: str, fun_min: float, delta: float, max_stepsize: float,
                dtype) -> np.ndarray:
    """The host-side float64 ``hyper`` array of :func:`stepsize_` (copy it to the device).

    ``tiny`` (used by ``"SPS+"``) is the machine epsilon of the parameters' ``dtype``.

    Raises:
      ValueError: an unknown ``variant``.
    """
    _polyak.is_plus(variant)  # validates the name
    return np.array([VARIANT_CODES[variant], fun_min, delta, max_stepsize,
                     np.finfo(dtype).eps], dtype=np.float64)


def _blocks(n: int) -> int:
    return (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK


def zero_(acc, stream=0) -> None:
    """``acc[0] = 0`` on the device."""
    zero_kernel[1, 1, stream](acc)


def sq_norm_accumulate_(g, acc, stream=0) -> None:
    """``acc[0] += sum(float64(g) ** 2)`` (one launch; nothing for an empty ``g``)."""
    n = g.size
    if n == 0:
        return
    sq_norm_kernel[min(_blocks(n), MAX_BLOCKS), THREADS_PER_BLOCK, stream](g, acc)


def sq_norm(arrays, stream=0) -> float:
    """The float64 sum of squares of every array of ``arrays`` (copies one number to the host)."""
    acc = cuda.to_device(np.zeros(1, dtype=np.float64), stream=stream)
    for g in arrays:
        sq_norm_accumulate_(g, acc, stream)
    return float(acc.copy_to_host(stream=stream)[0])


def stepsize_(value, acc, hyper, coef, stream=0) -> None:
    """``coef[0]`` = the step size of ``value[0]`` (any float dtype) and ``acc[0]`` = ||g||^2."""
    stepsize_kernel[1, 1, stream](value, acc, hyper, coef)


def sgd_(p, g, coef, stream=0) -> None:
    """``p -= coef[0] * g`` on the device."""
    n = p.size
    if n:
        sgd_kernel[_blocks(n), THREADS_PER_BLOCK, stream](p, g, coef)


def heavy_ball_(p, g, velocity, coef, stream=0) -> None:
    """``velocity = coef[1] * velocity - coef[0] * g; p += velocity`` on the device."""
    n = p.size
    if n:
        heavy_ball_kernel[_blocks(n), THREADS_PER_BLOCK, stream](p, g, velocity, coef)
