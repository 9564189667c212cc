"""Faults and bad input: the ``nonfinite`` policy and exception safety, per family per face.

Every optimizer takes ``nonfinite="propagate"|"raise"|"skip"`` (docs/faults.md). For each
family on each face (NumPy, torch, JAX) a small harness builds the optimizer, steps it with a
given gradient (or loss, or constraint values), and snapshots every number it holds. Then:

* propagate: the numbers are those of an optimizer built without the argument (today's), and
  the NaN shows where the family puts it (the entry of the NaN gradient, as torch.optim);
* raise: ``FloatingPointError`` naming the optimizer; parameters and state bitwise unchanged;
* skip: parameters and state bitwise unchanged, the counter incremented, and the next finite
  step lands where an optimizer that never saw the bad step lands (bitwise);
* a step interrupted by an exception (a closure that raises, a gradient of the wrong shape, a
  non-finite value under "raise" in the LAST group, after good ones) changes nothing.

The oracle is the same optimizer run without the bad step: the policies must not change a
single bit of a finite step.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import uniopt

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from uniopt.adapters import jax as ujax  # noqa: E402
from uniopt.adapters import torch as utorch  # noqa: E402
from uniopt.adapters.jax import constrained as jcon  # noqa: E402
from uniopt.adapters.jax.polyak import PolyakSGD as JaxPolyakSGD  # noqa: E402
from uniopt.adapters.jax.polyak import polyak_sgd  # noqa: E402
from uniopt.adapters.torch import constrained as tcon  # noqa: E402
from uniopt.adapters.torch.dual_optim import iALM as DualOptimIALM  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def _x64():
    """float64 in JAX for this module only (a module-level config update leaked into every
    test file a pytest-xdist worker collects)."""
    with jax.enable_x64(True):
        yield


N = 5
RNG = np.random.default_rng(11)
X0 = RNG.normal(size=N)
GOOD = [RNG.normal(size=N) for _ in range(3)]
BAD = {"nan": np.array([0.5, np.nan, -1.0, 2.0, 0.1]),
       "inf": np.array([0.5, 1.0, -np.inf, 2.0, 0.1])}
LOSS = [1.7, 1.3, 0.9]


# ------------------------------------------------------------------------------------------------
# Comparing everything an optimizer holds, bit for bit
# ------------------------------------------------------------------------------------------------
def _plain(value):
    """Every number in ``value`` as NumPy arrays / Python scalars, recursively (copied)."""
    if isinstance(value, torch.Tensor):
        return np.array(value.detach().cpu().numpy(), copy=True)
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return np.array(value, copy=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "_asdict"):
        return _plain(value._asdict())
    if hasattr(value, "__dataclass_fields__") or hasattr(value, "tree_flatten"):
        return _plain(jax.tree.leaves(value))
    return copy.deepcopy(value)


def assert_same(a, b, path="", ignore=()):
    """``a`` and ``b`` are equal bit for bit (NaN payloads and signed zeros included)."""
    if isinstance(a, dict):
        keys = set(a) - set(ignore)
        assert keys == set(b) - set(ignore), path
        for k in keys:
            assert_same(a[k], b[k], f"{path}[{k!r}]", ignore)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", ignore)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), f"{path}: {a} != {b}"
    elif isinstance(a, float):
        assert np.array(a).tobytes() == np.array(b).tobytes(), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------------------------
# One harness per family per face: make(policy), step(grad, loss), snapshot(), skips()
# ------------------------------------------------------------------------------------------------
class NumpyOpt:
    def __init__(self, cls, kwargs):
        self.cls, self.kwargs = cls, kwargs

    def make(self, **policy):
        h = type(self)(self.cls, self.kwargs)
        h.x = X0.copy()
        h.opt = self.cls([h.x], **self.kwargs, **policy)
        return h

    def step(self, g, loss=None):
        self.opt.step([np.array(g)])

    def snapshot(self):
        return _plain({"x": self.x, "state": self.opt.state_dict()})

    def skips(self):
        return self.opt.param_groups[0]["nonfinite_skips"]

    def params(self):
        return self.x


class NumpyPolyak:
    def make(self, **policy):
        h = NumpyPolyak()
        h.solver = uniopt.PolyakSGD(lambda w, value, grad: (value, grad), momentum=0.5, **policy)
        h.x = X0.copy()
        h.state = h.solver.init_state(h.x, LOSS[0], GOOD[0])
        return h

    def step(self, g, loss):
        self.x, self.state = self.solver.update(self.x, self.state, loss, np.array(g))

    def snapshot(self):
        s = self.state
        return _plain({"x": self.x, "values": [s.error, s.value, s.stepsize, s.velocity]})

    def skips(self):
        return self.state.nonfinite_skips

    def params(self):
        return self.x


class NumpyIALM:
    def make(self, **policy):
        h = NumpyIALM()
        h.opt = uniopt.iALM(N, beta=2.0, sigma=1.1, gamma=3.0, momentum=0.5, **policy)
        return h

    def step(self, g, loss=None):
        self.opt.update(np.array(g))

    def snapshot(self):
        return _plain(self.opt.state_dict())

    def skips(self):
        return self.opt.param_groups[0]["nonfinite_skips"]

    def params(self):
        return self.opt.param_groups[0]["duals"]


class TorchOpt:
    def __init__(self, cls, kwargs, polyak=False):
        self.cls, self.kwargs, self.polyak = cls, kwargs, polyak

    def make(self, **policy):
        h = TorchOpt(self.cls, self.kwargs, self.polyak)
        h.w = torch.nn.Parameter(torch.tensor(X0))
        h.opt = self.cls([h.w], **self.kwargs, **policy)
        return h

    def step(self, g, loss=None):
        self.w.grad = torch.tensor(g)
        if self.polyak:
            self.opt.step(loss=torch.tensor(loss))
        else:
            self.opt.step()

    def snapshot(self):
        return _plain({"w": self.w, "state": self.opt.state_dict()})

    def skips(self):
        return self.opt.param_groups[0]["nonfinite_skips"]

    def params(self):
        return self.w.detach().numpy()


class TorchIALM:
    def __init__(self, cls=utorch.iALM):
        self.cls = cls

    def make(self, **policy):
        h = TorchIALM(self.cls)
        h.opt = self.cls(N, beta=2.0, sigma=1.1, gamma=3.0, momentum=0.5, **policy)
        return h

    def step(self, g, loss=None):
        self.opt.update(torch.tensor(g))

    def snapshot(self):
        return _plain(self.opt.state_dict())

    def skips(self):
        return self.opt.param_groups[0]["nonfinite_skips"]

    def params(self):
        return self.opt.param_groups[0]["params"][0].detach().numpy()


def _torch_cmp():
    """min ||x - a||^2 + <noise, x> s.t. x - 1 <= 0 (elementwise): the injected "gradient"
    enters the loss linearly, so a NaN in it reaches the loss, the primal gradient and (through
    the violation) the dual side."""

    class CMP(tcon.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.c = tcon.Constraint(constraint_type=tcon.ConstraintType.INEQUALITY,
                                     formulation_type=tcon.formulations.Lagrangian,
                                     multiplier=tcon.multipliers.DenseMultiplier(
                                         num_constraints=N, dtype=torch.float64))

        def compute_cmp_state(self, x, noise):
            return tcon.CMPState(loss=((x - 0.3) ** 2).sum() + (noise * x).sum(),
                                 observed_constraints={self.c: tcon.ConstraintState(
                                     violation=x - 1.0 + 0.0 * noise)})

    return CMP()


class TorchCooper:
    def __init__(self, name):
        self.name = name

    def make(self, **policy):
        h = TorchCooper(self.name)
        h.x = torch.nn.Parameter(torch.tensor(X0))
        h.cmp = _torch_cmp()
        primal = utorch.QHAdam([h.x], lr=0.05)
        dual = torch.optim.SGD(h.cmp.dual_parameters(), lr=0.1, maximize=True)
        if self.name == "ExtrapolationConstrainedOptimizer":
            primal = tcon.optim.ExtraSGD([h.x], lr=0.05)
            dual = tcon.optim.ExtraSGD(h.cmp.dual_parameters(), lr=0.1, maximize=True)
        h.opt = getattr(tcon.optim, self.name)(h.cmp, primal, dual, **policy)
        return h

    def step(self, g, loss=None):
        self.opt.roll(compute_cmp_state_kwargs={"x": self.x, "noise": torch.tensor(g)})

    def snapshot(self):
        return _plain({"x": self.x, "duals": list(self.cmp.dual_parameters()),
                       "state": self.opt.state_dict()})

    def skips(self):
        return self.opt.nonfinite_skips

    def params(self):
        return self.x.detach().numpy()


class JaxTx:
    def __init__(self, factory, value=False):
        self.factory, self.value = factory, value

    def make(self, **policy):
        h = JaxTx(self.factory, self.value)
        h.tx = self.factory(**policy)
        h.x = jnp.asarray(X0)
        h.state = h.tx.init(h.x)
        return h

    def step(self, g, loss=None):
        extra = {"value": jnp.asarray(loss)} if self.value else {}
        updates, self.state = self.tx.update(jnp.asarray(g), self.state, self.x, **extra)
        self.x = optax.apply_updates(self.x, updates)

    def snapshot(self):
        state = self.state.inner_state if hasattr(self.state, "nonfinite_skips") else self.state
        return _plain({"x": self.x, "state": jax.tree.leaves(state)})

    def skips(self):
        return int(self.state.nonfinite_skips)

    def params(self):
        return np.asarray(self.x)


class JaxPolyak:
    def make(self, **policy):
        h = JaxPolyak()
        h.solver = JaxPolyakSGD(lambda w, value, grad: (value, grad), value_and_grad=True,
                                momentum=0.5, jit=False, **policy)
        h.x = jnp.asarray(X0)
        h.state = h.solver.init_state(h.x, jnp.asarray(LOSS[0]), jnp.asarray(GOOD[0]))
        return h

    def step(self, g, loss):
        self.x, self.state = self.solver.update(self.x, self.state, jnp.asarray(loss), jnp.asarray(g))

    def snapshot(self):
        s = self.state
        return _plain({"x": self.x, "values": [s.error, s.value, s.stepsize, s.velocity]})

    def skips(self):
        return int(self.state.nonfinite_skips)

    def params(self):
        return np.asarray(self.x)


class JaxIALM:
    def make(self, **policy):
        h = JaxIALM()
        h.tx = ujax.ialm(beta=2.0, sigma=1.1, gamma=3.0, momentum=0.5, **policy)
        h.state = h.tx.init(jnp.zeros(N))
        return h

    def step(self, g, loss=None):
        self.state = self.tx.update(jnp.asarray(g), self.state)

    def snapshot(self):
        s = self.state
        return _plain([s.duals, s.momentum_buffer, s.beta, s.stepsize, s.count])

    def skips(self):
        return int(self.state.nonfinite_skips)

    def params(self):
        return np.asarray(self.state.duals)


def _jax_cmp(x, noise):
    return jcon.CMPState(jnp.sum((x - 0.3) ** 2) + jnp.sum(noise * x),
                         {"c": jcon.ConstraintState(x - 1.0 + 0.0 * noise)})


class JaxConstrained:
    def __init__(self, roll):
        self.roll = roll

    def make(self, **policy):
        h = JaxConstrained(self.roll)
        h.solver = jcon.ConstrainedOptimizer(_jax_cmp, ujax.qhadam(0.05), jcon.projected_ascent(0.1),
                                             roll=self.roll, **policy)
        h.x = jnp.asarray(X0)
        h.cons = {"c": jcon.Constraint(jcon.ConstraintType.INEQUALITY,
                                       multiplier=jcon.DenseMultiplier(N, dtype=jnp.float64))}
        h.state = h.solver.init(h.x, h.cons)
        return h

    def step(self, g, loss=None):
        self.x, self.cons, self.state, _ = self.solver.step(self.x, self.cons, self.state,
                                                            jnp.asarray(g))

    def snapshot(self):
        state = self.state.inner_state if hasattr(self.state, "nonfinite_skips") else self.state
        return _plain({"x": self.x, "duals": jax.tree.leaves(self.cons), "state": jax.tree.leaves(state)})

    def skips(self):
        return int(self.state.nonfinite_skips)

    def params(self):
        return np.asarray(self.x)


QHM_KW = dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01)
QHADAM_KW = dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 0.9), weight_decay=0.01)
HARNESSES = {
    "numpy-QHM": NumpyOpt(uniopt.QHM, QHM_KW),
    "numpy-QHAdam": NumpyOpt(uniopt.QHAdam, QHADAM_KW),
    "numpy-QHAdamW": NumpyOpt(uniopt.QHAdamW, dict(lr=0.05, weight_decay=0.01)),
    "numpy-nuPI": NumpyOpt(uniopt.constrained.nuPI, dict(lr=0.1, Kp=0.5, Ki=1.0, ema_nu=0.3)),
    "numpy-PolyakSGD": NumpyPolyak(),
    "numpy-iALM": NumpyIALM(),
    "torch-QHM": TorchOpt(utorch.QHM, QHM_KW),
    "torch-QHAdam": TorchOpt(utorch.QHAdam, QHADAM_KW),
    "torch-QHAdamW": TorchOpt(utorch.QHAdamW, dict(lr=0.05, weight_decay=0.01)),
    "torch-PolyakSGD": TorchOpt(utorch.PolyakSGD, dict(momentum=0.5), polyak=True),
    "torch-nuPI": TorchOpt(tcon.optim.nuPI, dict(lr=0.1, Kp=0.5, Ki=1.0, ema_nu=0.3)),
    "torch-iALM": TorchIALM(),
    "torch-dual_optim.iALM": TorchIALM(DualOptimIALM),
    "torch-Simultaneous": TorchCooper("SimultaneousOptimizer"),
    "torch-AlternatingPrimalDual": TorchCooper("AlternatingPrimalDualOptimizer"),
    "torch-AlternatingDualPrimal": TorchCooper("AlternatingDualPrimalOptimizer"),
    "torch-Extrapolation": TorchCooper("ExtrapolationConstrainedOptimizer"),
    "jax-qhm": JaxTx(lambda **kw: ujax.qhm(0.1, 0.9, 0.7, 0.01, **kw)),
    "jax-qhadam": JaxTx(lambda **kw: ujax.qhadam(0.05, (0.9, 0.99), (0.7, 0.9), **kw)),
    "jax-qhadamw": JaxTx(lambda **kw: ujax.qhadamw(0.05, weight_decay=0.01, **kw)),
    "jax-polyak_sgd": JaxTx(lambda **kw: polyak_sgd(momentum=0.5, **kw), value=True),
    "jax-nupi": JaxTx(lambda **kw: jcon.nupi(0.1, Kp=0.5, ema_nu=0.3, **kw)),
    "jax-PolyakSGD": JaxPolyak(),
    "jax-ialm": JaxIALM(),
    "jax-Constrained-simultaneous": JaxConstrained("simultaneous"),
}
# families whose "propagate" is not a propagation: a dual step cannot carry NaN, so iALM's
# default has always been to refuse the values (NumPy, torch: ValueError, nothing changed) or
# to skip them (JAX, traced, as optax.apply_if_finite)
REFUSES = {"numpy-iALM", "torch-iALM", "torch-dual_optim.iALM"}
SKIPS_BY_DEFAULT = {"jax-ialm"}
NAMES = list(HARNESSES)


def _run(h, steps):
    for g, loss in steps:
        h.step(g, loss)
    return h


# ------------------------------------------------------------------------------------------------
# The three policies
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_propagate_is_todays_behaviour(name):
    harness = HARNESSES[name]
    steps = [(GOOD[0], LOSS[0]), (BAD["nan"], LOSS[1])]
    if name in REFUSES:
        h = _run(harness.make(nonfinite="propagate"), steps[:1])
        before = h.snapshot()
        with pytest.raises(ValueError, match="not finite|non-finite"):
            h.step(*steps[1])
        assert_same(h.snapshot(), before)
        return
    a = _run(harness.make(), steps)
    b = _run(harness.make(nonfinite="propagate"), steps)
    assert_same(a.snapshot(), b.snapshot())
    if name in SKIPS_BY_DEFAULT:
        assert b.skips() == 1
        return
    x = b.params()
    assert np.isnan(x[1]) or name.endswith(("PolyakSGD", "polyak_sgd")) or "Constrained" in name \
        or name.startswith(("torch-Simultaneous", "torch-Alternating", "torch-Extrapolation"))
    assert not np.isfinite(x).all()  # the NaN reached the parameters, as in torch.optim


def _named(name: str) -> str:
    """The optimizer's name that a "raise" message starts with."""
    family = name.split("-", 1)[1]
    return {"dual_optim.iALM": "iALM", "Simultaneous": "SimultaneousOptimizer",
            "AlternatingPrimalDual": "AlternatingPrimalDualOptimizer",
            "AlternatingDualPrimal": "AlternatingDualPrimalOptimizer",
            "Extrapolation": "ExtrapolationConstrainedOptimizer",
            "Constrained-simultaneous": "ConstrainedOptimizer"}.get(family, family)


