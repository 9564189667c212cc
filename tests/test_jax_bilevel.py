"""The JAX face of the bilevel ``Dynamic`` (uniopt.adapters.jax.bilevel).

Oracle: a per-feature ridge-regression problem (LL: least squares plus 1/2 sum exp(h_i) w_i^2,
UL: the validation loss) unrolled by a plain Python loop in ``jax.numpy`` with the inner
optimizers written from their own (torch / qhoptim) definitions, differentiated by one
``jax.grad`` over the whole loop; T-RAD stops the gradient of the iterate and the optimizer
state after the dropped steps, PTT picks t* in NumPy. Float64 throughout (``x64`` fixture).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from uniopt.adapters.jax import qhadam, qhm
from uniopt.adapters.jax.bilevel import Dynamic, DynamicResult, HypergradResult

TOL = 1e-10


@pytest.fixture
def x64():
    """Enable float64 in JAX for one test (restored afterwards)."""
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------
class Ridge:
    """Per-feature ridge regression: h are log-penalties, w the LL weights."""

    def __init__(self, seed=0, n_train=40, n_val=30, dim=6):
        rng = np.random.default_rng(seed)
        w_true = rng.standard_normal(dim)
        self.X_tr = rng.standard_normal((n_train, dim))
        self.y_tr = self.X_tr @ w_true + 0.5 * rng.standard_normal(n_train)
        self.X_val = rng.standard_normal((n_val, dim))
        self.y_val = self.X_val @ w_true + 0.5 * rng.standard_normal(n_val)
        self.h = 0.5 * rng.standard_normal(dim) - 1.0
        self.w0 = rng.standard_normal(dim)

    def args(self, h=None, w0=None):
        h = self.h if h is None else h
        w0 = self.w0 if w0 is None else w0
        return tuple(jnp.asarray(a) for a in (h, w0, self.X_tr, self.y_tr, self.X_val,
                                              self.y_val))


def ll_objective(state):
    w, h = state["lower_model"], state["upper_model"]
    r = state["data"] @ w - state["target"]
    return 0.5 * jnp.mean(r ** 2) + 0.5 * jnp.sum(jnp.exp(h) * w ** 2)


def ul_objective(state):
    r = state["data"] @ state["lower_model"] - state["target"]
    return 0.5 * jnp.mean(r ** 2)


def f_naive(X, y, w, h):
    return 0.5 * jnp.sum((X @ w - y) ** 2) / X.shape[0] + 0.5 * jnp.sum(jnp.exp(h) * w * w)


def F_naive(X, y, w):
    return 0.5 * jnp.sum((X @ w - y) ** 2) / X.shape[0]


# ----------------------------------------------------------------------------------------------
# The naive oracle: inner optimizers from their definitions, a Python loop, one jax.grad
# ----------------------------------------------------------------------------------------------
def naive_step(name, kw, lr, t, w, g, state):
    """One step of torch's SGD/Adam/AdamW or qhoptim's QHM/QHAdam (t is 0-based)."""
    wd = kw.get("weight_decay", 0.0)
    if name == "sgd":
        mom, nesterov = kw.get("momentum", 0.0), kw.get("nesterov", False)
        g = g + wd * w
        if mom == 0.0:
            return w - lr * g, state
        buf = g if t == 0 else mom * state["buf"] + g
        d = g + mom * buf if nesterov else buf
        return w - lr * d, {"buf": buf}
    if name in ("adam", "adamw"):
        b1, b2 = kw.get("betas", (0.9, 0.999))
        eps = kw.get("eps", 1e-8)
        if name == "adam":
            g = g + wd * w
        else:
            w = w * (1 - lr * wd)
        m = b1 * state.get("m", 0.0) + (1 - b1) * g
        v = b2 * state.get("v", 0.0) + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        return w - lr * m_hat / (jnp.sqrt(v_hat) + eps), {"m": m, "v": v}
    if name == "qhm":
        mom, nu = kw["momentum"], kw["nu"]
        g = g + wd * w
        buf = mom * state.get("buf", 0.0) + (1 - mom) * g
        return w - lr * ((1 - nu) * g + nu * buf), {"buf": buf}
    if name == "qhadam":
        b1, b2 = kw.get("betas", (0.9, 0.999))
        nu1, nu2 = kw.get("nus", (1.0, 1.0))
        eps = kw.get("eps", 1e-8)
        decoupled = kw.get("decouple_weight_decay", False)
        if not decoupled:
            g = g + wd * w
        m = b1 * state.get("m", 0.0) + (1 - b1) * g      # raw (not bias-corrected) moments
        v = b2 * state.get("v", 0.0) + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        d = (nu1 * m_hat + (1 - nu1) * g) / (jnp.sqrt(nu2 * v_hat + (1 - nu2) * g * g) + eps)
        w_new = w - lr * d
        if decoupled:
            w_new = w_new - lr * wd * w
        return w_new, {"m": m, "v": v}
    raise AssertionError(name)


def reference(p, T, lr, *, optimizer="sgd", opt_kwargs=None, truncate_iters=0, alpha=0.0,
              alpha_decay=1.0, ptt=False, h=None, w0=None):
    """(ul_loss, grad_h, grad_w0, tstar, ul_losses, trajectory) by a naive unrolled jax.grad."""
    kw = opt_kwargs or {}
    h = jnp.asarray(p.h if h is None else h)
    w0 = jnp.asarray(p.w0 if w0 is None else w0)
    Xt, yt, Xv, yv = (jnp.asarray(a) for a in (p.X_tr, p.y_tr, p.X_val, p.y_val))

    def run(h, w0, stop_at=None):
        w, state, traj = w0, {}, [w0]
        for t in range(T):
            if t == truncate_iters and truncate_iters > 0:
                w = jax.lax.stop_gradient(w)
                state = jax.tree.map(jax.lax.stop_gradient, state)
            hh = jax.lax.stop_gradient(h) if t < truncate_iters else h
            a = alpha * alpha_decay ** t
            g = jax.grad(lambda w: (1 - a) * f_naive(Xt, yt, w, hh) + a * F_naive(Xv, yv, w))(w)
            w, state = naive_step(optimizer, kw, lr, t, w, g, state)
            traj.append(w)
        return traj

    traj = run(h, w0)
    losses = np.array([float(F_naive(Xv, yv, w)) for w in traj[1:]])
    tstar = int(np.argmax(losses)) + 1 if ptt else T

    def chosen(h, w0):
        return F_naive(Xv, yv, run(h, w0)[tstar])

    value, (gh, gw0) = jax.value_and_grad(chosen, (0, 1))(h, w0)
    return (float(value), np.asarray(gh), np.asarray(gw0), tstar, losses,
            np.stack([np.asarray(w) for w in traj]))


def make_opt(name, lr, kw=None):
    """The optax transformation equivalent to ``naive_step(name, kw, lr, ...)``."""
    kw = dict(kw or {})
    wd = kw.pop("weight_decay", 0.0)
    if name == "sgd":
        inner = optax.sgd(lr, momentum=kw.get("momentum") or None,
                          nesterov=kw.get("nesterov", False))
        return optax.chain(optax.add_decayed_weights(wd), inner) if wd else inner
    if name == "adam":
        b1, b2 = kw.get("betas", (0.9, 0.999))
        inner = optax.adam(lr, b1=b1, b2=b2, eps=kw.get("eps", 1e-8))
        return optax.chain(optax.add_decayed_weights(wd), inner) if wd else inner
    if name == "adamw":
        b1, b2 = kw.get("betas", (0.9, 0.999))
        return optax.adamw(lr, b1=b1, b2=b2, eps=kw.get("eps", 1e-8), weight_decay=wd)
    if name == "qhm":
        return qhm(lr, momentum=kw["momentum"], nu=kw["nu"], weight_decay=wd)
    if name == "qhadam":
        return qhadam(lr, betas=kw.get("betas", (0.9, 0.999)), nus=kw.get("nus", (1.0, 1.0)),
                      eps=kw.get("eps", 1e-8), weight_decay=wd,
                      decouple_weight_decay=kw.get("decouple_weight_decay", False))
    raise AssertionError(name)


def dynamic(name="sgd", lr=0.1, kw=None, T=10, **options):
    return Dynamic(ll_objective, T, ul_objective, ll_opt=make_opt(name, lr, kw), **options)


def _bda_losses(p, T, lr, alpha, alpha_decay):
    """F(w_1) .. F(w_T) of plain-SGD BDA in NumPy (only to search for a PTT problem)."""
    w, out = p.w0.copy(), []
    for t in range(T):
        a = alpha * alpha_decay ** t
        gf = p.X_tr.T @ (p.X_tr @ w - p.y_tr) / len(p.y_tr) + np.exp(p.h) * w
        gF = p.X_val.T @ (p.X_val @ w - p.y_val) / len(p.y_val)
        w = w - lr * ((1 - a) * gf + a * gF)
        out.append(0.5 * np.mean((p.X_val @ w - p.y_val) ** 2))
    return np.array(out)


PTT_T, PTT_LR = 12, 0.3
PTT_ALPHA, PTT_DECAY = 0.2, 0.5  # BDA+PTT


def ptt_problem(alpha, alpha_decay):
    """A problem with an interior PTT index (1 < t* < T) for SGD-BDA with this alpha.

    Construction: w0 = w* + e0 around the LL minimiser w*, with e0 along the fastest and the
    slowest Hessian eigenvectors, signed so that the linear term of F along the path,
    grad F(w*) . e_t = -a r_f^t + b r_s^t (r_f < r_s), first rises, then decays. A small search
    over seeds and (a, b) (NumPy only) picks the first that works; the tests assert against
    the oracle that t* is interior.
    """
    for seed in range(20):
        for a, b in ((0.2, 0.1), (0.05, 0.02), (0.3, 0.1), (0.1, 0.05)):
            p = Ridge(seed)
            H = p.X_tr.T @ p.X_tr / len(p.y_tr) + np.diag(np.exp(p.h))
            w_star = np.linalg.solve(H, p.X_tr.T @ p.y_tr / len(p.y_tr))
            g = p.X_val.T @ (p.X_val @ w_star - p.y_val) / len(p.y_val)
            u = np.linalg.eigh(H)[1]
            u_fast, u_slow = u[:, -1], u[:, 0]
            p.w0 = (w_star - a * np.sign(g @ u_fast) * u_fast
                    + b * np.sign(g @ u_slow) * u_slow)
            if 0 < np.argmax(_bda_losses(p, PTT_T, PTT_LR, alpha, alpha_decay)) < PTT_T - 1:
                return p
    raise AssertionError("no PTT problem with an interior t*")


@pytest.fixture(scope="module")
def problems():
    with jax.enable_x64(True):
        return {"ridge": Ridge(0), "ptt": ptt_problem(0.0, 1.0),
                "ptt-bda": ptt_problem(PTT_ALPHA, PTT_DECAY)}


def assert_matches(out, ref, *, init_aux=False, tol=TOL):
    ul_loss, gh, gw0, tstar, losses, _ = ref
    assert int(out.tstar) == tstar
    np.testing.assert_allclose(float(out.ul_loss), ul_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(out.ul_grad), gh, rtol=tol, atol=tol)
    assert np.abs(gh).max() > 1e-6  # a non-trivial hypergradient
    if init_aux:
        np.testing.assert_allclose(np.asarray(out.ll_init_grad), gw0, rtol=tol, atol=tol)
    else:
        assert out.ll_init_grad is None


# ----------------------------------------------------------------------------------------------
# Hypergradients per method
# ----------------------------------------------------------------------------------------------
METHODS = {
    "RAD": ({}, {}),
    "T-RAD k=1": (dict(truncate_iters=1), dict(truncate_iters=1)),
    "T-RAD k=4": (dict(truncate_iters=4), dict(truncate_iters=4)),
    "T-RAD k=9": (dict(truncate_iters=9), dict(truncate_iters=9)),
    "BDA": (dict(alpha=0.4, alpha_decay=0.8), dict(alpha=0.4, alpha_decay=0.8)),
    "RAD+init_aux": (dict(init_aux=True), {}),
    "T-RAD+BDA+init_aux": (dict(truncate_iters=3, alpha=0.3, alpha_decay=0.9, init_aux=True),
                           dict(truncate_iters=3, alpha=0.3, alpha_decay=0.9)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_hypergradient_matches_unrolled_oracle(method, problems, x64):
    options, ref_kw = METHODS[method]
    p = problems["ridge"]
    dyn = dynamic(T=10, lr=0.1, **options)
    out = jax.jit(dyn.hypergrad)(*p.args())
    ref = reference(p, 10, 0.1, **ref_kw)
    assert_matches(out, ref, init_aux=options.get("init_aux", False))
    if options.get("truncate_iters") and options.get("init_aux"):
        assert np.all(np.asarray(out.ll_init_grad) == 0.0)  # the truncation cuts w0 off


PTT_METHODS = {
    "PTT": (dict(acquire_max_loss=True), dict(ptt=True)),
    "BDA+PTT": (dict(acquire_max_loss=True, alpha=PTT_ALPHA, alpha_decay=PTT_DECAY),
                dict(ptt=True, alpha=PTT_ALPHA, alpha_decay=PTT_DECAY)),
    "IAPTT-GM": (dict(acquire_max_loss=True, init_aux=True), dict(ptt=True)),
}


@pytest.mark.parametrize("method", list(PTT_METHODS))
def test_ptt_interior_tstar_matches_unrolled_oracle(method, problems, x64):
    options, ref_kw = PTT_METHODS[method]
    p = problems["ptt-bda" if options.get("alpha") else "ptt"]
    dyn = dynamic(T=PTT_T, lr=PTT_LR, **options)
    out = jax.jit(dyn.hypergrad)(*p.args())
    ref = reference(p, PTT_T, PTT_LR, **ref_kw)
    assert 1 < ref[3] < PTT_T
    assert_matches(out, ref, init_aux=options.get("init_aux", False))
    np.testing.assert_allclose(np.asarray(out.ul_losses), ref[4], rtol=TOL, atol=TOL)
    # optimize: the same t*, the trajectory, and jax.grad through result.params
    res = jax.jit(dyn.optimize)(*p.args())
    assert isinstance(res, DynamicResult) and int(res.tstar) == ref[3]
    np.testing.assert_allclose(np.asarray(res.trajectory), ref[5], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(res.params), ref[5][ref[3]], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(res.last), ref[5][-1], rtol=TOL, atol=TOL)
    h, w0, X, y, Xv, yv = p.args()
    g = jax.grad(lambda h: F_naive(Xv, yv, dyn.optimize(h, w0, X, y, Xv, yv).params))(h)
    np.testing.assert_allclose(np.asarray(g), ref[1], rtol=TOL, atol=TOL)


OPTIMIZERS = {
    "sgd": ("sgd", 0.1, {}),
    "sgd momentum+wd": ("sgd", 0.05, dict(momentum=0.9, weight_decay=0.01)),
    "sgd nesterov": ("sgd", 0.05, dict(momentum=0.8, nesterov=True)),
    "adam": ("adam", 0.05, dict(betas=(0.8, 0.99))),
    "adam wd": ("adam", 0.05, dict(weight_decay=0.1)),
    "adamw": ("adamw", 0.05, dict(betas=(0.85, 0.995), weight_decay=0.05)),
    "qhm": ("qhm", 0.2, dict(momentum=0.9, nu=0.7, weight_decay=0.01)),
    "qhadam": ("qhadam", 0.05, dict(betas=(0.9, 0.99), nus=(0.7, 0.9))),
    "qhadamw": ("qhadam", 0.05, dict(nus=(0.8, 1.0), weight_decay=0.1,
                                     decouple_weight_decay=True)),
}


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_inner_optimizers_match_their_definitions(case, problems, x64):
    """IAPTT-GM-free RAD with init_aux through each inner optimizer (optax's and uniopt's)."""
    name, lr, kw = OPTIMIZERS[case]
    p = problems["ridge"]
    dyn = dynamic(name, lr, kw, T=8, init_aux=True)
    out = jax.jit(dyn.hypergrad)(*p.args())
    assert_matches(out, reference(p, 8, lr, optimizer=name, opt_kwargs=kw), init_aux=True)


def test_trad_with_adam_stops_the_optimizer_state_too(problems, x64):
    """Adam's moments carry h-dependence out of the dropped steps unless they are stopped."""
    p = problems["ridge"]
    kw = dict(betas=(0.5, 0.9))
    dyn = dynamic("adam", 0.05, kw, T=8, truncate_iters=3)
    out = jax.jit(dyn.hypergrad)(*p.args())
    assert_matches(out, reference(p, 8, 0.05, optimizer="adam", opt_kwargs=kw,
                                  truncate_iters=3))


