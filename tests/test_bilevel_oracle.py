"""Self-tests of the exact bilevel oracle (tests/refimpl/naive_bilevel.py).

The forward-mode recursion is checked against computations that share none of its code:
central finite differences of the unrolled map (tau and the dropped steps held fixed), a plain
torch autograd unroll written here (and ``torch.optim``'s own differentiable Adam/AdamW), the
real inner optimizers' trajectories (``torch.optim``, uniopt's QHM/QHAdam, qhoptim), the
closed-form implicit hypergradient, and identities between methods and optimizers.
"""

from __future__ import annotations

import numpy as np
import pytest
import qhoptim.pyt as qhoptim_pyt
import torch

import uniopt.adapters.torch as uniopt_torch
from refimpl import naive_bilevel as nb

TOL = dict(rtol=1e-12, atol=1e-12)

OPTIMIZERS = {
    "sgd": ("sgd", {}),
    "sgd-momentum-wd": ("sgd", dict(momentum=0.9, weight_decay=0.05)),
    "sgd-nesterov": ("sgd", dict(momentum=0.8, nesterov=True)),
    "sgd-dampening": ("sgd", dict(momentum=0.7, dampening=0.3)),
    "adam": ("adam", dict(weight_decay=0.02)),
    "adamw": ("adamw", dict(betas=(0.8, 0.99), weight_decay=0.05)),
    "qhm": ("qhm", dict(momentum=0.9, nu=0.7, weight_decay=0.02)),
    "qhm-direct": ("qhm", dict(momentum=0.5, nu=1.3, weight_decay=0.1, weight_decay_type="direct")),
    "qhadam": ("qhadam", dict(betas=(0.8, 0.99), nus=(0.7, 0.9), weight_decay=0.02)),
    "qhadamw": ("qhadam", dict(nus=(0.6, 1.0), weight_decay=0.1, decouple_weight_decay=True)),
}
METHODS = {
    "rad": {},
    "trad": dict(truncate_iters=4),
    "bda": dict(alpha=0.4, alpha_decay=0.85),
    "bda-trad": dict(alpha=0.4, alpha_decay=0.85, truncate_iters=3),
    "ptt": dict(ptt=True),
    "bda-ptt": dict(alpha=0.4, alpha_decay=0.85, ptt=True),
}
T_SMALL, LR = 12, 0.1


def _setting(problem, method):
    """(problem, T, lr): PTT methods run on ptt_problem, whose t* is interior for every optimizer."""
    if METHODS[method].get("ptt"):
        p, s = nb.ptt_problem()
        return p, s["T"], s["lr"]
    return problem, T_SMALL, LR


@pytest.fixture(scope="module")
def problem():
    # seed 1: no direction entry along any trajectory comes near 0 (Adam's step is very
    # curved there, which would only make finite differences inaccurate)
    return nb.ridge_problem(seed=1)


# ----------------------------------------------------------------------------------------------
# Finite differences of the unrolled map
# ----------------------------------------------------------------------------------------------
def _central_fd(fun, x, eps=1e-6):
    out = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        out[i] = (fun(x + e) - fun(x - e)) / (2 * eps)
    return out


def _fd_check(p, T, lr, opt, kw, method, ex):
    m = {k: v for k, v in method.items() if k != "ptt"}
    f_args = dict(T=T, lr=lr, tau=ex.tstar, optimizer=opt, opt_kwargs=kw, **m)
    fd_h = _central_fd(lambda h: nb.unrolled_ul_loss(p.replace(h=h), h_dropped=p.h, **f_args), p.h)
    np.testing.assert_allclose(ex.grad_h, fd_h, rtol=2e-5, atol=1e-9)
    if method.get("truncate_iters", 0):
        # nothing before the truncation point is differentiated: no path back to w0
        assert np.all(ex.grad_w0 == 0)
    else:
        fd_w0 = _central_fd(lambda w0: nb.unrolled_ul_loss(p.replace(w0=w0), **f_args), p.w0)
        np.testing.assert_allclose(ex.grad_w0, fd_w0, rtol=2e-5, atol=1e-9)
    assert abs(ex.ul_loss - nb.unrolled_ul_loss(p, **f_args)) <= 1e-15 * max(1.0, ex.ul_loss)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_finite_differences(problem, opt_name, method):
    opt, kw = OPTIMIZERS[opt_name]
    p, T, lr = _setting(problem, method)
    ex = nb.exact(p, T, lr, optimizer=opt, opt_kwargs=kw, **METHODS[method])
    assert np.abs(ex.grad_h).max() > 1e-4  # a non-trivial derivative is being checked
    if METHODS[method].get("ptt"):
        assert 1 < ex.tstar < T
    _fd_check(p, T, lr, opt, kw, METHODS[method], ex)


