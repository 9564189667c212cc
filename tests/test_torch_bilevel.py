"""uniopt.adapters.torch.bilevel.Dynamic: hypergradients through the unrolled lower level.

Oracles (float64):
* the inner optimizers' forward trajectories against the real ``torch.optim`` / ``qhoptim``
  optimizers stepped with ``.backward()`` on the LL problem;
* the hypergradients against a plain autograd unroll written here from each optimizer's own
  definition (torch's SGD/Adam/AdamW, qhoptim's QHM/QHAdam), with ``autograd.grad`` through it;
* the per-feature ridge problem's exact forward-mode recursion (``tests/refimpl``) once merged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import qhoptim.pyt as qhoptim_pyt
from refimpl import naive_bilevel as nb
from uniopt.adapters.torch import QHM, QHAdam, QHAdamW
from uniopt.adapters.torch import _unroll
from uniopt.adapters.torch.bilevel import Dynamic

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# The per-feature ridge problem: f = |X w - y|^2/(2n) + 1/2 sum exp(h) w^2, F = |Xv w - yv|^2/(2nv)
# ----------------------------------------------------------------------------------------------
class Ridge:
    @classmethod
    def of(cls, problem: "nb.RidgeProblem") -> "Ridge":
        """The oracle's problem as float64 tensors."""
        P = cls.__new__(cls)
        for name, field in (("X", "X_tr"), ("y", "y_tr"), ("Xv", "X_val"), ("yv", "y_val"),
                            ("h", "h"), ("w0", "w0")):
            setattr(P, name, torch.tensor(getattr(problem, field), dtype=DT))
        return P

    def __init__(self, seed=0, n=40, n_val=30, dim=6):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, dim, generator=g, dtype=DT)
        self.y = self.X @ torch.randn(dim, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
        self.Xv = torch.randn(n_val, dim, generator=g, dtype=DT)
        self.yv = self.Xv @ torch.randn(dim, generator=g, dtype=DT) + 0.5 * torch.randn(n_val, generator=g, dtype=DT)
        self.h = 0.5 * torch.randn(dim, generator=g, dtype=DT) - 1.0
        self.w0 = torch.randn(dim, generator=g, dtype=DT)


class UL(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = nn.Parameter(h.clone())


class LL(nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return x @ self.w


def ll_objective(state):
    model = state["lower_model"]
    r = model(state["data"]) - state["target"]  # calls the iterate
    w = model.w                                 # and reads its parameter
    return 0.5 * (r @ r) / r.numel() + 0.5 * (torch.exp(state["upper_model"].h) * w * w).sum()


def ul_objective(state):
    r = state["lower_model"](state["data"]) - state["target"]
    return 0.5 * (r @ r) / r.numel()


def f_plain(P, w, h):
    r = P.X @ w - P.y
    return 0.5 * (r @ r) / r.numel() + 0.5 * (torch.exp(h) * w * w).sum()


def F_plain(P, w):
    r = P.Xv @ w - P.yv
    return 0.5 * (r @ r) / r.numel()


# ----------------------------------------------------------------------------------------------
# A plain autograd unroll, each optimizer written from its own definition
# ----------------------------------------------------------------------------------------------
def plain_step(name, kw, w, g, state, t):
    """One step of ``name`` (torch's SGD/Adam/AdamW, qhoptim's QHM/QHAdam); t is 1-based."""
    lr = kw["lr"]
    if name == "sgd":
        if kw.get("maximize"):
            g = -g
        g = g + kw.get("weight_decay", 0.0) * w
        m = kw.get("momentum", 0.0)
        if m:
            buf = g if t == 1 else m * state["buf"] + g
            state["buf"] = buf
            g = g + m * buf if kw.get("nesterov") else buf
        return w - lr * g
    if name in ("adam", "adamw"):
        b1, b2 = kw.get("betas", (0.9, 0.999))
        eps, wd = kw.get("eps", 1e-8), kw.get("weight_decay", 0.0 if name == "adam" else 1e-2)
        if kw.get("maximize"):
            g = -g
        if name == "adamw":
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = (1 - b1) * g if t == 1 else b1 * state["m"] + (1 - b1) * g
        v = (1 - b2) * g * g if t == 1 else b2 * state["v"] + (1 - b2) * g * g
        state["m"], state["v"] = m, v
        denom = torch.sqrt(v) / math.sqrt(1 - b2**t) + eps
        return w - (lr / (1 - b1**t)) * m / denom
    if name == "qhm":
        beta, nu, wd = kw["momentum"], kw["nu"], kw.get("weight_decay", 0.0)
        g = g + wd * w
        buf = (1 - beta) * g if t == 1 else beta * state["buf"] + (1 - beta) * g
        state["buf"] = buf
        return w - lr * ((1 - nu) * g + nu * buf)
    if name in ("qhadam", "qhadamw"):
        b1, b2 = kw.get("betas", (0.9, 0.999))
        nu1, nu2 = kw.get("nus", (1.0, 1.0))
        eps, wd = kw.get("eps", 1e-8), kw.get("weight_decay", 0.0)
        if name == "qhadamw":
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = (1 - b1) * g if t == 1 else b1 * state["m"] + (1 - b1) * g
        v = (1 - b2) * g * g if t == 1 else b2 * state["v"] + (1 - b2) * g * g
        state["m"], state["v"] = m, v
        mh, vh = m / (1 - b1**t), v / (1 - b2**t)
        return w - lr * (nu1 * mh + (1 - nu1) * g) / (torch.sqrt(nu2 * vh + (1 - nu2) * g * g) + eps)
    raise AssertionError(name)


def plain_hypergrad(P, T, name, kw, *, h=None, w0=None, truncate_iters=0, alpha=0.0,
                    alpha_decay=1.0, ptt=False, init_aux=False):
    """(F(w_tau), dF/dh, dF/dw0 or None, tstar, [F(w_1)..F(w_T)], [w_0..w_T]) by autograd."""
    h = (P.h if h is None else h).detach().clone().requires_grad_(True)
    w0 = (P.w0 if w0 is None else w0).detach().clone().requires_grad_(True)
    w, state, traj, losses = w0, {}, [w0], []
    for t in range(T):
        if t == truncate_iters and t > 0:
            w = w.detach().requires_grad_(True)
            state = {k: v.detach() for k, v in state.items()}
        a = alpha * alpha_decay**t
        loss = f_plain(P, w, h) if alpha == 0 else (1 - a) * f_plain(P, w, h) + a * F_plain(P, w)
        g, = torch.autograd.grad(loss, w, create_graph=True)
        w = plain_step(name, kw, w, g, state, t + 1)
        traj.append(w)
        with torch.no_grad():
            losses.append(float(F_plain(P, w)))
    tau = 1 + int(np.argmax(losses)) if ptt else T
    L = F_plain(P, traj[tau])
    gh, gw0 = torch.autograd.grad(L, [h, w0], allow_unused=True)
    if gh is None:
        gh = torch.zeros_like(h)
    if gw0 is None:
        gw0 = torch.zeros_like(w0)
    return L.item(), gh, (gw0 if init_aux else None), tau, losses, [x.detach() for x in traj]


OPTS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.03}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.7, "nesterov": True}),
    "sgd_maximize_wd": (torch.optim.SGD, {"lr": 0.08, "momentum": 0.5, "weight_decay": 0.1}),
    "adam": (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.02}),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "betas": (0.85, 0.99), "weight_decay": 0.1}),
    "qhm": (QHM, {"lr": 0.1, "momentum": 0.8, "nu": 0.6, "weight_decay": 0.05}),
    "qhadam": (QHAdam, {"lr": 0.05, "betas": (0.8, 0.95), "nus": (0.7, 0.9), "weight_decay": 0.02}),
    "qhadamw": (QHAdamW, {"lr": 0.05, "betas": (0.8, 0.95), "nus": (0.7, 0.9), "weight_decay": 0.1}),
}
PLAIN_NAME = {"sgd": "sgd", "sgd_momentum": "sgd", "sgd_nesterov": "sgd", "sgd_maximize_wd": "sgd",
              "adam": "adam", "adamw": "adamw", "qhm": "qhm", "qhadam": "qhadam",
              "qhadamw": "qhadamw"}


