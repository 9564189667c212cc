"""Portable checkpoints of constrained learning ("uniopt.constrained/1") across the faces.

The dual side of Cooper-style constrained learning: a dense inequality multiplier (projected
onto >= 0) and an indexed equality multiplier (sampled rows, repeated indices summed), two
penalty coefficients (a scalar dense one, an indexed one), and the dual optimizer: projected
SGD ascent or nuPI. For each dual optimizer, dtype and ordered pair of faces (A, B): A takes N
dual steps, exports, the checkpoint goes through an ``.npz``, B restores it and takes M more
steps; the result is compared with A's uninterrupted N + M steps (float64: 1e-12 relative;
float32: 4 ulps of the largest entry; same face: bit for bit). The violations are the same NumPy arrays on every
face, so a difference can only come from the dual updates or the checkpoint. The state B
exports right after the restore is the saved one exactly.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
import torch

from uniopt import checkpoint
from uniopt.checkpoint import CheckpointError
from uniopt.constrained import indexed_projected_ascent_, nuPI as NpNuPI, projected_ascent_
from uniopt.adapters.jax import checkpoint as jax_checkpoint
from uniopt.adapters.jax import constrained as jc
from uniopt.adapters.torch import checkpoint as torch_checkpoint
from uniopt.adapters.torch.constrained import ConstraintType
from uniopt.adapters.torch.constrained import multipliers as tm
from uniopt.adapters.torch.constrained import penalty_coefficients as tp
from uniopt.adapters.torch.constrained.optim import nuPI as TorchNuPI

FACES = ("torch", "numpy", "jax")
N, M = 3, 3
DENSE, ROWS, K = 3, 5, 4  # dense multiplier size, indexed table rows, rows sampled per step
LR = 0.3
NUPI = dict(Kp=0.7, Ki=0.9, ema_nu=0.4, weight_decay=0.05)


def _violations(t: int, dtype):
    """Step ``t``'s violations: dense ``(3,)``; indexed rows ``(4,)`` (a repeat) and values."""
    rng = np.random.default_rng(100 + t)
    dense = rng.standard_normal(DENSE).astype(dtype)
    rows = rng.integers(0, ROWS, K)
    rows[-1] = rows[0]  # a repeated row: its violations add up
    return dense, rows.astype(np.int64), rng.standard_normal(K).astype(dtype)


def _start(dtype, fresh: bool):
    """Initial multipliers and penalty coefficients (``fresh``: other values, overwritten by a
    restore)."""
    if fresh:
        return (np.zeros(DENSE, dtype), np.zeros(ROWS, dtype), np.array(1.0, dtype),
                np.ones(ROWS, dtype))
    rng = np.random.default_rng(3)
    return (np.array([0.2, 0.0, 0.5], dtype), rng.standard_normal(ROWS).astype(dtype),
            np.array(2.5, dtype), rng.uniform(0.5, 2.0, ROWS).astype(dtype))


# ----------------------------------------------------------------------------------------------
# One runner per face: step(t), export(), restore(ckpt), values()
# ----------------------------------------------------------------------------------------------
class TorchRunner:
    def __init__(self, opt: str, dtype, fresh=False):
        a, b, c, d = _start(dtype, fresh)
        self.a = tm.DenseMultiplier(init=torch.from_numpy(a))
        self.a.set_constraint_type(ConstraintType.INEQUALITY)
        self.b = tm.IndexedMultiplier(init=torch.from_numpy(b))
        self.b.set_constraint_type(ConstraintType.EQUALITY)
        self.pens = [tp.DensePenaltyCoefficient(torch.from_numpy(c)),
                     tp.IndexedPenaltyCoefficient(torch.from_numpy(d))]
        params = [self.a.weight, self.b.weight]
        self.opt = (torch.optim.SGD(params, lr=LR, maximize=True) if opt == "sgd"
                    else TorchNuPI(params, lr=LR, maximize=True, **NUPI))
        self.dtype = dtype

    def step(self, t):
        dense, rows, values = _violations(t, self.dtype)
        self.opt.zero_grad()
        lagrangian = ((self.a() * torch.from_numpy(dense)).sum()
                      + (self.b(torch.from_numpy(rows)) * torch.from_numpy(values)).sum())
        lagrangian.backward()  # the indexed multiplier's gradient is sparse (embedding)
        self.opt.step()
        self.a.post_step_()
        self.b.post_step_()

    def export(self):
        return torch_checkpoint.export_constrained([self.a, self.b], self.opt,
                                                   penalty_coefficients=self.pens)

    def restore(self, ckpt):
        torch_checkpoint.restore_constrained([self.a, self.b], self.opt, ckpt,
                                             penalty_coefficients=self.pens)

    def values(self):
        return [self.a.weight.detach().numpy().copy(), self.b.weight.detach().numpy().reshape(-1)]


