r"""QHM and QHAdam as optax gradient transformations.

The building blocks (:func:`scale_by_qhm`, :func:`scale_by_qhadam`) trace the rules of
:mod:`uniopt.rules.qh` bound to ``jax.numpy``; the recipes (:func:`qhm`, :func:`qhadam`,
:func:`qhadamw`) chain them with :func:`optax.add_decayed_weights` and
:func:`optax.scale_by_learning_rate`, as :func:`optax.adam` / :func:`optax.adamw` do.

Coefficients are cast to each leaf's dtype, so float32 leaves stay float32 whether or not
``jax_enable_x64`` is set. Coefficients given as Python numbers are combined on the host in
float64 (``1 - momentum`` is computed before the cast), like the NumPy kernels do.

Two executions of the recipes, chosen per step at trace time (argument ``ffi``): the traced
path (the chain above, compiled by XLA) and, under ``jax.jit`` on CPU, one XLA FFI call per
dtype that runs uniopt's Numba kernel over every leaf (:mod:`uniopt.kernels.qh_ffi`, registered
on first use by :mod:`._ffi`). Both keep the same state, so a state made by one path steps on
the other. ``ffi=None`` (default) takes the FFI call where it applies (see :mod:`._ffi`),
``ffi=True``/``False`` force a path. The building blocks are always traced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import _validation
from uniopt.kernels import qh_ffi as _ffi_kernels
from uniopt.rules import bind
from uniopt.rules import qh as _qh
from uniopt.rules.qh_convert import QHAdamConversions, QHMConversions

from . import _ffi
from ._faults import with_nonfinite
from ._solver import host_number, safe_sqrt

__all__ = [
    "ScaleByQHMState",
    "ScaleByQHAdamState",
    "scale_by_qhm",
    "scale_by_qhadam",
    "qhm",
    "qhadam",
    "qhadamw",
]

# The guarded sqrt (derivative 0 at exactly 0): differentiating through a step (bilevel
# unrolling) must not give 0 * inf = NaN where a gradient entry and its moments are 0.
_rules = bind(_qh, sqrt=safe_sqrt)


# ----------------------------------------------------------------------------------------------
# Construction-time checks (all in uniopt._validation; this face only says what is traced)
# ----------------------------------------------------------------------------------------------
def _traced(value: Any) -> bool:
    """Whether ``value``'s number is unknown now (a tracer under ``jit``/``vmap``/...).

    Under :func:`optax.inject_hyperparams` the hyper-parameters reach the recipe as concrete
    0-d arrays in ``init`` (checked) and as tracers inside a jitted ``update`` (not checked).
    """
    return isinstance(value, jax.core.Tracer)


class _Default(float):
    """A default value that remembers it is one (``b1=0.9`` left unset, not given as 0.9)."""

    __slots__ = ()


_B1, _B2, _NU1, _NU2 = _Default(0.9), _Default(0.999), _Default(1.0), _Default(1.0)


def _unset(defaults):
    """``unset(i, value)`` for :func:`uniopt._validation.pair_or_scalars`.

    A scalar is unset when it is our default object, or (as :func:`optax.inject_hyperparams`
    passes the defaults) a concrete array equal to the default in its dtype, or traced.
    """

    def unset(i, value):
        if value is defaults[i] or _traced(value):
            return True
        if isinstance(value, (jax.Array, np.ndarray, np.generic)):
            array = np.asarray(value)
            return array.shape == () and bool(array == np.asarray(float(defaults[i]), array.dtype))
        return False

    return unset


def _resolve(betas, nus, b1, b2, nu1, nu2) -> tuple:
    """``(betas, nus, scalar_names)`` from either spelling (``betas=``/``b1, b2=``, ...)."""
    betas, betas_scalar = _validation.pair_or_scalars("betas", betas, ("b1", "b2"), (b1, b2),
                                                      _unset((_B1, _B2)))
    nus, nus_scalar = _validation.pair_or_scalars("nus", nus, ("nu1", "nu2"), (nu1, nu2),
                                                  _unset((_NU1, _NU2)))
    return betas, nus, (betas_scalar, nus_scalar)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _complement(x):
    """``1 - x``: in float64 on the host for Python numbers, in ``x``'s dtype for arrays."""
    return 1.0 - x


def _cast(dtype, *values):
    return tuple(jnp.asarray(v, dtype=dtype) for v in values)


def _leaves_with(updates, *trees):
    """Flatten ``updates`` and each tree in ``trees`` to ``updates``' structure."""
    leaves, treedef = jax.tree.flatten(updates)
    return treedef, leaves, [treedef.flatten_up_to(t) for t in trees]