def make(P, opt="sgd", T=12, **kw):
    cls, okw = OPTS[opt]
    ul, ll = UL(P.h), LL(P.w0)
    dyn = Dynamic(ll_objective, T, ul, ul_objective, ll, ll_opt=cls(ll.parameters(), **okw), **kw)
    return dyn, ul, ll


def close(a, b, tol=1e-10):
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a, b, (a - b).abs().max())


# ----------------------------------------------------------------------------------------------
# The exact oracle (tests/refimpl/naive_bilevel.py, forward-mode recursion), 1e-10
# ----------------------------------------------------------------------------------------------
# (our optimizer class and kwargs, the oracle's optimizer name and kwargs)
ORACLE_OPTS = {
    "sgd": (torch.optim.SGD, {}, "sgd", {}),
    "sgd-momentum-wd": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.05}, "sgd",
                        {"momentum": 0.9, "weight_decay": 0.05}),
    "sgd-nesterov": (torch.optim.SGD, {"momentum": 0.8, "nesterov": True}, "sgd",
                     {"momentum": 0.8, "nesterov": True}),
    "adam": (torch.optim.Adam, {"betas": (0.8, 0.95), "weight_decay": 0.02}, "adam",
             {"betas": (0.8, 0.95), "weight_decay": 0.02}),
    "adamw": (torch.optim.AdamW, {"betas": (0.8, 0.99), "weight_decay": 0.05}, "adamw",
              {"betas": (0.8, 0.99), "weight_decay": 0.05}),
    "qhm": (QHM, {"momentum": 0.9, "nu": 0.7, "weight_decay": 0.02}, "qhm",
            {"momentum": 0.9, "nu": 0.7, "weight_decay": 0.02}),
    "qhm-direct": (QHM, {"momentum": 0.5, "nu": 1.3, "weight_decay": 0.1,
                         "weight_decay_type": "direct"}, "qhm",
                   {"momentum": 0.5, "nu": 1.3, "weight_decay": 0.1, "weight_decay_type": "direct"}),
    "qhadam": (QHAdam, {"betas": (0.8, 0.99), "nus": (0.7, 0.9), "weight_decay": 0.02}, "qhadam",
               {"betas": (0.8, 0.99), "nus": (0.7, 0.9), "weight_decay": 0.02}),
    "qhadamw": (QHAdamW, {"nus": (0.6, 1.0), "weight_decay": 0.1}, "qhadam",
                {"nus": (0.6, 1.0), "weight_decay": 0.1, "decouple_weight_decay": True}),
}
# Dynamic's options, the oracle's options
METHODS = {
    "rad": ({}, {}),
    "trad-1": ({"truncate_iters": 1}, {"truncate_iters": 1}),
    "trad-4": ({"truncate_iters": 4}, {"truncate_iters": 4}),
    "trad-11": ({"truncate_iters": 11}, {"truncate_iters": 11}),
    "bda": ({"alpha": 0.4, "alpha_decay": 0.85}, {"alpha": 0.4, "alpha_decay": 0.85}),
    "bda-trad": ({"alpha": 0.4, "alpha_decay": 0.85, "truncate_iters": 3},
                 {"alpha": 0.4, "alpha_decay": 0.85, "truncate_iters": 3}),
    "ptt": ({"acquire_max_loss": True}, {"ptt": True}),
    "bda-ptt": ({"acquire_max_loss": True, "alpha": 0.4, "alpha_decay": 0.85},
                {"ptt": True, "alpha": 0.4, "alpha_decay": 0.85}),
    "rad-init": ({"init_aux": True}, {}),
    "iaptt": ({"init_aux": True, "acquire_max_loss": True}, {"ptt": True}),
    "trad-init": ({"init_aux": True, "truncate_iters": 2}, {"truncate_iters": 2}),
}


