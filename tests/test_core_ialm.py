"""uniopt.iALM (NumPy) and its CPU kernel against a naive oracle, closed forms and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from conftest import tolerance
from refimpl.naive_ialm import EXTREME64, NaiveIALM, closed_form_step

import uniopt
from uniopt.kernels import ialm_cpu

# Each case: constructor kwargs for the first group, then added groups, then (penalty, ctol).
CASES = {
    "one-eq-group": ([dict(size=4, beta=0.5, sigma=1.0, gamma=1.0, momentum=0.0, dampening=0.0,
                           lo=-100.0, hi=100.0, is_ineq=False)], 1.0, 0.0),
    "eq+ineq-momentum-sigma": ([
        dict(size=3, beta=0.8, sigma=1.05, gamma=0.7, momentum=0.9, dampening=0.0, lo=-0.3, hi=0.4,
             is_ineq=False),
        dict(size=5, beta=1.5, sigma=1.1, gamma=2.0, momentum=0.5, dampening=0.25, lo=-1.0, hi=0.6,
             is_ineq=True),
        dict(size=1, beta=0.1, sigma=1.0, gamma=0.05, momentum=0.0, dampening=0.0, lo=None, hi=None,
             is_ineq=False)], None, 0.0),
    "ctol": ([
        dict(size=6, beta=1.0, sigma=1.02, gamma=1.0, momentum=0.3, dampening=0.3, lo=-5.0, hi=5.0,
             is_ineq=True),
        dict(size=4, beta=0.3, sigma=1.0, gamma=3.0, momentum=0.0, dampening=0.0, lo=-5.0, hi=5.0,
             is_ineq=False)], 0.5, 0.4),
}


def _build(groups, penalty, ctol, dtype=np.float64):
    first, rest = groups[0], groups[1:]

    def kw(g):
        return dict(beta=g["beta"], sigma=g["sigma"], gamma=g["gamma"], momentum=g["momentum"],
                    dampening=g["dampening"], dual_range=(g["lo"], g["hi"]), is_ineq=g["is_ineq"])

    opt = uniopt.iALM(first["size"], penalty=penalty, ctol=ctol,
                      init_duals=np.zeros(first["size"], dtype), **kw(first))
    for g in rest:
        opt.add_constraint_group(g["size"], init_duals=np.zeros(g["size"], dtype), **kw(g))
    return opt


def _constraints(rng, n, step):
    # Mixed signs, some near zero (ctol band), shrinking over time like a converging primal.
    c = rng.standard_normal(n) * (1.5 / (1 + 0.2 * step))
    c[::4] *= 0.1
    return c


@pytest.mark.parametrize("idiom", ["forward+update", "forward_update"])
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_naive(case, idiom, dtype):
    groups, penalty, ctol = CASES[case]
    opt = _build(groups, penalty, ctol, dtype)
    ref = NaiveIALM(groups, penalty=penalty, ctol=ctol)
    rng = np.random.default_rng(7)
    n = sum(g["size"] for g in groups)
    tol = tolerance(dtype)
    for step in range(15):
        c = _constraints(rng, n, step).astype(dtype)
        loss = float(rng.standard_normal())
        if idiom == "forward+update":
            got = opt.forward(loss, c)
            want = ref.lagrangian(loss, c)
            opt.update(c)
            ref.update(c)
        else:
            got = opt.forward_update(loss, c)
            rhos = ref.update(c)
            want = ref.lagrangian(loss, c, rhos)
        np.testing.assert_allclose(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
        np.testing.assert_allclose(opt.duals, ref.duals, **tol)
        buffers = np.concatenate([g["momentum_buffer"] for g in opt.param_groups])
        np.testing.assert_allclose(buffers, ref.buffers, **tol)
    assert [g["beta"] for g in opt.param_groups] == pytest.approx([g["beta"] for g in ref.groups], rel=1e-15)
    assert opt.duals.dtype == dtype


def test_uncapped_step_is_projected_dual_ascent():
    """With gamma large the step is beta: lambda <- clamp(lambda + beta c)."""
    opt = uniopt.iALM(3, beta=0.25, gamma=1e6, dual_range=(-0.5, 1.0))
    lam = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(10):
        c = rng.standard_normal(3)
        opt.update(c)
        lam = np.clip(lam + 0.25 * c, -0.5, 1.0)
    np.testing.assert_allclose(opt.duals, lam, rtol=1e-15)


def test_capped_step_has_norm_gamma():
    """When gamma / ||c|| < beta the multipliers move by exactly gamma (in 2-norm)."""
    opt = uniopt.iALM(4, beta=10.0, gamma=0.3, dual_range=(None, None))
    c = np.array([3.0, -4.0, 12.0, 0.0])
    opt.update(c)
    assert np.linalg.norm(opt.duals) == pytest.approx(0.3, rel=1e-15)
    assert opt.last_step[0]["stepsize"] == pytest.approx(0.3 / 13.0, rel=1e-15)
    assert opt.last_step[0]["direction_norm"] == pytest.approx(13.0, rel=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_direction_is_a_zero_step(momentum):
    opt = uniopt.iALM(3, init_duals=np.array([0.5, -0.25, 1.0]), momentum=momentum)
    opt.update(np.zeros(3))
    assert np.all(np.isfinite(opt.duals))
    np.testing.assert_array_equal(opt.duals, [0.5, -0.25, 1.0])
    assert opt.last_step[0]["stepsize"] == 0.0


def test_duals_outside_the_range_are_clamped_even_by_a_zero_step():
    opt = uniopt.iALM(2, init_duals=np.array([-3.0, 7.0]), dual_range=(-1.0, 2.0))
    opt.update(np.zeros(2))
    np.testing.assert_array_equal(opt.duals, [-1.0, 2.0])


def test_inequality_multipliers_stay_nonnegative():
    opt = uniopt.iALM(2, is_ineq=True, dual_range=(-100.0, 100.0), gamma=1e6)
    opt.update(np.array([-5.0, 1.0]))
    np.testing.assert_array_equal(opt.duals, [0.0, 1.0])


def test_groups_do_not_inherit_inequality_bounds():
    """An equality group added after an inequality group may go negative (a reference bug)."""
    opt = uniopt.iALM(1, is_ineq=True, gamma=1e6)
    opt.add_constraint_group(1, gamma=1e6)  # dual_range None: the constructor's (-100, 100)
    opt.update(np.array([-1.0, -1.0]))
    np.testing.assert_array_equal(opt.duals, [0.0, -1.0])
    assert opt.param_groups[1]["lower_bound"] == -100.0


def test_added_group_inherits_constructor_momentum_and_range():
    opt = uniopt.iALM(1, momentum=0.5, dampening=0.1, dual_range=(-2.0, 3.0))
    opt.add_constraint_group(2, name="more")
    g = opt.param_groups[1]
    assert (g["momentum"], g["dampening"], g["dual_range"]) == (0.5, 0.1, (-2.0, 3.0))
    assert opt.names == ["group0", "more"]


def test_ctol_zero_is_no_filter_and_ctol_band_leaves_duals():
    c = np.array([0.05, -0.05, 0.3])
    a = uniopt.iALM(3, gamma=1e6)
    b = uniopt.iALM(3, gamma=1e6, ctol=0.0)
    a.update(c)
    b.update(c)
    np.testing.assert_array_equal(a.duals, b.duals)
    eq = uniopt.iALM(3, gamma=1e6, ctol=0.1)
    eq.update(c)
    np.testing.assert_array_equal(eq.duals, [0.0, 0.0, 0.3])
    ineq = uniopt.iALM(3, gamma=1e6, ctol=0.1, is_ineq=True, init_duals=np.ones(3))
    ineq.update(c)  # 0.05 within tolerance: unchanged; -0.05 satisfied: decreases
    np.testing.assert_allclose(ineq.duals, [1.0, 0.95, 1.3], rtol=1e-15)


def test_input_forms_agree():
    def make():
        opt = uniopt.iALM(2, beta=0.5, momentum=0.3)
        opt.add_constraint_group(3, is_ineq=True, name="ineq")
        return opt

    c0, c1 = np.array([0.3, -0.2]), np.array([0.1, -0.4, 0.9])
    flat, seq, mapping = make(), make(), make()
    values = [flat.forward_update(1.0, np.concatenate([c0, c1])),
              seq.forward_update(1.0, [c0, c1]),
              mapping.forward_update(1.0, {"ineq": c1, "group0": c0})]
    assert values[0] == values[1] == values[2]
    np.testing.assert_array_equal(flat.duals, seq.duals)
    np.testing.assert_array_equal(flat.duals, mapping.duals)


def test_duals_adopt_the_first_constraints_dtype():
    opt = uniopt.iALM(3)
    assert opt.duals.dtype == np.float64
    opt.update(np.ones(3, np.float32))
    assert opt.duals.dtype == np.float32
    opt.update(np.ones(3, np.float64))  # later values are cast to the duals' dtype
    assert opt.duals.dtype == np.float32
    fixed = uniopt.iALM(init_duals=np.zeros(3, np.float64))
    fixed.update(np.ones(3, np.float32))
    assert fixed.duals.dtype == np.float64


def test_constraint_weights_are_the_lagrangian_derivative():
    opt = uniopt.iALM(3, penalty=0.7, init_duals=np.array([0.2, -0.1, 0.4]))
    opt.add_constraint_group(2, is_ineq=True, init_duals=np.array([0.3, 0.0]))
    c = np.array([0.5, -0.3, 0.2, 0.4, -0.6])
    w = opt.constraint_weights(c)
    h = 1e-6
    for i in range(c.size):
        e = np.zeros_like(c)
        e[i] = h
        fd = (opt.forward(0.0, c + e) - opt.forward(0.0, c - e)) / (2 * h)
        assert w[i] == pytest.approx(fd, rel=1e-7, abs=1e-9)


def test_equality_constrained_least_squares_reaches_the_closed_form():
    """min ||x - a||^2 s.t. A x = b: x* = a - A^T (A A^T)^-1 (A a - b)."""
    rng = np.random.default_rng(3)
    A, a, b = rng.standard_normal((2, 5)), rng.standard_normal(5), rng.standard_normal(2)
    x_star = a - A.T @ np.linalg.solve(A @ A.T, A @ a - b)
    x = np.zeros(5)
    opt = uniopt.iALM(2, beta=1.0, gamma=100.0, penalty=1.0, dual_range=(None, None))
    for _ in range(3000):
        c = A @ x - b
        opt.update(c)
        x -= 0.05 * (2 * (x - a) + A.T @ opt.constraint_weights(c))
    np.testing.assert_allclose(x, x_star, atol=1e-6)
    lam_star = np.linalg.solve(A @ A.T, 2 * (A @ a - b))  # stationarity: 2(x - a) + A^T lam = 0
    np.testing.assert_allclose(opt.duals, lam_star, atol=1e-5)


def test_state_dict_round_trip_resumes_identically_and_copies():
    rng = np.random.default_rng(5)
    cs = [rng.standard_normal(4) for _ in range(8)]
    a = uniopt.iALM(4, beta=0.5, sigma=1.1, momentum=0.7)
    for c in cs[:4]:
        a.update(c)
    sd = a.state_dict()
    b = uniopt.iALM(1)
    b.load_state_dict(sd)
    sd["param_groups"][0]["duals"][:] = 123.0  # the loaded optimizer owns its arrays
    for c in cs[4:]:
        a.update(c)
        b.update(c)
    np.testing.assert_array_equal(a.duals, b.duals)
    assert a.param_groups[0]["beta"] == b.param_groups[0]["beta"]


def test_kernel_norm_is_accurate_for_many_float32_values():
    rng = np.random.default_rng(11)
    n = 300_001
    c = (rng.standard_normal(n) * 1e3).astype(np.float32)
    dual, buffer = np.zeros(n, np.float32), np.zeros(0, np.float32)
    coef = ialm_cpu.coefficients(np.float32, 0.0, 0.0, -np.inf, np.inf, 0.0)
    sq, _, norm = ialm_cpu.ialm_dual_step_(dual, buffer, c, coef, np.array([1.0, 1.0]),
                                           np.zeros(2, np.int64))
    exact = math.fsum(float(x) ** 2 for x in c.astype(np.float64))
    assert sq == pytest.approx(exact, rel=1e-14)
    assert norm == pytest.approx(math.sqrt(exact), rel=1e-14)


BAD = [
    (dict(m=0), ValueError, "Invalid m: 0"),
    (dict(m=2.5), TypeError, "Invalid m"),
    (dict(m=True), TypeError, "Invalid m"),
    (dict(), ValueError, "needs m or init_duals"),
    (dict(m=2, beta=-1.0), ValueError, "Invalid beta value: -1.0"),
    (dict(m=2, beta=float("nan")), ValueError, "Invalid beta value: nan"),
    (dict(m=2, sigma=0.0), ValueError, "Invalid sigma value: 0.0"),
    (dict(m=2, gamma=-0.5), ValueError, "Invalid gamma value: -0.5"),
    (dict(m=2, gamma="x"), TypeError, "Invalid gamma value"),
    (dict(m=2, momentum=1.5), ValueError, "Invalid momentum value: 1.5"),
    (dict(m=2, dampening=-0.1), ValueError, "Invalid dampening value: -0.1"),
    (dict(m=2, penalty=-1.0), ValueError, "Invalid penalty value: -1.0"),
    (dict(m=2, ctol=-1e-3), ValueError, "Invalid ctol value: -0.001"),
    (dict(m=2, dual_range=(1.0, 0.0)), ValueError, "Invalid dual_range"),
    (dict(m=2, dual_range=5.0), TypeError, "Invalid dual_range"),
    (dict(m=2, dual_range=(0.0, 1.0, 2.0)), ValueError, "Invalid dual_range"),
    (dict(m=2, is_ineq=1), TypeError, "Invalid is_ineq: 1"),
    (dict(m=2, is_ineq=True, dual_range=(-5.0, -1.0)), ValueError, "Invalid dual_range"),
    (dict(m=3, init_duals=np.zeros(2)), ValueError, "Invalid init_duals"),
    (dict(init_duals=np.zeros(2, np.int64)), TypeError, "Invalid init_duals"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD, ids=[b[2] for b in BAD])
def test_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        uniopt.iALM(**kwargs)


def test_bad_added_group_changes_nothing():
    opt = uniopt.iALM(2)
    with pytest.raises(ValueError, match="Invalid beta value"):
        opt.add_constraint_group(2, beta=-1.0)
    with pytest.raises(ValueError, match="a group of that name exists"):
        opt.add_constraint_group(2, name="group0")
    assert opt.m == 2 and len(opt.param_groups) == 1


@pytest.mark.parametrize("bad", [np.ones(3), [np.ones(2)], {"nope": np.ones(2)}, [np.ones(2), np.ones(3)]])
def test_failing_step_changes_nothing(bad):
    opt = uniopt.iALM(2, momentum=0.5, sigma=2.0)
    opt.add_constraint_group(2, is_ineq=True)
    opt.update(np.ones(4))
    before = opt.state_dict()
    with pytest.raises(ValueError, match="constraints"):
        opt.forward_update(0.0, bad)
    after = opt.state_dict()
    for g0, g1 in zip(before["param_groups"], after["param_groups"]):
        np.testing.assert_array_equal(g0["duals"], g1["duals"])
        np.testing.assert_array_equal(g0["momentum_buffer"], g1["momentum_buffer"])
        assert g0["beta"] == g1["beta"]


# ------------------------------------------------------------------------------------------------
# Huge, tiny and non-finite constraint values (issue 8)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", EXTREME64)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_huge_and_tiny_float64_constraints_give_the_closed_form(case, momentum):
    c, gamma = EXTREME64[case]
    opt = uniopt.iALM(m=len(c), beta=1.0, gamma=gamma, momentum=momentum, dual_range=(None, None))
    opt.update(np.array(c))
    expected = closed_form_step(c, 1.0, gamma)
    assert np.all(np.isfinite(opt.duals))
    np.testing.assert_allclose(opt.duals, expected, rtol=1e-14, atol=0)
    norm = opt.last_step[0]["direction_norm"]
    s = max(abs(x) for x in c)
    assert norm == pytest.approx(s * math.hypot(*(x / s for x in c)), rel=1e-14)
    if momentum:
        np.testing.assert_array_equal(opt.param_groups[0]["momentum_buffer"], np.array(c))


@pytest.mark.parametrize("c", [[3e38, -3e38], [1e-40, 1e-40], [3e38, 1e-40, -2e38]])
def test_huge_and_tiny_float32_constraints_give_the_closed_form(c):
    opt = uniopt.iALM(m=len(c), init_duals=np.zeros(len(c), np.float32), dual_range=(None, None))
    c32 = np.array(c, np.float32)
    opt.update(c32)
    assert opt.duals.dtype == np.float32 and np.all(np.isfinite(opt.duals))
    expected = closed_form_step(c32.astype(np.float64), 1.0, 1.0).astype(np.float32)  # rounded
    np.testing.assert_allclose(opt.duals, expected, rtol=3e-7, atol=0)


def test_extreme_values_match_the_naive_oracle_and_the_pure_python_path():
    """The naive oracle (math.hypot) and NUMBA_DISABLE_JIT=1 (the kernel's Python source) agree
    with the compiled kernel on huge, tiny and mixed values, over several steps."""
    import json
    import os
    import subprocess
    import sys

    c = [1e200, -3e199, 1e-200, 0.0, 5e-160]
    groups = [dict(size=5, beta=1.0, sigma=1.5, gamma=2.0, momentum=0.5, dampening=0.25,
                   lo=None, hi=None, is_ineq=False)]
    naive = NaiveIALM(groups, ctol=0.0)
    code = (
        "import json, sys, numpy as np, uniopt\n"
        "c = np.array(json.loads(sys.argv[1]))\n"
        "opt = uniopt.iALM(m=5, beta=1.0, sigma=1.5, gamma=2.0, momentum=0.5, dampening=0.25,"
        " dual_range=(None, None))\n"
        "for k in range(3):\n"
        "    opt.update(c * (1 + k))\n"
        "print(json.dumps(opt.duals.tolist()))\n"
    )
    results = []
    for disable in ("1", "0"):
        env = dict(os.environ, NUMBA_DISABLE_JIT=disable)
        out = subprocess.run([sys.executable, "-c", code, json.dumps(c)], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        results.append(np.array(json.loads(out.stdout)))
    for k in range(3):
        naive.update(np.array(c) * (1 + k))
    assert np.all(np.isfinite(results[0])) and np.any(results[0] != 0)
    np.testing.assert_allclose(results[0], naive.duals, rtol=1e-13, atol=0)
    np.testing.assert_allclose(results[1], naive.duals, rtol=1e-13, atol=0)


def _snapshot(opt):
    return (copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.last_step),
            [(g["duals"].dtype, g["dtype_fixed"]) for g in opt.param_groups])


def _assert_same_state(a, b):
    (sa, la, da), (sb, lb, db) = a, b
    assert la == lb and da == db
    assert sa["penalty"] == sb["penalty"] and sa["ctol"] == sb["ctol"]
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga.keys() == gb.keys()
        for key in ga:
            if key in ("duals", "momentum_buffer"):
                assert ga[key].dtype == gb[key].dtype
                assert ga[key].tobytes() == gb[key].tobytes(), key  # bitwise
            else:
                assert ga[key] == gb[key], key


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first, no momentum", "first, momentum", "second group"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("first_step", [False, True])
def test_non_finite_constraints_raise_naming_the_group_and_change_nothing(bad, where, dtype,
                                                                         first_step):
    opt = uniopt.iALM(m=3, momentum=0.5 if where == "first, momentum" else 0.0, sigma=2.0)
    opt.add_constraint_group(2, momentum=0.9, is_ineq=True, name="limits")
    c = np.array([0.5, -1.0, 2.0, 0.25, 3.0], dtype)
    if not first_step:  # else: the multipliers' dtype is not settled yet
        opt.update(c)
        opt.update(2 * c)
    before = _snapshot(opt)
    c_bad = c.copy()
    c_bad[4 if where == "second group" else 1] = bad
    name = "limits" if where == "second group" else "group0"
    with pytest.raises(ValueError, match=f"group '{name}' are not finite"):
        opt.update(c_bad)
    with pytest.raises(ValueError, match=f"group '{name}' are not finite"):
        opt.forward_update(1.0, {"group0": c_bad[:3], "limits": c_bad[3:]})
    _assert_same_state(before, _snapshot(opt))
    opt.update(c)  # still usable
    assert np.all(np.isfinite(opt.duals))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float64_values_beyond_float32_raise_for_float32_multipliers():
    opt = uniopt.iALM(init_duals=np.zeros(2, np.float32))
    opt.update(np.array([1.0, 2.0], np.float32))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="group 'group0' are not finite"):
        opt.update(np.array([1e300, 1.0]))  # inf once in the multipliers' float32
    _assert_same_state(before, _snapshot(opt))
    opt.update(np.array([1e30, 1.0]))  # finite in float32
    assert np.all(np.isfinite(opt.duals))


def test_kernel_leaves_the_multipliers_of_a_non_finite_direction():
    for momentum in (0.0, 0.5):
        dual = np.array([0.5, -0.5, 1.0])
        c = np.array([1.0, np.nan, 2.0])
        coef = ialm_cpu.coefficients(np.float64, momentum, 0.0, -np.inf, np.inf, 0.0)
        out = ialm_cpu.ialm_dual_step_(dual, np.zeros(3), c, coef, np.array([1.0, 1.0]),
                                       np.array([momentum != 0, 0], np.int64))
        assert all(math.isnan(x) for x in out)
        np.testing.assert_array_equal(dual, [0.5, -0.5, 1.0])


# ------------------------------------------------------------------------------------------------
# The rules behind the norm and the filters
# ------------------------------------------------------------------------------------------------
def test_norm_scale_is_a_power_of_two_at_most_the_maximum():
    from uniopt.rules import ialm as rules

    for amax in [4.5e-308, 1e-200, 0.75, 1.0, 1.5, 3.0, 1e200, 4e307]:
        s = rules.norm_scale(amax)
        mantissa, _ = math.frexp(s)
        assert mantissa == 0.5 and 0 < s <= amax < 2 * s, amax  # a power of two, amax/s in [1, 2)
    # beyond: clipped so that s and 1/s stay normal (1/s: no overflow, no subnormal)
    for amax in [5e-324, 1e-310, 2.2250738585072014e-308]:
        assert rules.norm_scale(amax) == 2.0 ** -1021
    for amax in [9e307, 1.7976931348623157e308]:
        assert rules.norm_scale(amax) == 2.0 ** 1021 and amax / 2.0 ** 1021 < 8
    assert rules.norm_scale(3e38, -125, 125) == 2.0 ** 125  # float32's range
    assert rules.norm_scale(0.0) == 0.5


def test_scaled_dual_stepsize_is_dual_stepsize_in_range_and_finite_beyond():
    from uniopt.rules import ialm as rules

    rng = np.random.default_rng(5)
    for _ in range(200):
        d = rng.standard_normal(rng.integers(1, 20)) * 10.0 ** rng.uniform(-100, 100)
        beta, gamma = 10.0 ** rng.uniform(-3, 3), 10.0 ** rng.uniform(-3, 3)
        s = rules.norm_scale(float(np.max(np.abs(d))))
        sq_scaled = float(np.sum((d / s) ** 2))
        plain = rules.dual_stepsize(beta, gamma, float(np.sum(d ** 2)))
        assert rules.scaled_dual_stepsize(beta, gamma, s, sq_scaled) == plain  # bitwise
        # any positive scale: the same number to rounding
        m = float(np.max(np.abs(d)))
        assert rules.scaled_dual_stepsize(beta, gamma, m, float(np.sum((d / m) ** 2))) == \
            pytest.approx(plain, rel=1e-14)
    assert rules.scaled_dual_stepsize(1.0, 1.0, 0.0, 0.0) == 0.0
    assert rules.scaled_dual_stepsize(1.0, 1.0, 0.5, 0.0) == 0.0
    assert rules.scaled_dual_stepsize(2.0, 3.0, 2.0 ** 1023, 8.0) == \
        pytest.approx(3.0 / (2.0 ** 1023 * math.sqrt(8.0)), rel=1e-15)  # the norm itself: inf


def test_filtered_and_penalty_part_rules():
    from uniopt.rules import bind
    from uniopt.rules import ialm as rules

    np_rules = bind(rules, where=np.where, minimum=np.minimum, maximum=np.maximum, sqrt=np.sqrt)
    c = np.array([-0.0, 0.05, -0.05, 0.2, -0.2, 0.1])
    np.testing.assert_array_equal(np_rules.filtered(c, 0.1, False), [0, 0, 0, 0.2, -0.2, 0])
    np.testing.assert_array_equal(np_rules.filtered(c, 0.1, True), [0, 0, -0.05, 0.2, -0.2, 0])
    same = np_rules.filtered(c, 0.0, True)
    assert same is c  # ctol = 0: the identity (-0.0 kept)
    np.testing.assert_array_equal(np_rules.penalty_part(c, 0.1, True), [0, 0, 0, 0.2, 0, 0])
    np.testing.assert_array_equal(np_rules.penalty_part(c, 0.1, False), [0, 0, 0, 0.2, -0.2, 0])
    assert rules.filtered(0.05, 0.1, True) == 0.0 and rules.filtered(-0.05, 0.1, True) == -0.05


def test_ialm_checks_live_in_the_validation_module():
    from uniopt import _validation
    from uniopt import ialm as face

    assert face.check_ialm_group is _validation.check_ialm_group
    assert face.check_penalty is _validation.check_penalty
    with pytest.raises(TypeError, match="Invalid is_ineq: 1"):
        _validation.check_ialm_group(beta=1.0, sigma=1.0, gamma=1.0, momentum=0.0, dampening=0.0,
                                     dual_range=(None, None), is_ineq=1)
    assert _validation.check_ialm_group(beta=1.0, sigma=1.0, gamma=1.0, momentum=0.0,
                                        dampening=0.0, dual_range=(None, None),
                                        is_ineq=np.True_)["lower_bound"] == 0.0
    assert "group 'g'" in str(_validation.nonfinite_constraints_error("g"))


# ------------------------------------------------------------------------------------------------
# The kernel's read-only first pass: a direction that is not finite writes nothing
# ------------------------------------------------------------------------------------------------
def _naive_dual_step(dual, buffer, c, momentum, dampening, lo, hi, beta, gamma, ctol, is_ineq):
    """The dual step of one group in float64 NumPy, written from the rule's definition."""
    c = np.asarray(c, dtype=np.float64)
    if ctol > 0:
        zero = ((c > 0) & (c <= ctol)) if is_ineq else (np.abs(c) <= ctol)
        c = np.where(zero, 0.0, c)
    if momentum != 0:
        buffer = momentum * np.asarray(buffer, np.float64) + (1.0 - dampening) * c
        d = buffer
    else:
        d = c
    norm = float(np.sqrt(np.sum(d * d)))
    step = 0.0 if norm == 0 else min(beta, gamma / norm)
    return np.clip(np.asarray(dual, np.float64) + step * d, lo, hi), buffer, norm, step


@pytest.mark.parametrize("momentum, ctol, is_ineq", [(0.5, 0.0, False), (0.9, 0.2, False),
                                                     (0.5, 0.2, True), (0.0, 0.0, True)])
@pytest.mark.parametrize("scale", [1.0, 1e-160, 1e160])  # the plain and the scaled norm
@pytest.mark.parametrize("n", [5, 1024 + 300])
def test_kernel_passes_alone_equal_the_whole_step_bitwise(dtype, momentum, ctol, is_ineq, scale,
                                                          n):
    """ialm_dual_norm_ (read-only) then ialm_dual_apply_ (the NumPy face's groups 2..G) are
    ialm_dual_step_ bit for bit: multipliers, buffer, coef[5] and the returned triple."""
    rng = np.random.default_rng(5)
    scale = scale if dtype == np.float64 else 1.0
    c = (rng.standard_normal(n) * scale).astype(dtype)
    hyper, flags = np.array([0.5, 2.0]), np.array([momentum != 0, is_ineq], dtype=np.int64)
    small = min(scale, 1.0)  # multipliers of the steps' magnitude, so that they move
    arrays = [((rng.uniform(-1, 1, n) * small).astype(dtype),
               (rng.standard_normal(n) * scale).astype(dtype))]
    arrays.append(tuple(a.copy() for a in arrays[0]))
    coefs = [ialm_cpu.coefficients(dtype, momentum, 0.1, -5.0, 5.0, ctol) for _ in range(2)]
    whole = ialm_cpu.ialm_dual_step_(*arrays[0], c, coefs[0], hyper, flags)
    before = tuple(a.copy() for a in arrays[1])
    alone = ialm_cpu.ialm_dual_norm_(arrays[1][1], c, coefs[1], hyper, flags)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays[1], before))  # read-only
    ialm_cpu.ialm_dual_apply_(*arrays[1], c, coefs[1], flags, alone[1])
    assert np.array(whole).tobytes() == np.array(alone).tobytes()
    for a, b in zip((*arrays[0], coefs[0]), (*arrays[1], coefs[1])):
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(arrays[1][0], before[0])  # the multipliers moved


