"""``polyak_sgd``'s fused step through XLA's FFI (a Numba handler inside ``jax.jit`` on CPU).

``uniopt.adapters.jax.update_and_apply(polyak_sgd(...), grads, state, params, value=loss)``
runs one FFI call (:mod:`uniopt.kernels.polyak_ffi`) for every leaf. Oracles: the NumPy core
(``uniopt.PolyakSGD``, its Numba table kernels: float64 bit for bit), the traced path of the
same transform (``ffi=False``: ``update`` + ``apply_updates`` in ``jax.numpy``; float32 within
a few ulps), and the rule (:mod:`uniopt.rules.polyak`) with the core's norm
(:func:`uniopt.kernels.polyak_cpu.sq_norm_table`) evaluated in NumPy. Which path a step took is
read from the lowered module (the FFI target's name).
"""

from __future__ import annotations


import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import uniopt
import uniopt.adapters.jax as ujax
from uniopt.adapters.jax import _ffi
from uniopt.adapters.jax import polyak as jpolyak
from uniopt.adapters.jax.polyak import polyak_sgd
from uniopt.kernels import polyak_cpu
from uniopt.kernels import polyak_ffi
from uniopt.rules import polyak as rules
from conftest import tolerance
from test_jax_ffi import run_python

TARGET = "uniopt_polyak_apply"
STEPS = 12
SHAPES = {"b": (5,), "s": (), "w": (6, 4)}

#: polyak_sgd's hyper-parameters of the existing Polyak parity tests (tests/test_jax_polyak.py:
#: the solver's SETTINGS in optax's names, and test_polyak_sgd_matches_optax's kwargs).
SETTINGS = {
    "default": dict(),
    "delta": dict(eps=0.3),
    "max_stepsize": dict(max_learning_rate=0.1),
    "fun_min": dict(f_min=0.005),
    "momentum": dict(momentum=0.6),
    "sps_plus": dict(variant="sps+"),
    "sps_plus_momentum": dict(variant="sps+", momentum=0.3),
    "capped_eps": dict(max_learning_rate=0.3, eps=0.01),
    "f_min_plus": dict(f_min=0.05, variant="sps+"),
    "sps": dict(max_learning_rate=5.0, variant="sps"),
    "solver_momentum": dict(f_min=0.005, eps=0.1, max_learning_rate=0.7, momentum=0.5),
}


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)
    monkeypatch.setattr(jpolyak, "POLYAK_APPLY_MIN_SIZE", None)