@pytest.mark.parametrize("name", NAMES)
def test_raise_changes_nothing(name):
    h = _run(HARNESSES[name].make(nonfinite="raise"), [(GOOD[0], LOSS[0])])
    before = h.snapshot()
    for bad in ("nan", "inf"):
        with pytest.raises(FloatingPointError, match=rf"^{_named(name)}: non-finite .* nothing was "
                                                     rf"updated \(nonfinite='raise'\)$"):
            h.step(BAD[bad], LOSS[1])
        assert_same(h.snapshot(), before)
    h.step(GOOD[1], LOSS[1])  # and it goes on
    ref = _run(HARNESSES[name].make(), [(GOOD[0], LOSS[0]), (GOOD[1], LOSS[1])])
    assert_same(h.snapshot(), ref.snapshot(), ignore=("nonfinite_skips",))


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith(("PolyakSGD", "polyak_sgd"))])
def test_raise_on_a_nonfinite_loss(name):
    h = _run(HARNESSES[name].make(nonfinite="raise"), [(GOOD[0], LOSS[0])])
    before = h.snapshot()
    with pytest.raises(FloatingPointError, match="loss|value"):
        h.step(GOOD[1], float("nan"))
    assert_same(h.snapshot(), before)


@pytest.mark.parametrize("name", NAMES)
def test_skip_changes_nothing_and_counts(name):
    harness = HARNESSES[name]
    h = _run(harness.make(nonfinite="skip"), [(GOOD[0], LOSS[0])])
    before = h.snapshot()
    assert h.skips() == 0
    h.step(BAD["nan"], LOSS[1])
    assert_same(h.snapshot(), before, ignore=("nonfinite_skips",))
    assert h.skips() == 1
    h.step(BAD["inf"], LOSS[1])
    assert_same(h.snapshot(), before, ignore=("nonfinite_skips",))
    assert h.skips() == 2
    # the next finite step is the one the optimizer would have taken without the bad ones
    h.step(GOOD[1], LOSS[1])
    h.step(GOOD[2], LOSS[2])
    ref = _run(harness.make(), [(GOOD[0], LOSS[0]), (GOOD[1], LOSS[1]), (GOOD[2], LOSS[2])])
    assert_same(h.snapshot(), ref.snapshot(), ignore=("nonfinite_skips",))
    assert h.skips() == 2


