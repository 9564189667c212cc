"""The QH family's optax recipes through XLA's FFI (Numba handlers inside ``jax.jit`` on CPU).

Oracles: the NumPy optimizers (``uniopt.QHM``, ``uniopt.QHAdam``, ``uniopt.QHAdamW``: the Numba
table kernels), the traced path of the same recipes (``ffi=False``, ``jax.numpy``) and optax's
own ``adam``. Which path a step took is read from the lowered module (the FFI target's name).
The fused entry point ``update_and_apply`` is checked against the ``update`` + ``apply_updates``
pair (bit for bit), the NumPy core and the traced path, and for its in-place buffers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import uniopt
import uniopt.adapters.jax as ujax
from uniopt.adapters.jax import _ffi, qhadam, qhadamw, qhm
from conftest import tolerance
from test_jax_qh import QHADAM_SETTINGS, QHM_SETTINGS, STEPS, Problem, exact_schedule

TARGETS = ("uniopt_qhadam", "uniopt_qhm")


@pytest.fixture
def any_size(monkeypatch):
    """Let ``ffi=None`` take the FFI path for the small test problems."""
    monkeypatch.setattr(_ffi, "MIN_SIZE", 0)


def uses_ffi(fn, *args) -> bool:
    """Whether jit(fn)(*args) lowers to one of our FFI targets."""
    text = jax.jit(fn).lower(*args).as_text()
    return any(name in text for name in TARGETS)


def recipe(family, setting, ffi):
    kw = {k: v for k, v in setting.items() if k != "lr"}
    return (qhm if family == "qhm" else qhadam)(setting["lr"], ffi=ffi, **kw)


CORE = {"qhm": uniopt.QHM, "qhadam": uniopt.QHAdam}
CASES = [("qhm", s) for s in QHM_SETTINGS] + [("qhadam", s) for s in QHADAM_SETTINGS]
IDS = [f"{f}-" + ",".join(f"{k}={v}" for k, v in s.items()) for f, s in CASES]


def decoupled(setting) -> bool:
    return setting.get("weight_decay_type") == "direct" or setting.get("decouple_weight_decay", False)


# ----------------------------------------------------------------------------------------------
# Parity: FFI path vs NumPy core vs traced path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", [True, False], ids=["updates_over_grads", "updates_apart"])
@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_float64_ffi_equals_numpy_core(x64, family, setting, alias, monkeypatch):
    """Bitwise equal to the core (its kernels) unless decay is decoupled (optax's p + u order).

    Both compiled forms: updates written over the gradients' buffers (the default) or apart.
    """
    monkeypatch.setattr(_ffi, "ALIAS_GRADIENTS", alias)
    prob = Problem(np.float64)
    opt = recipe(family, setting, ffi=True)
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    assert uses_ffi(opt.update, params, opt.init(params), params)
    got, state = prob.run_optax(opt)
    want, core = prob.run_core(CORE[family], setting)
    fields = ["momentum_buffer"] if family == "qhm" else ["exp_avg", "exp_avg_sq"]
    inner = [s for s in state if hasattr(s, fields[0])][0]
    for k_index, k in enumerate(prob.keys):
        if decoupled(setting):  # (1 - lr wd) p - lr d  vs  p - lr (d + wd p): rounding only
            np.testing.assert_allclose(got[k], want[k], **tolerance(np.float64))
        else:
            np.testing.assert_array_equal(got[k], want[k])
            for field in fields:
                np.testing.assert_array_equal(np.asarray(getattr(inner, field)[k]),
                                              core.state[k_index][field])
    if family == "qhadam":
        np.testing.assert_array_equal(float(inner.beta1_weight), core.state[0]["beta1_weight"])


@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_float64_ffi_and_traced_paths_agree(x64, family, setting):
    prob = Problem(np.float64)
    ffi, _ = prob.run_optax(recipe(family, setting, ffi=True))
    traced, _ = prob.run_optax(recipe(family, setting, ffi=False))
    for k in prob.keys:
        np.testing.assert_allclose(ffi[k], traced[k], **tolerance(np.float64))


@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_float32_ffi_within_ulps_of_traced_path_and_core(family, setting):
    prob = Problem(np.float32)
    ffi, state = prob.run_optax(recipe(family, setting, ffi=True))
    traced, _ = prob.run_optax(recipe(family, setting, ffi=False))
    want, _ = prob.run_core(CORE[family], setting)
    for k in prob.keys:
        assert ffi[k].dtype == np.float32
        np.testing.assert_allclose(ffi[k], traced[k], **tolerance(np.float32))
        np.testing.assert_allclose(ffi[k], want[k], **tolerance(np.float32))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state)
               if jnp.issubdtype(leaf.dtype, jnp.floating))


def ulps(a, b):
    """Distance in float32 units in the last place."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, np.int64(-2**31) - ia, ia)  # monotone integer order
    ib = np.where(ib < 0, np.int64(-2**31) - ib, ib)
    return np.abs(ia - ib)


@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_float32_one_step_within_a_few_ulps_of_traced_path(family, setting):
    """From the same (mid-run) state, one step's parameters and state differ by <= 4 ulps."""
    prob = Problem(np.float32)
    params, state = prob.run_optax(recipe(family, setting, ffi=False), steps=10)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    grads = {k: jnp.asarray(v) for k, v in prob.grad(10, params).items()}
    out = {}
    for ffi in (True, False):
        u, new_state = jax.jit(recipe(family, setting, ffi=ffi).update)(grads, state, params)
        out[ffi] = (optax.apply_updates(params, u), new_state)
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
        if jnp.issubdtype(a.dtype, jnp.floating):
            assert ulps(a, b).max() <= 4, (ulps(a, b).max(), a, b)


def test_qhadamw_recipe_and_schedules_take_the_ffi_path(x64):
    """qhadamw; learning rate and weight decay schedules (their counts advance as optax's)."""
    prob = Problem(np.float64)
    lr, wd = exact_schedule(0.02), exact_schedule(0.1)
    ffi_opt = qhadamw(lr, nus=(0.7, 0.9), weight_decay=wd, ffi=True)
    got, state = prob.run_optax(ffi_opt)
    want, want_state = prob.run_optax(qhadamw(lr, nus=(0.7, 0.9), weight_decay=wd, ffi=False))
    for k in prob.keys:
        np.testing.assert_allclose(got[k], want[k], **tolerance(np.float64))
    counts = [s.count for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "count")
                                               and not callable(s.count)) if hasattr(s, "count")]
    want_counts = [s.count for s in jax.tree.leaves(want_state, is_leaf=lambda s: hasattr(
        s, "count") and not callable(s.count)) if hasattr(s, "count")]
    assert [int(c) for c in counts] == [int(c) for c in want_counts] == [STEPS, STEPS]
    assert jax.tree.structure(state) == jax.tree.structure(want_state)


