"""iALM's dual step through XLA's FFI (``uniopt.adapters.jax.ialm(..., ffi=...)``; the Numba
handler of ``uniopt.kernels.ialm_ffi`` inside ``jax.jit`` on CPU).

Oracles: the NumPy core ``uniopt.iALM`` (the same kernel, ``ialm_dual_step_``: multipliers,
momentum buffers and step sizes equal bit for bit, float64 and float32, given the same ``beta``)
and the traced path of the JAX face (``ffi=False``). Which path a step took is read from the
lowered module (the FFI target's name). The parity data are those of tests/test_jax_ialm.py: four
groups (equality and inequality, momentum heavy-ball and EMA, clamps that bind, sigma > 1).
"""

from __future__ import annotations

import importlib
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import uniopt
from uniopt.adapters.jax import _ffi, ialm
from conftest import tolerance
from test_jax_ffi import run_python, ulps
from test_jax_ialm import (C_SEQ, CTOL, GROUPS, LOSS_SEQ, NAMES, PARITY, STEPS,
                           _ids, _init_for, make_numpy)

TARGET = "uniopt_ialm"
ialm_module = importlib.import_module("uniopt.adapters.jax.ialm")


@pytest.fixture
def any_size(monkeypatch):
    """Let ``ffi=None`` take the FFI path for the small test problems."""
    monkeypatch.setattr(ialm_module, "FFI_MIN_SIZE", 0)


def ffi_calls(fn, *args) -> int:
    """How many custom calls to our target jit(fn)(*args) lowers to."""
    return len(re.findall(rf"custom_call @{TARGET}\b", jax.jit(fn).lower(*args).as_text()))


def make_jax(dtype, penalty, ctol, ffi):
    """tests/test_jax_ialm.py's groups (per-group settings in each accepted form), with ``ffi``."""
    per = {h: [GROUPS[k][h] for k in NAMES] for h in GROUPS["g0"]}
    return ialm(beta=per["beta"], sigma=tuple(per["sigma"]),
                gamma={k: GROUPS[k]["gamma"] for k in NAMES}, penalty=penalty, ctol=ctol,
                dual_range={k: GROUPS[k]["dual_range"] for k in NAMES},
                momentum=per["momentum"], dampening=per["dampening"],
                is_ineq={k: GROUPS[k]["is_ineq"] for k in NAMES},
                init_duals=_init_for(dtype), ffi=ffi)


def constraints(step, dtype):
    return {k: jnp.asarray(C_SEQ[step][k].astype(dtype)) for k in NAMES}


def flat(tree):
    return [np.asarray(tree[k]).reshape(-1) for k in NAMES]


def run_jax(dtype, penalty, ctol, idiom, ffi, *, jit=True, on_step=None):
    """STEPS steps of the JAX face; per-step records of every state field and L."""
    t = make_jax(dtype, penalty, ctol, ffi)
    wrap = jax.jit if jit else (lambda f: f)
    update, lagrangian, forward_update = wrap(t.update), wrap(t.lagrangian), wrap(
        t.forward_update)
    state = t.init(constraints(0, dtype))
    records = []
    for step in range(STEPS):
        if on_step is not None:
            on_step(step, state)
        c = constraints(step, dtype)
        loss = jnp.asarray(dtype(LOSS_SEQ[step]))
        if idiom == "forward_update":
            value, state = forward_update(loss, c, state)
        else:
            value = lagrangian(loss, c, state)
            state = update(c, state)
        records.append(dict(duals=flat(state.duals), buffer=flat(state.momentum_buffer),
                            beta=flat(state.beta), stepsize=flat(state.stepsize),
                            L=float(value)))
    return records, state


