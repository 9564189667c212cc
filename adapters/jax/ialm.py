r"""iALM's dual optimizer in JAX: a functional ``init`` / ``update`` pair and the Lagrangian.

:func:`ialm` is the JAX face of :class:`uniopt.iALM` (the NumPy reference, whose semantics it
reproduces bit for bit up to summation order). It is optax-like: a NamedTuple of pure
functions and a NamedTuple state, everything jit-able and vmap-able. The dual step traces the
rules of :mod:`uniopt.rules.ialm` bound to ``jax.numpy``; the arithmetic is never written
again here.

Constraint groups are the leaves of the constraints pytree: a single array is one group, a
list/tuple/dict of arrays one group per leaf (in :func:`jax.tree.leaves` order). A leaf may
have any shape; its multipliers have the same shape and its norm is over all its entries.

Two executions of the dual step, chosen per step at trace time (argument ``ffi``): the traced
``jax.numpy`` expression, or ONE call through XLA's FFI of the NumPy core's Numba kernel for
every group (:mod:`uniopt.kernels.ialm_ffi`, registered on first use by :mod:`._ffi`), which
updates the multipliers and momentum buffers in place (``input_output_aliases``; with the state
donated, no copies) and equals :class:`uniopt.iALM` bit for bit for the same ``beta``. The
counters and the growth of ``beta`` stay traced around the call. ``ffi=None`` (default) takes
the call where it applies and pays: under ``jit`` (not under ``grad``/``vmap`` tracing, not
eagerly), on CPU, every group float32 or float64 (one dtype for all), at least
:data:`FFI_MIN_SIZE` constraints in all. ``ffi=True``/``False`` force a path (``True`` raises
``TypeError`` for other dtypes; groups of two dtypes still take the traced path, as one call
must decide the whole step's skip). A jitted ``update`` differentiated from outside gets the
traced path's derivative (:func:`uniopt.adapters.jax._ffi.with_traced_derivatives`).
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import _jit, _validation
from uniopt._validation import check_ialm_group, check_penalty
from uniopt.rules import bind
from uniopt.kernels import ialm_cpu as _ialm_cpu
from uniopt.kernels import ialm_ffi as _ialm_ffi
from uniopt.rules import ialm as _ialm

from . import _ffi
from ._faults import nonfinite_raise
from ._solver import check_axis_name, mean_over

__all__ = ["IALMState", "IALMTransformation", "ialm", "FFI_MIN_SIZE"]

#: Total constraint count (all groups) from which ``ffi=None`` runs a jitted ``update`` on CPU
#: through the FFI call (environment: ``UNIOPT_JAX_FFI_IALM_MIN_SIZE``, parsed as
#: ``UNIOPT_PARALLEL_MIN_SIZE`` is; an empty value means never). Measured with
#: ``asv_bench/benchmarks/jax_ffi_ialm.py`` (jitted ``update``, donated state, float32,
#: momentum, one pinned CPU; medians of interleaved paired ratios), the call took 0.52-0.59x
#: the traced step's time from 1e4 constraints (1 or 10 groups; 0.23-0.27x at 1e6), and
#: 0.53-0.91x below, where it saves at most 0.02-0.05 ms per step: too little to pay, in most
#: runs, for loading the handler in every process that jits iALM (about 0.4 s from Numba's
#: cache, tens of seconds to compile it cold) and for the call's fusion barrier (constraints
#: computed in the same ``jit`` are written out before it). Default: 10000.
FFI_MIN_SIZE = _jit._parse_min_size("UNIOPT_JAX_FFI_IALM_MIN_SIZE",
                                    os.environ.get("UNIOPT_JAX_FFI_IALM_MIN_SIZE", "10000"))

_rules = bind(_ialm, where=jnp.where, minimum=jnp.minimum, maximum=jnp.maximum, sqrt=jnp.sqrt,
              frexp=jnp.frexp, ldexp=jnp.ldexp)

#: the hyper-parameters that may be given per group, with the value check_ialm_group gets for
#: the others when one entry is checked on its own
_NEUTRAL = {"beta": 1.0, "sigma": 1.0, "gamma": 1.0, "momentum": 0.0, "dampening": 0.0,
            "dual_range": (None, None), "is_ineq": False}


class IALMState(NamedTuple):
    """State of :func:`ialm`; every field has the structure of the constraints pytree.

    Attributes:
      duals: the multipliers :math:`\\lambda_k`, one array per group (the group's shape).
      momentum_buffer: the momentum buffers :math:`b_k` (zeros, and left so, in groups
        without momentum).
      beta: each group's current step cap :math:`\\beta_k` (0-d, the duals' dtype); multiplied
        by :math:`\\sigma_k` at every update.
      stepsize: each group's step :math:`\\min(\\beta_k, \\gamma_k/\\|d_k\\|)` of the last update
        (0-d; 0 before the first update and for a zero direction).
      count: the number of updates so far (int32; skipped updates not counted).
      notfinite_count: the number of consecutive updates skipped because some constraint
        value (or some group's momentum direction) was not finite (int32; 0 again after an
        update with finite values), as in :func:`optax.apply_if_finite`.
      last_finite: whether the constraint values of the last update were all finite.
      total_notfinite: the number of updates skipped so far (int32).
    """

    duals: Any
    momentum_buffer: Any
    beta: Any
    stepsize: Any
    count: jax.Array
    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array

    @property
    def nonfinite_skips(self) -> jax.Array:
        """The number of updates skipped for non-finite constraint values (``total_notfinite``,
        the name every face uses: docs/faults.md)."""
        return self.total_notfinite


class IALMTransformation(NamedTuple):
    """What :func:`ialm` returns: ``init``, ``update``, ``lagrangian``, ``forward_update``."""

    init: Callable[[Any], IALMState]
    update: Callable[[Any, IALMState], IALMState]
    lagrangian: Callable[[Any, Any, IALMState], jax.Array]
    forward_update: Callable[[Any, Any, IALMState], tuple]


class _Group(NamedTuple):
    """One group's resolved, validated, static settings."""

    name: str
    beta: float
    sigma: float
    gamma: float
    momentum: float
    dampening: float
    lower: float
    upper: float
    is_ineq: bool
    init_duals: Any


