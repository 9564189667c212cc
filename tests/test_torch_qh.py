"""uniopt.adapters.torch QHM / QHAdam / QHAdamW against qhoptim and torch.optim, and their API.

Cross-backend parity and the torch.optim mechanics (state dicts, hooks, dispatch) are in
test_torch_qh_dispatch.py; the shared problem is in torch_qh_problem.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest

import torch

from torch_qh_problem import Problem, assert_state_close, run  # noqa: E402
from uniopt.adapters.torch import QHM, QHAdam, QHAdamW  # noqa: E402

BACKENDS = ["auto", "torch"]
F64 = dict(rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def qhoptim():
    import qhoptim.pyt

    return qhoptim.pyt


QHM_SETTINGS = [
    dict(lr=0.3, momentum=0.9, nu=0.7),
    dict(lr=0.3, momentum=0.9, nu=1.3, weight_decay=0.05),
    dict(lr=0.2, momentum=0.8, nu=-0.2, weight_decay=0.05, weight_decay_type="grad"),
    dict(lr=0.2, momentum=0.95, nu=0.7, weight_decay=0.1, weight_decay_type="direct"),
    dict(lr=0.1, momentum=0.5, nu=1.3, weight_decay=0.2, weight_decay_type="direct"),
]
QHADAM_SETTINGS = [
    dict(lr=0.05, nus=(0.7, 1.0)),
    dict(lr=0.05, betas=(0.95, 0.99), nus=(0.8, 0.6), weight_decay=0.1),
    dict(lr=0.03, betas=(0.8, 0.9), nus=(1.2, 0.5), weight_decay=0.05, decouple_weight_decay=True),
    dict(lr=0.02, betas=(0.0, 0.5), nus=(0.5, 1.0), eps=0.0),
]


def _groups(params, first, second):
    return [{"params": params[:2], **first}, {"params": params[2:], **second}]


# ------------------------------------------------------------------------------------------------
# qhoptim trajectories (float64, 25 steps)
# ------------------------------------------------------------------------------------------------
def _compare_with_qhoptim(ours, theirs, steps=25, seed=0):
    problem = Problem(seed)
    p_ours, o_ours = run(ours, problem, steps)
    p_ref, o_ref = run(theirs, problem, steps)
    for a, b, x0 in zip(p_ours, p_ref, problem.x0):
        assert not torch.equal(b, x0)  # the reference moved
        torch.testing.assert_close(a, b, **F64)
    assert_state_close(o_ours, o_ref, p_ours, p_ref, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", QHM_SETTINGS)
def test_qhm_matches_qhoptim(qhoptim, kwargs, backend):
    _compare_with_qhoptim(lambda ps: QHM(ps, **kwargs, _backend=backend),
                          lambda ps: qhoptim.QHM(ps, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", QHADAM_SETTINGS)
def test_qhadam_matches_qhoptim(qhoptim, kwargs, backend):
    _compare_with_qhoptim(lambda ps: QHAdam(ps, **kwargs, _backend=backend),
                          lambda ps: qhoptim.QHAdam(ps, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qhadamw_matches_qhoptim_factory(qhoptim, backend):
    kwargs = dict(lr=0.05, betas=(0.9, 0.98), nus=(0.7, 0.8), weight_decay=0.2)
    _compare_with_qhoptim(lambda ps: QHAdamW(ps, **kwargs, _backend=backend),
                          lambda ps: qhoptim.QHAdamW(ps, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_match_qhoptim(qhoptim, backend):
    first = dict(lr=0.3, nu=0.7, weight_decay=0.05)
    second = dict(lr=0.1, momentum=0.5, nu=1.3, weight_decay=0.1, weight_decay_type="direct")
    _compare_with_qhoptim(
        lambda ps: QHM(_groups(ps, first, second), lr=1.0, momentum=0.9, nu=0.5, _backend=backend),
        lambda ps: qhoptim.QHM(_groups(ps, first, second), lr=1.0, momentum=0.9, nu=0.5))
    first = dict(betas=(0.95, 0.99), nus=(0.8, 0.6), weight_decay=0.1)
    second = dict(lr=0.02, nus=(1.2, 1.0), weight_decay=0.3, decouple_weight_decay=True)
    _compare_with_qhoptim(lambda ps: QHAdam(_groups(ps, first, second), lr=0.05, _backend=backend),
                          lambda ps: qhoptim.QHAdam(_groups(ps, first, second), lr=0.05))


def test_small_model_with_autograd_matches_qhoptim(qhoptim):
    torch.manual_seed(0)
    data, target = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    twin = copy.deepcopy(model)
    ours = QHAdam(model.parameters(), lr=0.01, nus=(0.7, 1.0), weight_decay=1e-3)
    ref = qhoptim.QHAdam(twin.parameters(), lr=0.01, nus=(0.7, 1.0), weight_decay=1e-3)
    for _ in range(20):
        for m, opt in ((model, ours), (twin, ref)):
            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(m(data), target)
                loss.backward()
                return loss

            opt.step(closure)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **F64)


# ------------------------------------------------------------------------------------------------
# Checkpoints across libraries
# ------------------------------------------------------------------------------------------------
def _through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["qhoptim_to_ours", "ours_to_qhoptim"])
@pytest.mark.parametrize("family", ["qhm", "qhadam"])
def test_checkpoints_load_across_libraries(qhoptim, family, direction):
    if family == "qhm":
        kwargs = dict(lr=0.2, momentum=0.9, nu=0.7, weight_decay=0.05)
        make = {"ours": lambda ps: QHM(ps, **kwargs), "ref": lambda ps: qhoptim.QHM(ps, **kwargs)}
    else:
        kwargs = dict(lr=0.05, betas=(0.9, 0.98), nus=(0.7, 0.8), weight_decay=0.1)
        make = {"ours": lambda ps: QHAdam(ps, **kwargs), "ref": lambda ps: qhoptim.QHAdam(ps, **kwargs)}
    first, second = ("ref", "ours") if direction == "qhoptim_to_ours" else ("ours", "ref")
    problem = Problem(1)
    params, opt = run(make[first], problem, 10)
    checkpoint = _through_bytes(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make[second](resumed)
    opt2.load_state_dict(checkpoint)
    if second == "ours":
        assert all(g["maximize"] is False for g in opt2.param_groups)
    run(None, problem, 10, params=params, opt=opt)
    run(None, problem, 10, params=resumed, opt=opt2)
    for a, b in zip(resumed, params):
        torch.testing.assert_close(a, b, **F64)
    assert_state_close(opt2, opt, resumed, params, **F64)


def test_state_layout_matches_qhoptim(qhoptim):
    problem = Problem(2)
    for ours, theirs in [(lambda ps: QHM(ps, lr=0.1, momentum=0.9, nu=0.7),
                          lambda ps: qhoptim.QHM(ps, lr=0.1, momentum=0.9, nu=0.7)),
                         (lambda ps: QHAdam(ps), lambda ps: qhoptim.QHAdam(ps))]:
        _, a = run(ours, problem, 2)
        _, b = run(theirs, problem, 2)
        sa, sb = a.state_dict(), b.state_dict()
        assert [list(s) for s in sa["state"].values()] == [list(s) for s in sb["state"].values()]
        for s in sa["state"].values():
            for key in ("beta1_weight", "beta2_weight"):
                assert type(s.get(key, 0.0)) is float
        for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
            assert set(ga) - set(gb) == {"maximize"}
            assert all(ga[k] == gb[k] for k in gb)


# ------------------------------------------------------------------------------------------------
# Degenerate cases against torch.optim (float64, 30 steps)
# ------------------------------------------------------------------------------------------------
CLOSE = dict(rtol=1e-10, atol=1e-12)


def _equivalent(ours, reference, steps=30, **tol):
    problem = Problem(3)
    a, _ = run(ours, problem, steps)
    b, _ = run(reference, problem, steps)
    for x, y, x0 in zip(a, b, problem.x0):
        assert not torch.equal(y, x0)
        torch.testing.assert_close(x, y, **(tol or CLOSE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qhm_nu_zero_is_sgd(backend):
    _equivalent(lambda ps: QHM(ps, lr=0.2, momentum=0.9, nu=0.0, weight_decay=0.1, _backend=backend),
                lambda ps: torch.optim.SGD(ps, lr=0.2, weight_decay=0.1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_qhm_nu_one_is_momentum_sgd(backend, weight_decay):
    lr, beta = 0.5, 0.9
    _equivalent(lambda ps: QHM(ps, lr=lr, momentum=beta, nu=1.0, weight_decay=weight_decay,
                               _backend=backend),
                lambda ps: torch.optim.SGD(ps, lr=lr * (1 - beta), momentum=beta,
                                           weight_decay=weight_decay))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qhm_nu_beta_is_nesterov(backend):
    lr, beta = 0.5, 0.8
    _equivalent(lambda ps: QHM(ps, lr=lr, momentum=beta, nu=beta, _backend=backend),
                lambda ps: torch.optim.SGD(ps, lr=lr * (1 - beta), momentum=beta, nesterov=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_qhadam_unit_nus_is_adam(backend, weight_decay):
    kw = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=weight_decay, eps=1e-6)
    _equivalent(lambda ps: QHAdam(ps, nus=(1.0, 1.0), **kw, _backend=backend),
                lambda ps: torch.optim.Adam(ps, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qhadamw_unit_nus_is_adamw(backend):
    kw = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.3, eps=1e-6)
    _equivalent(lambda ps: QHAdamW(ps, nus=(1.0, 1.0), **kw, _backend=backend),
                lambda ps: torch.optim.AdamW(ps, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_maximize_matches_torch(backend):
    _equivalent(lambda ps: QHM(ps, lr=0.1, momentum=0.9, nu=0.0, weight_decay=0.1, maximize=True,
                               _backend=backend),
                lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1, maximize=True), steps=10)
    _equivalent(lambda ps: QHM(ps, lr=0.5, momentum=0.9, nu=1.0, maximize=True, _backend=backend),
                lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, maximize=True), steps=10)
    kw = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.05, eps=1e-6, maximize=True)
    _equivalent(lambda ps: QHAdam(ps, **kw, _backend=backend), lambda ps: torch.optim.Adam(ps, **kw))
    _equivalent(lambda ps: QHAdamW(ps, **kw, _backend=backend), lambda ps: torch.optim.AdamW(ps, **kw))


def test_maximize_negates_the_gradient():
    problem = Problem(4)
    up, _ = run(lambda ps: QHAdam(ps, lr=0.05, nus=(0.7, 0.9), maximize=True), problem, 15)
    flipped = Problem(4, sign=-1.0)
    down, _ = run(lambda ps: QHAdam(ps, lr=0.05, nus=(0.7, 0.9)), flipped, 15)
    for a, b in zip(up, down):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Constructors: signatures, classes, converters, bad input
# ------------------------------------------------------------------------------------------------
def _param():
    return torch.nn.Parameter(torch.zeros(3))


def test_defaults_and_group_keys_match_qhoptim(qhoptim):
    p = _param()
    ours, ref = QHM([p], 0.1, 0.9, 0.7), qhoptim.QHM([p], 0.1, 0.9, 0.7)
    assert {k: v for k, v in ours.defaults.items() if k not in ("maximize", "differentiable")} == \
        {k: v for k, v in ref.defaults.items() if k != "differentiable"}
    ours, ref = QHAdam([p], 0.01, (0.8, 0.9), (0.7, 1.0), 0.1, True, 1e-6), \
        qhoptim.QHAdam([p], 0.01, (0.8, 0.9), (0.7, 1.0), 0.1, True, 1e-6)
    assert {k: v for k, v in ours.defaults.items() if k not in ("maximize", "differentiable")} == \
        {k: v for k, v in ref.defaults.items() if k != "differentiable"}
    assert ours.defaults["maximize"] is False
    assert QHAdam([p]).defaults == {**QHAdam([p], 1e-3, (0.9, 0.999), (1.0, 1.0), 0.0, False, 1e-8).defaults}


def test_classes_are_torch_optimizers():
    p = _param()
    w = QHAdamW([p], lr=0.1, weight_decay=0.1)
    assert isinstance(w, QHAdam) and isinstance(w, torch.optim.Optimizer)
    assert isinstance(QHM([p], lr=0.1, momentum=0.9, nu=0.7), torch.optim.Optimizer)
    assert w.param_groups[0]["decouple_weight_decay"] is True
    assert QHAdam([p], weight_decay=0.1).param_groups[0]["decouple_weight_decay"] is False
    with pytest.raises(TypeError, match="decouple_weight_decay"):
        QHAdamW([p], decouple_weight_decay=True)
    with pytest.raises(TypeError):
        QHM([p], 0.1, 0.9, 0.7, 0.0, "grad", False)  # maximize is keyword-only


def test_momentum_may_come_from_the_groups():
    p, q = _param(), _param()
    opt = QHM([{"params": [p], "momentum": 0.9}, {"params": [q], "momentum": 0.5}], lr=0.1, nu=0.7)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.5]
    for missing in ("lr", "momentum", "nu"):
        kwargs = {k: v for k, v in dict(lr=0.1, momentum=0.9, nu=0.7).items() if k != missing}
        with pytest.raises(ValueError, match=f"required optimization parameter {missing}"):
            QHM([p], **kwargs)


CONVERSIONS = [
    ("from_pid", dict(k_p=-0.1, k_i=1.0, k_d=3.0)),
    ("from_synthesized_nesterov", dict(alpha=0.1, beta1=0.9, beta2=0.6)),
    ("from_robust_momentum", dict(l=5.0, kappa=15.0)),
    ("from_robust_momentum", dict(l=5.0, kappa=15.0, rho=0.8)),
    ("from_accsgd", dict(delta=0.1, kappa=1000.0, xi=10.0)),
    ("from_accsgd", dict(delta=0.1, kappa=1000.0, xi=10.0, eps=0.5)),
    ("from_two_state_optimizer", dict(h=0.9, k=0.0, l=0.1, m=-0.09, q=1.0, z=-0.01)),
]


@pytest.mark.parametrize("name, kwargs", CONVERSIONS)
def test_conversions_match_qhoptim(qhoptim, name, kwargs):
    ours, ref = getattr(QHM, name)(**kwargs), getattr(qhoptim.QHM, name)(**kwargs)
    assert set(ours) == set(ref) == {"lr", "momentum", "nu"}
    assert ours == pytest.approx(ref, rel=1e-12)
    QHM([_param()], **ours)  # usable as keyword arguments


def test_from_nadam_matches_qhoptim(qhoptim):
    for kwargs in ({}, dict(lr=0.01, betas=(0.95, 0.99))):
        ours, ref = QHAdam.from_nadam(**kwargs), qhoptim.QHAdam.from_nadam(**kwargs)
        assert ours == ref
        assert QHAdamW.from_nadam(**kwargs) == ref
        QHAdam([_param()], **ours)


def test_two_state_optimizer_conversion_is_exact_for_q_below_one(qhoptim):
    """For q != 1 qhoptim's nu is off; ours reproduces the two-state recurrence (deviation)."""
    h, k, l, q, z = 0.8, 0.3, 0.2, 0.95, -0.05
    m = (1 - h) * (1 - q) / k
    hyper = QHM.from_two_state_optimizer(h=h, k=k, l=l, m=m, q=q, z=z)
    theirs = qhoptim.QHM.from_two_state_optimizer(h=h, k=k, l=l, m=m, q=q, z=z)
    assert hyper["nu"] != pytest.approx(theirs["nu"])
    problem = Problem(5, shapes=[(6,)])
    theta = problem.x0[0].clone()
    a = (1 - q) * theta / m
    expected = []
    for _ in range(30):
        g = problem.grad(0, theta)
        a, theta = h * a + k * theta + l * g, m * a + q * theta + z * g
        expected.append(theta)
    p = torch.nn.Parameter(problem.x0[0].clone())
    opt = QHM([p], **hyper)
    for e in expected:
        p.grad = problem.grad(0, p)
        opt.step()
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


