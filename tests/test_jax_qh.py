"""The JAX/optax face of QHM and QHAdam (uniopt.adapters.jax).

Oracles: the NumPy optimizers (``uniopt.QHM``, ``uniopt.QHAdam``, ``uniopt.QHAdamW``, which run
the Numba kernels), the naive NumPy implementations in ``refimpl.naive_qh``, and optax's own
``sgd``/``adam``/``adamw`` for the degenerate settings. Every execution computes its gradient
from its own parameters with the same NumPy code, so only the optimizers differ.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import optax
import jax.numpy as jnp  # noqa: E402

import uniopt  # noqa: E402
from uniopt.adapters.jax import (  # noqa: E402
    ScaleByQHAdamState,
    ScaleByQHMState,
    qhadam,
    qhadamw,
    qhm,
    scale_by_qhadam,
    scale_by_qhm,
)
from conftest import tolerance  # noqa: E402
from refimpl.naive_qh import NaiveQHAdam, NaiveQHM  # noqa: E402

STEPS = 25


# ----------------------------------------------------------------------------------------------
# A small problem: a dict of parameters with an elementwise, parameter-dependent gradient
# ----------------------------------------------------------------------------------------------
SHAPES = {"b": (4,), "w": (3, 4)}  # jax flattens dicts in sorted-key order


class Problem:
    """g_t = h * p - c + 0.3 * noise_t, computed in NumPy in the parameters' dtype."""

    def __init__(self, dtype, shapes=SHAPES, seed=0, scale=1.0):
        rng = np.random.default_rng(seed)
        self.keys = sorted(shapes)
        self.dtype = np.dtype(dtype)
        self.p0 = {k: rng.standard_normal(shapes[k]).astype(dtype) for k in self.keys}
        self.h = {k: rng.uniform(0.5, 2.0, shapes[k]).astype(dtype) for k in self.keys}
        self.c = {k: (scale * rng.standard_normal(shapes[k])).astype(dtype) for k in self.keys}
        self.noise = [{k: (0.3 * scale * rng.standard_normal(shapes[k])).astype(dtype)
                       for k in self.keys} for _ in range(STEPS)]

    def grad(self, t, params: dict) -> dict:
        return {k: (self.h[k] * np.asarray(params[k]) - self.c[k] + self.noise[t][k])
                .astype(self.dtype) for k in self.keys}

    # -- executions ---------------------------------------------------------------------------
    def run_optax(self, opt, steps=STEPS, jit=True, params=None, state=None, start=0):
        """Run an optax transformation; returns (params as NumPy dict, state)."""
        params = {k: jnp.asarray(v) for k, v in (params or self.p0).items()}
        state = opt.init(params) if state is None else state
        update = jax.jit(opt.update) if jit else opt.update
        for t in range(start, start + steps):
            grads = {k: jnp.asarray(v) for k, v in self.grad(t, params).items()}
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return {k: np.asarray(v) for k, v in params.items()}, state

    def run_core(self, cls, kwargs, steps=STEPS):
        """Run a uniopt NumPy optimizer; returns (params dict, optimizer)."""
        arrays = [self.p0[k].copy() for k in self.keys]
        opt = cls(arrays, **kwargs)
        for t in range(steps):
            grads = self.grad(t, dict(zip(self.keys, arrays)))
            opt.step([grads[k] for k in self.keys])
        return dict(zip(self.keys, arrays)), opt

    def run_naive(self, naive_factory):
        """One naive oracle per tensor (they keep per-tensor state)."""
        oracles = {k: naive_factory() for k in self.keys}
        params = {k: v.copy() for k, v in self.p0.items()}
        for t in range(STEPS):
            grads = self.grad(t, params)
            params = {k: oracles[k].step(params[k], grads[k]) for k in self.keys}
        return params


def exact_schedule(init):
    """A schedule whose values (init, init/2, init/8) are the same in float32 and float64.

    optax evaluates schedules at an int32 count, in float32 even with x64 on, and jit may round
    a computed schedule (linear_schedule) differently from an eager call: to compare with the
    core, whose hyper-parameters are set from eager calls, the values must be exact.
    """
    return optax.piecewise_constant_schedule(init, {8: 0.5, 16: 0.25})


def assert_trees_close(actual: dict, expected: dict, **tol):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k]), np.asarray(expected[k]), err_msg=k, **tol)


def max_rel_error(actual: dict, expected: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(actual[k], np.float64) - expected[k])
                            / np.maximum(np.abs(expected[k]), 1e-300))) for k in expected)


