r"""Exact hypergradients of unrolled lower-level solves on a per-feature ridge problem.

The oracle of the bilevel ``Dynamic`` (issue 10): plain NumPy, float64, no torch or JAX.

Problem (``RidgeProblem``), with :math:`A = X_{tr}^T X_{tr} / n_{tr}`,
:math:`b = X_{tr}^T y_{tr} / n_{tr}`, :math:`C = X_{val}^T X_{val} / n_{val}`,
:math:`c = X_{val}^T y_{val} / n_{val}`:

.. math::
   f(w, h) = \frac{1}{2 n_{tr}} \|X_{tr} w - y_{tr}\|^2 + \frac12 \sum_i e^{h_i} w_i^2, \qquad
   F(w) = \frac{1}{2 n_{val}} \|X_{val} w - y_{val}\|^2

   \nabla_w f = (A + \mathrm{diag}\, e^h) w - b, \quad
   \nabla_w F = C w - c, \quad
   \partial_w \nabla_w f = A + \mathrm{diag}\, e^h, \quad
   \partial_h \nabla_w f = \mathrm{diag}(e^h \odot w), \quad
   \partial_w \nabla_w F = C.

:func:`exact` unrolls ``T`` steps of an inner optimizer on the direction
:math:`d_t = (1 - a_t) \nabla_w f(w_t, h) + a_t \nabla_w F(w_t)`, :math:`a_t = \alpha\gamma^t`
(BDA; :math:`\alpha = 0` is plain RAD) and carries, next to every value, its *tangent*: the
Jacobian with respect to the stacked variables :math:`(h, w_0)` (a ``(d, 2d)`` matrix; columns
``[:d]`` for ``h``, ``[d:]`` for ``w0``). Every update rule is elementwise, so the tangent of
:math:`y = \phi(x_1, x_2, \dots)` is :math:`\sum_k \partial_k\phi \odot \dot x_k` row by row;
the tangent of the direction is
:math:`\dot d_t = (1 - a_t)[(A + \mathrm{diag}\,e^h)\dot w_t + [\mathrm{diag}(e^h w_t), 0]]
+ a_t C \dot w_t`. The hypergradients are then exact up to rounding:
:math:`dF(w_\tau)/dh = \dot w_\tau[:, :d]^T \nabla_w F(w_\tau)` and
:math:`dF(w_\tau)/dw_0 = \dot w_\tau[:, d:]^T \nabla_w F(w_\tau)` (``F`` has no explicit
``h``).

T-RAD (``truncate_iters = k``): the first ``k`` steps are taken with the true iterates (and the
BDA weight decays through them) but are not differentiated: every tangent (parameter and
optimizer state) is set to zero just before step ``k``. PTT: :math:`\tau = t^* = 1 +
\operatorname{argmax}_{t=0..T-1} F(w_{t+1})` (first index on ties), treated as a constant.

Inner optimizers, each written from its own definition (state fresh at each solve):

* ``"sgd"``: ``torch.optim.SGD`` (``momentum``, ``dampening``, ``nesterov``,
  ``weight_decay``): the buffer starts as a copy of the first (decayed) gradient, then
  ``buf = momentum * buf + (1 - dampening) * g``; nesterov steps along ``g + momentum * buf``.
* ``"adam"`` / ``"adamw"``: ``torch.optim.Adam`` / ``AdamW`` (``betas``, ``eps``,
  ``weight_decay``; coupled for Adam, decoupled ``p *= 1 - lr * wd`` for AdamW, default
  ``1e-2``): ``p -= lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)``.
* ``"qhm"``: QHM (Ma & Yarats 2019): ``buf = beta * buf + (1 - beta) * g`` from zero,
  ``p -= lr * ((1 - nu) * g + nu * buf)`` (``weight_decay_type`` ``"grad"`` or ``"direct"``).
* ``"qhadam"``: QHAdam with the running bias-correction weights of ``core/rules/qh.py``:
  ``w_i = 1 + beta_i * w_i`` (from 0), ``a_i = 1 - 1 / w_i``, ``m = a1 m + (1 - a1) g``,
  ``v = a2 v + (1 - a2) g^2``,
  ``p = s p - lr * (nu1 m + (1 - nu1) g) / (sqrt(nu2 v + (1 - nu2) g^2) + eps)``.

The derivative of ``sqrt`` at exactly 0 is taken as 0 (the convention of the differentiable
QHAdam/Adam step: no NaN when a gradient entry and its moments are exactly zero).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

__all__ = [
    "RidgeProblem", "ridge_problem", "ptt_problem", "ll_loss", "ul_loss", "ll_grad", "ul_grad",
    "Exact", "exact", "exact_outer", "implicit_hypergradient", "unrolled_ul_loss",
    "OPTIMIZERS",
]


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class RidgeProblem:
    """Per-feature ridge regression: LL least squares + ``sum exp(h_i) w_i^2 / 2``, UL validation.

    Frozen, compared and hashed by identity (``eq=False``), so it can be a static argument.
    """

    X_tr: np.ndarray
    y_tr: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    h: np.ndarray   # (d,) UL variable: log per-feature penalties
    w0: np.ndarray  # (d,) LL initial point

    @property
    def dim(self) -> int:
        return self.h.shape[0]

    def replace(self, **changes) -> "RidgeProblem":
        """A copy with some fields replaced (arrays converted to float64)."""
        changes = {k: np.array(v, dtype=np.float64) for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


def _moments(problem: RidgeProblem):
    X, y, Xv, yv = problem.X_tr, problem.y_tr, problem.X_val, problem.y_val
    return X.T @ X / X.shape[0], X.T @ y / X.shape[0], Xv.T @ Xv / Xv.shape[0], Xv.T @ yv / Xv.shape[0]


def ridge_problem(seed=0, n_train=40, n_val=30, dim=6) -> RidgeProblem:
    """A random, well-conditioned instance (Gaussian features, noisy linear targets)."""
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(dim)
    X_tr = rng.standard_normal((n_train, dim))
    X_val = rng.standard_normal((n_val, dim))
    y_tr = X_tr @ w_true + 0.5 * rng.standard_normal(n_train)
    y_val = X_val @ w_true + 0.5 * rng.standard_normal(n_val)
    h = np.log(rng.uniform(0.05, 0.5, dim))
    w0 = 0.3 * rng.standard_normal(dim)
    return RidgeProblem(X_tr, y_tr, X_val, y_val, h, w0)


def ptt_problem(seed=0, n_train=40, n_val=30, dim=4):
    r"""A problem whose SGD (and mild BDA) trajectory makes ``F`` rise, then fall.

    Construction: the LL Hessian :math:`A + \mathrm{diag}\,e^h` is diagonal with
    ``lr * H = (0.5, 0.05, 0.6, 0.6, ...)``: coordinate 0 converges fast, coordinate 1 slowly.
    The LL minimiser is about ``(1, 0, small...)`` and ``w0 = (0, 1, 0...)``, so the path passes
    near the corner ``(1, 1)``. The validation loss is about ``(w_0 + w_1 - 1)^2 / 2`` (rows of
    ones plus 5% noise): zero at both ends of the path and about 1/2 at the corner, so
    ``F(w_t)`` peaks at an interior step (``t* = 4`` without noise:
    ``0.95^t - 0.5^t`` is largest at ``t = 4``). The remaining coordinates start at their
    minimiser's neighbourhood and barely move ``F``.

    Returns:
      ``(problem, {"T": 30, "lr": 0.5})``.
    """
    if dim < 2:
        raise ValueError(f"Invalid dim: {dim} (ptt_problem needs dim >= 2)")
    rng = np.random.default_rng(seed)
    lr = 0.5
    lam = np.full(dim, 0.7)                 # data curvature (eigenvalues of A)
    pen = np.full(dim, 0.5)                 # e^h
    lam[0], pen[0] = 0.5, 0.5               # lr * (0.5 + 0.5) = 0.5
    lam[1], pen[1] = 0.05, 0.05             # lr * (0.05 + 0.05) = 0.05
    hess = lam + pen
    # X_tr with X^T X / n = diag(lam): orthonormal columns scaled by sqrt(n * lam).
    q, _ = np.linalg.qr(rng.standard_normal((n_train, n_train)))
    basis, noise_dir = q[:, :dim], q[:, dim:]
    X_tr = basis * np.sqrt(n_train * lam)
    w_star = np.zeros(dim)
    w_star[0] = 1.0
    w_star[2:] = 0.05 * rng.standard_normal(dim - 2)
    b = hess * w_star                       # the LL minimiser solves (A + diag e^h) w = b
    # y = X A^-1 b + (noise orthogonal to X's columns) gives X^T y / n = b exactly.
    y_tr = X_tr @ (b / lam) + noise_dir @ (0.1 * rng.standard_normal(n_train - dim))
    X_val = 0.05 * rng.standard_normal((n_val, dim))
    X_val[:, :2] += 1.0
    y_val = 1.0 + 0.05 * rng.standard_normal(n_val)
    w0 = np.zeros(dim)
    w0[1] = 1.0
    w0[2:] = w_star[2:] + 0.01 * rng.standard_normal(dim - 2)
    return RidgeProblem(X_tr, y_tr, X_val, y_val, np.log(pen), w0), {"T": 30, "lr": lr}


def ll_loss(problem: RidgeProblem, w, h) -> float:
    r = problem.X_tr @ w - problem.y_tr
    return float(r @ r / (2 * len(r)) + 0.5 * np.sum(np.exp(h) * w * w))


def ul_loss(problem: RidgeProblem, w) -> float:
    r = problem.X_val @ w - problem.y_val
    return float(r @ r / (2 * len(r)))


def ll_grad(problem: RidgeProblem, w, h) -> np.ndarray:
    """:math:`\\nabla_w f(w, h)`."""
    return problem.X_tr.T @ (problem.X_tr @ w - problem.y_tr) / len(problem.y_tr) + np.exp(h) * w


def ul_grad(problem: RidgeProblem, w) -> np.ndarray:
    """:math:`\\nabla_w F(w)`."""
    return problem.X_val.T @ (problem.X_val @ w - problem.y_val) / len(problem.y_val)


# ----------------------------------------------------------------------------------------------
# Inner optimizers with tangents. Each step maps (w, W, g, G, state) -> (w, W) and updates
# `state` in place; lower-case arrays are values (d,), upper-case their tangents (d, 2d).
# ----------------------------------------------------------------------------------------------
def _col(x):
    return x[:, None]


def _sqrt_with_tangent(q, Q):
    """sqrt(q) and its tangent, with d sqrt / dq := 0 where q == 0."""
    s = np.sqrt(q)
    safe = np.where(s > 0, s, 1.0)
    ds = np.where(s > 0, 0.5 / safe, 0.0)
    return s, _col(ds) * Q


class _SGD:
    """torch.optim.SGD (maximize=False)."""

    def __init__(self, lr, momentum, dampening, nesterov, weight_decay):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.lr, self.mom, self.damp, self.nesterov = lr, momentum, dampening, nesterov
        self.wd = weight_decay
        self.buf = self.Buf = None

    def zero_state_tangents(self):
        if self.Buf is not None:
            self.Buf = np.zeros_like(self.Buf)

    def step(self, w, W, g, G):
        if self.wd != 0:
            g, G = g + self.wd * w, G + self.wd * W
        if self.mom != 0:
            if self.buf is None:  # torch: the buffer is a copy of the first gradient
                self.buf, self.Buf = g.copy(), G.copy()
            else:
                self.buf = self.mom * self.buf + (1 - self.damp) * g
                self.Buf = self.mom * self.Buf + (1 - self.damp) * G
            if self.nesterov:
                g, G = g + self.mom * self.buf, G + self.mom * self.Buf
            else:
                g, G = self.buf, self.Buf
        return w - self.lr * g, W - self.lr * G


class _Adam:
    """torch.optim.Adam (decoupled=False) or torch.optim.AdamW (decoupled=True), amsgrad=False."""

    def __init__(self, lr, betas, eps, weight_decay, decoupled):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.wd, self.decoupled = weight_decay, decoupled
        self.k = 0
        self.m = self.M = self.v = self.V = None

    def zero_state_tangents(self):
        if self.M is not None:
            self.M, self.V = np.zeros_like(self.M), np.zeros_like(self.V)

    def step(self, w, W, g, G):
        if self.m is None:
            self.m, self.v = np.zeros_like(w), np.zeros_like(w)
            self.M, self.V = np.zeros_like(W), np.zeros_like(W)
        self.k += 1
        if self.decoupled:
            w, W = w * (1 - self.lr * self.wd), W * (1 - self.lr * self.wd)
        elif self.wd != 0:
            g, G = g + self.wd * w, G + self.wd * W
        b1, b2 = self.b1, self.b2
        self.m, self.M = b1 * self.m + (1 - b1) * g, b1 * self.M + (1 - b1) * G
        self.v, self.V = b2 * self.v + (1 - b2) * g * g, b2 * self.V + (1 - b2) * 2 * _col(g) * G
        step_size = self.lr / (1 - b1**self.k)
        bc2_sqrt = (1 - b2**self.k) ** 0.5
        s, S = _sqrt_with_tangent(self.v, self.V)
        den, DEN = s / bc2_sqrt + self.eps, S / bc2_sqrt
        w_new = w - step_size * self.m / den
        W_new = W - step_size * (self.M / _col(den) - _col(self.m / den**2) * DEN)
        return w_new, W_new


class _QHM:
    """QHM (Ma & Yarats 2019): dampened buffer from zero; ``weight_decay_type`` grad/direct."""

    def __init__(self, lr, momentum, nu, weight_decay, weight_decay_type):
        if weight_decay_type not in ("grad", "direct"):
            raise ValueError(f"Invalid weight_decay_type: {weight_decay_type!r}")
        self.lr, self.beta, self.nu, self.wd = lr, momentum, nu, weight_decay
        self.direct = weight_decay_type == "direct"
        self.buf = self.Buf = None

    def zero_state_tangents(self):
        if self.Buf is not None:
            self.Buf = np.zeros_like(self.Buf)

    def step(self, w, W, g, G):
        if self.buf is None:
            self.buf, self.Buf = np.zeros_like(w), np.zeros_like(W)
        if self.direct:
            w, W = w * (1 - self.lr * self.wd), W * (1 - self.lr * self.wd)
        else:
            g, G = g + self.wd * w, G + self.wd * W
        beta, nu = self.beta, self.nu
        self.buf = beta * self.buf + (1 - beta) * g
        self.Buf = beta * self.Buf + (1 - beta) * G
        return (w - self.lr * ((1 - nu) * g + nu * self.buf),
                W - self.lr * ((1 - nu) * G + nu * self.Buf))


class _QHAdam:
    """QHAdam with running bias-correction weights (core/rules/qh.py's docstring)."""

    def __init__(self, lr, betas, nus, eps, weight_decay, decouple_weight_decay):
        self.lr, (self.b1, self.b2), (self.nu1, self.nu2) = lr, betas, nus
        self.eps, self.wd, self.decoupled = eps, weight_decay, decouple_weight_decay
        self.w1 = self.w2 = 0.0
        self.m = self.M = self.v = self.V = None

    def zero_state_tangents(self):
        if self.M is not None:
            self.M, self.V = np.zeros_like(self.M), np.zeros_like(self.V)

    def step(self, w, W, g, G):
        if self.m is None:
            self.m, self.v = np.zeros_like(w), np.zeros_like(w)
            self.M, self.V = np.zeros_like(W), np.zeros_like(W)
        if self.decoupled:
            w, W = w * (1 - self.lr * self.wd), W * (1 - self.lr * self.wd)
        else:
            g, G = g + self.wd * w, G + self.wd * W
        self.w1, self.w2 = 1 + self.b1 * self.w1, 1 + self.b2 * self.w2
        a1, a2 = 1 - 1 / self.w1, 1 - 1 / self.w2
        self.m, self.M = a1 * self.m + (1 - a1) * g, a1 * self.M + (1 - a1) * G
        self.v, self.V = a2 * self.v + (1 - a2) * g * g, a2 * self.V + (1 - a2) * 2 * _col(g) * G
        nu1, nu2 = self.nu1, self.nu2
        num, NUM = nu1 * self.m + (1 - nu1) * g, nu1 * self.M + (1 - nu1) * G
        q = nu2 * self.v + (1 - nu2) * g * g
        Q = nu2 * self.V + (1 - nu2) * 2 * _col(g) * G
        s, S = _sqrt_with_tangent(q, Q)
        den = s + self.eps
        return (w - self.lr * num / den,
                W - self.lr * (NUM / _col(den) - _col(num / den**2) * S))


OPTIMIZERS = {
    "sgd": (dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0), _SGD),
    "adam": (dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
             lambda lr, **kw: _Adam(lr, decoupled=False, **kw)),
    "adamw": (dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
              lambda lr, **kw: _Adam(lr, decoupled=True, **kw)),
    "qhm": (dict(momentum=0.0, nu=1.0, weight_decay=0.0, weight_decay_type="grad"), _QHM),
    "qhadam": (dict(betas=(0.9, 0.999), nus=(1.0, 1.0), eps=1e-8, weight_decay=0.0,
                    decouple_weight_decay=False), _QHAdam),
}
"""name -> (default hyper-parameters, factory(lr, **hyper))."""