def run_core_alongside(dtype, penalty, ctol, idiom, ffi=True, jit=True):
    """The JAX face (``ffi``) and the NumPy core side by side; float32: the core's ``beta`` is
    set to the JAX state's (float32, grown in float32) before each step, so both kernels get
    the same inputs."""
    opt = make_numpy(dtype, penalty, ctol)
    core = []

    def on_step(step, state):
        if dtype == np.float32:
            for g, b in zip(opt.param_groups, flat(state.beta)):
                g["beta"] = float(b[0])
        c = [C_SEQ[step][k].astype(dtype).reshape(-1) for k in NAMES]
        loss = dtype(LOSS_SEQ[step])
        if idiom == "forward_update":
            value = opt.forward_update(loss, c)
        else:
            value = opt.forward(loss, c)
            opt.update(c)
        core.append(dict(duals=[g["duals"].copy() for g in opt.param_groups],
                         buffer=[g["momentum_buffer"].copy() for g in opt.param_groups],
                         beta=[g["beta"] for g in opt.param_groups],
                         stepsize=[s["stepsize"] for s in opt.last_step], L=float(value)))

    records, state = run_jax(dtype, penalty, ctol, idiom, ffi, jit=jit, on_step=on_step)
    return core, records, state


def assert_bitwise_equal_to_core(core, records, dtype):
    for step, (a, b) in enumerate(zip(core, records)):
        for field in ("duals", "buffer"):
            for k, (x, y) in enumerate(zip(a[field], b[field])):
                assert x.dtype == y.dtype == dtype
                np.testing.assert_array_equal(y, x, err_msg=f"step {step} {field} group {k}")
        np.testing.assert_array_equal(np.concatenate(b["stepsize"]),
                                      np.array(a["stepsize"], dtype),
                                      err_msg=f"step {step} stepsize")
        np.testing.assert_allclose(b["L"], a["L"], **tolerance(dtype), err_msg=f"step {step} L")


# ----------------------------------------------------------------------------------------------
# Parity: the NumPy core (bit for bit), the traced path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", PARITY, ids=[_ids(c) for c in PARITY])
def test_float64_ffi_equals_numpy_core_bitwise(x64, case):
    penalty, ctol, idiom = case
    core, records, state = run_core_alongside(np.float64, penalty, ctol, idiom)
    assert_bitwise_equal_to_core(core, records, np.float64)
    for a, b in zip(core, records):  # beta grows traced, as the core grows it (beta *= sigma)
        assert [float(x[0]) for x in b["beta"]] == a["beta"]
    assert int(state.count) == STEPS and bool(state.last_finite)


@pytest.mark.parametrize("case", PARITY, ids=[_ids(c) for c in PARITY])
def test_float32_ffi_equals_numpy_core_bitwise(case):
    penalty, ctol, idiom = case
    with jax.enable_x64(False):
        core, records, state = run_core_alongside(np.float32, penalty, ctol, idiom)
        assert all(state.duals[k].dtype == jnp.float32 for k in NAMES)
    assert_bitwise_equal_to_core(core, records, np.float32)


def test_parity_runs_take_the_ffi_path_and_exercise_every_branch(x64):
    t = make_jax(np.float64, None, CTOL, True)
    state = t.init(constraints(0, np.float64))
    assert ffi_calls(t.update, constraints(0, np.float64), state) == 1  # one call, four groups
    assert ffi_calls(lambda l, c, s: t.forward_update(l, c, s), jnp.asarray(1.0),
                     constraints(0, np.float64), state) == 1
    core, records, _ = run_core_alongside(np.float64, None, CTOL, "forward_update")
    duals = [np.stack([r["duals"][k] for r in records]) for k in range(4)]
    assert np.any(duals[1] == 0.8) and np.any(duals[1] == 0.0)      # g1's clamps bind
    assert np.any(np.abs(duals[2]) == 0.4)                          # g2's tight box
    steps = np.array([np.concatenate(r["stepsize"]) for r in records])
    betas = np.array([[GROUPS[k]["beta"] * GROUPS[k]["sigma"] ** t for k in NAMES]
                      for t in range(STEPS)])
    assert np.any(steps < betas * (1 - 1e-9)) and np.any(np.isclose(steps, betas, rtol=1e-12))
    assert np.any(np.stack([r["buffer"][1] for r in records]) != 0)  # momentum groups move
    np.testing.assert_array_equal(np.stack([r["buffer"][0] for r in records]), 0.0)  # no momentum
    # beta grows by sigma per update: g2's beta after STEPS updates is 1.3**STEPS
    assert float(records[-1]["beta"][2][0]) == pytest.approx(1.3 ** STEPS, rel=1e-12)


