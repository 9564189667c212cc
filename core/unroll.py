r"""Differentiable optimizer steps on NumPy arrays: out-of-place SGD, QHM and QHAdam and their VJPs.

The NumPy face of :mod:`uniopt.rules.qh_vjp`. An unrolled lower-level solve (bilevel
optimization: RAD, T-RAD, BDA, IAPTT-GM) differentiates through every optimizer step
:math:`(\theta, g, s) \mapsto (\theta', s')`; each ``*_step`` function computes one step without
touching its inputs, and the matching ``*_step_vjp`` maps the cotangents of the step's outputs
to those of its inputs (reverse mode, first derivative only). Both run the compiled CPU
kernels of :mod:`uniopt.kernels.unroll_cpu` (threads from ``UNIOPT_PARALLEL_MIN_SIZE``
elements, as the optimizers).

Coefficients are those the optimizers use, computed once per step on the host:

* SGD and QHM: :func:`uniopt.rules.qh.qhm_coefficients` (8 numbers; SGD ignores ``momentum``
  and ``nu``: no buffer);
* QHAdam: the 13 numbers of :func:`uniopt.rules.qh.qhadam_coefficients` for this step's
  bias-correction weights ``a1, a2`` (:func:`uniopt.rules.qh.qhadam_bias_weights`).

The VJPs of SGD and QHM are linear maps that need no inputs; QHAdam's recomputes what it needs
from the step's inputs. QHAdam's square root has its derivative at exactly 0 taken as 0, so an
element whose gradient and second moment are exactly zero gives finite cotangents (see
:mod:`uniopt.rules.qh_vjp`).

Arrays: float32 or float64 NumPy arrays of one dtype and one shape (any shape; non-contiguous
inputs are copied). Results are new C-contiguous arrays of that shape, or the arrays given as
``out=`` (a tuple with one array per result; each C-contiguous, writeable, of the same dtype and
shape; an output may be one of the inputs, to update it in place, but may not overlap an input
or another output otherwise).

Example:
  >>> import numpy as np
  >>> from uniopt import unroll
  >>> from uniopt.rules import qh
  >>> coef = qh.qhm_coefficients(lr=0.1, momentum=0.9, nu=0.7)
  >>> p, g, buf = np.array([1.0, 2.0]), np.array([0.5, -1.0]), np.zeros(2)
  >>> p_new, buf_new = unroll.qhm_step(p, g, buf, coef)
  >>> ct_p, ct_g, ct_buf = unroll.qhm_step_vjp(coef, np.ones(2), np.zeros(2))
  >>> ct_g    # d p_new / d g = -lr [(1 - nu) + nu (1 - beta)] = -0.1 * (0.3 + 0.07)
  array([-0.037, -0.037])
"""

from __future__ import annotations

import numpy as np

from . import _jit
from ._validation import check_step_coefficients
from .kernels import unroll_cpu

__all__ = ["sgd_step", "sgd_step_vjp", "qhm_step", "qhm_step_vjp", "qhadam_step",
           "qhadam_step_vjp"]

_QHM_SOURCE = "uniopt.rules.qh.qhm_coefficients"
_QHADAM_SOURCE = "uniopt.rules.qh.qhadam_coefficients"
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _inputs(names: tuple, arrays: tuple) -> list:
    """The arrays as C-contiguous flat views (copies where needed), checked to pair up."""
    first = None
    for name, a in zip(names, arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"Invalid {name}: expected a NumPy array, got {type(a).__name__}")
        if a.dtype not in _DTYPES:
            raise TypeError(f"Invalid {name} dtype: {a.dtype} (expected float32 or float64)")
        if first is None:
            first = (name, a)
        elif a.dtype != first[1].dtype:
            raise TypeError(f"Invalid {name} dtype: {a.dtype} (expected {first[1].dtype}, the "
                            f"dtype of {first[0]})")
        elif a.shape != first[1].shape:
            raise ValueError(f"Invalid {name} shape: {a.shape} (expected {first[1].shape}, the "
                             f"shape of {first[0]})")
    return [np.ascontiguousarray(a).reshape(-1) for a in arrays]


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.ctypes.data == b.ctypes.data and a.shape == b.shape and a.strides == b.strides
            and a.dtype == b.dtype)


def _outputs(out, count: int, like: np.ndarray, inputs: tuple) -> tuple:
    """The ``count`` result arrays: new ones, or the checked arrays of ``out``."""
    if out is None:
        return tuple(np.empty(like.shape, like.dtype) for _ in range(count))
    if isinstance(out, np.ndarray):
        out = (out,)
    if not isinstance(out, (tuple, list)) or len(out) != count:
        raise TypeError(f"Invalid out: expected a tuple of {count} NumPy arrays, got {out!r}")
    for k, o in enumerate(out):
        what = f"out[{k}]"
        if not isinstance(o, np.ndarray):
            raise TypeError(f"Invalid {what}: expected a NumPy array, got {type(o).__name__}")
        if o.dtype != like.dtype or o.shape != like.shape:
            raise ValueError(f"Invalid {what}: dtype {o.dtype} and shape {o.shape} (expected "
                             f"{like.dtype} and {like.shape})")
        if not o.flags.c_contiguous or not o.flags.writeable:
            raise ValueError(f"Invalid {what}: must be C-contiguous and writeable")
        for other in out[:k]:
            if o.size and np.may_share_memory(o, other):
                raise ValueError(f"Invalid {what}: overlaps another output")
        for other in inputs:
            if o.size and np.may_share_memory(o, other) and not _same_memory(o, other):
                raise ValueError(f"Invalid {what}: overlaps an input without being that very "
                                 f"array")
    return tuple(out)


