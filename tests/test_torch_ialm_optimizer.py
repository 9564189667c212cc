"""uniopt.adapters.torch.iALM as a torch.optim.Optimizer and a drop-in for humancompatible-train
0.4.2: param groups, hooks, add_param_group, bounds/violation, state dicts loaded both ways
(trajectories continue), the multipliers' dtype before and after the first update, non-finite
constraint values, norms whose square over- or underflows, and the copy-free Lagrangian."""

from __future__ import annotations

import copy
import io
import math

import pytest

import torch

from test_torch_ialm import GROUPS, Logistic, _make  # noqa: E402

from uniopt.adapters.torch import iALM  # noqa: E402

BACKENDS = ["auto", "torch"]


def _hct():
    """The reference; a missing one fails the test (it is a test dependency)."""
    from humancompatible.train import dual_optim

    return dual_optim


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------
# 1. An Optimizer with humancompatible-train's param groups
# ------------------------------------------------------------------------------------------------
def test_param_groups_hold_the_multipliers_updated_in_place():
    dual = _make(iALM)
    assert isinstance(dual, torch.optim.Optimizer)
    held = [g["params"] for g in dual.param_groups]
    assert [len(p) for p in held] == [1, 1, 1]
    assert [p[0].numel() for p in held] == [g["m"] for g in GROUPS]
    c = torch.linspace(-1, 1, 6)
    dual.update(c)
    for g, p in zip(dual.param_groups, held):
        assert g["params"][0] is p[0]                # the same tensors, changed in place
    assert torch.equal(torch.cat([p[0] for p in held]), dual.duals)
    assert bool((dual.duals != 0).any())
    held[0][0].grad = torch.ones(2)                 # zero_grad is torch's
    dual.zero_grad()
    assert held[0][0].grad is None


def test_step_runs_the_step_hooks_update_is_the_same_step():
    calls = []
    dual, twin = iALM(m=3), iALM(m=3)

    def pre(opt, args, kwargs):
        calls.append(("pre", opt.duals.clone()))
        return (args[0], args[1] * 2), kwargs        # (self, constraints): hooks may replace them

    def post(opt, args, kwargs):
        calls.append(("post", opt.duals.clone()))

    handles = [dual.register_step_pre_hook(pre), dual.register_step_post_hook(post)]
    c = torch.tensor([0.5, -1.0, 0.25])
    dual.step(c)
    twin.update(c * 2)
    assert [k for k, _ in calls] == ["pre", "post"]
    assert torch.equal(calls[0][1], torch.zeros(3)) and torch.equal(calls[1][1], twin.duals)
    assert torch.equal(dual.duals, twin.duals)
    dual.update(c)                                   # update is the plain method: no hooks
    assert len(calls) == 2
    for h in handles:
        h.remove()
    dual.step(c)
    assert len(calls) == 2


def test_add_param_group_in_torch_form():
    """A group given as torch's dict: the tensor is used in place, 0-d tensor settings (the
    reference's form) are read, missing settings are the defaults, never another group's."""
    dual = iALM(m=1, is_ineq=True, dual_range=(-5.0, 5.0), momentum=0.5)
    lam = torch.zeros(2)
    dual.add_param_group({"params": [lam], "beta": torch.tensor(0.5), "gamma": 10.0, "name": "eq"})
    twin = iALM(m=1, is_ineq=True, dual_range=(-5.0, 5.0), momentum=0.5)
    twin.add_constraint_group(m=2, beta=0.5, gamma=10.0, init_duals=torch.zeros(2))
    g = dual.param_groups[1]
    assert g["params"][0] is lam and g["name"] == "eq" and g["beta"] == 0.5 and g["sigma"] == 1.0
    assert g["is_ineq"] is False and g["lower_bound"] == -5.0 and g["momentum"] == 0.5
    for _ in range(3):
        dual.update(torch.tensor([1.0, -2.0, -3.0]))
        twin.update(torch.tensor([1.0, -2.0, -3.0]))
    assert torch.equal(dual.duals, twin.duals) and bool((lam < 0).all())