class NumpyRunner:
    def __init__(self, opt: str, dtype, fresh=False):
        self.a, self.b, self.c, self.d = _start(dtype, fresh)
        self.kind, self.dtype, self.lr = opt, dtype, LR
        self.opt = None
        if opt == "nupi":  # one nonnegative flag per group: the inequality multiplier alone
            self.opt = NpNuPI([{"params": [self.a], "nonnegative": True},
                               {"params": [self.b], "nonnegative": False}],
                              lr=LR, maximize=True, **NUPI)

    def step(self, t):
        dense, rows, values = _violations(t, self.dtype)
        if self.opt is None:
            projected_ascent_(self.a, dense, self.lr, nonnegative=True)
            indexed_projected_ascent_(self.b, rows, values, self.lr, nonnegative=False)
        else:
            self.opt.step([dense, (rows, values)])

    def export(self):
        return checkpoint.export_constrained(
            [self.a, self.b], self.opt, lr=self.lr if self.opt is None else None,
            kinds=["dense", "indexed"], constraint_types=["inequality", "equality"],
            penalty_coefficients=[self.c, self.d], penalty_kinds=["dense", "indexed"])

    def restore(self, ckpt):
        info = checkpoint.restore_constrained(ckpt, [self.a, self.b], self.opt,
                                              penalty_coefficients=[self.c, self.d])
        assert info["nonnegative"] == [True, False]
        assert info["kinds"] == ["dense", "indexed"]
        self.lr = info["lr"]

    def values(self):
        return [self.a.copy(), self.b.copy()]


class JaxRunner:
    def __init__(self, opt: str, dtype, fresh=False):
        a, b, c, d = _start(dtype, fresh)
        self.ms = {"a": jc.DenseMultiplier(init=jnp.asarray(a),
                                           constraint_type=jc.ConstraintType.INEQUALITY),
                   "b": jc.IndexedMultiplier(init=jnp.asarray(b),
                                             constraint_type=jc.ConstraintType.EQUALITY)}
        self.pens = [jc.DensePenaltyCoefficient(jnp.asarray(c)),
                     jc.IndexedPenaltyCoefficient(jnp.asarray(d))]
        self.kw = ({"learning_rate": LR} if opt == "sgd"
                   else {"learning_rate": LR, "maximize": True, **NUPI})
        self.tx = jc.projected_ascent(LR) if opt == "sgd" else jc.nupi(**self.kw)
        self.state = self.tx.init(self.ms)
        self.dtype = dtype

    def step(self, t):
        dense, rows, values = _violations(t, self.dtype)
        a, b = self.ms["a"], self.ms["b"]
        grads = {"a": a.replace(weight=jnp.asarray(dense)),
                 "b": b.replace(weight=jnp.zeros(ROWS, self.dtype).at[rows].add(values))}
        observed = {"a": a.replace(weight=jnp.ones(DENSE, bool)),
                    "b": b.replace(weight=jnp.zeros(ROWS, bool).at[rows].set(True))}
        updates, self.state = self.tx.update(grads, self.state, self.ms, observed=observed)
        self.ms = optax.apply_updates(self.ms, updates)

    def export(self):
        return jax_checkpoint.export_constrained(self.ms, self.state, **self.kw,
                                                 penalty_coefficients=self.pens)

    def restore(self, ckpt):
        self.ms, self.tx, self.state, self.pens = jax_checkpoint.restore_constrained(
            ckpt, self.ms, penalty_coefficients=self.pens)
        self.kw = jax_checkpoint.constrained_transform_kwargs(ckpt)

    def values(self):
        return [np.asarray(self.ms["a"].weight), np.asarray(self.ms["b"].weight)]


