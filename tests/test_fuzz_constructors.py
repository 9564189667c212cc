"""Property-based tests: every public constructor over random argument values and types.

Each constructor of the NumPy, torch and JAX faces (the QH family and its ``from_*``
converters, PolyakSGD, iALM, nuPI, the Cooper-shaped pieces -- multipliers, penalty
coefficients and their updaters, constraints, formulations, constrained optimizers -- the optax
transforms and the bilevel ``Dynamic``) is called with one or two of its arguments replaced by a
random value of a random type: ``None``, strings, bools, ints, NaN/inf/negative/huge floats,
complex numbers, lists, tuples, NumPy arrays and tensors of any shape, plain objects. Either
the constructor returns a working object -- and then one step (or one use) of it runs -- or it
raises ``ValueError``/``TypeError`` whose message names one of the replaced arguments (the
argument's name, or the words its message uses, e.g. "learning rate" for ``lr``). Any other
exception, or a step that fails after the constructor accepted the arguments, is a failure.

One exception, the same on every face: an argument whose check needs data that only the
first step brings (the number of constraints a JAX ``ialm`` ``init_duals`` array must match;
whether the constraints a JAX ``ConstrainedOptimizer`` meets have multipliers, which needs a
``dual_optimizer``; whether a JAX ``nupi`` array gain ``Kp``/``Ki`` broadcasts to the leaves
its ``init`` sees) is listed in its spec's ``at_step``; for those arguments the first step
may raise ``ValueError``/``TypeError`` naming the argument. Nothing else may fail at the step.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
from fuzz_profiles import profile
from hypothesis import given
from hypothesis import strategies as st

import uniopt
import uniopt.constrained as np_constrained
from uniopt.adapters import torch as uniopt_torch
from uniopt.adapters.torch import bilevel as torch_bilevel
from uniopt.adapters.torch import constrained as pm

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from uniopt.adapters import jax as uniopt_jax  # noqa: E402
from uniopt.adapters.jax import bilevel as jax_bilevel  # noqa: E402
from uniopt.adapters.jax import constrained as jc  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Random values of random types
# ----------------------------------------------------------------------------------------------
class Opaque:
    """An object of no useful type."""

    def __repr__(self):
        return "Opaque()"


FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1.5, -1e-8, 1e-300, 1e300, math.nan, math.inf,
                     -math.inf]),
    st.floats(-2.0, 2.0),
)
INTS = st.one_of(st.integers(-3, 5), st.sampled_from([-(2**63), 2**64]))
WORDS = st.sampled_from(["", "x", "grad", "direct", "SPS_max", "SPS+", "sps", "sps+",
                         "multiplicative", "simultaneous", "extrapolation", "auto", "cpu",
                         "nan", "1.0", "SGD", "ZEROS"])
SCALARS = st.one_of(FLOATS, INTS, st.booleans(), st.none(), WORDS, st.just(1 + 2j),
                    st.builds(Opaque), st.sampled_from([np.float32(0.5), np.int64(2),
                                                       np.bool_(True), np.float64(math.nan)]))
SHAPES = st.sampled_from([(), (0,), (1,), (2,), (3,), (2, 2)])


@st.composite
def numpy_arrays(draw):
    shape = draw(SHAPES)
    dtype = draw(st.sampled_from([np.float64, np.float32, np.int64, np.bool_]))
    fill = draw(st.sampled_from([0.0, 0.5, -1.0, 2.0, math.nan]))
    return np.full(shape, fill).astype(dtype)


@st.composite
def tensors(draw):
    a = draw(numpy_arrays())
    return torch.from_numpy(np.ascontiguousarray(a))


def values(face: str):
    """Anything: scalars of every type, containers of them, arrays (and tensors on torch)."""
    arrays = numpy_arrays() if face != "torch" else st.one_of(numpy_arrays(), tensors())
    containers = st.one_of(st.lists(SCALARS, max_size=3), st.lists(SCALARS, max_size=3).map(tuple))
    return st.one_of(SCALARS, SCALARS, containers, arrays)


# ----------------------------------------------------------------------------------------------
# The constructors
# ----------------------------------------------------------------------------------------------
ALIASES = {
    "lr": ["learning rate", "lr"], "learning_rate": ["learning rate", "learning_rate"],
    "eps": ["epsilon", "eps"], "betas": ["beta", "beta1", "beta2"], "nus": ["nu"], "Kp": ["kp"], "Ki": ["ki"],
    "max_learning_rate": ["max_learning_rate", "max learning rate"],
    "init_duals": ["init_duals", "initial dual", "duals"],
    "m": ["m", "number of constraints", "size"],
    "num_constraints": ["num_constraints", "number of constraints"],
    "ema_nu": ["nu"],  # cooper's message: "Invalid nu value"
    "primal_optimizers": ["primal optimizer"], "dual_optimizers": ["dual optimizer"],
}


@dataclass
class Spec:
    """``build(**kwargs)`` makes the object from ``defaults`` updated with the fuzzed values;
    ``use(obj)`` runs one step of it; ``words``: other argument names a message may name (the
    constructor a converter's output goes to)."""

    name: str
    face: str
    defaults: dict
    build: Callable
    use: Callable | None = None
    words: list = field(default_factory=list)
    fuzz: list | None = None  # the arguments to fuzz (default: every key of ``defaults``)
    at_step: tuple = ()  # arguments checked at the first step (data-dependent; see above)

    def arguments(self):
        return self.fuzz if self.fuzz is not None else list(self.defaults)


def names_argument(message: str, args, extra) -> bool:
    text = message.lower()
    for arg in [*args, *extra]:
        for word in [arg, arg.replace("_", " "), *ALIASES.get(arg, [])]:
            if re.search(r"(?<![a-z0-9])" + re.escape(word.lower()) + r"(?![a-z0-9])", text):
                return True
    return False


SPECS: list[Spec] = []


def spec(*args, **kwargs):
    SPECS.append(Spec(*args, **kwargs))


# -- NumPy face -------------------------------------------------------------------------------
def _np_step(opt):
    opt.step([np.ones(3)])


QHM_ARGS = dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.0, weight_decay_type="grad",
                maximize=False)
