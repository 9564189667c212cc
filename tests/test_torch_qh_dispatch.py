"""The torch QH optimizers as torch.optim citizens, and every execution path of their rules.

Paths: the Numba table kernels (CPU, contiguous float32/float64), the torch-ops execution
(``_backend="torch"``, and whatever the kernels cannot take), the numba.cuda kernels (on the
simulator here; on a real GPU when torch sees one), the NumPy core and the naive oracles.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

import torch

import uniopt  # noqa: E402
from conftest import tolerance  # noqa: E402
from refimpl.naive_qh import NaiveQHAdam, NaiveQHM  # noqa: E402
from torch_qh_problem import Problem, assert_state_close, run  # noqa: E402
from uniopt.adapters.torch import QHM, QHAdam, QHAdamW  # noqa: E402

TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}

QHM_SETTINGS = [
    dict(lr=0.3, momentum=0.9, nu=0.7),
    dict(lr=0.2, momentum=0.8, nu=1.3, weight_decay=0.05),
    dict(lr=0.2, momentum=0.95, nu=-0.2, weight_decay=0.1, weight_decay_type="direct"),
    dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.05, maximize=True),
]
QHADAM_SETTINGS = [
    dict(lr=0.05, nus=(0.7, 1.0)),
    dict(lr=0.05, betas=(0.95, 0.99), nus=(0.8, 0.6), weight_decay=0.1),
    dict(lr=0.03, betas=(0.8, 0.9), nus=(1.2, 0.5), weight_decay=0.2, decouple_weight_decay=True,
         eps=1e-3),
    dict(lr=0.02, nus=(0.5, 0.9), maximize=True),
]
RULES = [("qhm", k) for k in QHM_SETTINGS] + [("qhadam", k) for k in QHADAM_SETTINGS]
TORCH_CLASSES = {"qhm": QHM, "qhadam": QHAdam}
NUMPY_CLASSES = {"qhm": uniopt.QHM, "qhadam": uniopt.QHAdam}
NAIVE_CLASSES = {"qhm": NaiveQHM, "qhadam": NaiveQHAdam}


def _plan(opt, group=0):
    return opt._dispatcher._plans[id(opt.param_groups[group])]


def _tables(opt):
    """How many parameters each group runs through the table kernel (after a step)."""
    plans = opt._dispatcher._plans
    return [sum(len(t.rows) for t in plans[id(g)].tables) for g in opt.param_groups]


# ------------------------------------------------------------------------------------------------
# Every execution of every rule agrees
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, kwargs", RULES)
def test_all_paths_agree(family, kwargs, dtype):
    # with maximize, ascend the negated objective (the same, bounded, trajectory)
    problem = Problem(10, sign=-1.0 if kwargs.get("maximize") else 1.0)
    steps, tdtype = 20, TORCH_DTYPES[dtype]
    kernel_params, kernel = run(lambda ps: TORCH_CLASSES[family](ps, **kwargs), problem, steps, tdtype)
    assert _tables(kernel) == [len(problem.x0)]
    ops_params, ops = run(lambda ps: TORCH_CLASSES[family](ps, **kwargs, _backend="torch"),
                          problem, steps, tdtype)
    assert _tables(ops) == [0]

    arrays = [x.numpy().astype(dtype) for x in problem.x0]
    core = NUMPY_CLASSES[family](arrays, **kwargs)
    oracles = [NAIVE_CLASSES[family](**kwargs) for _ in arrays]
    naive = [a.copy() for a in arrays]
    for _ in range(steps):
        core.step([problem.grad(i, torch.from_numpy(a)).numpy() for i, a in enumerate(arrays)])
        naive = [o.step(a, problem.grad(i, torch.from_numpy(a)).numpy())
                 for i, (o, a) in enumerate(zip(oracles, naive))]

    tol = tolerance(dtype)
    for i, (k, o, c, n) in enumerate(zip(kernel_params, ops_params, arrays, naive)):
        assert k.dtype == tdtype and torch.isfinite(k).all()
        assert not torch.equal(k.detach(), problem.x0[i].to(tdtype))
        np.testing.assert_allclose(k.detach().numpy(), c, **tol)  # kernel path == NumPy core
        np.testing.assert_allclose(o.detach().numpy(), c, **tol)  # torch ops == NumPy core
        np.testing.assert_allclose(k.detach().numpy(), n, **tol)  # == the naive oracle
    assert_state_close(kernel, ops, kernel_params, ops_params, **tol)
    for i, p in enumerate(kernel_params):
        for key, value in core.state[i].items():
            mine = kernel.state[p][key]
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(mine.numpy(), value, **tol)
            else:
                assert mine == value  # the bias-correction weights, computed in float64


@pytest.mark.parametrize("family, kwargs", [RULES[1], RULES[5]])
def test_parallel_kernel_matches_serial(family, kwargs, monkeypatch):
    problem = Problem(11)
    serial, _ = run(lambda ps: TORCH_CLASSES[family](ps, **kwargs), problem, 5)
    threads = torch.get_num_threads()
    monkeypatch.setattr(uniopt._jit, "PARALLEL_MIN_SIZE", 0)
    parallel, opt = run(lambda ps: TORCH_CLASSES[family](ps, **kwargs), problem, 5)
    assert _plan(opt).tables[0].parallel
    assert torch.get_num_threads() == threads
    for a, b in zip(parallel, serial):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# What the kernels cannot take goes the torch way, without losing updates
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs", [(QHM, QHM_SETTINGS[1]), (QHAdam, QHADAM_SETTINGS[1])])
def test_non_contiguous_params_and_grads(cls, kwargs):
    problem = Problem(12, shapes=[(3, 4), (4, 3)])
    reference, _ = run(lambda ps: cls(ps, **kwargs), problem, 8)
    # parameter 0 is a transposed (non-contiguous) tensor with the same values
    params = [torch.nn.Parameter(problem.x0[0].t().contiguous().t()),
              torch.nn.Parameter(problem.x0[1].clone())]
    assert not params[0].is_contiguous()
    opt = cls(params, **kwargs)
    for step in range(8):
        params[0].grad = problem.grad(0, params[0])
        g = problem.grad(1, params[1])
        params[1].grad = g.t().contiguous().t() if step % 2 else g  # non-contiguous every other step
        assert params[1].grad.is_contiguous() == (step % 2 == 0)
        opt.step()
    assert _tables(opt) == [1]
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b, **tolerance(np.float64))
    assert not params[0].is_contiguous()


@pytest.mark.parametrize("cls, kwargs", [(QHM, QHM_SETTINGS[0]), (QHAdam, QHADAM_SETTINGS[0])])
def test_low_precision_params_use_torch_ops(cls, kwargs):
    problem = Problem(13)
    ref, _ = run(lambda ps: cls(ps, **kwargs), problem, 1, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        params, opt = run(lambda ps: cls(ps, **kwargs), problem, 1, dtype)
        assert _tables(opt) == [0]
        for p, r, x0 in zip(params, ref, problem.x0):
            assert p.dtype == dtype and not torch.equal(p.float(), x0.to(dtype).float())
            torch.testing.assert_close(p.float(), r, rtol=2e-2, atol=2e-2)


def test_mixed_dtypes_in_one_group():
    problem = Problem(14)
    kwargs = QHADAM_SETTINGS[1]
    params = [torch.nn.Parameter(x.to(d).clone())
              for x, d in zip(problem.x0, (torch.float32, torch.float64, torch.float32))]
    opt = QHAdam(params, **kwargs)
    run(None, problem, 10, params=params, opt=opt)
    tables = _plan(opt).tables
    assert sorted((str(t.dtype), t.rows) for t in tables) == [("torch.float32", [0, 2]),
                                                               ("torch.float64", [1])]
    for i, p in enumerate(params):  # each tensor alone, in its own dtype
        alone = [torch.nn.Parameter(problem.x0[i].to(p.dtype).clone())]
        opt = QHAdam(alone, **kwargs)
        for _ in range(10):
            alone[0].grad = problem.grad(i, alone[0])
            opt.step()
        assert torch.equal(alone[0], p)


def test_grad_of_another_dtype_is_promoted():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
    p.grad_dtype = None  # torch >= 2.9 lets a gradient have its own dtype
    p.grad = torch.full((3,), 0.5, dtype=torch.float64)
    QHM([p], lr=0.1, momentum=0.9, nu=1.0).step()
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.1 * 0.5))


# ------------------------------------------------------------------------------------------------
# torch.optim behaviour
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cls, kwargs", [(QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1)),
                                         (QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1,
                                                    weight_decay_type="direct")),
                                         (QHAdam, dict(weight_decay=0.1)), (QHAdamW, dict(weight_decay=0.1))])
def test_params_without_grad_are_skipped(cls, kwargs, backend):
    a, b, c = (torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3))
    b0 = b.detach().clone()
    opt = cls([a, b, c], **kwargs, _backend=backend)
    for step in range(6):
        a.grad = torch.randn(4, dtype=torch.float64)
        c.grad = torch.randn(4, dtype=torch.float64) if step >= 3 else None
        opt.step()
        assert b not in opt.state and torch.equal(b, b0)
        assert (c in opt.state) == (step >= 3)
    if cls is not QHM:  # c was stepped three times, a six times
        beta1 = opt.param_groups[0]["betas"][0]
        assert opt.state[c]["beta1_weight"] == 1 + beta1 * (1 + beta1)
        assert opt.state[a]["beta1_weight"] > opt.state[c]["beta1_weight"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_grads_are_not_modified(backend):
    for cls, kwargs in [(QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.5)),
                        (QHAdam, dict(weight_decay=0.5)), (QHAdamW, dict(weight_decay=0.5))]:
        p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        g = torch.randn(5, dtype=torch.float64)
        p.grad = g.clone()
        cls([p], **kwargs, _backend=backend).step()
        assert torch.equal(p.grad, g)


def test_lr_scheduler_and_tensor_lr():
    problem = Problem(15)
    scheduled = problem.params()
    opt = QHM(scheduled, lr=0.3, momentum=0.9, nu=0.7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1)
    manual = problem.params()
    opt2 = QHM(manual, lr=0.3, momentum=0.9, nu=0.7)
    constant, _ = run(lambda ps: QHM(ps, lr=0.3, momentum=0.9, nu=0.7), problem, 10)
    tensor_lr, _ = run(lambda ps: QHM(ps, lr=torch.tensor(0.3, dtype=torch.float64), momentum=0.9,
                                      nu=0.7), problem, 10)
    for step in range(10):
        run(None, problem, 1, params=scheduled, opt=opt)
        sched.step()
        run(None, problem, 1, params=manual, opt=opt2)
        if (step + 1) % 4 == 0:  # the same schedule by hand
            opt2.param_groups[0]["lr"] *= 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * 0.01)
    for s, m, c, t in zip(scheduled, manual, constant, tensor_lr):
        assert torch.equal(s, m)
        assert not torch.allclose(s, c)
        assert torch.equal(t, c)


def test_closure_is_called_once_with_grad_enabled():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = QHAdam([p], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert loss.item() == 5.0
    assert torch.all(p.abs() < torch.tensor([1.0, 2.0]))
    assert opt.step() is None


def test_step_hooks_fire_around_the_update():
    p = torch.nn.Parameter(torch.ones(3))
    opt = QHM([p], lr=0.1, momentum=0.9, nu=0.7)
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", p.detach().clone())))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", p.detach().clone())))
    p.grad = torch.ones(3)
    opt.step()
    assert [s[0] for s in seen] == ["pre", "post"]
    assert torch.equal(seen[0][1], torch.ones(3)) and torch.all(seen[1][1] < 1)
    h1.remove(), h2.remove()
    opt.step()
    assert len(seen) == 2


def test_zero_grad():
    p = torch.nn.Parameter(torch.ones(3))
    opt = QHM([p], lr=0.1, momentum=0.9, nu=0.7)
    p.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None
    opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state


def test_step_bumps_the_version_counter():
    """Autograd notices that the kernel changed a parameter a graph still needs."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = QHM([p], lr=0.1, momentum=0.9, nu=0.7)
    loss = (p * p).sum()
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cls, kwargs", [(QHM, QHM_SETTINGS[1]), (QHAdam, QHADAM_SETTINGS[1]),
                                         (QHAdamW, dict(lr=0.05, nus=(0.7, 0.8), weight_decay=0.1))])
