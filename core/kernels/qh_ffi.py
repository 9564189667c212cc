"""XLA FFI handlers (``numba.cfunc``) running QHM and QHAdam's optax recipes inside ``jax.jit``.

One call updates every leaf of a pytree (all of one dtype, float32 or float64) in one pass over
memory, with the arithmetic of :mod:`uniopt.rules.qh`, composed as the optax recipes of
:mod:`uniopt.adapters.jax.qh` compose it: ``[add_decayed_weights,] scale_by_qh*,
[add_decayed_weights,] scale_by_learning_rate``. The result per leaf is optax's update
``u = -lr * (d + lambda_dir * p)`` (``lambda_dir = 0`` unless decay is decoupled), not a new
parameter: ``optax.apply_updates`` adds it, so ``p + u`` equals the NumPy kernels'
``p - lr * d`` bit for bit (float64) whenever decay is not decoupled.

Call frame contract (checked by the adapter before it emits a call; see :mod:`.ffi`):

* argument 0: the step's scalars. QHM (8, in the leaves' dtype, whose XLA dtype selects the
  compiled variant): ``mode, grad_sign, weight_decay, beta, 1 - beta, nu, 1 - nu, -lr``.
  QHAdam (13, float32 or float64, the bias weights' dtype): ``mode, grad_sign, weight_decay,
  beta1, beta2, nu1, 1 - nu1, nu2, 1 - nu2, eps, -lr, beta1_weight, beta2_weight``; the
  handler advances the bias weights and derives the step's coefficients in float64 with
  :mod:`uniopt.rules.qh` (as the NumPy kernels do), then casts them to the leaves' dtype.
  ``mode`` is 0 (no decay: no parameter buffers), 1 (decay added to the gradient) or 2
  (decoupled decay);
* then, for ``L`` leaves of one dtype: the gradients, the parameters (modes 1 and 2 only),
  and the state buffers (QHAdam: ``exp_avg`` then ``exp_avg_sq``; QHM: ``momentum_buffer``);
* results: the ``L`` updates, then the state buffers, which alias the state arguments
  (``input_output_aliases``): the handler reads and writes them in the result buffers.
  QHAdam has one more result: the two new bias weights (argument 0's dtype).

Every buffer is a dense row-major array (XLA's default layout), read as a flat array of its
element count. Gradients and parameters are only read.

The fused variants (:func:`qhadam_apply_handler`, :func:`qhm_apply_handler`; the entry point
:func:`uniopt.adapters.jax.update_and_apply`) also apply the update: ``p <- p + u`` with ``u``
computed as above, in the same pass, so a step reads ``g, p`` and the state and writes ``p`` and
the state (28 bytes per float32 parameter for QHAdam, 20 for QHM) instead of writing ``u`` for
``optax.apply_updates`` to read again. Their frame: argument 0 as above, then the ``L``
gradients, the ``L`` parameters (in every mode) and the state buffers; results: the ``L``
parameters, then the state buffers (QHAdam: then the two bias weights). Parameters and state
alias their arguments: the handler reads and writes them in the result buffers. ``p + u`` is
rounded as ``optax.apply_updates`` rounds it (no fused multiply-add), so the fused step equals
the update-then-apply pair bit for bit.

The packed variants (:func:`qhadam_apply_packed_handler`, :func:`qhm_apply_packed_handler`; the
entry point :func:`uniopt.adapters.jax.flatten`) are the fused step over a state kept as ONE flat
buffer per field (``optax.flatten``'s layout: the leaves' elements concatenated in pytree order)
while gradients and parameters stay separate leaves. Their frame: argument 0 as above, the ``L``
gradients, the ``L`` parameters, then one buffer per state field (QHAdam: ``exp_avg``,
``exp_avg_sq``; QHM: ``momentum_buffer``) holding the sum of the leaves' sizes; results: the
``L`` parameters, the state buffers (QHAdam: then the bias weights). Leaf ``t``'s state is the
slice of each buffer after the elements of leaves ``0..t-1``. The bytes moved are the fused
step's (28 per float32 QHAdam parameter); what the packing saves is XLA's and JAX's fixed cost
per buffer of the jitted call (2 state buffers instead of ``2 L``).

The handlers are compiled by :func:`qhadam_handler` / :func:`qhm_handler` on first use (Numba
compiles a cfunc when it is created) and cached on disk like the other kernels.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import types
from numba.core.ccallback import CFunc

from .. import _jit
from ..rules import bind
from ..rules import qh as _qh
from . import ffi
from ._pointers import view

__all__ = ["qhadam_handler", "qhm_handler", "qhadam_apply_handler", "qhm_apply_handler",
           "qhadam_apply_packed_handler", "qhm_apply_packed_handler",
           "QHADAM_HYPER", "QHM_COEFFICIENTS", "PLAIN", "COUPLED", "DECOUPLED"]

PLAIN, COUPLED, DECOUPLED = 0, 1, 2
QHADAM_COEFFICIENTS = 13
QHADAM_HYPER = 13
QHM_COEFFICIENTS = 8

_F32 = np.zeros(1, np.float32)  # dtype witnesses for view()
_F64 = np.zeros(1, np.float64)
_rules = bind(_qh, wrap=_jit.elementwise)
_effective_gradient = _rules.effective_gradient
_qhm_direction = _rules.qhm_direction
_qhadam_direction = _rules.qhadam_direction
_qhadam_bias_weights = _rules.qhadam_bias_weights
_qhadam_direction_coefficients = _rules.qhadam_direction_coefficients


@numba.njit(inline="always", error_model="numpy")
def _optax_update(direction, p, wd_dir, neg_lr):
    """``-lr * (d + lambda * p)``: optax's ``add_decayed_weights`` then the learning rate."""
    return neg_lr * (direction + wd_dir * p)