@pytest.mark.parametrize("case", PARITY, ids=[_ids(c) for c in PARITY])
def test_float64_ffi_close_to_traced_path(x64, case):
    penalty, ctol, idiom = case
    got, _ = run_jax(np.float64, penalty, ctol, idiom, True)
    want, _ = run_jax(np.float64, penalty, ctol, idiom, False)
    for step, (a, b) in enumerate(zip(want, got)):
        for field in ("duals", "buffer", "beta", "stepsize"):
            for k, (x, y) in enumerate(zip(a[field], b[field])):
                np.testing.assert_allclose(y, x, **tolerance(np.float64),
                                           err_msg=f"step {step} {field} group {k}")


def test_float32_one_step_within_a_few_ulps_of_traced_path():
    """From the same state, one step of each path: the kernel's float64 norm against XLA's
    float32 one. Step sizes a few float32 ulps apart; multipliers and buffers a few ulps of
    the larger of their old and new values (``lambda + s d`` may cancel: then the new value
    is small and its own ulps are not the scale of the rounding)."""
    with jax.enable_x64(False):
        worst_step, worst = 0, 0.0
        for penalty, ctol, _ in PARITY:
            t_ffi = jax.jit(make_jax(np.float32, penalty, ctol, True).update)
            t_traced = jax.jit(make_jax(np.float32, penalty, ctol, False).update)
            state = make_jax(np.float32, penalty, ctol, False).init(constraints(0, np.float32))
            for step in range(STEPS):
                c = constraints(step, np.float32)
                a, b = t_ffi(c, state), t_traced(c, state)
                for x, y in zip(flat(a.stepsize), flat(b.stepsize)):
                    worst_step = max(worst_step, int(ulps(x, y).max()))
                for field in ("duals", "momentum_buffer"):
                    for x, y, old in zip(flat(getattr(a, field)), flat(getattr(b, field)),
                                         flat(getattr(state, field))):
                        scale = np.spacing(np.maximum(np.abs(old), np.abs(y)).astype(np.float32))
                        worst = max(worst, float(np.max(np.abs(x - y) / scale)))
                state = b
    print(f"\n[ialm ffi float32 one step] step sizes {worst_step} ulps, multipliers and buffers "
          f"{worst:.2f} ulps of their scale")
    assert worst_step <= 4 and worst <= 4, (worst_step, worst)


def test_float32_ffi_within_tolerance_of_traced_path_over_a_run():
    with jax.enable_x64(False):
        got, _ = run_jax(np.float32, 0.7, CTOL, "forward_update", True)
        want, _ = run_jax(np.float32, 0.7, CTOL, "forward_update", False)
    for step, (a, b) in enumerate(zip(want, got)):
        for field in ("duals", "buffer", "stepsize"):
            for k, (x, y) in enumerate(zip(a[field], b[field])):
                np.testing.assert_allclose(y, x, **tolerance(np.float32),
                                           err_msg=f"step {step} {field} group {k}")
        assert [float(x[0]) for x in a["beta"]] == [float(x[0]) for x in b["beta"]]


