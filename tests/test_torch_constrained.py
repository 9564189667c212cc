"""uniopt.adapters.torch.constrained (Cooper's problem-side API) against cooper-optim 1.0.1 itself.

The same constrained problem is built with our classes and with cooper's and driven by plain
torch optimizers (primal SGD; dual SGD with ``maximize=True`` then ``post_step_``) and the
penalty updaters: Lagrangians, gradients, contribution stores, multipliers and penalty
coefficients must agree in float64 at every step. Then: sampled (indexed) multipliers with
sparse-gradient optimizers, checkpoints, the bad-input table, and each Cooper bug we do not copy
(docs/deviations.md, "Constrained learning (Cooper)").
"""

from __future__ import annotations

import io
import itertools

import cooper as ref  # the reference (test extra); a missing one must fail, not skip
import numpy as np
import pytest
import torch

import uniopt.adapters.torch.constrained as ours

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's Adagrad, sparse

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
N_X, N_INEQ, N_EQ = 5, 6, 2


# ----------------------------------------------------------------------------------------------
# one problem, built with either library
# ----------------------------------------------------------------------------------------------

def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "A": torch.randn(N_INEQ, N_X, generator=g, dtype=F64),
        "b": torch.randn(N_INEQ, generator=g, dtype=F64) * 0.3,
        "C": torch.randn(N_EQ, N_X, generator=g, dtype=F64),
        "d": torch.randn(N_EQ, generator=g, dtype=F64),
        "target": torch.randn(N_X, generator=g, dtype=F64) * 2,
        "x0": torch.randn(N_X, generator=g, dtype=F64),
        "lam0": torch.rand(N_INEQ, generator=g, dtype=F64),
        "mu0": torch.randn(N_EQ, generator=g, dtype=F64),
        "rho_ineq": 0.5 + torch.rand(N_INEQ, generator=g, dtype=F64),
        "rho_eq": 0.5 + torch.rand(N_EQ, generator=g, dtype=F64),
    }


