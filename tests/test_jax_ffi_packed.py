"""``uniopt.adapters.jax.flatten``: optax.flatten's packed state, stepped by one fused FFI call.

Oracles: the per-leaf fused step (``update_and_apply`` of the same transform, itself checked
against the NumPy core in test_jax_ffi.py), the NumPy core (float64, bit for bit), and
``optax.flatten`` of the traced transform (``update`` + ``apply_updates``), whose state layout
must be ours exactly. Which path a step took is read from the lowered module.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import uniopt.adapters.jax as ujax
from uniopt.adapters.jax import _ffi, flatten, qhadam, qhm
from conftest import tolerance
from test_jax_ffi import CASES, CORE, IDS, decoupled, recipe, run_steps, ulps
from test_jax_qh import Problem

PACKED = ("uniopt_qhadam_apply_packed", "uniopt_qhm_apply_packed")
OTHERS = ("uniopt_qhadam_apply(", "uniopt_qhm_apply(", "uniopt_qhadam(", "uniopt_qhm(")


def packed_calls(text: str) -> int:
    return sum(text.count(f"@{name}(") for name in PACKED)


def other_calls(text: str) -> int:
    return sum(text.count(f"@{name}") for name in OTHERS)


def lowered(tx, grads, state, params) -> str:
    return jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p)).lower(
        grads, state, params).as_text()


def pair(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def fields(family):
    return ["momentum_buffer"] if family == "qhm" else ["exp_avg", "exp_avg_sq"]


def block(state, family):
    return [s for s in state if hasattr(s, fields(family)[0])][0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_packed_step_is_one_call_equal_to_the_per_leaf_fused_step(family, setting, dtype):
    """One packed call for all leaves; parameters bit for bit the per-leaf fused step's, and
    the flat state its per-leaf state concatenated in pytree order; float64: the NumPy core's
    parameters (bit for bit unless decay is decoupled)."""
    with jax.enable_x64(dtype == np.float64):
        prob = Problem(dtype)
        packed_tx, leaf_tx = flatten(recipe(family, setting, True)), recipe(family, setting, True)
        params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
        text = lowered(packed_tx, params, packed_tx.init(params), params)
        assert packed_calls(text) == 1 and other_calls(text) == 0, text[:2000]
        got, got_state = run_steps(prob, packed_tx, ujax.update_and_apply)
        want, want_state = run_steps(prob, leaf_tx, ujax.update_and_apply)
        for k in prob.keys:
            assert got[k].dtype == dtype
            np.testing.assert_array_equal(got[k], want[k])
        got_block, want_block = block(got_state, family), block(want_state, family)
        for field in fields(family):
            flat = np.asarray(getattr(got_block, field))
            assert flat.shape == (sum(np.size(v) for v in prob.p0.values()),)
            np.testing.assert_array_equal(flat, np.concatenate(
                [np.ravel(np.asarray(x)) for x in jax.tree.leaves(getattr(want_block, field))]))
        if family == "qhadam":
            assert float(got_block.beta1_weight) == float(want_block.beta1_weight)
        if dtype == np.float64:
            core_params, _ = prob.run_core(CORE[family], setting)
            for k in prob.keys:
                if decoupled(setting):
                    np.testing.assert_allclose(got[k], core_params[k], **tolerance(np.float64))
                else:
                    np.testing.assert_array_equal(got[k], core_params[k])


@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_packed_step_matches_optax_flatten_of_the_traced_transform(family, setting):
    """Same state structure as optax.flatten(traced transform); float32 runs close, one step
    from a shared mid-run state within 4 ulps; that state steps on either path."""
    prob = Problem(np.float32)
    ours, theirs = flatten(recipe(family, setting, True)), optax.flatten(recipe(family, setting, False))
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    assert (jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params)))
    got, _ = run_steps(prob, ours, ujax.update_and_apply)
    want, _ = run_steps(prob, theirs, pair)
    for k in prob.keys:
        np.testing.assert_allclose(got[k], want[k], **tolerance(np.float32))
    mid, mid_state = run_steps(prob, theirs, pair, steps=10)  # optax.flatten's own state
    one = {name: run_steps(prob, tx, fn, steps=1, start=10, params=mid, state=mid_state)
           for name, tx, fn in (("packed", ours, ujax.update_and_apply), ("traced", theirs, pair))}
    for a, b in zip(jax.tree.leaves(one["packed"]), jax.tree.leaves(one["traced"])):
        if jnp.issubdtype(np.asarray(a).dtype, jnp.floating):
            assert ulps(a, b).max() <= 4, (ulps(a, b).max(), a, b)
    assert not np.array_equal(one["packed"][0][prob.keys[0]], mid[prob.keys[0]])


def test_packed_state_steps_in_place_under_donation():
    """A jitted loop with donated params and state: XLA hands the buffers to the call and the
    results live where the inputs were (parameters and the two flat state buffers)."""
    tx = flatten(qhadam(0.05, nus=(0.7, 1.0), ffi=True))
    params = {"a": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(8, 8),
              "b": jnp.linspace(0.5, 1.0, 5, dtype=jnp.float32)}
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))
    step = jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p), donate_argnums=(1, 2))
    reference = (jax.tree.map(lambda x: jnp.array(x, copy=True), params), tx.init(params))
    for _ in range(5):
        grads = jax.tree.map(lambda p: jnp.sin(3 * p), params)
        ref_grads = jax.tree.map(lambda p: jnp.sin(3 * p), reference[0])
        before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state)) if x.size > 1]
        params, state = step(grads, state, params)
        after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state)) if x.size > 1]
        assert before == after
        reference = jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p))(
            ref_grads, *reference[::-1])
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len([x for x in jax.tree.leaves(state) if x.size > 1]) == 2


def problem(dtypes=(jnp.float32, jnp.float32)):
    params = {"a": jnp.linspace(-1, 1, 12, dtype=dtypes[0]).reshape(3, 4),
              "b": jnp.linspace(0.1, 1, 3, dtype=dtypes[1])}
    return params, jax.tree.map(lambda p: jnp.sin(3 * p) - 0.2, params)


@pytest.mark.parametrize("case", ["mixed_dtypes", "traced_ffi_false", "eager", "optax_adam"])
def test_packed_falls_back_to_optax_flatten(case):
    """Mixed dtypes (promoted by the packing), ffi=False, eager calls and other transforms take
    optax.flatten's update + apply_updates, with its numbers."""
    with jax.enable_x64(case == "mixed_dtypes"):
        params, grads = problem((jnp.float32, jnp.float64) if case == "mixed_dtypes" else
                                (jnp.float32, jnp.float32))
        make = {"optax_adam": lambda: optax.adam(0.05),
                "traced_ffi_false": lambda: qhadam(0.05, nus=(0.7, 1.0), ffi=False)}.get(
            case, lambda: qhadam(0.05, nus=(0.7, 1.0), ffi=True))
        ours, theirs = flatten(make()), optax.flatten(make())
        if case != "eager":
            assert packed_calls(lowered(ours, grads, ours.init(params), params)) == 0
        outs = []
        for tx, fn in ((ours, ujax.update_and_apply), (theirs, pair)):
            p, s = params, tx.init(params)
            step = (lambda g, s, p, tx=tx, fn=fn: fn(tx, g, s, p))
            step = step if case == "eager" else jax.jit(step)
            for _ in range(3):
                p, s = step(grads, s, p)
            outs.append(jax.tree.leaves((p, s)))
        for a, b in zip(*outs):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(outs[0][0]), np.asarray(params["a"]))


