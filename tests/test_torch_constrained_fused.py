"""The fused dual step of uniopt's constrained optimizers (``ConstrainedOptimizer.dual_step``).

Every route is compared with the ordinary path it replaces -- the dual optimizer's own
``step()`` followed by every multiplier's ``post_step_()``, run here by hand on an identical
copy of the problem -- and every fallback condition is checked to take the ordinary path
(``_fused_dual.last_routes``). Equality: the nuPI route is bitwise the ordinary path; the SGD
routes agree with it to one ulp per contribution to an entry (:func:`_ulp_bound`), because
torch's CPU ``add_(g, alpha=lr)`` evaluates ``p + lr * g`` with a fused multiply-add (checked
below), entry by entry for an uncoalesced sparse gradient, while the kernels add a row's
sampled values first and never fuse. Trajectories against cooper-optim itself are in
``test_torch_constrained_optim.py`` and ``test_cooper_suite.py``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import uniopt.adapters.torch.constrained as cooper
from uniopt.adapters.torch.constrained import optim as uoptim

INEQ, EQ = cooper.ConstraintType.INEQUALITY, cooper.ConstraintType.EQUALITY
F64, F32 = torch.float64, torch.float32


class Problem(cooper.ConstrainedMinimizationProblem):
    """Constraints ``c0, c1, ...`` with the given (type, multiplier) pairs; the tests put the
    dual gradients in place themselves."""

    def __init__(self, specs):
        super().__init__()
        for i, (ctype, multiplier) in enumerate(specs):
            setattr(self, f"c{i}", cooper.Constraint(ctype, multiplier=multiplier))

    def compute_cmp_state(self):  # pragma: no cover - never rolled here
        raise NotImplementedError


def _dense(n, dtype=F64, nonneg=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    init = torch.rand(n, generator=g, dtype=F64) - (0.0 if nonneg else 0.5)
    return cooper.multipliers.DenseMultiplier(init=init.to(dtype))


def _indexed(m, dtype=F64, nonneg=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    init = torch.rand(m, generator=g, dtype=F64) - (0.0 if nonneg else 0.5)
    return cooper.multipliers.IndexedMultiplier(init=init.to(dtype))


def _copt(cmp, make_dual):
    x = torch.zeros(1, requires_grad=True)
    return uoptim.SimultaneousOptimizer(cmp, torch.optim.SGD([x], lr=0.1), make_dual(cmp))


def _sgd(lr=0.3, **kw):
    return lambda cmp: torch.optim.SGD(cmp.dual_parameters(), lr=lr, maximize=True, **kw)


def _set_grads(cmp, step, sampled=None):
    """Deterministic dual gradients of step ``step``: dense ones for Dense multipliers, the
    sparse embedding gradient of ``sampled`` rows (with repeats) for Indexed ones."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, m in enumerate(cmp.multipliers()):
        w = m.weight
        w.grad = None
        if isinstance(m, cooper.multipliers.IndexedMultiplier):
            n = w.shape[0]
            rows = sampled if sampled is not None else torch.randint(0, n, (max(1, n // 3),), generator=g)
            rows = torch.cat([rows, rows[: max(1, rows.numel() // 4)]])  # repeats add up
            values = torch.randn(rows.numel(), generator=g, dtype=F64).to(w.dtype)
            (m(rows) * values).sum().backward()
            assert w.grad.layout == torch.sparse_coo and not w.grad.is_coalesced()
        else:
            w.grad = torch.randn(w.shape, generator=g, dtype=F64).to(w.dtype)


def _ordinary(copt):
    """Cooper's dual step, by hand: every dual optimizer's step(), every post_step_()."""
    with torch.no_grad():
        for opt in copt.dual_optimizers:
            opt.step()
        for m in copt._multipliers():
            m.post_step_()


def _pair(specs, make_dual):
    """Two identical (cmp, constrained optimizer) pairs built from ``specs`` (a callable)."""
    a, b = Problem(specs()), Problem(specs())
    return (a, _copt(a, make_dual)), (b, _copt(b, make_dual))


def _weights(cmp):
    return [m.weight.detach().clone() for m in cmp.multipliers()]


def _routes(copt, cmp):
    routes = copt._fused_dual.last_routes
    return [routes.get(id(m.weight)) for m in cmp.multipliers()]


def _sync(ca, cb):
    """Give the ordinary copy the fused copy's multipliers (one step's rounding at a time)."""
    with torch.no_grad():
        for ma, mb in zip(ca.multipliers(), cb.multipliers()):
            mb.weight.copy_(ma.weight)


def _ulp_bound(before, grad, lr):
    """Per entry, how far the fused SGD step may be from torch's: one ulp per contribution.

    torch's ``p.add_(g, alpha=lr)`` rounds ``p + lr * g`` once (FMA) on dense gradients and,
    on an uncoalesced sparse one, adds each stored entry in turn with an FMA; the kernels add
    a row's entries first, then ``p + lr * sum`` with two roundings. With ``c`` contributions
    to an entry the results differ by at most ``c + 1`` ulps of ``|p| + lr * sum |g_i|``;
    entries without a contribution must be equal.
    """
    count = torch.zeros_like(before)
    mass = torch.zeros_like(before)
    if grad.layout == torch.sparse_coo:
        rows, values = grad._indices()[0], grad._values()
        count.index_add_(0, rows, torch.ones_like(values))
        mass.index_add_(0, rows, values.abs())
    else:
        count += 1
        mass += grad.abs()
    scale = (before.abs() + lr * mass).numpy()
    return np.where(count.numpy() > 0, (count.numpy() + 1) * np.spacing(scale), 0.0)


def _steps_agree(ca, oa, cb, ob, steps, lr, sampled=None):
    """``steps`` dual steps, fused (``oa``) and ordinary (``ob``) from the same multipliers each
    time, agreeing to :func:`_ulp_bound`."""
    for step in range(steps):
        _sync(ca, cb)
        _set_grads(ca, step, sampled)
        _set_grads(cb, step, sampled)
        before = _weights(ca)
        grads = [m.weight.grad.clone() for m in ca.multipliers()]
        oa.dual_step()
        _ordinary(ob)
        for fa, fb, p0, g in zip(_weights(ca), _weights(cb), before, grads):
            diff = (fa - fb).abs().numpy()
            assert np.all(diff <= _ulp_bound(p0, g, lr)), diff.max()


def _run_pair(specs, make_dual, steps=3, sampled=None):
    """Fused (first) against ordinary (second) for ``steps`` dual steps; returns both cmps and
    the fused optimizer."""
    (ca, oa), (cb, ob) = _pair(specs, make_dual)
    for step in range(steps):
        _set_grads(ca, step, sampled)
        _set_grads(cb, step, sampled)
        oa.dual_step()
        _ordinary(ob)
    return ca, oa, cb, ob


# ---------------------------------------------------------------------------------------------
# torch's add_ and the kernel: one ulp, from FMA
# ---------------------------------------------------------------------------------------------
def test_torch_add_alpha_uses_fma_in_its_vectorised_loop():
    """The reason the dense SGD route is compared to one ulp: torch rounds ``p + lr * g`` once
    (an exactly rounded FMA, computed here in exact rational arithmetic) on long arrays."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    p, d = torch.randn(4096, generator=g, dtype=F64), torch.randn(4096, generator=g, dtype=F64)
    lr = 0.0123456789
    out = p.clone().add_(d, alpha=lr)
    exact = [float(Fraction(a) + Fraction(lr) * Fraction(b)) for a, b in zip(p.tolist(), d.tolist())]
    two_roundings = (p + lr * d)
    assert out.tolist()[:4000] == exact[:4000]  # one rounding: FMA (vectorised body)
    assert not torch.equal(out, two_roundings)  # ... which two roundings are not


# ---------------------------------------------------------------------------------------------
# SGD routes against the ordinary path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("n", [7, 1000, 70_000])
def test_dense_sgd_route_equals_the_ordinary_path_to_one_ulp(dtype, n):
    def specs():
        return [(INEQ, _dense(n, dtype, seed=1)), (EQ, _dense(n + 3, dtype, nonneg=False, seed=2))]

    (ca, oa), (cb, ob) = _pair(specs, _sgd(lr=0.3))
    _steps_agree(ca, oa, cb, ob, 3, 0.3)
    assert _routes(oa, ca) == ["cpu_dense", "cpu_dense"]
    ineq = ca.c0.multiplier.weight
    assert torch.all(ineq >= 0) and torch.any(ineq == 0)  # projected, and the bound is active
    assert torch.any(ca.c1.multiplier.weight < 0)  # equality: no projection


@pytest.mark.parametrize("dtype", [F64, F32])
def test_indexed_sgd_route_equals_the_ordinary_path_to_an_ulp_per_contribution(dtype):
    def specs():
        return [(INEQ, _indexed(200, dtype, seed=3)), (EQ, _indexed(50, dtype, nonneg=False, seed=4))]

    (ca, oa), (cb, ob) = _pair(specs, _sgd(lr=0.7))
    _steps_agree(ca, oa, cb, ob, 5, 0.7)
    assert _routes(oa, ca) == ["cpu_indexed", "cpu_indexed"]
    assert torch.all(ca.c0.multiplier.weight >= 0) and torch.any(ca.c0.multiplier.weight == 0)


def test_mixed_dense_and_indexed_in_one_sgd():
    def specs():
        return [(INEQ, _indexed(100, seed=5)), (INEQ, _dense(30, seed=6)), (EQ, _dense(4, nonneg=False))]

    (ca, oa), (cb, ob) = _pair(specs, _sgd(lr=0.5))
    _steps_agree(ca, oa, cb, ob, 4, 0.5)
    assert _routes(oa, ca) == ["cpu_indexed", "cpu_dense", "cpu_dense"]


def test_unsampled_rows_are_never_read_or_written():
    """After the first step (which leaves every row feasible), an indexed step touches the
    sampled rows only: NaN and even a negative value elsewhere stay as they are (the ordinary
    relu would zero the negative one)."""
    cmp = Problem([(INEQ, _indexed(1000, seed=7))])
    copt = _copt(cmp, _sgd(lr=0.5))
    sampled = torch.tensor([3, 10, 500, 10])
    _set_grads(cmp, 0, sampled)
    copt.dual_step()
    w = cmp.c0.multiplier.weight
    w.data[20:30] = float("nan")  # .data: a write the version counter does not see
    w.data[40] = -1.0
    expected = w.detach().clone()
    rows = torch.tensor([3, 10, 500])
    _set_grads(cmp, 1, sampled)
    coalesced = w.grad.coalesce()
    expected[rows] = torch.clamp(expected[rows] + 0.5 * coalesced.values(), min=0.0)
    copt.dual_step()
    assert torch.isnan(w[20:30]).all() and w[40].item() == -1.0
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=0, equal_nan=True)
    assert _routes(copt, cmp) == ["cpu_indexed"]


def test_untrusted_rows_are_projected_once():
    """A multiplier written since the last dual step (here ``load_state_dict`` with negative
    entries; and a fresh optimizer's first step) gets the full projection once, so the result
    is Cooper's; after that, unsampled rows are not touched again."""
    def specs():
        return [(INEQ, _indexed(300, seed=8))]

    (ca, oa), (cb, ob) = _pair(specs, _sgd(lr=0.2))
    negative = -torch.rand(300, 1, dtype=F64)
    for cmp in (ca, cb):  # before the first step: untrusted
        cmp.c0.multiplier.weight.data.copy_(negative)
    sampled = torch.tensor([0, 1, 2])
    _set_grads(ca, 0, sampled)
    oa.dual_step()  # the first step: every row projected
    assert torch.all(ca.c0.multiplier.weight[3:] == 0)
    _steps_agree(ca, oa, cb, ob, 2, 0.2, sampled)
    assert torch.all(ca.c0.multiplier.weight >= 0)
    for cmp in (ca, cb):  # a checkpoint with negative entries (Module.load_state_dict)
        cmp.c0.multiplier.load_state_dict({"weight": negative.clone()})
    _set_grads(ca, 2, sampled)
    _set_grads(cb, 2, sampled)
    before = _weights(ca)[0]
    grad = ca.c0.multiplier.weight.grad.clone()
    oa.dual_step()
    _ordinary(ob)
    diff = (ca.c0.multiplier.weight - cb.c0.multiplier.weight).abs().detach().numpy()
    assert np.all(diff <= _ulp_bound(before, grad, 0.2))
    assert torch.all(ca.c0.multiplier.weight[3:] == 0)


def test_out_of_range_sparse_index_raises_and_changes_nothing():
    cmp = Problem([(INEQ, _dense(5, seed=1)), (INEQ, _indexed(10, seed=2))])
    copt = _copt(cmp, _sgd())
    before = _weights(cmp)
    cmp.c0.multiplier.weight.grad = torch.ones(5, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = torch.sparse_coo_tensor(torch.tensor([[1, 12]]), torch.ones(2, 1, dtype=F64), (10, 1),
                                      check_invariants=False)
    cmp.c1.multiplier.weight.grad = bad
    with pytest.raises(RuntimeError, match="index 12 out of range"):
        copt.dual_step()
    for w, b in zip(_weights(cmp), before):
        assert torch.equal(w, b)


def test_sgd_state_gradients_and_version_as_the_ordinary_step():
    cmp = Problem([(INEQ, _dense(6, seed=1)), (INEQ, _indexed(9, seed=2))])
    copt = _copt(cmp, _sgd())
    _set_grads(cmp, 0, torch.tensor([1, 4]))
    grads = [m.weight.grad for m in cmp.multipliers()]
    saved = [g.clone() for g in grads]
    versions = [m.weight._version for m in cmp.multipliers()]
    state = copy.deepcopy(copt.dual_optimizers[0].state_dict())
    copt.dual_step()
    assert _routes(copt, cmp) == ["cpu_dense", "cpu_indexed"]
    for m, g, s, v in zip(cmp.multipliers(), grads, saved, versions):
        assert m.weight.grad is g
        assert torch.equal(g.to_dense(), s.to_dense())
        assert m.weight._version == v + 1  # as one in-place add_
    assert copt.dual_optimizers[0].state_dict() == state


def test_shared_multiplier_is_stepped_and_projected_once():
    def specs():
        shared = _dense(8, seed=9)
        return [(INEQ, shared), (INEQ, shared), (INEQ, _dense(3, seed=10))]

    (ca, oa), (cb, ob) = _pair(specs, _sgd(lr=0.4))
    _steps_agree(ca, oa, cb, ob, 3, 0.4)
    assert len(oa._multipliers()) == 2 and _routes(oa, ca)[1:] == ["cpu_dense", "cpu_dense"]


# ---------------------------------------------------------------------------------------------
# nuPI: the projection fused into its kernels
# ---------------------------------------------------------------------------------------------
def _nupi(**kw):
    settings = dict(lr=0.3, Kp=0.5, Ki=1.0, ema_nu=0.2, maximize=True)
    settings.update(kw)
    return lambda cmp: uoptim.nuPI(cmp.dual_parameters(), **settings)


@pytest.mark.parametrize("init_type", list(uoptim.nuPIInitType))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_nupi_route_equals_the_ordinary_path_bitwise(dtype, init_type):
    def specs():
        return [(INEQ, _dense(40, dtype, seed=11)), (INEQ, _indexed(60, dtype, seed=12))]

    ca, oa, cb, ob = _run_pair(specs, _nupi(init_type=init_type), steps=5)
    for fa, fb in zip(_weights(ca), _weights(cb)):
        assert torch.equal(fa, fb)
    assert _routes(oa, ca) == ["nupi", "nupi"]
    sa, sb = oa.dual_optimizers[0].state_dict(), ob.dual_optimizers[0].state_dict()
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key])


def test_nupi_mixed_group_projects_per_parameter():
    """Dense inequality and equality gradients in one group cannot share the table kernel's
    bound: they are stepped unprojected and post_step_()-ed; the indexed one is still fused."""
    def specs():
        return [(INEQ, _dense(20, seed=13)), (EQ, _dense(5, nonneg=False, seed=14)),
                (INEQ, _indexed(50, seed=15))]

    ca, oa, cb, _ = _run_pair(specs, _nupi(), steps=4)
    for fa, fb in zip(_weights(ca), _weights(cb)):
        assert torch.equal(fa, fb)
    assert _routes(oa, ca) == ["ordinary", "ordinary", "nupi"]


def test_nupi_backend_torch_falls_back():
    def specs():
        return [(INEQ, _dense(10, seed=16))]

    ca, oa, cb, _ = _run_pair(specs, _nupi(_backend="torch"), steps=2)
    assert torch.equal(ca.c0.multiplier.weight, cb.c0.multiplier.weight)
    assert _routes(oa, ca) == ["ordinary"]


# ---------------------------------------------------------------------------------------------
# Every fallback condition takes the ordinary path
# ---------------------------------------------------------------------------------------------
class _MySGD(torch.optim.SGD):
    pass


class _OwnProjection(cooper.multipliers.DenseMultiplier):
    calls = 0

    def post_step_(self):
        type(self).calls += 1
        super().post_step_()


def _adam(cmp):
    return torch.optim.Adam(cmp.dual_parameters(), lr=0.1, maximize=True)


FALLBACKS = {
    "adam": (_adam, None),
    "momentum": (_sgd(momentum=0.5), None),
    "weight_decay": (_sgd(weight_decay=0.1), None),
    "subclass": (lambda cmp: _MySGD(cmp.dual_parameters(), lr=0.3, maximize=True), None),
    "tensor_lr": (lambda cmp: torch.optim.SGD(cmp.dual_parameters(), lr=torch.tensor(0.3), maximize=True), None),
    "pre_hook": (_sgd(), lambda opt: opt.register_step_pre_hook(lambda *a: None)),
    "post_hook": (_sgd(), lambda opt: opt.register_step_post_hook(lambda *a: None)),
    "global_hook": (_sgd(), lambda opt: register_optimizer_step_post_hook(lambda *a: None)),
    "step_replaced": (_sgd(), lambda opt: setattr(opt, "step", opt.step)),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_conditions_take_the_ordinary_path(case):
    make, tweak = FALLBACKS[case]

    def specs():
        return [(INEQ, _dense(12, seed=17)), (INEQ, _indexed(30, seed=18))]

    if case in ("adam", "weight_decay"):
        def specs():  # neither takes sparse gradients
            return [(INEQ, _dense(12, seed=17)), (EQ, _dense(4, nonneg=False))]
    (ca, oa), (cb, ob) = _pair(specs, make)
    handles = [tweak(o.dual_optimizers[0]) for o in (oa, ob)] if tweak else []
    try:
        for step in range(2):
            _set_grads(ca, step)
            _set_grads(cb, step)
            oa.dual_step()
            _ordinary(ob)
    finally:
        for h in handles:
            if h is not None:
                h.remove()
    for fa, fb in zip(_weights(ca), _weights(cb)):
        assert torch.equal(fa, fb)
    assert set(_routes(oa, ca)) == {"ordinary"}


@pytest.mark.parametrize("case", ["float16", "noncontiguous", "subclass_tensor", "shared_with_adam",
                                  "own_post_step", "sgd_fused"])
def test_weight_conditions_take_the_ordinary_path(case):
    class Wrapped(torch.Tensor):
        pass

    def build():
        dense = _dense(10, seed=19)
        other = _dense(4, seed=20)
        make = _sgd()
        if case == "float16":
            dense = _dense(10, torch.float16, seed=19)
        elif case == "noncontiguous":
            dense.weight = torch.nn.Parameter(torch.linspace(0, 1, 20, dtype=F64)[::2])
        elif case == "subclass_tensor":
            dense.weight = torch.nn.Parameter(torch.linspace(0, 1, 10, dtype=F64).as_subclass(Wrapped))
        elif case == "own_post_step":
            dense = _OwnProjection(init=torch.linspace(0, 1, 10, dtype=F64))
        elif case == "sgd_fused":
            make = _sgd(fused=True)
        elif case == "shared_with_adam":
            def make(cmp):
                return [torch.optim.SGD(cmp.dual_parameters(), lr=0.3, maximize=True),
                        torch.optim.Adam([dense.weight], lr=0.1, maximize=True)]
        cmp = Problem([(INEQ, dense), (INEQ, other)])
        copt = _copt(cmp, make)
        with torch.no_grad():
            for m in cmp.multipliers():
                m.weight.grad = torch.linspace(-1, 1, m.weight.numel(), dtype=m.weight.dtype)
        return cmp, copt

    (cmp, copt), (ref_cmp, ref_copt) = build(), build()
    _OwnProjection.calls = 0
    grads = [m.weight.grad for m in cmp.multipliers()]
    copt.dual_step()
    if case == "own_post_step":
        assert _OwnProjection.calls == 1  # the user's projection, once
    _ordinary(ref_copt)
    for fa, fb in zip(_weights(cmp), _weights(ref_cmp)):
        torch.testing.assert_close(fa, fb, rtol=0, atol=4e-16)
    assert [m.weight.grad for m in cmp.multipliers()] == grads  # the same objects, restored
    # per parameter: the weight that does not qualify is stepped by SGD.step() and projected
    # by its post_step_(); the other one still takes the kernel (unless the group is fused=True)
    assert _routes(copt, cmp) == ["ordinary", "ordinary" if case == "sgd_fused" else "cpu_dense"]


def test_groups_are_routed_separately():
    """An SGD group with momentum takes SGD.step() (the other group's gradients hidden from
    it), the plain group the kernels; the momentum buffer is exactly the ordinary one."""
    def make(cmp):
        a, b = cmp.dual_parameters()
        return torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b]}], lr=0.3,
                               maximize=True)

    def specs():
        return [(INEQ, _dense(12, seed=30)), (INEQ, _indexed(40, seed=31))]

    (ca, oa), (cb, ob) = _pair(specs, make)
    _steps_agree(ca, oa, cb, ob, 3, 0.3)
    assert _routes(oa, ca) == ["ordinary", "cpu_indexed"]
    sa, sb = oa.dual_optimizers[0].state_dict(), ob.dual_optimizers[0].state_dict()
    assert list(sa["state"]) == list(sb["state"]) == [0]
    assert torch.equal(sa["state"][0]["momentum_buffer"], sb["state"][0]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------
# LR schedulers, checkpoints
# ---------------------------------------------------------------------------------------------
def test_lr_scheduler_keeps_working_without_warnings():
    def specs():
        return [(INEQ, _dense(16, seed=21)), (INEQ, _indexed(40, seed=22))]

    (ca, oa), (cb, ob) = _pair(specs, _sgd(lr=0.5))
    sched = [torch.optim.lr_scheduler.StepLR(o.dual_optimizers[0], step_size=2, gamma=0.5) for o in (oa, ob)]
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(5):
            _set_grads(ca, step)
            _set_grads(cb, step)
            oa.dual_step()
            _ordinary(ob)
            for s in sched:
                s.step()
            lrs.append(oa.dual_optimizers[0].param_groups[0]["lr"])
    assert lrs == [0.5, 0.25, 0.25, 0.125, 0.125]
    assert ob.dual_optimizers[0].param_groups[0]["lr"] == 0.125
    assert _routes(oa, ca) == ["cpu_dense", "cpu_indexed"]
    for fa, fb in zip(_weights(ca), _weights(cb)):
        torch.testing.assert_close(fa, fb, rtol=0, atol=1e-14)


def test_checkpoint_resume_is_identical():
    """Saving the problem and the dual optimizer mid-run and resuming in fresh objects gives the
    uninterrupted run's multipliers bit for bit (SGD and nuPI, dense and indexed)."""
    def specs():
        return [(INEQ, _dense(30, seed=23)), (INEQ, _indexed(80, seed=24)), (EQ, _indexed(20, nonneg=False))]

    for make in (_sgd(lr=0.4), _nupi()):
        cmp = Problem(specs())
        copt = _copt(cmp, make)
        for step in range(6):
            if step == 3:
                saved = (copy.deepcopy(cmp.state_dict()), copy.deepcopy(copt.dual_optimizers[0].state_dict()))
            _set_grads(cmp, step)
            copt.dual_step()
        resumed = Problem(specs())
        resumed.load_state_dict(saved[0])
        ropt = _copt(resumed, make)
        ropt.dual_optimizers[0].load_state_dict(saved[1])
        for step in range(3, 6):
            _set_grads(resumed, step)
            ropt.dual_step()
        for fa, fb in zip(_weights(cmp), _weights(resumed)):
            assert torch.equal(fa, fb)


def test_simultaneous_rolls_with_an_indexed_multiplier_match_cooper():
    """Whole rolls (primal and dual) against cooper-optim 1.0.1 on a problem with sampled
    inequality constraints, float64, to 1e-12."""
    import cooper as reference  # the reference: a missing one fails

    m, n = 50, 6
    g = torch.Generator().manual_seed(25)
    A, b = torch.randn(m, n, generator=g, dtype=F64), torch.rand(m, generator=g, dtype=F64)

    def build(lib):
        class P(lib.ConstrainedMinimizationProblem):
            def __init__(self):
                super().__init__()
                mult = lib.multipliers.IndexedMultiplier(num_constraints=m, dtype=F64)
                self.c = lib.Constraint(lib.ConstraintType.INEQUALITY, multiplier=mult)

            def compute_cmp_state(self, x, rows):
                violation = A[rows] @ x - b[rows]
                return lib.CMPState(loss=((x - 1.0) ** 2).sum(), observed_constraints={
                    self.c: lib.ConstraintState(violation, constraint_features=rows)})

        cmp = P()
        x = torch.zeros(n, dtype=F64, requires_grad=True)
        opt = lib.optim.SimultaneousOptimizer(cmp, torch.optim.SGD([x], lr=0.05),
                                              torch.optim.SGD(cmp.dual_parameters(), lr=0.5, maximize=True))
        return cmp, x, opt

    ours, theirs = build(cooper), build(reference)
    for step in range(12):
        rows = torch.randint(0, m, (10,), generator=g)
        for _, x, opt in (ours, theirs):
            opt.roll(compute_cmp_state_kwargs={"x": x, "rows": rows})
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[0].c.multiplier.weight, theirs[0].c.multiplier.weight, rtol=1e-12, atol=1e-14)
    assert ours[2]._fused_dual.last_routes[id(ours[0].c.multiplier.weight)] == "cpu_indexed"
    assert torch.count_nonzero(ours[0].c.multiplier.weight) > 0


# ---------------------------------------------------------------------------------------------
# The CUDA route, on numba-cuda's simulator (a subprocess: the simulator is process-wide)
# ---------------------------------------------------------------------------------------------
_CUDA_SCRIPT = textwrap.dedent("""
    import contextlib, torch
    import uniopt.adapters.torch.constrained as cooper
    from uniopt.adapters.torch.constrained import optim as uoptim
    from uniopt.adapters.torch.constrained.optim import _fused

    # CPU tensors stand in for CUDA ones: the simulator takes host arrays
    _fused._device_route = lambda p: "cuda"
    _fused._cuda_stream = lambda device: contextlib.nullcontext(0)
    _fused._device_array = lambda t: t.detach().numpy()

    class P(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.a = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
                multiplier=cooper.multipliers.DenseMultiplier(init=torch.rand(37, dtype=torch.float64)))
            self.b = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
                multiplier=cooper.multipliers.IndexedMultiplier(init=torch.rand(300, dtype=torch.float64)))
        def compute_cmp_state(self):
            raise NotImplementedError

    fused, ordinary = P(), P()
    ordinary.load_state_dict(fused.state_dict())
    x = torch.zeros(1, requires_grad=True)
    copt = uoptim.SimultaneousOptimizer(fused, torch.optim.SGD([x], lr=0.1),
        torch.optim.SGD(fused.dual_parameters(), lr=0.5, maximize=True))
    ref = torch.optim.SGD(ordinary.dual_parameters(), lr=0.5, maximize=True)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        dense = torch.randn(37, generator=g, dtype=torch.float64)
        rows = torch.randint(0, 300, (40,), generator=g)
        values = torch.randn(40, generator=g, dtype=torch.float64)
        for cmp in (fused, ordinary):
            cmp.a.multiplier.weight.grad = dense.clone()
            cmp.b.multiplier.weight.grad = None
            (cmp.b.multiplier(rows) * values).sum().backward()
        copt.dual_step()
        with torch.no_grad():
            ref.step()
            for m in ordinary.multipliers():
                m.post_step_()
        routes = copt._fused_dual.last_routes
        assert routes[id(fused.a.multiplier.weight)] == "cuda_dense", routes
        assert routes[id(fused.b.multiplier.weight)] == "cuda_indexed", routes
    wa, wb = fused.a.multiplier.weight, ordinary.a.multiplier.weight
    assert torch.allclose(wa, wb, rtol=0, atol=1e-14), (wa - wb).abs().max()
    wa, wb = fused.b.multiplier.weight, ordinary.b.multiplier.weight
    assert torch.allclose(wa, wb, rtol=0, atol=1e-14), (wa - wb).abs().max()
    assert torch.all(wa >= 0) and torch.any(wa == 0)
    print("CUDA-ROUTE-OK")
""")


def test_cuda_route_on_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CUDA-ROUTE-OK" in out.stdout


def test_weight_shared_by_two_multipliers_takes_the_ordinary_path():
    """Two multipliers (inequality and equality) on one Parameter: no single bound to fuse."""
    def build():
        a, b = _dense(6, seed=40), _dense(6, seed=41)
        b.weight = a.weight
        cmp = Problem([(INEQ, a), (EQ, b), (INEQ, _dense(3, seed=42))])
        return cmp, _copt(cmp, _sgd())

    (ca, oa), (cb, ob) = build(), build()
    _steps_agree(ca, oa, cb, ob, 2, 0.3)
    routes = oa._fused_dual.last_routes
    assert routes[id(ca.c0.multiplier.weight)] == "ordinary"
    assert routes[id(ca.c2.multiplier.weight)] == "cpu_dense"
    assert torch.all(ca.c0.multiplier.weight >= 0)  # the inequality's post_step_ ran
