"""The dual side of constrained learning on the CPU: the kernels of
``uniopt.kernels.constrained_cpu`` and the NumPy face ``uniopt.constrained`` against naive
NumPy oracles (tests/refimpl/naive_constrained.py), Cooper's documented recursion and torch's
SGD, serial/parallel equality, and bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tolerance
from refimpl import naive_constrained as naive

import uniopt.constrained as uc
from uniopt.kernels import constrained_cpu as K
from uniopt.kernels._pointers import addresses

F64 = dict(rtol=1e-12, atol=1e-14)


def _tol(dtype):
    return F64 if np.dtype(dtype) == np.float64 else tolerance(dtype)


def _nupi_coef(dtype, ki, kpn, nu, signed_lr, lr_decay, lower=-np.inf):
    return np.array([ki, kpn, nu, 1 - nu, signed_lr, lr_decay, lower], dtype=dtype)


# ----------------------------------------------------------------------------------------------
# dense projected step
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lower", [0.0, -np.inf])
def test_sgd_projected_kernel_matches_oracle_and_parallel(dtype, lower, rng):
    p = rng.standard_normal(1001).astype(dtype)
    g = rng.standard_normal(1001).astype(dtype)
    expected = naive.projected_step(p.astype(np.float64), g.astype(np.float64), 0.3, lower)
    a, b = p.copy(), p.copy()
    coef = np.array([0.3, lower], dtype=dtype)
    K.sgd_projected_(a, g, coef)
    K.sgd_projected_parallel_(b, g, coef)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, expected, **_tol(dtype))
    # the same two roundings in the array's dtype: bit for bit, float32 included
    np.testing.assert_array_equal(a, np.maximum(p + coef[0] * g, coef[1]))
    if lower == 0.0:
        assert np.all(a >= 0) and np.any(a == 0)
    else:
        assert np.any(a < 0)


def test_projected_ascent_face_equals_torch_sgd_then_relu(rng):
    import torch
    lam = np.abs(rng.standard_normal(50))
    viol = rng.standard_normal(50)
    w = torch.nn.Parameter(torch.tensor(lam))
    opt = torch.optim.SGD([w], lr=0.25, maximize=True)
    w.grad = torch.tensor(viol)
    opt.step()
    with torch.no_grad():
        w.relu_()
    out = uc.projected_ascent_(lam, viol, 0.25, nonnegative=True)
    assert out is lam
    np.testing.assert_array_equal(lam, w.detach().numpy())  # same two roundings


def test_projected_ascent_equality_multipliers_are_not_projected(rng):
    lam = np.zeros(4)
    uc.projected_ascent_(lam, np.array([-1.0, 2.0, -3.0, 0.0]), 0.5, nonnegative=False)
    assert lam.tolist() == [-0.5, 1.0, -1.5, 0.0]


# ----------------------------------------------------------------------------------------------
# indexed projected step
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 3])
def test_indexed_kernel_repeated_rows_match_coalesced_oracle(dtype, width, rng):
    m = 40
    p = rng.standard_normal((m, width)).astype(dtype)
    rows = np.array([5, 3, 5, 39, 0, 3, 5], dtype=np.int64)
    values = rng.standard_normal((rows.size, width)).astype(dtype)
    expected = naive.indexed_projected_step(p.astype(np.float64), rows, values.astype(np.float64),
                                            0.7, 0.0)
    out = p.copy()
    K.indexed_sgd_projected_(out, rows, values, np.array([0.7, 0.0], dtype=dtype))
    np.testing.assert_allclose(out, expected, **_tol(dtype))
    untouched = np.setdiff1d(np.arange(m), rows)
    np.testing.assert_array_equal(out[untouched], p[untouched])  # bit-identical


def test_indexed_repeated_row_is_summed_before_projection():
    # a row sampled twice with +3 and -2.5: summed first (0.5 -> 0 + 0.5), not projected between
    lam = np.zeros(3)
    uc.indexed_projected_ascent_(lam, np.array([1, 1]), np.array([-2.5, 3.0]), 1.0,
                                 nonnegative=True)
    assert lam.tolist() == [0.0, 0.5, 0.0]
    lam = np.zeros(3)
    uc.indexed_projected_ascent_(lam, np.array([1]), np.array([-2.5]), 1.0, nonnegative=True)
    uc.indexed_projected_ascent_(lam, np.array([1]), np.array([3.0]), 1.0, nonnegative=True)
    assert lam.tolist() == [0.0, 3.0, 0.0]  # one at a time differs: the sum matters


def test_indexed_large_m_small_k_never_reads_unsampled_rows(rng):
    m, k = 1_000_000, 1000
    lam = np.full(m, np.nan)
    rows = rng.choice(m, size=k, replace=False)
    lam[rows] = np.abs(rng.standard_normal(k))
    before = lam.copy()
    viol = rng.standard_normal(k)
    uc.indexed_projected_ascent_(lam, rows, viol, 0.1, nonnegative=True)
    expected = np.maximum(before[rows] + 0.1 * viol, 0.0)
    np.testing.assert_allclose(lam[rows], expected, **F64)
    mask = np.ones(m, dtype=bool)
    mask[rows] = False
    assert np.isnan(lam[mask]).all()  # NaN stays NaN, and did not leak into sampled rows
    assert not np.isnan(lam[rows]).any()
    assert before.tobytes() != lam.tobytes()


def test_indexed_empty_is_a_noop(dtype):
    lam = np.arange(4, dtype=dtype)
    before = lam.copy()
    uc.indexed_projected_ascent_(lam, np.array([], dtype=np.int64), np.array([], dtype=dtype),
                                 0.5, nonnegative=True)
    np.testing.assert_array_equal(lam, before)
    K.indexed_sgd_projected_(lam.reshape(4, 1), np.zeros(0, np.int64), np.zeros((0, 1), dtype),
                             np.array([1.0, 0.0], dtype))
    np.testing.assert_array_equal(lam, before)


def test_indexed_equals_torch_sparse_sgd_then_relu(rng):
    import torch

    m = 30
    lam = np.abs(rng.standard_normal((m, 1)))
    idx = np.array([4, 2, 4, 29, 7])
    w = torch.nn.Parameter(torch.tensor(lam))
    opt = torch.optim.SGD([w], lr=0.3, maximize=True)
    val = torch.nn.functional.embedding(torch.tensor(idx), w, sparse=True).reshape(-1)
    viol = torch.tensor(rng.standard_normal(idx.size))
    (val * viol).sum().backward()
    assert w.grad.is_sparse
    opt.step()
    with torch.no_grad():
        w.relu_()
    uc.indexed_projected_ascent_(lam, idx, viol.numpy().reshape(-1, 1), 0.3, nonnegative=True)
    np.testing.assert_allclose(lam, w.detach().numpy(), **F64)


# ----------------------------------------------------------------------------------------------
# nuPI kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("per_entry", [False, True])
def test_nupi_kernels_match_formula_and_each_other(dtype, fresh, per_entry, rng):
    n = 257
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    xi = rng.standard_normal(n).astype(dtype)
    nu, lr, wd = 0.3, 0.2, 0.1
    kp = np.abs(rng.standard_normal(n)) if per_entry else np.float64(0.7)
    ki = np.abs(rng.standard_normal(n)) if per_entry else np.float64(1.3)
    # the documented recursion, in float64
    xi_prev = g.astype(np.float64) if fresh else xi.astype(np.float64)
    xi_new = g.astype(np.float64) if fresh else nu * xi_prev + (1 - nu) * g
    u = ki * g + kp * (xi_new - xi_prev)
    expected = p + lr * u - lr * wd * p  # maximize
    coef = _nupi_coef(dtype, 0 if per_entry else ki, 0 if per_entry else kp * (1 - nu), nu, lr,
                      lr * wd)
    ki_a = np.asarray(ki, dtype=dtype).reshape(-1)
    kpn_a = np.asarray(kp * (1 - nu), dtype=dtype).reshape(-1)
    flags = np.array([fresh], dtype=np.int64)
    outs = []
    for kernel in (K.nupi_, K.nupi_parallel_):
        a, x = p.copy(), xi.copy()
        kernel(a, g, x, ki_a, kpn_a, coef, flags)
        outs.append((a, x))
    if not per_entry:
        a, x = p.copy(), xi.copy()
        for table in (K.nupi_table_,):
            table(addresses([a]), addresses([g]), addresses([x]), np.array([n]),
                  np.array([fresh], dtype=np.int64), coef)
        outs.append((a, x))
        a, x = p.copy(), xi.copy()
        K.nupi_table_parallel_(addresses([a]), addresses([g]), addresses([x]), np.array([n]),
                               np.array([fresh], dtype=np.int64), coef)
        outs.append((a, x))
    for a, x in outs[1:]:
        np.testing.assert_array_equal(a, outs[0][0])
        np.testing.assert_array_equal(x, outs[0][1])
    np.testing.assert_allclose(outs[0][0], expected, **_tol(dtype))
    np.testing.assert_allclose(outs[0][1], xi_new, **_tol(dtype))


def test_nupi_table_skips_tensors_without_gradient(rng):
    a, b = rng.standard_normal(5), rng.standard_normal(7)
    xa, xb = np.zeros(5), np.zeros(7)
    ga = rng.standard_normal(5)
    b0 = b.copy()
    K.nupi_table_(addresses([a, b]), np.array([ga.ctypes.data, 0]), addresses([xa, xb]),
                  np.array([5, 7]), np.array([0, 0]), _nupi_coef(np.float64, 1, 1, 0, -0.1, 0))
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(xb, 0)
    np.testing.assert_array_equal(xa, ga)


def test_indexed_nupi_kernel_mask_duplicates_and_untouched_rows(dtype, rng):
    m, w = 50, 2
    p = rng.standard_normal((m, w)).astype(dtype)
    p[45:] = np.nan  # never sampled
    oracle = naive.NaiveNuPI(p, lr=0.1, wd=0.2, kp=0.8, ki=1.1, nu=0.4, init="SGD",
                             maximize=True, lower=0.0)
    xi = np.zeros((m, w), dtype)
    mask = np.ones((m, w), dtype=bool)
    coef = _nupi_coef(dtype, 1.1, 0.8 * 0.6, 0.4, 0.1, 0.02, 0.0)
    out = p.copy()
    for step in range(6):
        rows = rng.integers(0, 45, size=9)
        rows[0] = rows[1]  # a repeated row
        values = rng.standard_normal((9, w)).astype(dtype)
        oracle.sparse_step(rows, values.astype(np.float64))
        K.indexed_nupi_(out, rows.astype(np.int64), values, xi, mask,
                        np.full((1, 1), 1.1, dtype), np.full((1, 1), 0.48, dtype), coef,
                        np.array([1]))
        np.testing.assert_allclose(out[:45], oracle.theta[:45], **_tol(dtype))
        np.testing.assert_array_equal(mask[:45], ~oracle.started[:45])
    assert np.isnan(out[45:]).all() and mask[45:].all() and (xi[45:] == 0).all()


# ----------------------------------------------------------------------------------------------
# NumPy nuPI
# ----------------------------------------------------------------------------------------------
NUPI_CASES = {
    "zeros": dict(lr=0.1, Kp=0.5, Ki=1.0, ema_nu=0.0, init_type="zeros"),
    "zeros-nu-wd-max": dict(lr=0.05, Kp=2.0, Ki=0.5, ema_nu=0.3, weight_decay=0.2,
                            init_type=uc.nuPIInitType.ZEROS, maximize=True),
    "sgd": dict(lr=0.1, Kp=1.5, Ki=1.0, ema_nu=0.0),
    "sgd-nu-max": dict(lr=0.1, Kp=0.75, Ki=0.25, ema_nu=-0.4, maximize=True),
}


def _naive_of(theta, kw):
    init = uc.nuPIInitType[str(getattr(kw.get("init_type", "SGD"), "name",
                                       kw.get("init_type", "SGD"))).upper()].name
    return naive.NaiveNuPI(theta, kw["lr"], kw.get("weight_decay", 0.0), kw.get("Kp", 0.0),
                           kw.get("Ki", 1.0), kw.get("ema_nu", 0.0), init,
                           kw.get("maximize", False))


@pytest.mark.parametrize("case", list(NUPI_CASES))
@pytest.mark.filterwarnings("ignore:nuPI optimizer instantiated with negative")
def test_numpy_nupi_dense_and_sparse_match_documented_recursion(case, rng):
    kw = NUPI_CASES[case]
    dense0 = rng.standard_normal(6)
    sparse0 = rng.standard_normal((10, 2))
    dense, sparse = dense0.copy(), sparse0.copy()
    opt = uc.nuPI([dense, sparse], **kw)
    od, os_ = _naive_of(dense0, kw), _naive_of(sparse0, kw)
    for t in range(12):
        g = rng.standard_normal(6)
        rows = rng.integers(0, 10, size=4)
        vals = rng.standard_normal((4, 2))
        opt.step([g, (rows, vals)])
        od.step(g)
        os_.sparse_step(rows, vals)
        np.testing.assert_allclose(dense, od.theta, **F64)
        np.testing.assert_allclose(sparse, os_.theta, **F64)


def test_numpy_nupi_sgd_init_second_step_is_the_documented_one():
    # Kp = Ki = 1, nu = 0, errors 1 then 2 (maximize, lr 0.1): 0.1 * 1 + 0.1 * (2 + (2 - 1))
    for sparse in (False, True):
        lam = np.zeros(1)
        opt = uc.nuPI([lam], lr=0.1, Kp=1.0, Ki=1.0, maximize=True)
        for e in (1.0, 2.0):
            opt.step([(np.array([0]), np.array([e]))] if sparse else [np.array([e])])
        assert lam[0] == pytest.approx(0.4, rel=1e-15)


def test_numpy_nupi_kp0_is_sgd(rng):
    a = rng.standard_normal(9)
    b = a.copy()
    opt = uc.nuPI([a], lr=0.3, Kp=0.0, Ki=1.0, ema_nu=0.0)
    for _ in range(5):
        g = rng.standard_normal(9)
        opt.step([g])
        b = b - 0.3 * g
    np.testing.assert_array_equal(a, b)


def test_numpy_nupi_nonnegative_projection(rng):
    lam = np.zeros(50)
    opt = uc.nuPI([lam], lr=0.5, Kp=1.0, Ki=1.0, maximize=True, nonnegative=True)
    ref = naive.NaiveNuPI(lam, 0.5, kp=1.0, ki=1.0, maximize=True, lower=0.0)
    for _ in range(5):
        g = rng.standard_normal(50)
        opt.step([g])
        ref.step(g)
    np.testing.assert_allclose(lam, ref.theta, **F64)
    assert lam.min() == 0.0


def test_numpy_nupi_per_entry_gains(rng):
    kp, ki = np.abs(rng.standard_normal(8)), np.abs(rng.standard_normal(8))
    a = rng.standard_normal(8)
    ref = naive.NaiveNuPI(a, 0.1, kp=kp, ki=ki, nu=0.2, init="ZEROS")
    opt = uc.nuPI([a], lr=0.1, Kp=kp, Ki=ki, ema_nu=0.2, init_type="zeros")
    for _ in range(10):
        g = rng.standard_normal(8)
        opt.step([g])
        ref.step(g)
    np.testing.assert_allclose(a, ref.theta, **F64)


def test_numpy_nupi_state_dict_round_trip_resumes_identically(rng):
    def make():
        return [np.linspace(-1, 1, 6), np.linspace(0, 1, 8).reshape(4, 2)]

    grads = [(rng.standard_normal(6), (rng.integers(0, 4, 3), rng.standard_normal((3, 2))))
             for _ in range(8)]
    params = make()
    opt = uc.nuPI(params, lr=0.1, Kp=1.0, Ki=0.5, ema_nu=0.3)
    for g, s in grads[:4]:
        opt.step([g, s])
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [p.copy() for p in params]
    for g, s in grads[4:]:
        opt.step([g, s])
    other = uc.nuPI(resumed_params, lr=0.9, Kp=0.0)
    other.load_state_dict(saved)
    assert other.state[1][uc.MASK_KEY].dtype == bool
    for g, s in grads[4:]:
        other.step([g, s])
    for a, b in zip(params, resumed_params):
        np.testing.assert_array_equal(a, b)


def test_numpy_nupi_failing_step_changes_nothing():
    a, b = np.ones(3), np.ones((4, 1))
    opt = uc.nuPI([a, b], lr=0.1, Kp=1.0)
    opt.step([np.ones(3), (np.array([1]), np.ones((1, 1)))])
    before = copy.deepcopy(opt.state_dict()), a.copy(), b.copy()
    with pytest.raises(ValueError, match="out of range"):
        opt.step([np.ones(3), (np.array([1, 4]), np.ones((2, 1)))])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(4), None])
    with pytest.raises(TypeError, match="dtype"):
        opt.step([np.ones(3, np.float32), None])
    np.testing.assert_array_equal(a, before[1])
    np.testing.assert_array_equal(b, before[2])
    after = opt.state_dict()
    for k in before[0]["state"]:
        for key, v in before[0]["state"][k].items():
            np.testing.assert_array_equal(after["state"][k][key], v)


# ----------------------------------------------------------------------------------------------
# penalty coefficients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_ineq", [True, False])
@pytest.mark.parametrize("kind", ["multiplicative", "additive"])
def test_penalty_dense_indexed_and_scalar_match_oracle(dtype, is_ineq, kind, rng):
    factor, increment = (1.5, 0.0) if kind == "multiplicative" else (1.0, 0.25)
    v = rng.standard_normal(30).astype(dtype)
    v[:3] = 0.0
    v[3] = 1e-5  # within the tolerance
    init = np.abs(rng.standard_normal(30)).astype(dtype) + 1
    value = init * 3
    exp = naive.penalty_step(value.astype(np.float64), init.astype(np.float64),
                             v.astype(np.float64), is_ineq, 1e-4, factor, increment)
    dense = value.copy()
    uc.update_penalty_coefficients_(dense, v, init=init, is_ineq=is_ineq, kind=kind,
                                    growth_factor=1.5, increment=0.25)
    np.testing.assert_allclose(dense, exp, **_tol(dtype))
    par = value.copy()
    K.penalty_update_parallel_(par, init, v, np.array([1e-4, factor, increment], dtype),
                               np.array([is_ineq, 1]))
    np.testing.assert_array_equal(par, dense)
    # indexed: only the sampled entries change
    rows = np.array([7, 0, 3, 20])
    ind = value.copy()
    uc.update_penalty_coefficients_(ind, v[rows], init=init, is_ineq=is_ineq, kind=kind,
                                    growth_factor=1.5, increment=0.25, indices=rows)
    np.testing.assert_allclose(ind[rows], exp[rows], **_tol(dtype))
    others = np.setdiff1d(np.arange(30), rows)
    np.testing.assert_array_equal(ind[others], value[others])
    # a scalar coefficient: the norm of the (relu'd) violations
    c = np.array([2.0], dtype)
    uc.update_penalty_coefficients_(c, v, init=1.0, is_ineq=is_ineq, kind=kind,
                                    growth_factor=1.5, increment=0.25)
    expc = naive.penalty_step(2.0, 1.0, v.astype(np.float64), is_ineq, 1e-4, factor, increment,
                              scalar=True)
    np.testing.assert_allclose(c[0], expc, **_tol(dtype))


def test_penalty_scalar_restart_when_all_satisfied():
    c = np.array([5.0])
    uc.update_penalty_coefficients_(c, np.array([-1.0, -2.0]), init=1.0, is_ineq=True)
    assert c[0] == 1.0
    c = np.array([5.0])
    uc.update_penalty_coefficients_(c, np.array([-1.0, -2.0]), init=1.0, is_ineq=True,
                                    has_restart=False)
    assert c[0] == 5.0


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    (dict(lr="a"), TypeError, "Invalid learning rate: 'a'"),
    (dict(lr=0.1, weight_decay=-0.5), ValueError, "Invalid weight_decay value: -0.5"),
    (dict(lr=0.1, ema_nu=1.0), ValueError, "Invalid nu value: 1.0"),
    (dict(lr=0.1, ema_nu=-1.0), ValueError, "Invalid nu value: -1.0"),
    (dict(lr=0.1, init_type="adam"), ValueError, "Invalid init_type: adam"),
    (dict(lr=0.1, init_type=3), ValueError, "Invalid init_type: 3"),
    (dict(lr=0.1, Kp=float("inf")), ValueError, "Invalid Kp value: inf"),
    (dict(lr=0.1, Ki=None), TypeError, "Invalid Ki value: None"),
    (dict(lr=0.1, maximize=1), TypeError, "Invalid maximize value: 1"),
    (dict(lr=0.1, Kp=np.ones(3)), ValueError, "Invalid Kp value: 3 per-entry gains"),
])
def test_nupi_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        uc.nuPI([np.zeros(4)], **kwargs)


def test_nupi_warnings_as_cooper():
    with pytest.warns(UserWarning, match="Using a negative Kp coefficient"):
        uc.nuPI([np.zeros(2)], lr=0.1, Kp=-1.0)
    with pytest.warns(UserWarning, match="Using a negative Ki coefficient: -2.0"):
        uc.nuPI([np.zeros(2)], lr=0.1, Ki=-2.0)
    with pytest.warns(UserWarning, match="All PI coefficients are zero"):
        uc.nuPI([np.zeros(2)], lr=0.1, Kp=0.0, Ki=0.0)
    with pytest.warns(UserWarning, match="negative EMA coefficient"):
        uc.nuPI([np.zeros(2)], lr=0.1, ema_nu=-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uc.nuPI([np.zeros(2)], lr=0.1, Kp=1.0, Ki=1.0, ema_nu=0.5)


@pytest.mark.parametrize("call, error, message", [
    (lambda: uc.projected_ascent_(np.zeros(3), np.zeros(3), -1.0, nonnegative=True),
     ValueError, "Invalid learning rate: -1.0"),
    (lambda: uc.projected_ascent_(np.zeros(3), np.zeros(3), 0.1, nonnegative=1),
     TypeError, "Invalid nonnegative value: 1"),
    (lambda: uc.projected_ascent_(np.zeros(3), np.zeros(4), 0.1, nonnegative=True),
     ValueError, "Invalid violations: shape"),
    (lambda: uc.projected_ascent_(np.zeros(3), np.zeros(3, np.float32), 0.1, nonnegative=True),
     TypeError, "Invalid violations: dtype float32"),
    (lambda: uc.projected_ascent_(np.zeros(3, np.int64), np.zeros(3), 0.1, nonnegative=True),
     TypeError, "Invalid multipliers: dtype int64"),
    (lambda: uc.projected_ascent_(np.zeros((3, 2))[:, 0], np.zeros(3), 0.1, nonnegative=True),
     ValueError, "Invalid multipliers: must be a writeable C-contiguous array"),
    (lambda: uc.indexed_projected_ascent_(np.zeros(3), np.array([3]), np.zeros(1), 0.1,
                                          nonnegative=True),
     ValueError, "Invalid indices: 3 is out of range for 3 rows"),
    (lambda: uc.indexed_projected_ascent_(np.zeros(3), np.array([-1]), np.zeros(1), 0.1,
                                          nonnegative=True),
     ValueError, "Invalid indices: -1 is out of range"),
    (lambda: uc.indexed_projected_ascent_(np.zeros(3), np.array([0.5]), np.zeros(1), 0.1,
                                          nonnegative=True),
     TypeError, "Invalid indices: expected a 1-D integer array"),
    (lambda: uc.update_penalty_coefficients_(np.ones(2), np.ones(2), init=1.0, is_ineq=True,
                                             violation_tolerance=-1.0),
     ValueError, "Invalid violation_tolerance value: -1.0"),
    (lambda: uc.update_penalty_coefficients_(np.ones(2), np.ones(2), init=1.0, is_ineq=True,
                                             kind="exp"),
     ValueError, "Invalid kind: 'exp'"),
    (lambda: uc.update_penalty_coefficients_(np.ones(2), np.ones(2), init=1.0, is_ineq=True,
                                             growth_factor=0.0),
     ValueError, "Invalid growth_factor value: 0.0"),
    (lambda: uc.update_penalty_coefficients_(np.ones(2), np.ones(2), init=1.0, is_ineq=True,
                                             kind="additive", increment=-1.0),
     ValueError, "Invalid increment value: -1.0"),
    (lambda: uc.update_penalty_coefficients_(np.ones(2), np.ones(2), init=1.0, is_ineq="yes"),
     TypeError, "Invalid is_ineq value: 'yes'"),
])
def test_functions_bad_input_change_nothing(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_indices_leave_multipliers_unchanged():
    lam = np.arange(4.0)
    with pytest.raises(ValueError):
        uc.indexed_projected_ascent_(lam, np.array([0, 1, 9]), np.ones(3), 1.0,
                                     nonnegative=True)
    assert lam.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_init_type_enum_compares_with_cooper_names():
    import enum

    class Other(enum.Enum):
        ZEROS = 0
        SGD = 1

    assert uc.nuPIInitType.SGD == Other.SGD and uc.nuPIInitType.ZEROS != Other.SGD
    assert hash(uc.nuPIInitType.SGD) == hash("SGD")


def test_coalesce_sums_repeats_in_first_appearance_order(rng):
    rows = rng.integers(0, 300, size=5000)  # many repeats and hash collisions
    rows[:3] = [2**40, 7, 2**40]  # large row numbers hash too
    values = rng.standard_normal((5000, 2))
    urows, uvalues = K.coalesce(rows.astype(np.int64), values)
    expected = naive.coalesce(rows, values)
    assert urows.tolist() == list(expected)  # dicts keep first-appearance order
    np.testing.assert_allclose(uvalues, np.array(list(expected.values())), **F64)
    inc = np.array([1, 4, 9], dtype=np.int64)
    vals = np.ones((3, 1))
    same_rows, same_values = K.coalesce(inc, vals)
    assert same_rows.ctypes.data == inc.ctypes.data and same_values.ctypes.data == vals.ctypes.data


# ----------------------------------------------------------------------------------------------
# against cooper-optim 1.0.1 itself (test-only reference; a missing one fails)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_ineq", [True, False])
@pytest.mark.parametrize("kind", ["multiplicative", "additive"])
@pytest.mark.parametrize("scalar", [False, True])
def test_penalty_updates_match_cooper(is_ineq, kind, scalar, rng):
    import cooper
    import torch

    init = np.array([1.5]) if scalar else np.abs(rng.standard_normal(12)) + 0.5
    ctype = cooper.ConstraintType.INEQUALITY if is_ineq else cooper.ConstraintType.EQUALITY
    pc = cooper.penalty_coefficients.DensePenaltyCoefficient(
        init=torch.tensor(init[0] if scalar else init))
    constraint = cooper.Constraint(ctype, cooper.formulations.QuadraticPenalty,
                                   penalty_coefficient=pc)
    updater = (cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(
                   growth_factor=1.25, violation_tolerance=0.1) if kind == "multiplicative" else
               cooper.penalty_coefficients.AdditivePenaltyCoefficientUpdater(
                   increment=0.5, violation_tolerance=0.1))
    ours = init.copy()
    for step in range(10):
        v = rng.standard_normal(12) * (0.05 if step % 3 == 0 else 1.0)
        if step % 4 == 1:
            v = -np.abs(v)  # all satisfied: the restart
        updater.step({constraint: cooper.ConstraintState(violation=torch.tensor(v))})
        uc.update_penalty_coefficients_(ours, v, init=init, is_ineq=is_ineq, kind=kind,
                                        growth_factor=1.25, increment=0.5,
                                        violation_tolerance=0.1)
        np.testing.assert_allclose(ours, pc.value.numpy().reshape(ours.shape), **F64)


def test_numpy_nupi_matches_cooper_zeros_init(rng):
    import cooper
    import torch

    theta = rng.standard_normal(7)
    w = torch.nn.Parameter(torch.tensor(theta))
    theirs = cooper.optim.nuPI([w], lr=0.05, Kp=torch.tensor(1.5, dtype=torch.float64),
                               Ki=torch.tensor(0.7, dtype=torch.float64), ema_nu=0.4,
                               weight_decay=0.3, maximize=True,
                               init_type=cooper.optim.nuPIInitType.ZEROS)
    ours = uc.nuPI([theta], lr=0.05, Kp=1.5, Ki=0.7, ema_nu=0.4, weight_decay=0.3,
                   maximize=True, init_type=cooper.optim.nuPIInitType.ZEROS)
    for _ in range(12):
        g = rng.standard_normal(7)
        w.grad = torch.tensor(g)
        theirs.step()
        ours.step([g])
    np.testing.assert_allclose(theta, w.detach().numpy(), **F64)


# ----------------------------------------------------------------------------------------------
# properties over random shapes, samples and hyper-parameters
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 60), width=st.integers(1, 3), k=st.integers(0, 80),
       lr=st.floats(0.0, 2.0), nonnegative=st.booleans(), seed=st.integers(0, 2**16))
def test_indexed_step_property_matches_naive(m, width, k, lr, nonnegative, seed):
    rng = np.random.default_rng(seed)
    lam = rng.standard_normal((m, width))
    lam = np.abs(lam) if nonnegative else lam
    rows = rng.integers(0, m, size=k)
    values = rng.standard_normal((k, width))
    lower = 0.0 if nonnegative else -np.inf
    expected = naive.indexed_projected_step(lam, rows, values, lr, lower)
    uc.indexed_projected_ascent_(lam, rows, values, lr, nonnegative=nonnegative)
    np.testing.assert_allclose(lam, expected, **F64)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3), lr=st.floats(0.0, 0.5),
       kp=st.floats(0.0, 3.0), ki=st.floats(0.0, 3.0), nu=st.floats(-0.9, 0.9),
       wd=st.floats(0.0, 0.5), sgd=st.booleans(), maximize=st.booleans(),
       sparse=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_numpy_nupi_property_matches_naive(sizes, lr, kp, ki, nu, wd, sgd, maximize, sparse,
                                           seed):
    rng = np.random.default_rng(seed)
    init = "SGD" if sgd else "ZEROS"
    params = [rng.standard_normal(n) for n in sizes]
    refs = [naive.NaiveNuPI(p, lr, wd, kp, ki, nu, init, maximize) for p in params]
    opt = uc.nuPI(params, lr=lr, weight_decay=wd, Kp=kp, Ki=ki, ema_nu=nu, init_type=init,
                  maximize=maximize)
    for _ in range(4):
        grads = []
        for p, ref in zip(params, refs):
            if sparse:
                rows = rng.integers(0, p.size, size=3)
                vals = rng.standard_normal(3)
                grads.append((rows, vals))
                ref.sparse_step(rows, vals)
            else:
                g = rng.standard_normal(p.size)
                grads.append(g)
                ref.step(g)
        opt.step(grads)
    for p, ref in zip(params, refs):
        np.testing.assert_allclose(p, ref.theta, rtol=1e-12, atol=1e-13)
