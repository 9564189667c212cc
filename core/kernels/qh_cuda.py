"""numba.cuda kernels for QHM and QHAdam on device arrays (imported on first use).

Memory contract: ``p``, ``g`` and the state arrays are 1-D device arrays (anything numba.cuda
accepts: a ``DeviceNDArray``, an object with ``__cuda_array_interface__`` such as a CUDA torch
tensor via ``numba.cuda.as_cuda_array``, or a host array under the simulator) of one dtype and
equal length. ``p`` and the state are updated in place; ``g`` is only read. The coefficients
are passed as scalars of the arrays' dtype (no float64 promotion inside float32 kernels).

Tested on numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``); where libNVVM and NVRTC are
available, the tests also compile each kernel to PTX with :func:`numba.cuda.compile_ptx`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..rules import bind
from ..rules import qh as _qh

__all__ = ["qhm_step_", "qhadam_step_", "qhm_kernel", "qhadam_kernel", "THREADS_PER_BLOCK"]

THREADS_PER_BLOCK = 256

_rules = bind(_qh, wrap=cuda.jit(device=True))
_qhm_update = _rules.qhm_update
_qhadam_update = _rules.qhadam_update


def _qhm_kernel(p, g, buf, grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu, one_minus_nu, lr):
    i = cuda.grid(1)
    if i < p.size:
        p[i], buf[i] = _qhm_update(p[i], g[i], buf[i], grad_sign, wd_grad, p_scale, beta,
                                   one_minus_beta, nu, one_minus_nu, lr)


def _qhadam_kernel(p, g, m, v, grad_sign, wd_grad, p_scale, a1, one_minus_a1, a2, one_minus_a2,
                   nu1, one_minus_nu1, nu2, one_minus_nu2, eps, lr):
    i = cuda.grid(1)
    if i < p.size:
        p[i], m[i], v[i] = _qhadam_update(p[i], g[i], m[i], v[i], grad_sign, wd_grad, p_scale,
                                          a1, one_minus_a1, a2, one_minus_a2, nu1, one_minus_nu1,
                                          nu2, one_minus_nu2, eps, lr)


qhm_kernel = cuda.jit(_qhm_kernel)
qhadam_kernel = cuda.jit(_qhadam_kernel)


def _launch(kernel, first, arrays, coefficients, dtype, stream):
    n = first.size
    if n == 0:
        return
    blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    scalars = [dtype.type(c) for c in coefficients]
    kernel[blocks, THREADS_PER_BLOCK, stream](*arrays, *scalars)


def qhm_step_(p, g, buf, coefficients, stream=0):
    """One QHM step on device arrays; ``coefficients`` as :func:`uniopt.rules.qh.qhm_coefficients`."""
    _launch(qhm_kernel, p, (p, g, buf), coefficients, np.dtype(p.dtype), stream)


def qhadam_step_(p, g, exp_avg, exp_avg_sq, coefficients, stream=0):
    """One QHAdam step on device arrays; ``coefficients`` as :func:`uniopt.rules.qh.qhadam_coefficients`."""
    _launch(qhadam_kernel, p, (p, g, exp_avg, exp_avg_sq), coefficients, np.dtype(p.dtype), stream)
