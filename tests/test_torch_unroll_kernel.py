"""The kernel-backed differentiable steps of uniopt.adapters.torch._unroll_kernel (Contract 2).

Oracles: ``torch.autograd`` through the torch-ops binding of the same rules
(``bind(qh, sqrt=torch.sqrt)``), ``torch.autograd.gradcheck`` (finite differences), and a
short unrolled lower-level solve whose hypergradient is taken both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniopt.adapters.torch import _unroll_kernel as K
from uniopt.rules import bind, qh

T = bind(qh, sqrt=torch.sqrt)  # the torch-ops execution of the very same rules


def qhm_coef(**kwargs):
    return qh.qhm_coefficients(**(dict(lr=0.1, momentum=0.9, nu=0.7) | kwargs))


def qhadam_coef(step=2, **kwargs):
    hyper = qh.qhadam_hyper(**(dict(lr=0.05, betas=(0.9, 0.99), nus=(0.7, 0.8)) | kwargs))
    w1 = w2 = 0.0
    for _ in range(step):
        w1, w2, a1, a2 = qh.qhadam_bias_weights(w1, w2, hyper.beta1, hyper.beta2)
    return qh.qhadam_coefficients(hyper, a1, a2)


def torch_sgd(p, g, c):
    return T.descend(p, T.effective_gradient(g, p, c[0], c[1]), c[2], c[7])


def torch_qhm(p, g, buf, c):
    return T.qhm_update(p, g, buf, *c)


def torch_qhadam(p, g, m, v, c):
    return T.qhadam_update(p, g, m, v, *c)


RULES = {
    "sgd": (K.sgd_step, torch_sgd, 2, [qhm_coef(), qhm_coef(weight_decay=0.2, weight_decay_type="direct",
                                                           maximize=True), qhm_coef(weight_decay=0.3)]),
    "qhm": (K.qhm_step, torch_qhm, 3, [qhm_coef(), qhm_coef(weight_decay=0.3, nu=1.2),
                                        qhm_coef(momentum=0.5, weight_decay=0.2, weight_decay_type="direct")]),
    "qhadam": (K.qhadam_step, torch_qhadam, 4, [qhadam_coef(step=1), qhadam_coef(step=3, weight_decay=0.1),
                                                qhadam_coef(nus=(1.0, 0.3), weight_decay=0.1,
                                                            decouple_weight_decay=True, maximize=True,
                                                            eps=1e-3)]),
}
CASES = [(rule, k) for rule in RULES for k in range(3)]


def inputs(rule, n, dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    arrays = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(RULES[rule][2])]
    if rule == "qhadam":
        arrays[3] = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    return [a.to(dtype).requires_grad_(requires_grad) for a in arrays]


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# ----------------------------------------------------------------------------------------------
# Against autograd through the torch-ops binding of the same rules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 9, 10001])
@pytest.mark.parametrize("rule,k", CASES)
def test_forward_and_vjp_match_torch_ops_autograd(rule, k, n):
    step, oracle, _, settings = RULES[rule]
    c = settings[k]
    xs = inputs(rule, n, seed=n)
    got = as_tuple(step(*xs, c))
    want = as_tuple(oracle(*xs, c))
    gen = torch.Generator().manual_seed(99)
    cts = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in got]
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float64 and g_.shape == (n,) and g_.requires_grad
        torch.testing.assert_close(g_, w_, rtol=1e-14, atol=1e-15)
    got_grads = torch.autograd.grad(got, xs, cts, allow_unused=True)
    want_grads = torch.autograd.grad(want, xs, cts, allow_unused=True)
    for g_, w_ in zip(got_grads, want_grads):
        w_ = torch.zeros(n, dtype=torch.float64) if w_ is None else w_  # unused by autograd
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule,k", CASES)
def test_gradcheck(rule, k):
    step, _, _, settings = RULES[rule]
    xs = inputs(rule, 6, seed=k)
    assert torch.autograd.gradcheck(lambda *a: step(*a, settings[k]), xs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("rule", list(RULES))
def test_float32_within_a_few_ulps_of_float64(rule):
    step, oracle, _, settings = RULES[rule]
    c = settings[1]
    xs32 = inputs(rule, 1001, torch.float32, seed=5)
    xs64 = [x.detach().double().requires_grad_() for x in xs32]
    got, want = as_tuple(step(*xs32, c)), as_tuple(oracle(*xs64, c))
    cts = [torch.ones_like(x) for x in got]
    ulp = torch.finfo(torch.float32).eps
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float32
        assert ((g_.double() - w_).abs() <= 8 * ulp * (w_.abs() + 0.5 * w_.abs().max())).all()
    grads32 = torch.autograd.grad(got, xs32, cts)
    grads64 = torch.autograd.grad(want, xs64, [ct.double() for ct in cts], allow_unused=True)
    for g_, w_ in zip(grads32, grads64):
        w_ = torch.zeros_like(g_, dtype=torch.float64) if w_ is None else w_
        # (settings[1]: the second moments keep sqrt(r) >= 0.1, so no large intermediate)
        assert g_.dtype == torch.float32
        assert ((g_.double() - w_).abs() <= 8 * ulp * (w_.abs() + 0.5 * w_.abs().max())).all()


# ----------------------------------------------------------------------------------------------
# autograd plumbing
# ----------------------------------------------------------------------------------------------
def test_inputs_without_grad_get_none_and_others_are_exact():
    c = qhadam_coef()
    p, g, m, v = inputs("qhadam", 11, seed=3, requires_grad=False)
    g.requires_grad_()
    out = K.qhadam_step(p, g, m, v, c)
    node = out[0].grad_fn
    ct = torch.ones(11, dtype=torch.float64)
    grads = node.apply(ct, torch.zeros_like(ct), torch.zeros_like(ct))  # the backward itself
    assert grads[0] is None and grads[2] is None and grads[3] is None
    gw = g.detach().requires_grad_()
    (want,) = torch.autograd.grad(torch_qhadam(p, gw, m, v, c)[0], gw, ct)
    torch.testing.assert_close(grads[1], want, rtol=1e-12, atol=1e-14)
    (got,) = torch.autograd.grad(out[0], g, ct)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_sgd_and_qhm_save_nothing_qhadam_saves_its_inputs():
    p, g, buf = inputs("qhm", 5)
    assert K.sgd_step(p, g, qhm_coef()).grad_fn.saved_tensors == ()
    assert K.qhm_step(p, g, buf, qhm_coef())[0].grad_fn.saved_tensors == ()
    xs = inputs("qhadam", 5)
    saved = K.qhadam_step(*xs, qhadam_coef())[0].grad_fn.saved_tensors
    assert len(saved) == 4 and all(s.data_ptr() == x.data_ptr() for s, x in zip(saved, xs))


def test_non_contiguous_and_partial_cotangents():
    """out.sum() hands backward an expanded (stride 0) cotangent; unused outputs get zeros."""
    c = qhadam_coef()
    xs = inputs("qhadam", 17, seed=8)
    got = torch.autograd.grad(K.qhadam_step(*xs, c)[0].sum(), xs)
    want = torch.autograd.grad(torch_qhadam(*xs, c)[0].sum(), xs)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-14)
    p, g, buf = inputs("qhm", 17, seed=9)
    big = torch.randn(34, dtype=torch.float64)
    got = torch.autograd.grad(K.qhm_step(p, g, buf, qhm_coef())[1], (p, g, buf), big[::2])
    want = torch.autograd.grad(torch_qhm(p, g, buf, qhm_coef())[1], (p, g, buf), big[::2])
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-14)


def test_double_backward_is_refused():
    p, g = inputs("sgd", 4)
    out = K.sgd_step(p, g, qhm_coef())
    (gp,) = torch.autograd.grad(out.sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(gp.sum(), p)


def test_no_grad_gives_plain_outputs():
    xs = inputs("qhadam", 6)
    with torch.no_grad():
        out = K.qhadam_step(*xs, qhadam_coef())
    assert all(not o.requires_grad for o in out)
    torch.testing.assert_close(out[0], torch_qhadam(*xs, qhadam_coef())[0].detach(), rtol=1e-14, atol=0)


def test_zero_gradient_and_moments_give_finite_cotangents():
    """The sqrt's derivative at 0 is 0 here; autograd of the plain formula gives NaN there."""
    c = qhadam_coef()
    p, g, m, v = inputs("qhadam", 8, seed=4, requires_grad=False)
    with torch.no_grad():
        g[:4] = 0.0
        m[:4] = 0.0
        v[:4] = 0.0
    xs = [t.requires_grad_() for t in (p, g, m, v)]
    cts = [torch.ones(8, dtype=torch.float64)] * 3
    got = torch.autograd.grad(K.qhadam_step(*xs, c), xs, cts)
    assert all(torch.isfinite(t).all() for t in got)
    plain = torch.autograd.grad(torch_qhadam(*xs, c), xs, cts)
    assert torch.isnan(plain[1][:4]).all()  # why the convention exists
    for g_, w_ in zip(got, plain):  # elsewhere the exact derivative
        torch.testing.assert_close(g_[4:], w_[4:], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# An unrolled lower-level solve: the hypergradient through the kernels equals torch ops'
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
def test_unrolled_hypergradient_matches_torch_ops(rule):
    """T steps on a ridge problem with per-feature penalties exp(h); gradient of the
    validation loss at w_T with respect to h and w_0 (second-order terms flow through g)."""
    gen = torch.Generator().manual_seed(0)
    d, n = 5, 12
    X, y = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    Xv, yv = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    h0 = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    w00 = torch.randn(d, generator=gen, dtype=torch.float64)
    hyper = qh.qhadam_hyper(0.05, (0.9, 0.99), (0.7, 0.9))

    def hypergradient(kernels: bool):
        h, w0 = h0.clone().requires_grad_(), w00.clone().requires_grad_()
        w, state = w0, [torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)]
        w1 = w2 = 0.0
        for _ in range(6):
            loss = 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (torch.exp(h) * w * w).sum()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            if rule == "sgd":
                c = qhm_coef(lr=0.2)
                w = K.sgd_step(w, g, c) if kernels else torch_sgd(w, g, c)
            elif rule == "qhm":
                c = qhm_coef(lr=0.2)
                w, state[0] = K.qhm_step(w, g, state[0], c) if kernels else torch_qhm(w, g, state[0], c)
            else:
                w1, w2, a1, a2 = qh.qhadam_bias_weights(w1, w2, hyper.beta1, hyper.beta2)
                c = qh.qhadam_coefficients(hyper, a1, a2)
                w, *state = K.qhadam_step(w, g, *state, c) if kernels else torch_qhadam(w, g, *state, c)
        ul = 0.5 * ((Xv @ w - yv) ** 2).mean()
        return (ul.detach(), *torch.autograd.grad(ul, (h, w0)))

    got, want = hypergradient(True), hypergradient(False)
    assert want[1].abs().max() > 1e-6  # a hypergradient that could be wrong
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-11, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# supported(): the memory-safety gate
# ----------------------------------------------------------------------------------------------
class _Sub(torch.Tensor):
    pass


