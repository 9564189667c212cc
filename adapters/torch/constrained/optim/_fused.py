r"""The fast dual step of :class:`~uniopt.adapters.torch.constrained.optim.ConstrainedOptimizer`.

Cooper's dual step is ``dual_optimizer.step()`` for every dual optimizer, then
``multiplier.post_step_()`` for every multiplier: for an inequality multiplier a relu over *all*
its rows, a second pass over memory, and for an
:class:`~uniopt.adapters.torch.constrained.multipliers.IndexedMultiplier` a pass over millions
of rows of which a thousand moved. :class:`DualStep` routes each dual parameter to the core
kernels where that is exactly the ordinary step, and leaves everything else on the ordinary path:

* **SGD** -- a ``torch.optim.SGD`` (exact type, no step hooks), per parameter: a weight of
  one of the problem's explicit multipliers (Dense or Indexed, whose ``post_step_`` is the
  library's own), in no other dual optimizer, in a group with ``maximize=True``,
  ``momentum == 0``, ``weight_decay == 0``, a Python-number ``lr`` and neither ``fused`` nor
  ``differentiable``: a dense
  gradient goes to :func:`uniopt.kernels.constrained_cpu.sgd_projected_` (``max(lambda + lr g,
  lo)``, ``lo`` = 0 for an inequality multiplier and ``-inf`` for an equality one: step and
  projection in one pass); a sparse COO gradient (an IndexedMultiplier's) to
  :func:`~uniopt.kernels.constrained_cpu.indexed_sgd_projected_` (only the sampled rows are
  read and written; a repeated row's values are summed first, then added). On
  CUDA tensors, the numba.cuda kernels of :mod:`uniopt.kernels.constrained_cuda` when
  :func:`~uniopt.adapters.torch._dispatch.cuda_kernels_usable` (the rows coalesced by torch
  first), else the ordinary step. The weight and its gradient must be plain, contiguous
  float32/float64 tensors. The parameters that do not qualify are stepped by ``SGD.step()``
  itself, with the fused parameters' gradients hidden from it (the same gradient objects are
  put back), and then ``post_step_()``-ed.
* **nuPI** -- uniopt's :class:`~uniopt.adapters.torch.constrained.optim.nuPI` (exact type, not
  ``_backend="torch"``) runs its own ``step()`` with the projection's bound fused into its
  kernels (the rule's ``lower``), per parameter: a weight that does not qualify (as above) or a
  group whose dense gradients mix inequality and equality multipliers is stepped unprojected
  and then ``post_step_()``-ed.
* **everything else** (Adam, SGD with momentum or weight decay, a subclass, step hooks on the
  optimizer or global ones, a ``step`` replaced on the instance other than by an LR scheduler,
  implicit multipliers, a weight shared with another optimizer): ``step()`` and
  ``post_step_()``, as Cooper.

The fused SGD step never calls ``SGD.step``; it keeps what torch observes of one: an LR
scheduler's "optimizer.step() was called" flag (``_opt_called``) is set, ``lr`` is read at every
step (schedulers keep working), the optimizer state stays empty (SGD without momentum has
none), the gradients are only read, and each stepped weight's version counter moves by one, as
an in-place ``add_`` moves it.

Equality of the results: the SGD routes agree with the ordinary path to one ulp per
contribution to an entry. torch's CPU ``p.add_(g, alpha=lr)`` evaluates ``p + lr * g`` with a
fused multiply-add (one rounding) in its vectorised loop, and on an uncoalesced sparse gradient
adds each stored entry in turn that way; the kernels never fuse (``fastmath=False``) and add a
row's sampled values first (about 2% of random float64 entries differ by one ulp on dense
gradients). The projection (``max``) is exact on both paths. nuPI's fused projection is
bitwise the relu after its step.

Feasibility of the rows that were not sampled: the indexed routes project only the rows they
update, so the others must already be feasible. That holds from the second step on: a
multiplier's weight is trusted once a dual step has left all its rows feasible, and stays
trusted while its data pointer and autograd version counter are the ones that step left
(``load_state_dict``, in-place torch ops and other optimizers move the counter). An untrusted
inequality multiplier -- the first dual step of a :class:`DualStep`, a freshly loaded
checkpoint, a weight written since -- gets its full ``post_step_()`` after the fused step,
once. Writes that bypass the version counter (through ``weight.data`` or ``.numpy()``) are not
seen: call ``multiplier.post_step_()`` after such a write.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from uniopt import _jit
from uniopt.kernels import constrained_cpu

from ..._dispatch import cuda_kernels_usable, is_plain
from ..multipliers import ExplicitMultiplier
from ..utils import ConstraintType
from .torch_optimizers import _rows_of, nuPI

__all__ = ["DualStep", "ROUTES"]

#: The routes a dual parameter can take (``DualStep.last_routes`` values).
ROUTES = ("cpu_dense", "cpu_indexed", "cuda_dense", "cuda_indexed", "nupi", "ordinary")

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_LIBRARY_POST_STEP = ExplicitMultiplier.post_step_


# ----------------------------------------------------------------------------------------------
# Eligibility
# ----------------------------------------------------------------------------------------------
def _device_route(p: torch.Tensor) -> Optional[str]:
    """``"cpu"`` or ``"cuda"`` (numba.cuda usable) for a tensor the kernels may step, else None."""
    if p.device.type == "cpu":
        return "cpu"
    if p.device.type == "cuda" and cuda_kernels_usable():
        return "cuda"
    return None


def _plain_weight(p: torch.Tensor) -> Optional[str]:
    """The device route of a weight the kernels may step in place (plain, contiguous,
    float32/float64, not empty), else None."""
    if not is_plain(p) or p.dtype not in _NUMPY_DTYPES or not p.is_contiguous() or p.numel() == 0:
        return None
    return _device_route(p)


def _no_hooks(opt: torch.optim.Optimizer) -> bool:
    """No step hooks (the optimizer's or global ones) and ``step`` not replaced on the instance
    other than by an LR scheduler's bookkeeping wrapper."""
    if (opt.__dict__.get("_optimizer_step_pre_hooks") or opt.__dict__.get("_optimizer_step_post_hooks")
            or _torch_optimizer._global_optimizer_pre_hooks
            or _torch_optimizer._global_optimizer_post_hooks):
        return False
    step = opt.__dict__.get("step")
    if step is None:
        return True
    return (getattr(step, "_wrapped_by_lr_sched", False)
            and getattr(step, "__wrapped__", None) is type(opt).step)


def _owned_multiplier(m: Any) -> bool:
    """A Dense/Indexed multiplier whose ``post_step_`` is the library's (the relu we fuse)."""
    return isinstance(m, ExplicitMultiplier) and type(m).post_step_ is _LIBRARY_POST_STEP


def _lower(m: ExplicitMultiplier) -> float:
    return 0.0 if m.constraint_type == ConstraintType.INEQUALITY else -np.inf


class _Entry(NamedTuple):
    """One weight's fused SGD step, as planned (nothing changed yet)."""

    p: torch.Tensor
    kind: str  # "cpu_dense", "cpu_indexed", "cuda_dense", "cuda_indexed"
    lower: float
    lr: float
    sparse: Any  # (rows, values, shape2d) of an indexed step, else None


def _check_rows(p: torch.Tensor, g: torch.Tensor, sparse) -> None:
    """Raise (before anything is written) if a sparse gradient holds an index out of range
    (``sparse``: its ``(rows, values, shape2d)``; with one sparse dimension the rows are the
    indices themselves)."""
    indices = g._indices()
    for d in range(g.sparse_dim()):
        column = sparse[0] if g.sparse_dim() == 1 else indices[d]
        if column.numel() == 0:
            continue
        if column.device.type == "cpu":
            bad = constrained_cpu.first_out_of_range(column.contiguous().numpy(), p.shape[d])
            value = int(column[bad]) if bad >= 0 else None
        else:
            lo, hi = int(column.min()), int(column.max())
            value = lo if lo < 0 else hi if hi >= p.shape[d] else None
        if value is not None:
            raise RuntimeError(f"SGD: sparse gradient has index {value} out of range for "
                               f"dimension {d} of size {p.shape[d]}")


def _plan_sgd(opt: torch.optim.Optimizer, counts: Counter, owners: dict):
    """``(entries, rest, idle)`` of an SGD dual optimizer, or None when all of it must take
    the ordinary path: the fused steps planned (nothing changed yet), the parameters with a
    gradient that ``opt.step()`` must step (their group or their weight does not qualify),
    and the qualifying parameters without a gradient."""
    if type(opt) is not torch.optim.SGD or not _no_hooks(opt):
        return None
    entries, rest, idle = [], [], []
    for group in opt.param_groups:
        lr = group["lr"]
        plain_group = not (
            not group.get("maximize", False) or group.get("momentum", 0) != 0
            or group.get("weight_decay", 0) != 0 or group.get("fused") or group.get("differentiable")
            or isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)))
        for p in group["params"]:
            entry = _sgd_entry(p, owners, counts, float(lr)) if plain_group else None
            if entry is None:
                if p.grad is not None:
                    rest.append(p)
            elif entry is _IDLE:
                idle.append(p)
            else:
                entries.append(entry)
    return entries, rest, idle


