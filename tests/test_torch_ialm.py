"""uniopt.adapters.torch.iALM: trajectory parity with humancompatible-train 0.4.2, the documented
deviations from it, agreement with the NumPy uniopt.iALM and between the kernel and torch-ops
paths, a fairness-constrained logistic regression, bad inputs, state dicts, the CUDA glue."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

import torch

from conftest import tolerance  # noqa: E402

import uniopt  # noqa: E402
from uniopt.adapters.torch import iALM  # noqa: E402
from uniopt.kernels import ialm_cpu  # noqa: E402

BACKENDS = ["auto", "torch"]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}

# Several groups: equality and inequality, unequal sizes, momentum with and without dampening,
# sigma > 1, and ranges narrow enough that the clamp binds during the run.
GROUPS = [
    dict(m=2, beta=0.5, sigma=1.05, gamma=0.3, momentum=0.5, dampening=0.2, dual_range=(-0.4, 0.4), is_ineq=False),
    dict(m=3, beta=0.8, sigma=1.1, gamma=2.0, momentum=0.0, dampening=0.0, dual_range=(-1.0, 0.05), is_ineq=True),
    dict(m=1, beta=1.0, sigma=1.02, gamma=0.5, momentum=0.9, dampening=0.0, dual_range=(-5.0, 0.3), is_ineq=False),
]


@pytest.fixture
def float64_default():
    """humancompatible-train builds beta/sigma/gamma and zero duals in torch's default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _make(cls, groups=GROUPS, **extra):
    g0 = groups[0]
    opt = cls(g0["m"], g0["beta"], g0["sigma"], g0["gamma"], dual_range=g0["dual_range"],
              momentum=g0["momentum"], dampening=g0["dampening"], is_ineq=g0["is_ineq"], **extra)
    for g in groups[1:]:
        opt.add_constraint_group(g["m"], g["beta"], g["sigma"], g["gamma"], momentum=g["momentum"],
                                 dampening=g["dampening"], dual_range=g["dual_range"], is_ineq=g["is_ineq"])
    return opt


class Logistic:
    """Logistic regression on fixed synthetic data, with 6 constraints on its weights."""

    def __init__(self, seed=0, n=30, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, 5, generator=gen, dtype=dtype)
        self.y = (torch.rand(n, generator=gen, dtype=dtype) > 0.5).to(dtype)
        self.dtype = dtype

    def params(self):
        return torch.nn.Parameter(torch.full((5,), 0.5, dtype=self.dtype))

    def loss(self, w):
        return torch.nn.functional.binary_cross_entropy_with_logits(self.X @ w, self.y)

    @staticmethod
    def constraints(w):
        return torch.cat([w[:2] - 0.3, w[2:5] ** 2 - 0.1, (w.sum() - 0.5).reshape(1)])


def _train(cls, idiom, steps=20, problem=None, **extra):
    """``steps`` primal-dual iterations; returns the per-step (L, duals, w) and the optimizer."""
    problem = problem or Logistic()
    w = problem.params()
    primal = torch.optim.SGD([w], lr=0.1)
    dual = _make(cls, **extra)
    history = []
    for _ in range(steps):
        primal.zero_grad()
        loss = problem.loss(w)
        c = problem.constraints(w)
        if idiom == "forward-update":        # L at the current duals; update after the step
            lagrangian = dual.forward(loss, c)
            lagrangian.backward()
            primal.step()
            dual.update(c)
        elif idiom == "forward_update":      # update, then L at the new duals
            lagrangian = dual.forward_update(loss, c)
            lagrangian.backward()
            primal.step()
        else:                                # forward -> update -> backward (ours only)
            lagrangian = dual.forward(loss, c)
            dual.update(c)
            lagrangian.backward()
            primal.step()
        history.append((lagrangian.item(), dual.duals.detach().clone(), w.detach().clone()))
    return history, dual


def _max_error(a, b):
    return max(max(abs(x[0] - y[0]), float((x[1] - y[1]).abs().max()), float((x[2] - y[2]).abs().max()))
               for x, y in zip(a, b))


def _bounds():
    lo = torch.cat([torch.full((g["m"],), max(g["dual_range"][0], 0.0) if g["is_ineq"] else g["dual_range"][0])
                    for g in GROUPS])
    hi = torch.cat([torch.full((g["m"],), g["dual_range"][1]) for g in GROUPS])
    return lo, hi