def _supported_cases():
    x = torch.zeros(4)
    return [
        ((x, torch.ones(4)), True),
        ((torch.zeros(4, dtype=torch.float64),) * 3, True),
        ((torch.nn.Parameter(torch.zeros(4)), x), True),
        ((torch.zeros(0), torch.zeros(0)), True),
        ((), False),
        ((x, torch.zeros(4, dtype=torch.float64)), False),
        ((x, torch.zeros(8)[::2]), False),
        ((torch.zeros(2, 2), torch.zeros(2, 2)), False),
        ((torch.zeros(()),), False),
        ((torch.zeros(4, dtype=torch.float16),), False),
        ((torch.zeros(4, dtype=torch.int64),), False),
        ((torch.zeros(4, dtype=torch.complex64),), False),
        ((x, torch.zeros(4).as_subclass(_Sub)), False),
        ((torch.zeros(4, device="meta"),), False),
        ((torch.zeros(4).to_sparse(),), False),
        ((x, torch._neg_view(torch.ones(4))), False),  # memory holds the negated values
        ((np.zeros(4),), False),
    ]


@pytest.mark.parametrize("index", range(len(_supported_cases())))
def test_supported(index):
    tensors, expected = _supported_cases()[index]
    assert K.supported(*tensors) is expected


def test_unsupported_tensors_raise_before_any_kernel():
    c = qhm_coef()
    with pytest.raises(TypeError, match="sgd_step: the kernels need plain, 1-D, contiguous"):
        K.sgd_step(torch.zeros(8)[::2], torch.zeros(4), c)
    with pytest.raises(TypeError, match="qhm_step"):
        K.qhm_step(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64), c)
    with pytest.raises(TypeError, match="qhadam_step"):
        K.qhadam_step(*(torch.zeros(4).as_subclass(_Sub),) * 4, qhadam_coef())
    with pytest.raises(ValueError, match="Invalid coefficients: expected 13 numbers, got 8"):
        K.qhadam_step(*(torch.zeros(4),) * 4, c)
    with pytest.raises(ValueError, match="Invalid coefficients: expected 8 numbers, got 13"):
        K.sgd_step(torch.zeros(4), torch.zeros(4), qhadam_coef())