def _make_cmp(lib, formulation, indexed, penalty, data, surrogate):
    """A CMP: min |x - t|^2 s.t. A x <= b (ineq), C x = d (eq), with ``lib``'s classes.

    ``penalty`` is None (Lagrangian), "scalar" or "vector".
    """
    form = getattr(lib.formulations, formulation)
    mult_cls = lib.multipliers.IndexedMultiplier if indexed else lib.multipliers.DenseMultiplier
    pen_cls = (lib.penalty_coefficients.IndexedPenaltyCoefficient if indexed
               else lib.penalty_coefficients.DensePenaltyCoefficient)

    def factors(init, rho):
        kw = {}
        if form.expects_multiplier:
            kw["multiplier"] = mult_cls(init=init.clone(), dtype=F64)
        if form.expects_penalty_coefficient:
            kw["penalty_coefficient"] = pen_cls(rho.clone() if penalty == "vector" else torch.tensor(1.5, dtype=F64))
        return kw

    class Problem(lib.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.ineq = lib.Constraint(lib.ConstraintType.INEQUALITY, form, **factors(data["lam0"], data["rho_ineq"]))
            self.eq = lib.Constraint(lib.ConstraintType.EQUALITY, form, **factors(data["mu0"], data["rho_eq"]))

        def compute_cmp_state(self, x, idx_ineq, idx_eq):
            loss = (x - data["target"]).pow(2).sum()
            states = {}
            for constraint, M, v, idx in ((self.ineq, data["A"], data["b"], idx_ineq),
                                          (self.eq, data["C"], data["d"], idx_eq)):
                g = M @ x - v
                if indexed:
                    g = g[idx]
                kw = {"constraint_features": idx} if indexed else {}
                if surrogate:  # a differentiable surrogate for the primal, the true violation for the dual
                    kw.update(strict_violation=g.detach(), strict_constraint_features=kw.get("constraint_features"))
                    g = torch.tanh(g)
                states[constraint] = lib.ConstraintState(violation=g, **kw)
            return lib.CMPState(loss=loss, observed_constraints=states)

    return Problem()


def _run(lib, formulation, indexed, penalty, updater, surrogate, steps=12, seed=0, full_obs=False):
    data = _data(seed)
    cmp = _make_cmp(lib, formulation, indexed, penalty, data, surrogate)
    x = data["x0"].clone().requires_grad_(True)
    primal = torch.optim.SGD([x], lr=0.05)
    duals = list(cmp.dual_parameters())
    dual = torch.optim.SGD(duals, lr=0.2, maximize=True) if duals else None
    upd = None
    if updater is not None:
        kind, restart = updater
        upd = (lib.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(1.3, 1e-3, restart) if kind == "mult"
               else lib.penalty_coefficients.AdditivePenaltyCoefficientUpdater(0.7, 1e-3, restart))
    sampler = torch.Generator().manual_seed(seed + 1)
    record = []
    for _ in range(steps):
        if indexed and not full_obs:
            idx_i = torch.randperm(N_INEQ, generator=sampler)[:4]
            idx_e = torch.randint(0, N_EQ, (3,), generator=sampler)  # repeats: gradients add up
        else:
            idx_i, idx_e = torch.arange(N_INEQ), torch.arange(N_EQ)
        primal.zero_grad()
        if dual:
            dual.zero_grad()
        state = cmp.compute_cmp_state(x, idx_i, idx_e)
        p_store = state.compute_primal_lagrangian()
        d_store = state.compute_dual_lagrangian()
        p_store.backward()
        if isinstance(d_store.lagrangian, torch.Tensor):  # QuadraticPenalty: the float 0.0 (Cooper's)
            d_store.backward()
        row = {
            "primal": p_store.lagrangian.detach().clone(),
            "dual": None if d_store.lagrangian is None else torch.as_tensor(d_store.lagrangian).detach().clone(),
            # QuadraticPenalty stores None as the multiplier value (as Cooper)
            "p_mult": [v if v is None else v.detach().clone() for v in p_store.observed_multiplier_values()],
            "p_pen": [v.detach().clone() for v in p_store.observed_penalty_coefficient_values()],
            "d_mult": [v.detach().clone() for v in d_store.observed_multiplier_values()],
            "x_grad": x.grad.clone(),
            "dual_grads": [m.weight.grad.to_dense().clone() for m in cmp.multipliers()],  # (Cooper: set order)
        }
        primal.step()
        if dual:
            dual.step()
            for m in cmp.multipliers():
                m.post_step_()
        if upd is not None:
            upd.step(state.observed_constraints)
        row["x"] = x.detach().clone()
        row["multipliers"] = [m.weight.detach().clone() for m in cmp.multipliers()]
        row["penalties"] = [pc.value.clone() for pc in cmp.penalty_coefficients()]
        record.append(row)
    return record


def _assert_same(a, b):
    assert len(a) == len(b)
    for step, (ra, rb) in enumerate(zip(a, b)):
        assert ra.keys() == rb.keys()
        for key in ra:
            va, vb = ra[key], rb[key]
            if isinstance(va, list):
                assert len(va) == len(vb), (step, key)
                for ta, tb in zip(va, vb):
                    if ta is None:
                        assert tb is None, (step, key)
                        continue
                    assert ta.dtype == tb.dtype == F64, (step, key)
                    torch.testing.assert_close(ta, tb, **TOL, msg=f"step {step} {key}")
            elif va is None:
                assert vb is None, (step, key)
            else:
                torch.testing.assert_close(va, vb, **TOL, msg=f"step {step} {key}")


CASES = [
    # formulation, indexed, penalty, updater, surrogate, full_obs
    ("Lagrangian", False, None, None, False, False),
    ("Lagrangian", False, None, None, True, False),
    ("Lagrangian", True, None, None, False, False),
    ("Lagrangian", True, None, None, True, False),
    ("AugmentedLagrangian", False, "vector", ("mult", True), False, False),
    ("AugmentedLagrangian", False, "scalar", ("add", True), True, False),
    ("AugmentedLagrangian", False, "vector", ("add", False), False, False),
    ("AugmentedLagrangian", True, "vector", ("mult", False), False, False),
    ("AugmentedLagrangian", True, "scalar", ("mult", True), False, False),
    ("AugmentedLagrangian", True, "vector", ("add", True), True, True),
    ("QuadraticPenalty", False, "vector", ("mult", True), False, False),
    ("QuadraticPenalty", False, "scalar", ("add", False), False, False),
    ("QuadraticPenalty", True, "vector", ("add", False), False, False),
    ("QuadraticPenalty", True, "vector", ("mult", True), False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
@pytest.mark.parametrize("seed", [0, 3])
def test_trajectory_matches_cooper(case, seed):
    formulation, indexed, penalty, updater, surrogate, full_obs = case
    mine = _run(ours, formulation, indexed, penalty, updater, surrogate, seed=seed, full_obs=full_obs)
    theirs = _run(ref, formulation, indexed, penalty, updater, surrogate, seed=seed, full_obs=full_obs)
    _assert_same(mine, theirs)
    # the run did something: the primal point moved, multipliers/penalties moved when present
    assert not torch.equal(mine[0]["x"], mine[-1]["x"])
    if mine[0]["multipliers"]:
        assert any(not torch.equal(a, b) for a, b in zip(mine[0]["multipliers"], mine[-1]["multipliers"]))
    if updater is not None:
        first = [pc.value.clone() for pc in _make_cmp(ours, formulation, indexed, penalty, _data(seed), surrogate)
                 .penalty_coefficients()]
        assert any(not torch.equal(a, b) for a, b in zip(first, mine[-1]["penalties"]))


def test_lagrangians_closed_form():
    """Independent oracle: the Lagrangian and AL values by hand (NumPy) at a random state."""
    data = _data(7)
    x = data["x0"].numpy()
    g = data["A"].numpy() @ x - data["b"].numpy()
    h = data["C"].numpy() @ x - data["d"].numpy()
    lam, mu = data["lam0"].numpy(), data["mu0"].numpy()
    ci, ce = data["rho_ineq"].numpy(), data["rho_eq"].numpy()
    loss = float(np.sum((x - data["target"].numpy()) ** 2))
    idx = (torch.arange(N_INEQ), torch.arange(N_EQ))
    lag = _make_cmp(ours, "Lagrangian", False, None, data, False).compute_cmp_state(data["x0"], *idx)
    assert np.isclose(lag.compute_primal_lagrangian().lagrangian.item(), loss + lam @ g + mu @ h, rtol=1e-13)
    assert np.isclose(lag.compute_dual_lagrangian().lagrangian.item(), lam @ g + mu @ h, rtol=1e-13)
    al = _make_cmp(ours, "AugmentedLagrangian", False, "vector", data, False).compute_cmp_state(data["x0"], *idx)
    expected = (loss + np.sum((np.maximum(lam + ci * g, 0) ** 2 - lam**2) / (2 * ci))
                + mu @ h + 0.5 * np.sum(ce * h**2))
    assert np.isclose(al.compute_primal_lagrangian().lagrangian.item(), expected, rtol=1e-13)
    qp = _make_cmp(ours, "QuadraticPenalty", False, "vector", data, False).compute_cmp_state(data["x0"], *idx)
    expected = loss + 0.5 * np.sum(ci * np.maximum(g, 0) ** 2) + 0.5 * np.sum(ce * h**2)
    assert np.isclose(qp.compute_primal_lagrangian().lagrangian.item(), expected, rtol=1e-13)
    assert qp.compute_dual_lagrangian().lagrangian == 0.0  # Cooper's: contributing, but no dual terms


@pytest.mark.parametrize("kind", ["mult", "add"])
@pytest.mark.parametrize("ctype", ["EQUALITY", "INEQUALITY"])
@pytest.mark.parametrize("restart", [True, False])
def test_penalty_update_naive_oracle(kind, ctype, restart):
    g = torch.Generator().manual_seed(5)
    init = torch.rand(8, generator=g, dtype=F64) + 0.1
    pc = ours.penalty_coefficients.DensePenaltyCoefficient(init)
    c = ours.Constraint(getattr(ours.ConstraintType, ctype), ours.formulations.QuadraticPenalty, penalty_coefficient=pc)
    upd = (ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(1.5, 0.1, restart) if kind == "mult"
           else ours.penalty_coefficients.AdditivePenaltyCoefficientUpdater(0.25, 0.1, restart))
    expected = init.numpy().copy()
    for _ in range(4):
        v = torch.randn(8, generator=g, dtype=F64) * 0.3
        v[0] = 0.0
        upd.step({c: ours.ConstraintState(violation=v)})
        m = np.maximum(v.numpy(), 0) if ctype == "INEQUALITY" else np.abs(v.numpy())
        grown = expected * 1.5 if kind == "mult" else expected + 0.25
        expected = np.where(m > 0.1, grown, expected)
        if restart and ctype == "INEQUALITY":
            expected = np.where(m == 0, init.numpy(), expected)
        np.testing.assert_array_equal(pc.value.numpy(), expected)


# ----------------------------------------------------------------------------------------------
# sampled constraints: IndexedMultiplier with sparse-gradient optimizers
# ----------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.3, maximize=True),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5, maximize=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.3, maximize=True),
    "SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=0.3, maximize=True),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_indexed_multiplier_only_sampled_rows_move(opt):
    n = 10
    init = torch.linspace(0.1, 1.0, n, dtype=F64)
    trajectories = {}
    for lib in (ours, ref):
        m = lib.multipliers.IndexedMultiplier(init=init.clone(), dtype=F64)
        c = lib.Constraint(lib.ConstraintType.INEQUALITY, multiplier=m)
        optimizer = OPTIMIZERS[opt]([m.weight])
        sampler = torch.Generator().manual_seed(11)
        rows = []
        for _ in range(5):
            idx = torch.tensor([1, 4, 4, 7])
            viol = torch.randn(4, generator=sampler, dtype=F64)
            before = m.weight.detach().clone()
            optimizer.zero_grad()
            state = lib.CMPState(observed_constraints={c: lib.ConstraintState(violation=viol, constraint_features=idx)})
            state.compute_dual_lagrangian().backward()
            grad = m.weight.grad
            assert grad.is_sparse
            dense = grad.to_dense().view(-1)
            expected = torch.zeros(n, dtype=F64).index_add_(0, idx, viol)  # repeated rows add up
            torch.testing.assert_close(dense, expected, rtol=0, atol=0)
            optimizer.step()
            m.post_step_()
            changed = (m.weight.detach() != before).view(-1).nonzero().view(-1)
            assert set(changed.tolist()) <= {1, 4, 7}
            unsampled = torch.ones(n, dtype=torch.bool)
            unsampled[[1, 4, 7]] = False
            assert torch.equal(m.weight.detach().view(-1)[unsampled], before.view(-1)[unsampled])
            rows.append(m.weight.detach().clone())
        assert bool((rows[-1] >= 0).all())
        trajectories[lib.__name__] = rows
    for a, b in zip(*trajectories.values()):
        torch.testing.assert_close(a, b, **TOL)


def test_indexed_multiplier_rejects_non_long_indices():
    m = ours.multipliers.IndexedMultiplier(num_constraints=3)
    for bad in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([True, False, True]), [0, 1]):
        with pytest.raises(ValueError, match=r"Indices must be of type torch.long."):
            m(bad)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("indexed", [False, True])
def test_cmp_state_dict_roundtrip_and_cross_library(indexed):
    data = _data(2)
    trained = _make_cmp(ours, "AugmentedLagrangian", indexed, "vector", data, False)
    for m in trained.multipliers():
        with torch.no_grad():
            m.weight.add_(torch.rand_like(m.weight))
    for pc in trained.penalty_coefficients():
        pc.value = pc.value * 3
    sd = _roundtrip(trained.state_dict())
    assert list(sd) == ["multipliers", "penalty_coefficients"]
    assert list(sd["multipliers"]) == ["ineq", "eq"]
    for lib in (ours, ref):  # same layout: loads into ours and into cooper's
        fresh = _make_cmp(lib, "AugmentedLagrangian", indexed, "vector", _data(9), False)
        fresh.load_state_dict(sd)
        for a, b in zip(trained.multipliers(), fresh.multipliers()):
            assert torch.equal(a.weight, b.weight)
        for a, b in zip(trained.penalty_coefficients(), fresh.penalty_coefficients()):
            assert torch.equal(a.value, b.value)
    # and cooper's checkpoint loads into ours
    theirs = _make_cmp(ref, "AugmentedLagrangian", indexed, "vector", data, False)
    mine = _make_cmp(ours, "AugmentedLagrangian", indexed, "vector", _data(9), False)
    mine.load_state_dict(_roundtrip(theirs.state_dict()))
    for a, b in zip(theirs.multipliers(), mine.multipliers()):
        assert torch.equal(a.weight, b.weight)


def test_load_state_dict_does_not_alias():
    data = _data(4)
    src = _make_cmp(ours, "AugmentedLagrangian", False, "vector", data, False)
    dst = _make_cmp(ours, "AugmentedLagrangian", False, "vector", _data(5), False)
    dst.load_state_dict(src.state_dict())
    before = [pc.value.clone() for pc in dst.penalty_coefficients()]
    for pc in src.penalty_coefficients():
        pc.value.mul_(7)
    for a, b in zip(before, dst.penalty_coefficients()):
        assert torch.equal(a, b.value)


def test_resume_gives_identical_trajectory():
    """12 steps straight == 6 steps, checkpoint (CMP + dual optimizer) through torch.save, 6 more."""
    def drive(cmp, x, dual, steps, sampler):
        primal = torch.optim.SGD([x], lr=0.05)
        for _ in range(steps):
            idx = torch.randperm(N_INEQ, generator=sampler)[:3], torch.arange(N_EQ)
            primal.zero_grad()
            dual.zero_grad()
            state = cmp.compute_cmp_state(x, *idx)
            state.compute_primal_lagrangian().backward()
            state.compute_dual_lagrangian().backward()
            primal.step()
            dual.step()
            for m in cmp.multipliers():
                m.post_step_()

    data = _data(6)
    straight = _make_cmp(ours, "Lagrangian", True, None, data, False)
    x1 = data["x0"].clone().requires_grad_(True)
    drive(straight, x1, torch.optim.Adagrad(list(straight.dual_parameters()), lr=0.2, maximize=True), 12,
          torch.Generator().manual_seed(0))

    first = _make_cmp(ours, "Lagrangian", True, None, data, False)
    x2 = data["x0"].clone().requires_grad_(True)
    sampler = torch.Generator().manual_seed(0)
    dual = torch.optim.Adagrad(list(first.dual_parameters()), lr=0.2, maximize=True)
    drive(first, x2, dual, 6, sampler)
    ckpt = _roundtrip({"cmp": first.state_dict(), "dual": dual.state_dict(), "x": x2.detach()})
    second = _make_cmp(ours, "Lagrangian", True, None, data, False)
    for m in second.multipliers():
        torch.nn.init.uniform_(m.weight)  # overwritten by the checkpoint
    second.load_state_dict(ckpt["cmp"])
    dual2 = torch.optim.Adagrad(list(second.dual_parameters()), lr=0.2, maximize=True)
    dual2.load_state_dict(ckpt["dual"])
    x3 = ckpt["x"].clone().requires_grad_(True)
    drive(second, x3, dual2, 6, sampler)
    assert torch.equal(x1, x3)
    for a, b in zip(straight.multipliers(), second.multipliers()):
        assert torch.equal(a.weight, b.weight)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def _pc(init):
    return ours.penalty_coefficients.DensePenaltyCoefficient(init)


BAD_INPUT = [
    # Cooper's own messages
    (lambda: ours.multipliers.DenseMultiplier(), ValueError, r"At least one of `num_constraints` and `init` must be provided."),
    (lambda: ours.multipliers.DenseMultiplier(3, init=torch.zeros(4)), ValueError, r"Inconsistent `init` shape"),
    (lambda: ours.multipliers.DenseMultiplier(init=torch.zeros(2, 2)), ValueError, r"`init` must be a 1D tensor of shape"),
    (lambda: ours.Constraint(ours.ConstraintType.INEQUALITY,
                             multiplier=ours.multipliers.DenseMultiplier(init=-torch.ones(2))),
     ValueError, r"For inequality constraint, all entries in multiplier must be non-negative."),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY), ValueError, r"Lagrangian expects a multiplier but none was provided."),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY, ours.formulations.QuadraticPenalty,
                             multiplier=ours.multipliers.DenseMultiplier(1), penalty_coefficient=_pc(torch.ones(1))),
     ValueError, r"Received unexpected multiplier for QuadraticPenalty."),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY, ours.formulations.AugmentedLagrangian,
                             multiplier=ours.multipliers.DenseMultiplier(1)),
     ValueError, r"AugmentedLagrangian expects a penalty coefficient but none was provided."),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=ours.multipliers.DenseMultiplier(1),
                             penalty_coefficient=_pc(torch.ones(1))),
     ValueError, r"Received unexpected penalty coefficient for Lagrangian."),
    (lambda: ours.Constraint("equality", multiplier=ours.multipliers.DenseMultiplier(1)),
     ValueError, r"Lagrangian requires either an equality or inequality constraint. Invalid constraint_type: 'equality'"),
    (lambda: _pc(torch.ones(2, 2)), ValueError, r"init must either be a scalar or a 1D tensor"),
    (lambda: _pc(torch.ones(2, requires_grad=True)), ValueError, r"PenaltyCoefficient should not require gradients."),
    (lambda: _pc(-torch.ones(2)), ValueError, r"All entries of the penalty coefficient must be non-negative."),
    (lambda: setattr(_pc(torch.ones(2)), "value", torch.ones(3)), ValueError, r"does not match existing shape"),
    (lambda: ours.penalty_coefficients.IndexedPenaltyCoefficient(torch.ones(3))(torch.tensor([0.0])),
     ValueError, r"Indices must be of type torch.long."),
    (lambda: ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(violation_tolerance=-1.0),
     ValueError, r"^Invalid violation_tolerance value: -1.0 \(Violation tolerance must be non-negative.\)$"),
    (lambda: ours.ConstraintState(violation=torch.ones(1), strict_constraint_features=torch.tensor([0])),
     ValueError, r"`strict_violation` must be provided if `strict_constraint_features` is provided."),
    # torch-style checks where Cooper has none
    (lambda: ours.multipliers.DenseMultiplier(2.5), TypeError, r"Invalid num_constraints: 2.5 \(expected an integer\)"),
    (lambda: ours.multipliers.DenseMultiplier(0), ValueError, r"Invalid num_constraints: 0"),
    (lambda: ours.multipliers.DenseMultiplier(init=[0.0, 1.0]), TypeError, r"Invalid init: \[0.0, 1.0\]"),
    (lambda: ours.multipliers.DenseMultiplier(2, dtype=torch.int64), TypeError, r"Invalid dtype: torch.int64"),
    (lambda: ours.multipliers.DenseMultiplier(2).set_constraint_type("ineq"), TypeError, r"Invalid constraint_type: 'ineq'"),
    (lambda: _pc([1.0]), TypeError, r"Invalid init: \[1.0\]"),
    (lambda: ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=-2.0),
     ValueError, r"^Invalid growth_factor value: -2.0$"),
    (lambda: ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=float("nan")),
     ValueError, r"^Invalid growth_factor value: nan$"),
    (lambda: ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor="2"),
     TypeError, r"^Invalid growth_factor value: '2' \(expected a real number\)$"),
    (lambda: ours.penalty_coefficients.AdditivePenaltyCoefficientUpdater(increment=-1.0), ValueError, r"^Invalid increment value: -1.0$"),
    (lambda: ours.penalty_coefficients.AdditivePenaltyCoefficientUpdater(violation_tolerance=float("inf")),
     ValueError, r"^Invalid violation_tolerance value: inf \(Violation tolerance"),
    (lambda: ours.penalty_coefficients.AdditivePenaltyCoefficientUpdater(has_restart=1), TypeError, r"^Invalid has_restart value: 1 \(expected True or False\)$"),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY, formulation_type="Lagrangian"),
     TypeError, r"Invalid formulation_type: 'Lagrangian'"),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=torch.zeros(2)), TypeError, r"Invalid multiplier"),
    (lambda: ours.Constraint(ours.ConstraintType.EQUALITY, ours.formulations.QuadraticPenalty, penalty_coefficient=1.0),
     TypeError, r"Invalid penalty_coefficient: 1.0"),
    # the JAX face's checks and messages, for the same bad input (tests/test_jax_constrained.py)
    (lambda: ours.multipliers.DenseMultiplier(init=torch.tensor([1.0, float("nan")])), ValueError,
     r"^Invalid init: not every value is finite$"),
    (lambda: ours.multipliers.IndexedMultiplier(init=torch.tensor([float("inf")])), ValueError,
     r"^Invalid init: not every value is finite$"),
    (lambda: _pc(torch.tensor([1.0, float("nan")])), ValueError,
     r"^Invalid init: .*nan.* \(penalty coefficients must be finite and non-negative\)$"),
    (lambda: _pc(torch.tensor(float("inf"))), ValueError,
     r"^Invalid init: .*inf.* \(penalty coefficients must be finite and non-negative\)$"),
    (lambda: ours.ConstraintState(torch.zeros(2), contributes_to_dual_update=1), TypeError,
     r"^Invalid contributes_to_dual_update: 1 \(expected True or False\)$"),
    (lambda: ours.ConstraintState(torch.zeros(2), contributes_to_primal_update="yes"), TypeError,
     r"^Invalid contributes_to_primal_update: 'yes' \(expected True or False\)$"),
    (lambda: ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=0.0),
     ValueError, r"^Invalid growth_factor value: 0.0$"),
    (lambda: ours.penalty_coefficients.AdditivePenaltyCoefficientUpdater(increment=float("inf")),
     ValueError, r"^Invalid increment value: inf$"),
    (lambda: ours.penalty_coefficients.AdditivePenaltyCoefficientUpdater(violation_tolerance="a"),
     TypeError, r"^Invalid violation_tolerance value: 'a' \(expected a real number\)$"),
]