@pytest.mark.parametrize("name", NAMES)
def test_bad_policy_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"Invalid nonfinite policy: 'ignore' \(expected "
                                         r"'propagate', 'raise' or 'skip'\)"):
        HARNESSES[name].make(nonfinite="ignore")


def test_the_counter_round_trips_through_state_dicts():
    for harness in (HARNESSES["numpy-QHM"], HARNESSES["torch-QHAdam"], HARNESSES["torch-PolyakSGD"],
                    HARNESSES["torch-iALM"], HARNESSES["torch-Simultaneous"]):
        h = _run(harness.make(nonfinite="skip"), [(GOOD[0], LOSS[0]), (BAD["nan"], LOSS[1])])
        other = harness.make(nonfinite="skip")
        other.opt.load_state_dict(h.opt.state_dict())
        assert other.skips() == 1
    # the default keeps the reference's layout: no counter in the groups
    assert "nonfinite_skips" not in utorch.QHM([torch.nn.Parameter(torch.ones(2))], lr=0.1,
                                               momentum=0.5, nu=0.5).param_groups[0]
    assert not hasattr(HARNESSES["jax-qhm"].make().state, "nonfinite_skips")
    assert hasattr(HARNESSES["jax-qhm"].make(nonfinite="skip").state, "nonfinite_skips")