def test_measured_parity_errors(capsys):
    """The worst errors against the traced path, printed (one line); the core: exact."""
    def worst(a_recs, b_recs):
        rel = 0.0
        for a, b in zip(a_recs, b_recs):
            for field in ("duals", "buffer", "stepsize"):
                for x, y in zip(a[field], b[field]):
                    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
                    big = np.abs(x) >= 0.01
                    if big.any():
                        rel = max(rel, float(np.max(np.abs(x - y)[big] / np.abs(x)[big])))
        return rel

    with jax.enable_x64(True):
        rel64 = max(worst(run_jax(np.float64, p, c, i, False)[0],
                          run_jax(np.float64, p, c, i, True)[0]) for p, c, i in PARITY)
    with jax.enable_x64(False):
        rel32 = worst(run_jax(np.float32, 0.7, CTOL, "forward_update", False)[0],
                      run_jax(np.float32, 0.7, CTOL, "forward_update", True)[0])
    with capsys.disabled():
        print(f"\n[ialm ffi parity] NumPy core: bitwise; traced path, worst relative error "
              f"(|x| >= 0.01): float64 {rel64:.2e}, float32 {rel32:.2e}")
    assert rel64 < 1e-12 and rel32 < 2e-5


# ----------------------------------------------------------------------------------------------
# The whole-step skip on non-finite constraint values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["first group", "later group"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_one_non_finite_group_moves_nothing_and_counts_as_traced(x64, where, bad):
    def make(ffi):
        return ialm(beta=1.0, sigma=2.0, momentum=[0.5, 0.0, 0.9], is_ineq=[False, True, False],
                    dual_range=(-5.0, 5.0), ffi=ffi)

    good = [jnp.array([0.5, -1.0]), jnp.array([2.0, 0.25, 3.0]), jnp.array([0.3])]
    k = 0 if where == "first group" else 1
    bad_c = list(good)
    bad_c[k] = good[k].at[-1].set(bad)
    states = {}
    for ffi in (True, False):
        t = make(ffi)
        update = jax.jit(t.update)
        state = update(good, update(good, t.init(good)))
        assert ffi_calls(t.update, bad_c, state) == (1 if ffi else 0)
        skipped = update(bad_c, state)
        for field in ("duals", "momentum_buffer", "beta", "stepsize", "count"):
            for old, new in zip(jax.tree.leaves(getattr(state, field)),
                                jax.tree.leaves(getattr(skipped, field))):
                assert np.asarray(old).tobytes() == np.asarray(new).tobytes(), field
        again = update(bad_c, skipped)
        resumed = update(good, again)
        states[ffi] = (skipped, again, resumed)
    for a, b in zip(states[True], states[False]):  # the counters are the traced path's
        for field in ("count", "notfinite_count", "last_finite", "total_notfinite"):
            assert int(getattr(a, field)) == int(getattr(b, field)), field
        np.testing.assert_allclose(np.concatenate(jax.tree.leaves(a.duals)),
                                   np.concatenate(jax.tree.leaves(b.duals)),
                                   **tolerance(np.float64))
    skipped, again, resumed = states[True]
    assert not bool(skipped.last_finite) and int(skipped.notfinite_count) == 1
    assert int(again.notfinite_count) == 2 and int(again.total_notfinite) == 2
    assert bool(resumed.last_finite) and int(resumed.notfinite_count) == 0
    assert int(resumed.count) == 3 and not np.array_equal(np.asarray(resumed.duals[0]),
                                                          np.asarray(skipped.duals[0]))


@pytest.mark.parametrize("k", [0, 2], ids=["first group", "last group"])
def test_an_overflowed_momentum_direction_skips_the_whole_step_on_both_paths(x64, k):
    """Finite constraints whose momentum direction overflows (a buffer near float64's range):
    the NumPy core raises and changes nothing; both JAX paths skip the whole step, counted."""
    good = [jnp.array([0.5, -1.0]), jnp.array([2.0, 0.25, 3.0]), jnp.array([0.3])]
    huge = [jnp.full(x.shape, 1.5e308) for x in good]
    c = list(good)
    c[k] = huge[k]  # finite, but 0.5 b + c (group 0) and 0.9 b + c (group 2) overflow
    for ffi in (True, False):
        t = ialm(beta=1.0, sigma=2.0, momentum=[0.5, 0.0, 0.9], is_ineq=[False, True, False],
                 dual_range=(-5.0, 5.0), ffi=ffi)
        update = jax.jit(t.update)
        state = update(good, update(good, t.init(good)))
        buffers = list(state.momentum_buffer)
        buffers[k] = huge[k]
        state = state._replace(momentum_buffer=buffers)
        assert ffi_calls(t.update, c, state) == (1 if ffi else 0)
        skipped = update(c, state)
        for field in ("duals", "momentum_buffer", "beta", "stepsize", "count"):
            for old, new in zip(jax.tree.leaves(getattr(state, field)),
                                jax.tree.leaves(getattr(skipped, field))):
                assert np.asarray(old).tobytes() == np.asarray(new).tobytes(), (ffi, field)
        assert not bool(skipped.last_finite) and int(skipped.notfinite_count) == 1, ffi
        assert int(skipped.total_notfinite) == 1 and int(skipped.count) == 2, ffi
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(skipped.duals))


