"""Numba CPU kernels for differentiable unrolling: out-of-place QH steps and their VJPs.

Memory contract (every kernel here):

* every array argument is a C-contiguous 1-D array; all arrays of one call have the same
  dtype (float32 or float64) and the same length;
* inputs are only read; the ``*_out`` arrays are written (every element). An output may be
  the very array of an input: each element is read before it is written, and only at its own
  index;
* ``coef`` holds the step's coefficients already cast to the arrays' dtype: the 8 of
  :class:`uniopt.rules.qh.QHMCoefficients` for SGD and QHM (SGD uses ``grad_sign, wd_grad,
  p_scale`` and ``lr``), the 13 of :func:`uniopt.rules.qh.qhadam_coefficients` for QHAdam.

Each kernel exists as a serial and a ``prange`` variant (separate top-level definitions, as the
on-disk cache requires); :func:`forward` and :func:`vjp` pick one. Callers choose the parallel
variant from :data:`uniopt._jit.PARALLEL_MIN_SIZE` (read at call time), as the optimizers do.
"""

from __future__ import annotations

from numba import prange

from .. import _jit
from ..rules import bind
from ..rules import qh as _qh
from ..rules import qh_vjp as _qh_vjp

_rules = bind(_qh, wrap=_jit.elementwise)
_vjps = bind(_qh_vjp, wrap=_jit.elementwise)
_qhm_update = _rules.qhm_update
_qhadam_update = _rules.qhadam_update
_sgd_update = _vjps.sgd_update
_sgd_vjp = _vjps.sgd_vjp
_qhm_vjp = _vjps.qhm_vjp
_qhadam_vjp = _vjps.qhadam_vjp

__all__ = ["forward", "vjp", "RULES"]

RULES = ("sgd", "qhm", "qhadam")


# ----------------------------------------------------------------------------------------------
# SGD
# ----------------------------------------------------------------------------------------------
@_jit.cpu_kernel
def sgd_forward_(p, g, p_out, coef):
    """``p_out = sgd_update(p, g)`` (serial)."""
    grad_sign, wd_grad, p_scale, lr = coef[0], coef[1], coef[2], coef[7]
    for i in range(p.size):
        p_out[i] = _sgd_update(p[i], g[i], grad_sign, wd_grad, p_scale, lr)


@_jit.cpu_kernel(parallel=True)
def sgd_forward_parallel_(p, g, p_out, coef):
    """``p_out = sgd_update(p, g)`` (threads)."""
    grad_sign, wd_grad, p_scale, lr = coef[0], coef[1], coef[2], coef[7]
    for i in prange(p.size):
        p_out[i] = _sgd_update(p[i], g[i], grad_sign, wd_grad, p_scale, lr)


@_jit.cpu_kernel
def sgd_vjp_(ct_p_new, ct_p_out, ct_g_out, coef):
    """Cotangents of ``(p, g)`` from that of the new parameter (serial)."""
    grad_sign, wd_grad, p_scale, lr = coef[0], coef[1], coef[2], coef[7]
    for i in range(ct_p_new.size):
        ct_p_out[i], ct_g_out[i] = _sgd_vjp(ct_p_new[i], grad_sign, wd_grad, p_scale, lr)


@_jit.cpu_kernel(parallel=True)
def sgd_vjp_parallel_(ct_p_new, ct_p_out, ct_g_out, coef):
    """Cotangents of ``(p, g)`` from that of the new parameter (threads)."""
    grad_sign, wd_grad, p_scale, lr = coef[0], coef[1], coef[2], coef[7]
    for i in prange(ct_p_new.size):
        ct_p_out[i], ct_g_out[i] = _sgd_vjp(ct_p_new[i], grad_sign, wd_grad, p_scale, lr)


# ----------------------------------------------------------------------------------------------
# QHM
# ----------------------------------------------------------------------------------------------
@_jit.cpu_kernel
def qhm_forward_(p, g, buf, p_out, buf_out, coef):
    """``(p_out, buf_out) = qhm_update(p, g, buf)`` (serial)."""
    grad_sign, wd_grad, p_scale = coef[0], coef[1], coef[2]
    beta, one_minus_beta, nu, one_minus_nu, lr = coef[3], coef[4], coef[5], coef[6], coef[7]
    for i in range(p.size):
        p_out[i], buf_out[i] = _qhm_update(p[i], g[i], buf[i], grad_sign, wd_grad, p_scale,
                                           beta, one_minus_beta, nu, one_minus_nu, lr)


@_jit.cpu_kernel(parallel=True)
def qhm_forward_parallel_(p, g, buf, p_out, buf_out, coef):
    """``(p_out, buf_out) = qhm_update(p, g, buf)`` (threads)."""
    grad_sign, wd_grad, p_scale = coef[0], coef[1], coef[2]
    beta, one_minus_beta, nu, one_minus_nu, lr = coef[3], coef[4], coef[5], coef[6], coef[7]
    for i in prange(p.size):
        p_out[i], buf_out[i] = _qhm_update(p[i], g[i], buf[i], grad_sign, wd_grad, p_scale,
                                           beta, one_minus_beta, nu, one_minus_nu, lr)