# ------------------------------------------------------------------------------------------------
# JAX: "skip" is traced (jit), "raise" is refused under tracing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [lambda **kw: ujax.qhadam(0.05, **kw),
                                     lambda **kw: polyak_sgd(**kw)], ids=["qhadam", "polyak_sgd"])
def test_jax_skip_under_jit_and_raise_refused_under_jit(factory):
    tx = factory(nonfinite="skip")
    x = jnp.asarray(X0)
    state = tx.init(x)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.asarray(1.0)))
    u, new = update(jnp.asarray(BAD["nan"]), state, x)
    assert_same(_plain(optax.apply_updates(x, u)), _plain(x))
    assert_same(_plain(jax.tree.leaves(new.inner_state)), _plain(jax.tree.leaves(state.inner_state)))
    assert int(new.nonfinite_skips) == 1
    u, new = update(jnp.asarray(GOOD[0]), new, x)
    assert int(new.nonfinite_skips) == 1 and np.all(np.asarray(u) != 0)
    tx = factory(nonfinite="raise")
    with pytest.raises(TypeError, match="nonfinite='raise' needs concrete values"):
        jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.asarray(1.0)))(
            jnp.asarray(GOOD[0]), tx.init(x), x)


def test_jax_polyak_solver_raise_needs_jit_false_and_skip_runs_under_jit():
    with pytest.raises(ValueError, match="'raise' with jit=True"):
        JaxPolyakSGD(lambda w: jnp.sum(w ** 2), nonfinite="raise")

    def fun(w):  # NaN whenever w[0] > 0: run() must skip those steps, never loop forever
        return jnp.sum(w ** 2) + jnp.where(w[0] > 0, jnp.nan, 0.0)

    solver = JaxPolyakSGD(fun, nonfinite="skip", maxiter=4)
    x, state = solver.run(jnp.asarray(X0).at[0].set(1.0))
    assert int(state.iter_num) == 4 and int(state.nonfinite_skips) == 4
    assert_same(_plain(x), _plain(jnp.asarray(X0).at[0].set(1.0)))