def test_a_frame_of_unknown_layout_leaves_every_buffer_untouched(x64):
    """Settings one group short: the handler returns without writing (results = inputs)."""
    name = _ffi.ensure_registered("ialm")
    c, lam, buf = jnp.array([1.0, -2.0]), jnp.array([0.25, 0.5]), jnp.array([3.0, 4.0])
    steps = jnp.array([0.125, 0.0])
    shapes = [jax.ShapeDtypeStruct((2,), jnp.float64)] * 3

    def call(settings):
        return jax.jit(lambda *a: jax.ffi.ffi_call(name, shapes, input_output_aliases={
            3: 0, 4: 1, 5: 2})(*a))(settings, jnp.array([1.0]), c, lam, buf, steps)

    row = np.array([0.5, 1.0, -10.0, 10.0, -1.0, 1.0, 1.0, 0.0]).view(np.int32)
    for settings in (row[:-2], row.astype(np.float32)):  # wrong size; wrong dtype
        out = call(jnp.asarray(settings))
        for got, want in zip(out, (lam, buf, steps)):
            np.testing.assert_array_equal(got, want)
    out = call(jnp.asarray(row))  # the right layout steps: buffer = 0.5 * 3 + c
    # buffer = 0.5 * [3, 4] + c = [2.5, 0]; step min(beta = 1, gamma / ||d|| = 1 / 2.5) = 0.4
    np.testing.assert_array_equal(out[1], [2.5, 0.0])
    np.testing.assert_array_equal(out[0], [0.25 + 0.4 * 2.5, 0.5])
    assert out[2].tolist() == [0.4, 1.0]


# ----------------------------------------------------------------------------------------------
# Path choice: fallbacks, threshold, eager calls, bad arguments
# ----------------------------------------------------------------------------------------------
def small(dtype=jnp.float32, n=6):
    return jnp.linspace(-1.0, 2.0, n, dtype=dtype)


def test_auto_takes_ffi_under_jit_from_min_size(monkeypatch):
    c = [small(n=30), small(n=20)]
    t = ialm(momentum=0.5)
    state = t.init(c)
    monkeypatch.setattr(ialm_module, "FFI_MIN_SIZE", 50)  # counted over all groups
    assert ffi_calls(t.update, c, state) == 1
    assert ffi_calls(lambda c, s: t.forward_update(1.0, c, s), c, state) == 1
    assert ffi_calls(ialm(momentum=0.5, ffi=False).update, c, state) == 0
    monkeypatch.setattr(ialm_module, "FFI_MIN_SIZE", 51)
    t = ialm(momentum=0.5)  # (a new transform: jit caches traces)
    assert ffi_calls(t.update, c, state) == 0
    assert ffi_calls(ialm(momentum=0.5, ffi=True).update, c, state) == 1


def test_default_threshold_is_the_measured_one():
    assert ialm_module.FFI_MIN_SIZE == 10_000
    c = small(n=10_000)
    state = ialm().init(c)
    assert ffi_calls(ialm().update, c, state) == 1
    assert ffi_calls(ialm().update, c[:9_999], ialm().init(c[:9_999])) == 0


