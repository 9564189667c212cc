"""The torch optimizers under torch.distributed (DDP, FSDP2, DCP) and on tensor subclasses.

Only the memory of plain tensors may reach a Numba kernel. A DTensor (``fully_shard``) runs on
its local shard; any other subclass takes the torch-ops path. The distributed scenarios run
once per module on two processes (gloo, CPU, spawn; one fresh interpreter, results saved to
files) and are compared with single-process runs on the whole batch (each rank sees half of
it; DDP/FSDP2 average the gradients, PolyakSGD averages its loss, iALM and Cooper's optimizers
average the constraint values, so the runs see the same numbers), float64: every family (QHM,
QHAdam, QHAdamW, PolyakSGD, iALM, Cooper) under DDP and FSDP2, the FSDP2 checkpoints through
``torch.distributed.checkpoint``, and bilevel ``Dynamic``'s hypergradient over halves of the
UL batch.
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
RESUME_AT = 2  # the DCP scenarios save after this many steps
OPTIMIZERS = {
    "QHM": (QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01)),
    "QHAdam": (QHAdam, dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 1.0), weight_decay=0.01)),
    "QHAdamW": (QHAdamW, dict(lr=0.05, nus=(0.8, 0.9), weight_decay=0.1)),
    "PolyakSGD": (PolyakSGD, dict(max_stepsize=0.5, momentum=0.5)),
}
WRAPS = ("fsdp", "ddp")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Linear(6, 1)'s weight has one row: rank 1's shard of it is empty
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randn(8, 1, generator=gen, dtype=torch.float64))


def _optimizer(name: str, model):
    cls, kwargs = OPTIMIZERS[name]
    return cls(model.parameters(), **kwargs)


def _train(name: str, model, x, y, opt=None, steps: int = STEPS) -> list:
    """``steps`` steps of optimizer ``name``; the Polyak step sizes (empty for the others)."""
    opt = _optimizer(name, model) if opt is None else opt
    stepsizes = []

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        if name == "PolyakSGD":
            stepsizes.append(opt.last_step[0]["stepsize"])
    return stepsizes


def _full(t):
    """A whole tensor from a DTensor (a collective: every rank calls it) or a plain one."""
    t = t.detach()
    return t.full_tensor() if dispatch.is_dtensor(t) else t.clone()


def _snapshot(params, opt) -> dict:
    """Whole parameters and optimizer state, in parameter order (tensors and scalars)."""
    params = list(params)
    state = []
    for p in params:
        entry = opt.state.get(p, {})
        state.append({k: (_full(v) if isinstance(v, torch.Tensor) else v)
                      for k, v in sorted(entry.items())})
    return {"params": [_full(p) for p in params], "state": state}


# -- iALM: an equality group and an inequality group, constraints averaged over the batch -----
def _ialm_constraints(out, y):
    eq = (out.mean() - 0.1).reshape(1)
    ineq = torch.stack([(out - y).square().mean() - 0.3, out.square().mean() - 0.001])
    return [eq, ineq]


def _ialm_setup(model):
    """The primal optimizer and iALM of the iALM scenarios."""
    from uniopt.adapters.torch import iALM

    primal = QHAdam(model.parameters(), lr=0.05, betas=(0.9, 0.99), nus=(0.7, 1.0))
    # float64 multipliers from the start: dcp.load fills the template's tensors in their dtype
    # (multipliers made from a number are in torch's default dtype until the first update)
    dual = iALM(init_duals=torch.zeros(1, dtype=torch.float64), beta=0.5, gamma=1.0, penalty=1.0,
                momentum=0.5)
    dual.add_constraint_group(init_duals=torch.zeros(2, dtype=torch.float64), beta=0.8, sigma=1.1,
                              is_ineq=True)
    return primal, dual


def _ialm_steps(model, primal, dual, x, y, start: int, stop: int) -> dict:
    """Steps ``start..stop-1``; a snapshot of the model, the primal state and the duals."""
    for _ in range(start, stop):
        primal.zero_grad()
        out = model(x)
        lagrangian = dual.forward_update((out - y).square().mean(), _ialm_constraints(out, y))
        lagrangian.backward()
        primal.step()
    snap = _snapshot(model.parameters(), primal)
    snap["duals"] = dual.duals.detach().clone()
    snap["buffers"] = [g["momentum_buffer"].detach().clone() for g in dual.param_groups]
    snap["betas"] = [g["beta"] for g in dual.param_groups]
    snap["last_step"] = dual.last_step
    return snap


def _ialm_run(model, x, y, steps: int = STEPS) -> dict:
    return _ialm_steps(model, *_ialm_setup(model), x, y, 0, steps)


# -- Cooper: a DenseMultiplier and an IndexedMultiplier, Lagrangian formulation ---------------
def _cooper_setup(model):
    """The problem and its SimultaneousOptimizer (QHM primal, SGD dual) of the Cooper scenarios."""
    import uniopt.adapters.torch.constrained as cooper

    class Problem(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            dense = cooper.multipliers.DenseMultiplier(num_constraints=2, dtype=torch.float64)
            indexed = cooper.multipliers.IndexedMultiplier(num_constraints=4, dtype=torch.float64)
            self.dense = cooper.Constraint(cooper.ConstraintType.INEQUALITY, multiplier=dense)
            self.indexed = cooper.Constraint(cooper.ConstraintType.EQUALITY, multiplier=indexed)

        def compute_cmp_state(self, x, y, t):
            out = model(x)
            dense = torch.stack([out.square().mean() - 0.001, (out - y).square().mean() - 0.4])
            rows = torch.tensor([0, 2] if t % 2 == 0 else [1, 3, 3])
            indexed = torch.stack([out[:, 0].mul(x[:, int(j)]).mean() for j in rows]) - 0.01
            return cooper.CMPState(loss=(out - y).square().mean(), observed_constraints={
                self.dense: cooper.ConstraintState(dense),
                self.indexed: cooper.ConstraintState(indexed, constraint_features=rows)})

    cmp = Problem()
    primal = QHM(model.parameters(), lr=0.1, momentum=0.9, nu=0.7)
    dual = torch.optim.SGD(cmp.dual_parameters(), lr=0.5, maximize=True)
    return cmp, cooper.optim.SimultaneousOptimizer(cmp, primal, dual)


def _cooper_steps(model, cmp, opt, x, y, start: int, stop: int) -> dict:
    for t in range(start, stop):
        opt.roll(compute_cmp_state_kwargs={"x": x, "y": y, "t": t})
    snap = _snapshot(model.parameters(), opt.primal_optimizers[0])
    snap["multipliers"] = [m.weight.detach().clone() for m in cmp.multipliers()]
    return snap


def _cooper_run(model, x, y, steps: int = STEPS) -> dict:
    return _cooper_steps(model, *_cooper_setup(model), x, y, 0, steps)


# -- Cooper's penalty coefficient updater: the strict violations averaged over the ranks -------
def _penalty_run(violations_of) -> list:
    """Multiplicative updates of a dense and an indexed coefficient from ``violations_of(t)`` ->
    ``(dense, indexed, features)``; the coefficients after each step."""
    import uniopt.adapters.torch.constrained as cooper

    pc, ineq = cooper.penalty_coefficients, cooper.ConstraintType.INEQUALITY
    quadratic = cooper.formulations.QuadraticPenalty
    dense = cooper.Constraint(ineq, quadratic, penalty_coefficient=pc.DensePenaltyCoefficient(
        init=torch.ones(2, dtype=torch.float64)))
    indexed = cooper.Constraint(ineq, quadratic, penalty_coefficient=pc.IndexedPenaltyCoefficient(
        init=torch.ones(4, dtype=torch.float64)))
    updater = pc.MultiplicativePenaltyCoefficientUpdater(growth_factor=1.5, violation_tolerance=1e-3)
    out = []
    for t in range(STEPS):
        d, i, f = violations_of(t)
        updater.step({dense: cooper.ConstraintState(d),
                      indexed: cooper.ConstraintState(i, constraint_features=f)})
        out.append(torch.cat([dense.penalty_coefficient.value, indexed.penalty_coefficient.value]))
    return out


def _rank_violations(rank: int, t: int):
    """Rank ``rank``'s violations at step ``t`` (the ranks observe different indexed rows)."""
    gen = torch.Generator().manual_seed(100 * t + rank)
    features = torch.tensor([0, 2] if rank == 0 else [2, 3])
    return (torch.randn(2, generator=gen, dtype=torch.float64),
            torch.randn(2, generator=gen, dtype=torch.float64), features)


