r"""Polyak step-size SGD as a ``torch.optim`` optimizer.

One step of a param group is a reduction and an update:

1. the squared gradient norm over *every* parameter of the group with a gradient, in float64,
   read from the same checked scan of the gradients that the update uses
   (:meth:`Dispatcher.collect <uniopt.adapters.torch._dispatch.Dispatcher.collect>`: cached
   address tables, this step's gradient addresses): one Numba table-kernel call per table
   (:func:`uniopt.kernels.polyak_cpu.sq_norm_table`, one per group and dtype) for CPU
   float32/float64 contiguous gradients, one numba.cuda launch per CUDA tensor accumulating
   into one float64 device scalar (:mod:`uniopt.kernels.polyak_cuda`), torch ops for anything
   else;
2. the step size from the loss and that norm (:func:`uniopt.polyak.polyak_stepsize`);
3. the update through :class:`uniopt.adapters.torch._dispatch.Dispatcher` (``run``, on the work
   ``collect`` returned): one table-kernel call per group and dtype on CPU, numba.cuda kernels on
   CUDA tensors, torch ops otherwise. Every group is checked before any norm is computed and
   any tensor is touched, so a step that raises changes nothing.

The arithmetic is :mod:`uniopt.rules.polyak` on every path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.optim.optimizer import Optimizer

from uniopt import _jit
from uniopt.kernels import polyak_cpu
from uniopt._validation import check_nonfinite, check_polyak, nonfinite_error, nonnegative_finite
from uniopt.polyak import polyak_stepsize
from uniopt.rules import bind
from uniopt.rules import polyak as _polyak

from ._dispatch import (Dispatcher, Rule, dist_key, grad_view, group_average, is_dtensor, local_view,
                        owned_copy, resolve_process_group)

__all__ = ["PolyakSGD"]

_torch_rules = bind(_polyak)  # sgd_update / heavy_ball_update use only arithmetic
_KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_LIKE = {dt: np.zeros(1, dtype=dt) for dt in _KERNEL_DTYPES.values()}
_EPS64 = float(np.finfo(np.float64).eps)
_EPS = {dt: torch.finfo(dt).eps for dt in _KERNEL_DTYPES}  # grown on demand
_PLAIN = (torch.Tensor, torch.nn.Parameter)


# ----------------------------------------------------------------------------------------------
# The update rules, as the dispatcher sees them
# ----------------------------------------------------------------------------------------------
class _Step:
    """The constants of one group's step: the step size and momentum, per dtype on demand."""

    __slots__ = ("stepsize", "momentum", "_host", "_device")

    def __init__(self, stepsize: float, momentum: float):
        self.stepsize, self.momentum = stepsize, momentum
        self._host: dict = {}
        self._device: dict = {}

    def coef(self, np_dtype) -> np.ndarray:
        """``(stepsize, momentum)`` cast to ``np_dtype`` (host array, made once per step)."""
        c = self._host.get(np_dtype)
        if c is None:
            c = self._host[np_dtype] = np.array([self.stepsize, self.momentum], dtype=np_dtype)
        return c

    def device_coef(self, np_dtype, stream):
        """:meth:`coef` on the current CUDA device (copied once per step, dtype and device).

        The dispatcher launches every kernel of a device on torch's current stream, so the copy
        made on the first launch's stream is ordered before the later launches.
        """
        from numba import cuda

        current = getattr(cuda, "get_current_device", None)  # the simulator has none
        key = (np_dtype, getattr(current(), "id", None) if current is not None else None)
        c = self._device.get(key)
        if c is None:
            c = self._device[key] = cuda.to_device(self.coef(np_dtype), stream=stream)
        return c


class _SGDRule(Rule):
    """``p -= stepsize * g`` (groups with ``momentum == 0``: no state)."""

    name = "PolyakSGD"
    buffers: tuple = ()

    def __init__(self):
        self.steps: dict = {}  # id(param group) -> its _Step, set before each dispatch

    def init_state(self, p):
        return {}

    def constants(self, group):
        return self.steps[id(group)]

    def run_table(self, c: _Step, table):
        polyak_cpu.sgd_kernel(table.parallel)(table.p_addrs, table.g_addrs, table.sizes,
                                              c.coef(table.np_dtype))

    def run_cuda(self, c: _Step, p, g, buffers, state, stream):
        from uniopt.kernels import polyak_cuda

        polyak_cuda.sgd_(p, g, c.device_coef(np.dtype(p.dtype), stream), stream)

    def run_torch(self, c: _Step, p, g, buffers, state):
        p.copy_(_torch_rules.sgd_update(p, g, c.stepsize))