QHADAM_ARGS = dict(lr=1e-3, betas=(0.9, 0.999), nus=(0.7, 1.0), weight_decay=0.0,
                   decouple_weight_decay=False, eps=1e-8, maximize=False)
QHADAMW_ARGS = {k: v for k, v in QHADAM_ARGS.items() if k != "decouple_weight_decay"}
spec("numpy.QHM", "numpy", QHM_ARGS, lambda **kw: uniopt.QHM([np.zeros(3)], **kw), _np_step)
spec("numpy.QHAdam", "numpy", QHADAM_ARGS, lambda **kw: uniopt.QHAdam([np.zeros(3)], **kw),
     _np_step)
spec("numpy.QHAdamW", "numpy", QHADAMW_ARGS, lambda **kw: uniopt.QHAdamW([np.zeros(3)], **kw),
     _np_step)
NUPI_ARGS = dict(lr=0.1, weight_decay=0.0, Kp=0.5, Ki=1.0, ema_nu=0.2, init_type="SGD",
                 maximize=True)
spec("numpy.nuPI", "numpy", {**NUPI_ARGS, "init_type": np_constrained.nuPIInitType.SGD,
                             "nonnegative": True},
     lambda **kw: np_constrained.nuPI([np.zeros(3)], **kw), _np_step)

POLYAK_SOLVER_ARGS = dict(fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0,
                          momentum=0.0, maxiter=10, tol=1e-3, verbose=False)


def _np_polyak_step(solver):
    x = np.ones(3)
    state = solver.init_state(x)
    solver.update(x, state)


spec("numpy.PolyakSGD", "numpy", POLYAK_SOLVER_ARGS,
     lambda **kw: uniopt.PolyakSGD(lambda x: (float(x @ x), 2 * x), value_and_grad=True, **kw),
     _np_polyak_step)