# ------------------------------------------------------------------------------------------------
# A step interrupted by an exception changes nothing, on every face
# ------------------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def _boom():
    raise Boom


@pytest.mark.parametrize("cls, kwargs", [(uniopt.QHM, QHM_KW), (uniopt.QHAdam, QHADAM_KW),
                                         (uniopt.QHAdamW, {}),
                                         (uniopt.constrained.nuPI, dict(lr=0.1))])
def test_numpy_interrupted_steps_change_nothing(cls, kwargs):
    x, y = X0.copy(), X0[:3].copy()
    opt = cls([{"params": [x]}, {"params": [y]}], **kwargs, nonfinite="raise")
    opt.step([GOOD[0], GOOD[1][:3]])
    before = _plain({"x": x, "y": y, "state": opt.state_dict()})
    for grads, closure, error in [([GOOD[1], GOOD[2][:3]], _boom, Boom),               # closure
                                  ([GOOD[1], GOOD[2]], None, ValueError),              # shape
                                  ([GOOD[1], BAD["nan"][:3]], None, FloatingPointError)]:  # last group
        with pytest.raises(error):
            opt.step(grads, closure)
        assert_same(_plain({"x": x, "y": y, "state": opt.state_dict()}), before)


def test_numpy_polyak_and_ialm_interrupted_steps_change_nothing():
    solver = uniopt.PolyakSGD(lambda w: (float(w @ w), 2 * w[:3]), nonfinite="raise")
    x = X0.copy()
    state = solver.init_state(x)
    with pytest.raises(ValueError):  # a gradient of the wrong shape
        solver.update(x, state)
    assert_same(_plain(x), _plain(X0))
    opt = uniopt.iALM(N, nonfinite="raise")
    opt.add_constraint_group(2, beta=0.5)
    opt.update(np.concatenate([GOOD[0], [0.1, 0.2]]))
    before = _plain(opt.state_dict())
    for c, error in [(GOOD[1], ValueError), (np.concatenate([GOOD[1], [0.1, np.nan]]), FloatingPointError)]:
        with pytest.raises(error):
            opt.update(c)
        assert_same(_plain(opt.state_dict()), before)