@_jit.cpu_kernel
def qhm_vjp_(ct_p_new, ct_buf_new, ct_p_out, ct_g_out, ct_buf_out, coef):
    """Cotangents of ``(p, g, buf)`` from those of the new parameter and buffer (serial)."""
    grad_sign, wd_grad, p_scale = coef[0], coef[1], coef[2]
    beta, one_minus_beta, nu, one_minus_nu, lr = coef[3], coef[4], coef[5], coef[6], coef[7]
    for i in range(ct_p_new.size):
        ct_p_out[i], ct_g_out[i], ct_buf_out[i] = _qhm_vjp(
            ct_p_new[i], ct_buf_new[i], grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu,
            one_minus_nu, lr)


@_jit.cpu_kernel(parallel=True)
def qhm_vjp_parallel_(ct_p_new, ct_buf_new, ct_p_out, ct_g_out, ct_buf_out, coef):
    """Cotangents of ``(p, g, buf)`` from those of the new parameter and buffer (threads)."""
    grad_sign, wd_grad, p_scale = coef[0], coef[1], coef[2]
    beta, one_minus_beta, nu, one_minus_nu, lr = coef[3], coef[4], coef[5], coef[6], coef[7]
    for i in prange(ct_p_new.size):
        ct_p_out[i], ct_g_out[i], ct_buf_out[i] = _qhm_vjp(
            ct_p_new[i], ct_buf_new[i], grad_sign, wd_grad, p_scale, beta, one_minus_beta, nu,
            one_minus_nu, lr)


# ----------------------------------------------------------------------------------------------
# QHAdam
# ----------------------------------------------------------------------------------------------
@_jit.cpu_kernel
def qhadam_forward_(p, g, m, v, p_out, m_out, v_out, c):
    """``(p_out, m_out, v_out) = qhadam_update(p, g, m, v)`` (serial)."""
    for i in range(p.size):
        p_out[i], m_out[i], v_out[i] = _qhadam_update(
            p[i], g[i], m[i], v[i], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9],
            c[10], c[11], c[12])


@_jit.cpu_kernel(parallel=True)
def qhadam_forward_parallel_(p, g, m, v, p_out, m_out, v_out, c):
    """``(p_out, m_out, v_out) = qhadam_update(p, g, m, v)`` (threads)."""
    for i in prange(p.size):
        p_out[i], m_out[i], v_out[i] = _qhadam_update(
            p[i], g[i], m[i], v[i], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9],
            c[10], c[11], c[12])


@_jit.cpu_kernel
def qhadam_vjp_(p, g, m, v, ct_p_new, ct_m_new, ct_v_new, ct_p_out, ct_g_out, ct_m_out,
                ct_v_out, c):
    """Cotangents of ``(p, g, m, v)`` from the step's inputs and its outputs' cotangents."""
    for i in range(p.size):
        ct_p_out[i], ct_g_out[i], ct_m_out[i], ct_v_out[i] = _qhadam_vjp(
            p[i], g[i], m[i], v[i], ct_p_new[i], ct_m_new[i], ct_v_new[i], c[0], c[1], c[2],
            c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12])


@_jit.cpu_kernel(parallel=True)
def qhadam_vjp_parallel_(p, g, m, v, ct_p_new, ct_m_new, ct_v_new, ct_p_out, ct_g_out, ct_m_out,
                         ct_v_out, c):
    """Cotangents of ``(p, g, m, v)`` (threads)."""
    for i in prange(p.size):
        ct_p_out[i], ct_g_out[i], ct_m_out[i], ct_v_out[i] = _qhadam_vjp(
            p[i], g[i], m[i], v[i], ct_p_new[i], ct_m_new[i], ct_v_new[i], c[0], c[1], c[2],
            c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12])


_FORWARD = {
    ("sgd", False): sgd_forward_, ("sgd", True): sgd_forward_parallel_,
    ("qhm", False): qhm_forward_, ("qhm", True): qhm_forward_parallel_,
    ("qhadam", False): qhadam_forward_, ("qhadam", True): qhadam_forward_parallel_,
}
_VJP = {
    ("sgd", False): sgd_vjp_, ("sgd", True): sgd_vjp_parallel_,
    ("qhm", False): qhm_vjp_, ("qhm", True): qhm_vjp_parallel_,
    ("qhadam", False): qhadam_vjp_, ("qhadam", True): qhadam_vjp_parallel_,
}


def forward(rule: str, parallel: bool):
    """The out-of-place step kernel of ``rule`` (``"sgd"``, ``"qhm"``, ``"qhadam"``)."""
    return _FORWARD[rule, bool(parallel)]


def vjp(rule: str, parallel: bool):
    """The VJP kernel of ``rule`` (``"sgd"``, ``"qhm"``, ``"qhadam"``)."""
    return _VJP[rule, bool(parallel)]