def _weight_dtype(params):
    """Dtype of QHAdam's scalar bias weights: the widest float among the params, >= float32."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(params):
        leaf_dtype = jnp.result_type(leaf)
        if jnp.issubdtype(leaf_dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, leaf_dtype)
    return dtype


# ----------------------------------------------------------------------------------------------
# The FFI path: the whole recipe (decay, block, learning rate) in one Numba call per dtype
# ----------------------------------------------------------------------------------------------
def _static_zero(value) -> bool:
    """optax skips ``add_decayed_weights`` exactly when the decay is a Python zero."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0.0


def _traced_step(family, hyper, grads, params, states, mode):
    """The FFI handlers' arithmetic in ``jax.numpy`` (their derivative rule): same signature."""
    extra = []
    if family == "qhadam":
        h = hyper
        w1, w2, a1, a2 = _rules.qhadam_bias_weights(h[11], h[12], h[3], h[4])
        step = _rules.qhadam_direction_coefficients(a1, a2, h[5], h[6], h[7], h[8], h[9])
        extra = [jnp.stack([w1, w2])]
    else:
        step = [hyper[k] for k in range(3, 7)]
    sign, wd, neg_lr = hyper[1], hyper[2], hyper[10 if family == "qhadam" else 7]
    updates, new = [], [[] for _ in states]
    for t, g in enumerate(grads):
        dtype = jnp.result_type(g)
        p = params[t] if params else None
        c_sign, c_wd, c_lr, *c_step = _cast(dtype, sign, wd, neg_lr, *step)
        if mode == _ffi_kernels.COUPLED:
            g = _rules.effective_gradient(g, p, c_sign, c_wd)
        direction = _rules.qhadam_direction if family == "qhadam" else _rules.qhm_direction
        d, *fields = direction(g, *(field[t] for field in states), *c_step)
        if mode == _ffi_kernels.DECOUPLED:
            d = d + c_wd * p
        updates.append(c_lr * d)
        for k, value in enumerate(fields):
            new[k].append(value)
    return updates, new, extra


def _fused_leaves(family, mode, hyper, grads, params, states, apply=False):
    """``(updates, states, extra)`` of one dtype group: one FFI call, traced derivatives.

    ``apply``: the fused variant, the new parameters in place of the updates.
    """

    def through_ffi(hyper, grads, params, states):
        return _ffi.call(family, hyper, grads, params, states, apply)

    def traced(hyper, grads, params, states):
        updates, new, extra = _traced_step(family, hyper, grads, params, states, mode)
        return [p + u for p, u in zip(params, updates)] if apply else updates, new, extra

    return _ffi.with_traced_derivatives(through_ffi, traced)(hyper, grads, params, states)


def _fused_packed(family, mode, hyper, grads, params, flats):
    """``(params, [[flat] per field], extra)``: the fused step over packed state (one call)."""

    def through_ffi(hyper, grads, params, flats):
        return _ffi.call(family, hyper, grads, params, [[f] for f in flats], packed=True)

    def traced(hyper, grads, params, flats):
        cuts = np.cumsum([np.size(g) for g in grads])[:-1]
        states = [[piece.reshape(jnp.shape(g)) for piece, g in zip(jnp.split(f, cuts), grads)]
                  for f in flats]
        updates, new, extra = _traced_step(family, hyper, grads, params, states, mode)
        return ([p + u for p, u in zip(params, updates)],
                [[jnp.concatenate([jnp.reshape(x, -1) for x in field])] for field in new], extra)

    return _ffi.with_traced_derivatives(through_ffi, traced)(hyper, grads, params, flats)


