"""numba.cuda kernels of the dual side of constrained learning (imported on first use).

The kernels of :mod:`uniopt.kernels.constrained_cpu` on the device, one thread per entry, with
the arithmetic of :mod:`uniopt.rules.constrained` bound as device functions:

* :func:`sgd_projected_`: ``param = max(param + signed_lr * grad, lower)``;
* :func:`indexed_sgd_projected_`: the same on sampled rows;
* :func:`nupi_` and :func:`indexed_nupi_`: nuPI's direction, ``xi`` and the (optionally
  projected) parameter update in one pass;
* :func:`penalty_update_` and :func:`indexed_penalty_update_`.

Memory contract: as the CPU kernels' (same argument order and meaning), on 1-D (dense) or 2-D
``(m, width)`` / ``(k, width)`` (indexed) device arrays of one dtype (float32 or float64) --
``DeviceNDArray``, objects with ``__cuda_array_interface__`` (CUDA torch tensors, via
``numba.cuda.as_cuda_array``), or host arrays under the simulator. One difference: the indexed
kernels require **unique** rows (a thread per entry cannot add a repeated row's values in a
fixed order); the faces coalesce first (``torch.Tensor.coalesce()``), and :func:`unique_rows`
checks a host array. ``coef`` (the arrays' dtype), ``flags`` (int64) and the gains may be host
arrays; they are copied to the device on the launch's stream. Each launch is asynchronous:
nothing waits for the device.

Tested on numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``) against the CPU kernels.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ..rules import bind
from ..rules import constrained as _constrained

__all__ = [
    "THREADS_PER_BLOCK",
    "sgd_projected_",
    "indexed_sgd_projected_",
    "nupi_",
    "indexed_nupi_",
    "penalty_update_",
    "indexed_penalty_update_",
    "unique_rows",
]

THREADS_PER_BLOCK = 256

_rules = bind(_constrained, wrap=cuda.jit(device=True))
_sgd_projected = _rules.sgd_projected
_nupi_direction = _rules.nupi_direction
_nupi_average = _rules.nupi_average
_nupi_param = _rules.nupi_param
_penalty_measure = _rules.penalty_measure
_penalty_update = _rules.penalty_update


def _sgd_projected_kernel(param, grad, coef):
    i = cuda.grid(1)
    if i < param.size:
        param[i] = _sgd_projected(param[i], grad[i], coef[0], coef[1])


def _indexed_sgd_projected_kernel(param, rows, values, coef):
    i = cuda.grid(1)
    width = param.shape[1]
    if i < rows.size * width:
        j = i // width
        c = i - j * width
        r = rows[j]
        param[r, c] = _sgd_projected(param[r, c], values[j, c], coef[0], coef[1])


def _nupi_kernel(param, grad, xi, ki, kpn, coef, flags):
    i = cuda.grid(1)
    if i < param.size:
        fresh = flags[0] != 0
        e = grad[i]
        x = xi[i]
        k_i = ki[0] if ki.size == 1 else ki[i]
        k_pn = kpn[0] if kpn.size == 1 else kpn[i]
        direction = _nupi_direction(e, x, fresh, k_i, k_pn)
        param[i] = _nupi_param(param[i], direction, coef[4], coef[5], coef[6])
        xi[i] = _nupi_average(x, e, fresh, coef[2], coef[3])


def _indexed_nupi_kernel(param, rows, values, xi, mask, ki, kpn, coef, flags):
    i = cuda.grid(1)
    width = param.shape[1]
    if i < rows.size * width:
        j = i // width
        c = i - j * width
        r = rows[j]
        fresh = False
        if flags[0] != 0:
            fresh = mask[r, c]
            mask[r, c] = False
        e = values[j, c]
        x = xi[r, c]
        k_i = ki[0, 0] if ki.size == 1 else ki[r, c]
        k_pn = kpn[0, 0] if kpn.size == 1 else kpn[r, c]
        direction = _nupi_direction(e, x, fresh, k_i, k_pn)
        param[r, c] = _nupi_param(param[r, c], direction, coef[4], coef[5], coef[6])
        xi[r, c] = _nupi_average(x, e, fresh, coef[2], coef[3])


def _penalty_kernel(value, init, violation, coef, flags):
    i = cuda.grid(1)
    if i < value.size:
        is_ineq = flags[0] != 0
        restart = is_ineq and flags[1] != 0
        value[i] = _penalty_update(value[i], init[i], _penalty_measure(violation[i], is_ineq),
                                   coef[0], coef[1], coef[2], restart)


def _indexed_penalty_kernel(value, init, rows, violation, coef, flags):
    j = cuda.grid(1)
    if j < rows.size:
        is_ineq = flags[0] != 0
        restart = is_ineq and flags[1] != 0
        r = rows[j]
        value[r] = _penalty_update(value[r], init[r], _penalty_measure(violation[j], is_ineq),
                                   coef[0], coef[1], coef[2], restart)


sgd_projected_kernel = cuda.jit(_sgd_projected_kernel)
indexed_sgd_projected_kernel = cuda.jit(_indexed_sgd_projected_kernel)
nupi_kernel = cuda.jit(_nupi_kernel)
indexed_nupi_kernel = cuda.jit(_indexed_nupi_kernel)
penalty_kernel = cuda.jit(_penalty_kernel)
indexed_penalty_kernel = cuda.jit(_indexed_penalty_kernel)


def _blocks(n: int) -> int:
    return max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


def _arg(a, stream):
    """A device array for ``a``: host arrays are copied (itself under the simulator), objects
    with ``__cuda_array_interface__`` wrapped without a copy."""
    if numba.config.ENABLE_CUDASIM or isinstance(a, cuda.cudadrv.devicearray.DeviceNDArray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a, sync=False)
    return cuda.to_device(np.ascontiguousarray(a), stream=stream)


def unique_rows(rows: np.ndarray) -> bool:
    """Whether a host array of rows has no repeated entry (the indexed kernels' requirement)."""
    rows = np.asarray(rows)
    return rows.size == np.unique(rows).size


def sgd_projected_(param, grad, coef, stream=0):
    """``param = max(param + coef[0] * grad, coef[1])`` in place on the device."""
    n = param.size
    if n:
        sgd_projected_kernel[_blocks(n), THREADS_PER_BLOCK, stream](
            _arg(param, stream), _arg(grad, stream), _arg(coef, stream))


def indexed_sgd_projected_(param, rows, values, coef, stream=0):
    """The projected SGD step on the **unique** sampled ``rows`` of ``param`` ``(m, width)``."""
    n = rows.size * param.shape[1]
    if n:
        indexed_sgd_projected_kernel[_blocks(n), THREADS_PER_BLOCK, stream](
            _arg(param, stream), _arg(rows, stream), _arg(values, stream), _arg(coef, stream))


def nupi_(param, grad, xi, ki, kpn, coef, flags, stream=0):
    """One nuPI step of a flat array on the device (``coef``, gains and ``flags`` as
    :func:`uniopt.kernels.constrained_cpu.nupi_`)."""
    n = param.size
    if n:
        nupi_kernel[_blocks(n), THREADS_PER_BLOCK, stream](
            *(_arg(a, stream) for a in (param, grad, xi, ki, kpn, coef, flags)))


def indexed_nupi_(param, rows, values, xi, mask, ki, kpn, coef, flags, stream=0):
    """One nuPI step of the **unique** sampled ``rows`` (as
    :func:`uniopt.kernels.constrained_cpu.indexed_nupi_`; gains ``(1, 1)`` or ``(m, width)``)."""
    n = rows.size * param.shape[1]
    if n:
        indexed_nupi_kernel[_blocks(n), THREADS_PER_BLOCK, stream](
            *(_arg(a, stream) for a in (param, rows, values, xi, mask, ki, kpn, coef, flags)))


def penalty_update_(value, init, violation, coef, flags, stream=0):
    """The penalty coefficient update, dense, in place on the device."""
    n = value.size
    if n:
        penalty_kernel[_blocks(n), THREADS_PER_BLOCK, stream](
            *(_arg(a, stream) for a in (value, init, violation, coef, flags)))


def indexed_penalty_update_(value, init, rows, violation, coef, flags, stream=0):
    """The penalty coefficient update of the **unique** sampled ``rows``, in place."""
    n = rows.size
    if n:
        indexed_penalty_kernel[_blocks(n), THREADS_PER_BLOCK, stream](
            *(_arg(a, stream) for a in (value, init, rows, violation, coef, flags)))
