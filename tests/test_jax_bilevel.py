"""The JAX face of the bilevel ``Dynamic`` (uniopt.adapters.jax.bilevel).

Oracle: ``refimpl.naive_bilevel`` (Contract 1): the per-feature ridge-regression problem (LL:
least squares plus 1/2 sum exp(h_i) w_i^2, UL: the validation loss), its exact hypergradients
by a forward-mode recursion of the unrolled dynamics in NumPy (``exact``), and outer loops
under the reset and warm-start policies (``exact_outer``). The inner optimizers there are
written from torch's / uniopt's definitions; here they are optax's transformations (and
uniopt's ``qhm``/``qhadam``) with the matching conventions (``make_opt``). Float64 throughout
(``x64`` fixture).
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
from refimpl import naive_bilevel as nb

TOL = 1e-10


# ----------------------------------------------------------------------------------------------
# The problem, the objectives as the face sees them, the optax optimizers
# ----------------------------------------------------------------------------------------------
def args(p, h=None, w0=None):
    """``(ul_params, ll_params, data, target, val_data, val_target)`` of a RidgeProblem."""
    h = p.h if h is None else h
    w0 = p.w0 if w0 is None else w0
    return tuple(jnp.asarray(a) for a in (h, w0, p.X_tr, p.y_tr, p.X_val, p.y_val))


def ll_objective(state):
    w, h = state["lower_model"], state["upper_model"]
    r = state["data"] @ w - state["target"]
    return 0.5 * jnp.mean(r ** 2) + 0.5 * jnp.sum(jnp.exp(h) * w ** 2)


def ul_objective(state):
    r = state["data"] @ state["lower_model"] - state["target"]
    return 0.5 * jnp.mean(r ** 2)


def make_opt(name, lr, kw=None):
    """The optax transformation with the conventions of ``nb.exact(optimizer=name, ...)``.

    torch's SGD weight decay and Adam's coupled decay add ``wd * w`` to the gradient first
    (``optax.add_decayed_weights`` before the rule); optax.adamw's decoupled decay
    ``lr * (d + wd * w)`` is torch AdamW's ``w (1 - lr wd) - lr d``.
    """
    kw = dict(kw or {})
    wd = kw.pop("weight_decay", 0.0)
    decay = [optax.add_decayed_weights(wd)] if wd else []
    if name == "sgd":
        return optax.chain(*decay, optax.sgd(lr, momentum=kw.get("momentum") or None,
                                             nesterov=kw.get("nesterov", False)))
    if name == "adam":
        b1, b2 = kw.get("betas", (0.9, 0.999))
        return optax.chain(*decay, optax.adam(lr, b1=b1, b2=b2, eps=kw.get("eps", 1e-8)))
    if name == "adamw":
        b1, b2 = kw.get("betas", (0.9, 0.999))
        return optax.adamw(lr, b1=b1, b2=b2, eps=kw.get("eps", 1e-8), weight_decay=wd)
    if name == "qhm":
        return qhm(lr, momentum=kw["momentum"], nu=kw["nu"], weight_decay=wd,
                   weight_decay_type=kw.get("weight_decay_type", "grad"))
    if name == "qhadam":
        return qhadam(lr, betas=kw.get("betas", (0.9, 0.999)), nus=kw.get("nus", (1.0, 1.0)),
                      eps=kw.get("eps", 1e-8), weight_decay=wd,
                      decouple_weight_decay=kw.get("decouple_weight_decay", False))
    raise AssertionError(name)


def dynamic(name="sgd", lr=0.1, kw=None, T=10, **options):
    return Dynamic(ll_objective, T, ul_objective, ll_opt=make_opt(name, lr, kw), **options)


PTT_PROBLEM, PTT_SETTINGS = nb.ptt_problem()
PTT_T, PTT_LR = PTT_SETTINGS["T"], PTT_SETTINGS["lr"]
PTT_ALPHA, PTT_DECAY = 0.3, 0.9  # BDA+PTT (interior t* on ptt_problem, as the oracle's tests)


@pytest.fixture(scope="module")
def problems():
    return {"ridge": nb.ridge_problem(0), "ptt": PTT_PROBLEM}


def assert_matches(out, ref, *, init_aux=False, tol=TOL):
    ul_loss, gh, gw0, tstar = ref.ul_loss, ref.grad_h, ref.grad_w0, ref.tstar
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
    out = jax.jit(dyn.hypergrad)(*args(p))
    ref = nb.exact(p, 10, 0.1, **ref_kw)
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
    p = problems["ptt"]
    dyn = dynamic(T=PTT_T, lr=PTT_LR, **options)
    out = jax.jit(dyn.hypergrad)(*args(p))
    ref = nb.exact(p, PTT_T, PTT_LR, **ref_kw)
    assert 1 < ref.tstar < PTT_T
    assert_matches(out, ref, init_aux=options.get("init_aux", False))
    np.testing.assert_allclose(np.asarray(out.ul_losses), ref.ul_losses, rtol=TOL, atol=TOL)
    # optimize: the same t*, the trajectory, and jax.grad through result.params
    res = jax.jit(dyn.optimize)(*args(p))
    assert isinstance(res, DynamicResult) and int(res.tstar) == ref.tstar
    np.testing.assert_allclose(np.asarray(res.trajectory), ref.trajectory, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(res.params), ref.trajectory[ref.tstar], rtol=TOL,
                               atol=TOL)
    np.testing.assert_allclose(np.asarray(res.last), ref.trajectory[-1], rtol=TOL, atol=TOL)
    h, w0, X, y, Xv, yv = args(p)

    def chosen_ul_loss(h):
        w = dyn.optimize(h, w0, X, y, Xv, yv).params
        return ul_objective({"data": Xv, "target": yv, "upper_model": h, "lower_model": w})

    g = jax.jit(jax.grad(chosen_ul_loss))(h)
    np.testing.assert_allclose(np.asarray(g), ref.grad_h, rtol=TOL, atol=TOL)


OPTIMIZERS = {
    "sgd": ("sgd", 0.1, {}),
    "sgd momentum+wd": ("sgd", 0.05, dict(momentum=0.9, weight_decay=0.01)),
    "sgd nesterov": ("sgd", 0.05, dict(momentum=0.8, nesterov=True)),
    "adam": ("adam", 0.05, dict(betas=(0.8, 0.99))),
    "adam wd": ("adam", 0.05, dict(weight_decay=0.1)),
    "adamw": ("adamw", 0.05, dict(betas=(0.85, 0.995), weight_decay=0.05)),
    "qhm": ("qhm", 0.2, dict(momentum=0.9, nu=0.7, weight_decay=0.01)),
    "qhm direct decay": ("qhm", 0.2, dict(momentum=0.5, nu=0.8, weight_decay=0.1,
                                          weight_decay_type="direct")),
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
    out = jax.jit(dyn.hypergrad)(*args(p))
    assert_matches(out, nb.exact(p, 8, lr, optimizer=name, opt_kwargs=kw), init_aux=True)


def test_trad_with_adam_stops_the_optimizer_state_too(problems, x64):
    """Adam's moments carry h-dependence out of the dropped steps unless they are stopped."""
    p = problems["ridge"]
    kw = dict(betas=(0.5, 0.9))
    dyn = dynamic("adam", 0.05, kw, T=8, truncate_iters=3)
    out = jax.jit(dyn.hypergrad)(*args(p))
    assert_matches(out, nb.exact(p, 8, 0.05, optimizer="adam", opt_kwargs=kw,
                                  truncate_iters=3))