@numba.njit(inline="always", error_model="numpy")
def _qhadam_leaf(u, p, g, m, v, c, mode):
    """One leaf of a QHAdam optax step; ``p`` is not read in mode 0 (pass ``g``)."""
    sign, wd, lr = c[1], c[2], c[12]
    a1, oa1, a2, oa2, nu1, onu1, nu2, onu2, eps = c[3], c[4], c[5], c[6], c[7], c[8], c[9], \
        c[10], c[11]
    if mode == PLAIN:
        for i in range(u.size):
            d, m[i], v[i] = _qhadam_direction(g[i], m[i], v[i], a1, oa1, a2, oa2, nu1, onu1,
                                              nu2, onu2, eps)
            u[i] = lr * d
    elif mode == COUPLED:
        for i in range(u.size):
            gi = _effective_gradient(g[i], p[i], sign, wd)
            d, m[i], v[i] = _qhadam_direction(gi, m[i], v[i], a1, oa1, a2, oa2, nu1, onu1,
                                              nu2, onu2, eps)
            u[i] = lr * d
    else:
        for i in range(u.size):
            d, m[i], v[i] = _qhadam_direction(g[i], m[i], v[i], a1, oa1, a2, oa2, nu1, onu1,
                                              nu2, onu2, eps)
            u[i] = _optax_update(d, p[i], wd, lr)


@numba.njit(inline="always", error_model="numpy")
def _qhm_leaf(u, p, g, buf, c, mode):
    """One leaf of a QHM optax step; ``p`` is not read in mode 0 (pass ``g``)."""
    sign, wd, beta, obeta, nu, onu, lr = c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    if mode == PLAIN:
        for i in range(u.size):
            d, buf[i] = _qhm_direction(g[i], buf[i], beta, obeta, nu, onu)
            u[i] = lr * d
    elif mode == COUPLED:
        for i in range(u.size):
            gi = _effective_gradient(g[i], p[i], sign, wd)
            d, buf[i] = _qhm_direction(gi, buf[i], beta, obeta, nu, onu)
            u[i] = lr * d
    else:
        for i in range(u.size):
            d, buf[i] = _qhm_direction(g[i], buf[i], beta, obeta, nu, onu)
            u[i] = _optax_update(d, p[i], wd, lr)