def find_state(state, cls):
    """The first ``cls`` instance inside an (optax chain) state."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
             if isinstance(s, cls)]
    assert found, f"no {cls.__name__} in {state!r}"
    return found[0]


# ----------------------------------------------------------------------------------------------
# Parity with the NumPy core and the naive oracles
# ----------------------------------------------------------------------------------------------
QHM_SETTINGS = [
    dict(lr=0.1, momentum=0.9, nu=0.7),
    dict(lr=0.05, momentum=0.99, nu=1.3, weight_decay=0.01, weight_decay_type="grad"),
    dict(lr=0.2, momentum=0.5, nu=-0.4, weight_decay=0.05, weight_decay_type="direct"),
    dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1, weight_decay_type="direct"),
]
QHADAM_SETTINGS = [
    dict(lr=0.01, betas=(0.9, 0.999), nus=(0.7, 1.0)),
    dict(lr=0.02, betas=(0.8, 0.95), nus=(0.5, 0.8), eps=1e-6, weight_decay=0.01),
    dict(lr=0.02, betas=(0.9, 0.99), nus=(1.2, 0.6), weight_decay=0.05, decouple_weight_decay=True),
    dict(lr=0.01, betas=(0.0, 0.5), nus=(0.3, 0.0), eps=0.0, weight_decay=0.2,
         decouple_weight_decay=True),
]


def jax_qhm(s):
    kw = {k: v for k, v in s.items() if k != "lr"}
    return qhm(s["lr"], **kw)


def jax_qhadam(s):
    kw = {k: v for k, v in s.items() if k != "lr"}
    return qhadam(s["lr"], **kw)


def _ids(settings):
    return [",".join(f"{k}={v}" for k, v in s.items()) for s in settings]


@pytest.mark.parametrize("setting", QHM_SETTINGS, ids=_ids(QHM_SETTINGS))
def test_qhm_float64_matches_core_and_naive(x64, setting):
    prob = Problem(np.float64)
    got, state = prob.run_optax(jax_qhm(setting))
    want, core = prob.run_core(uniopt.QHM, setting)
    naive = prob.run_naive(lambda: NaiveQHM(**setting))
    assert_trees_close(got, want, **tolerance(np.float64))
    assert_trees_close(got, naive, **tolerance(np.float64))
    buf = find_state(state, ScaleByQHMState).momentum_buffer
    assert_trees_close(buf, {k: core.state[i]["momentum_buffer"] for i, k in enumerate(prob.keys)},
                       **tolerance(np.float64))


@pytest.mark.parametrize("setting", QHM_SETTINGS, ids=_ids(QHM_SETTINGS))
def test_qhm_float32_matches_core_under_jit(setting):
    prob = Problem(np.float32)
    got, _ = prob.run_optax(jax_qhm(setting))
    want, _ = prob.run_core(uniopt.QHM, setting)
    assert all(v.dtype == np.float32 for v in got.values())
    assert_trees_close(got, want, **tolerance(np.float32))


@pytest.mark.parametrize("setting", QHADAM_SETTINGS, ids=_ids(QHADAM_SETTINGS))
def test_qhadam_float64_matches_core_and_naive(x64, setting):
    prob = Problem(np.float64)
    got, state = prob.run_optax(jax_qhadam(setting))
    want, core = prob.run_core(uniopt.QHAdam, setting)
    naive = prob.run_naive(lambda: NaiveQHAdam(**setting))
    assert_trees_close(got, want, **tolerance(np.float64))
    assert_trees_close(got, naive, **tolerance(np.float64))
    inner = find_state(state, ScaleByQHAdamState)
    for field in ("exp_avg", "exp_avg_sq"):
        assert_trees_close(getattr(inner, field),
                           {k: core.state[i][field] for i, k in enumerate(prob.keys)},
                           **tolerance(np.float64))
    for field in ("beta1_weight", "beta2_weight"):
        np.testing.assert_allclose(float(getattr(inner, field)), core.state[0][field],
                                   **tolerance(np.float64))


@pytest.mark.parametrize("setting", QHADAM_SETTINGS, ids=_ids(QHADAM_SETTINGS))
def test_qhadam_float32_matches_core_under_jit(setting):
    prob = Problem(np.float32)
    got, _ = prob.run_optax(jax_qhadam(setting))
    want, _ = prob.run_core(uniopt.QHAdam, setting)
    assert all(v.dtype == np.float32 for v in got.values())
    assert_trees_close(got, want, **tolerance(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_qhadamw_matches_core_qhadamw(dtype):
    setting = dict(lr=0.02, betas=(0.9, 0.99), nus=(0.7, 0.9), eps=1e-7, weight_decay=0.1)
    with jax.enable_x64(dtype == np.float64):
        prob = Problem(dtype)
        got, _ = prob.run_optax(qhadamw(learning_rate=setting["lr"],
                                        **{k: v for k, v in setting.items() if k != "lr"}))
    want, core = prob.run_core(uniopt.QHAdamW, setting)
    assert isinstance(core, uniopt.QHAdamW)
    assert_trees_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("family", ["qhm", "qhadam"])
def test_parity_with_weight_decay_schedule(x64, family):
    """A scheduled weight decay equals the core stepping with that decay at each step."""
    prob = Problem(np.float64)
    schedule = exact_schedule(0.2)
    if family == "qhm":
        opt = qhm(0.1, 0.9, 0.6, weight_decay=schedule, weight_decay_type="direct")
        core = uniopt.QHM([prob.p0[k].copy() for k in prob.keys], 0.1, 0.9, 0.6, 0.0, "direct")
    else:
        opt = qhadam(0.05, nus=(0.6, 0.9), weight_decay=schedule)
        core = uniopt.QHAdam([prob.p0[k].copy() for k in prob.keys], 0.05, nus=(0.6, 0.9))
    got, _ = prob.run_optax(opt)
    arrays = core._params
    for t in range(STEPS):
        core.param_groups[0]["weight_decay"] = float(schedule(t))
        grads = prob.grad(t, dict(zip(prob.keys, arrays)))
        core.step([grads[k] for k in prob.keys])
    assert_trees_close(got, dict(zip(prob.keys, arrays)), **tolerance(np.float64))


# ----------------------------------------------------------------------------------------------
# Time-varying betas: qhoptim's running bias weights, not 1 - beta**t
# ----------------------------------------------------------------------------------------------
def test_qhadam_beta_change_midway_matches_core(x64):
    """betas change at step 6: JAX (a fresh transform over the same state) equals the core."""
    prob = Problem(np.float64)
    before, after = (0.9, 0.999), (0.5, 0.9)
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    state = qhadam(0.02, before, (0.7, 0.8)).init(params)
    core = uniopt.QHAdam([prob.p0[k].copy() for k in prob.keys], 0.02, before, (0.7, 0.8))
    updates_for = {betas: jax.jit(qhadam(0.02, betas, (0.7, 0.8)).update)
                   for betas in (before, after)}
    for t in range(STEPS):
        betas = before if t < 5 else after
        core.param_groups[0]["betas"] = betas
        grads = prob.grad(t, params)
        grads = {k: jnp.asarray(v) for k, v in grads.items()}
        updates, state = updates_for[betas](grads, state, params)
        params = optax.apply_updates(params, updates)
        cg = prob.grad(t, dict(zip(prob.keys, core._params)))
        core.step([cg[k] for k in prob.keys])
    assert_trees_close(params, dict(zip(prob.keys, core._params)), **tolerance(np.float64))
    # The normalisers are w_t = 1 + beta_t w_{t-1}. For beta2 (0.999 for 5 steps, then 0.9) that
    # is not the (1 - 0.9**25) / (1 - 0.9) a 1 - beta**t correction would use.
    inner = find_state(state, ScaleByQHAdamState)
    for i, weight in enumerate((inner.beta1_weight, inner.beta2_weight)):
        w = 0.0
        for t in range(STEPS):
            w = 1.0 + (before if t < 5 else after)[i] * w
        np.testing.assert_allclose(float(weight), w, rtol=1e-14)
    assert abs(float(inner.beta2_weight) - (1 - 0.9**STEPS) / (1 - 0.9)) > 1e-2


def test_qhadam_injected_beta_change_matches_core(x64):
    """The same change through optax.inject_hyperparams (betas traced inside jit)."""
    prob = Problem(np.float64)
    factory = optax.inject_hyperparams(
        lambda learning_rate, b1, b2: qhadam(learning_rate, (b1, b2), nus=(0.7, 0.8)))
    opt = factory(learning_rate=0.02, b1=0.9, b2=0.999)
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    state = opt.init(params)
    core = uniopt.QHAdam([prob.p0[k].copy() for k in prob.keys], 0.02, (0.9, 0.999), (0.7, 0.8))
    update = jax.jit(opt.update)
    for t in range(STEPS):
        if t == 5:
            state.hyperparams["b1"] = jnp.asarray(0.5)
            core.param_groups[0]["betas"] = (0.5, 0.999)
        grads = prob.grad(t, params)
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        cg = prob.grad(t, dict(zip(prob.keys, core._params)))
        core.step([cg[k] for k in prob.keys])
    assert_trees_close(params, dict(zip(prob.keys, core._params)), **tolerance(np.float64))


# ----------------------------------------------------------------------------------------------
# optax.inject_hyperparams: every numeric hyper-parameter (b1, b2, nu1, nu2 as scalars)
# ----------------------------------------------------------------------------------------------
def explicit_qhadam(prob, schedule):
    """QHAdam written from its definition as weighted averages over the whole history.

    ``schedule[t]`` holds step t's ``lr, b1, b2, nu1, nu2, eps``. The moments are averages of
    the past gradients with weights ``prod(beta_r, r = s+1..t)`` (the exact normaliser of an
    EMA whose beta changes, which qhoptim's running weights compute recursively). With
    constant betas it is Adam's ``1 - beta**t`` correction (checked against NaiveQHAdam).
    """
    params = {k: v.copy() for k, v in prob.p0.items()}
    grads, b1s, b2s = [], [], []
    for t, h in enumerate(schedule):
        g = prob.grad(t, params)
        grads.append(g)
        b1s.append(h["b1"])
        b2s.append(h["b2"])
        w1 = np.array([np.prod(b1s[s + 1:]) for s in range(t + 1)])
        w2 = np.array([np.prod(b2s[s + 1:]) for s in range(t + 1)])
        for k in prob.keys:
            m = sum(w * gs[k] for w, gs in zip(w1, grads)) / w1.sum()
            v = sum(w * gs[k] ** 2 for w, gs in zip(w2, grads)) / w2.sum()
            num = h["nu1"] * m + (1 - h["nu1"]) * g[k]
            den = np.sqrt(h["nu2"] * v + (1 - h["nu2"]) * g[k] ** 2) + h["eps"]
            params[k] = params[k] - h["lr"] * num / den
    return params


def run_injected(prob, opt, changes):
    """Run ``opt`` (jitted update); before step t set ``state.hyperparams`` from ``changes[t]``."""
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(STEPS):
        for name, value in changes.get(t, {}).items():
            state.hyperparams[name] = jnp.asarray(value)
        grads = {k: jnp.asarray(v) for k, v in prob.grad(t, params).items()}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.items()}, state


def test_explicit_oracle_is_naive_qhadam_for_constant_betas(x64):
    prob = Problem(np.float64)
    h = dict(lr=0.02, b1=0.9, b2=0.99, nu1=0.7, nu2=0.8, eps=1e-8)
    params = {k: v.copy() for k, v in prob.p0.items()}
    naives = {k: NaiveQHAdam(0.02, (0.9, 0.99), (0.7, 0.8), eps=1e-8) for k in prob.keys}
    for t in range(STEPS):
        g = prob.grad(t, params)
        params = {k: naives[k].step(params[k], g[k]) for k in prob.keys}
    assert_trees_close(explicit_qhadam(prob, [h] * STEPS), params, rtol=1e-12)


def test_inject_hyperparams_changes_b1_b2_nu1_at_run_time(x64):
    """inject_hyperparams(qhadam)(b1=, b2=, nu1=, nu2=): b1 changed in the state's hyperparams
    between steps (then b2 and nu1) gives the QHAdam of the changed values."""
    prob = Problem(np.float64)
    opt = optax.inject_hyperparams(qhadam)(learning_rate=0.02, b1=0.9, b2=0.99, nu1=0.7, nu2=0.8)
    changes = {6: {"b1": 0.5}, 14: {"b2": 0.9, "nu1": 0.3}}
    got, state = run_injected(prob, opt, changes)
    assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "nu1", "nu2", "eps",
                                      "weight_decay"}
    h = dict(lr=0.02, b1=0.9, b2=0.99, nu1=0.7, nu2=0.8, eps=1e-8)
    schedule = []
    for t in range(STEPS):
        h = dict(h, **changes.get(t, {}))
        schedule.append(h)
    assert_trees_close(got, explicit_qhadam(prob, schedule), **tolerance(np.float64))
    unchanged, _ = run_injected(prob, opt, {})
    assert max_rel_error(got, unchanged) > 1e-3
    # Only nu1 changing leaves the bias correction alone: NaiveQHAdam with its nus changed.
    got, _ = run_injected(prob, opt, {9: {"nu1": 0.2, "nu2": 1.0}})
    params = {k: v.copy() for k, v in prob.p0.items()}
    naives = {k: NaiveQHAdam(0.02, (0.9, 0.99), (0.7, 0.8), eps=1e-8) for k in prob.keys}
    for t in range(STEPS):
        if t == 9:
            for naive in naives.values():
                naive.nus = (0.2, 1.0)
        g = prob.grad(t, params)
        params = {k: naives[k].step(params[k], g[k]) for k in prob.keys}
    assert_trees_close(got, params, **tolerance(np.float64))


def test_inject_hyperparams_exposes_the_scalars_by_default_like_adam():
    params = {"w": jnp.ones(3)}
    ours = optax.inject_hyperparams(qhadam)(learning_rate=1e-3).init(params).hyperparams
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3).init(params).hyperparams
    assert {"b1", "b2", "eps"} <= set(adam) and {"b1", "b2", "nu1", "nu2", "eps"} <= set(ours)
    np.testing.assert_allclose([float(ours[k]) for k in ("b1", "b2", "nu1", "nu2")],
                               [0.9, 0.999, 1.0, 1.0], rtol=1e-7)
    for recipe in (qhadamw, scale_by_qhadam):
        hyper = optax.inject_hyperparams(recipe)(b1=0.8, nu2=0.9).init(params).hyperparams
        assert {"b1", "b2", "nu1", "nu2"} <= set(hyper)


@pytest.mark.parametrize("recipe", ["qhadam", "qhadamw", "scale_by_qhadam"])
def test_tuple_and_scalar_forms_agree(recipe, x64):
    factory = {"qhadam": qhadam, "qhadamw": qhadamw, "scale_by_qhadam": scale_by_qhadam}[recipe]
    extra = {} if recipe == "scale_by_qhadam" else dict(learning_rate=0.02, weight_decay=0.01)
    prob = Problem(np.float64)
    tuples, _ = prob.run_optax(factory(betas=(0.8, 0.99), nus=(0.7, 0.9), **extra))
    scalars, _ = prob.run_optax(factory(b1=0.8, b2=0.99, nu1=0.7, nu2=0.9, **extra))
    mixed, _ = prob.run_optax(factory(betas=(0.8, 0.99), nu1=0.7, nu2=0.9, **extra))
    injected, _ = prob.run_optax(optax.inject_hyperparams(factory)(
        b1=0.8, b2=0.99, nu1=0.7, nu2=0.9, **extra))
    injected_tuples, _ = prob.run_optax(optax.inject_hyperparams(factory)(
        betas=(0.8, 0.99), nus=(0.7, 0.9), **extra))
    for other in (scalars, mixed):
        for k in tuples:
            np.testing.assert_array_equal(other[k], tuples[k])
    for other in (injected, injected_tuples):
        assert_trees_close(other, tuples, **tolerance(np.float64))
    default, _ = prob.run_optax(factory(**extra))
    assert max_rel_error(default, tuples) > 1e-3


@pytest.mark.parametrize("factory", [qhadam, qhadamw, scale_by_qhadam])
def test_both_forms_is_a_clear_error(factory):
    cases = [
        (dict(betas=(0.8, 0.99), b1=0.8), "Invalid betas: (0.8, 0.99) given together with b1=0.8 "
                                         "(give either betas or b1/b2, not both)"),
        (dict(betas=(0.8, 0.99), b1=0.9, b2=0.999), "given together with b1=0.9, b2=0.999"),
        (dict(nus=(0.7, 1.0), nu2=0.5), "Invalid nus: (0.7, 1.0) given together with nu2=0.5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            factory(**kwargs)
    # Under inject_hyperparams the conflict shows when the state is built.
    with pytest.raises(ValueError, match=re.escape("Invalid betas: (0.8, 0.99) given together with b1=")):
        optax.inject_hyperparams(factory)(betas=(0.8, 0.99), b1=0.7).init({"w": jnp.ones(2)})


# ----------------------------------------------------------------------------------------------
# Degenerate settings against optax's own optimizers
# ----------------------------------------------------------------------------------------------
def scaled(lr, factor):
    """``lr * factor`` for a float or a schedule (multiplied in float64, as QHM does)."""
    if callable(lr):
        return lambda count: jnp.asarray(lr(count), jnp.float64) * factor
    return lr * factor


DEGENERATE = [
    ("qhm nu=0 is sgd", lambda lr: qhm(lr, momentum=0.9, nu=0.0), lambda lr: optax.sgd(lr)),
    ("qhm momentum=0 is sgd", lambda lr: qhm(lr, momentum=0.0, nu=0.4), lambda lr: optax.sgd(lr)),
    ("qhm nu=1 is momentum sgd", lambda lr: qhm(lr, momentum=0.9, nu=1.0),
     lambda lr: optax.sgd(scaled(lr, 1 - 0.9), momentum=0.9)),
    ("qhm nu=momentum is nesterov", lambda lr: qhm(lr, momentum=0.8, nu=0.8),
     lambda lr: optax.sgd(scaled(lr, 1 - 0.8), momentum=0.8, nesterov=True)),
    ("qhadam nus=(1,1) is adam", lambda lr: qhadam(lr, betas=(0.8, 0.99), nus=(1.0, 1.0), eps=1e-7),
     lambda lr: optax.adam(lr, b1=0.8, b2=0.99, eps=1e-7)),
    ("qhadam coupled decay is adam + add_decayed_weights",
     lambda lr: qhadam(lr, betas=(0.8, 0.99), nus=(1.0, 1.0), weight_decay=0.05),
     lambda lr: optax.chain(optax.add_decayed_weights(0.05), optax.adam(lr, b1=0.8, b2=0.99))),
    ("qhadamw nus=(1,1) is adamw",
     lambda lr: qhadamw(lr, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.1),
     lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,ours,theirs", DEGENERATE, ids=[d[0] for d in DEGENERATE])
@pytest.mark.parametrize("schedule", [False, True], ids=["constant_lr", "linear_schedule"])
def test_degenerate_settings_match_optax(x64, name, ours, theirs, schedule):
    lr = optax.linear_schedule(0.1, 0.01, STEPS) if schedule else 0.05
    prob = Problem(np.float64)
    got, _ = prob.run_optax(ours(lr))
    want, _ = prob.run_optax(theirs(lr))
    assert_trees_close(got, want, **tolerance(np.float64))
    # and the trajectory actually moved
    assert max_rel_error(got, prob.p0) > 1e-2


def test_lr_schedule_equals_per_step_learning_rates(x64):
    """A schedule gives the same trajectory as the core with lr set from the schedule each step."""
    prob = Problem(np.float64)
    schedule = exact_schedule(0.25)
    got, _ = prob.run_optax(qhm(schedule, 0.9, 0.7))
    core = uniopt.QHM([prob.p0[k].copy() for k in prob.keys], 0.2, 0.9, 0.7)
    for t in range(STEPS):
        core.param_groups[0]["lr"] = float(schedule(t))
        grads = prob.grad(t, dict(zip(prob.keys, core._params)))
        core.step([grads[k] for k in prob.keys])
    assert_trees_close(got, dict(zip(prob.keys, core._params)), **tolerance(np.float64))


# ----------------------------------------------------------------------------------------------
# JAX transformations and optax combinators
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: qhm(0.1, 0.9, 0.7, 0.01, "direct"),
                                  lambda: qhadam(0.02, (0.9, 0.99), (0.7, 0.9), weight_decay=0.01)],
                         ids=["qhm", "qhadam"])
def test_jit_matches_eager(x64, make):
    prob = Problem(np.float64)
    jitted, _ = prob.run_optax(make(), steps=10, jit=True)
    eager, _ = prob.run_optax(make(), steps=10, jit=False)
    assert_trees_close(jitted, eager, **tolerance(np.float64))


@pytest.mark.parametrize("make", [lambda: qhm(0.1, 0.9, 0.7, 0.05, "grad"),
                                  lambda: qhadamw(0.02, (0.9, 0.99), (0.7, 0.9), weight_decay=0.1)],
                         ids=["qhm", "qhadamw"])
def test_vmap_over_problems_equals_loop(x64, make):
    """vmap over a batch of independent problems (batched params, grads and state)."""
    batch = [Problem(np.float64, seed=s) for s in range(3)]
    opt = make()
    params = {k: jnp.stack([jnp.asarray(p.p0[k]) for p in batch]) for k in batch[0].keys}
    state = jax.vmap(opt.init)(params)
    update = jax.jit(jax.vmap(opt.update))
    for t in range(STEPS):
        grads = [p.grad(t, {k: np.asarray(v[i]) for k, v in params.items()})
                 for i, p in enumerate(batch)]
        stacked = {k: jnp.stack([jnp.asarray(g[k]) for g in grads]) for k in batch[0].keys}
        updates, state = update(stacked, state, params)
        params = optax.apply_updates(params, updates)
    for i, prob in enumerate(batch):
        alone, _ = prob.run_optax(make())
        assert_trees_close({k: v[i] for k, v in params.items()}, alone, **tolerance(np.float64))


def test_vmap_over_hyperparameters_equals_loop(x64):
    """Hyper-parameters traced by vmap are accepted (unchecked) and used as given."""
    prob = Problem(np.float64)
    nus = jnp.asarray([0.0, 0.5, 1.3])
    momenta = jnp.asarray([0.5, 0.9, 0.99])

    def final_params(nu, momentum):
        opt = qhm(0.1, momentum, nu)
        params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
        state = opt.init(params)
        for t in range(10):
            grads = {k: prob.h[k] * params[k] - prob.c[k] + prob.noise[t][k] for k in prob.keys}
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    batched = jax.jit(jax.vmap(final_params))(nus, momenta)
    for i in range(len(nus)):
        alone = final_params(float(nus[i]), float(momenta[i]))
        assert_trees_close({k: v[i] for k, v in batched.items()}, alone, **tolerance(np.float64))


def test_chain_with_clipping_matches_core_on_clipped_grads(x64):
    prob = Problem(np.float64, scale=5.0)  # gradients well above the clipping norm
    setting = dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 0.9))
    opt = optax.chain(optax.clip_by_global_norm(1.0), jax_qhadam(setting))
    got, _ = prob.run_optax(opt)
    arrays = [prob.p0[k].copy() for k in prob.keys]
    core = uniopt.QHAdam(arrays, **setting)
    clipped_steps = 0
    for t in range(STEPS):
        grads = prob.grad(t, dict(zip(prob.keys, arrays)))
        norm = np.sqrt(sum(np.sum(g * g) for g in grads.values()))
        if norm >= 1.0:
            clipped_steps += 1
            grads = {k: g / norm for k, g in grads.items()}
        core.step([grads[k] for k in prob.keys])
    assert clipped_steps > STEPS // 2
    assert_trees_close(got, dict(zip(prob.keys, arrays)), **tolerance(np.float64))


def test_inject_hyperparams_learning_rate_change(x64):
    """Changing the injected lr mid-run = continuing the plain recipe's state with the new lr."""
    prob = Problem(np.float64)
    args = dict(momentum=0.9, nu=0.7, weight_decay=0.01, weight_decay_type="direct")
    injected = optax.inject_hyperparams(qhm)(learning_rate=0.1, **args)
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    state = injected.init(params)
    update = jax.jit(injected.update)
    for t in range(STEPS):
        if t == 10:
            state.hyperparams["learning_rate"] = jnp.asarray(0.03)
        grads = prob.grad(t, params)
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
    got = {k: np.asarray(v) for k, v in params.items()}

    first, mid_state = prob.run_optax(qhm(0.1, **args), steps=10)
    want, _ = prob.run_optax(qhm(0.03, **args), steps=STEPS - 10, params=first, state=mid_state,
                             start=10)
    unchanged, _ = prob.run_optax(qhm(0.1, **args), steps=STEPS - 10, params=first,
                                  state=mid_state, start=10)
    assert_trees_close(got, want, **tolerance(np.float64))
    assert max_rel_error(got, unchanged) > 1e-3


@pytest.mark.parametrize("recipe", ["qhm", "qhadam", "qhadamw"])
def test_inject_hyperparams_runs_every_recipe(recipe):
    """Each recipe under inject_hyperparams (float32 hyper-parameter arrays) = the plain one."""
    prob = Problem(np.float32)
    kwargs = {"qhm": dict(learning_rate=0.1, momentum=0.9, nu=0.7, weight_decay=0.01),
              "qhadam": dict(learning_rate=0.02, nus=(0.7, 0.9), eps=1e-6, weight_decay=0.01),
              "qhadamw": dict(learning_rate=0.02, nus=(0.7, 0.9), weight_decay=0.1)}[recipe]
    factory = {"qhm": qhm, "qhadam": qhadam, "qhadamw": qhadamw}[recipe]
    injected = optax.inject_hyperparams(factory)(**kwargs)
    got, state = prob.run_optax(injected)
    want, _ = prob.run_optax(factory(**kwargs))
    assert set(state.hyperparams) >= {"learning_rate", "weight_decay"}
    assert all(v.dtype == np.float32 for v in got.values())
    assert_trees_close(got, want, **tolerance(np.float32))


def test_inject_hyperparams_nu_schedule_equals_per_step_recipes(x64):
    """A scheduled nu (traced inside jit) equals building qhm(nu=schedule(t)) at every step."""
    prob = Problem(np.float64)
    nu_schedule = optax.piecewise_constant_schedule(0.25, {8: 3.0, 16: 1.5})  # exact values
    got, _ = prob.run_optax(optax.inject_hyperparams(qhm)(learning_rate=0.1, momentum=0.9,
                                                          nu=nu_schedule))
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    state = qhm(0.1, 0.9, 0.0).init(params)
    updates_for = {}
    for t in range(STEPS):
        nu = float(nu_schedule(t))
        if nu not in updates_for:
            updates_for[nu] = jax.jit(qhm(0.1, 0.9, nu).update)
        grads = {k: jnp.asarray(v) for k, v in prob.grad(t, params).items()}
        updates, state = updates_for[nu](grads, state, params)
        params = optax.apply_updates(params, updates)
    assert len(updates_for) == 3
    assert_trees_close(got, params, **tolerance(np.float64))


# ----------------------------------------------------------------------------------------------
# Pytrees and dtypes
# ----------------------------------------------------------------------------------------------
def test_nested_pytree_of_mixed_shapes_matches_core(x64):
    rng = np.random.default_rng(7)
    params = {"layer": {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)},
              "scale": np.asarray(0.7),
              "emb": [rng.standard_normal(4), rng.standard_normal((1, 2, 2))]}
    leaves, treedef = jax.tree.flatten(params)
    assert len(leaves) == 5
    for opt, core_cls, kw in [
        (qhm(0.1, 0.9, 0.7, 0.01), uniopt.QHM,
         dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01)),
        (qhadam(0.05, nus=(0.7, 0.9)), uniopt.QHAdam, dict(lr=0.05, nus=(0.7, 0.9))),
    ]:
        tree = jax.tree.map(jnp.asarray, params)
        state = opt.init(tree)
        arrays = [np.array(leaf, copy=True) for leaf in leaves]
        core = core_cls(arrays, **kw)
        for _ in range(10):
            grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + p, tree)
            updates, state = jax.jit(opt.update)(grads, state, tree)
            tree = optax.apply_updates(tree, updates)
            core.step([np.sin(3.0 * a) + a for a in arrays])
        assert jax.tree.structure(tree) == treedef
        for got, want in zip(jax.tree.leaves(tree), arrays):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, **tolerance(np.float64))