# ----------------------------------------------------------------------------------------------
# Outer loops: reset and warm start
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["reset", "warm"])
@pytest.mark.parametrize("init_lr", [None, 0.3])
def test_outer_loop_reset_and_warm_start(policy, init_lr, problems, x64):
    p = problems["ridge"]
    T, lr, ul_lr = 6, 0.1, 0.5
    dyn = dynamic(T=T, lr=lr, init_aux=init_lr is not None, warm_start=policy == "warm")
    step = jax.jit(dyn.hypergrad)
    h, w0 = p.h.copy(), p.w0.copy()
    rh, rw0 = p.h.copy(), p.w0.copy()
    for _ in range(3):
        out = step(*p.args(h, w0))
        ref = reference(p, T, lr, h=rh, w0=rw0)
        assert_matches(out, ref, init_aux=init_lr is not None)
        h = np.asarray(h - ul_lr * out.ul_grad)
        w0 = np.asarray(out.ll_params)
        if init_lr is not None:
            w0 = w0 - init_lr * np.asarray(out.ll_init_grad)
        rh = rh - ul_lr * ref[1]
        rw0 = ref[5][-1] if policy == "warm" else rw0
        if init_lr is not None:
            rw0 = rw0 - init_lr * ref[2]
        np.testing.assert_allclose(w0, rw0, rtol=TOL, atol=TOL)
    if policy == "reset" and init_lr is None:
        np.testing.assert_array_equal(w0, p.w0)
    else:
        assert not np.allclose(w0, p.w0)