def _make_optimizer(name, lr, opt_kwargs):
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (one of {sorted(OPTIMIZERS)})")
    defaults, factory = OPTIMIZERS[name]
    opt_kwargs = dict(opt_kwargs or {})
    unknown = set(opt_kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"Invalid opt_kwargs for {name!r}: {sorted(unknown)}")
    return factory(float(lr), **{**defaults, **opt_kwargs})


# ----------------------------------------------------------------------------------------------
# The unrolled solve with forward-mode tangents
# ----------------------------------------------------------------------------------------------
class Exact(NamedTuple):
    ul_loss: float             # F at the chosen iterate w_tau (tau = t* with PTT, else T)
    grad_h: np.ndarray         # total derivative dF(w_tau)/dh through the trajectory
    grad_w0: np.ndarray        # dF(w_tau)/dw0 (the initialization auxiliary's gradient)
    tstar: int                 # PTT index in 1..T (1-based step count); T without PTT
    ul_losses: np.ndarray      # (T,) F(w_1) .. F(w_T)
    trajectory: np.ndarray     # (T+1, d) w_0 .. w_T


def _check(T, lr, truncate_iters, alpha, alpha_decay, ptt):
    if int(T) != T or T < 1:
        raise ValueError(f"Invalid T: {T}")
    if not lr >= 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if int(truncate_iters) != truncate_iters or not 0 <= truncate_iters < T:
        raise ValueError(f"Invalid truncate_iters: {truncate_iters} (must be in [0, T={T}))")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid alpha: {alpha}")
    if truncate_iters and ptt:
        raise ValueError("T-RAD (truncate_iters > 0) and PTT are exclusive")
    del alpha_decay