@pytest.mark.parametrize("momentum, ctol, is_ineq", [(0.5, 0.0, False), (0.9, 0.2, False),
                                                     (0.5, 0.2, True), (0.0, 0.2, True)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [5, 1024 + 300])  # one block, and a later block holding the bad value
def test_kernel_first_pass_is_read_only(dtype, momentum, ctol, is_ineq, bad, n):
    """One non-finite constraint: NaN back, and dual, buffer and coef bit for bit unchanged;
    the same arrays with that value made finite step as the naive NumPy oracle says."""
    rng = np.random.default_rng(17)
    c = rng.standard_normal(n).astype(dtype)
    dual = rng.uniform(-1, 1, n).astype(dtype)
    buffer = rng.standard_normal(n).astype(dtype)
    coef = ialm_cpu.coefficients(dtype, momentum, 0.1, -5.0, 5.0, ctol)
    hyper, flags = np.array([0.5, 2.0]), np.array([momentum != 0, is_ineq], dtype=np.int64)
    bad_c = c.copy()
    bad_c[n - 2] = bad
    before = (dual.copy(), buffer.copy(), coef.copy())
    out = ialm_cpu.ialm_dual_step_(dual, buffer, bad_c, coef, hyper, flags)
    assert all(math.isnan(x) for x in out)
    for now, then in zip((dual, buffer, coef), before):
        assert now.tobytes() == then.tobytes()

    want_dual, want_buffer, norm, step = _naive_dual_step(dual, buffer, c, momentum, 0.1, -5.0, 5.0,
                                                          0.5, 2.0, ctol, is_ineq)
    sq, stepsize, got_norm = ialm_cpu.ialm_dual_step_(dual, buffer, c, coef, hyper, flags)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dual, want_dual, **tol)
    if momentum != 0:
        np.testing.assert_allclose(buffer, want_buffer, **tol)
    else:
        assert buffer.tobytes() == before[1].tobytes()  # no momentum: the buffer is not touched
    assert got_norm == pytest.approx(norm, rel=tol["rtol"])
    assert stepsize == pytest.approx(step, rel=tol["rtol"])