# ----------------------------------------------------------------------------------------------
# The problem: f(p) = floor + 0.5 sum_k h_k (p_k - c_k)^2, noisy gradients, NumPy arithmetic
# ----------------------------------------------------------------------------------------------
class Problem:
    def __init__(self, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.keys = sorted(SHAPES)
        cast = lambda x: np.asarray(x, dtype=self.dtype)  # noqa: E731
        self.p0 = {k: cast(rng.standard_normal(SHAPES[k])) for k in self.keys}
        self.h = {k: cast(rng.uniform(0.5, 2.0, SHAPES[k])) for k in self.keys}
        self.c = {k: cast(rng.standard_normal(SHAPES[k])) for k in self.keys}
        self.noise = [{k: cast(0.2 * rng.standard_normal(SHAPES[k])) for k in self.keys}
                      for _ in range(STEPS + 1)]

    def value_and_grad(self, t, params):
        p = {k: np.asarray(params[k], dtype=self.dtype) for k in self.keys}
        value = 0.02 + 0.5 * sum(float(np.sum(self.h[k].astype(np.float64) * (
            p[k].astype(np.float64) - self.c[k]) ** 2)) for k in self.keys)
        grad = {k: (self.h[k] * (p[k] - self.c[k]) + self.noise[t][k]).astype(self.dtype)
                for k in self.keys}
        return self.dtype.type(value), grad

    def run_jax(self, tx, step_fn, steps=STEPS, start=0, params=None, state=None):
        """``steps`` jitted steps ``step_fn(tx, grads, state, params, value)``."""
        params = {k: jnp.asarray(v) for k, v in (params or self.p0).items()}
        state = tx.init(params) if state is None else state
        step = jax.jit(lambda g, s, p, v: step_fn(tx, g, s, p, v))
        for t in range(start, start + steps):
            value, grads = self.value_and_grad(t, params)
            params, state = step({k: jnp.asarray(v) for k, v in grads.items()}, state, params,
                                 value)
        return {k: np.asarray(v) for k, v in params.items()}, state

    def run_core(self, setting, steps=STEPS):
        """``uniopt.PolyakSGD`` (NumPy, Numba kernels) with the setting's hyper-parameters."""
        t_box = [0]

        def fun(params):
            return self.value_and_grad(t_box[0], params)

        solver = uniopt.PolyakSGD(fun, fun_min=setting.get("f_min", 0.0), variant="SPS_max",
                                  max_stepsize=setting.get("max_learning_rate", 1.0),
                                  delta=setting.get("eps", 0.0),
                                  momentum=setting.get("momentum", 0.0))
        params = {k: v.copy() for k, v in self.p0.items()}
        state = solver.init_state(params)
        for t in range(steps):
            t_box[0] = t
            params, state = solver.update(params, state)
        return params, state


def fused(tx, g, s, p, v):
    return ujax.update_and_apply(tx, g, s, p, value=v)


def pair(tx, g, s, p, v):
    updates, s = tx.update(g, s, p, value=v)
    return optax.apply_updates(p, updates), s


def calls(fn, *args) -> int:
    """How many custom calls to the fused Polyak target ``jit(fn)(*args)`` lowers to."""
    return jax.jit(fn).lower(*args).as_text().count(f"@{TARGET}(")


def ulps(a, b):
    """Distance in float32 units in the last place."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, np.int64(-2**31) - ia, ia)
    ib = np.where(ib < 0, np.int64(-2**31) - ib, ib)
    return np.abs(ia - ib)


def operand_ulps(a, b, *operands):
    """``|a - b|`` in float32 ulps of the largest of ``|a|``, ``|b|`` and the ``operands``."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    m = np.maximum(np.abs(a), np.abs(b))
    for o in operands:
        m = np.maximum(m, np.abs(np.asarray(o, np.float32)))
    return float((np.abs(a.astype(np.float64) - b) / np.spacing(m)).max())


def velocity(state):
    return state[0].velocity


# ----------------------------------------------------------------------------------------------
# Parity: fused FFI step vs NumPy core vs traced path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_float64_fused_step_equals_numpy_core_bitwise(x64, name):
    """Parameters and velocity (the optax face's sign: minus the core's) bit for bit; one
    custom call for the whole pytree."""
    setting = SETTINGS[name]
    prob = Problem(np.float64)
    tx = polyak_sgd(**setting, ffi=True)
    params = {k: jnp.asarray(v) for k, v in prob.p0.items()}
    assert calls(lambda g, s, p: fused(tx, g, s, p, 1.0), params, tx.init(params), params) == 1
    got, state = prob.run_jax(tx, fused)
    want, core_state = prob.run_core(setting)
    for k in prob.keys:
        assert got[k].dtype == np.float64
        np.testing.assert_array_equal(got[k], want[k])
        assert not np.array_equal(got[k], prob.p0[k])
    if setting.get("momentum", 0.0):
        for k in prob.keys:
            np.testing.assert_array_equal(-np.asarray(velocity(state)[k]),
                                          core_state.velocity[k])
    else:
        assert velocity(state) is None


@pytest.mark.parametrize("name", list(SETTINGS))
def test_float64_fused_step_and_traced_path_agree(x64, name):
    prob = Problem(np.float64)
    got, state = prob.run_jax(polyak_sgd(**SETTINGS[name], ffi=True), fused)
    want, want_state = prob.run_jax(polyak_sgd(**SETTINGS[name], ffi=False), fused)
    for k in prob.keys:
        np.testing.assert_allclose(got[k], want[k], **tolerance(np.float64))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(a, b, **tolerance(np.float64))
    assert jax.tree.structure(state) == jax.tree.structure(want_state)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_float32_fused_step_within_ulps_of_traced_path_and_core(name):
    """The trajectories agree to float32 tolerance; one step from the same mid-run state differs
    by at most 4 ulps (of the result; with momentum, of the step's largest operand: the traced
    path's float32 norm is about 1e-7 off the handler's float64 one, and ``mu v + gamma g``
    can cancel)."""
    setting = SETTINGS[name]
    prob = Problem(np.float32)
    got, state = prob.run_jax(polyak_sgd(**setting, ffi=True), fused)
    want, _ = prob.run_jax(polyak_sgd(**setting, ffi=False), pair)
    core, _ = prob.run_core(setting)
    for k in prob.keys:
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want[k], **tolerance(np.float32))
        np.testing.assert_allclose(got[k], core[k], **tolerance(np.float32))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state))

    mid, mid_state = prob.run_jax(polyak_sgd(**setting, ffi=False), pair, steps=8)
    (p1, s1), (p2, s2) = [prob.run_jax(polyak_sgd(**setting, ffi=ffi), fused, steps=1, start=8,
                                       params=mid, state=mid_state) for ffi in (True, False)]
    v_mid, v1, v2 = velocity(mid_state), velocity(s1), velocity(s2)
    for k in prob.keys:
        if v_mid is None:  # p + (-s)(gamma g): the step size's rounding only
            assert ulps(p1[k], p2[k]).max() <= 4, (k, ulps(p1[k], p2[k]).max())
        else:  # v = mu v + gamma g may cancel: ulps of the operands, not of the result
            assert operand_ulps(v1[k], v2[k], v_mid[k]) <= 4
            assert operand_ulps(p1[k], p2[k], mid[k], v2[k]) <= 4
    assert not np.array_equal(p1["w"], mid["w"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.7])
