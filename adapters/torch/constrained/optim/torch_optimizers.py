r"""nuPI, a drop-in replacement for ``cooper.optim.nuPI`` that runs uniopt's kernels.

Dense gradients go through the shared dispatcher (:mod:`uniopt.adapters.torch._dispatch`): one
Numba table-kernel call per param group and dtype on CPU, a numba.cuda kernel on CUDA, and the
same rules (:mod:`uniopt.rules.constrained`) with torch ops elsewhere. Sparse COO gradients
(Cooper's ``IndexedMultiplier``) are coalesced and go to the indexed kernel on plain CPU tensors
(:func:`uniopt.kernels.constrained_cpu.indexed_nupi_`) and to an ``index_select`` /
``index_copy_`` torch-ops path otherwise: only the sampled rows are read or written.

As the dual optimizer of a ``ConstrainedOptimizer``, nuPI also takes the multipliers'
projection onto :math:`\lambda \ge 0` into its kernels (the ``lower`` bound of
:func:`uniopt.rules.constrained.nupi_param`, on every path): ``dual_step`` hands it the bounds
of the weights it may project (:mod:`uniopt.adapters.torch.constrained.optim._fused`), so a
multiplier is stepped and projected in one pass and an IndexedMultiplier's unsampled rows are
not touched. A plain ``step()`` projects nothing.

Deliberate differences from Cooper 1.0.1 (see ``docs/deviations.md``):

* the ``SGD`` initialisation follows Cooper's docstring, :math:`\xi_{-1} = e_0`, on dense and
  sparse gradients alike: step 1 is :math:`K_I e_0` and :math:`\xi_0 = e_0`. Cooper's dense
  path sets :math:`\xi_0 = 0` (its second step then differs), and its sparse path stores
  :math:`(1-\nu) e_0`;
* a scalar ``Kp``/``Ki`` with several param groups is accepted (Cooper raises
  ``NotImplementedError``); scalar gains are stored as float64 0-d tensors (Cooper's
  ``torch.tensor(Kp)`` rounds them to float32);
* :math:`\xi` is kept up to date at every step, also while :math:`K_P(1-\nu) = 0` (Cooper
  tracks it only while the proportional term is on, so turning ``Kp`` on mid-run differs);
* per-entry gains hold one gain per entry of each parameter of their group (any shape with
  that many elements; flat order), on dense and sparse gradients.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.optim.optimizer import Optimizer

from uniopt import _jit
from uniopt._validation import check_nonfinite, check_nupi
from uniopt.constrained import MASK_KEY, nuPIInitType
from uniopt.kernels import constrained_cpu
from uniopt.rules import bind
from uniopt.rules import constrained as _constrained

from ..._dispatch import Dispatcher, Rule, grad_labels, is_plain, nonfinite_gate, owned_copy

__all__ = ["nuPI", "nuPIInitType"]

_torch_rules = bind(_constrained, where=torch.where, maximum=torch.maximum,
                    minimum=torch.minimum)
_FRESH = "_uniopt_fresh"  # a marker in a state created this step, removed by that step
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _gain_tensor(value, what: str = "gain") -> torch.Tensor:
    """A gain as stored in a group: a tensor (a number becomes a float64 0-d tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    if np.ndim(value):  # per-entry gains are tensors on this face
        raise TypeError(f"Invalid {what}: {value!r} (expected a number or a tensor)")
    return torch.tensor(float(value), dtype=torch.float64)


def _host(value):
    """What :func:`uniopt._validation.check_nupi` reads: a tensor as a float64 NumPy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return value


class _Constants(NamedTuple):
    ki: float
    kpn: float
    nu: float
    signed_lr: float
    lr_decay: float
    sgd: bool
    ki_entries: Optional[torch.Tensor]  # per-entry gains (flat, float64) or None
    kpn_entries: Optional[torch.Tensor]
    lower: float = -np.inf  # the projection fused into the step (-inf: none)

    def coef(self, dtype) -> np.ndarray:
        return np.array([self.ki, self.kpn, self.nu, 1.0 - self.nu, self.signed_lr,
                         self.lr_decay, self.lower], dtype=dtype)

    def gains(self, like: torch.Tensor):
        """``(ki, kpn)`` for torch ops on ``like`` (numbers, or tensors shaped as ``like``)."""
        ki = self.ki if self.ki_entries is None else self.ki_entries.to(like).view(like.shape)
        kpn = self.kpn if self.kpn_entries is None else self.kpn_entries.to(like).view(like.shape)
        return ki, kpn

    def kernel_gains(self, dtype, shape=None) -> tuple:
        """``(ki, kpn)`` NumPy arrays of the kernels: one element, or per entry (``shape``)."""
        out = []
        for scalar, entries in ((self.ki, self.ki_entries), (self.kpn, self.kpn_entries)):
            if entries is None:
                out.append(np.full((1, 1) if shape else 1, scalar, dtype=dtype))
            else:
                a = np.ascontiguousarray(entries.detach().cpu().numpy(), dtype=dtype)
                out.append(a.reshape(shape) if shape else a)
        return tuple(out)


def _constants(group: dict, lower: float = -np.inf) -> _Constants:
    nu = float(group["ema_nu"])
    lr = float(group["lr"])
    kp, ki = _gain_tensor(group["Kp"]), _gain_tensor(group["Ki"])
    one_minus_nu = 1.0 - nu
    ki_entries = kpn_entries = None
    if ki.numel() == 1:
        ki_value = float(ki)
    else:
        ki_value, ki_entries = 0.0, ki.detach().reshape(-1).to(torch.float64)
    if kp.numel() == 1:
        kpn_value = float(kp) * one_minus_nu
    else:
        kpn_value, kpn_entries = 0.0, kp.detach().reshape(-1).to(torch.float64) * one_minus_nu
    return _Constants(ki_value, kpn_value, nu, lr if group["maximize"] else -lr,
                      lr * float(group["weight_decay"]), group["init_type"] == nuPIInitType.SGD,
                      ki_entries, kpn_entries, lower)


def _fresh(c: _Constants, state: dict) -> bool:
    """Whether this is the first step of a state created now, under the SGD initialisation."""
    return bool(state.pop(_FRESH, False)) and c.sgd


class _NuPIRule(Rule):
    name = "nuPI"
    buffers = ("xi",)

    def __init__(self):
        # id(group) -> the lower bound fused into that group's step (set by nuPI.step for the
        # duration of one step; ConstrainedOptimizer.dual_step's projection)
        self.lowers: dict = {}

    def init_state(self, p):
        return {"xi": torch.zeros_like(p, memory_format=torch.contiguous_format), _FRESH: True}

    def constants(self, group):
        return _constants(group, self.lowers.get(id(group), -np.inf))

    def run_table(self, c, table):
        rows = [row for row, a in enumerate(table.g_addrs) if a]
        fresh = np.zeros(len(table.rows), dtype=np.int64)
        for row in rows:
            fresh[row] = _fresh(c, table.states[row])
        if c.ki_entries is None and c.kpn_entries is None:
            kernel = (constrained_cpu.nupi_table_parallel_ if table.parallel
                      else constrained_cpu.nupi_table_)
            kernel(table.p_addrs, table.g_addrs, table.buffer_addrs[0], table.sizes, fresh,
                   c.coef(table.np_dtype))
            return
        coef = c.coef(table.np_dtype)
        ki, kpn = c.kernel_gains(table.np_dtype)
        for row in rows:  # per-entry gains: one flat kernel call per tensor
            p = table.params[row]
            g = table.owners[row].grad
            g = g if table.direct else g.to_local()
            xi = table.states[row]["xi"]
            kernel = (constrained_cpu.nupi_parallel_ if p.numel() >= _jit.PARALLEL_MIN_SIZE
                      else constrained_cpu.nupi_)
            kernel(p.detach().view(-1).numpy(), g.detach().reshape(-1).numpy(),
                   xi.detach().view(-1).numpy(), ki, kpn, coef,
                   np.array([fresh[row]], dtype=np.int64))

    def run_cuda(self, c, p, g, buffers, state, stream):
        from uniopt.kernels import constrained_cuda

        dtype = np.dtype(p.dtype)
        ki, kpn = c.kernel_gains(dtype)
        constrained_cuda.nupi_(p, g, buffers[0], ki, kpn, c.coef(dtype),
                               np.array([_fresh(c, state)], dtype=np.int64), stream)

    def run_torch(self, c, p, g, buffers, state):
        (xi,) = buffers
        fresh = torch.tensor(_fresh(c, state), device=p.device)
        ki, kpn = c.gains(p)
        e = g.to(p.dtype)
        direction = _torch_rules.nupi_direction(e, xi, fresh, ki, kpn)
        lower = torch.tensor(c.lower, dtype=p.dtype, device=p.device)
        new_p = _torch_rules.nupi_param(p, direction, c.signed_lr, c.lr_decay, lower)
        xi.copy_(_torch_rules.nupi_average(xi, e, fresh, c.nu, 1.0 - c.nu))
        p.copy_(new_p)


def _rows_of(p: torch.Tensor, g: torch.Tensor, coalesce: bool):
    """A sparse COO gradient of ``p`` as ``(rows, values, shape2d)``: linear row indices over
    its sparse dimensions (int64 ``(k,)``), values ``(k, width)`` and the ``(m, width)`` view
    of ``p`` they index. ``coalesce``: unique rows (``torch.Tensor.coalesce()``, which sorts);
    otherwise the entries as stored, repeats included (the CPU kernel sums them itself, in
    O(k): torch's coalesce costs more than the whole kernel step)."""
    if coalesce or g.is_coalesced():
        g = g.coalesce()
        indices, values = g.indices(), g.values()
    else:
        indices, values = g._indices(), g._values()
    sparse_dims = g.sparse_dim()
    rows = indices[0]
    for d in range(1, sparse_dims):
        rows = rows * p.shape[d] + indices[d]
    m = 1
    for size in p.shape[:sparse_dims]:
        m *= size
    width = p.numel() // m if m else 1
    return rows.contiguous(), values.reshape(rows.numel(), width), (m, width)


class nuPI(Optimizer):
    r"""The nuPI optimizer, a drop-in replacement for ``cooper.optim.nuPI``.

    A PI controller on the error :math:`e_t` = the gradient:

    .. math::
       \xi_t = \nu \xi_{t-1} + (1-\nu) e_t, \qquad
       \theta_{t+1} = \theta_t \mp \eta\,\big(K_I e_t + K_P (\xi_t - \xi_{t-1})\big)
       - \eta\, w\, \theta_t

    (:math:`+` with ``maximize``, the dual side of Cooper's constrained optimizers), with
    :math:`\eta` = ``lr``, :math:`K_P, K_I` = ``Kp, Ki``, :math:`\nu` = ``ema_nu`` and
    decoupled (AdamW-style) weight decay :math:`w`. ``init_type=nuPIInitType.ZEROS``:
    :math:`\xi_{-1} = 0`, so the first step has gain :math:`K_I + K_P(1-\nu)`;
    ``nuPIInitType.SGD`` (default): :math:`\xi_{-1} = e_0`, so each entry's first step is SGD's
    (:math:`K_I e_0`) and :math:`\xi_0 = e_0`, on dense and sparse gradients alike (Cooper's
    dense path instead sets :math:`\xi_0 = 0`; see the module docstring).
    ``nuPI(lr, Kp=0, Ki=1, ema_nu=0)`` is ``torch.optim.SGD(lr)``; ``Kp=Ki=1, ema_nu=0`` is the
    optimistic gradient method.

    Args:
      params: an iterable of parameters, or of dicts defining parameter groups.
      lr: learning rate :math:`\eta` (finite, >= 0).
      weight_decay: :math:`w` (finite, >= 0).
      Kp: proportional gain: a number or a 0-d/one-element tensor, or a tensor of per-entry
        gains with as many elements as each parameter of its group.
      Ki: integral gain (as ``Kp``).
      ema_nu: :math:`\nu`, in (-1, 1).
      init_type: :class:`nuPIInitType` (Cooper's enum works too).
      maximize: (bool) ascend instead of descend.
      nonfinite: (keyword) ``"propagate"`` (default, Cooper's behaviour), ``"raise"``
        (``FloatingPointError`` before anything changes) or ``"skip"`` (nothing changes; every
        group's ``nonfinite_skips`` is incremented), on the gradients (docs/faults.md). A
        fused dual step of a constrained optimizer (which does not call :meth:`step`) is
        covered by that optimizer's own ``nonfinite``.

    State per parameter: ``xi`` (:math:`\xi`) and, for sparse gradients under the ``SGD``
    initialisation, ``needs_error_initialization_mask`` (bool: the entries whose first step is
    still to come), as Cooper's. Sparse COO gradients (Cooper's ``IndexedMultiplier``) update
    only their rows (duplicates are summed first). A step that raises leaves parameters and
    state unchanged. Warnings as Cooper's: negative gains, all-zero gains, negative ``ema_nu``.

    Example:
      >>> import torch
      >>> lam = torch.nn.Parameter(torch.zeros(2))
      >>> opt = nuPI([lam], lr=0.5, Kp=1.0, Ki=1.0, maximize=True)
      >>> for e in ([1.0, -1.0], [2.0, -1.0]):
      ...     lam.grad = torch.tensor(e)
      ...     _ = opt.step()
      >>> lam.tolist()   # 0.5 e0, then + 0.5 (e1 + (e1 - e0))
      [2.0, -1.0]

    References:
      Sohrabi, Ramirez, Zhang, Lacoste-Julien & Gallego-Posada, "On PI controllers for updating
      Lagrange multipliers in constrained optimization", ICML 2024,
      https://arxiv.org/abs/2406.04558
    """

    def __init__(self, params, lr: float, weight_decay: Optional[float] = 0.0, Kp=0.0, Ki=1.0,
                 ema_nu: float = 0.0, init_type: nuPIInitType = nuPIInitType.SGD,
                 maximize: bool = False, *, nonfinite: str = "propagate", _backend: str = "auto"):
        self.nonfinite = check_nonfinite(nonfinite)
        kind = check_nupi(lr, weight_decay, _host(Kp), _host(Ki), ema_nu, init_type, maximize)
        defaults = {"lr": lr, "weight_decay": weight_decay, "Kp": _gain_tensor(Kp, "Kp"),
                    "Ki": _gain_tensor(Ki, "Ki"), "ema_nu": ema_nu, "maximize": bool(maximize),
                    "init_type": nuPIInitType[kind]}
        if self.nonfinite != "propagate":
            defaults["nonfinite_skips"] = 0
        self._dispatcher = Dispatcher(_NuPIRule(), _backend)
        self._subgroups: dict = {}
        super().__init__(params, defaults)

    # -- groups and checks -----------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        import warnings

        with warnings.catch_warnings():  # Cooper warns once, at construction
            warnings.simplefilter("ignore")
            check_nupi(group["lr"], group["weight_decay"], _host(group["Kp"]),
                       _host(group["Ki"]), group["ema_nu"], group["init_type"],
                       group.get("maximize", False))
        params = group.get("params", [])
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for key in ("Kp", "Ki"):
            n = _gain_tensor(group[key]).numel()
            for i, p in enumerate(params):
                if n != 1 and n != p.numel():
                    raise ValueError(f"Invalid {key} value: {n} per-entry gains for parameter "
                                     f"{i} of {p.numel()} entries")
                if n != 1 and p.is_complex():
                    raise ValueError(f"Invalid {key} value: per-entry gains for the complex "
                                     f"parameter {i} (use one gain)")

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            params = param_group.get("params")
            if params is not None and not isinstance(params, torch.Tensor):
                param_group = {**param_group, "params": list(params)}  # a generator: once
            self._check_group({**self.defaults, **param_group})
            for key in ("Kp", "Ki"):
                if key in param_group:
                    param_group = {**param_group, key: _gain_tensor(param_group[key])}
        super().add_param_group(param_group)
        self._dispatcher.invalidate()
        self._subgroups = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = {k: v for k, v in state.items() if k != "_subgroups"}
        return {**state, "_backend": self._dispatcher.backend}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        backend = state.pop("_backend", "auto")
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "propagate")
        if self.nonfinite != "propagate":
            for group in self.param_groups:
                group.setdefault("nonfinite_skips", 0)
        if "_dispatcher" not in self.__dict__:
            self._dispatcher = Dispatcher(_NuPIRule(), backend)
        self._subgroups = {}
        self._dispatcher.invalidate()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict (ours or Cooper's), copying its tensors; the mask is restored as a
        bool tensor (``torch.optim`` casts it to the parameter's dtype)."""
        super().load_state_dict(owned_copy(state_dict))
        for group in self.param_groups:
            for key in ("Kp", "Ki"):
                group[key] = _gain_tensor(group[key])
            for p in group["params"]:
                state = self.state.get(p)
                if state and MASK_KEY in state:
                    state[MASK_KEY] = state[MASK_KEY].bool()
        self._subgroups = {}
        self._dispatcher.invalidate()

    # -- stepping --------------------------------------------------------------------------
    def _split(self, group: dict):
        """``(dense_group, own)``: a group of the parameters the dispatcher steps (the group
        itself when that is every parameter), and the indices of those stepped here (sparse
        gradients, or dense ones on a parameter whose state has the per-entry mask)."""
        own = []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                own.append(i)
            else:
                s = self.state.get(p)
                if s and MASK_KEY in s:
                    own.append(i)
        if not own:
            return group, own
        keep = tuple(i for i in range(len(group["params"])) if i not in own)
        hit = self._subgroups.get(id(group))
        if hit is None or hit[0] is not group or hit[1] != keep:
            sub = {"params": [group["params"][i] for i in keep]}
            hit = self._subgroups[id(group)] = (group, keep, sub)
        sub = hit[2]
        sub.update({k: v for k, v in group.items() if k != "params"})
        return sub, own

    def _check_own(self, group: dict, i: int) -> None:
        p = group["params"][i]
        g = p.grad
        if g.layout not in (torch.strided, torch.sparse_coo):
            raise RuntimeError(f"nuPI: gradient of parameter {i} has layout {g.layout} "
                               f"(expected strided or sparse COO)")
        if g.shape != p.shape or g.device != p.device or not g.is_floating_point():
            raise RuntimeError(f"nuPI: gradient of parameter {i} (shape {tuple(g.shape)}, "
                               f"{g.dtype}, {g.device}) does not match the parameter (shape "
                               f"{tuple(p.shape)}, {p.dtype}, {p.device})")
        if p.dim() == 0 or p.is_complex():
            raise RuntimeError(f"nuPI: parameter {i} cannot take a sparse step (0-d or complex)")
        if g.layout == torch.sparse_coo and g.device.type == "cpu":
            # the kernel trusts its rows: a tensor built without invariant checks may hold
            # indices out of range (an O(k) check, before anything is written)
            indices = g._indices()
            for d in range(g.sparse_dim()):
                column = indices[d].contiguous().numpy()
                bad = constrained_cpu.first_out_of_range(column, p.shape[d]) if column.size else -1
                if bad >= 0:
                    raise RuntimeError(f"nuPI: sparse gradient of parameter {i} has index "
                                       f"{int(column[bad])} out of range for dimension {d} of "
                                       f"size {p.shape[d]}")
        s = self.state.get(p)
        if s:
            for key in ("xi", MASK_KEY):
                if key in s and (s[key].shape != p.shape or s[key].device != p.device):
                    raise RuntimeError(f"nuPI: state {key!r} of parameter {i} does not match it")

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Perform one optimization step.

        Args:
          closure: optional callable that re-evaluates the model and returns the loss; it is
            called once, with gradients enabled, before the update.

        Returns:
          The closure's return value (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lowers = self.__dict__.get("_fused_lowers")  # {id(p): lower} from dual_step, or None
        report: dict = {}
        rule_lowers = self._dispatcher.rule.lowers
        groups, owns = [], []
        try:
            for group in self.param_groups:
                sub, own = self._split(group)
                groups.append(sub)
                owns.append(own)
                for i in own:
                    self._check_own(group, i)
                if lowers:
                    self._fuse_group(sub, lowers, rule_lowers, report)
            work = self._dispatcher.collect(groups, self.state)  # checks; nothing changed yet
            if self.nonfinite != "propagate" and not nonfinite_gate(
                    self, grad_labels(self.param_groups), self.param_groups):
                return loss
            self._dispatcher.run(work)
        finally:
            rule_lowers.clear()
        for group, own in zip(self.param_groups, owns):
            if own:
                c = _constants(group)
                for i in own:
                    p = group["params"][i]
                    lower = lowers.get(id(p)) if lowers else None
                    if lowers:
                        report[id(p)] = ("none" if lower is None else
                                         "full" if p.grad.layout == torch.strided else "rows")
                    self._step_rows(group, c if lower is None else c._replace(lower=lower), p)
        if lowers:
            self._fused_report = report
        return loss

    @staticmethod
    def _fuse_group(sub: dict, lowers: dict, rule_lowers: dict, report: dict) -> None:
        """Fuse a projection into the dispatcher's step of ``sub`` (a group's dense gradients)
        when every parameter stepped there has the same lower bound in ``lowers``; the report
        says per parameter whether it was projected (``"full"``) or not (``"none"``)."""
        dense = [p for p in sub["params"] if p.grad is not None]
        bounds = {lowers.get(id(p)) for p in dense}
        fused = len(bounds) == 1 and None not in bounds
        if fused:
            rule_lowers[id(sub)] = bounds.pop()
        for p in dense:
            report[id(p)] = "full" if fused else "none"

    def _step_rows(self, group: dict, c: _Constants, p: torch.Tensor) -> None:
        """One step of the rows of a sparse gradient (or every row, for a dense gradient on a
        parameter with the per-entry mask): the indexed kernel or torch ops on those rows."""
        g = p.grad
        state = self.state[p]
        xi, mask = state.get("xi"), state.get(MASK_KEY)
        kernel = (self._dispatcher.backend != "torch" and p.device.type == "cpu"
                  and p.dtype in _NUMPY_DTYPES and is_plain(p) and p.is_contiguous()
                  and (xi is None or (is_plain(xi) and xi.is_contiguous()
                                      and xi.dtype == p.dtype))
                  and (mask is None or (mask.is_contiguous() and mask.dtype == torch.bool)))
        if g.layout == torch.strided:
            m = p.shape[0]
            rows = torch.arange(m, device=p.device)
            values = g.reshape(m, -1)
            shape2d = (m, values.shape[1])
        else:
            rows, values, shape2d = _rows_of(p, g, coalesce=not kernel)
        if rows.numel() == 0:  # an empty gradient: no state, no step (as Cooper)
            return
        if xi is None:
            xi = state["xi"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if c.sgd:
                mask = state[MASK_KEY] = torch.ones_like(p, dtype=torch.bool,
                                                         memory_format=torch.contiguous_format)
        values = values.to(p.dtype)
        if kernel:
            self._rows_kernel(c, p, rows, values, xi, mask, shape2d)
        else:
            self._rows_torch(c, p, rows, values, xi, mask, shape2d)
        torch.autograd.graph.increment_version(p)

    @staticmethod
    def _rows_kernel(c, p, rows, values, xi, mask, shape2d) -> None:
        dtype = _NUMPY_DTYPES[p.dtype]
        ki, kpn = c.kernel_gains(dtype, shape2d)
        constrained_cpu.indexed_nupi_(
            p.detach().view(shape2d).numpy(), rows.to(torch.int64).numpy(),
            values.detach().contiguous().numpy(), xi.view(shape2d).numpy(),
            mask.view(shape2d).numpy() if mask is not None else np.zeros((1, 1), dtype=bool),
            ki, kpn, c.coef(dtype), np.array([mask is not None], dtype=np.int64))

    @staticmethod
    def _rows_torch(c, p, rows, values, xi, mask, shape2d) -> None:
        p2 = p.reshape(shape2d)  # a view of a contiguous p; else a copy written back below
        xi2 = xi.reshape(shape2d)
        pr, xr = p2.index_select(0, rows), xi2.index_select(0, rows)
        if mask is not None:
            mask2 = mask.reshape(shape2d)
            fresh = mask2.index_select(0, rows)
        else:
            fresh = torch.zeros((), dtype=torch.bool, device=p.device)
        ki, kpn = c.ki, c.kpn
        if c.ki_entries is not None:
            ki = c.ki_entries.to(p).view(shape2d).index_select(0, rows)
        if c.kpn_entries is not None:
            kpn = c.kpn_entries.to(p).view(shape2d).index_select(0, rows)
        direction = _torch_rules.nupi_direction(values, xr, fresh, ki, kpn)
        lower = torch.tensor(c.lower, dtype=p.dtype, device=p.device)
        new_p = _torch_rules.nupi_param(pr, direction, c.signed_lr, c.lr_decay, lower)
        new_xi = _torch_rules.nupi_average(xr, values, fresh, c.nu, 1.0 - c.nu)
        p2.index_copy_(0, rows, new_p)
        xi2.index_copy_(0, rows, new_xi)
        if p2.data_ptr() != p.data_ptr() or not p.is_contiguous():
            p.copy_(p2.view(p.shape))
        if xi2.data_ptr() != xi.data_ptr() or not xi.is_contiguous():
            xi.copy_(xi2.view(xi.shape))
        if mask is not None:
            mask2.index_fill_(0, rows, False)
            if mask2.data_ptr() != mask.data_ptr() or not mask.is_contiguous():
                mask.copy_(mask2.view(mask.shape))