RECIPES = {
    "qhm": lambda lr: qhm(lr, 0.9, 0.7, weight_decay=0.01),
    "qhadam": lambda lr: qhadam(lr, nus=(0.7, 0.9), weight_decay=0.01),
    "qhadamw": lambda lr: qhadamw(lr, nus=(0.7, 0.9), weight_decay=0.01),
}


@pytest.mark.parametrize("enable_x64", [False, True], ids=["x64_off", "x64_on"])
@pytest.mark.parametrize("lr_kind", ["float", "schedule", "injected"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_dtypes_are_preserved(enable_x64, lr_kind, recipe):
    with jax.enable_x64(enable_x64):
        dtypes = [jnp.float32, jnp.bfloat16] + ([jnp.float64] if enable_x64 else [])
        for dtype in dtypes:
            params = {"a": jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3),
                      "b": jnp.ones((3,), dtype)}
            if lr_kind == "injected":
                opt = optax.inject_hyperparams(RECIPES[recipe])(lr=0.01)
            else:
                opt = RECIPES[recipe](optax.linear_schedule(0.01, 0.001, 5)
                                      if lr_kind == "schedule" else 0.01)
            state = opt.init(params)
            update = jax.jit(opt.update)
            for _ in range(3):
                grads = jax.tree.map(lambda p: 2 * p, params)
                updates, new_state = update(grads, state, params)
                assert jax.tree.map(lambda x: x.dtype, updates) == {"a": dtype, "b": dtype}
                assert (jax.tree.map(lambda x: x.dtype, new_state)
                        == jax.tree.map(lambda x: x.dtype, state))
                params, state = optax.apply_updates(params, updates), new_state
            assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
            if recipe.startswith("qhadam"):
                inner = find_state(state, ScaleByQHAdamState)
                want = jnp.float64 if dtype == jnp.float64 else jnp.float32
                assert inner.beta1_weight.dtype == want and inner.beta2_weight.dtype == want
                for tree in (inner.exp_avg, inner.exp_avg_sq):
                    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}
            else:
                inner = find_state(state, ScaleByQHMState)
                buf_dtypes = {x.dtype for x in jax.tree.leaves(inner.momentum_buffer)}
                assert buf_dtypes == {jnp.dtype(dtype)}