def test_state_dict_round_trip_resumes_identically(cls, kwargs, backend):
    problem = Problem(16)
    make = lambda ps: cls(ps, **kwargs, _backend=backend)
    params, opt = run(make, problem, 7)
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(resumed)
    run(None, problem, 2, params=resumed, opt=opt2)  # some unrelated history, then the load
    with torch.no_grad():
        for r, p in zip(resumed, params):
            r.copy_(p)  # same tensors (and data pointers), new state: the cache must notice
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for s2, s in zip(opt2.state.values(), opt.state.values()):  # loading copies, never aliases
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                assert s2[key].data_ptr() != value.data_ptr()
    direct = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt3 = make(direct)
    opt3.load_state_dict(saved)  # from the live state dict (it holds opt's own tensors)
    for s3, s in zip(opt3.state.values(), opt.state.values()):
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                assert s3[key].data_ptr() != value.data_ptr()
    run(None, problem, 8, params=params, opt=opt)
    run(None, problem, 8, params=resumed, opt=opt2)
    run(None, problem, 8, params=direct, opt=opt3)
    for a, b, c in zip(params, resumed, direct):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert_state_close(opt, opt2, params, resumed, rtol=0, atol=0)
    assert_state_close(opt, opt3, params, direct, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_deepcopy_continues_identically(backend):
    problem = Problem(17)
    params, opt = run(lambda ps: QHAdam(ps, **QHADAM_SETTINGS[1], _backend=backend), problem, 5)
    twin_params, twin = copy.deepcopy((params, opt))
    assert twin._dispatcher.backend == backend
    run(None, problem, 5, params=params, opt=opt)
    run(None, problem, 5, params=twin_params, opt=twin)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_replaced_param_data_is_followed():
    """``p.data = ...`` moves the parameter's memory: the cached address table is rebuilt."""
    problem = Problem(18)
    reference, _ = run(lambda ps: QHAdam(ps, **QHADAM_SETTINGS[0]), problem, 6)
    params, opt = run(lambda ps: QHAdam(ps, **QHADAM_SETTINGS[0]), problem, 3)
    for p in params:
        p.data = p.data.clone()
    run(None, problem, 3, params=params, opt=opt)
    for a, b in zip(params, reference):
        assert torch.equal(a, b)


def test_add_param_group_after_steps():
    problem = Problem(19)
    params = problem.params()
    opt = QHM(params[:2], lr=0.2, momentum=0.9, nu=0.7)
    run(None, problem, 2, params=params[:2], opt=opt)
    opt.add_param_group({"params": params[2:], "lr": 0.1})
    x2 = params[2].detach().clone()
    run(None, problem, 2, params=params, opt=opt)
    assert _tables(opt) == [2, 1] and not torch.equal(params[2], x2)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


# ------------------------------------------------------------------------------------------------
# A failing step changes nothing
# ------------------------------------------------------------------------------------------------
def _snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items()})