# -- bilevel Dynamic: the hypergradient on half of the UL validation batch each ------------
def _bilevel_problem():
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    target = data @ torch.randn(5, generator=gen, dtype=torch.float64)
    val_data = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    val_target = val_data @ torch.randn(5, generator=gen, dtype=torch.float64)
    h = 0.3 * torch.randn(5, generator=gen, dtype=torch.float64) - 1.0
    w0 = torch.randn(5, generator=gen, dtype=torch.float64)
    return data, target, val_data, val_target, h, w0


def _hypergrad(val_slice) -> torch.Tensor:
    from uniopt.adapters.torch.bilevel import Dynamic

    data, target, val_data, val_target, h, w0 = _bilevel_problem()
    ul, ll = torch.nn.Module(), torch.nn.Linear(5, 1, bias=False).double()
    ul.h = torch.nn.Parameter(h.clone())
    with torch.no_grad():
        ll.weight.copy_(w0.reshape(1, 5))

    def ll_objective(state):
        r = state["lower_model"](state["data"]).reshape(-1) - state["target"]
        w = state["lower_model"].weight.reshape(-1)
        return r.square().mean() + (torch.exp(state["upper_model"].h) * w * w).sum()

    def ul_objective(state):
        return (state["lower_model"](state["data"]).reshape(-1) - state["target"]).square().mean()

    dyn = Dynamic(ll_objective, 6, ul, ul_objective, ll, ll_opt=QHM(ll.parameters(), lr=0.1,
                                                                    momentum=0.5, nu=0.7))
    result = dyn.optimize(data, target)
    dyn.hypergrad(result, val_data[val_slice], val_target[val_slice])
    return ul.h.grad.detach().clone()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def wrapped(kind: str, seed: int = 0):
        model = _model(seed)
        if kind == "fsdp":
            fully_shard(model)
            assert all(dispatch.is_dtensor(p) for p in model.parameters())
            return model, model
        return DistributedDataParallel(model), model

    try:
        x, y = _data()
        half = slice(rank * 4, rank * 4 + 4)
        xh, yh = x[half], y[half]
        results = {}
        for kind in WRAPS:
            for name in OPTIMIZERS:
                model, inner = wrapped(kind)
                opt = _optimizer(name, model)
                if name == "PolyakSGD":  # the default group: the world
                    assert opt.process_group is dist.group.WORLD
                stepsizes = _train(name, model, xh, yh, opt)
                if kind == "fsdp":  # the state has the parameters' placements
                    assert all(dispatch.is_dtensor(v) for st in opt.state.values()
                               for v in st.values() if isinstance(v, torch.Tensor) and v.dim())
                snap = _snapshot(inner.parameters(), opt)
                snap["stepsizes"] = stepsizes
                results[kind, name] = snap
            model, inner = wrapped(kind)
            results[kind, "iALM"] = _ialm_run(model, xh, yh)
            model, inner = wrapped(kind)
            results[kind, "Cooper"] = _cooper_run(model, xh, yh)
        # FSDP2 + torch.distributed.checkpoint: save after RESUME_AT steps, load into a fresh
        # model and optimizer (other initial weights), continue
        for name in OPTIMIZERS:
            path = os.path.join(out, f"dcp-{name}")
            model, _ = wrapped("fsdp")
            opt = _optimizer(name, model)
            _train(name, model, xh, yh, opt, steps=RESUME_AT)
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
            fresh, _ = wrapped("fsdp", seed=7)
            fresh_opt = _optimizer(name, fresh)
            state = {"model": get_model_state_dict(fresh),
                     "optim": get_optimizer_state_dict(fresh, fresh_opt)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(fresh, state["model"])
            set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
            loaded = _snapshot(fresh.parameters(), fresh_opt)
            saved = _snapshot(model.parameters(), opt)
            stepsizes = _train(name, fresh, xh, yh, fresh_opt, steps=STEPS - RESUME_AT)
            snap = _snapshot(fresh.parameters(), fresh_opt)
            snap["stepsizes"], snap["loaded"], snap["saved"] = stepsizes, loaded, saved
            results["dcp", name] = snap
        # the same for iALM and Cooper: the primal optimizer through DCP's helpers, the
        # replicated multipliers' (and iALM's) state dicts as they are
        for family in ("iALM", "Cooper"):
            path = os.path.join(out, f"dcp-{family}")
            runs = []
            for seed in (0, 7):
                model, _ = wrapped("fsdp", seed)
                if family == "iALM":
                    primal, dual = _ialm_setup(model)
                    runs.append((model, primal, dual, dual, _ialm_steps))
                else:
                    cmp, opt = _cooper_setup(model)
                    runs.append((model, opt.primal_optimizers[0], cmp, opt, _cooper_steps))
            (model, primal, dual, stepper, steps), fresh_run = runs
            steps(model, primal if family == "iALM" else dual, stepper, xh, yh, 0, RESUME_AT)

            def state_of(model, primal, dual):
                return {"model": get_model_state_dict(model),
                        "optim": get_optimizer_state_dict(model, primal), "dual": dual.state_dict()}

            dcp.save(state_of(model, primal, dual), checkpoint_id=path)
            fresh, fresh_primal, fresh_dual, fresh_stepper, _ = fresh_run
            state = state_of(fresh, fresh_primal, fresh_dual)
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(fresh, state["model"])
            set_optimizer_state_dict(fresh, fresh_primal, state["optim"])
            fresh_dual.load_state_dict(state["dual"])
            results["dcp", family] = steps(fresh, fresh_primal if family == "iALM" else fresh_dual,
                                           fresh_stepper, xh, yh, RESUME_AT, STEPS)
        # the nonfinite policy under FSDP2: a NaN in rank 1's gradient shard only, at step 2
        for policy in ("skip", "raise"):
            model, _ = wrapped("fsdp")
            cls, kwargs = OPTIMIZERS["QHAdam"]
            opt = cls(model.parameters(), **kwargs, nonfinite=policy)
            raised = []
            for t in range(3):
                opt.zero_grad()
                (model(xh) - yh).square().mean().backward()
                if t == 1 and rank == 1:
                    next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
                try:
                    opt.step()
                    raised.append(False)
                except FloatingPointError:
                    raised.append(True)
            snap = _snapshot(model.parameters(), opt)
            snap["raised"] = raised
            snap["skips"] = [g["nonfinite_skips"] for g in opt.param_groups]
            results["nonfinite", policy] = snap
        results["penalty"] = _penalty_run(lambda t: _rank_violations(rank, t))
        # bilevel: each rank's hypergradient on its half of the validation batch, averaged
        grad = _hypergrad(slice(rank * 4, rank * 4 + 4))
        dist.all_reduce(grad)
        results["bilevel"] = grad / world
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
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def _assert_equal(a, b):
    """Bitwise equality of nested snapshots (tensors with ``torch.equal``, the rest with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_equal(u, v)
    else:
        assert a == b


def _assert_close(mine, ref):
    """The 2-rank run against the single-process one: 1e-12 relative (tiny absolute floor)."""
    if isinstance(ref, torch.Tensor):
        torch.testing.assert_close(mine, ref.detach(), rtol=1e-12, atol=1e-14)
    elif isinstance(ref, dict):
        assert mine.keys() == ref.keys()
        for k in ref:
            _assert_close(mine[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert len(mine) == len(ref)
        for u, v in zip(mine, ref):
            _assert_close(u, v)
    elif isinstance(ref, float):
        assert mine == pytest.approx(ref, rel=1e-12, abs=1e-14)
    else:
        assert mine == ref


@pytest.mark.parametrize("kind", WRAPS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_match_a_single_process_run(name, kind, fsdp_results):
    """FSDP2 and DDP on 2 ranks, half the batch each: the single-process full-batch run."""
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _optimizer(name, model)
    stepsizes = _train(name, model, *_data(), opt)
    rank0, rank1 = fsdp_results[0][kind, name], fsdp_results[1][kind, name]
    _assert_equal(rank0, rank1)  # the replicas agree, bit for bit, parameters and state
    for ref, start in zip(model.parameters(), before):
        assert not torch.equal(ref.detach(), start)
    _assert_close(rank0["params"], list(model.parameters()))
    _assert_close(rank0["state"], _snapshot(model.parameters(), opt)["state"])
    if name == "PolyakSGD":
        assert len(rank0["stepsizes"]) == STEPS and all(s > 0 for s in rank0["stepsizes"])
        _assert_close(rank0["stepsizes"], stepsizes)


@pytest.mark.parametrize("kind", WRAPS)
@pytest.mark.parametrize("family", ["iALM", "Cooper"])
def test_constrained_families_on_two_ranks_match_a_single_process_run(family, kind, fsdp_results):
    """The constraint values are averaged over the ranks before the dual step (and, for iALM,
    in the Lagrangian): the multipliers and the model follow the full-batch run."""
    run = _ialm_run if family == "iALM" else _cooper_run
    ref = run(_model(), *_data())
    rank0, rank1 = fsdp_results[0][kind, family], fsdp_results[1][kind, family]
    _assert_equal(rank0, rank1)
    duals = ref["duals"] if family == "iALM" else torch.cat([m.reshape(-1) for m in ref["multipliers"]])
    assert bool((duals != 0).all())  # every multiplier moved (each indexed row was observed)
    _assert_close(rank0, ref)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_checkpoint_resumes_the_identical_trajectory(name, fsdp_results):
    """``torch.distributed.checkpoint`` of an FSDP2 model and its optimizer, saved on 2 ranks
    after ``RESUME_AT`` steps and loaded into fresh ones: the uninterrupted run, bit for bit."""
    for rank in range(2):
        resumed, straight = fsdp_results[rank]["dcp", name], fsdp_results[rank]["fsdp", name]
        _assert_equal(resumed["loaded"], resumed["saved"])  # the load restored everything
        assert resumed["loaded"]["state"] and all(resumed["loaded"]["state"])
        _assert_equal(resumed["params"], straight["params"])
        _assert_equal(resumed["state"], straight["state"])
        assert resumed["stepsizes"] == straight["stepsizes"][RESUME_AT:]
    model = _model(7)
    assert not torch.equal(model[0].weight, _model()[0].weight)  # the fresh model differs


@pytest.mark.parametrize("family", ["iALM", "Cooper"])
def test_fsdp2_checkpoint_of_the_constrained_families_resumes_the_identical_trajectory(
        family, fsdp_results):
    """FSDP2 model + primal optimizer through DCP, the multipliers' state dicts saved with them
    (``dcp.save``), loaded into fresh ones after ``RESUME_AT`` steps: the uninterrupted run."""
    for rank in range(2):
        _assert_equal(fsdp_results[rank]["dcp", family], fsdp_results[rank]["fsdp", family])


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_fsdp2_nonfinite_shard_on_one_rank_is_decided_on_every_rank(policy, fsdp_results):
    """A NaN in one rank's gradient shard: both ranks skip (or raise) the same step, the
    replicas stay equal, and the run equals two clean full-batch steps."""
    rank0, rank1 = fsdp_results[0]["nonfinite", policy], fsdp_results[1]["nonfinite", policy]
    _assert_equal(rank0, rank1)  # the rank whose own shard is finite decided alike
    assert rank0["raised"] == [False, policy == "raise", False]
    assert rank0["skips"] == [1 if policy == "skip" else 0]
    model = _model()
    opt = _optimizer("QHAdam", model)
    _train("QHAdam", model, *_data(), opt, steps=2)
    _assert_close(rank0["params"], list(model.parameters()))
    _assert_close(rank0["state"], _snapshot(model.parameters(), opt)["state"])


def test_penalty_updater_averages_the_strict_violations_over_the_ranks(fsdp_results):
    """Every rank grows the same coefficients: those of one updater fed the ranks' average (a
    row one rank did not observe averaged with 0 for it), computed here by hand."""
    def averaged(t):
        (d0, i0, _), (d1, i1, _) = _rank_violations(0, t), _rank_violations(1, t)
        rows = torch.tensor([i0[0] / 2, (i0[1] + i1[0]) / 2, i1[1] / 2])
        return (d0 + d1) / 2, rows, torch.tensor([0, 2, 3])

    ref = _penalty_run(averaged)
    _assert_equal(fsdp_results[0]["penalty"], fsdp_results[1]["penalty"])
    _assert_equal(fsdp_results[0]["penalty"], ref)
    assert not torch.equal(ref[-1], torch.ones(6, dtype=torch.float64))
    alone = _penalty_run(lambda t: _rank_violations(0, t))  # without the reduction: different
    assert not all(torch.equal(a, b) for a, b in zip(alone, ref))


def test_bilevel_hypergradient_over_halves_of_the_validation_batch(fsdp_results):
    """Dynamic on each rank, its hypergradient on its half of the UL batch, averaged with
    ``all_reduce``: the full-batch hypergradient."""
    _, _, val_data, _, _, _ = _bilevel_problem()
    full = _hypergrad(slice(0, val_data.shape[0]))
    halves = (_hypergrad(slice(0, 4)) + _hypergrad(slice(4, 8))) / 2
    _assert_equal(fsdp_results[0]["bilevel"], fsdp_results[1]["bilevel"])
    assert not torch.equal(_hypergrad(slice(0, 4)), full)
    torch.testing.assert_close(fsdp_results[0]["bilevel"], full, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(halves, full, rtol=1e-12, atol=1e-15)


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


# ------------------------------------------------------------------------------------------------
# process_group in a single process
# ------------------------------------------------------------------------------------------------
def _cooper_pieces():
    import uniopt.adapters.torch.constrained as cooper

    class Problem(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            lam = cooper.multipliers.DenseMultiplier(num_constraints=1, dtype=torch.float64)
            self.c = cooper.Constraint(cooper.ConstraintType.INEQUALITY, multiplier=lam)

        def compute_cmp_state(self):  # never called here
            raise NotImplementedError

    cmp = Problem()
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    return cooper, cmp, torch.optim.SGD([w], lr=0.1), torch.optim.SGD(cmp.dual_parameters(), lr=0.1,
                                                                      maximize=True)


def test_process_group_is_none_without_torch_distributed():
    from uniopt.adapters.torch import iALM

    assert dispatch.resolve_process_group(None) is None
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    assert PolyakSGD([w]).process_group is None
    assert iALM(m=2).process_group is None
    cooper, cmp, primal, dual = _cooper_pieces()
    assert cooper.optim.SimultaneousOptimizer(cmp, primal, dual).process_group is None
    assert cooper.optim.AlternatingPrimalDualOptimizer(cmp, primal, dual).process_group is None
    assert cooper.penalty_coefficients.AdditivePenaltyCoefficientUpdater().process_group is None
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert dispatch.group_average(values, None) is values


@pytest.mark.parametrize("bad", ["world", 0, object()])
def test_invalid_process_group_is_a_type_error_naming_it(bad):
    from uniopt.adapters.torch import iALM

    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    cooper, cmp, primal, dual = _cooper_pieces()
    for make in (lambda: PolyakSGD([w], process_group=bad), lambda: iALM(m=1, process_group=bad),
                 lambda: cooper.optim.SimultaneousOptimizer(cmp, primal, dual, process_group=bad),
                 lambda: cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(
                     process_group=bad)):
        with pytest.raises(TypeError, match=r"Invalid process_group: "):
            make()


def test_polyak_step_without_a_loss_only_with_zero_gradients():
    """torch.distributed.checkpoint creates a fresh optimizer's state with ``step()`` on zero
    gradients: a zero step. With a non-zero gradient a missing loss is still an error."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = PolyakSGD([w], momentum=0.5, delta=0.1)
    with pytest.raises(RuntimeError, match="needs the loss"):  # no gradient at all
        opt.step()
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert torch.equal(opt.state[w]["velocity"], torch.zeros(2, dtype=torch.float64))
    assert opt.last_step[0]["stepsize"] == 0.0 and opt.last_step[0]["grad_norm"] == 0.0
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="needs the loss"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert torch.equal(opt.state[w]["velocity"], torch.zeros(2, dtype=torch.float64))
    strict = PolyakSGD([w], momentum=0.5, nonfinite="raise")  # the policy has nothing to check
    w.grad = torch.zeros_like(w)
    strict.step()
    assert torch.equal(strict.state[w]["velocity"], torch.zeros(2, dtype=torch.float64))