def test_nus_one_is_optax_adam_through_the_ffi(x64, any_size):
    prob = Problem(np.float64)
    got, _ = prob.run_optax(qhadam(0.01, nus=(1.0, 1.0)))
    want, _ = prob.run_optax(optax.adam(0.01))
    for k in prob.keys:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)


def test_leaves_of_two_dtypes_scalars_and_empty_leaves(x64):
    """One FFI call per dtype; 0-d and empty leaves are fine."""
    params = {"a": jnp.linspace(-1, 1, 7, dtype=jnp.float32), "b": jnp.arange(5.0) - 2,
              "s": jnp.asarray(0.5), "e": jnp.zeros((0, 3), jnp.float32)}
    out = []
    for ffi in (True, False):
        opt, p = qhadam(0.05, nus=(0.7, 0.9), weight_decay=0.1, ffi=ffi), params
        state, update = opt.init(p), jax.jit(opt.update)
        for _ in range(5):
            grads = jax.tree.map(lambda x: 3 * x - 1, p)
            kept = jax.tree.map(np.array, grads)
            u, state = update(grads, state, p)
            for k in grads:  # the caller's gradients are intact (XLA copied them)
                np.testing.assert_array_equal(np.asarray(grads[k]), kept[k])
            p = optax.apply_updates(p, u)
        out.append(p)
    text = jax.jit(qhadam(0.05, ffi=True).update).lower(params, qhadam(0.05).init(params),
                                                       params).as_text()
    assert text.count("uniopt_qhadam") == 2
    for k in params:
        assert out[0][k].dtype == params[k].dtype
        np.testing.assert_allclose(out[0][k], out[1][k], **tolerance(out[0][k].dtype))


