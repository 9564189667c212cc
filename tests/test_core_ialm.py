"""uniopt.iALM (NumPy) and its CPU kernel against a naive oracle, closed forms and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import tolerance
from refimpl.naive_ialm import NaiveIALM

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
    sq, _ = ialm_cpu.ialm_dual_step_(dual, buffer, c, coef, np.array([1.0, 1.0]), np.zeros(2, np.int64))
    exact = math.fsum(float(x) ** 2 for x in c.astype(np.float64))
    assert sq == pytest.approx(exact, rel=1e-14)


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