@pytest.mark.parametrize("enable_x64", [False, True], ids=["x64_off", "x64_on"])
def test_mixed_dtype_tree_keeps_each_leaf_dtype(enable_x64):
    with jax.enable_x64(enable_x64):
        params = {"f32": jnp.ones((3,), jnp.float32), "bf16": jnp.ones((2,), jnp.bfloat16)}
        for opt in (qhm(0.1, 0.9, 0.7, 0.01, "direct"),
                    qhadamw(0.01, nus=(0.7, 1.0), weight_decay=0.1)):
            state = opt.init(params)
            updates, state = jax.jit(opt.update)(params, state, params)
            assert updates["f32"].dtype == jnp.float32 and updates["bf16"].dtype == jnp.bfloat16


@pytest.mark.parametrize("make", [lambda: qhm(0.05, 0.9, 0.7),
                                  lambda: qhadam(0.01, nus=(0.7, 1.0))], ids=["qhm", "qhadam"])
def test_bfloat16_tracks_float32(make):
    """bfloat16 runs stay finite and within bfloat16 resolution of the float32 trajectory."""
    prob32 = Problem(np.float32)
    full, _ = prob32.run_optax(make(), steps=15)
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in prob32.p0.items()}
    opt = make()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(15):
        grads = prob32.grad(t, {k: np.asarray(v, np.float32) for k, v in params.items()})
        updates, state = update({k: jnp.asarray(v, jnp.bfloat16) for k, v in grads.items()},
                                state, params)
        params = optax.apply_updates(params, updates)
    for k in prob32.keys:
        assert params[k].dtype == jnp.bfloat16
        half = np.asarray(params[k], np.float32)
        assert np.all(np.isfinite(half))
        # bfloat16 keeps 8 significant bits (2**-8 ~ 4e-3 relative per rounding)
        np.testing.assert_allclose(half, full[k], rtol=5e-2, atol=5e-2)
        assert not np.allclose(half, np.asarray(prob32.p0[k], np.float32), atol=1e-3)