def _unroll(problem, T, lr, optimizer, opt_kwargs, truncate_iters, alpha, alpha_decay,
            h_dropped=None):
    """Values and tangents of w_0..w_T. ``h_dropped``: the h of the dropped steps (default h)."""
    A, b, C, c = _moments(problem)
    d = problem.dim
    h = np.asarray(problem.h, dtype=np.float64)
    eh = np.exp(h)
    eh_dropped = eh if h_dropped is None else np.exp(np.asarray(h_dropped, dtype=np.float64))
    H_f = A + np.diag(eh)
    opt = _make_optimizer(optimizer, lr, opt_kwargs)
    w = np.array(problem.w0, dtype=np.float64)
    W = np.hstack([np.zeros((d, d)), np.eye(d)])    # d w0 / d(h, w0)
    ws, Ws = [w], [W]
    for t in range(T):
        if t == truncate_iters and t > 0:           # T-RAD: nothing before step k is differentiated
            W = np.zeros_like(W)
            opt.zero_state_tangents()
        a_t = alpha * alpha_decay**t
        e = eh_dropped if t < truncate_iters else eh
        g_f = A @ w - b + e * w
        G_f = H_f @ W
        G_f[:, :d] += np.diag(eh * w)
        g_F, G_F = C @ w - c, C @ W
        if a_t == 0.0:
            g, G = g_f, G_f
        else:
            g, G = (1 - a_t) * g_f + a_t * g_F, (1 - a_t) * G_f + a_t * G_F
        w, W = opt.step(w, W, g, G)
        ws.append(w)
        Ws.append(W)
    return np.array(ws), Ws