# ----------------------------------------------------------------------------------------------
# jit, checkpoint, vmap
# ----------------------------------------------------------------------------------------------
JIT_CASES = {
    "RAD": dict(init_aux=True),
    "T-RAD adam": dict(truncate_iters=2, name="adam", lr=0.05),
    "IAPTT-GM BDA": dict(acquire_max_loss=True, init_aux=True, alpha=PTT_ALPHA,
                         alpha_decay=PTT_DECAY,
                         lr=PTT_LR, T=PTT_T),
}


def _close_trees(a, b, tol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)
    assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b))


@pytest.mark.parametrize("case", list(JIT_CASES))
def test_jit_and_checkpoint_give_the_same_numbers_as_eager(case, problems, x64):
    options = dict(JIT_CASES[case])
    p = problems["ptt-bda" if options.get("acquire_max_loss") else "ridge"]
    name, lr, T = options.pop("name", "sgd"), options.pop("lr", 0.1), options.pop("T", 8)
    eager = dynamic(name, lr, T=T, **options).hypergrad(*p.args())
    assert isinstance(eager, HypergradResult)
    jitted = jax.jit(dynamic(name, lr, T=T, **options).hypergrad)(*p.args())
    ckpt = jax.jit(dynamic(name, lr, T=T, checkpoint=True, **options).hypergrad)(*p.args())
    _close_trees(eager, jitted)
    _close_trees(eager, ckpt)
    assert int(eager.tstar) == int(ckpt.tstar)