# ----------------------------------------------------------------------------------------------
# Hyper-parameters given once or per group
# ----------------------------------------------------------------------------------------------
def _is_container(value: Any) -> bool:
    """A pytree node (list, tuple, dict, ...), as opposed to a leaf or ``None``."""
    if value is None:
        return False
    return not jax.tree_util.treedef_is_leaf(jax.tree.structure(value))


def _is_pair(value: Any) -> bool:
    """A single ``dual_range``: ``None``, a list/tuple of numbers / ``None`` (any length), or
    a 1-D NumPy array (any length: the checks say whether it is a pair)."""
    if value is None:
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and not any(_is_container(v) for v in value)


def _is_single(name: str, value: Any) -> bool:
    """Whether ``value`` is meant for every group (else it holds one entry per group)."""
    if name == "dual_range":
        return _is_pair(value)
    if name == "init_duals":
        return value is None or isinstance(value, numbers.Number)
    return not _is_container(value)


def _entries(name: str, value: Any) -> list:
    """The per-group entries of a per-group ``value`` (its leaves, pairs kept whole)."""
    is_leaf = _is_pair if name == "dual_range" else (lambda v: v is None)
    return [v for v in jax.tree.leaves(value, is_leaf=is_leaf)]


def _check_init_duals(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Invalid init_duals: {value!r} (expected None, a number or a float "
                        f"array per group)")
    if isinstance(value, numbers.Number):
        _validation.finite("init_duals", value)
        return
    if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
        raise TypeError(f"Invalid init_duals: {value!r} (expected None, a number or a float "
                        f"array per group)")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"Invalid init_duals: expected a float array, got dtype {value.dtype}")
    if not bool(np.all(np.isfinite(np.asarray(value)))):
        raise ValueError("Invalid init_duals: not every value is finite")