NAN = float("nan")
BAD_QHM = [
    (dict(lr=-0.1), ValueError, r"^Invalid learning rate: -0\.1"),
    (dict(lr=NAN), ValueError, r"^Invalid learning rate: nan"),
    (dict(lr="0.1"), TypeError, r"^Invalid learning rate: '0\.1'"),
    (dict(lr=None), TypeError, r"^Invalid learning rate: None"),
    (dict(momentum=-0.5), ValueError, r"^Invalid momentum value: -0\.5"),
    (dict(momentum=NAN), ValueError, r"^Invalid momentum value: nan"),
    (dict(nu=NAN), ValueError, r"^Invalid nu value: nan"),
    (dict(nu=math.inf), ValueError, r"^Invalid nu value: inf"),
    (dict(nu="x"), TypeError, r"^Invalid nu value: 'x'"),
    (dict(weight_decay=-1e-4), ValueError, r"^Invalid weight_decay value: -0\.0001"),
    (dict(weight_decay_type="l2"), ValueError, r"^Invalid weight_decay_type value: '?l2"),
    (dict(weight_decay_type=None), ValueError, r"^Invalid weight_decay_type value: '?None"),
    (dict(_backend="numba"), ValueError, r"^Invalid backend: 'numba'"),
]
BAD_QHADAM = [
    (dict(lr=-1.0), ValueError, r"^Invalid learning rate: -1\.0"),
    (dict(lr="fast"), TypeError, r"^Invalid learning rate: 'fast'"),
    (dict(eps=-1e-8), ValueError, r"^Invalid epsilon value: -1e-08"),
    (dict(eps=NAN), ValueError, r"^Invalid epsilon value: nan"),
    (dict(betas=(1.0, 0.999)), ValueError, r"^Invalid beta parameter at index 0: 1\.0"),
    (dict(betas=(-0.1, 0.999)), ValueError, r"^Invalid beta parameter at index 0: -0\.1"),
    (dict(betas=(0.9, 1.5)), ValueError, r"^Invalid beta parameter at index 1: 1\.5"),
    (dict(betas=(0.9, NAN)), ValueError, r"^Invalid beta parameter at index 1: nan"),
    (dict(betas=(0.9,)), ValueError, r"^Invalid betas: \(0\.9,\)"),
    (dict(betas=(0.9, 0.99, 0.999)), ValueError, r"^Invalid betas"),
    (dict(betas=0.9), TypeError, r"^Invalid betas: 0\.9"),
    (dict(nus=(NAN, 1.0)), ValueError, r"^Invalid nu parameter at index 0: nan"),
    (dict(nus=(1.0, math.inf)), ValueError, r"^Invalid nu parameter at index 1: inf"),
    (dict(nus=(0.7,)), ValueError, r"^Invalid nus"),
    (dict(nus=None), TypeError, r"^Invalid nus: None"),
    (dict(weight_decay=-0.1), ValueError, r"^Invalid weight_decay value: -0\.1"),
    (dict(_backend="cuda"), ValueError, r"^Invalid backend: 'cuda'"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_QHM)
def test_qhm_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        QHM([_param()], **{**dict(lr=0.1, momentum=0.9, nu=0.7), **kwargs})
    if "_backend" not in kwargs:  # the same value in a param group is rejected too
        with pytest.raises(error, match=message):
            QHM([{"params": [_param()], **kwargs}], lr=0.1, momentum=0.9, nu=0.7)


@pytest.mark.parametrize("kwargs, error, message", BAD_QHADAM)
@pytest.mark.parametrize("cls", [QHAdam, QHAdamW])
def test_qhadam_bad_input(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls([_param()], **kwargs)
    if "_backend" not in kwargs:
        with pytest.raises(error, match=message):
            cls([{"params": [_param()], **kwargs}])


SHARED_CHECKS = [  # values qhoptim validates too
    ("QHM", dict(lr=-0.1), r"^Invalid learning rate: -0\.1"),
    ("QHM", dict(momentum=-0.5), r"^Invalid momentum value: -0\.5"),
    ("QHM", dict(weight_decay=-1e-4), r"^Invalid weight_decay value: -0\.0001"),
    ("QHM", dict(weight_decay_type="l2"), r"^Invalid weight_decay_type value: '?l2"),
    ("QHAdam", dict(lr=-1.0), r"^Invalid learning rate: -1\.0"),
    ("QHAdam", dict(eps=-1e-8), r"^Invalid epsilon value: -1e-08"),
    ("QHAdam", dict(betas=(1.0, 0.999)), r"^Invalid beta parameter at index 0: 1\.0"),
    ("QHAdam", dict(betas=(0.9, 1.5)), r"^Invalid beta parameter at index 1: 1\.5"),
    ("QHAdam", dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0\.1"),
]


@pytest.mark.parametrize("name, kwargs, message", SHARED_CHECKS)
def test_shared_checks_raise_like_qhoptim(qhoptim, name, kwargs, message):
    """Where qhoptim validates a value, both raise ValueError with the same message."""
    base = dict(lr=0.1, momentum=0.9, nu=0.7) if name == "QHM" else {}
    ours, ref = {"QHM": (QHM, qhoptim.QHM), "QHAdam": (QHAdam, qhoptim.QHAdam)}[name]
    for cls in (ours, ref):
        with pytest.raises(ValueError, match=message):
            cls([_param()], **{**base, **kwargs})