RUNNERS = {"torch": TorchRunner, "numpy": NumpyRunner, "jax": JaxRunner}


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _close(actual, expected, dtype):
    for x, y in zip(actual, expected):
        assert x.dtype == y.dtype == dtype
        if dtype == np.float64:
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
        else:  # 4 ulps of the array's scale: near a cancellation (a multiplier crossing 0)
            # the faces' own float32 arithmetic differs by that much (XLA contracts a*b+c)
            scale = np.spacing(np.max(np.abs(y)).astype(dtype))
            np.testing.assert_array_less(np.abs(x - y), 4 * scale + np.spacing(np.abs(y)))


def _same_state(theirs: dict, ours: dict, *, skip=("step", "n_groups")):
    """Two checkpoints hold the same state: arrays bit for bit, every other value equal (the
    group structure aside: the NumPy nuPI keeps one group per ``nonnegative`` flag)."""
    theirs, ours = checkpoint.validate(theirs), checkpoint.validate(ours)
    for ckpt in (theirs, ours):
        for key in [k for k in ckpt if k.startswith("group") and not k.startswith("group0.")]:
            del ckpt[key]
        ckpt.pop("group0.params")
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        if key in skip:
            continue
        a, b = theirs[key], ours[key]
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:
            assert a == b, (key, a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("opt", ["sgd", "nupi"])
def test_resume_across_faces(tmp_path, opt, dtype):
    """Every ordered pair of faces (same face included): A for N steps, save, load, B for M."""
    for source in FACES:
        uninterrupted = RUNNERS[source](opt, dtype)
        for t in range(N + M):
            uninterrupted.step(t)
        expected = uninterrupted.values()
        first = RUNNERS[source](opt, dtype)
        for t in range(N):
            first.step(t)
        written = first.export()
        assert written["format"] == "uniopt.constrained/1" and written["optimizer"] == opt
        path = tmp_path / f"{source}.npz"
        checkpoint.save(path, written)
        ckpt = checkpoint.load(path)
        _same_state(ckpt, written, skip=())
        for target in FACES:
            second = RUNNERS[target](opt, dtype, fresh=True)
            second.restore(ckpt)
            _same_state(second.export(), ckpt)  # the restored state is the saved one, exactly
            for t in range(N, N + M):
                second.step(t)
            got = second.values()
            _close(got, expected, dtype)
            if source == target:
                for x, y in zip(got, expected):
                    np.testing.assert_array_equal(x, y, err_msg=f"{source} -> {target}")


def test_the_format_holds_the_dual_state():
    """The keys of a nuPI checkpoint, against a hand-computed first step of each multiplier."""
    runner = TorchRunner("nupi", np.float64)
    runner.step(0)
    ckpt = runner.export()
    dense, rows, values = _violations(0, np.float64)
    a0, b0, c0, d0 = _start(np.float64, False)
    # SGD initialisation: the first step is Ki * e (plus decoupled decay), xi = e
    lr, ki, wd = LR, NUPI["Ki"], NUPI["weight_decay"]
    np.testing.assert_allclose(ckpt["multiplier0.weight"],
                               np.maximum(a0 + lr * ki * dense - lr * wd * a0, 0), rtol=1e-14)
    np.testing.assert_array_equal(ckpt["multiplier0.xi"], dense)
    assert not ckpt["multiplier0.needs_error_initialization_mask"].any()
    e = np.zeros(ROWS)
    np.add.at(e, rows, values)
    hit = np.zeros(ROWS, bool)
    hit[rows] = True
    np.testing.assert_allclose(ckpt["multiplier1.weight"][hit],
                               (b0 + lr * ki * e - lr * wd * b0)[hit], rtol=1e-14)
    np.testing.assert_array_equal(ckpt["multiplier1.weight"][~hit], b0[~hit])
    np.testing.assert_array_equal(ckpt["multiplier1.needs_error_initialization_mask"], ~hit)
    assert ckpt["multiplier1.weight"].shape == (ROWS,)  # torch's (m, 1) table, stored flat
    assert (ckpt["multiplier0.kind"], ckpt["multiplier1.kind"]) == ("dense", "indexed")
    assert (ckpt["multiplier0.constraint_type"], ckpt["multiplier1.constraint_type"]) == (
        "inequality", "equality")
    assert ckpt["group0.init_type"] == "sgd" and ckpt["group0.maximize"] is True
    assert ckpt["group0.Kp"] == NUPI["Kp"] and ckpt["group0.params"].tolist() == [0, 1]
    assert float(ckpt["penalty_coefficient0.value"]) == float(c0)
    np.testing.assert_array_equal(ckpt["penalty_coefficient1.init"], d0)


def test_sgd_momentum_resumes_in_torch_and_is_refused_elsewhere(tmp_path):
    """Cooper's dual SGD with momentum: its buffer travels; NumPy and JAX have no equivalent."""
    def run(steps, opt=None, ms=None):
        ms = ms or [tm.DenseMultiplier(init=torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))]
        ms[0].set_constraint_type(ConstraintType.INEQUALITY)
        opt = opt or torch.optim.SGD([ms[0].weight], lr=0.2, momentum=0.9, dampening=0.1,
                                     maximize=True)
        for t in steps:
            opt.zero_grad()
            (ms[0]() * torch.from_numpy(_violations(t, np.float64)[0])).sum().backward()
            opt.step()
            ms[0].post_step_()
        return ms, opt

    expected = run(range(N + M))[0][0].weight.detach().clone()
    ms, opt = run(range(N))
    path = tmp_path / "sgd.npz"
    checkpoint.save(path, torch_checkpoint.export_constrained(ms, opt))
    ckpt = checkpoint.load(path)
    np.testing.assert_array_equal(ckpt["multiplier0.momentum_buffer"],
                                  opt.state[ms[0].weight]["momentum_buffer"].numpy())
    ms2 = [tm.DenseMultiplier(num_constraints=3, dtype=torch.float64)]
    opt2 = torch.optim.SGD([ms2[0].weight], lr=1.0, maximize=True)
    torch_checkpoint.restore_constrained(ms2, opt2, ckpt)
    assert opt2.param_groups[0]["momentum"] == 0.9 and opt2.param_groups[0]["dampening"] == 0.1
    ms2, _ = run(range(N, N + M), opt2, ms2)
    torch.testing.assert_close(ms2[0].weight.detach(), expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="momentum=0.9"):
        checkpoint.restore_constrained(ckpt, [np.zeros(3)])
    with pytest.raises(CheckpointError, match="momentum=0.9"):
        jax_checkpoint.restore_constrained(ckpt, [jc.DenseMultiplier(3)])