def _with_ffi(chain, family, ffi, learning_rate, weight_decay, decoupled, block_hyper,
              state_fields):
    """``chain`` whose update runs through one FFI call per dtype where :func:`_ffi.choose` says.

    ``chain`` is ``(decay, block, lr)`` (coupled) or ``(block, decay, lr)`` (decoupled).
    ``block_hyper(block_state)`` gives the block's scalars between the weight decay and the
    learning rate in the handler's layout (:mod:`uniopt.kernels.qh_ffi`) and the scalars
    after it; ``state_fields`` names the block state's per-leaf fields.

    The update gets two attributes: ``update_and_apply(grads, state, params)`` (the fused
    step, :func:`_ffi.update_and_apply`) and ``update_and_apply_packed(grads, state, params,
    fallback)`` (the fused step over ``optax.flatten``'s state, :func:`_ffi.flatten`).
    """
    _ffi.check_flag(ffi)
    mode = (_ffi_kernels.PLAIN if _static_zero(weight_decay) else
            _ffi_kernels.DECOUPLED if decoupled else _ffi_kernels.COUPLED)
    block_at, decay_at = (0, 1) if decoupled else (1, 0)

    def parts(state):
        """``(block_state, decay_state, lr_state, lr, wd, scalars)`` of a chain state."""
        block_state, decay_state, lr_state = state[block_at], state[decay_at], state[2]
        lr, wd = _ffi.schedule_value(learning_rate, lr_state), _ffi.schedule_value(
            weight_decay, decay_state)
        scalars = [lr, wd, *jax.tree.leaves(block_state._replace(
            **{f: None for f in state_fields})), *jax.tree.leaves((decay_state, lr_state))]
        return block_state, decay_state, lr_state, lr, wd, scalars

    def hyper_of(dtype, block_state, lr, wd):
        middle, tail = block_hyper(block_state)
        hyper_dtype = jnp.result_type(block_state.beta1_weight) if tail else dtype
        return jnp.stack(_cast(hyper_dtype, float(mode), 1.0, wd, *middle, -lr, *tail))

    def new_chain_state(block_state, decay_state, lr_state, fields, extra):
        new_block = block_state._replace(**dict(zip(state_fields, fields)))
        if extra:  # QHAdam: the bias weights (every group computed the same ones)
            new_block = new_block._replace(beta1_weight=extra[0][0], beta2_weight=extra[0][1])
        new_state = [None, None, _ffi.advanced(lr_state)]
        new_state[block_at], new_state[decay_at] = new_block, _ffi.advanced(decay_state)
        return tuple(new_state)

    def step(updates, state, params, apply, **extra_args):
        """``update_fn``; ``apply``: :func:`_ffi.update_and_apply`'s ``(params, state)``."""
        def fallback():
            if apply:
                return _ffi.apply_pair(chain.update, updates, state, params, **extra_args)
            return chain.update(updates, state, params, **extra_args)

        block_state, decay_state, lr_state, lr, wd, scalars = parts(state)
        treedef, grads, fields = _leaves_with(updates, *(getattr(block_state, f)
                                                         for f in state_fields))
        if not grads or ((apply or mode != _ffi_kernels.PLAIN) and params is None):
            return fallback()  # (optax raises)
        ps = treedef.flatten_up_to(params) if apply or mode != _ffi_kernels.PLAIN else None
        leaves = grads if apply else grads + (ps or [])
        per_leaf = [[field[t] for field in fields] + ([ps[t]] if apply else [])
                    for t in range(len(grads))]  # (apply: p must have g's dtype, as state)
        if not _ffi.choose(ffi, leaves, per_leaf + ([[]] * len(ps) if ps and not apply else []),
                           scalars, _ffi.APPLY_MIN_SIZE if apply else None):
            return fallback()
        new_updates = [None] * len(grads)
        new_fields = [[None] * len(grads) for _ in state_fields]
        groups: dict = {}
        for t, g in enumerate(grads):
            groups.setdefault(jnp.result_type(g), []).append(t)
        extra = []
        for dtype, index in groups.items():
            us, outs, extra = _fused_leaves(family, mode, hyper_of(dtype, block_state, lr, wd),
                                            [grads[t] for t in index],
                                            [ps[t] for t in index] if ps else None,
                                            [[field[t] for t in index] for field in fields],
                                            apply)
            for j, t in enumerate(index):
                new_updates[t] = us[j]
                for k in range(len(state_fields)):
                    new_fields[k][t] = outs[k][j]
        return treedef.unflatten(new_updates), new_chain_state(
            block_state, decay_state, lr_state, [treedef.unflatten(f) for f in new_fields], extra)

    def packed_step(grads_tree, state, params, fallback):
        """The fused step over ``optax.flatten``'s state (one flat array per field)."""
        block_state, decay_state, lr_state, lr, wd, scalars = parts(state)
        grads, treedef = jax.tree.flatten(grads_tree)
        if not grads or params is None:
            return fallback()
        ps = treedef.flatten_up_to(params)
        flats = [getattr(block_state, f) for f in state_fields]
        dtype = jnp.result_type(grads[0])
        total = sum(int(np.prod(jnp.shape(g))) for g in grads)
        if any(jnp.result_type(x) != dtype for x in [*grads, *ps, *flats]) or any(
                jnp.shape(f) != (total,) for f in flats):
            return fallback()  # mixed dtypes (promoted by the packing): not the handler's layout
        if not _ffi.choose(ffi, grads, [[p] for p in ps], [*scalars, *flats],
                           _ffi.APPLY_MIN_SIZE):
            return fallback()
        new_ps, outs, extra = _fused_packed(family, mode, hyper_of(dtype, block_state, lr, wd),
                                            grads, ps, flats)
        return treedef.unflatten(new_ps), new_chain_state(
            block_state, decay_state, lr_state, [out[0] for out in outs], extra)

    def update_fn(updates, state, params=None, **extra_args):
        return step(updates, state, params, False, **extra_args)

    update_fn.update_and_apply = lambda grads, state, params, **extra_args: step(
        grads, state, params, True, **extra_args)
    update_fn.update_and_apply_packed = packed_step
    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