@pytest.mark.parametrize("scaling", [1.0, 0.37])
def test_handler_arithmetic_is_the_rule_with_the_core_norm(dtype, momentum, scaling):
    """One call: the squared norm is polyak_cpu.sq_norm_table's, the step size the rule's in
    float64 (then the leaves' dtype), the leaves ``p + (-s) * (gamma * g)`` (heavy ball:
    ``v = mu v + gamma g``, ``p + (-s) v``), all bit for bit, recomputed in NumPy."""
    with jax.enable_x64(dtype == np.float64):
        prob = Problem(dtype, seed=4)
        value, grads = prob.value_and_grad(0, prob.p0)
        keys = prob.keys
        g = [grads[k] for k in keys]
        p = [prob.p0[k] for k in keys]
        v = [np.asarray(0.1 * np.cos(np.arange(x.size)), dtype).reshape(x.shape) for x in p] \
            if momentum else []
        k = polyak_ffi
        numbers = np.zeros(k.POLYAK_SCALARS, dtype)
        numbers[[k.VALUE, k.F_MIN, k.EPS, k.MAX_LEARNING_RATE, k.NEG_SCALING, k.MOMENTUM]] = (
            value, 0.01, 0.05, 0.8, -scaling, momentum)
        numbers[k.TINY] = numbers[k.GUARD] = np.finfo(np.float64).eps
        new_p, new_v, out = jax.jit(jpolyak.fused_polyak_step)(
            jnp.asarray(numbers), [jnp.asarray(x) for x in g], [jnp.asarray(x) for x in p],
            [jnp.asarray(x) for x in v])

        flat = [np.ascontiguousarray(x).reshape(-1) for x in g]
        sq = polyak_cpu.sq_norm_table(np.array([x.ctypes.data for x in flat], np.int64),
                                      np.array([x.size for x in flat], np.int64),
                                      np.zeros(1, dtype))
        h = numbers.astype(np.float64)
        step = rules.polyak_stepsize(h[k.VALUE], h[k.F_MIN], sq, h[k.EPS],
                                     h[k.MAX_LEARNING_RATE], h[k.TINY], False)
        step = dtype(rules.zero_below(step, sq + h[k.EPS], h[k.GUARD]))
        assert 0 < step < 0.8
        np.testing.assert_array_equal(np.asarray(out), np.array([step, sq], dtype))
        neg_s, mu = dtype(-scaling), dtype(momentum)
        for t in range(len(keys)):
            if momentum:
                want_v = mu * v[t] + step * g[t]
                np.testing.assert_array_equal(np.asarray(new_v[t]), want_v)
                want_p = p[t] + neg_s * want_v
            else:
                want_p = p[t] + neg_s * (step * g[t])
            assert want_p.dtype == dtype
            np.testing.assert_array_equal(np.asarray(new_p[t]), want_p)
        assert len(new_v) == len(v)