def test_rad_approaches_the_implicit_hypergradient_as_T_grows(problems, x64):
    """RAD's bias against the implicit-function hypergradient (closed form at the exact LL
    minimiser) is of order T rho^T for this strongly convex quadratic LL problem, with
    rho = 1 - lr * lambda_min(A + diag e^h): w_T's error is O(rho^T) and the tail of the
    Neumann series of the adjoint is O(T rho^T)."""
    p = problems["ridge"]
    lr = 0.3
    implicit, _ = nb.implicit_hypergradient(p)
    A = p.X_tr.T @ p.X_tr / len(p.y_tr) + np.diag(np.exp(p.h))
    rho = 1 - lr * np.linalg.eigvalsh(A).min()
    assert 0 < rho < 1
    errors = []
    for T in (25, 50, 100):
        out = jax.jit(dynamic(T=T, lr=lr).hypergrad)(*args(p))
        err = np.abs(np.asarray(out.ul_grad) - implicit).max() / np.abs(implicit).max()
        assert err <= T * rho ** T + 1e-12
        errors.append(err)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-12


# ----------------------------------------------------------------------------------------------
# Outer loops: reset and warm start
# ----------------------------------------------------------------------------------------------
OUTER_CASES = {
    "reset sgd": ("reset", None, "sgd", 0.1, {}, {}),
    "warm sgd": ("warm", None, "sgd", 0.1, {}, {}),
    "reset momentum init_aux": ("reset", 0.3, "sgd", 0.05, dict(momentum=0.9), {}),
    "warm adam init_aux": ("warm", 0.3, "adam", 0.05, dict(betas=(0.8, 0.99)), {}),
    "warm momentum T-RAD": ("warm", None, "sgd", 0.05, dict(momentum=0.9),
                            dict(truncate_iters=2)),
    "warm IAPTT-GM": ("warm", 0.3, "sgd", None, {}, dict(ptt=True)),
}


