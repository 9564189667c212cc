"""Two optimizers stepping in two Python threads give exactly the sequential results.

Each family with Numba kernels (QH, Polyak, iALM, nuPI; NumPy and torch faces) runs two
optimizers on separate parameters, once one after the other and once in two threads started
together (a barrier before every step, so the kernel calls overlap), with the parallel kernel
variants forced on (``uniopt._jit.PARALLEL_MIN_SIZE = 0``: every kernel call takes the
``prange`` variant, read at call time by every face) and off (the serial variants). The
results must agree bit for bit: the kernels keep no global state, and the faces share nothing
mutable between optimizers.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import uniopt
from uniopt import _jit
from uniopt.adapters import torch as utorch
from uniopt.adapters.torch.constrained import optim as tcon_optim

N = 2_048  # enough entries for the parallel variants to split the work
STEPS = 12


@pytest.fixture(params=["parallel", "serial"])
def parallel(request, monkeypatch):
    monkeypatch.setattr(_jit, "PARALLEL_MIN_SIZE", 0 if request.param == "parallel" else 2**62)
    return request.param


def _grads(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=N) for _ in range(STEPS)]


# Each maker returns (step(k), result()) for the optimizer of thread ``seed``.
def _numpy_opt(cls, **kwargs):
    def make(seed):
        x = np.random.default_rng(100 + seed).normal(size=N)
        opt, grads = cls([x], **kwargs), _grads(seed)
        return (lambda k: opt.step([grads[k]])), (lambda: [x.copy(), opt.state_dict()["state"]])
    return make


def _numpy_polyak(seed):
    solver = uniopt.PolyakSGD(lambda w, g: (0.5 * float(w @ w), g), momentum=0.5)
    grads = _grads(seed)
    box = {"x": np.random.default_rng(100 + seed).normal(size=N)}
    box["state"] = solver.init_state(box["x"], grads[0])

    def step(k):
        box["x"], box["state"] = solver.update(box["x"], box["state"], grads[k])
    return step, lambda: [box["x"].copy(), box["state"].velocity, box["state"].stepsize]


def _numpy_ialm(seed):
    opt, grads = uniopt.iALM(N, beta=2.0, gamma=5.0, momentum=0.5), _grads(seed)
    return (lambda k: opt.update(grads[k])), (lambda: [opt.param_groups[0]["duals"].copy(),
                                                       opt.param_groups[0]["momentum_buffer"].copy()])


def _torch_opt(cls, polyak=False, **kwargs):
    def make(seed):
        w = torch.nn.Parameter(torch.tensor(np.random.default_rng(100 + seed).normal(size=N)))
        opt, grads = cls([w], **kwargs), _grads(seed)

        def step(k):
            w.grad = torch.tensor(grads[k])
            if polyak:
                opt.step(loss=torch.tensor(0.5 * float((w.detach() ** 2).sum())))
            else:
                opt.step()
        return step, lambda: [w.detach().numpy().copy(),
                              [{k: (v.numpy().copy() if isinstance(v, torch.Tensor) else v)
                                for k, v in s.items()} for s in opt.state.values()]]
    return make


def _torch_ialm(seed):
    opt, grads = utorch.iALM(N, beta=2.0, gamma=5.0, momentum=0.5), _grads(seed)
    return (lambda k: opt.update(torch.tensor(grads[k]))), (
        lambda: [opt.param_groups[0]["params"][0].detach().numpy().copy()])


FAMILIES = {
    "numpy-QHM": _numpy_opt(uniopt.QHM, lr=0.01, momentum=0.9, nu=0.7, weight_decay=0.01),
    "numpy-QHAdam": _numpy_opt(uniopt.QHAdam, lr=0.01, nus=(0.7, 1.0)),
    "numpy-nuPI": _numpy_opt(uniopt.constrained.nuPI, lr=0.01, Kp=0.5, ema_nu=0.3),
    "numpy-PolyakSGD": _numpy_polyak,
    "numpy-iALM": _numpy_ialm,
    "torch-QHM": _torch_opt(utorch.QHM, lr=0.01, momentum=0.9, nu=0.7, weight_decay=0.01),
    "torch-QHAdamW": _torch_opt(utorch.QHAdamW, lr=0.01, nus=(0.7, 1.0), weight_decay=0.01),
    "torch-nuPI": _torch_opt(tcon_optim.nuPI, lr=0.01, Kp=0.5, ema_nu=0.3),
    "torch-PolyakSGD": _torch_opt(utorch.PolyakSGD, polyak=True, momentum=0.5),
    "torch-iALM": _torch_ialm,
}


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_threads_equal_the_sequential_run(family, parallel):
    make = FAMILIES[family]
    sequential = [make(0), make(1)]
    for step, _ in sequential:
        for k in range(STEPS):
            step(k)
    expected = [result() for _, result in sequential]

    threaded = [make(0), make(1)]
    barrier, errors = threading.Barrier(2), []

    def work(i):
        try:
            for k in range(STEPS):
                barrier.wait()
                threaded[i][0](k)
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = [result() for _, result in threaded]
    _same(got, expected)
    assert not np.array_equal(np.asarray(got[0][0]), np.asarray(got[1][0]))  # two problems