def _check_entry(name: str, value: Any) -> None:
    """Check one group's value of hyper-parameter ``name`` (uniopt's messages)."""
    if name == "init_duals":
        _check_init_duals(value)
    else:
        check_ialm_group(**{**_NEUTRAL, name: value})


def _per_group(name: str, value: Any, treedef, n: int) -> list:
    """``value`` as a list with one entry per group of ``treedef``.

    A single value is repeated; otherwise ``value`` is a pytree of the constraints' structure
    (read up to its leaves) or a list/tuple with one entry per group in leaf order.
    """
    if _is_single(name, value):
        return [value] * n
    root_is_leaf = jax.tree_util.treedef_is_leaf(treedef)
    out = None
    if not root_is_leaf:
        try:
            out = treedef.flatten_up_to(value)
        except (ValueError, TypeError):
            out = None
    if out is None and isinstance(value, (list, tuple)) and len(value) == n:
        out = list(value)
    if out is None and root_is_leaf and not _is_container(value):
        out = [value]  # one group: e.g. its init_duals array
    if out is None:
        raise ValueError(f"Invalid {name}: {value!r} does not match the constraints: give one "
                         f"value for every group or one entry per group ({n} groups, structure "
                         f"{treedef})")
    return out


# ----------------------------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------------------------
def ialm(beta: Any = 1.0, sigma: Any = 1.0, gamma: Any = 1.0, penalty: Any = 1.0, *,
         dual_range: Any = (-100.0, 100.0), momentum: Any = 0.0, dampening: Any = 0.0,
         is_ineq: Any = False, ctol: float = 0.0, init_duals: Any = None,
         axis_name: Any = None,
         nonfinite: str = "propagate", ffi: bool | None = None) -> IALMTransformation:
    r"""iALM's dual step (adaptive, capped dual ascent) and augmented Lagrangian, functionally.

    For every constraint group :math:`k` (a leaf of the constraints pytree, values
    :math:`c_k`, constraints :math:`c_k = 0`, or :math:`c_k \le 0` with ``is_ineq``), one
    ``update`` does

    .. math::
       d_k = \bar c_k \ \text{or}\ b_k \leftarrow \mu_k b_k + (1 - \delta_k)\bar c_k,\ d_k = b_k;
       \qquad \lambda_k \leftarrow \operatorname{clamp}\Bigl(\lambda_k + \min\bigl(\beta_k,
       \tfrac{\gamma_k}{\|d_k\|_2}\bigr) d_k,\ lo_k, hi_k\Bigr);
       \qquad \beta_k \leftarrow \sigma_k \beta_k

    with :math:`\bar c_k` the ``ctol``-filtered values (0 where :math:`|c| \le` ``ctol`` for
    equalities, where :math:`0 < c \le` ``ctol`` for inequalities) and a zero step when
    :math:`\|d_k\| = 0`. The augmented Lagrangian is

    .. math::
       L = f + \sum_k \lambda_k^\top c_k + \frac{\rho_k}{2}\|\tilde c_k\|^2,\qquad
       \tilde c_k = \max(\bar c_k, 0)\ \text{(inequalities)},\ \bar c_k\ \text{(equalities)}

    Symbols: :math:`\beta, \sigma, \gamma, \mu, \delta` = ``beta``, ``sigma``, ``gamma``,
    ``momentum``, ``dampening``; :math:`(lo_k, hi_k)` = ``dual_range`` (with
    :math:`lo_k = \max(lo, 0)` for inequality groups); :math:`\rho_k` = ``penalty``, or with
    ``penalty=None`` the group's :math:`\beta_k` before this update's growth.

    The returned functions (all pure, jit-able and vmap-able):

    * ``init(constraints) -> IALMState``: multipliers from ``init_duals`` (zeros by default) in
      the constraints' float dtype (or the ``init_duals`` array's), zero buffers, ``beta``.
    * ``update(constraints, state) -> IALMState``: the dual step above (``state.count + 1``).
      It is differentiable in ``constraints`` (for unrolling), finitely so at a zero direction.
      The norm :math:`\|d_k\|` is overflow-safe (scaled by a power of two near
      :math:`\max|d_i|`, as BLAS ``nrm2``; the same bits as the plain norm wherever that one
      neither overflows nor underflows). A step whose constraint values are not all finite
      (in any group), or whose momentum direction :math:`\mu b + (1 - \delta) c` is not (a
      buffer near the dtype's range), is skipped as a whole, as
      :func:`optax.apply_if_finite` does: every
      multiplier, buffer, ``beta`` and ``stepsize`` stays, ``count`` too, and
      ``notfinite_count`` / ``total_notfinite`` count it (``last_finite`` is False); traced,
      so it works under ``jit`` and ``vmap`` (each problem of a batch decides for itself).
    * ``lagrangian(loss, constraints, state) -> L`` at the state's multipliers and ``beta``
      (the state is a constant: ``stop_gradient``), differentiable in ``loss`` and
      ``constraints``: :math:`\nabla_\theta L = \nabla f + J_c^\top(\lambda + \rho\,\tilde c)`.
    * ``forward_update(loss, constraints, state) -> (L, new_state)``: ``update``, then ``L``
      with the new multipliers and the pre-growth ``beta`` (the NumPy ``forward_update``).
      ``lagrangian`` then ``update`` is the simultaneous idiom (``forward`` then ``update``).

    Hyper-parameters ``beta``, ``sigma``, ``gamma``, ``momentum``, ``dampening``,
    ``dual_range``, ``is_ineq`` and ``init_duals`` are given once for every group, or per
    group: either a list/tuple with one entry per group in :func:`jax.tree.leaves` order of the
    constraints, or a pytree of the constraints' structure with one entry at each leaf
    (e.g. ``is_ineq={"eq": False, "ineq": True}``). A single ``dual_range`` is a pair
    ``(low, high)`` (``None``: unbounded; a 1-D NumPy array of two numbers counts as one);
    per group it is a list / pytree of pairs. An empty list/tuple/dict of per-group values
    is a ValueError at construction. A single
    ``init_duals`` is ``None`` or a number; per group, each entry is ``None``, a number or a
    float array of the group's size (so an array alone is the one group's multipliers).
    ``penalty`` and ``ctol`` apply to every group. Hyper-parameters are static Python numbers;
    ``beta`` lives in the state.

    Args:
      beta: initial step cap :math:`\beta_k \ge 0` (also :math:`\rho_k` with ``penalty=None``).
      sigma: growth factor :math:`\sigma_k > 0` of ``beta`` per update.
      gamma: :math:`\gamma_k \ge 0`, bounds the step length :math:`\|s_k d_k\| \le \gamma_k`.
      penalty: :math:`\rho \ge 0` of the quadratic term, or None (each group's ``beta``).
      dual_range: clamp ``(low, high)`` of the multipliers.
      momentum: heavy-ball coefficient :math:`\mu_k \in [0, 1]` of the dual direction.
      dampening: :math:`\delta_k \in [0, 1]` (0: ``b = mu b + c``; ``momentum``: an EMA).
      is_ineq: whether a group's constraints are inequalities :math:`c \le 0`.
      ctol: violations within ``ctol \ge 0`` count as satisfied.
      init_duals: initial multipliers (see above).
      axis_name: None, or the mapped axis (a name or a tuple of names) of ``shard_map``/
        ``pmap`` data parallelism: ``update``, ``lagrangian`` and ``forward_update`` average
        the constraint values each device measured on its batch shard over these devices
        (``lax.pmean``) before using them, so every device takes the full-batch dual step and
        holds the same multipliers. Differentiate ``lagrangian`` as a loss: with the loss
        passed to it averaged (``lax.pmean``) under ``shard_map``'s default
        ``check_vma=True``, or with the gradients averaged after it under
        ``check_vma=False``; either gives the full-batch gradient (``docs/distributed.md``).
        Not needed under ``jit`` with sharded arrays.
      nonfinite: ``"propagate"`` (default) and ``"skip"`` both skip an update whose constraint
        values are not all finite, as described above (a dual step cannot carry NaN/inf: that
        is today's behaviour, traced; ``state.nonfinite_skips`` is ``total_notfinite``);
        ``"raise"`` raises ``FloatingPointError`` from ``update``/``forward_update`` on
        concrete values, and ``TypeError`` when they are traced (under ``jit``: use
        ``"skip"`` there). See docs/faults.md.
      ffi: the execution of ``update`` and ``forward_update`` (keyword only): ``None`` takes
        the FFI call (the Numba kernel inside ``jit``) where it applies and pays (see the
        module docs and :data:`FFI_MIN_SIZE`), ``True`` forces it (eagerly too), ``False``
        never takes it. Only ``None``, ``True`` and ``False`` (checked by identity).

    Returns:
      An :class:`IALMTransformation`.

    Raises:
      ValueError, TypeError: at construction, a hyper-parameter out of range or of the wrong
        type (message naming it and its value, as :class:`uniopt.iALM`; an ``axis_name`` that
        is not None, a str or a tuple of str is a TypeError, as is an ``ffi`` other than
        None, True or False); at ``init``, a
        per-group hyper-parameter that does not match the constraints (message naming it;
        e.g. an ``init_duals`` array whose size is not the group's); at ``update`` /
        ``lagrangian``, constraints whose structure or sizes differ from the state's; at
        ``update`` with ``ffi=True``, multipliers other than float32/float64 (TypeError).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from uniopt.adapters.jax import ialm
      >>> dual = ialm(beta=1.0, is_ineq=True)       # minimise x^2 subject to 1 - x <= 0
      >>> x = jnp.array([2.0]); state = dual.init(1.0 - x)
      >>> for _ in range(300):
      ...     state = dual.update(1.0 - x, state)
      ...     x = x - 0.1 * jax.grad(lambda x: dual.lagrangian(jnp.sum(x**2), 1.0 - x, state))(x)
      >>> bool(abs(x[0] - 1.0) < 1e-3)
      True

    References:
      Li, Chen, Liu, Lu & Xu, "Stochastic inexact augmented Lagrangian method for nonconvex
      expectation constrained optimization", Comput. Optim. Appl. 87 (2024),
      https://doi.org/10.1007/s10589-023-00521-z (Algorithm 1).
    """
    specs = {"beta": beta, "sigma": sigma, "gamma": gamma, "momentum": momentum,
             "dampening": dampening, "dual_range": dual_range, "is_ineq": is_ineq,
             "init_duals": init_duals}
    penalty = check_penalty(penalty)
    ctol = _validation.nonnegative_finite("ctol value", ctol)
    axis_name = check_axis_name(axis_name)
    _validation.check_nonfinite(nonfinite)
    _ffi.check_flag(ffi)
    for name, value in specs.items():
        entries = [value] if _is_single(name, value) else _entries(name, value)
        if not entries:  # a container without entries matches no constraints
            raise ValueError(f"Invalid {name}: {value!r} (no entry for any group; give one "
                             f"value for every group or one entry per group)")
        for entry in entries:
            _check_entry(name, entry)
    if all(_is_single(name, value) for name, value in specs.items()):
        check_ialm_group(**{k: v for k, v in specs.items() if k != "init_duals"})

    cache: dict = {}

    def groups_of(treedef, paths) -> tuple:
        if treedef in cache:
            return cache[treedef]
        n = treedef.num_leaves
        per = {name: _per_group(name, value, treedef, n) for name, value in specs.items()}
        out = []
        for k in range(n):
            entry = {name: per[name][k] for name in specs}
            for name in specs:
                one = (not _is_container(entry[name]) if name == "init_duals"
                       else _is_single(name, entry[name]))
                if not one:
                    raise ValueError(f"Invalid {name}: {entry[name]!r} for group {k} "
                                     f"({paths[k] or 'the root'}) is not a single value")
                _check_entry(name, entry[name])
            s = check_ialm_group(**{k_: v for k_, v in entry.items() if k_ != "init_duals"})
            out.append(_Group(name=paths[k] or "<root>", beta=s["beta"], sigma=s["sigma"],
                              gamma=s["gamma"], momentum=s["momentum"],
                              dampening=s["dampening"], lower=s["lower_bound"],
                              upper=s["upper_bound"], is_ineq=s["is_ineq"],
                              init_duals=entry["init_duals"]))
        cache[treedef] = tuple(out)
        return cache[treedef]

    def split(constraints):
        """``(treedef, leaves as arrays, groups)`` of a constraints pytree."""
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(constraints)
        if not with_paths:
            raise ValueError("ialm: the constraints pytree has no leaves (no constraint group)")
        paths = [jax.tree_util.keystr(p) for p, _ in with_paths]
        leaves = [jnp.asarray(leaf) for _, leaf in with_paths]
        return treedef, leaves, groups_of(treedef, paths)

    def matched(constraints, state):
        """The constraints' leaves, reshaped to the state's multipliers, and the groups."""
        treedef, leaves, groups = split(constraints)
        state_def = jax.tree.structure(state.duals)
        if state_def != treedef:
            raise ValueError(f"ialm: constraints of structure {treedef} do not match the state, "
                             f"initialised for {state_def}")
        duals = treedef.flatten_up_to(state.duals)
        out = []
        for c, lam, g in zip(leaves, duals, groups):
            if c.size != lam.size:
                raise ValueError(f"ialm: group {g.name} has {lam.size} multipliers but got "
                                 f"{c.size} constraint values")
            if not (jnp.issubdtype(c.dtype, jnp.floating) or jnp.issubdtype(c.dtype, jnp.integer)
                    or c.dtype == jnp.bool_):
                raise TypeError(f"ialm: constraints of group {g.name} must be real numbers, got "
                                f"dtype {c.dtype}")
            c = jnp.reshape(c, lam.shape)
            if axis_name is not None:  # data parallelism: the shards' values, averaged
                c = mean_over(c.astype(jnp.result_type(c.dtype, lam.dtype)), axis_name)
            out.append(c)
        return treedef, out, groups

    def init(constraints) -> IALMState:
        treedef, leaves, groups = split(constraints)
        duals = []
        for c, g in zip(leaves, groups):
            dtype = c.dtype if jnp.issubdtype(c.dtype, jnp.floating) else jnp.result_type(float)
            if g.init_duals is None or isinstance(g.init_duals, numbers.Number):
                fill = 0.0 if g.init_duals is None else float(g.init_duals)
                duals.append(jnp.full(c.shape, fill, dtype=dtype))
            else:
                a = jnp.asarray(g.init_duals)
                if a.size != c.size:
                    raise ValueError(f"Invalid init_duals: {a.size} values for group {g.name} "
                                     f"of {c.size} constraints")
                duals.append(jnp.reshape(a, c.shape))
        zeros = [jnp.zeros_like(lam) for lam in duals]
        betas = [jnp.asarray(g.beta, lam.dtype) for g, lam in zip(groups, duals)]
        return IALMState(
            duals=treedef.unflatten(duals),
            momentum_buffer=treedef.unflatten(zeros),
            beta=treedef.unflatten(betas),
            stepsize=treedef.unflatten([jnp.zeros((), lam.dtype) for lam in duals]),
            count=jnp.zeros((), jnp.int32),
            notfinite_count=jnp.zeros((), jnp.int32),
            last_finite=jnp.array(True),
            total_notfinite=jnp.zeros((), jnp.int32))

    def traced_step(parts, lams, bufs, betas, old_steps, groups):
        """The dual step of every group in ``jax.numpy``: ``(duals, buffers, steps, finite)``,
        the whole-step skip applied (nothing changes unless every value is finite)."""
        duals, buffers, steps = [], [], []
        finite = jnp.array(True)
        for c, lam, buf, beta_k, g in zip(parts, lams, bufs, betas, groups):
            finite = finite & jnp.all(jnp.isfinite(c))
            c = _rules.filtered(c, ctol, g.is_ineq)
            if g.momentum != 0:
                buf = _rules.momentum_direction(buf, c, g.momentum, 1.0 - g.dampening)
                d = buf
            else:
                d = c
            # the norm scaled by a power of two near max |d| (as BLAS nrm2): no overflow or
            # underflow, and bit for bit the plain sqrt(sum d**2) wherever that has neither
            amax = jax.lax.stop_gradient(jnp.max(jnp.abs(d), initial=0))
            # finite constraints whose momentum direction overflowed skip the step too (the
            # NumPy core and torch raise there, changing nothing)
            finite = finite & jnp.isfinite(amax)
            info = jnp.finfo(d.dtype)  # s and 1/s normal numbers of the dtype
            scale = _rules.norm_scale(amax, info.minexp + 1, info.maxexp - 3)
            unit = d / scale  # exact
            sq_scaled = jnp.sum(jnp.square(unit))
            step = _rules.scaled_dual_stepsize(beta_k, g.gamma, scale, sq_scaled)
            # the update as (s * scale) * (d / scale) = s * d, bit for bit where s is a normal
            # number, and not lost where s is subnormal (XLA flushes those to zero);
            # s * scale = min(beta * scale, gamma / sqrt(sq_scaled)) is the same rule
            unit_step = _rules.scaled_dual_stepsize(beta_k * scale, g.gamma,
                                                    jnp.ones_like(scale), sq_scaled)
            duals.append(_rules.dual_update(lam, unit, unit_step, g.lower, g.upper))
            buffers.append(buf)
            steps.append(step)
        # a step with a non-finite constraint value or direction (in any group) changes no
        # multiplier, buffer or step size (nor beta: see update), as optax.apply_if_finite does
        keep = [jnp.where(finite, new, old) for new, old in
                zip(duals + buffers + steps, lams + bufs + old_steps)]
        n = len(duals)
        return keep[:n], keep[n:2 * n], keep[2 * n:], finite

    settings_cache: dict = {}

    def settings_of(groups) -> np.ndarray:
        """The handler's argument 0 for ``groups`` (float64 rows as int32 words)."""
        key = tuple((g.momentum, g.dampening, g.lower, g.upper, g.gamma, g.is_ineq)
                    for g in groups)
        if key not in settings_cache:
            rows = []
            for g in groups:
                coef = _ialm_cpu.coefficients(np.float64, g.momentum, g.dampening, g.lower,
                                              g.upper, ctol)
                rows.append(_ialm_ffi.settings_row(*coef[:5], g.gamma, g.momentum != 0,
                                                   g.is_ineq))
            settings_cache[key] = np.ascontiguousarray(
                np.asarray(rows, np.float64).reshape(-1)).view(np.int32)
        return settings_cache[key]

    def ffi_step(parts, lams, bufs, betas, old_steps, groups):
        """:func:`traced_step` as ONE FFI call (:mod:`uniopt.kernels.ialm_ffi`), the traced
        path's derivatives; ``finite`` read from the call's flag."""
        settings = settings_of(groups)
        n = len(lams)

        def through_ffi(betas, parts, lams, bufs, old_steps):
            name = _ffi.ensure_registered("ialm")
            dtype = jnp.result_type(lams[0])
            steps_in = jnp.concatenate([jnp.stack(old_steps).astype(dtype),
                                        jnp.zeros((1,), dtype)])
            args = [settings, jnp.stack(betas).astype(dtype), *parts, *lams, *bufs, steps_in]
            results = [jax.ShapeDtypeStruct(jnp.shape(x), dtype) for x in [*lams, *bufs]]
            results.append(jax.ShapeDtypeStruct((n + 1,), dtype))
            aliases = {2 + n + j: j for j in range(2 * n)}
            aliases[2 + 3 * n] = 2 * n
            out = jax.ffi.ffi_call(name, results, input_output_aliases=aliases,
                                   vmap_method="sequential")(*args)
            return list(out[:n]), list(out[n:2 * n]), out[2 * n]

        def traced(betas, parts, lams, bufs, old_steps):
            duals, buffers, steps, finite = traced_step(parts, lams, bufs, betas, old_steps,
                                                        groups)
            dtype = jnp.result_type(lams[0])
            return duals, buffers, jnp.concatenate([jnp.stack(steps).astype(dtype),
                                                    finite.astype(dtype)[None]])

        duals, buffers, steps = _ffi.with_traced_derivatives(through_ffi, traced)(
            betas, parts, lams, bufs, old_steps)
        return duals, buffers, [steps[k] for k in range(n)], steps[n] != 0

    def use_ffi(parts, lams, bufs, betas, old_steps, state) -> bool:
        """Whether this step runs through the FFI call (:func:`uniopt.adapters.jax._ffi.choose`
        with :data:`FFI_MIN_SIZE`; groups of two dtypes: never)."""
        if ffi is False:
            return False
        counters = [state.count, state.notfinite_count, state.last_finite,
                    state.total_notfinite]
        if not _ffi.choose(ffi, lams, [[c, b] for c, b in zip(parts, bufs)],
                           [*betas, *old_steps, *counters], FFI_MIN_SIZE):
            return False
        dtype = jnp.result_type(lams[0])
        return all(jnp.result_type(x) == dtype for x in [*lams, *betas, *old_steps])

    def update(constraints, state: IALMState) -> IALMState:
        treedef, parts, groups = matched(constraints, state)
        if nonfinite == "raise":
            nonfinite_raise("ialm", {"the constraint values": constraints})
        lams, bufs, betas, old_steps = [treedef.flatten_up_to(t) for t in
                                        (state.duals, state.momentum_buffer, state.beta,
                                         state.stepsize)]
        parts = [c.astype(lam.dtype) for c, lam in zip(parts, lams)]
        step = ffi_step if use_ffi(parts, lams, bufs, betas, old_steps, state) else traced_step
        duals, buffers, steps, finite = step(parts, lams, bufs, betas, old_steps, groups)
        betas = [jnp.where(finite, beta_k * g.sigma, beta_k) for beta_k, g in zip(betas, groups)]
        return IALMState(duals=treedef.unflatten(duals),
                         momentum_buffer=treedef.unflatten(buffers),
                         beta=treedef.unflatten(betas),
                         stepsize=treedef.unflatten(steps),
                         count=jnp.where(finite, optax.safe_int32_increment(state.count),
                                         state.count),
                         notfinite_count=jnp.where(
                             finite, jnp.zeros_like(state.notfinite_count),
                             optax.safe_int32_increment(state.notfinite_count)),
                         last_finite=finite,
                         total_notfinite=jnp.where(
                             finite, state.total_notfinite,
                             optax.safe_int32_increment(state.total_notfinite)))

    def value(loss, parts, duals, betas, groups):
        total = jnp.asarray(loss)
        for c, lam, beta_k, g in zip(parts, duals, betas, groups):
            lam = jax.lax.stop_gradient(lam)
            c = c.astype(jnp.result_type(c.dtype, lam.dtype))
            rho = jax.lax.stop_gradient(beta_k) if penalty is None else penalty
            ct = _rules.penalty_part(c, ctol, g.is_ineq)
            total = total + jnp.sum(lam * c) + 0.5 * rho * jnp.sum(jnp.square(ct))
        return total

    def lagrangian(loss, constraints, state: IALMState):
        treedef, parts, groups = matched(constraints, state)
        return value(loss, parts, treedef.flatten_up_to(state.duals),
                     treedef.flatten_up_to(state.beta), groups)

    def forward_update(loss, constraints, state: IALMState):
        new_state = update(constraints, state)
        treedef, parts, groups = matched(constraints, state)
        return value(loss, parts, treedef.flatten_up_to(new_state.duals),
                     treedef.flatten_up_to(state.beta), groups), new_state

    return IALMTransformation(init=init, update=update, lagrangian=lagrangian,
                              forward_update=forward_update)