def test_grad_of_unrolled_updates_is_traced_and_equals_the_traced_grad(x64, any_size):
    c0 = small(jnp.float64, 5)

    def unrolled(ffi, jit_update):
        t = ialm(beta=0.5, gamma=0.7, momentum=0.5, dual_range=(None, None), ffi=ffi)
        update = jax.jit(t.update) if jit_update else t.update

        def loss(c):
            state = t.init(c)
            for k in range(3):
                state = update(c * (1.0 + 0.5 * k), state)
            return jnp.sum(state.duals * jnp.arange(1.0, 6.0))

        return loss

    assert ffi_calls(jax.grad(unrolled(None, False)), c0) == 0  # grad tracers: traced path
    want_value, want = jax.value_and_grad(unrolled(False, False))(c0)
    assert np.all(np.asarray(want) != 0)
    np.testing.assert_array_equal(jax.grad(unrolled(None, False))(c0), want)
    for ffi in (None, True):  # jax.grad(jax.jit(update)): the FFI call's derivative is traced
        value, got = jax.value_and_grad(unrolled(ffi, True))(c0)
        np.testing.assert_allclose(value, want_value, **tolerance(np.float64))
        np.testing.assert_allclose(got, want, **tolerance(np.float64))


def test_vmap_falls_back_and_a_vmapped_jitted_ffi_update_loops(x64, any_size):
    t = ialm(beta=0.7, sigma=1.2, gamma=0.5, momentum=0.6, dampening=0.3,
             dual_range=(-0.5, 0.5), ctol=0.02)
    batch = jnp.asarray(np.random.default_rng(1).normal(0.0, 0.4, size=(3, 4)))
    state = t.init(batch[0])

    def batched(b):
        return jax.vmap(lambda c: t.update(c, state).duals)(b)

    assert ffi_calls(batched, batch) == 0
    forced = ialm(beta=0.7, sigma=1.2, gamma=0.5, momentum=0.6, dampening=0.3,
                  dual_range=(-0.5, 0.5), ctol=0.02, ffi=True)
    got = jax.vmap(jax.jit(forced.update), in_axes=(0, None))(batch, state)
    for p in range(3):  # each problem as the NumPy core steps it
        opt = uniopt.iALM(m=4, beta=0.7, sigma=1.2, gamma=0.5, momentum=0.6, dampening=0.3,
                          dual_range=(-0.5, 0.5), ctol=0.02)
        opt.update(np.asarray(batch[p]))
        np.testing.assert_array_equal(got.duals[p], opt.duals)
        np.testing.assert_array_equal(got.momentum_buffer[p],
                                      opt.param_groups[0]["momentum_buffer"])
    np.testing.assert_allclose(got.duals, batched(batch), **tolerance(np.float64))


def test_float16_falls_back_or_raises_when_forced(any_size):
    c = small(jnp.float16)
    state = ialm().init(c)
    assert ffi_calls(ialm().update, c, state) == 0
    out = jax.jit(ialm().update)(c, state)
    assert out.duals.dtype == jnp.float16 and bool(jnp.any(out.duals != 0))
    with pytest.raises(TypeError, match=r"Invalid ffi=True: .*float16"):
        jax.jit(ialm(ffi=True).update)(c, state)


def test_groups_of_two_dtypes_take_the_traced_path(x64, any_size):
    c = [small(jnp.float32), small(jnp.float64, 3)]
    state = ialm().init(c)
    assert ffi_calls(ialm().update, c, state) == 0
    assert ffi_calls(ialm(ffi=True).update, c, state) == 0