# ----------------------------------------------------------------------------------------------
# Path choice and fallbacks
# ----------------------------------------------------------------------------------------------
def small_problem(dtype=jnp.float32, n=6):
    params = {"w": jnp.linspace(-1.0, 1.0, n, dtype=dtype)}
    return params, jax.tree.map(lambda p: 2 * p - 0.3, params)


def test_auto_takes_ffi_under_jit_from_min_size(monkeypatch):
    params, grads = small_problem(n=50)
    state = qhadam(1e-2).init(params)
    monkeypatch.setattr(_ffi, "MIN_SIZE", 50)
    assert uses_ffi(qhadam(1e-2).update, grads, state, params)
    monkeypatch.setattr(_ffi, "MIN_SIZE", 51)  # (a new transform: jit caches traces)
    assert not uses_ffi(qhadam(1e-2).update, grads, state, params)
    assert not uses_ffi(qhadam(1e-2, ffi=False).update, grads, state, params)


def test_auto_under_grad_and_vmap_uses_the_traced_path(any_size):
    params, grads = small_problem()
    opt = qhm(0.1, 0.9, 0.7)
    state = opt.init(params)

    def loss_after_step(p):
        u, _ = opt.update(grads, state, p)
        return jnp.sum(optax.apply_updates(p, u)["w"] ** 2)

    def batched(g):
        return jax.vmap(lambda gi: opt.update({"w": gi}, state, params)[0]["w"])(g)

    assert not uses_ffi(jax.grad(loss_after_step), params)
    assert not uses_ffi(batched, jnp.stack([grads["w"]] * 3))
    assert uses_ffi(opt.update, grads, state, params)  # the same transform, plainly jitted


def test_grad_through_a_jitted_ffi_update_equals_traced_grad(any_size):
    """jax.grad(jax.jit(step)): the FFI call's derivative is the traced path's."""
    params, grads = small_problem(jnp.float32, 9)

    def hypergrad(ffi):
        def loss(lr):
            opt = optax.inject_hyperparams(qhadam, static_args=("ffi",))(
                learning_rate=lr, nus=(0.7, 1.0), weight_decay=0.1, ffi=ffi)
            update = jax.jit(opt.update)
            p, state = params, opt.init(params)
            for _ in range(3):
                u, state = update(jax.tree.map(lambda x: 2 * x - 0.3, p), state, p)
                p = optax.apply_updates(p, u)
            return jnp.sum(p["w"] ** 2)

        return jax.value_and_grad(loss)(jnp.float32(0.05))

    value, grad = hypergrad(None)
    want_value, want_grad = hypergrad(False)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5)
    assert float(grad) != 0.0