IALM_ARGS = dict(m=3, beta=1.0, sigma=1.1, gamma=1.0, init_duals=None, penalty=1.0,
                 dual_range=(-100.0, 100.0), momentum=0.0, dampening=0.0, is_ineq=False, ctol=0.0)


def _ialm_size(opt):
    duals = getattr(opt, "duals", None)
    if duals is None:
        duals = opt.state_dict()["duals"] if hasattr(opt, "state_dict") else None
    return int(np.asarray(duals).size) if not torch.is_tensor(duals) else int(duals.numel())


def _np_ialm_step(opt):
    opt.update(np.full(_ialm_size(opt), 0.5))


spec("numpy.iALM", "numpy", IALM_ARGS, lambda **kw: uniopt.iALM(**kw), _np_ialm_step)

# qhoptim's converters on each face: the converter's dict goes to the constructor
CONVERTERS = {
    "from_pid": dict(k_p=-0.1, k_i=0.1, k_d=0.1),
    "from_synthesized_nesterov": dict(alpha=0.1, beta1=0.9, beta2=0.6),
    "from_robust_momentum": dict(l=10.0, kappa=25.0, rho=0.85),
    "from_accsgd": dict(delta=0.1, kappa=100.0, xi=10.0, eps=0.7),
    "from_two_state_optimizer": dict(h=0.9, k=0.0, l=-0.1, m=0.5, q=1.0, z=-0.05),
}


def _converter_build(cls, method, make):
    def build(**kw):
        return make(**getattr(cls, method)(**kw))

    return build


for _method, _args in CONVERTERS.items():
    spec(f"numpy.QHM.{_method}", "numpy", _args,
         _converter_build(uniopt.QHM, _method, lambda **kw: uniopt.QHM([np.zeros(3)], **kw)),
         _np_step, words=["lr", "momentum", "nu"])
spec("numpy.QHAdam.from_nadam", "numpy", dict(lr=1e-3, betas=(0.9, 0.999)),
     _converter_build(uniopt.QHAdam, "from_nadam",
                      lambda **kw: uniopt.QHAdam([np.zeros(3)], **kw)),
     _np_step, words=["lr", "betas", "nus"])


# -- torch face -------------------------------------------------------------------------------
def _param():
    return torch.zeros(3, dtype=torch.float64, requires_grad=True)


def _torch_step(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


def _torch_polyak_step(opt):
    p = opt.param_groups[0]["params"][0]

    def closure():
        opt.zero_grad()
        loss = (p * p).sum() + 1.0
        loss.backward()
        return loss

    opt.step(closure)


spec("torch.QHM", "torch", QHM_ARGS, lambda **kw: uniopt_torch.QHM([_param()], **kw),
     _torch_step)
spec("torch.QHAdam", "torch", QHADAM_ARGS, lambda **kw: uniopt_torch.QHAdam([_param()], **kw),
     _torch_step)
spec("torch.QHAdamW", "torch", QHADAMW_ARGS,
     lambda **kw: uniopt_torch.QHAdamW([_param()], **kw), _torch_step)
spec("torch.PolyakSGD", "torch",
     dict(fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0, momentum=0.0, lr=1.0),
     lambda **kw: uniopt_torch.PolyakSGD([_param()], **kw), _torch_polyak_step)
spec("torch.nuPI", "torch", NUPI_ARGS, lambda **kw: pm.optim.nuPI([_param()], **kw),
     _torch_step)
spec("torch.ExtraSGD", "torch", dict(lr=0.1, momentum=0.5, dampening=0.0, weight_decay=0.0,
                                      nesterov=False, maximize=False),
     lambda **kw: pm.optim.ExtraSGD([_param()], **kw), None)
spec("torch.ExtraAdam", "torch", dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                       amsgrad=False, maximize=False),
     lambda **kw: pm.optim.ExtraAdam([_param()], **kw), None)


def _torch_ialm_step(opt):
    opt.update(torch.full((_ialm_size(opt),), 0.5, dtype=torch.float64))