# ------------------------------------------------------------------------------------------------
# 1. Parity with humancompatible-train 0.4.2
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idiom", ["forward-update", "forward_update"])
def test_trajectory_matches_humancompatible_train(idiom, float64_default):
    import humancompatible.train.dual_optim as hct
    reference, _ = _train(hct.iALM, idiom)
    ours, dual = _train(iALM, idiom, penalty=None)
    assert _max_error(reference, ours) <= 1e-12
    # the run exercises the clamp: some multiplier sits on one of its bounds at some step
    lo, hi = _bounds()
    assert any(bool(((h[1] == lo) & (lo != 0)).any() | (h[1] == hi).any()) for h in ours)
    assert dual.param_groups[1]["beta"] == pytest.approx(0.8 * 1.1 ** 20, rel=1e-14)
    assert ours[-1][1].dtype == torch.float64


def test_forward_then_update_then_backward_works_where_the_reference_raises(float64_default):
    # ours: the same trajectory as forward -> backward -> update (L uses a detached copy)
    ours_late, _ = _train(iALM, "forward-update-backward", penalty=None)
    ours, _ = _train(iALM, "forward-update", penalty=None)
    assert _max_error(ours, ours_late) == 0.0
    import humancompatible.train.dual_optim as hct
    w = torch.nn.Parameter(torch.ones(2))
    ref = hct.iALM(m=2)
    lagrangian = ref.forward((w ** 2).sum(), w - 0.5)
    ref.update(w.detach() - 0.5)
    with pytest.raises(RuntimeError, match="inplace operation"):
        lagrangian.backward()


# ------------------------------------------------------------------------------------------------
# 2. Deviations from the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_zero_direction_is_a_zero_step(backend, momentum, float64_default):
    dual = iALM(m=3, gamma=0.0, momentum=momentum, init_duals=torch.tensor([0.5, -0.25, 0.0]), _backend=backend)
    dual.update(torch.zeros(3))
    assert torch.equal(dual.duals, torch.tensor([0.5, -0.25, 0.0]))
    assert dual.last_step[0]["stepsize"] == 0.0 and dual.last_step[0]["direction_norm"] == 0.0
    import humancompatible.train.dual_optim as hct
    ref = hct.iALM(m=3, gamma=0.0, momentum=momentum, dampening=0.0)
    ref.update(torch.zeros(3))  # 0/0 in its step size
    assert torch.isnan(ref.duals).all()


def test_added_groups_do_not_inherit_bounds(float64_default):
    dual = iALM(m=1, is_ineq=True)              # constructor group: [0, 100]
    dual.add_constraint_group(m=2)              # equality group: the constructor's (-100, 100)
    dual.update(torch.tensor([-1.0, -1.0, -2.0]))
    assert dual.param_groups[1]["lower_bound"] == -100.0
    assert dual.duals[0] == 0.0 and bool((dual.duals[1:] < 0).all())
    import humancompatible.train.dual_optim as hct
    ref = hct.iALM(m=1, is_ineq=True)
    ref.add_constraint_group(m=2)
    ref.update(torch.tensor([-1.0, -1.0, -2.0]))
    assert bool((ref.duals == 0).all())          # inherited lower bound 0