# ----------------------------------------------------------------------------------------------
# State layout, converters, rule sharing, imports
# ----------------------------------------------------------------------------------------------
def test_state_namedtuple_fields(x64):
    assert ScaleByQHMState._fields == ("momentum_buffer",)
    assert ScaleByQHAdamState._fields == ("beta1_weight", "beta2_weight", "exp_avg", "exp_avg_sq")
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(3)}
    state = scale_by_qhm(0.9, 0.7).init(params)
    assert isinstance(state, ScaleByQHMState)
    assert jax.tree.structure(state.momentum_buffer) == jax.tree.structure(params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(state.momentum_buffer))

    betas = (0.9, 0.99)
    block = scale_by_qhadam(betas, nus=(0.7, 1.0))
    state = block.init(params)
    assert isinstance(state, ScaleByQHAdamState)
    assert float(state.beta1_weight) == 0.0 and float(state.beta2_weight) == 0.0
    for _ in range(3):
        _, state = block.update(jax.tree.map(jnp.ones_like, params), state)
    # w_t = 1 + beta w_{t-1} from w_0 = 0 is the geometric sum (1 - beta**t) / (1 - beta)
    for weight, beta in zip((state.beta1_weight, state.beta2_weight), betas):
        np.testing.assert_allclose(float(weight), (1 - beta**3) / (1 - beta), rtol=1e-14)
    # moments are bias-corrected: a constant gradient of ones gives m = v = 1 exactly
    for tree in (state.exp_avg, state.exp_avg_sq):
        for x in jax.tree.leaves(tree):
            np.testing.assert_allclose(np.asarray(x), 1.0, rtol=1e-14)