def _assert_unchanged(params, opt, snapshot):
    values, state = snapshot
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if isinstance(v, torch.Tensor) else v == state[id(p)][k]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cls, kwargs", [(QHM, dict(lr=0.1, momentum=0.9, nu=0.7)), (QHAdam, {})])
def test_sparse_gradient_fails_before_any_change(cls, kwargs, backend):
    problem = Problem(20)
    params = problem.params()
    extra = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = cls([{"params": params[:2]}, {"params": params[2:] + [extra]}], **kwargs, _backend=backend)
    run(None, problem, 2, params=params, opt=opt)
    snapshot = _snapshot(params + [extra], opt)
    for i, p in enumerate(params):
        p.grad = problem.grad(i, p)
    extra.grad = torch.randn(6, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match=f"^{cls.__name__} does not support sparse gradients$"):
        opt.step()
    _assert_unchanged(params + [extra], opt, snapshot)


def test_mismatched_state_fails_before_any_change():
    problem = Problem(21)
    params, opt = run(lambda ps: QHAdam(ps), problem, 2)
    state_dict = opt.state_dict()
    state_dict["state"][2]["exp_avg"] = torch.zeros(3, dtype=torch.float64)  # wrong shape
    opt.load_state_dict(state_dict)
    snapshot = _snapshot(params, opt)
    for i, p in enumerate(params):
        p.grad = problem.grad(i, p)
    with pytest.raises(RuntimeError, match="state 'exp_avg' of parameter 2 .* does not match"):
        opt.step()
    _assert_unchanged(params, opt, snapshot)