def test_vmap_of_a_jitted_ffi_update_loops(any_size):
    params, _ = small_problem(jnp.float32, 5)
    opt = qhadam(0.1, nus=(0.7, 1.0), ffi=True)
    state = opt.init(params)
    g = jnp.stack([jnp.arange(5.0, dtype=jnp.float32) * s for s in (1.0, -2.0, 0.5)])
    step = jax.jit(lambda gi: opt.update({"w": gi}, state, params)[0]["w"])
    got = jax.vmap(step)(g)
    want = jnp.stack([qhadam(0.1, nus=(0.7, 1.0), ffi=False).update(
        {"w": gi}, state, params)[0]["w"] for gi in g])
    np.testing.assert_allclose(got, want, **tolerance(np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_unsupported_dtypes_fall_back_or_raise_when_forced(any_size, dtype):
    params, grads = small_problem(dtype)
    state = qhadam(1e-2).init(params)
    assert not uses_ffi(qhadam(1e-2).update, grads, state, params)
    u, _ = jax.jit(qhadam(1e-2).update)(grads, state, params)
    assert u["w"].dtype == dtype
    with pytest.raises(TypeError, match=r"Invalid ffi=True: .*(bfloat16|float16)"):
        jax.jit(qhadam(1e-2, ffi=True).update)(grads, state, params)


def test_eager_auto_is_traced_and_forced_eager_runs_the_ffi(any_size):
    params, grads = small_problem(jnp.float32, 8)
    outs = {}
    for ffi in (None, True, False):
        opt = qhm(0.1, 0.9, 0.7, 0.05, "direct", ffi=ffi)
        outs[ffi] = opt.update(grads, opt.init(params), params)[0]["w"]
    np.testing.assert_allclose(outs[True], outs[False], **tolerance(np.float32))
    np.testing.assert_array_equal(outs[None], outs[False])


@pytest.mark.parametrize("value", ["yes", 1, 0.0, np.bool_(True)], ids=repr)
@pytest.mark.parametrize("make", [qhadam, lambda lr, **kw: qhm(lr, 0.9, 0.7, **kw)],
                         ids=["qhadam", "qhm"])
def test_bad_ffi_argument(make, value):
    """Only None, True and False (by identity: 1 == True and 0.0 == False are not flags)."""
    with pytest.raises(TypeError, match=rf"Invalid ffi: {re.escape(repr(value))}"):
        make(1e-3, ffi=value)


# ----------------------------------------------------------------------------------------------
# Inside optax: chain, inject_hyperparams, MultiSteps; a jitted training loop with donation
# ----------------------------------------------------------------------------------------------
def run_loop(opt, params, steps=12):
    state, update = opt.init(params), jax.jit(opt.update)
    for t in range(steps):
        g = jax.tree.map(lambda p: jnp.sin(3 * p + t) - 0.2 * p, params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("wrap", ["chain", "inject_hyperparams", "multisteps"])
def test_inside_optax_wrappers(any_size, wrap):
    params = {"a": jnp.linspace(-1, 1, 40, dtype=jnp.float32).reshape(5, 8),
              "b": jnp.linspace(0, 1, 3, dtype=jnp.float32)}

    def make(ffi):
        if wrap == "chain":
            return optax.chain(optax.clip_by_global_norm(1.0),
                               qhadam(optax.linear_schedule(0.05, 0.01, 10), nus=(0.7, 1.0),
                                      ffi=ffi))
        if wrap == "inject_hyperparams":
            return optax.inject_hyperparams(qhadam, static_args=("ffi",))(
                learning_rate=0.05, b1=0.8, nu1=0.7, weight_decay=0.01, ffi=ffi)
        return optax.MultiSteps(qhm(0.1, 0.9, 0.7, ffi=ffi), every_k_schedule=3)

    got, state = run_loop(make(None), params)
    want, want_state = run_loop(make(False), params)
    assert uses_ffi(make(None).update, params, make(None).init(params), params)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], **tolerance(np.float32))
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    assert not np.allclose(got["a"], params["a"])


def test_jitted_training_loop_with_donated_state(any_size):
    """One jit for loss, grad, update and apply, params and state donated."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((64, 1)), jnp.float32)
    params0 = {"w": jnp.asarray(0.1 * rng.standard_normal((16, 1)), jnp.float32),
               "b": jnp.zeros((1,), jnp.float32)}

    def train(ffi, steps=30):
        opt = qhadam(0.05, nus=(0.7, 1.0), weight_decay=1e-3, ffi=ffi)

        def step(params, state):
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        jitted = jax.jit(step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, params0)
        state = opt.init(params)
        text = jitted.lower(params, state).as_text()
        losses = []
        for _ in range(steps):
            old_state = state
            params, state, loss = jitted(params, state)
            losses.append(float(loss))
        donated = all(leaf.is_deleted() for leaf in jax.tree.leaves(old_state))
        return params, losses, text, donated

    got, losses, text, donated = train(None)
    want, want_losses, want_text, _ = train(False)
    assert "uniopt_qhadam" in text and "uniopt_qhadam" not in want_text
    assert donated
    assert losses[-1] < 0.8 * losses[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for k in got:  # 30 steps of size ~lr = 0.05: a few ulps of the step, accumulated
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Processes: nothing registered at import; a warm cache loads the handlers
# ----------------------------------------------------------------------------------------------
def run_python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (FFI size thresholds 0, then ``env``); the JSON of
    its last line."""
    env = dict(os.environ, UNIOPT_JAX_FFI_MIN_SIZE="0", UNIOPT_JAX_FFI_APPLY_MIN_SIZE="0", **env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_registers_nothing_until_first_use():
    result = run_python("""
        import json
        import jax, jax.numpy as jnp
        import uniopt.adapters.jax as ujax
        from uniopt.adapters.jax import _ffi
        from uniopt.kernels import qh_ffi
        before = sorted(_ffi.registered())
        handlers = (qh_ffi.qhadam_handler, qh_ffi.qhm_handler, qh_ffi.qhadam_apply_handler,
                    qh_ffi.qhm_apply_handler)
        compiled = sum(h.cache_info().currsize for h in handlers)
        opt = ujax.qhadam(1e-3)
        params = {"w": jnp.ones(4)}
        jax.jit(opt.update)(params, opt.init(params), params)
        after = sorted(_ffi.registered())
        jax.jit(lambda g, s, p: ujax.update_and_apply(opt, g, s, p))(params, opt.init(params),
                                                                     params)
        print(json.dumps({"before": before, "compiled": compiled, "after": after,
                          "after_apply": sorted(_ffi.registered())}))
    """)
    assert result == {"before": [], "compiled": 0, "after": ["qhadam"],
                      "after_apply": ["qhadam", "qhadam_apply"]}


def test_fresh_process_loads_the_handlers_from_the_warm_cache():
    code = """
        import json, time
        import jax, jax.numpy as jnp, optax
        from uniopt.adapters.jax import qhadam, qhm, update_and_apply
        from uniopt.kernels import qh_ffi
        params = {"w": jnp.linspace(-1.0, 1.0, 6)}
        out = []
        for opt in (qhadam(0.1, nus=(0.7, 1.0), ffi=True), qhm(0.1, 0.9, 0.7, ffi=True)):
            u, _ = jax.jit(opt.update)(params, opt.init(params), params)
            out.append([float(v) for v in u["w"]])
            p, _ = jax.jit(lambda g, s, p: update_and_apply(opt, g, s, p))(
                params, opt.init(params), params)
            out.append([float(v) for v in p["w"]])
        hits = [h().cache_hits for h in (qh_ffi.qhadam_handler, qh_ffi.qhm_handler,
                                         qh_ffi.qhadam_apply_handler, qh_ffi.qhm_apply_handler)]
        print(json.dumps({"hits": hits, "out": out, "w": [float(v) for v in params["w"]]}))
    """
    first = run_python(code)  # warms the cache if another test has not
    second = run_python(code)
    assert second["hits"] == [1, 1, 1, 1]
    assert second["out"] == first["out"]
    w = np.linspace(-1.0, 1.0, 6, dtype=np.float32)
    # first QHAdam step with nus=(0.7, 1): (0.7 g + 0.3 g) / (|g| + eps) = sign(g)
    np.testing.assert_allclose(second["out"][0], -0.1 * w / (np.abs(w) + 1e-8), rtol=1e-6)
    for k in (0, 2):  # the fused steps: p + u
        np.testing.assert_array_equal(np.float32(second["out"][k + 1]),
                                      np.float32(second["w"]) + np.float32(second["out"][k]))


# ----------------------------------------------------------------------------------------------
# The asv module's contenders (asv_bench/benchmarks/jax_ffi.py)
# ----------------------------------------------------------------------------------------------
def test_asv_contenders_step_and_agree(monkeypatch):
    monkeypatch.setenv("UNIOPT_BENCH_PIN", "0")  # importing the suite must not pin pytest
    from benchmarks import contenders, jax_ffi

    data = contenders.Data.make(contenders.layout_sizes(3000, "model"))
    steps = {name: build(data) for name, build in jax_ffi.CASES.items()}
    results = {name: step() for name, step in steps.items()}
    ffi_params, traced_params, fused_params = (results[k][0] for k in (
        "uniopt_jax_qhadam_ffi", "uniopt_jax_qhadam_traced", "uniopt_jax_qhadam_fused"))
    assert len(ffi_params) == len(fused_params) == contenders.MODEL_TENSORS
    for a, b in zip(fused_params, ffi_params):  # two steps each: the fused one is the pair
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(jax_ffi.SCRIPT_CASES) >= {"optax_adam", "uniopt_torch_qhadam", *jax_ffi.CASES}
    for a, b, p0 in zip(ffi_params, traced_params, data.params):
        np.testing.assert_allclose(a, b, **tolerance(np.float32))
        assert not np.array_equal(np.asarray(a), p0)  # the step moved the parameters
    for a, p0 in zip(results["jax_floor"][0], data.params):  # the floor computes nothing
        np.testing.assert_array_equal(np.asarray(a), p0)


# ----------------------------------------------------------------------------------------------
# update_and_apply: the fused step (parameters and state updated in place by one FFI call)
# ----------------------------------------------------------------------------------------------
APPLY_TARGETS = ("uniopt_qhadam_apply", "uniopt_qhm_apply")


def fused_calls(text: str) -> int:
    return sum(text.count(f"@{name}(") for name in APPLY_TARGETS)


def update_calls(text: str) -> int:
    return sum(text.count(f"@{name}(") for name in TARGETS)


def pair(tx, grads, state, params):
    """The unfused reference: ``tx.update`` then ``optax.apply_updates``."""
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def run_steps(prob, tx, step_fn, steps=STEPS, start=0, params=None, state=None):
    """``steps`` jitted steps of ``step_fn(tx, grads, state, params) -> (params, state)``."""
    params = {k: jnp.asarray(v) for k, v in (params or prob.p0).items()}
    state = tx.init(params) if state is None else state
    step = jax.jit(lambda g, s, p: step_fn(tx, g, s, p))
    for t in range(start, start + steps):
        grads = {k: jnp.asarray(v) for k, v in prob.grad(t, params).items()}
        params, state = step(grads, state, params)
    return {k: np.asarray(v) for k, v in params.items()}, state


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_update_and_apply_is_one_fused_call_equal_to_update_then_apply(family, setting, dtype):
    """Bit for bit the FFI update + apply_updates pair (both dtypes); float64: the NumPy core's
    parameters and state bit for bit unless decay is decoupled (optax's p + u order); float32:
    one step within 4 ulps of the traced path."""
    with jax.enable_x64(dtype == np.float64):
        prob = Problem(dtype)
        tx = recipe(family, setting, ffi=True)
        params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
        state = tx.init(params)
        text = jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p)).lower(
            params, state, params).as_text()
        assert fused_calls(text) == 1 and update_calls(text) == 0  # one call for all leaves
        got, got_state = run_steps(prob, tx, ujax.update_and_apply)
        want, want_state = run_steps(prob, tx, pair)
        for k in prob.keys:
            assert got[k].dtype == dtype
            np.testing.assert_array_equal(got[k], want[k])
        for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        fields = ["momentum_buffer"] if family == "qhm" else ["exp_avg", "exp_avg_sq"]
        inner = [s for s in got_state if hasattr(s, fields[0])][0]
        if dtype == np.float64:
            core_params, core = prob.run_core(CORE[family], setting)
            for i, k in enumerate(prob.keys):
                if decoupled(setting):
                    np.testing.assert_allclose(got[k], core_params[k], **tolerance(np.float64))
                else:
                    np.testing.assert_array_equal(got[k], core_params[k])
                    for field in fields:
                        np.testing.assert_array_equal(np.asarray(getattr(inner, field)[k]),
                                                      core.state[i][field])
            return
        traced_tx = recipe(family, setting, ffi=False)
        mid, mid_state = run_steps(prob, traced_tx, pair, steps=10)
        one = {}
        for name, t in (("fused", tx), ("traced", traced_tx)):
            one[name] = run_steps(prob, t, ujax.update_and_apply, steps=1, start=10, params=mid,
                                  state=mid_state)
        for a, b in zip(jax.tree.leaves(one["fused"]), jax.tree.leaves(one["traced"])):
            if jnp.issubdtype(np.asarray(a).dtype, jnp.floating):
                assert ulps(a, b).max() <= 4, (ulps(a, b).max(), a, b)
        assert not np.array_equal(one["fused"][0][prob.keys[0]], mid[prob.keys[0]])