def test_finite_differences_interior_tstar():
    """PTT with an interior t* (plain SGD, BDA, momentum), init-aux gradient included."""
    p, s = nb.ptt_problem()
    for opt, kw, method in [("sgd", {}, dict(ptt=True)),
                            ("sgd", {}, dict(ptt=True, alpha=0.3, alpha_decay=0.9)),
                            ("sgd", dict(momentum=0.3), dict(ptt=True))]:
        ex = nb.exact(p, s["T"], s["lr"], optimizer=opt, opt_kwargs=kw, **method)
        assert 1 < ex.tstar < s["T"]
        _fd_check(p, s["T"], s["lr"], opt, kw, method, ex)


# ----------------------------------------------------------------------------------------------
# A plain torch autograd unroll (float64), written here from each optimizer's definition
# ----------------------------------------------------------------------------------------------
def _torch_step(opt, kw, lr, w, g, st, t):
    k = {**nb.OPTIMIZERS[opt][0], **kw}
    if opt == "sgd":
        g = g + k["weight_decay"] * w
        if k["momentum"]:
            st["b"] = g if t == 0 else k["momentum"] * st["b"] + (1 - k["dampening"]) * g
            g = g + k["momentum"] * st["b"] if k["nesterov"] else st["b"]
        return w - lr * g
    if opt == "qhm":
        if k["weight_decay_type"] == "direct":
            w = w * (1 - lr * k["weight_decay"])
        else:
            g = g + k["weight_decay"] * w
        st["b"] = k["momentum"] * st.get("b", 0.0) + (1 - k["momentum"]) * g
        return w - lr * ((1 - k["nu"]) * g + k["nu"] * st["b"])
    # adam, adamw, qhadam: explicit 1 - beta**n bias corrections (not the oracle's running weights)
    (b1, b2), n = k["betas"], t + 1
    if opt == "adamw" or (opt == "qhadam" and k["decouple_weight_decay"]):
        w = w * (1 - lr * k["weight_decay"])
    else:
        g = g + k["weight_decay"] * w
    st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
    m_hat, v_hat = st["m"] / (1 - b1**n), st["v"] / (1 - b2**n)
    nu1, nu2 = k.get("nus", (1.0, 1.0))
    den = torch.sqrt(nu2 * v_hat + (1 - nu2) * g * g) + k["eps"]
    return w - lr * (nu1 * m_hat + (1 - nu1) * g) / den


def torch_unroll(p, T, lr, *, optimizer="sgd", opt_kwargs=None, truncate_iters=0, alpha=0.0,
                 alpha_decay=1.0, ptt=False):
    """(F(w_tau), dF/dh, dF/dw0, tau, trajectory) by reverse-mode autograd through T steps."""
    X, y, Xv, yv, h, w0 = (torch.tensor(a, dtype=torch.float64)
                           for a in (p.X_tr, p.y_tr, p.X_val, p.y_val, p.h, p.w0))
    h.requires_grad_(True)
    w0.requires_grad_(True)
    F = lambda w: ((Xv @ w - yv) ** 2).sum() / (2 * len(yv))  # noqa: E731
    w, st, traj = w0, {}, [w0]
    for t in range(T):
        if t == truncate_iters and t > 0:  # T-RAD: cut the path before step k
            w = w.detach().requires_grad_(True)
            st = {key: val.detach() for key, val in st.items()}
        a_t = alpha * alpha_decay**t
        f = ((X @ w - y) ** 2).sum() / (2 * len(y)) + 0.5 * (torch.exp(h) * w * w).sum()
        (g,) = torch.autograd.grad((1 - a_t) * f + a_t * F(w), w, create_graph=True)
        w = _torch_step(optimizer, opt_kwargs or {}, lr, w, g, st, t)
        traj.append(w)
    losses = [float(F(wt).detach()) for wt in traj[1:]]
    tau = 1 + int(np.argmax(losses)) if ptt else T
    loss = F(traj[tau])
    g_h, g_w0 = torch.autograd.grad(loss, (h, w0), allow_unused=True)
    g_w0 = np.zeros(p.dim) if g_w0 is None else g_w0.numpy()
    return float(loss.detach()), g_h.numpy(), g_w0, tau, np.array([wt.detach().numpy() for wt in traj])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_torch_autograd_unroll(problem, opt_name, method):
    opt, kw = OPTIMIZERS[opt_name]
    args = dict(optimizer=opt, opt_kwargs=kw, **METHODS[method])
    p, T, lr = _setting(problem, method)
    ex = nb.exact(p, T, lr, **args)
    loss, g_h, g_w0, tau, traj = torch_unroll(p, T, lr, **args)
    assert tau == ex.tstar
    np.testing.assert_allclose(ex.trajectory, traj, **TOL)
    np.testing.assert_allclose(ex.ul_loss, loss, **TOL)
    np.testing.assert_allclose(ex.grad_h, g_h, **TOL)
    np.testing.assert_allclose(ex.grad_w0, g_w0, **TOL)


