"""The torch optimizers on tensors that are not plain tensors: FSDP2 shards and wrapper subclasses.

Only the memory of plain tensors may reach a Numba kernel. A DTensor (``fully_shard``) runs on
its local shard; any other subclass takes the torch-ops path. The FSDP2 run uses two processes
(gloo, CPU, spawn) and compares with a single-process run of the same optimizer on the whole
model and the whole batch (each rank sees half of it; FSDP2 averages the gradients and
PolyakSGD averages the loss, so the two runs see the same numbers).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import torch

import uniopt.adapters.torch._dispatch as dispatch  # noqa: E402
from uniopt.adapters.torch import QHM, PolyakSGD, QHAdam, QHAdamW  # noqa: E402
from uniopt.kernels import qh_cpu  # noqa: E402

STEPS = 4
OPTIMIZERS = {
    "QHM": (QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01)),
    "QHAdam": (QHAdam, dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 1.0), weight_decay=0.01)),
    "QHAdamW": (QHAdamW, dict(lr=0.05, nus=(0.8, 0.9), weight_decay=0.1)),
    "PolyakSGD": (PolyakSGD, dict(max_stepsize=0.5, momentum=0.5)),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Linear(6, 1)'s weight has one row: rank 1's shard of it is empty
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randn(8, 1, generator=gen, dtype=torch.float64))


def _train(name: str, model, x, y) -> list:
    """``STEPS`` steps of optimizer ``name``; the Polyak step sizes (empty for the others)."""
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(model.parameters(), **kwargs)
    stepsizes = []

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
        if name == "PolyakSGD":
            stepsizes.append(opt.last_step[0]["stepsize"])
    return stepsizes


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        half = slice(rank * 4, rank * 4 + 4)
        results = {}
        for name in OPTIMIZERS:
            model = _model()
            fully_shard(model)
            assert all(dispatch.is_dtensor(p) for p in model.parameters())
            stepsizes = _train(name, model, x[half], y[half])
            results[name] = ([p.full_tensor().detach().clone() for p in model.parameters()],
                             stepsizes)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(out: str) -> None:
    """Run :func:`_worker` on two spawned ranks (called in a fresh interpreter, see below)."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    # A fresh interpreter started with -c: spawned ranks re-import the parent's __main__, and
    # under the pytest console script that would be pytest itself.
    out = str(tmp_path_factory.mktemp("fsdp"))
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_torch_distributed as t; "
            f"t.spawn_ranks({out!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_two_ranks_match_a_single_process_run(name, fsdp_results):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    stepsizes = _train(name, model, *_data())
    (params0, steps0), (params1, steps1) = fsdp_results[0][name], fsdp_results[1][name]
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)  # the ranks agree
    assert steps0 == steps1
    for mine, ref, start in zip(params0, model.parameters(), before):
        assert not torch.equal(ref.detach(), start)
        torch.testing.assert_close(mine, ref.detach(), rtol=1e-11, atol=1e-13)
    if name == "PolyakSGD":
        assert len(steps0) == STEPS and all(s > 0 for s in steps0)
        torch.testing.assert_close(torch.tensor(steps0), torch.tensor(stepsizes), rtol=1e-11, atol=0)