def test_mismatched_grad_shape_fails_before_any_change():
    problem = Problem(22)
    params, opt = run(lambda ps: QHM(ps, lr=0.1, momentum=0.9, nu=0.7), problem, 2)
    snapshot = _snapshot(params, opt)
    for i, p in enumerate(params):
        p.grad = problem.grad(i, p)
    params[2].grad.data = torch.zeros(3, dtype=torch.float64)  # torch lets .data change the shape
    with pytest.raises(RuntimeError, match="gradient of parameter 2 .* does not match"):
        opt.step()
    _assert_unchanged(params, opt, snapshot)


# ------------------------------------------------------------------------------------------------
# CUDA: the glue on the simulator, and the real thing where torch sees a GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["qhm", "qhadam"])
def test_cuda_glue_matches_torch_ops_on_the_simulator(rule):
    import numba.cuda  # noqa: F401  (numba-cuda: the test extra)
    import numba
    from numba import cuda

    if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
        pytest.skip("neither a CUDA device nor the numba-cuda simulator")
    from uniopt.adapters.torch import qh as torch_qh

    impl, group = ((torch_qh._QHMRule(), dict(lr=0.2, momentum=0.9, nu=0.7, weight_decay=0.1,
                                              weight_decay_type="grad", maximize=False))
                   if rule == "qhm" else
                   (torch_qh._QHAdamRule(), dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 0.8),
                                                 weight_decay=0.1, decouple_weight_decay=True,
                                                 eps=1e-8, maximize=True)))
    gen = torch.Generator().manual_seed(23)
    p = torch.randn(40, dtype=torch.float64, generator=gen)
    p_ops = p.clone()
    state, state_ops = impl.init_state(p), impl.init_state(p_ops)
    constants = impl.constants(group)
    for _ in range(3):
        g = torch.randn(40, dtype=torch.float64, generator=gen)
        impl.run_cuda(constants, p.numpy(), g.numpy(), [state[k].numpy() for k in impl.buffers],
                      state, 0)
        impl.run_torch(constants, p_ops, g, [state_ops[k] for k in impl.buffers], state_ops)
    torch.testing.assert_close(p, p_ops, **tolerance(np.float64))
    for key in state:
        if isinstance(state[key], torch.Tensor):
            torch.testing.assert_close(state[key], state_ops[key], **tolerance(np.float64))
        else:
            assert state[key] == state_ops[key]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to torch")