def test_handler_leaves_a_frame_it_does_not_know_untouched():
    """A scalar array of the wrong length, a gradient of another size than its parameter, or
    leaves of two dtypes: the aliased parameters come back as they went in."""
    name = _ffi.ensure_registered("polyak_apply")
    p = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)
    good = np.zeros(polyak_ffi.POLYAK_SCALARS, np.float32)
    good[polyak_ffi.VALUE], good[polyak_ffi.MAX_LEARNING_RATE] = 1.0, 1.0
    good[polyak_ffi.NEG_SCALING] = -1.0

    def call(hyper, g, p):
        results = [jax.ShapeDtypeStruct(p.shape, p.dtype),
                   jax.ShapeDtypeStruct((2,), hyper.dtype)]
        return jax.jit(lambda h, g, p: jax.ffi.ffi_call(name, results,
                                                        input_output_aliases={2: 0})(h, g, p))(
            hyper, g, p)

    moved, _ = call(jnp.asarray(good), jnp.ones(8, jnp.float32), p)
    assert not np.array_equal(np.asarray(moved), np.asarray(p))  # the good frame steps
    for hyper, g in ((jnp.asarray(good[:-1]), jnp.ones(8, jnp.float32)),
                     (jnp.asarray(good), jnp.ones(7, jnp.float32)),
                     (jnp.asarray(good), jnp.ones(8, jnp.int32))):
        kept, _ = call(hyper, g, p)
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(p))


# ----------------------------------------------------------------------------------------------
# Schedules, chain, inject_hyperparams, MultiSteps, nonfinite
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.4])
def test_scaling_schedule_reads_the_chain_count(momentum):
    """``scaling`` a schedule: the fused step reads it at the chain's count, which advances."""
    prob = Problem(np.float32)
    schedule = optax.piecewise_constant_schedule(1.0, {3: 0.5, 7: 0.25})
    got, state = prob.run_jax(polyak_sgd(scaling=schedule, momentum=momentum, ffi=True), fused)
    want, want_state = prob.run_jax(polyak_sgd(scaling=schedule, momentum=momentum,
                                               ffi=False), pair)
    constant, _ = prob.run_jax(polyak_sgd(momentum=momentum, ffi=True), fused)
    for k in prob.keys:
        np.testing.assert_allclose(got[k], want[k], **tolerance(np.float32))
    assert int(state[1].count) == int(want_state[1].count) == STEPS
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    assert not np.allclose(got["w"], constant["w"], **tolerance(np.float32))


def problem_arrays(dtype=jnp.float32, n=40):
    params = {"a": jnp.linspace(-1, 1, n, dtype=dtype).reshape(-1, 4),
              "b": jnp.linspace(0.1, 1, 3, dtype=dtype)}
    return params, jax.tree.map(lambda p: jnp.sin(3 * p) - 0.2, params)


@pytest.mark.parametrize("case", ["chain", "inject_hyperparams", "multisteps", "nonfinite_skip",
                                  "traced", "optax"])