def test_building_block_is_the_recipe_without_lr_and_decay(x64):
    """scale_by_qhm's output times -lr is the recipe's update."""
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    grads = {"w": jnp.asarray([0.3, 0.1, -0.7])}
    block, recipe = scale_by_qhm(0.9, 0.6), qhm(0.25, 0.9, 0.6)
    s_block, s_recipe = block.init(params), recipe.init(params)
    for _ in range(4):
        d, s_block = block.update(grads, s_block, params)
        u, s_recipe = recipe.update(grads, s_recipe, params)
        np.testing.assert_allclose(np.asarray(u["w"]), -0.25 * np.asarray(d["w"]), rtol=1e-15)


QHM_CONVERTERS = [
    ("from_pid", (0.5, 0.1, 0.2)),
    ("from_synthesized_nesterov", (0.1, 0.9, 0.3)),
    ("from_robust_momentum", (1.0, 10.0)),
    ("from_robust_momentum", (2.0, 50.0, 0.8)),
    ("from_accsgd", (0.1, 100.0, 10.0)),
    ("from_two_state_optimizer", (0.5, 0.2, -0.3, 0.5, 0.8, -0.1)),
]


@pytest.mark.parametrize("name,args", QHM_CONVERTERS, ids=[f"{n}{a}" for n, a in QHM_CONVERTERS])
def test_qhm_converters_match_core_with_renamed_keys(name, args):
    got = getattr(qhm, name)(*args)
    want = getattr(uniopt.QHM, name)(*args)
    assert set(got) == {"learning_rate", "momentum", "nu"}
    assert got == {"learning_rate": want["lr"], "momentum": want["momentum"], "nu": want["nu"]}