# Two compiled forms each: updates in their own buffer, or over the gradients (the adapter
# aliases them). One array passed twice lets LLVM know the write and the read are the same
# element; two unknown pointers that do overlap would fail its runtime overlap check and run
# the scalar (unvectorised) loop, 3x slower.
@numba.njit(**_jit.CPU_OPTIONS)
def qhadam_leaf_(u, p, g, m, v, c, mode):
    """QHAdam step of one leaf, updates into ``u`` (gradients ``g`` only read)."""
    _qhadam_leaf(u, p, g, m, v, c, mode)


@numba.njit(**_jit.CPU_OPTIONS)
def qhadam_leaf_over_grad_(g, p, m, v, c, mode):
    """QHAdam step of one leaf, updates written over the gradients ``g``."""
    _qhadam_leaf(g, p, g, m, v, c, mode)


@numba.njit(**_jit.CPU_OPTIONS)
def qhm_leaf_(u, p, g, buf, c, mode):
    """QHM step of one leaf, updates into ``u``."""
    _qhm_leaf(u, p, g, buf, c, mode)


@numba.njit(**_jit.CPU_OPTIONS)
def qhm_leaf_over_grad_(g, p, buf, c, mode):
    """QHM step of one leaf, updates written over the gradients ``g``."""
    _qhm_leaf(g, p, g, buf, c, mode)


@numba.njit(inline="always", error_model="numpy")
def _qhadam_apply(p, g, m, v, c, mode):
    """``p += u`` for one leaf of a QHAdam optax step (every mode reads ``p``)."""
    sign, wd, lr = c[1], c[2], c[12]
    a1, oa1, a2, oa2, nu1, onu1, nu2, onu2, eps = c[3], c[4], c[5], c[6], c[7], c[8], c[9], \
        c[10], c[11]
    if mode == PLAIN:
        for i in range(p.size):
            d, m[i], v[i] = _qhadam_direction(g[i], m[i], v[i], a1, oa1, a2, oa2, nu1, onu1,
                                              nu2, onu2, eps)
            p[i] = p[i] + lr * d
    elif mode == COUPLED:
        for i in range(p.size):
            gi = _effective_gradient(g[i], p[i], sign, wd)
            d, m[i], v[i] = _qhadam_direction(gi, m[i], v[i], a1, oa1, a2, oa2, nu1, onu1,
                                              nu2, onu2, eps)
            p[i] = p[i] + lr * d
    else:
        for i in range(p.size):
            d, m[i], v[i] = _qhadam_direction(g[i], m[i], v[i], a1, oa1, a2, oa2, nu1, onu1,
                                              nu2, onu2, eps)
            p[i] = p[i] + _optax_update(d, p[i], wd, lr)


@numba.njit(inline="always", error_model="numpy")
def _qhm_apply(p, g, buf, c, mode):
    """``p += u`` for one leaf of a QHM optax step (every mode reads ``p``)."""
    sign, wd, beta, obeta, nu, onu, lr = c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    if mode == PLAIN:
        for i in range(p.size):
            d, buf[i] = _qhm_direction(g[i], buf[i], beta, obeta, nu, onu)
            p[i] = p[i] + lr * d
    elif mode == COUPLED:
        for i in range(p.size):
            gi = _effective_gradient(g[i], p[i], sign, wd)
            d, buf[i] = _qhm_direction(gi, buf[i], beta, obeta, nu, onu)
            p[i] = p[i] + lr * d
    else:
        for i in range(p.size):
            d, buf[i] = _qhm_direction(g[i], buf[i], beta, obeta, nu, onu)
            p[i] = p[i] + _optax_update(d, p[i], wd, lr)


