"""XLA FFI handler (``numba.cfunc``) running the optax Polyak step inside ``jax.jit``, fused.

One call takes a whole Polyak step of :func:`uniopt.adapters.jax.polyak_sgd` (``chain(
scale_by_polyak, scale_by_learning_rate(scaling))`` followed by ``optax.apply_updates``) for
every leaf of a pytree of one dtype (float32 or float64), in two passes over memory:

1. the squared norm of all gradients, :math:`s = \\sum_t \\|g_t\\|^2`, in float64 by
   :func:`uniopt.kernels.polyak_cpu.sq_norm_table` (the same blocked summation order as the
   NumPy and torch faces: a float64 result equals theirs bit for bit);
2. the step size from :mod:`uniopt.rules.polyak` in float64 (``polyak_stepsize`` then, as
   the optax face does, ``zero_below``), cast to the leaves' dtype;
3. the update of every leaf, with the optax face's arithmetic and rounding (no fused
   multiply-add): without velocity ``u = 0 - gamma * (-g)``; with velocity
   ``v <- mu * v - gamma * (-g)``, ``u = v``; then ``p <- p + (-scaling) * u``.

With ``scaling = 1`` the parameters equal the NumPy core's ``p - gamma g`` (heavy ball:
``v_core = -v``, ``p + v_core``) bit for bit in float64.

Call frame contract (checked by the adapter before it emits a call; see :mod:`.ffi`):

* argument 0: the step's :data:`POLYAK_SCALARS` scalars, float32 or float64 (the leaves'
  dtype, or float64), read as float64: ``value`` (the loss), ``f_min``, ``eps`` (added to the
  denominator), ``max_learning_rate``, ``-scaling`` (the learning rate's value this step, sign
  flipped as optax does), ``momentum``, ``tiny`` (SPS+'s zero guard), ``is_plus`` (nonzero:
  SPS+, else SPS_max), ``guard`` (``>= 0``: the step is 0 where ``0 <= s + eps <= guard``,
  optax's zero guard :func:`uniopt.rules.polyak.zero_below`; negative: no such guard);
* then, for ``L`` leaves of one dtype: the ``L`` gradients, the ``L`` parameters and, with
  velocity (heavy ball), the ``L`` velocity buffers (the optax face's sign: the last direction
  ``mu v + gamma g``);
* results: the ``L`` parameters, the ``L`` velocities (with velocity), both aliasing their
  arguments (``input_output_aliases``: the handler reads and writes them in the result
  buffers), then one array of 2 in argument 0's dtype: ``(gamma, s)``, the step size (float64,
  cast) and the squared norm.

So a frame has ``1 + 2L`` arguments and ``L + 1`` results (no velocity) or ``1 + 3L`` and
``2L + 1`` (velocity): the two never coincide for ``L > 0``. A frame of another shape (counts,
an argument 0 of another size or dtype, a leaf dtype other than float32/float64, leaves of two
dtypes, a gradient whose size is not its parameter's) leaves every buffer untouched.

Memory: a step reads ``g`` twice and reads and writes ``p`` (16 bytes per float32 parameter),
and ``v`` (24 with velocity). The handler is compiled by :func:`polyak_apply_handler` on first
use and cached on disk as the QH handlers are (:func:`uniopt.kernels.qh_ffi._compile`).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba.core.ccallback import CFunc

from .. import _jit
from ..rules import bind
from ..rules import polyak as _polyak
from . import ffi
from ._pointers import view
from .polyak_cpu import sq_norm_table
from .qh_ffi import _compile

__all__ = ["POLYAK_SCALARS", "VALUE", "F_MIN", "EPS", "MAX_LEARNING_RATE", "NEG_SCALING",
           "MOMENTUM", "TINY", "IS_PLUS", "GUARD", "polyak_apply_handler"]

#: positions in argument 0
VALUE, F_MIN, EPS, MAX_LEARNING_RATE, NEG_SCALING, MOMENTUM, TINY, IS_PLUS, GUARD = range(9)
POLYAK_SCALARS = 9

_F32 = np.zeros(1, np.float32)  # dtype witnesses for view()
_F64 = np.zeros(1, np.float64)
_rules = bind(_polyak, wrap=_jit.elementwise)
_polyak_stepsize = _rules.polyak_stepsize
_zero_below = _rules.zero_below
_sgd_update = _rules.sgd_update
_heavy_ball_update = _rules.heavy_ball_update


@numba.njit(**_jit.CPU_OPTIONS)
def polyak_apply_leaf_(p, g, c):
    """``p <- p + neg_s * (0 - gamma * (-g))`` for one leaf; ``c = (gamma, neg_s, 0, 0)``."""
    step, neg_s, zero = c[0], c[1], c[2]
    for i in range(p.size):
        p[i] = p[i] + neg_s * _sgd_update(zero, -g[i], step)


@numba.njit(**_jit.CPU_OPTIONS)
def polyak_heavy_ball_apply_leaf_(p, g, v, c):
    """``v <- mu v - gamma (-g)``, ``p <- p + neg_s v`` for one leaf; ``c = (gamma, neg_s, 0,
    mu)``."""
    step, neg_s, zero, mu = c[0], c[1], c[2], c[3]
    for i in range(p.size):
        _, v[i] = _heavy_ball_update(zero, -g[i], v[i], step, mu)
        p[i] = p[i] + neg_s * v[i]


@numba.njit(inline="always")
def _stepsize(h, sq_norm):
    """The optax face's step size in float64 from the scalars ``h`` (float64) and ``s``."""
    step = _polyak_stepsize(h[VALUE], h[F_MIN], sq_norm, h[EPS], h[MAX_LEARNING_RATE],
                            h[TINY], h[IS_PLUS] != 0)
    if h[GUARD] >= 0:
        step = _zero_below(step, sq_norm + h[EPS], h[GUARD])
    return step