_IDLE = object()  # a qualifying parameter without a gradient


def _sgd_entry(p: torch.Tensor, owners: dict, counts: Counter, lr: float):
    """The fused SGD step of ``p`` (an :class:`_Entry`), ``_IDLE``, or None (ordinary)."""
    m = owners.get(id(p))
    if m is None or counts[id(p)] != 1:
        return None
    g = p.grad
    device = _plain_weight(p)
    if device is None:
        return None
    if g is None:
        return _IDLE
    if g.device != p.device or g.shape != p.shape or g.dtype != p.dtype:
        return None
    if g.layout == torch.strided:
        if not is_plain(g) or not g.is_contiguous():
            return None
        return _Entry(p, device + "_dense", _lower(m), lr, None)
    if g.layout != torch.sparse_coo:
        return None
    sparse = _rows_of(p, g, coalesce=device == "cuda")
    _check_rows(p, g, sparse)
    return _Entry(p, device + "_indexed", _lower(m), lr, sparse)


def _plan_nupi(opt: torch.optim.Optimizer, counts: Counter, owners: dict) -> Optional[dict]:
    """``{id(weight): lower}`` of the weights whose projection a nuPI step can fuse, or None."""
    if type(opt) is not nuPI or opt._dispatcher.backend == "torch" or not _no_hooks(opt):
        return None
    lowers = {}
    for group in opt.param_groups:
        for p in group["params"]:
            m = owners.get(id(p))
            if m is not None and counts[id(p)] == 1 and _plain_weight(p):
                lowers[id(p)] = _lower(m)
    return lowers or None


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------
def _run_cpu(e: _Entry) -> None:
    p, dtype = e.p, _NUMPY_DTYPES[e.p.dtype]
    coef = np.array([e.lr, e.lower], dtype=dtype)  # maximize=True: ascent, signed_lr = +lr
    if e.sparse is None:
        g = p.grad
        if p.numel() >= _jit.PARALLEL_MIN_SIZE:
            threads = torch.get_num_threads()  # numba's OpenMP pool may change it
            constrained_cpu.sgd_projected_parallel_(p.detach().view(-1).numpy(),
                                                    g.detach().view(-1).numpy(), coef)
            torch.set_num_threads(threads)
        else:
            constrained_cpu.sgd_projected_(p.detach().view(-1).numpy(),
                                           g.detach().view(-1).numpy(), coef)
        return
    rows, values, shape2d = e.sparse
    if rows.numel():
        if values.dtype != p.dtype or not values.is_contiguous():
            values = values.to(p.dtype).contiguous()
        constrained_cpu.indexed_sgd_projected_(p.detach().view(shape2d).numpy(), rows.numpy(),
                                               values.numpy(), coef)


