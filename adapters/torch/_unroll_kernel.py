"""Differentiable SGD/QHM/QHAdam steps on compiled kernels: ``torch.autograd.Function``\\ s.

The fast path of the bilevel ``Dynamic`` (:mod:`uniopt.adapters.torch.bilevel`): one step of the
lower-level optimizer, out of place, differentiable with respect to every tensor input, first
derivative only (``once_differentiable``: the hypergradient needs the VJP of the update rule;
second-order terms come from the autograd graph of the gradient input ``g`` itself).

* forward: the Numba out-of-place kernel of :mod:`uniopt.kernels.unroll_cpu` on zero-copy
  NumPy views of CPU tensors, or the numba.cuda kernel of :mod:`uniopt.kernels.unroll_cuda` on
  CUDA tensors (on torch's current stream); outputs are fresh tensors (``torch.empty_like``);
* backward: the VJP kernel of :mod:`uniopt.rules.qh_vjp`. SGD and QHM save nothing (their
  VJP is linear); QHAdam saves its four inputs and recomputes the rest. Inputs that do not
  require grad get ``None``. The QHAdam denominator's square root has derivative 0 at exactly
  0 (finite cotangents where a gradient entry and its moments are exactly zero).

Memory safety: only the memory of plain (``torch.Tensor``/``torch.nn.Parameter``), 1-D,
contiguous float32/float64 tensors of one device ever reaches a kernel. :func:`supported` is
the gate: callers take the torch-ops path for anything else, and the ``*_step`` functions raise
``TypeError`` when given such tensors. Cotangents that autograd hands to ``backward`` are made
contiguous (and of the inputs' dtype) first.

Coefficients are computed by the caller, once per step: :func:`uniopt.rules.qh.qhm_coefficients`
for SGD (``momentum``/``nu`` unused) and QHM, the 13 floats of
:func:`uniopt.rules.qh.qhadam_coefficients` for QHAdam.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from uniopt import _jit
from uniopt.kernels import unroll_cpu

from ._dispatch import cuda_kernels_usable

__all__ = ["supported", "sgd_step", "qhm_step", "qhadam_step"]

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter


def supported(*tensors) -> bool:
    """Whether the kernels may run on ``tensors``.

    True when every tensor is a plain ``torch.Tensor`` (or ``torch.nn.Parameter``; no other
    subclass), strided, 1-D and contiguous, without a lazy negation bit (``torch._neg_view``),
    all of one dtype (float32 or float64) and one
    device, which is the CPU, or a CUDA device when numba.cuda can run kernels on it.
    """
    if not tensors:
        return False
    first = tensors[0]
    if type(first) is not _Tensor and type(first) is not _Parameter:
        return False
    dtype, device = first.dtype, first.device
    if dtype not in _DTYPES:
        return False
    for t in tensors:
        if type(t) is not _Tensor and type(t) is not _Parameter:
            return False
        if (t.layout is not torch.strided or t.dtype != dtype or t.device != device
                or t.dim() != 1 or not t.is_contiguous() or t.is_neg()):
            return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and cuda_kernels_usable()


def _check(name: str, *tensors) -> None:
    if not supported(*tensors):
        raise TypeError(f"{name}: the kernels need plain, 1-D, contiguous float32/float64 tensors "
                        f"of one dtype on one CPU or CUDA device (check supported() first)")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _contiguous(ct, like: torch.Tensor) -> torch.Tensor:
    """A cotangent from autograd as a plain contiguous tensor of ``like``'s dtype."""
    if ct is None:
        return torch.zeros_like(like)
    ct = ct.detach()
    if ct.dtype != like.dtype:
        ct = ct.to(like.dtype)
    if type(ct) is not _Tensor:  # never a subclass's memory
        ct = ct.as_subclass(_Tensor)
    return ct.resolve_neg().contiguous()


def _run(rule: str, kind: str, tensors: tuple, coefficients: tuple) -> None:
    """Run ``rule``'s ``kind`` (``"forward"``/``"vjp"``) kernel on ``tensors`` (inputs, outputs)."""
    first = tensors[0]
    if first.numel() == 0:
        return
    if first.device.type == "cpu":
        kernel = getattr(unroll_cpu, kind)(rule, first.numel() >= _jit.PARALLEL_MIN_SIZE)
        coef = np.array(coefficients, dtype=_DTYPES[first.dtype])
        kernel(*(_numpy(t) for t in tensors), coef)
        return
    from numba import cuda

    from uniopt.kernels import unroll_cuda

    with cuda.gpus[first.device.index or 0]:
        stream = cuda.external_stream(torch.cuda.current_stream(first.device).cuda_stream)
        arrays = [cuda.as_cuda_array(t.detach(), sync=False) for t in tensors]
        getattr(unroll_cuda, f"{rule}_{kind}")(*arrays, coefficients, stream)


def _floats(coefficients, count: int) -> tuple:
    values = tuple(float(c) for c in coefficients)
    if len(values) != count:
        raise ValueError(f"Invalid coefficients: expected {count} numbers, got {len(values)}")
    return values


