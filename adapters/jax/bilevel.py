r"""Bilevel optimization in JAX: the lower-level :class:`Dynamic` (RAD, T-RAD, BDA, IAPTT-GM).

The upper level (UL) minimises :math:`F(w_\tau(x), x)` over its parameters :math:`x`, where
:math:`w_\tau(x)` is an iterate of an unrolled lower-level (LL) solve

.. math::
   w_{t+1} = \Phi_t(w_t, s_t, x):\quad
   d_t = (1 - a_t)\,\nabla_w f(w_t, x) + a_t\,\nabla_w F(w_t, x),\quad
   (u_t, s_{t+1}) = \mathrm{opt.update}(d_t, s_t, w_t),\quad w_{t+1} = w_t + u_t

for :math:`t = 0 .. T-1`, with :math:`a_t = \alpha\,\gamma^t` and any optax inner optimizer
(its state :math:`s_t` starts fresh, ``ll_opt.init(w_0)``, at each solve). The hypergradient
is reverse-mode differentiation through the trajectory (:func:`jax.lax.scan`), as in the
BOHML/BOAT ``Dynamic`` this mirrors:

* **RAD** (Franceschi et al., 2018): back-propagate through all :math:`T` steps
  (``alpha=0``, ``truncate_iters=0``, ``acquire_max_loss=False``).
* **T-RAD** (Shaban et al., 2019): ``truncate_iters`` :math:`= k` leading steps are run
  without differentiation (a first scan on ``stop_gradient`` inputs, so neither the iterate nor
  the optimizer state carries a gradient out of it); only the last :math:`K = T - k` steps are
  differentiated (Shaban's K). The truncated steps use the true iterates and :math:`a_t`
  decays through them.
* **BDA** (Liu et al., 2020): ``alpha`` :math:`= \alpha > 0` aggregates the UL gradient into
  the LL direction with weight :math:`a_t = \alpha\,\gamma^t` (``alpha_decay`` :math:`=\gamma`),
  a scanned input. Needs validation data (the UL objective's batch).
* **PTT** (pessimistic trajectory truncation, IAPTT-GM, Liu et al., 2021):
  ``acquire_max_loss=True`` chooses :math:`\tau = t^* = 1 + \arg\max_{t=0..T-1} F(w_{t+1})`
  (1-based, first index on ties; the losses are computed under ``stop_gradient`` and no
  gradient flows through the argmax). Needs validation data.
* **Initialization auxiliary** (IAPTT-GM): ``init_aux=True`` also returns
  :math:`\partial F(w_\tau)/\partial w_0`, the gradient with respect to the LL initial point.
  With T-RAD it is zero (the truncated steps cut the path back to :math:`w_0`).

RAD/BDA are exclusive choices of direction, T-RAD/PTT exclusive truncations; everything else
combines. Objectives are called with one mapping
``{"data", "target", "upper_model", "lower_model"}`` where ``"upper_model"`` is the UL
parameter pytree and ``"lower_model"`` the LL parameter pytree at the current iterate; the LL
objective gets the training batch, the UL objective the validation batch.

Everything is functional and jit-able end to end (``jax.jit(dyn.hypergrad)``; the number of
steps is static, data and parameters are traced), vmap-able over a batch of UL parameters, and
``checkpoint=True`` wraps the scan body in :func:`jax.checkpoint` (memory of one carry per step
instead of every intermediate of the step; one extra forward step in the backward pass).

Deviations from the reference toolbox (see ``docs/deviations.md``, "Bilevel `Dynamic`",
its JAX part): none of its T-RAD bugs (no dL/dx of the truncated steps added to the UL
gradient, the truncated steps are taken at the true iterates), the models are parameter
pytrees rather than modules (so the constructor has no ``ul_model``/``ll_model``), and the
parameters travel through :meth:`Dynamic.optimize`/:meth:`Dynamic.hypergrad` instead of
living in the object.

References:
  Franceschi et al., `Bilevel programming for hyperparameter optimization and meta-learning
  <https://arxiv.org/abs/1806.04910>`_, ICML 2018.
  Shaban et al., `Truncated back-propagation for bilevel optimization
  <https://arxiv.org/abs/1810.10667>`_, AISTATS 2019.
  Liu et al., `A generic first-order algorithmic framework for bi-level programming beyond
  lower-level singleton <https://arxiv.org/abs/2006.04045>`_, ICML 2020.
  Liu et al., `Towards gradient-based bilevel optimization with non-convex followers and
  beyond <https://arxiv.org/abs/2110.00455>`_, NeurIPS 2021.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import _validation

from ._solver import check_bool, check_callable

__all__ = ["Dynamic", "DynamicResult", "HypergradResult"]


class DynamicResult(NamedTuple):
    """What :meth:`Dynamic.optimize` returns (a pytree: it can leave ``jax.jit``).

    Attributes:
      params: the chosen LL iterate :math:`w_\\tau` (a pytree like the LL parameters):
        :math:`w_{t^*}` with PTT, else :math:`w_T`. Differentiable with respect to the UL
        parameters and the LL initial point (as the method prescribes).
      trajectory: the stacked iterates :math:`w_0 .. w_T` (each leaf gets a leading axis of
        length ``lower_loop + 1``); with T-RAD the first ``truncate_iters + 1`` carry no
        gradient.
      tstar: :math:`\\tau` as an int32 scalar, 1-based (``lower_loop`` without PTT).
      ul_losses: :math:`F(w_1) .. F(w_T)`, shape ``(lower_loop,)``, computed under
        ``stop_gradient``; None when no validation data was given.
      last: :math:`w_T`, the last iterate (``trajectory[-1]``).
    """

    params: Any
    trajectory: Any
    tstar: jax.Array
    ul_losses: Optional[jax.Array]
    last: Any


class HypergradResult(NamedTuple):
    """What :meth:`Dynamic.hypergrad` returns (a pytree).

    Attributes:
      ul_loss: :math:`F(w_\\tau, x)` on the validation batch.
      ul_grad: :math:`dF(w_\\tau(x), x)/dx`, a pytree like the UL parameters.
      ll_init_grad: :math:`dF(w_\\tau)/dw_0`, a pytree like the LL parameters, with
        ``init_aux=True``; None otherwise.
      ll_params: the next LL initial point: :math:`w_T` (without gradient) with
        ``warm_start=True``, else the given LL parameters unchanged. With the initialization
        auxiliary the caller applies its own step to it, e.g.
        ``ll_params - init_lr * ll_init_grad``.
      tstar: :math:`\\tau` (int32, 1-based).
      ul_losses: :math:`F(w_1) .. F(w_T)` with PTT (the pass that chose :math:`t^*`); None
        otherwise.
    """

    ul_loss: jax.Array
    ul_grad: Any
    ll_init_grad: Any
    ll_params: Any
    tstar: jax.Array
    ul_losses: Optional[jax.Array]


def _stop(tree):
    return jax.tree.map(jax.lax.stop_gradient, tree)


def _float_dtype(tree):
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    floats = [leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.result_type(*floats) if floats else jnp.result_type(float)


class Dynamic:
    r"""The unrolled lower-level solve of a bilevel problem, differentiated by reverse mode.

    See the module docstring for the methods and their math. One object holds the options;
    the parameters, the data and the result travel through :meth:`optimize` (the unrolled
    trajectory, differentiable) and :meth:`hypergrad` (UL loss, UL gradient, the LL-init
    gradient and the next LL initial point), both pure functions of their arguments.

    Symbols: :math:`T` = ``lower_loop``, :math:`\alpha` = ``alpha``, :math:`\gamma` =
    ``alpha_decay``, :math:`k` = ``truncate_iters`` (Shaban's :math:`K = T - k`).

    Args:
      ll_objective: ``f(state) -> scalar``, the LL loss; ``state`` is the mapping
        ``{"data": data, "target": target, "upper_model": ul_params, "lower_model": w}``.
      lower_loop: :math:`T`, the number of LL steps (an integer >= 1; static).
      ul_objective: ``F(state) -> scalar``, the UL loss, called with the validation batch
        (``{"data": val_data, "target": val_target, ...}``).
      acquire_max_loss: PTT: back-propagate from :math:`t^* = \arg\max_t F(w_t)` instead of
        from :math:`w_T`.
      alpha: :math:`\alpha \in [0, 1]`, BDA's initial aggregation weight (0: RAD's plain LL
        gradient).
      truncate_iters: :math:`k \in [0, T)`, the number of *leading* steps dropped from
        back-propagation (the toolbox's convention, the reverse of Shaban's K).
      ll_opt: the inner optimizer, any :class:`optax.GradientTransformation`
        (``optax.sgd`` with momentum/nesterov, ``optax.adam``/``adamw``, chains with
        ``optax.add_decayed_weights``, :func:`uniopt.adapters.jax.qhm`/``qhadam``...). Its
        ``update`` is called with the LL parameters (``update(d, s, w)``), and its state
        starts fresh (``ll_opt.init(w_0)``) at each solve. Required (``None`` is an error; the
        default only keeps the torch face's argument order). Its jnp code is differentiated
        as it is: Adam-type rules (``optax.adam``, uniopt's ``qhadam``) have an infinite
        derivative of ``sqrt(v)`` at ``v == 0``, so an LL entry whose gradient has been exactly
        zero but depends on the variables gives a NaN hypergradient (``docs/deviations.md``).
      alpha_decay: :math:`\gamma \in (0, 1]`, so that :math:`a_t = \alpha\gamma^t`.
      init_aux: also return the gradient with respect to the LL initial point.
      warm_start: :meth:`hypergrad` returns :math:`w_T` as the next LL initial point
        (instead of the LL parameters it was given).
      checkpoint: wrap the scan body in :func:`jax.checkpoint` (rematerialise each step in the
        backward pass: memory of one carry per step, about one more forward step of time).

    Raises:
      TypeError: an objective that is not callable, ``ll_opt`` that is not an optax
        ``GradientTransformation``, a flag that is not a bool, a ``lower_loop`` or
        ``truncate_iters`` that is not an integer, an ``alpha``/``alpha_decay`` that is not a
        number.
      ValueError: ``lower_loop < 1``, ``alpha`` outside [0, 1], ``alpha_decay`` outside
        (0, 1], ``truncate_iters`` outside [0, lower_loop), or T-RAD (``truncate_iters > 0``)
        together with PTT (``acquire_max_loss=True``). :meth:`optimize`/:meth:`hypergrad`
        raise ValueError when BDA or PTT is asked for without validation data.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from uniopt.adapters.jax.bilevel import Dynamic
      >>> def ll(s):   # ridge regression, per-feature log-penalties as the UL variable
      ...     w = s["lower_model"]
      ...     return (0.5 * jnp.mean((s["data"] @ w - s["target"]) ** 2)
      ...             + 0.5 * jnp.sum(jnp.exp(s["upper_model"]) * w ** 2))
      >>> def ul(s):
      ...     return 0.5 * jnp.mean((s["data"] @ s["lower_model"] - s["target"]) ** 2)
      >>> dyn = Dynamic(ll, 20, ul, ll_opt=optax.sgd(0.1))
      >>> X, y = jnp.ones((8, 3)), jnp.arange(8.0)
      >>> out = jax.jit(dyn.hypergrad)(jnp.zeros(3), jnp.zeros(3), X, y, X, y)
      >>> out.ul_grad.shape
      (3,)
    """

    def __init__(self, ll_objective: Callable, lower_loop: int, ul_objective: Callable,
                 acquire_max_loss: bool = False, alpha: float = 0.0, truncate_iters: int = 0,
                 ll_opt: Optional[optax.GradientTransformation] = None, *,
                 alpha_decay: float = 1.0, init_aux: bool = False, warm_start: bool = False,
                 checkpoint: bool = False):
        check_callable("ll_objective", ll_objective)
        check_callable("ul_objective", ul_objective)
        self.lower_loop = _validation.integer("lower_loop", lower_loop, minimum=1)
        check_bool("acquire_max_loss", acquire_max_loss)
        alpha_value = _validation.unit_interval("alpha", alpha, closed=True)
        decay = _validation.real("alpha_decay", alpha_decay)
        if not 0.0 < decay <= 1.0:  # also rejects NaN
            raise ValueError(f"Invalid alpha_decay: {alpha_decay}")
        self.truncate_iters = _validation.integer("truncate_iters", truncate_iters)
        if self.truncate_iters >= self.lower_loop:
            raise ValueError(f"Invalid truncate_iters: {truncate_iters} "
                             f"(must be < lower_loop = {self.lower_loop})")
        if not isinstance(ll_opt, optax.GradientTransformation):
            raise TypeError(f"Invalid ll_opt: {ll_opt!r} "
                            "(expected an optax GradientTransformation)")
        for name, flag in (("init_aux", init_aux), ("warm_start", warm_start),
                           ("checkpoint", checkpoint)):
            check_bool(name, flag)
        if acquire_max_loss and self.truncate_iters > 0:
            raise ValueError(
                f"Invalid truncate_iters: {truncate_iters} with acquire_max_loss=True "
                "(T-RAD and PTT are exclusive truncations)")
        self.ll_objective = ll_objective
        self.ul_objective = ul_objective
        self.acquire_max_loss = bool(acquire_max_loss)
        self.alpha = alpha_value
        self.alpha_decay = decay
        self.ll_opt = ll_opt
        self.init_aux = bool(init_aux)
        self.warm_start = bool(warm_start)
        self.checkpoint = bool(checkpoint)

    def __repr__(self) -> str:
        return (f"Dynamic(lower_loop={self.lower_loop}, acquire_max_loss={self.acquire_max_loss}, "
                f"alpha={self.alpha}, truncate_iters={self.truncate_iters}, "
                f"alpha_decay={self.alpha_decay}, init_aux={self.init_aux}, "
                f"warm_start={self.warm_start}, checkpoint={self.checkpoint})")

    # -- one LL step and the scans ----------------------------------------------------------
    def _needs_val(self) -> bool:
        return self.alpha > 0.0 or self.acquire_max_loss

    def _check_val(self, val_data, val_target, who: str) -> None:
        if self._needs_val() and (val_data is None or val_target is None):
            method = "BDA (alpha > 0)" if self.alpha > 0.0 else "PTT (acquire_max_loss=True)"
            raise ValueError(f"{who}: {method} needs val_data and val_target")

    def _alphas(self, ll_params):
        """:math:`a_t = \\alpha\\gamma^t`, t = 0..T-1, in the LL parameters' float dtype."""
        dtype = _float_dtype(ll_params)
        t = np.arange(self.lower_loop, dtype=np.float64)
        return jnp.asarray(self.alpha * self.alpha_decay ** t, dtype=dtype)

    def _ul_value(self, ul, w, val_data, val_target):
        return self.ul_objective({"data": val_data, "target": val_target,
                                  "upper_model": ul, "lower_model": w})

    def _step(self, ul, w, s, alpha_t, batch):
        data, target, val_data, val_target = batch

        def direction_loss(w):
            f = self.ll_objective({"data": data, "target": target,
                                   "upper_model": ul, "lower_model": w})
            if self.alpha == 0.0:
                return f
            return (1 - alpha_t) * f + alpha_t * self._ul_value(ul, w, val_data, val_target)

        d = jax.grad(direction_loss)(w)
        updates, s = self.ll_opt.update(d, s, w)
        return optax.apply_updates(w, updates), s

    def _scan(self, ul, w, s, alphas, steps, batch, *, trajectory=False, losses=False,
              tstar=None):
        """Run the LL steps ``steps`` (their 0-based indices) from ``(w, s)``.

        Returns ``((w, s), trajectory or None, losses or None)``; with ``tstar`` only the steps
        ``t < tstar`` are taken (the carry stays put after them), so the final carry is
        :math:`w_{t^*}`.
        """
        val_data, val_target = batch[2], batch[3]

        def body(carry, xs):
            w, s = carry
            alpha_t, t = xs
            if tstar is None:
                w_new, s_new = self._step(ul, w, s, alpha_t, batch)
            else:
                w_new, s_new = jax.lax.cond(
                    t < tstar, lambda c: self._step(ul, c[0], c[1], alpha_t, batch),
                    lambda c: c, (w, s))
            out_w = w_new if trajectory else None
            out_f = None
            if losses:
                out_f = jax.lax.stop_gradient(
                    self._ul_value(_stop(ul), _stop(w_new), val_data, val_target))
            return (w_new, s_new), (out_w, out_f)

        if self.checkpoint:
            body = jax.checkpoint(body, prevent_cse=False)
        carry, (traj, fs) = jax.lax.scan(body, (w, s), (alphas, steps))
        return carry, traj, fs

    def _unroll(self, ul, w0, batch, *, trajectory=False, losses=False, tstar=None):
        """All T steps; T-RAD's leading steps in a first, non-differentiated scan."""
        alphas = self._alphas(w0)
        steps = jnp.arange(self.lower_loop, dtype=jnp.int32)
        s0 = self.ll_opt.init(w0)
        k = self.truncate_iters
        if k == 0:
            return self._scan(ul, w0, s0, alphas, steps, batch, trajectory=trajectory,
                              losses=losses, tstar=tstar)
        (w, s), traj1, fs1 = self._scan(
            _stop(ul), _stop(w0), _stop(s0), alphas[:k], steps[:k], _stop(batch),
            trajectory=trajectory, losses=losses)
        carry, traj2, fs2 = self._scan(ul, _stop(w), _stop(s), alphas[k:], steps[k:], batch,
                                       trajectory=trajectory, losses=losses)
        traj = (jax.tree.map(lambda a, b: jnp.concatenate([a, b]), _stop(traj1), traj2)
                if trajectory else None)
        fs = jnp.concatenate([fs1, fs2]) if losses else None
        return carry, traj, fs

    def _tstar(self, fs):
        if self.acquire_max_loss:
            return (jnp.argmax(jax.lax.stop_gradient(fs)) + 1).astype(jnp.int32)
        return jnp.asarray(self.lower_loop, dtype=jnp.int32)

    # -- public API -------------------------------------------------------------------------
    def optimize(self, ul_params, ll_params, data, target, val_data=None,
                 val_target=None) -> DynamicResult:
        """Run the LL solve from ``ll_params`` and return its differentiable trajectory.

        The result is a pure function of the arguments: differentiate a function of
        ``result.params`` with :func:`jax.grad` to get the method's hypergradient (with respect
        to ``ul_params``, and ``ll_params`` for the initialization auxiliary), or call
        :meth:`hypergrad`, which does exactly that without stacking the trajectory.

        Args:
          ul_params: the UL parameter pytree (``state["upper_model"]``).
          ll_params: the LL initial point :math:`w_0` (``state["lower_model"]`` at step 0).
          data, target: the LL objective's batch (any pytrees).
          val_data, val_target: the UL objective's batch; needed for BDA and PTT. When given,
            the UL losses along the path are recorded.

        Returns:
          A :class:`DynamicResult`.

        Raises:
          ValueError: BDA or PTT without validation data.
        """
        self._check_val(val_data, val_target, "optimize")
        batch = (data, target, val_data, val_target)
        losses = val_data is not None and val_target is not None
        (w_last, _), traj, fs = self._unroll(ul_params, ll_params, batch, trajectory=True,
                                             losses=losses)
        trajectory = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), ll_params, traj)
        tstar = self._tstar(fs)
        if self.acquire_max_loss:
            params = jax.tree.map(lambda a: a[tstar], trajectory)
        else:
            params = w_last
        return DynamicResult(params=params, trajectory=trajectory, tstar=tstar,
                             ul_losses=fs, last=w_last)

    def hypergrad(self, ul_params, ll_params, data, target, val_data=None,
                  val_target=None) -> HypergradResult:
        """UL loss and hypergradients at the chosen iterate of one LL solve.

        Reverse mode through the scan, keeping no stacked trajectory. With PTT it takes two
        passes: one without gradient records :math:`F(w_1) .. F(w_T)` and picks :math:`t^*`,
        the differentiated one stops its carry after step :math:`t^*` (``lax.cond``).

        Args:
          ul_params, ll_params, data, target: as in :meth:`optimize`.
          val_data, val_target: the UL objective's batch (passed to it as ``"data"`` and
            ``"target"``, None allowed when the objective needs no data and neither BDA nor
            PTT is on).

        Returns:
          A :class:`HypergradResult`: ``ul_loss``, ``ul_grad``, ``ll_init_grad`` (None
          without ``init_aux``), ``ll_params`` (the next initial point: :math:`w_T` with
          ``warm_start``), ``tstar``, ``ul_losses`` (PTT only).

        Raises:
          ValueError: BDA or PTT without validation data.
        """
        self._check_val(val_data, val_target, "hypergrad")
        batch = (data, target, val_data, val_target)
        tstar, fs, w_last = None, None, None
        if self.acquire_max_loss:
            (w_last, _), _, fs = self._unroll(_stop(ul_params), _stop(ll_params), _stop(batch),
                                              losses=True)
            tstar = self._tstar(fs)

        def loss(ul, w0):
            (w_tau, _), _, _ = self._unroll(ul, w0, batch, tstar=tstar)
            return self._ul_value(ul, w_tau, val_data, val_target), w_tau

        argnums = (0, 1) if self.init_aux else 0
        (ul_loss, w_end), grads = jax.value_and_grad(loss, argnums, has_aux=True)(
            ul_params, ll_params)
        ul_grad, ll_init_grad = grads if self.init_aux else (grads, None)
        if w_last is None:
            w_last = w_end
        next_params = _stop(w_last) if self.warm_start else ll_params
        return HypergradResult(ul_loss=ul_loss, ul_grad=ul_grad, ll_init_grad=ll_init_grad,
                               ll_params=next_params, tstar=self._tstar(fs) if tstar is None
                               else tstar, ul_losses=fs)
