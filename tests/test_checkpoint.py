"""Portable checkpoints: every family resumes across the torch, NumPy and JAX faces.

For each family and each ordered pair of faces (A, B): run A for N steps, export, save to
``.npz``, load, restore into B, run B for M more steps, and compare with A run for N + M steps
without interruption (float64: 1e-12 relative; float32: a few ulps). The state B exports right
after the restore is the saved one exactly (every array bit for bit, every hyper-parameter).
The gradients and constraint values are the same NumPy arrays on every face (a fixed
quadratic), so any difference comes from the optimizers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
import torch

import uniopt
from uniopt import checkpoint
from uniopt.adapters import jax as ujax
from uniopt.adapters import torch as utorch
from uniopt.adapters.jax import checkpoint as jax_checkpoint
from uniopt.adapters.torch import checkpoint as torch_checkpoint

FACES = ("torch", "numpy", "jax")
FAMILIES = ("qhm", "qhadam", "qhadamw", "polyak", "ialm")
N, M = 3, 3
SHAPES = [(3,), (2, 2)]
IALM_SIZES = [2, 3]

QHM = dict(lr=0.3, momentum=0.8, nu=0.6, weight_decay=0.05, weight_decay_type="grad")
QHADAM = dict(lr=0.05, betas=(0.8, 0.95), nus=(0.7, 0.9), weight_decay=0.02, eps=1e-6)
POLYAK = dict(fun_min=0.0, max_stepsize=0.7, delta=1e-3, momentum=0.5)
IALM_GROUPS = [dict(beta=0.5, sigma=1.1, gamma=0.7, momentum=0.5, dampening=0.1,
                    dual_range=(-3.0, 3.0), is_ineq=False),
               dict(beta=0.8, sigma=1.05, gamma=2.0, momentum=0.0, dampening=0.0,
                    dual_range=(None, 2.5), is_ineq=True)]


# ----------------------------------------------------------------------------------------------
# The problem: f = sum_i 0.5 * a_i (x_i - c_i)^2, gradients and loss computed in NumPy
# ----------------------------------------------------------------------------------------------
def _problem(dtype):
    rng = np.random.default_rng(7)
    x0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    a = [rng.uniform(0.5, 2.0, s).astype(dtype) for s in SHAPES]
    c = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    return x0, a, c


def _grads(xs, a, c):
    return [ai * (x - ci) for x, ai, ci in zip(xs, a, c)]


def _loss(xs, a, c) -> float:
    return float(sum(np.sum(0.5 * ai.astype(np.float64) * (x.astype(np.float64) - ci) ** 2)
                     for x, ai, ci in zip(xs, a, c)))


def _constraints(t, dtype):
    out, start = [], 0
    for n in IALM_SIZES:
        out.append((np.sin(0.7 * t + np.arange(start, start + n)) * 1.5 + 0.2).astype(dtype))
        start += n
    return out


# ----------------------------------------------------------------------------------------------
# One runner per face: step(t), params(), export(), restore(ckpt)
# ----------------------------------------------------------------------------------------------
class TorchRunner:
    def __init__(self, family, dtype):
        self.family, self.dtype = family, dtype
        x0, self.a, self.c = _problem(dtype)
        if family == "ialm":
            g0, g1 = IALM_GROUPS
            self.opt = utorch.iALM(m=IALM_SIZES[0], penalty=None, ctol=1e-3, init_duals=torch.zeros(
                IALM_SIZES[0], dtype=torch.float64 if dtype == np.float64 else torch.float32),
                **{k: g0[k] for k in ("beta", "sigma", "gamma", "momentum", "dampening", "dual_range",
                                      "is_ineq")})
            self.opt.add_constraint_group(IALM_SIZES[1], **{k: g1[k] for k in g1},
                                          init_duals=torch.zeros(IALM_SIZES[1], dtype=self.opt.param_groups[0]["params"][0].dtype))
            return
        self.ps = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in x0]
        if family == "qhm":
            self.opt = utorch.QHM(self.ps, **QHM)
        elif family == "qhadam":
            self.opt = utorch.QHAdam(self.ps, **QHADAM)
        elif family == "qhadamw":
            self.opt = utorch.QHAdamW(self.ps, **QHADAM)
        else:
            self.opt = utorch.PolyakSGD(self.ps, **POLYAK)

    def params(self):
        if self.family == "ialm":
            return [g["params"][0].detach().numpy().copy() for g in self.opt.param_groups]
        return [p.detach().numpy().copy() for p in self.ps]

    def step(self, t):
        if self.family == "ialm":
            self.opt.update([torch.from_numpy(c) for c in _constraints(t, self.dtype)])
            return
        xs = self.params()
        for p, g in zip(self.ps, _grads(xs, self.a, self.c)):
            p.grad = torch.from_numpy(g)
        if self.family == "polyak":
            self.opt.step(loss=_loss(xs, self.a, self.c))
        else:
            self.opt.step()

    def export(self):
        return torch_checkpoint.export(self.opt)

    def restore(self, ckpt):
        torch_checkpoint.restore(self.opt, ckpt)


class NumpyRunner:
    def __init__(self, family, dtype):
        self.family, self.dtype = family, dtype
        x0, self.a, self.c = _problem(dtype)
        if family == "ialm":
            g0, g1 = IALM_GROUPS
            self.opt = uniopt.iALM(m=IALM_SIZES[0], penalty=None, ctol=1e-3,
                                   init_duals=np.zeros(IALM_SIZES[0], dtype),
                                   **{k: g0[k] for k in ("beta", "sigma", "gamma", "momentum",
                                                         "dampening", "dual_range", "is_ineq")})
            self.opt.add_constraint_group(IALM_SIZES[1], init_duals=np.zeros(IALM_SIZES[1], dtype), **g1)
            return
        self.xs = [x.copy() for x in x0]
        if family == "qhm":
            self.opt = uniopt.QHM(self.xs, **QHM)
        elif family == "qhadam":
            self.opt = uniopt.QHAdam(self.xs, **QHADAM)
        elif family == "qhadamw":
            self.opt = uniopt.QHAdamW(self.xs, **QHADAM)
        else:
            self.opt = uniopt.PolyakSGD(lambda xs: (_loss(xs, self.a, self.c), _grads(xs, self.a, self.c)),
                                        **POLYAK)
            self.state = self.opt.init_state(self.xs)

    def params(self):
        if self.family == "ialm":
            return [g["duals"].copy() for g in self.opt.param_groups]
        return [x.copy() for x in self.xs]

    def step(self, t):
        if self.family == "ialm":
            self.opt.update(_constraints(t, self.dtype))
        elif self.family == "polyak":
            self.xs, self.state = self.opt.update(self.xs, self.state)
        else:
            self.opt.step(_grads(self.xs, self.a, self.c))

    def export(self):
        if self.family == "polyak":
            return checkpoint.export(self.opt, self.state, self.xs)
        return checkpoint.export(self.opt)

    def restore(self, ckpt):
        if self.family == "polyak":
            self.opt, self.state = checkpoint.restore(self.opt, ckpt, self.xs)
        else:
            checkpoint.restore(self.opt, ckpt)


_JITTED: dict = {}


def _jitted(family, dtype, tx):
    """One jitted ``tx.update`` per family and dtype (compiled once).

    Every runner of a family has the same hyper-parameters (a restored transform is built
    from the checkpoint's, which ``_same_state`` compares with the source's; iALM's ``beta``
    only sets the initial state), so the first runner's transform serves them all.
    """
    key = (family, np.dtype(dtype).name)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(tx.update)
    return _JITTED[key]


class JaxRunner:
    def __init__(self, family, dtype):
        self.family, self.dtype = family, dtype
        x0, self.a, self.c = _problem(dtype)
        if family == "ialm":
            self.kw = dict(penalty=None, ctol=1e-3,
                           **{k: [g[k] for g in IALM_GROUPS] for k in IALM_GROUPS[0]})
            self.tx = ujax.ialm(**self.kw)
            self.state = self.tx.init(_constraints(0, dtype))
            return
        self.xs = [jnp.asarray(x) for x in x0]
        if family == "qhm":
            self.kw = {"learning_rate": QHM["lr"], **{k: v for k, v in QHM.items() if k != "lr"}}
            self.tx = ujax.qhm(**self.kw)
        elif family in ("qhadam", "qhadamw"):
            self.kw = {"learning_rate": QHADAM["lr"], **{k: v for k, v in QHADAM.items() if k != "lr"},
                       "decouple_weight_decay": family == "qhadamw"}
            self.tx = ujax.qhadam(**self.kw)
        else:
            self.kw = dict(max_learning_rate=POLYAK["max_stepsize"], f_min=POLYAK["fun_min"],
                           eps=POLYAK["delta"], momentum=POLYAK["momentum"])
            self.tx = ujax.polyak_sgd(**self.kw)
        self.state = self.tx.init(self.xs)

    def params(self):
        if self.family == "ialm":
            return [np.asarray(d) for d in self.state.duals]
        return [np.asarray(x) for x in self.xs]

    def step(self, t):
        update = _jitted(self.family, self.dtype, self.tx)
        if self.family == "ialm":
            self.state = update([jnp.asarray(c) for c in _constraints(t, self.dtype)], self.state)
            return
        xs = self.params()
        grads = [jnp.asarray(g) for g in _grads(xs, self.a, self.c)]
        extra = {"value": jnp.asarray(_loss(xs, self.a, self.c))} if self.family == "polyak" else {}
        updates, self.state = update(grads, self.state, self.xs, **extra)
        self.xs = optax.apply_updates(self.xs, updates)

    def export(self):
        if self.family == "ialm":
            return jax_checkpoint.export(self.state, **self.kw)
        return jax_checkpoint.export(self.state, self.xs, **self.kw)

    def restore(self, ckpt):
        like = [jnp.asarray(c) for c in _constraints(0, self.dtype)] if self.family == "ialm" else self.xs
        self.tx, self.state = jax_checkpoint.restore(ckpt, like)
        self.kw = jax_checkpoint.transform_kwargs(ckpt)


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
        else:
            np.testing.assert_array_max_ulp(x, y, maxulp=4)


def _same_state(theirs: dict, ours: dict, *, skip=("step",), weights32=False):
    """Two checkpoints hold the same state: arrays bit for bit, every other value equal.

    ``weights32``: QHAdam's bias weights and iALM's ``beta`` compared in float32 (the JAX
    states keep them in the float32 of the leaves, the torch and NumPy faces as Python floats).
    """
    theirs, ours = checkpoint.validate(theirs), checkpoint.validate(ours)
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        if key in skip:
            continue
        a, b = theirs[key], ours[key]
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:
            if weights32 and (key.endswith("_weight") or key.endswith(".beta")):
                a, b = np.float32(a), np.float32(b)
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (key, a, b)


def _copy_params(runner, values):
    """Give ``runner`` the parameters ``values`` (they travel with the model, not the optimizer)."""
    if runner.family == "ialm":
        return
    if isinstance(runner, TorchRunner):
        with torch.no_grad():
            for p, x in zip(runner.ps, values):
                p.copy_(torch.from_numpy(np.array(x)))
    elif isinstance(runner, NumpyRunner):
        for y, x in zip(runner.xs, values):
            y[...] = x
    else:
        runner.xs = [jnp.asarray(x) for x in values]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_across_faces(tmp_path, family, dtype):
    """Every ordered pair of faces (same face included): A for N steps, save, load, B for M."""
    for source in FACES:
        uninterrupted = RUNNERS[source](family, dtype)
        for t in range(N + M):
            uninterrupted.step(t)
        expected = uninterrupted.params()
        first = RUNNERS[source](family, dtype)
        for t in range(N):
            first.step(t)
        written = first.export()
        path = tmp_path / f"{source}.npz"
        checkpoint.save(path, written)
        ckpt = checkpoint.load(path)
        _same_state(ckpt, written, skip=())
        for target in FACES:
            second = RUNNERS[target](family, dtype)
            second.restore(ckpt)
            # the restored state is the saved one, exactly
            _same_state(second.export(), ckpt, weights32=target == "jax" and dtype == np.float32)
            _copy_params(second, first.params())
            for t in range(N, N + M):
                second.step(t)
            got = second.params()
            _close(got, expected, dtype)
            if source == target:  # same face: bit for bit
                for x, y in zip(got, expected):
                    np.testing.assert_array_equal(x, y, err_msg=f"{source} -> {target}")