@pytest.mark.parametrize("cls, kwargs", [(QHM, QHM_SETTINGS[1]), (QHAdam, QHADAM_SETTINGS[1])])
def test_cuda_tensors_match_cpu(cls, kwargs, dtype):
    """With UNIOPT_TEST_REAL_CUDA=1 the kernels run on the device; on the simulator (the test
    default) CUDA tensors take the torch path, and the comparison still holds."""
    import numba

    expected = "torch" if numba.config.ENABLE_CUDASIM else "cuda"
    problem = Problem(24)
    cpu, _ = run(lambda ps: cls(ps, **kwargs), problem, 10, TORCH_DTYPES[dtype])
    params = [torch.nn.Parameter(x.to("cuda", TORCH_DTYPES[dtype])) for x in problem.x0]
    params[0] = torch.nn.Parameter(params[0].detach().t().contiguous().t())  # one on the torch path
    opt = cls(params, **kwargs)
    run(None, problem, 10, params=params, opt=opt)
    assert _plan(opt).kinds == ["torch", expected, expected]
    for p, c in zip(params, cpu):
        torch.testing.assert_close(p.detach().cpu(), c.detach(), **tolerance(dtype))


# ------------------------------------------------------------------------------------------------
# The dispatcher's hooks for rules that are not torch's: given gradients, state kept by the face,
# results returned (the iALM dual step is such a rule)
# ------------------------------------------------------------------------------------------------
def _ialm_group(n, dtype, momentum=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    duals = torch.nn.Parameter(torch.rand(n, generator=gen, dtype=dtype) - 0.5, requires_grad=False)
    return {"params": [duals], "name": "g", "beta": 0.4, "sigma": 1.0, "gamma": 0.7,
            "momentum": momentum, "dampening": 0.25, "lower_bound": -0.3, "upper_bound": 0.35,
            "is_ineq": False, "momentum_buffer": torch.randn(n, generator=gen, dtype=dtype)}


def _naive_ialm_step(group, c):
    """The dual step in float64 NumPy from the rule's definition: (duals, buffer, norm, step)."""
    c = c.double().numpy()
    buffer = group["momentum"] * group["momentum_buffer"].double().numpy() + (1 - group["dampening"]) * c
    norm = float(np.sqrt(np.sum(buffer * buffer)))
    step = min(group["beta"], group["gamma"] / norm)
    duals = np.clip(group["params"][0].detach().double().numpy() + step * buffer,
                    group["lower_bound"], group["upper_bound"])
    return duals, buffer, norm, step


def test_given_gradients_reach_every_kernel_path(dtype):
    """A face-supplied gradient (not ``p.grad``) and state kept in the group reach the CPU table
    kernel, the numba.cuda kernel (simulator: host arrays) and the torch ops, with equal results
    and the values each path returns."""
    import numba

    from uniopt.adapters.torch._dispatch import Dispatcher
    from uniopt.adapters.torch.ialm import _DualStepRule

    torch_dtype = TORCH_DTYPES[dtype]
    n = 37
    c = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch_dtype)
    want = _naive_ialm_step(_ialm_group(n, torch_dtype), c)
    tol = tolerance(dtype)
    results = {}
    for backend in ("auto", "torch"):
        group = _ialm_group(n, torch_dtype)
        dispatcher = Dispatcher(_DualStepRule(), backend)
        work = dispatcher.collect([group], {}, grads=[(c,)])
        assert (len(work[0].tables), work[0].slow) == ((1, []) if backend == "auto" else (0, [0]))
        out = dispatcher.run(work)
        assert group["params"][0].grad is None               # the gradient was the given one
        results[backend] = (group, out[0][0])
    if numba.config.ENABLE_CUDASIM:                          # the cuda path's kernel, on host arrays
        group = _ialm_group(n, torch_dtype)
        rule = _DualStepRule()
        value = rule.run_cuda(group, group["params"][0].detach().numpy(), c.numpy(),
                              [group["momentum_buffer"].numpy()], group, 0)
        results["cuda"] = (group, value)
    assert len(results) == (3 if numba.config.ENABLE_CUDASIM else 2)
    for name, (group, (norm, step)) in results.items():
        torch.testing.assert_close(group["params"][0].detach().double(),
                                   torch.from_numpy(want[0]), **tol)
        torch.testing.assert_close(group["momentum_buffer"].double(), torch.from_numpy(want[1]), **tol)
        assert norm == pytest.approx(want[2], rel=tol["rtol"]) and step == pytest.approx(want[3], rel=tol["rtol"])