def test_parameters_are_accepted_and_untouched():
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    before = p.detach().clone()
    g = torch.randn(5, dtype=torch.float64)
    out = K.sgd_step(p, g, qhm_coef())
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    assert out.data_ptr() != p.data_ptr()
    (gp,) = torch.autograd.grad(out.sum(), p)
    torch.testing.assert_close(gp, torch.full((5,), 1.0, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and a CUDA build of torch")
def test_cuda_tensors_match_cpu():
    if not K.supported(torch.zeros(2, device="cuda")):
        pytest.skip("numba.cuda cannot run kernels here (simulator or no driver)")
    for rule, (step, _, _, settings) in RULES.items():
        xs = inputs(rule, 4099, seed=1)
        xs_cuda = [x.detach().cuda().requires_grad_() for x in xs]
        got, want = as_tuple(step(*xs_cuda, settings[1])), as_tuple(step(*xs, settings[1]))
        cts = [torch.ones_like(w) for w in want]
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_.cpu(), w_, rtol=1e-13, atol=1e-15)
        for g_, w_ in zip(torch.autograd.grad(got, xs_cuda, [c.cuda() for c in cts]),
                          torch.autograd.grad(want, xs, cts)):
            torch.testing.assert_close(g_.cpu(), w_, rtol=1e-13, atol=1e-15)


def test_torch_binding_of_the_vjp_rules_matches_the_kernels():
    """uniopt.rules.qh_vjp bound to torch ops (torch.where) equals the kernels' backward to
    rounding, zero moments included: one definition, two executions."""
    from uniopt.rules import qh_vjp

    V = bind(qh_vjp, sqrt=torch.sqrt, where=torch.where)
    c = qhadam_coef()
    xs = inputs("qhadam", 64, seed=6)
    with torch.no_grad():
        for x in xs[1:]:
            x[:20] = 0.0
    cts = [torch.randn(64, dtype=torch.float64) for _ in range(3)]
    got = torch.autograd.grad(K.qhadam_step(*xs, c), xs, cts)
    want = V.qhadam_vjp(*(x.detach() for x in xs), *cts, *c)
    for g_, w_ in zip(got, want):
        assert torch.isfinite(g_).all()
        torch.testing.assert_close(g_, w_, rtol=1e-15, atol=1e-15)
    got = torch.autograd.grad(K.qhm_step(*xs[:3], qhm_coef()), xs[:3], cts[:2])
    for g_, w_ in zip(got, V.qhm_vjp(*cts[:2], *qhm_coef())):
        torch.testing.assert_close(g_, w_, rtol=1e-15, atol=1e-15)