def _nupi_ckpt():
    runner = NumpyRunner("nupi", np.float64)
    runner.step(0)
    return runner.export()


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("multiplier1.xi"), "missing keys"),
    (lambda c: c.update({"optimizer": "adam"}), "'adam'"),
    (lambda c: c.update({"multiplier0.kind": "implicit"}), "'implicit'"),
    (lambda c: c.update({"multiplier0.constraint_type": "ineq"}), "'ineq'"),
    (lambda c: c.update({"multiplier0.xi": np.zeros(4)}), "multiplier0.xi"),
    (lambda c: c.update({"multiplier1.needs_error_initialization_mask": np.zeros(ROWS)}),
     "needs_error_initialization_mask"),
    (lambda c: c.update({"multiplier0.momentum_buffer": np.zeros(DENSE)}), "not state of"),
    (lambda c: c.update({"multiplier0.weight": np.zeros((DENSE, 1))}), "multiplier0.weight"),
    (lambda c: c.update({"group0.params": np.array([0, 0])}), "exactly once"),
    (lambda c: c.update({"group0.init_type": "ones"}), "'ones'"),
    (lambda c: c.update({"group0.Kp": "big"}), "group0.Kp"),
    (lambda c: c.pop("penalty_coefficient1.init"), "missing keys"),
    (lambda c: c.update({"format": "uniopt.constrained/2"}), "Unsupported checkpoint version"),
])
def test_bad_checkpoints_are_refused(change, match):
    ckpt = dict(_nupi_ckpt())
    change(ckpt)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.validate(ckpt)