def test_checkpoint_is_in_the_compiled_program(problems, x64):
    """checkpoint=True puts a remat (checkpoint) in the jaxpr of the gradient."""
    p = problems["ridge"]
    plain = str(jax.make_jaxpr(dynamic(T=4).hypergrad)(*p.args()))
    ckpt = str(jax.make_jaxpr(dynamic(T=4, checkpoint=True).hypergrad)(*p.args()))
    assert "checkpoint" not in plain and "remat" not in plain
    assert "checkpoint" in ckpt or "remat" in ckpt


def test_vmap_over_a_batch_of_ul_params(problems, x64):
    p = problems["ptt"]
    dyn = dynamic(T=PTT_T, lr=PTT_LR, acquire_max_loss=True, init_aux=True)
    hs = np.stack([p.h, p.h + 0.3, p.h - 0.4])
    h, w0, X, y, Xv, yv = p.args()
    out = jax.jit(jax.vmap(dyn.hypergrad, in_axes=(0, None, None, None, None, None)))(
        jnp.asarray(hs), w0, X, y, Xv, yv)
    assert out.ul_grad.shape == hs.shape
    tstars = set()
    for i in range(len(hs)):
        ref = reference(p, PTT_T, PTT_LR, ptt=True, h=hs[i])
        tstars.add(ref[3])
        np.testing.assert_allclose(np.asarray(out.ul_grad[i]), ref[1], rtol=TOL, atol=TOL)
        np.testing.assert_allclose(np.asarray(out.ll_init_grad[i]), ref[2], rtol=TOL, atol=TOL)
        assert int(out.tstar[i]) == ref[3]


