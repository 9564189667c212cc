"""XLA FFI handler (``numba.cfunc``) running iALM's dual step inside ``jax.jit`` on CPU.

One call steps every constraint group of one dtype (float32 or float64): for each group it
runs the two passes of :func:`uniopt.kernels.ialm_cpu.ialm_dual_step_`, the kernel of the
NumPy core :class:`uniopt.iALM`, with the arguments that core builds
(:func:`uniopt.kernels.ialm_cpu.coefficients`: ``coef`` in the group's dtype, ``hyper`` =
``(beta, gamma)`` in float64, ``flags`` = ``(use_momentum, is_ineq)``), so multipliers,
momentum buffers and step sizes equal the NumPy core's bit for bit, in float32 as in float64,
for the same ``beta``.

Call frame contract (checked by the adapter, :mod:`uniopt.adapters.jax.ialm`, before it emits a
call; see :mod:`.ffi`), for ``G >= 1`` groups of one dtype ``D`` (float32 or float64):

* argument 0, ``settings``: the groups' static settings as float64 numbers, ``SETTINGS`` (8) per
  group, row ``k`` for group ``k``: ``momentum, 1 - dampening, lower, upper, ctol, gamma,
  use_momentum, is_ineq`` (``ctol`` as :func:`~uniopt.kernels.ialm_cpu.coefficients` passes it:
  -1 for no filter; the flags 0 or 1). The bytes travel as an int32 array of ``2 * SETTINGS *
  G`` elements (XLA dtype S32), so float64 settings reach a float32 step even where JAX has no
  float64 arrays (``jax_enable_x64`` off);
* argument 1, ``beta``: the ``G`` step caps of this step, in ``D`` (the JAX state's);
* arguments ``2 .. 2 + G``: the constraint values ``c_k`` (in ``D``: the adapter casts them);
* then the ``G`` multipliers, the ``G`` momentum buffers (one per group, with or without
  momentum: the kernel touches a buffer only with momentum), and ``steps``: ``G + 1`` numbers in
  ``D``, the groups' last step sizes then a 0;
* results: the ``G`` multipliers, the ``G`` buffers and ``steps``, aliasing those arguments
  (``input_output_aliases``): the handler reads and writes them in the result buffers. On
  return ``steps[k]`` is group ``k``'s step size (the kernel's, cast to ``D``) and ``steps[G]``
  is 1 if the step was taken, 0 if it was skipped.

Group ``k``'s ``c``, multipliers and buffer hold the same number of elements (any shape: read as
flat row-major arrays).

The whole-step skip of the JAX face: if the direction of ANY group is not finite (a constraint
value that is not, or a momentum buffer that overflowed), nothing changes in any group
(multipliers, buffers, step sizes) and ``steps[G]`` is 0, as on the traced path. The handler
runs the kernel's read-only first pass (:func:`uniopt.kernels.ialm_cpu.ialm_dual_norm_`: the
direction's norm and step size) for every group, then its writing pass
(:func:`~uniopt.kernels.ialm_cpu.ialm_dual_apply_`) for every group only when no norm was NaN:
no extra read of any group's constraints. Both are the NumPy core's compiled kernels, called,
not inlined (inlining them into the handler doubled its cold compile, 28 s to 63 s). The
counters and the growth of ``beta`` stay in the adapter, from ``steps[G]``.

A frame whose layout the handler does not know (counts, sizes or dtypes) leaves every buffer
untouched: then ``steps[G]`` keeps the 0 it came with, and the adapter counts a skipped step.

The handler is compiled by :func:`ialm_handler` on first use (Numba compiles a cfunc when it
is created) and cached on disk like the other kernels (:func:`uniopt.kernels.qh_ffi._compile`).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba.core.ccallback import CFunc

from . import ffi
from ._pointers import view
from .ialm_cpu import ialm_dual_apply_, ialm_dual_norm_
from .qh_ffi import _compile

__all__ = ["ialm_handler", "SETTINGS", "settings_row"]

#: float64 settings per group (see the module docs for their order)
SETTINGS = 8
_S32 = 4  # XLA_FFI_DataType_S32

_F32 = np.zeros(1, np.float32)  # dtype witnesses for view()
_F64 = np.zeros(1, np.float64)


def settings_row(momentum: float, one_minus_dampening: float, lower: float, upper: float,
                 ctol: float, gamma: float, use_momentum: bool, is_ineq: bool) -> list:
    """One group's row of argument 0 (float64 numbers; ``ctol`` as ``coefficients`` passes it)."""
    return [float(momentum), float(one_minus_dampening), float(lower), float(upper), float(ctol),
            float(gamma), 1.0 if use_momentum else 0.0, 1.0 if is_ineq else 0.0]