class _HeavyBallRule(_SGDRule):
    """``v = momentum * v - stepsize * g; p += v`` (groups with ``momentum != 0``)."""

    buffers = ("velocity",)

    def init_state(self, p):
        return {"velocity": torch.zeros_like(p, memory_format=torch.contiguous_format)}

    def run_table(self, c: _Step, table):
        polyak_cpu.heavy_ball_kernel(table.parallel)(table.p_addrs, table.g_addrs,
                                                     table.buffer_addrs[0], table.sizes,
                                                     c.coef(table.np_dtype))

    def run_cuda(self, c: _Step, p, g, buffers, state, stream):
        from uniopt.kernels import polyak_cuda

        polyak_cuda.heavy_ball_(p, g, buffers[0], c.device_coef(np.dtype(p.dtype), stream), stream)

    def run_torch(self, c: _Step, p, g, buffers, state):
        (v,) = buffers
        new_p, new_v = _torch_rules.heavy_ball_update(p, g, v, c.stepsize, c.momentum)
        v.copy_(new_v)
        p.copy_(new_p)


# ----------------------------------------------------------------------------------------------
# The reduction
# ----------------------------------------------------------------------------------------------
def _cuda_sq_norm(grads: list) -> float:
    """Sum of squares of CUDA float32/float64 contiguous tensors of one device (float64)."""
    from numba import cuda

    from uniopt.kernels import polyak_cuda

    device = grads[0].device
    acc = torch.zeros(1, dtype=torch.float64, device=device)
    with cuda.gpus[device.index or 0]:
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        d_acc = cuda.as_cuda_array(acc, sync=False)
        for g in grads:
            polyak_cuda.sq_norm_accumulate_(cuda.as_cuda_array(g.view(-1), sync=False), d_acc, stream)
    return float(acc.item())


def _sq_norm(grads: list, backend: str) -> float:
    """``sum ||g||^2`` over ``grads`` (tensors) in float64, in as few kernel calls as possible.

    Only plain tensors (exact type ``torch.Tensor``/``Parameter``) reach a kernel; any other
    tensor is reduced with torch ops (a DTensor to its full sum, over its mesh).
    """
    tables: dict = {}
    cuda_groups: dict = {}
    total = 0.0
    for g in grads:
        if (backend == "auto" and type(g) in _PLAIN and g.dtype in _KERNEL_DTYPES
                and g.is_contiguous() and g.numel()):
            if g.device.type == "cpu":
                tables.setdefault(g.dtype, []).append(g)
                continue
            if g.device.type == "cuda":
                cuda_groups.setdefault(g.device, []).append(g)
                continue
        g = g.detach()
        if g.is_complex():
            g = torch.view_as_real(g)
        value = torch.sum(torch.square(g.to(torch.float64)))
        if is_dtensor(value):  # a DTensor gradient that has no plain local view (Partial)
            value = value.full_tensor()
        total += float(value)
    for dtype, gs in tables.items():
        addrs = np.array([g.data_ptr() for g in gs], dtype=np.int64)
        sizes = np.array([g.numel() for g in gs], dtype=np.int64)
        kernel = polyak_cpu.sq_norm_kernel(int(sizes.sum()) >= _jit.PARALLEL_MIN_SIZE)
        if kernel is polyak_cpu.sq_norm_table_parallel:
            threads = torch.get_num_threads()  # numba's OpenMP pool may change it
            total += float(kernel(addrs, sizes, _LIKE[_KERNEL_DTYPES[dtype]]))
            torch.set_num_threads(threads)
        else:
            total += float(kernel(addrs, sizes, _LIKE[_KERNEL_DTYPES[dtype]]))
    for gs in cuda_groups.values():
        total += _cuda_sq_norm(gs)
    return total


