"""uniopt.adapters.torch.PolyakSGD: parity with the NumPy solver and the naive oracle, the
torch.optim mechanics (param groups, state dicts, closures), bad inputs, the CUDA glue."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

import torch

from conftest import tolerance  # noqa: E402
from refimpl.naive_polyak import NaivePolyakSGD  # noqa: E402
from uniopt.adapters.torch import polyak as torch_polyak  # noqa: E402
from uniopt.polyak import PolyakSGD as NumpyPolyakSGD  # noqa: E402

PolyakSGD = torch_polyak.PolyakSGD
BACKENDS = ["auto", "torch"]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
SETTINGS = [
    dict(),
    dict(delta=0.5, max_stepsize=0.3),
    dict(fun_min=0.05, momentum=0.9),
    dict(variant="SPS+"),
    dict(variant="SPS+", momentum=0.5, fun_min=0.01),
]
SHAPES = [(4, 3), (3,), (1,), (5, 2)]


class Problem:
    """Least squares with a linear model split over several tensors: f = mean((sum_k X_k w_k - y)^2)/2."""

    def __init__(self, seed=0, n=12):
        rng = np.random.default_rng(seed)
        self.features = [rng.standard_normal((n, int(np.prod(s)))) for s in SHAPES]
        self.y = rng.standard_normal(n)
        self.x0 = [rng.standard_normal(s) for s in SHAPES]

    def numpy_fun(self, params):
        r = sum(f @ p.reshape(-1) for f, p in zip(self.features, params)) - self.y
        n = len(self.y)
        return 0.5 * float(r @ r) / n, [(f.T @ r / n).reshape(p.shape) for f, p in zip(self.features, params)]

    def torch_loss(self, params):
        feats = [torch.as_tensor(f, dtype=params[0].dtype) for f in self.features]
        r = sum(f @ p.reshape(-1) for f, p in zip(feats, params)) - torch.as_tensor(self.y, dtype=params[0].dtype)
        return 0.5 * (r @ r) / len(self.y)


def _torch_params(problem, dtype=torch.float64, noncontiguous=False):
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype)) for x in problem.x0]
    if noncontiguous:  # the first parameter is a transposed view: the torch-ops path
        params[0] = torch.nn.Parameter(torch.tensor(np.ascontiguousarray(problem.x0[0].T), dtype=dtype).t())
        assert not params[0].is_contiguous()
    return params


def _closure(opt, problem, params):
    def closure():
        opt.zero_grad()
        loss = problem.torch_loss(params)
        loss.backward()
        return loss

    return closure


def _run(problem, params, steps, **kwargs):
    opt = PolyakSGD(params, **kwargs)
    for _ in range(steps):
        opt.step(_closure(opt, problem, params))
    return opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_matches_numpy_solver_and_naive(kwargs, backend):
    problem = Problem()
    params = _torch_params(problem)
    opt = PolyakSGD(params, _backend=backend, **kwargs)
    solver = NumpyPolyakSGD(problem.numpy_fun, **kwargs)
    oracle = NaivePolyakSGD(**kwargs)
    x, state = [a.copy() for a in problem.x0], solver.init_state(problem.x0)
    expected = [a.copy() for a in problem.x0]
    for _ in range(12):
        loss = opt.step(_closure(opt, problem, params))
        value, grads = problem.numpy_fun(expected)
        assert float(loss.detach()) == pytest.approx(value, rel=1e-13)
        expected = oracle.step(expected, grads, value)
        x, state = solver.update(x, state)
        assert opt.last_step[0]["stepsize"] == pytest.approx(float(state.stepsize), rel=1e-12)
        assert opt.last_step[0]["grad_norm"] == pytest.approx(float(state.error), rel=1e-12)
    for p, a, e in zip(params, x, expected):
        np.testing.assert_allclose(p.detach().numpy(), a, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-14)
    if kwargs.get("momentum"):
        for p, v in zip(params, state.velocity):
            np.testing.assert_allclose(opt.state[p]["velocity"].numpy(), v, rtol=1e-12, atol=1e-14)
    else:
        assert all("velocity" not in opt.state[p] for p in params)


@pytest.mark.parametrize("kwargs", [SETTINGS[1], SETTINGS[2], SETTINGS[4]])
def test_same_inputs_give_the_numpy_solvers_bits(kwargs, dtype):
    """Given the same loss and gradients, the table path runs the NumPy solver's kernels."""
    problem = Problem(9)
    params = [torch.nn.Parameter(torch.tensor(x, dtype=TORCH_DTYPES[dtype])) for x in problem.x0]
    opt = PolyakSGD(params, **kwargs)

    def fun(xs):
        value, grads = problem.numpy_fun([x.astype(np.float64) for x in xs])
        return value, [g.astype(dtype) for g in grads]

    solver = NumpyPolyakSGD(fun, **kwargs)
    x = [a.astype(dtype) for a in problem.x0]
    state = solver.init_state(x)
    for _ in range(6):
        value, grads = fun([p.detach().numpy() for p in params])
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        opt.step(loss=value)
        x, state = solver.update(x, state)
        assert opt.last_step[0]["stepsize"] == float(state.stepsize) or dtype == np.float32
    for p, a in zip(params, x):
        np.testing.assert_array_equal(p.detach().numpy(), a)