def apply_problem(n=40, dtype=jnp.float32):
    params = {"a": jnp.linspace(-1, 1, n, dtype=dtype).reshape(-1, 4) if n % 4 == 0
              else jnp.linspace(-1, 1, n, dtype=dtype),
              "b": jnp.linspace(0.1, 1, 3, dtype=dtype)}
    return params, jax.tree.map(lambda p: jnp.sin(3 * p) - 0.2, params)


def lowered(tx, params, grads):
    return jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p)).lower(
        grads, tx.init(params), params).as_text()


@pytest.mark.parametrize("case", ["optax_adam", "traced", "chain", "inject_hyperparams",
                                  "multisteps", "nonfinite_skip"])
def test_update_and_apply_falls_back_to_update_then_apply(any_size, monkeypatch, case):
    """Anything but a bare uniopt QH transform on the FFI path: tx.update + apply_updates."""
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)
    params, grads = apply_problem()
    tx = {"optax_adam": lambda: optax.adam(0.05),
          "traced": lambda: qhadam(0.05, nus=(0.7, 1.0), ffi=False),
          "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                       qhadam(0.05, nus=(0.7, 1.0))),
          "inject_hyperparams": lambda: optax.inject_hyperparams(qhm, static_args=("ffi",))(
              learning_rate=0.1, momentum=0.9, nu=0.7),
          "multisteps": lambda: optax.MultiSteps(qhm(0.1, 0.9, 0.7), every_k_schedule=2),
          "nonfinite_skip": lambda: qhadam(0.05, nus=(0.7, 1.0), nonfinite="skip")}[case]()
    assert fused_calls(lowered(tx, params, grads)) == 0
    outs = []
    for fn in (ujax.update_and_apply, pair):
        p, s, step = params, tx.init(params), jax.jit(lambda g, s, p, fn=fn: fn(tx, g, s, p))
        for t in range(4):
            p, s = step(jax.tree.map(lambda x: jnp.cos(x + t), p), s, p)
        outs.append((p, s))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(outs[0][0]["a"]), np.asarray(params["a"]))
    if case == "nonfinite_skip":  # the policy holds: a NaN gradient changes nothing
        p, s = outs[0]
        bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), grads)
        new_p, new_s = jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p))(bad, s, p)
        for a, b in zip(jax.tree.leaves((new_p, new_s.inner_state)),
                        jax.tree.leaves((p, s.inner_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(new_s.nonfinite_skips) == int(s.nonfinite_skips) + 1


def test_update_and_apply_auto_threshold_eager_and_dtypes(monkeypatch):
    """ffi=None: fused from APPLY_MIN_SIZE elements under jit; eager, other dtypes and params of
    another dtype than their gradients take the pair; ffi=True with those raises."""
    params, grads = apply_problem(40)  # 43 elements
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 43)
    assert fused_calls(lowered(qhadam(1e-2), params, grads)) == 1
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 44)
    assert fused_calls(lowered(qhadam(1e-2), params, grads)) == 0
    assert fused_calls(lowered(qhm(0.1, 0.9, 0.7, ffi=True), params, grads)) == 1
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)
    tx = qhm(0.1, 0.9, 0.7, 0.05, "direct")
    eager = ujax.update_and_apply(tx, grads, tx.init(params), params)  # eager: traced pair
    want = pair(qhm(0.1, 0.9, 0.7, 0.05, "direct", ffi=False), grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert fused_calls(lowered(qhadam(1e-2), half, half)) == 0
    mixed = jax.tree.map(lambda x: x.astype(jnp.float16), params)  # params f16, grads f32
    assert fused_calls(lowered(qhadam(1e-2), mixed, grads)) == 0
    for p, g in ((half, half), (mixed, grads)):
        with pytest.raises(TypeError, match=r"Invalid ffi=True"):
            lowered(qhadam(1e-2, ffi=True), p, g)


def test_update_and_apply_under_grad_and_vmap(monkeypatch):
    """grad/vmap tracing takes the traced pair (ffi=None); a forced fused step differentiates
    as the traced path does and loops under vmap."""
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)
    params, grads = apply_problem(9)

    def loss(lr, ffi):  # (the learning rate is a traced scalar: not checked, as documented)
        tx = qhadam(lr, nus=(0.7, 1.0), weight_decay=0.1, ffi=ffi)
        p, s = params, tx.init(params)
        for _ in range(3):
            p, s = ujax.update_and_apply(tx, jax.tree.map(lambda x: 2 * x - 0.3, p), s, p)
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)

    auto_text = jax.jit(jax.grad(lambda lr: loss(lr, None))).lower(jnp.float32(0.05)).as_text()
    assert fused_calls(auto_text) == 0 and update_calls(auto_text) == 0
    # forced: the call's JVP is the traced path's (which also gives the primal under grad)
    value, grad = jax.jit(jax.value_and_grad(lambda lr: loss(lr, True)))(jnp.float32(0.05))
    want_value, want_grad = jax.jit(jax.value_and_grad(lambda lr: loss(lr, False)))(
        jnp.float32(0.05))
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5)
    assert float(grad) != 0.0

    g = jnp.stack([grads["b"] * s for s in (1.0, -2.0, 0.5)])
    outs = {}
    for ffi in (None, True, False):
        tx = qhm(0.1, 0.9, 0.7, ffi=ffi)
        state = tx.init(params)
        fn = jax.vmap(lambda gi: ujax.update_and_apply(tx, {**grads, "b": gi}, state, params)[0])
        text = jax.jit(fn).lower(g).as_text()
        assert fused_calls(text) == (1 if ffi else 0)
        outs[ffi] = jax.jit(fn)(g)
    for ffi in (None, True):
        for a, b in zip(jax.tree.leaves(outs[ffi]), jax.tree.leaves(outs[False])):
            np.testing.assert_allclose(a, b, **tolerance(np.float32))