# ----------------------------------------------------------------------------------------------
# QHM
# ----------------------------------------------------------------------------------------------
class ScaleByQHMState(NamedTuple):
    """State of :func:`scale_by_qhm`: qhoptim's dampened ``momentum_buffer`` (zeros at init)."""

    momentum_buffer: optax.Updates


def scale_by_qhm(momentum: Any, nu: Any) -> optax.GradientTransformation:
    r"""Rescale updates by quasi-hyperbolic momentum (no learning rate, no decay).

    Returns the direction :math:`d_t = (1 - \nu) g_t + \nu b_{t+1}` with
    :math:`b_{t+1} = \beta b_t + (1 - \beta) g_t`. See :func:`qhm` for details.

    Args:
      momentum: :math:`\beta`, in [0, 1); a float or a (traced) scalar array.
      nu: immediate discount :math:`\nu` (any finite number).

    Returns:
      An :class:`optax.GradientTransformation` with state :class:`ScaleByQHMState`.
    """
    _validation.check_qhm(0.0, momentum, nu, skip=_traced)
    momentum, nu = host_number(momentum), host_number(nu)
    one_minus_beta, one_minus_nu = _complement(momentum), _complement(nu)

    def init_fn(params):
        return ScaleByQHMState(momentum_buffer=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        treedef, grads, (bufs,) = _leaves_with(updates, state.momentum_buffer)
        directions, new_bufs = [], []
        for g, buf in zip(grads, bufs):
            dtype = jnp.result_type(g, buf)
            direction, new_buf = _rules.qhm_direction(
                g.astype(dtype), buf.astype(dtype),
                *_cast(dtype, momentum, one_minus_beta, nu, one_minus_nu))
            directions.append(direction.astype(g.dtype))
            new_bufs.append(new_buf.astype(buf.dtype))
        return (treedef.unflatten(directions),
                ScaleByQHMState(momentum_buffer=treedef.unflatten(new_bufs)))

    return optax.GradientTransformation(init_fn, update_fn)


class _QHMConversions(QHMConversions):
    _conversion_keys = ("learning_rate", "momentum", "nu")


def qhm(learning_rate: optax.ScalarOrSchedule, momentum: Any, nu: Any,
        weight_decay: optax.ScalarOrSchedule = 0.0,
        weight_decay_type: str = "grad", *,
        ffi: bool | None = None, nonfinite: str = "propagate") -> optax.GradientTransformation:
    r"""Quasi-hyperbolic momentum (QHM), with qhoptim's weight-decay options.

    .. math::
       \begin{align*}
         g_t' &\leftarrow g_t + \lambda \theta_t \quad \text{(weight\_decay\_type="grad")} \\
         b_{t+1} &\leftarrow \beta b_t + (1 - \beta) g_t' \\
         \theta_{t+1} &\leftarrow \theta_t - \alpha_t \left[(1 - \nu) g_t' + \nu b_{t+1}
           \right] \; \left(- \alpha_t \lambda \theta_t \text{ for weight\_decay\_type="direct"}\right)
       \end{align*}

    Let :math:`\alpha_t` be ``learning_rate`` (at step :math:`t` for a schedule),
    :math:`\beta` ``momentum``, :math:`\nu` ``nu`` and :math:`\lambda` ``weight_decay``. The
    buffer starts at zero. ``nu=0`` is plain SGD; ``nu=1`` is momentum SGD with learning rate
    :math:`\alpha(1 - \beta)` (:func:`optax.sgd` with ``momentum=beta``); ``nu=momentum`` is
    Nesterov's. The recipe is ``chain([add_decayed_weights,] scale_by_qhm, [add_decayed_weights,]
    scale_by_learning_rate)``: coupled decay before, direct decay after the QHM block
    (:math:`\theta(1 - \alpha\lambda) - \alpha d = \theta - \alpha(d + \lambda\theta)`).

    ``qhm.from_pid``, ``from_synthesized_nesterov``, ``from_robust_momentum``,
    ``from_accsgd`` and ``from_two_state_optimizer`` return ``learning_rate``/``momentum``/``nu``
    dictionaries: ``qhm(**qhm.from_pid(k_p, k_i, k_d))``.

    Args:
      learning_rate: :math:`\alpha` (finite, >= 0), a float or an optax schedule.
      momentum: :math:`\beta`, in [0, 1) (as QHAdam's betas).
      nu: :math:`\nu`, any finite number (values outside [0, 1] arise from the conversions).
      weight_decay: :math:`\lambda` (finite, >= 0), a float or an optax schedule.
      weight_decay_type: ``"grad"`` adds :math:`\lambda\theta` to the gradient (before the
        momentum); ``"direct"`` shrinks the parameter by :math:`1 - \alpha_t\lambda`.
      ffi: the execution (keyword only): ``None`` chooses the FFI call (Numba kernel inside
        ``jit`` on CPU) where it applies and pays, else the traced path; ``True`` forces the FFI
        call, ``False`` the traced path. Under :func:`optax.inject_hyperparams` pass it as a
        static argument (``static_args=("ffi",)``).
      nonfinite: (keyword) ``"propagate"`` (default: NaN/inf gradients flow into the update,
        as in optax), ``"raise"`` (``FloatingPointError`` before the update; outside ``jit``
        only) or ``"skip"`` (traced: a ``-0.0`` update and the state kept, the state wrapped
        in ``NonFiniteState`` with an int32 ``nonfinite_skips``); see docs/faults.md.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (an :func:`optax.chain`).

    Raises:
      ValueError: a negative or non-finite ``learning_rate`` or ``weight_decay``, a
        ``momentum`` outside [0, 1), a non-finite ``nu``, or an unknown ``weight_decay_type``.
        TypeError: a value that is not a number, an ``ffi`` other than None/True/False;
        at the first update, ``ffi=True`` with leaves other than float32/float64.
        Traced values (inside ``jit``/``vmap``/``inject_hyperparams``) are not checked.
        A Python int is kept as a float (a jitted step could not take one beyond int64).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax import qhm
      >>> solver = qhm(learning_rate=0.5, momentum=0.9, nu=0.7)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = solver.init(params)
      >>> for _ in range(200):
      ...     updates, state = solver.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params).max() < 1e-5)
      True

    References:
      Ma & Yarats, `Quasi-hyperbolic momentum and Adam for deep learning
      <https://arxiv.org/abs/1810.06801>`_, ICLR 2019
    """
    _validation.check_qhm(learning_rate, momentum, nu, weight_decay, weight_decay_type,
                          skip=_traced, schedules=True)
    learning_rate, momentum, nu, weight_decay = map(host_number,
                                                    (learning_rate, momentum, nu, weight_decay))
    block = scale_by_qhm(momentum, nu)
    decay = optax.add_decayed_weights(weight_decay)
    steps = (decay, block) if weight_decay_type == "grad" else (block, decay)
    chain = optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))
    step = (momentum, _complement(momentum), nu, _complement(nu))
    return with_nonfinite(_with_ffi(chain, "qhm", ffi, learning_rate, weight_decay,
                                    weight_decay_type == "direct", lambda state: (step, ()),
                                    ("momentum_buffer",)), nonfinite, "qhm")


