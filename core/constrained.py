r"""Lagrange multipliers on NumPy arrays: the dual side of constrained learning.

The NumPy face of :mod:`uniopt.rules.constrained` (Cooper's dual updates without torch). The
multipliers of the constraints :math:`g(x) \le 0` (``nonnegative=True``) and :math:`h(x) = 0`
receive the constraint violations as their gradient and take *ascent* steps:

* :func:`projected_ascent_`: :math:`\lambda \leftarrow \max(\lambda + \eta\, g, 0)` (or without
  the projection for equality multipliers), step and projection fused in one pass -- Cooper's
  ``SGD(maximize=True)`` step followed by the multiplier's ``post_step_`` relu;
* :func:`indexed_projected_ascent_`: the same for the sampled rows of a large set of
  multipliers only (Cooper's ``IndexedMultiplier``), in time independent of their number;
* :class:`nuPI`: the nuPI optimizer (a PI controller on the gradient), dense or sparse;
* :func:`update_penalty_coefficients_`: Cooper's multiplicative and additive
  feasibility-driven penalty coefficient updaters.

Arrays are updated in place by the kernels of :mod:`uniopt.kernels.constrained_cpu`; they
must be float32 or float64, C-contiguous and writeable, with violations of the same dtype.

Example:
  >>> import numpy as np
  >>> from uniopt.constrained import projected_ascent_
  >>> lam = np.zeros(3)
  >>> _ = projected_ascent_(lam, np.array([0.5, -1.0, 2.0]), 0.1, nonnegative=True)
  >>> lam.tolist()
  [0.05, 0.0, 0.2]

References:
  Gallego-Posada, Ramirez, Hashemizadeh & Lacoste-Julien, "Cooper: A Library for Constrained
  Optimization in Deep Learning" (2025), https://arxiv.org/abs/2504.01212; Sohrabi et al.,
  "On PI controllers for updating Lagrange multipliers in constrained optimization", ICML 2024,
  https://arxiv.org/abs/2406.04558.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Sequence

import numpy as np

from . import _jit
from ._optimizer import Optimizer
from ._validation import (
    boolean,
    check_nupi,
    check_penalty_updater,
    check_projected_ascent,
)
from .kernels import constrained_cpu as _kernels
from .kernels._pointers import addresses
from .rules import constrained as _rules

__all__ = [
    "nuPIInitType",
    "nuPI",
    "projected_ascent_",
    "indexed_projected_ascent_",
    "update_penalty_coefficients_",
    "MASK_KEY",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: the state key of the per-entry "first step still to come" mask (Cooper's name)
MASK_KEY = "needs_error_initialization_mask"


class nuPIInitType(enum.Enum):
    r"""How nuPI initialises :math:`\xi_{-1}`: ``ZEROS`` (:math:`\xi_{-1} = 0`: the first step is
    SGD with gain :math:`K_I + K_P(1-\nu)`) or ``SGD`` (:math:`\xi_{-1} = e_0`: the first step is
    SGD with gain :math:`K_I`, and :math:`\xi_0 = e_0`).

    Members compare equal to (and hash like) any enum member of the same name, such as
    Cooper's ``cooper.optim.nuPIInitType``, so state dicts travel both ways.
    """

    ZEROS = 0
    SGD = 1

    def __eq__(self, other):
        if isinstance(other, enum.Enum):
            return self.name == other.name
        return NotImplemented

    def __hash__(self):
        return hash(self.name)


# ----------------------------------------------------------------------------------------------
# argument checks shared by the functions
# ----------------------------------------------------------------------------------------------
def _array(what: str, a: Any) -> np.ndarray:
    """A float32/float64 C-contiguous writeable ndarray (the in-place argument)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"Invalid {what}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"Invalid {what}: dtype {a.dtype} (expected float32 or float64)")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"Invalid {what}: must be a writeable C-contiguous array")
    return a