@pytest.mark.parametrize("case", list(OUTER_CASES))
def test_outer_loop_reset_and_warm_start_match_exact_outer(case, problems, x64):
    """Three outer steps: h -= ul_lr * ul_grad; w0 <- ll_params (w_T when warm, not w_tau),
    then w0 -= init_lr * ll_init_grad with the initialization auxiliary."""
    policy, init_lr, name, lr, kw, method = OUTER_CASES[case]
    ptt = method.get("ptt", False)
    p = problems["ptt" if ptt else "ridge"]
    T, lr = (PTT_T, PTT_LR) if ptt else (6, lr)
    ul_lr = 0.5
    dyn = dynamic(name, lr, kw, T=T, init_aux=init_lr is not None,
                  warm_start=policy == "warm", acquire_max_loss=ptt,
                  truncate_iters=method.get("truncate_iters", 0))
    refs = nb.exact_outer(p, 3, T, lr, ul_lr, policy=policy, init_lr=init_lr, optimizer=name,
                          opt_kwargs=kw, **method)
    step = jax.jit(dyn.hypergrad)
    h, w0 = p.h, p.w0
    for ref in refs:
        np.testing.assert_allclose(np.asarray(w0), ref.trajectory[0], rtol=TOL, atol=TOL)
        out = step(*args(p, h, w0))
        assert_matches(out, ref, init_aux=init_lr is not None)
        h = h - ul_lr * np.asarray(out.ul_grad)
        w0 = np.asarray(out.ll_params)
        if policy == "warm":
            np.testing.assert_allclose(w0, ref.trajectory[-1], rtol=TOL, atol=TOL)
        if init_lr is not None:
            w0 = w0 - init_lr * np.asarray(out.ll_init_grad)
    if policy == "reset" and init_lr is None:
        np.testing.assert_array_equal(w0, p.w0)
    else:
        assert not np.allclose(w0, p.w0)
    if ptt:
        assert any(ref.tstar < T for ref in refs)  # w_T, not w_tau, is carried over


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
    p = problems["ptt" if options.get("acquire_max_loss") else "ridge"]
    name, lr, T = options.pop("name", "sgd"), options.pop("lr", 0.1), options.pop("T", 8)
    eager = dynamic(name, lr, T=T, **options).hypergrad(*args(p))
    assert isinstance(eager, HypergradResult)
    jitted = jax.jit(dynamic(name, lr, T=T, **options).hypergrad)(*args(p))
    ckpt = jax.jit(dynamic(name, lr, T=T, checkpoint=True, **options).hypergrad)(*args(p))
    _close_trees(eager, jitted)
    _close_trees(eager, ckpt)
    assert int(eager.tstar) == int(ckpt.tstar)