@pytest.mark.parametrize("make, error, message", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_cooper_messages_are_cooper_s():
    """The messages Cooper has are Cooper's (same call, same text, up to our added value)."""
    for lib_call in (lambda lib: lib.multipliers.DenseMultiplier(),
                     lambda lib: lib.multipliers.DenseMultiplier(init=torch.zeros(2, 2)),
                     lambda lib: lib.Constraint(lib.ConstraintType.EQUALITY),
                     lambda lib: lib.penalty_coefficients.DensePenaltyCoefficient(-torch.ones(2))):
        messages = []
        for lib in (ours, ref):
            with pytest.raises(ValueError) as info:
                lib_call(lib)
            messages.append(str(info.value))
        assert messages[0] == messages[1]


def test_cmp_registry_errors():
    class P(ours.ConstrainedMinimizationProblem):
        def compute_cmp_state(self):
            return ours.CMPState()

    p = P()
    p.a = ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=ours.multipliers.DenseMultiplier(1))
    with pytest.raises(ValueError, match="Constraint with name a already exists"):
        p.a = ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=ours.multipliers.DenseMultiplier(1))
    with pytest.raises(ValueError, match="Cannot set the name of a constraint more than once."):
        p.a.name = "b"

    class Forgot(ours.ConstrainedMinimizationProblem):
        def __init__(self):
            self.c = ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=ours.multipliers.DenseMultiplier(1))

        def compute_cmp_state(self):
            return ours.CMPState()

    with pytest.raises(AttributeError, match=r"call super\(\).__init__\(\)"):
        Forgot()