def test_torch_unroll_interior_tstar_and_init_aux():
    p, s = nb.ptt_problem()
    for method in (dict(ptt=True), dict(ptt=True, alpha=0.3, alpha_decay=0.9)):
        ex = nb.exact(p, s["T"], s["lr"], **method)
        loss, g_h, g_w0, tau, _ = torch_unroll(p, s["T"], s["lr"], **method)
        assert tau == ex.tstar and 1 < tau < s["T"]
        np.testing.assert_allclose([ex.ul_loss, *ex.grad_h, *ex.grad_w0], [loss, *g_h, *g_w0], **TOL)


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_torch_optim_differentiable(problem, opt):
    """torch.optim's own differentiable steps give the oracle's hypergradients.

    SGD without momentum only: torch's differentiable SGD starts its momentum buffer as
    ``grad.detach().clone()``, which drops a term of the true derivative. The default dtype is
    float64 here because torch keeps Adam's step count in the default scalar dtype (a float32
    count makes the bias corrections, and so the derivatives, ~1e-8 off).
    """
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt]
    kw = dict(weight_decay=0.03) if opt == "sgd" else dict(betas=(0.8, 0.99), weight_decay=0.03)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g_h, g_w0 = _torch_optim_unroll(problem, cls, kw)
    finally:
        torch.set_default_dtype(previous)
    ex = nb.exact(problem, T_SMALL, LR, optimizer=opt, opt_kwargs=kw)
    np.testing.assert_allclose(ex.grad_h, g_h.numpy(), **TOL)
    np.testing.assert_allclose(ex.grad_w0, g_w0.numpy(), **TOL)


def _torch_optim_unroll(problem, cls, kw):
    X, y, Xv, yv, h, w0 = (torch.tensor(a, dtype=torch.float64)
                           for a in (problem.X_tr, problem.y_tr, problem.X_val, problem.y_val,
                                     problem.h, problem.w0))
    h.requires_grad_(True)
    w0.requires_grad_(True)
    q = w0.clone()
    inner = cls([q], lr=LR, differentiable=True, **kw)
    for _ in range(T_SMALL):
        x = q.clone()
        f = ((X @ x - y) ** 2).sum() / (2 * len(y)) + 0.5 * (torch.exp(h) * x * x).sum()
        (q.grad,) = torch.autograd.grad(f, x, create_graph=True)
        inner.step()
    return torch.autograd.grad(((Xv @ q - yv) ** 2).sum() / (2 * len(yv)), (h, w0))


# ----------------------------------------------------------------------------------------------
# The inner optimizers' trajectories against the real optimizers
# ----------------------------------------------------------------------------------------------
def _reference_optimizer(name, kw, params, lr):
    opt, kw = OPTIMIZERS[name]
    if opt == "sgd":
        return [torch.optim.SGD(params, lr=lr, **kw)]
    if opt in ("adam", "adamw"):
        return [(torch.optim.Adam if opt == "adam" else torch.optim.AdamW)(params, lr=lr, **kw)]
    if opt == "qhm":
        return [uniopt_torch.QHM(params, lr=lr, **kw), qhoptim_pyt.QHM(params, lr=lr, **kw)]
    return [uniopt_torch.QHAdam(params, lr=lr, **kw), qhoptim_pyt.QHAdam(params, lr=lr, **kw)]