def test_qhm_converter_output_builds_the_same_optimizer_as_core(x64):
    hyper = qhm.from_accsgd(0.1, 100.0, 10.0)
    prob = Problem(np.float64)
    got, _ = prob.run_optax(qhm(**hyper))
    want, _ = prob.run_core(uniopt.QHM, uniopt.QHM.from_accsgd(0.1, 100.0, 10.0))
    assert_trees_close(got, want, **tolerance(np.float64))


@pytest.mark.parametrize("recipe", [qhadam, qhadamw], ids=["qhadam", "qhadamw"])
def test_qhadam_from_nadam_matches_core_with_renamed_keys(recipe):
    got = recipe.from_nadam(learning_rate=0.01, betas=(0.95, 0.99))
    want = uniopt.QHAdam.from_nadam(lr=0.01, betas=(0.95, 0.99))
    assert got == {"learning_rate": want["lr"], "betas": want["betas"], "nus": want["nus"]}
    assert recipe.from_nadam() == {"learning_rate": 1e-3, "betas": (0.9, 0.999),
                                   "nus": (0.9, 1.0)}
    recipe(**got)  # the dictionary is a valid set of arguments


def test_blocks_trace_the_shared_rule_definitions():
    """The JAX blocks run uniopt.rules.qh's own code (re-bound to jnp), not a copy."""
    from uniopt.adapters.jax import qh as _qh
    from uniopt.rules import qh as rules

    for name in ("qhm_direction", "qhadam_bias_weights", "qhadam_direction"):
        assert getattr(_qh._rules, name).__code__ is getattr(rules, name).__code__
    # the guarded sqrt: jnp.sqrt's values, derivative 0 (not inf) at exactly 0
    sqrt = _qh._rules.qhadam_direction.__globals__["sqrt"]
    x = jnp.asarray([0.0, 0.25, 4.0])
    np.testing.assert_array_equal(sqrt(x), jnp.sqrt(x))
    np.testing.assert_array_equal(jax.vmap(jax.grad(sqrt))(x), [0.0, 1.0, 0.25])