def _like(what: str, a: Any, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``a`` as a C-contiguous array of ``shape`` and ``dtype`` (no silent casts)."""
    a = np.asarray(a)
    if a.shape != tuple(shape):
        raise ValueError(f"Invalid {what}: shape {a.shape} (expected {tuple(shape)})")
    if a.dtype != dtype:
        raise TypeError(f"Invalid {what}: dtype {a.dtype} (expected {dtype})")
    return np.ascontiguousarray(a)


def _rows_view(a: np.ndarray) -> np.ndarray:
    """``a`` of shape ``(m, ...)`` as the 2-D ``(m, width)`` view the indexed kernels take."""
    if a.ndim == 0:
        raise ValueError("Invalid multipliers: a 0-d array has no rows")
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))


def _indices(indices: Any, m: int) -> np.ndarray:
    """Row indices as int64 ``(k,)``, each in ``[0, m)`` (checked: the kernels do not)."""
    rows = np.asarray(indices)
    if rows.dtype.kind not in "iu" or rows.ndim != 1:
        raise TypeError(f"Invalid indices: expected a 1-D integer array, got {rows.dtype} of "
                        f"shape {rows.shape}")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    bad = _kernels.first_out_of_range(rows, m) if rows.size else -1
    if bad >= 0:
        raise ValueError(f"Invalid indices: {rows[bad]} is out of range for {m} rows")
    return rows


def _sparse(what: str, p: np.ndarray, indices: Any, values: Any):
    """``(rows, values2d)`` of a sparse gradient ``(indices, values)`` of ``p``."""
    rows = _indices(indices, p.shape[0] if p.ndim else 0)
    values = _like(what, values, (rows.size, *p.shape[1:]), p.dtype)
    width = math.prod(p.shape[1:])
    return rows, values.reshape(rows.size, width)


def _parallel(n: int) -> bool:
    return n >= _jit.PARALLEL_MIN_SIZE


# ----------------------------------------------------------------------------------------------
# projected dual ascent
# ----------------------------------------------------------------------------------------------
def projected_ascent_(multipliers: np.ndarray, violations: Any, lr: float, *,
                      nonnegative: bool) -> np.ndarray:
    r"""One projected gradient-ascent step on dense multipliers, in place, in one pass.

    .. math:: \lambda \leftarrow \max(\lambda + \eta\, g,\ lo)

    with :math:`\eta` = ``lr``, :math:`g` = ``violations`` (the gradient of the Lagrangian in
    the multipliers) and :math:`lo = 0` for inequality multipliers (``nonnegative=True``),
    :math:`-\infty` for equality ones. Equals Cooper's ``torch.optim.SGD(lr,
    maximize=True).step()`` followed by ``DenseMultiplier.post_step_()`` (relu).

    Args:
      multipliers: float32/float64 C-contiguous writeable array, updated in place.
      violations: the constraint violations, same shape and dtype.
      lr: the dual step size (finite, >= 0).
      nonnegative: project onto :math:`\lambda \ge 0` (inequality constraints).

    Returns:
      ``multipliers``.

    Example:
      >>> lam = np.array([0.0, 1.0])
      >>> projected_ascent_(lam, np.array([-1.0, 1.0]), 0.5, nonnegative=True).tolist()
      [0.0, 1.5]
    """
    lr = check_projected_ascent(lr, nonnegative)
    p = _array("multipliers", multipliers)
    g = _like("violations", violations, p.shape, p.dtype)
    coef = np.array([lr, 0.0 if nonnegative else -np.inf], dtype=p.dtype)
    kernel = _kernels.sgd_projected_parallel_ if _parallel(p.size) else _kernels.sgd_projected_
    if p.size:
        kernel(p.reshape(-1), g.reshape(-1), coef)
    return multipliers


def indexed_projected_ascent_(multipliers: np.ndarray, indices: Any, violations: Any,
                              lr: float, *, nonnegative: bool) -> np.ndarray:
    r"""One projected gradient-ascent step on the sampled rows of the multipliers, in place.

    ``multipliers[r] = max(multipliers[r] + lr * v_r, lo)`` for every row ``r`` in ``indices``,
    where :math:`v_r` is the sum of the ``violations`` given for ``r`` (a repeated index adds
    up, as the sparse gradient of Cooper's ``IndexedMultiplier`` -- an embedding lookup --
    coalesces). Only the sampled rows are read or written: the cost is ``O(k)`` for
    ``k`` indices, whatever the number of rows (Cooper's ``post_step_`` relu passes over every
    row).

    Args:
      multipliers: float32/float64 C-contiguous writeable array of shape ``(m, ...)``.
      indices: integer array ``(k,)``, each in ``[0, m)``; may be empty or repeat.
      violations: ``(k, ...)`` (the rows' trailing shape), the dtype of ``multipliers``.
      lr: the dual step size (finite, >= 0).
      nonnegative: project onto :math:`\lambda \ge 0` (inequality constraints).

    Returns:
      ``multipliers``.

    Example:
      >>> lam = np.zeros(5)
      >>> _ = indexed_projected_ascent_(lam, np.array([3, 1, 3]), np.array([1.0, -2.0, 0.5]),
      ...                               0.1, nonnegative=True)
      >>> lam.tolist()
      [0.0, 0.0, 0.0, 0.15000000000000002, 0.0]
    """
    lr = check_projected_ascent(lr, nonnegative)
    p = _array("multipliers", multipliers)
    rows, values = _sparse("violations", p, indices, violations)
    coef = np.array([lr, 0.0 if nonnegative else -np.inf], dtype=p.dtype)
    if rows.size:
        _kernels.indexed_sgd_projected_(_rows_view(p), rows, values, coef)
    return multipliers


# ----------------------------------------------------------------------------------------------
# penalty coefficients
# ----------------------------------------------------------------------------------------------
def update_penalty_coefficients_(coefficients: np.ndarray, violations: Any, *, init: Any,
                                 is_ineq: bool, kind: str = "multiplicative",
                                 growth_factor: float = 1.01, increment: float = 1.0,
                                 violation_tolerance: float = 1e-4, has_restart: bool = True,
                                 indices: Any = None) -> np.ndarray:
    r"""Cooper's feasibility-driven penalty coefficient update, in place.

    With the measure :math:`m = \max(g, 0)` (inequality, ``is_ineq``) or :math:`|h|` (equality),
    taken entry by entry -- or, for a single (scalar) coefficient, the 2-norm of those entries:

    .. math:: c \leftarrow c\,\kappa + \delta \quad \text{where } m > \text{tol},

    with :math:`(\kappa, \delta)` = ``(growth_factor, 0)`` (``kind="multiplicative"``) or
    ``(1, increment)`` (``"additive"``); then with ``has_restart``, an inequality whose measure
    is 0 (satisfied) goes back to ``init``.

    Args:
      coefficients: float32/float64 C-contiguous writeable array: one element (a scalar
        coefficient, updated from the norm), the shape of ``violations`` (dense), or ``(m,)``
        with ``indices`` (indexed: only the sampled entries are read and written).
      violations: the strict constraint violations (the dtype of ``coefficients``).
      init: the initial coefficients (a number, or an array shaped as ``coefficients``).
      is_ineq: whether the constraints are inequalities.
      kind: ``"multiplicative"`` or ``"additive"``.
      growth_factor: :math:`\kappa` of the multiplicative updater (Cooper's default 1.01).
      increment: :math:`\delta` of the additive updater (Cooper's default 1.0).
      violation_tolerance: the tolerance (finite, >= 0; Cooper's default 1e-4).
      has_restart: reset satisfied inequalities to ``init``.
      indices: ``(k,)`` sampled entries of ``coefficients`` (``violations`` is then ``(k,)``);
        a repeated index takes the update of its last occurrence, computed from the old value.

    Returns:
      ``coefficients``.
    """
    factor, delta = check_penalty_updater(kind, growth_factor, increment, violation_tolerance,
                                          has_restart)
    is_ineq = boolean("is_ineq value", is_ineq)
    c = _array("coefficients", coefficients)
    dtype = c.dtype
    coef = np.array([violation_tolerance, factor, delta], dtype=dtype)
    flags = np.array([is_ineq, has_restart], dtype=np.int64)
    init_array = np.asarray(init, dtype=dtype)
    if init_array.shape not in ((), c.shape):
        raise ValueError(f"Invalid init: shape {init_array.shape} (expected () or {c.shape})")
    init_full = np.ascontiguousarray(np.broadcast_to(init_array, c.shape))
    if indices is not None:
        if c.ndim != 1:
            raise ValueError(f"Invalid coefficients: shape {c.shape} (indexed coefficients "
                             f"are 1-D)")
        rows = _indices(indices, c.shape[0])
        v = _like("violations", violations, rows.shape, dtype)
        if rows.size:
            _kernels.indexed_penalty_update_(c, init_full, rows, v, coef, flags)
        return coefficients
    v = np.asarray(violations)
    if c.size == 1 and v.shape != c.shape:  # a scalar coefficient: the norm of the measure
        if v.dtype != dtype:
            raise TypeError(f"Invalid violations: dtype {v.dtype} (expected {dtype})")
        entries = np.maximum(v, 0) if is_ineq else v
        measure = float(np.linalg.norm(entries.astype(np.float64).reshape(-1)))
        new = _rules.penalty_update(float(c.reshape(-1)[0]), float(init_full.reshape(-1)[0]),
                                    measure, float(coef[0]), float(coef[1]), float(coef[2]),
                                    bool(is_ineq and has_restart))
        c.reshape(-1)[0] = new
        return coefficients
    v = _like("violations", v, c.shape, dtype)
    kernel = _kernels.penalty_update_parallel_ if _parallel(c.size) else _kernels.penalty_update_
    if c.size:
        kernel(c.reshape(-1), init_full.reshape(-1), v.reshape(-1), coef, flags)
    return coefficients


# ----------------------------------------------------------------------------------------------
# nuPI
# ----------------------------------------------------------------------------------------------
def _gain_value(value: Any):
    """A gain as stored in a group: a float (one for every entry) or a float64 array copy."""
    array = np.asarray(value, dtype=np.float64)
    return float(array.reshape(-1)[0]) if array.size == 1 else array.copy()


class nuPI(Optimizer):
    r"""The nuPI optimizer on NumPy arrays (dense or sparse gradients), updated in place.

    With the error :math:`e_t` = the gradient:

    .. math::
       \xi_t = \nu \xi_{t-1} + (1-\nu) e_t, \qquad
       \theta_{t+1} = \theta_t \pm \eta\,\big(K_I e_t + K_P (\xi_t - \xi_{t-1})\big)
       - \eta\, w\, \theta_t

    (:math:`+` with ``maximize``; decoupled weight decay :math:`w`, AdamW style), with
    :math:`\eta` = ``lr``, :math:`K_P, K_I` = ``Kp, Ki``, :math:`\nu` = ``ema_nu``.
    ``init_type=ZEROS`` starts from :math:`\xi_{-1} = 0`; ``SGD`` from :math:`\xi_{-1} = e_0`,
    so each entry's first step is SGD's (:math:`K_I e_0`) and :math:`\xi_0 = e_0` -- on dense
    and sparse gradients alike (Cooper's dense path sets :math:`\xi_0 = 0` instead, see
    ``docs/deviations.md``). ``nuPI(Kp=0, Ki=1, ema_nu=0)`` is SGD; ``Kp=Ki=1, ema_nu=0`` is the
    optimistic gradient method.

    Args:
      params: a list of float32/float64 C-contiguous arrays, or a list of param-group dicts.
      lr: :math:`\eta` (finite, >= 0).
      weight_decay: :math:`w` (finite, >= 0).
      Kp: proportional gain: a number, or an array of per-entry gains shaped as every
        parameter of its group.
      Ki: integral gain (as ``Kp``).
      ema_nu: :math:`\nu`, in (-1, 1).
      init_type: :class:`nuPIInitType` (or Cooper's enum, or ``"sgd"``/``"zeros"``).
      maximize: (bool) ascend (the dual side) instead of descend.
      nonnegative: (bool, keyword) fuse the projection :math:`\theta \ge 0` into the step
        (what Cooper's inequality multipliers do in ``post_step_``), on the entries stepped.
      nonfinite: (keyword) ``"propagate"`` (default), ``"raise"`` or ``"skip"``: what a step
        does with NaN/inf gradients (docs/faults.md).

    ``step(grads)`` takes one gradient per parameter: an array of its shape and dtype, ``None``
    (skipped), or a sparse gradient ``(indices, values)`` of the rows ``indices`` (``(k,)``
    integers, may repeat: values are summed per row) with ``values`` shaped ``(k,
    *param.shape[1:])``; only those rows are read and written. State per parameter: ``xi``
    (:math:`\xi`), and after a sparse step under the SGD initialisation
    ``needs_error_initialization_mask`` (bool, Cooper's name: the entries whose first step is
    still to come). A step that raises changes nothing.

    Example:
      >>> lam = np.zeros(2)
      >>> opt = nuPI([lam], lr=0.5, Kp=1.0, Ki=1.0, maximize=True, nonnegative=True)
      >>> opt.step([np.array([1.0, -1.0])])
      >>> opt.step([np.array([2.0, -1.0])])
      >>> lam.tolist()    # 0.5 * 1, then + 0.5 * (2 + (2 - 1))
      [2.0, 0.0]

    References:
      Sohrabi, Ramirez, Zhang, Lacoste-Julien & Gallego-Posada, "On PI controllers for updating
      Lagrange multipliers in constrained optimization", ICML 2024,
      https://arxiv.org/abs/2406.04558
    """

    def __init__(self, params, lr, weight_decay=0.0, Kp=0.0, Ki=1.0, ema_nu=0.0,
                 init_type=nuPIInitType.SGD, maximize=False, *, nonnegative=False,
                 nonfinite="propagate"):
        kind = check_nupi(lr, weight_decay, Kp, Ki, ema_nu, init_type, maximize)
        boolean("nonnegative value", nonnegative)
        defaults = dict(lr=lr, weight_decay=weight_decay, Kp=_gain_value(Kp), Ki=_gain_value(Ki),
                        ema_nu=ema_nu, init_type=nuPIInitType[kind], maximize=bool(maximize),
                        nonnegative=bool(nonnegative))
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _check_group(self, group):
        import warnings

        with warnings.catch_warnings():  # warned once, at construction
            warnings.simplefilter("ignore")
            kind = check_nupi(group["lr"], group["weight_decay"], group["Kp"], group["Ki"],
                              group["ema_nu"], group["init_type"], group["maximize"])
        boolean("nonnegative value", group["nonnegative"])
        group["init_type"] = nuPIInitType[kind]
        group["Kp"], group["Ki"] = _gain_value(group["Kp"]), _gain_value(group["Ki"])
        for key in ("Kp", "Ki"):
            gain = group[key]
            if isinstance(gain, np.ndarray):
                for i, p in enumerate(group["params"]):
                    if gain.size != p.size:
                        raise ValueError(f"Invalid {key} value: {gain.size} per-entry gains for "
                                         f"parameter {i} of {p.size} entries")

    # -- stepping -------------------------------------------------------------------------
    def _check_all(self, grads: Sequence) -> list:
        """Every gradient checked (dense arrays or ``(indices, values)``), nothing changed."""
        if isinstance(grads, (np.ndarray, tuple)) and len(self._params) == 1 and (
                isinstance(grads, np.ndarray) or len(grads) != 1):
            grads = [grads]
        grads = list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"step() got {len(grads)} gradients for {len(self._params)} "
                             f"parameters")
        checked = []
        for i, (p, g) in enumerate(zip(self._params, grads)):
            if g is None:
                checked.append(None)
            elif isinstance(g, tuple):
                if len(g) != 2:
                    raise ValueError(f"Invalid gradient at index {i}: a sparse gradient is "
                                     f"(indices, values)")
                if p.ndim == 0:
                    raise ValueError(f"Invalid gradient at index {i}: a 0-d parameter has no rows")
                checked.append(_sparse(f"gradient at index {i}", p, g[0], g[1]))
            else:
                checked.append(_like(f"gradient at index {i}", g, p.shape, p.dtype))
        return checked

    def step(self, grads: Sequence, closure=None):
        """Update every parameter with a gradient (see the class docstring for the forms).

        Args:
          grads: one gradient per parameter, in the order of the param groups.
          closure: optional callable evaluated first; its result is returned.
        """
        loss = closure() if closure is not None else None
        grads = self._check_all(grads)
        if self.nonfinite != "propagate" and not self._nonfinite_gate(grads):
            return loss
        for group, indices in zip(self.param_groups, self._group_indices()):
            dense = [i for i in indices if isinstance(grads[i], np.ndarray)]
            sparse = [i for i in indices if isinstance(grads[i], tuple)]
            if dense or sparse:
                self._step(group, dense, sparse, grads)
        return loss

    @staticmethod
    def _coef(group: dict, dtype) -> np.ndarray:
        nu = float(group["ema_nu"])
        lr = float(group["lr"])
        kp, ki = group["Kp"], group["Ki"]
        kpn = kp * (1.0 - nu) if not isinstance(kp, np.ndarray) else 0.0
        return np.array([ki if not isinstance(ki, np.ndarray) else 0.0, kpn, nu, 1.0 - nu,
                         lr if group["maximize"] else -lr, lr * float(group["weight_decay"]),
                         0.0 if group["nonnegative"] else -np.inf], dtype=dtype)

    @staticmethod
    def _gains(group: dict, dtype, coef: np.ndarray, shape2d=None) -> tuple:
        """``(ki, kpn)`` arrays of the kernels: one element, or per entry (flat / ``shape2d``)."""
        nu = float(group["ema_nu"])
        out = []
        for key, scalar in (("Ki", coef[0:1]), ("Kp", coef[1:2])):
            gain = group[key]
            if isinstance(gain, np.ndarray):
                gain = gain.reshape(-1) * (1.0 - nu) if key == "Kp" else gain.reshape(-1)
                gain = np.ascontiguousarray(gain, dtype=dtype)
            else:
                gain = scalar.copy()
            out.append(gain.reshape(shape2d if gain.size > 1 else (1, 1)) if shape2d else gain)
        return tuple(out)

    def _step(self, group: dict, dense: list, sparse: list, grads: list) -> None:
        sgd_init = group["init_type"] == nuPIInitType.SGD
        per_entry = isinstance(group["Kp"], np.ndarray) or isinstance(group["Ki"], np.ndarray)
        for dtype in _FLOAT_DTYPES:
            coef = self._coef(group, dtype)
            table, fresh = [], []
            for i in (i for i in dense if self._params[i].dtype == dtype):
                p = self._params[i]
                state = self.state.get(i)
                created = state is None
                if created:
                    state = self.state[i] = {"xi": np.zeros_like(p)}
                if MASK_KEY in state and p.ndim:  # stepped sparse before: per-entry freshness
                    self._indexed(group, p, state, np.arange(p.shape[0], dtype=np.int64),
                                  grads[i].reshape(p.shape[0], -1), coef)
                elif per_entry:
                    ki, kpn = self._gains(group, dtype, coef)
                    kernel = _kernels.nupi_parallel_ if _parallel(p.size) else _kernels.nupi_
                    kernel(p.reshape(-1), grads[i].reshape(-1), state["xi"].reshape(-1), ki, kpn,
                           coef, np.array([created and sgd_init], dtype=np.int64))
                else:
                    table.append(i)
                    fresh.append(created and sgd_init)
            if table:
                params = [self._params[i] for i in table]
                sizes = np.array([p.size for p in params], dtype=np.int64)
                kernel = (_kernels.nupi_table_parallel_ if _parallel(int(sizes.sum()))
                          else _kernels.nupi_table_)
                kernel(addresses(params), addresses([grads[i] for i in table]),
                       addresses([self.state[i]["xi"] for i in table]), sizes,
                       np.array(fresh, dtype=np.int64), coef)
            for i in (i for i in sparse if self._params[i].dtype == dtype):
                p = self._params[i]
                rows, values = grads[i]
                if not rows.size:  # an empty gradient: no state, no step (as Cooper)
                    continue
                state = self.state.get(i)
                if state is None:
                    state = self.state[i] = {"xi": np.zeros_like(p)}
                    if sgd_init:
                        state[MASK_KEY] = np.ones(p.shape, dtype=bool)
                self._indexed(group, p, state, rows, values, coef)

    def _indexed(self, group, p, state, rows, values, coef) -> None:
        shape2d = (p.shape[0], p.size // p.shape[0] if p.shape[0] else 1)
        ki, kpn = self._gains(group, p.dtype, coef, shape2d)
        mask = state.get(MASK_KEY)
        use_mask = mask is not None
        _kernels.indexed_nupi_(p.reshape(shape2d), rows, values, state["xi"].reshape(shape2d),
                               mask.reshape(shape2d) if use_mask else np.zeros((1, 1), bool),
                               ki, kpn, coef, np.array([use_mask], dtype=np.int64))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict (copied); the mask is restored as a bool array (as Cooper's)."""
        super().load_state_dict(state_dict)
        for i, s in self.state.items():
            if MASK_KEY in s:
                s[MASK_KEY] = np.asarray(s[MASK_KEY]).astype(bool).reshape(self._params[i].shape)