@pytest.mark.parametrize("bda", [False, True], ids=["rad", "bda"])
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_trajectory_matches_real_optimizer(problem, opt_name, bda):
    opt, kw = OPTIMIZERS[opt_name]
    alpha, decay = (0.4, 0.85) if bda else (0.0, 1.0)
    ex = nb.exact(problem, T_SMALL, LR, optimizer=opt, opt_kwargs=kw, alpha=alpha, alpha_decay=decay)
    X, y, Xv, yv, h = (torch.tensor(a, dtype=torch.float64)
                       for a in (problem.X_tr, problem.y_tr, problem.X_val, problem.y_val, problem.h))
    n_refs = len(_reference_optimizer(opt_name, kw, [torch.zeros(1, requires_grad=True)], LR))
    for r in range(n_refs):
        w = torch.tensor(problem.w0, dtype=torch.float64, requires_grad=True)
        ref = _reference_optimizer(opt_name, kw, [w], LR)[r]
        traj = [w.detach().clone().numpy()]
        for t in range(T_SMALL):
            a_t = alpha * decay**t
            ref.zero_grad()
            f = ((X @ w - y) ** 2).sum() / (2 * len(y)) + 0.5 * (torch.exp(h) * w * w).sum()
            F = ((Xv @ w - yv) ** 2).sum() / (2 * len(yv))
            ((1 - a_t) * f + a_t * F).backward()
            ref.step()
            traj.append(w.detach().clone().numpy())
        np.testing.assert_allclose(ex.trajectory, np.array(traj), rtol=1e-12, atol=1e-13,
                                   err_msg=type(ref).__module__ + "." + type(ref).__name__)


# ----------------------------------------------------------------------------------------------
# Identities between methods and optimizers
# ----------------------------------------------------------------------------------------------
def test_trad_zero_is_rad_and_trad_is_rad_from_the_cut(problem):
    rad = nb.exact(problem, T_SMALL, LR, optimizer="adam")
    trad0 = nb.exact(problem, T_SMALL, LR, optimizer="adam", truncate_iters=0)
    np.testing.assert_array_equal(trad0.grad_h, rad.grad_h)
    np.testing.assert_array_equal(trad0.grad_w0, rad.grad_w0)
    # stateless SGD: T-RAD(k) is RAD over T - k steps started at the true w_k
    k = 5
    trad = nb.exact(problem, T_SMALL, LR, truncate_iters=k)
    rad_tail = nb.exact(problem.replace(w0=trad.trajectory[k]), T_SMALL - k, LR)
    np.testing.assert_allclose(trad.grad_h, rad_tail.grad_h, **TOL)
    np.testing.assert_allclose(trad.trajectory[k:], rad_tail.trajectory, **TOL)
    assert np.abs(trad.grad_h - nb.exact(problem, T_SMALL, LR).grad_h).max() > 1e-4


def test_bda_alpha_zero_is_rad_and_alpha_one_ignores_h(problem):
    rad = nb.exact(problem, T_SMALL, LR, optimizer="qhm", opt_kwargs=dict(momentum=0.9, nu=0.7))
    bda0 = nb.exact(problem, T_SMALL, LR, optimizer="qhm", opt_kwargs=dict(momentum=0.9, nu=0.7),
                    alpha=0.0, alpha_decay=0.5)
    np.testing.assert_array_equal(bda0.grad_h, rad.grad_h)
    np.testing.assert_array_equal(bda0.trajectory, rad.trajectory)
    # direction = grad F alone: the trajectory does not depend on h at all
    bda1 = nb.exact(problem, T_SMALL, LR, alpha=1.0, alpha_decay=1.0)
    np.testing.assert_array_equal(bda1.grad_h, np.zeros(problem.dim))
    assert np.abs(bda1.grad_w0).max() > 1e-4