def dynamic_for(P, opt, T, lr, kernels=None, **kwargs):
    cls, kw, _, _ = ORACLE_OPTS[opt]
    ul, ll = UL(P.h), LL(P.w0)
    dyn = Dynamic(ll_objective, T, ul, ul_objective, ll, ll_opt=cls(ll.parameters(), lr=lr, **kw),
                  kernels=kernels, **kwargs)
    return dyn, ul, ll


def check_exact(problem, T, lr, opt, method, kernels=None, tol=1e-10, **extra):
    ours, theirs = METHODS[method]
    P = Ridge.of(problem)
    dyn, ul, ll = dynamic_for(P, opt, T, lr, kernels, **ours, **extra)
    res = dyn.optimize(P.X, P.y, P.Xv, P.yv)
    assert ul.h.grad is None and ll.w.grad is None  # the solve touches no .grad
    L = dyn.hypergrad(res, P.Xv, P.yv)
    _, _, name, okw = ORACLE_OPTS[opt]
    ex = nb.exact(problem, T, lr, optimizer=name, opt_kwargs=okw, **theirs)
    assert res.tstar == ex.tstar
    close(res.ul_losses, ex.ul_losses, tol)
    close(torch.stack([w[0].detach() for w in res.trajectory]), ex.trajectory, tol)
    close(L, ex.ul_loss, tol)
    close(ul.h.grad, ex.grad_h, tol)
    if ours.get("init_aux"):
        close(ll.w.grad, ex.grad_w0, tol)
    else:
        assert ll.w.grad is None
    return res, ex


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_methods(method):
    if METHODS[method][1].get("ptt"):
        problem, setting = nb.ptt_problem()
        T, lr = setting["T"], setting["lr"]
    else:
        problem, T, lr = nb.ridge_problem(seed=1), 12, 0.3
    res, ex = check_exact(problem, T, lr, "sgd", method)
    if METHODS[method][1].get("ptt"):
        assert 1 < res.tstar < T  # an interior t*
        assert res.trajectory[T][0].grad_fn is None  # the graph after t* was dropped
    if method == "trad-init":
        close(ex.grad_w0, np.zeros(problem.dim), 0)
    elif "init" in method or method == "iaptt":
        assert np.abs(ex.grad_w0).max() > 1e-6


