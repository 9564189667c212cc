"""numba.cuda kernels of iALM's dual step on device arrays (imported on first use).

:func:`dual_step_` is :func:`uniopt.kernels.ialm_cpu.ialm_dual_step_` on the device, in four
launches on one stream and with no host synchronisation:

1. :func:`direction_kernel`: the ``ctol`` filter, the momentum buffer update (when
   ``flags[0]`` is set) and the float64 sum of squares of the direction -- a grid-stride loop
   per thread, a tree in shared memory per block (:mod:`uniopt.kernels._cuda_reduce`), and
   ``cuda.atomic.add`` of each block's partial sum into ``out[0]`` (zeroed beforehand); in
   the same pass, :math:`\\max_i |d_i|` (``cuda.atomic.max`` into ``out[3]``) and the count
   of non-finite :math:`d_i` (``out[5]``);
2. :func:`scaled_kernel`: only where ``out[0]`` is not in ``[SMALL_SQ, inf)`` (it overflowed
   or underflowed; every thread reads ``out[0]`` and returns at once otherwise), the
   overflow-safe :math:`\\sum (d_i/s)^2` into ``out[4]``, :math:`s` =
   :func:`uniopt.rules.ialm.norm_scale` of ``out[3]`` (a power of two: as BLAS ``nrm2``);
3. :func:`stepsize_kernel` (one thread): :math:`s = \\min(\\beta, \\gamma / \\|d\\|)` (0 for a
   zero direction) from ``out[0]`` (or from ``out[3]``, ``out[4]`` by
   :func:`uniopt.rules.ialm.scaled_dual_stepsize`), written to ``out[1]`` in float64 and to
   ``coef[5]`` in the arrays' dtype (so the update runs in that dtype, as on the CPU), the
   norm to ``out[2]``; NaN for a direction that is not finite;
4. :func:`update_kernel`: :math:`\\lambda \\leftarrow \\operatorname{clamp}(\\lambda + s d, lo,
   hi)`, the direction read from the buffer (momentum) or filtered again from ``c``; nothing
   when the step is NaN (a direction that is not finite: ``dual`` unchanged, the momentum
   buffer already updated, as on the CPU).

The arithmetic is :mod:`uniopt.rules.ialm`, bound as device functions.

Memory contract: as the CPU kernel's. ``dual``, ``buffer`` and ``c`` are 1-D device arrays of
one dtype (float32 or float64) and equal length -- a ``DeviceNDArray``, an object with
``__cuda_array_interface__`` such as a CUDA torch tensor (via ``numba.cuda.as_cuda_array``), or
a host array under the simulator; ``buffer`` is only touched when ``flags[0]`` is set and may
then not alias ``c``. ``dual`` and ``buffer`` are updated in place, ``c`` is only read.
``coef`` (the arrays' dtype, :func:`uniopt.kernels.ialm_cpu.coefficients`), ``hyper`` (float64
``(beta, gamma)``) and ``flags`` (integers ``(use_momentum, is_ineq)``) may be device arrays or
host NumPy arrays: host ``hyper`` and ``flags`` travel to the device in one copy together with
the zeroed ``out``, a host ``coef`` in a second one (the step size then lands in that device
copy's ``coef[5]``; a device ``coef`` -- or any ``coef`` under the simulator -- receives it
itself). The order of the atomic additions is not fixed, so ``sq_norm`` may differ from run to
run (and from the CPU kernel's compensated sum) in its last bits.

Tested on numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``) against the CPU kernel; where
libNVVM and NVRTC are available, the tests also compile each kernel to PTX with
:func:`numba.cuda.compile_ptx`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, float64

from ..rules import bind
from ..rules import ialm as _ialm
from ._cuda_reduce import THREADS_PER_BLOCK, block_sum_, block_sum_max_
from ._reduce import SMALL_SQ

__all__ = [
    "THREADS_PER_BLOCK",
    "MAX_BLOCKS",
    "dual_step_",
    "zero_kernel",
    "direction_kernel",
    "scaled_kernel",
    "stepsize_kernel",
    "update_kernel",
]

MAX_BLOCKS = 1024  # the direction kernel's grid is at most this wide (grid-stride beyond)

_rules = bind(_ialm, wrap=cuda.jit(device=True))
_filtered = _rules.filtered
_momentum_direction = _rules.momentum_direction
_dual_stepsize = _rules.dual_stepsize
_scaled_dual_stepsize = _rules.scaled_dual_stepsize
_norm_scale = _rules.norm_scale
_dual_update = _rules.dual_update

#: the length of ``out``: ``(sq_norm, stepsize, norm, max |d|, sum (d/s)**2, non-finite count)``
OUT_SIZE = 6


@cuda.jit(device=True)
def _plain(sq_norm):
    """Whether the plain float64 sum of squares is usable as is (no over/underflow, finite)."""
    return sq_norm >= SMALL_SQ and sq_norm < np.inf


def _zero_kernel(out):
    if cuda.grid(1) == 0:
        for k in range(OUT_SIZE):
            out[k] = 0


def _direction_kernel(c, buffer, coef, flags, out):
    """The direction (filter, momentum buffer update); ``out[0] += sum(float64(d) ** 2)``,
    ``out[3] = max(out[3], max |d|)``, ``out[5] +=`` the count of non-finite ``d``."""
    partial = cuda.shared.array(THREADS_PER_BLOCK, float64)
    largest = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    momentum, keep, ctol = coef[0], coef[1], coef[4]
    use_momentum, is_ineq = flags[0] != 0, flags[1] != 0
    s = float64(0)
    amax = float64(0)
    bad = float64(0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < c.size:
        d = _filtered(c[i], ctol, is_ineq)
        if use_momentum:
            d = _momentum_direction(buffer[i], d, momentum, keep)
            buffer[i] = d
        x = float64(d)
        s += x * x
        a = abs(x)
        if not a < np.inf:
            bad += 1
        elif a > amax:
            amax = a
        i += stride
    partial[tid] = s
    largest[tid] = amax
    block_sum_max_(partial, largest, tid)
    if tid == 0:
        cuda.atomic.add(out, 0, partial[0])
        cuda.atomic.max(out, 3, largest[0])
    if bad != 0:
        cuda.atomic.add(out, 5, bad)


def _scaled_kernel(c, buffer, coef, flags, out):
    """Only when ``out[0]`` over/underflowed: ``out[4] += sum((float64(d) / scale) ** 2)``,
    ``scale = norm_scale(out[3])`` (nothing for a zero or non-finite direction)."""
    if _plain(out[0]) or out[5] != 0 or out[3] == 0:
        return
    partial = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    scale = _norm_scale(out[3], -1021, 1021)
    use_momentum, is_ineq, ctol = flags[0] != 0, flags[1] != 0, coef[4]
    s = float64(0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < c.size:
        if use_momentum:
            d = buffer[i]
        else:
            d = _filtered(c[i], ctol, is_ineq)
        x = float64(d) / scale
        s += x * x
        i += stride
    partial[tid] = s
    block_sum_(partial, tid)
    if tid == 0:
        cuda.atomic.add(out, 4, partial[0])


def _stepsize_kernel(out, hyper, coef):
    """``out[1] = coef[5] = min(beta, gamma / ||d||)`` (0 for a zero direction, NaN for a
    non-finite one; one thread), ``out[2] = ||d||`` (plain, or scaled after an over/underflow)."""
    if cuda.grid(1) == 0:
        sq_norm = out[0]
        if _plain(sq_norm):
            stepsize = _dual_stepsize(hyper[0], hyper[1], sq_norm)
            norm = math.sqrt(sq_norm)
        elif out[5] != 0:
            stepsize = np.nan
            norm = np.nan
            out[0] = np.nan
        else:
            scale = _norm_scale(out[3], -1021, 1021)
            stepsize = _scaled_dual_stepsize(hyper[0], hyper[1], scale, out[4])
            norm = scale * math.sqrt(out[4])
            out[0] = norm * norm
        coef[5] = stepsize
        out[1] = stepsize
        out[2] = norm


def _update_kernel(dual, buffer, c, coef, flags):
    """``dual = clamp(dual + coef[5] * d, coef[2], coef[3])``, ``d`` the buffer or filtered ``c``
    (nothing when ``coef[5]`` is NaN)."""
    i = cuda.grid(1)
    if i < dual.size and coef[5] == coef[5]:
        if flags[0] != 0:
            d = buffer[i]
        else:
            d = _filtered(c[i], coef[4], flags[1] != 0)
        dual[i] = _dual_update(dual[i], d, coef[5], coef[2], coef[3])


zero_kernel = cuda.jit(_zero_kernel)
direction_kernel = cuda.jit(_direction_kernel)
scaled_kernel = cuda.jit(_scaled_kernel)
stepsize_kernel = cuda.jit(_stepsize_kernel)
update_kernel = cuda.jit(_update_kernel)


def _blocks(n: int) -> int:
    return (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK


def _is_host(a) -> bool:
    """Whether ``a`` lives on the host (and must be copied); under the simulator: a NumPy array."""
    if numba.config.ENABLE_CUDASIM:
        return isinstance(a, (np.ndarray, list, tuple))
    return not hasattr(a, "__cuda_array_interface__")


def _device(a):
    """A numba device array for ``a`` (``__cuda_array_interface__`` objects wrapped, no copy)."""
    if numba.config.ENABLE_CUDASIM or isinstance(a, cuda.cudadrv.devicearray.DeviceNDArray):
        return a
    return cuda.as_cuda_array(a, sync=False)


def _to_device(host: np.ndarray, stream):
    """``host`` on the device (itself under the simulator, where kernels run on host memory)."""
    if numba.config.ENABLE_CUDASIM:
        return host
    return cuda.to_device(host, stream=stream)


def dual_step_(dual, buffer, c, coef, hyper, flags, stream=0):
    """One iALM dual update of one group on the device, in place (see the module's contract).

    Args:
      dual: the group's multipliers :math:`\\lambda` (1-D device array, float32 or float64),
        updated in place.
      buffer: the momentum buffer (same dtype and length), updated in place when ``flags[0]``.
      c: the constraint values (same dtype and length), only read.
      coef: ``(momentum, 1 - dampening, lower, upper, ctol or -1, _)`` in the arrays' dtype, as
        :func:`uniopt.kernels.ialm_cpu.coefficients`; the step size is written to ``coef[5]``
        (of the device copy when ``coef`` is a host array on a real device).
      hyper: float64 ``(beta, gamma)``, device or host.
      flags: ``(use_momentum, is_ineq)`` (0/1), device or host.
      stream: the numba stream of the four launches (and of the copies).

    Returns:
      ``out``: a float64 array ``(sq_norm, stepsize, norm, max |d|, sum (d/s)**2, non-finite
      count)`` of length :data:`OUT_SIZE`, on the device (a host array under the simulator),
      filled once the stream reaches it: nothing waits for the device; ``out.copy_to_host()``
      does. ``norm`` is accurate where ``sq_norm`` over/underflows; all three are NaN for a
      direction that is not finite (``dual`` then unchanged).

    Example:
      >>> out = dual_step_(dual, buffer, c, coefficients(np.float32, 0.9, 0.0, 0.0, np.inf, 0.0),
      ...                  np.array([1.0, 0.5]), np.array([1, 1]))  # doctest: +SKIP
    """
    staged = [np.zeros(OUT_SIZE)]  # out, zeroed by the copy itself
    host_hyper, host_flags = _is_host(hyper), _is_host(flags)
    if host_hyper:
        staged.append(np.asarray(hyper, dtype=np.float64).reshape(-1)[:2])
    if host_flags:  # 0/1 are exact in float64; the kernels only test ``!= 0``
        staged.append(np.asarray(flags, dtype=np.float64).reshape(-1)[:2])
    if len(staged) > 1:
        scratch = _to_device(np.concatenate(staged), stream)
        out = scratch[0:OUT_SIZE]
        position = OUT_SIZE
        if host_hyper:
            hyper, position = scratch[position:position + 2], position + 2
        if host_flags:
            flags = scratch[position:position + 2]
    else:  # everything already on the device: zero ``out`` with a launch, not a copy
        out = (np.zeros(OUT_SIZE) if numba.config.ENABLE_CUDASIM
               else cuda.device_array(OUT_SIZE, np.float64, stream=stream))
        zero_kernel[1, 1, stream](out)
        hyper, flags = _device(hyper), _device(flags)
    coef = _to_device(np.asarray(coef), stream) if _is_host(coef) else _device(coef)
    dual, buffer, c = _device(dual), _device(buffer), _device(c)
    n = dual.size
    if n:
        grid = min(_blocks(n), MAX_BLOCKS)
        direction_kernel[grid, THREADS_PER_BLOCK, stream](c, buffer, coef, flags, out)
        scaled_kernel[grid, THREADS_PER_BLOCK, stream](c, buffer, coef, flags, out)
    stepsize_kernel[1, 1, stream](out, hyper, coef)
    if n:
        update_kernel[_blocks(n), THREADS_PER_BLOCK, stream](dual, buffer, c, coef, flags)
    return out