def test_given_gradients_the_kernel_cannot_read_take_the_torch_path():
    """A non-contiguous gradient, or one of another dtype, never reaches the table kernel; one
    of another shape (here of the same byte size) fails in collect, before anything changes."""
    from uniopt.adapters.torch._dispatch import Dispatcher
    from uniopt.adapters.torch.ialm import _DualStepRule

    n = 8
    group = _ialm_group(n, torch.float64)
    dispatcher = Dispatcher(_DualStepRule())
    for c in (torch.randn(2 * n)[::2], torch.randn(2 * n, dtype=torch.float64)[::2]):
        work = dispatcher.collect([group], {}, grads=[(c,)])
        assert not work[0].tables and work[0].slow == [0]
    before = group["params"][0].detach().clone(), group["momentum_buffer"].clone()
    with pytest.raises(RuntimeError, match="does not match the parameter"):
        dispatcher.collect([group], {}, grads=[(torch.randn(2 * n, dtype=torch.float32),)])
    work = dispatcher.collect([group], {}, grads=[(torch.ones(n, dtype=torch.float64),)])
    assert len(work[0].tables) == 1                          # the same group, readable: the kernel
    assert torch.equal(group["params"][0].detach(), before[0]) and torch.equal(group["momentum_buffer"], before[1])