@pytest.mark.parametrize("opt", sorted(ORACLE_OPTS))
@pytest.mark.parametrize("method", ["rad", "trad-4", "rad-init"])
def test_exact_inner_optimizers(opt, method):
    check_exact(nb.ridge_problem(seed=2), 10, 0.05 if "adam" in opt else 0.2, opt, method)


@pytest.mark.parametrize("opt", ["sgd-momentum-wd", "adam"])
def test_exact_ptt_with_inner_optimizers(opt):
    problem, setting = nb.ptt_problem()
    res, _ = check_exact(problem, setting["T"], 0.1 if opt == "adam" else 0.2, opt, "bda-ptt")
    assert res.tstar < setting["T"]


@pytest.mark.parametrize("policy", ["reset", "warm"])
@pytest.mark.parametrize("opt, method", [("sgd", "rad"), ("sgd-momentum-wd", "rad-init"),
                                         ("adam", "iaptt"), ("qhm", "trad-4")])
def test_exact_outer_loops(policy, opt, method):
    """3 outer steps with real UL (and init) optimizers against the oracle's outer loop."""
    problem, n_outer, T, lr, ul_lr, init_lr = nb.ridge_problem(seed=3), 3, 8, 0.2, 0.5, 0.3
    if method == "iaptt":
        problem, setting = nb.ptt_problem()
        T, lr = setting["T"], 0.1
    ours, theirs = METHODS[method]
    init = ours.get("init_aux", False)
    P = Ridge.of(problem)
    dyn, ul, ll = dynamic_for(P, opt, T, lr, warm_start=policy == "warm", **ours)
    ul_opt = torch.optim.SGD(ul.parameters(), lr=ul_lr)
    init_opt = torch.optim.SGD(ll.parameters(), lr=init_lr)
    _, _, name, okw = ORACLE_OPTS[opt]
    exs = nb.exact_outer(problem, n_outer, T, lr, ul_lr, policy=policy,
                         init_lr=init_lr if init else None, optimizer=name, opt_kwargs=okw, **theirs)
    for ex in exs:
        close(ll.w.detach(), ex.trajectory[0])
        ul_opt.zero_grad()
        init_opt.zero_grad()
        res = dyn.optimize(P.X, P.y, P.Xv, P.yv)
        L = dyn.hypergrad(res, P.Xv, P.yv)
        assert res.tstar == ex.tstar
        close(L, ex.ul_loss)
        close(ul.h.grad, ex.grad_h)
        ul_opt.step()
        if init:
            close(ll.w.grad, ex.grad_w0)
            init_opt.step()
    moved = (ll.w.detach() - P.w0).abs().max()
    assert moved > 1e-6 if (policy == "warm" or init) else moved == 0