@numba.njit(inline="always")
def _gradient_table(frame, n_leaves):
    """The gradients' addresses and sizes (the table of :func:`polyak_cpu.sq_norm_table`)."""
    g_addrs = np.empty(n_leaves, np.int64)
    sizes = np.empty(n_leaves, np.int64)
    for t in range(n_leaves):
        buffer = ffi.arg_buffer(frame, 1 + t)
        g_addrs[t] = ffi.buffer_data(buffer)
        sizes[t] = ffi.buffer_size(buffer)
    return g_addrs, sizes


@numba.njit(inline="always")
def _apply(frame, h, g_addrs, sizes, n_leaves, velocity, like):
    """Norm, step size, then every leaf's update (``like``: the leaves' dtype).

    Returns ``(gamma, s)`` in float64, ``gamma`` as used (rounded to the leaves' dtype).
    """
    sq_norm = sq_norm_table(g_addrs, sizes, like)
    step = _stepsize(h, sq_norm)
    c = np.zeros(4, like.dtype)
    c[0] = step
    c[1] = h[NEG_SCALING]
    c[3] = h[MOMENTUM]
    for t in range(n_leaves):
        n = sizes[t]
        g = view(g_addrs[t], n, like)
        p = ffi.ret_array(frame, like, t)  # (the layout check: n elements, as g)
        if velocity:
            v = ffi.ret_array(frame, like, n_leaves + t)
            polyak_heavy_ball_apply_leaf_(p, g, v, c)
        else:
            polyak_apply_leaf_(p, g, c)
    return np.float64(c[0]), sq_norm


@numba.njit(inline="always")
def _polyak_run(frame):
    """A fused Polyak frame (not the metadata query): check the whole layout, then step."""
    n_args, n_rets = ffi.n_args(frame), ffi.n_rets(frame)
    if n_rets < 1:
        return
    if n_args == 2 * n_rets - 1:
        velocity, n_leaves = False, n_rets - 1
    elif n_rets % 2 == 1 and n_args == 1 + 3 * ((n_rets - 1) // 2):
        velocity, n_leaves = True, (n_rets - 1) // 2
    else:
        return
    hyper_buffer = ffi.arg_buffer(frame, 0)
    if ffi.buffer_size(hyper_buffer) != POLYAK_SCALARS:
        return
    hyper_type = ffi.buffer_dtype(hyper_buffer)
    if hyper_type != ffi.F32 and hyper_type != ffi.F64:
        return
    out = ffi.ret_buffer(frame, n_rets - 1)
    if ffi.buffer_size(out) != 2 or ffi.buffer_dtype(out) != hyper_type:
        return
    leaf_type = ffi.F64
    if n_leaves > 0:
        leaf_type = ffi.buffer_dtype(ffi.arg_buffer(frame, 1))
        if leaf_type != ffi.F32 and leaf_type != ffi.F64:
            return
    states = 2 if velocity else 1
    for t in range(n_leaves):
        g = ffi.arg_buffer(frame, 1 + t)
        n = ffi.buffer_size(g)
        if ffi.buffer_dtype(g) != leaf_type:
            return
        for k in range(states):  # parameters (and velocities): arguments and results
            for buffer in (ffi.arg_buffer(frame, 1 + (1 + k) * n_leaves + t),
                           ffi.ret_buffer(frame, k * n_leaves + t)):
                if ffi.buffer_dtype(buffer) != leaf_type or ffi.buffer_size(buffer) != n:
                    return
    h = np.empty(POLYAK_SCALARS, np.float64)
    if hyper_type == ffi.F32:
        h[:] = view(ffi.buffer_data(hyper_buffer), POLYAK_SCALARS, _F32)
    else:
        h[:] = view(ffi.buffer_data(hyper_buffer), POLYAK_SCALARS, _F64)
    g_addrs, sizes = _gradient_table(frame, n_leaves)
    if leaf_type == ffi.F32:
        step, sq_norm = _apply(frame, h, g_addrs, sizes, n_leaves, velocity, _F32)
    else:
        step, sq_norm = _apply(frame, h, g_addrs, sizes, n_leaves, velocity, _F64)
    if hyper_type == ffi.F32:
        result32 = view(ffi.buffer_data(out), 2, _F32)
        result32[0] = step
        result32[1] = sq_norm
    else:
        result64 = view(ffi.buffer_data(out), 2, _F64)
        result64[0] = step
        result64[1] = sq_norm


def _polyak_apply_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _polyak_run(frame)
    return 0


@functools.cache
def polyak_apply_handler() -> CFunc:
    """The fused Polyak handler (updates ``p`` and the velocities in place; see the module docs).

    Compiled, or loaded from the on-disk cache, on the first call of a process.
    """
    return _compile(_polyak_apply_frame)