def test_wrapped_transforms_take_update_then_apply(any_size, case):
    """Anything but a bare polyak_sgd on the FFI path: tx.update + apply_updates, same numbers
    bit for bit (the plain update of a wrapped polyak_sgd is the traced one)."""
    params, _ = problem_arrays()
    make = {"chain": lambda ffi: optax.chain(optax.clip_by_global_norm(1.0),
                                             polyak_sgd(scaling=0.5, momentum=0.3, ffi=ffi)),
            "inject_hyperparams": lambda ffi: optax.inject_hyperparams(
                polyak_sgd, static_args=("ffi",))(max_learning_rate=0.5, momentum=0.3, ffi=ffi),
            "multisteps": lambda ffi: optax.MultiSteps(polyak_sgd(momentum=0.3, ffi=ffi),
                                                       every_k_schedule=2),
            "nonfinite_skip": lambda ffi: polyak_sgd(momentum=0.3, nonfinite="skip", ffi=ffi),
            "traced": lambda ffi: polyak_sgd(momentum=0.3, ffi=False),
            "optax": lambda ffi: optax.polyak_sgd()}[case]
    tx = make(None)
    assert calls(lambda g, s, p: fused(tx, g, s, p, 1.0), params, tx.init(params), params) == 0
    outs = []
    for fn, t in ((fused, tx), (pair, tx), (pair, make(False))):
        p, s = params, t.init(params)
        step = jax.jit(lambda g, s, p, v, fn=fn, t=t: fn(t, g, s, p, v))
        for i in range(4):
            grads = jax.tree.map(lambda x: jnp.cos(x + i) - 0.1, p)
            p, s = step(grads, s, p, 0.5 + sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p)))
        outs.append((p, s))
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(outs[0][0]["a"]), np.asarray(params["a"]))


def test_plain_update_stays_traced_under_every_ffi_setting(any_size):
    """``update`` is the traced chain whatever ``ffi`` says (only update_and_apply fuses)."""
    params, grads = problem_arrays()
    out = []
    for ffi in (None, True, False):
        tx = polyak_sgd(momentum=0.3, ffi=ffi)
        assert calls(lambda g, s, p: tx.update(g, s, p, value=2.0), grads, tx.init(params),
                     params) == 0
        out.append(jax.jit(lambda g, s, p: tx.update(g, s, p, value=2.0))(
            grads, tx.init(params), params))
    for other in out[1:]:
        for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# Path choice and fallbacks
# ----------------------------------------------------------------------------------------------
def test_auto_takes_the_fused_call_under_jit_from_the_threshold(monkeypatch):
    params, grads = problem_arrays()  # 43 elements
    monkeypatch.setattr(_ffi, "APPLY_MIN_SIZE", 0)
    for threshold, want in ((None, 1), (43, 1), (44, 0)):
        monkeypatch.setattr(jpolyak, "POLYAK_APPLY_MIN_SIZE", threshold)
        tx = polyak_sgd()
        assert calls(lambda g, s, p: fused(tx, g, s, p, 1.0), grads, tx.init(params),
                     params) == want
    tx = polyak_sgd(ffi=True)  # forced: whatever the size
    assert calls(lambda g, s, p: fused(tx, g, s, p, 1.0), grads, tx.init(params), params) == 1