# ------------------------------------------------------------------------------------------------
# A wrapper subclass never reaches a kernel
# ------------------------------------------------------------------------------------------------
class Wrapped(torch.Tensor):
    """A ``__torch_dispatch__`` wrapper around an inner tensor (no storage of its own)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device,
                                                   requires_grad=inner.requires_grad)

    def __init__(self, inner):
        self.inner = inner

    def __repr__(self):
        return f"Wrapped({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {}))
        if func._schema.name.endswith("_") or "out" in (kwargs or {}):  # in place: the wrapper
            return args[0]
        return tree_map(lambda t: Wrapped(t) if type(t) is torch.Tensor else t, out)


def _unwrap(t):
    return t.inner if isinstance(t, Wrapped) else t


@pytest.mark.parametrize("cls, kwargs", [(QHAdam, OPTIMIZERS["QHAdam"][1]), (QHM, OPTIMIZERS["QHM"][1])])
def test_wrapper_subclass_takes_the_torch_path(cls, kwargs, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads = [[torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(3)]

    inner = values[0].clone()
    wrapped = torch.nn.Parameter(Wrapped(inner))
    plain = torch.nn.Parameter(values[1].clone())
    assert type(wrapped) is Wrapped
    seen = []
    table_name = "qhadam_table" if cls is QHAdam else "qhm_table"
    real_table = getattr(qh_cpu, table_name)

    def spy(parallel):
        kernel = real_table(parallel)

        def run(p_addrs, *args):
            seen.extend(int(a) for a in p_addrs)
            return kernel(p_addrs, *args)
        return run

    monkeypatch.setattr(qh_cpu, table_name, spy)
    opt = cls([wrapped, plain], **kwargs)
    for g in grads:
        wrapped.grad = Wrapped(g[0].clone())
        plain.grad = g[1].clone()
        opt.step()
    assert seen and set(seen) == {plain.data_ptr()}  # the plain parameter only, every step
    assert inner.data_ptr() not in seen
    assert all(type(opt.state[wrapped][key]) is Wrapped for key in cls._rule.buffers)

    ref = [torch.nn.Parameter(v.clone()) for v in values]
    ref_opt = cls(ref, **kwargs)
    for g in grads:
        for r, gi in zip(ref, g):
            r.grad = gi.clone()
        ref_opt.step()
    torch.testing.assert_close(inner, ref[0].detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain.detach(), ref[1].detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(inner, values[0])


def test_polyak_norm_of_a_wrapper_subclass_gradient():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    inner = a.clone()
    wrapped, plain = torch.nn.Parameter(Wrapped(inner)), torch.nn.Parameter(b.clone())
    opt = PolyakSGD([wrapped, plain], max_stepsize=10.0)
    wrapped.grad, plain.grad = Wrapped(2 * a), 2 * b.clone()
    loss = float(a.square().sum() + b.square().sum())
    opt.step(loss=loss)
    sq_norm = float((2 * a).square().sum() + (2 * b).square().sum())
    assert opt.last_step[0]["grad_norm"] == pytest.approx(sq_norm ** 0.5, rel=1e-14)
    gamma = loss / sq_norm  # = 1/4
    torch.testing.assert_close(inner, a - gamma * 2 * a, rtol=1e-14, atol=0)
    torch.testing.assert_close(plain.detach(), b - gamma * 2 * b, rtol=1e-14, atol=0)


def test_plain_parameter_with_a_wrapper_gradient_takes_the_torch_path(monkeypatch):
    p = torch.nn.Parameter(torch.arange(4, dtype=torch.float64))
    g = torch.full((4,), 0.5, dtype=torch.float64)
    opt = QHM([p], lr=0.1, momentum=0.0, nu=1.0)
    calls = []
    real = qh_cpu.qhm_table
    monkeypatch.setattr(qh_cpu, "qhm_table", lambda parallel: calls.append(parallel) or real(parallel))
    p.grad = Wrapped(g.clone())
    opt.step()
    assert calls == []  # the gradient has no memory of its own: no kernel call
    torch.testing.assert_close(p.detach(), torch.arange(4, dtype=torch.float64) - 0.05)
    p.grad = g.clone()
    opt.step()
    assert calls == [False]
    torch.testing.assert_close(p.detach(), torch.arange(4, dtype=torch.float64) - 0.1)


def test_ialm_wrapper_constraints_never_reach_the_kernel(monkeypatch):
    """Constraint values of a wrapper subclass take the torch path; plain ones the kernel."""
    from uniopt.adapters.torch import iALM
    from uniopt.kernels import ialm_cpu

    calls = []
    real_kernel = ialm_cpu.ialm_dual_step_

    def spy(dual, buffer, c, *args):
        calls.append(c)
        return real_kernel(dual, buffer, c, *args)

    monkeypatch.setattr(ialm_cpu, "ialm_dual_step_", spy)
    gen = torch.Generator().manual_seed(5)
    cs = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3)]
    settings = dict(m=4, beta=0.5, gamma=1.0, momentum=0.5, init_duals=torch.zeros(4, dtype=torch.float64))
    wrapped_opt, plain_opt = iALM(**settings), iALM(**settings)
    for c in cs:
        wrapped_opt.update(Wrapped(c.clone()))
    assert calls == []  # the wrapper's memory never went to the kernel
    for c in cs:
        plain_opt.update(c.clone())
    assert len(calls) == len(cs)  # plain constraints do take the kernel
    torch.testing.assert_close(wrapped_opt.duals, plain_opt.duals,
                               rtol=1e-14, atol=0)
    assert not torch.equal(plain_opt.duals, torch.zeros(4, dtype=torch.float64))