def test_kernel_overflowing_momentum_buffer_writes_nothing():
    """Finite constraints whose momentum direction overflows float32: NaN, nothing written."""
    n = 4
    c = np.full(n, 3e38, np.float32)
    buffer = np.full(n, 3e38, np.float32)   # 0.9 * 3e38 + 3e38 > float32 max
    dual = np.arange(n, dtype=np.float32)
    coef = ialm_cpu.coefficients(np.float32, 0.9, 0.0, -np.inf, np.inf, 0.0)
    before = (dual.copy(), buffer.copy(), coef.copy())
    out = ialm_cpu.ialm_dual_step_(dual, buffer, c, coef, np.array([1.0, 1.0]),
                                   np.array([1, 0], dtype=np.int64))
    assert all(math.isnan(x) for x in out)
    for now, then in zip((dual, buffer, coef), before):
        assert now.tobytes() == then.tobytes()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_an_overflowing_direction_in_any_group_raises_and_changes_no_group(k):
    """Finite float32 constraints whose momentum direction overflows in group ``k`` of three:
    every group's read-only pass runs before any group is written, so the groups before ``k``
    do not move either."""
    opt = uniopt.iALM(2, momentum=0.5, init_duals=np.zeros(2, np.float32), sigma=2.0)
    opt.add_constraint_group(3, momentum=0.0, name="plain")
    opt.add_constraint_group(2, momentum=0.9, name="late")
    sizes, names = [2, 3, 2], ["group0", "plain", "late"]
    c = np.array([0.5, -1.0, 2.0, 0.25, 3.0, 0.3, -0.7], np.float32)
    opt.update(c)
    opt.update(2 * c)
    momentum_group = k if k != 1 else 2  # group 1 has no momentum: its direction is c
    start = sum(sizes[:momentum_group])
    opt.param_groups[momentum_group]["momentum_buffer"][:] = 3e38
    huge = c.copy()
    huge[start:start + sizes[momentum_group]] = 3e38  # finite; 0.5 or 0.9 * 3e38 + 3e38 is not
    before = _snapshot(opt)
    pattern = f"direction of group '{names[momentum_group]}' is not finite .*nothing was updated"
    with pytest.raises(ValueError, match=pattern):
        opt.update(huge)
    _assert_same_state(before, _snapshot(opt))
    if k == 1:  # a non-finite value in an earlier group is named first
        bad = huge.copy()
        bad[2] = np.nan
        with pytest.raises(ValueError, match="group 'plain' are not finite"):
            opt.update(bad)
        _assert_same_state(before, _snapshot(opt))


def test_numpy_face_momentum_group_raises_and_changes_nothing():
    """The NumPy iALM leaves its first group to the kernel (no check of its own first)."""
    opt = uniopt.iALM(3, momentum=0.5, init_duals=np.zeros(3), beta=0.7)
    opt.add_constraint_group(2, momentum=0.5)
    opt.update(np.array([0.1, -0.2, 0.3, 0.4, 0.5]))
    before = [(g["duals"].copy(), g["momentum_buffer"].copy(), g["beta"]) for g in opt.param_groups]
    for bad, name in (([np.nan, 0, 0, 0, 0], "group0"), ([0, 0, 0, 0, np.inf], "group1")):
        with pytest.raises(ValueError, match=f"group '{name}' are not finite"):
            opt.update(np.array(bad, dtype=np.float64))
        for g, (d, b, beta) in zip(opt.param_groups, before):
            assert g["duals"].tobytes() == d.tobytes()
            assert g["momentum_buffer"].tobytes() == b.tobytes()
            assert g["beta"] == beta
