"""torch.optim conventions of the torch optimizers: complex parameters, schedulers on PolyakSGD,
and what NaN/inf gradients do (they propagate, as in torch.optim)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import torch

import uniopt  # noqa: E402
from uniopt.adapters.torch import QHM, PolyakSGD, QHAdam, QHAdamW  # noqa: E402

TOL = dict(rtol=1e-12, atol=1e-14)
BACKENDS = ["auto", "torch"]


def _tables(opt, dispatcher=None) -> int:
    """How many parameters the last step ran through a table kernel."""
    dispatcher = dispatcher or opt._dispatcher
    return sum(len(t.rows) for plan in dispatcher._plans.values() for t in plan.tables)


def _complex_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    z0 = [torch.randn(3, 2, dtype=torch.complex128, generator=gen),
          torch.randn(4, dtype=torch.complex128, generator=gen)]
    c = [torch.randn(z.shape, dtype=torch.complex128, generator=gen) for z in z0]

    def loss_fn(params):  # real-valued, with a cubic term so the trajectory depends on the past
        return sum(((p - ci).abs() ** 2).sum() + 0.1 * (p.real ** 3).sum() + 0.05 * (p.imag ** 4).sum()
                   for p, ci in zip(params, c))
    return z0, loss_fn


def _run(make_opt, z0, loss_fn, steps=6):
    params = [torch.nn.Parameter(z.clone()) for z in z0]
    opt = make_opt(params)

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return params, opt


# ------------------------------------------------------------------------------------------------
# Complex parameters: real pairs, as torch.optim
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_qhadam_with_unit_nus_is_torch_adam(backend):
    z0, loss_fn = _complex_problem(0)
    kwargs = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.01, eps=1e-8)
    mine, opt = _run(lambda ps: QHAdam(ps, nus=(1.0, 1.0), **kwargs, _backend=backend), z0, loss_fn)
    ref, _ = _run(lambda ps: torch.optim.Adam(ps, **kwargs), z0, loss_fn)
    assert _tables(opt) == (2 if backend == "auto" else 0)
    for a, b, z in zip(mine, ref, z0):
        assert a.dtype == torch.complex128 and not torch.equal(a.detach(), z)
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    for p, r in zip(mine, ref):  # the moments: Adam's, bias-corrected, as real pairs
        assert opt.state[p]["exp_avg"].dtype == torch.complex128


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_qhadamw_with_unit_nus_is_torch_adamw(backend):
    z0, loss_fn = _complex_problem(1)
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    mine, _ = _run(lambda ps: QHAdamW(ps, nus=(1.0, 1.0), **kwargs, _backend=backend), z0, loss_fn)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, **kwargs), z0, loss_fn)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_qhm_with_unit_nu_is_torch_sgd_momentum(backend):
    # QHM (qhoptim): b <- beta b + (1 - beta) g', p <- p - alpha [(1 - nu) g' + nu b], b_0 = 0.
    # With nu = 1: b_t = (1 - beta) sum_k beta^(t-k) g'_k = (1 - beta) buf_t, where buf_t is
    # torch.optim.SGD's buffer with dampening 0 (buf_1 = g'_1, buf_t = beta buf_{t-1} + g'_t).
    # So QHM(lr=a, momentum=beta, nu=1) == SGD(lr=a (1 - beta), momentum=beta, dampening=0).
    z0, loss_fn = _complex_problem(2)
    lr, beta, wd = 0.2, 0.9, 0.01
    mine, opt = _run(lambda ps: QHM(ps, lr=lr, momentum=beta, nu=1.0, weight_decay=wd,
                                    _backend=backend), z0, loss_fn)
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=lr * (1 - beta), momentum=beta,
                                             weight_decay=wd), z0, loss_fn)
    assert _tables(opt) == (2 if backend == "auto" else 0)
    for a, b, z in zip(mine, ref, z0):
        assert not torch.equal(a.detach(), z)
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_polyak_is_polyak_on_the_real_pairs(backend):
    # f(z) = sum |z - c|^2: torch's gradient is 2 (z - c) (real pairs: the real gradient), so
    # ||g||^2 = 4 f, the Polyak step is 1/4 and every step halves z - c.
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(7, dtype=torch.complex128, generator=gen)
    c = torch.randn(7, dtype=torch.complex128, generator=gen)
    z = torch.nn.Parameter(z0.clone())
    opt = PolyakSGD([z], _backend=backend)
    for k in range(1, 5):
        opt.zero_grad()
        loss = ((z - c).abs() ** 2).sum()
        loss.backward()
        opt.step(loss=loss)
        assert opt.last_step[0]["stepsize"] == pytest.approx(0.25, rel=1e-14)
        torch.testing.assert_close(z.detach(), c + (z0 - c) / 2 ** k, rtol=1e-14, atol=1e-15)
    assert _tables(opt, opt._dispatchers[0]) == (1 if backend == "auto" else 0)

    # with momentum: the same trajectory as a real parameter holding the pairs
    z1, loss_fn = _complex_problem(6)
    mine, _ = _run(lambda ps: PolyakSGD(ps, momentum=0.5, max_stepsize=0.3, _backend=backend),
                   z1, loss_fn)
    pairs = [torch.nn.Parameter(torch.view_as_real(z).clone()) for z in z1]
    ref = PolyakSGD(pairs, momentum=0.5, max_stepsize=0.3)
    for _ in range(6):
        ref.zero_grad()
        loss = loss_fn([torch.view_as_complex(p) for p in pairs])
        loss.backward()
        ref.step(loss=loss)
    for a, b in zip(mine, pairs):
        torch.testing.assert_close(torch.view_as_real(a.detach()), b.detach(), **TOL)


# ------------------------------------------------------------------------------------------------
# Schedulers on PolyakSGD: lr scales the step cap
# ------------------------------------------------------------------------------------------------
def test_steplr_schedules_the_polyak_step_cap():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    x0 = np.array([1.0, -0.5, 0.8, -0.3])

    def fun(x):  # f = x^T A x / 2: the Polyak step f / ||A x||^2 is in [1/8, 1/2]
        return 0.5 * float(np.sum(a * x * x)), a * x

    w = torch.nn.Parameter(torch.tensor(x0))
    opt = PolyakSGD([w], max_stepsize=0.3, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    solver = uniopt.PolyakSGD(fun, max_stepsize=0.3, momentum=0.5)
    x, state = x0.copy(), None
    caps, lrs, steps = [], [], []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        cap = lrs[-1] * 0.3
        caps.append(cap)
        opt.zero_grad()
        loss = 0.5 * (torch.tensor(a) * w * w).sum()
        loss.backward()
        opt.step(loss=loss)
        sched.step()
        steps.append(opt.last_step[0]["stepsize"])
        # the NumPy face with the same cap
        step_solver = dataclasses.replace(solver, max_stepsize=cap)
        state = step_solver.init_state(x) if state is None else state
        x, state = step_solver.update(x, state)
        assert float(state.stepsize) == pytest.approx(steps[-1], rel=1e-14)
        np.testing.assert_allclose(w.detach().numpy(), x, **TOL)
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    assert all(s <= c * (1 + 1e-15) for s, c in zip(steps, caps))
    assert any(s == c for s, c in zip(steps, caps))  # the cap binds ...
    assert any(s < c for s, c in zip(steps, caps))   # ... and not always
    assert opt.param_groups[0]["max_stepsize"] == 0.3  # the scheduler changes lr only


def test_polyak_lr_argument():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = PolyakSGD([w], lr=0.5, max_stepsize=0.4)
    assert opt.param_groups[0]["lr"] == 0.5
    w.grad = 2 * w.detach().clone()
    opt.step(loss=5.0)  # Polyak step 5 / 20 = 0.25, above the cap 0.5 * 0.4 = 0.2
    assert opt.last_step[0]["stepsize"] == pytest.approx(0.2, rel=1e-15)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"Invalid learning rate: {bad}"):
            PolyakSGD([w], lr=bad)
    with pytest.raises(TypeError, match="Invalid learning rate"):
        PolyakSGD([w], lr="0.1")
    # SPS+ has no cap to scale: a scheduled lr there is an error, raised before any change
    plus = PolyakSGD([w], variant="SPS+")
    plus.param_groups[0]["lr"] = 0.5
    before = w.detach().clone()
    with pytest.raises(ValueError, match="SPS\\+ variant does not have"):
        plus.step(loss=5.0)
    assert torch.equal(w.detach(), before)
    # a state dict saved before lr existed loads with lr = 1
    sd = opt.state_dict()
    del sd["param_groups"][0]["lr"]
    fresh = PolyakSGD([w])
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == 1.0


# ------------------------------------------------------------------------------------------------
# NaN and inf gradients propagate (nothing is checked or skipped), as in torch.optim
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls, kwargs, ref_cls, ref_kwargs", [
    (QHM, dict(lr=0.1, momentum=0.9, nu=1.0), torch.optim.SGD, dict(lr=0.1 * 0.1, momentum=0.9)),
    (QHAdam, dict(lr=0.1), torch.optim.Adam, dict(lr=0.1)),
    (QHAdamW, dict(lr=0.1, weight_decay=0.1), torch.optim.AdamW, dict(lr=0.1, weight_decay=0.1)),
])
def test_non_finite_gradients_propagate_elementwise_like_torch(cls, kwargs, ref_cls, ref_kwargs,
                                                               bad, backend):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    r = torch.nn.Parameter(w.detach().clone())
    opt, ref = cls([w], **kwargs, _backend=backend), ref_cls([r], **ref_kwargs)
    for g in ([0.5, bad, -1.0], [0.2, 0.3, 0.4]):
        w.grad = torch.tensor(g, dtype=torch.float64)
        r.grad = w.grad.clone()
        opt.step()
        ref.step()
        # the finite entries as torch's; the bad one non-finite in both (QHM's (1 - nu) g term
        # makes 0 * inf = NaN where SGD keeps -inf)
        torch.testing.assert_close(w.detach()[[0, 2]], r.detach()[[0, 2]], **TOL)
        assert not torch.isfinite(w[1]) and not torch.isfinite(r[1])
    assert torch.isfinite(w[[0, 2]]).all()  # only the entry that saw the bad value is lost
    assert not torch.isfinite(w[1])
    assert not torch.isfinite(torch.cat([v.reshape(-1)[1:2] for v in opt.state[w].values()
                                         if isinstance(v, torch.Tensor)])).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_in_polyak(bad, backend):
    # The norm is NaN or inf. SPS_max: min(NaN, cap) is the cap, min(f / inf, cap) is 0; SPS+:
    # a zero step. Either way the bad entry's parameter becomes non-finite (x - s * bad), and
    # the finite entries take the step size that is reported in last_step.
    w0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    g = torch.tensor([0.5, bad, -1.0], dtype=torch.float64)
    for variant in ("SPS_max", "SPS+"):
        w = torch.nn.Parameter(w0.clone())
        opt = PolyakSGD([w], variant=variant, max_stepsize=0.7, _backend=backend)
        w.grad = g.clone()
        opt.step(loss=2.0)
        info = opt.last_step[0]
        s = info["stepsize"]
        expected = uniopt.polyak.polyak_stepsize(2.0, float(g.square().sum()), 0.0, variant, 0.7)
        assert s == expected or (np.isnan(info["grad_norm"]) and s == 0.7)
        assert not np.isfinite(info["grad_norm"])
        torch.testing.assert_close(w[[0, 2]].detach(), (w0 - s * g)[[0, 2]], rtol=1e-15, atol=0)
        assert not torch.isfinite(w[1])