@numba.njit(inline="always")
def _layout_ok(frame, groups, dtype):
    """Every buffer of the frame has the dtype and size the contract says."""
    settings = ffi.arg_buffer(frame, 0)
    if ffi.buffer_dtype(settings) != _S32 or ffi.buffer_size(settings) != 2 * SETTINGS * groups:
        return False
    beta = ffi.arg_buffer(frame, 1)
    if ffi.buffer_dtype(beta) != dtype or ffi.buffer_size(beta) != groups:
        return False
    for k in range(groups):
        c = ffi.arg_buffer(frame, 2 + k)
        dual, buffer = ffi.ret_buffer(frame, k), ffi.ret_buffer(frame, groups + k)
        if (ffi.buffer_dtype(c) != dtype or ffi.buffer_dtype(dual) != dtype
                or ffi.buffer_dtype(buffer) != dtype):
            return False
        n = ffi.buffer_size(c)
        if ffi.buffer_size(dual) != n or ffi.buffer_size(buffer) != n:
            return False
    steps = ffi.ret_buffer(frame, 2 * groups)
    return ffi.buffer_dtype(steps) == dtype and ffi.buffer_size(steps) == groups + 1


@numba.njit(inline="always")
def _groups(frame, like, groups):
    """The dual step of every group (layout checked), ``like`` a witness of the groups' dtype:
    every group's read-only pass first, last group first, then, only if every direction is
    finite, every group's writing pass, first group first (so each group's writing pass finds
    in cache what its read-only pass read, unless the groups before it have pushed it out)."""
    settings = view(ffi.buffer_data(ffi.arg_buffer(frame, 0)), SETTINGS * groups, _F64)
    beta = ffi.arg_array(frame, like, 1)
    steps = ffi.ret_array(frame, like, 2 * groups)
    coef = np.empty(6 * groups, like.dtype)
    hyper = np.empty(2, np.float64)
    flags = np.empty(2 * groups, np.int64)
    stepsizes = np.empty(groups, np.float64)
    for k in range(groups - 1, -1, -1):
        row = settings[SETTINGS * k:SETTINGS * (k + 1)]
        for j in range(5):
            coef[6 * k + j] = row[j]
        coef[6 * k + 5] = 0
        hyper[0] = np.float64(beta[k])
        hyper[1] = row[5]
        flags[2 * k] = 1 if row[6] != 0 else 0
        flags[2 * k + 1] = 1 if row[7] != 0 else 0
        stepsizes[k] = ialm_dual_norm_(ffi.ret_array(frame, like, groups + k),
                                       ffi.arg_array(frame, like, 2 + k), coef[6 * k:6 * k + 6],
                                       hyper, flags[2 * k:2 * k + 2])[1]
        if stepsizes[k] != stepsizes[k]:  # NaN: a direction that is not finite
            return  # the whole step is skipped: nothing written, steps[groups] stays 0
    for k in range(groups):
        group_coef = coef[6 * k:6 * k + 6]
        ialm_dual_apply_(ffi.ret_array(frame, like, k), ffi.ret_array(frame, like, groups + k),
                         ffi.arg_array(frame, like, 2 + k), group_coef, flags[2 * k:2 * k + 2],
                         stepsizes[k])
        steps[k] = group_coef[5]
    steps[groups] = 1


@numba.njit(inline="always")
def _run(frame):
    rets = ffi.n_rets(frame)
    groups = (rets - 1) // 2
    if groups < 1 or rets != 2 * groups + 1 or ffi.n_args(frame) != 3 + 3 * groups:
        return
    dtype = ffi.buffer_dtype(ffi.arg_buffer(frame, 1))
    if dtype != ffi.F32 and dtype != ffi.F64:
        return
    if not _layout_ok(frame, groups, dtype):
        return
    if dtype == ffi.F32:
        _groups(frame, _F32, groups)
    else:
        _groups(frame, _F64, groups)


def _ialm_frame(pointer):
    frame = ffi.frame_address(pointer)
    if not ffi.answer_metadata(frame):
        _run(frame)
    return 0


@functools.cache
def ialm_handler() -> CFunc:
    """The iALM dual-step handler (compiled or loaded from the cache on a process's first call)."""
    return _compile(_ialm_frame)