def test_load_state_dict_never_aliases(float64_default):
    a = _make(iALM)
    a.update(torch.linspace(-1, 1, 6))
    state = a.state_dict()
    b = _make(iALM)
    b.load_state_dict(state)
    before = b.duals.clone()
    buffers = [g["momentum_buffer"].clone() for g in b.param_groups]
    a.update(torch.ones(6))                                      # the source optimizer moves on
    for g in state["param_groups"]:                              # and its state dict is mutated
        g["params"][0].fill_(7.0)
        g["momentum_buffer"].fill_(7.0)
    assert torch.equal(b.duals, before)
    assert all(torch.equal(g["momentum_buffer"], buf) for g, buf in zip(b.param_groups, buffers))
    import humancompatible.train.dual_optim as hct
    ref_a, ref_b = hct.iALM(m=2), hct.iALM(m=2)
    ref_b.load_state_dict(ref_a.state_dict())
    ref_a.update(torch.ones(2))
    assert torch.equal(ref_b.duals, ref_a.duals) and bool((ref_b.duals != 0).all())  # aliased


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("duals_dtype,c_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_mixed_dtypes(duals_dtype, c_dtype, backend):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=c_dtype))
    dual = iALM(init_duals=torch.tensor([0.1, 0.2, 0.3], dtype=duals_dtype), penalty=2.0, _backend=backend)
    loss = (w ** 2).sum()
    c = w - 0.25
    lagrangian = dual.forward_update(loss, c)
    assert dual.duals.dtype == duals_dtype                   # init_duals fix the dtype
    assert lagrangian.dtype == loss.dtype
    lagrangian.backward()
    # dL/dw = 2 w + lambda_new + rho c (c is the raw constraint of an equality group)
    expected = 2 * w.detach() + dual.duals.to(c_dtype) + 2.0 * c.detach()
    torch.testing.assert_close(w.grad, expected, **tolerance(np.float32))
    # the update ran in the duals' dtype on the constraints cast to it
    c32 = (c.detach().to(duals_dtype))
    step = min(1.0, 1.0 / float(torch.linalg.norm(c32.double())))
    torch.testing.assert_close(dual.duals, torch.tensor([0.1, 0.2, 0.3], dtype=duals_dtype) + step * c32,
                               **tolerance(np.float32))


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.float64])
def test_duals_adopt_the_first_constraints_dtype(c_dtype):
    dual = iALM(m=2, init_duals=0.5)
    dual.update(torch.tensor([0.1, -0.2], dtype=c_dtype))
    assert dual.duals.dtype == c_dtype
    assert all(g["momentum_buffer"].dtype == c_dtype for g in dual.param_groups)
    dual.update(torch.tensor([0.1, -0.2], dtype=torch.float16))   # later constraints: cast
    assert dual.duals.dtype == c_dtype


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.float64])
def test_a_number_init_is_rounded_once_to_the_adopted_dtype(c_dtype):
    dual = iALM(m=2, init_duals=0.1, gamma=0.0)  # gamma = 0: a zero step, the duals stay
    dual.update(torch.zeros(2, dtype=c_dtype))
    assert dual.duals.tolist() == torch.full((2,), 0.1, dtype=c_dtype).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_violations_within_ctol_leave_the_multipliers_unchanged(backend, float64_default):
    dual = iALM(m=3, ctol=0.1, init_duals=torch.tensor([0.3, -0.2, 0.1]), _backend=backend)
    dual.add_constraint_group(m=2, is_ineq=True, init_duals=torch.tensor([0.5, 0.5]))
    dual.update(torch.tensor([0.05, -0.1, 0.0, 0.09, 0.1]))
    assert torch.equal(dual.duals, torch.tensor([0.3, -0.2, 0.1, 0.5, 0.5]))
    assert [s["stepsize"] for s in dual.last_step] == [0.0, 0.0]
    # outside the tolerance (and feasible inequalities) still move the multipliers
    dual.update(torch.tensor([0.5, 0.0, 0.0, -0.05, 0.2]))
    assert dual.duals[0] > 0.3 and torch.equal(dual.duals[1:3], torch.tensor([-0.2, 0.1]))
    assert dual.duals[3] < 0.5 and dual.duals[4] > 0.5
    # the quadratic term counts the filtered violations only; the linear term the raw values
    loss = torch.tensor(1.0)
    c = torch.tensor([0.05, -0.5, 0.0, 0.05, 0.3])
    lagrangian = dual.forward(loss, c)
    lam = dual.duals
    expected = 1.0 + float(lam @ c) + 0.5 * (0.5 ** 2 + 0.3 ** 2)
    assert lagrangian.item() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctol_zero_is_no_filter(backend, float64_default):
    lam = torch.tensor([0.25, -0.5, 1.0, 0.0])
    c = torch.tensor([1e-300, -0.0, 3e-8, -2.0])
    dual = iALM(init_duals=lam, ctol=0.0, beta=0.7, gamma=0.9, dual_range=(None, None), _backend=backend)
    dual.update(c)
    step = min(0.7, 0.9 / math.sqrt(float(c @ c)))
    assert torch.equal(dual.duals, lam + step * c)