def exact(problem, T, lr, *, optimizer="sgd", opt_kwargs=None, truncate_iters=0,
          alpha=0.0, alpha_decay=1.0, ptt=False) -> Exact:
    """The exact hypergradient of ``F(w_tau)`` through ``T`` unrolled LL steps.

    Args:
      problem: a :class:`RidgeProblem` (``h`` and ``w0`` are the point of differentiation).
      T: number of LL steps (``lower_loop``).
      lr: the inner learning rate.
      optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"qhm"`` or ``"qhadam"`` (module doc).
      opt_kwargs: the optimizer's other hyper-parameters (torch / uniopt names).
      truncate_iters: leading steps dropped from differentiation (T-RAD; the toolbox's count,
        Shaban's ``K = T - truncate_iters``).
      alpha, alpha_decay: BDA weight ``a_t = alpha * alpha_decay**t`` of ``grad F``.
      ptt: pessimistic trajectory truncation (``tau = t*``).

    Returns:
      :class:`Exact`.
    """
    _check(T, lr, truncate_iters, alpha, alpha_decay, ptt)
    traj, Ws = _unroll(problem, T, lr, optimizer, opt_kwargs, truncate_iters, alpha, alpha_decay)
    ul = np.array([ul_loss(problem, w) for w in traj[1:]])
    tau = 1 + int(np.argmax(ul)) if ptt else T
    d = problem.dim
    gF = ul_grad(problem, traj[tau])
    total = Ws[tau].T @ gF
    return Exact(float(ul[tau - 1]), total[:d], total[d:], tau, ul, traj)