def test_packed_under_grad_and_vmap_takes_the_traced_path():
    """Differentiating through a packed step, or batching it, gives optax.flatten's numbers."""
    params, grads = problem()
    ours = flatten(qhm(0.1, 0.9, 0.7, weight_decay=0.01, ffi=True))
    theirs = optax.flatten(qhm(0.1, 0.9, 0.7, weight_decay=0.01, ffi=False))

    def loss(scale, tx, fn):
        p, s = fn(tx, jax.tree.map(lambda g: scale * g, grads), tx.init(params), params)
        p, s = fn(tx, grads, s, p)
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

    for wrap in (lambda f: f, jax.jit):
        d_ours = wrap(jax.grad(lambda c: loss(c, ours, ujax.update_and_apply)))(1.5)
        d_theirs = jax.grad(lambda c: loss(c, theirs, pair))(1.5)
        np.testing.assert_allclose(d_ours, d_theirs, **tolerance(np.float32))
        assert float(d_ours) != 0.0
    scales = jnp.array([0.5, 1.0, 2.0], jnp.float32)
    batched = jax.jit(jax.vmap(lambda c: loss(c, ours, ujax.update_and_apply)))(scales)
    want = [loss(c, theirs, pair) for c in scales]
    np.testing.assert_allclose(batched, want, **tolerance(np.float32))


def test_packed_ffi_true_refuses_unsupported_dtypes():
    params, grads = problem()
    tx = flatten(qhadam(0.05, nus=(0.7, 1.0), ffi=True))
    half = jax.tree.map(lambda x: x.astype(jnp.float16), (params, grads))
    with pytest.raises(TypeError, match="Invalid ffi=True"):
        jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p))(
            half[1], tx.init(half[0]), half[0])


def test_packed_handler_leaves_an_unknown_layout_untouched():
    """A flat state buffer whose size is not the leaves' total: the handler writes nothing
    (every result is its aliased input)."""
    grads = [jnp.ones(4, jnp.float32), jnp.ones(3, jnp.float32)]
    params = [jnp.arange(4, dtype=jnp.float32), jnp.arange(3, dtype=jnp.float32)]
    hyper = jnp.array([0, 1, 0, 0.9, 0.1, 0.7, 0.3, -0.1], jnp.float32)  # QHM layout
    for size in (6, 8):  # one short, one long
        buf = jnp.full(size, 0.5, jnp.float32)
        out, (new_buf,), _ = jax.jit(lambda h, g, p, b: _ffi.call("qhm", h, g, p, [[b]],
                                                                   packed=True))(
            hyper, grads, params, buf)
        for a, b in zip(out, params):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(new_buf[0] if isinstance(new_buf, list)
                                                 else new_buf), np.full(size, 0.5, np.float32))
    buf = jnp.full(7, 0.5, jnp.float32)  # the right size: the step runs
    out, _, _ = jax.jit(lambda h, g, p, b: _ffi.call("qhm", h, g, p, [[b]], packed=True))(
        hyper, grads, params, buf)
    assert not np.array_equal(np.asarray(out[0]), np.asarray(params[0]))


