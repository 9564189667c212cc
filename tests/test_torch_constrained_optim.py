"""uniopt.adapters.torch.constrained.optim: Cooper's constrained optimizers (cooper-optim 1.0.1).

The optimizers talk to the problem only through duck-typed calls, so every test builds its
problem with a "problem-side module" (the ``pm`` fixture: cooper-optim's own CMP, constraint,
multiplier and formulation classes for now; uniopt's ``uniopt.adapters.torch.constrained`` is
the second value once both are merged). Oracles: hand-computed SGD rolls (plain tensor
arithmetic, no autograd, no cooper), cooper-optim's optimizers on their own copy of the same
problem (float64, 12 rolls, 1e-12), closed-form optima, uniopt's iALM (penalty 0, uncapped step)
and qhoptim for uniopt's QHM/QHAdam on either side."""

from __future__ import annotations

import copy
import importlib
import io
import math
import pickle
import warnings

import pytest

import torch

import cooper  # the reference (test-only dependency): a missing one fails, never skips

from uniopt.adapters.torch import QHM, QHAdam  # noqa: E402
from uniopt.adapters.torch.constrained import optim as uoptim  # noqa: E402
from uniopt.adapters.torch.dual_optim import iALM  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)
PROBLEM_MODULES = ["cooper", "uniopt.adapters.torch.constrained"]


@pytest.fixture(params=PROBLEM_MODULES)
def pm(request):
    """The module whose CMP/Constraint/multiplier/formulation classes build the problem."""
    return importlib.import_module(request.param)


# ---------------------------------------------------------------------------------------------
# The problem: min ||x - a||^2  s.t.  A x - b <= 0 (3 rows),  C x - d = 0 (2 rows),  x in R^4.
# With ``surrogate`` the primal side sees the proxy rows A_s, C_s (differentiable
# ``violation``) and the dual side the true rows (``strict_violation``). Indexed multipliers
# observe a step-dependent subset of rows.
# ---------------------------------------------------------------------------------------------
N = 4
DATA = {
    "a": torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=F64),
    "ineq": (torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.0, -1.0, 2.0, 0.0], [-1.0, 0.0, 0.0, -2.0]], dtype=F64),
             torch.tensor([0.5, 1.0, 3.0], dtype=F64)),   # row 2 is strictly satisfied near a
    "eq": (torch.tensor([[0.5, 0.0, -1.0, 1.0], [1.0, 2.0, 0.0, 0.0]], dtype=F64),
           torch.tensor([0.2, -0.4], dtype=F64)),
}
SURROGATE_NOISE = {"ineq": torch.tensor([[0.1, -0.05, 0.0, 0.02], [0.0, 0.03, -0.1, 0.05], [0.04, 0.0, 0.1, 0.0]],
                                        dtype=F64),
                   "eq": torch.tensor([[-0.02, 0.05, 0.0, 0.1], [0.0, -0.1, 0.03, 0.0]], dtype=F64)}
FEATURES = {"ineq": [[0, 2], [1, 2], [0, 1, 2]], "eq": [[1], [0, 1], [0]]}  # per step (cycled)
INIT = {"ineq": torch.tensor([0.3, 0.0, 0.1], dtype=F64), "eq": torch.tensor([-0.2, 0.4], dtype=F64)}
PENALTY = {"ineq": torch.tensor([0.5, 1.5, 2.0], dtype=F64), "eq": torch.tensor([0.7, 1.3], dtype=F64)}
X0 = torch.tensor([0.2, 0.1, -0.3, 0.5], dtype=F64)


def ctype(pm, kind):
    return pm.ConstraintType.INEQUALITY if kind == "ineq" else pm.ConstraintType.EQUALITY


def features(kind, step):
    return torch.tensor(FEATURES[kind][step % len(FEATURES[kind])], dtype=torch.long)