def test_penalty_none_uses_the_pre_growth_beta_and_penalty_a_constant(float64_default):
    c = torch.tensor([0.5, -1.0])
    for penalty, rho in [(None, 2.0), (0.75, 0.75)]:
        dual = iALM(m=2, beta=2.0, sigma=3.0, penalty=penalty)
        lagrangian = dual.forward_update(torch.tensor(0.0), c)
        assert dual.param_groups[0]["beta"] == 6.0
        assert lagrangian.item() == pytest.approx(float(dual.duals @ c) + 0.5 * rho * float(c @ c), rel=1e-15)


# ------------------------------------------------------------------------------------------------
# 3. Agreement with the NumPy iALM, and between the kernel and torch-ops paths
# ------------------------------------------------------------------------------------------------
def _random_constraints(steps, n=6, seed=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) * (0.2 + k % 3) for k in range(steps)]


@pytest.mark.parametrize("ctol", [0.0, 0.3])
def test_same_inputs_give_the_numpy_iALMs_bits(ctol, dtype):
    cs = _random_constraints(12, dtype=dtype)
    ours = _make(iALM, ctol=ctol, penalty=None, init_duals=torch.zeros(2, dtype=TORCH_DTYPES[dtype]))
    ref = _make(uniopt.iALM, ctol=ctol, penalty=None, init_duals=np.zeros(2, dtype=dtype))
    for c in cs:
        loss = float(np.sum(c))
        value = ours.forward_update(torch.tensor(loss, dtype=torch.float64), torch.from_numpy(c))
        expected = ref.forward_update(loss, c)
        np.testing.assert_array_equal(ours.duals.numpy(), ref.duals)
        assert ours.last_step == ref.last_step
        if dtype == np.float64:
            assert value.item() == pytest.approx(expected, rel=1e-15, abs=1e-15)
    for g, h in zip(ours.param_groups, ref.param_groups):
        np.testing.assert_array_equal(g["momentum_buffer"].numpy(), h["momentum_buffer"])
        assert g["beta"] == h["beta"]


@pytest.mark.parametrize("ctol", [0.0, 0.3])
def test_torch_ops_path_matches_the_kernel(ctol, dtype):
    cs = _random_constraints(15, dtype=dtype)
    init = torch.zeros(2, dtype=TORCH_DTYPES[dtype])
    fast = _make(iALM, ctol=ctol, init_duals=init)
    slow = _make(iALM, ctol=ctol, init_duals=init, _backend="torch")
    for c in cs:
        fast.update(torch.from_numpy(c))
        slow.update(torch.from_numpy(c))
        torch.testing.assert_close(fast.duals, slow.duals, **tolerance(dtype))
        for a, b in zip(fast.last_step, slow.last_step):
            assert a["stepsize"] == pytest.approx(b["stepsize"], rel=1e-5 if dtype == np.float32 else 1e-12)
    for g, h in zip(fast.param_groups, slow.param_groups):
        torch.testing.assert_close(g["momentum_buffer"], h["momentum_buffer"], **tolerance(dtype))


def test_kernel_runs_once_per_group_on_zero_copy_views(monkeypatch):
    calls = []
    kernel = ialm_cpu.ialm_dual_step_

    def spy(dual, buffer, c, coef, hyper, flags):
        calls.append((dual, buffer))
        return kernel(dual, buffer, c, coef, hyper, flags)

    monkeypatch.setattr(ialm_cpu, "ialm_dual_step_", spy)
    dual = _make(iALM, init_duals=torch.zeros(2))
    dual.update(torch.ones(6))
    assert len(calls) == 3
    for (d, b), g in zip(calls, dual.param_groups):   # views of the tensors' own memory
        assert d.ctypes.data == g["params"][0].data_ptr() and b.ctypes.data == g["momentum_buffer"].data_ptr()
    calls.clear()
    _make(iALM, _backend="torch").update(torch.ones(6))
    iALM(init_duals=torch.zeros(6, dtype=torch.bfloat16)).update(torch.ones(6))
    assert calls == []