@pytest.mark.parametrize("group,error,message", [
    ({"params": [torch.zeros(2, 2)]}, TypeError, "1-D floating"),
    ({"params": [torch.zeros(2), torch.zeros(2)]}, ValueError, "exactly one tensor"),
    ({"params": [torch.zeros(2)], "momentum": 3.0}, ValueError, "Invalid momentum value: 3.0"),
    ({"params": [torch.zeros(2)], "name": "group0"}, ValueError, "Invalid name: 'group0'"),
    ({"params": [torch.zeros(2)], "momentum_buffer": torch.zeros(3)}, ValueError, "momentum buffer"),
])
def test_add_param_group_checks_first(group, error, message):
    dual = iALM(m=1)
    with pytest.raises(error, match=message):
        dual.add_param_group(group)
    assert dual.names == ["group0"]
    with pytest.raises(ValueError, match="more than one parameter group"):
        dual.add_param_group({"params": dual.param_groups[0]["params"]})


def test_bounds_and_violation_match_the_reference():
    hct = _hct()
    ours, ref = iALM(m=2), hct.iALM(m=2)
    assert ours.bounds is None and ref.bounds is None
    c = torch.tensor([0.5, -0.25, 0.75, 0.1, 2.0])
    for opt in (ours, ref):
        opt.add_constraint_group(m=2, bound=0.25, name="b")
        opt.add_constraint_group(m=1)
    torch.testing.assert_close(ours.bounds, ref.bounds, rtol=0, atol=0)
    assert ours.violation(c).item() == ref.violation(c).item() == 2.0
    named = {"group0": c[:2], "b": c[2:4], "group2": torch.tensor([-1.0])}
    assert ours.violation(named).item() == ref.violation(named).item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# 2. State dicts, both ways: the trajectory continues
# ------------------------------------------------------------------------------------------------
def _run(dual, problem, w, primal, steps):
    out = []
    for _ in range(steps):
        primal.zero_grad()
        lagrangian = dual.forward_update(problem.loss(w), problem.constraints(w))
        lagrangian.backward()
        primal.step()
        out.append((lagrangian.item(), dual.duals.detach().clone()))
    return out


def _via_file(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)                        # weights_only: tensors and plain types


@pytest.mark.parametrize("direction", ["hct->uniopt", "uniopt->hct"])
def test_state_dict_from_the_other_library_continues_the_trajectory(direction, float64_default):
    hct = _hct()
    problem = Logistic()
    first_cls, second_cls = (hct.iALM, iALM) if direction == "hct->uniopt" else (iALM, hct.iALM)

    def make(cls):
        return _make(cls, penalty=None) if cls is iALM else _make(cls)

    w = problem.params()
    primal = torch.optim.SGD([w], lr=0.1)
    reference = _run(_make(hct.iALM), problem, w, primal, 12)      # the reference, 12 steps

    w = problem.params()
    primal = torch.optim.SGD([w], lr=0.1)
    first = make(first_cls)
    head = _run(first, problem, w, primal, 5)
    second = second_cls(m=1)                                         # another layout: replaced
    second.load_state_dict(_via_file(first.state_dict()))
    tail = _run(second, problem, w, primal, 7)
    worst = max(max(abs(a[0] - b[0]), float((a[1] - b[1]).abs().max()))
                for a, b in zip(reference, head + tail))
    assert worst <= 1e-12
    assert second.names == [f"group{k}" for k in range(3)]
    betas = [float(g["beta"]) for g in second.param_groups]
    assert betas == pytest.approx([g["beta"] * g["sigma"] ** 12 for g in GROUPS], rel=1e-14)
    if second_cls is iALM:
        assert second.penalty is None and second.ctol == 0.0      # the reference's coefficient


def test_reference_state_dict_in_float32_loads_and_steps():
    hct = _hct()
    ref = _make(hct.iALM)
    c = torch.linspace(-1, 1, 6)
    ref.update(c)
    ours = iALM(m=1)
    ours.load_state_dict(ref.state_dict())
    ref.update(c)
    ours.update(c)
    assert ours.duals.dtype == torch.float32
    torch.testing.assert_close(ours.duals, ref.duals, rtol=2e-6, atol=1e-7)
    ref.update(c)                                      # the reference's tensors were copied
    assert not torch.equal(ours.duals, ref.duals)