spec("torch.iALM", "torch", IALM_ARGS, lambda **kw: uniopt_torch.iALM(**kw), _torch_ialm_step)
for _method, _args in CONVERTERS.items():
    spec(f"torch.QHM.{_method}", "torch", _args,
         _converter_build(uniopt_torch.QHM, _method,
                          lambda **kw: uniopt_torch.QHM([_param()], **kw)),
         _torch_step, words=["lr", "momentum", "nu"])
spec("torch.QHAdam.from_nadam", "torch", dict(lr=1e-3, betas=(0.9, 0.999)),
     _converter_build(uniopt_torch.QHAdam, "from_nadam",
                      lambda **kw: uniopt_torch.QHAdam([_param()], **kw)),
     _torch_step, words=["lr", "betas", "nus"])

# Cooper-shaped pieces
F64 = torch.float64
MULTIPLIER_ARGS = dict(num_constraints=2, init=None, device=None, dtype=F64)
# ``device``: not fuzzed (an integer is a CUDA device, which torch itself refuses on a machine
# without one, with RuntimeError)
spec("torch.DenseMultiplier", "torch", MULTIPLIER_ARGS,
     lambda **kw: pm.multipliers.DenseMultiplier(**kw), lambda m: m(),
     fuzz=["num_constraints", "init", "dtype"])
spec("torch.IndexedMultiplier", "torch", MULTIPLIER_ARGS,
     lambda **kw: pm.multipliers.IndexedMultiplier(**kw),
     lambda m: m(torch.arange(min(1, m.weight.shape[0]))),
     fuzz=["num_constraints", "init", "dtype"])
# Cooper's message for a negative coefficient: "All entries of the penalty coefficient must be
# non-negative."
spec("torch.DensePenaltyCoefficient", "torch", dict(init=torch.ones(2, dtype=F64)),
     lambda **kw: pm.penalty_coefficients.DensePenaltyCoefficient(**kw), lambda c: c(),
     words=["penalty coefficient"])
spec("torch.IndexedPenaltyCoefficient", "torch", dict(init=torch.ones(2, dtype=F64)),
     lambda **kw: pm.penalty_coefficients.IndexedPenaltyCoefficient(**kw),
     lambda c: c(torch.arange(min(1, c.init.numel()) if hasattr(c, "init") else 1)),
     words=["penalty coefficient"])


def _torch_penalized_constraint():
    return pm.Constraint(pm.ConstraintType.INEQUALITY, pm.formulations.AugmentedLagrangian,
                         pm.multipliers.DenseMultiplier(num_constraints=2, dtype=F64),
                         pm.penalty_coefficients.DensePenaltyCoefficient(torch.ones(2, dtype=F64)))


def _torch_updater_step(updater):
    constraint = _torch_penalized_constraint()
    updater.step({constraint: pm.ConstraintState(
        violation=torch.tensor([0.5, -0.1], dtype=F64),
        strict_violation=torch.tensor([0.5, -0.1], dtype=F64))})


spec("torch.MultiplicativePenaltyCoefficientUpdater", "torch",
     dict(growth_factor=1.01, violation_tolerance=1e-4, has_restart=True),
     lambda **kw: pm.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(**kw),
     _torch_updater_step)
spec("torch.AdditivePenaltyCoefficientUpdater", "torch",
     dict(increment=1.0, violation_tolerance=1e-4, has_restart=True),
     lambda **kw: pm.penalty_coefficients.AdditivePenaltyCoefficientUpdater(**kw),
     _torch_updater_step)
for _form in ("Lagrangian", "QuadraticPenalty", "AugmentedLagrangian"):
    spec(f"torch.{_form}", "torch", dict(constraint_type=pm.ConstraintType.INEQUALITY),
         getattr(pm.formulations, _form), None)


class _TorchCMP(pm.ConstrainedMinimizationProblem):
    def __init__(self, constraint):
        super().__init__()
        self.c = constraint

    def compute_cmp_state(self, x):
        violation = torch.stack([x.sum() - 1.0, x[0] - 0.5])
        return pm.CMPState(loss=(x * x).sum(),
                           observed_constraints={self.c: pm.ConstraintState(violation=violation)})


