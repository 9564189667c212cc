r"""iALM, the augmented-Lagrangian dual optimizer with an adaptive dual step, on NumPy arrays.

The API is the seed's (``humancompatible.train.dual_optim.iALM``): constraint groups with their
own hyper-parameters, ``forward`` / ``update`` (= ``step``) / ``forward_update``, ``duals``,
``state_dict`` / ``load_state_dict``. The torch face (:mod:`uniopt.adapters.torch.ialm`) is a
``torch.optim.Optimizer`` of its own; it shares the rules, the checks and the kernel. The
arithmetic is :mod:`uniopt.rules.ialm` and the dual step is the Numba kernel
:func:`uniopt.kernels.ialm_cpu.ialm_dual_step_`.

Semantics of one ``update(c)``, group :math:`k` with slice :math:`c_k`: see
:mod:`uniopt.rules.ialm` (``ctol`` filter, momentum direction, step
:math:`\min(\beta_k, \gamma_k/\|d_k\|)`, clamp to the group's bounds), then
:math:`\beta_k \leftarrow \sigma_k \beta_k` for every group. The Lagrangian is
:math:`L = f + \sum_k \lambda_k^\top c_k + \frac{\rho_k}{2}\|\tilde c_k\|^2` with
:math:`\rho_k` = ``penalty``, or, with ``penalty=None``, the group's :math:`\beta_k` before this
update's :math:`\sigma` growth.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._validation import (
    check_ialm_group,
    check_ialm_group_name,
    check_ialm_init_array,
    check_ialm_size,
    check_nonfinite,
    check_penalty,
    nonfinite_constraints_error,
    nonfinite_error,
    nonnegative_finite,
    real,
)
from .kernels import ialm_cpu
from .kernels._reduce import all_finite
from .rules import bind
from .rules import ialm as _rules

__all__ = ["iALM", "check_ialm_group", "check_penalty"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: The settings of a group kept in its dict (besides ``duals`` and ``momentum_buffer``).
GROUP_KEYS = ("name", "beta", "sigma", "gamma", "momentum", "dampening", "dual_range",
              "lower_bound", "upper_bound", "is_ineq")


# ----------------------------------------------------------------------------------------------
# NumPy
# ----------------------------------------------------------------------------------------------
_np_rules = bind(_rules, where=np.where, minimum=np.minimum, maximum=np.maximum, sqrt=np.sqrt)


class iALM:  # noqa: N801 (the seed's name)
    r"""iALM's dual optimizer over NumPy arrays (multipliers updated in place).

    .. math::
       d_k = c_k \ \text{or}\ b_k \leftarrow \mu b_k + (1 - \text{dampening}) c_k,\quad
       \lambda_k \leftarrow \operatorname{clamp}\left(\lambda_k + \min\left(\beta_k,
       \frac{\gamma_k}{\|d_k\|}\right) d_k,\ lo_k, hi_k\right),\quad \beta_k \leftarrow
       \sigma_k \beta_k

       L = f + \sum_k \lambda_k^\top c_k + \frac{\rho_k}{2}\|\tilde c_k\|^2

    with :math:`\tilde c_k = \max(c_k, 0)` for inequality groups (``is_ineq=True``, constraints
    :math:`c \le 0`) and :math:`c_k` for equality groups, :math:`\rho_k` = ``penalty`` (or the
    group's :math:`\beta_k` before this update's growth when ``penalty=None``). A zero
    direction gives a zero step (never NaN). Violations within ``ctol`` count as satisfied
    (:mod:`uniopt.rules.ialm`).

    Args:
      m: number of constraints of the first group (or give ``init_duals``).
      beta, sigma, gamma: the first group's dual step cap :math:`\beta`, its growth factor
        :math:`\sigma` (per update), and :math:`\gamma`.
      init_duals: initial multipliers: ``None`` (zeros), a number, or a float32/float64 array
        (whose dtype the multipliers keep; otherwise they take the dtype of the first
        constraint values seen).
      penalty: :math:`\rho` (``None``: each group's :math:`\beta`).
      dual_range: ``(low, high)`` clamp of the multipliers (``None`` entries: unbounded); the
        default of groups added later.
      momentum, dampening: heavy-ball momentum of the dual direction (defaults of later groups).
      is_ineq: whether the first group's constraints are inequalities :math:`c \le 0`.
      ctol: violations within ``ctol`` count as satisfied.
      device: ignored (NumPy); kept for the seed's signature.
      nonfinite: (keyword) ``"propagate"`` (default: today's behaviour -- non-finite constraint
        values raise ``ValueError`` before anything changes, since a dual step cannot carry
        them), ``"raise"`` (``FloatingPointError``, nothing changed) or ``"skip"`` (nothing
        changes, ``beta`` included; every group's ``nonfinite_skips`` is incremented). See
        docs/faults.md.

    After each update, ``last_step`` holds one dict per group: ``{"direction_norm",
    "stepsize", "rho"}`` (``rho``: the quadratic coefficient of that update's Lagrangian).

    The norm :math:`\|d_k\|` is overflow-safe (scaled as BLAS ``nrm2`` where
    :math:`\sum d_i^2` would over- or underflow): finite constraint values, however huge or
    tiny, give a finite step (``update([1e200, 1e200])``: :math:`\lambda = \gamma/\sqrt 2`).

    Raises:
      ValueError: at ``update`` / ``forward_update``, constraint values that are not finite
        (inf, NaN; checked in the multipliers' dtype), naming the group
        (``"constraints: the values of group 'group0' are not finite ..."``), before anything
        changes: multipliers, buffers, ``beta``, ``last_step`` stay as they were. Also
        constraint values whose structure or sizes do not match the groups.

    Example:
      >>> import numpy as np, uniopt
      >>> dual = uniopt.iALM(m=1, beta=1.0, is_ineq=True)
      >>> x = np.array([2.0])                # minimise x^2 subject to 1 - x <= 0
      >>> for _ in range(300):
      ...     c = 1.0 - x
      ...     dual.update(c)
      ...     x -= 0.1 * (2 * x - dual.constraint_weights(c))
      >>> bool(abs(x[0] - 1.0) < 1e-3)
      True

    References:
      Li, Chen, Liu, Lu & Xu, "Stochastic inexact augmented Lagrangian method for nonconvex
      expectation constrained optimization", Comput. Optim. Appl. (2024),
      https://doi.org/10.1007/s10589-023-00521-z
    """

    def __init__(self, m=None, beta=1.0, sigma=1.0, gamma=1.0, init_duals=None, penalty=1.0, *,
                 dual_range=(-100.0, 100.0), momentum=0.0, dampening=0.0, is_ineq=False,
                 ctol=0.0, device=None, nonfinite="propagate"):
        self.nonfinite = check_nonfinite(nonfinite)
        self._setup(m=m, beta=beta, sigma=sigma, gamma=gamma, init_duals=init_duals,
                    penalty=penalty, dual_range=dual_range, momentum=momentum,
                    dampening=dampening, is_ineq=is_ineq, ctol=ctol, device=device)

    # -- constraint groups and the order of a step -------------------------------------------
    #: the dtype of duals created before any constraint value is seen
    _default_dtype: Any = np.dtype(np.float64)

    def _setup(self, *, m, beta, sigma, gamma, init_duals, penalty, dual_range, momentum,
               dampening, is_ineq, ctol, device) -> None:
        self.penalty = check_penalty(penalty)
        self.ctol = nonnegative_finite("ctol value", ctol)
        self.param_groups: list[dict] = []
        self.defaults = {"momentum": momentum, "dampening": dampening, "dual_range": dual_range,
                         "device": device}
        # check the constructor-wide defaults before they are inherited by later groups
        check_ialm_group(beta=beta, sigma=sigma, gamma=gamma, momentum=momentum,
                         dampening=dampening, dual_range=dual_range, is_ineq=is_ineq)
        self.last_step: list = []
        self.add_constraint_group(m, beta, sigma, gamma, momentum, dampening, init_duals,
                                  dual_range, is_ineq, device)

    def add_constraint_group(self, m=None, beta=1.0, sigma=1.0, gamma=1.0, momentum=None,
                             dampening=None, init_duals=None, dual_range=None, is_ineq=False,
                             device=None, *, name=None) -> None:
        """Add a group of ``m`` multipliers with its own hyper-parameters.

        ``momentum``, ``dampening`` and ``dual_range`` left as ``None`` are the constructor's;
        nothing else is inherited from another group (an equality group added after an
        inequality group is not bounded below by 0). ``name`` (default ``group<k>``) is the
        key of this group when constraints are passed as a mapping.
        """
        d = self.defaults
        settings = check_ialm_group(
            beta=beta, sigma=sigma, gamma=gamma,
            momentum=d["momentum"] if momentum is None else momentum,
            dampening=d["dampening"] if dampening is None else dampening,
            dual_range=d["dual_range"] if dual_range is None else dual_range, is_ineq=is_ineq)
        size = check_ialm_size(m)
        if name is None:
            name = f"group{len(self.param_groups)}"
        check_ialm_group_name(name, self.names)
        duals, fixed = self._initial_duals(size, init_duals, d["device"] if device is None else device)
        if size is None:
            if duals is None:
                raise ValueError("iALM needs m or init_duals to size a constraint group")
        elif self._numel(duals) != size:
            raise ValueError(f"Invalid init_duals: {self._numel(duals)} values for m={size}")
        group = {"name": name, **settings, "duals": duals,
                 "momentum_buffer": self._zeros_like(duals), "dtype_fixed": fixed}
        if getattr(self, "nonfinite", "propagate") != "propagate":
            group["nonfinite_skips"] = 0
        self.param_groups.append(group)

    # -- views ----------------------------------------------------------------------------
    @property
    def m(self) -> int:
        """Total number of constraints."""
        return sum(self._sizes())

    @property
    def names(self) -> list:
        return [g["name"] for g in self.param_groups]

    @property
    def duals(self):
        """The multipliers of every group, concatenated (a copy)."""
        return self._concat([g["duals"] for g in self.param_groups])

    def _sizes(self) -> list:
        return [self._numel(g["duals"]) for g in self.param_groups]

    # -- constraint values ----------------------------------------------------------------
    def _gather(self, constraints) -> list:
        """One 1-D constraint array per group (flat, sequence or mapping form), checked."""
        sizes = self._sizes()
        if isinstance(constraints, self._array_types):  # the flat form, the common case
            return self._split(self._flat(constraints), sizes)
        names = self.names
        if isinstance(constraints, Mapping):
            missing = [n for n in names if n not in constraints]
            unknown = [k for k in constraints if k not in names]
            if missing or unknown:
                raise ValueError(f"constraints: expected one entry per group {names}, missing "
                                 f"{missing}, unknown {unknown}")
            parts = [self._flat(constraints[n]) for n in names]
        elif isinstance(constraints, Sequence) and not isinstance(constraints, (str, bytes)):
            if len(constraints) != len(sizes):
                raise ValueError(f"constraints: expected one value per group ({len(sizes)}), "
                                 f"got {len(constraints)}")
            parts = [self._flat(c) for c in constraints]
        else:  # a scalar or an array-like of another type: the flat form
            return self._split(self._flat(constraints), sizes)
        for part, n, name in zip(parts, sizes, names):
            if self._numel(part) != n:
                raise ValueError(f"constraints: group {name!r} has {n} multipliers but got "
                                 f"{self._numel(part)} values")
        return parts

    def _split(self, flat, sizes) -> list:
        """The flat form's values, one slice per group (checked against the group sizes)."""
        if self._numel(flat) != sum(sizes):
            raise ValueError(f"constraints: expected {sum(sizes)} values for group sizes "
                             f"{sizes}, got {self._numel(flat)}")
        if len(sizes) == 1:
            return [flat]
        parts, start = [], 0
        for n in sizes:
            parts.append(flat[start:start + n])
            start += n
        return parts

    def _check_finite(self, parts) -> None:
        """Raise :func:`uniopt._validation.nonfinite_constraints_error` naming the first group
        whose constraint values are not all finite, before anything changes.

        Only groups whose dtype is not settled yet (the first update) are checked here, before
        they adopt one. A settled group is left to the kernel's read-only first pass
        (:meth:`_dual_norm`, or the first group's :meth:`_dual_step_`: a NaN step size, nothing
        written, for a direction that is not finite), which every group takes before any group
        is written: no extra pass over the constraints.
        """
        for group, c in zip(self.param_groups, parts):
            if not group["dtype_fixed"] and not self._all_finite(c):
                raise nonfinite_constraints_error(group["name"])

    def _gate(self, cast) -> bool:
        """The ``nonfinite`` policy (``"raise"``/``"skip"``) on every group's constraint
        values, before anything changes; ``False``: the update is skipped."""
        for group, c in zip(self.param_groups, cast):
            if not self._all_finite(c):
                if self.nonfinite == "raise":
                    raise nonfinite_error(type(self).__name__,
                                          f"the constraint values of group {group['name']!r}")
                for g in self.param_groups:
                    g["nonfinite_skips"] = int(g.get("nonfinite_skips", 0)) + 1
                return False
        return True

    def _adopt_dtypes(self, parts) -> None:
        """Duals created without a dtype take that of the first constraint values seen."""
        for group, c in zip(self.param_groups, parts):
            if not group["dtype_fixed"]:
                dtype = self._dtype(c)
                if dtype != self._dtype(group["duals"]):
                    group["duals"] = self._cast(group["duals"], dtype)
                    group["momentum_buffer"] = self._cast(group["momentum_buffer"], dtype)
                group["dtype_fixed"] = True

    def _rhos(self) -> list:
        """Each group's quadratic coefficient now (``penalty``, or its current ``beta``)."""
        return [g["beta"] if self.penalty is None else self.penalty for g in self.param_groups]

    # -- the step -------------------------------------------------------------------------
    def _walk(self, loss, constraints, *, update: bool):
        parts = self._gather(constraints)
        if update:
            # the values in the duals' dtype (the one they have, or will adopt), checked
            # before anything changes: a float64 value beyond float32's range is inf here
            cast = [self._cast(self._detach(c), self._dtype(g["duals"] if g["dtype_fixed"] else c))
                    for g, c in zip(self.param_groups, parts)]
            if getattr(self, "nonfinite", "propagate") != "propagate" and not self._gate(cast):
                update = False  # skipped: nothing changes
            else:
                self._check_finite(cast)
                self._adopt_dtypes(parts)
        rhos = self._rhos()
        if update:
            # the read-only pass of every group after the first (last group first), then the
            # first group's whole step (its kernel writes nothing for a direction that is not
            # finite), then the other groups' writing passes: a group whose direction is not
            # finite raises before any group changed, and one group is one kernel call
            groups = self.param_groups
            outs = [None] * len(cast)
            for k in range(len(cast) - 1, -1, -1):
                outs[k] = self._dual_step_(groups[k], cast[k]) if k == 0 else self._dual_norm(
                    groups[k], cast[k])
                if not math.isfinite(outs[k][1]):  # the direction is not finite
                    for bad, values in zip(groups, cast):  # name the first such group
                        if not self._all_finite(values):
                            raise nonfinite_constraints_error(bad["name"])
                    raise ValueError(f"constraints: the direction of group {groups[k]['name']!r} "
                                     f"is not finite (its momentum buffer overflowed); nothing "
                                     f"was updated")
            last = []
            for k, (group, c, rho) in enumerate(zip(groups, cast, rhos)):
                if k:
                    self._dual_apply(group, c, outs[k][1])
                last.append({"direction_norm": outs[k][2], "stepsize": outs[k][1], "rho": rho})
            for group in self.param_groups:
                group["beta"] *= group["sigma"]
            self.last_step = last
        if loss is None:
            return None
        return self._lagrangian_terms(loss, self.param_groups, parts, rhos)

    def forward(self, loss, constraints):
        """The augmented Lagrangian at the current multipliers; changes nothing."""
        return self._walk(loss, constraints, update=False)

    def update(self, constraints) -> None:
        """One dual update of every group (then ``beta *= sigma``)."""
        self._walk(None, constraints, update=True)

    step = update

    def forward_update(self, loss, constraints):
        """:meth:`update`, then the Lagrangian with the new multipliers (and the old ``beta``)."""
        return self._walk(loss, constraints, update=True)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"penalty", "ctol", "param_groups"}``; every array is a copy."""
        groups = []
        for g in self.param_groups:
            groups.append({k: (self._copy(v) if k in ("duals", "momentum_buffer") else copy.deepcopy(v))
                           for k, v in g.items()})
        return {"penalty": self.penalty, "ctol": self.ctol, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, copying its arrays (the source is never aliased); checked first."""
        groups = state_dict["param_groups"]
        penalty = check_penalty(state_dict["penalty"])
        ctol = nonnegative_finite("ctol value", state_dict["ctol"])
        new = []
        for g in groups:
            settings = check_ialm_group(beta=g["beta"], sigma=g["sigma"], gamma=g["gamma"],
                                        momentum=g["momentum"], dampening=g["dampening"],
                                        dual_range=g["dual_range"], is_ineq=g["is_ineq"])
            duals = self._copy(g["duals"])
            buffer = self._copy(g["momentum_buffer"])
            if self._numel(buffer) != self._numel(duals):
                raise ValueError(f"load_state_dict: group {g['name']!r} has {self._numel(duals)} "
                                 f"multipliers and a momentum buffer of {self._numel(buffer)}")
            new.append({"name": g["name"], **settings, "duals": duals, "momentum_buffer": buffer,
                        "dtype_fixed": bool(g.get("dtype_fixed", True))})
            if "nonfinite_skips" in g or getattr(self, "nonfinite", "propagate") != "propagate":
                new[-1]["nonfinite_skips"] = int(g.get("nonfinite_skips", 0))
        self.penalty, self.ctol, self.param_groups = penalty, ctol, new
        for cache in ("_kernel_cache", "_views"):  # per-group caches
            self.__dict__.pop(cache, None)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g['name']}(m={self._numel(g['duals'])}, beta={g['beta']:g}, "
                           f"{'ineq' if g['is_ineq'] else 'eq'})" for g in self.param_groups)
        return f"{type(self).__name__}(penalty={self.penalty}, ctol={self.ctol}, groups=[{groups}])"

    def _kernel_args(self, group, dtype) -> tuple:
        """``(coef, hyper, flags)`` of the kernels for ``group``
        (:func:`uniopt.kernels.ialm_cpu.group_arguments`, cached per optimizer)."""
        return ialm_cpu.group_arguments(self.__dict__.setdefault("_kernel_cache", {}), group, dtype,
                                        self.ctol)

    # -- NumPy arrays ---------------------------------------------------------------------
    #: the array types taken as the flat form of the constraints
    _array_types = (np.ndarray,)

    def _initial_duals(self, size, init_duals, device):
        if init_duals is None or isinstance(init_duals, numbers.Real) and not isinstance(init_duals, bool):
            if size is None:
                return None, False
            fill = 0.0 if init_duals is None else real("init_duals", init_duals)
            return np.full(size, fill, dtype=self._default_dtype), False
        a = np.asarray(init_duals)
        check_ialm_init_array(a.dtype, a.ndim, a.shape)
        return np.array(a, copy=True), True

    def _zeros_like(self, x):
        return np.zeros_like(x)

    def _flat(self, x):
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"constraints: expected real numbers, got dtype {a.dtype}")
        if a.dtype not in _FLOAT_DTYPES:
            a = a.astype(np.float64)
        return a.reshape(-1)

    def _concat(self, parts):
        return np.concatenate(parts)

    def _numel(self, x):
        return int(np.size(x))

    def _dtype(self, x):
        return x.dtype

    def _cast(self, x, dtype):
        return np.ascontiguousarray(x, dtype=dtype)

    def _detach(self, x):
        return x

    def _copy(self, x):
        return np.array(x, copy=True)

    def _dual_step_(self, group, c):
        """:func:`uniopt.kernels.ialm_cpu.ialm_dual_step_` in place: ``(sq_norm, stepsize,
        norm)``; it writes nothing (and returns NaNs) when the direction is not finite."""
        duals = group["duals"]
        coef, hyper, flags = self._kernel_args(group, duals.dtype)
        out = ialm_cpu.ialm_dual_step_(duals, group["momentum_buffer"], c, coef, hyper, flags)
        return float(out[0]), float(out[1]), float(out[2])

    def _dual_norm(self, group, c):
        """``(sq_norm, stepsize, norm)`` of a group's direction (NaNs when it is not finite):
        :func:`uniopt.kernels.ialm_cpu.ialm_dual_norm_`, read-only."""
        coef, hyper, flags = self._kernel_args(group, group["duals"].dtype)
        out = ialm_cpu.ialm_dual_norm_(group["momentum_buffer"], c, coef, hyper, flags)
        return float(out[0]), float(out[1]), float(out[2])

    def _dual_apply(self, group, c, stepsize):
        """The group's multipliers and momentum buffer, in place, with the step size
        :meth:`_dual_norm` gave (:func:`uniopt.kernels.ialm_cpu.ialm_dual_apply_`)."""
        coef, _, flags = self._kernel_args(group, group["duals"].dtype)
        ialm_cpu.ialm_dual_apply_(group["duals"], group["momentum_buffer"], c, coef, flags,
                                  stepsize)

    def _all_finite(self, c) -> bool:
        return bool(all_finite(np.ascontiguousarray(c)))

    def _lagrangian_terms(self, loss, groups, parts, rhos):
        value = float(loss)
        for group, c, rho in zip(groups, parts, rhos):
            c = c.astype(np.float64)
            cp = _np_rules.penalty_part(c, self.ctol, group["is_ineq"])
            value += float(group["duals"].astype(np.float64) @ c) + 0.5 * rho * float(cp @ cp)
        return value

    # -- NumPy only -----------------------------------------------------------------------
    def constraint_weights(self, constraints, *, rhos=None) -> np.ndarray:
        r""":math:`\partial L / \partial c = \lambda + \rho\,\tilde c` per constraint (flat).

        With it, the gradient of the Lagrangian in the primal variables is
        :math:`\nabla f + J_c^\top w`. ``rhos`` (one per group) defaults to the current ones;
        after :meth:`update`, ``rhos="last"`` gives the ones of that update (the pre-growth
        ``beta`` when ``penalty=None``): the gradient of what :meth:`forward_update` returned.
        """
        if isinstance(rhos, str) and rhos == "last":
            rhos = [s["rho"] for s in self.last_step]
        parts = self._gather(constraints)
        rhos = self._rhos() if rhos is None else rhos
        out = [g["duals"].astype(np.float64)
               + rho * _np_rules.penalty_part(c.astype(np.float64), self.ctol, g["is_ineq"])
               for g, c, rho in zip(self.param_groups, parts, rhos)]
        return np.concatenate(out)
