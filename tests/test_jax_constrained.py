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


@pytest.fixture
def x64():
    """Enable float64 in JAX for one test (restored afterwards)."""
    with jax.enable_x64(True):
        yield


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
            dual_opt = cooper.optim.nuPI(duals, lr=LR_DUAL, maximize=True, **kw)
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