@contextlib.contextmanager
def _cuda_stream(device: torch.device):
    """numba.cuda's context for ``device`` and torch's current stream on it."""
    from numba import cuda

    with cuda.gpus[device.index or 0]:
        yield cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)


def _device_array(t: torch.Tensor):
    """A numba device array over a CUDA tensor's memory (no copy)."""
    from numba import cuda

    return cuda.as_cuda_array(t.detach(), sync=False)


def _run_cuda(e: _Entry) -> None:
    from uniopt.kernels import constrained_cuda

    p = e.p
    coef = np.array([e.lr, e.lower], dtype=_NUMPY_DTYPES[p.dtype])
    with _cuda_stream(p.device) as stream:
        if e.sparse is None:
            constrained_cuda.sgd_projected_(_device_array(p.view(-1)),
                                            _device_array(p.grad.view(-1)), coef, stream)
            return
        rows, values, shape2d = e.sparse  # coalesced: unique rows, as the kernel requires
        if rows.numel():
            constrained_cuda.indexed_sgd_projected_(
                _device_array(p.view(shape2d)), _device_array(rows.contiguous()),
                _device_array(values.to(p.dtype).contiguous()), coef, stream)


def _mark_stepped(opt: torch.optim.Optimizer) -> None:
    """What ``opt.step()`` would have told an LR scheduler (torch's ``_opt_called`` flag)."""
    if getattr(opt.__dict__.get("step"), "_wrapped_by_lr_sched", False):
        opt._opt_called = True