def test_our_old_state_dict_layout_still_loads(float64_default):
    dual = _make(iALM, penalty=0.5, ctol=0.1)
    dual.update(torch.linspace(-1, 1, 6))
    new = dual.state_dict()
    old = {"penalty": 0.5, "ctol": 0.1, "param_groups": [
        {("duals" if k == "params" else k): (v[0] if k == "params" else v) for k, v in g.items()}
        for g in new["param_groups"]]}
    loaded = iALM(m=1)
    loaded.load_state_dict(old)
    assert torch.equal(loaded.duals, dual.duals) and loaded.penalty == 0.5 and loaded.ctol == 0.1


def test_state_dict_hooks_run():
    dual = iALM(m=2)
    seen = []
    dual.register_state_dict_pre_hook(lambda opt: seen.append("pre"))
    dual.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    dual.register_load_state_dict_pre_hook(lambda opt, sd: seen.append("load-pre"))
    dual.register_load_state_dict_post_hook(lambda opt: seen.append("load-post"))
    state = dual.state_dict()
    assert state["extra"] == 1
    dual.load_state_dict(state)
    assert seen == ["pre", "load-pre", "load-post"]


def test_deepcopy_continues_identically():
    dual = _make(iALM, penalty=None, ctol=0.05)
    c = torch.linspace(-1, 2, 6)
    dual.update(c)
    twin = copy.deepcopy(dual)
    assert twin.penalty is None and twin.ctol == 0.05
    for _ in range(3):
        dual.update(c)
        twin.update(c)
    assert torch.equal(dual.duals, twin.duals)


# ------------------------------------------------------------------------------------------------
# 3. dtypes: the reference's before the first update, the constraints' after
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_before_the_first_update_the_multipliers_have_the_references_dtype(default):
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        ours, ref = iALM(m=3, init_duals=0.5), _hct().iALM(m=3, init_duals=0.5)
        ours.add_constraint_group(m=2)
        ref.add_constraint_group(m=2)
        assert ours.duals.dtype == ref.duals.dtype == default
        c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
        assert (ours.duals @ c).item() == (ref.duals @ c).item() == 3.0
    finally:
        torch.set_default_dtype(old)


def test_float64_constraints_settle_float64_multipliers_exactly():
    assert torch.get_default_dtype() == torch.float32
    dual = iALM(m=2, init_duals=0.1, gamma=0.5, dual_range=(None, None))
    lam = dual.param_groups[0]["params"][0]
    assert lam.dtype == torch.float32
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    lagrangian = dual.forward(torch.tensor(0.0, dtype=torch.float64), c)   # before: promoted
    assert lagrangian.item() == pytest.approx(0.1 * (0.3 - 0.4) + 0.5 * 0.25, rel=1e-7)
    dual.update(c)
    assert dual.param_groups[0]["params"][0] is lam and lam.dtype == torch.float64
    step = min(1.0, 0.5 / math.sqrt(0.3 ** 2 + 0.4 ** 2))
    expected = torch.tensor([0.1, 0.1], dtype=torch.float64) + step * c   # 0.1 exact in float64
    assert torch.equal(dual.duals, expected)
    dual.update(c.float())                            # later constraints: cast
    assert dual.duals.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# 4. Non-finite constraint values raise, naming the group, before anything changes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,where", [(math.nan, 1), (math.inf, 3), (-math.inf, 4), (math.nan, 5)])
def test_non_finite_constraints_raise_naming_the_group(bad, where, backend):
    dual = _make(iALM, _backend=backend)                # group1 (positions 2-4) is an inequality group
    dual.update(torch.linspace(-1, 1, 6))
    before = dual.state_dict()
    c = torch.linspace(-1, 1, 6)
    c[where] = bad
    name = ["group0", "group0", "group1", "group1", "group1", "group2"][where]
    for method in (dual.update, dual.step, lambda v: dual.forward_update(torch.tensor(0.0), v)):
        with pytest.raises(ValueError, match=f"group '{name}' has 1 non-finite"):
            method(c)
    after = dual.state_dict()
    for g, h in zip(before["param_groups"], after["param_groups"]):
        assert torch.equal(g["params"][0], h["params"][0])
        assert torch.equal(g["momentum_buffer"], h["momentum_buffer"]) and g["beta"] == h["beta"]


