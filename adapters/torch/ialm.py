r"""iALM for PyTorch: the augmented-Lagrangian dual optimizer with an adaptive dual step.

:class:`iALM` is a :class:`torch.optim.Optimizer` and a drop-in for
``humancompatible.train.dual_optim.iALM`` (0.4.2): each param group is one constraint group
whose ``params`` is ``[multipliers]``, with its hyper-parameters beside it; ``zero_grad``,
``add_param_group``, step hooks, state-dict hooks, ``bounds`` and ``violation()`` are there,
and state dicts load both ways between the two libraries. The arithmetic is
:mod:`uniopt.rules.ialm`. The dual step runs through the shared
:class:`uniopt.adapters.torch._dispatch.Dispatcher` as a rule (:class:`_DualStepRule`) whose
parameter is a group's multipliers, whose "gradient" is the group's slice of the constraint
values (handed to ``collect(..., grads=...)``) and whose state is the group itself
(``momentum_buffer``, humancompatible-train's layout); each group's step goes one of three ways:

* **table** -- CPU float32/float64 contiguous multipliers and constraint values: the Numba
  kernel :func:`uniopt.kernels.ialm_cpu.ialm_dual_step_` on zero-copy
  ``tensor.detach().numpy()`` views, one call per group and update;
* **cuda** -- CUDA float32/float64 contiguous multipliers (numba-cuda installed, not its
  simulator): ``uniopt.kernels.ialm_cuda.dual_step_``, same contract on device arrays;
* **torch** -- anything else (bfloat16/float16, other devices, tensor subclasses, a forced
  ``_backend="torch"``): the same rules executed with torch ops.

A step that raises changes nothing. The CPU kernel writes nothing for a direction that is not
finite (its first pass is read-only), so the first group, on that path, needs no check of its
own; the other groups (and a first group on the cuda or torch path, which write the momentum
buffer before the norm tells) have their constraint values checked before anything changes.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from uniopt._validation import (check_ialm_group, check_ialm_size, check_nonfinite, check_penalty,
                                nonnegative_finite, real)
from uniopt.kernels import ialm_cpu
from uniopt.rules import bind
from uniopt.rules import ialm as _rules

from ._dispatch import Dispatcher, Rule, group_average, nonfinite_gate, resolve_process_group

__all__ = ["iALM"]

BACKENDS = ("auto", "torch")
#: The per-group settings (besides ``params``, ``momentum_buffer``, ``bound`` and ``dtype_fixed``).
_SETTINGS = ("beta", "sigma", "gamma", "momentum", "dampening", "dual_range", "is_ineq")

# penalty_violation, max(c, 0), as one clamp: the rule's maximum(c, c * 0) would make a zero
# tensor first (a second pass over the constraints); same values, same zero-or-positive result
_torch_rules = bind(_rules, where=torch.where, minimum=torch.minimum, maximum=torch.maximum,
                    sqrt=torch.sqrt, penalty_violation=lambda c: torch.clamp(c, min=0))


class _NotFinite(Exception):
    """A group's dual step met a direction that is not finite and wrote nothing."""

    def __init__(self, group: dict):
        super().__init__(group.get("name"))
        self.group = group


def _direction(group: dict, c: torch.Tensor, buffer: torch.Tensor, ctol: float) -> torch.Tensor:
    """A group's dual direction with torch ops (nothing written): the ``ctol`` filter of the
    constraint values, then, with momentum, the new buffer values."""
    d = _torch_rules.filtered(c, ctol, group["is_ineq"])
    if group["momentum"] != 0:
        d = _torch_rules.momentum_direction(buffer, d, group["momentum"], 1.0 - group["dampening"])
    return d


