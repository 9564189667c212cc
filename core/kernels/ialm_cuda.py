"""numba.cuda kernels of iALM's dual step on device arrays (imported on first use).

:func:`dual_step_` is :func:`uniopt.kernels.ialm_cpu.ialm_dual_step_` on the device, in three
launches on one stream and with no host synchronisation:

1. :func:`direction_kernel`: the ``ctol`` filter, the momentum buffer update (when
   ``flags[0]`` is set) and the float64 sum of squares of the direction -- a grid-stride loop
   per thread, a tree in shared memory per block, and ``cuda.atomic.add`` of each block's
   partial sum into ``out[0]`` (zeroed beforehand);
2. :func:`stepsize_kernel` (one thread): :math:`s = \\min(\\beta, \\gamma / \\|d\\|)` (0 for a
   zero direction) from ``out[0]``, written to ``out[1]`` in float64 and to ``coef[5]`` in the
   arrays' dtype (so the update runs in that dtype, as on the CPU);
3. :func:`update_kernel`: :math:`\\lambda \\leftarrow \\operatorname{clamp}(\\lambda + s d, lo,
   hi)`, the direction read from the buffer (momentum) or filtered again from ``c``.

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

import numba
import numpy as np
from numba import cuda, float64

from ..rules import bind
from ..rules import ialm as _ialm

__all__ = [
    "THREADS_PER_BLOCK",
    "MAX_BLOCKS",
    "dual_step_",
    "zero_kernel",
    "direction_kernel",
    "stepsize_kernel",
    "update_kernel",
]

THREADS_PER_BLOCK = 256  # a power of 2 (the shared-memory tree halves it)
MAX_BLOCKS = 1024  # the direction kernel's grid is at most this wide (grid-stride beyond)

_rules = bind(_ialm, wrap=cuda.jit(device=True))
_equality_filter = _rules.equality_filter
_inequality_filter = _rules.inequality_filter
_momentum_direction = _rules.momentum_direction
_dual_stepsize = _rules.dual_stepsize
_dual_update = _rules.dual_update


@cuda.jit(device=True)
def _filtered(c, ctol, is_ineq):
    """The ``ctol`` filter of the group's kind (equality or inequality) of one constraint."""
    if is_ineq:
        return _inequality_filter(c, ctol)
    return _equality_filter(c, ctol)


def _zero_kernel(out):
    if cuda.grid(1) == 0:
        out[0] = 0
        out[1] = 0


def _direction_kernel(c, buffer, coef, flags, out):
    """The direction (filter, momentum buffer update) and ``out[0] += sum(float64(d) ** 2)``."""
    partial = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    momentum, keep, ctol = coef[0], coef[1], coef[4]
    use_momentum, is_ineq = flags[0] != 0, flags[1] != 0
    s = float64(0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < c.size:
        d = _filtered(c[i], ctol, is_ineq)
        if use_momentum:
            d = _momentum_direction(buffer[i], d, momentum, keep)
            buffer[i] = d
        x = float64(d)
        s += x * x
        i += stride
    partial[tid] = s
    cuda.syncthreads()
    width = THREADS_PER_BLOCK // 2
    while width > 0:
        if tid < width:
            partial[tid] += partial[tid + width]
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        cuda.atomic.add(out, 0, partial[0])


def _stepsize_kernel(out, hyper, coef):
    """``out[1] = coef[5] = min(beta, gamma / sqrt(out[0]))`` (0 when ``out[0] == 0``; one thread)."""
    if cuda.grid(1) == 0:
        stepsize = _dual_stepsize(hyper[0], hyper[1], out[0])
        coef[5] = stepsize
        out[1] = stepsize


def _update_kernel(dual, buffer, c, coef, flags):
    """``dual = clamp(dual + coef[5] * d, coef[2], coef[3])``, ``d`` the buffer or filtered ``c``."""
    i = cuda.grid(1)
    if i < dual.size:
        if flags[0] != 0:
            d = buffer[i]
        else:
            d = _filtered(c[i], coef[4], flags[1] != 0)
        dual[i] = _dual_update(dual[i], d, coef[5], coef[2], coef[3])


zero_kernel = cuda.jit(_zero_kernel)
direction_kernel = cuda.jit(_direction_kernel)
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
      stream: the numba stream of the three launches (and of the copies).

    Returns:
      ``out``: a float64 array ``(sq_norm, stepsize)`` of length 2, on the device (a host array
      under the simulator), filled once the stream reaches it: nothing waits for the device;
      ``out.copy_to_host()`` does.

    Example:
      >>> out = dual_step_(dual, buffer, c, coefficients(np.float32, 0.9, 0.0, 0.0, np.inf, 0.0),
      ...                  np.array([1.0, 0.5]), np.array([1, 1]))  # doctest: +SKIP
    """
    staged = [np.zeros(2)]  # out = (sq_norm, stepsize), zeroed by the copy itself
    host_hyper, host_flags = _is_host(hyper), _is_host(flags)
    if host_hyper:
        staged.append(np.asarray(hyper, dtype=np.float64).reshape(-1)[:2])
    if host_flags:  # 0/1 are exact in float64; the kernels only test ``!= 0``
        staged.append(np.asarray(flags, dtype=np.float64).reshape(-1)[:2])
    if len(staged) > 1:
        scratch = _to_device(np.concatenate(staged), stream)
        out = scratch[0:2]
        position = 2
        if host_hyper:
            hyper, position = scratch[position:position + 2], position + 2
        if host_flags:
            flags = scratch[position:position + 2]
    else:  # everything already on the device: zero ``out`` with a launch, not a copy
        out = np.zeros(2) if numba.config.ENABLE_CUDASIM else cuda.device_array(2, np.float64, stream=stream)
        zero_kernel[1, 1, stream](out)
        hyper, flags = _device(hyper), _device(flags)
    coef = _to_device(np.asarray(coef), stream) if _is_host(coef) else _device(coef)
    dual, buffer, c = _device(dual), _device(buffer), _device(c)
    n = dual.size
    if n:
        direction_kernel[min(_blocks(n), MAX_BLOCKS), THREADS_PER_BLOCK, stream](c, buffer, coef, flags, out)
    stepsize_kernel[1, 1, stream](out, hyper, coef)
    if n:
        update_kernel[_blocks(n), THREADS_PER_BLOCK, stream](dual, buffer, c, coef, flags)
    return out