def _work_sq_norm(work, backend: str) -> tuple:
    """``(sum ||g||^2, shards, eps)`` of one group from the dispatcher's scan of its gradients.

    The table gradients' addresses are already in each table's ``g_addrs`` (one norm kernel
    call per table, over the very addresses the update will read); the gradients on the cuda
    and torch paths go through :func:`_sq_norm`. Sums over the local shards of DTensor
    gradients are not in the total: ``shards`` maps their :func:`dist_key` to the local sum, to
    be reduced over the mesh. ``eps`` is the machine epsilon of the finest floating gradient
    dtype (float64's when there is none).
    """
    total = 0.0
    shards: dict = {}
    eps = _EPS64
    for table, _ in work.tables:
        kernel = polyak_cpu.sq_norm_kernel(table.parallel)
        if table.parallel:
            threads = torch.get_num_threads()  # numba's OpenMP pool may change it
            value = float(kernel(table.g_addrs, table.sizes, _LIKE[table.np_dtype]))
            torch.set_num_threads(threads)
        else:
            value = float(kernel(table.g_addrs, table.sizes, _LIKE[table.np_dtype]))
        if table.dist is None:
            total += value
        else:
            shards[table.dist] = shards.get(table.dist, 0.0) + value
        eps = min(eps, _EPS[table.dtype])
    if work.slow:
        params = work.plan.params
        by_key: dict = {}
        for i in work.slow:
            p, g = params[i], params[i].grad
            view = grad_view(p, g) if local_view(p) is not None else None
            if view is None:  # a tensor subclass: reduced by its own ops
                by_key.setdefault(None, []).append(g)
            else:
                by_key.setdefault(dist_key(p), []).append(view)
            if g.is_floating_point() or g.is_complex():
                dt = g.dtype.to_real() if g.is_complex() else g.dtype
                e = _EPS.get(dt)
                if e is None:
                    e = _EPS[dt] = torch.finfo(dt).eps
                eps = min(eps, e)
        for key, grads in by_key.items():
            value = _sq_norm(grads, backend)
            if key is None:
                total += value
            else:
                shards[key] = shards.get(key, 0.0) + value
    return total, shards, eps