def _torch_cmp_roll(constraint):
    cmp = _TorchCMP(constraint)
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    dual = list(cmp.dual_parameters())
    opt = pm.optim.SimultaneousOptimizer(
        cmp, torch.optim.SGD([x], lr=0.1),
        torch.optim.SGD(dual, lr=0.1, maximize=True) if dual else None)
    opt.roll(compute_cmp_state_kwargs={"x": x})


spec("torch.Constraint", "torch",
     dict(constraint_type=pm.ConstraintType.INEQUALITY, formulation_type=pm.formulations.Lagrangian,
          multiplier=None, penalty_coefficient=None),
     lambda **kw: pm.Constraint(**{**kw, "multiplier": kw["multiplier"] if kw["multiplier"]
                                   is not None else pm.multipliers.DenseMultiplier(2, dtype=F64)}),
     _torch_cmp_roll)


def _torch_optimizer_build(cls):
    def build(cmp="default", primal_optimizers="default", dual_optimizers="default"):
        constraint = pm.Constraint(pm.ConstraintType.INEQUALITY, pm.formulations.Lagrangian,
                                   pm.multipliers.DenseMultiplier(2, dtype=F64))
        problem = _TorchCMP(constraint)
        x = torch.zeros(3, dtype=F64, requires_grad=True)
        if isinstance(cmp, str) and cmp == "default":
            cmp = problem
        if isinstance(primal_optimizers, str) and primal_optimizers == "default":
            primal_optimizers = torch.optim.SGD([x], lr=0.1)
        if isinstance(dual_optimizers, str) and dual_optimizers == "default":
            dual_optimizers = torch.optim.SGD(list(problem.dual_parameters()), lr=0.1,
                                              maximize=True)
        opt = cls(cmp, primal_optimizers, dual_optimizers)
        opt._fuzz_x = x
        return opt

    return build


def _torch_optimizer_roll(opt):
    opt.roll(compute_cmp_state_kwargs={"x": opt._fuzz_x})


for _cls in ("SimultaneousOptimizer", "AlternatingPrimalDualOptimizer",
             "AlternatingDualPrimalOptimizer"):
    spec(f"torch.{_cls}", "torch",
         dict(cmp="default", primal_optimizers="default", dual_optimizers="default"),
         _torch_optimizer_build(getattr(pm.optim, _cls)), _torch_optimizer_roll)


class _UL(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.h = torch.nn.Parameter(torch.zeros(2, dtype=F64))


class _LL(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=F64))

    def forward(self, x):
        return x @ self.w


def _ll_objective(state):
    r = state["lower_model"](state["data"]) - state["target"]
    return 0.5 * (r @ r) + 0.5 * (torch.exp(state["upper_model"].h) * state["lower_model"].w ** 2).sum()


def _ul_objective(state):
    r = state["lower_model"](state["data"]) - state["target"]
    return 0.5 * (r @ r)


DYNAMIC_ARGS = dict(lower_loop=2, acquire_max_loss=False, alpha=0.0, truncate_iters=0,
                    alpha_decay=1.0, init_aux=False, warm_start=False, checkpoint=False)


def _torch_dynamic_build(**kw):
    ul, ll = _UL(), _LL()
    dyn = torch_bilevel.Dynamic(_ll_objective, kw.pop("lower_loop"), ul, _ul_objective, ll,
                                ll_opt=torch.optim.SGD(ll.parameters(), lr=0.1), **kw)
    return dyn


def _torch_dynamic_step(dyn):
    x = torch.eye(2, dtype=F64)
    y = torch.ones(2, dtype=F64)
    result = dyn.optimize(x, y, x, y)
    dyn.hypergrad(result, x, y)


spec("torch.Dynamic", "torch", DYNAMIC_ARGS, _torch_dynamic_build, _torch_dynamic_step)


# -- JAX face ---------------------------------------------------------------------------------
def _optax_step(t):
    params = jnp.zeros(3)
    state = t.init(params)
    t.update(jnp.ones(3), state, params)