# ----------------------------------------------------------------------------------------------
# Bad inputs: checked at construction, messages name the argument and the value
# ----------------------------------------------------------------------------------------------
QHM_OK = dict(learning_rate=0.1, momentum=0.9, nu=0.7)


def _qhm_with(**changes):
    return {**QHM_OK, **changes}


BAD_INPUTS = [
    (qhm, _qhm_with(learning_rate=-0.1), ValueError, "Invalid learning rate: -0.1"),
    (qhm, _qhm_with(learning_rate=jnp.asarray(-1.0)), ValueError, "Invalid learning rate: -1.0"),
    (qhm, _qhm_with(learning_rate="0.1"), TypeError, "Invalid learning rate: '0.1'"),
    (qhm, _qhm_with(learning_rate=None), TypeError, "Invalid learning rate: None"),
    (qhm, _qhm_with(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    (qhm, _qhm_with(momentum=None), TypeError, "Invalid momentum value: None"),
    (qhm, _qhm_with(momentum=1.5), ValueError, "Invalid momentum value: 1.5"),
    (qhm, _qhm_with(learning_rate=float("inf")), ValueError, "Invalid learning rate: inf"),
    (qhm, _qhm_with(nu=float("nan")), ValueError, "Invalid nu value: nan"),
    (qhm, _qhm_with(nu=float("inf")), ValueError, "Invalid nu value: inf"),
    (qhm, _qhm_with(weight_decay=-1e-4), ValueError, "Invalid weight_decay value: -0.0001"),
    (qhm, _qhm_with(weight_decay_type="l2"), ValueError, "Invalid weight_decay_type value: 'l2'"),
    (qhm, _qhm_with(weight_decay_type=None), ValueError, "Invalid weight_decay_type value: None"),
    (scale_by_qhm, dict(momentum=-1.0, nu=0.7), ValueError, "Invalid momentum value: -1.0"),
    (scale_by_qhm, dict(momentum=0.9, nu=[0.7]), TypeError, "Invalid nu value: [0.7]"),
    (qhadam, dict(learning_rate=-1e-3), ValueError, "Invalid learning rate: -0.001"),
    (qhadam, dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    (qhadam, dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    (qhadam, dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
    (qhadam, dict(betas=(0.9,)), ValueError, "Invalid betas: (0.9,)"),
    (qhadam, dict(betas=0.9), TypeError, "Invalid betas: 0.9"),
    (qhadam, dict(nus=(0.7, float("inf"))), ValueError, "Invalid nu parameter at index 1: inf"),
    (qhadam, dict(nus=("a", 1.0)), TypeError, "Invalid nu parameter at index 0: 'a'"),
    (qhadam, dict(nus=(1.0, 1.0, 1.0)), ValueError, "Invalid nus: (1.0, 1.0, 1.0)"),
    (qhadam, dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (qhadamw, dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (qhadamw, dict(learning_rate=float("nan")), ValueError, "Invalid learning rate: nan"),
    (scale_by_qhadam, dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1: 1.5"),
    (scale_by_qhadam, dict(eps=None), TypeError, "Invalid epsilon value: None"),
    (qhadam.from_nadam, dict(learning_rate=None), TypeError, "Invalid learning_rate: None"),
    (qhadamw.from_nadam, dict(learning_rate="1"), TypeError, "Invalid learning_rate: '1'"),
]


@pytest.mark.parametrize("factory,kwargs,exc,message", BAD_INPUTS,
                         ids=[f"{f.__name__}-{m}" for f, _, _, m in BAD_INPUTS])
def test_bad_inputs_raise_at_construction(factory, kwargs, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message)):
        factory(**kwargs)


def test_python_ints_beyond_int64_are_the_real_numbers_they_equal():
    """``learning_rate=2**64`` (a Python int no JAX integer holds) is the float 2**64: the
    first step is the closed form -lr * g (QHM with momentum 0, nu 1: direction g; QHAdam with
    nus (1, 1): g / (|g| + eps), 1 for g = 1), not an OverflowError of the jitted step."""
    g = jnp.ones(2)
    for opt, direction in ((qhm(2**64, 0, 1), 1.0), (qhadam(2**64, nus=(1, 1)), 1 / (1 + 1e-8)),
                           (qhadamw(2**64, weight_decay=0), 1 / (1 + 1e-8))):
        updates, _ = jax.jit(opt.update)(g, opt.init(g), g)
        np.testing.assert_allclose(np.asarray(updates), -(2.0**64) * direction, rtol=1e-6)


def test_accepted_edge_values():
    """Values qhoptim accepts stay accepted (nu outside [0, 1], zero lr/eps/momentum, momentum
    just below 1), and schedules, NumPy scalars and concrete 0-d jax arrays. (momentum >= 1,
    which qhoptim accepts, is rejected on purpose: tests/test_validation.py.)"""
    params = jnp.asarray([1.0, -2.0])
    for opt in (
        qhm(0.0, 0.0, -2.5),
        qhm(0.1, 0.999, 3.0, weight_decay=0.0, weight_decay_type="direct"),
        qhadam(0.0, betas=(0.0, 0.0), nus=(-1.0, 2.0), eps=0.0),
        qhm(optax.constant_schedule(0.1), 0.9, 0.7, weight_decay=optax.constant_schedule(0.01)),
        qhm(np.float32(0.1), np.float64(0.9), jnp.asarray(0.7)),
        qhadamw(jnp.asarray(1e-3), betas=[np.float64(0.5), 0.9], nus=jnp.asarray([0.7, 1.0])),
    ):
        updates, _ = opt.update(params, opt.init(params), params)
        assert updates.shape == params.shape and bool(jnp.all(jnp.isfinite(updates)))


def test_docstring_examples_run():
    import doctest

    from uniopt.adapters import jax as adapter
    from uniopt.adapters.jax import qh as _qh

    for module in (adapter, _qh):
        result = doctest.testmod(module, raise_on_error=False, report=True)
        assert result.attempted > 0 and result.failed == 0, module.__name__