@pytest.mark.parametrize("cls, kwargs", [(utorch.QHM, QHM_KW), (utorch.QHAdam, QHADAM_KW),
                                         (utorch.QHAdamW, {}), (utorch.PolyakSGD, {"momentum": 0.5}),
                                         (tcon.optim.nuPI, {"lr": 0.1, "Kp": 0.5})])
def test_torch_interrupted_steps_change_nothing(cls, kwargs):
    x = torch.nn.Parameter(torch.tensor(X0))
    y = torch.nn.Parameter(torch.tensor(X0[:3]))
    opt = cls([{"params": [x]}, {"params": [y]}], **kwargs, nonfinite="raise")
    polyak = cls is utorch.PolyakSGD

    def step(gx, gy, closure=None):
        x.grad, y.grad = torch.tensor(gx), gy if isinstance(gy, torch.Tensor) else torch.tensor(gy)
        if closure is not None:
            return opt.step(closure)
        return opt.step(loss=torch.tensor(1.0)) if polyak else opt.step()

    step(GOOD[0], GOOD[1][:3])
    before = _plain({"x": x, "y": y, "state": opt.state_dict()})
    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0], dtype=torch.float64), (3,))
    cases = [(GOOD[1][:3], _boom, Boom),                    # a closure that raises
             (BAD["inf"][:3], None, FloatingPointError)]    # non-finite, in the last group
    if cls is not utorch.PolyakSGD and cls is not tcon.optim.nuPI:  # (nuPI takes sparse rows)
        cases.append((sparse, None, RuntimeError))          # a gradient the rule cannot take
    elif polyak:
        cases.append((GOOD[1][:3], lambda: None, RuntimeError))  # a closure without a loss
    for gy, closure, error in cases:
        with pytest.raises(error):
            step(GOOD[1], gy, closure)
        assert_same(_plain({"x": x, "y": y, "state": opt.state_dict()}), before)