def test_a_checkpoint_that_does_not_fit_changes_nothing():
    ckpt = _nupi_ckpt()
    # torch: an SGD dual optimizer for a nuPI checkpoint; a table of another size
    runner = TorchRunner("sgd", np.float64, fresh=True)
    before = [v.copy() for v in runner.values()]
    with pytest.raises(CheckpointError, match="'nupi' dual optimizer checkpoint into SGD"):
        runner.restore(ckpt)
    b = tm.IndexedMultiplier(init=torch.zeros(ROWS + 1, dtype=torch.float64))
    opt = TorchNuPI([runner.a.weight, b.weight], lr=LR)
    with pytest.raises(CheckpointError, match="indexed of size 5, the target's indexed of size 6"):
        torch_checkpoint.restore_constrained([runner.a, b], opt, ckpt,
                                             penalty_coefficients=runner.pens)
    with pytest.raises(TypeError, match="ImplicitMultiplier"):
        torch_checkpoint.export_constrained([_Implicit()], runner.opt)
    for x, y in zip(runner.values(), before):
        np.testing.assert_array_equal(x, y)
    assert not opt.state
    # NumPy: a group mixing inequality and equality multipliers; no penalty targets
    a, b = np.zeros(DENSE), np.zeros(ROWS)
    with pytest.raises(CheckpointError, match="inequality and equality"):
        checkpoint.restore_constrained(ckpt, [a, b], NpNuPI([a, b], lr=LR),
                                       penalty_coefficients=[np.zeros(()), np.zeros(ROWS)])
    with pytest.raises(CheckpointError, match="penalty coefficients of sizes"):
        checkpoint.restore_constrained(ckpt, [a, b], NpNuPI([{"params": [a], "nonnegative": True},
                                                             {"params": [b]}], lr=LR))
    assert not a.any() and not b.any()
    # JAX: kinds swapped; an equality target for an inequality multiplier
    ms = {"a": jc.IndexedMultiplier(DENSE), "b": jc.DenseMultiplier(ROWS)}
    with pytest.raises(CheckpointError, match="multiplier 0: dense"):
        jax_checkpoint.restore_constrained(ckpt, ms)
    ms = {"a": jc.DenseMultiplier(DENSE, constraint_type=jc.ConstraintType.EQUALITY),
          "b": jc.IndexedMultiplier(ROWS)}
    with pytest.raises(CheckpointError, match="inequality multiplier, the target's equality"):
        jax_checkpoint.restore_constrained(ckpt, ms)


class _Implicit(tm.ImplicitMultiplier):
    def forward(self, features):  # pragma: no cover - never called
        return features

    def post_step_(self):  # pragma: no cover
        pass