def unrolled_ul_loss(problem, T, lr, *, tau=None, h_dropped=None, optimizer="sgd",
                     opt_kwargs=None, truncate_iters=0, alpha=0.0, alpha_decay=1.0) -> float:
    """``F(w_tau)`` of the unrolled solve, a plain function of ``(problem.h, problem.w0)``.

    The map that :func:`exact` differentiates, for finite differences: ``tau`` (default ``T``)
    is held fixed, and the dropped steps of T-RAD use ``h_dropped`` (hold it at the point of
    differentiation to leave them out of the derivative; default ``problem.h``).
    """
    _check(T, lr, truncate_iters, alpha, alpha_decay, False)
    traj, _ = _unroll(problem, T, lr, optimizer, opt_kwargs, truncate_iters, alpha, alpha_decay,
                      h_dropped=h_dropped)
    return ul_loss(problem, traj[T if tau is None else tau])


def exact_outer(problem, n_outer, T, lr, ul_lr, *, policy="reset", init_lr=None,
                **exact_kwargs) -> list:
    """``n_outer`` UL steps of plain gradient descent on ``h`` (and ``w0`` with ``init_lr``).

    Each solve starts at the current ``w0``; after it ``h <- h - ul_lr * grad_h``. With
    ``policy="warm"`` the next ``w0`` is the last iterate ``w_T`` (not ``w_tau``); then, when
    ``init_lr`` is given (initialization auxiliary), ``w0 <- w0 - init_lr * grad_w0`` (applied
    after the warm copy, as ``hypergrad(); opt.step()`` does in the torch face).
    ``policy="reset"`` keeps ``w0`` (apart from the ``init_lr`` step).

    Returns:
      The list of :class:`Exact` of each solve.
    """
    if policy not in ("reset", "warm"):
        raise ValueError(f"Invalid policy: {policy!r} (expected 'reset' or 'warm')")
    results = []
    for _ in range(n_outer):
        res = exact(problem, T, lr, **exact_kwargs)
        results.append(res)
        w0 = res.trajectory[-1] if policy == "warm" else problem.w0
        if init_lr is not None:
            w0 = w0 - init_lr * res.grad_w0
        problem = problem.replace(h=problem.h - ul_lr * res.grad_h, w0=w0)
    return results


def implicit_hypergradient(problem):
    r"""The implicit-function hypergradient at the exact LL minimiser.

    :math:`w^* = (A + \mathrm{diag}\,e^h)^{-1} b` and
    :math:`dF/dh = -(e^h \odot w^*) \odot (A + \mathrm{diag}\,e^h)^{-1} \nabla_w F(w^*)`.

    Returns:
      ``(grad_h, w_star)``.
    """
    A, b, _, _ = _moments(problem)
    eh = np.exp(problem.h)
    H = A + np.diag(eh)
    w_star = np.linalg.solve(H, b)
    adjoint = np.linalg.solve(H, ul_grad(problem, w_star))   # H is symmetric
    return -(eh * w_star) * adjoint, w_star
