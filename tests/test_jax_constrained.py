"""The JAX face of constrained learning (uniopt.adapters.jax.constrained): trajectories equal
to cooper-optim 1.0.1's (torch, float64) for every roll x formulation x multiplier kind x
constraint type, nuPI against Cooper and a naive recursion (where Cooper is buggy), penalty
updaters, formulations and their gradients, jit/vmap/inject_hyperparams, a closed-form
optimum, and the bad-input table.

float64 is switched on per test with ``jax.enable_x64`` (the ``x64`` fixture); module data are
NumPy arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import cooper  # the reference (test extra): a missing one must fail, not skip
import torch

from uniopt.adapters.jax import constrained as C
from uniopt.adapters.jax.constrained import (
    CMPState,
    Constraint,
    ConstraintState,
    ConstraintType,
    ConstrainedOptimizer,
    DenseMultiplier,
    DensePenaltyCoefficient,
    IndexedMultiplier,
    IndexedPenaltyCoefficient,
    NuPIInitType,
    augmented_lagrangian,
    lagrangian,
    nupi,
    projected_ascent,
    quadratic_penalty,
)

TOL = dict(rtol=1e-12, atol=1e-13)
STEPS = 12


# ----------------------------------------------------------------------------------------------
# The problem: x in R^3, f(x) = sum((x - a)^2) + 0.1 sum(x^4) (smooth, not quadratic), and one
# linear constraint block R x - r (dense: 2 rows, all read; indexed: 5 rows, 3 sampled a step,
# with a duplicate). Initial violations are positive, so inequality multipliers rise and then
# fall back to 0 (the projection binds) within the 12 steps.
# ----------------------------------------------------------------------------------------------
A = np.array([1.5, -0.5, 1.0])
X0 = np.array([0.2, 0.1, -0.3])
R_DENSE = np.array([[1.0, 1.0, 0.5], [-0.5, 1.0, 1.0]])
r_DENSE = np.array([0.5, -0.2])
R_INDEXED = np.array([[1.0, 1.0, 0.5], [-0.5, 1.0, 1.0], [0.3, -0.2, 1.0], [1.0, 0.0, 0.0],
                      [0.0, 0.5, -1.0]])
r_INDEXED = np.array([0.5, -0.2, 0.1, 0.8, -0.1])
_rng = np.random.default_rng(7)
IDX = [np.array(sorted(_rng.choice(5, 3, replace=False))) for _ in range(STEPS)]
for _t in (2, 7):
    IDX[_t] = np.array([1, 3, 1])  # duplicates: their dual gradients are summed
PENALTY = {"dense": np.array([0.7, 1.3]), "indexed": np.array([0.7, 1.3, 0.4, 1.0, 2.0])}
LR_PRIMAL, MOMENTUM, LR_DUAL = 0.1, 0.5, 0.6


def _violation(xp, x, kind, idx):
    R, r = (R_DENSE, r_DENSE) if kind == "dense" else (R_INDEXED, r_INDEXED)
    if xp is torch:
        R, r = torch.as_tensor(R), torch.as_tensor(r)
        return (R @ x - r) if kind == "dense" else (R[idx] @ x - r[idx])
    R, r = jnp.asarray(R), jnp.asarray(r)
    return (R @ x - r) if kind == "dense" else (R[idx] @ x - r[idx])


def _loss(xp, x):
    a = torch.as_tensor(A) if xp is torch else jnp.asarray(A)
    return ((x - a) ** 2).sum() + 0.1 * (x ** 4).sum()


# ---- cooper-optim --------------------------------------------------------------------------
def _cooper_formulation(name):
    return {"lagrangian": cooper.formulations.Lagrangian,
            "augmented_lagrangian": cooper.formulations.AugmentedLagrangian,
            "quadratic_penalty": cooper.formulations.QuadraticPenalty}[name]


def cooper_trajectory(kind, ctype, formulation, roll, steps=STEPS, dual=("sgd", {})):
    """Cooper's ``(x, multiplier, penalty)`` after every roll, as NumPy arrays."""
    n = 2 if kind == "dense" else 5
    ct = (cooper.ConstraintType.INEQUALITY if ctype == "ineq" else cooper.ConstraintType.EQUALITY)

    class Problem(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            mult = pen = None
            if formulation != "quadratic_penalty":
                cls = (cooper.multipliers.DenseMultiplier if kind == "dense"
                       else cooper.multipliers.IndexedMultiplier)
                mult = cls(num_constraints=n, dtype=torch.float64)
            if formulation != "lagrangian":
                pcls = (cooper.penalty_coefficients.DensePenaltyCoefficient if kind == "dense"
                        else cooper.penalty_coefficients.IndexedPenaltyCoefficient)
                pen = pcls(init=torch.tensor(PENALTY[kind]))
            self.c = cooper.Constraint(constraint_type=ct,
                                       formulation_type=_cooper_formulation(formulation),
                                       multiplier=mult, penalty_coefficient=pen)

        def compute_cmp_state(self, x, idx):
            idx_t = None if kind == "dense" else torch.as_tensor(idx, dtype=torch.long)
            state = cooper.ConstraintState(violation=_violation(torch, x, kind, idx),
                                           constraint_features=idx_t)
            return cooper.CMPState(loss=_loss(torch, x), observed_constraints={self.c: state})

    cmp = Problem()
    x = torch.nn.Parameter(torch.tensor(X0))
    extra = roll == "extrapolation"
    if extra:
        primal = cooper.optim.ExtraSGD([x], lr=LR_PRIMAL, momentum=MOMENTUM)
    else:
        primal = torch.optim.SGD([x], lr=LR_PRIMAL, momentum=MOMENTUM)
    duals = list(cmp.dual_parameters())
    if formulation == "quadratic_penalty":
        opt = cooper.optim.UnconstrainedOptimizer(cmp, primal_optimizers=primal)
    else:
        name, kw = dual
        if extra:
            dual_opt = cooper.optim.ExtraSGD(duals, lr=LR_DUAL, maximize=True)
        elif name == "sgd":
            dual_opt = torch.optim.SGD(duals, lr=LR_DUAL, maximize=True)
        else:
            dual_opt = cooper.optim.nuPI(duals, lr=LR_DUAL, maximize=True, **_f64_gains(kw))
        cls = {"simultaneous": cooper.optim.SimultaneousOptimizer,
               "alternating_primal_dual": cooper.optim.AlternatingPrimalDualOptimizer,
               "alternating_dual_primal": cooper.optim.AlternatingDualPrimalOptimizer,
               "extrapolation": cooper.optim.ExtrapolationConstrainedOptimizer}[roll]
        opt = cls(cmp, primal_optimizers=primal, dual_optimizers=dual_opt)
    out = []
    for t in range(steps):
        kwargs = {"x": x, "idx": IDX[t]}
        if roll == "alternating_primal_dual":
            rollout = opt.roll(compute_cmp_state_kwargs=kwargs)
        else:
            rollout = opt.roll(compute_cmp_state_kwargs=kwargs)
        mult = (None if cmp.c.multiplier is None
                else cmp.c.multiplier.weight.detach().numpy().reshape(-1).copy())
        pen = (None if cmp.c.penalty_coefficient is None
               else cmp.c.penalty_coefficient.value.detach().numpy().copy())
        out.append((x.detach().numpy().copy(), mult, pen, float(rollout.loss.detach())))
    return out


# ---- ours ----------------------------------------------------------------------------------
def _ours_constraint(kind, ctype, formulation):
    n = 2 if kind == "dense" else 5
    ct = ConstraintType.INEQUALITY if ctype == "ineq" else ConstraintType.EQUALITY
    mult = pen = None
    if formulation != "quadratic_penalty":
        mult = (DenseMultiplier if kind == "dense" else IndexedMultiplier)(n, dtype=jnp.float64)
    if formulation != "lagrangian":
        pen = (DensePenaltyCoefficient if kind == "dense"
               else IndexedPenaltyCoefficient)(jnp.asarray(PENALTY[kind]))
    form = {"lagrangian": lagrangian, "augmented_lagrangian": augmented_lagrangian,
            "quadratic_penalty": quadratic_penalty}[formulation]
    return {"c": Constraint(ct, form, multiplier=mult, penalty_coefficient=pen)}


def _ours_cmp(kind):
    def compute_cmp_state(x, idx):
        features = None if kind == "dense" else idx
        state = ConstraintState(_violation(jnp, x, kind, idx), constraint_features=features)
        return CMPState(_loss(jnp, x), {"c": state})

    return compute_cmp_state


def ours_trajectory(kind, ctype, formulation, roll, steps=STEPS, dual=None):
    constraints = _ours_constraint(kind, ctype, formulation)
    if formulation == "quadratic_penalty":
        dual = None
    elif dual is None:
        dual = (C.as_ascent(optax.sgd(LR_DUAL)) if roll == "extrapolation"
                else projected_ascent(LR_DUAL))
    solver = ConstrainedOptimizer(_ours_cmp(kind), optax.sgd(LR_PRIMAL, momentum=MOMENTUM),
                                  dual, roll=roll)
    x = jnp.asarray(X0)
    state = solver.init(x, constraints)
    step = jax.jit(solver.step)
    out = []
    for t in range(steps):
        x, constraints, state, rollout = step(x, constraints, state, jnp.asarray(IDX[t]))
        c = constraints["c"]
        out.append((np.asarray(x), None if c.multiplier is None else np.asarray(c.multiplier.weight),
                    None if c.penalty_coefficient is None
                    else np.asarray(c.penalty_coefficient.value), float(rollout.loss)))
    return out


def _assert_same(ours, ref):
    assert len(ours) == len(ref)
    for t, (o, r) in enumerate(zip(ours, ref)):
        for k, name in enumerate(("x", "multiplier", "penalty", "loss")):
            if r[k] is None:
                assert o[k] is None, (t, name)
            else:
                np.testing.assert_allclose(o[k], r[k], **TOL, err_msg=f"step {t}: {name}")


@pytest.mark.parametrize("ctype", ["eq", "ineq"])
@pytest.mark.parametrize("kind", ["dense", "indexed"])
@pytest.mark.parametrize("formulation", ["lagrangian", "augmented_lagrangian"])
@pytest.mark.parametrize("roll", C.ROLLS)
def test_trajectory_matches_cooper(roll, formulation, kind, ctype, x64):
    ref = cooper_trajectory(kind, ctype, formulation, roll)
    ours = ours_trajectory(kind, ctype, formulation, roll)
    _assert_same(ours, ref)
    mults = np.array([m for _, m, _, _ in ref])
    assert np.abs(mults).max() > 1e-3  # the multipliers do move
    if ctype == "ineq":  # the projection binds: entries held at 0 (negative as equalities)
        assert mults.min() == 0 and mults.max() > 0
    else:
        assert mults.min() < 0


@pytest.mark.parametrize("ctype", ["eq", "ineq"])
@pytest.mark.parametrize("kind", ["dense", "indexed"])
def test_quadratic_penalty_matches_cooper_unconstrained_optimizer(kind, ctype, x64):
    ref = cooper_trajectory(kind, ctype, "quadratic_penalty", "simultaneous")
    ours = ours_trajectory(kind, ctype, "quadratic_penalty", "simultaneous")
    _assert_same(ours, ref)


# ----------------------------------------------------------------------------------------------
# nuPI
# ----------------------------------------------------------------------------------------------
_nrng = np.random.default_rng(11)
N_NUPI = 4
ERRORS = _nrng.normal(size=(STEPS, N_NUPI))
X_NUPI = _nrng.normal(size=N_NUPI)
#: rows observed at each step (the sparse / indexed case); every row is seen at least twice
MASKS = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1],
                  [0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1], [0, 1, 1, 1],
                  [1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
NUPI_CASES = [
    dict(Kp=0.0, Ki=1.0, ema_nu=0.0, weight_decay=0.0, maximize=False),
    dict(Kp=1.0, Ki=1.0, ema_nu=0.0, weight_decay=0.0, maximize=True),
    dict(Kp=2.0, Ki=0.5, ema_nu=0.3, weight_decay=0.1, maximize=True),
    dict(Kp=0.7, Ki=1.3, ema_nu=-0.4, weight_decay=0.05, maximize=False),
]
LR_NUPI = 0.3


def naive_nupi(masks, init_type, Kp, Ki, ema_nu, weight_decay, maximize, lr=LR_NUPI):
    """nuPI's documented recursion, entry by entry: xi_t - xi_{t-1} in the proportional
    term, xi_{-1} = e_0 (SGD) or 0 (ZEROS) at an entry's first observation."""
    x, xi = X_NUPI.copy(), np.zeros(N_NUPI)
    seen = np.zeros(N_NUPI, bool)
    sign = 1.0 if maximize else -1.0
    out = []
    for e, m in zip(ERRORS, masks):
        for i in np.flatnonzero(m):
            prev = e[i] if (init_type == "sgd" and not seen[i]) else xi[i]
            new_xi = ema_nu * prev + (1 - ema_nu) * e[i]
            u = Ki * e[i] + Kp * (new_xi - prev)
            x[i] = x[i] + sign * lr * u - lr * weight_decay * x[i]
            xi[i], seen[i] = new_xi, True
        out.append(x.copy())
    return np.array(out)


def ours_nupi(masks, init_type, **kw):
    opt = nupi(LR_NUPI, init_type=init_type, **kw)
    x = jnp.asarray(X_NUPI)
    state = opt.init(x)
    update = jax.jit(opt.update)
    out = []
    for e, m in zip(ERRORS, masks):
        observed = None if masks is None else jnp.asarray(m)
        u, state = update(jnp.asarray(np.where(m, e, 0.0)), state, x, observed=observed)
        x = optax.apply_updates(x, u)
        out.append(np.asarray(x))
    return np.array(out)


def _f64_gains(kw):
    """Cooper keeps python-float gains as float32 tensors (K_P (1 - nu) then rounds to
    float32); give them as float64 tensors for a float64 comparison."""
    return {k: (torch.tensor(v, dtype=torch.float64) if k in ("Kp", "Ki") else v)
            for k, v in kw.items()}


def cooper_nupi(masks, init_type, sparse, **kw):
    kw = _f64_gains(kw)
    p = torch.nn.Parameter(torch.tensor(X_NUPI))
    it = (cooper.optim.nuPIInitType.SGD if init_type == "sgd" else cooper.optim.nuPIInitType.ZEROS)
    opt = cooper.optim.nuPI([p], lr=LR_NUPI, init_type=it, **kw)
    out = []
    for e, m in zip(ERRORS, masks):
        if sparse:
            rows = np.flatnonzero(m)
            p.grad = torch.sparse_coo_tensor(torch.tensor(rows)[None], torch.tensor(e[rows]),
                                             size=(N_NUPI,))
        else:
            p.grad = torch.tensor(e)
        opt.step()
        out.append(p.detach().numpy().copy())
    return np.array(out)


DENSE_MASKS = np.ones((STEPS, N_NUPI), bool)


@pytest.mark.parametrize("kw", NUPI_CASES)
def test_nupi_zeros_init_matches_cooper_dense_and_sparse(kw, x64):
    ours_dense = ours_nupi(DENSE_MASKS, "zeros", **kw)
    np.testing.assert_allclose(ours_dense, cooper_nupi(DENSE_MASKS, "zeros", False, **kw), **TOL)
    np.testing.assert_allclose(ours_dense, naive_nupi(DENSE_MASKS, "zeros", **kw), **TOL)
    ours_sparse = ours_nupi(MASKS, "zeros", **kw)
    np.testing.assert_allclose(ours_sparse, cooper_nupi(MASKS, "zeros", True, **kw), **TOL)
    np.testing.assert_allclose(ours_sparse, naive_nupi(MASKS, "zeros", **kw), **TOL)


@pytest.mark.parametrize("kw", NUPI_CASES)
def test_nupi_sgd_init_follows_the_docstring_on_dense_and_sparse(kw, x64):
    """xi_{-1} = e_0: step 1 is K_I e_0 and xi_0 = e_0. Cooper's sparse path agrees when
    nu = 0 (it stores (1 - nu) e_0); its dense path sets xi_0 = 0 and is wrong from step 2
    whenever K_P (1 - nu) != 0 (a documented deviation)."""
    for masks in (DENSE_MASKS, MASKS):
        ours = ours_nupi(masks, "sgd", **kw)
        np.testing.assert_allclose(ours, naive_nupi(masks, "sgd", **kw), **TOL)
        sparse_ref = cooper_nupi(masks, "sgd", True, **kw)
        if kw["ema_nu"] == 0:
            np.testing.assert_allclose(ours, sparse_ref, **TOL)
        elif kw["Kp"] != 0:
            assert np.abs(ours - sparse_ref).max() > 1e-6
    dense_ref = cooper_nupi(DENSE_MASKS, "sgd", False, **kw)
    ours = ours_nupi(DENSE_MASKS, "sgd", **kw)
    np.testing.assert_allclose(ours[0], dense_ref[0], **TOL)  # step 1 agrees: K_I e_0
    if kw["Kp"] != 0:
        assert np.abs(ours[1] - dense_ref[1]).max() > 1e-6  # Cooper's dense bug from step 2
    else:
        np.testing.assert_allclose(ours, dense_ref, **TOL)


def test_nupi_notes_example_dense_sgd_bug(x64):
    """The reference notes' case: Kp = Ki = 1, nu = 0, errors 1 then 2: 0.4 in total is right
    (lr 0.1: 0.1 * 1 + 0.1 * (2 + (2 - 1))), Cooper's dense path gives 0.5."""
    opt = nupi(0.1, Kp=1.0, Ki=1.0, maximize=True)
    x = jnp.zeros(1)
    state = opt.init(x)
    for e in (1.0, 2.0):
        u, state = opt.update(jnp.array([e]), state, x)
        x = optax.apply_updates(x, u)
    np.testing.assert_allclose(np.asarray(x), [0.4], rtol=1e-15)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ref = cooper.optim.nuPI([p], lr=0.1, Kp=1.0, Ki=1.0, maximize=True)
    for e in (1.0, 2.0):
        p.grad = torch.tensor([e], dtype=torch.float64)
        ref.step()
    np.testing.assert_allclose(p.detach().numpy(), [0.5], rtol=1e-15)


def test_nupi_scalar_gains_with_several_leaves(x64):
    """Cooper refuses a scalar Kp with several param groups; ours applies it to every leaf."""
    kw = dict(Kp=0.8, Ki=1.2, ema_nu=0.2, weight_decay=0.0, maximize=True)
    with pytest.raises(NotImplementedError):
        cooper.optim.nuPI([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                           {"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=0.1, Kp=0.8)
    opt = nupi(LR_NUPI, init_type="zeros", **kw)
    params = {"a": jnp.asarray(X_NUPI[:2]), "b": jnp.asarray(X_NUPI[2:])}
    state = opt.init(params)
    for e in ERRORS:
        u, state = opt.update({"a": jnp.asarray(e[:2]), "b": jnp.asarray(e[2:])}, state, params)
        params = optax.apply_updates(params, u)
    ref = naive_nupi(DENSE_MASKS, "zeros", **kw)[-1]
    np.testing.assert_allclose(np.concatenate([params["a"], params["b"]]), ref, **TOL)


@pytest.mark.parametrize("case", ["dense-zeros", "indexed-sgd"])
def test_nupi_dual_optimizer_trajectory_matches_cooper(case, x64):
    kind, init = case.split("-")
    kw = dict(Kp=0.5, Ki=1.0, ema_nu=0.3 if init == "zeros" else 0.0, weight_decay=0.02)
    it = cooper.optim.nuPIInitType.ZEROS if init == "zeros" else cooper.optim.nuPIInitType.SGD
    ref = cooper_trajectory(kind, "ineq", "lagrangian", "simultaneous",
                            dual=("nupi", dict(kw, init_type=it)))
    ours = ours_trajectory(kind, "ineq", "lagrangian", "simultaneous",
                           dual=nupi(LR_DUAL, init_type=init, maximize=True, **kw))
    _assert_same(ours, ref)


# ----------------------------------------------------------------------------------------------
# Penalty coefficient updaters
# ----------------------------------------------------------------------------------------------
_prng = np.random.default_rng(5)
#: 8 rounds of violations for 3 constraints: some above the tolerance 0.1, some within it,
#: some exactly 0 or negative (restart for inequalities)
PEN_VIOL = _prng.choice([-0.5, -0.05, 0.0, 0.05, 0.3, 1.2], size=(8, 3))
PEN_INIT = np.array([1.0, 2.0, 0.5])
UPDATERS = {
    "mult": (dict(growth_factor=1.5, violation_tolerance=0.1),
             cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater,
             C.MultiplicativePenaltyCoefficientUpdater),
    "add": (dict(increment=0.25, violation_tolerance=0.1),
            cooper.penalty_coefficients.AdditivePenaltyCoefficientUpdater,
            C.AdditivePenaltyCoefficientUpdater),
}


def _penalty_runs(updater, ctype, coefficient, has_restart, formulation="augmented_lagrangian"):
    kw, cooper_cls, ours_cls = UPDATERS[updater]
    ct = (cooper.ConstraintType.INEQUALITY if ctype == "ineq" else cooper.ConstraintType.EQUALITY)
    init = PEN_INIT if coefficient != "scalar" else PEN_INIT[1]
    pcls = (cooper.penalty_coefficients.IndexedPenaltyCoefficient if coefficient == "indexed"
            else cooper.penalty_coefficients.DensePenaltyCoefficient)
    mult = None
    if formulation == "augmented_lagrangian":
        mcls = (cooper.multipliers.IndexedMultiplier if coefficient == "indexed"
                else cooper.multipliers.DenseMultiplier)
        mult = mcls(num_constraints=3, dtype=torch.float64)
    ref_c = cooper.Constraint(ct, _cooper_formulation(formulation), mult,
                              pcls(init=torch.tensor(init, dtype=torch.float64)))
    ref_up = cooper_cls(has_restart=has_restart, **kw)
    ours_c = _ours_constraint("indexed" if coefficient == "indexed" else "dense", ctype,
                              formulation)["c"]
    ours_pen = (IndexedPenaltyCoefficient if coefficient == "indexed"
                else DensePenaltyCoefficient)(jnp.asarray(init))
    cons = {"c": ours_c.replace(penalty_coefficient=ours_pen,
                                multiplier=None if mult is None else
                                (IndexedMultiplier if coefficient == "indexed"
                                 else DenseMultiplier)(3, dtype=jnp.float64).with_constraint_type(
                                    ours_c.constraint_type))}
    up = ours_cls(has_restart=has_restart, **kw)
    step = jax.jit(up.step)
    ours, ref = [], []
    for v in PEN_VIOL:
        rows = np.arange(3)
        ref_up.step({ref_c: cooper.ConstraintState(
            violation=torch.tensor(v), constraint_features=torch.tensor(rows)
            if coefficient == "indexed" else None)})
        cons = step(cons, {"c": ConstraintState(
            jnp.asarray(v), constraint_features=jnp.asarray(rows)
            if coefficient == "indexed" else None)})
        ref.append(ref_c.penalty_coefficient.value.numpy().copy())
        ours.append(np.asarray(cons["c"].penalty_coefficient.value))
    return np.array(ours), np.array(ref)


@pytest.mark.parametrize("has_restart", [True, False])
@pytest.mark.parametrize("coefficient", ["vector", "scalar", "indexed"])
@pytest.mark.parametrize("ctype", ["eq", "ineq"])
@pytest.mark.parametrize("updater", ["mult", "add"])
def test_penalty_updaters_match_cooper(updater, ctype, coefficient, has_restart, x64):
    ours, ref = _penalty_runs(updater, ctype, coefficient, has_restart)
    np.testing.assert_allclose(ours, ref, **TOL)
    assert not np.allclose(ref[-1], PEN_INIT if coefficient != "scalar" else PEN_INIT[1])


@pytest.mark.parametrize("ctype", ["eq", "ineq"])
def test_penalty_updater_quadratic_penalty_matches_cooper(ctype, x64):
    ours, ref = _penalty_runs("mult", ctype, "vector", True, formulation="quadratic_penalty")
    np.testing.assert_allclose(ours, ref, **TOL)


def test_indexed_penalty_restart_updates_only_observed_rows(x64):
    """Cooper crashes here (restart compares the observed rows with the whole init table, a
    shape mismatch); ours restarts the observed rows to their own initial values."""
    init = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    kw = dict(growth_factor=2.0, violation_tolerance=0.1, has_restart=True)
    pen = cooper.penalty_coefficients.IndexedPenaltyCoefficient(init=torch.tensor(init))
    ref_c = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
                              cooper.formulations.AugmentedLagrangian,
                              cooper.multipliers.IndexedMultiplier(5, dtype=torch.float64), pen)
    with pytest.raises(RuntimeError):
        cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(**kw).step(
            {ref_c: cooper.ConstraintState(violation=torch.tensor([0.5, -1.0]),
                                           constraint_features=torch.tensor([1, 3]))})
    cons = {"c": Constraint(ConstraintType.INEQUALITY, augmented_lagrangian,
                            IndexedMultiplier(5, dtype=jnp.float64),
                            IndexedPenaltyCoefficient(jnp.asarray(init)))}
    up = C.MultiplicativePenaltyCoefficientUpdater(**kw)
    cons = up.step(cons, {"c": ConstraintState(jnp.array([0.5, 0.5]), jnp.array([1, 3]))})
    np.testing.assert_array_equal(cons["c"].penalty_coefficient.value, [1, 4, 3, 8, 5])
    cons = up.step(cons, {"c": ConstraintState(jnp.array([-1.0, 0.05]), jnp.array([3, 4]))})
    np.testing.assert_array_equal(cons["c"].penalty_coefficient.value, [1, 4, 3, 4, 5])


def test_penalty_update_routing(x64):
    """Cooper's routing: multiplier formulations update on a dual contribution, or a primal
    one with a strict violation; quadratic penalties on a primal contribution."""
    up = C.AdditivePenaltyCoefficientUpdater(increment=1.0, violation_tolerance=0.0)
    v = jnp.array([1.0, 1.0, 1.0])
    al = _ours_constraint("dense", "eq", "augmented_lagrangian")
    qp = _ours_constraint("dense", "eq", "quadratic_penalty")

    def value(cons, state):
        return np.asarray(up.step(cons, {"c": state})["c"].penalty_coefficient.value)

    base = PENALTY["dense"]
    v2 = v[:2]
    np.testing.assert_array_equal(value(al, ConstraintState(v2)), base + 1)
    np.testing.assert_array_equal(
        value(al, ConstraintState(v2, contributes_to_dual_update=False)), base)
    np.testing.assert_array_equal(
        value(al, ConstraintState(v2, strict_violation=v2, contributes_to_dual_update=False)),
        base + 1)
    np.testing.assert_array_equal(value(qp, ConstraintState(v2)), base + 1)
    np.testing.assert_array_equal(
        value(qp, ConstraintState(v2, contributes_to_primal_update=False)), base)


# ----------------------------------------------------------------------------------------------
# Formulations: values and gradients against Cooper and closed forms
# ----------------------------------------------------------------------------------------------
LAM = np.array([0.0, 0.8, 0.3, 1.5])
VIOL = np.array([0.4, -2.0, -0.1, 0.7])  # AL ineq: entries 0, 3 active, 1 inactive, 2 active
PEN4 = np.array([1.0, 0.5, 2.0, 0.0])


@pytest.mark.parametrize("ctype", ["eq", "ineq"])
@pytest.mark.parametrize("formulation", ["lagrangian", "augmented_lagrangian", "quadratic_penalty"])
def test_contributions_and_gradients_match_cooper(formulation, ctype, x64):
    pen = PEN4 if ctype == "eq" or formulation != "augmented_lagrangian" else PEN4 + 0.25
    ct = cooper.ConstraintType.INEQUALITY if ctype == "ineq" else cooper.ConstraintType.EQUALITY
    mult = pcoef = None
    if formulation != "quadratic_penalty":
        mult = cooper.multipliers.DenseMultiplier(init=torch.tensor(LAM), dtype=torch.float64)
    if formulation != "lagrangian":
        pcoef = cooper.penalty_coefficients.DensePenaltyCoefficient(init=torch.tensor(pen))
    ref_c = cooper.Constraint(ct, _cooper_formulation(formulation), mult, pcoef)
    v_t = torch.tensor(VIOL, requires_grad=True)
    cmp_state = cooper.CMPState(loss=None, observed_constraints={
        ref_c: cooper.ConstraintState(violation=v_t)})
    ref_p = cmp_state.compute_primal_lagrangian().lagrangian
    (ref_gv,) = torch.autograd.grad(ref_p, v_t)
    ref_d = cmp_state.compute_dual_lagrangian().lagrangian

    form = {"lagrangian": lagrangian, "augmented_lagrangian": augmented_lagrangian,
            "quadratic_penalty": quadratic_penalty}[formulation]
    cons = Constraint(ConstraintType.INEQUALITY if ctype == "ineq" else ConstraintType.EQUALITY,
                      form, None if mult is None else DenseMultiplier(init=jnp.asarray(LAM)),
                      None if pcoef is None else DensePenaltyCoefficient(jnp.asarray(pen)))

    def primal(v):
        return cons.contributions(ConstraintState(v))[0]

    p, gv = jax.value_and_grad(primal)(jnp.asarray(VIOL))
    np.testing.assert_allclose(float(p), float(ref_p.detach()), **TOL)
    np.testing.assert_allclose(np.asarray(gv), ref_gv.numpy(), **TOL)
    if formulation == "quadratic_penalty":
        assert cons.contributions(ConstraintState(jnp.asarray(VIOL)))[1] is None
        assert ref_d is None or float(ref_d) == 0.0
    else:
        ref_d.backward()
        def dual(m):
            return cons.replace(multiplier=m).contributions(ConstraintState(jnp.asarray(VIOL)))[1]
        d, gm = jax.value_and_grad(dual)(cons.multiplier)
        np.testing.assert_allclose(float(d), float(ref_d), **TOL)
        # the dual gradient is the raw violation (no penalty factor), as Cooper's code
        np.testing.assert_array_equal(np.asarray(gm.weight), VIOL)
        np.testing.assert_array_equal(mult.weight.grad.numpy(), VIOL)
        # the violation gets no gradient through the dual term, the multiplier none through
        # the primal term
        gdv = jax.grad(lambda v: cons.contributions(ConstraintState(v))[1])(jnp.asarray(VIOL))
        np.testing.assert_array_equal(np.asarray(gdv), 0.0)
        gpm = jax.grad(lambda m: cons.replace(multiplier=m).contributions(
            ConstraintState(jnp.asarray(VIOL)))[0])(cons.multiplier)
        np.testing.assert_array_equal(np.asarray(gpm.weight), 0.0)


def test_augmented_lagrangian_zero_penalty_is_the_lagrangian_term(x64):
    """Cooper's AL with a zero penalty (inequality) is NaN; ours is the c -> 0 limit."""
    lam = np.array([0.0, 0.8, 0.3])
    viol = np.array([0.4, -2.0, 0.7])
    mult = cooper.multipliers.DenseMultiplier(init=torch.tensor(lam), dtype=torch.float64)
    ref_c = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
                              cooper.formulations.AugmentedLagrangian, mult,
                              cooper.penalty_coefficients.DensePenaltyCoefficient(
                                  init=torch.zeros(3, dtype=torch.float64)))
    ref = cooper.CMPState(observed_constraints={ref_c: cooper.ConstraintState(
        violation=torch.tensor(viol))}).compute_primal_lagrangian().lagrangian
    assert torch.isnan(ref)
    cons = Constraint(ConstraintType.INEQUALITY, augmented_lagrangian,
                      DenseMultiplier(init=jnp.asarray(lam)), DensePenaltyCoefficient(jnp.zeros(3)))
    f = lambda v: cons.contributions(ConstraintState(v))[0]  # noqa: E731
    value, grad = jax.value_and_grad(f)(jnp.asarray(viol))
    np.testing.assert_allclose(float(value), lam @ viol, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(grad), lam)
    # and it is the limit: a tiny penalty is within O(c) of it
    tiny = cons.replace(penalty_coefficient=DensePenaltyCoefficient(jnp.full(3, 1e-9)))
    np.testing.assert_allclose(float(tiny.contributions(ConstraintState(jnp.asarray(viol)))[0]),
                               lam @ viol, atol=1e-8)


def test_primal_gradient_closed_form_and_indexed_dual_scatter_add(x64):
    """grad_x of the AL primal Lagrangian (equality) is grad f + R^T (mu + c h); the dual
    gradient of an indexed multiplier sums duplicated rows (np.add.at)."""
    mu = np.array([0.3, -0.2, 0.5, 1.0, 0.1])
    c = PENALTY["indexed"]
    idx = np.array([4, 1, 4, 0])
    cons = {"c": Constraint(ConstraintType.EQUALITY, augmented_lagrangian,
                            IndexedMultiplier(init=jnp.asarray(mu)),
                            IndexedPenaltyCoefficient(jnp.asarray(c)))}
    cmp = _ours_cmp("indexed")
    x = jnp.asarray(X0)
    g = jax.grad(lambda x: C.primal_lagrangian(cmp(x, jnp.asarray(idx)), cons))(x)
    h = R_INDEXED[idx] @ X0 - r_INDEXED[idx]
    grad_f = 2 * (X0 - A) + 0.4 * X0 ** 3
    np.testing.assert_allclose(np.asarray(g), grad_f + R_INDEXED[idx].T @ (mu[idx] + c[idx] * h),
                               **TOL)
    state = cmp(x, jnp.asarray(idx))
    gm = jax.grad(lambda m: C.dual_lagrangian(state, {"c": cons["c"].replace(multiplier=m)}))(
        cons["c"].multiplier)
    expected = np.zeros(5)
    np.add.at(expected, idx, h)
    np.testing.assert_allclose(np.asarray(gm.weight), expected, **TOL)
    obs = C.observed_rows(state, cons)["c"].weight
    np.testing.assert_array_equal(np.asarray(obs), [True, True, False, False, True])


def test_multiplier_keeps_init_dtype(x64):
    """Cooper's DenseMultiplier(init=float64) silently becomes float32; ours keeps the dtype
    unless dtype is given."""
    init = np.array([0.1, 0.2])
    assert cooper.multipliers.DenseMultiplier(init=torch.tensor(init)).weight.dtype == torch.float32
    assert DenseMultiplier(init=jnp.asarray(init)).weight.dtype == jnp.float64
    assert IndexedMultiplier(init=jnp.asarray(init)).weight.dtype == jnp.float64
    assert DenseMultiplier(init=jnp.asarray(init), dtype=jnp.float32).weight.dtype == jnp.float32
    assert DenseMultiplier(init=jnp.asarray(init, jnp.float32)).weight.dtype == jnp.float32
    np.testing.assert_array_equal(DenseMultiplier(init=jnp.asarray(init)).value(), init)


# ----------------------------------------------------------------------------------------------
# A whole step under jit (no retracing), fori_loop, vmap; convergence to a closed form
# ----------------------------------------------------------------------------------------------
N_VEC = np.array([1.0, 1.0, 0.0])
M_VEC = np.array([0.0, 1.0, -1.0])
B, D = 0.5, 0.2


def _kkt(a):
    """min 1/2 ||x - a||^2 s.t. n.x <= b, m.x = d, both active: x = a - N^T nu."""
    N = np.stack([N_VEC, M_VEC])
    nu = np.linalg.solve(N @ N.T, N @ a - np.array([B, D]))
    assert nu[0] > 0  # the inequality is active at the optimum
    return a - N.T @ nu, nu


def _kkt_problem():
    def compute_cmp_state(x, a):
        return CMPState(0.5 * jnp.sum((x - a) ** 2), {
            "g": ConstraintState(jnp.dot(jnp.asarray(N_VEC), x) - B),
            "h": ConstraintState(jnp.dot(jnp.asarray(M_VEC), x) - D)})

    return compute_cmp_state


def _kkt_constraints(formulation=lagrangian, penalty=None):
    pen = None if penalty is None else DensePenaltyCoefficient(penalty)
    return {"g": Constraint(ConstraintType.INEQUALITY, formulation, DenseMultiplier(1), pen),
            "h": Constraint(ConstraintType.EQUALITY, formulation, DenseMultiplier(1), pen)}


@pytest.mark.parametrize("setting", ["gda", "alm", "extrapolation", "nupi"])
def test_converges_to_the_kkt_point_in_one_fori_loop(setting, x64):
    a = np.array([1.0, 0.5, -0.4])
    x_star, nu_star = _kkt(a)
    if setting == "alm":  # the classical method of multipliers: dual lr = penalty
        cons = _kkt_constraints(augmented_lagrangian, 2.0)
        solver = ConstrainedOptimizer(_kkt_problem(), optax.sgd(0.1), projected_ascent(2.0),
                                      roll="alternating_primal_dual")
    elif setting == "extrapolation":
        cons = _kkt_constraints()
        solver = ConstrainedOptimizer(_kkt_problem(), optax.sgd(0.2),
                                      C.as_ascent(optax.sgd(0.2)), roll="extrapolation")
    elif setting == "nupi":
        cons = _kkt_constraints()
        solver = ConstrainedOptimizer(_kkt_problem(), optax.sgd(0.1),
                                      nupi(0.1, Kp=1.0, Ki=1.0, maximize=True))
    else:
        cons = _kkt_constraints()
        solver = ConstrainedOptimizer(_kkt_problem(), optax.sgd(0.1), projected_ascent(0.1))
    x = jnp.zeros(3)
    state = solver.init(x, cons)

    @jax.jit
    def run(x, cons, state):
        def body(_, carry):
            return solver.step(*carry, jnp.asarray(a))[:3]
        return jax.lax.fori_loop(0, 3000, body, (x, cons, state))

    x, cons, _ = run(x, cons, state)
    np.testing.assert_allclose(np.asarray(x), x_star, atol=1e-7)
    np.testing.assert_allclose([float(cons["g"].multiplier.weight[0]),
                                float(cons["h"].multiplier.weight[0])], nu_star, atol=1e-7)


def test_jit_compiles_one_step_without_retracing(x64):
    traces = []

    def compute_cmp_state(x, idx):
        traces.append(1)
        return _ours_cmp("indexed")(x, idx)

    cons = _ours_constraint("indexed", "ineq", "augmented_lagrangian")
    solver = ConstrainedOptimizer(compute_cmp_state, optax.sgd(0.1),
                                  nupi(0.2, Kp=0.5, maximize=True), roll="alternating_dual_primal")
    x = jnp.asarray(X0)
    state = solver.init(x, cons)
    step = jax.jit(solver.step)
    x, cons, state, _ = step(x, cons, state, jnp.asarray(IDX[0]))
    n = len(traces)
    assert n > 0
    for t in range(1, 6):
        x, cons, state, _ = step(x, cons, state, jnp.asarray(IDX[t]))
    assert len(traces) == n
    assert step._cache_size() == 1


def test_vmap_over_a_batch_of_problems(x64):
    targets = np.array([[1.0, 0.5, -0.4], [0.0, 2.0, 1.0], [-1.0, 1.0, 3.0]])
    solver = ConstrainedOptimizer(_kkt_problem(), optax.sgd(0.1, momentum=0.3),
                                  projected_ascent(0.2), roll="alternating_dual_primal")
    cons = _kkt_constraints()
    x = jnp.zeros(3)
    state = solver.init(x, cons)
    batch = jax.tree.map(lambda leaf: jnp.stack([leaf] * 3), (x, cons, state))
    vstep = jax.jit(jax.vmap(solver.step))
    step = jax.jit(solver.step)
    singles = [(x, cons, state) for _ in targets]
    for _ in range(15):
        batch = vstep(*batch, jnp.asarray(targets))[:3]
        singles = [step(*s, jnp.asarray(a))[:3] for s, a in zip(singles, targets)]
    for k in range(3):
        one = jax.tree.map(lambda leaf: leaf[k], batch)
        for got, want in zip(jax.tree.leaves(one), jax.tree.leaves(singles[k])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    assert len({float(w) for w in batch[1]["g"].multiplier.weight[:, 0]}) == 3


# ----------------------------------------------------------------------------------------------
# optax conventions: inject_hyperparams, schedules, chain
# ----------------------------------------------------------------------------------------------
def _ineq_multiplier(values):
    return DenseMultiplier(init=jnp.asarray(values), constraint_type=ConstraintType.INEQUALITY)


def test_inject_hyperparams_changes_the_learning_rate(x64):
    lam = {"g": _ineq_multiplier([0.5, 0.2])}
    grads = {"g": lam["g"].replace(weight=jnp.array([1.0, -1.0]))}
    opt = optax.inject_hyperparams(projected_ascent)(learning_rate=0.5)
    state = opt.init(lam)
    update = jax.jit(opt.update)
    u, state = update(grads, state, lam)
    lam = optax.apply_updates(lam, u)
    np.testing.assert_allclose(np.asarray(lam["g"].weight), [1.0, 0.0], rtol=1e-15)
    state.hyperparams["learning_rate"] = jnp.asarray(0.25)
    u, state = update(grads, state, lam)
    lam = optax.apply_updates(lam, u)
    np.testing.assert_allclose(np.asarray(lam["g"].weight), [1.25, 0.0], rtol=1e-15)

    opt = optax.inject_hyperparams(nupi)(learning_rate=0.5, Kp=1.0, init_type="zeros",
                                         maximize=True)
    x = jnp.zeros(2)
    state = opt.init(x)
    update = jax.jit(opt.update)
    u, state = update(jnp.array([1.0, 2.0]), state, x)
    x = optax.apply_updates(x, u)  # ZEROS: 0.5 * (1 + 1) e
    np.testing.assert_allclose(np.asarray(x), [1.0, 2.0], rtol=1e-15)
    state.hyperparams["Kp"] = jnp.asarray(0.0)
    state.hyperparams["learning_rate"] = jnp.asarray(1.0)
    u, state = update(jnp.array([1.0, 1.0]), state, x)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(x, u)), [2.0, 3.0], rtol=1e-15)


def test_learning_rate_schedule_and_chain(x64):
    lam = {"g": _ineq_multiplier([0.0])}
    grads = {"g": lam["g"].replace(weight=jnp.array([4.0]))}
    opt = optax.chain(optax.clip(1.0), projected_ascent(optax.linear_schedule(1.0, 0.0, 4)))
    state = opt.init(lam)
    seen = []
    for _ in range(5):
        u, state = opt.update(grads, state, lam)
        lam = optax.apply_updates(lam, u)
        seen.append(float(lam["g"].weight[0]))
    np.testing.assert_allclose(seen, np.cumsum([1.0, 0.75, 0.5, 0.25, 0.0]), rtol=1e-15)
    # observed reaches the transformation through the chain: unobserved entries stay
    lam = {"g": _ineq_multiplier([0.5, 0.5])}
    g = {"g": lam["g"].replace(weight=jnp.array([1.0, -1.0]))}
    for tx in (projected_ascent(1.0), nupi(1.0, maximize=True, weight_decay=0.5)):
        chained = optax.chain(optax.identity(), tx)
        u, _ = chained.update(g, chained.init(lam), lam,
                              observed={"g": lam["g"].replace(weight=jnp.array([False, True]))})
        assert float(u["g"].weight[0]) == 0.0 and float(u["g"].weight[1]) == -0.5


# ----------------------------------------------------------------------------------------------
# Bad inputs: torch-style messages naming the argument and the value, at construction
# ----------------------------------------------------------------------------------------------
def _solver(**kw):
    args = dict(compute_cmp_state=_kkt_problem(), primal_optimizer=optax.sgd(0.1),
                dual_optimizer=projected_ascent(0.1))
    args.update(kw)
    return ConstrainedOptimizer(**args)


BAD = [
    # multipliers
    (lambda: DenseMultiplier(), ValueError, r"At least one of `num_constraints` and `init`"),
    (lambda: DenseMultiplier(0), ValueError, r"Invalid num_constraints: 0"),
    (lambda: DenseMultiplier(2.5), TypeError, r"Invalid num_constraints: 2\.5"),
    (lambda: DenseMultiplier(True), TypeError, r"Invalid num_constraints: True"),
    (lambda: DenseMultiplier(init=np.zeros((2, 2))), ValueError, r"Invalid init: shape \(2, 2\)"),
    (lambda: DenseMultiplier(3, init=np.zeros(2)), ValueError,
     r"Invalid init: shape \(2,\) is inconsistent with num_constraints=3"),
    (lambda: DenseMultiplier(init=np.array([1.0, np.nan])), ValueError, r"Invalid init: not every"),
    (lambda: DenseMultiplier(init="abc"), TypeError, r"Invalid init: 'abc'"),
    (lambda: IndexedMultiplier(init=[]), ValueError,
     r"Invalid init: shape \(0,\) \(an IndexedMultiplier needs at least one row"),
    (lambda: DenseMultiplier(2, dtype=jnp.int32), TypeError, r"Invalid dtype: .*int32"),
    (lambda: DenseMultiplier(init=np.array([-1.0, 0.0]),
                             constraint_type=ConstraintType.INEQUALITY), ValueError,
     r"Invalid init: an inequality multiplier must be non-negative, got minimum -1\.0"),
    (lambda: DenseMultiplier(2, constraint_type="ineq"), TypeError,
     r"Invalid constraint_type: 'ineq'"),
    (lambda: IndexedMultiplier(3).value(jnp.array([0.0, 1.0])), TypeError,
     r"Invalid indices: dtype float"),
    (lambda: IndexedMultiplier(3).value(jnp.array([True, False, True])), TypeError,
     r"Invalid indices: dtype bool"),
    (lambda: IndexedMultiplier(3).value(), ValueError, r"needs constraint features"),
    (lambda: DenseMultiplier(3).value(jnp.array([0])), ValueError, r"takes no constraint"),
    # penalty coefficients
    (lambda: DensePenaltyCoefficient(np.ones((2, 2))), ValueError, r"Invalid init: shape \(2, 2\)"),
    (lambda: DensePenaltyCoefficient(np.array([1.0, -1.0])), ValueError,
     r"Invalid init: .*non-negative"),
    (lambda: DensePenaltyCoefficient(None), TypeError, r"Invalid init: None"),
    # init that JAX cannot hold or read as numbers: uniopt's message naming init, not JAX's
    (lambda: DenseMultiplier(init=[""]), TypeError, r"^Invalid init: \[''\] \(expected a 1-D"),
    (lambda: IndexedMultiplier(init=[None]), TypeError, r"^Invalid init: \[None\] \(expected"),
    (lambda: DenseMultiplier(init=[1 + 2j]), TypeError, r"^Invalid init: \[\(1\+2j\)\]"),
    (lambda: IndexedPenaltyCoefficient(object()), TypeError, r"^Invalid init: <object"),
    (lambda: DensePenaltyCoefficient(-(2**63)), ValueError,
     r"^Invalid init: -9223372036854775808 \(penalty coefficients must be finite and"),
    (lambda: DensePenaltyCoefficient(jnp.ones(2), dtype=(None, 1 + 2j)), TypeError,
     r"^Invalid dtype: \(None, \(1\+2j\)\) \(expected a floating-point dtype\)$"),
    # an array gain must broadcast to each leaf: known at init
    (lambda: nupi(0.1, Kp=np.zeros(2)).init(jnp.zeros(3)), ValueError,
     r"^Invalid Kp value: shape \(2,\) does not broadcast to a leaf of shape \(3,\)$"),
    (lambda: nupi(0.1, Ki=np.ones((2, 3))).init({"a": jnp.zeros(3)}), ValueError,
     r"^Invalid Ki value: shape \(2, 3\) does not broadcast to a leaf of shape \(3,\)$"),
    (lambda: IndexedPenaltyCoefficient(np.ones(3))(jnp.array([0.5])), TypeError,
     r"Invalid indices"),
    # states and constraints
    (lambda: ConstraintState(jnp.zeros(2), strict_constraint_features=jnp.array([0])), ValueError,
     r"`strict_violation` must be provided"),
    (lambda: ConstraintState(jnp.zeros(2), contributes_to_dual_update=1), TypeError,
     r"Invalid contributes_to_dual_update: 1"),
    (lambda: ConstraintState(None), TypeError, r"Invalid violation: None"),
    (lambda: CMPState(observed_constraints=[1]), TypeError, r"Invalid observed_constraints"),
    (lambda: CMPState(observed_constraints={"g": jnp.zeros(2)}), TypeError,
     r"Invalid observed_constraints\['g'\]"),
    (lambda: Constraint("ineq", multiplier=DenseMultiplier(1)), TypeError,
     r"Invalid constraint_type: 'ineq'"),
    (lambda: Constraint(ConstraintType.INEQUALITY, "lagrangian", DenseMultiplier(1)), TypeError,
     r"Invalid formulation: 'lagrangian'"),
    (lambda: Constraint(ConstraintType.INEQUALITY, ["lagrangian"], DenseMultiplier(1)),
     TypeError, r"Invalid formulation: \['lagrangian'\]"),
    (lambda: Constraint(ConstraintType.INEQUALITY), ValueError,
     r"Lagrangian expects a multiplier but none was provided"),
    (lambda: Constraint(ConstraintType.INEQUALITY, quadratic_penalty, DenseMultiplier(1),
                        DensePenaltyCoefficient(1.0)), ValueError,
     r"Received unexpected multiplier for QuadraticPenalty"),
    (lambda: Constraint(ConstraintType.INEQUALITY, augmented_lagrangian, DenseMultiplier(1)),
     ValueError, r"AugmentedLagrangian expects a penalty coefficient but none was provided"),
    (lambda: Constraint(ConstraintType.INEQUALITY, lagrangian, DenseMultiplier(1),
                        DensePenaltyCoefficient(1.0)), ValueError,
     r"Received unexpected penalty coefficient for Lagrangian"),
    (lambda: Constraint(ConstraintType.EQUALITY, multiplier=DenseMultiplier(
        1, constraint_type=ConstraintType.INEQUALITY)), ValueError, r"Invalid multiplier: typed"),
    (lambda: Constraint(ConstraintType.INEQUALITY, multiplier=DenseMultiplier(
        init=np.array([-0.5]))), ValueError, r"must be non-negative, got minimum -0\.5"),
    (lambda: Constraint(ConstraintType.INEQUALITY, multiplier=np.zeros(2)), TypeError,
     r"Invalid multiplier"),
    (lambda: quadratic_penalty(ConstraintState(jnp.zeros(1)),
                               penalty_coefficient=DensePenaltyCoefficient(1.0)),
     TypeError, r"Invalid constraint_type: None"),
    (lambda: lagrangian(jnp.zeros(1), DenseMultiplier(1)), TypeError, r"Invalid constraint_state"),
    # dual optimizers
    (lambda: projected_ascent(-1.0), ValueError, r"^Invalid learning rate: -1\.0$"),
    (lambda: projected_ascent(np.nan), ValueError, r"Invalid learning rate: nan"),
    (lambda: projected_ascent("0.1"), TypeError, r"Invalid learning rate: '0\.1'"),
    (lambda: projected_ascent(0.1).update(jnp.zeros(1), projected_ascent(0.1).init(None)),
     ValueError, r"projected_ascent: params .* are required"),
    (lambda: nupi(-0.1), ValueError, r"^Invalid learning rate: -0\.1$"),
    (lambda: nupi(0.1, weight_decay=-1.0), ValueError, r"^Invalid weight_decay value: -1\.0$"),
    (lambda: nupi(0.1, ema_nu=1.0), ValueError, r"^Invalid nu value: 1\.0$"),
    (lambda: nupi(0.1, ema_nu=-1.0), ValueError, r"^Invalid nu value: -1\.0$"),
    (lambda: nupi(0.1, Kp=np.inf), ValueError, r"^Invalid Kp value: inf$"),
    (lambda: nupi(0.1, Ki="1"), TypeError,
     r"^Invalid Ki value: '1' \(expected a real number or an array of them\)$"),
    (lambda: nupi(0.1, init_type="adam"), ValueError, r"^Invalid init_type: adam$"),
    (lambda: nupi(0.1, maximize=1), TypeError, r"Invalid maximize value: 1"),
    (lambda: C.as_ascent(0.1), TypeError, r"Invalid transformation: 0\.1"),
    (lambda: projected_ascent(0.1).update.update_rows(
        {}, projected_ascent(0.1).init(None), {"g": DenseMultiplier(1)}, rows={"h": None}),
     ValueError, r"rows for unknown multipliers \['h'\]"),
    (lambda: nupi(0.1).update.update_rows({}, None, jnp.zeros(2), rows={}), TypeError,
     r"nupi.update_rows: params must map names to multipliers"),
    # penalty updaters
    (lambda: C.MultiplicativePenaltyCoefficientUpdater(growth_factor=0.0), ValueError,
     r"^Invalid growth_factor value: 0\.0$"),
    (lambda: C.MultiplicativePenaltyCoefficientUpdater(violation_tolerance=-1.0), ValueError,
     r"^Invalid violation_tolerance value: -1\.0 \(Violation tolerance must be non-negative\.\)$"),
    (lambda: C.AdditivePenaltyCoefficientUpdater(increment=-1.0), ValueError,
     r"^Invalid increment value: -1\.0$"),
    (lambda: C.AdditivePenaltyCoefficientUpdater(has_restart="yes"), TypeError,
     r"Invalid has_restart value: 'yes'"),
    # the torch face's checks and messages, for the same bad input (tests/test_torch_constrained.py)
    (lambda: IndexedMultiplier(init=np.array([np.inf])), ValueError,
     r"^Invalid init: not every value is finite$"),
    (lambda: DensePenaltyCoefficient(np.array(np.inf)), ValueError,
     r"^Invalid init: .*inf.* \(penalty coefficients must be finite and non-negative\)$"),
    (lambda: DenseMultiplier(2, dtype=jnp.int32), TypeError,
     r"^Invalid dtype: .* \(expected a floating-point dtype\)$"),
    (lambda: ConstraintState(jnp.zeros(2), contributes_to_primal_update="yes"), TypeError,
     r"^Invalid contributes_to_primal_update: 'yes' \(expected True or False\)$"),
    (lambda: C.MultiplicativePenaltyCoefficientUpdater(growth_factor=np.nan), ValueError,
     r"^Invalid growth_factor value: nan$"),
    (lambda: C.MultiplicativePenaltyCoefficientUpdater(growth_factor="2"), TypeError,
     r"^Invalid growth_factor value: '2' \(expected a real number\)$"),
    (lambda: C.AdditivePenaltyCoefficientUpdater(increment=np.inf), ValueError,
     r"^Invalid increment value: inf$"),
    (lambda: C.AdditivePenaltyCoefficientUpdater(violation_tolerance="a"), TypeError,
     r"^Invalid violation_tolerance value: 'a' \(expected a real number\)$"),
    (lambda: C.AdditivePenaltyCoefficientUpdater(violation_tolerance=np.inf), ValueError,
     r"^Invalid violation_tolerance value: inf \(Violation tolerance"),
    (lambda: C.AdditivePenaltyCoefficientUpdater(has_restart=1), TypeError,
     r"^Invalid has_restart value: 1 \(expected True or False\)$"),
    (lambda: nupi(0.1, Ki=True), TypeError,
     r"^Invalid Ki value: True \(expected a real number or an array of them\)$"),
    (lambda: nupi(0.1, ema_nu="0.1"), TypeError,
     r"^Invalid nu value: '0\.1' \(expected a real number\)$"),
    # the solver
    (lambda: _solver(roll="gda"), ValueError, r"Invalid roll: 'gda'"),
    (lambda: _solver(compute_cmp_state=1), TypeError, r"Invalid compute_cmp_state: 1"),
    (lambda: _solver(primal_optimizer=0.1), TypeError, r"Invalid primal_optimizer: 0\.1"),
    (lambda: _solver(dual_optimizer="sgd"), TypeError, r"Invalid dual_optimizer: 'sgd'"),
    (lambda: _solver(compute_violations=3), TypeError, r"Invalid compute_violations: 3"),
    (lambda: _solver(dual_optimizer=None).init(jnp.zeros(3), _kkt_constraints()), ValueError,
     r"Invalid dual_optimizer: None, but the constraints \['g', 'h'\] have multipliers"),
    (lambda: _solver().init(jnp.zeros(3), {"g": DenseMultiplier(1)}), TypeError,
     r"Invalid constraints"),
]


def test_python_ints_beyond_int64_are_the_real_numbers_they_equal(x64):
    """``init=[-2**63]``/``[2**64]`` (Python ints JAX cannot hold) are those floats."""
    m = DenseMultiplier(init=[-(2**63), 2**64])
    np.testing.assert_array_equal(np.asarray(m.weight), [-(2.0**63), 2.0**64])
    c = IndexedPenaltyCoefficient(2**64)
    assert float(c.value) == 2.0**64


@pytest.mark.parametrize("build, error, message", BAD,
                         ids=[f"{i}-{m[:30]}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_inputs(build, error, message, x64):
    with pytest.raises(error, match=message):
        build()


def test_bad_observed_name_and_compute_violations_with_loss(x64):
    solver = _solver()
    cons = {"g": _kkt_constraints()["g"]}
    state = solver.init(jnp.zeros(3), cons)
    with pytest.raises(ValueError, match=r"Invalid observed_constraints: 'h' is not among"):
        solver.step(jnp.zeros(3), cons, state, jnp.ones(3))
    cons = _kkt_constraints()
    solver = _solver(roll="alternating_primal_dual", compute_violations=_kkt_problem())
    state = solver.init(jnp.zeros(3), cons)
    with pytest.raises(RuntimeError,
                       match=r"Expected `compute_violations` to not populate the loss"):
        solver.step(jnp.zeros(3), cons, state, jnp.ones(3))


def test_compute_violations_is_used_for_the_alternating_dual_step(x64):
    """With compute_violations the dual step of the alternating primal-dual roll uses its
    (strict) measurements at x_{t+1}, and the roll-out loss is f(x_t)."""
    a = jnp.array([1.0, 0.5, -0.4])

    def violations(x, a):
        state = _kkt_problem()(x, a)
        return CMPState(None, {k: v.replace(violation=2 * v.violation)
                               for k, v in state.observed_constraints.items()})

    cons = _kkt_constraints()
    solver = _solver(roll="alternating_primal_dual", compute_violations=violations)
    x0 = jnp.zeros(3)
    x1, cons1, _, rollout = solver.step(x0, cons, solver.init(x0, cons), a)
    expected = 0.1 * 2 * (float(jnp.dot(jnp.asarray(N_VEC), x1)) - B)
    np.testing.assert_allclose(float(cons1["g"].multiplier.weight[0]), max(expected, 0.0),
                               rtol=1e-14)
    np.testing.assert_allclose(float(rollout.loss), float(0.5 * jnp.sum((x0 - a) ** 2)),
                               rtol=1e-15)
    assert rollout.cmp_state.loss is None


def test_pytrees_are_immutable_and_flatten(x64):
    m = DenseMultiplier(2)
    with pytest.raises(AttributeError, match="immutable"):
        m.weight = jnp.ones(2)
    cons = _kkt_constraints(augmented_lagrangian, 1.0)
    leaves, treedef = jax.tree.flatten(cons)
    assert len(leaves) == 2 * 3  # multiplier weight, penalty value and init, per constraint
    back = jax.tree.unflatten(treedef, leaves)
    assert back["g"].constraint_type is ConstraintType.INEQUALITY
    assert back["g"].formulation is augmented_lagrangian
    assert repr(m) == "DenseMultiplier(num_constraints=2)"


def test_docstring_examples():
    import doctest

    with jax.enable_x64(False):
        result = doctest.testmod(C, raise_on_error=False, report=True)
    assert result.attempted > 40
    assert result.failed == 0


@pytest.mark.parametrize("roll", C.ROLLS)
def test_several_constraints_at_once_match_cooper(roll, x64):
    """A dense inequality (Lagrangian), an indexed equality (augmented Lagrangian) and a dense
    equality (quadratic penalty, no multiplier) in one problem; penalties grow after each roll."""
    extra = roll == "extrapolation"

    class Problem(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.g = cooper.Constraint(
                cooper.ConstraintType.INEQUALITY, cooper.formulations.Lagrangian,
                cooper.multipliers.DenseMultiplier(2, dtype=torch.float64))
            self.h = cooper.Constraint(
                cooper.ConstraintType.EQUALITY, cooper.formulations.AugmentedLagrangian,
                cooper.multipliers.IndexedMultiplier(5, dtype=torch.float64),
                cooper.penalty_coefficients.IndexedPenaltyCoefficient(
                    torch.tensor(PENALTY["indexed"])))
            self.q = cooper.Constraint(
                cooper.ConstraintType.EQUALITY, cooper.formulations.QuadraticPenalty,
                penalty_coefficient=cooper.penalty_coefficients.DensePenaltyCoefficient(
                    torch.tensor(0.5, dtype=torch.float64)))

        def compute_cmp_state(self, x, idx):
            return cooper.CMPState(loss=_loss(torch, x), observed_constraints={
                self.g: cooper.ConstraintState(_violation(torch, x, "dense", idx)),
                self.h: cooper.ConstraintState(_violation(torch, x, "indexed", idx),
                                               torch.as_tensor(idx)),
                self.q: cooper.ConstraintState(x.sum() - 0.3)})

    cmp = Problem()
    x_t = torch.nn.Parameter(torch.tensor(X0))
    if extra:
        primal = cooper.optim.ExtraSGD([x_t], lr=LR_PRIMAL, momentum=MOMENTUM)
        dual = cooper.optim.ExtraSGD(list(cmp.dual_parameters()), lr=LR_DUAL, maximize=True)
    else:
        primal = torch.optim.SGD([x_t], lr=LR_PRIMAL, momentum=MOMENTUM)
        dual = torch.optim.SGD(list(cmp.dual_parameters()), lr=LR_DUAL, maximize=True)
    cls = {"simultaneous": cooper.optim.SimultaneousOptimizer,
           "alternating_primal_dual": cooper.optim.AlternatingPrimalDualOptimizer,
           "alternating_dual_primal": cooper.optim.AlternatingDualPrimalOptimizer,
           "extrapolation": cooper.optim.ExtrapolationConstrainedOptimizer}[roll]
    ref_opt = cls(cmp, primal_optimizers=primal, dual_optimizers=dual)
    ref_up = cooper.penalty_coefficients.AdditivePenaltyCoefficientUpdater(
        increment=0.1, violation_tolerance=0.05)

    def compute_cmp_state(x, idx):
        return CMPState(_loss(jnp, x), {
            "g": ConstraintState(_violation(jnp, x, "dense", idx)),
            "h": ConstraintState(_violation(jnp, x, "indexed", idx), idx),
            "q": ConstraintState(jnp.sum(x) - 0.3)})

    cons = {"g": Constraint(ConstraintType.INEQUALITY, lagrangian, DenseMultiplier(2)),
            "h": Constraint(ConstraintType.EQUALITY, augmented_lagrangian, IndexedMultiplier(5),
                            IndexedPenaltyCoefficient(jnp.asarray(PENALTY["indexed"]))),
            "q": Constraint(ConstraintType.EQUALITY, quadratic_penalty,
                            penalty_coefficient=DensePenaltyCoefficient(jnp.asarray(0.5)))}
    solver = ConstrainedOptimizer(
        compute_cmp_state, optax.sgd(LR_PRIMAL, momentum=MOMENTUM),
        C.as_ascent(optax.sgd(LR_DUAL)) if extra else projected_ascent(LR_DUAL), roll=roll)
    up = C.AdditivePenaltyCoefficientUpdater(increment=0.1, violation_tolerance=0.05)

    @jax.jit
    def step(x, cons, state, idx):
        x, cons, state, rollout = solver.step(x, cons, state, idx)
        return x, up.step(cons, rollout.cmp_state.observed_constraints), state, rollout

    x = jnp.asarray(X0)
    state = solver.init(x, cons)
    for t in range(STEPS):
        rollout = ref_opt.roll(compute_cmp_state_kwargs={"x": x_t, "idx": IDX[t]})
        ref_up.step(rollout.cmp_state.observed_constraints)
        x, cons, state, ours = step(x, cons, state, jnp.asarray(IDX[t]))
        np.testing.assert_allclose(np.asarray(x), x_t.detach().numpy(), **TOL)
        for name in ("g", "h"):
            np.testing.assert_allclose(np.asarray(cons[name].multiplier.weight),
                                       getattr(cmp, name).multiplier.weight.detach().numpy()
                                       .reshape(-1), **TOL)
        for name in ("h", "q"):
            np.testing.assert_allclose(np.asarray(cons[name].penalty_coefficient.value),
                                       getattr(cmp, name).penalty_coefficient.value.numpy(),
                                       **TOL)
        np.testing.assert_allclose(float(ours.primal_lagrangian),
                                   float(rollout.primal_lagrangian_store.lagrangian.detach()),
                                   **TOL)
        np.testing.assert_allclose(float(ours.dual_lagrangian),
                                   float(rollout.dual_lagrangian_store.lagrangian.detach()),
                                   **TOL)
    assert float(cons["q"].penalty_coefficient.value) > 0.5


# ----------------------------------------------------------------------------------------------
# Indexed multipliers: the row-wise dual step (O(k)) equals the dense-mask step
# ----------------------------------------------------------------------------------------------
M_ROWS = 7
#: rows sampled per step: repeats, a row given twice as r and r - M (negative indices wrap, as
#: JAX indexing), all rows, and the same row only
ROWS_PER_STEP = [np.array(r) for r in ([1, 4, 1], [0, 6, 3], [2, 2, 2], [5, -2, 0], [6, 5, 4],
                                       [1, 3, 1], [0, 1, 2], [4, -3, 4])]


def _dense_only(tx):
    """The same transformation without its row-wise update: the dense-mask path."""
    return optax.GradientTransformationExtraArgs(tx.init, lambda *a, **k: tx.update(*a, **k))


def _rows_problem():
    rng = np.random.default_rng(23)
    K_rows, k_rows = rng.normal(size=(M_ROWS, 3)), rng.normal(size=M_ROWS) * 0.3
    U_rows = rng.normal(size=(M_ROWS, 3))

    def compute_cmp_state(x, idx, observe_u):
        states = {"k": ConstraintState(jnp.asarray(K_rows)[idx] @ x - jnp.asarray(k_rows)[idx],
                                       constraint_features=idx),
                  "d": ConstraintState(x[:2] - 0.1)}
        if observe_u:  # an indexed constraint observed every other step only
            states["u"] = ConstraintState(jnp.asarray(U_rows)[idx] @ x, constraint_features=idx)
        return CMPState(_loss(jnp, x), states)

    cons = {"k": Constraint(ConstraintType.INEQUALITY, augmented_lagrangian,
                            IndexedMultiplier(init=jnp.linspace(0.0, 0.3, M_ROWS)),
                            IndexedPenaltyCoefficient(jnp.full(M_ROWS, 0.5))),
            "d": Constraint(ConstraintType.EQUALITY, lagrangian, DenseMultiplier(2)),
            "u": Constraint(ConstraintType.EQUALITY, lagrangian, IndexedMultiplier(M_ROWS))}
    return compute_cmp_state, cons


ROWS_DUALS = {
    "projected_ascent": lambda: projected_ascent(0.4),
    "nupi_sgd": lambda: nupi(0.4, Kp=0.7, Ki=1.1, ema_nu=0.3, weight_decay=0.05, maximize=True),
    "nupi_zeros": lambda: nupi(0.4, Kp=1.0, ema_nu=0.5, init_type="zeros", maximize=True),
}


@pytest.mark.parametrize("dual", list(ROWS_DUALS))
@pytest.mark.parametrize("roll", C.ROLLS)
def test_indexed_row_wise_dual_step_equals_the_dense_mask_step(roll, dual, x64):
    """Under ConstrainedOptimizer, projected_ascent and nupi update an indexed multiplier at the
    sampled rows only (repeats summed first); multipliers and the dual state equal the dense-mask
    path's at every step."""
    compute_cmp_state, cons = _rows_problem()
    tx = ROWS_DUALS[dual]()
    assert callable(getattr(tx.update, "update_rows", None))
    runs = []
    for t_x in (tx, _dense_only(tx)):
        solver = ConstrainedOptimizer(compute_cmp_state, optax.sgd(0.1, momentum=0.5), t_x,
                                      roll=roll)
        step = jax.jit(solver.step, static_argnums=(4,))
        x, c = jnp.asarray(X0), cons
        state = solver.init(x, c)
        trajectory = []
        for t, idx in enumerate(ROWS_PER_STEP):
            x, c, state, _ = step(x, c, state, jnp.asarray(idx), t % 2 == 0)
            trajectory.append((x, {n: v.multiplier.weight for n, v in c.items()}, state.dual))
        runs.append(trajectory)
    # the dense path lands on a value v as w + (v - w) (optax.apply_updates), the row-wise path
    # writes v itself: they differ by the rounding of that round trip (a few ulps of w)
    for t, (a, b) in enumerate(zip(*runs)):
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(leaf_a, float), np.asarray(leaf_b, float),
                                       rtol=1e-13, atol=1e-16, err_msg=f"step {t}")
    final = runs[0][-1][1]
    assert not np.allclose(final["u"], 0) and not np.allclose(final["k"],
                                                               np.linspace(0.0, 0.3, M_ROWS))
    # per-entry gains keep the dense path only
    assert not hasattr(nupi(0.1, Kp=jnp.ones(M_ROWS)).update, "update_rows")


def _outputs_of_size(jaxpr, size, out):
    """Primitives (inside every sub-jaxpr) with an output of at least ``size`` elements."""
    from jax.extend import core as jex_core

    for eqn in jaxpr.eqns:
        subs = list(jex_core.jaxprs_in_params(eqn.params))
        for sub in subs:
            _outputs_of_size(sub, size, out)
        if not subs and any(getattr(v.aval, "size", 0) >= size for v in eqn.outvars):
            out.add(eqn.primitive.name)
    return out


@pytest.mark.parametrize("dual", list(ROWS_DUALS))
def test_indexed_row_wise_step_never_computes_over_the_whole_table(dual, x64):
    """With a large indexed multiplier, the only operations of a whole jitted step whose output
    has the table's size are the scatters that write the sampled rows; the dense-mask path
    computes over the table. (XLA may add copies of the table when compiling: not checked.)"""
    m = 10_000

    def compute_cmp_state(x, idx):
        return CMPState(_loss(jnp, x), {
            "k": ConstraintState(x[0] * jnp.ones(idx.shape[0]) - 0.01 * idx, idx),
            "d": ConstraintState(x[:2] - 0.1)})

    cons = {"k": Constraint(ConstraintType.INEQUALITY, multiplier=IndexedMultiplier(m)),
            "d": Constraint(ConstraintType.EQUALITY, multiplier=DenseMultiplier(2))}
    idx = jnp.array([3, 17, 3, m - 1])
    found = []
    for tx in (ROWS_DUALS[dual](), _dense_only(ROWS_DUALS[dual]())):
        solver = ConstrainedOptimizer(compute_cmp_state, optax.sgd(0.1), tx)
        x = jnp.asarray(X0)
        jaxpr = jax.make_jaxpr(solver.step)(x, cons, solver.init(x, cons), idx)
        found.append(_outputs_of_size(jaxpr.jaxpr, m, set()))
    assert found[0] == {"scatter"}
    assert found[1] - {"scatter"}  # the dense path: elementwise passes over all m rows