def test_eager_auto_is_traced_and_forced_eager_runs_the_kernel(x64, any_size):
    c = small(jnp.float64, 7)
    kw = dict(beta=0.3, gamma=0.4, momentum=0.5, dual_range=(-0.2, 0.25))
    outs = {ffi: ialm(**kw, ffi=ffi).update(c, ialm(**kw).init(c)) for ffi in (None, True, False)}
    np.testing.assert_array_equal(outs[None].duals, outs[False].duals)
    opt = uniopt.iALM(m=7, **kw)
    opt.update(np.asarray(c))
    np.testing.assert_array_equal(outs[True].duals, opt.duals)
    assert float(outs[True].stepsize) == opt.last_step[0]["stepsize"]
    assert not np.array_equal(np.asarray(outs[True].duals), np.zeros(7))


@pytest.mark.parametrize("value", ["yes", 1, 0.0, np.bool_(True)], ids=repr)
def test_bad_ffi_argument(value):
    """Only None, True and False (by identity: 1 == True and 0.0 == False are not flags)."""
    with pytest.raises(TypeError, match=rf"Invalid ffi: {re.escape(repr(value))}"):
        ialm(ffi=value)


def test_nonfinite_raise_keeps_its_eager_behaviour(any_size):
    t = ialm(nonfinite="raise", ffi=True)
    c = small()
    state = t.init(c)
    with pytest.raises(FloatingPointError):
        t.update(c.at[0].set(jnp.nan), state)
    assert float(jnp.max(jnp.abs(t.update(c, state).duals))) > 0
    with pytest.raises(TypeError):
        jax.jit(t.update)(c, state)


# ----------------------------------------------------------------------------------------------
# A jitted training loop with donated state: the buffers stay where they are
# ----------------------------------------------------------------------------------------------
def test_jitted_training_loop_with_donated_state_updates_in_place(any_size):
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(6), jnp.float32)

    def cons(x):
        return {"eq": a @ x - b, "ineq": x - 0.5}

    def train(ffi, steps=25):
        t = ialm(beta=0.5, sigma=1.01, gamma=2.0, momentum=[0.5, 0.0],
                 is_ineq={"eq": False, "ineq": True}, ffi=ffi)

        def step(x, state):
            state = t.update(cons(x), state)
            g = jax.grad(lambda x: t.lagrangian(jnp.sum(x ** 2), cons(x), state))(x)
            return x - 0.05 * g, state

        jitted = jax.jit(step, donate_argnums=(0, 1))
        x = jnp.zeros(4, jnp.float32)
        state = jax.tree.map(lambda v: jnp.array(v, copy=True), t.init(cons(x)))
        text = jitted.lower(x, state).as_text()
        moved = []
        for _ in range(steps):
            before = [v.unsafe_buffer_pointer() for v in
                      jax.tree.leaves((state.duals, state.momentum_buffer))]
            old = state
            x, state = jitted(x, state)
            after = [v.unsafe_buffer_pointer() for v in
                     jax.tree.leaves((state.duals, state.momentum_buffer))]
            moved.append(before != after)
            assert all(v.is_deleted() for v in jax.tree.leaves(old.duals))
        return x, state, text, moved

    x, state, text, moved = train(None)
    want_x, want_state, want_text, _ = train(False)
    assert len(re.findall(rf"custom_call @{TARGET}\b", text)) == 1
    assert TARGET not in want_text
    assert not any(moved)  # multipliers and buffers updated where they lie
    assert int(state.count) == 25 and float(jnp.max(jnp.abs(state.duals["eq"]))) > 0
    np.testing.assert_allclose(x, want_x, rtol=1e-4, atol=1e-5)
    for k in ("eq", "ineq"):
        np.testing.assert_allclose(state.duals[k], want_state.duals[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Processes: nothing registered at import; a warm cache loads the handler
# ----------------------------------------------------------------------------------------------
def test_import_registers_nothing_until_first_use_and_the_env_threshold():
    result = run_python("""
        import json
        import jax, jax.numpy as jnp
        import uniopt.adapters.jax as ujax
        from uniopt.adapters.jax import _ffi
        from uniopt.kernels import ialm_ffi
        import importlib
        module = importlib.import_module("uniopt.adapters.jax.ialm")
        before = sorted(_ffi.registered())
        compiled = ialm_ffi.ialm_handler.cache_info().currsize
        t = ujax.ialm(momentum=0.5)
        c = jnp.linspace(-1.0, 1.0, 7)
        s = jax.jit(t.update)(c, t.init(c))
        print(json.dumps({"before": before, "compiled": compiled,
                          "after": sorted(_ffi.registered()), "min_size": module.FFI_MIN_SIZE,
                          "count": int(s.count)}))
    """, UNIOPT_JAX_FFI_IALM_MIN_SIZE="7")
    assert result == {"before": [], "compiled": 0, "after": ["ialm"], "min_size": 7, "count": 1}


def test_fresh_process_loads_the_handler_from_the_warm_cache():
    code = """
        import json
        import jax, jax.numpy as jnp
        from uniopt.adapters.jax import ialm
        from uniopt.kernels import ialm_ffi
        t = ialm(beta=10.0, gamma=1.0, ffi=True)
        c = jnp.array([3.0, -4.0])
        s = jax.jit(t.update)(c, t.init(c))
        print(json.dumps({"hits": ialm_ffi.ialm_handler().cache_hits,
                          "duals": [float(v) for v in s.duals],
                          "step": float(s.stepsize)}))
    """
    first = run_python(code)  # warms the cache if another test has not
    second = run_python(code)
    assert second["hits"] == 1
    assert second == {**first, "hits": 1}
    # ||c|| = 5: step min(10, 1 / 5) = 0.2, duals = 0.2 * c
    assert second["step"] == np.float32(0.2)
    assert second["duals"] == [float(np.float32(0.2) * np.float32(3.0)),
                               float(np.float32(0.2) * np.float32(-4.0))]


# ----------------------------------------------------------------------------------------------
# The asv module (asv_bench/benchmarks/jax_ffi_ialm.py)
# ----------------------------------------------------------------------------------------------
def test_asv_contenders_step_and_agree(monkeypatch):
    monkeypatch.setenv("UNIOPT_BENCH_PIN", "0")  # importing the suite must not pin pytest
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "asv_bench"))
    from benchmarks import jax_ffi_ialm

    states = {case: jax_ffi_ialm.build(case, 300, 3)() for case in ("ffi", "traced", "floor")}
    for a, b in zip(jax.tree.leaves(states["ffi"].duals), jax.tree.leaves(states["traced"].duals)):
        np.testing.assert_allclose(a, b, **tolerance(np.float32))
        assert a.shape == (100,) and float(jnp.max(jnp.abs(a))) > 0  # two steps moved them
    assert int(states["ffi"].count) == 2 and int(states["floor"].count) == 0