# ----------------------------------------------------------------------------------------------
# Cooper's bugs, not copied (docs/deviations.md)
# ----------------------------------------------------------------------------------------------

def test_float64_init_keeps_its_dtype():
    init = torch.tensor([0.1, 0.2], dtype=F64)
    for cls in ("DenseMultiplier", "IndexedMultiplier"):
        assert getattr(ours.multipliers, cls)(init=init).weight.dtype == F64
        assert getattr(ref.multipliers, cls)(init=init).weight.dtype == torch.float32  # Cooper's downcast
        # an explicit dtype still wins, and the default without init is float32 (as Cooper)
        assert getattr(ours.multipliers, cls)(init=init, dtype=torch.float32).weight.dtype == torch.float32
        assert getattr(ours.multipliers, cls)(num_constraints=2).weight.dtype == torch.float32
        assert getattr(ours.multipliers, cls)(init=torch.tensor([1, 2])).weight.dtype == torch.float32
    m = ours.multipliers.DenseMultiplier(init=init)
    assert torch.equal(m.weight, init) and m.weight.data_ptr() != init.data_ptr()


def _al_ineq(lib, lam, rho, g):
    m = lib.multipliers.DenseMultiplier(init=lam.clone(), dtype=F64)
    c = lib.Constraint(lib.ConstraintType.INEQUALITY, lib.formulations.AugmentedLagrangian, multiplier=m,
                       penalty_coefficient=lib.penalty_coefficients.DensePenaltyCoefficient(rho.clone()))
    g = g.clone().requires_grad_(True)
    store = c.compute_contribution_to_lagrangian(lib.ConstraintState(violation=g), "primal")
    return store.lagrangian_contribution, g