def test_under_grad_and_vmap(any_size):
    """ffi=None under grad/vmap tracing: the traced pair; forced, the call's derivative is the
    traced path's and vmap loops over the batch."""
    params, grads = problem_arrays(n=12)

    def loss(scale, ffi):
        tx = polyak_sgd(max_learning_rate=0.3, momentum=0.5, ffi=ffi)
        p, s = params, tx.init(params)
        for _ in range(3):
            g = jax.tree.map(lambda x: scale * x - 0.3, p)
            value = 1.0 + sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
            p, s = ujax.update_and_apply(tx, g, s, p, value=value)
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

    assert calls(jax.grad(lambda c: loss(c, None)), jnp.float32(2.0)) == 0
    assert calls(lambda c: loss(c, True), jnp.float32(2.0)) == 3  # (under grad: the JVP rule's)
    value, grad = jax.jit(jax.value_and_grad(lambda c: loss(c, True)))(jnp.float32(2.0))
    want_value, want_grad = jax.jit(jax.value_and_grad(lambda c: loss(c, False)))(
        jnp.float32(2.0))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4)
    assert float(grad) != 0.0

    batch = jnp.stack([grads["b"] * c for c in (1.0, -2.0, 0.5)])
    outs = {}
    for ffi in (None, True, False):
        tx = polyak_sgd(momentum=0.5, ffi=ffi)
        state = tx.init(params)
        fn = jax.vmap(lambda gb: fused(tx, {**grads, "b": gb}, state, params, 2.0)[0])
        assert calls(fn, batch) == (1 if ffi else 0)
        outs[ffi] = jax.jit(fn)(batch)
    for ffi in (None, True):
        for a, b in zip(jax.tree.leaves(outs[ffi]), jax.tree.leaves(outs[False])):
            np.testing.assert_allclose(a, b, **tolerance(np.float32))
    assert not np.allclose(outs[True]["b"][0], outs[True]["b"][1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_unsupported_dtypes_fall_back_or_raise_when_forced(any_size, dtype):
    params, grads = problem_arrays(dtype)
    tx = polyak_sgd(momentum=0.3)
    assert calls(lambda g, s, p: fused(tx, g, s, p, 1.0), grads, tx.init(params), params) == 0
    got, state = jax.jit(lambda g, s, p: fused(tx, g, s, p, 1.0))(grads, tx.init(params), params)
    want, _ = jax.jit(lambda g, s, p: pair(tx, g, s, p, 1.0))(grads, tx.init(params), params)
    for k in params:
        assert got[k].dtype == dtype
        np.testing.assert_array_equal(np.asarray(got[k], np.float32),
                                      np.asarray(want[k], np.float32))
    forced = polyak_sgd(ffi=True)
    with pytest.raises(TypeError, match=r"Invalid ffi=True: .*(bfloat16|float16)"):
        jax.jit(lambda g, s, p: fused(forced, g, s, p, 1.0))(grads, forced.init(params), params)


def test_leaves_of_two_dtypes_fall_back_or_raise_when_forced(x64, any_size):
    params = {"a": jnp.linspace(-1, 1, 7, dtype=jnp.float32), "b": jnp.arange(5.0) - 2}
    grads = jax.tree.map(lambda x: 3 * x - 1, params)
    tx = polyak_sgd()
    assert calls(lambda g, s, p: fused(tx, g, s, p, 1.0), grads, tx.init(params), params) == 0
    got = jax.jit(lambda g, s, p: fused(tx, g, s, p, 1.0))(grads, tx.init(params), params)
    want = jax.jit(lambda g, s, p: pair(tx, g, s, p, 1.0))(grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    forced = polyak_sgd(ffi=True)
    with pytest.raises(TypeError, match=r"Invalid ffi=True: .*one dtype, got float32, float64"):
        jax.jit(lambda g, s, p: fused(forced, g, s, p, 1.0))(grads, forced.init(params), params)


def test_eager_auto_is_the_traced_pair_and_forced_eager_runs_the_call(any_size):
    params, grads = problem_arrays()
    outs = {}
    for ffi in (None, True, False):
        tx = polyak_sgd(momentum=0.3, scaling=0.5, ffi=ffi)
        outs[ffi] = fused(tx, grads, tx.init(params), params, 1.5)
    for a, b in zip(jax.tree.leaves(outs[None]), jax.tree.leaves(outs[False])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
        np.testing.assert_allclose(a, b, **tolerance(np.float32))
    assert not np.array_equal(np.asarray(outs[True][0]["a"]), np.asarray(params["a"]))


def test_missing_value_and_bad_ffi_argument():
    params, grads = problem_arrays()
    tx = polyak_sgd(ffi=True)
    with pytest.raises(TypeError, match="value"):
        jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p))(grads, tx.init(params),
                                                                    params)
    for bad in ("yes", 1, 0.0, np.bool_(True)):
        with pytest.raises(TypeError, match=rf"Invalid ffi: {bad!r}"):
            polyak_sgd(ffi=bad)


def test_axis_name_averages_the_loss_before_the_call(any_size):
    """Under shard_map over a one-device mesh, axis_name's pmean is traced before the call."""
    from jax.sharding import Mesh, PartitionSpec as P

    params, grads = problem_arrays()
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    outs = {}
    for axis_name, ffi in (("d", None), ("d", False), (None, True)):
        tx = polyak_sgd(momentum=0.3, axis_name=axis_name, ffi=ffi)

        def step(g, s, p, tx=tx):
            return fused(tx, g, s, p, jnp.float32(1.5))

        fn = jax.shard_map(step, mesh=mesh, in_specs=P(), out_specs=P())
        text = jax.jit(fn).lower(grads, tx.init(params), params).as_text()
        assert text.count(f"@{TARGET}(") == (0 if ffi is False else 1)
        assert (axis_name is not None) == ("all-reduce" in text or "all_reduce" in text)
        outs[(axis_name, ffi)] = jax.jit(fn)(grads, tx.init(params), params)
    for key in (("d", None), (None, True)):
        for a, b in zip(jax.tree.leaves(outs[key]), jax.tree.leaves(outs[("d", False)])):
            np.testing.assert_allclose(a, b, **tolerance(np.float32))


# ----------------------------------------------------------------------------------------------
# A jitted training loop with donated parameters and state
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_training_loop_donated_in_place_without_retracing(any_size, momentum):
    """One jit for loss, grad and the fused step, params and state donated: the outputs live in
    the donated buffers (same addresses), the step is traced once, it trains as the traced
    path does."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = x @ jnp.asarray(rng.standard_normal((16, 1)), jnp.float32) + 0.5
    params0 = {"w": jnp.asarray(0.1 * rng.standard_normal((16, 1)), jnp.float32),
               "b": jnp.zeros((1,), jnp.float32)}

    def train(ffi, steps=25):
        tx = polyak_sgd(max_learning_rate=0.5, momentum=momentum, ffi=ffi)
        traces = []

        def step(params, state):
            traces.append(1)  # runs at trace time only
            loss, grads = jax.value_and_grad(
                lambda p: 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
            params, state = ujax.update_and_apply(tx, grads, state, params, value=loss)
            return params, state, loss

        jitted = jax.jit(step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, params0)
        state = jax.tree.map(jnp.copy, tx.init(params))
        text = jitted.lower(params, state).as_text()
        losses, same = [], []
        for _ in range(steps):
            leaves = [leaf for leaf in jax.tree.leaves((params, state)) if leaf.size > 1]
            before = [leaf.unsafe_buffer_pointer() for leaf in leaves]
            old = (params, state)
            params, state, loss = jitted(params, state)
            after = [leaf.unsafe_buffer_pointer()
                     for leaf in jax.tree.leaves((params, state)) if leaf.size > 1]
            same.append(before == after and len(before) == (2 if momentum else 1))
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
            losses.append(float(loss))
        return params, losses, text, same, len(traces)

    got, losses, text, same, traces = train(None)
    want, want_losses, want_text, _, _ = train(False)
    assert text.count(f"@{TARGET}(") == 1 and want_text.count(f"@{TARGET}(") == 0
    assert all(same) and traces == 1
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4, atol=1e-9)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Processes: nothing registered at import; a warm cache loads the handler
# ----------------------------------------------------------------------------------------------
def test_import_registers_nothing_until_first_use():
    result = run_python("""
        import json
        import jax, jax.numpy as jnp
        import uniopt.adapters.jax as ujax
        from uniopt.adapters.jax import _ffi
        from uniopt.adapters.jax.polyak import polyak_sgd
        from uniopt.kernels import polyak_ffi
        before = sorted(_ffi.registered())
        compiled = polyak_ffi.polyak_apply_handler.cache_info().currsize
        tx = polyak_sgd()
        params = {"w": jnp.ones(4)}
        jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.0))(params, tx.init(params), params)
        after_update = sorted(_ffi.registered())
        jax.jit(lambda g, s, p: ujax.update_and_apply(tx, g, s, p, value=1.0))(
            params, tx.init(params), params)
        print(json.dumps({"before": before, "compiled": compiled, "after_update": after_update,
                          "after_apply": sorted(_ffi.registered())}))
    """)
    assert result == {"before": [], "compiled": 0, "after_update": [],
                      "after_apply": ["polyak_apply"]}


def test_fresh_process_loads_the_handler_from_the_warm_cache():
    code = """
        import json
        import jax, jax.numpy as jnp
        from uniopt.adapters.jax import update_and_apply
        from uniopt.adapters.jax.polyak import polyak_sgd
        from uniopt.kernels import polyak_ffi
        params = {"w": jnp.linspace(-1.0, 1.0, 6)}
        out = []
        for momentum in (0.0, 0.5):
            tx = polyak_sgd(momentum=momentum, ffi=True)
            p, _ = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p, value=1.4))(
                params, tx.init(params), params)
            out.append([float(v) for v in p["w"]])
        print(json.dumps({"hits": polyak_ffi.polyak_apply_handler().cache_hits, "out": out,
                          "w": [float(v) for v in params["w"]]}))
    """
    first = run_python(code)  # warms the cache if another test has not
    second = run_python(code)
    assert second["hits"] == 1
    assert second["out"] == first["out"]
    w = np.float32(second["w"])
    # g = w: gamma = min(1.4 / ||w||^2, 1) (about 1/2) from the float64 norm, then float32;
    # both first steps are w - gamma w (zero velocity)
    sq = float(np.sum(w.astype(np.float64) ** 2))
    gamma = np.float32(rules.polyak_stepsize(float(np.float32(1.4)), 0.0, sq, 0.0, 1.0,
                                             np.finfo(np.float64).eps, False))
    assert abs(gamma - 0.5) < 1e-6
    for got in second["out"]:
        np.testing.assert_array_equal(np.float32(got), w + np.float32(-1.0) * (gamma * w))


# ----------------------------------------------------------------------------------------------
# The asv module's contenders (asv_bench/benchmarks/jax_ffi_polyak.py)
# ----------------------------------------------------------------------------------------------
def test_asv_contenders_step_and_agree(monkeypatch):
    monkeypatch.setenv("UNIOPT_BENCH_PIN", "0")  # importing the suite must not pin pytest
    from benchmarks import contenders, jax_ffi_polyak

    data = contenders.Data.make(contenders.layout_sizes(3000, "model"))
    results = {name: build(data)() for name, build in jax_ffi_polyak.CASES.items()}
    fused_params, traced_params, optax_params = (results[k][0] for k in (
        "uniopt_jax_polyak_fused", "uniopt_jax_polyak_traced", "optax_polyak_sgd"))
    assert len(fused_params) == contenders.MODEL_TENSORS
    assert set(jax_ffi_polyak.SCRIPT_CASES) >= {"uniopt_torch_polyak", *jax_ffi_polyak.CASES}
    # two steps each (compile + timed); the step size is SGD's lr (loss = lr ||g||^2) in all
    lr = contenders.SGD["lr"]
    for a, b, c, p0, g in zip(fused_params, traced_params, optax_params, data.params,
                              data.grads):
        np.testing.assert_allclose(a, b, **tolerance(np.float32))
        np.testing.assert_allclose(a, c, **tolerance(np.float32))
        np.testing.assert_allclose(a, p0 - 2 * lr * g, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(np.asarray(a), p0)
