"""Property-based tests: every Numba CPU kernel against a naive NumPy oracle.

Every kernel of ``uniopt.kernels.*_cpu`` (serial and parallel variants) runs on random sizes
(0, 1, odd, block edges, up to ~1e5), dtypes (float32, float64), offsets (each array is a view
starting a few elements into a larger buffer, so its alignment varies; the elements around it
are checked untouched afterwards) and hyper-parameters; a few small examples run the numba.cuda
kernels on the simulator (conftest turns it on).

The oracles are written here from the formulas of the papers (not from ``uniopt.rules``), in
float64, with a *running error bound* (:class:`E`): every value carries a bound on the absolute
rounding error that evaluating it in the kernel's dtype may make. For each operation
``fl(x op y) = (x op y)(1 + d) + h`` with ``|d| <= u`` (``u`` = 2**-24 in float32, 2**-53 in
float64) and ``|h| <=`` the dtype's smallest subnormal (underflow); propagating the inputs'
bounds through ``+ - * / sqrt max min`` gives the bound (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2002, sec. 3.3). A kernel result must lie within twice the bound of the
float64 oracle (its own error plus the oracle's, which is at most the same bound) -- a few ulps
of the result's magnitude where nothing cancels, float32 and float64 alike (for float64 this
is far tighter than 1e-12 relative). Coefficients that the contracts pass already cast to the
dtype are exact inputs of the oracle; coefficients a kernel computes in float64 and casts carry
one rounding of the dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from fuzz_profiles import profile
from hypothesis import given
from hypothesis import strategies as st

from uniopt.kernels import constrained_cpu, ialm_cpu, polyak_cpu, qh_cpu, unroll_cpu
from uniopt.kernels._pointers import addresses

DTYPES = st.sampled_from([np.float32, np.float64])
#: block edges (the reductions use blocks of 1024 and 64 lanes), small and odd sizes, and a
#: large one now and then
SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 63, 64, 65, 1023, 1024, 1025, 2049]),
    st.integers(0, 3000),
    st.integers(10_000, 100_003),
)
SMALL_SIZES = st.integers(0, 300)
OFFSETS = st.integers(0, 7)
SEEDS = st.integers(0, 2**32 - 1)
UNIT = st.floats(0.0, 1.0)
GUARD = 5  # elements after each view, checked untouched


# ----------------------------------------------------------------------------------------------
def _times(a, b):
    """``a * b`` for non-negative bounds, with ``0 * inf = 0`` (an exact zero stays exact)."""
    with np.errstate(invalid="ignore"):
        return np.where((np.asarray(a) == 0) | (np.asarray(b) == 0), 0.0, np.multiply(a, b))


# A value with a running bound on its rounding error
# ----------------------------------------------------------------------------------------------
class E:
    """An exact (float64) value ``v`` and a bound ``e`` on |value computed in the dtype - v|.

    ``u`` is the unit roundoff of the arithmetic that produced it and ``tiny`` the absolute
    error an underflow may add per operation. Plain numbers and arrays combine as exact inputs.
    """

    __array_priority__ = 1000

    def __init__(self, v, e=0.0, u=2.0**-53, tiny=2.0**-1074):
        self.v = np.asarray(v, dtype=np.float64)
        self.e = np.asarray(e, dtype=np.float64) + np.zeros_like(self.v)
        self.u, self.tiny = u, tiny

    @classmethod
    def exact(cls, x, dtype):
        """Inputs of the kernel in ``dtype`` (exactly representable: no error)."""
        u, tiny = unit(dtype)
        return cls(np.asarray(x, dtype=np.float64), 0.0, u, tiny)

    def _lift(self, other):
        if isinstance(other, E):
            return other
        return E(other, 0.0, self.u, self.tiny)

    def _new(self, v, e, other=None):
        u = self.u if other is None else max(self.u, other.u)
        tiny = self.tiny if other is None else max(self.tiny, other.tiny)
        return E(v, e + u * (np.abs(v) + e) + tiny, u, tiny)

    def __add__(self, other):
        o = self._lift(other)
        return self._new(self.v + o.v, self.e + o.e, o)

    __radd__ = __add__

    def __neg__(self):
        return E(-self.v, self.e, self.u, self.tiny)

    def __sub__(self, other):
        return self + (-self._lift(other))

    def __rsub__(self, other):
        return self._lift(other) + (-self)

    def __mul__(self, other):
        o = self._lift(other)
        # an exact zero (value and bound 0) times anything is an exact zero: its product with an
        # unbounded (inf) error is 0, not NaN (e.g. lr = 0 times a term with a huge bound)
        return self._new(self.v * o.v, _times(np.abs(self.v), o.e) + _times(np.abs(o.v), self.e)
                         + _times(self.e, o.e), o)

    __rmul__ = __mul__

    def __truediv__(self, other):
        o = self._lift(other)
        q = self.v / o.v
        margin = np.abs(o.v) - o.e
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # |q| * (o.e / margin), not (|q| * o.e) / margin: the product of a tiny quotient and
            # a tiny bound underflows to 0 (gamma = 5e-324 over a norm of 2e-81, full fuzz)
            e = np.where(margin > 0, self.e / margin + np.abs(q) * (o.e / margin), np.inf)
        return self._new(q, e, o)

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def sqrt(self):
        r = np.sqrt(self.v)
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.minimum(np.sqrt(self.e), np.where(r > 0, self.e / r, np.inf))
        return self._new(r, e)

    def abs(self):
        return E(np.abs(self.v), self.e, self.u, self.tiny)

    def rounded(self, dtype):
        """This value cast to ``dtype`` (one rounding of that dtype)."""
        u, tiny = unit(dtype)
        return E(self.v, self.e + u * (np.abs(self.v) + self.e) + tiny, u, tiny)

    def __getitem__(self, key):
        return E(self.v[key], self.e[key], self.u, self.tiny)


def unit(dtype):
    """``(unit roundoff, smallest subnormal)`` of ``dtype``."""
    info = np.finfo(dtype)
    return float(info.eps) / 2, float(info.smallest_subnormal)


def maximum(a: E, b) -> E:
    """``max`` is 1-Lipschitz in each argument: the larger of the two bounds."""
    b = a._lift(b)
    return E(np.maximum(a.v, b.v), np.maximum(a.e, b.e), max(a.u, b.u), max(a.tiny, b.tiny))


def minimum(a: E, b) -> E:
    b = a._lift(b)
    return E(np.minimum(a.v, b.v), np.maximum(a.e, b.e), max(a.u, b.u), max(a.tiny, b.tiny))


def select(cond, a, b) -> E:
    """``a`` where ``cond``, else ``b`` (``cond`` exact: comparisons of exact inputs)."""
    a, b = (a if isinstance(a, E) else b._lift(a)), (b if isinstance(b, E) else a._lift(b))
    return E(np.where(cond, a.v, b.v), np.where(cond, a.e, b.e), max(a.u, b.u), max(a.tiny, b.tiny))


def assert_close(got, want: E, factor: float = 2.0, what: str = ""):
    """``|got - want.v| <= factor * want.e`` everywhere (NaN nowhere unless the oracle's)."""
    got = np.asarray(got, dtype=np.float64)
    want_v = np.broadcast_to(want.v, got.shape)
    bound = factor * np.broadcast_to(want.e, got.shape)
    with np.errstate(invalid="ignore"):
        ok = (np.abs(got - want_v) <= bound) | (got == want_v)
    if not ok.all():
        i = int(np.flatnonzero(~ok.ravel())[0])
        raise AssertionError(f"{what}: element {i} of {got.size}: got {got.ravel()[i]!r}, "
                             f"oracle {want_v.ravel()[i]!r} +- {bound.ravel()[i]!r}")


# ----------------------------------------------------------------------------------------------
# Arrays: random values in a view at an offset into a larger buffer
# ----------------------------------------------------------------------------------------------
class Arena:
    """Makes views at an offset into guarded buffers, and checks the guards afterwards."""

    def __init__(self, rng):
        self.rng = rng
        self.buffers = []

    def place(self, values, offset):
        values = np.asarray(values)
        buf = np.empty(offset + values.size + GUARD, dtype=values.dtype)
        buf[:] = self.rng.standard_normal(buf.size)
        view = buf[offset:offset + values.size]
        view[:] = values
        self.buffers.append((buf, buf.copy(), offset, values.size))
        return view

    def check_guards(self):
        for buf, before, offset, n in self.buffers:
            assert np.array_equal(buf[:offset], before[:offset]), "a kernel wrote before its view"
            assert np.array_equal(buf[offset + n:], before[offset + n:]), "a kernel wrote past its view"


def values(rng, n, dtype, low=-2.0, high=2.0, zeros=0.1):
    """Normal values times ``10**uniform(low, high)``, a fraction of them exact zeros."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(low, high, n)
    x[rng.random(n) < zeros] = 0.0
    return x.astype(dtype)


# ----------------------------------------------------------------------------------------------
# QHM and QHAdam (uniopt.kernels.qh_cpu), Ma & Yarats 2019
# ----------------------------------------------------------------------------------------------
def qhm_oracle(p, g, buf, c):
    """QHM on one element: ``c`` = (grad_sign, wd_grad, p_scale, beta, 1-beta, nu, 1-nu, lr)."""
    g = c[0] * g + c[1] * p
    buf = c[3] * buf + c[4] * g
    direction = c[5] * buf + c[6] * g
    return c[2] * p - c[7] * direction, buf


def qhadam_oracle(p, g, m, v, c):
    """QHAdam on one element; ``c`` = (grad_sign, wd_grad, p_scale, a1, 1-a1, a2, 1-a2, nu1,
    1-nu1, nu2, 1-nu2, eps, lr) (``a_i`` the bias-corrected EMA weights)."""
    g = c[0] * g + c[1] * p
    m = c[3] * m + c[4] * g
    v = c[5] * v + c[6] * (g * g)
    direction = (c[7] * m + c[8] * g) / ((c[9] * v + c[10] * (g * g)).sqrt() + c[11])
    return c[2] * p - c[12] * direction, m, v


def qh_decay(lr, weight_decay, decoupled, maximize):
    sign = -1.0 if maximize else 1.0
    return (sign, 0.0, 1.0 - lr * weight_decay) if decoupled else (sign, weight_decay, 1.0)


QH_HYPER = st.fixed_dictionaries(dict(
    lr=st.floats(0.0, 2.0), momentum=UNIT, nu=UNIT, weight_decay=st.floats(0.0, 0.5),
    decoupled=st.booleans(), maximize=st.booleans(),
))


def qhm_coef(h, dtype):
    lr = h["lr"]
    decay = qh_decay(lr, h["weight_decay"], h["decoupled"], h["maximize"])
    return np.array([*decay, h["momentum"], 1 - h["momentum"], h["nu"], 1 - h["nu"], lr], dtype)


def exact_coef(coef):
    return [E.exact(x, coef.dtype) for x in coef]


@given(dtype=DTYPES, sizes=st.lists(SIZES, min_size=0, max_size=4), seed=SEEDS,
       offsets=st.lists(OFFSETS, min_size=12, max_size=12), hyper=QH_HYPER,
       parallel=st.booleans(), missing=st.lists(st.booleans(), min_size=4, max_size=4))
@profile()
def test_qhm_table_kernels(dtype, sizes, seed, offsets, hyper, parallel, missing):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    coef = qhm_coef(hyper, dtype)
    ps, gs, bufs = [], [], []
    for t, n in enumerate(sizes):
        ps.append(arena.place(values(rng, n, dtype), offsets[3 * t]))
        gs.append(None if missing[t] else arena.place(values(rng, n, dtype), offsets[3 * t + 1]))
        bufs.append(arena.place(values(rng, n, dtype), offsets[3 * t + 2]))
    before = [(p.copy(), b.copy()) for p, b in zip(ps, bufs)]
    kernel = qh_cpu.qhm_table(parallel)
    kernel(addresses(ps), addresses(gs), addresses(bufs), np.array(sizes, dtype=np.int64), coef)
    c = exact_coef(coef)
    for (p0, b0), p, g, b in zip(before, ps, gs, bufs):
        if g is None:  # no gradient: untouched
            assert np.array_equal(p, p0) and np.array_equal(b, b0)
            continue
        want_p, want_b = qhm_oracle(E.exact(p0, dtype), E.exact(g, dtype), E.exact(b0, dtype), c)
        assert_close(p, want_p, what="param")
        assert_close(b, want_b, what="momentum_buffer")
    arena.check_guards()


def qhadam_hyper(h):
    return dict(lr=h["lr"], beta1=h["momentum"], beta2=h["beta2"], nu1=h["nu"], nu2=h["nu2"],
                eps=h["eps"])


@given(dtype=DTYPES, sizes=st.lists(SIZES, min_size=0, max_size=3), seed=SEEDS,
       offsets=st.lists(OFFSETS, min_size=12, max_size=12),
       hyper=QH_HYPER, beta2=UNIT, nu2=UNIT, eps=st.floats(1e-8, 0.1),
       weights=st.lists(st.floats(0.0, 50.0), min_size=6, max_size=6),
       parallel=st.booleans(), missing=st.lists(st.booleans(), min_size=3, max_size=3))
@profile()
def test_qhadam_table_kernels(dtype, sizes, seed, offsets, hyper, beta2, nu2, eps, weights,
                              parallel, missing):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    lr, beta1, nu1 = hyper["lr"], hyper["momentum"], hyper["nu"]
    decay = qh_decay(lr, hyper["weight_decay"], hyper["decoupled"], hyper["maximize"])
    hyper_array = np.array([*decay, beta1, beta2, nu1, 1 - nu1, nu2, 1 - nu2, eps, lr])
    k = len(sizes)
    w1 = np.array(weights[:k], dtype=np.float64)
    w2 = np.array(weights[3:3 + k], dtype=np.float64)
    w1_0, w2_0 = w1.copy(), w2.copy()
    ps, gs, ms, vs = [], [], [], []
    for t, n in enumerate(sizes):
        ps.append(arena.place(values(rng, n, dtype), offsets[4 * t]))
        gs.append(None if missing[t] else arena.place(values(rng, n, dtype), offsets[4 * t + 1]))
        ms.append(arena.place(values(rng, n, dtype), offsets[4 * t + 2]))
        vs.append(arena.place(np.abs(values(rng, n, dtype)), offsets[4 * t + 3]))
    before = [(p.copy(), m.copy(), v.copy()) for p, m, v in zip(ps, ms, vs)]
    kernel = qh_cpu.qhadam_table(parallel)
    kernel(addresses(ps), addresses(gs), addresses(ms), addresses(vs),
           np.array(sizes, dtype=np.int64), w1, w2, hyper_array, np.zeros(13, dtype))
    for t, ((p0, m0, v0), p, g, m, v) in enumerate(zip(before, ps, gs, ms, vs)):
        if g is None:
            assert np.array_equal(p, p0) and np.array_equal(m, m0) and np.array_equal(v, v0)
            assert w1[t] == w1_0[t] and w2[t] == w2_0[t]
            continue
        # the running bias-correction weights w <- 1 + beta * w (float64, in place)
        assert w1[t] == pytest.approx(1 + beta1 * w1_0[t], rel=4e-16)
        assert w2[t] == pytest.approx(1 + beta2 * w2_0[t], rel=4e-16)
        a1, a2 = 1 - 1 / (1 + beta1 * w1_0[t]), 1 - 1 / (1 + beta2 * w2_0[t])
        # computed in float64 by the kernel (a few float64 roundings), then cast to the dtype
        exact = [*decay, a1, 1 - a1, a2, 1 - a2, nu1, 1 - nu1, nu2, 1 - nu2, eps, lr]
        c = [E(x, 8 * 2.0**-53 * abs(x)).rounded(dtype) for x in exact]
        want = qhadam_oracle(E.exact(p0, dtype), E.exact(g, dtype), E.exact(m0, dtype),
                             E.exact(v0, dtype), c)
        for got, w, name in zip((p, m, v), want, ("param", "exp_avg", "exp_avg_sq")):
            assert_close(got, w, what=name)
    arena.check_guards()


@given(dtype=DTYPES, n=SIZES, seed=SEEDS, offsets=st.lists(OFFSETS, min_size=4, max_size=4),
       hyper=QH_HYPER, eps=st.floats(1e-8, 0.1))
@profile()
def test_qh_flat_parallel_kernels(dtype, n, seed, offsets, hyper, eps):
    """The ``prange`` bodies called directly on flat arrays (QHM and QHAdam)."""
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    coef = qhm_coef(hyper, dtype)
    p = arena.place(values(rng, n, dtype), offsets[0])
    g = arena.place(values(rng, n, dtype), offsets[1])
    b = arena.place(values(rng, n, dtype), offsets[2])
    p0, b0 = p.copy(), b.copy()
    qh_cpu.qhm_flat_parallel_(p, g, b, coef)
    want_p, want_b = qhm_oracle(E.exact(p0, dtype), E.exact(g, dtype), E.exact(b0, dtype),
                                exact_coef(coef))
    assert_close(p, want_p, what="qhm param")
    assert_close(b, want_b, what="qhm buffer")
    a1, a2 = rng.uniform(0, 1, 2)
    c13 = np.array([*coef[:3], a1, 1 - a1, a2, 1 - a2, hyper["nu"], 1 - hyper["nu"], 0.3, 0.7,
                    eps, hyper["lr"]], dtype)
    m = arena.place(values(rng, n, dtype), offsets[3])
    v = np.abs(values(rng, n, dtype))
    p0, m0, v0 = p.copy(), m.copy(), v.copy()
    qh_cpu.qhadam_flat_parallel_(p, g, m, v, c13)
    want = qhadam_oracle(E.exact(p0, dtype), E.exact(g, dtype), E.exact(m0, dtype),
                         E.exact(v0, dtype), exact_coef(c13))
    for got, w in zip((p, m, v), want):
        assert_close(got, w, what="qhadam")
    arena.check_guards()


# ----------------------------------------------------------------------------------------------
# Polyak step sizes (uniopt.kernels.polyak_cpu): the norm and the two updates
# ----------------------------------------------------------------------------------------------
#: relative bound of the float64 sum of squares: one rounding per square, at most
#: BLOCK/LANES = 16 additions per lane and log2(LANES) = 6 pairwise levels, and Neumaier's
#: compensated sum of the block sums (2u), all of non-negative terms: (1 + 16 + 6 + 2) u < 32 u
SQ_NORM_RTOL = 32 * 2.0**-53


@given(dtype=DTYPES, sizes=st.lists(SIZES, min_size=0, max_size=4), seed=SEEDS,
       offsets=st.lists(OFFSETS, min_size=4, max_size=4),
       missing=st.lists(st.booleans(), min_size=4, max_size=4),
       scale=st.integers(-30, 30))
@profile()
def test_polyak_sq_norm_kernels(dtype, sizes, seed, offsets, missing, scale):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    gs = [None if missing[t] else arena.place(values(rng, n, dtype) * dtype(10.0**scale), offsets[t])
          for t, n in enumerate(sizes)]
    table = (addresses(gs), np.array(sizes, dtype=np.int64), np.zeros(1, dtype))
    serial = polyak_cpu.sq_norm_kernel(False)(*table)
    parallel = polyak_cpu.sq_norm_kernel(True)(*table)
    want = math.fsum(float(x) ** 2 for g in gs if g is not None for x in g.astype(np.float64))
    assert abs(serial - want) <= SQ_NORM_RTOL * want
    assert parallel == serial  # documented: the same block sums added in the same order
    arena.check_guards()


@given(dtype=DTYPES, sizes=st.lists(SIZES, min_size=0, max_size=3), seed=SEEDS,
       offsets=st.lists(OFFSETS, min_size=9, max_size=9), stepsize=st.floats(0.0, 100.0),
       momentum=UNIT, heavy_ball=st.booleans(), parallel=st.booleans(),
       missing=st.lists(st.booleans(), min_size=3, max_size=3))
@profile()
def test_polyak_update_kernels(dtype, sizes, seed, offsets, stepsize, momentum, heavy_ball,
                               parallel, missing):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    ps = [arena.place(values(rng, n, dtype), offsets[3 * t]) for t, n in enumerate(sizes)]
    gs = [None if missing[t] else arena.place(values(rng, n, dtype), offsets[3 * t + 1])
          for t, n in enumerate(sizes)]
    vs = [arena.place(values(rng, n, dtype), offsets[3 * t + 2]) for t, n in enumerate(sizes)]
    before = [(p.copy(), v.copy()) for p, v in zip(ps, vs)]
    n_table = np.array(sizes, dtype=np.int64)
    if heavy_ball:
        coef = np.array([stepsize, momentum], dtype)
        polyak_cpu.heavy_ball_kernel(parallel)(addresses(ps), addresses(gs), addresses(vs),
                                               n_table, coef)
    else:
        coef = np.array([stepsize], dtype)
        polyak_cpu.sgd_kernel(parallel)(addresses(ps), addresses(gs), n_table, coef)
    s = E.exact(coef[0], dtype)
    for (p0, v0), p, g, v in zip(before, ps, gs, vs):
        if g is None or not heavy_ball:
            assert np.array_equal(v, v0)  # velocity: only the heavy ball's, only with a gradient
        if g is None:
            assert np.array_equal(p, p0)
            continue
        if heavy_ball:  # v = mu v - s g; p = p + v (Polyak 1964)
            want_v = E.exact(coef[1], dtype) * E.exact(v0, dtype) - s * E.exact(g, dtype)
            assert_close(v, want_v, what="velocity")
            assert_close(p, E.exact(p0, dtype) + want_v, what="param")
        else:
            assert_close(p, E.exact(p0, dtype) - s * E.exact(g, dtype), what="param")
    arena.check_guards()


# ----------------------------------------------------------------------------------------------
# iALM's dual step (uniopt.kernels.ialm_cpu), Li et al. 2024, Algorithm 1
# ----------------------------------------------------------------------------------------------
def ialm_oracle(dual, buffer, c, coef, beta, gamma, use_momentum, is_ineq, dtype, norm_rtol=0.0):
    """``(dual, buffer, stepsize, norm)`` as E values; ``coef`` the kernel's (in the dtype);
    ``norm_rtol``: a relative error of the norm's sum beyond that of the CPU kernels' order."""
    with np.errstate(all="ignore"):
        return _ialm_oracle(dual, buffer, c, coef, beta, gamma, use_momentum, is_ineq, dtype,
                            norm_rtol)


def _ialm_oracle(dual, buffer, c, coef, beta, gamma, use_momentum, is_ineq, dtype, norm_rtol):
    momentum, keep, lower, upper, ctol = (float(x) for x in coef[:5])
    cv = c.astype(np.float64)
    if ctol >= 0:  # violations within ctol count as satisfied (exact: comparisons)
        small = (cv > 0) & (cv <= ctol) if is_ineq else np.abs(cv) <= ctol
        cv = np.where(small, 0.0, cv)
    d = E.exact(cv, dtype)
    if use_momentum:
        d = E.exact(momentum, dtype) * E.exact(buffer, dtype) + E.exact(keep, dtype) * d
    # the norm in float64 of the dtype's direction: off by at most ||error of d||_2, plus the
    # float64 sum's own rounding (as the Polyak norm); scaled by max|d| (no over/underflow)
    amax = float(np.max(np.abs(d.v), initial=0.0))
    norm = amax * math.sqrt(math.fsum((x / amax) ** 2 for x in d.v)) if amax > 0 else 0.0
    err = float(np.max(d.e, initial=0.0)) * math.sqrt(d.v.size)
    u64 = 2.0**-53
    norm_e = E(norm, err + (SQ_NORM_RTOL + norm_rtol + 8 * u64) * norm)
    step = E(0.0, 0.0) if norm == 0 else minimum(E(gamma, 0.0) / norm_e, beta)
    step_dtype = step.rounded(dtype)
    new_dual = minimum(maximum(E.exact(dual, dtype) + step_dtype * d, lower), upper)
    return new_dual, d, step, norm_e


@given(dtype=DTYPES, n=SIZES, seed=SEEDS, offsets=st.lists(OFFSETS, min_size=3, max_size=3),
       momentum=UNIT, dampening=UNIT, beta=st.floats(0.0, 1e3), gamma=st.floats(0.0, 1e3),
       ctol=st.one_of(st.just(0.0), st.floats(0.0, 2.0)), use_momentum=st.booleans(),
       is_ineq=st.booleans(), scale=st.integers(-160, 160),
       poison=st.sampled_from([None, None, None, np.nan, np.inf, -np.inf]))
@profile()
def test_ialm_dual_step_kernel(dtype, n, seed, offsets, momentum, dampening, beta, gamma, ctol,
                               use_momentum, is_ineq, scale, poison):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    if dtype == np.float32:  # float32 has no room for 1e+-160; its float64 norm cannot overflow
        scale = scale * 12 // 160
    factor = dtype(10.0**scale)
    lower, upper = (0.0, np.inf) if is_ineq else (-np.inf, np.inf)
    if rng.random() < 0.3:
        lower, upper = -1.0, 1.0
    dual = arena.place(np.clip(values(rng, n, dtype), lower, upper).astype(dtype), offsets[0])
    buffer = arena.place(values(rng, n, dtype) * factor, offsets[1])
    c = arena.place(values(rng, n, dtype, zeros=0.3) * factor, offsets[2])
    if poison is not None and n:
        c[rng.integers(n)] = poison
    coef = np.array([momentum, 1 - dampening, lower, upper, ctol if ctol > 0 else -1.0, 0.0],
                    dtype)
    assert np.array_equal(coef, ialm_cpu.coefficients(dtype, momentum, dampening, lower, upper,
                                                      ctol))
    hyper = np.array([beta, gamma])
    flags = np.array([use_momentum, is_ineq], dtype=np.int64)
    dual0, buffer0, coef0 = dual.copy(), buffer.copy(), coef.copy()
    sq_norm, stepsize, norm = ialm_cpu.ialm_dual_step_(dual, buffer, c, coef, hyper, flags)
    arena.check_guards()
    want_dual, want_d, want_step, want_norm = ialm_oracle(
        dual0, buffer0, c, coef0, beta, gamma, use_momentum, is_ineq, dtype)
    if not np.all(np.isfinite(want_d.v)):  # not finite: NaNs returned, nothing written
        assert math.isnan(sq_norm) and math.isnan(stepsize) and math.isnan(norm)
        assert np.array_equal(dual, dual0) and np.array_equal(buffer, buffer0)
        assert np.array_equal(coef, coef0)
        return
    assert_close(norm, want_norm, what="norm")
    assert sq_norm == pytest.approx(norm * norm, rel=1e-14) or norm * norm == sq_norm
    assert_close(stepsize, want_step, what="stepsize")
    assert coef[5] == dtype(stepsize)  # the step, cast to the dtype, written to coef[5]
    assert_close(dual, want_dual, what="dual")
    if use_momentum:
        assert_close(buffer, want_d, what="momentum buffer")
    else:
        assert np.array_equal(buffer, buffer0)


# ----------------------------------------------------------------------------------------------
# Constrained learning's dual side (uniopt.kernels.constrained_cpu)
# ----------------------------------------------------------------------------------------------
def nupi_oracle(p, e, xi, fresh, ki, kpn, c):
    """nuPI (Sohrabi et al. 2024): ``c`` = (ki, kpn, nu, 1-nu, signed_lr, lr*decay, lower)."""
    direction = select(fresh, ki * e, ki * e + kpn * (e - xi))
    new_p = maximum(p - c[5] * p + c[4] * direction, c[6])
    new_xi = select(fresh, e, c[2] * xi + c[3] * e)
    return new_p, new_xi


NUPI_COEF = st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 3.0), UNIT, st.floats(-2.0, 2.0),
                      st.floats(0.0, 0.1), st.booleans())


def nupi_coef(draw, dtype):
    ki, kpn, nu, signed_lr, lr_decay, projected = draw
    return np.array([ki, kpn, nu, 1 - nu, signed_lr, lr_decay, 0.0 if projected else -np.inf],
                    dtype)


@given(dtype=DTYPES, n=SIZES, seed=SEEDS, offsets=st.lists(OFFSETS, min_size=3, max_size=3),
       signed_lr=st.floats(-5.0, 5.0), projected=st.booleans(), parallel=st.booleans())
@profile()
def test_sgd_projected_kernels(dtype, n, seed, offsets, signed_lr, projected, parallel):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    param = arena.place(values(rng, n, dtype), offsets[0])
    grad = arena.place(values(rng, n, dtype), offsets[1])
    coef = np.array([signed_lr, 0.0 if projected else -np.inf], dtype)
    p0 = param.copy()
    (constrained_cpu.sgd_projected_parallel_ if parallel else constrained_cpu.sgd_projected_)(
        param, grad, coef)
    want = maximum(E.exact(p0, dtype) + E.exact(coef[0], dtype) * E.exact(grad, dtype), coef[1])
    assert_close(param, want, what="multiplier")
    arena.check_guards()


@given(dtype=DTYPES, n=SIZES, seed=SEEDS, offsets=st.lists(OFFSETS, min_size=5, max_size=5),
       nupi=NUPI_COEF, fresh=st.booleans(), per_entry=st.tuples(st.booleans(), st.booleans()),
       parallel=st.booleans())
@profile()
def test_nupi_kernels(dtype, n, seed, offsets, nupi, fresh, per_entry, parallel):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    coef = nupi_coef(nupi, dtype)
    param = arena.place(values(rng, n, dtype), offsets[0])
    grad = arena.place(values(rng, n, dtype), offsets[1])
    xi = arena.place(values(rng, n, dtype), offsets[2])
    ki = arena.place(np.abs(values(rng, n, dtype)) if per_entry[0] else coef[0:1], offsets[3])
    kpn = arena.place(np.abs(values(rng, n, dtype)) if per_entry[1] else coef[1:2], offsets[4])
    p0, xi0 = param.copy(), xi.copy()
    kernel = constrained_cpu.nupi_parallel_ if parallel else constrained_cpu.nupi_
    kernel(param, grad, xi, ki, kpn, coef, np.array([fresh], dtype=np.int64))
    want_p, want_xi = nupi_oracle(E.exact(p0, dtype), E.exact(grad, dtype), E.exact(xi0, dtype),
                                  fresh, E.exact(ki, dtype), E.exact(kpn, dtype),
                                  exact_coef(coef))
    assert_close(param, want_p, what="multiplier")
    assert_close(xi, want_xi, what="xi")
    arena.check_guards()


@given(dtype=DTYPES, sizes=st.lists(SIZES, min_size=0, max_size=3), seed=SEEDS,
       offsets=st.lists(OFFSETS, min_size=9, max_size=9), nupi=NUPI_COEF,
       fresh=st.lists(st.booleans(), min_size=3, max_size=3),
       missing=st.lists(st.booleans(), min_size=3, max_size=3), parallel=st.booleans())
@profile()
def test_nupi_table_kernels(dtype, sizes, seed, offsets, nupi, fresh, missing, parallel):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    coef = nupi_coef(nupi, dtype)
    ps = [arena.place(values(rng, n, dtype), offsets[3 * t]) for t, n in enumerate(sizes)]
    gs = [None if missing[t] else arena.place(values(rng, n, dtype), offsets[3 * t + 1])
          for t, n in enumerate(sizes)]
    xis = [arena.place(values(rng, n, dtype), offsets[3 * t + 2]) for t, n in enumerate(sizes)]
    before = [(p.copy(), x.copy()) for p, x in zip(ps, xis)]
    kernel = constrained_cpu.nupi_table_parallel_ if parallel else constrained_cpu.nupi_table_
    kernel(addresses(ps), addresses(gs), addresses(xis), np.array(sizes, dtype=np.int64),
           np.array(fresh[:len(sizes)], dtype=np.int64), coef)
    c = exact_coef(coef)
    for t, ((p0, x0), p, g, x) in enumerate(zip(before, ps, gs, xis)):
        if g is None:
            assert np.array_equal(p, p0) and np.array_equal(x, x0)
            continue
        want_p, want_xi = nupi_oracle(E.exact(p0, dtype), E.exact(g, dtype), E.exact(x0, dtype),
                                      fresh[t], c[0], c[1], c)
        assert_close(p, want_p, what="multiplier")
        assert_close(x, want_xi, what="xi")
    arena.check_guards()


ROWS = st.lists(st.integers(0, 19), min_size=0, max_size=40)


def sampled(rng, rows, width, m, dtype):
    return (np.array(rows, dtype=np.int64), values(rng, len(rows) * width, dtype).reshape(-1, width),
            values(rng, m * width, dtype).reshape(m, width))


def summed_rows(rows, vals, dtype):
    """Distinct rows in order of first appearance, each one's values added in the given order."""
    order, sums = [], {}
    for j, r in enumerate(rows.tolist()):
        if r in sums:
            sums[r] = sums[r] + E.exact(vals[j], dtype)
        else:
            order.append(r)
            sums[r] = E.exact(vals[j], dtype)
    return order, sums


@given(dtype=DTYPES, rows=ROWS, width=st.integers(1, 5), seed=SEEDS,
       signed_lr=st.floats(-5.0, 5.0), projected=st.booleans())
@profile()
def test_indexed_sgd_projected_kernel(dtype, rows, width, seed, signed_lr, projected):
    rng = np.random.default_rng(seed)
    m = 20
    rows, vals, param = sampled(rng, rows, width, m, dtype)
    coef = np.array([signed_lr, 0.0 if projected else -np.inf], dtype)
    p0 = param.copy()
    constrained_cpu.indexed_sgd_projected_(param, rows, vals, coef)
    order, sums = summed_rows(rows, vals, dtype)
    for r in range(m):
        if r not in sums:
            assert np.array_equal(param[r], p0[r])  # rows not sampled: untouched
            continue
        want = maximum(E.exact(p0[r], dtype) + E.exact(coef[0], dtype) * sums[r], coef[1])
        assert_close(param[r], want, what=f"row {r}")


@given(dtype=DTYPES, rows=ROWS, width=st.integers(1, 5), seed=SEEDS, nupi=NUPI_COEF,
       use_mask=st.booleans(), per_entry=st.booleans())
@profile()
def test_indexed_nupi_kernel(dtype, rows, width, seed, nupi, use_mask, per_entry):
    rng = np.random.default_rng(seed)
    m = 20
    rows, vals, param = sampled(rng, rows, width, m, dtype)
    coef = nupi_coef(nupi, dtype)
    xi = values(rng, m * width, dtype).reshape(m, width)
    mask = rng.random((m, width)) < 0.5
    if per_entry:
        ki, kpn = (np.abs(values(rng, m * width, dtype)).reshape(m, width) for _ in range(2))
    else:
        ki, kpn = coef[0:1].reshape(1, 1).copy(), coef[1:2].reshape(1, 1).copy()
    p0, xi0, mask0 = param.copy(), xi.copy(), mask.copy()
    constrained_cpu.indexed_nupi_(param, rows, vals, xi, mask, ki, kpn, coef,
                                  np.array([use_mask], dtype=np.int64))
    order, sums = summed_rows(rows, vals, dtype)
    c = exact_coef(coef)
    for r in range(m):
        if r not in sums:
            assert np.array_equal(param[r], p0[r]) and np.array_equal(xi[r], xi0[r])
            assert np.array_equal(mask[r], mask0[r])
            continue
        fresh = mask0[r] if use_mask else np.zeros(width, dtype=bool)
        gain = (lambda k: E.exact(k[r], dtype)) if per_entry else (lambda k: E.exact(k[0, 0], dtype))
        want_p, want_xi = nupi_oracle(E.exact(p0[r], dtype), sums[r], E.exact(xi0[r], dtype),
                                      fresh, gain(ki), gain(kpn), c)
        assert_close(param[r], want_p, what=f"row {r}")
        assert_close(xi[r], want_xi, what=f"xi row {r}")
        assert np.array_equal(mask[r], np.zeros(width, bool) if use_mask else mask0[r])


def penalty_oracle(value, init, violation, tolerance, factor, increment, is_ineq, restart, dtype):
    """Penalty growth (Nocedal & Wright, Alg. 17.4): ``c*factor + increment`` where the
    violation's measure exceeds the tolerance; a satisfied inequality restarts at ``init``."""
    measure = np.maximum(violation, 0) if is_ineq else np.abs(violation)
    grown = E.exact(value, dtype) * E.exact(factor, dtype) + E.exact(increment, dtype)
    out = select(measure > tolerance, grown, E.exact(value, dtype))
    if is_ineq and restart:
        out = select(measure == 0, E.exact(init, dtype), out)
    return out


PENALTY = st.tuples(st.floats(0.0, 1.0), st.floats(1.0, 3.0), st.floats(0.0, 1.0),
                    st.booleans(), st.booleans())


@given(dtype=DTYPES, n=SIZES, seed=SEEDS, offsets=st.lists(OFFSETS, min_size=3, max_size=3),
       penalty=PENALTY, parallel=st.booleans())
@profile()
def test_penalty_update_kernels(dtype, n, seed, offsets, penalty, parallel):
    tolerance, factor, increment, is_ineq, restart = penalty
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    value = arena.place(np.abs(values(rng, n, dtype)), offsets[0])
    init = arena.place(np.abs(values(rng, n, dtype)), offsets[1])
    violation = arena.place(values(rng, n, dtype, low=-1, high=0.5, zeros=0.2), offsets[2])
    coef = np.array([tolerance, factor, increment], dtype)
    v0 = value.copy()
    kernel = constrained_cpu.penalty_update_parallel_ if parallel else constrained_cpu.penalty_update_
    kernel(value, init, violation, coef, np.array([is_ineq, restart], dtype=np.int64))
    want = penalty_oracle(v0, init, violation.astype(np.float64), float(coef[0]), coef[1], coef[2],
                          is_ineq, restart, dtype)
    assert_close(value, want, what="penalty coefficient")
    arena.check_guards()


@given(dtype=DTYPES, rows=ROWS, seed=SEEDS, penalty=PENALTY)
@profile()
def test_indexed_penalty_update_kernel(dtype, rows, seed, penalty):
    tolerance, factor, increment, is_ineq, restart = penalty
    rng = np.random.default_rng(seed)
    m = 20
    rows = np.array(rows, dtype=np.int64)
    value = np.abs(values(rng, m, dtype))
    init = np.abs(values(rng, m, dtype))
    violation = values(rng, rows.size, dtype, low=-1, high=0.5, zeros=0.2)
    coef = np.array([tolerance, factor, increment], dtype)
    v0 = value.copy()
    constrained_cpu.indexed_penalty_update_(value, init, rows, violation, coef,
                                            np.array([is_ineq, restart], dtype=np.int64))
    last = {r: j for j, r in enumerate(rows.tolist())}  # a repeated row: its last occurrence
    for r in range(m):
        if r not in last:
            assert value[r] == v0[r]
            continue
        j = last[r]
        want = penalty_oracle(v0[r:r + 1], init[r:r + 1], violation[j:j + 1].astype(np.float64),
                              float(coef[0]), coef[1], coef[2], is_ineq, restart, dtype)
        assert_close(value[r:r + 1], want, what=f"row {r}")


@given(rows=st.lists(st.integers(-3, 40), max_size=60), m=st.integers(0, 41), width=st.integers(1, 3),
       seed=SEEDS, dtype=DTYPES)
@profile()
def test_coalesce_and_range_kernels(rows, m, width, seed, dtype):
    rows = np.array(rows, dtype=np.int64)
    bad = [j for j, r in enumerate(rows.tolist()) if not 0 <= r < m]
    assert constrained_cpu.first_out_of_range(rows, m) == (bad[0] if bad else -1)
    rng = np.random.default_rng(seed)
    vals = values(rng, rows.size * width, dtype).reshape(-1, width)
    out_rows, out_vals = constrained_cpu.coalesce(rows, vals)
    order, sums = summed_rows(rows, vals, dtype)
    assert out_rows.tolist() == order
    for j, r in enumerate(order):
        assert_close(out_vals[j], sums[r], what=f"row {r}")


# ----------------------------------------------------------------------------------------------
# Differentiable unrolling (uniopt.kernels.unroll_cpu): out-of-place steps and their VJPs
# ----------------------------------------------------------------------------------------------
def qhm_vjp_oracle(ct_p, ct_b, c):
    """The transpose of the (linear) QHM step, from its Jacobian written out:
    ``p' = s p - lr (nu b' + (1-nu) g')``, ``b' = beta b + (1-beta) g'``, ``g' = sign g + wd p``."""
    ct_geff = ct_p * (-c[7] * (c[5] * c[4] + c[6])) + ct_b * c[4]
    return (c[2] * ct_p + c[1] * ct_geff, c[0] * ct_geff,
            ct_p * (-c[7] * c[5] * c[3]) + ct_b * c[3])


def qhadam_vjp_oracle(p, g, m, v, ct_p, ct_m, ct_v, c):
    """The chain rule through ``p' = s p - lr n / (sqrt(r) + eps)`` with ``n = nu1 m' + (1-nu1)
    g'``, ``r = nu2 v' + (1-nu2) g'^2``, ``m' = a1 m + (1-a1) g'``, ``v' = a2 v + (1-a2) g'^2``
    (``d sqrt(r) / dr`` taken as 0 at ``r = 0``, the documented convention)."""
    geff = c[0] * g + c[1] * p
    gsq = geff * geff
    m1 = c[3] * m + c[4] * geff
    v1 = c[5] * v + c[6] * gsq
    n = c[7] * m1 + c[8] * geff
    root = (c[9] * v1 + c[10] * gsq).sqrt()
    den = root + c[11]
    ct_n = -c[12] * ct_p / den
    live = root.v > 0
    safe = select(live, root, 1.0)
    ct_r = select(live, c[12] * ct_p * n / (den * den) / (2.0 * safe), 0.0)
    ct_m1 = ct_m + c[7] * ct_n
    ct_v1 = ct_v + c[9] * ct_r
    ct_geff = c[8] * ct_n + c[4] * ct_m1 + 2.0 * geff * (c[6] * ct_v1 + c[10] * ct_r)
    return c[2] * ct_p + c[1] * ct_geff, c[0] * ct_geff, c[3] * ct_m1, c[5] * ct_v1


def unroll_coefficients(rule, hyper, a, eps, dtype):
    coef = qhm_coef(hyper, dtype)
    if rule != "qhadam":
        return coef
    a1, a2 = a
    nu = hyper["nu"]
    return np.array([*coef[:3], a1, 1 - a1, a2, 1 - a2, nu, 1 - nu, 1 - nu, nu, eps,
                     hyper["lr"]], dtype)


@given(dtype=DTYPES, n=SIZES, seed=SEEDS, rule=st.sampled_from(["sgd", "qhm", "qhadam"]),
       hyper=QH_HYPER, a=st.tuples(UNIT, UNIT), eps=st.floats(1e-8, 0.1),
       parallel=st.booleans(), in_place=st.booleans(),
       offsets=st.lists(OFFSETS, min_size=11, max_size=11))
@profile()
def test_unroll_forward_and_vjp_kernels(dtype, n, seed, rule, hyper, a, eps, parallel, in_place,
                                        offsets):
    rng = np.random.default_rng(seed)
    arena = Arena(rng)
    coef = unroll_coefficients(rule, hyper, a, eps, dtype)
    c = exact_coef(coef)
    x = iter(offsets)
    p, g, buf, m = (arena.place(values(rng, n, dtype), next(x)) for _ in range(4))
    v = arena.place(np.abs(values(rng, n, dtype)), next(x))
    inputs = {"sgd": (p, g), "qhm": (p, g, buf), "qhadam": (p, g, m, v)}[rule]
    before = [a.copy() for a in inputs]
    state = [a for a in inputs if a is not g]  # p and the state buffers
    outs = state if in_place else [arena.place(np.zeros(n, dtype), next(x)) for _ in state]
    unroll_cpu.forward(rule, parallel)(*inputs, *outs, coef)
    ex = [E.exact(b, dtype) for b in before]
    if rule == "sgd":  # p' = s p - lr (sign g + wd p)
        want = [c[2] * ex[0] - c[7] * (c[0] * ex[1] + c[1] * ex[0])]
    elif rule == "qhm":
        want = list(qhm_oracle(*ex, c))
    else:
        want = list(qhadam_oracle(*ex, c))
    for got, w in zip(outs, want):
        assert_close(got, w, what=f"{rule} forward")
    if not in_place:
        for a, b in zip(inputs, before):
            assert np.array_equal(a, b)  # inputs only read

    cts = [arena.place(values(rng, n, dtype), next(x)) for _ in state]  # of p' and the state'
    cts0 = [a.copy() for a in cts]
    n_ct = len(inputs)
    ct_outs = [np.full(n, np.nan, dtype) for _ in range(n_ct)]
    ect = [E.exact(a, dtype) for a in cts0]
    if rule == "sgd":
        unroll_cpu.vjp(rule, parallel)(*cts, *ct_outs, coef)
        ct_geff = -c[7] * ect[0]
        want = [c[2] * ect[0] + c[1] * ct_geff, c[0] * ct_geff]
    elif rule == "qhm":
        unroll_cpu.vjp(rule, parallel)(*cts, *ct_outs, coef)
        want = list(qhm_vjp_oracle(*ect, c))
    else:
        unroll_cpu.vjp(rule, parallel)(*before, *cts, *ct_outs, coef)
        want = list(qhadam_vjp_oracle(*ex, *ect, c))
    for got, w, name in zip(ct_outs, want, ("p", "g", "state", "state2")):
        # the oracle's expression trees differ from the kernel's (a Jacobian written out, not
        # the reverse sweep): the same terms, up to twice the operations on a path
        assert_close(got, w, factor=4.0, what=f"{rule} vjp ct_{name}")
    for a, b in zip(cts, cts0):
        assert np.array_equal(a, b)
    arena.check_guards()


# ----------------------------------------------------------------------------------------------
# The numba.cuda kernels, on the simulator: a few small examples against the same oracles
# ----------------------------------------------------------------------------------------------
CUDA_SIZES = st.integers(0, 40)


@given(dtype=DTYPES, n=CUDA_SIZES, seed=SEEDS, hyper=QH_HYPER, a=st.tuples(UNIT, UNIT),
       eps=st.floats(1e-8, 0.1), rule=st.sampled_from(["qhm", "qhadam"]))
@profile(max_examples=4, fuzz_max_examples=150)
def test_cuda_qh_kernels(dtype, n, seed, hyper, a, eps, rule):
    from cuda_arrays import to_device, to_host

    from uniopt.kernels import qh_cuda

    rng = np.random.default_rng(seed)
    coef = unroll_coefficients(rule, hyper, a, eps, dtype)
    p, g, buf = (values(rng, n, dtype) for _ in range(3))
    v = np.abs(values(rng, n, dtype))
    ex = [E.exact(x, dtype) for x in (p, g, buf, v)]
    if rule == "qhm":
        arrays = [to_device(x.copy()) for x in (p, g, buf)]
        qh_cuda.qhm_step_(*arrays, [float(x) for x in coef])
        want = qhm_oracle(ex[0], ex[1], ex[2], exact_coef(coef))
        got = [to_host(arrays[0]), to_host(arrays[2])]
    else:
        arrays = [to_device(x.copy()) for x in (p, g, buf, v)]
        qh_cuda.qhadam_step_(*arrays, [float(x) for x in coef])
        want = qhadam_oracle(*ex, exact_coef(coef))
        got = [to_host(arrays[0]), to_host(arrays[2]), to_host(arrays[3])]
    for x, w in zip(got, want):
        assert_close(x, w, what=f"cuda {rule}")


@given(dtype=DTYPES, n=CUDA_SIZES, seed=SEEDS, stepsize=st.floats(0.0, 10.0), momentum=UNIT,
       signed_lr=st.floats(-2.0, 2.0), penalty=PENALTY)
@profile(max_examples=3, fuzz_max_examples=150)
def test_cuda_polyak_and_constrained_kernels(dtype, n, seed, stepsize, momentum, signed_lr,
                                             penalty):
    from cuda_arrays import to_device, to_host

    from uniopt.kernels import constrained_cuda, polyak_cuda

    rng = np.random.default_rng(seed)
    p, g, vel = (values(rng, n, dtype) for _ in range(3))
    assert abs(polyak_cuda.sq_norm([to_device(g)]) - math.fsum(float(x) ** 2 for x in g)) <= (
        n * 2.0**-52 * math.fsum(float(x) ** 2 for x in g))  # atomics: any order (recursive sum)
    coef = np.array([stepsize, momentum], dtype)
    dp, dv = to_device(p.copy()), to_device(vel.copy())
    polyak_cuda.heavy_ball_(dp, to_device(g), dv, to_device(coef))
    want_v = E.exact(coef[1], dtype) * E.exact(vel, dtype) - E.exact(coef[0], dtype) * E.exact(g, dtype)
    assert_close(to_host(dv), want_v, what="cuda velocity")
    assert_close(to_host(dp), E.exact(p, dtype) + want_v, what="cuda heavy ball")
    dp = to_device(p.copy())
    polyak_cuda.sgd_(dp, to_device(g), to_device(coef))
    assert_close(to_host(dp), E.exact(p, dtype) - E.exact(coef[0], dtype) * E.exact(g, dtype),
                 what="cuda sgd")
    c2 = np.array([signed_lr, 0.0], dtype)
    dp = to_device(p.copy())
    constrained_cuda.sgd_projected_(dp, to_device(g), c2)
    want = maximum(E.exact(p, dtype) + E.exact(c2[0], dtype) * E.exact(g, dtype), 0.0)
    assert_close(to_host(dp), want, what="cuda projected sgd")
    tolerance, factor, increment, is_ineq, restart = penalty
    value, init = np.abs(values(rng, n, dtype)), np.abs(values(rng, n, dtype))
    violation = values(rng, n, dtype, low=-1, high=0.5, zeros=0.2)
    pc = np.array([tolerance, factor, increment], dtype)
    dval = to_device(value.copy())
    constrained_cuda.penalty_update_(dval, to_device(init), to_device(violation), pc,
                                     np.array([is_ineq, restart], dtype=np.int64))
    want = penalty_oracle(value, init, violation.astype(np.float64), float(pc[0]), pc[1], pc[2],
                          is_ineq, restart, dtype)
    assert_close(to_host(dval), want, what="cuda penalty")


@given(dtype=DTYPES, n=CUDA_SIZES, seed=SEEDS, momentum=UNIT, beta=st.floats(0.0, 10.0),
       gamma=st.floats(0.0, 10.0), use_momentum=st.booleans(), is_ineq=st.booleans())
@profile(max_examples=3, fuzz_max_examples=150)
def test_cuda_ialm_kernel(dtype, n, seed, momentum, beta, gamma, use_momentum, is_ineq):
    from cuda_arrays import to_device, to_host

    from uniopt.kernels import ialm_cuda

    rng = np.random.default_rng(seed)
    lower, upper = (0.0, np.inf) if is_ineq else (-np.inf, np.inf)
    dual = np.clip(values(rng, n, dtype), lower, upper).astype(dtype)
    buffer, c = values(rng, n, dtype), values(rng, n, dtype, zeros=0.3)
    coef = np.array([momentum, 1.0, lower, upper, -1.0, 0.0], dtype)
    dd, db = to_device(dual.copy()), to_device(buffer.copy())
    out = ialm_cuda.dual_step_(dd, db, to_device(c), coef, np.array([beta, gamma]),
                               np.array([use_momentum, is_ineq]))
    out = np.asarray(out if not hasattr(out, "copy_to_host") else out.copy_to_host())
    # the device norm adds atomically, in any order: n roundings of a sum of squares
    want_dual, want_d, want_step, want_norm = ialm_oracle(
        dual, buffer, c, coef, beta, gamma, use_momentum, is_ineq, dtype, n * 2.0**-53)
    assert_close(out[2], want_norm, what="cuda norm")
    assert_close(out[1], want_step, what="cuda stepsize")
    assert_close(to_host(dd), want_dual, what="cuda dual")
    if use_momentum:
        assert_close(to_host(db), want_d, what="cuda buffer")


@given(dtype=DTYPES, n=CUDA_SIZES, seed=SEEDS, hyper=QH_HYPER, a=st.tuples(UNIT, UNIT),
       eps=st.floats(1e-8, 0.1), rule=st.sampled_from(["sgd", "qhm", "qhadam"]))
@profile(max_examples=3, fuzz_max_examples=150)
def test_cuda_unroll_kernels(dtype, n, seed, hyper, a, eps, rule):
    from cuda_arrays import to_device, to_host

    from uniopt.kernels import unroll_cuda

    rng = np.random.default_rng(seed)
    coef = unroll_coefficients(rule, hyper, a, eps, dtype)
    c = exact_coef(coef)
    p, g, buf, m = (values(rng, n, dtype) for _ in range(4))
    v = np.abs(values(rng, n, dtype))
    ct = [values(rng, n, dtype) for _ in range(3)]
    ex = {k: E.exact(x, dtype) for k, x in dict(p=p, g=g, buf=buf, m=m, v=v).items()}
    ect = [E.exact(x, dtype) for x in ct]
    outs = [to_device(np.zeros(n, dtype)) for _ in range(4)]
    coefficients = [float(x) for x in coef]
    if rule == "sgd":
        unroll_cuda.sgd_forward(to_device(p), to_device(g), outs[0], coefficients)
        want = [c[2] * ex["p"] - c[7] * (c[0] * ex["g"] + c[1] * ex["p"])]
        unroll_cuda.sgd_vjp(to_device(ct[0]), outs[1], outs[2], coefficients)
        ct_geff = -c[7] * ect[0]
        want_ct = [c[2] * ect[0] + c[1] * ct_geff, c[0] * ct_geff]
        got, got_ct = [outs[0]], outs[1:3]
    elif rule == "qhm":
        unroll_cuda.qhm_forward(to_device(p), to_device(g), to_device(buf), outs[0], outs[1],
                                coefficients)
        want = qhm_oracle(ex["p"], ex["g"], ex["buf"], c)
        got = outs[:2]
        outs2 = [to_device(np.zeros(n, dtype)) for _ in range(3)]
        unroll_cuda.qhm_vjp(to_device(ct[0]), to_device(ct[1]), *outs2, coefficients)
        got_ct, want_ct = outs2, qhm_vjp_oracle(ect[0], ect[1], c)
    else:
        unroll_cuda.qhadam_forward(*(to_device(x) for x in (p, g, m, v)), *outs[:3], coefficients)
        want = qhadam_oracle(ex["p"], ex["g"], ex["m"], ex["v"], c)
        got = outs[:3]
        outs2 = [to_device(np.zeros(n, dtype)) for _ in range(4)]
        unroll_cuda.qhadam_vjp(*(to_device(x) for x in (p, g, m, v, *ct)), *outs2, coefficients)
        got_ct = outs2
        want_ct = qhadam_vjp_oracle(ex["p"], ex["g"], ex["m"], ex["v"], *ect, c)
    for x, w in zip(got, want):
        assert_close(to_host(x), w, what=f"cuda {rule} forward")
    for x, w in zip(got_ct, want_ct):
        assert_close(to_host(x), w, factor=4.0, what=f"cuda {rule} vjp")