# ----------------------------------------------------------------------------------------------
# QHAdam
# ----------------------------------------------------------------------------------------------
def _qhadam_step(state, beta1, beta2, nu1, one_minus_nu1, nu2, one_minus_nu2, eps):
    """The bias weights after this step and the step's direction coefficients (weight dtype)."""
    w_dtype = jnp.result_type(state.beta1_weight)
    w1, w2, a1, a2 = _rules.qhadam_bias_weights(
        state.beta1_weight, state.beta2_weight, *_cast(w_dtype, beta1, beta2))
    return w1, w2, _rules.qhadam_direction_coefficients(a1, a2, nu1, one_minus_nu1, nu2,
                                                         one_minus_nu2, eps)


class ScaleByQHAdamState(NamedTuple):
    r"""State of :func:`scale_by_qhadam`, as qhoptim keeps it.

    ``beta1_weight``/``beta2_weight`` are the running bias-correction normalisers
    :math:`w_{i,t} = 1 + \beta_i w_{i,t-1}` (0-d arrays, float32 or wider, shared by all
    leaves); ``exp_avg``/``exp_avg_sq`` are the *bias-corrected* moments.
    """

    beta1_weight: jax.Array
    beta2_weight: jax.Array
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates


def scale_by_qhadam(betas: Any = None, nus: Any = None, eps: Any = 1e-8, *,
                    b1: Any = _B1, b2: Any = _B2, nu1: Any = _NU1,
                    nu2: Any = _NU2) -> optax.GradientTransformation:
    r"""Rescale updates by QHAdam (no learning rate, no decay).

    Returns :math:`(\nu_1 m_t + (1 - \nu_1) g_t) / (\sqrt{\nu_2 v_t + (1 - \nu_2) g_t^2} +
    \epsilon)`. See :func:`qhadam` for details.

    Args:
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1); or give ``b1``, ``b2``.
      nus: :math:`(\nu_1, \nu_2)`, finite; or give ``nu1``, ``nu2``.
      eps: :math:`\epsilon` (finite, >= 0), added outside the square root.
      b1, b2: :math:`\beta_1` (default 0.9), :math:`\beta_2` (default 0.999) as separate
        scalars, which :func:`optax.inject_hyperparams` can change at run time.
      nu1, nu2: :math:`\nu_1`, :math:`\nu_2` (default 1.0 each) as separate scalars.

    Returns:
      An :class:`optax.GradientTransformation` with state :class:`ScaleByQHAdamState`.

    Raises:
      ValueError: ``betas`` together with ``b1``/``b2`` (or ``nus`` with ``nu1``/``nu2``).
    """
    betas, nus, scalar_names = _resolve(betas, nus, b1, b2, nu1, nu2)
    (beta1, beta2), (nu1, nu2) = _validation.check_qhadam(
        0.0, betas, nus, eps=eps, skip=_traced, scalar_names=scalar_names)
    beta1, beta2, nu1, nu2, eps = map(host_number, (beta1, beta2, nu1, nu2, eps))
    one_minus_nu1, one_minus_nu2 = _complement(nu1), _complement(nu2)

    def init_fn(params):
        dtype = _weight_dtype(params)
        # Two distinct arrays, so the state can be donated to a jitted step.
        return ScaleByQHAdamState(beta1_weight=jnp.zeros([], dtype), beta2_weight=jnp.zeros([], dtype),
                                  exp_avg=optax.tree.zeros_like(params),
                                  exp_avg_sq=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        w1, w2, step = _qhadam_step(state, beta1, beta2, nu1, one_minus_nu1, nu2, one_minus_nu2,
                                    eps)
        treedef, grads, (ms, vs) = _leaves_with(updates, state.exp_avg, state.exp_avg_sq)
        directions, new_ms, new_vs = [], [], []
        for g, m, v in zip(grads, ms, vs):
            dtype = jnp.result_type(g, m, v)
            direction, new_m, new_v = _rules.qhadam_direction(
                g.astype(dtype), m.astype(dtype), v.astype(dtype), *_cast(dtype, *step))
            directions.append(direction.astype(g.dtype))
            new_ms.append(new_m.astype(m.dtype))
            new_vs.append(new_v.astype(v.dtype))
        return treedef.unflatten(directions), ScaleByQHAdamState(
            beta1_weight=w1, beta2_weight=w2,
            exp_avg=treedef.unflatten(new_ms), exp_avg_sq=treedef.unflatten(new_vs))

    return optax.GradientTransformation(init_fn, update_fn)


class _QHAdamConversions(QHAdamConversions):
    _conversion_keys = ("learning_rate", "betas", "nus")


def _from_nadam(learning_rate=1e-3, betas=(0.9, 0.999)) -> dict:
    """QHAdam hyper-parameters approximating NAdam (Dozat, 2016).

    Returns ``{"learning_rate", "betas", "nus"}``: ``qhadam(**qhadam.from_nadam(1e-3))``.
    """
    return _QHAdamConversions.from_nadam(learning_rate, betas)


def qhadam(learning_rate: optax.ScalarOrSchedule = 1e-3, betas: Any = None,
           nus: Any = None, eps: Any = 1e-8,
           weight_decay: optax.ScalarOrSchedule = 0.0,
           decouple_weight_decay: bool = False, *, b1: Any = _B1, b2: Any = _B2,
           nu1: Any = _NU1, nu2: Any = _NU2,
           ffi: bool | None = None, nonfinite: str = "propagate") -> optax.GradientTransformation:
    r"""QHAdam: Adam with quasi-hyperbolic numerator and denominator.

    .. math::
       \begin{align*}
         g_t' &\leftarrow g_t + \lambda \theta_t \quad \text{(coupled decay only)} \\
         w_{i,t} &\leftarrow 1 + \beta_i w_{i,t-1}, \quad a_i = 1 - 1 / w_{i,t} \\
         m_t &\leftarrow a_1 m_{t-1} + (1 - a_1) g_t', \quad
         v_t \leftarrow a_2 v_{t-1} + (1 - a_2) g_t'^2 \\
         \theta_{t+1} &\leftarrow \theta_t - \alpha_t \frac{\nu_1 m_t + (1 - \nu_1) g_t'}
           {\sqrt{\nu_2 v_t + (1 - \nu_2) g_t'^2} + \epsilon}
           \; \left(- \alpha_t \lambda \theta_t \text{ for decoupled decay}\right)
       \end{align*}

    Let :math:`\alpha_t` be ``learning_rate``, :math:`\beta_1, \beta_2` ``betas``,
    :math:`\nu_1, \nu_2` ``nus``, :math:`\epsilon` ``eps`` and :math:`\lambda`
    ``weight_decay``. The running weights :math:`w_{i,t}` (qhoptim's ``beta1_weight``,
    ``beta2_weight``, starting at 0) equal :math:`(1 - \beta_i^t) / (1 - \beta_i)` for constant
    betas, so :math:`m_t, v_t` are Adam's bias-corrected moments; when the betas change between
    steps (e.g. through :func:`optax.inject_hyperparams`) they stay the exact normalisers of
    the time-varying averages, as in qhoptim. ``nus=(1, 1)`` is :func:`optax.adam`;
    ``nus=(beta1, 1)`` is NAdam up to bias correction (``qhadam.from_nadam``).

    .. warning::
      The argument order follows optax (``eps`` before ``weight_decay``), not qhoptim's
      ``QHAdam(params, lr, betas, nus, weight_decay, decouple_weight_decay, eps)``; pass
      arguments by keyword when porting code.

    The betas and nus can be given as pairs (``betas=(0.9, 0.999)``, qhoptim's spelling) or
    as separate scalars (``b1=0.9, b2=0.999``, ``nu1``, ``nu2``, optax's spelling), not both.
    Only the scalars are numbers that :func:`optax.inject_hyperparams` can change at run time
    (a pair is a static argument to it), so
    ``optax.inject_hyperparams(qhadam)(learning_rate=1e-3, b1=0.9, nu1=0.7)`` exposes
    ``state.hyperparams["b1"]`` and ``["nu1"]`` (and ``b2``, ``nu2`` at their defaults), as
    :func:`optax.adam` does. When a pair is given under ``inject_hyperparams``, the injected
    defaults of its scalars have no effect.

    Args:
      learning_rate: :math:`\alpha` (finite, >= 0), a float or an optax schedule.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1); default ``(b1, b2)``.
      nus: :math:`(\nu_1, \nu_2)`, finite; default ``(nu1, nu2)``.
      eps: :math:`\epsilon` (finite, >= 0), added outside the square root.
      weight_decay: :math:`\lambda` (finite, >= 0), a float or an optax schedule.
      decouple_weight_decay: (bool) if true, shrink the parameter by
        :math:`1 - \alpha_t\lambda` (:func:`qhadamw`) instead of adding :math:`\lambda\theta`
        to the gradient.
      b1, b2: :math:`\beta_1` (default 0.9) and :math:`\beta_2` (default 0.999), each in
        [0, 1), when ``betas`` is not given.
      nu1, nu2: :math:`\nu_1`, :math:`\nu_2` (default 1.0 each), finite, when ``nus`` is not
        given.
      ffi: the execution (keyword only): ``None`` chooses the FFI call (Numba kernel inside
        ``jit`` on CPU) where it applies and pays, else the traced path; ``True`` forces the FFI
        call, ``False`` the traced path. Under :func:`optax.inject_hyperparams` pass it as a
        static argument (``static_args=("ffi",)``).
      nonfinite: (keyword) ``"propagate"`` (default: NaN/inf gradients flow into the update,
        as in optax), ``"raise"`` (``FloatingPointError`` before the update; outside ``jit``
        only) or ``"skip"`` (traced: a ``-0.0`` update and the state kept, the state wrapped
        in ``NonFiniteState`` with an int32 ``nonfinite_skips``); see docs/faults.md.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (an :func:`optax.chain`).

    Raises:
      ValueError: a negative or non-finite ``learning_rate``, ``eps`` or ``weight_decay``, a
        beta outside [0, 1), a non-finite nu, ``betas``/``nus`` not of length 2, or a pair
        given together with its scalars. TypeError: a value that is not a number, a
        ``decouple_weight_decay`` that is not a bool, an ``ffi`` other than None/True/False;
        at the first update, ``ffi=True`` with leaves other than float32/float64. Traced
        values are not checked; a Python int is kept as a float.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax import qhadam
      >>> solver = qhadam(learning_rate=0.1, nus=(0.7, 1.0))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = solver.init(params)
      >>> for _ in range(300):
      ...     grads = {"w": 2 * params["w"]}
      ...     updates, state = solver.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params["w"]).max() < 1e-2)
      True

    References:
      Ma & Yarats, `Quasi-hyperbolic momentum and Adam for deep learning
      <https://arxiv.org/abs/1810.06801>`_, ICLR 2019
    """
    betas, nus, scalar_names = _resolve(betas, nus, b1, b2, nu1, nu2)
    _validation.check_qhadam(learning_rate, betas, nus, weight_decay, eps, decouple_weight_decay,
                             skip=_traced, schedules=True, scalar_names=scalar_names)
    (b1, b2), (nu1, nu2) = betas, nus
    learning_rate, weight_decay, eps, b1, b2, nu1, nu2 = map(
        host_number, (learning_rate, weight_decay, eps, b1, b2, nu1, nu2))
    block = scale_by_qhadam(eps=eps, b1=b1, b2=b2, nu1=nu1, nu2=nu2)
    decay = optax.add_decayed_weights(weight_decay)
    steps = (block, decay) if decouple_weight_decay else (decay, block)
    chain = optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))
    middle = (b1, b2, nu1, _complement(nu1), nu2, _complement(nu2), eps)

    def block_hyper(state):
        return middle, (state.beta1_weight, state.beta2_weight)

    return with_nonfinite(_with_ffi(chain, "qhadam", ffi, learning_rate, weight_decay,
                                    decouple_weight_decay, block_hyper, ("exp_avg", "exp_avg_sq")),
                          nonfinite, "qhadamw" if decouple_weight_decay else "qhadam")