def _parallel(n: int) -> bool:
    return n >= _jit.PARALLEL_MIN_SIZE


def _run(kernel, rule: str, names: tuple, arrays: tuple, coef: tuple, out, count: int):
    flat = _inputs(names, arrays)
    results = _outputs(out, count, arrays[0], arrays)
    n = flat[0].size
    if n:
        kernel(rule, _parallel(n))(*flat, *(r.reshape(-1) for r in results),
                                   np.array(coef, dtype=flat[0].dtype))
    return results


def sgd_step(p, g, coefficients, *, out=None) -> np.ndarray:
    r"""One plain SGD step, out of place: :math:`\theta' = s\theta - \alpha(\pm g + \lambda_g\theta)`.

    Args:
      p: the parameter :math:`\theta`.
      g: its gradient.
      coefficients: :func:`uniopt.rules.qh.qhm_coefficients` (``momentum``/``nu`` unused).
      out: optional array (or 1-tuple) for the new parameter.

    Returns:
      The new parameter.
    """
    coef = check_step_coefficients(coefficients, 8, _QHM_SOURCE)
    return _run(unroll_cpu.forward, "sgd", ("p", "g"), (p, g), coef, out, 1)[0]


def sgd_step_vjp(coefficients, ct_p_new, *, out=None) -> tuple:
    """VJP of :func:`sgd_step`: the cotangents ``(ct_p, ct_g)`` from that of the new parameter.

    Args:
      coefficients: those of the forward step.
      ct_p_new: the cotangent of the new parameter.
      out: optional tuple of 2 arrays for the results.
    """
    coef = check_step_coefficients(coefficients, 8, _QHM_SOURCE)
    return _run(unroll_cpu.vjp, "sgd", ("ct_p_new",), (ct_p_new,), coef, out, 2)


def qhm_step(p, g, buf, coefficients, *, out=None) -> tuple:
    """One QHM step, out of place (``uniopt.rules.qh.qhm_update``).

    Args:
      p: the parameter.
      g: its gradient.
      buf: the momentum buffer (zeros at the first step).
      coefficients: :func:`uniopt.rules.qh.qhm_coefficients`.
      out: optional tuple of 2 arrays for the results.

    Returns:
      ``(p_new, buf_new)``.
    """
    coef = check_step_coefficients(coefficients, 8, _QHM_SOURCE)
    return _run(unroll_cpu.forward, "qhm", ("p", "g", "buf"), (p, g, buf), coef, out, 2)


def qhm_step_vjp(coefficients, ct_p_new, ct_buf_new, *, out=None) -> tuple:
    """VJP of :func:`qhm_step` (a linear map: no inputs needed).

    Args:
      coefficients: those of the forward step.
      ct_p_new: the cotangent of the new parameter.
      ct_buf_new: the cotangent of the new momentum buffer.
      out: optional tuple of 3 arrays for the results.

    Returns:
      ``(ct_p, ct_g, ct_buf)``.
    """
    coef = check_step_coefficients(coefficients, 8, _QHM_SOURCE)
    return _run(unroll_cpu.vjp, "qhm", ("ct_p_new", "ct_buf_new"), (ct_p_new, ct_buf_new), coef,
                out, 3)


def qhadam_step(p, g, exp_avg, exp_avg_sq, coefficients, *, out=None) -> tuple:
    """One QHAdam step, out of place (``uniopt.rules.qh.qhadam_update``).

    Args:
      p: the parameter.
      g: its gradient.
      exp_avg: the (bias-corrected) first moment.
      exp_avg_sq: the (bias-corrected) second moment.
      coefficients: the 13 numbers of :func:`uniopt.rules.qh.qhadam_coefficients`.
      out: optional tuple of 3 arrays for the results.

    Returns:
      ``(p_new, exp_avg_new, exp_avg_sq_new)``.
    """
    coef = check_step_coefficients(coefficients, 13, _QHADAM_SOURCE)
    return _run(unroll_cpu.forward, "qhadam", ("p", "g", "exp_avg", "exp_avg_sq"),
                (p, g, exp_avg, exp_avg_sq), coef, out, 3)


def qhadam_step_vjp(p, g, exp_avg, exp_avg_sq, coefficients, ct_p_new, ct_exp_avg_new,
                    ct_exp_avg_sq_new, *, out=None) -> tuple:
    """VJP of :func:`qhadam_step` at the step's inputs.

    The derivative of the denominator's square root at exactly 0 is taken as 0 (finite
    cotangents where a gradient entry and its second moment are exactly zero).

    Args:
      p, g, exp_avg, exp_avg_sq: the forward step's inputs.
      coefficients: those of the forward step.
      ct_p_new, ct_exp_avg_new, ct_exp_avg_sq_new: the cotangents of the step's outputs.
      out: optional tuple of 4 arrays for the results.

    Returns:
      ``(ct_p, ct_g, ct_exp_avg, ct_exp_avg_sq)``.
    """
    coef = check_step_coefficients(coefficients, 13, _QHADAM_SOURCE)
    names = ("p", "g", "exp_avg", "exp_avg_sq", "ct_p_new", "ct_exp_avg_new", "ct_exp_avg_sq_new")
    return _run(unroll_cpu.vjp, "qhadam", names, (p, g, exp_avg, exp_avg_sq, ct_p_new,
                                                  ct_exp_avg_new, ct_exp_avg_sq_new), coef, out, 4)