def test_axis_name_averages_before_the_call(x64):
    """``axis_name``: the pmean stays traced before the FFI call; every member of the mapped
    axis steps with the mean constraint values, as the NumPy core does with the mean."""
    shards = jnp.asarray(np.random.default_rng(7).normal(0.2, 0.5, size=(3, 5)))
    kw = dict(beta=0.6, gamma=0.8, momentum=0.5, dual_range=(-0.3, 0.3))
    state = ialm(**kw).init(shards[0])

    def step(ffi):
        t = ialm(**kw, axis_name="i", ffi=ffi)
        return jax.vmap(jax.jit(t.update), in_axes=(0, None), axis_name="i")(shards, state)

    got, want = step(True), step(False)
    opt = uniopt.iALM(m=5, **kw)
    mean = jax.vmap(lambda c: jax.lax.pmean(c, "i"), axis_name="i")(shards)[0]  # JAX's mean
    opt.update(np.asarray(mean))
    for p in range(3):
        np.testing.assert_array_equal(got.duals[p], opt.duals)
        np.testing.assert_allclose(got.duals[p], want.duals[p], **tolerance(np.float64))
    t = ialm(**kw, axis_name="i", ffi=True)
    text = jax.jit(jax.vmap(t.update, in_axes=(0, None), axis_name="i")).lower(
        shards, state).as_text()
    assert TARGET in text