def test_bfloat16_duals_take_the_torch_path_and_track_float32():
    cs = _random_constraints(10, dtype=np.float32)
    low = iALM(init_duals=torch.zeros(6, dtype=torch.bfloat16), momentum=0.5, gamma=2.0)
    ref = iALM(init_duals=torch.zeros(6, dtype=torch.float32), momentum=0.5, gamma=2.0)
    for c in cs:
        low.update(torch.from_numpy(c))
        ref.update(torch.from_numpy(c))
    assert low.duals.dtype == torch.bfloat16
    torch.testing.assert_close(low.duals.float(), ref.duals, rtol=0.05, atol=0.05)


def test_constraint_forms_agree(float64_default):
    c = torch.linspace(-1, 2, 6)
    parts = [c[:2], c[2:5], c[5:]]
    flat, seq, named = _make(iALM), _make(iALM), _make(iALM)
    for _ in range(3):
        flat.update(c)
        seq.update(parts)
        named.update(dict(zip(named.names, parts)))
    assert torch.equal(flat.duals, seq.duals) and torch.equal(flat.duals, named.duals)
    scalar = iALM(m=1)
    scalar.update(torch.tensor(0.5))                # a 0-d tensor for a one-constraint group
    assert scalar.duals.tolist() == [0.5]


# ------------------------------------------------------------------------------------------------
# 4. A fairness-constrained logistic regression
# ------------------------------------------------------------------------------------------------
def test_demographic_parity_constrained_logistic_regression():
    """Bound the gap in mean predicted probability between two groups by eps = 0.05.

    The unconstrained model has a gap of about 0.4 (feature 0 and the group indicator carry the
    group). With full-batch SGD and iALM the constraint is active at the solution (its
    multiplier is positive, the other side's zero): primal-dual iterates converge linearly
    there, so after 300 steps the gap is eps to well within 1e-6, and it stays so over the
    last 50 steps (not a lucky crossing).
    """
    gen = torch.Generator().manual_seed(7)
    n, eps = 400, 0.05
    group = torch.rand(n, generator=gen) < 0.4
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    X[:, 0] += 1.5 * group.double()
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(2 * X[:, 0] + X[:, 1] - 0.5)).double()
    features = torch.cat([X, group.double()[:, None], torch.ones(n, 1, dtype=torch.float64)], 1)
    contrast = group.double() / group.sum() - (~group).double() / (~group).sum()

    def gap(w):  # mean sigmoid score in the group minus outside it
        return torch.sigmoid(features @ w) @ contrast

    def train(constrained, steps=300):
        w = torch.nn.Parameter(torch.zeros(features.shape[1], dtype=torch.float64))
        primal = torch.optim.SGD([w], lr=2.0)
        dual = iALM(m=2, beta=0.5, is_ineq=True, penalty=5.0)
        gaps = []
        for _ in range(steps):
            primal.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ w, y)
            d = gap(w)
            objective = dual.forward_update(loss, torch.stack([d - eps, -d - eps])) if constrained else loss
            objective.backward()
            primal.step()
            gaps.append(d.item())
        return gap(w).item(), gaps, dual

    free_gap, _, _ = train(False)
    fair_gap, gaps, dual = train(True)
    assert free_gap > 4 * eps
    assert abs(fair_gap) <= eps + 1e-6
    assert max(abs(g) for g in gaps[-50:]) <= eps + 1e-6
    assert dual.duals[0] > 0 and dual.duals[1] == 0