def _optax_value_step(t):
    params = jnp.zeros(3)
    state = t.init(params)
    t.update(jnp.ones(3), state, params, value=jnp.asarray(1.0))


JAX_QHM = dict(learning_rate=0.1, momentum=0.9, nu=0.7, weight_decay=0.0, weight_decay_type="grad")
JAX_QHADAM = dict(learning_rate=1e-3, betas=None, nus=None, eps=1e-8, weight_decay=0.0,
                  decouple_weight_decay=False, b1=0.9, b2=0.999, nu1=0.7, nu2=1.0)
JAX_QHADAMW = {k: v for k, v in JAX_QHADAM.items() if k != "decouple_weight_decay"}
spec("jax.scale_by_qhm", "jax", dict(momentum=0.9, nu=0.7), uniopt_jax.scale_by_qhm, _optax_step)
spec("jax.scale_by_qhadam", "jax",
     dict(betas=None, nus=None, eps=1e-8, b1=0.9, b2=0.999, nu1=0.7, nu2=1.0),
     uniopt_jax.scale_by_qhadam, _optax_step)
spec("jax.qhm", "jax", JAX_QHM, uniopt_jax.qhm, _optax_step)
spec("jax.qhadam", "jax", JAX_QHADAM, uniopt_jax.qhadam, _optax_step)
spec("jax.qhadamw", "jax", JAX_QHADAMW, uniopt_jax.qhadamw, _optax_step)
JAX_POLYAK = dict(f_min=0.0, max_learning_rate=1.0, eps=0.0, variant="sps", momentum=0.0)
spec("jax.scale_by_polyak", "jax", JAX_POLYAK, uniopt_jax.scale_by_polyak, _optax_value_step)
spec("jax.polyak_sgd", "jax", {**JAX_POLYAK, "scaling": 1.0}, uniopt_jax.polyak_sgd,
     _optax_value_step)


def _jax_polyak_solver_step(solver):
    x = jnp.ones(3)
    state = solver.init_state(x)
    solver.update(x, state)


spec("jax.PolyakSGD", "jax", {**POLYAK_SOLVER_ARGS, "jit": False, "unroll": "auto"},
     lambda **kw: uniopt_jax.PolyakSGD(lambda x: jnp.sum(x * x), **kw), _jax_polyak_solver_step)

JAX_IALM = {k: v for k, v in IALM_ARGS.items() if k != "m"}


def _jax_ialm_step(t):
    c = jnp.full(3, 0.5)
    state = t.init(c)
    t.update(c, state)


# the per-group hyper-parameters (a list/pytree with one entry per constraint group) meet the
# number of groups only at the first step
spec("jax.ialm", "jax", JAX_IALM, uniopt_jax.ialm, _jax_ialm_step,
     at_step=("init_duals", "beta", "sigma", "gamma", "momentum", "dampening", "dual_range",
              "is_ineq"))
for _method, _args in CONVERTERS.items():
    spec(f"jax.qhm.{_method}", "jax", _args,
         _converter_build(uniopt_jax.qhm, _method, uniopt_jax.qhm), _optax_step,
         words=["learning_rate", "momentum", "nu"])
spec("jax.qhadam.from_nadam", "jax", dict(learning_rate=1e-3, betas=(0.9, 0.999)),
     lambda **kw: uniopt_jax.qhadam(**uniopt_jax.qhadam.from_nadam(**kw)), _optax_step,
     words=["learning_rate", "betas", "nus"])

JAX_NUPI = dict(learning_rate=0.1, weight_decay=0.0, Kp=0.5, Ki=1.0, ema_nu=0.2,
                init_type=jc.NuPIInitType.SGD, maximize=True)