@numba.njit(**_jit.CPU_OPTIONS)
def qhadam_apply_leaf_(p, g, m, v, c, mode):
    """Fused QHAdam step of one leaf: ``p``, ``m``, ``v`` updated in place, ``g`` only read."""
    _qhadam_apply(p, g, m, v, c, mode)


@numba.njit(**_jit.CPU_OPTIONS)
def qhm_apply_leaf_(p, g, buf, c, mode):
    """Fused QHM step of one leaf: ``p``, ``buf`` updated in place, ``g`` only read."""
    _qhm_apply(p, g, buf, c, mode)


@numba.njit(inline="always")
def _qhadam_leaves(frame, c, n_leaves, mode):
    with_p = mode != PLAIN
    for t in range(n_leaves):
        g = ffi.arg_array(frame, c, 1 + t)
        p = ffi.arg_array(frame, c, 1 + n_leaves + t) if with_p else g
        u = ffi.ret_array(frame, c, t)
        m, v = ffi.ret_array(frame, c, n_leaves + t), ffi.ret_array(frame, c, 2 * n_leaves + t)
        if u.ctypes.data == g.ctypes.data:
            qhadam_leaf_over_grad_(u, p if with_p else u, m, v, c, mode)
        else:
            qhadam_leaf_(u, p, g, m, v, c, mode)


@numba.njit(inline="always")
def _qhm_leaves(frame, c, n_leaves):
    mode = int(c[0])
    with_p = mode != PLAIN
    if ffi.n_args(frame) != 1 + n_leaves * (3 if with_p else 2):
        return
    for t in range(n_leaves):
        g = ffi.arg_array(frame, c, 1 + t)
        p = ffi.arg_array(frame, c, 1 + n_leaves + t) if with_p else g
        u, buf = ffi.ret_array(frame, c, t), ffi.ret_array(frame, c, n_leaves + t)
        if u.ctypes.data == g.ctypes.data:
            qhm_leaf_over_grad_(u, p if with_p else u, buf, c, mode)
        else:
            qhm_leaf_(u, p, g, buf, c, mode)


@numba.njit(inline="always")
def _qhadam_apply_leaves(frame, c, n_leaves, mode):
    for t in range(n_leaves):
        g = ffi.arg_array(frame, c, 1 + t)
        p, m = ffi.ret_array(frame, c, t), ffi.ret_array(frame, c, n_leaves + t)
        v = ffi.ret_array(frame, c, 2 * n_leaves + t)
        qhadam_apply_leaf_(p, g, m, v, c, mode)


@numba.njit(inline="always")
def _qhm_apply_leaves(frame, c, n_leaves):
    if ffi.n_args(frame) != 1 + 3 * n_leaves:
        return
    mode = int(c[0])
    for t in range(n_leaves):
        qhm_apply_leaf_(ffi.ret_array(frame, c, t), ffi.arg_array(frame, c, 1 + t),
                        ffi.ret_array(frame, c, n_leaves + t), c, mode)


@numba.njit(inline="always")
def _packed_fields_ok(frame, like, n_leaves, n_fields):
    """Every packed state buffer holds exactly the leaves' elements, and each gradient has
    its parameter's size (else the handler leaves every buffer untouched)."""
    total = 0
    for t in range(n_leaves):
        size = ffi.buffer_size(ffi.ret_buffer(frame, t))
        if ffi.buffer_size(ffi.arg_buffer(frame, 1 + t)) != size:
            return False
        total += size
    for k in range(n_fields):
        if ffi.buffer_size(ffi.ret_buffer(frame, n_leaves + k)) != total:
            return False
    return True


@numba.njit(inline="always")
def _field_slice(frame, like, k, offset, size):
    """Elements ``offset .. offset + size`` of packed result ``k`` (a flat array)."""
    start = ffi.buffer_data(ffi.ret_buffer(frame, k)) + offset * like.itemsize
    return view(start, size, like)