def test_packed_scalars_and_empty_leaves_are_one_call():
    """0-d and empty leaves: their offsets in the flat state are right (bit for bit the
    per-leaf fused step, whose state is concatenated in pytree order)."""
    params = {"a": jnp.linspace(-1, 1, 7, dtype=jnp.float32), "e": jnp.zeros((0, 3), jnp.float32),
              "s": jnp.asarray(0.5, jnp.float32), "z": jnp.arange(6.0, dtype=jnp.float32) - 2}
    packed_tx = flatten(qhadam(0.05, nus=(0.7, 0.9), weight_decay=0.1, ffi=True))
    leaf_tx = qhadam(0.05, nus=(0.7, 0.9), weight_decay=0.1, ffi=True)
    assert packed_calls(lowered(packed_tx, params, packed_tx.init(params), params)) == 1
    outs = []
    for tx in (packed_tx, leaf_tx):
        p, s = params, tx.init(params)
        step = jax.jit(lambda g, s, p, tx=tx: ujax.update_and_apply(tx, g, s, p))
        for _ in range(5):
            p, s = step(jax.tree.map(lambda x: 3 * x - 1, p), s, p)
        outs.append((p, block(s, "qhadam")))
    for k in params:
        np.testing.assert_array_equal(np.asarray(outs[0][0][k]), np.asarray(outs[1][0][k]))
    flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(outs[1][1].exp_avg_sq)])
    np.testing.assert_array_equal(np.asarray(outs[0][1].exp_avg_sq), flat)
    assert not np.array_equal(np.asarray(outs[0][0]["s"]), np.asarray(params["s"]))


def test_flatten_of_a_chain_is_optax_flatten():
    """A transform without the packed step (here a chain around qhadam): optax.flatten's."""
    params, grads = problem()
    make = lambda: optax.chain(optax.clip_by_global_norm(1.0), qhadam(0.05, nus=(0.7, 1.0)))
    ours, theirs = flatten(make()), optax.flatten(make())
    assert packed_calls(lowered(ours, grads, ours.init(params), params)) == 0
    a = jax.jit(lambda g, s, p: ujax.update_and_apply(ours, g, s, p))(grads, ours.init(params), params)
    b = jax.jit(lambda g, s, p: pair(theirs, g, s, p))(grads, theirs.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_asv_packed_contender_equals_the_fused_one(monkeypatch):
    monkeypatch.setenv("UNIOPT_BENCH_PIN", "0")  # importing the suite must not pin pytest
    from benchmarks import contenders

    data = contenders.Data.make(contenders.layout_sizes(3000, "model"))
    packed, fused = (contenders.CASES[k](data)() for k in ("uniopt_jax_qhadam_packed",
                                                           "uniopt_jax_qhadam_fused"))
    assert len(packed[0]) == contenders.MODEL_TENSORS
    for a, b, p0 in zip(packed[0], fused[0], data.params):  # two steps each
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), p0)


def test_fresh_process_registers_on_first_use_and_loads_the_warm_cache():
    from test_jax_ffi import run_python

    code = """
        import json
        import jax, jax.numpy as jnp
        from uniopt.adapters.jax import _ffi, flatten, qhadam, qhm, update_and_apply
        from uniopt.kernels import qh_ffi
        handlers = (qh_ffi.qhadam_apply_packed_handler, qh_ffi.qhm_apply_packed_handler)
        before = sorted(_ffi.registered()), sum(h.cache_info().currsize for h in handlers)
        params = {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(2)}
        out = []
        for opt in (flatten(qhadam(0.1, nus=(0.7, 1.0))), flatten(qhm(0.1, 0.9, 0.7))):
            p, _ = jax.jit(lambda g, s, p: update_and_apply(opt, g, s, p))(
                params, opt.init(params), params)
            out.append([float(v) for v in jnp.concatenate([p["a"], p["b"]])])
        print(json.dumps({"before": before, "after": sorted(_ffi.registered()), "out": out,
                          "hits": [h().cache_hits for h in handlers]}))
    """
    first = run_python(code)  # warms the cache if another test has not
    second = run_python(code)
    assert first["before"] == [[], 0]
    assert first["after"] == ["qhadam_apply_packed", "qhm_apply_packed"]
    assert second["hits"] == [1, 1] and second["out"] == first["out"]
    w = np.concatenate([np.linspace(-1.0, 1.0, 6), np.ones(2)]).astype(np.float32)
    # first QHAdam step with nus=(0.7, 1), g = p: p - 0.1 * sign(p)
    np.testing.assert_allclose(second["out"][0], w - 0.1 * w / (np.abs(w) + 1e-8), rtol=1e-6)