def test_update_and_apply_training_loop_donated_in_place_without_retracing(monkeypatch):
    """One jit for loss, grad and the fused step, params and state donated: the outputs live in
    the donated buffers (same addresses), the step is traced once, and it trains as the traced
    path does."""
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((64, 1)), jnp.float32)
    params0 = {"w": jnp.asarray(0.1 * rng.standard_normal((16, 1)), jnp.float32),
               "b": jnp.zeros((1,), jnp.float32)}

    def train(ffi, steps=30):
        tx = qhadam(0.05, nus=(0.7, 1.0), weight_decay=1e-3, ffi=ffi)
        traces = []

        def step(params, state):
            traces.append(1)  # runs at trace time only
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
            params, state = ujax.update_and_apply(tx, grads, state, params)
            return params, state, loss

        jitted = jax.jit(step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, params0)
        state = jax.tree.map(jnp.copy, tx.init(params))
        text = jitted.lower(params, state).as_text()
        losses, same_buffers = [], []
        for _ in range(steps):
            before = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves((params, state))
                      if leaf.size > 1]
            old = (params, state)
            params, state, loss = jitted(params, state)
            after = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves((params, state))
                     if leaf.size > 1]
            same_buffers.append(before == after)
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
            losses.append(float(loss))
        return params, losses, text, same_buffers, len(traces)

    got, losses, text, same, traces = train(None)
    want, want_losses, want_text, _, _ = train(False)
    assert fused_calls(text) == 1 and fused_calls(want_text) == 0
    assert all(same) and len(same) == 30  # p, m, v (16 + 1 + 16 + 1 + 16 + 1) in place
    assert traces == 1
    assert losses[-1] < 0.8 * losses[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-5)