@numba.njit(inline="always")
def _qhadam_packed_leaves(frame, c, n_leaves, mode):
    if not _packed_fields_ok(frame, c, n_leaves, 2):
        return
    offset = 0
    for t in range(n_leaves):
        p = ffi.ret_array(frame, c, t)
        m = _field_slice(frame, c, n_leaves, offset, p.size)
        v = _field_slice(frame, c, n_leaves + 1, offset, p.size)
        qhadam_apply_leaf_(p, ffi.arg_array(frame, c, 1 + t), m, v, c, mode)
        offset += p.size


@numba.njit(inline="always")
def _qhm_packed_leaves(frame, c, n_leaves):
    if ffi.n_args(frame) != 2 + 2 * n_leaves or not _packed_fields_ok(frame, c, n_leaves, 1):
        return
    mode = int(c[0])
    offset = 0
    for t in range(n_leaves):
        p = ffi.ret_array(frame, c, t)
        qhm_apply_leaf_(p, ffi.arg_array(frame, c, 1 + t),
                        _field_slice(frame, c, n_leaves, offset, p.size), c, mode)
        offset += p.size


@numba.njit(inline="always")
def _qhadam_step(h, weights):
    """This step's 13 leaf coefficients (float64) from the hyper-parameters ``h`` (float64).

    Advances the bias weights as the NumPy kernels do (:func:`uniopt.rules.qh.qhadam_bias_weights`
    in float64) and stores them in ``weights``.
    """
    w1, w2, a1, a2 = _qhadam_bias_weights(h[11], h[12], h[3], h[4])
    weights[0] = w1
    weights[1] = w2
    d = _qhadam_direction_coefficients(a1, a2, h[5], h[6], h[7], h[8], h[9])
    c = np.empty(QHADAM_COEFFICIENTS, np.float64)
    c[0], c[1], c[2] = h[0], h[1], h[2]
    for k in range(9):
        c[3 + k] = d[k]
    c[12] = h[10]
    return c


@numba.njit(inline="always")
def _qhadam_dispatch(frame, c, n_leaves, mode, apply, packed):
    if packed:
        _qhadam_packed_leaves(frame, c, n_leaves, mode)
    elif apply:
        _qhadam_apply_leaves(frame, c, n_leaves, mode)
    else:
        _qhadam_leaves(frame, c, n_leaves, mode)


@numba.njit(inline="always")
def _qhadam_run(frame, apply, packed):
    """A QHAdam frame (not the metadata query); ``apply``: the fused variant's layout;
    ``packed``: the fused variant over packed state."""
    n_leaves = ffi.n_rets(frame) - 3 if packed else (ffi.n_rets(frame) - 1) // 3
    hyper_buffer = ffi.arg_buffer(frame, 0)
    if ffi.buffer_size(hyper_buffer) != QHADAM_HYPER:
        return
    hyper_type = ffi.buffer_dtype(hyper_buffer)
    h = np.empty(QHADAM_HYPER, np.float64)
    if hyper_type == ffi.F32:
        h[:] = view(ffi.buffer_data(hyper_buffer), QHADAM_HYPER, _F32)
    elif hyper_type == ffi.F64:
        h[:] = view(ffi.buffer_data(hyper_buffer), QHADAM_HYPER, _F64)
    else:
        return
    mode = int(h[0])
    expected = 3 + 2 * n_leaves if packed else 1 + n_leaves * (4 if apply or mode != PLAIN else 3)
    if n_leaves < 0 or ffi.n_args(frame) != expected:
        return
    weights = np.empty(2, np.float64)
    c = _qhadam_step(h, weights)
    out = ffi.ret_buffer(frame, n_leaves + 2 if packed else 3 * n_leaves)
    if hyper_type == ffi.F32:
        view(ffi.buffer_data(out), 2, _F32)[:] = weights
    else:
        view(ffi.buffer_data(out), 2, _F64)[:] = weights
    if n_leaves == 0:
        return
    leaf_type = ffi.buffer_dtype(ffi.arg_buffer(frame, 1))
    if leaf_type == ffi.F32:
        _qhadam_dispatch(frame, c.astype(np.float32), n_leaves, mode, apply, packed)
    elif leaf_type == ffi.F64:
        _qhadam_dispatch(frame, c, n_leaves, mode, apply, packed)