def test_augmented_lagrangian_zero_penalty_is_the_lagrangian_limit():
    lam = torch.tensor([1.0, 0.0, 0.7, 0.0], dtype=F64)
    g = torch.tensor([0.5, 0.5, -0.3, -0.2], dtype=F64)
    rho = torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=F64)
    value, gv = _al_ineq(ours, lam, rho, g)
    value.backward()
    # entries with c = 0 give lam * g; the c = 2 entry gives (relu(0.7 - 0.6)^2 - 0.49) / 4
    expected = 1.0 * 0.5 + 0.0 + ((0.7 - 0.6) ** 2 - 0.49) / 4 + 0.0
    assert abs(value.item() - expected) < 1e-15
    torch.testing.assert_close(gv.grad, torch.tensor([1.0, 0.0, 0.1, 0.0], dtype=F64), rtol=0, atol=1e-15)
    theirs, _ = _al_ineq(ref, lam, rho, g)
    assert torch.isnan(theirs)  # Cooper divides by zero (cooper-org/cooper#106)
    # continuity: a tiny positive coefficient is within O(c) of the limit
    small, _ = _al_ineq(ours, lam, torch.where(rho == 0, 1e-9, rho), g)
    assert abs(small.item() - value.item()) < 1e-6  # (the formula cancels: ~1e-16 / c)
    # no zero coefficient: Cooper's value to rounding, and the closed form (uniopt.rules'
    # augmented_ineq_term, shared with the JAX face): lam g + c g^2 / 2 where lam + c g > 0,
    # -lam^2 / (2c) elsewhere
    rho_pos = torch.tensor([0.3, 1.0, 2.0, 0.5], dtype=F64)
    value, gv = _al_ineq(ours, lam, rho_pos, g)
    value.backward()
    closed = sum(lv * gi + c * gi * gi / 2 if lv + c * gi > 0 else -lv * lv / (2 * c)
                 for lv, c, gi in zip(lam.tolist(), rho_pos.tolist(), g.tolist()))
    assert abs(value.item() - closed) <= 1e-15
    theirs, gt = _al_ineq(ref, lam, rho_pos, g)
    theirs.backward()
    torch.testing.assert_close(value, theirs.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gv.grad, gt.grad, rtol=1e-12, atol=1e-15)


