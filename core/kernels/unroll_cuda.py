"""numba.cuda kernels for differentiable unrolling: out-of-place QH steps and their VJPs.

The device counterpart of :mod:`uniopt.kernels.unroll_cpu` (imported on first use).

Memory contract: every array is a 1-D device array (anything numba.cuda accepts: a
``DeviceNDArray``, an object with ``__cuda_array_interface__`` such as a CUDA torch tensor via
``numba.cuda.as_cuda_array``, or a host array under the simulator), all of one dtype and one
length. Inputs are only read; the ``*_out`` arrays are written (an output may be an input:
each element is read before it is written, at its own index only). The coefficients are
passed as scalars of the arrays' dtype (no float64 promotion inside float32 kernels): the 8 of
:class:`uniopt.rules.qh.QHMCoefficients` for SGD and QHM, the 13 of
:func:`uniopt.rules.qh.qhadam_coefficients` for QHAdam.

Tested on numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``); where libNVVM and NVRTC are
available, the tests also compile each kernel to PTX with :func:`numba.cuda.compile_ptx`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..rules import bind
from ..rules import qh as _qh
from ..rules import qh_vjp as _qh_vjp

__all__ = ["sgd_forward", "sgd_vjp", "qhm_forward", "qhm_vjp", "qhadam_forward", "qhadam_vjp",
           "THREADS_PER_BLOCK"]

THREADS_PER_BLOCK = 256

_rules = bind(_qh, wrap=cuda.jit(device=True))
_vjps = bind(_qh_vjp, wrap=cuda.jit(device=True))
_qhm_update = _rules.qhm_update
_qhadam_update = _rules.qhadam_update
_sgd_update = _vjps.sgd_update
_sgd_vjp = _vjps.sgd_vjp
_qhm_vjp = _vjps.qhm_vjp
_qhadam_vjp = _vjps.qhadam_vjp


# The kernels take all 8 QHM coefficients (SGD too) so that one launcher serves every rule.
def _sgd_forward_kernel(p, g, p_out, grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu,
                        one_minus_nu, lr):
    i = cuda.grid(1)
    if i < p.size:
        p_out[i] = _sgd_update(p[i], g[i], grad_sign, wd_grad, p_scale, lr)


def _sgd_vjp_kernel(ct_p_new, ct_p_out, ct_g_out, grad_sign, wd_grad, p_scale, beta,
                    one_minus_beta, nu, one_minus_nu, lr):
    i = cuda.grid(1)
    if i < ct_p_new.size:
        ct_p_out[i], ct_g_out[i] = _sgd_vjp(ct_p_new[i], grad_sign, wd_grad, p_scale, lr)


def _qhm_forward_kernel(p, g, buf, p_out, buf_out, grad_sign, wd_grad, p_scale, beta,
                        one_minus_beta, nu, one_minus_nu, lr):
    i = cuda.grid(1)
    if i < p.size:
        p_out[i], buf_out[i] = _qhm_update(p[i], g[i], buf[i], grad_sign, wd_grad, p_scale, beta,
                                           one_minus_beta, nu, one_minus_nu, lr)


def _qhm_vjp_kernel(ct_p_new, ct_buf_new, ct_p_out, ct_g_out, ct_buf_out, grad_sign, wd_grad,
                    p_scale, beta, one_minus_beta, nu, one_minus_nu, lr):
    i = cuda.grid(1)
    if i < ct_p_new.size:
        ct_p_out[i], ct_g_out[i], ct_buf_out[i] = _qhm_vjp(
            ct_p_new[i], ct_buf_new[i], grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu,
            one_minus_nu, lr)


def _qhadam_forward_kernel(p, g, m, v, p_out, m_out, v_out, grad_sign, wd_grad, p_scale, a1,
                           one_minus_a1, a2, one_minus_a2, nu1, one_minus_nu1, nu2, one_minus_nu2,
                           eps, lr):
    i = cuda.grid(1)
    if i < p.size:
        p_out[i], m_out[i], v_out[i] = _qhadam_update(
            p[i], g[i], m[i], v[i], grad_sign, wd_grad, p_scale, a1, one_minus_a1, a2,
            one_minus_a2, nu1, one_minus_nu1, nu2, one_minus_nu2, eps, lr)


def _qhadam_vjp_kernel(p, g, m, v, ct_p_new, ct_m_new, ct_v_new, ct_p_out, ct_g_out, ct_m_out,
                       ct_v_out, grad_sign, wd_grad, p_scale, a1, one_minus_a1, a2, one_minus_a2,
                       nu1, one_minus_nu1, nu2, one_minus_nu2, eps, lr):
    i = cuda.grid(1)
    if i < p.size:
        ct_p_out[i], ct_g_out[i], ct_m_out[i], ct_v_out[i] = _qhadam_vjp(
            p[i], g[i], m[i], v[i], ct_p_new[i], ct_m_new[i], ct_v_new[i], grad_sign, wd_grad,
            p_scale, a1, one_minus_a1, a2, one_minus_a2, nu1, one_minus_nu1, nu2, one_minus_nu2,
            eps, lr)


sgd_forward_kernel = cuda.jit(_sgd_forward_kernel)
sgd_vjp_kernel = cuda.jit(_sgd_vjp_kernel)
qhm_forward_kernel = cuda.jit(_qhm_forward_kernel)
qhm_vjp_kernel = cuda.jit(_qhm_vjp_kernel)
qhadam_forward_kernel = cuda.jit(_qhadam_forward_kernel)
qhadam_vjp_kernel = cuda.jit(_qhadam_vjp_kernel)


def _launch(kernel, arrays, coefficients, stream):
    n = arrays[0].size
    if n == 0:
        return
    dtype = np.dtype(arrays[0].dtype)
    blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    scalars = [dtype.type(c) for c in coefficients]
    kernel[blocks, THREADS_PER_BLOCK, stream](*arrays, *scalars)


def sgd_forward(p, g, p_out, coefficients, stream=0):
    """``p_out`` = one SGD step of ``p`` (coefficients: :class:`uniopt.rules.qh.QHMCoefficients`)."""
    _launch(sgd_forward_kernel, (p, g, p_out), coefficients, stream)


def sgd_vjp(ct_p_new, ct_p_out, ct_g_out, coefficients, stream=0):
    """Cotangents of ``(p, g)`` of an SGD step from that of the new parameter."""
    _launch(sgd_vjp_kernel, (ct_p_new, ct_p_out, ct_g_out), coefficients, stream)


def qhm_forward(p, g, buf, p_out, buf_out, coefficients, stream=0):
    """``(p_out, buf_out)`` = one QHM step (coefficients: ``QHMCoefficients``)."""
    _launch(qhm_forward_kernel, (p, g, buf, p_out, buf_out), coefficients, stream)


def qhm_vjp(ct_p_new, ct_buf_new, ct_p_out, ct_g_out, ct_buf_out, coefficients, stream=0):
    """Cotangents of ``(p, g, buf)`` of a QHM step from those of its outputs."""
    _launch(qhm_vjp_kernel, (ct_p_new, ct_buf_new, ct_p_out, ct_g_out, ct_buf_out), coefficients,
            stream)


def qhadam_forward(p, g, m, v, p_out, m_out, v_out, coefficients, stream=0):
    """``(p_out, m_out, v_out)`` = one QHAdam step (coefficients: ``qh.qhadam_coefficients``)."""
    _launch(qhadam_forward_kernel, (p, g, m, v, p_out, m_out, v_out), coefficients, stream)


def qhadam_vjp(p, g, m, v, ct_p_new, ct_m_new, ct_v_new, ct_p_out, ct_g_out, ct_m_out, ct_v_out,
               coefficients, stream=0):
    """Cotangents of ``(p, g, m, v)`` of a QHAdam step from its inputs and outputs' cotangents."""
    _launch(qhadam_vjp_kernel, (p, g, m, v, ct_p_new, ct_m_new, ct_v_new, ct_p_out, ct_g_out,
                                ct_m_out, ct_v_out), coefficients, stream)