def test_checkpoint_is_in_the_compiled_program(problems, x64):
    """checkpoint=True puts a remat (checkpoint) in the jaxpr of the gradient."""
    p = problems["ridge"]
    plain = str(jax.make_jaxpr(dynamic(T=4).hypergrad)(*args(p)))
    ckpt = str(jax.make_jaxpr(dynamic(T=4, checkpoint=True).hypergrad)(*args(p)))
    assert "checkpoint" not in plain and "remat" not in plain
    assert "checkpoint" in ckpt or "remat" in ckpt


def test_vmap_over_a_batch_of_ul_params(problems, x64):
    p = problems["ptt"]
    dyn = dynamic(T=PTT_T, lr=PTT_LR, acquire_max_loss=True, init_aux=True)
    hs = np.stack([p.h, p.h + 0.3, p.h - 0.4])
    h, w0, X, y, Xv, yv = args(p)
    out = jax.jit(jax.vmap(dyn.hypergrad, in_axes=(0, None, None, None, None, None)))(
        jnp.asarray(hs), w0, X, y, Xv, yv)
    assert out.ul_grad.shape == hs.shape
    for i in range(len(hs)):
        ref = nb.exact(p.replace(h=hs[i]), PTT_T, PTT_LR, ptt=True)
        assert_matches(jax.tree.map(lambda a: a[i], out), ref, init_aux=True)


@pytest.mark.parametrize("opt", [optax.adam(0.1), qhadam(0.1, nus=(0.7, 0.9))],
                         ids=["optax.adam", "uniopt.qhadam"])
def test_exact_zero_gradient_entries_give_finite_hypergradients(opt, x64):
    """w[1] never enters the LL loss: its gradient (a constant 0) and Adam moments stay exactly
    0, w[1] stays put, so dF/dw0[1] = 2 w0[1] for F = w[0]^2 + w[1]^2 (finite)."""
    def ll(s):
        return (s["lower_model"][0] - s["upper_model"]) ** 2

    def ul(s):
        return s["lower_model"][0] ** 2 + s["lower_model"][1] ** 2

    out = Dynamic(ll, 3, ul, ll_opt=opt, init_aux=True).hypergrad(
        jnp.asarray(0.5), jnp.array([0.0, 1.5]), None, None)
    assert np.isfinite(float(out.ul_grad)) and float(out.ul_grad) != 0.0
    assert np.all(np.isfinite(np.asarray(out.ll_init_grad)))
    assert float(out.ll_init_grad[1]) == 3.0


def test_qhadam_sqrt_at_zero_is_finite(x64):
    """w[1] is held at exactly 0 by the penalty h * w[1]^2: its gradient 2 h w[1] is 0 at every
    step but depends on (h, w0). Adam-type steps divide by sqrt(v) + eps with v == 0 there."""
    def ll(s):
        w, h = s["lower_model"], s["upper_model"]
        return (w[0] - h) ** 2 + h * w[1] ** 2

    def ul(s):
        return s["lower_model"][0] ** 2 + (s["lower_model"][1] - 1.0) ** 2

    out = Dynamic(ll, 3, ul, ll_opt=qhadam(0.1, nus=(0.7, 0.9)), init_aux=True).hypergrad(
        jnp.asarray(0.5), jnp.array([0.0, 0.0]), None, None)
    assert np.isfinite(float(out.ul_grad))
    assert np.all(np.isfinite(np.asarray(out.ll_init_grad)))


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

        g_lam, g_w0 = jax.jit(jax.grad(direct, (0, 1)))(ulp["lam"], llp)
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
    h, w0, X, y, Xv, yv = args(p)
    for method in (dyn.hypergrad, dyn.optimize):
        with pytest.raises(ValueError, match="needs val_data and val_target"):
            method(h, w0, X, y)
        with pytest.raises(ValueError, match="needs val_data and val_target"):
            method(h, w0, X, y, Xv, None)


def test_valid_edge_values_construct():
    Dynamic(ll_objective, 1, ul_objective, alpha=1.0, alpha_decay=1.0, ll_opt=SGD)
    Dynamic(ll_objective, 5, ul_objective, truncate_iters=4, alpha=0.0, ll_opt=SGD)
    Dynamic(ll_objective, 5, ul_objective, ll_opt=optax.chain(optax.add_decayed_weights(0.1), SGD))