def test_augmented_lagrangian_dual_gradient_is_the_raw_violation():
    """Cooper's docs say the AL dual step is scaled by the penalty; its code (and ours) is not:
    the classical update lam + c g needs dual lr = c."""
    lam0 = torch.tensor([0.2, 0.0], dtype=F64)
    g = torch.tensor([0.4, -0.3], dtype=F64)
    c = 3.0
    for lib in (ours, ref):
        m = lib.multipliers.DenseMultiplier(init=lam0.clone(), dtype=F64)
        con = lib.Constraint(lib.ConstraintType.INEQUALITY, lib.formulations.AugmentedLagrangian, multiplier=m,
                             penalty_coefficient=lib.penalty_coefficients.DensePenaltyCoefficient(torch.tensor(c, dtype=F64)))
        lib.CMPState(observed_constraints={con: lib.ConstraintState(violation=g)}).compute_dual_lagrangian().backward()
        assert torch.equal(m.weight.grad, g)
        torch.optim.SGD([m.weight], lr=c, maximize=True).step()
        m.post_step_()
        assert torch.equal(m.weight.detach(), torch.clamp(lam0 + c * g, min=0))


def test_implicit_multiplier_defines_expects_constraint_features():
    for lib in (ours, ref):
        class Linear(lib.multipliers.ImplicitMultiplier):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.tensor([0.5, 2.0], dtype=F64))

            def forward(self, features):
                return features @ self.w

            def post_step_(self):
                pass

        m = Linear()
        c = lib.Constraint(lib.ConstraintType.EQUALITY, multiplier=m)
        feats = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
        state = lib.CMPState(observed_constraints={c: lib.ConstraintState(violation=torch.tensor([0.3, -0.1], dtype=F64),
                                                                          constraint_features=feats)})
        if lib is ref:
            with pytest.raises(AttributeError, match="expects_constraint_features"):
                state.compute_dual_lagrangian()
            continue
        assert m.expects_constraint_features is True
        store = state.compute_dual_lagrangian()
        assert abs(store.lagrangian.item() - (0.5 * 0.3 + 2.5 * -0.1)) < 1e-15
        store.backward()
        torch.testing.assert_close(m.w.grad, torch.tensor([0.2, -0.1], dtype=F64), rtol=0, atol=1e-15)