# ------------------------------------------------------------------------------------------------
# 5. Bad inputs
# ------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(m=0), ValueError, "Invalid m: 0"),
    (dict(m=1.5), TypeError, "Invalid m: 1.5"),
    (dict(m=True), TypeError, "Invalid m: True"),
    (dict(), ValueError, "needs m or init_duals"),
    (dict(m=2, beta=-1.0), ValueError, "Invalid beta value: -1.0"),
    (dict(m=2, beta="x"), TypeError, "Invalid beta value: 'x'"),
    (dict(m=2, sigma=0.0), ValueError, "Invalid sigma value: 0.0"),
    (dict(m=2, gamma=math.nan), ValueError, "Invalid gamma value: nan"),
    (dict(m=2, gamma=math.inf), ValueError, "Invalid gamma value: inf"),
    (dict(m=2, momentum=1.5), ValueError, "Invalid momentum value: 1.5"),
    (dict(m=2, dampening=-0.1), ValueError, "Invalid dampening value: -0.1"),
    (dict(m=2, dual_range=(1.0, 0.0)), ValueError, r"Invalid dual_range: \(1.0, 0.0\)"),
    (dict(m=2, dual_range=5), TypeError, "Invalid dual_range: 5"),
    (dict(m=2, dual_range=(0, 1, 2)), ValueError, r"Invalid dual_range: \(0, 1, 2\)"),
    (dict(m=2, is_ineq=True, dual_range=(-1.0, -0.5)), ValueError, "Invalid dual_range"),
    (dict(m=2, is_ineq="yes"), TypeError, "Invalid is_ineq: 'yes'"),
    (dict(m=2, ctol=-1.0), ValueError, "Invalid ctol value: -1.0"),
    (dict(m=2, penalty=-1.0), ValueError, "Invalid penalty value: -1.0"),
    (dict(init_duals="x"), TypeError, "Invalid init_duals"),
    (dict(init_duals=torch.zeros(2, 2)), TypeError, "Invalid init_duals.*shape"),
    (dict(init_duals=torch.zeros(2, dtype=torch.int64)), TypeError, "Invalid init_duals.*int64"),
    (dict(m=2, init_duals=torch.zeros(3)), ValueError, "Invalid init_duals: 3 values for m=2"),
    (dict(m=2, device="nonsense"), TypeError, "Invalid device: 'nonsense'"),
    (dict(m=2, _backend="numba"), ValueError, "Invalid _backend: 'numba'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        iALM(**kwargs)


BAD_GROUPS = [
    (dict(m=1, name="group0"), ValueError, "Invalid name: 'group0'"),
    (dict(m=1, name=3), TypeError, "Invalid name: 3"),
    (dict(m=1, momentum=2.0), ValueError, "Invalid momentum value: 2.0"),
    (dict(m=1, dual_range=(3.0, 2.0)), ValueError, "Invalid dual_range"),
    (dict(m=1, device="zz"), TypeError, "Invalid device: 'zz'"),
    (dict(m=-3), ValueError, "Invalid m: -3"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_GROUPS)
def test_bad_group(kwargs, error, message):
    dual = iALM(m=2)
    with pytest.raises(error, match=message):
        dual.add_constraint_group(**kwargs)
    assert dual.names == ["group0"]


BAD_STEPS = [
    (torch.ones(5), ValueError, "expected 6 values"),
    ([torch.ones(2), torch.ones(3)], ValueError, r"one value per group \(3\), got 2"),
    ([torch.ones(2), torch.ones(3), torch.ones(2)], ValueError, "'group2' has 1 multipliers but got 2"),
    ({"group0": torch.ones(2), "group1": torch.ones(3), "other": torch.ones(1)}, ValueError, r"missing \['group2'\]"),
    (torch.ones(6, dtype=torch.complex128), TypeError, "expected real numbers"),
    ("abc", TypeError, "constraints"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("constraints,error,message", BAD_STEPS)
def test_failing_step_changes_nothing(constraints, error, message, backend):
    dual = _make(iALM, _backend=backend)
    dual.update(torch.linspace(-1, 1, 6))
    before = dual.state_dict()
    for method in (dual.update, dual.step, lambda c: dual.forward_update(torch.tensor(0.0), c)):
        with pytest.raises(error, match=message):
            method(constraints)
    after = dual.state_dict()
    for g, h in zip(before["param_groups"], after["param_groups"]):
        assert torch.equal(g["params"][0], h["params"][0]) and torch.equal(g["momentum_buffer"], h["momentum_buffer"])
        assert g["beta"] == h["beta"] and g["params"][0].dtype == h["params"][0].dtype


# ------------------------------------------------------------------------------------------------
# 6. State dicts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("via_file", [False, True])
def test_state_dict_round_trip_resumes_identically(via_file):
    cs = [torch.from_numpy(c) for c in _random_constraints(10)]
    straight = _make(iALM, penalty=None, ctol=0.05)
    for c in cs:
        straight.update(c)
    first = _make(iALM, penalty=None, ctol=0.05)
    for c in cs[:4]:
        first.update(c)
    state = first.state_dict()
    if via_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer)              # weights_only: plain types and tensors only
    resumed = iALM(m=1)                          # another layout: load replaces it
    resumed.load_state_dict(state)
    assert resumed.names == first.names and resumed.penalty is None and resumed.ctol == 0.05
    for c in cs[4:]:
        resumed.update(c)
    assert torch.equal(resumed.duals, straight.duals)
    for g, h in zip(resumed.param_groups, straight.param_groups):
        assert torch.equal(g["momentum_buffer"], h["momentum_buffer"]) and g["beta"] == h["beta"]


def test_load_state_dict_validates():
    state = _make(iALM).state_dict()
    state["param_groups"][1]["momentum"] = 3.0
    dual = iALM(m=1)
    with pytest.raises(ValueError, match="Invalid momentum value: 3.0"):
        dual.load_state_dict(state)
    assert dual.names == ["group0"]


def test_device_places_the_duals():
    dual = iALM(m=2, device="cpu")
    dual.add_constraint_group(m=1, device=torch.device("cpu"))
    assert all(g["params"][0].device.type == "cpu" for g in dual.param_groups)
    assert "iALM" in repr(dual) and dual.m == 3


# ------------------------------------------------------------------------------------------------
# CUDA: the glue on the simulator, the real thing where torch sees a GPU
# ------------------------------------------------------------------------------------------------
def test_cuda_glue_matches_the_cpu_kernel_on_the_simulator(float64_default):
    import numba.cuda  # noqa: F401  (numba-cuda: the test extra)
    import numba

    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("the numba-cuda simulator is off (a real device is tested below)")
    try:
        from uniopt.kernels import ialm_cuda  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"uniopt.kernels.ialm_cuda is not importable: {exc}")
    sim, cpu = _make(iALM, ctol=0.1), _make(iALM, ctol=0.1)   # groups with and without momentum
    for c in _random_constraints(2):
        c = torch.from_numpy(c)
        cpu.update(c)
        for group, part in zip(sim.param_groups, [c[:2], c[2:5], c[5:]]):
            sim._rule.ctol = sim.ctol   # the dispatcher's cuda path, on host arrays
            sim._rule.run_cuda(group, group["params"][0].numpy(), part.contiguous().numpy(),
                               [group["momentum_buffer"].numpy()], group, 0)
            group["beta"] *= group["sigma"]
        torch.testing.assert_close(sim.duals, cpu.duals, **tolerance(np.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to torch")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_tensors_match_cpu(dtype, backend):
    torch_dtype = TORCH_DTYPES[dtype]
    cpu = _make(iALM, init_duals=torch.zeros(2, dtype=torch_dtype), ctol=0.1)
    gpu = _make(iALM, init_duals=torch.zeros(2, dtype=torch_dtype), ctol=0.1, device="cuda", _backend=backend)
    assert gpu.duals.device.type == "cuda"
    for c in _random_constraints(8, dtype=dtype):
        c = torch.from_numpy(c)
        cpu.update(c)
        gpu.update(c.to("cuda"))
    torch.testing.assert_close(gpu.duals.cpu(), cpu.duals, **tolerance(dtype))
    value = gpu.forward(torch.tensor(1.0, device="cuda"), torch.ones(6, device="cuda", dtype=torch_dtype))
    assert value.device.type == "cuda"


def test_replaced_multiplier_tensors_are_used(float64_default):
    """The cached zero-copy views follow a group's tensors when they are replaced by hand."""
    import torch

    c = torch.tensor([0.3, -0.2, 0.5])
    ours = iALM(3, gamma=1e6, momentum=0.5)
    ref = uniopt.iALM(3, gamma=1e6, momentum=0.5)
    ours.update(c)
    ref.update(c.numpy())
    ours.param_groups[0]["params"] = [torch.full((3,), 0.25)]
    ref.param_groups[0]["duals"] = np.full(3, 0.25)
    ours.param_groups[0]["momentum_buffer"].data = torch.ones(3)  # same tensor, new storage
    ref.param_groups[0]["momentum_buffer"] = np.ones(3)
    ours.update(c)
    ref.update(c.numpy())
    np.testing.assert_array_equal(ours.duals.numpy(), ref.duals)
    np.testing.assert_array_equal(ours.param_groups[0]["momentum_buffer"].numpy(),
                                  ref.param_groups[0]["momentum_buffer"])