def test_rad_approaches_the_implicit_hypergradient():
    problem = nb.ridge_problem(seed=4)
    implicit, w_star = nb.implicit_hypergradient(problem)
    P = Ridge.of(problem)
    errors = []
    for T in (5, 20, 80):
        dyn, ul, _ = dynamic_for(P, "sgd", T, 0.3)
        res = dyn.optimize(P.X, P.y)
        dyn.hypergrad(res, P.Xv, P.yv)
        errors.append(float((ul.h.grad - torch.tensor(implicit)).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6, errors
    close(res.params[0], w_star, 1e-4)


@pytest.mark.parametrize("opt", ["sgd", "sgd-nesterov", "qhm", "adam", "qhadamw"])
@pytest.mark.parametrize("method", ["rad", "trad-4", "iaptt"])
def test_exact_kernel_path(opt, method, monkeypatch):
    """The Numba forward + VJP kernels (kernels=True) against the oracle."""
    kernel_module = _unroll._unroll_kernel
    calls = []
    for name in ("sgd_step", "qhm_step", "qhadam_step"):
        def counted(*args, _fn=getattr(kernel_module, name), _name=name):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setattr(kernel_module, name, counted)
    if method == "iaptt":
        problem, setting = nb.ptt_problem()
        T, lr = setting["T"], 0.1 if "adam" in opt else 0.3
    else:
        problem, T, lr = nb.ridge_problem(seed=5), 10, 0.05 if "adam" in opt else 0.2
    check_exact(problem, T, lr, opt, method, kernels=True)
    kind = {"sgd": "sgd_step", "adam": "qhadam_step", "qhadamw": "qhadam_step"}.get(opt, "qhm_step")
    assert calls == [kind] * (T - METHODS[method][0].get("truncate_iters", 0))  # one per step


# ----------------------------------------------------------------------------------------------
# Forward: the inner optimizers are the real ones
# ----------------------------------------------------------------------------------------------
REAL = {
    "sgd": OPTS["sgd"], "sgd_momentum": OPTS["sgd_momentum"], "sgd_nesterov": OPTS["sgd_nesterov"],
    "adam": OPTS["adam"], "adamw": OPTS["adamw"],
    "qhm": (qhoptim_pyt.QHM, OPTS["qhm"][1]), "qhadam": (qhoptim_pyt.QHAdam, OPTS["qhadam"][1]),
}


@pytest.mark.parametrize("opt", sorted(REAL))
def test_trajectory_is_the_real_optimizer(opt):
    P, T = Ridge(1), 8
    dyn, ul, ll = make(P, opt, T)
    res = dyn.optimize(P.X, P.y)
    cls, kw = REAL[opt]
    w = nn.Parameter(P.w0.clone())
    real = cls([w], **kw)
    for t in range(1, T + 1):
        real.zero_grad()
        f_plain(P, w, P.h).backward()
        real.step()
        close(res.trajectory[t][0], w.detach(), 1e-12)
    close(res.trajectory[0][0], P.w0, 0)
    assert ll.w.grad is None and ul.h.grad is None
    close(ll.w.detach(), P.w0, 0)  # ll_model untouched by the solve


@pytest.mark.parametrize("cls, kw", [
    (torch.optim.SGD, {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 0.01}),
    (QHAdam, {"lr": 0.01, "nus": (0.7, 1.0)}),
])
def test_maximize_is_read(cls, kw):
    P = Ridge(2)
    ul, ll = UL(P.h), LL(P.w0)
    dyn = Dynamic(lambda s: -ll_objective(s), 5, ul, ul_objective, ll,
                  ll_opt=cls(ll.parameters(), maximize=True, **kw))
    res = dyn.optimize(P.X, P.y)
    w = nn.Parameter(P.w0.clone())
    real = (qhoptim_pyt.QHAdam if cls is QHAdam else cls)([w], **kw, **({} if cls is QHAdam else
                                                                         {"maximize": True}))
    for _ in range(5):
        real.zero_grad()
        (-f_plain(P, w, P.h) if cls is not QHAdam else f_plain(P, w, P.h)).backward()
        real.step()
    close(res.params[0], w.detach(), 1e-12)


@pytest.mark.parametrize("k_drop", [1, 4, 9])
def test_trad_truncated_steps(k_drop):
    P, T = Ridge(4), 10
    dyn, ul, ll = make(P, "sgd_momentum", T, truncate_iters=k_drop)
    res = dyn.optimize(P.X, P.y)
    assert ul.h.grad is None  # the truncated steps add nothing to the UL .grad
    rad, _, _ = make(P, "sgd_momentum", T)
    full = rad.optimize(P.X, P.y)
    for t in range(T + 1):  # the truncated steps are taken at the true iterates
        close(res.trajectory[t][0], full.trajectory[t][0], 1e-13)
    dyn.hypergrad(res, P.Xv, P.yv)
    ref = plain_hypergrad(P, T, "sgd", OPTS["sgd_momentum"][1], truncate_iters=k_drop)
    close(ul.h.grad, ref[1])
    # the reference toolbox's bug would add sum_{s<k_drop} df(w_s)/dh: it is not there
    polluted = ref[1].clone()
    traj = ref[5]
    for s in range(k_drop):
        h = P.h.clone().requires_grad_(True)
        polluted += torch.autograd.grad(f_plain(P, traj[s], h), h)[0]
    assert (ul.h.grad - polluted).abs().max() > 1e-6


def test_init_aux_with_trad_gives_zero_w0_gradient():
    P = Ridge(8)
    dyn, ul, ll = make(P, "sgd", 6, truncate_iters=2, init_aux=True)
    dyn.hypergrad(dyn.optimize(P.X, P.y), P.Xv, P.yv)
    close(ll.w.grad, torch.zeros(6, dtype=DT), 0)
    close(ul.h.grad, plain_hypergrad(P, 6, "sgd", OPTS["sgd"][1], truncate_iters=2)[1])


def test_hypergrad_adds_into_grad():
    P = Ridge(9)
    dyn, ul, _ = make(P, "sgd", 5)
    ul.h.grad = torch.ones_like(ul.h)
    dyn.hypergrad(dyn.optimize(P.X, P.y), P.Xv, P.yv)
    close(ul.h.grad, 1 + plain_hypergrad(P, 5, "sgd", OPTS["sgd"][1])[1])


def test_hyperparameters_read_at_each_solve():
    P = Ridge(11)
    dyn, _, ll = make(P, "sgd_momentum", 4)
    dyn.ll_opt.param_groups[0]["lr"] = 0.01  # as a scheduler would
    res = dyn.optimize(P.X, P.y)
    ref = plain_hypergrad(P, 4, "sgd", {**OPTS["sgd_momentum"][1], "lr": 0.01})
    close(res.params[0], ref[5][-1], 1e-12)


# ----------------------------------------------------------------------------------------------
# Models with several parameters and groups; lower_model as the iterate
# ----------------------------------------------------------------------------------------------
def test_groups_and_parameter_reads():
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=DT), torch.randn(20, 2, dtype=DT)
    Xv, yv = torch.randn(15, 3, dtype=DT), torch.randn(15, 2, dtype=DT)
    net = nn.Linear(3, 2).to(DT)
    ul = UL(torch.zeros(1, dtype=DT))
    seen = []

    def f(state):
        m = state["lower_model"]
        seen.append([p for p in m.parameters()])
        reg = sum((p * p).sum() for p in m.parameters())  # reads the iterate's parameters
        return ((m(state["data"]) - state["target"]) ** 2).mean() + torch.exp(state["upper_model"].h[0]) * reg

    opt = torch.optim.SGD([{"params": [net.weight], "lr": 0.1},
                           {"params": [net.bias], "lr": 0.05, "momentum": 0.5}], lr=0.1)
    T = 5
    dyn = Dynamic(f, T, ul, lambda s: ((s["lower_model"](s["data"]) - s["target"]) ** 2).mean(),
                  net, ll_opt=opt)
    res = dyn.optimize(X, y)
    assert seen[0][0] is not net.weight  # the iterate's tensors, not the module's parameters
    dyn.hypergrad(res, Xv, yv)
    # plain unroll
    h = torch.zeros(1, dtype=DT, requires_grad=True)
    W = net.weight.detach().clone().requires_grad_(True)
    b, buf = net.bias.detach().clone().requires_grad_(True), None
    for t in range(T):
        loss = ((X @ W.T + b - y) ** 2).mean() + torch.exp(h[0]) * ((W * W).sum() + (b * b).sum())
        gW, gb = torch.autograd.grad(loss, [W, b], create_graph=True)
        buf = gb if buf is None else 0.5 * buf + gb
        W, b = W - 0.1 * gW, b - 0.05 * buf
    close(res.params[0], W.detach(), 1e-12)
    close(res.params[1], b.detach(), 1e-12)
    gh, = torch.autograd.grad(((Xv @ W.T + b - yv) ** 2).mean(), h)
    close(ul.h.grad, gh)
    assert net.weight.grad is None


# ----------------------------------------------------------------------------------------------
# Checkpointing: the same results, fewer saved bytes
# ----------------------------------------------------------------------------------------------
def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("kernels", [None, False])
def test_checkpoint_same_results_less_memory(opt, kernels):
    P, T = Ridge(12, n=200, dim=50), 10
    grads, nbytes = [], []
    for ckpt in (False, True):
        dyn, ul, _ = make(P, opt, T, checkpoint=ckpt, truncate_iters=2, kernels=kernels)
        res, n = saved_bytes(lambda: dyn.optimize(P.X, P.y))
        dyn.hypergrad(res, P.Xv, P.yv)
        grads.append(ul.h.grad)
        nbytes.append(n)
    close(grads[1], grads[0], 1e-12)
    close(grads[0], plain_hypergrad(P, T, PLAIN_NAME[opt], OPTS[opt][1], truncate_iters=2)[1])
    assert nbytes[1] < 0.5 * nbytes[0], nbytes


@pytest.mark.parametrize("method", ["iaptt", "bda-trad"])
@pytest.mark.parametrize("kernels", [None, False])
def test_exact_with_checkpoint(method, kernels):
    if method == "iaptt":
        problem, setting = nb.ptt_problem()
        T, lr = setting["T"], setting["lr"]
    else:
        problem, T, lr = nb.ridge_problem(seed=6), 10, 0.2
    check_exact(problem, T, lr, "sgd-momentum-wd" if method == "bda-trad" else "sgd", method,
                kernels=kernels, checkpoint=True)


# ----------------------------------------------------------------------------------------------
# The Numba kernel path against the torch-ops path
# ----------------------------------------------------------------------------------------------
def test_kernels_true_without_kernels_is_an_error(monkeypatch):
    monkeypatch.setattr(_unroll, "_unroll_kernel", None)  # as on a build without them
    P = Ridge(13)
    dyn, _, _ = make(P, "sgd", 3, kernels=True)
    with pytest.raises(RuntimeError, match="kernels are not available"):
        dyn.optimize(P.X, P.y)
    dyn.kernels = None  # auto: torch ops
    dyn.hypergrad(dyn.optimize(P.X, P.y), P.Xv, P.yv)
    close(dyn.ul_model.h.grad, plain_hypergrad(P, 3, "sgd", OPTS["sgd"][1])[1])


def test_kernels_true_with_unsupported_tensors_is_an_error():
    P = Ridge(13)
    ul, ll = UL(P.h), LL(P.w0).to(torch.float16)
    dyn = Dynamic(ll_objective, 3, ul, ul_objective, ll, ll_opt=torch.optim.SGD(ll.parameters(), lr=0.1),
                  kernels=True)
    with pytest.raises(RuntimeError, match="cannot take these tensors"):
        dyn.optimize(P.X.half(), P.y.half())
    dyn.kernels = None  # auto: torch ops on float16
    res = dyn.optimize(P.X.half(), P.y.half())
    assert res.params[0].dtype == torch.float16
    close(res.params[0].double(), plain_hypergrad(P, 3, "sgd", {"lr": 0.1})[5][-1], 2e-2)


@pytest.mark.parametrize("opt", ["sgd", "sgd_nesterov", "qhm", "adam", "qhadamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_path_equals_torch_ops(opt, dtype):
    assert _unroll.kernel_available()  # the unroll kernels are part of the package
    P, T = Ridge(14), 8
    grads, trajs = [], []
    for kernels in (True, False):
        cls, kw = OPTS[opt]
        ul, ll = UL(P.h).to(dtype), LL(P.w0).to(dtype)
        dyn = Dynamic(ll_objective, T, ul, ul_objective, ll, ll_opt=cls(ll.parameters(), **kw),
                      truncate_iters=2, init_aux=True, kernels=kernels)
        res = dyn.optimize(P.X.to(dtype), P.y.to(dtype))
        dyn.hypergrad(res, P.Xv.to(dtype), P.yv.to(dtype))
        grads.append(ul.h.grad)
        trajs.append(res.params[0].detach())
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    close(trajs[0], trajs[1], tol)
    close(grads[0], grads[1], tol)


# ----------------------------------------------------------------------------------------------
# The sqrt at exactly zero
# ----------------------------------------------------------------------------------------------
def test_adam_zero_gradient_entries_give_no_nan():
    P = Ridge(15)
    P.X[:, 0] = 0.0  # feature 0 unused by the data term...
    P.w0[0] = 0.0    # ...and w_0 = 0 there: its gradient, moments and step stay exactly 0
    dyn, ul, _ = make(P, "adam", 6, kernels=False)
    dyn.hypergrad(dyn.optimize(P.X, P.y), P.Xv, P.yv)
    assert torch.isfinite(ul.h.grad).all()
    ref = plain_hypergrad(Ridge(15), 6, "adam", OPTS["adam"][1])  # reference (no zero entries)
    assert ref is not None
    x = torch.zeros(3, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(_unroll.safe_sqrt(x * x + torch.tensor([0.0, 4.0, 9.0], dtype=DT)).sum(), x)
    close(g, torch.zeros(3, dtype=DT), 0)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _ll():
    return LL(torch.zeros(3, dtype=DT))


BAD = [
    ({"acquire_max_loss": True, "truncate_iters": 2}, ValueError, "exclusive"),
    ({"alpha": -0.1}, ValueError, "Invalid alpha value: -0.1"),
    ({"alpha": 1.5}, ValueError, "Invalid alpha value: 1.5"),
    ({"alpha": float("nan")}, ValueError, "Invalid alpha value: nan"),
    ({"alpha": "x"}, TypeError, "Invalid alpha value"),
    ({"alpha_decay": 0.0}, ValueError, "Invalid alpha_decay value: 0.0"),
    ({"alpha_decay": 1.2}, ValueError, "Invalid alpha_decay value: 1.2"),
    ({"truncate_iters": -1}, ValueError, "Invalid truncate_iters value: -1"),
    ({"truncate_iters": 5}, ValueError, "Invalid truncate_iters value: 5"),
    ({"truncate_iters": 1.5}, TypeError, "Invalid truncate_iters value: 1.5"),
    ({"lower_loop": 0}, ValueError, "Invalid lower_loop value: 0"),
    ({"lower_loop": True}, TypeError, "Invalid lower_loop value: True"),
    ({"ll_objective": 3}, TypeError, "Invalid ll_objective: 3"),
    ({"ul_objective": None}, TypeError, "Invalid ul_objective: None"),
    ({"ll_opt": None}, ValueError, "Invalid ll_opt: None"),
    ({"ll_opt": "sgd"}, TypeError, "Invalid ll_opt: str"),
    ({"init_aux": 1}, TypeError, "Invalid init_aux value: 1"),
    ({"warm_start": "yes"}, TypeError, "Invalid warm_start value"),
    ({"checkpoint": None}, TypeError, "Invalid checkpoint value"),
    ({"acquire_max_loss": 0}, TypeError, "Invalid acquire_max_loss value"),
    ({"kernels": 1}, TypeError, "Invalid kernels value"),
    ({"ll_model": "m"}, TypeError, "Invalid ll_model: str"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD)
def test_construction_errors(kwargs, exc, match):
    ll = kwargs.pop("ll_model", None) or _ll()
    args = {"ll_objective": ll_objective, "lower_loop": 5, "ul_model": UL(torch.zeros(3, dtype=DT)),
            "ul_objective": ul_objective, "ll_model": ll}
    if "ll_opt" not in kwargs:
        kwargs["ll_opt"] = torch.optim.SGD(_ll().parameters() if isinstance(ll, str) else ll.parameters(), lr=0.1)
    for key in list(kwargs):
        if key in args:
            args[key] = kwargs.pop(key)
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(".", r"\.")):
        Dynamic(**args, **kwargs)


@pytest.mark.parametrize("make_opt, exc, match", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, dampening=0.1), ValueError,
     "Invalid dampening value: 0.1"),
    (lambda m: torch.optim.Adam(m.parameters(), amsgrad=True), ValueError, "Invalid amsgrad value"),
    (lambda m: torch.optim.RMSprop(m.parameters()), TypeError, "Invalid ll_opt: RMSprop"),
    (lambda m: torch.optim.SGD(_ll().parameters(), lr=0.1), ValueError, "not exactly ll_model"),
    (lambda m: torch.optim.SGD(list(m.parameters()) + [nn.Parameter(torch.zeros(2))], lr=0.1),
     ValueError, "not exactly ll_model"),
])
def test_bad_ll_opt(make_opt, exc, match):
    ll = _ll()
    with pytest.raises(exc, match=match):
        Dynamic(ll_objective, 5, UL(torch.zeros(3, dtype=DT)), ul_objective, ll, ll_opt=make_opt(ll))


@pytest.mark.parametrize("kwargs, method", [({"alpha": 0.5}, "BDA"), ({"acquire_max_loss": True}, "PTT")])
def test_bda_ptt_need_validation_data(kwargs, method):
    P = Ridge(16)
    dyn, ul, ll = make(P, "sgd", 4, **kwargs)
    with pytest.raises(ValueError, match=f"Invalid val_data: None \\({method}"):
        dyn.optimize(P.X, P.y)


def test_result_used_once():
    P = Ridge(17)
    dyn, _, _ = make(P, "sgd", 3)
    res = dyn.optimize(P.X, P.y)
    dyn.hypergrad(res, P.Xv, P.yv)
    with pytest.raises(RuntimeError, match="already used"):
        dyn.hypergrad(res, P.Xv, P.yv)