@pytest.mark.parametrize("method", ["rad", "bda", "trad"])
def test_qhm_is_sgd_momentum_and_nesterov(problem, method):
    beta, lr = 0.8, LR
    m = METHODS[method]
    for nu, nesterov in ((1.0, False), (beta, True)):
        sgd = nb.exact(problem, T_SMALL, lr * (1 - beta), optimizer="sgd",
                       opt_kwargs=dict(momentum=beta, nesterov=nesterov), **m)
        qhm = nb.exact(problem, T_SMALL, lr, optimizer="qhm", opt_kwargs=dict(momentum=beta, nu=nu), **m)
        np.testing.assert_allclose(qhm.trajectory, sgd.trajectory, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(qhm.grad_h, sgd.grad_h, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(qhm.grad_w0, sgd.grad_w0, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["rad", "bda", "trad"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_qhadam_nus_one_is_adam(problem, method, decoupled):
    kw = dict(betas=(0.85, 0.995), weight_decay=0.04, eps=1e-6)
    m = METHODS[method]
    adam = nb.exact(problem, T_SMALL, LR, optimizer="adamw" if decoupled else "adam", opt_kwargs=kw, **m)
    qh = nb.exact(problem, T_SMALL, LR, optimizer="qhadam",
                  opt_kwargs=dict(kw, nus=(1.0, 1.0), decouple_weight_decay=decoupled), **m)
    np.testing.assert_allclose(qh.trajectory, adam.trajectory, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(qh.grad_h, adam.grad_h, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(qh.grad_w0, adam.grad_w0, rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# The implicit-function limit
# ----------------------------------------------------------------------------------------------
def test_implicit_hypergradient_against_fd_of_the_minimiser(problem):
    grad_h, w_star = nb.implicit_hypergradient(problem)
    # w* really minimises f: the LL gradient vanishes there
    np.testing.assert_allclose(nb.ll_grad(problem, w_star, problem.h), 0.0, atol=1e-13)

    def F_at_minimiser(h):
        _, w = nb.implicit_hypergradient(problem.replace(h=h))
        return nb.ul_loss(problem, w)

    np.testing.assert_allclose(grad_h, _central_fd(F_at_minimiser, problem.h), rtol=1e-6, atol=1e-10)
    assert np.abs(grad_h).max() > 1e-3


def test_rad_approaches_implicit_geometrically(problem):
    implicit, w_star = nb.implicit_hypergradient(problem)
    Ts = [20, 40, 80, 160, 320]
    errs = np.array([np.abs(nb.exact(problem, T, LR).grad_h - implicit).max() for T in Ts])
    assert np.all(np.diff(errs) < 0), errs
    # the LL map contracts by rho = 1 - lr * lambda_min per step; the error behaves like
    # poly(T) * rho**T: its per-step decay rate approaches log(rho)
    A = problem.X_tr.T @ problem.X_tr / len(problem.y_tr) + np.diag(np.exp(problem.h))
    rho = 1 - LR * np.linalg.eigvalsh(A)[0]
    rates = np.diff(np.log(errs)) / np.diff(Ts)
    assert np.all(rates < 0.5 * np.log(rho)), (rates, np.log(rho))
    assert rates[-1] < 0.8 * np.log(rho)
    assert errs[-1] < 1e-9 and errs[0] > 1e-3
    np.testing.assert_allclose(nb.exact(problem, 320, LR).trajectory[-1], w_star, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# ptt_problem, exact_outer, conventions, bad input
# ----------------------------------------------------------------------------------------------
def test_ptt_problem_has_interior_tstar():
    p, s = nb.ptt_problem()
    T, lr = s["T"], s["lr"]
    for method in (dict(), dict(alpha=0.3, alpha_decay=0.9), dict(alpha=0.2)):
        ex = nb.exact(p, T, lr, ptt=True, **method)
        assert 1 < ex.tstar < T, (method, ex.tstar)
        assert ex.tstar == 1 + np.argmax(ex.ul_losses)
        # a clear maximum, well above both ends of the trajectory
        assert ex.ul_loss > 1.5 * max(ex.ul_losses[0], ex.ul_losses[-1])
        assert ex.ul_loss == pytest.approx(nb.ul_loss(p, ex.trajectory[ex.tstar]), rel=1e-15)
    # IAPTT-GM (PTT + initialization auxiliary): the argmax is not at T, w0's gradient is real
    iaptt = nb.exact(p, T, lr, ptt=True)
    rad = nb.exact(p, T, lr)
    assert iaptt.tstar != T and np.abs(iaptt.grad_w0 - rad.grad_w0).max() > 1e-2
    # on the generic problem F only decreases: t* = 1
    assert nb.exact(nb.ridge_problem(1), T_SMALL, LR, ptt=True).tstar == 1


@pytest.mark.parametrize("init_lr", [None, 0.3])
def test_exact_outer_policies(init_lr):
    p, s = nb.ptt_problem()
    kw = dict(ptt=True, optimizer="sgd", opt_kwargs=dict(momentum=0.5))
    warm = nb.exact_outer(p, 3, s["T"], s["lr"], 0.5, policy="warm", init_lr=init_lr, **kw)
    reset = nb.exact_outer(p, 3, s["T"], s["lr"], 0.5, policy="reset", init_lr=init_lr, **kw)
    h_warm = h_reset = p.h
    w0_reset = p.w0
    for k in range(3):
        # every solve is the exact solve at the current (h, w0)
        for res, h, w0 in ((warm[k], h_warm, warm[k].trajectory[0]), (reset[k], h_reset, w0_reset)):
            again = nb.exact(p.replace(h=h, w0=w0), s["T"], s["lr"], **kw)
            np.testing.assert_array_equal(res.grad_h, again.grad_h)
            np.testing.assert_array_equal(res.trajectory, again.trajectory)
        np.testing.assert_array_equal(reset[k].trajectory[0], w0_reset)
        if k:
            # warm: the next solve starts at the last iterate w_T, not at w_tau
            expected = warm[k - 1].trajectory[-1]
            if init_lr is not None:
                expected = expected - init_lr * warm[k - 1].grad_w0
            np.testing.assert_array_equal(warm[k].trajectory[0], expected)
            assert warm[k - 1].tstar < s["T"]
        h_warm = h_warm - 0.5 * warm[k].grad_h
        h_reset = h_reset - 0.5 * reset[k].grad_h
        if init_lr is not None:
            w0_reset = w0_reset - init_lr * reset[k].grad_w0
    # the first solve is the same in both policies, then the paths separate
    np.testing.assert_array_equal(warm[0].grad_h, reset[0].grad_h)
    assert np.abs(warm[2].grad_h - reset[2].grad_h).max() > 1e-6


def test_exact_outer_against_torch():
    """Warm start + initialization auxiliary + momentum: three outer steps in torch."""
    p, s = nb.ptt_problem(seed=3)
    kw = dict(optimizer="sgd", opt_kwargs=dict(momentum=0.5), ptt=True)
    results = nb.exact_outer(p, 3, s["T"], s["lr"], 0.4, policy="warm", init_lr=0.2, **kw)
    for res in results:
        loss, g_h, g_w0, tau, traj = torch_unroll(p, s["T"], s["lr"], **kw)
        assert tau == res.tstar
        np.testing.assert_allclose([loss, *g_h, *g_w0], [res.ul_loss, *res.grad_h, *res.grad_w0], **TOL)
        p = p.replace(h=p.h - 0.4 * g_h, w0=traj[-1] - 0.2 * g_w0)


def test_sqrt_at_zero_is_zero():
    """A feature that never moves (zero gradient, zero moments): finite, decoupled derivatives."""
    p = nb.ridge_problem(seed=1)
    i = 2
    X_tr, X_val, w0 = p.X_tr.copy(), p.X_val.copy(), p.w0.copy()
    X_tr[:, i] = X_val[:, i] = w0[i] = 0.0
    p0 = p.replace(X_tr=X_tr, X_val=X_val, w0=w0)
    keep = np.arange(p.dim) != i
    reduced = p.replace(X_tr=X_tr[:, keep], X_val=X_val[:, keep], h=p.h[keep], w0=w0[keep])
    for opt in ("adam", "qhadam"):
        kw = dict(nus=(0.7, 0.8)) if opt == "qhadam" else {}
        ex = nb.exact(p0, T_SMALL, LR, optimizer=opt, opt_kwargs=kw)
        red = nb.exact(reduced, T_SMALL, LR, optimizer=opt, opt_kwargs=kw)
        assert np.all(np.isfinite(ex.grad_h)) and np.all(np.isfinite(ex.grad_w0))
        assert ex.grad_h[i] == 0 and ex.grad_w0[i] == 0
        np.testing.assert_allclose(ex.grad_h[keep], red.grad_h, **TOL)
        np.testing.assert_allclose(ex.grad_w0[keep], red.grad_w0, **TOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(truncate_iters=2, ptt=True), "exclusive"),
    (dict(alpha=1.5), "Invalid alpha: 1.5"),
    (dict(alpha=-0.1), "Invalid alpha: -0.1"),
    (dict(truncate_iters=T_SMALL), "Invalid truncate_iters: 12"),
    (dict(optimizer="rmsprop"), "Invalid optimizer: 'rmsprop'"),
    (dict(optimizer="qhm", opt_kwargs=dict(weight_decay_type="both")), "Invalid weight_decay_type"),
])
def test_bad_input(problem, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nb.exact(problem, T_SMALL, LR, **kwargs)


def test_unknown_optimizer_argument(problem):
    with pytest.raises(TypeError, match="nesterov"):
        nb.exact(problem, T_SMALL, LR, optimizer="adam", opt_kwargs=dict(nesterov=True))
    with pytest.raises(ValueError, match="policy"):
        nb.exact_outer(problem, 1, T_SMALL, LR, 0.1, policy="cold")