def test_update_and_apply_docstring_example_runs(monkeypatch):
    import doctest

    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)  # (the example takes the fused call)
    tx = qhadam(0.1, nus=(0.7, 1.0))
    params = {"w": jnp.array([1.0, -2.0])}
    assert fused_calls(lowered(tx, params, params)) == 1
    result = doctest.testmod(_ffi, raise_on_error=False, report=True)
    assert result.attempted > 0 and result.failed == 0


def test_update_and_apply_with_gradients_of_another_shape_takes_the_pair():
    """A gradient that broadcasts against its parameter is not the handlers' layout (they
    would read past it): even ffi=True takes the traced pair, which broadcasts as optax does."""
    params = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)}
    grads = {"w": jnp.asarray([0.3], jnp.float32)}
    tx = qhm(0.1, 0.9, 0.7, 0.05, "direct", ffi=True)
    assert fused_calls(lowered(tx, params, grads)) == 0
    got = jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p))(grads, tx.init(params),
                                                                       params)
    want = pair(qhm(0.1, 0.9, 0.7, 0.05, "direct", ffi=False), grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape == (5,)
        np.testing.assert_allclose(a, b, **tolerance(np.float32))


def test_update_and_apply_leaves_of_two_dtypes_scalars_and_empty_leaves(x64):
    """One fused call per dtype; 0-d and empty leaves; bit for bit the FFI pair."""
    params = {"a": jnp.linspace(-1, 1, 7, dtype=jnp.float32), "b": jnp.arange(5.0) - 2,
              "s": jnp.asarray(0.5), "e": jnp.zeros((0, 3), jnp.float32)}
    tx = qhadam(0.05, nus=(0.7, 0.9), weight_decay=0.1, ffi=True)
    assert fused_calls(lowered(tx, params, params)) == 2
    outs = []
    for fn in (ujax.update_and_apply, pair):
        p, s, step = params, tx.init(params), jax.jit(lambda g, s, p, fn=fn: fn(tx, g, s, p))
        for _ in range(5):
            p, s = step(jax.tree.map(lambda x: 3 * x - 1, p), s, p)
        outs.append((p, s))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert outs[0][0]["a"].dtype == jnp.float32 and outs[0][0]["b"].dtype == jnp.float64
    assert not np.array_equal(np.asarray(outs[0][0]["s"]), np.asarray(params["s"]))