def build_cmp(pm, formulation, *, kinds=("ineq", "eq"), indexed=False, surrogate=False,
              has_compute_violations=False):
    """A CMP of the module ``pm``; ``formulation`` is the formulation's class name."""
    form = getattr(pm.formulations, formulation)
    mult_cls = pm.multipliers.IndexedMultiplier if indexed else pm.multipliers.DenseMultiplier
    pen_cls = (pm.penalty_coefficients.IndexedPenaltyCoefficient if indexed
               else pm.penalty_coefficients.DensePenaltyCoefficient)

    class CMP(pm.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            for kind in kinds:
                multiplier = penalty = None
                if form.expects_multiplier:
                    multiplier = mult_cls(num_constraints=len(INIT[kind]), dtype=F64)
                    with torch.no_grad():
                        multiplier.weight.copy_(INIT[kind].view_as(multiplier.weight))
                if form.expects_penalty_coefficient:
                    penalty = pen_cls(init=PENALTY[kind].clone())
                setattr(self, kind, pm.Constraint(constraint_type=ctype(pm, kind), formulation_type=form,
                                                  multiplier=multiplier, penalty_coefficient=penalty))

        def _observed(self, x, step):
            observed = {}
            for kind in kinds:
                lhs, rhs = DATA[kind]
                strict = lhs @ x - rhs
                viol = (lhs + SURROGATE_NOISE[kind]) @ x - rhs if surrogate else strict
                if indexed:
                    idx = features(kind, step)
                    state = pm.ConstraintState(violation=viol[idx], constraint_features=idx,
                                               strict_violation=strict[idx].detach(), strict_constraint_features=idx)
                else:
                    state = pm.ConstraintState(violation=viol, strict_violation=strict.detach())
                observed[getattr(self, kind)] = state
            return observed

        def compute_cmp_state(self, x, step=0):
            return pm.CMPState(loss=((x - DATA["a"]) ** 2).sum(), observed_constraints=self._observed(x, step))

        if has_compute_violations:
            def compute_violations(self, x, step=0):
                return pm.CMPState(observed_constraints=self._observed(x, step))

    return CMP()


def dual_params(cmp):
    """The multipliers' parameters, each once, in registration order (cooper's dual_parameters()
    iterates a set)."""
    unique = {}
    for _, m in cmp.named_multipliers():
        for p in m.parameters():
            unique.setdefault(id(p), p)
    return list(unique.values())


def multipliers(cmp):
    return {kind: m.weight.detach().reshape(-1).clone() for kind, m in cmp.named_multipliers()}


# ---------------------------------------------------------------------------------------------
# Hand-computed rolls: SGD on both sides, plain tensor arithmetic (no autograd, no cooper).
# ---------------------------------------------------------------------------------------------
class Manual:
    """The oracle of one problem: x, the multipliers and fixed penalty coefficients as tensors."""

    def __init__(self, formulation, kinds, indexed, surrogate, primal_lr, dual_lr):
        self.form, self.kinds, self.indexed, self.surrogate = formulation, kinds, indexed, surrogate
        self.plr, self.dlr = primal_lr, dual_lr
        self.x = X0.clone()
        self.lam = {k: INIT[k].clone() for k in kinds} if formulation != "QuadraticPenalty" else None

    def idx(self, kind, step):
        return features(kind, step) if self.indexed else torch.arange(len(INIT[kind]))

    def viol(self, kind, x, step, strict):
        lhs, rhs = DATA[kind]
        if self.surrogate and not strict:
            lhs = lhs + SURROGATE_NOISE[kind]
        return (lhs @ x - rhs)[self.idx(kind, step)]

    def primal(self, x, lam, step):
        """(primal Lagrangian, its gradient in x)."""
        value, grad = ((x - DATA["a"]) ** 2).sum(), 2 * (x - DATA["a"])
        for kind in self.kinds:
            i = self.idx(kind, step)
            lhs = DATA[kind][0] + (SURROGATE_NOISE[kind] if self.surrogate else 0)
            g = self.viol(kind, x, step, strict=False)
            if self.form == "Lagrangian":
                value, w = value + lam[kind][i] @ g, lam[kind][i]
            elif self.form == "QuadraticPenalty":
                c = PENALTY[kind][i]
                gp = g.clamp(min=0) if kind == "ineq" else g
                value, w = value + 0.5 * (c * gp ** 2).sum(), c * gp
            elif kind == "ineq":  # augmented Lagrangian
                c, l = PENALTY[kind][i], lam[kind][i]
                r = (l + c * g).clamp(min=0)
                value, w = value + 0.5 * ((r ** 2 - l ** 2) / c).sum(), r
            else:
                c, l = PENALTY[kind][i], lam[kind][i]
                value, w = value + l @ g + 0.5 * (c * g ** 2).sum(), l + c * g
            grad = grad + lhs[i].T @ w
        return value, grad

    def dual(self, x, lam, step):
        """(dual Lagrangian, the multipliers after one projected SGD ascent step)."""
        value, new = torch.zeros((), dtype=F64), {}
        for kind in self.kinds:
            i, g = self.idx(kind, step), self.viol(kind, x, step, strict=True)
            value = value + lam[kind][i] @ g
            m = lam[kind].clone()
            m[i] = m[i] + self.dlr * g
            new[kind] = m.clamp(min=0) if kind == "ineq" else m
        return value, new

    def observed(self, lam, step):
        return torch.cat([lam[k][self.idx(k, step)] for k in self.kinds])

    def roll(self, scheme, step):
        """One roll; returns (primal L, dual L, primal-store multipliers, dual-store multipliers, loss)."""
        x, lam = self.x, self.lam
        loss = ((x - DATA["a"]) ** 2).sum()
        if scheme == "Unconstrained":
            lp, gx = self.primal(x, lam, step)
            self.x = x - self.plr * gx
            return lp, None, None, None, loss
        if scheme == "Simultaneous":
            lp, gx = self.primal(x, lam, step)
            ld, self.lam = self.dual(x, lam, step)
            self.x = x - self.plr * gx
            return lp, ld, self.observed(lam, step), self.observed(lam, step), loss
        if scheme == "AlternatingDualPrimal":
            ld, new = self.dual(x, lam, step)
            lp, gx = self.primal(x, new, step)
            self.x, self.lam = x - self.plr * gx, new
            return lp, ld, self.observed(new, step), self.observed(lam, step), loss
        if scheme == "AlternatingPrimalDual":
            lp, gx = self.primal(x, lam, step)
            self.x = x - self.plr * gx
            ld, self.lam = self.dual(self.x, lam, step)
            return lp, ld, self.observed(lam, step), self.observed(lam, step), ((self.x - DATA["a"]) ** 2).sum()
        if scheme == "Extrapolation":
            lp, gx = self.primal(x, lam, step)
            ld, lam_half = self.dual(x, lam, step)
            x_half = x - self.plr * gx
            _, gx_half = self.primal(x_half, lam_half, step)
            g_half = {}
            for kind in self.kinds:  # the update step: lam_t + lr * g(x_half), projected
                i, g = self.idx(kind, step), self.viol(kind, x_half, step, strict=True)
                m = lam[kind].clone()
                m[i] = m[i] + self.dlr * g
                g_half[kind] = m.clamp(min=0) if kind == "ineq" else m
            self.x, self.lam = x - self.plr * gx_half, g_half
            return lp, ld, self.observed(lam, step), self.observed(lam, step), loss
        raise AssertionError(scheme)


SCHEMES = {
    "Simultaneous": "SimultaneousOptimizer",
    "AlternatingPrimalDual": "AlternatingPrimalDualOptimizer",
    "AlternatingDualPrimal": "AlternatingDualPrimalOptimizer",
    "Extrapolation": "ExtrapolationConstrainedOptimizer",
}
PRIMAL_LR, DUAL_LR = 0.07, 0.45


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL))


def check_roll(roll_out, manual_out, manual, x, cmp, step, with_multipliers):
    lp, ld, mp, md, loss = manual_out
    close(x.detach(), manual.x)
    close(roll_out.primal_lagrangian_store.lagrangian.detach(), lp)
    close(roll_out.loss.detach(), loss)
    if with_multipliers:
        close(roll_out.dual_lagrangian_store.lagrangian.detach(), ld)
        close(torch.cat([v.detach() for v in roll_out.primal_lagrangian_store.observed_multiplier_values()]), mp)
        close(torch.cat([v.detach() for v in roll_out.dual_lagrangian_store.observed_multiplier_values()]), md)
        now = multipliers(cmp)
        for kind in manual.kinds:
            close(now[kind], manual.lam[kind])
    else:
        assert roll_out.dual_lagrangian_store.lagrangian is None
        assert list(roll_out.dual_lagrangian_store.observed_multiplier_values()) == []