@numba.njit(inline="always")
def _qhm_run(frame, apply, packed):
    """A QHM frame (not the metadata query); ``apply``: the fused variant's layout;
    ``packed``: the fused variant over packed state."""
    n_leaves = ffi.n_rets(frame) - 1 if packed else ffi.n_rets(frame) // 2
    coef = ffi.arg_buffer(frame, 0)
    dtype = ffi.buffer_dtype(coef)
    if ffi.buffer_size(coef) != QHM_COEFFICIENTS:
        return
    if dtype == ffi.F32:
        c32 = view(ffi.buffer_data(coef), QHM_COEFFICIENTS, _F32)
        if packed:
            _qhm_packed_leaves(frame, c32, n_leaves)
        elif apply:
            _qhm_apply_leaves(frame, c32, n_leaves)
        else:
            _qhm_leaves(frame, c32, n_leaves)
    elif dtype == ffi.F64:
        c64 = view(ffi.buffer_data(coef), QHM_COEFFICIENTS, _F64)
        if packed:
            _qhm_packed_leaves(frame, c64, n_leaves)
        elif apply:
            _qhm_apply_leaves(frame, c64, n_leaves)
        else:
            _qhm_leaves(frame, c64, n_leaves)


def _qhadam_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _qhadam_run(frame, False, False)
    return 0


def _qhadam_apply_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _qhadam_run(frame, True, False)
    return 0


def _qhadam_apply_packed_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _qhadam_run(frame, True, True)
    return 0


def _qhm_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _qhm_run(frame, False, False)
    return 0


def _qhm_apply_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _qhm_run(frame, True, False)
    return 0


def _qhm_apply_packed_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _qhm_run(frame, True, True)
    return 0


_SIGNATURE = types.voidptr(types.voidptr)


def _compile(pyfunc) -> CFunc:
    """Compile ``pyfunc`` as a C callback, loading it from the on-disk cache when it is there."""
    cfunc = CFunc(pyfunc, (_SIGNATURE.args, _SIGNATURE.return_type), locals={},
                  options=dict(_jit.CPU_OPTIONS))
    if _jit.CACHE_ENABLED:
        cfunc._cache = _jit._FingerprintedCache(pyfunc)
    cfunc.compile()
    return cfunc


@functools.cache
def qhadam_handler() -> CFunc:
    """The QHAdam handler (compiled or loaded from the cache on the first call of a process)."""
    return _compile(_qhadam_frame)


@functools.cache
def qhm_handler() -> CFunc:
    """The QHM handler (compiled or loaded from the cache on the first call of a process)."""
    return _compile(_qhm_frame)


@functools.cache
def qhadam_apply_handler() -> CFunc:
    """The fused QHAdam handler (updates ``p``, ``m``, ``v`` in place; see the module docs)."""
    return _compile(_qhadam_apply_frame)


@functools.cache
def qhm_apply_handler() -> CFunc:
    """The fused QHM handler (updates ``p`` and the buffer in place; see the module docs)."""
    return _compile(_qhm_apply_frame)


@functools.cache
def qhadam_apply_packed_handler() -> CFunc:
    """The fused QHAdam handler over packed state (see the module docs)."""
    return _compile(_qhadam_apply_packed_frame)


@functools.cache
def qhm_apply_packed_handler() -> CFunc:
    """The fused QHM handler over packed state (see the module docs)."""
    return _compile(_qhm_apply_packed_frame)