def test_torch_ialm_and_cooper_interrupted_steps_change_nothing():
    opt = utorch.iALM(N, nonfinite="raise")
    opt.add_constraint_group(2, beta=0.5)
    opt.update(torch.tensor(np.concatenate([GOOD[0], [0.1, 0.2]])))
    before = _plain(opt.state_dict())
    for c, error in [(torch.tensor(GOOD[1]), ValueError),
                     (torch.tensor(np.concatenate([GOOD[1], [0.1, np.nan]])), FloatingPointError)]:
        with pytest.raises(error):
            opt.update(c)
        assert_same(_plain(opt.state_dict()), before)
    for name in ("SimultaneousOptimizer", "AlternatingPrimalDualOptimizer",
                 "AlternatingDualPrimalOptimizer", "ExtrapolationConstrainedOptimizer"):
        h = TorchCooper(name).make(nonfinite="raise")
        h.step(GOOD[0])
        before = h.snapshot()
        for kwargs, error in [({"x": h.x, "noise": torch.tensor(BAD["nan"])}, FloatingPointError),
                              ({"x": h.x, "noise": torch.ones(N + 1, dtype=torch.float64)}, RuntimeError)]:
            with pytest.raises(error):
                h.opt.roll(compute_cmp_state_kwargs=kwargs)
            assert_same(h.snapshot(), before)


def test_cooper_alternating_restores_when_the_second_evaluation_is_not_finite():
    """AlternatingPrimalDual steps the primal side before it sees the violations at x_{t+1}:
    a NaN there (and only there) must undo that primal step."""
    for policy in ("raise", "skip"):
        h = TorchCooper("AlternatingPrimalDualOptimizer").make(nonfinite=policy)
        h.step(GOOD[0])
        before = h.snapshot()
        calls = []

        def compute(x, noise):
            calls.append(1)
            bad = torch.tensor(np.nan) if len(calls) == 2 else torch.tensor(0.0)
            return tcon.CMPState(loss=((x - 0.3) ** 2).sum(), observed_constraints={
                h.cmp.c: tcon.ConstraintState(violation=x - 1.0 + bad)})

        h.cmp.compute_cmp_state = compute
        if policy == "raise":
            with pytest.raises(FloatingPointError):
                h.opt.roll(compute_cmp_state_kwargs={"x": h.x, "noise": None})
        else:
            h.opt.roll(compute_cmp_state_kwargs={"x": h.x, "noise": None})
            assert h.skips() == 1
        assert len(calls) == 2
        assert_same(h.snapshot(), before, ignore=("nonfinite_skips",))