def test_dual_parameters_in_registration_order():
    class P(ours.ConstrainedMinimizationProblem):
        def compute_cmp_state(self):
            return ours.CMPState()

    p = P()
    shared = ours.multipliers.DenseMultiplier(num_constraints=99)
    multipliers = [ours.multipliers.DenseMultiplier(num_constraints=k + 1) for k in range(30)]
    for k, m in enumerate(multipliers):
        setattr(p, f"c{k}", ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=m))
        if k % 10 == 3:  # a shared multiplier, registered several times: listed once, first place
            setattr(p, f"s{k}", ours.Constraint(ours.ConstraintType.EQUALITY, multiplier=shared))
    sizes = [q.numel() for q in p.dual_parameters()]
    assert sizes == [1, 2, 3, 4, 99] + list(range(5, 31))
    assert [n for n, _ in p.named_multipliers()][:6] == ["c0", "c1", "c2", "c3", "s3", "c4"]


def test_indexed_penalty_restart_of_a_sampled_subset():
    """Cooper compares the full initial value with the observed rows (a shape error when fewer
    rows than constraints are observed); ours restarts each observed row to its own initial
    value."""
    init = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    updates = [(torch.tensor([1, 3]), torch.tensor([1.0, 1.0], dtype=F64)),
               (torch.tensor([3, 4]), torch.tensor([-1.0, 1.0], dtype=F64)),
               (torch.tensor([1, 0]), torch.tensor([0.0, 0.0], dtype=F64))]
    pc = ours.penalty_coefficients.IndexedPenaltyCoefficient(init)
    c = ours.Constraint(ours.ConstraintType.INEQUALITY, ours.formulations.QuadraticPenalty, penalty_coefficient=pc)
    upd = ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=2.0)
    expected = [[1.0, 4.0, 3.0, 8.0, 5.0], [1.0, 4.0, 3.0, 4.0, 10.0], [1.0, 2.0, 3.0, 4.0, 10.0]]
    for (idx, v), want in zip(updates, expected):
        upd.step({c: ours.ConstraintState(violation=v, constraint_features=idx)})
        assert pc.value.tolist() == want
    theirs = ref.penalty_coefficients.IndexedPenaltyCoefficient(init)
    c = ref.Constraint(ref.ConstraintType.INEQUALITY, ref.formulations.QuadraticPenalty, penalty_coefficient=theirs)
    with pytest.raises(RuntimeError, match="must match the size"):
        ref.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=2.0).step(
            {c: ref.ConstraintState(violation=updates[0][1], constraint_features=updates[0][0])})


def test_post_step_projects_in_place_with_the_rule():
    m = ours.multipliers.DenseMultiplier(init=torch.tensor([0.5, 1.0], dtype=F64))
    m.set_constraint_type(ours.ConstraintType.INEQUALITY)
    opt = torch.optim.SGD([m.weight], lr=1.0, momentum=0.9, maximize=True)
    m.weight.grad = torch.tensor([-2.0, 0.5], dtype=F64)
    storage = m.weight.data_ptr()
    opt.step()
    m.post_step_()
    assert m.weight.tolist() == [0.0, 1.5] and m.weight.data_ptr() == storage  # optimizer keeps its tensor
    assert m.weight.grad.tolist() == [-2.0, 0.5]  # gradients untouched
    eq = ours.multipliers.DenseMultiplier(init=torch.tensor([-0.5], dtype=F64))
    eq.set_constraint_type(ours.ConstraintType.EQUALITY)
    eq.post_step_()
    assert eq.weight.tolist() == [-0.5]