def test_state_kept_in_the_group_is_followed_when_replaced():
    """Rule.state_of: a buffer replaced in the group between steps is the one stepped next
    (the cached table is re-checked; no invalidate needed), the old one is left alone."""
    from uniopt.adapters.torch._dispatch import Dispatcher
    from uniopt.adapters.torch.ialm import _DualStepRule

    n = 6
    group, twin = _ialm_group(n, torch.float64), _ialm_group(n, torch.float64)
    dispatcher, torch_ops = Dispatcher(_DualStepRule()), Dispatcher(_DualStepRule(), "torch")
    c = torch.linspace(-1, 1, n, dtype=torch.float64)
    dispatcher.step([group], {}, grads=[(c,)])
    torch_ops.step([twin], {}, grads=[(c,)])
    old = group["momentum_buffer"]
    kept = old.clone()
    group["momentum_buffer"] = torch.full((n,), 0.5, dtype=torch.float64)
    twin["momentum_buffer"] = torch.full((n,), 0.5, dtype=torch.float64)
    dispatcher.step([group], {}, grads=[(c,)])
    torch_ops.step([twin], {}, grads=[(c,)])
    assert torch.equal(old, kept)
    torch.testing.assert_close(group["momentum_buffer"], twin["momentum_buffer"], rtol=1e-14, atol=0)
    torch.testing.assert_close(group["params"][0], twin["params"][0], rtol=1e-14, atol=1e-16)


def test_run_returns_values_only_for_rules_that_return():
    p = torch.nn.Parameter(torch.ones(3))
    opt = QHM([p], lr=0.1, momentum=0.9, nu=0.7)
    p.grad = torch.ones(3)
    work = opt._dispatcher.collect(opt.param_groups, opt.state)
    assert opt._dispatcher.run(work) is None
    # QHM from a zero buffer: buf = (1 - beta) g, p -= lr ((1 - nu) g + nu buf)
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * ((1 - 0.7) + 0.7 * (1 - 0.9))))