def test_jax_interrupted_steps_change_nothing():
    x = jnp.asarray(X0)
    for tx in (ujax.qhm(0.1, 0.9, 0.7, nonfinite="raise"), ujax.qhadam(nonfinite="raise"),
               polyak_sgd(nonfinite="raise")):
        state = tx.init(x)
        saved = _plain([x, jax.tree.leaves(state)])
        cases = [(jnp.asarray(BAD["nan"]), FloatingPointError)]
        if len(jax.tree.leaves(state)) > 0:  # QH: a buffer of the parameters' shape
            cases.append((jnp.ones(N + 1), (ValueError, TypeError)))
        for g, error in cases:
            with pytest.raises(error):
                tx.update(g, state, x, value=jnp.asarray(1.0))
            assert_same(_plain([x, jax.tree.leaves(state)]), saved)
    solver = JaxPolyak().make(nonfinite="raise")
    saved = solver.snapshot()
    for g, error in [(BAD["nan"], FloatingPointError), (np.ones(N + 1), (ValueError, TypeError))]:
        with pytest.raises(error):
            solver.step(g, 1.0)
        assert_same(solver.snapshot(), saved)
    tx = jcon.nupi(0.1, Kp=0.5, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        tx.update(jnp.asarray(BAD["nan"]), tx.init(x), x)
    tx = ujax.ialm(nonfinite="raise")
    state = tx.init(jnp.zeros(N))
    with pytest.raises(FloatingPointError, match="constraint values"):
        tx.update(jnp.asarray(BAD["inf"]), state)
    solver = JaxConstrained("alternating_dual_primal").make(nonfinite="raise")
    with pytest.raises(FloatingPointError):
        solver.step(BAD["nan"])
    with pytest.raises((ValueError, TypeError)):
        solver.step(np.ones(N + 1))


# ------------------------------------------------------------------------------------------------
# The extragradient optimizers: both calls of a pair follow the policy
# ------------------------------------------------------------------------------------------------
EXTRA = {"ExtraSGD": dict(lr=0.1, momentum=0.5), "ExtraAdam": dict(lr=0.1, betas=(0.8, 0.9))}


def _extra_run(name, policy, calls):
    """Run ``calls`` ([("extrapolation"|"step", grad)]) on a fresh optimizer; its snapshot
    after each call and the first exception raised (or None)."""
    x = torch.nn.Parameter(torch.tensor(X0))
    opt = getattr(tcon.optim, name)([x], **EXTRA[name], nonfinite=policy)
    snaps, error = [], None
    for call, grad in calls:
        x.grad = torch.tensor(grad)
        try:
            getattr(opt, call)()
        except FloatingPointError as e:
            error = e
        snaps.append(_plain({"x": x, "state": opt.state_dict(), "copy": opt.params_copy}))
    return snaps, error


@pytest.mark.parametrize("name", list(EXTRA))
@pytest.mark.parametrize("bad_call", ["extrapolation", "step"])
def test_extragradient_raise_and_skip(name, bad_call):
    good = [("extrapolation", GOOD[0]), ("step", GOOD[1])]
    bad = ("extrapolation", BAD["nan"]) if bad_call == "extrapolation" else ("step", BAD["inf"])
    # the bad call comes first (an extrapolation) or in place of the pair's step: a skipped
    # step keeps the saved theta_t, so the next finite step completes the pair
    calls = [bad] + good if bad_call == "extrapolation" else [good[0], bad, good[1]]
    i = calls.index(bad)
    clean, _ = _extra_run(name, "propagate", good)
    start, _ = _extra_run(name, "propagate", [])

    for policy in ("raise", "skip"):
        snaps, error = _extra_run(name, policy, calls)
        if i:  # the bad call changed nothing (the counter aside)
            assert_same(snaps[i], snaps[i - 1], ignore=("param_groups",))
        else:
            assert_same(snaps[0]["x"], _plain(torch.tensor(X0)))
            assert snaps[0]["state"]["state"] == {} and snaps[0]["copy"] == []
        if policy == "raise":
            assert isinstance(error, FloatingPointError) and name in str(error)
        else:
            assert error is None
            assert snaps[i]["state"]["param_groups"][0]["nonfinite_skips"] == 1
        # the finite calls land where a run that never saw the bad one lands, bitwise
        assert_same(snaps[-1]["x"], clean[-1]["x"])
        assert_same(snaps[-1]["state"]["state"], clean[-1]["state"]["state"])

    propagated, _ = _extra_run(name, "propagate", calls[:i + 1])  # torch's behaviour: NaN/inf
    assert not np.all(np.isfinite(propagated[-1]["x"]))