def test_reading_a_constrained_checkpoint_needs_neither_torch_nor_jax(tmp_path):
    """A torch-written nuPI checkpoint loads and resumes in NumPy with torch and JAX blocked."""
    runner = TorchRunner("nupi", np.float64)
    for t in range(N):
        runner.step(t)
    path = tmp_path / "cooper.npz"
    checkpoint.save(path, runner.export())
    runner.step(N)
    expected = [v.tolist() for v in runner.values()]
    dense, rows, values = _violations(N, np.float64)
    script = f"""
import sys
for name in ("torch", "jax", "jaxlib", "optax"):
    sys.modules[name] = None          # importing any of them now fails
import numpy as np
from uniopt import checkpoint
from uniopt.constrained import nuPI
ckpt = checkpoint.load({str(path)!r})
assert ckpt["format"] == "uniopt.constrained/1" and ckpt["optimizer"] == "nupi"
a, b = np.zeros({DENSE}), np.zeros({ROWS})
opt = nuPI([{{"params": [a], "nonnegative": True}}, {{"params": [b]}}], lr=1.0)
checkpoint.restore_constrained(ckpt, [a, b], opt,
                               penalty_coefficients=[np.zeros(()), np.zeros({ROWS})])
opt.step([np.array({dense.tolist()!r}), (np.array({rows.tolist()!r}), np.array({values.tolist()!r}))])
np.testing.assert_allclose(a, {expected[0]!r}, rtol=1e-12, atol=1e-14)
np.testing.assert_allclose(b, {expected[1]!r}, rtol=1e-12, atol=1e-14)
assert not any(m.split(".")[0] in ("torch", "jax", "optax") for m, v in sys.modules.items() if v is not None)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_cmp_resumes_as_a_jax_constraints_mapping():
    """torch: a CMP (registration order) -> JAX: a constraints mapping (sorted names) and back;
    the multipliers, penalty coefficients and nuPI state land on the same constraints."""
    import uniopt.adapters.torch.constrained as cooper

    class Problem(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.a = cooper.Constraint(
                cooper.ConstraintType.INEQUALITY, cooper.formulations.AugmentedLagrangian,
                multiplier=tm.DenseMultiplier(init=torch.tensor([0.5, 1.5], dtype=torch.float64)),
                penalty_coefficient=tp.DensePenaltyCoefficient(torch.tensor(3.0, dtype=torch.float64)))
            self.b = cooper.Constraint(
                cooper.ConstraintType.EQUALITY,
                multiplier=tm.IndexedMultiplier(init=torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)))

        def compute_cmp_state(self):  # pragma: no cover - not used
            raise NotImplementedError

    cmp = Problem()
    dual = TorchNuPI(cmp.dual_parameters(), lr=0.1, Kp=0.5, maximize=True)
    cmp.a.multiplier.weight.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    dual.step()
    ckpt = torch_checkpoint.export_constrained(cmp, dual)
    assert ckpt["n_penalty_coefficients"] == 1 and ckpt["multiplier1.kind"] == "indexed"
    constraints = {
        "a": jc.Constraint(jc.ConstraintType.INEQUALITY, jc.augmented_lagrangian,
                           multiplier=jc.DenseMultiplier(2),
                           penalty_coefficient=jc.DensePenaltyCoefficient(jnp.asarray(1.0))),
        "b": jc.Constraint(jc.ConstraintType.EQUALITY, multiplier=jc.IndexedMultiplier(3))}
    restored, tx, state, pens = jax_checkpoint.restore_constrained(ckpt, constraints)
    np.testing.assert_array_equal(restored["a"].multiplier.weight, cmp.a.multiplier.weight.detach())
    np.testing.assert_array_equal(restored["b"].multiplier.weight, [1.0, -2.0, 4.0])
    assert float(restored["a"].penalty_coefficient.value) == 3.0 and float(pens["a"].value) == 3.0
    np.testing.assert_array_equal(state.xi["a"].weight, [1.0, -1.0])
    assert bool(state.fresh["b"].weight.all()) and not bool(state.fresh["a"].weight.any())
    back = jax_checkpoint.export_constrained(restored, state,
                                             **jax_checkpoint.constrained_transform_kwargs(ckpt))
    _same_state(back, ckpt)
