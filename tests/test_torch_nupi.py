"""torch nuPI (uniopt.adapters.torch.constrained.optim.torch_optimizers) against cooper-optim
1.0.1's ``cooper.optim.nuPI`` where Cooper is right, against the documented recursion
(tests/refimpl/naive_constrained.py) where it is not, across execution paths, with state
dicts and bad input."""

from __future__ import annotations

import copy
import warnings

import cooper  # the reference (test extra): a missing one fails here
import numpy as np
import pytest
import torch

from refimpl import naive_constrained as naive

from uniopt.adapters.torch.constrained.optim.torch_optimizers import nuPI, nuPIInitType

F64 = dict(rtol=1e-12, atol=1e-14)
M = 8
# Cooper builds sparse tensors without choosing invariant checks; torch warns about that
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def _errors(sparse, steps=12, seed=1, m=M, width=1, k=5):
    """A fixed sequence of dense errors ``(m, width)`` or sparse ``(indices, values)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if sparse:
            idx = torch.randint(0, m, (k,), generator=g)
            out.append((idx, torch.randn(k, width, dtype=torch.float64, generator=g)))
        else:
            out.append(torch.randn(m, width, dtype=torch.float64, generator=g))
    return out


def _set_grad(w, e):
    if isinstance(e, tuple):
        idx, vals = e
        w.grad = torch.sparse_coo_tensor(idx[None], vals.to(w.dtype), w.shape,
                                         check_invariants=True)
    else:
        w.grad = e.to(w.dtype).reshape(w.shape).clone()


def _run(opt_cls, errors, kw, init, dtype=torch.float64, backend=None, width=1):
    w = torch.nn.Parameter(torch.linspace(-1, 1, M * width, dtype=dtype).reshape(M, width))
    kw = dict(kw)
    if opt_cls is nuPI:
        kw["init_type"] = getattr(nuPIInitType, init)
        if backend:
            kw["_backend"] = backend
    else:
        kw["init_type"] = getattr(cooper.optim.nuPIInitType, init)
    opt = opt_cls([w], **kw)
    for e in errors:
        _set_grad(w, e)
        opt.step()
    return w.detach().clone(), opt


def _naive(errors, kw, init, width=1):
    theta = torch.linspace(-1, 1, M * width, dtype=torch.float64).reshape(M, width).numpy()
    kp, ki = kw.get("Kp", 0.0), kw.get("Ki", 1.0)
    kp = kp.numpy().reshape(M, width) if isinstance(kp, torch.Tensor) else kp
    ki = ki.numpy().reshape(M, width) if isinstance(ki, torch.Tensor) else ki
    ref = naive.NaiveNuPI(theta, kw["lr"], kw.get("weight_decay", 0.0), kp, ki,
                          kw.get("ema_nu", 0.0), init, kw.get("maximize", False))
    for e in errors:
        if isinstance(e, tuple):
            ref.sparse_step(e[0].numpy(), e[1].numpy())
        else:
            ref.step(e.numpy())
    return torch.from_numpy(ref.theta)


# Gains are exact in float32 (Cooper stores a scalar gain as a float32 tensor).
SETTINGS = {
    "pi": dict(lr=0.1, Kp=0.5, Ki=1.0),
    "pi-nu-wd": dict(lr=0.05, Kp=2.0, Ki=0.5, ema_nu=0.25, weight_decay=0.5),
    "pi-nu-wd-max": dict(lr=0.05, Kp=2.0, Ki=0.5, ema_nu=0.25, weight_decay=0.5, maximize=True),
    "optimistic-max": dict(lr=0.2, Kp=1.0, Ki=1.0, maximize=True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_zeros_init_matches_cooper(setting, sparse):
    errors = _errors(sparse)
    ours, _ = _run(nuPI, errors, SETTINGS[setting], "ZEROS")
    theirs, _ = _run(cooper.optim.nuPI, errors, SETTINGS[setting], "ZEROS")
    torch.testing.assert_close(ours, theirs, **F64)
    torch.testing.assert_close(ours, _naive(errors, SETTINGS[setting], "ZEROS"), **F64)


@pytest.mark.parametrize("setting", ["pi", "optimistic-max"])
def test_sgd_init_sparse_without_ema_matches_cooper(setting):
    # Cooper's sparse SGD-init path follows the documented recursion when nu = 0
    errors = _errors(True)
    ours, _ = _run(nuPI, errors, SETTINGS[setting], "SGD")
    theirs, _ = _run(cooper.optim.nuPI, errors, SETTINGS[setting], "SGD")
    torch.testing.assert_close(ours, theirs, **F64)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_sgd_init_first_step_and_kp0_match_cooper(sparse):
    errors = _errors(sparse)
    for kw, steps in ((SETTINGS["pi-nu-wd-max"], 1), (dict(lr=0.1, Kp=0.0, Ki=1.5,
                                                           weight_decay=0.1), 12)):
        ours, _ = _run(nuPI, errors[:steps], kw, "SGD")
        theirs, _ = _run(cooper.optim.nuPI, errors[:steps], kw, "SGD")
        torch.testing.assert_close(ours, theirs, **F64)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_sgd_init_follows_documented_recursion(setting, sparse):
    errors = _errors(sparse)
    ours, _ = _run(nuPI, errors, SETTINGS[setting], "SGD")
    torch.testing.assert_close(ours, _naive(errors, SETTINGS[setting], "SGD"), **F64)


def test_cooper_dense_sgd_init_bug_is_not_copied():
    # Kp = Ki = 1, nu = 0, errors 1 then 2, lr 0.1 (ascent): xi_{-1} = e_0 gives
    # 0.1 * 1 + 0.1 * (2 + (2 - 1)) = 0.4; Cooper's dense path sets xi_0 = 0: 0.1 + 0.1 * 4 = 0.5
    def total(cls, sparse):
        w = torch.nn.Parameter(torch.zeros(1, 1, dtype=torch.float64))
        init = (nuPIInitType if cls is nuPI else cooper.optim.nuPIInitType).SGD
        opt = cls([w], lr=0.1, Kp=1.0, Ki=1.0, maximize=True, init_type=init)
        for e in (1.0, 2.0):
            v = torch.tensor([[e]], dtype=torch.float64)
            _set_grad(w, (torch.tensor([0]), v) if sparse else v)
            opt.step()
        return w.item()

    assert total(nuPI, False) == pytest.approx(0.4, rel=1e-15)
    assert total(nuPI, True) == pytest.approx(0.4, rel=1e-15)
    assert total(cooper.optim.nuPI, True) == pytest.approx(0.4, rel=1e-15)
    assert total(cooper.optim.nuPI, False) == pytest.approx(0.5, rel=1e-15)  # Cooper's bug


def test_dense_and_sparse_agree_when_every_row_is_sampled():
    dense = _errors(False)
    sparse = [(torch.randperm(M, generator=torch.Generator().manual_seed(t)), None)
              for t in range(len(dense))]
    sparse = [(idx, e[idx]) for (idx, _), e in zip(sparse, dense)]
    for init in ("SGD", "ZEROS"):
        a, _ = _run(nuPI, dense, SETTINGS["pi-nu-wd"], init)
        b, _ = _run(nuPI, sparse, SETTINGS["pi-nu-wd"], init)
        torch.testing.assert_close(a, b, **F64)


def test_per_entry_gains_dense_match_cooper_and_sparse_match_recursion():
    g = torch.Generator().manual_seed(5)
    kp = torch.rand(M, 1, dtype=torch.float64, generator=g)
    ki = torch.rand(M, 1, dtype=torch.float64, generator=g) + 0.5
    kw = dict(lr=0.1, Kp=kp, Ki=ki, ema_nu=0.2)
    errors = _errors(False)
    ours, _ = _run(nuPI, errors, kw, "ZEROS")
    theirs, _ = _run(cooper.optim.nuPI, errors, kw, "ZEROS")
    torch.testing.assert_close(ours, theirs, **F64)
    for backend in (None, "torch"):
        sparse = _errors(True)
        ours, _ = _run(nuPI, sparse, kw, "SGD", backend=backend)
        torch.testing.assert_close(ours, _naive(sparse, kw, "SGD"), **F64)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_kernel_and_torch_paths_agree(sparse):
    errors = _errors(sparse, width=3)
    kw = SETTINGS["pi-nu-wd-max"]
    for init in ("SGD", "ZEROS"):
        a, _ = _run(nuPI, errors, kw, init, width=3)
        b, _ = _run(nuPI, errors, kw, init, width=3, backend="torch")
        torch.testing.assert_close(a, b, **F64)
        c, _ = _run(nuPI, errors, kw, init, dtype=torch.float32, width=3)
        d, _ = _run(nuPI, errors, kw, init, dtype=torch.float32, width=3, backend="torch")
        torch.testing.assert_close(c, d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c.double(), a, rtol=1e-5, atol=1e-5)


def test_non_contiguous_parameter_takes_the_torch_path():
    base = torch.linspace(-1, 1, 2 * M, dtype=torch.float64).reshape(M, 2)
    w = torch.nn.Parameter(base.t().contiguous().t())  # shape (M, 2), not contiguous
    assert not w.is_contiguous()
    w2 = torch.nn.Parameter(base.clone())
    a, b = nuPI([w], lr=0.1, Kp=1.0), nuPI([w2], lr=0.1, Kp=1.0)
    for e in _errors(False, width=2):
        w.grad, w2.grad = e.clone(), e.clone()
        a.step()
        b.step()
    torch.testing.assert_close(w.detach(), w2.detach(), **F64)


def test_kp0_ki1_nu0_is_torch_sgd():
    errors = _errors(False)
    ours, _ = _run(nuPI, errors, dict(lr=0.3, Kp=0.0, Ki=1.0, ema_nu=0.0), "SGD")
    w = torch.nn.Parameter(torch.linspace(-1, 1, M, dtype=torch.float64).reshape(M, 1))
    sgd = torch.optim.SGD([w], lr=0.3)
    for e in errors:
        w.grad = e.clone()
        sgd.step()
    torch.testing.assert_close(ours, w.detach(), rtol=1e-15, atol=1e-16)


def test_group_params_may_be_a_generator():
    ws = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = nuPI([{"params": (w for w in ws)}], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2


def test_scalar_kp_with_two_param_groups():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(NotImplementedError):  # Cooper's limitation
        cooper.optim.nuPI([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1, Kp=1.0)
    opt = nuPI([{"params": [a]}, {"params": [b], "lr": 0.2, "Kp": 0.5}], lr=0.1, Kp=1.0)
    ra = naive.NaiveNuPI(np.zeros(3), 0.1, kp=1.0)
    rb = naive.NaiveNuPI(np.zeros(2), 0.2, kp=0.5)
    for t in range(5):
        ga, gb = torch.full((3,), t + 1.0, dtype=torch.float64), torch.arange(2.0).double() - t
        a.grad, b.grad = ga, gb
        opt.step()
        ra.step(ga.numpy())
        rb.step(gb.numpy())
    np.testing.assert_allclose(a.detach().numpy(), ra.theta, **F64)
    np.testing.assert_allclose(b.detach().numpy(), rb.theta, **F64)


def test_closure_and_indexed_multiplier_style_embedding():
    w = torch.nn.Parameter(torch.zeros(100, 1, dtype=torch.float64))
    opt = nuPI([w], lr=0.5, Kp=1.0, Ki=1.0, maximize=True)
    idx = torch.tensor([3, 7, 3])

    def closure():
        opt.zero_grad()
        value = torch.nn.functional.embedding(idx, w, sparse=True).reshape(-1)
        loss = (value * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    out = opt.step(closure)
    assert isinstance(out, torch.Tensor)
    assert w[3].item() == pytest.approx(0.75) and w[7].item() == pytest.approx(1.0)
    assert torch.count_nonzero(w).item() == 2
    state = opt.state[w]
    assert state["needs_error_initialization_mask"].dtype == torch.bool
    assert not state["needs_error_initialization_mask"][3].item()
    assert state["needs_error_initialization_mask"][0].item()


def test_empty_sparse_gradient_is_a_noop():
    w = torch.nn.Parameter(torch.ones(5, 1, dtype=torch.float64))
    opt = nuPI([w], lr=0.1, Kp=1.0)
    w.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                     torch.zeros(0, 1, dtype=torch.float64), (5, 1))
    opt.step()
    assert torch.equal(w.detach(), torch.ones(5, 1, dtype=torch.float64))
    assert not opt.state[w]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_state_dict_round_trip_resumes_identically(sparse):
    errors = _errors(sparse)
    kw = SETTINGS["pi-nu-wd"]
    w, opt = _run(nuPI, errors[:6], kw, "SGD")
    saved = copy.deepcopy(opt.state_dict())
    p = opt.param_groups[0]["params"][0]
    start = p.detach().clone()
    for e in errors[6:]:
        _set_grad(p, e)
        opt.step()
    w2 = torch.nn.Parameter(start)
    other = nuPI([w2], lr=0.9, Kp=0.0)
    other.load_state_dict(saved)
    if sparse:
        assert other.state[w2]["needs_error_initialization_mask"].dtype == torch.bool
    for e in errors[6:]:
        _set_grad(w2, e)
        other.step()
    assert torch.equal(p.detach(), w2.detach())
    saved["state"][0]["xi"].add_(1.0)  # loading copied: the loaded state is not aliased
    assert not torch.equal(other.state[w2]["xi"], saved["state"][0]["xi"])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_state_dicts_travel_both_ways_with_cooper(sparse):
    errors = _errors(sparse)
    kw = SETTINGS["pi-nu-wd-max"]
    full, _ = _run(cooper.optim.nuPI, errors, kw, "ZEROS")
    # Cooper for 6 steps, then ours from Cooper's state dict
    _, theirs = _run(cooper.optim.nuPI, errors[:6], kw, "ZEROS")
    w = theirs.param_groups[0]["params"][0]
    ours = nuPI([w], lr=1.0)
    ours.load_state_dict(theirs.state_dict())
    for e in errors[6:]:
        _set_grad(w, e)
        ours.step()
    torch.testing.assert_close(w.detach(), full, **F64)
    # ours for 6 steps, then Cooper from ours
    _, mine = _run(nuPI, errors[:6], kw, "ZEROS")
    w = mine.param_groups[0]["params"][0]
    theirs = cooper.optim.nuPI([w], lr=1.0)
    theirs.load_state_dict(mine.state_dict())
    for e in errors[6:]:
        _set_grad(w, e)
        theirs.step()
    torch.testing.assert_close(w.detach(), full, **F64)


def test_failing_step_changes_nothing():
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(6, 1, dtype=torch.float64))
    opt = nuPI([a, b], lr=0.1, Kp=1.0)
    a.grad = torch.ones(4, dtype=torch.float64)
    _set_grad(b, (torch.tensor([1]), torch.ones(1, 1, dtype=torch.float64)))
    opt.step()
    snapshot = (a.detach().clone(), b.detach().clone(), copy.deepcopy(opt.state_dict()))
    opt.state[b]["xi"] = torch.zeros(3, dtype=torch.float64)  # corrupt: wrong shape
    a.grad = torch.full((4,), 2.0, dtype=torch.float64)
    _set_grad(b, (torch.tensor([2]), torch.ones(1, 1, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="state 'xi' of parameter 1"):
        opt.step()
    assert torch.equal(a.detach(), snapshot[0]) and torch.equal(b.detach(), snapshot[1])
    assert torch.equal(opt.state[a]["xi"], snapshot[2]["state"][0]["xi"])
    opt.state[b]["xi"] = snapshot[2]["state"][1]["xi"].clone()
    opt.state[a]["xi"] = torch.zeros(2, dtype=torch.float64)  # the dispatcher's check
    opt._dispatcher.invalidate()  # required after replacing state by hand (_dispatch docs)
    snapshot = (a.detach().clone(), b.detach().clone())
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.equal(a.detach(), snapshot[0]) and torch.equal(b.detach(), snapshot[1])


def test_out_of_range_sparse_indices_raise_before_any_write():
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(4, 1, dtype=torch.float64))
    opt = nuPI([a, b], lr=0.1)
    a.grad = torch.ones(3, dtype=torch.float64)
    b.grad = torch.sparse_coo_tensor(torch.tensor([[1, 9]]), torch.ones(2, 1, dtype=torch.float64),
                                     (4, 1), check_invariants=False)
    with pytest.raises(RuntimeError, match="index 9 out of range for dimension 0 of size 4"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3, dtype=torch.float64)) and not opt.state


def test_per_entry_gains_on_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match="per-entry gains for the complex parameter 0"):
        nuPI([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex128))], lr=0.1,
             Kp=torch.ones(3))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(lr=0.1, weight_decay=-0.5), ValueError, "Invalid weight_decay value: -0.5"),
    (dict(lr=0.1, ema_nu=1.0), ValueError, "Invalid nu value: 1.0"),
    (dict(lr=0.1, ema_nu=-1.5), ValueError, "Invalid nu value: -1.5"),
    (dict(lr=0.1, init_type="adam"), ValueError, "Invalid init_type: adam"),
    (dict(lr=0.1, Kp=torch.tensor(float("nan"))), ValueError, "Invalid Kp value"),
    (dict(lr=0.1, Ki="one"), TypeError, "Invalid Ki value: 'one'"),
    (dict(lr=0.1, Kp=torch.ones(3)), ValueError, "Invalid Kp value: 3 per-entry gains"),
    (dict(lr=0.1, maximize="yes"), TypeError, "Invalid maximize value: 'yes'"),
])
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        nuPI([torch.nn.Parameter(torch.zeros(4))], **kwargs)
    if error is ValueError and "per-entry" not in message and "Kp value" not in message:
        with pytest.raises(ValueError, match=message):  # Cooper's messages
            cooper.optim.nuPI([torch.nn.Parameter(torch.zeros(4))], **kwargs)


def test_warnings_as_cooper_and_tensor_gains():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match="Using a negative Kp coefficient"):
        nuPI(p, lr=0.1, Kp=-1.0)
    with pytest.warns(UserWarning, match="All PI coefficients are zero"):
        nuPI(p, lr=0.1, Kp=0.0, Ki=torch.tensor(0.0))
    with pytest.warns(UserWarning, match="negative EMA coefficient"):
        nuPI(p, lr=0.1, ema_nu=-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = nuPI(p, lr=0.1, Kp=torch.tensor([0.5]), Ki=1.0)
    assert opt.param_groups[0]["Ki"].dtype == torch.float64  # exact, not rounded to float32


@pytest.mark.parametrize("backend", [None, "torch"])
def test_sparse_gradient_with_two_sparse_dims(backend):
    # entries (i, j) of a (4, 3) parameter, some repeated: the recursion entry by entry
    theta = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    w = torch.nn.Parameter(theta.clone())
    opt = nuPI([w], lr=0.1, Kp=1.0, Ki=0.5, ema_nu=0.2,
               **({"_backend": backend} if backend else {}))
    ref = naive.NaiveNuPI(theta.numpy().reshape(12), 0.1, kp=1.0, ki=0.5, nu=0.2)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        ij = torch.stack([torch.randint(0, 4, (5,), generator=g),
                          torch.randint(0, 3, (5,), generator=g)])
        ij[:, 1] = ij[:, 0]  # a repeated entry
        vals = torch.randn(5, dtype=torch.float64, generator=g)
        w.grad = torch.sparse_coo_tensor(ij, vals, (4, 3), check_invariants=True)
        opt.step()
        ref.sparse_step((ij[0] * 3 + ij[1]).numpy(), vals.numpy())
    torch.testing.assert_close(w.detach(), torch.from_numpy(ref.theta).reshape(4, 3), **F64)


def test_complex_parameter_as_real_pairs():
    z0 = torch.tensor([1 + 2j, -1j, 0.5], dtype=torch.complex128)
    w, v = torch.nn.Parameter(z0.clone()), torch.nn.Parameter(torch.view_as_real(z0).clone())
    a, b = nuPI([w], lr=0.1, Kp=1.0, ema_nu=0.3), nuPI([v], lr=0.1, Kp=1.0, ema_nu=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        e = torch.randn(3, 2, dtype=torch.float64, generator=g)
        w.grad, v.grad = torch.view_as_complex(e.clone()), e.clone()
        a.step()
        b.step()
    torch.testing.assert_close(torch.view_as_real(w.detach()), v.detach(), **F64)
    assert a.state[w]["xi"].is_complex()