def _reduce_over_meshes(value: float, parts: list, meshes: list) -> tuple:
    """The loss averaged over the first mesh and every group's full ``||g||^2``.

    ``parts``: ``(total, shards)`` per group (:func:`_work_sq_norm`). One ``all_reduce`` per
    mesh dimension carries ``[loss / ranks, group sums...]``: a local shard sum is divided by
    the number of its replicas, so summing over every rank of the mesh counts each shard once.
    Every rank gets the same loss and norms, hence the same step sizes.
    """
    import torch.distributed as dist

    totals = [total for total, _ in parts]
    for n, mesh in enumerate(meshes):
        row = [value / mesh.size() if n == 0 else 0.0]
        row += [sum(v / replicas for (m, replicas), v in shards.items() if m == mesh)
                for _, shards in parts]
        buffer = torch.tensor(row, dtype=torch.float64, device=mesh.device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(buffer, group=mesh.get_group(dim))
        row = buffer.tolist()
        if n == 0:
            value = row[0]
        totals = [t + v for t, v in zip(totals, row[1:])]
    return value, totals


def _all_zero_grads(param_groups) -> bool:
    """Whether there are gradients and all are zeros (the local shards of DTensors)."""
    seen = False
    with torch.no_grad():
        for group in param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                seen = True
                view = local_view(g)
                if view is None:
                    view = g
                if view.numel() and bool(view.ne(0).any()):
                    return False
    return seen


def _loss_value(loss) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise RuntimeError(f"PolyakSGD: the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().reshape(()).item())
    try:
        if isinstance(loss, (str, bytes)):
            raise TypeError
        return float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"PolyakSGD: the loss must be a number or a scalar tensor, got {type(loss).__name__}") from None


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
class PolyakSGD(Optimizer):
    r"""SGD with the Polyak step size (SPS), a ``torch.optim`` optimizer.

    .. math::
       \gamma_t = \min\left(\frac{f(x_t) - f^*}{\|\nabla f(x_t)\|^2 + \delta},
       \gamma_{\max}\right) \ (\text{SPS\_max}), \qquad
       \gamma_t = \max\left(\frac{f(x_t) - f^*}{\|\nabla f(x_t)\|^2}, 0\right) \ (\text{SPS+}),

       v_{t+1} = \mu v_t - \gamma_t \nabla f(x_t), \qquad x_{t+1} = x_t + v_{t+1}

    with :math:`f(x_t)` the loss, :math:`f^*` = ``fun_min``, :math:`\delta` = ``delta``,
    :math:`\gamma_{\max}` = ``max_stepsize``, :math:`\mu` = ``momentum`` (``momentum=0``:
    :math:`x_{t+1} = x_t - \gamma_t \nabla f(x_t)`). The norm is over every parameter *of the
    param group* that has a gradient, so each group gets its own step size (one group: the
    global norm, as in jaxopt and optax). A zero step is taken -- never NaN, never an ascent --
    when the gradient is zero or the loss is below ``fun_min``.

    Args:
      params: an iterable of parameters, or of dicts defining parameter groups.
      fun_min: :math:`f^*`, a lower bound on the loss (0 for models that interpolate).
      variant: ``"SPS_max"`` or ``"SPS+"`` (which ignores ``max_stepsize`` and ``delta``).
      max_stepsize: :math:`\gamma_{\max}` (finite, >= 0).
      delta: :math:`\delta` (>= 0).
      momentum: heavy-ball :math:`\mu` (>= 0).
      lr: multiplier of the step cap (>= 0, default 1): the cap in use is
        ``lr * max_stepsize``. It is the group key that ``torch.optim.lr_scheduler`` changes, so
        ``StepLR(opt, ...)`` schedules the cap, and the trajectory is the NumPy/JAX solver's
        with ``max_stepsize = lr * max_stepsize``. SPS+ has no cap: ``lr != 1`` there raises
        ``ValueError`` at ``step`` (before anything changes).
      process_group: the ``torch.distributed`` process group the loss is averaged over under
        DDP (replicated plain parameters). ``None``: the world group when ``torch.distributed``
        is initialised at construction, else none (a single process: nothing is reduced).
        Stored, resolved, as ``self.process_group``.
      nonfinite: (keyword) ``"propagate"`` (default, described below), ``"raise"``
        (``FloatingPointError`` before anything changes) or ``"skip"`` (nothing changes; every
        group's ``nonfinite_skips`` is incremented and ``last_step`` reports a zero step). The
        check is on the loss and on each group's squared gradient norm, which the step computes
        anyway (non-finite whenever a gradient entry is; also when a finite norm overflows
        float64). See docs/faults.md.

    ``step`` needs the loss: ``step(closure)`` (the closure recomputes the loss and its
    gradients and returns the loss) or ``step(loss=loss)`` after ``loss.backward()``.
    Hyper-parameters are re-read from each group at every step. State per parameter (only with
    ``momentum != 0``): ``velocity``. Parameters whose ``.grad`` is ``None`` are skipped (they
    add nothing to the norm and their velocity is kept). After each step, ``last_step`` holds one
    dict per group: ``{"loss", "grad_norm", "stepsize"}`` (Python floats; not in the state dict).
    There is no ``maximize``: minimise the negated objective, with ``fun_min`` a lower bound
    on it. Complex parameters are updated as real pairs (as ``torch.optim``): their gradient
    adds :math:`|g|^2` to the norm.

    Under ``torch.distributed`` with DTensor parameters (FSDP2 ``fully_shard``), each rank
    steps its local shards; the squared norm is the sum of the local sums over the mesh, and
    the loss is averaged over the mesh (each rank's loss of its own batch: FSDP2 averages the
    gradients the same way), in one ``all_reduce`` per mesh dimension per step, so every rank
    takes the same step size -- that of a single process on the whole batch. Every rank must
    call ``step``. With plain (replicated) parameters and a process group (DDP: the gradients
    are already averaged, so the norm is the same on every rank and is not reduced again), the
    loss is averaged over ``process_group`` in one ``all_reduce`` per step. ``step()`` without
    a loss is allowed only when every gradient is zero (a zero step; ``last_step`` reports a NaN
    loss): ``torch.distributed.checkpoint`` takes such a step to create the state of a fresh
    optimizer.

    NaN and inf gradients are not checked (as in ``torch.optim``): the norm becomes NaN (an
    inf gradient gives NaN on the kernel path, inf on the torch-ops path). ``SPS_max`` then
    steps by the cap (``min(NaN, cap)``) or, for an inf norm, by 0; SPS+ takes a zero step.
    The entries whose
    gradient is NaN or inf become non-finite in the parameters, the others move by that step
    size, and ``last_step`` reports the non-finite ``grad_norm``. Check ``last_step`` or the
    loss to skip such steps.

    Example:
      >>> import torch
      >>> from uniopt.adapters.torch import PolyakSGD
      >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> opt = PolyakSGD([w])
      >>> def closure():
      ...     opt.zero_grad()
      ...     loss = (w ** 2).sum()
      ...     loss.backward()
      ...     return loss
      >>> _ = opt.step(closure)        # gamma = ||w||^2 / ||2w||^2 = 1/4 halves w
      >>> w.detach().tolist(), opt.last_step[0]["stepsize"]
      ([0.5, -1.0], 0.25)

    References:
      Loizou, Vaswani, Laradji & Lacoste-Julien, "Stochastic Polyak step-size for SGD: an
      adaptive learning rate for fast convergence", AISTATS 2021, https://arxiv.org/abs/2002.10542
      Berrada, Zisserman & Kumar, "Training neural networks for and by interpolation", ICML
      2020, https://arxiv.org/abs/1906.05661
      Garrigos, Gower & Schaipp, "Function value learning: adaptive learning rates based on the
      Polyak stepsize and function splitting in ERM", 2023, https://arxiv.org/abs/2307.14528
    """

    def __init__(self, params, fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0,
                 momentum=0.0, *, lr=1.0, nonfinite="propagate", process_group=None, _backend="auto"):
        defaults = {"fun_min": fun_min, "variant": variant, "max_stepsize": max_stepsize,
                    "delta": delta, "momentum": momentum, "lr": lr}
        self._check_group(defaults)
        self.nonfinite = check_nonfinite(nonfinite)
        self.process_group = resolve_process_group(process_group)
        if self.nonfinite != "propagate":
            defaults["nonfinite_skips"] = 0
        self._backend = _backend
        self._dispatchers = (Dispatcher(_SGDRule(), _backend), Dispatcher(_HeavyBallRule(), _backend))
        self.last_step: list = []
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        check_polyak(group["fun_min"], group["variant"], group["max_stepsize"], group["delta"],
                     group["momentum"])
        nonnegative_finite("learning rate", group.get("lr", 1.0))

    @staticmethod
    def _cap(index: int, group: dict) -> float:
        """The step cap of this step: ``lr * max_stepsize`` (``lr`` is what schedulers change)."""
        lr = group.setdefault("lr", 1.0)  # groups saved before lr existed
        lr = nonnegative_finite("learning rate", lr.item() if isinstance(lr, torch.Tensor) else lr)
        if group["variant"] == "SPS+" and lr != 1.0:
            raise ValueError(f"PolyakSGD: lr={lr} in param group {index} would scale the step cap "
                             f"max_stepsize, which the SPS+ variant does not have; use "
                             f"variant='SPS_max' to schedule the cap")
        return lr * float(group["max_stepsize"])

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._invalidate()

    def _nonfinite_gate(self, value: float, sq_norms: list) -> bool:
        """The ``nonfinite`` policy on the loss and each group's squared gradient norm (already
        reduced over the ranks, so every rank decides alike); ``False``: skip the step."""
        where = None
        if not math.isfinite(value):
            where = f"the loss ({value})"
        else:
            where = next((f"the gradients of param group {k} (squared norm {sq})"
                          for k, sq in enumerate(sq_norms) if not math.isfinite(sq)), None)
        if where is None:
            return True
        if self.nonfinite == "raise":
            raise nonfinite_error("PolyakSGD", where)
        for group in self.param_groups:
            group["nonfinite_skips"] = int(group.get("nonfinite_skips", 0)) + 1
        self.last_step = [{"loss": value, "grad_norm": float(np.sqrt(sq)), "stepsize": 0.0}
                          for sq in sq_norms]
        return False

    def _invalidate(self) -> None:
        for dispatcher in getattr(self, "_dispatchers", ()):
            dispatcher.invalidate()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_backend"] = self._backend
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        backend = self.__dict__.setdefault("_backend", "auto")
        self.__dict__.setdefault("nonfinite", "propagate")
        if "_dispatchers" not in self.__dict__:
            self._dispatchers = (Dispatcher(_SGDRule(), backend), Dispatcher(_HeavyBallRule(), backend))
        self.__dict__.setdefault("last_step", [])
        if "process_group" not in self.__dict__:  # not pickled: the default group here
            self.process_group = resolve_process_group(None)
        self._invalidate()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, copying its tensors (the source is never aliased)."""
        for group in state_dict["param_groups"]:
            self._check_group({**self.defaults, **{k: v for k, v in group.items() if k != "params"}})

        super().load_state_dict(owned_copy(state_dict))
        for group in self.param_groups:
            group.setdefault("lr", 1.0)  # saved before lr existed
            if self.nonfinite != "propagate":
                group.setdefault("nonfinite_skips", 0)
        self._invalidate()

    def step(self, closure=None, *, loss=None):
        """One Polyak step of every param group.

        Args:
          closure: a callable that zeroes the gradients, computes the loss, calls
            ``backward()`` and returns the loss; it is called once, with gradients enabled.
          loss: the loss whose gradients are in ``.grad`` (instead of a closure).

        Returns:
          The loss (the closure's return value, or ``loss``).
        """
        if closure is not None:
            if loss is not None:
                raise ValueError("PolyakSGD.step: pass either a closure or loss=, not both")
            with torch.enable_grad():
                loss = closure()
            if loss is None:
                raise RuntimeError("PolyakSGD.step: the closure returned None; it must return the loss")
        elif loss is None and not _all_zero_grads(self.param_groups):
            raise RuntimeError("PolyakSGD.step needs the loss: call step(closure) with a closure "
                               "that returns the loss, or step(loss=loss) after loss.backward()")
        value = None if loss is None else _loss_value(loss)
        # 1. Check every group (heavy-ball groups first: their state too) and scan its gradients
        #    once; compute each group's norm from that scan and its step size. Nothing is
        #    mutated until every group has passed.
        plain_dispatcher, heavy_dispatcher = self._dispatchers
        momenta = [float(group["momentum"]) for group in self.param_groups]
        heavy = [g for g, m in zip(self.param_groups, momenta) if m != 0]
        plain = [g for g, m in zip(self.param_groups, momenta) if m == 0]
        heavy_work = heavy_dispatcher.collect(heavy, self.state) if heavy else []
        plain_work = plain_dispatcher.collect(plain, self.state) if plain else []
        found = {id(w.group): w for w in heavy_work}
        found.update((id(w.group), w) for w in plain_work)
        caps = [self._cap(i, group) for i, group in enumerate(self.param_groups)]
        parts = [_work_sq_norm(found[id(group)], self._backend) if id(group) in found
                 else (0.0, {}, _EPS64) for group in self.param_groups]
        sq_norms = [total for total, _, _ in parts]
        meshes: list = []  # the DTensor meshes of every group, from the plans just checked
        for group, momentum in zip(self.param_groups, momenta):
            for mesh in (heavy_dispatcher if momentum != 0 else plain_dispatcher).meshes(group):
                if not any(mesh == m for m in meshes):
                    meshes.append(mesh)
        if value is None:  # no loss, zero gradients (torch.distributed.checkpoint's first step)
            pass
        elif meshes:  # DTensor parameters: the same loss and full norms on every rank
            value, sq_norms = _reduce_over_meshes(value, [(t, sh) for t, sh, _ in parts], meshes)
        else:
            if self.process_group is not None:  # DDP: the gradients are averaged, so the loss
                value = float(group_average(torch.tensor([value], dtype=torch.float64),
                                            self.process_group)[0])
            for n, (_, shards, _) in enumerate(parts):
                sq_norms[n] += sum(shards.values())
        if (value is not None and self.nonfinite != "propagate"
                and not self._nonfinite_gate(value, sq_norms)):
            return loss
        steps, last_step = {}, []
        for group, momentum, cap, sq_norm, (_, _, eps) in zip(self.param_groups, momenta, caps,
                                                              sq_norms, parts):
            # SPS+ takes a zero step when ||g||^2 is at most the machine epsilon of the
            # gradients' dtype (the finest one, in a group of several dtypes).
            stepsize = 0.0 if value is None else polyak_stepsize(
                value, sq_norm, float(group["fun_min"]), group["variant"], cap,
                float(group["delta"]), eps=eps)
            steps[id(group)] = _Step(stepsize, momentum)
            last_step.append({"loss": math.nan if value is None else value,
                              "grad_norm": float(np.sqrt(sq_norm)), "stepsize": stepsize})
        # 2. Update, from the same scans.
        for dispatcher, work in ((heavy_dispatcher, heavy_work), (plain_dispatcher, plain_work)):
            if work:
                dispatcher.rule.steps = steps
                try:
                    dispatcher.run(work)
                finally:
                    dispatcher.rule.steps = {}
        self.last_step = last_step
        return loss
