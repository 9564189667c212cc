"""Parity of the two faces of constrained learning: the same problems built once with
``uniopt.adapters.torch.constrained`` (Cooper's API, torch) and once with
``uniopt.adapters.jax.constrained`` (functional, JAX) give the same trajectories in float64.

Every roll (simultaneous, alternating primal-dual with ``compute_violations``, alternating
dual-primal, extrapolation with ExtraSGD / optax SGD, unconstrained with quadratic penalties)
x formulation (Lagrangian; augmented Lagrangian with multiplicative or additive penalty
updates) x dual optimizer (projected SGD ascent; nuPI with the SGD and the zeros
initialisation) runs 12 steps on one problem with several constraints: a dense inequality
seen through a differentiable proxy (``violation``) with a separate ``strict_violation``, a
0-d dense equality, an indexed inequality sampled with repeated rows, and a quadratic-penalty
equality with a scalar coefficient. At every step the parameters, every multiplier, every
penalty coefficient, the loss and both Lagrangians agree to 1e-12 relative.

Also: the augmented Lagrangian with zero penalty coefficients is the Lagrangian limit on both
faces (equal to each other and to the Lagrangian formulation, never NaN), and a float64
``init`` keeps its dtype on both faces.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
import torch

import uniopt.adapters.torch.constrained as tc
from uniopt.adapters.jax import constrained as jc

F64 = torch.float64
RTOL, ATOL = 1e-12, 1e-14
STEPS = 12
LR_PRIMAL, MOMENTUM, LR_DUAL = 0.1, 0.5, 0.6


# ----------------------------------------------------------------------------------------------
# The problem, x in R^3: f(x) = sum((x - a)^2) + 0.1 sum(x^4) subject to
#   g: G x - gr <= 0 (2 rows, dense; the primal side sees the proxy G x - gr + 0.1 sin(x[:2]))
#   h: b.x - 0.3 = 0 (a 0-d violation, dense)
#   k: K x - kr <= 0 (5 rows, indexed; 3 rows sampled a step, some steps with a repeated row)
#   q: sum(x) - 0.4 = 0 (quadratic penalty, scalar coefficient)
# ----------------------------------------------------------------------------------------------
A = np.array([1.5, -0.5, 1.0])
X0 = np.array([0.2, 0.1, -0.3])
G, GR = np.array([[1.0, 1.0, 0.5], [-0.5, 1.0, 1.0]]), np.array([0.5, -0.2])
B = np.array([0.4, -1.0, 0.7])
K = np.array([[1.0, 1.0, 0.5], [-0.5, 1.0, 1.0], [0.3, -0.2, 1.0], [1.0, 0.0, 0.0],
              [0.0, 0.5, -1.0]])
KR = np.array([0.5, -0.2, 0.1, 0.8, -0.1])
_rng = np.random.default_rng(3)
IDX = [np.array(_rng.choice(5, 3, replace=False)) for _ in range(STEPS)]
for _t, _rows in ((1, [1, 3, 1]), (4, [2, 2, 2]), (8, [0, 4, 0])):
    IDX[_t] = np.array(_rows)  # repeated rows: their dual gradients add up
INIT = {"g": np.array([0.2, 0.0]), "h": np.array([-0.1]), "k": np.array([0.1, 0.0, 0.3, 0.0, 0.2])}
PENALTY = {"g": np.array([0.7, 1.3]), "h": np.array(0.9), "k": np.array([0.7, 1.3, 0.4, 1.0, 2.0]),
           "q": np.array(0.5)}
UPDATERS = {"mult": ("MultiplicativePenaltyCoefficientUpdater",
                     dict(growth_factor=1.3, violation_tolerance=0.05)),
            "add": ("AdditivePenaltyCoefficientUpdater",
                    dict(increment=0.2, violation_tolerance=0.05))}
#: formulation of g, h, k -> the penalty updater (it always updates q's coefficient too)
FORMULATIONS = {"lagrangian": "mult", "al_mult": "mult", "al_add": "add"}
NUPI = {"nupi_sgd": dict(Kp=0.5, Ki=1.0, ema_nu=0.3, weight_decay=0.02, init_type="SGD"),
        "nupi_zeros": dict(Kp=1.0, Ki=0.5, ema_nu=-0.2, weight_decay=0.0, init_type="ZEROS")}
ROLL_CLASSES = {"simultaneous": "SimultaneousOptimizer",
                "alternating_primal_dual": "AlternatingPrimalDualOptimizer",
                "alternating_dual_primal": "AlternatingDualPrimalOptimizer",
                "extrapolation": "ExtrapolationConstrainedOptimizer"}


def _measure(xp, x, idx):
    """``(loss, {name: (violation, strict_violation or None, features or None)})``."""
    t = (lambda a: torch.as_tensor(a, dtype=F64)) if xp is torch else jnp.asarray
    strict_g = t(G) @ x - t(GR)
    proxy_g = strict_g + 0.1 * xp.sin(x[:2])
    if xp is torch:
        strict_g = strict_g.detach()
        rows = torch.as_tensor(idx, dtype=torch.long)
    else:
        strict_g = jax.lax.stop_gradient(strict_g)
        rows = jnp.asarray(idx)
    loss = ((x - t(A)) ** 2).sum() + 0.1 * (x ** 4).sum()
    return loss, {"g": (proxy_g, strict_g, None), "h": (t(B) @ x - 0.3, None, None),
                  "k": (t(K)[rows] @ x - t(KR)[rows], None, rows),
                  "q": (x.sum() - 0.4, None, None)}


# ---- the torch face ---------------------------------------------------------------------------
def _torch_problem(formulation):
    al = formulation.startswith("al")
    form = tc.formulations.AugmentedLagrangian if al else tc.formulations.Lagrangian
    quadratic = tc.formulations.QuadraticPenalty
    pens = tc.penalty_coefficients

    def pen(cls, name):
        return getattr(pens, cls)(torch.tensor(PENALTY[name], dtype=F64)) if al else None

    class Problem(tc.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            if formulation == "unconstrained":
                self.g = tc.Constraint(tc.ConstraintType.INEQUALITY, quadratic,
                                       penalty_coefficient=pens.DensePenaltyCoefficient(
                                           torch.tensor(PENALTY["g"])))
                self.h = tc.Constraint(tc.ConstraintType.EQUALITY, quadratic,
                                       penalty_coefficient=pens.DensePenaltyCoefficient(
                                           torch.tensor(PENALTY["h"])))
                self.k = tc.Constraint(tc.ConstraintType.INEQUALITY, quadratic,
                                       penalty_coefficient=pens.IndexedPenaltyCoefficient(
                                           torch.tensor(PENALTY["k"])))
            else:
                self.g = tc.Constraint(tc.ConstraintType.INEQUALITY, form,
                                       tc.multipliers.DenseMultiplier(init=torch.tensor(INIT["g"])),
                                       pen("DensePenaltyCoefficient", "g"))
                self.h = tc.Constraint(tc.ConstraintType.EQUALITY, form,
                                       tc.multipliers.DenseMultiplier(init=torch.tensor(INIT["h"])),
                                       pen("DensePenaltyCoefficient", "h"))
                self.k = tc.Constraint(tc.ConstraintType.INEQUALITY, form,
                                       tc.multipliers.IndexedMultiplier(
                                           init=torch.tensor(INIT["k"])),
                                       pen("IndexedPenaltyCoefficient", "k"))
            self.q = tc.Constraint(tc.ConstraintType.EQUALITY, tc.formulations.QuadraticPenalty,
                                   penalty_coefficient=pens.DensePenaltyCoefficient(
                                       torch.tensor(PENALTY["q"])))

        def _states(self, x, idx):
            loss, measured = _measure(torch, x, idx)
            states = {getattr(self, name): tc.ConstraintState(v, constraint_features=f,
                                                               strict_violation=s)
                      for name, (v, s, f) in measured.items()}
            return loss, states

        def compute_cmp_state(self, x, idx):
            loss, states = self._states(x, idx)
            return tc.CMPState(loss=loss, observed_constraints=states)

        def compute_violations(self, x, idx):
            return tc.CMPState(observed_constraints=self._states(x, idx)[1])

    return Problem()


def torch_trajectory(roll, formulation, dual, steps=STEPS, penalty_override=None):
    cmp = _torch_problem(formulation)
    if penalty_override is not None:
        for name, value in penalty_override.items():
            getattr(cmp, name).penalty_coefficient.value = torch.tensor(value, dtype=F64)
    x = torch.nn.Parameter(torch.tensor(X0))
    extra = roll == "extrapolation"
    primal = (tc.optim.ExtraSGD if extra else torch.optim.SGD)([x], lr=LR_PRIMAL, momentum=MOMENTUM)
    if formulation == "unconstrained":
        opt = tc.optim.UnconstrainedOptimizer(cmp, primal_optimizers=primal)
    else:
        duals = list(cmp.dual_parameters())
        if dual == "sgd":
            dual_opt = (tc.optim.ExtraSGD if extra else torch.optim.SGD)(duals, lr=LR_DUAL,
                                                                        maximize=True)
        else:
            kw = dict(NUPI[dual])
            kw["init_type"] = getattr(tc.optim.nuPIInitType, kw["init_type"])
            dual_opt = tc.optim.nuPI(duals, lr=LR_DUAL, maximize=True, **kw)
        opt = getattr(tc.optim, ROLL_CLASSES[roll])(cmp, primal_optimizers=primal,
                                                    dual_optimizers=dual_opt)
    updater = None
    if penalty_override is None:
        cls, kw = UPDATERS[FORMULATIONS.get(formulation, dual)]
        updater = getattr(tc.penalty_coefficients, cls)(**kw)
    out = []
    for t in range(steps):
        kwargs = {"x": x, "idx": IDX[t]}
        if roll == "alternating_primal_dual":
            rollout = opt.roll(compute_cmp_state_kwargs=kwargs, compute_violations_kwargs=kwargs)
        else:
            rollout = opt.roll(compute_cmp_state_kwargs=kwargs)
        if updater is not None:
            updater.step(rollout.cmp_state.observed_constraints)
        dual_store = rollout.dual_lagrangian_store
        out.append({
            "x": x.detach().numpy().copy(),
            "loss": float(rollout.loss.detach()),
            "primal_lagrangian": float(rollout.primal_lagrangian_store.lagrangian.detach()),
            "dual_lagrangian": (None if dual_store is None or dual_store.lagrangian is None
                                else float(dual_store.lagrangian.detach())),
            **{f"multiplier_{n}": getattr(cmp, n).multiplier.weight.detach().numpy()
               .reshape(-1).copy() for n in "ghkq" if getattr(cmp, n).multiplier is not None},
            **{f"penalty_{n}": getattr(cmp, n).penalty_coefficient.value.numpy().copy()
               for n in "ghkq" if getattr(cmp, n).penalty_coefficient is not None},
        })
    dtypes = {p.dtype for p in cmp.dual_parameters()}
    dtypes |= {getattr(cmp, n).penalty_coefficient.value.dtype
               for n in "ghkq" if getattr(cmp, n).penalty_coefficient is not None}
    return out, dtypes


# ---- the JAX face -----------------------------------------------------------------------------
def _jax_constraints(formulation):
    al = formulation.startswith("al")
    form = jc.augmented_lagrangian if al else jc.lagrangian

    def pen(cls, name):
        return getattr(jc, cls)(jnp.asarray(PENALTY[name])) if al else None

    if formulation == "unconstrained":
        cons = {"g": jc.Constraint(jc.ConstraintType.INEQUALITY, jc.quadratic_penalty,
                                   penalty_coefficient=jc.DensePenaltyCoefficient(
                                       jnp.asarray(PENALTY["g"]))),
                "h": jc.Constraint(jc.ConstraintType.EQUALITY, jc.quadratic_penalty,
                                   penalty_coefficient=jc.DensePenaltyCoefficient(
                                       jnp.asarray(PENALTY["h"]))),
                "k": jc.Constraint(jc.ConstraintType.INEQUALITY, jc.quadratic_penalty,
                                   penalty_coefficient=jc.IndexedPenaltyCoefficient(
                                       jnp.asarray(PENALTY["k"])))}
    else:
        cons = {"g": jc.Constraint(jc.ConstraintType.INEQUALITY, form,
                                   jc.DenseMultiplier(init=jnp.asarray(INIT["g"])),
                                   pen("DensePenaltyCoefficient", "g")),
                "h": jc.Constraint(jc.ConstraintType.EQUALITY, form,
                                   jc.DenseMultiplier(init=jnp.asarray(INIT["h"])),
                                   pen("DensePenaltyCoefficient", "h")),
                "k": jc.Constraint(jc.ConstraintType.INEQUALITY, form,
                                   jc.IndexedMultiplier(init=jnp.asarray(INIT["k"])),
                                   pen("IndexedPenaltyCoefficient", "k"))}
    cons["q"] = jc.Constraint(jc.ConstraintType.EQUALITY, jc.quadratic_penalty,
                              penalty_coefficient=jc.DensePenaltyCoefficient(
                                  jnp.asarray(PENALTY["q"])))
    return cons


def _jax_states(x, idx):
    loss, measured = _measure(jnp, x, idx)
    return loss, {name: jc.ConstraintState(v, constraint_features=f, strict_violation=s)
                  for name, (v, s, f) in measured.items()}


def jax_trajectory(roll, formulation, dual, steps=STEPS, penalty_override=None):
    cons = _jax_constraints(formulation)
    if penalty_override is not None:
        for name, value in penalty_override.items():
            c = cons[name]
            cons[name] = c.replace(penalty_coefficient=c.penalty_coefficient.replace(
                value=jnp.asarray(value)))
    if formulation == "unconstrained":
        dual_tx = None
    elif dual == "sgd":
        dual_tx = jc.projected_ascent(LR_DUAL)
    else:
        dual_tx = jc.nupi(LR_DUAL, maximize=True, **NUPI[dual])
    solver = jc.ConstrainedOptimizer(
        lambda x, idx: jc.CMPState(*_jax_states(x, idx)),
        optax.sgd(LR_PRIMAL, momentum=MOMENTUM), dual_tx,
        roll="simultaneous" if formulation == "unconstrained" else roll,
        compute_violations=lambda x, idx: jc.CMPState(None, _jax_states(x, idx)[1]))
    updater = None
    if penalty_override is None:
        cls, kw = UPDATERS[FORMULATIONS.get(formulation, dual)]
        updater = getattr(jc, cls)(**kw)

    @jax.jit
    def step(x, cons, state, idx):
        x, cons, state, rollout = solver.step(x, cons, state, idx)
        if updater is not None:
            cons = updater.step(cons, rollout.cmp_state.observed_constraints)
        return x, cons, state, rollout

    x = jnp.asarray(X0)
    state = solver.init(x, cons)
    out = []
    for t in range(steps):
        x, cons, state, rollout = step(x, cons, state, jnp.asarray(IDX[t]))
        out.append({
            "x": np.asarray(x),
            "loss": float(rollout.loss),
            "primal_lagrangian": float(rollout.primal_lagrangian),
            "dual_lagrangian": (None if rollout.dual_lagrangian is None
                                else float(rollout.dual_lagrangian)),
            **{f"multiplier_{n}": np.asarray(c.multiplier.weight)
               for n, c in cons.items() if c.multiplier is not None},
            **{f"penalty_{n}": np.asarray(c.penalty_coefficient.value)
               for n, c in cons.items() if c.penalty_coefficient is not None},
        })
    dtypes = {c.multiplier.weight.dtype for c in cons.values() if c.multiplier is not None}
    dtypes |= {c.penalty_coefficient.value.dtype for c in cons.values()
               if c.penalty_coefficient is not None}
    return out, dtypes


def assert_same_trajectory(ours_jax, ours_torch):
    assert len(ours_jax) == len(ours_torch) == STEPS
    for t, (j, r) in enumerate(zip(ours_jax, ours_torch)):
        assert set(j) == set(r), t
        for key, value in r.items():
            if value is None:
                assert j[key] is None, (t, key)
                continue
            np.testing.assert_allclose(j[key], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"step {t}: {key}")
            assert np.all(np.isfinite(value)), (t, key)


CASES = [(roll, formulation, dual)
         for roll in ROLL_CLASSES for formulation in FORMULATIONS
         for dual in ("sgd", "nupi_sgd", "nupi_zeros")
         if roll != "extrapolation" or dual == "sgd"]  # torch's nuPI has no extrapolation()
CASES += [("unconstrained", "unconstrained", updater) for updater in ("mult", "add")]


@pytest.mark.filterwarnings("ignore:nuPI optimizer instantiated with negative EMA")
@pytest.mark.parametrize("roll, formulation, dual", CASES,
                         ids=["-".join(c) for c in CASES])
def test_torch_and_jax_faces_give_the_same_trajectory(roll, formulation, dual, x64):
    ref, torch_dtypes = torch_trajectory(roll, formulation, dual)
    ours, jax_dtypes = jax_trajectory(roll, formulation, dual)
    assert_same_trajectory(ours, ref)
    # both faces keep the float64 of the inits (multipliers and penalty coefficients)
    assert torch_dtypes == {F64}
    assert jax_dtypes == {jnp.dtype(jnp.float64)}
    # the problem is not trivial: the penalty coefficients grow, multipliers move and the
    # inequality projections bind
    assert not np.allclose(ref[-1]["penalty_q"], PENALTY["q"])
    if formulation.startswith("al") or formulation == "unconstrained":
        assert any(not np.allclose(s[f"penalty_{n}"], PENALTY[n]) for s in ref for n in "ghk")
    if formulation != "unconstrained":
        mk = np.array([s["multiplier_k"] for s in ref])
        assert (mk == 0).any() and mk.max() > INIT["k"].max()
        assert not np.allclose(ref[-1]["multiplier_h"], INIT["h"])
        # the proxy matters: the dual side saw the strict violation, the primal the proxy
        assert ref[0]["dual_lagrangian"] is not None


def test_repeated_rows_are_summed_on_both_faces(x64):
    """Steps 1, 4 and 8 sample a row more than once: the SGD dual step of the indexed
    multiplier adds its violation once per occurrence, on both faces (checked against the
    closed form lambda_r <- max(lambda_r + lr * count_r * k_r(x_t), 0) from the torch face's x_t;
    unsampled rows unchanged)."""
    ref, _ = torch_trajectory("simultaneous", "lagrangian", "sgd")
    ours, _ = jax_trajectory("simultaneous", "lagrangian", "sgd")
    assert_same_trajectory(ours, ref)
    moved_by_a_repeat = False
    for t in (1, 4, 8):
        x_t, before = ref[t - 1]["x"], ref[t - 1]["multiplier_k"]
        rows, counts = np.unique(IDX[t], return_counts=True)
        expected = before.copy()
        for r, n in zip(rows, counts):
            expected[r] = max(before[r] + LR_DUAL * n * (K[r] @ x_t - KR[r]), 0.0)
            once = max(before[r] + LR_DUAL * (K[r] @ x_t - KR[r]), 0.0)
            moved_by_a_repeat |= bool(n > 1 and abs(once - expected[r]) > 1e-3)
        for traj in (ref, ours):
            np.testing.assert_allclose(traj[t]["multiplier_k"], expected, rtol=1e-13, atol=1e-15)
    assert moved_by_a_repeat  # a row counted once would have given another value


def test_augmented_lagrangian_zero_penalty_is_the_lagrangian_limit_on_both_faces(x64):
    """AL with every penalty coefficient 0 (no updates): both faces equal each other and the
    Lagrangian formulation's trajectory, with no NaN (Cooper's term divides by zero)."""
    zeros = {"g": np.zeros(2), "h": np.array(0.0), "k": np.zeros(5), "q": np.array(0.0)}
    for roll in ("simultaneous", "alternating_dual_primal"):
        ref, _ = torch_trajectory(roll, "al_mult", "sgd", penalty_override=zeros)
        ours, _ = jax_trajectory(roll, "al_mult", "sgd", penalty_override=zeros)
        assert_same_trajectory(ours, ref)
        lag_ref, _ = torch_trajectory(roll, "lagrangian", "sgd", penalty_override={"q": 0.0})
        lag_ours, _ = jax_trajectory(roll, "lagrangian", "sgd", penalty_override={"q": 0.0})
        for traj in (ref, ours):
            stripped = [{k: v for k, v in s.items() if not k.startswith("penalty_")}
                        for s in traj]
            for lag in (lag_ref, lag_ours):
                assert_same_trajectory(
                    stripped, [{k: v for k, v in s.items() if not k.startswith("penalty_")}
                               for s in lag])
    # a mix of zero and positive coefficients: still the same on both faces, finite
    mixed = {"g": np.array([0.0, 1.3]), "h": np.array(0.0),
             "k": np.array([0.7, 0.0, 0.4, 0.0, 2.0]), "q": np.array(0.5)}
    ref, _ = torch_trajectory("simultaneous", "al_mult", "nupi_sgd", penalty_override=mixed)
    ours, _ = jax_trajectory("simultaneous", "al_mult", "nupi_sgd", penalty_override=mixed)
    assert_same_trajectory(ours, ref)


def test_float64_init_keeps_its_dtype_on_both_faces(x64):
    init = np.array([0.25, 0.5])
    for cls in ("DenseMultiplier", "IndexedMultiplier"):
        t = getattr(tc.multipliers, cls)(init=torch.tensor(init, dtype=F64))
        j = getattr(jc, cls)(init=jnp.asarray(init, dtype=jnp.float64))
        assert t.weight.dtype == F64 and j.weight.dtype == jnp.float64
        np.testing.assert_array_equal(t.weight.detach().numpy().reshape(-1), np.asarray(j.weight))
        # an explicit dtype wins on both faces
        t32 = getattr(tc.multipliers, cls)(init=torch.tensor(init, dtype=F64), dtype=torch.float32)
        j32 = getattr(jc, cls)(init=jnp.asarray(init, dtype=jnp.float64), dtype=jnp.float32)
        assert t32.weight.dtype == torch.float32 and j32.weight.dtype == jnp.float32
    for cls in ("DensePenaltyCoefficient", "IndexedPenaltyCoefficient"):
        t = getattr(tc.penalty_coefficients, cls)(torch.tensor(init, dtype=F64))
        assert t.value.dtype == F64
        assert getattr(jc, cls)(jnp.asarray(init, dtype=jnp.float64)).value.dtype == jnp.float64


@pytest.mark.parametrize("ctype", ["INEQUALITY", "EQUALITY"])
def test_formulation_terms_agree_between_faces(ctype, x64):
    """The primal terms of the augmented Lagrangian and of the quadratic penalty (one rule each
    in uniopt.rules.constrained) and their gradients in the violation agree between the faces,
    zero penalty coefficients and inactive entries included."""
    rng = np.random.default_rng(17)
    lam = rng.uniform(0, 2, 8) * (rng.uniform(size=8) > 0.3)
    c = rng.uniform(0, 3, 8) * (rng.uniform(size=8) > 0.3)
    v = rng.normal(size=8)
    t_type, j_type = getattr(tc.ConstraintType, ctype), getattr(jc.ConstraintType, ctype)

    def torch_terms(vv):
        al = tc.formulations.utils.compute_primal_quadratic_augmented_contribution(
            torch.tensor(lam), torch.tensor(c), vv, t_type)
        return al, tc.formulations.utils.compute_quadratic_penalty(torch.tensor(c), vv, t_type)

    vt = torch.tensor(v, requires_grad=True)
    t_al, t_qp = torch_terms(vt)
    t_al_grad = torch.autograd.grad(t_al, vt)[0].numpy()
    t_qp_grad = torch.autograd.grad(torch_terms(vt)[1], vt)[0].numpy()
    mult = jc.DenseMultiplier(init=jnp.asarray(lam), constraint_type=j_type)
    pen = jc.DensePenaltyCoefficient(jnp.asarray(c))

    def jax_al(vv):
        return jc.augmented_lagrangian(jc.ConstraintState(vv), mult, pen, constraint_type=j_type)[0]

    def jax_qp(vv):
        return jc.quadratic_penalty(jc.ConstraintState(vv), None, pen, constraint_type=j_type)[0]

    for value, grad, fn in ((t_al, t_al_grad, jax_al), (t_qp, t_qp_grad, jax_qp)):
        j_value, j_grad = jax.value_and_grad(fn)(jnp.asarray(v))
        np.testing.assert_allclose(float(j_value), float(value.detach()), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(j_grad), grad, rtol=1e-14, atol=1e-15)
        assert np.isfinite(float(value.detach()))
    # an independent oracle: the closed forms
    if ctype == "INEQUALITY":
        expected = sum(lv * g + cv * g * g / 2 if lv + cv * g > 0 else
                       (-lv * lv / (2 * cv) if cv > 0 else lv * g)
                       for lv, cv, g in zip(lam, c, v))
        expected_grad = np.where(c > 0, np.maximum(lam + c * v, 0), lam)
        qp = 0.5 * np.sum(c * np.maximum(v, 0) ** 2)
    else:
        expected, expected_grad = lam @ v + 0.5 * np.sum(c * v * v), lam + c * v
        qp = 0.5 * np.sum(c * v * v)
    np.testing.assert_allclose(float(t_al.detach()), expected, rtol=1e-13)
    np.testing.assert_allclose(t_al_grad, expected_grad, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(float(t_qp.detach()), qp, rtol=1e-13)


#: the same bad input on both faces: ``(torch call, JAX call)``; both must raise the same
#: exception class with the same message (docs/deviations.md, "Validation and error messages")
SAME_ERRORS = {
    "num_constraints 0": (lambda: tc.multipliers.DenseMultiplier(0), lambda: jc.DenseMultiplier(0)),
    "num_constraints 2.5": (lambda: tc.multipliers.DenseMultiplier(2.5),
                            lambda: jc.DenseMultiplier(2.5)),
    "no size": (lambda: tc.multipliers.DenseMultiplier(), lambda: jc.DenseMultiplier()),
    "init nan": (lambda: tc.multipliers.DenseMultiplier(init=torch.tensor([1.0, np.nan])),
                 lambda: jc.DenseMultiplier(init=jnp.array([1.0, np.nan]))),
    "indexed init inf": (lambda: tc.multipliers.IndexedMultiplier(init=torch.tensor([np.inf])),
                         lambda: jc.IndexedMultiplier(init=jnp.array([np.inf]))),
    "missing multiplier": (lambda: tc.Constraint(tc.ConstraintType.EQUALITY),
                           lambda: jc.Constraint(jc.ConstraintType.EQUALITY)),
    "missing penalty": (
        lambda: tc.Constraint(tc.ConstraintType.EQUALITY, tc.formulations.AugmentedLagrangian,
                              tc.multipliers.DenseMultiplier(1)),
        lambda: jc.Constraint(jc.ConstraintType.EQUALITY, jc.augmented_lagrangian,
                              jc.DenseMultiplier(1))),
    "unexpected multiplier": (
        lambda: tc.Constraint(tc.ConstraintType.EQUALITY, tc.formulations.QuadraticPenalty,
                              tc.multipliers.DenseMultiplier(1),
                              tc.penalty_coefficients.DensePenaltyCoefficient(torch.tensor(1.0))),
        lambda: jc.Constraint(jc.ConstraintType.EQUALITY, jc.quadratic_penalty,
                              jc.DenseMultiplier(1), jc.DensePenaltyCoefficient(1.0))),
    "penalty not a PenaltyCoefficient": (
        lambda: tc.Constraint(tc.ConstraintType.EQUALITY, tc.formulations.QuadraticPenalty,
                              penalty_coefficient=1.0),
        lambda: jc.Constraint(jc.ConstraintType.EQUALITY, jc.quadratic_penalty,
                              penalty_coefficient=1.0)),
    "strict features without strict violation": (
        lambda: tc.ConstraintState(torch.zeros(2), strict_constraint_features=torch.tensor([0])),
        lambda: jc.ConstraintState(jnp.zeros(2), strict_constraint_features=jnp.array([0]))),
    "contributes flag 1": (
        lambda: tc.ConstraintState(torch.zeros(2), contributes_to_dual_update=1),
        lambda: jc.ConstraintState(jnp.zeros(2), contributes_to_dual_update=1)),
    "growth_factor 0": (
        lambda: tc.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor=0.0),
        lambda: jc.MultiplicativePenaltyCoefficientUpdater(growth_factor=0.0)),
    "growth_factor '2'": (
        lambda: tc.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(growth_factor="2"),
        lambda: jc.MultiplicativePenaltyCoefficientUpdater(growth_factor="2")),
    "increment -1": (
        lambda: tc.penalty_coefficients.AdditivePenaltyCoefficientUpdater(increment=-1.0),
        lambda: jc.AdditivePenaltyCoefficientUpdater(increment=-1.0)),
    "violation_tolerance -1": (
        lambda: tc.penalty_coefficients.AdditivePenaltyCoefficientUpdater(violation_tolerance=-1.0),
        lambda: jc.AdditivePenaltyCoefficientUpdater(violation_tolerance=-1.0)),
    "violation_tolerance inf": (
        lambda: tc.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(
            violation_tolerance=np.inf),
        lambda: jc.MultiplicativePenaltyCoefficientUpdater(violation_tolerance=np.inf)),
    "has_restart 1": (
        lambda: tc.penalty_coefficients.AdditivePenaltyCoefficientUpdater(has_restart=1),
        lambda: jc.AdditivePenaltyCoefficientUpdater(has_restart=1)),
    "nupi lr -0.1": (lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=-0.1),
                     lambda: jc.nupi(-0.1)),
    "nupi weight_decay -1": (
        lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay=-1.0),
        lambda: jc.nupi(0.1, weight_decay=-1.0)),
    "nupi ema_nu 1": (lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=0.1,
                                            ema_nu=1.0),
                      lambda: jc.nupi(0.1, ema_nu=1.0)),
    "nupi Kp inf": (lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=0.1,
                                          Kp=np.inf),
                    lambda: jc.nupi(0.1, Kp=np.inf)),
    "nupi Ki '1'": (lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=0.1, Ki="1"),
                    lambda: jc.nupi(0.1, Ki="1")),
    "nupi init_type adam": (lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=0.1,
                                                  init_type="adam"),
                            lambda: jc.nupi(0.1, init_type="adam")),
    "nupi maximize 1": (lambda: tc.optim.nuPI([torch.nn.Parameter(torch.zeros(1))], lr=0.1,
                                              maximize=1),
                        lambda: jc.nupi(0.1, maximize=1)),
    "dual sgd lr -1": (lambda: torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=-1.0,
                                               maximize=True),
                       lambda: jc.projected_ascent(-1.0)),
}


@pytest.mark.parametrize("name", list(SAME_ERRORS))
def test_same_bad_input_same_error_on_both_faces(name, x64):
    errors = []
    for make in SAME_ERRORS[name]:
        with pytest.raises((ValueError, TypeError)) as info:
            make()
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]
    assert errors[0][1].startswith(("Invalid ", "At least one", "Lagrangian", "Augmented",
                                    "Received", "`strict_violation`"))


def test_penalty_coefficient_nonfinite_init_same_message_template(x64):
    """A non-finite penalty coefficient init: the same ValueError and message on both faces (up
    to each framework's repr of the value)."""
    for make in (
            lambda: tc.penalty_coefficients.DensePenaltyCoefficient(torch.tensor([1.0, np.nan])),
            lambda: jc.DensePenaltyCoefficient(jnp.array([1.0, np.nan]))):
        with pytest.raises(ValueError, match=r"^Invalid init: .*nan.* \(penalty coefficients must "
                                             r"be finite and non-negative\)$"):
            make()