spec("jax.nupi", "jax", JAX_NUPI, jc.nupi, _optax_step, at_step=("Kp", "Ki"))
spec("jax.projected_ascent", "jax", dict(learning_rate=0.1), jc.projected_ascent, _optax_step)
JAX_MULTIPLIER = dict(num_constraints=2, init=None, dtype=None, constraint_type=None)
spec("jax.DenseMultiplier", "jax", JAX_MULTIPLIER, jc.DenseMultiplier, lambda m: m.value())
spec("jax.IndexedMultiplier", "jax", JAX_MULTIPLIER, jc.IndexedMultiplier,
     lambda m: m.value(jnp.array([0])))
spec("jax.DensePenaltyCoefficient", "jax", dict(init=jnp.ones(2), dtype=None),
     jc.DensePenaltyCoefficient, lambda c: c.value() if callable(getattr(c, "value", None))
     else c.value)
spec("jax.IndexedPenaltyCoefficient", "jax", dict(init=jnp.ones(2), dtype=None),
     jc.IndexedPenaltyCoefficient, None)


def _jax_cmp(x, a=0.0):
    return jc.CMPState(jnp.sum((x - a) ** 2), {
        "g": jc.ConstraintState(jnp.stack([jnp.sum(x) - 1.0, x[0] - 0.5]))})


def _jax_roll(constraints, dual=None):
    solver = jc.ConstrainedOptimizer(_jax_cmp, optax.sgd(0.1), dual or jc.projected_ascent(0.1))
    x = jnp.zeros(3)
    state = solver.init(x, constraints)
    solver.step(x, constraints, state)


def _jax_updater_step(updater):
    constraints = {"g": jc.Constraint(jc.ConstraintType.INEQUALITY, jc.augmented_lagrangian,
                                      jc.DenseMultiplier(2), jc.DensePenaltyCoefficient(jnp.ones(2)))}
    updater.step(constraints, {"g": jc.ConstraintState(jnp.array([0.5, -0.1]))})


spec("jax.MultiplicativePenaltyCoefficientUpdater", "jax",
     dict(violation_tolerance=1e-4, has_restart=True, growth_factor=1.01),
     jc.MultiplicativePenaltyCoefficientUpdater, _jax_updater_step)
spec("jax.AdditivePenaltyCoefficientUpdater", "jax",
     dict(violation_tolerance=1e-4, has_restart=True, increment=1.0),
     jc.AdditivePenaltyCoefficientUpdater, _jax_updater_step)
spec("jax.Constraint", "jax",
     dict(constraint_type=jc.ConstraintType.INEQUALITY, formulation=jc.lagrangian,
          multiplier=None, penalty_coefficient=None),
     lambda **kw: jc.Constraint(**{**kw, "multiplier": kw["multiplier"] if kw["multiplier"]
                                   is not None else jc.DenseMultiplier(2)}),
     lambda c: _jax_roll({"g": c}))


def _jax_optimizer_build(compute_cmp_state="default", primal_optimizer="default",
                         dual_optimizer="default", roll="simultaneous", compute_violations=None):
    if isinstance(compute_cmp_state, str) and compute_cmp_state == "default":
        compute_cmp_state = _jax_cmp
    if isinstance(primal_optimizer, str) and primal_optimizer == "default":
        primal_optimizer = optax.sgd(0.1)
    if isinstance(dual_optimizer, str) and dual_optimizer == "default":
        dual_optimizer = jc.projected_ascent(0.1)
    return jc.ConstrainedOptimizer(compute_cmp_state, primal_optimizer, dual_optimizer, roll,
                                   compute_violations)


def _jax_optimizer_step(solver):
    constraints = {"g": jc.Constraint(jc.ConstraintType.INEQUALITY, jc.lagrangian,
                                      jc.DenseMultiplier(2))}
    x = jnp.zeros(3)
    state = solver.init(x, constraints)
    solver.step(x, constraints, state)


spec("jax.ConstrainedOptimizer", "jax",
     dict(compute_cmp_state="default", primal_optimizer="default", dual_optimizer="default",
          roll="simultaneous", compute_violations=None),
     _jax_optimizer_build, _jax_optimizer_step, at_step=("dual_optimizer",))


def _jax_ll(s):
    w, h = s["lower_model"], s["upper_model"]
    return jnp.sum((w - h) ** 2)