class _DualStepRule(Rule):
    """iALM's dual step as :class:`uniopt.adapters.torch._dispatch.Dispatcher` runs it.

    The parameter is a group's multipliers (its one tensor), the gradient the group's
    constraint values (given to ``collect``, cast to the multipliers' dtype and device), the
    state the group dict itself (``momentum_buffer``). Each run returns ``(direction_norm,
    stepsize)``, or raises :class:`_NotFinite` having written nothing. ``ctol`` is the
    optimizer's (set before each step); ``arguments`` caches the kernels' argument arrays
    (:func:`uniopt.kernels.ialm_cpu.group_arguments`).
    """

    name = "iALM"
    buffers = ("momentum_buffer",)
    returns = True
    local_views = False  # the norm is over the whole tensor: subclasses run their own ops
    bump_versions = False  # as before the dispatcher: the kernel path leaves version counters

    def __init__(self):
        self.ctol = 0.0
        self.arguments: dict = {}

    def state_of(self, group, index, p, state):
        return group

    def new_state(self, group, index, p, state):  # every group has its buffer
        raise RuntimeError(f"iALM group {group.get('name')!r} has no momentum buffer")

    def constants(self, group):
        return group

    def run_table(self, group, table):
        arrays = table.cache.get("arrays")
        if arrays is None:  # zero-copy views, kept while the table lives
            arrays = table.cache["arrays"] = (table.params[0].detach().numpy(),
                                              table.buffers(0)[0].detach().numpy())
        coef, hyper, flags = ialm_cpu.group_arguments(self.arguments, group, arrays[0].dtype,
                                                      self.ctol)
        _, stepsize, norm = ialm_cpu.ialm_dual_step_(arrays[0], arrays[1], table.grads[0].numpy(),
                                                     coef, hyper, flags)
        if stepsize != stepsize:  # NaN: nothing was written
            raise _NotFinite(group)
        return float(norm), float(stepsize)

    def run_cuda(self, group, p, g, buffers, state, stream):
        """``uniopt.kernels.ialm_cuda.dual_step_`` on the device arrays, on ``stream``.

        ``coef``, ``hyper`` and ``flags`` are host arrays the kernel stages. Reading ``(norm,
        stepsize)`` back for ``last_step`` synchronises with that stream. (The face checks
        such a group's constraints first: this kernel writes the buffer before the norm.)
        """
        from uniopt.kernels import ialm_cuda

        coef, hyper, flags = ialm_cpu.group_arguments(self.arguments, group, np.dtype(p.dtype),
                                                      self.ctol)
        out = ialm_cuda.dual_step_(p, buffers[0], g, coef, hyper, flags, stream=stream)
        if hasattr(out, "copy_to_host"):
            host = out.copy_to_host(stream=stream)
            stream.synchronize()
        else:  # the simulator: a host array
            host = np.asarray(out)
        if host[1] != host[1]:
            raise _NotFinite(group)
        return float(host[2]), float(host[1])  # out: (sq_norm, stepsize, norm, ...)

    def run_torch(self, group, duals, c, buffers, state):
        """The dual step with torch ops (any dtype, device and layout), in place.

        The norm is that of the float64 direction; when its square over- or underflows (not
        finite, or 0 for a non-zero direction) it is taken scaled by ``max|d|``. Nothing is
        written when the direction is not finite.
        """
        buffer = buffers[0]
        d = _direction(group, c, buffer, self.ctol)
        d64 = d.to(torch.float64)
        sq_norm = float(torch.sum(torch.square(d64)))
        f64 = dict(dtype=torch.float64, device=duals.device)
        beta, gamma = torch.tensor(group["beta"], **f64), torch.tensor(group["gamma"], **f64)
        if math.isfinite(sq_norm) and (sq_norm > 0 or not bool((d64 != 0).any())):
            step = _torch_rules.dual_stepsize(beta, gamma, torch.tensor(sq_norm, **f64))
            norm = math.sqrt(sq_norm)
        else:  # BLAS nrm2's scaling: ||d|| = scale * sqrt(sum((d / scale)^2))
            scale = d64.abs().max()
            if not math.isfinite(float(scale)):
                raise _NotFinite(group)
            sq_scaled = torch.sum(torch.square(d64 / scale)) if scale > 0 else scale * 0
            norm = float(scale) * math.sqrt(float(sq_scaled))
            step = _torch_rules.scaled_dual_stepsize(beta, gamma, scale, sq_scaled)
        if group["momentum"] != 0:
            buffer.copy_(d)
        stepsize = float(step)
        like = dict(dtype=duals.dtype, device=duals.device)
        duals.copy_(_torch_rules.dual_update(duals, d, step.to(duals.dtype),
                                             torch.tensor(group["lower_bound"], **like),
                                             torch.tensor(group["upper_bound"], **like)))
        return norm, stepsize