@pytest.mark.parametrize("surrogate", [False, True], ids=["plain", "proxy"])
@pytest.mark.parametrize("indexed", [False, True], ids=["dense", "indexed"])
@pytest.mark.parametrize("kinds", [("ineq",), ("eq",), ("ineq", "eq")], ids=["ineq", "eq", "both"])
@pytest.mark.parametrize("formulation", ["Lagrangian", "AugmentedLagrangian"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_two_manual_rolls(pm, scheme, formulation, kinds, indexed, surrogate):
    """Cooper's test_manual, our port: two rolls of every constrained optimizer against
    hand-computed projected SGD descent-ascent (params, multipliers, both Lagrangians, the
    multiplier values each store observed, the RollOut's loss)."""
    cmp = build_cmp(pm, formulation, kinds=kinds, indexed=indexed, surrogate=surrogate)
    x = torch.nn.Parameter(X0.clone())
    extra = scheme == "Extrapolation"
    sgd = uoptim.ExtraSGD if extra else torch.optim.SGD
    opt = getattr(uoptim, SCHEMES[scheme])(cmp, sgd([x], lr=PRIMAL_LR),
                                           sgd(dual_params(cmp), lr=DUAL_LR, maximize=True))
    manual = Manual(formulation, kinds, indexed, surrogate, PRIMAL_LR, DUAL_LR)
    for step in range(2):
        kwargs = {"compute_cmp_state_kwargs": {"x": x, "step": step}}
        roll_out = opt.roll(**kwargs)
        check_roll(roll_out, manual.roll(scheme, step), manual, x, cmp, step, True)


@pytest.mark.parametrize("indexed", [False, True], ids=["dense", "indexed"])
@pytest.mark.parametrize("kinds", [("ineq",), ("eq",), ("ineq", "eq")], ids=["ineq", "eq", "both"])
def test_two_manual_rolls_quadratic_penalty(pm, kinds, indexed):
    """QuadraticPenalty with UnconstrainedOptimizer: primal SGD on f + 1/2 sum c [g]_+^2, an
    empty dual store."""
    cmp = build_cmp(pm, "QuadraticPenalty", kinds=kinds, indexed=indexed)
    x = torch.nn.Parameter(X0.clone())
    opt = uoptim.UnconstrainedOptimizer(cmp, torch.optim.SGD([x], lr=PRIMAL_LR))
    manual = Manual("QuadraticPenalty", kinds, indexed, False, PRIMAL_LR, DUAL_LR)
    for step in range(2):
        roll_out = opt.roll(compute_cmp_state_kwargs={"x": x, "step": step})
        check_roll(roll_out, manual.roll("Unconstrained", step), manual, x, cmp, step, False)
        assert type(roll_out.dual_lagrangian_store) is type(roll_out.primal_lagrangian_store)


@pytest.mark.parametrize("indexed", [False, True], ids=["dense", "indexed"])
def test_alternating_primal_dual_with_compute_violations(pm, indexed):
    """With compute_violations the dual step uses the violations at x_{t+1}; the RollOut's
    loss is f(x_t) and its state has no loss."""
    cmp = build_cmp(pm, "Lagrangian", indexed=indexed, has_compute_violations=True)
    x = torch.nn.Parameter(X0.clone())
    opt = uoptim.AlternatingPrimalDualOptimizer(cmp, torch.optim.SGD([x], lr=PRIMAL_LR),
                                                torch.optim.SGD(dual_params(cmp), lr=DUAL_LR, maximize=True))
    manual = Manual("Lagrangian", ("ineq", "eq"), indexed, False, PRIMAL_LR, DUAL_LR)
    for step in range(2):
        f_t = ((x.detach() - DATA["a"]) ** 2).sum()
        kw = {"x": x, "step": step}
        roll_out = opt.roll(compute_cmp_state_kwargs=kw, compute_violations_kwargs=kw)
        lp, ld, mp, md, _ = manual.roll("AlternatingPrimalDual", step)
        check_roll(roll_out, (lp, ld, mp, md, f_t), manual, x, cmp, step, True)
        assert roll_out.cmp_state.loss is None


# ---------------------------------------------------------------------------------------------
# Against cooper-optim itself: each optimizer on its own copy of the same problem, 12 rolls.
# ---------------------------------------------------------------------------------------------
def _extra(lib, name):
    return getattr(uoptim if lib == "ours" else cooper.optim, name)


# scheme -> (primal factory, dual factory); each factory is (lib, params, indexed) -> optimizer
OPTIMIZER_SETUPS = {
    "Simultaneous": (
        lambda lib, ps, ix: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda lib, ps, ix: (torch.optim.SGD(ps, lr=0.2, momentum=0.3, maximize=True) if ix
                             else torch.optim.Adam(ps, lr=0.05, maximize=True))),
    "AlternatingPrimalDual": (
        lambda lib, ps, ix: torch.optim.Adam(ps, lr=0.05),
        lambda lib, ps, ix: torch.optim.SGD(ps, lr=0.3, momentum=0.5, maximize=True)),
    "AlternatingDualPrimal": (
        lambda lib, ps, ix: torch.optim.SGD(ps, lr=0.05, momentum=0.5),
        lambda lib, ps, ix: torch.optim.SGD(ps, lr=0.3, maximize=True)),
    "Extrapolation": (
        lambda lib, ps, ix: _extra(lib, "ExtraAdam")(ps, lr=0.05, amsgrad=True, weight_decay=0.01),
        # (cooper's Nesterov ExtraSGD cannot take sparse gradients: test_extra_sgd_sparse_gradients)
        lambda lib, ps, ix: _extra(lib, "ExtraSGD")(ps, lr=0.3, momentum=0.5, nesterov=not ix, maximize=True)),
    "Extrapolation-sgd-adam": (
        lambda lib, ps, ix: _extra(lib, "ExtraSGD")(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.02),
        lambda lib, ps, ix: (_extra(lib, "ExtraSGD")(ps, lr=0.3, maximize=True) if ix
                             else _extra(lib, "ExtraAdam")(ps, lr=0.05, betas=(0.5, 0.9), maximize=True))),
    "Unconstrained": (lambda lib, ps, ix: torch.optim.Adam(ps, lr=0.05), None),
}
COOPER_CLASS = {"Unconstrained": "UnconstrainedOptimizer", "Extrapolation-sgd-adam": SCHEMES["Extrapolation"],
                **SCHEMES}


def build_run(lib, pm, scheme, formulation, indexed):
    """(x, cmp, cooper-style optimizer, penalty updater or None) on the ``lib`` side."""
    cmp = build_cmp(pm, formulation, indexed=indexed, surrogate=True)
    x = torch.nn.Parameter(X0.clone())
    primal_factory, dual_factory = OPTIMIZER_SETUPS[scheme]
    cls = getattr(uoptim if lib == "ours" else cooper.optim, COOPER_CLASS[scheme])
    if dual_factory is None:
        opt = cls(cmp, primal_factory(lib, [x], indexed))
    else:
        opt = cls(cmp, primal_factory(lib, [x], indexed), dual_factory(lib, dual_params(cmp), indexed))
    updater = None
    # (restart with indexed coefficients: cooper's updater compares the observed rows with all
    # the initial values and raises, a problem-side matter)
    if formulation == "AugmentedLagrangian":
        updater = pm.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(
            growth_factor=1.1, violation_tolerance=1e-4, has_restart=not indexed)
    elif formulation == "QuadraticPenalty":
        updater = pm.penalty_coefficients.AdditivePenaltyCoefficientUpdater(increment=0.5, violation_tolerance=1e-4,
                                                                            has_restart=not indexed)
    return x, cmp, opt, updater


def roll_fields(roll_out):
    """The RollOut's tensors, flattened into a dict (None entries dropped)."""
    out = {"loss": roll_out.loss, "primal_L": roll_out.primal_lagrangian_store.lagrangian,
           "dual_L": roll_out.dual_lagrangian_store.lagrangian}
    for tag, store in (("p", roll_out.primal_lagrangian_store), ("d", roll_out.dual_lagrangian_store)):
        for i, v in enumerate(store.observed_multiplier_values()):
            out[f"{tag}_mult{i}"] = v
        for i, v in enumerate(store.observed_penalty_coefficient_values()):
            out[f"{tag}_pen{i}"] = v
    for name, v in roll_out.cmp_state.named_observed_violations():
        out[f"viol_{name}"] = v
    for name, v in roll_out.cmp_state.named_observed_strict_violations():
        out[f"strict_{name}"] = v
    return {k: v.detach().clone() for k, v in out.items() if v is not None}


def run_trajectory(lib, pm, scheme, formulation, indexed, steps=12):
    x, cmp, opt, updater = build_run(lib, pm, scheme, formulation, indexed)
    trajectory = []
    for step in range(steps):
        kw = {"compute_cmp_state_kwargs": {"x": x, "step": step}}
        roll_out = opt.roll(**kw)
        if updater is not None:
            updater.step(roll_out.cmp_state.observed_constraints)
        trajectory.append({"x": x.detach().clone(), **roll_fields(roll_out),
                           **{f"lam_{k}": v for k, v in multipliers(cmp).items()},
                           **{f"pen_{k}": pc.value.detach().clone() for k, pc in cmp.named_penalty_coefficients()}})
    return trajectory


CASES = [(s, f) for s in OPTIMIZER_SETUPS if s != "Unconstrained"
         for f in ("Lagrangian", "AugmentedLagrangian")] + [("Unconstrained", "QuadraticPenalty")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # cooper's ExtraSGD/ExtraAdam: deprecated add_(scalar, tensor)
@pytest.mark.parametrize("indexed", [False, True], ids=["dense", "indexed"])
@pytest.mark.parametrize("scheme,formulation", CASES)
def test_trajectory_matches_cooper(pm, scheme, formulation, indexed):
    """float64, 12 rolls, inequality and equality constraints with proxy violations, stateful
    optimizers on both sides, penalty updaters stepped after each roll: our optimizer on one
    copy of the problem and cooper's on another agree to 1e-12 in the params, multipliers,
    penalty coefficients and every RollOut field."""
    ours = run_trajectory("ours", pm, scheme, formulation, indexed)
    ref = run_trajectory("cooper", cooper, scheme, formulation, indexed)
    moved = False
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys(), step
        for key in a:
            torch.testing.assert_close(a[key], b[key], **TOL, msg=lambda m, k=key, s=step: f"step {s} {k}: {m}")
        moved |= not torch.equal(a["x"], X0)
    assert moved and not torch.equal(ours[-1]["x"], ours[-2]["x"])


# ---------------------------------------------------------------------------------------------
# Error cases, with Cooper's messages (its own tests' regexes)
# ---------------------------------------------------------------------------------------------
CONSTRAINED = ["SimultaneousOptimizer", "AlternatingPrimalDualOptimizer", "AlternatingDualPrimalOptimizer",
               "ExtrapolationConstrainedOptimizer"]


def _sgd(params, **kw):
    return torch.optim.SGD(params, lr=0.1, **kw)


@pytest.mark.parametrize("name", CONSTRAINED)
def test_missing_optimizers(pm, name):
    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    with pytest.raises(TypeError, match=r"No primal optimizer\(s\) was provided for building a ConstrainedOptimizer."):
        getattr(uoptim, name)(cmp, None, _sgd(dual_params(cmp), maximize=True))
    with pytest.raises(TypeError, match=r"No dual optimizer\(s\) was provided for building a ConstrainedOptimizer."):
        getattr(uoptim, name)(cmp, _sgd([x]), None)


@pytest.mark.parametrize("name", CONSTRAINED)
def test_dual_optimizer_must_maximize(pm, name):
    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    ineq, eq = dual_params(cmp)
    mixed = torch.optim.SGD([{"params": [ineq], "maximize": True}, {"params": [eq]}], lr=0.1)
    with pytest.raises(ValueError, match=r"Dual optimizers must be set to carry out maximization steps\."
                                         r" \(dual optimizer 0 \(SGD\), param group 1: maximize=False\)"):
        getattr(uoptim, name)(cmp, _sgd([x]), mixed)
    # an optimizer without a "maximize" setting: cooper fails with KeyError, ours names it
    with pytest.raises(ValueError, match=r"maximization steps\. .*LBFGS.*maximize=<missing>"):
        getattr(uoptim, name)(cmp, _sgd([x]), [_sgd([ineq], maximize=True), torch.optim.LBFGS([eq])])
    with pytest.raises(KeyError):
        getattr(cooper.optim, name)(cmp, _sgd([x]), [_sgd([ineq], maximize=True), torch.optim.LBFGS([eq])])


def test_extrapolation_needs_extrapolation_capable_optimizers(pm):
    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    with pytest.raises(RuntimeError, match=r"Some of the provided optimizers do not have an extrapolation method\."
                                           r".*\(primal optimizer 0 \(SGD\)\)"):
        uoptim.ExtrapolationConstrainedOptimizer(cmp, _sgd([x]), uoptim.ExtraSGD(dual_params(cmp), maximize=True))
    with pytest.raises(RuntimeError, match=r"do not have an extrapolation method\..*\(dual optimizer 0 \(SGD\)\)"):
        uoptim.ExtrapolationConstrainedOptimizer(cmp, uoptim.ExtraSGD([x]), _sgd(dual_params(cmp), maximize=True))
    opt = uoptim.ExtrapolationConstrainedOptimizer(cmp, uoptim.ExtraSGD([x]),
                                                   cooper.optim.ExtraSGD(dual_params(cmp), maximize=True))
    assert len(opt.dual_optimizers) == 1  # any optimizer with extrapolation() is accepted


def test_compute_violations_with_a_loss_raises_and_changes_nothing(pm):
    cmp = build_cmp(pm, "Lagrangian", has_compute_violations=True)
    cmp.compute_violations = lambda x, step=0: cmp.compute_cmp_state(x, step)  # populates the loss
    x = torch.nn.Parameter(X0.clone())
    primal = torch.optim.SGD([x], lr=0.1, momentum=0.9)
    opt = uoptim.AlternatingPrimalDualOptimizer(cmp, primal, _sgd(dual_params(cmp), maximize=True))
    before = multipliers(cmp)
    kw = {"x": x}
    with pytest.raises(RuntimeError, match=r"Expected `compute_violations` to not populate the loss\. "
                                           r"Please provide this value for the `compute_cmp_state` instead\."):
        opt.roll(compute_cmp_state_kwargs=kw, compute_violations_kwargs=kw)
    assert torch.equal(x.detach(), X0) and len(primal.state) == 0
    assert all(torch.equal(before[k], v) for k, v in multipliers(cmp).items())
    # cooper raises after its primal step
    x_ref = torch.nn.Parameter(X0.clone())
    ref = cooper.optim.AlternatingPrimalDualOptimizer(cmp, _sgd([x_ref]), _sgd(dual_params(cmp), maximize=True))
    with pytest.raises(RuntimeError, match="to not populate the loss"):
        ref.roll(compute_cmp_state_kwargs={"x": x_ref}, compute_violations_kwargs={"x": x_ref})
    assert not torch.equal(x_ref.detach(), X0)


def test_compute_violations_not_implemented_falls_back(pm):
    cmp = build_cmp(pm, "Lagrangian")  # no compute_violations: the base class raises NotImplementedError
    x = torch.nn.Parameter(X0.clone())
    opt = uoptim.AlternatingPrimalDualOptimizer(cmp, _sgd([x]), _sgd(dual_params(cmp), maximize=True))
    roll_out = opt.roll(compute_cmp_state_kwargs={"x": x}, compute_violations_kwargs={"unused": 1})
    close(roll_out.loss.detach(), ((x.detach() - DATA["a"]) ** 2).sum())  # the loss at x_{t+1}
    close(roll_out.cmp_state.loss.detach(), roll_out.loss.detach())


@pytest.mark.parametrize("name", ["UnconstrainedOptimizer"] + CONSTRAINED[:3])
def test_state_dict_count_mismatches(pm, name):
    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    cls = getattr(uoptim, name)
    constrained = name != "UnconstrainedOptimizer"
    dual = _sgd(dual_params(cmp), maximize=True) if constrained else None
    opt = cls(cmp, _sgd([x]), dual)
    state = opt.state_dict()
    assert set(state) == {"primal_optimizer_states", "dual_optimizer_states"}
    assert (state["dual_optimizer_states"] is None) is (not constrained)
    with pytest.raises(ValueError, match=r"The number of primal optimizers does not match the number of primal "
                                         r"optimizer states\. \(got 1 states for 2 optimizers\)"):
        cls(cmp, [_sgd([x]), _sgd([x])], dual).load_state_dict(state)
    if constrained:
        with pytest.raises(ValueError, match=r"Optimizer state dict contains ``dual_optimizer_states`` but "
                                             r"``dual_optimizers`` is None\."):
            uoptim.UnconstrainedOptimizer(cmp, _sgd([x])).load_state_dict(state)
        with pytest.raises(ValueError, match=r"The number of dual optimizers does not match the number of dual "
                                             r"optimizer states\. \(got 1 states for 2 optimizers\)"):
            cls(cmp, _sgd([x]), [dual, _sgd([torch.ones(1, requires_grad=True)], maximize=True)]).load_state_dict(state)
        with pytest.raises(ValueError, match=r"number of dual optimizers .* \(got no states for 1 optimizers\)"):
            opt.load_state_dict({**state, "dual_optimizer_states": None})


def test_failed_load_changes_nothing(pm):
    """The primal state loads, the dual one fails (wrong group count in torch): the primal
    optimizer gets its state back."""
    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    primal = torch.optim.SGD([x], lr=0.1, momentum=0.9)
    opt = uoptim.SimultaneousOptimizer(cmp, primal, _sgd(dual_params(cmp), maximize=True))
    opt.roll(compute_cmp_state_kwargs={"x": x})
    before = copy.deepcopy(primal.state_dict())
    bad = copy.deepcopy(opt.state_dict())
    bad["primal_optimizer_states"][0]["state"][0]["momentum_buffer"] += 1.0
    bad["dual_optimizer_states"][0]["param_groups"].append(bad["dual_optimizer_states"][0]["param_groups"][0])
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    assert torch.equal(primal.state[x]["momentum_buffer"], before["state"][0]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------
# Checkpoints: N rolls, state dicts through torch.save, fresh objects, M more rolls
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("scheme,formulation", [("Simultaneous", "AugmentedLagrangian"),
                                                ("AlternatingPrimalDual", "Lagrangian"),
                                                ("Extrapolation", "AugmentedLagrangian"),
                                                ("Extrapolation-sgd-adam", "Lagrangian"),
                                                ("Unconstrained", "QuadraticPenalty")])
def test_checkpoint_resume_is_identical(pm, scheme, formulation, tmp_path):
    n, m = 5, 6
    x, cmp, opt, updater = build_run("ours", pm, scheme, formulation, False)

    def roll(x, cmp, opt, updater, step):
        roll_out = opt.roll(compute_cmp_state_kwargs={"x": x, "step": step})
        if updater is not None:
            updater.step(roll_out.cmp_state.observed_constraints)
        return {"x": x.detach().clone(), **roll_fields(roll_out), **multipliers(cmp),
                **{f"pen_{k}": pc.value.clone() for k, pc in cmp.named_penalty_coefficients()}}

    full = [roll(x, cmp, opt, updater, s) for s in range(n + m)]
    x, cmp, opt, updater = build_run("ours", pm, scheme, formulation, False)
    for s in range(n):
        roll(x, cmp, opt, updater, s)
    path = tmp_path / "ckpt.pt"
    torch.save({"x": x.detach(), "opt": opt.state_dict(), "cmp": cmp.state_dict()}, path)
    del x, cmp, opt
    ckpt = torch.load(path, weights_only=True)
    x2, cmp2, opt2, updater2 = build_run("ours", pm, scheme, formulation, False)
    with torch.no_grad():
        x2.copy_(ckpt["x"])
    cmp2.load_state_dict(ckpt["cmp"])
    opt2.load_state_dict(ckpt["opt"])
    resumed = [roll(x2, cmp2, opt2, updater2, s) for s in range(n, n + m)]
    for a, b in zip(full[n:], resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # the check can fail: without the optimizer state the resumed run differs (all setups are stateful)
    x3, cmp3, opt3, updater3 = build_run("ours", pm, scheme, formulation, False)
    with torch.no_grad():
        x3.copy_(ckpt["x"])
    cmp3.load_state_dict(ckpt["cmp"])
    assert not torch.equal(roll(x3, cmp3, opt3, updater3, n)["x"], full[n]["x"])


# ---------------------------------------------------------------------------------------------
# ExtraSGD / ExtraAdam directly against cooper's, and their deviations
# ---------------------------------------------------------------------------------------------
Q = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)
R = torch.tensor([0.3, -1.0, 0.2, 0.5], dtype=F64)


def set_quadratic_grads(params):
    """grad of sum(Q p^2 + R p) on every parameter (dense)."""
    for p in params:
        p.grad = 2 * Q[: p.numel()] * p.detach() + R[: p.numel()]


EXTRA_SETTINGS = [
    ("ExtraSGD", {"lr": 0.1}), ("ExtraSGD", {"lr": 0.1, "momentum": 0.9}),
    ("ExtraSGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1}),
    ("ExtraSGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("ExtraSGD", {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    ("ExtraAdam", {"lr": 0.1}), ("ExtraAdam", {"lr": 0.1, "amsgrad": True, "weight_decay": 0.05}),
    ("ExtraAdam", {"lr": 0.05, "betas": (0.5, 0.8), "eps": 1e-3, "maximize": True}),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,kwargs", EXTRA_SETTINGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(EXTRA_SETTINGS)])
def test_extragradient_matches_cooper(name, kwargs):
    """10 (extrapolation, step) pairs on a quadratic, two param groups (one with its own lr),
    float64: parameters and optimizer state equal cooper's to 1e-12."""
    runs = {}
    for lib in ("ours", "cooper"):
        p1 = torch.nn.Parameter(X0.clone())
        p2 = torch.nn.Parameter(X0[:2].clone() * 2)
        opt = _extra(lib, name)([{"params": [p1]}, {"params": [p2], "lr": kwargs["lr"] / 2}], **kwargs)
        for _ in range(10):
            set_quadratic_grads([p1, p2])
            opt.extrapolation()
            set_quadratic_grads([p1, p2])
            opt.step()
        runs[lib] = ([p1.detach(), p2.detach()], opt)
    (ours, opt), (ref, ref_opt) = runs["ours"], runs["cooper"]
    for a, b in zip(ours, ref):
        close(a, b)
    assert not torch.equal(ours[0], X0)
    for pa, pb in zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"],
                      ref_opt.param_groups[0]["params"] + ref_opt.param_groups[1]["params"]):
        sa, sb = opt.state[pa], ref_opt.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            close(torch.as_tensor(sa[key], dtype=F64), torch.as_tensor(sb[key], dtype=F64))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_extra_sgd_sparse_gradients():
    """Sparse gradients (IndexedMultiplier's) give what the same gradients densified give, with
    momentum, Nesterov and weight decay (cooper's Nesterov ExtraSGD raises on sparse ones)."""
    idx = torch.tensor([[0, 2]])
    results = []
    for sparse in (True, False):
        p = torch.nn.Parameter(X0.clone())
        opt = uoptim.ExtraSGD([p], lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.1, maximize=True)
        for k in range(4):
            g = torch.sparse_coo_tensor(idx, torch.tensor([1.0 + k, -0.5], dtype=F64), (N,), check_invariants=True)
            for _ in range(2):
                p.grad = g if sparse else g.to_dense()
                (opt.extrapolation if _ == 0 else opt.step)()
        results.append(p.detach().clone())
    close(results[0], results[1])
    assert results[0][1] != X0[1]  # weight decay moves the unobserved rows too
    q = torch.nn.Parameter(X0.clone())
    ref = cooper.optim.ExtraSGD([q], lr=0.1, momentum=0.5, nesterov=True, maximize=True)
    q.grad = torch.sparse_coo_tensor(idx, torch.tensor([1.0, -0.5], dtype=F64), (N,), check_invariants=True)
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\) is not supported"):
        ref.extrapolation()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_extra_adam_rejects_sparse_gradients_and_changes_nothing():
    p1, p2 = torch.nn.Parameter(X0.clone()), torch.nn.Parameter(X0.clone())
    opt = uoptim.ExtraAdam([p1, p2], lr=0.1)
    p1.grad = torch.ones_like(p1)
    p2.grad = torch.ones_like(p2).to_sparse()
    for call in (opt.extrapolation,):
        with pytest.raises(RuntimeError, match="Adam does not support sparse gradients, please consider SparseAdam"):
            call()
    assert torch.equal(p1.detach(), X0) and len(opt.state) == 0 and opt.params_copy == []
    p2.grad = torch.ones_like(p2)
    opt.extrapolation()
    p2.grad = p2.grad.to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert opt.state[p1]["step"] == 1 and len(opt.params_copy) == 2


def test_extragradient_step_needs_extrapolation():
    p = torch.nn.Parameter(X0.clone())
    for opt in (uoptim.ExtraSGD([p], lr=0.1), uoptim.ExtraAdam([p])):
        p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="Need to call extrapolation before calling step."):
            opt.step()
        assert torch.equal(p.detach(), X0)


def test_extragradient_closure_and_in_place_update():
    p = torch.nn.Parameter(X0.clone())
    storage = p.data_ptr()
    opt = uoptim.ExtraSGD([p], lr=0.1)
    set_quadratic_grads([p])
    opt.extrapolation()
    x_half = p.detach().clone()
    close(x_half, X0 - 0.1 * (2 * Q * X0 + R))

    def closure():
        opt.zero_grad()
        loss = (Q * p ** 2 + R * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    close(loss.detach(), (Q * x_half ** 2 + R * x_half).sum())
    close(p.detach(), X0 - 0.1 * (2 * Q * x_half + R))
    assert p.data_ptr() == storage and opt.params_copy == []  # updated in place (cooper rebinds p.data)


def test_extra_sgd_leaves_gradients_alone():
    """Deviation: cooper's ExtraSGD adds the weight decay into p.grad (maximize=False); ours does not."""
    grads = {}
    for lib in ("ours", "cooper"):
        p = torch.nn.Parameter(X0.clone())
        opt = _extra(lib, "ExtraSGD")([p], lr=0.1, weight_decay=0.5)
        p.grad = torch.ones_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.extrapolation()
        grads[lib] = p.grad.clone()
    assert torch.equal(grads["ours"], torch.ones(N, dtype=F64))
    close(grads["cooper"], 1 + 0.5 * X0)


def test_parameter_without_gradient_at_step_returns_to_saved_value():
    """Deviation: x_{t+1} = x_t + u with u = 0 when there is no gradient at x_{t+1/2}
    (cooper leaves such a parameter at x_{t+1/2})."""
    ends = {}
    for lib in ("ours", "cooper"):
        p, q = torch.nn.Parameter(X0.clone()), torch.nn.Parameter(X0.clone())
        opt = _extra(lib, "ExtraSGD")([p, q], lr=0.1)
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.extrapolation()
        p.grad, q.grad = 2 * torch.ones_like(p), None
        opt.step()
        close(p.detach(), X0 - 0.2)
        ends[lib] = q.detach().clone()
    assert torch.equal(ends["ours"], X0)
    close(ends["cooper"], X0 - 0.1)


def test_extragradient_pickles_and_state_dict_round_trip():
    p = torch.nn.Parameter(X0.clone())
    opt = uoptim.ExtraAdam([p], lr=0.1, amsgrad=True)
    set_quadratic_grads([p])
    opt.extrapolation()
    set_quadratic_grads([p])
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.params_copy == [] and clone.state_dict()["state"][0]["step"] == 2
    q = clone.param_groups[0]["params"][0]
    set_quadratic_grads([q])
    clone.extrapolation()  # works after unpickling
    fresh = uoptim.ExtraAdam([torch.nn.Parameter(X0.clone())], lr=0.1, amsgrad=True)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state_dict()["state"][0]["step"] == 2
    close(fresh.state_dict()["state"][0]["max_exp_avg_sq"], opt.state_dict()["state"][0]["max_exp_avg_sq"])
    with pytest.raises(TypeError):  # cooper's ExtraSGD.__setstate__ calls super(torch.optim.SGD, self)
        pickle.loads(pickle.dumps(cooper.optim.ExtraSGD([torch.nn.Parameter(X0.clone())], lr=0.1)))
    pickle.loads(pickle.dumps(uoptim.ExtraSGD([torch.nn.Parameter(X0.clone())], lr=0.1)))


@pytest.mark.parametrize("name,kwargs,message", [
    ("ExtraSGD", {"lr": -1.0}, "Invalid learning rate: -1.0"),
    ("ExtraSGD", {"lr": float("nan")}, "Invalid learning rate: nan"),
    ("ExtraSGD", {"momentum": -0.5}, "Invalid momentum value: -0.5"),
    ("ExtraSGD", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ("ExtraSGD", {"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
    ("ExtraSGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
     "Nesterov momentum requires a momentum and zero dampening"),
    ("ExtraAdam", {"lr": -0.1}, "Invalid learning rate: -0.1"),
    ("ExtraAdam", {"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
    ("ExtraAdam", {"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0: 1.0"),
    ("ExtraAdam", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ("ExtraAdam", {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
])
def test_extragradient_bad_hyperparameters(name, kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        getattr(uoptim, name)([torch.nn.Parameter(X0.clone())], **kwargs)


# ---------------------------------------------------------------------------------------------
# Convergence to the closed-form optimum of min ||x - a||^2 s.t. w.x <= b
# ---------------------------------------------------------------------------------------------
def halfspace_cmp(pm, a, w, b):
    class HalfSpace(pm.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.c = pm.Constraint(constraint_type=pm.ConstraintType.INEQUALITY,
                                   formulation_type=pm.formulations.Lagrangian,
                                   multiplier=pm.multipliers.DenseMultiplier(num_constraints=1, dtype=F64))

        def compute_cmp_state(self, x):
            return pm.CMPState(loss=((x - a) ** 2).sum(),
                               observed_constraints={self.c: pm.ConstraintState(violation=(w @ x - b).reshape(1))})

    return HalfSpace()


@pytest.mark.parametrize("name", ["SimultaneousOptimizer", "AlternatingDualPrimalOptimizer"])
def test_convergence_to_closed_form(pm, name):
    r"""KKT: 2(x - a) + lam w = 0, w.x = b (active since w.a > b), so
    lam* = 2 (w.a - b) / ||w||^2 and x* = a - lam* w / 2. While the multiplier stays positive
    (asserted along the run) the projected GDA error e_t = (x_t - x*, lam_t - lam*) follows
    e_{t+1} = M e_t exactly, so ||e_T|| <= cond(V) rho(M)^T ||e_0|| (M = V D V^-1): that bound,
    plus rounding, is the tolerance."""
    a = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    w = torch.tensor([1.0, 1.0, 2.0], dtype=F64)
    b = -0.5
    lam_star = 2 * (w @ a - b) / (w @ w)
    x_star = a - lam_star * w / 2
    eta, eta_d, steps = 0.1, 0.1, 300

    n = len(a)
    m = torch.zeros(n + 1, n + 1, dtype=F64)   # the linear map of the error
    top = (1 - 2 * eta) * torch.eye(n, dtype=F64)
    if name == "SimultaneousOptimizer":
        m[:n, :n], m[:n, n] = top, -eta * w
    else:  # lam_{t+1} = lam_t + eta_d w.e_x;  x_{t+1} = x_t - eta (2 e_x + lam_{t+1} w)
        m[:n, :n], m[:n, n] = top - eta * eta_d * torch.outer(w, w), -eta * w
    m[n, :n], m[n, n] = eta_d * w, 1.0
    evals, vecs = torch.linalg.eig(m)
    rho = evals.abs().max().item()
    cond = torch.linalg.cond(vecs).item()

    cmp = halfspace_cmp(pm, a, w, b)
    x = torch.nn.Parameter(a.clone())  # infeasible start: the multiplier becomes positive at once
    opt = getattr(uoptim, name)(cmp, torch.optim.SGD([x], lr=eta),
                                torch.optim.SGD(dual_params(cmp), lr=eta_d, maximize=True))
    e0 = torch.cat([a - x_star, -lam_star.reshape(1)]).norm().item()
    lams = []
    for _ in range(steps):
        opt.roll(compute_cmp_state_kwargs={"x": x})
        lams.append(cmp.c.multiplier.weight.item())
    assert min(lams) > 0  # the projection never acted: the linear bound applies
    bound = cond * rho ** steps * e0
    assert rho < 1 and bound < 1e-9  # the step count makes the tolerance tight
    err = torch.cat([x.detach() - x_star, (cmp.c.multiplier.weight.detach() - lam_star).reshape(1)]).norm().item()
    assert err <= bound + 1e-13, (err, bound)


# ---------------------------------------------------------------------------------------------
# Cross-family: uniopt's iALM (penalty 0, uncapped step) == Lagrangian + projected SGD ascent
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairing", ["forward_update/AlternatingDualPrimal", "forward,update/Simultaneous"])
def test_ialm_penalty_zero_equals_lagrangian_gda(pm, pairing):
    r"""iALM's dual step is lam <- clamp(lam + min(beta, gamma/||c||) c, lo, hi); with
    gamma = 1e300 the step is beta, with dual_range (None, None) the clamp is [lam]_+ for the
    inequality group and nothing for the equality group, with sigma = 1 beta stays, and with
    penalty 0 the surrogate is f + lam.c: projected SGD ascent with lr = beta on the Lagrangian.
    ``forward_update`` (update, then L with the new multipliers) is AlternatingDualPrimal;
    ``forward`` -> backward -> ``update`` is Simultaneous (humancompatible-train pins the
    same pairing for its ALM in test_cooper_parity.py). 12 float64 steps."""
    beta, lr = 0.4, 0.08
    ialm = iALM(init_duals=INIT["ineq"].clone(), beta=beta, sigma=1.0, gamma=1e300, penalty=0.0,
                dual_range=(None, None), is_ineq=True)
    ialm.add_constraint_group(init_duals=INIT["eq"].clone(), beta=beta, sigma=1.0, gamma=1e300,
                              dual_range=(None, None), is_ineq=False)
    x_ref = torch.nn.Parameter(X0.clone())
    primal_ref = torch.optim.SGD([x_ref], lr=lr)

    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    scheme = "AlternatingDualPrimalOptimizer" if pairing.startswith("forward_update") else "SimultaneousOptimizer"
    opt = getattr(uoptim, scheme)(cmp, torch.optim.SGD([x], lr=lr),
                                  torch.optim.SGD(dual_params(cmp), lr=beta, maximize=True))
    clamped = False
    for step in range(12):
        primal_ref.zero_grad()
        loss = ((x_ref - DATA["a"]) ** 2).sum()
        c = [DATA[k][0] @ x_ref - DATA[k][1] for k in ("ineq", "eq")]
        if scheme == "AlternatingDualPrimalOptimizer":
            lagrangian = ialm.forward_update(loss, c)
            lagrangian.backward()
        else:
            lagrangian = ialm.forward(loss, c)
            lagrangian.backward()
            ialm.update([ci.detach() for ci in c])
        primal_ref.step()

        roll_out = opt.roll(compute_cmp_state_kwargs={"x": x, "step": step})
        close(x.detach(), x_ref.detach())
        close(roll_out.primal_lagrangian_store.lagrangian.detach(), lagrangian.detach())
        lam = multipliers(cmp)
        close(torch.cat([lam["ineq"], lam["eq"]]), ialm.duals)
        clamped |= bool((lam["ineq"] == 0).any())
    assert clamped  # the projection of the inequality multipliers acted during the run
    # the other pairing differs: the correspondence is exact, not approximate
    other = "SimultaneousOptimizer" if scheme == "AlternatingDualPrimalOptimizer" else "AlternatingDualPrimalOptimizer"
    cmp2, x2 = build_cmp(pm, "Lagrangian"), torch.nn.Parameter(X0.clone())
    opt2 = getattr(uoptim, other)(cmp2, torch.optim.SGD([x2], lr=lr),
                                  torch.optim.SGD(dual_params(cmp2), lr=beta, maximize=True))
    for step in range(12):
        opt2.roll(compute_cmp_state_kwargs={"x": x2})
    assert (x2.detach() - x_ref.detach()).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# uniopt's own optimizers on either side (QHM / QHAdam, maximize=True on the dual side)
# ---------------------------------------------------------------------------------------------
QH_SETUPS = {
    "qhadam-primal/qhm-dual/Simultaneous": (
        "SimultaneousOptimizer",
        ("QHAdam", dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 1.0))),
        ("QHM", dict(lr=0.3, momentum=0.8, nu=0.7))),
    "qhm-primal/qhadam-dual/AlternatingDualPrimal": (
        "AlternatingDualPrimalOptimizer",
        ("QHM", dict(lr=0.05, momentum=0.9, nu=0.7, weight_decay=0.01)),
        ("QHAdam", dict(lr=0.05, betas=(0.8, 0.95), nus=(0.8, 1.0)))),
}


@pytest.mark.parametrize("setup", list(QH_SETUPS))
def test_uniopt_qh_optimizers_on_both_sides(pm, setup):
    """Our optimizer with uniopt's QHM/QHAdam (dual ones with maximize=True) against a
    hand-written roll driving qhoptim's QHM/QHAdam (the reference), the dual one descending on
    minus the violation, then [.]_+ on the inequality multipliers; 12 float64 rolls."""
    import qhoptim.pyt as qh_ref

    scheme, (pname, pkw), (dname, dkw) = QH_SETUPS[setup]
    ours_cls = {"QHM": QHM, "QHAdam": QHAdam}
    cmp = build_cmp(pm, "Lagrangian")
    x = torch.nn.Parameter(X0.clone())
    opt = getattr(uoptim, scheme)(cmp, ours_cls[pname]([x], **pkw),
                                  ours_cls[dname](dual_params(cmp), **dkw, maximize=True))

    x_ref = torch.nn.Parameter(X0.clone())
    lam_ref = {k: torch.nn.Parameter(INIT[k].clone()) for k in ("ineq", "eq")}
    primal_ref = getattr(qh_ref, pname)([x_ref], **pkw)
    dual_ref = getattr(qh_ref, dname)([lam_ref["ineq"], lam_ref["eq"]], **dkw)

    def viol(k, xv):
        return DATA[k][0] @ xv - DATA[k][1]

    def primal_ref_step():
        xv = x_ref.detach()
        x_ref.grad = 2 * (xv - DATA["a"]) + sum(DATA[k][0].T @ lam_ref[k].detach() for k in lam_ref)
        primal_ref.step()

    def dual_ref_step(xv):
        for k in lam_ref:
            lam_ref[k].grad = -viol(k, xv)
        dual_ref.step()
        with torch.no_grad():
            lam_ref["ineq"].clamp_(min=0)

    for step in range(12):
        xv = x_ref.detach().clone()
        if scheme == "SimultaneousOptimizer":
            primal_ref_step()
            dual_ref_step(xv)
        else:
            dual_ref_step(xv)
            primal_ref_step()
        opt.roll(compute_cmp_state_kwargs={"x": x, "step": step})
        close(x.detach(), x_ref.detach())
        lam = multipliers(cmp)
        for k in lam_ref:
            close(lam[k], lam_ref[k].detach())
    assert not torch.equal(lam["eq"], INIT["eq"])


def test_zero_grad_primal_step_and_shared_multiplier_post_step(pm):
    """zero_grad sets every primal and dual gradient to None; primal_step moves only the primal
    variables; a multiplier shared by two constraints is projected once per dual step (cooper:
    once per constraint)."""
    cmp = build_cmp(pm, "Lagrangian")
    shared = cmp.ineq.multiplier
    cmp.again = pm.Constraint(constraint_type=pm.ConstraintType.INEQUALITY,
                              formulation_type=pm.formulations.Lagrangian, multiplier=shared)
    x = torch.nn.Parameter(X0.clone())
    primal_list = [_sgd([x])]
    opt = uoptim.SimultaneousOptimizer(cmp, primal_list, _sgd(dual_params(cmp), maximize=True))
    primal_list.append(_sgd([x]))
    assert len(opt.primal_optimizers) == 1  # kept as a new list (cooper keeps the caller's)
    for p in [x] + dual_params(cmp):
        p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert all(p.grad is None for p in [x] + dual_params(cmp))
    x.grad = torch.ones_like(x)
    before = multipliers(cmp)
    opt.primal_step()
    close(x.detach(), X0 - 0.1)
    assert all(torch.equal(before[k], v) for k, v in multipliers(cmp).items())
    calls = []
    original = shared.post_step_
    shared.post_step_ = lambda: (calls.append(1), original())
    opt.dual_step()
    assert len(calls) == 1
    calls.clear()
    ref = cooper.optim.SimultaneousOptimizer(cmp, _sgd([x]), _sgd(dual_params(cmp), maximize=True))
    ref.dual_step()
    assert len(calls) == 2


def test_exports_match_cooper_optim():
    """Every public name of cooper.optim except nuPI/nuPIInitType (written in
    torch_optimizers.py by another engineer) and cooper's submodule names."""
    public = {n for n in dir(cooper.optim) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(cooper.optim, n)).__name__ == "module"}
    nupi = {"nuPI", "nuPIInitType"}  # the lead adds their import at merge
    assert public - modules - nupi == set(uoptim.__all__) - nupi
    assert all(hasattr(uoptim, n) for n in uoptim.__all__)
    assert issubclass(uoptim.ExtraSGD, torch.optim.Optimizer)
    assert issubclass(uoptim.ExtraAdam, uoptim.ExtragradientOptimizer)
    assert uoptim.RollOut._fields == cooper.optim.RollOut._fields
    ours, ref = uoptim.CooperOptimizerState, cooper.optim.CooperOptimizerState
    assert ours.__annotations__.keys() == ref.__annotations__.keys()