def _jax_ul(s):
    return jnp.sum(s["lower_model"] ** 2)


def _jax_dynamic_build(**kw):
    return jax_bilevel.Dynamic(_jax_ll, kw.pop("lower_loop"), _jax_ul, ll_opt=optax.sgd(0.1), **kw)


def _jax_dynamic_step(dyn):
    x, y = jnp.eye(2), jnp.ones(2)  # the UL batch too, as the torch step (PTT needs one)
    dyn.hypergrad(jnp.asarray(0.5), jnp.array([0.0, 1.5]), None, None, x, y)


spec("jax.Dynamic", "jax", DYNAMIC_ARGS, _jax_dynamic_build, _jax_dynamic_step)


def _add_nonfinite(specs):
    """Every constructor that takes the ``nonfinite`` policy (docs/faults.md) fuzzes it too."""
    for s in specs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s.build(**{**s.defaults, "nonfinite": "propagate"})
        except TypeError as error:
            if "nonfinite" in str(error):
                continue
            raise
        s.defaults = {**s.defaults, "nonfinite": "propagate"}


_add_nonfinite(SPECS)
ALIASES["nonfinite"] = ["nonfinite", "nonfinite policy"]


# ----------------------------------------------------------------------------------------------
# The property
# ----------------------------------------------------------------------------------------------
#: counts and sizes: a valid huge one would allocate or loop without end on a shared machine
COUNTS = {"m", "num_constraints", "lower_loop", "truncate_iters", "maxiter"}


def _huge_count(value) -> bool:
    """An integer-valued number above 10**6 (integer-valued floats count: ``1e3`` is a valid
    count, see ``uniopt._validation.integer``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) and float(value).is_integer() and abs(value) > 10**6


@st.composite
def fuzzed(draw, s: Spec):
    args = s.arguments()
    chosen = draw(st.lists(st.sampled_from(args), min_size=1, max_size=min(2, len(args)),
                           unique=True))
    kwargs = dict(s.defaults)
    for arg in chosen:
        strategy = values(s.face)
        kwargs[arg] = draw(strategy.filter(lambda v: not _huge_count(v)) if arg in COUNTS
                           else strategy)
    return chosen, kwargs


def _describe(kwargs, chosen):
    return ", ".join(f"{k}={kwargs[k]!r}" for k in chosen)


@pytest.mark.parametrize("s", SPECS, ids=[s.name for s in SPECS])
@given(data=st.data())
@profile(max_examples=8, fuzz_max_examples=500)
def test_constructor_accepts_or_names_the_argument(s, data):
    chosen, kwargs = data.draw(fuzzed(s), label="arguments")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            obj = s.build(**kwargs)
        except (ValueError, TypeError) as error:
            assert names_argument(str(error), chosen, s.words), (
                f"{s.name}({_describe(kwargs, chosen)}) raised {type(error).__name__} not "
                f"naming {chosen}: {error}")
            return
        except Exception as error:  # noqa: BLE001 (the property: no other exception type)
            raise AssertionError(f"{s.name}({_describe(kwargs, chosen)}) raised "
                                 f"{type(error).__name__}: {error}") from error
        if s.use is not None:
            try:
                s.use(obj)
            except (ValueError, TypeError) as error:
                named = [arg for arg in chosen if arg in s.at_step]
                if named and names_argument(str(error), named, []):
                    return  # a data-dependent check, at the first step (module docstring)
                raise AssertionError(f"{s.name}({_describe(kwargs, chosen)}) was accepted, but "
                                     f"its first step raised {type(error).__name__}: {error}"
                                     ) from error
            except Exception as error:  # noqa: BLE001
                raise AssertionError(f"{s.name}({_describe(kwargs, chosen)}) was accepted, but "
                                     f"its first step raised {type(error).__name__}: {error}"
                                     ) from error


def test_the_defaults_build_and_step():
    """Every spec's defaults are valid (so a failure above is the fuzzed value's)."""
    for s in SPECS:
        obj = s.build(**s.defaults)
        if s.use is not None:
            s.use(obj)