def _snapshot(dual):
    """Every group's multipliers, momentum buffer (bytes) and beta, and ``last_step``."""
    return ([(g["params"][0].detach().clone(), g["momentum_buffer"].clone(), g["beta"])
             for g in dual.param_groups], [dict(s) for s in dual.last_step])


def _assert_unchanged(dual, snapshot):
    groups, last = snapshot
    for g, (duals, buffer, beta) in zip(dual.param_groups, groups):
        p = g["params"][0].detach()
        assert p.dtype == duals.dtype and p.numpy().tobytes() == duals.numpy().tobytes()
        assert g["momentum_buffer"].numpy().tobytes() == buffer.numpy().tobytes()
        assert g["beta"] == beta
    assert dual.last_step == last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.float64])
def test_momentum_group_with_non_finite_constraints_changes_nothing(bad, backend, torch_dtype,
                                                                    monkeypatch):
    """A single momentum group: on the kernel path its constraints are not checked first (the
    kernel's first pass is read-only), on the torch path they are; both raise naming the group
    and leave multipliers, buffer, beta and last_step bit for bit as they were."""
    starts = []
    check = iALM._check_finite

    def spy(self, parts, start=0):
        starts.append(start)
        return check(self, parts, start)

    monkeypatch.setattr(iALM, "_check_finite", spy)
    dual = iALM(m=5, beta=0.6, sigma=1.5, momentum=0.7, dampening=0.1, _backend=backend,
                init_duals=torch.zeros(5, dtype=torch_dtype))
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        dual.update(torch.randn(5, generator=gen, dtype=torch_dtype))
    starts.clear()
    snapshot = _snapshot(dual)
    c = torch.randn(5, generator=gen, dtype=torch_dtype)
    c[3] = bad
    for method in (dual.update, dual.step, lambda v: dual.forward_update(torch.tensor(0.0), v)):
        with pytest.raises(ValueError, match="group 'group0' has 1 non-finite value"):
            method(c)
        _assert_unchanged(dual, snapshot)
    assert starts == ([] if backend == "auto" else [0, 0, 0])   # the kernel path: no pre-check
    c[3] = 0.25
    dual.update(c)                                            # and the next good step runs
    assert not torch.equal(dual.param_groups[0]["momentum_buffer"], snapshot[0][0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_later_group_with_non_finite_constraints_changes_no_group(backend):
    dual = _make(iALM, _backend=backend)
    dual.update(torch.linspace(-1, 1, 6))
    snapshot = _snapshot(dual)
    c = torch.linspace(-1, 1, 6)
    c[5] = math.nan                                           # group2 (momentum 0.9)
    with pytest.raises(ValueError, match="group 'group2' has 1 non-finite"):
        dual.update(c)
    _assert_unchanged(dual, snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 2])
def test_an_overflowing_direction_in_any_group_changes_no_group(backend, k):
    """Three groups (momentum in groups 0 and 2), float32: finite constraints whose momentum
    direction overflows in group ``k`` raise before any group moves, the earlier ones too."""
    dual = _make(iALM, _backend=backend, init_duals=torch.zeros(2))
    dual.update(torch.linspace(-1, 1, 6))
    at = {0: slice(0, 2), 2: slice(5, 6)}[k]
    dual.param_groups[k]["momentum_buffer"].fill_(3e38)
    snapshot = _snapshot(dual)
    c = torch.linspace(-1, 1, 6)
    c[at] = 3e38                                   # finite; 0.5 or 0.9 * 3e38 + 3e38 is not
    with pytest.raises(ValueError, match=f"direction of group 'group{k}' is not finite .*"
                                         f"nothing was updated"):
        dual.update(c)
    _assert_unchanged(dual, snapshot)
    c[5] = math.nan                                # a non-finite value is named as such
    with pytest.raises(ValueError, match="group 'group2' has 1 non-finite"):
        dual.update(c)
    _assert_unchanged(dual, snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_momentum_buffer_raises_and_changes_nothing(backend):
    """Finite constraints whose float32 momentum direction overflows: raised, nothing written."""
    dual = iALM(m=3, momentum=0.9, init_duals=torch.zeros(3), dual_range=(None, None),
                _backend=backend)
    dual.update(torch.full((3,), 3e38))
    snapshot = _snapshot(dual)
    with pytest.raises(ValueError, match="group 'group0' is not finite .*momentum buffer overflowed"):
        dual.update(torch.full((3,), 3e38))
    _assert_unchanged(dual, snapshot)


def test_huge_finite_constraints_are_not_mistaken_for_non_finite():
    dual = iALM(m=4, init_duals=torch.zeros(4), dual_range=(None, None))
    c = torch.full((4,), 3e38)                          # float32: the sum overflows, not the values
    dual.update(c)
    assert bool(torch.isfinite(dual.duals).all())
    torch.testing.assert_close(dual.duals, torch.full((4,), 0.5), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# 5. A norm whose square over- or underflows (BLAS nrm2's scaling)
# ------------------------------------------------------------------------------------------------
def _overflow_case(backend):
    dual = iALM(init_duals=torch.zeros(2, dtype=torch.float64), dual_range=(None, None),
                _backend=backend)
    d = torch.tensor([1e200, 1e200], dtype=torch.float64)
    dual.update(d)
    stepsize = min(1.0, 1.0 / (1e200 * math.sqrt(2.0)))  # ||d|| = max|d| * sqrt(sum((d/max|d|)^2))
    return dual, torch.full((2,), stepsize * 1e200, dtype=torch.float64), stepsize


def test_overflowing_norm_gives_finite_multipliers_torch_path():
    dual, expected, stepsize = _overflow_case("torch")
    assert torch.equal(dual.duals, expected)
    assert dual.last_step[0]["stepsize"] == stepsize
    assert dual.last_step[0]["direction_norm"] == 1e200 * math.sqrt(2.0)


def test_overflowing_norm_gives_finite_multipliers_kernel_path():
    dual, expected, stepsize = _overflow_case("auto")
    assert torch.equal(dual.duals, expected)
    assert dual.last_step[0]["stepsize"] == pytest.approx(stepsize, rel=1e-15)
    assert dual.last_step[0]["direction_norm"] == pytest.approx(1e200 * math.sqrt(2.0), rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_underflowing_norm_still_steps(backend):
    dual = iALM(init_duals=torch.zeros(2, dtype=torch.float64), beta=0.5, dual_range=(None, None),
                _backend=backend)
    d = torch.tensor([1e-200, -3e-200], dtype=torch.float64)    # d @ d underflows to 0
    dual.update(d)
    assert torch.equal(dual.duals, 0.5 * d)                       # min(beta, gamma / ||d||) = beta
    assert dual.last_step[0]["stepsize"] == 0.5


# ------------------------------------------------------------------------------------------------
# 6. The Lagrangian keeps the multipliers it was built with, without copying them
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_and_later_updates(backend):
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    dual = iALM(init_duals=torch.tensor([0.25, 0.5, -0.75]), penalty=0.0, _backend=backend)
    lam0 = dual.duals.clone()
    first = dual.forward(torch.tensor(0.0), 3.0 * w)
    first.backward(retain_graph=True)
    g0 = w.grad.clone()
    torch.testing.assert_close(g0, 3.0 * lam0)
    second = dual.forward_update(torch.tensor(0.0), 3.0 * w)   # updates in place
    lam1 = dual.duals.clone()
    assert not torch.equal(lam0, lam1)
    w.grad = None
    first.backward()                                 # the retained graph: still the old duals
    torch.testing.assert_close(w.grad, g0)
    w.grad = None
    dual.update(3.0 * w.detach())                    # before second's backward
    second.backward()
    torch.testing.assert_close(w.grad, 3.0 * lam1)


def test_no_copy_of_the_multipliers_once_the_graph_is_used():
    dual = iALM(init_duals=torch.zeros(4))
    w = torch.nn.Parameter(torch.ones(4))
    lagrangian = dual.forward_update(torch.tensor(0.0), w - 0.5)
    alias = dual._alias(dual.param_groups[0]["params"][0])
    assert alias.data_ptr() == dual.param_groups[0]["params"][0].data_ptr()   # no copy
    lagrangian.backward()
    dual.update(w.detach() - 0.5)                    # the graph is spent: still no copy
    assert alias.data_ptr() == dual.param_groups[0]["params"][0].data_ptr()
    torch.testing.assert_close(w.grad, torch.full((4,), 0.5) + 1.0 * (w.detach() - 0.5))