def qhadamw(learning_rate: optax.ScalarOrSchedule = 1e-3, betas: Any = None,
            nus: Any = None, eps: Any = 1e-8,
            weight_decay: optax.ScalarOrSchedule = 0.0, *, b1: Any = _B1, b2: Any = _B2,
            nu1: Any = _NU1, nu2: Any = _NU2,
            ffi: bool | None = None, nonfinite: str = "propagate") -> optax.GradientTransformation:
    r"""QHAdam with decoupled weight decay: ``qhadam(..., decouple_weight_decay=True)``.

    .. math::
       \theta_{t+1} \leftarrow \theta_t - \alpha_t \left(d_t + \lambda \theta_t\right)
       = (1 - \alpha_t\lambda)\,\theta_t - \alpha_t d_t

    where :math:`d_t` is QHAdam's direction (see :func:`qhadam`). ``nus=(1, 1)`` is
    :func:`optax.adamw` (note that qhadamw's ``weight_decay`` defaults to 0, qhoptim's default,
    where optax.adamw's is 1e-4).

    Args:
      learning_rate: :math:`\alpha` (finite, >= 0), a float or an optax schedule.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1); or ``b1``, ``b2``.
      nus: :math:`(\nu_1, \nu_2)`, finite; or ``nu1``, ``nu2``.
      eps: :math:`\epsilon` (finite, >= 0).
      weight_decay: :math:`\lambda` (finite, >= 0), a float or an optax schedule.
      b1, b2, nu1, nu2: the betas and nus as separate scalars (see :func:`qhadam`).
      ffi: the execution (see :func:`qhadam`).
      nonfinite: ``"propagate"``, ``"raise"`` or ``"skip"`` (see :func:`qhadam`).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (an :func:`optax.chain`).

    References:
      Ma & Yarats, `Quasi-hyperbolic momentum and Adam for deep learning
      <https://arxiv.org/abs/1810.06801>`_, ICLR 2019
    """
    return qhadam(learning_rate, betas, nus, eps, weight_decay, decouple_weight_decay=True,
                  b1=b1, b2=b2, nu1=nu1, nu2=nu2, ffi=ffi, nonfinite=nonfinite)


for _name in ("from_pid", "from_synthesized_nesterov", "from_robust_momentum", "from_accsgd",
              "from_two_state_optimizer"):
    setattr(qhm, _name, getattr(_QHMConversions, _name))
qhadam.from_nadam = _from_nadam
qhadamw.from_nadam = _from_nadam
del _name