def test_pytree_params_and_float32(x64):
    """Dict pytrees for both levels; float32 parameters stay float32."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((16, 3)), rng.standard_normal(16)

    def ll(s):
        w = s["lower_model"]
        pred = s["data"] @ w["a"] + w["b"]
        return jnp.mean((pred - s["target"]) ** 2) + s["upper_model"]["lam"] * jnp.sum(w["a"] ** 2)

    def ul(s):
        w = s["lower_model"]
        return jnp.mean((s["data"] @ w["a"] + w["b"] - s["target"]) ** 2) + 0.0 * s["upper_model"]["lam"]

    for dtype in (np.float64, np.float32):
        ulp = {"lam": jnp.asarray(0.3, dtype)}
        llp = {"a": jnp.zeros(3, dtype), "b": jnp.asarray(0.0, dtype)}
        args = (ulp, llp, jnp.asarray(X, dtype), jnp.asarray(y, dtype), jnp.asarray(X, dtype),
                jnp.asarray(y, dtype))
        dyn = Dynamic(ll, 5, ul, ll_opt=optax.sgd(0.1), init_aux=True, warm_start=True)
        out = jax.jit(dyn.hypergrad)(*args)
        assert out.ul_grad["lam"].dtype == dtype and out.ll_params["a"].dtype == dtype

        def direct(lam, w0):
            w = w0
            for _ in range(5):
                g = jax.grad(lambda w: ll({"data": args[2], "target": args[3],
                                           "upper_model": {"lam": lam}, "lower_model": w}))(w)
                w = jax.tree.map(lambda p, q: p - 0.1 * q, w, g)
            return ul({"data": args[4], "target": args[5], "upper_model": {"lam": lam},
                       "lower_model": w})

        g_lam, g_w0 = jax.grad(direct, (0, 1))(ulp["lam"], llp)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(float(out.ul_grad["lam"]), float(g_lam), rtol=tol, atol=tol)
        _close_trees(out.ll_init_grad, g_w0, tol)
        assert abs(float(g_lam)) > 1e-4


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
SGD = optax.sgd(0.1)
BAD = [
    (dict(truncate_iters=2, acquire_max_loss=True), ValueError, "Invalid truncate_iters: 2 with acquire_max_loss=True"),
    (dict(alpha=-0.1), ValueError, "Invalid alpha: -0.1"),
    (dict(alpha=1.5), ValueError, "Invalid alpha: 1.5"),
    (dict(alpha=float("nan")), ValueError, "Invalid alpha: nan"),
    (dict(alpha="0.5"), TypeError, "Invalid alpha: '0.5'"),
    (dict(alpha_decay=0.0), ValueError, "Invalid alpha_decay: 0.0"),
    (dict(alpha_decay=1.2), ValueError, "Invalid alpha_decay: 1.2"),
    (dict(truncate_iters=-1), ValueError, "Invalid truncate_iters: -1"),
    (dict(truncate_iters=5), ValueError, "Invalid truncate_iters: 5 (must be < lower_loop = 5)"),
    (dict(truncate_iters=1.5), TypeError, "Invalid truncate_iters: 1.5"),
    (dict(lower_loop=0), ValueError, "Invalid lower_loop: 0"),
    (dict(lower_loop=True), TypeError, "Invalid lower_loop: True"),
    (dict(ll_objective=3), TypeError, "Invalid ll_objective: 3"),
    (dict(ul_objective=None), TypeError, "Invalid ul_objective: None"),
    (dict(ll_opt=None), TypeError, "Invalid ll_opt: None"),
    (dict(ll_opt=optax.sgd), TypeError, "Invalid ll_opt: <function sgd"),
    (dict(acquire_max_loss=1), TypeError, "Invalid acquire_max_loss: 1"),
    (dict(init_aux="yes"), TypeError, "Invalid init_aux: 'yes'"),
    (dict(warm_start=None), TypeError, "Invalid warm_start: None"),
    (dict(checkpoint=0), TypeError, "Invalid checkpoint: 0"),
]


@pytest.mark.parametrize("bad,error,message", BAD, ids=[m for _, _, m in BAD])
def test_construction_errors(bad, error, message):
    kwargs = dict(ll_objective=ll_objective, lower_loop=5, ul_objective=ul_objective, ll_opt=SGD)
    kwargs.update(bad)
    with pytest.raises(error, match=re.escape(message)):
        Dynamic(**kwargs)


@pytest.mark.parametrize("options", [dict(alpha=0.5), dict(acquire_max_loss=True)])
def test_bda_and_ptt_need_validation_data(options, problems, x64):
    p = problems["ridge"]
    dyn = dynamic(T=3, **options)
    h, w0, X, y, Xv, yv = p.args()
    for method in (dyn.hypergrad, dyn.optimize):
        with pytest.raises(ValueError, match="needs val_data and val_target"):
            method(h, w0, X, y)
        with pytest.raises(ValueError, match="needs val_data and val_target"):
            method(h, w0, X, y, Xv, None)


def test_valid_edge_values_construct():
    Dynamic(ll_objective, 1, ul_objective, alpha=1.0, alpha_decay=1.0, ll_opt=SGD)
    Dynamic(ll_objective, 5, ul_objective, truncate_iters=4, alpha=0.0, ll_opt=SGD)
    Dynamic(ll_objective, 5, ul_objective, ll_opt=optax.chain(optax.add_decayed_weights(0.1), SGD))