class DualStep:
    """The routed dual step of one constrained optimizer (see the module docstring).

    Attributes:
      last_routes: ``{id(weight): route}`` of the last :meth:`step`, a route of :data:`ROUTES`
        for every dual parameter that had a gradient (for tests and debugging).
    """

    def __init__(self) -> None:
        self._trusted: dict = {}  # id(multiplier) -> (weight, data_ptr, version): all rows feasible
        self.last_routes: dict = {}

    @staticmethod
    def _step_rest(opt, entries: list, routes: dict, rest: list) -> None:
        """``opt.step()`` with the fused parameters' gradients hidden (restored after)."""
        hidden = [(e.p, e.p.grad) for e in entries]
        try:
            for p, _ in hidden:
                p.grad = None
            opt.step()
        finally:
            for p, g in hidden:
                p.grad = g
        routes.update((id(p), "ordinary") for p in rest)

    def _is_trusted(self, m: ExplicitMultiplier) -> bool:
        record = self._trusted.get(id(m))
        w = m.weight
        return (record is not None and record[0] is w and record[1] == w.data_ptr()
                and record[2] == w._version)

    def _trust(self, m: ExplicitMultiplier) -> None:
        w = m.weight
        self._trusted[id(m)] = (w, w.data_ptr(), w._version)

    def step(self, dual_optimizers, multipliers: list) -> None:
        """Step every dual optimizer and project every multiplier (each once), under
        ``torch.no_grad()`` (the caller's).

        Args:
          dual_optimizers: the constrained optimizer's dual optimizers, in order.
          multipliers: the problem's multipliers, each once.

        Raises:
          RuntimeError: a sparse gradient with an index out of range (nothing changed), or
            whatever an ordinary ``step()`` raises.
        """
        counts = Counter(id(p) for opt in dual_optimizers for group in opt.param_groups
                         for p in group["params"])
        owners: dict = {}
        for m in multipliers:
            if _owned_multiplier(m):  # a weight shared by two multipliers: neither is fused
                owners[id(m.weight)] = None if id(m.weight) in owners else m
        plans = [_plan_sgd(opt, counts, owners) for opt in dual_optimizers]  # checks; no writes
        trusted = {id(m): self._is_trusted(m) for m in multipliers if _owned_multiplier(m)}
        handled: dict = {}  # id(weight) -> "full" / "rows" / "none" / "idle" (fused, not stepped)
        routes: dict = {}
        for opt, plan in zip(dual_optimizers, plans):
            if plan is not None:
                entries, rest, idle = plan
                if rest:  # the parameters that do not qualify: opt.step() on them alone
                    self._step_rest(opt, entries, routes, rest)
                for p in idle:
                    handled[id(p)] = "idle"
                for e in entries:
                    (_run_cpu if e.kind.startswith("cpu") else _run_cuda)(e)
                    torch.autograd.graph.increment_version(e.p)  # as SGD's in-place add_
                    handled[id(e.p)] = "full" if e.sparse is None else "rows"
                    routes[id(e.p)] = e.kind
                _mark_stepped(opt)
                continue
            lowers = _plan_nupi(opt, counts, owners)
            if lowers is None:
                opt.step()
                for group in opt.param_groups:
                    routes.update((id(p), "ordinary") for p in group["params"] if p.grad is not None)
                continue
            opt._fused_lowers = lowers
            try:
                opt.step()
            finally:
                del opt._fused_lowers
            report = opt.__dict__.pop("_fused_report", {})
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in lowers:
                        handled[id(p)] = report.get(id(p), "idle")
                    if p.grad is not None:
                        routes[id(p)] = "nupi" if report.get(id(p), "none") != "none" else "ordinary"
        for m in multipliers:
            state = handled.get(id(m.weight)) if _owned_multiplier(m) else None
            if state is None or state == "none":
                m.post_step_()
            elif m.constraint_type == ConstraintType.INEQUALITY:
                if state != "full" and not trusted[id(m)]:
                    m.post_step_()  # rows the step did not touch may be infeasible: once
            if _owned_multiplier(m) and m.constraint_type == ConstraintType.INEQUALITY:
                self._trust(m)  # every row is feasible now
        self.last_routes = routes