@pytest.mark.parametrize("kwargs", [SETTINGS[2], SETTINGS[4]])
def test_mixed_paths_in_one_group_share_one_norm(kwargs, dtype):
    """A non-contiguous parameter (torch ops) next to table-kernel ones: one global norm."""
    problem = Problem(1)
    mixed = _torch_params(problem, TORCH_DTYPES[dtype], noncontiguous=True)
    plain = _torch_params(problem, TORCH_DTYPES[dtype])
    a, b = _run(problem, mixed, 8, **kwargs), _run(problem, plain, 8, **kwargs)
    for p, q in zip(mixed, plain):
        torch.testing.assert_close(p.detach(), q.detach(), **tolerance(dtype))
    assert a.last_step[0]["stepsize"] == pytest.approx(b.last_step[0]["stepsize"], rel=1e-5 if dtype == np.float32 else 1e-12)


def test_float32_matches_naive():
    problem = Problem(2)
    params = _torch_params(problem, torch.float32)
    opt = PolyakSGD(params, momentum=0.5, max_stepsize=0.5)
    oracle = NaivePolyakSGD(momentum=0.5, max_stepsize=0.5, dtype=np.float32)
    expected = [a.astype(np.float32).astype(np.float64) for a in problem.x0]
    for _ in range(10):
        opt.step(_closure(opt, problem, params))
        value, grads = problem.numpy_fun(expected)
        expected = oracle.step(expected, grads, value)
    for p, e in zip(params, expected):
        assert p.dtype == torch.float32
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-4, atol=1e-5)