def test_import_as_cooper_exposes_the_names():
    for name in ("ConstraintType", "Constraint", "ConstraintState", "ConstrainedMinimizationProblem", "CMPState",
                 "LagrangianStore"):
        assert hasattr(ours, name) and hasattr(ref, name)
    for module, names in (("multipliers", ["Multiplier", "ExplicitMultiplier", "DenseMultiplier",
                                           "IndexedMultiplier", "ImplicitMultiplier"]),
                          ("formulations", ["Formulation", "Lagrangian", "QuadraticPenalty", "AugmentedLagrangian",
                                            "ContributionStore"]),
                          ("penalty_coefficients", ["PenaltyCoefficient", "DensePenaltyCoefficient",
                                                    "IndexedPenaltyCoefficient", "PenaltyCoefficientUpdater",
                                                    "MultiplicativePenaltyCoefficientUpdater",
                                                    "AdditivePenaltyCoefficientUpdater"])):
        for name in names:
            assert hasattr(getattr(ours, module), name) and hasattr(getattr(ref, module), name), (module, name)
    import uniopt.adapters.torch.constrained.formulations.utils as ours_utils
    import cooper.formulations.utils as ref_utils
    public = [n for n in dir(ref_utils) if n.startswith(("compute_", "evaluate_"))]
    assert public and all(hasattr(ours_utils, n) for n in public)
    assert ours.utils.ConstraintType is ours.ConstraintType
    assert list(itertools.islice(ours.utils.ensure_sequence(3), 2)) == [3]


@pytest.mark.parametrize("module", ["", ".multipliers", ".penalty_coefficients", ".constraints", ".cmp"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("uniopt.adapters.torch.constrained" + module))
    assert result.attempted > 0 and result.failed == 0


def test_to_moves_multipliers_penalties_and_the_restart_value():
    data = _data(1)
    cmp = _make_cmp(ours, "AugmentedLagrangian", False, "vector", data, False).to(torch.float32)
    assert all(m.weight.dtype == torch.float32 for m in cmp.multipliers())
    assert all(pc.value.dtype == pc.init.dtype == torch.float32 for pc in cmp.penalty_coefficients())
    upd = ours.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(2.0)
    upd.step({cmp.ineq: ours.ConstraintState(violation=torch.tensor([1.0, -1.0, 0, 0, 0, 0]))})
    assert cmp.ineq.penalty_coefficient.value.dtype == torch.float32
    expected = data["rho_ineq"].float().clone()
    expected[0] *= 2
    assert torch.equal(cmp.ineq.penalty_coefficient.value, expected)


# -- penalty updates on the core kernels ------------------------------------------------------
def _updaters():
    pc = ours.penalty_coefficients
    return [pc.MultiplicativePenaltyCoefficientUpdater(growth_factor=1.5, violation_tolerance=0.1),
            pc.AdditivePenaltyCoefficientUpdater(increment=0.25, violation_tolerance=0.1,
                                                 has_restart=False)]


@pytest.mark.parametrize("updater", _updaters(), ids=["multiplicative", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("indexed", [False, True], ids=["dense", "indexed"])
def test_penalty_update_on_the_kernels_equals_the_torch_ops_path(updater, dtype, indexed, monkeypatch):
    pc, m = ours.penalty_coefficients, 12
    gen = torch.Generator().manual_seed(3)
    init = torch.rand(m, generator=gen, dtype=dtype) + 0.5
    rows = torch.tensor([7, 2, 2, 11, 0])
    violation = torch.randn(len(rows) if indexed else m, generator=gen, dtype=dtype)
    violation[1] = 0.0  # a satisfied inequality: restarted by the multiplicative updater
    calls = []
    real = ours.penalty_coefficients._core.update_penalty_coefficients_
    monkeypatch.setattr(ours.penalty_coefficients._core, "update_penalty_coefficients_",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(kernels: bool):
        cls = pc.IndexedPenaltyCoefficient if indexed else pc.DensePenaltyCoefficient
        coefficient = cls(init.clone())
        constraint = ours.Constraint(ours.ConstraintType.INEQUALITY, formulation_type=ours.formulations.QuadraticPenalty,
                                     penalty_coefficient=coefficient)
        state = ours.ConstraintState(violation=violation, constraint_features=rows if indexed else None)
        with monkeypatch.context() as patch:
            if not kernels:  # the torch-ops path
                patch.setattr(type(updater), "_kernel_update_", lambda *a: False)
            for _ in range(3):
                updater.step({constraint: state})
        return coefficient.value

    fused = run(kernels=True)
    assert len(calls) == 3  # the kernel route ran at every step
    plain = run(kernels=False)
    assert len(calls) == 3
    assert fused.dtype == dtype
    assert torch.equal(fused, plain)
    if indexed:  # only the observed rows changed
        untouched = torch.ones(m, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(fused[untouched], init[untouched])
        assert not torch.equal(fused[rows], init[rows])


def test_indexed_penalty_update_on_the_kernels_reads_only_the_observed_rows():
    pc = ours.penalty_coefficients
    init = torch.ones(1000, dtype=torch.float64)
    coefficient = pc.IndexedPenaltyCoefficient(init)
    coefficient.value[500:] = float("nan")  # rows never observed: never read (nor checked)
    constraint = ours.Constraint(ours.ConstraintType.EQUALITY, formulation_type=ours.formulations.QuadraticPenalty,
                                 penalty_coefficient=coefficient)
    updater = pc.MultiplicativePenaltyCoefficientUpdater(growth_factor=2.0)
    updater.step({constraint: ours.ConstraintState(violation=torch.tensor([1.0, -1.0], dtype=torch.float64),
                                                   constraint_features=torch.tensor([3, 4]))})
    assert coefficient.value[3].item() == 2.0 and coefficient.value[4].item() == 2.0
    assert torch.isnan(coefficient.value[500:]).all()
    with pytest.raises(ValueError, match="Indices must be of type torch.long."):
        updater.step({constraint: ours.ConstraintState(violation=torch.tensor([1.0], dtype=torch.float64),
                                                       constraint_features=torch.tensor([3], dtype=torch.int32))})
