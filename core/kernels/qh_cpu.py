"""Numba CPU kernels for QHM and QHAdam over a table of tensors.

Memory contract (every kernel here):

* ``*_addrs`` are int64 data addresses of C-contiguous 1-D views of equal dtype; entry ``t`` of
  each table has ``sizes[t]`` elements. Parameters and state are updated in place; gradients
  are only read. A zero gradient address means "no gradient": that tensor is skipped entirely
  (no decay, no state change), as torch optimizers skip params whose ``.grad`` is None.
* ``coef`` (QHM) holds the step's coefficients already cast to the tensors' dtype, in the order
  of :class:`uniopt.rules.qh.QHMCoefficients`; ``hyper`` (QHAdam) holds
  :class:`uniopt.rules.qh.QHAdamHyper` in float64 and ``scratch`` is a work array of the
  tensors' dtype (length >= 13) whose dtype selects the compiled variant.
* QHAdam's running bias-correction weights ``beta1_weight``/``beta2_weight`` (float64, one per
  tensor) are advanced in place for tensors that have a gradient.

Each kernel exists as a serial and a ``prange`` variant (separate top-level definitions, as the
on-disk cache requires).
"""

from __future__ import annotations

from numba import prange

from .. import _jit
from ..rules import bind
from ..rules import qh as _qh
from ._pointers import view

_rules = bind(_qh, wrap=_jit.elementwise)
_qhm_update = _rules.qhm_update
_qhadam_update = _rules.qhadam_update
_qhadam_bias_weights = _rules.qhadam_bias_weights
_qhadam_update_coefficients = _rules.qhadam_update_coefficients


@_jit.cpu_kernel
def qhm_table_(p_addrs, g_addrs, buf_addrs, sizes, coef):
    """QHM step for every tensor of the table (serial)."""
    grad_sign, wd_grad, p_scale = coef[0], coef[1], coef[2]
    beta, one_minus_beta, nu, one_minus_nu, lr = coef[3], coef[4], coef[5], coef[6], coef[7]
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        p = view(p_addrs[t], n, coef)
        g = view(g_addrs[t], n, coef)
        buf = view(buf_addrs[t], n, coef)
        for i in range(n):
            p[i], buf[i] = _qhm_update(p[i], g[i], buf[i], grad_sign, wd_grad, p_scale,
                                       beta, one_minus_beta, nu, one_minus_nu, lr)


@_jit.cpu_kernel(parallel=True)
def qhm_flat_parallel_(p, g, buf, coef):
    """QHM step on one flat array, threads splitting it."""
    grad_sign, wd_grad, p_scale = coef[0], coef[1], coef[2]
    beta, one_minus_beta, nu, one_minus_nu, lr = coef[3], coef[4], coef[5], coef[6], coef[7]
    for i in prange(p.size):
        p[i], buf[i] = _qhm_update(p[i], g[i], buf[i], grad_sign, wd_grad, p_scale,
                                   beta, one_minus_beta, nu, one_minus_nu, lr)


@_jit.cpu_kernel
def qhm_table_parallel_(p_addrs, g_addrs, buf_addrs, sizes, coef):
    """QHM step for every tensor of the table, each tensor split across threads.

    (The ``prange`` loop lives in a separate function taking the arrays as arguments: Numba's
    parfor pass treats arrays made from raw pointers inside the parallel function as dead.)
    """
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        n = sizes[t]
        qhm_flat_parallel_(view(p_addrs[t], n, coef), view(g_addrs[t], n, coef),
                           view(buf_addrs[t], n, coef), coef)


def _qhadam_tensor_coefficients(t, beta1_weight, beta2_weight, hyper, scratch):
    """Advance tensor ``t``'s bias weights; its 13 step coefficients in the kernel dtype."""
    w1, w2, a1, a2 = _qhadam_bias_weights(beta1_weight[t], beta2_weight[t], hyper[3], hyper[4])
    beta1_weight[t] = w1
    beta2_weight[t] = w2
    c = _qhadam_update_coefficients(hyper[0], hyper[1], hyper[2], a1, a2, hyper[5], hyper[6],
                                    hyper[7], hyper[8], hyper[9], hyper[10])
    for k in range(13):  # cast to the kernel dtype
        scratch[k] = c[k]
    return (scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5], scratch[6],
            scratch[7], scratch[8], scratch[9], scratch[10], scratch[11], scratch[12])


_qhadam_tensor_coefficients = _jit.elementwise(_qhadam_tensor_coefficients)


@_jit.cpu_kernel
def qhadam_table_(p_addrs, g_addrs, m_addrs, v_addrs, sizes, beta1_weight, beta2_weight,
                  hyper, scratch):
    """QHAdam step for every tensor of the table (serial)."""
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        c = _qhadam_tensor_coefficients(t, beta1_weight, beta2_weight, hyper, scratch)
        n = sizes[t]
        p = view(p_addrs[t], n, scratch)
        g = view(g_addrs[t], n, scratch)
        m = view(m_addrs[t], n, scratch)
        v = view(v_addrs[t], n, scratch)
        for i in range(n):
            p[i], m[i], v[i] = _qhadam_update(p[i], g[i], m[i], v[i], c[0], c[1], c[2], c[3], c[4],
                                              c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12])


@_jit.cpu_kernel(parallel=True)
def qhadam_flat_parallel_(p, g, m, v, c):
    """QHAdam step on one flat array with coefficients ``c`` (13, kernel dtype), threaded."""
    for i in prange(p.size):
        p[i], m[i], v[i] = _qhadam_update(p[i], g[i], m[i], v[i], c[0], c[1], c[2], c[3], c[4],
                                          c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12])


@_jit.cpu_kernel
def qhadam_table_parallel_(p_addrs, g_addrs, m_addrs, v_addrs, sizes, beta1_weight,
                           beta2_weight, hyper, scratch):
    """QHAdam step for every tensor of the table, each tensor split across threads."""
    for t in range(sizes.size):
        if g_addrs[t] == 0:
            continue
        _qhadam_tensor_coefficients(t, beta1_weight, beta2_weight, hyper, scratch)
        n = sizes[t]
        qhadam_flat_parallel_(view(p_addrs[t], n, scratch), view(g_addrs[t], n, scratch),
                              view(m_addrs[t], n, scratch), view(v_addrs[t], n, scratch), scratch)


def qhm_table(parallel: bool):
    return qhm_table_parallel_ if parallel else qhm_table_


def qhadam_table(parallel: bool):
    return qhadam_table_parallel_ if parallel else qhadam_table_
