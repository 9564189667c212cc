r"""iALM for PyTorch: the augmented-Lagrangian dual optimizer with an adaptive dual step.

A drop-in for ``humancompatible.train.dual_optim.iALM`` (0.4.x semantics, the seed's signature)
whose group logic is :class:`uniopt.ialm.DualGroups` (shared with the NumPy :class:`uniopt.iALM`)
and whose dual step is uniopt's kernel:

* **kernel** -- CPU float32/float64 contiguous multipliers: the Numba kernel
  :func:`uniopt.kernels.ialm_cpu.ialm_dual_step_` on zero-copy ``tensor.detach().numpy()``
  views, one call per group and update;
* **cuda** -- CUDA float32/float64 contiguous multipliers (numba-cuda installed, not its
  simulator): ``uniopt.kernels.ialm_cuda.dual_step_``, same contract on device arrays;
* **torch** -- anything else (bfloat16/float16, other devices, a forced ``_backend="torch"``):
  the same rules (:mod:`uniopt.rules.ialm`) executed with torch ops.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from uniopt._validation import real
from uniopt.ialm import DualGroups, filtered, penalty_part
from uniopt.rules import bind
from uniopt.rules import ialm as _rules

from ._dispatch import _cuda_kernels_usable

__all__ = ["iALM"]

BACKENDS = ("auto", "torch")
_KERNEL_DTYPES = (torch.float32, torch.float64)

_torch_rules = bind(_rules, where=torch.where, minimum=torch.minimum, maximum=torch.maximum,
                    sqrt=torch.sqrt)


class iALM(DualGroups):  # noqa: N801 (the seed's name)
    r"""iALM's dual optimizer on torch tensors: multipliers, dual step and Lagrangian.

    For each constraint group :math:`k` with constraint values :math:`c_k` (its slice of the
    constraint vector) one :meth:`update` does

    .. math::
       d_k = c_k \ \text{or}\ b_k \leftarrow \mu_k b_k + (1 - \delta_k) c_k,\ d_k = b_k,\qquad
       \lambda_k \leftarrow \operatorname{clamp}\left(\lambda_k + \min\left(\beta_k,
       \frac{\gamma_k}{\|d_k\|_2}\right) d_k,\ lo_k,\ hi_k\right),

    then :math:`\beta_k \leftarrow \sigma_k \beta_k` for every group, and the primal side
    minimises the augmented Lagrangian

    .. math::
       L = f + \sum_k \lambda_k^\top c_k + \frac{\rho_k}{2}\|\tilde c_k\|_2^2,\qquad
       \tilde c_k = \max(c_k, 0)\ \text{(inequality groups)},\ c_k\ \text{(equality groups)}.

    Symbols: :math:`\beta, \sigma, \gamma` = ``beta``, ``sigma``, ``gamma``; :math:`\mu` =
    ``momentum``; :math:`\delta` = ``dampening`` (0: heavy ball); :math:`(lo, hi)` =
    ``dual_range``, with :math:`lo = \max(lo, 0)` for inequality groups (``is_ineq=True``,
    constraints :math:`c \le 0`); :math:`\rho` = ``penalty``, or with ``penalty=None`` each
    group's :math:`\beta_k` before this update's :math:`\sigma` growth (what
    humancompatible-train 0.4.x does). A zero direction gives a zero step, never NaN.
    Violations within ``ctol`` count as satisfied: before the dual step and in
    :math:`\tilde c`, :math:`c \leftarrow 0` where :math:`|c| \le` ``ctol`` (equality) or
    :math:`0 < c \le` ``ctol`` (inequality); the linear term uses the raw :math:`c`.

    Entry points: :meth:`forward` (``L`` at the current multipliers, changes nothing),
    :meth:`update` (= :meth:`step`, the dual update only) and :meth:`forward_update` (update,
    then ``L`` with the new multipliers and the old :math:`\beta`). ``L`` is differentiable
    with respect to whatever the loss and constraints depend on (the multipliers are
    constants) and has the loss's dtype. The linear term uses a detached copy of the
    multipliers, so ``forward`` -> ``update`` -> ``backward`` works (humancompatible-train
    raises there: it keeps the live dual tensor in the graph). Constraints may be a flat
    tensor (all groups, in order), a sequence of per-group tensors, or a mapping from group
    name to tensor. After each update, ``last_step`` holds one dict per group:
    ``{"direction_norm", "stepsize", "rho"}`` (``rho``: the quadratic coefficient of that
    update's Lagrangian). A step that raises (wrong sizes, wrong mapping keys)
    changes nothing.

    Args:
      m: number of constraints of the first group (or give ``init_duals``).
      beta: the first group's dual step cap :math:`\beta` (>= 0).
      sigma: its growth factor :math:`\sigma` per update (> 0).
      gamma: its :math:`\gamma` (>= 0).
      init_duals: initial multipliers: ``None`` (zeros), a number, or a 1-D floating tensor
        (copied; the multipliers keep its dtype, otherwise they take the dtype of the first
        constraints passed to an update, and are float64 until then, so a number such as 0.1
        is exact in float64 duals).
      penalty: :math:`\rho` (>= 0), or ``None`` for each group's :math:`\beta_k`.
      dual_range: ``(low, high)`` clamp of the multipliers (``None`` entries: unbounded); also
        the range of groups added with ``dual_range=None``.
      momentum: :math:`\mu` in [0, 1] (also the default of groups added later).
      dampening: :math:`\delta` in [0, 1] (also the default of groups added later).
      is_ineq: whether the first group's constraints are inequalities :math:`c \le 0`.
      ctol: violations within ``ctol`` (>= 0) count as satisfied.
      device: where the multipliers live (default: the CPU, or ``init_duals``' device).

    Deviations from humancompatible-train 0.4.2: groups never inherit another group's bounds
    or momentum (``None`` means the constructor's value); ``dampening`` defaults to 0 (heavy
    ball; the reference defaults to EMA); ``penalty`` is used (``None`` restores the
    reference's quadratic coefficient); ``ctol`` is applied; a zero direction is a zero step;
    multipliers adopt the constraints' dtype and mixed float32/float64 inputs work;
    ``load_state_dict`` copies; ``forward`` -> ``update`` -> ``backward`` works; a failing
    step changes nothing.

    Example:
      >>> import torch
      >>> from uniopt.adapters.torch import iALM
      >>> x = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
      >>> primal = torch.optim.SGD([x], lr=0.05)
      >>> dual = iALM(m=1, beta=1.0, is_ineq=True)   # minimise x^2 subject to 1 - x <= 0
      >>> for _ in range(300):
      ...     primal.zero_grad()
      ...     dual.forward_update((x ** 2).sum(), 1.0 - x).backward()
      ...     primal.step()
      >>> bool(abs(x.item() - 1.0) < 1e-3)
      True

    References:
      Li, Chen, Liu, Lu & Xu, "Stochastic inexact augmented Lagrangian method for nonconvex
      expectation constrained optimization", Comput. Optim. Appl. 87 (2024),
      https://doi.org/10.1007/s10589-023-00521-z (Algorithm 1).
    """

    def __init__(self, m=None, beta=1.0, sigma=1.0, gamma=1.0, init_duals=None, penalty=1.0, *,
                 dual_range=(-100.0, 100.0), momentum=0.0, dampening=0.0, is_ineq=False,
                 ctol=0.0, device=None, _backend="auto"):
        if _backend not in BACKENDS:
            expected = ", ".join(map(repr, BACKENDS))
            raise ValueError(f"Invalid _backend: {_backend!r} (expected one of {expected})")
        self._backend = _backend
        if device is not None:
            try:
                device = torch.device(device)
            except (TypeError, RuntimeError):
                raise TypeError(f"Invalid device: {device!r}") from None
        self._setup(m=m, beta=beta, sigma=sigma, gamma=gamma, init_duals=init_duals,
                    penalty=penalty, dual_range=dual_range, momentum=momentum,
                    dampening=dampening, is_ineq=is_ineq, ctol=ctol, device=device)

    def add_constraint_group(self, m=None, beta=1.0, sigma=1.0, gamma=1.0, momentum=None,
                             dampening=None, init_duals=None, dual_range=None, is_ineq=False,
                             device=None, *, name=None) -> None:
        """Add a group of ``m`` multipliers with its own hyper-parameters.

        ``momentum``, ``dampening``, ``dual_range`` and ``device`` left as ``None`` are the
        constructor's; nothing else is inherited from another group (an equality group added
        after an inequality group is not bounded below by 0). ``name`` (default ``group<k>``)
        is the group's key when constraints are passed as a mapping.
        """
        if device is not None:
            try:
                device = torch.device(device)
            except (TypeError, RuntimeError):
                raise TypeError(f"Invalid device: {device!r}") from None
        super().add_constraint_group(m, beta, sigma, gamma, momentum, dampening, init_duals,
                                     dual_range, is_ineq, device, name=name)

    # -- the backend hooks of DualGroups ------------------------------------------------------
    _array_types = (torch.Tensor,)

    def _initial_duals(self, size, init_duals, device):
        if init_duals is None or (isinstance(init_duals, numbers.Real) and not isinstance(init_duals, bool)):
            if size is None:
                return None, False
            fill = 0.0 if init_duals is None else real("init_duals", init_duals)
            # float64 (exact for any Python float) until the first constraints fix the dtype
            return torch.full((size,), fill, dtype=torch.float64, device=device), False
        if not isinstance(init_duals, torch.Tensor):
            raise TypeError(f"Invalid init_duals: {type(init_duals).__name__} (expected None, a "
                            f"number or a 1-D floating tensor)")
        if not init_duals.is_floating_point() or init_duals.ndim != 1:
            raise TypeError(f"Invalid init_duals: expected a number or a 1-D floating tensor, got "
                            f"{init_duals.dtype} of shape {tuple(init_duals.shape)}")
        duals = init_duals.detach().to(device=device).clone(memory_format=torch.contiguous_format)
        return duals, True

    def _zeros_like(self, x):
        return torch.zeros_like(x, memory_format=torch.contiguous_format)

    def _flat(self, x):
        if not isinstance(x, torch.Tensor):
            if isinstance(x, (str, bytes)):
                raise TypeError(f"constraints: expected tensors or real numbers, got {x!r}")
            try:
                x = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.get_default_dtype())
            except (TypeError, ValueError):
                raise TypeError(f"constraints: expected tensors or real numbers, got "
                                f"{type(x).__name__}") from None
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"constraints: expected real numbers, got dtype {x.dtype}")
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        return x.reshape(-1)

    def _concat(self, parts):
        return torch.cat(parts)

    def _numel(self, x):
        return int(x.numel())

    def _dtype(self, x):
        return x.dtype

    def _cast(self, x, dtype):
        return x.to(dtype=dtype, memory_format=torch.contiguous_format)

    def _detach(self, x):
        return x.detach()

    def _copy(self, x):
        if not isinstance(x, torch.Tensor):  # e.g. a NumPy iALM's state dict
            return torch.tensor(np.array(x, copy=True))
        return x.detach().clone(memory_format=torch.contiguous_format)

    def _dual_step_(self, group, c):
        duals, buffer = group["duals"], group["momentum_buffer"]
        views = self._host_views(group, duals, buffer)
        if views is not None:
            if c.device.type != "cpu" or not c.is_contiguous():
                c = c.to(device="cpu", memory_format=torch.contiguous_format)
            return self._kernel_step_(group, views[0], views[1], c.numpy())
        c = c.to(device=duals.device)
        if (self._backend == "auto" and duals.device.type == "cuda" and _cuda_kernels_usable()
                and duals.dtype in _KERNEL_DTYPES and buffer.dtype == duals.dtype
                and duals.is_contiguous() and buffer.is_contiguous()):
            return self._cuda_step_(group, duals, buffer, c.contiguous())
        return self._torch_step_(group, c)

    def _host_views(self, group, duals, buffer):
        """Zero-copy NumPy views of a group's multipliers and buffer for the CPU kernel (cached
        while the group holds the same tensors at the same addresses), or ``None`` when the
        kernel cannot take them (another device or dtype, non-contiguous, ``_backend="torch"``)."""
        cache = self.__dict__.setdefault("_views", {})
        hit = cache.get(id(group))
        if (hit is not None and hit[0] is duals and hit[1] is buffer
                and hit[2] == (duals.data_ptr(), buffer.data_ptr())):
            return hit[3]
        views = None
        if (self._backend == "auto" and duals.device.type == "cpu" and buffer.device.type == "cpu"
                and duals.dtype in _KERNEL_DTYPES and buffer.dtype == duals.dtype
                and duals.is_contiguous() and buffer.is_contiguous()):
            views = (duals.detach().numpy(), buffer.detach().numpy())
        cache[id(group)] = (duals, buffer, (duals.data_ptr(), buffer.data_ptr()), views)
        return views

    def _cuda_step_(self, group, duals, buffer, c):
        """``uniopt.kernels.ialm_cuda.dual_step_`` on the tensors, on torch's current stream.

        The tensors go to the kernel through ``__cuda_array_interface__`` (no copies); ``coef``,
        ``hyper`` and ``flags`` are host arrays the kernel stages. Reading ``(sq_norm,
        stepsize)`` back for ``last_step`` synchronises with that stream.
        """
        from numba import cuda

        device = duals.device
        with cuda.gpus[device.index or 0]:
            stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
            return self._cuda_launch_(group, duals.detach(), buffer.detach(), c, stream)

    def _cuda_launch_(self, group, duals, buffer, c, stream):
        """The kernel call of :meth:`_cuda_step_` on arrays it accepts (host ones on the simulator)."""
        from uniopt.kernels import ialm_cuda

        np_dtype = np.dtype(np.float32 if str(duals.dtype).endswith("float32") else np.float64)
        coef, hyper, flags = self._kernel_args(group, np_dtype)
        out = ialm_cuda.dual_step_(duals, buffer, c, coef, hyper, flags, stream=stream)
        if hasattr(out, "copy_to_host"):
            host = out.copy_to_host(stream=stream)
            stream.synchronize()
        else:  # the simulator: a host array
            host = np.asarray(out)
        return float(host[0]), float(host[1])

    def _torch_step_(self, group, c):
        """The dual step with torch ops (any dtype, device and layout), in place."""
        duals, buffer = group["duals"], group["momentum_buffer"]
        with torch.no_grad():
            d = filtered(_torch_rules, c, self.ctol, group["is_ineq"])
            if group["momentum"] != 0:
                new = _torch_rules.momentum_direction(buffer, d, group["momentum"],
                                                      1.0 - group["dampening"])
                buffer.copy_(new)
                d = new
            sq_norm = torch.sum(torch.square(d.to(torch.float64)))
            f64 = dict(dtype=torch.float64, device=duals.device)
            stepsize = _torch_rules.dual_stepsize(torch.tensor(group["beta"], **f64),
                                                  torch.tensor(group["gamma"], **f64), sq_norm)
            like = dict(dtype=duals.dtype, device=duals.device)
            duals.copy_(_torch_rules.dual_update(duals, d, stepsize.to(duals.dtype),
                                                 torch.tensor(group["lower_bound"], **like),
                                                 torch.tensor(group["upper_bound"], **like)))
        return float(sq_norm), float(stepsize)

    def _lagrangian_terms(self, loss, groups, parts, rhos):
        if not isinstance(loss, torch.Tensor):
            loss = torch.as_tensor(real("loss", loss), dtype=torch.get_default_dtype())
        out_dtype = loss.dtype
        value = loss
        for group, c, rho in zip(groups, parts, rhos):
            # a detached copy: a later in-place update must not invalidate this graph
            duals = group["duals"].detach().clone()
            dtype = torch.promote_types(torch.promote_types(c.dtype, duals.dtype), value.dtype)
            c, duals = c.to(dtype), duals.to(device=c.device, dtype=dtype)
            cp = penalty_part(_torch_rules, c, self.ctol, group["is_ineq"])
            value = value.to(dtype) + duals @ c
            value = value + 0.5 * rho * torch.dot(cp, cp)
        return value.to(out_dtype)