class _SGDStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, g, coefficients):
        p_new = torch.empty_like(p)
        _run("sgd", "forward", (p, g, p_new), coefficients)
        ctx.coefficients = coefficients
        return p_new

    @staticmethod
    @once_differentiable
    def backward(ctx, ct_p_new):
        ct_p_new = _contiguous(ct_p_new, ct_p_new)
        ct_p, ct_g = torch.empty_like(ct_p_new), torch.empty_like(ct_p_new)
        _run("sgd", "vjp", (ct_p_new, ct_p, ct_g), ctx.coefficients)
        need = ctx.needs_input_grad
        return (ct_p if need[0] else None, ct_g if need[1] else None, None)


class _QHMStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, g, buf, coefficients):
        p_new, buf_new = torch.empty_like(p), torch.empty_like(p)
        _run("qhm", "forward", (p, g, buf, p_new, buf_new), coefficients)
        ctx.coefficients = coefficients
        return p_new, buf_new

    @staticmethod
    @once_differentiable
    def backward(ctx, ct_p_new, ct_buf_new):
        like = ct_p_new if ct_p_new is not None else ct_buf_new  # autograd materializes both
        ct_p_new, ct_buf_new = _contiguous(ct_p_new, like), _contiguous(ct_buf_new, like)
        ct_p, ct_g, ct_buf = (torch.empty_like(ct_p_new) for _ in range(3))
        _run("qhm", "vjp", (ct_p_new, ct_buf_new, ct_p, ct_g, ct_buf), ctx.coefficients)
        need = ctx.needs_input_grad
        return (ct_p if need[0] else None, ct_g if need[1] else None,
                ct_buf if need[2] else None, None)


class _QHAdamStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, g, exp_avg, exp_avg_sq, coefficients):
        p_new, m_new, v_new = (torch.empty_like(p) for _ in range(3))
        _run("qhadam", "forward", (p, g, exp_avg, exp_avg_sq, p_new, m_new, v_new), coefficients)
        ctx.coefficients = coefficients
        ctx.save_for_backward(p, g, exp_avg, exp_avg_sq)
        return p_new, m_new, v_new

    @staticmethod
    @once_differentiable
    def backward(ctx, ct_p_new, ct_m_new, ct_v_new):
        p, g, m, v = ctx.saved_tensors
        ct_p_new, ct_m_new, ct_v_new = (_contiguous(ct, p) for ct in (ct_p_new, ct_m_new, ct_v_new))
        ct_p, ct_g, ct_m, ct_v = (torch.empty_like(p) for _ in range(4))
        _run("qhadam", "vjp", (p, g, m, v, ct_p_new, ct_m_new, ct_v_new, ct_p, ct_g, ct_m, ct_v),
             ctx.coefficients)
        need = ctx.needs_input_grad
        return (ct_p if need[0] else None, ct_g if need[1] else None, ct_m if need[2] else None,
                ct_v if need[3] else None, None)


def sgd_step(p: torch.Tensor, g: torch.Tensor, coef) -> torch.Tensor:
    """One differentiable plain-SGD step, ``p_new = p_scale * p - lr * (grad_sign * g + wd_grad * p)``.

    Args:
      p: the parameter (1-D; see :func:`supported`).
      g: its gradient (may carry an autograd graph: its cotangent flows back into it).
      coef: :class:`uniopt.rules.qh.QHMCoefficients` (``beta``/``nu`` unused: no buffer).

    Returns:
      The new parameter, a fresh tensor.
    """
    _check("sgd_step", p, g)
    return _SGDStep.apply(p, g, _floats(coef, 8))


def qhm_step(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, coef) -> tuple:
    """One differentiable QHM step (``uniopt.rules.qh.qhm_update``), out of place.

    Args:
      p: the parameter (1-D; see :func:`supported`).
      g: its gradient.
      buf: the momentum buffer.
      coef: :class:`uniopt.rules.qh.QHMCoefficients`.

    Returns:
      ``(p_new, buf_new)``, fresh tensors.
    """
    _check("qhm_step", p, g, buf)
    return _QHMStep.apply(p, g, buf, _floats(coef, 8))


def qhadam_step(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, coef) -> tuple:
    """One differentiable QHAdam step (``uniopt.rules.qh.qhadam_update``), out of place.

    Args:
      p: the parameter (1-D; see :func:`supported`).
      g: its gradient.
      exp_avg: the (bias-corrected) first moment.
      exp_avg_sq: the (bias-corrected) second moment.
      coef: the 13 floats of :func:`uniopt.rules.qh.qhadam_coefficients` for this step.

    Returns:
      ``(p_new, exp_avg_new, exp_avg_sq_new)``, fresh tensors.
    """
    _check("qhadam_step", p, g, exp_avg, exp_avg_sq)
    return _QHAdamStep.apply(p, g, exp_avg, exp_avg_sq, _floats(coef, 13))