class iALM(torch.optim.Optimizer):  # noqa: N801 (the seed's name)
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
    humancompatible-train 0.4.x does). A zero direction gives a zero step, never NaN; a norm
    whose square over- or underflows is computed scaled (as BLAS ``nrm2``), so finite
    constraints give finite multipliers. Violations within ``ctol`` count as satisfied:
    before the dual step and in :math:`\tilde c`, :math:`c \leftarrow 0` where :math:`|c| \le`
    ``ctol`` (equality) or :math:`0 < c \le` ``ctol`` (inequality); the linear term uses the
    raw :math:`c`.

    Entry points: :meth:`forward` (``L`` at the current multipliers, changes nothing),
    :meth:`update` (the dual update only), :meth:`step` (= :meth:`update`, running the
    optimizer's step hooks) and :meth:`forward_update` (update, then ``L`` with the new
    multipliers and the old :math:`\beta`). ``L`` is differentiable with respect to whatever
    the loss and constraints depend on (the multipliers are constants) and has the loss's
    dtype; ``forward`` -> ``update`` -> ``backward`` works (the graph keeps the multipliers it
    was built with; humancompatible-train raises there). Constraints may be a flat tensor
    (all groups, in order), a sequence of per-group tensors, or a mapping from group name to
    tensor. After each update, ``last_step`` holds one dict per group: ``{"direction_norm",
    "stepsize", "rho"}`` (``rho``: the quadratic coefficient of that update's Lagrangian). A
    step that raises (wrong sizes, wrong mapping keys, non-finite constraint values, which
    are named by group) changes nothing.

    Param groups (``param_groups[k]``, torch's layout): ``params`` = ``[multipliers]`` (a 1-D
    floating tensor, updated in place), ``momentum_buffer``, ``name``, ``beta``, ``sigma``,
    ``gamma`` (floats; ``beta`` grows by ``sigma`` per update), ``momentum``, ``dampening``,
    ``dual_range``, ``lower_bound``, ``upper_bound``, ``is_ineq``, ``bound`` (the constraints'
    right-hand side for :meth:`violation`, or ``None``) and ``dtype_fixed``.

    dtypes: multipliers made from ``None`` or a number are created in torch's default dtype,
    as humancompatible-train does, so ``duals @ c`` works right after construction. The first
    update settles their dtype: they take that of the constraint values passed to it (an
    initial number is then re-created exactly in that dtype, so ``init_duals=0.1`` is
    ``float64(0.1)`` with float64 constraints). Multipliers given as a tensor keep its dtype.
    Later constraints of another dtype are cast to the multipliers' dtype for the update; the
    Lagrangian is computed in the promoted dtype and returned in the loss's.

    Args:
      m: number of constraints of the first group (or give ``init_duals``).
      beta: the first group's dual step cap :math:`\beta` (>= 0).
      sigma: its growth factor :math:`\sigma` per update (> 0).
      gamma: its :math:`\gamma` (>= 0).
      init_duals: initial multipliers: ``None`` (zeros), a number, or a 1-D floating tensor
        (copied; the multipliers keep its dtype and device).
      penalty: :math:`\rho` (>= 0), or ``None`` for each group's :math:`\beta_k`.
      dual_range: ``(low, high)`` clamp of the multipliers (``None`` entries: unbounded); also
        the range of groups added with ``dual_range=None``.
      momentum: :math:`\mu` in [0, 1] (also the default of groups added later).
      dampening: :math:`\delta` in [0, 1] (also the default of groups added later).
      is_ineq: whether the first group's constraints are inequalities :math:`c \le 0`.
      ctol: violations within ``ctol`` (>= 0) count as satisfied.
      device: where the multipliers live (default: the CPU, or ``init_duals``' device).
      process_group: the ``torch.distributed`` process group the constraint values are
        averaged over (DDP: each rank passes the constraints of its own batch). ``None``: the
        world group when ``torch.distributed`` is initialised at construction, else none (a
        single process). Every call of :meth:`forward`, :meth:`update`, :meth:`step` and
        :meth:`forward_update` then makes one ``all_reduce`` of every group's values, packed:
        the dual step uses the averages and the Lagrangian is evaluated at them with the
        gradient of this rank's values, so under DDP the primal gradients are those of a single
        process on the whole batch (humancompatible-train 0.4.x averages for the dual step only
        and puts the local values in the Lagrangian's quadratic term). Every rank must call.
      nonfinite: (keyword) ``"propagate"`` (default: today's behaviour -- non-finite constraint
        values raise ``ValueError`` before anything changes), ``"raise"``
        (``FloatingPointError``, nothing changed) or ``"skip"`` (nothing changes, ``beta``
        included; every group's ``nonfinite_skips`` is incremented). One check over every
        group's values (:func:`uniopt.adapters.torch._dispatch.all_finite`); docs/faults.md.

    Deviations from humancompatible-train 0.4.2 (``docs/deviations.md``): groups never
    inherit another group's bounds or momentum (``None`` means the constructor's value);
    ``dampening`` defaults to 0 (heavy ball; the reference defaults to EMA); ``penalty`` is
    used (``None`` restores the reference's quadratic coefficient); ``ctol`` is applied; a zero
    direction is a zero step; the multipliers settle their dtype at the first update and mixed
    float32/float64 inputs work; ``init_duals`` and ``load_state_dict`` copy;
    ``forward`` -> ``update`` -> ``backward`` works; non-finite constraints raise; a failing
    step changes nothing; ``process_group`` also averages the Lagrangian's values.

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
                 ctol=0.0, device=None, nonfinite="propagate", process_group=None, _backend="auto"):
        self.nonfinite = check_nonfinite(nonfinite)
        if _backend not in BACKENDS:
            expected = ", ".join(map(repr, BACKENDS))
            raise ValueError(f"Invalid _backend: {_backend!r} (expected one of {expected})")
        self._backend = _backend
        self._device = _device(device)
        self.penalty = check_penalty(penalty)
        self.ctol = nonnegative_finite("ctol value", ctol)
        self.process_group = resolve_process_group(process_group)
        # check the constructor-wide defaults before later groups inherit them
        check_ialm_group(beta=beta, sigma=sigma, gamma=gamma, momentum=momentum,
                         dampening=dampening, dual_range=dual_range, is_ineq=is_ineq)
        self.last_step: list = []
        self._fills: dict = {}
        self._rule = _DualStepRule()
        self._dispatcher = Dispatcher(self._rule, _backend)
        first = self._make_group(m, beta, sigma, gamma, momentum, dampening, init_duals,
                                 dual_range, is_ineq, device)
        # what a group added without them gets: nothing is inherited from another group
        defaults = {"beta": 1.0, "sigma": 1.0, "gamma": 1.0, "momentum": momentum,
                    "dampening": dampening, "dual_range": dual_range, "is_ineq": False}
        super().__init__([first], defaults)

    # -- groups ---------------------------------------------------------------------------
    def add_constraint_group(self, m=None, beta=1.0, sigma=1.0, gamma=1.0, momentum=None,
                             dampening=None, init_duals=None, dual_range=None, is_ineq=False,
                             device=None, *, name=None, bound=None) -> None:
        """Add a group of ``m`` multipliers with its own hyper-parameters.

        ``momentum``, ``dampening``, ``dual_range`` and ``device`` left as ``None`` are the
        constructor's; nothing else is inherited from another group (an equality group added
        after an inequality group is not bounded below by 0). ``name`` (default ``group<k>``)
        is the group's key when constraints are passed as a mapping; ``bound`` is the
        right-hand side of its constraints, used only by :meth:`violation`.
        """
        d = self.defaults
        group = self._make_group(m, beta, sigma, gamma, d["momentum"] if momentum is None else momentum,
                                 d["dampening"] if dampening is None else dampening, init_duals,
                                 d["dual_range"] if dual_range is None else dual_range, is_ineq, device)
        group["name"], group["bound"] = name, bound
        self.add_param_group(group)

    def _make_group(self, m, beta, sigma, gamma, momentum, dampening, init_duals, dual_range,
                    is_ineq, device) -> dict:
        """A new group's dict (settings checked, multipliers created), not yet registered."""
        check_ialm_group(beta=beta, sigma=sigma, gamma=gamma, momentum=momentum,
                         dampening=dampening, dual_range=dual_range, is_ineq=is_ineq)
        size = check_ialm_size(m)
        device = self._device if device is None else _device(device)
        duals, fill = _initial_duals(size, init_duals, device)
        if duals is None:
            raise ValueError("iALM needs m or init_duals to size a constraint group")
        if size is not None and duals.numel() != size:
            raise ValueError(f"Invalid init_duals: {duals.numel()} values for m={size}")
        duals = torch.nn.Parameter(duals, requires_grad=False)
        if fill is not None:
            self._fills[id(duals)] = (weakref.ref(duals), fill)
        return {"params": [duals], "beta": beta, "sigma": sigma, "gamma": gamma,
                "momentum": momentum, "dampening": dampening, "dual_range": dual_range,
                "is_ineq": is_ineq, "dtype_fixed": fill is None}

    def add_param_group(self, param_group: dict) -> None:
        """Register a constraint group given in torch's form (``{"params": [multipliers], ...}``).

        The multipliers (one 1-D floating tensor) are used as they are and updated in place.
        Settings left out are ``self.defaults``' (not another group's); ``beta``, ``sigma``
        and ``gamma`` may be 0-d tensors (humancompatible-train's form); ``lower_bound`` /
        ``upper_bound`` stand for ``dual_range`` when it is absent. The group is checked before
        anything is registered.
        """
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        group = _checked_group(param_group, self.defaults, copy=False)
        duals = group["params"][0]
        if any(duals is g["params"][0] for g in self.param_groups):
            raise ValueError("some parameters appear in more than one parameter group")
        if group["name"] is None:
            group["name"] = f"group{len(self.param_groups)}"
        if any(g["name"] == group["name"] for g in self.param_groups):
            raise ValueError(f"Invalid name: {group['name']!r} (a group of that name exists)")
        self._keep_skips(group, param_group)
        self.param_groups.append(group)

    def _keep_skips(self, group: dict, source) -> None:
        """The ``nonfinite_skips`` counter of a new or loaded group (present unless the policy
        is ``"propagate"`` and ``source`` has none)."""
        if "nonfinite_skips" in source or self.__dict__.get("nonfinite", "propagate") != "propagate":
            group["nonfinite_skips"] = int(source.get("nonfinite_skips", 0))

    # -- views ----------------------------------------------------------------------------
    @property
    def m(self) -> int:
        """Total number of constraints."""
        return sum(self._sizes())

    @property
    def names(self) -> list:
        """The constraint groups' names, in order."""
        return [g["name"] for g in self.param_groups]

    @property
    def duals(self) -> torch.Tensor:
        """The multipliers of every group, concatenated (a copy)."""
        return torch.cat([g["params"][0].detach() for g in self.param_groups])

    @property
    def bounds(self):
        """Per-constraint right-hand sides (``bound`` of each group, 0 where unset) in torch's
        default dtype, or ``None`` when no group declares one."""
        if all(g.get("bound") is None for g in self.param_groups):
            return None
        return torch.cat([torch.full((n,), float(g.get("bound") or 0.0))
                          for g, n in zip(self.param_groups, self._sizes())])

    def violation(self, constraints) -> torch.Tensor:
        """``max_j (c_j - b_j)`` over every group, with the declared ``bound``'s (detached)."""
        parts = self._gather(constraints)
        flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).detach()
        bounds = self.bounds
        if bounds is not None:
            flat = flat - bounds.to(flat.device)
        return flat.max()

    def _sizes(self) -> list:
        return [g["params"][0].numel() for g in self.param_groups]

    # -- constraint values ----------------------------------------------------------------
    def _gather(self, constraints) -> list:
        """One 1-D constraint tensor per group (flat, sequence or mapping form), checked."""
        sizes = self._sizes()
        if isinstance(constraints, torch.Tensor):  # the flat form, the common case
            return _split(_flat(constraints), sizes)
        names = self.names
        if isinstance(constraints, Mapping):
            missing = [n for n in names if n not in constraints]
            unknown = [k for k in constraints if k not in names]
            if missing or unknown:
                raise ValueError(f"constraints: expected one entry per group {names}, missing "
                                 f"{missing}, unknown {unknown}")
            parts = [_flat(constraints[n]) for n in names]
        elif isinstance(constraints, Sequence) and not isinstance(constraints, (str, bytes)):
            if len(constraints) != len(sizes):
                raise ValueError(f"constraints: expected one value per group ({len(sizes)}), "
                                 f"got {len(constraints)}")
            parts = [_flat(c) for c in constraints]
        else:  # a scalar or an array-like of another type: the flat form
            return _split(_flat(constraints), sizes)
        for part, n, name in zip(parts, sizes, names):
            if part.numel() != n:
                raise ValueError(f"constraints: group {name!r} has {n} multipliers but got "
                                 f"{part.numel()} values")
        return parts

    def _check_finite(self, parts, start: int = 0) -> None:
        """Raise, naming the group, if constraint values for an update are inf or NaN (the
        groups from ``start`` on).

        One reduction per group (a finite sum means finite values); the exact count only when
        the sum is not finite (which finite but huge values can also cause).
        """
        for group, c in zip(self.param_groups[start:], parts[start:]):
            if c.numel() and not math.isfinite(float(c.detach().sum())):
                bad = int((~torch.isfinite(c.detach())).sum())
                if bad:
                    raise _nonfinite_error(group, bad, c.numel())

    def _check_directions(self, groups, grads, start: int) -> None:
        """Raise, naming the group, if the momentum direction of a group from ``start`` on is
        not finite, before any group changes (the dispatcher writes group by group; ``start =
        1`` leaves the first group to its own step, which must then write nothing for it).

        Groups without momentum are skipped (their direction is their checked constraints);
        one reduction per momentum group, the exact check only when its sum is not finite.
        """
        for group, (c,) in zip(groups[start:], grads[start:]):
            if group["momentum"] == 0 or not c.numel():
                continue
            d = _direction(group, c, group["momentum_buffer"], self.ctol)
            if math.isfinite(float(d.sum())) or bool(torch.isfinite(d).all()):
                continue
            bad = int((~torch.isfinite(c)).sum())
            if bad:
                raise _nonfinite_error(group, bad, c.numel())
            raise ValueError(f"constraints: the direction of group {group['name']!r} is not "
                             f"finite (its momentum buffer overflowed); nothing was updated")

    def _adopt_dtypes(self, parts) -> None:
        """Multipliers whose dtype is not settled take that of the first constraints seen."""
        for group, c in zip(self.param_groups, parts):
            if group["dtype_fixed"]:
                continue
            duals, dtype = group["params"][0], c.dtype
            if dtype != duals.dtype:
                self._release(duals)
                duals.data = self._converted(group, dtype)  # the same Parameter object
                group["momentum_buffer"] = group["momentum_buffer"].to(
                    dtype=dtype, memory_format=torch.contiguous_format)
            self._fills.pop(id(duals), None)
            group["dtype_fixed"] = True

    def _converted(self, group, dtype, device=None) -> torch.Tensor:
        """A group's multipliers in ``dtype`` (a new tensor); while their dtype is not settled
        and they still hold the initial number, made from that number (exact in ``dtype``)."""
        duals = group["params"][0]
        device = duals.device if device is None else device
        if not group["dtype_fixed"]:
            hit = self._fills.get(id(duals))
            fill = hit[1] if hit is not None and hit[0]() is duals else None
            if fill is not None and bool((duals == fill).all()):
                return torch.full(duals.shape, fill, dtype=dtype, device=device)
        return duals.detach().to(device=device, dtype=dtype, memory_format=torch.contiguous_format)

    def _rhos(self) -> list:
        """Each group's quadratic coefficient now (``penalty``, or its current ``beta``)."""
        return [g["beta"] if self.penalty is None else self.penalty for g in self.param_groups]

    # -- the step -------------------------------------------------------------------------
    def _reduced(self, parts: list) -> list:
        """``parts`` averaged over ``process_group`` in one ``all_reduce`` (every group packed).

        Each averaged part keeps its rank's autograd graph: its value is the group average and
        its gradient that of the local values (``c - c.detach() + mean``), so the Lagrangian's
        gradients, averaged over the ranks by DDP, are those of the Lagrangian of the averaged
        constraints -- the full batch's, quadratic term included.
        """
        if not parts:
            return parts
        flat = torch.cat([c.detach().reshape(-1) for c in parts])
        mean = group_average(flat, self.process_group)
        out, offset = [], 0
        for c in parts:
            m = mean[offset:offset + c.numel()].to(c.dtype).reshape(c.shape)
            offset += c.numel()
            out.append(c - c.detach() + m if c.requires_grad else m)
        return out

    def _walk(self, loss, constraints, *, update: bool):
        parts = self._gather(constraints)
        if self.process_group is not None:
            parts = self._reduced(parts)
        if not update:
            return None if loss is None else self._lagrangian(loss, parts, self._rhos())
        groups = self.param_groups
        # the values were averaged over process_group above: every rank's check agrees
        # without another all_reduce (a non-finite value on one rank makes every average so)
        if self.nonfinite != "propagate" and not nonfinite_gate(
                self, [(c, f"the constraint values of group {g['name']!r}")
                       for g, c in zip(groups, parts)],
                groups, None):
            return None if loss is None else self._lagrangian(loss, parts, self._rhos())
        settled = True
        for group in groups:
            if not group["dtype_fixed"]:
                settled = False
        if not settled:  # the first update: every group checked before the dtypes settle
            self._check_finite(parts)
            self._adopt_dtypes(parts)
        rhos = self._rhos()
        self._update(groups, parts, rhos, settled)
        if loss is None:
            return None
        return self._lagrangian(loss, parts, rhos)

    def _update(self, groups, parts, rhos, checked_first) -> None:
        """The dual update of every group through the dispatcher; ``last_step``; ``beta`` growth.

        All or nothing: the CPU kernel writes nothing for a direction that is not finite, so the
        first group (when its constraints were not checked yet) is left to it if it runs there;
        every other group is checked (its constraints, and with momentum its direction) before
        anything changes.
        """
        grads = []
        for group, c in zip(groups, parts):
            duals = group["params"][0]
            if c.dtype is not duals.dtype or not (c.is_cpu and duals.is_cpu or c.device == duals.device):
                c = c.to(device=duals.device, dtype=duals.dtype)
            if c.requires_grad:
                c = c.detach()
            if not c.is_contiguous():
                c = c.contiguous()
            grads.append((c,))
        work = self._dispatcher.collect(groups, self.state, grads)
        first = work[0]
        start = 1 if first.tables and not first.slow else 0
        if checked_first and start < len(groups):
            self._check_finite(parts, start)
        # the CPU kernel and the torch ops write nothing for a direction that is not finite;
        # the CUDA kernel writes the buffer before its norm tells
        on_cuda = any(first.plan.kinds[i] == "cuda" for i in first.slow)
        self._check_directions(groups, grads, 0 if on_cuda else 1)
        aliases = self.__dict__.get("_aliases")
        if aliases:
            for group in groups:
                self._release(group["params"][0])
        self._rule.ctol = self.ctol
        try:
            results = self._dispatcher.run(work)
        except _NotFinite as exc:
            k = next(k for k, g in enumerate(groups) if g is exc.group)
            c = grads[k][0]
            bad = int((~torch.isfinite(c)).sum())
            if bad:
                raise _nonfinite_error(exc.group, bad, c.numel()) from None
            raise ValueError(f"constraints: the direction of group {exc.group['name']!r} is not "
                             f"finite (its momentum buffer overflowed); nothing was updated") from None
        self.last_step = [{"direction_norm": r[0][0], "stepsize": r[0][1], "rho": rho}
                          for r, rho in zip(results, rhos)]
        for group in groups:
            group["beta"] *= group["sigma"]

    def forward(self, loss, constraints) -> torch.Tensor:
        """The augmented Lagrangian at the current multipliers; changes nothing."""
        return self._walk(loss, constraints, update=False)

    def update(self, constraints) -> None:
        """One dual update of every group (then ``beta *= sigma``)."""
        self._walk(None, constraints, update=True)

    def step(self, constraints) -> None:  # noqa: D417 (torch's name; the constraints, not a closure)
        """:meth:`update`, as ``Optimizer.step``: the step pre- and post-hooks run around it."""
        self._walk(None, constraints, update=True)

    def forward_update(self, loss, constraints) -> torch.Tensor:
        """:meth:`update`, then the Lagrangian with the new multipliers (and the old ``beta``)."""
        return self._walk(loss, constraints, update=True)

    def _alias(self, duals: torch.Tensor) -> torch.Tensor:
        """The multipliers as a ``.data`` alias (no copy) for the Lagrangian's linear term.

        The graph of a Lagrangian saves this alias. Before iALM changes the multipliers in place
        it calls :meth:`_release`: if a graph still holds the alias (its use count is above
        ours: ``forward`` -> ``update`` -> ``backward``, or a retained graph), the alias is
        pointed at a copy of the old values, so that graph's gradient stays right; otherwise
        (after ``backward``, or when the Lagrangian is gone) nothing is copied.
        """
        cache = self.__dict__.setdefault("_aliases", {})
        hit = cache.get(id(duals))
        if (hit is not None and hit[0] is duals and hit[1].data_ptr() == duals.data_ptr()
                and hit[1].dtype == duals.dtype and hit[1].shape == duals.shape):
            return hit[1]
        alias = duals.data
        cache[id(duals)] = (duals, alias)
        return alias

    def _release(self, duals: torch.Tensor) -> None:
        """Before ``duals`` change in place: Lagrangians built on them keep the old values."""
        cache = self.__dict__.get("_aliases")
        hit = cache.get(id(duals)) if cache else None
        if hit is None or hit[0] is not duals:
            return
        alias = hit[1]
        use_count = getattr(alias, "_use_count", None)
        if use_count is None or use_count() > 1:
            alias.data = alias.clone()  # the same tensor object, which the graphs hold
        del cache[id(duals)]

    def _lagrangian(self, loss, parts, rhos) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor):
            loss = torch.as_tensor(real("loss", loss), dtype=torch.get_default_dtype())
        out_dtype = loss.dtype
        value = loss
        for group, c, rho in zip(self.param_groups, parts, rhos):
            duals = group["params"][0]
            dtype = c.dtype
            if dtype != duals.dtype or dtype != value.dtype:
                dtype = torch.promote_types(torch.promote_types(dtype, duals.dtype), value.dtype)
                c = c.to(dtype)
            if duals.dtype == dtype and duals.device == c.device:
                linear = torch.dot(self._alias(duals), c)  # no copy (see _alias)
            else:  # a converted copy: never the live tensor
                linear = torch.dot(self._converted(group, dtype, c.device), c)
            cp = _torch_rules.penalty_part(c, self.ctol, group["is_ineq"])
            value = (value if value.dtype == dtype else value.to(dtype)) + linear
            value = value + 0.5 * rho * torch.dot(cp, cp)
        return value if value.dtype == out_dtype else value.to(out_dtype)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's layout, readable by humancompatible-train 0.4.2 and by :meth:`load_state_dict`.

        ``{"state": {"penalty", "ctol"}, "param_groups": [{"params": [multipliers], ...}]}``
        with every tensor a copy and ``beta``, ``sigma``, ``gamma`` as float64 0-d tensors (the
        reference's form; exact for our floats). The state-dict hooks run as in torch.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        groups = []
        for g in self.param_groups:
            out = {}
            for key, value in g.items():
                if key in ("beta", "sigma", "gamma"):
                    value = torch.tensor(value, dtype=torch.float64)
                elif key == "params":
                    value = [p.detach().clone(memory_format=torch.contiguous_format) for p in value]
                elif isinstance(value, torch.Tensor):
                    value = value.detach().clone(memory_format=torch.contiguous_format)
                out[key] = value
            groups.append(out)
        state_dict = {"state": {"penalty": self.penalty, "ctol": self.ctol}, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of ours or of humancompatible-train 0.4.x; checked, then copied.

        The groups are replaced by the loaded ones (layout included); every tensor is copied,
        so the source is never aliased. A state dict without ``ctol`` in its ``state`` is
        humancompatible-train's: its quadratic coefficient is each group's ``beta``, so
        ``penalty`` becomes ``None`` and ``ctol`` 0. Older uniopt state dicts (``penalty``,
        ``ctol`` and groups with ``duals`` at the top level) load too. The load-state-dict hooks
        run as in torch.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "state" in state_dict:
            state = state_dict["state"]
            if "ctol" in state:
                penalty, ctol = state["penalty"], state["ctol"]
            else:  # humancompatible-train's: rho is beta; no tolerance
                penalty, ctol = None, 0.0
        else:  # uniopt < 0.2
            penalty, ctol = state_dict["penalty"], state_dict["ctol"]
        penalty = check_penalty(penalty)
        ctol = nonnegative_finite("ctol value", ctol)
        new = []
        for k, g in enumerate(state_dict["param_groups"]):
            if "params" not in g and "duals" in g:
                g = {**{key: v for key, v in g.items() if key != "duals"}, "params": [g["duals"]]}
            group = _checked_group(g, self.defaults, copy=True)
            if group["name"] is None:
                group["name"] = f"group{k}"
            self._keep_skips(group, g)
            new.append(group)
        names = [g["name"] for g in new]
        if len(set(names)) != len(names):
            raise ValueError(f"load_state_dict: group names repeat: {names}")
        self.penalty, self.ctol, self.param_groups = penalty, ctol, new
        self.__dict__.pop("_aliases", None)
        self._dispatcher.invalidate()
        self._rule.arguments.clear()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(penalty=self.penalty, ctol=self.ctol, _backend=self._backend,
                     _device=self._device, last_step=self.last_step)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_fills", {})
        self.__dict__.setdefault("nonfinite", "propagate")
        if "process_group" not in self.__dict__:  # not pickled: the default group here
            self.process_group = resolve_process_group(None)
        if "_dispatcher" not in self.__dict__:  # unpickled or deep-copied
            self._rule = _DualStepRule()
            self._dispatcher = Dispatcher(self._rule, self.__dict__.get("_backend", "auto"))

    def __repr__(self) -> str:
        groups = ", ".join(f"{g['name']}(m={g['params'][0].numel()}, beta={g['beta']:g}, "
                           f"{'ineq' if g['is_ineq'] else 'eq'})" for g in self.param_groups)
        return f"{type(self).__name__}(penalty={self.penalty}, ctol={self.ctol}, groups=[{groups}])"


# ----------------------------------------------------------------------------------------------
# Checks and conversions
# ----------------------------------------------------------------------------------------------
def _nonfinite_error(group: dict, bad: int, n: int) -> ValueError:
    return ValueError(f"constraints: group {group['name']!r} has {bad} non-finite value(s) "
                      f"(inf or nan) among {n}; nothing was updated")


def _device(device):
    if device is None:
        return None
    try:
        return torch.device(device)
    except (TypeError, RuntimeError):
        raise TypeError(f"Invalid device: {device!r}") from None


def _initial_duals(size, init_duals, device):
    """``(multipliers, fill)``: from ``None``/a number, torch's default dtype and the number
    (``fill``); from a tensor, a contiguous copy and ``None``."""
    if init_duals is None or (isinstance(init_duals, numbers.Real) and not isinstance(init_duals, bool)):
        if size is None:
            return None, None
        fill = 0.0 if init_duals is None else real("init_duals", init_duals)
        if abs(fill) > torch.finfo(torch.get_default_dtype()).max:  # the dtype cannot hold it
            raise ValueError(f"Invalid init_duals: {init_duals!r} (beyond the range of "
                             f"{torch.get_default_dtype()})")
        return torch.full((size,), fill, dtype=torch.get_default_dtype(), device=device), fill
    if not isinstance(init_duals, torch.Tensor):
        raise TypeError(f"Invalid init_duals: {type(init_duals).__name__} (expected None, a "
                        f"number or a 1-D floating tensor)")
    if not init_duals.is_floating_point() or init_duals.ndim != 1:
        raise TypeError(f"Invalid init_duals: expected a number or a 1-D floating tensor, got "
                        f"{init_duals.dtype} of shape {tuple(init_duals.shape)}")
    return init_duals.detach().to(device=device).clone(memory_format=torch.contiguous_format), None


def _scalar(key, value):
    """A setting as a Python value (humancompatible-train keeps beta/sigma/gamma as tensors)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _checked_group(source: Mapping, defaults: dict, *, copy: bool) -> dict:
    """A constraint group in our layout from a group dict of ours or humancompatible-train's.

    Settings are checked (nothing is registered here); missing ones come from ``defaults``.
    With ``copy`` every tensor is copied (loading never aliases).
    """
    params = source.get("params")
    if isinstance(params, torch.Tensor):
        params = [params]
    if params is None or len(params) != 1:
        raise ValueError("an iALM param group holds exactly one tensor of multipliers in 'params'")
    duals = params[0]
    if not isinstance(duals, torch.Tensor):
        if copy and isinstance(duals, np.ndarray):  # a NumPy iALM's state
            duals = torch.from_numpy(np.array(duals, copy=True))
        else:
            raise TypeError(f"iALM multipliers must be a tensor, got {type(duals).__name__}")
    if not duals.is_floating_point() or duals.ndim != 1:
        raise TypeError(f"iALM multipliers must be a 1-D floating tensor, got {duals.dtype} of "
                        f"shape {tuple(duals.shape)}")
    settings = {k: _scalar(k, source[k]) for k in _SETTINGS if k in source}
    if "dual_range" not in settings and (copy or "lower_bound" in source or "upper_bound" in source):
        # humancompatible-train's groups: the bounds (a missing one is unbounded)
        settings["dual_range"] = (_scalar("lower_bound", source.get("lower_bound")),
                                  _scalar("upper_bound", source.get("upper_bound")))
    merged = {k: settings.get(k, defaults.get(k)) for k in _SETTINGS}
    checked = check_ialm_group(**merged)
    name = source.get("name")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"Invalid name: {name!r} (expected a str)")
    bound = source.get("bound")
    if bound is not None:
        bound = real("bound", _scalar("bound", bound))
    buffer = source.get("momentum_buffer")
    if copy:
        duals = torch.nn.Parameter(duals.detach().clone(memory_format=torch.contiguous_format),
                                   requires_grad=False)
    if buffer is None:
        buffer = torch.zeros_like(duals, memory_format=torch.contiguous_format).detach()
    else:
        if isinstance(buffer, np.ndarray):
            buffer = torch.from_numpy(np.array(buffer, copy=True))
        if not isinstance(buffer, torch.Tensor) or buffer.numel() != duals.numel():
            raise ValueError(f"iALM group {name!r}: {duals.numel()} multipliers and a momentum "
                             f"buffer of {getattr(buffer, 'numel', lambda: '?')()}")
        buffer = buffer.detach().reshape(-1)
        if copy:
            buffer = buffer.clone(memory_format=torch.contiguous_format)
    return {"params": [duals], "name": name, "beta": checked["beta"], "sigma": checked["sigma"],
            "gamma": checked["gamma"], "momentum": checked["momentum"],
            "dampening": checked["dampening"], "dual_range": checked["dual_range"],
            "lower_bound": checked["lower_bound"], "upper_bound": checked["upper_bound"],
            "is_ineq": checked["is_ineq"], "bound": bound, "momentum_buffer": buffer,
            "dtype_fixed": bool(source.get("dtype_fixed", True))}


def _flat(x) -> torch.Tensor:
    """A constraint value as a 1-D real tensor (numbers and array-likes: torch's default dtype)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():  # the common case
        return x if x.dim() == 1 else x.reshape(-1)
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


def _split(flat: torch.Tensor, sizes: list) -> list:
    """The flat form's values, one slice per group (checked against the group sizes)."""
    if flat.numel() != sum(sizes):
        raise ValueError(f"constraints: expected {sum(sizes)} values for group sizes {sizes}, "
                         f"got {flat.numel()}")
    if len(sizes) == 1:
        return [flat]
    return list(torch.split(flat, sizes))