def test_one_reduction_and_one_update_call_per_group(monkeypatch):
    from uniopt.kernels import polyak_cpu

    calls = []
    for name in ("sq_norm_table", "polyak_sgd_table_", "polyak_heavy_ball_table_"):
        kernel = getattr(polyak_cpu, name)
        monkeypatch.setattr(polyak_cpu, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    problem = Problem(3)
    params = _torch_params(problem)
    opt = PolyakSGD([{"params": params[:2]}, {"params": params[2:], "momentum": 0.9}])
    opt.step(_closure(opt, problem, params))
    assert sorted(calls) == sorted(["sq_norm_table", "sq_norm_table", "polyak_heavy_ball_table_", "polyak_sgd_table_"])


# ------------------------------------------------------------------------------------------------
# torch.optim mechanics
# ------------------------------------------------------------------------------------------------
def test_param_groups_have_their_own_norm_and_hyperparameters():
    problem = Problem(4)
    params = _torch_params(problem)
    groups = [{"params": params[:2], "max_stepsize": 0.2}, {"params": params[2:], "variant": "SPS+", "momentum": 0.5}]
    opt = PolyakSGD(groups, fun_min=0.01)
    oracles = [NaivePolyakSGD(fun_min=0.01, max_stepsize=0.2), NaivePolyakSGD(fun_min=0.01, variant="SPS+", momentum=0.5)]
    expected = [a.copy() for a in problem.x0]
    for _ in range(8):
        opt.step(_closure(opt, problem, params))
        value, grads = problem.numpy_fun(expected)
        expected = oracles[0].step(expected[:2], grads[:2], value) + oracles[1].step(expected[2:], grads[2:], value)
        for record, oracle in zip(opt.last_step, oracles):
            assert record["stepsize"] == pytest.approx(oracle.last_stepsize, rel=1e-12)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-14)
    assert [g["momentum"] for g in opt.param_groups] == [0.0, 0.5]
    # Hyper-parameters are re-read at every step (e.g. changed by a scheduler).
    opt.param_groups[0]["max_stepsize"] = 0.0
    before = [p.detach().clone() for p in params[:2]]
    opt.step(_closure(opt, problem, params))
    for p, b in zip(params[:2], before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_state_dict_round_trip_resumes_identically():
    problem = Problem(5)
    params = _torch_params(problem)
    opt = _run(problem, params, 4, momentum=0.7, delta=0.1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = PolyakSGD(twins, momentum=0.0)  # hyper-parameters come from the state dict
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["momentum"] == 0.7 and resumed.param_groups[0]["delta"] == 0.1
    # Loading copies: changing the loaded dict afterwards changes nothing.
    for s in saved["state"].values():
        s["velocity"].fill_(float("nan"))
    for _ in range(4):
        opt.step(_closure(opt, problem, params))
        resumed.step(_closure(resumed, problem, twins))
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=0)
    for p, t in zip(params, twins):
        torch.testing.assert_close(opt.state[p]["velocity"], resumed.state[t]["velocity"], rtol=0, atol=0)


def test_load_state_dict_validates_hyperparameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = PolyakSGD([p])
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["variant"] = "SPS"
    with pytest.raises(ValueError, match="Invalid variant value: 'SPS'"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["variant"] == "SPS_max"


def test_deepcopy_and_pickle_keep_working():
    problem = Problem(6)
    params = _torch_params(problem)
    opt = _run(problem, params, 2, momentum=0.5)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    clone_params = clone.param_groups[0]["params"]
    clone.step(_closure(clone, problem, clone_params))
    opt.step(_closure(opt, problem, params))
    for p, q in zip(params, clone_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_step_with_loss_keyword_equals_closure():
    problem = Problem(7)
    a, b = _torch_params(problem), _torch_params(problem)
    _run(problem, a, 3, momentum=0.5)
    opt_b = PolyakSGD(b, momentum=0.5)
    for _ in range(3):
        opt_b.zero_grad()
        loss = problem.torch_loss(b)
        loss.backward()
        assert opt_b.step(loss=loss) is loss
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    opt_b.zero_grad()
    problem.torch_loss(b).backward()
    opt_b.step(loss=0.5)  # a plain number works too
    assert opt_b.last_step[0]["loss"] == 0.5


def test_missing_loss_is_a_clear_error():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = PolyakSGD([p])
    with pytest.raises(RuntimeError, match=r"needs the loss: call step\(closure\)"):
        opt.step()
    with pytest.raises(RuntimeError, match="the closure returned None"):
        opt.step(lambda: None)
    with pytest.raises(ValueError, match="either a closure or loss="):
        opt.step(lambda: torch.tensor(1.0), loss=torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=r"loss must be a scalar, got a tensor of shape \(2,\)"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss must be a number or a scalar tensor"):
        opt.step(loss="1.0")
    torch.testing.assert_close(p.detach(), torch.ones(2))


def test_zero_gradient_and_loss_below_fun_min_give_zero_steps(dtype):
    for backend in BACKENDS:
        p = torch.nn.Parameter(torch.ones(3, dtype=TORCH_DTYPES[dtype]))
        opt = PolyakSGD([p], momentum=0.5, _backend=backend)
        p.grad = torch.zeros_like(p)
        opt.step(loss=torch.tensor(0.0))  # exact minimiser, delta=0: 0/0 in jaxopt
        assert opt.last_step[0]["stepsize"] == 0.0
        p.grad = torch.ones_like(p)
        PolyakSGD([p], fun_min=10.0, _backend=backend).step(loss=1.0)  # f < fun_min
        opt_plus = PolyakSGD([p], variant="SPS+", _backend=backend)
        p.grad = torch.zeros_like(p)
        opt_plus.step(loss=3.0)
        assert opt_plus.last_step[0]["stepsize"] == 0.0
        torch.testing.assert_close(p.detach(), torch.ones(3, dtype=p.dtype), rtol=0, atol=0)


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = PolyakSGD([a, b], momentum=0.5)
    a.grad = torch.full((2,), 2.0, dtype=torch.float64)
    opt.step(loss=2.0)  # gamma = 2 / 8
    torch.testing.assert_close(a.detach(), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.ones(3, dtype=torch.float64))
    assert b not in opt.state or "velocity" not in opt.state[b]


def test_sparse_gradients_fail_before_any_change():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = PolyakSGD([a, b])
    a.grad = torch.ones(3)
    b.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step(loss=1.0)
    torch.testing.assert_close(a.detach(), torch.ones(3), rtol=0, atol=0)


@pytest.mark.parametrize("bad_group", [0, 1])
def test_bad_gradient_in_any_group_fails_before_any_change(bad_group):
    """A heavy-ball group and a plain one (run by different dispatchers): a bad gradient in
    either fails the step before any parameter moves or any state is created."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    opt = PolyakSGD([{"params": params[:2], "momentum": 0.9}, {"params": params[2:]}])
    for p in params:
        p.grad = torch.ones(3)
    params[2 * bad_group + 1].grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step(loss=1.0)
    for p in params:
        torch.testing.assert_close(p.detach(), torch.ones(3), rtol=0, atol=0)
    assert not opt.state
    params[2 * bad_group + 1].grad = torch.ones(3)
    opt.step(loss=1.0)  # then a good step works: gamma = 1 / 6 in each group
    for p in params:
        torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 1 / 6), rtol=1e-6, atol=0)


def test_norm_follows_every_gradient_change_between_steps():
    """The norm is read from this step's gradients whatever happened to them since the last step
    (cached tables): new values in place, new tensors, a removed gradient, a non-contiguous one,
    a parameter replaced by hand."""
    params = [torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)) for _ in range(3)]
    opt = PolyakSGD(params, max_stepsize=0.0)  # zero steps: only the norm matters

    def check():
        opt.step(loss=1.0)
        expected = sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None)
        assert opt.last_step[0]["grad_norm"] == pytest.approx(np.sqrt(expected), rel=1e-15)

    for p in params:
        p.grad = torch.ones(2, 3, dtype=torch.float64)
    check()
    params[0].grad.mul_(3.0)  # in place
    check()
    params[1].grad = torch.full((2, 3), 2.0, dtype=torch.float64)  # a new tensor
    check()
    params[2].grad = None
    check()
    params[2].grad = torch.arange(6.0, dtype=torch.float64).reshape(3, 2).t()  # non-contiguous
    assert not params[2].grad.is_contiguous()
    check()
    with torch.no_grad():
        params[1].data = torch.zeros(2, 3, dtype=torch.float64)  # a new parameter tensor
    params[1].grad = torch.full((2, 3), 5.0, dtype=torch.float64)
    check()
    opt.zero_grad()
    opt.step(loss=1.0)
    assert opt.last_step[0]["grad_norm"] == 0.0 and opt.last_step[0]["stepsize"] == 0.0


def test_half_precision_and_autograd_training_converge():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    model = torch.nn.Linear(5, 1)
    y = x @ torch.randn(5, 1) + 0.3  # realisable: f* = 0
    opt = PolyakSGD(model.parameters(), max_stepsize=10.0, momentum=0.3)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(200):
        loss = opt.step(closure)
    assert float(loss.detach()) < 1e-8 * first
    h = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    opt = PolyakSGD([h])
    for _ in range(3):
        opt.zero_grad()
        loss = (h.float() ** 2).sum()
        loss.backward()
        opt.step(loss=loss)
    assert h.dtype == torch.bfloat16 and float(h.detach().abs().max()) == pytest.approx(2.0 / 8, rel=1e-2)


BAD_INPUTS = [
    (dict(variant="SPS"), ValueError, r"Invalid variant value: 'SPS'"),
    (dict(max_stepsize=-1.0), ValueError, r"Invalid max_stepsize value: -1\.0"),
    (dict(max_stepsize=float("inf")), ValueError, r"Invalid max_stepsize value: inf"),
    (dict(delta=-0.1), ValueError, r"Invalid delta value: -0\.1"),
    (dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0\.5"),
    (dict(fun_min=float("nan")), ValueError, r"Invalid fun_min value: nan"),
    (dict(fun_min="0"), TypeError, r"Invalid fun_min value: '0'"),
    (dict(_backend="numba"), ValueError, r"Invalid backend: 'numba'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        PolyakSGD([torch.nn.Parameter(torch.ones(2))], **kwargs)
    if not kwargs.get("_backend"):
        opt = PolyakSGD([torch.nn.Parameter(torch.ones(2))])
        with pytest.raises(error, match=message):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **kwargs})
        assert len(opt.param_groups) == 1


def test_is_a_torch_optimizer():
    p = torch.nn.Parameter(torch.ones(2))
    opt = PolyakSGD([p])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults == dict(fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0, momentum=0.0,
                                lr=1.0)
    with pytest.raises(ValueError, match="empty parameter list"):
        PolyakSGD([])


# ------------------------------------------------------------------------------------------------
# CUDA: the glue on the simulator, and the real thing where torch sees a GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cuda_glue_matches_torch_ops_on_the_simulator(momentum):
    import numba.cuda  # noqa: F401  (numba-cuda: the test extra)
    import numba
    from numba import cuda

    if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
        pytest.skip("neither a CUDA device nor the numba-cuda simulator")
    rule = torch_polyak._HeavyBallRule() if momentum else torch_polyak._SGDRule()
    gen = torch.Generator().manual_seed(23)
    p = torch.randn(40, dtype=torch.float64, generator=gen)
    p_ops = p.clone()
    state, state_ops = rule.init_state(p), rule.init_state(p_ops)
    for k in range(3):
        g = torch.randn(40, dtype=torch.float64, generator=gen)
        step = torch_polyak._Step(0.1 * (k + 1), momentum)
        rule.run_cuda(step, p.numpy(), g.numpy(), [state[b].numpy() for b in rule.buffers], state, 0)
        rule.run_torch(step, p_ops, g, [state_ops[b] for b in rule.buffers], state_ops)
    torch.testing.assert_close(p, p_ops, **tolerance(np.float64))
    for key in rule.buffers:
        torch.testing.assert_close(state[key], state_ops[key], **tolerance(np.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to torch")
@pytest.mark.parametrize("kwargs", [SETTINGS[0], SETTINGS[2], SETTINGS[4]])
def test_cuda_tensors_match_cpu(kwargs, dtype):
    problem = Problem(8)
    cpu = _torch_params(problem, TORCH_DTYPES[dtype])
    gpu = [torch.nn.Parameter(p.detach().to("cuda")) for p in _torch_params(problem, TORCH_DTYPES[dtype], noncontiguous=True)]
    _run(problem, cpu, 6, **kwargs)
    opt = PolyakSGD(gpu, **kwargs)
    for _ in range(6):
        def closure():
            opt.zero_grad()
            feats = [torch.as_tensor(f, dtype=gpu[0].dtype, device="cuda") for f in problem.features]
            r = sum(f @ p.reshape(-1) for f, p in zip(feats, gpu)) - torch.as_tensor(problem.y, dtype=gpu[0].dtype, device="cuda")
            loss = 0.5 * (r @ r) / len(problem.y)
            loss.backward()
            return loss
        opt.step(closure)
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(p.detach(), q.detach().cpu(), **tolerance(dtype))
