"""``python -m uniopt bench``: uniopt's optimizers against torch.optim, qhoptim, optax and jaxopt.

One side-by-side table, in one run: rows are parameter counts x layouts (one tensor, or a
model-like list of 100 mixed-size tensors), columns are milliseconds per optimizer step of every
contender, the core kernel's achieved bandwidth next to a measured bandwidth ceiling, and the
ratios uniopt's goals are stated in. Measurements are interleaved (every repeat times every
contender of a row, in a rotating order) and the median of the repeats is reported, so the ratios
compare numbers taken under the same machine conditions.

A second, smaller table compares whole solver runs: uniopt's JAX ``PolyakSGD(...).run`` against
``jaxopt.PolyakSGD(...).run`` on the same seeded interpolation problems (realisable least
squares, separable logistic regression), float32, a fixed ``maxiter`` and ``tol=0`` so that both
run every iteration (checked when the case is built); called as is and under ``jax.jit``.

Fairness rules (the same as the asv suite in ``asv_bench/``, which builds its cases here):

* float32 everywhere, identical data (seeded), gradients filled before the optimizer is built and
  never touched again; each contender owns its copy of every tensor, allocated separately;
* torch runs one thread (``torch.set_num_threads(1)``); uniopt's kernels are serial by default;
  by default the whole process is also pinned to one CPU (affinity), which is the only way to
  keep XLA:CPU on one thread (``--no-pin`` turns it off);
* every contender is warmed up (compiled, cached, state allocated) before timing;
* JAX steps are ``jax.jit``-ed with donated params and state, and the timed call blocks until
  the results are ready; solver runs are compiled by a first run and also block.

The machine, versions and date are printed with the table. Nothing here is asserted: goals are
reported as measured. This module imports torch and JAX only inside functions, and a missing
framework or adapter gives an "n/a" cell with a footnote instead of an error.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import _jit
from .kernels import qh_cpu
from .kernels._pointers import addresses, view
from .rules import qh as _rules

__all__ = [
    "BYTES_PER_PARAM",
    "CASES",
    "COLUMNS",
    "QHADAM",
    "QHM",
    "SIZES",
    "SOLVER_CASES",
    "SOLVER_MODES",
    "SOLVER_PROBLEMS",
    "Unavailable",
    "build",
    "build_solver",
    "compile_times",
    "first_step_time",
    "import_time",
    "interleave",
    "layout_sizes",
    "main",
    "medians",
    "paired_ratio",
    "pin_threads",
    "solver_first_run",
]

# ----------------------------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------------------------
DTYPE = np.float32
#: A QHAdam (or Adam) step on float32 reads p, g, m, v and writes p, m, v.
BYTES_PER_PARAM = 28
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000,)
LAYOUTS = ("one", "model")
MODEL_TENSORS = 100
#: The fixed-cost row: 100 tensors of 4 elements each.
TINY_TENSORS, TINY_SIZE = 100, 4

QHADAM = dict(lr=1e-3, betas=(0.9, 0.999), nus=(0.7, 1.0), eps=1e-8)
QHM = dict(lr=1e-3, momentum=0.9, nu=0.7)
ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
SGD = dict(lr=1e-3)
#: uniopt's torch PolyakSGD (its defaults, spelt out); the loss passed to ``step(loss=...)`` is
#: ``SGD["lr"] * ||g||^2``, so its step size equals SGD's learning rate.
POLYAK = dict(fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0, momentum=0.0)


class Unavailable(Exception):
    """A contender cannot run here (framework not installed, adapter missing); the reason."""


def layout_sizes(n: int, layout: str, tensors: int = MODEL_TENSORS, seed: int = 0) -> list[int]:
    """Element counts of the tensors of a layout, summing to ``n``.

    ``"one"`` is a single tensor. ``"model"`` is ``tensors`` tensors whose sizes are spread
    log-uniformly over three decades (a few large weight matrices, many small biases and norms),
    with the same proportions at every ``n``. ``"tiny"`` is ``TINY_TENSORS`` tensors of
    ``TINY_SIZE`` elements (``n`` is ignored): the fixed cost per step.
    """
    if layout == "one":
        return [int(n)]
    if layout == "tiny":
        return [TINY_SIZE] * TINY_TENSORS
    if layout != "model":
        raise ValueError(f"unknown layout {layout!r}; expected 'one', 'model' or 'tiny'")
    if n < tensors:
        raise ValueError(f"layout 'model' needs n >= {tensors} parameters, got n={n}")
    weights = 10.0 ** np.random.default_rng(seed).uniform(0.0, 3.0, tensors)
    sizes = 1 + np.floor(weights / weights.sum() * (n - tensors)).astype(np.int64)
    sizes[np.argmax(sizes)] += int(n) - int(sizes.sum())  # the rounding remainder (>= 0)
    return [int(s) for s in sizes]


@dataclass
class Data:
    """Seeded float32 parameters and gradients for one layout (each case copies them)."""

    sizes: list[int]
    params: list[np.ndarray]
    grads: list[np.ndarray]

    @classmethod
    def make(cls, sizes: Sequence[int], seed: int = 0) -> "Data":
        rng = np.random.default_rng(seed)
        total = int(sum(sizes))
        flat_p = rng.standard_normal(total, dtype=DTYPE)
        flat_g = rng.standard_normal(total, dtype=DTYPE)
        cuts = np.cumsum(sizes)[:-1]
        return cls(list(sizes), np.split(flat_p, cuts), np.split(flat_g, cuts))

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    def copies(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Fresh, separately allocated copies (a model's tensors are not one buffer)."""
        return [p.copy() for p in self.params], [g.copy() for g in self.grads]


# ----------------------------------------------------------------------------------------------
# Contenders: each builder returns a zero-argument step callable, already warmed up
# ----------------------------------------------------------------------------------------------
def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise Unavailable("torch not installed") from exc
    torch.set_num_threads(1)
    return torch


def _import_jax():
    try:
        import jax
        import optax
    except ImportError as exc:
        raise Unavailable(f"{exc.name or 'jax/optax'} not installed") from exc
    return jax, optax


def _torch_params(data: Data):
    """Parameters with ``.grad`` filled, each in its own torch allocation (as in a model)."""
    torch = _import_torch()
    out = []
    for p, g in zip(data.params, data.grads):
        t = torch.nn.Parameter(torch.from_numpy(p).clone())
        t.grad = torch.from_numpy(g).clone()
        out.append(t)
    return out


def _uniopt_torch(name: str):
    _import_torch()
    try:
        import uniopt.adapters.torch as adapter

        return getattr(adapter, name)
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"uniopt.adapters.torch.{name} not available ({exc})") from exc


def _qhoptim():
    _import_torch()
    try:
        import qhoptim.pyt
    except ImportError as exc:
        raise Unavailable("qhoptim not installed") from exc
    return qhoptim.pyt


def _torch_step(opt) -> Callable[[], object]:
    opt.step()  # allocate state, compile or load kernels
    return opt.step


def _build_uniopt_torch_qhadam(data):
    return _torch_step(_uniopt_torch("QHAdam")(_torch_params(data), **QHADAM))


def _build_uniopt_torch_qhm(data):
    return _torch_step(_uniopt_torch("QHM")(_torch_params(data), **QHM))


def _build_torch_adam_fused(data):
    torch = _import_torch()
    return _torch_step(torch.optim.Adam(_torch_params(data), fused=True, **ADAM))


def _build_torch_adam_foreach(data):
    torch = _import_torch()
    return _torch_step(torch.optim.Adam(_torch_params(data), foreach=True, **ADAM))


def _build_torch_sgd_momentum(data):
    torch = _import_torch()
    return _torch_step(torch.optim.SGD(_torch_params(data), lr=QHM["lr"], momentum=QHM["momentum"],
                                       foreach=True))


def _build_torch_sgd(data):
    torch = _import_torch()
    return _torch_step(torch.optim.SGD(_torch_params(data), foreach=True, **SGD))


def _build_uniopt_torch_polyak(data):
    torch = _import_torch()
    params = _torch_params(data)
    # A precomputed loss, as after ``loss.backward()``: the timed call is ``step(loss=loss)``
    # (the loss's ``.item()``, the norm over the group, the step size and the update).
    sq_norm = sum(float(np.dot(g.astype(np.float64), g.astype(np.float64))) for g in data.grads)
    loss = torch.tensor(SGD["lr"] * sq_norm, dtype=torch.float32)
    opt = _uniopt_torch("PolyakSGD")(params, **POLYAK)
    opt.step(loss=loss)  # tables built, kernels compiled or loaded

    def step():
        return opt.step(loss=loss)

    return step


def _build_qhoptim_qhadam(data):
    return _torch_step(_qhoptim().QHAdam(_torch_params(data), **QHADAM))


def _build_qhoptim_qhm(data):
    return _torch_step(_qhoptim().QHM(_torch_params(data), **QHM))


def _jax_step(make_transform: Callable, data: Data) -> Callable[[], object]:
    jax, optax = _import_jax()
    import jax.numpy as jnp

    tx = make_transform()
    params = [jnp.array(p) for p in data.params]  # copies, in XLA's own buffers
    grads = [jnp.array(g) for g in data.grads]
    # Distinct buffers for every state leaf: XLA refuses to donate one buffer twice, and an
    # init that reuses one zero array for two leaves would otherwise fail under donation.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1))
    carry = [params, state]

    def step():
        carry[0], carry[1] = update(carry[0], carry[1], grads)
        return jax.block_until_ready(carry)

    step()  # compile
    return step


def _build_uniopt_jax_qhadam(data):
    _import_jax()
    try:
        from uniopt.adapters.jax import qhadam
    except ImportError as exc:
        raise Unavailable(f"uniopt.adapters.jax.qhadam not available ({exc})") from exc
    kw = dict(QHADAM)
    lr = kw.pop("lr")
    return _jax_step(lambda: qhadam(lr, **kw), data)


def _build_optax_adam(data):
    _, optax = _import_jax()
    return _jax_step(lambda: optax.adam(ADAM["lr"], b1=ADAM["betas"][0], b2=ADAM["betas"][1],
                                        eps=ADAM["eps"]), data)


def _kernel_tables(data: Data):
    """Pointer tables over separately allocated copies (p, g, m, v) of ``data``."""
    params, grads = data.copies()
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    arrays = (params, grads, exp_avg, exp_avg_sq)
    tables = tuple(addresses(a) for a in arrays)
    sizes = np.array(data.sizes, dtype=np.int64)
    return arrays, tables, sizes


def _build_kernel_qhadam(data):
    arrays, (p, g, m, v), sizes = _kernel_tables(data)
    w1 = np.zeros(sizes.size, dtype=np.float64)
    w2 = np.zeros(sizes.size, dtype=np.float64)
    hyper = np.array(_rules.qhadam_hyper(**QHADAM), dtype=np.float64)
    scratch = np.empty(16, dtype=DTYPE)
    kernel = qh_cpu.qhadam_table_

    def step(arrays=arrays):  # the default keeps the arrays alive
        kernel(p, g, m, v, sizes, w1, w2, hyper, scratch)

    step()
    return step


def _build_kernel_qhm(data):
    arrays, (p, g, buf, _), sizes = _kernel_tables(data)
    coef = np.array(_rules.qhm_coefficients(**QHM), dtype=DTYPE)
    kernel = qh_cpu.qhm_table_

    def step(arrays=arrays):
        kernel(p, g, buf, sizes, coef)

    step()
    return step


@_jit.cpu_kernel
def stream_table_(p_addrs, g_addrs, m_addrs, v_addrs, sizes, like):
    """The memory traffic of a QHAdam step with trivial arithmetic: reads p, g, m, v; writes
    p, m, v (28 bytes per float32 element), over the same kind of pointer table. Values stay
    bounded however often it runs (each write is ``g - x``)."""
    for t in range(sizes.size):
        n = sizes[t]
        p = view(p_addrs[t], n, like)
        g = view(g_addrs[t], n, like)
        m = view(m_addrs[t], n, like)
        v = view(v_addrs[t], n, like)
        for i in range(n):
            gi = g[i]
            p[i] = gi - p[i]
            m[i] = gi - m[i]
            v[i] = gi - v[i]


def _build_stream(data):
    arrays, (p, g, m, v), sizes = _kernel_tables(data)
    like = np.empty(1, dtype=DTYPE)

    def step(arrays=arrays):
        stream_table_(p, g, m, v, sizes, like)

    step()
    return step


def _build_uniopt_numpy_qhadam(data):
    from . import QHAdam

    params, grads = data.copies()
    opt = QHAdam(params, **QHADAM)
    opt.step(grads)
    return lambda: opt.step(grads)


def _build_uniopt_numpy_qhm(data):
    from . import QHM as _QHM

    params, grads = data.copies()
    opt = _QHM(params, **QHM)
    opt.step(grads)
    return lambda: opt.step(grads)


#: Every contender: name -> builder(Data) -> warmed-up step callable (raises Unavailable).
CASES: dict[str, Callable[[Data], Callable[[], object]]] = {
    "uniopt_torch_qhadam": _build_uniopt_torch_qhadam,
    "torch_adam_fused": _build_torch_adam_fused,
    "torch_adam_foreach": _build_torch_adam_foreach,
    "qhoptim_qhadam": _build_qhoptim_qhadam,
    "uniopt_torch_qhm": _build_uniopt_torch_qhm,
    "qhoptim_qhm": _build_qhoptim_qhm,
    "torch_sgd_momentum": _build_torch_sgd_momentum,
    "uniopt_torch_polyak": _build_uniopt_torch_polyak,
    "torch_sgd": _build_torch_sgd,
    "uniopt_jax_qhadam": _build_uniopt_jax_qhadam,
    "optax_adam": _build_optax_adam,
    "kernel_qhadam": _build_kernel_qhadam,
    "stream": _build_stream,
    "kernel_qhm": _build_kernel_qhm,
    "uniopt_numpy_qhadam": _build_uniopt_numpy_qhadam,
    "uniopt_numpy_qhm": _build_uniopt_numpy_qhm,
}


def build(name: str, n: int, layout: str, seed: int = 0, data: Data | None = None):
    """A warmed-up step callable of contender ``name`` on ``layout_sizes(n, layout)``."""
    if data is None:
        data = Data.make(layout_sizes(n, layout), seed)
    return CASES[name](data)


# ----------------------------------------------------------------------------------------------
# Solver runs: uniopt's JAX PolyakSGD(...).run against jaxopt.PolyakSGD(...).run
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverProblem:
    """A seeded float32 interpolation problem: its minimum is 0 (Polyak's ``fun_min``).

    ``"lstsq"``: ``0.5 * mean((X @ w - y) ** 2)`` with ``y = X @ w_true`` (realisable least
    squares); ``"logreg"``: ``mean(log(1 + exp(-y * (X @ w))))`` with ``y = sign(X @ w_true)``
    (separable logistic regression). ``X`` is ``m x d`` standard normal over ``sqrt(d)``; the
    solvers start from ``w = 0`` and run exactly ``maxiter`` iterations.
    """

    key: str
    kind: str
    m: int
    d: int
    maxiter: int

    @property
    def label(self) -> str:
        return f"{self.kind} {self.m}x{self.d}"


SOLVER_PROBLEMS: dict[str, SolverProblem] = {p.key: p for p in (
    SolverProblem("lstsq_small", "lstsq", 100, 20, 50),
    SolverProblem("logreg_small", "logreg", 100, 20, 50),
    SolverProblem("lstsq_moderate", "lstsq", 2000, 500, 100),
    SolverProblem("logreg_moderate", "logreg", 2000, 500, 100),
)}
QUICK_SOLVER_PROBLEMS = ("lstsq_small",)
#: "run": ``solver.run(w0, X, y)`` as called (its own jitted pieces, eager glue);
#: "jit": ``jax.jit(solver.run)(w0, X, y)``.
SOLVER_MODES = ("run", "jit")
#: Both solvers' settings: jaxopt's defaults, with ``tol=0`` so that no run stops early.
POLYAK_SOLVER = dict(fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0, momentum=0.0,
                     tol=0.0)


def _lstsq_loss(w, X, y):
    import jax.numpy as jnp

    r = X @ w - y
    return 0.5 * jnp.mean(r * r)


def _logreg_loss(w, X, y):
    import jax.numpy as jnp

    return jnp.mean(jnp.logaddexp(0.0, -y * (X @ w)))


_SOLVER_LOSSES = {"lstsq": _lstsq_loss, "logreg": _logreg_loss}


def solver_data(problem: SolverProblem, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of ``problem`` (float32, seeded)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((problem.m, problem.d), dtype=DTYPE) / DTYPE(np.sqrt(problem.d))
    z = X @ rng.standard_normal(problem.d, dtype=DTYPE)
    y = z if problem.kind == "lstsq" else np.where(z >= 0, 1, -1).astype(DTYPE)
    return X.astype(DTYPE), y.astype(DTYPE)


def _solver_class(name: str):
    """The ``PolyakSGD`` class of solver contender ``name`` (raises Unavailable)."""
    _import_jax()
    if name == "uniopt_jax_polyak":
        try:
            from uniopt.adapters.jax import PolyakSGD
        except ImportError as exc:
            raise Unavailable(f"uniopt.adapters.jax.PolyakSGD not available ({exc})") from exc
        return PolyakSGD
    if name == "jaxopt_polyak":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jaxopt is archived; its import may warn
                import jaxopt
        except ImportError as exc:
            raise Unavailable("jaxopt not installed") from exc
        return jaxopt.PolyakSGD
    raise KeyError(name)


def _build_solver_run(name: str, problem: SolverProblem, mode: str, seed: int = 0):
    cls = _solver_class(name)
    import jax
    import jax.numpy as jnp

    if mode not in SOLVER_MODES:
        raise ValueError(f"unknown solver mode {mode!r}; expected one of {SOLVER_MODES}")
    X, y = (jnp.asarray(a) for a in solver_data(problem, seed))
    w0 = jnp.zeros(problem.d, dtype=DTYPE)
    solver = cls(fun=_SOLVER_LOSSES[problem.kind], maxiter=problem.maxiter, **POLYAK_SOLVER)
    run = jax.jit(solver.run) if mode == "jit" else solver.run

    def step():
        return jax.block_until_ready(run(w0, X, y))

    out = step()  # compile
    iters = int(out.state.iter_num)
    if iters != problem.maxiter:  # both must do the same work
        raise RuntimeError(f"{name} ran {iters} iterations on {problem.key}, not "
                           f"maxiter={problem.maxiter}")
    return step


#: Solver contenders: name -> builder(problem, mode, seed) -> warmed-up, blocking run callable.
SOLVER_CASES: dict[str, Callable[..., Callable[[], object]]] = {
    "uniopt_jax_polyak": functools.partial(_build_solver_run, "uniopt_jax_polyak"),
    "jaxopt_polyak": functools.partial(_build_solver_run, "jaxopt_polyak"),
}


def build_solver(name: str, problem: str, mode: str = "run", seed: int = 0):
    """A compiled run callable of solver contender ``name`` (a key of ``SOLVER_CASES``) on
    ``SOLVER_PROBLEMS[problem]``; ``mode`` is ``"run"`` or ``"jit"`` (``jax.jit(solver.run)``)."""
    return SOLVER_CASES[name](SOLVER_PROBLEMS[problem], mode, seed)


# ----------------------------------------------------------------------------------------------
# iALM dual steps: uniopt's torch iALM.update against humancompatible-train's
# ----------------------------------------------------------------------------------------------
#: Constraint counts of the iALM table (one constraint group).
IALM_SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_IALM_SIZES = (1_000,)
#: Both dual optimizers' settings (explicit dampening and range: the two libraries' defaults
#: differ); penalty=None is humancompatible-train 0.4.x's quadratic coefficient.
IALM = dict(beta=0.5, sigma=1.0, gamma=1.0, momentum=0.5, dampening=0.0,
            dual_range=(-100.0, 100.0))


def _ialm_constraints(m: int, seed: int = 0) -> np.ndarray:
    """The constraint values every iALM contender steps with (float32, seeded)."""
    return np.random.default_rng(seed).standard_normal(m, dtype=DTYPE)


def _build_uniopt_torch_ialm(m: int, seed: int = 0):
    torch = _import_torch()
    try:
        from uniopt.adapters.torch.dual_optim import iALM
    except ImportError as exc:
        raise Unavailable(f"uniopt.adapters.torch.dual_optim not available ({exc})") from exc
    c = torch.from_numpy(_ialm_constraints(m, seed))
    opt = iALM(m, penalty=None, init_duals=torch.zeros(m), **IALM)
    opt.update(c)
    return lambda: opt.update(c)


def _build_hct_ialm(m: int, seed: int = 0):
    torch = _import_torch()
    try:
        from humancompatible.train.dual_optim import iALM
    except ImportError as exc:
        raise Unavailable("humancompatible-train not installed") from exc
    c = torch.from_numpy(_ialm_constraints(m, seed))
    opt = iALM(m, init_duals=torch.zeros(m), **IALM)
    opt.update(c)
    return lambda: opt.update(c)


def _build_uniopt_numpy_ialm(m: int, seed: int = 0):
    from . import iALM

    c = _ialm_constraints(m, seed)
    opt = iALM(m, penalty=None, init_duals=np.zeros(m, DTYPE), **IALM)
    opt.update(c)
    return lambda: opt.update(c)


#: iALM contenders: name -> builder(m, seed) -> warmed-up ``update(c)`` callable.
IALM_CASES: dict[str, Callable[..., Callable[[], object]]] = {
    "uniopt_torch_ialm": _build_uniopt_torch_ialm,
    "hct_ialm": _build_hct_ialm,
    "uniopt_numpy_ialm": _build_uniopt_numpy_ialm,
}


def build_ialm(name: str, m: int, seed: int = 0):
    """A warmed-up dual step of iALM contender ``name`` (a key of ``IALM_CASES``) with ``m``
    constraints."""
    return IALM_CASES[name](m, seed)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str  # "ms" (time per step), "gbps" (from a time), "ratio"
    case: str | None = None  # for "ms"/"gbps"
    ratio: tuple[str, str] | None = None  # numerator / denominator column keys (for "ratio")
    help: str = ""


COLUMNS: tuple[Column, ...] = (
    Column("uo_qhadam", "uniopt QHAdam", "ms", "uniopt_torch_qhadam",
           help="uniopt.adapters.torch.QHAdam, nus=(0.7, 1.0)"),
    Column("fused_adam", "Adam fused", "ms", "torch_adam_fused",
           help="torch.optim.Adam(fused=True)"),
    Column("foreach_adam", "Adam foreach", "ms", "torch_adam_foreach",
           help="torch.optim.Adam(foreach=True)"),
    Column("qho_qhadam", "qhoptim QHAdam", "ms", "qhoptim_qhadam",
           help="qhoptim.pyt.QHAdam, nus=(0.7, 1.0)"),
    Column("uo_qhm", "uniopt QHM", "ms", "uniopt_torch_qhm",
           help="uniopt.adapters.torch.QHM, momentum=0.9, nu=0.7"),
    Column("qho_qhm", "qhoptim QHM", "ms", "qhoptim_qhm",
           help="qhoptim.pyt.QHM, momentum=0.9, nu=0.7"),
    Column("sgd_mom", "SGD mom.", "ms", "torch_sgd_momentum",
           help="torch.optim.SGD(momentum=0.9, foreach=True)"),
    Column("uo_polyak", "uniopt Polyak", "ms", "uniopt_torch_polyak",
           help="uniopt.adapters.torch.PolyakSGD, step(loss=...) with a precomputed loss"),
    Column("sgd", "SGD", "ms", "torch_sgd", help="torch.optim.SGD(lr=1e-3, foreach=True)"),
    Column("uo_jax", "uniopt jax qhadam", "ms", "uniopt_jax_qhadam",
           help="uniopt.adapters.jax.qhadam under jax.jit, donated params and state"),
    Column("optax_adam", "optax adam", "ms", "optax_adam",
           help="optax.adam under jax.jit, donated params and state"),
    Column("kernel_gbps", "kernel GB/s", "gbps", "kernel_qhadam",
           help=f"uniopt.kernels.qh_cpu.qhadam_table_ on a pointer table, {BYTES_PER_PARAM} B/param"),
    Column("stream_gbps", "stream GB/s", "gbps", "stream",
           help="a numba kernel with the same memory traffic (read p,g,m,v; write p,m,v) "
                "and trivial arithmetic, over the same kind of table"),
    Column("r_qhadam_fused", "QHAdam/fused", "ratio", ratio=("uo_qhadam", "fused_adam"),
           help="uniopt QHAdam time / torch fused Adam time"),
    Column("r_qhadam_qho", "QHAdam/qhoptim", "ratio", ratio=("uo_qhadam", "qho_qhadam"),
           help="uniopt QHAdam time / qhoptim QHAdam time"),
    Column("r_qhm_qho", "QHM/qhoptim", "ratio", ratio=("uo_qhm", "qho_qhm"),
           help="uniopt QHM time / qhoptim QHM time"),
    Column("r_polyak_sgd", "Polyak/SGD", "ratio", ratio=("uo_polyak", "sgd"),
           help="uniopt torch PolyakSGD time / torch.optim.SGD time (one more reduction)"),
    Column("r_jax_optax", "jax/optax", "ratio", ratio=("uo_jax", "optax_adam"),
           help="uniopt jax qhadam time / optax.adam time"),
    Column("r_kernel_stream", "kernel/stream", "ratio", ratio=("stream_gbps", "kernel_gbps"),
           help="fraction of the measured bandwidth the kernel reaches (stream time / kernel time)"),
)
_BY_KEY = {c.key: c for c in COLUMNS}


@dataclass
class Row:
    n: int
    layout: str
    sizes: list[int]
    samples: dict[str, list[float]] = field(default_factory=dict)  # case -> seconds per step
    numbers: dict[str, int] = field(default_factory=dict)  # case -> steps per sample
    unavailable: dict[str, str] = field(default_factory=dict)  # case -> reason

    def seconds(self, case: str) -> float | None:
        s = self.samples.get(case)
        return statistics.median(s) if s else None

    def value(self, key: str) -> float | None:
        """A column's value: seconds per step, GB/s or a ratio (None when not measured)."""
        col = _BY_KEY[key]
        if col.kind == "ratio":
            # A ratio of times (for "kernel/stream": stream time over kernel time), paired by
            # repeat: the median over repeats of the ratio of samples taken side by side.
            return _median_ratio(self.samples.get(_BY_KEY[col.ratio[0]].case),
                                 self.samples.get(_BY_KEY[col.ratio[1]].case))
        t = self.seconds(col.case)
        if col.kind == "gbps":
            return None if t is None else BYTES_PER_PARAM * sum(self.sizes) / t / 1e9
        return t

    def to_json(self) -> dict:
        return {
            "n": sum(self.sizes), "layout": self.layout, "tensors": len(self.sizes),
            "seconds_per_step": {c: self.seconds(c) for c in self.samples},
            "steps_per_sample": self.numbers,
            "samples": self.samples,
            "columns": {c.key: self.value(c.key) for c in COLUMNS},
            "unavailable": self.unavailable,
        }


def _median_ratio(a: list[float] | None, b: list[float] | None) -> float | None:
    """Median over repeats of ``a[i] / b[i]`` (samples taken side by side); None if missing."""
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def _solver_case(name: str, mode: str) -> str:
    """The sample key of solver contender ``name`` called in ``mode``."""
    return f"{name}/{mode}"


#: The solver table's columns (milliseconds per whole run, and ratios).
SOLVER_COLUMNS: tuple[Column, ...] = (
    Column("uo_run", "uniopt run", "ms", _solver_case("uniopt_jax_polyak", "run"),
           help="uniopt.adapters.jax.PolyakSGD(...).run(w0, X, y), as called"),
    Column("jaxopt_run", "jaxopt run", "ms", _solver_case("jaxopt_polyak", "run"),
           help="jaxopt.PolyakSGD(...).run(w0, X, y), as called"),
    Column("r_run", "run ratio", "ratio", ratio=("uo_run", "jaxopt_run"),
           help="uniopt run time / jaxopt run time"),
    Column("uo_jit", "uniopt jit(run)", "ms", _solver_case("uniopt_jax_polyak", "jit"),
           help="jax.jit(uniopt.adapters.jax.PolyakSGD(...).run)(w0, X, y)"),
    Column("jaxopt_jit", "jaxopt jit(run)", "ms", _solver_case("jaxopt_polyak", "jit"),
           help="jax.jit(jaxopt.PolyakSGD(...).run)(w0, X, y)"),
    Column("r_jit", "jit ratio", "ratio", ratio=("uo_jit", "jaxopt_jit"),
           help="uniopt jit(run) time / jaxopt jit(run) time"),
)
_SOLVER_BY_KEY = {c.key: c for c in SOLVER_COLUMNS}


@dataclass(kw_only=True)
class _TimedRow:
    """A row of a small table: samples per case, and its columns' values (``COLUMNS``: the
    table's columns by key, set by each subclass)."""

    COLUMNS = {}
    samples: dict[str, list[float]] = field(default_factory=dict)  # case -> seconds per call
    numbers: dict[str, int] = field(default_factory=dict)  # case -> calls per sample
    unavailable: dict[str, str] = field(default_factory=dict)  # case -> reason

    def value(self, key: str) -> float | None:
        """A column's value: seconds per call or a ratio paired by repeat (None: not measured)."""
        col = self.COLUMNS[key]
        if col.kind == "ratio":
            return _median_ratio(self.samples.get(self.COLUMNS[col.ratio[0]].case),
                                 self.samples.get(self.COLUMNS[col.ratio[1]].case))
        s = self.samples.get(col.case)
        return statistics.median(s) if s else None


@dataclass
class SolverRow(_TimedRow):
    """One problem of the solver table: seconds per whole run of each (solver, mode)."""

    COLUMNS = _SOLVER_BY_KEY
    problem: SolverProblem

    def to_json(self) -> dict:
        p = self.problem
        return {
            "problem": p.key, "kind": p.kind, "m": p.m, "d": p.d, "maxiter": p.maxiter,
            "seconds_per_run": {c: statistics.median(s) for c, s in self.samples.items() if s},
            "runs_per_sample": self.numbers,
            "samples": self.samples,
            "columns": {c.key: self.value(c.key) for c in SOLVER_COLUMNS},
            "unavailable": self.unavailable,
        }


#: The iALM table's columns (milliseconds per dual step, and the ratio).
IALM_COLUMNS: tuple[Column, ...] = (
    Column("uo_ialm", "uniopt torch", "ms", "uniopt_torch_ialm",
           help="uniopt.adapters.torch.dual_optim.iALM(...).update(c)"),
    Column("uo_np_ialm", "uniopt numpy", "ms", "uniopt_numpy_ialm",
           help="uniopt.iALM(...).update(c) (ndarrays)"),
    Column("hct_ialm", "humancompatible", "ms", "hct_ialm",
           help="humancompatible.train.dual_optim.iALM(...).update(c) (0.4.x)"),
    Column("r_ialm", "hct / uniopt", "ratio", ratio=("hct_ialm", "uo_ialm"),
           help="humancompatible-train time / uniopt torch time (speed-up; higher is better)"),
)
_IALM_BY_KEY = {c.key: c for c in IALM_COLUMNS}


@dataclass
class IALMRow(_TimedRow):
    """One constraint count of the iALM table: seconds per dual step of each contender."""

    COLUMNS = _IALM_BY_KEY
    m: int

    def to_json(self) -> dict:
        return {"m": self.m, "samples": self.samples, "steps_per_sample": self.numbers,
                "columns": {c.key: self.value(c.key) for c in IALM_COLUMNS},
                "unavailable": self.unavailable}


def _time(step: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        step()
    return (time.perf_counter() - t0) / number


def _calibrate(step: Callable[[], object], min_time: float, max_number: int = 100_000) -> int:
    """Steps per sample so that one sample lasts about ``min_time`` seconds."""
    number = 1
    while True:
        t = _time(step, number) * number
        if t >= min_time / 4 or number >= max_number:
            break
        number *= 4 if t < min_time / 40 else 2
    return max(1, min(max_number, round(number * min_time / max(t, 1e-9))))


def interleave(steps: dict[str, Callable[[], object]], repeat: int, min_time: float,
               on_sample: Callable[[str, int], None] | None = None):
    """Time every step ``repeat`` times, interleaved: each repeat times every step once, in an
    order rotated by one per repeat. Each sample runs a calibrated number of steps lasting about
    ``min_time`` seconds; garbage collection is off meanwhile.

    Returns ``(samples, numbers)``: seconds per step of each sample, and steps per sample.
    """
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        numbers = {name: _calibrate(step, min_time) for name, step in steps.items()}
        samples: dict[str, list[float]] = {name: [] for name in steps}
        order = list(steps)
        for r in range(repeat):
            k = r % max(1, len(order))
            for name in order[k:] + order[:k]:
                samples[name].append(_time(steps[name], numbers[name]))
                if on_sample is not None:
                    on_sample(name, r)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, numbers


def medians(steps: dict[str, Callable[[], object]], repeat: int = 7, min_time: float = 0.05):
    """Median seconds per step of each step callable, measured interleaved."""
    samples, _ = interleave(steps, repeat, min_time)
    return {name: statistics.median(s) for name, s in samples.items()}


def _measure(label: str, builders: dict[str, Callable[[], Callable[[], object]]],
             unavailable: dict[str, str], repeat: int, min_time: float, progress=None):
    """Build every case (``builders``: name -> zero-argument builder; unavailable ones go to
    ``unavailable``), then time them interleaved. Returns ``(samples, numbers)``."""
    steps: dict[str, Callable] = {}
    with warnings.catch_warnings():  # e.g. qhoptim's deprecated add_ overloads
        warnings.simplefilter("ignore")
        try:
            for name, make in builders.items():
                if progress is not None:
                    progress.set_postfix_str(f"{label}: build {name}")
                try:
                    steps[name] = make()
                except Unavailable as exc:
                    unavailable[name] = str(exc)
                if progress is not None:
                    progress.update(1)
            builders.clear()  # drop the builders' data before timing

            def on_sample(name, r):
                if progress is not None:
                    progress.set_postfix_str(f"{label}: repeat {r + 1}/{repeat}", refresh=False)
                    progress.update(1)

            samples, numbers = interleave(steps, repeat, min_time, on_sample)
            if progress is not None:  # unavailable cases have no samples
                progress.update(len(unavailable) * repeat)
        finally:
            steps.clear()
            gc.collect()
    return samples, numbers


def paired_ratio(steps: dict[str, Callable[[], object]], numerator: str, denominator: str,
                 repeat: int = 7, min_time: float = 0.05) -> float:
    """Median over interleaved repeats of ``time(numerator) / time(denominator)`` (the samples
    of one repeat are taken side by side), as the table's ratio columns."""
    samples, _ = interleave(steps, repeat, min_time)
    return _median_ratio(samples[numerator], samples[denominator])


def measure_row(row: Row, cases: Sequence[str], repeat: int, min_time: float,
                seed: int = 0, progress=None) -> Row:
    """Build every case of ``row`` (unavailable ones are noted), then time them interleaved."""
    data = Data.make(row.sizes, seed)
    builders = {name: functools.partial(CASES[name], data) for name in cases}
    del data  # the builders hold it until they have run
    row.samples, row.numbers = _measure(f"{_size_label(row.n)} {row.layout}", builders,
                                        row.unavailable, repeat, min_time, progress)
    return row


def measure_solver_row(row: SolverRow, repeat: int, min_time: float, seed: int = 0,
                       progress=None) -> SolverRow:
    """Build (compile) every solver contender of ``row`` in every mode, then time whole runs
    interleaved."""
    builders = {_solver_case(name, mode): functools.partial(SOLVER_CASES[name], row.problem,
                                                            mode, seed)
                for mode in SOLVER_MODES for name in SOLVER_CASES}
    row.samples, row.numbers = _measure(row.problem.label, builders, row.unavailable, repeat,
                                        min_time, progress)
    return row


# ----------------------------------------------------------------------------------------------
# Start-up costs, each measured in a fresh process
# ----------------------------------------------------------------------------------------------
def measure_ialm_row(row: IALMRow, repeat: int, min_time: float, seed: int = 0,
                     progress=None) -> IALMRow:
    """Build every iALM contender with ``row.m`` constraints, then time dual steps interleaved."""
    builders = {name: functools.partial(make, row.m, seed) for name, make in IALM_CASES.items()}
    row.samples, row.numbers = _measure(f"iALM m={_size_label(row.m)}", builders,
                                        row.unavailable, repeat, min_time, progress)
    return row


def _run_python(code: str, *args: str, env: dict | None = None, timeout: float = 300) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


_IMPORT_CODE = """
import json, time
t = time.perf_counter()
import uniopt
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def import_time(repeat: int = 3) -> float:
    """Median seconds of ``import uniopt`` in a fresh interpreter (interpreter start excluded)."""
    return statistics.median(_run_python(_IMPORT_CODE)["seconds"] for _ in range(repeat))


_FIRST_STEP_CODE = """
import json, sys, time
backend, sizes, hyper = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
t = time.perf_counter()
if backend == "torch":
    import torch
    torch.set_num_threads(1)
    out["import_framework"] = time.perf_counter() - t
    # torch's own one-off costs (its first Optimizer imports torch._dynamo), which any torch
    # optimizer pays once per process: paid here by torch.optim.Adam, reported apart.
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    t = time.perf_counter()
    torch.optim.Adam([w]).step()
    out["torch_first_step"] = time.perf_counter() - t
    t = time.perf_counter()
    from uniopt.adapters.torch import QHAdam
    out["import_uniopt"] = time.perf_counter() - t
    params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    t = time.perf_counter()
    QHAdam(params, **hyper).step()
else:
    import numpy as np
    out["import_framework"] = time.perf_counter() - t
    t = time.perf_counter()
    from uniopt import QHAdam
    out["import_uniopt"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    t = time.perf_counter()
    QHAdam(params, **hyper).step(grads)
out["first_step"] = time.perf_counter() - t
print(json.dumps(out))
"""


def first_step_time(backend: str = "torch", n: int = 100_000, layout: str = "model") -> dict:
    """Seconds to build a QHAdam and take its first step in a fresh process, numba cache warm.

    Runs the script twice (the first run fills the on-disk kernel cache) and returns the second
    run's timings: ``first_step`` (construction and first step of uniopt's QHAdam),
    ``import_uniopt`` (importing its module), ``import_framework`` and, for torch,
    ``torch_first_step``: torch's own one-off start-up (the first ``Optimizer`` of a process
    imports ``torch._dynamo``), paid before by a ``torch.optim.Adam`` step and so not part of
    ``first_step``. ``backend`` is ``"torch"`` (the torch adapter) or ``"numpy"``.
    """
    if backend == "torch":
        _uniopt_torch("QHAdam")
    args = (backend, json.dumps(layout_sizes(n, layout)), json.dumps(QHADAM))
    _run_python(_FIRST_STEP_CODE, *args)
    return {**_run_python(_FIRST_STEP_CODE, *args), "backend": backend}


_COMPILE_CODE = """
import json
from uniopt.bench import _compile_report
print(json.dumps(_compile_report()))
"""


def _compile_report() -> dict:
    """(In a process with UNIOPT_NUMBA_CACHE=0.) Seconds of each kernel's first call."""
    import numba

    @numba.njit
    def _warm(x):
        return x + 1

    t = time.perf_counter()
    _warm(1.0)
    report = {"numba_first_jit": time.perf_counter() - t}
    data = Data.make([3, 5])
    for name in ("kernel_qhadam", "kernel_qhm"):
        t = time.perf_counter()
        CASES[name](data)  # builds tiny tables, then calls (compiles) the kernel once
        report[name] = time.perf_counter() - t
    return report


def compile_times() -> dict:
    """Compile seconds of the QH table kernels (float32), on-disk cache off, fresh process.

    ``numba_first_jit`` is the first (trivial) jitted function of the process: numba's own
    one-off initialisation, paid before and excluded from the kernel numbers.
    """
    return _run_python(_COMPILE_CODE, env={"UNIOPT_NUMBA_CACHE": "0"})


_SOLVER_FIRST_RUN_CODE = """
import json, sys, time
import jax, jax.numpy as jnp
jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(3)))  # JAX's one-off start-up
from uniopt import bench
name, key, mode = sys.argv[1:4]
problem = bench.SOLVER_PROBLEMS[key]
cls = bench._solver_class(name)
X, y = (jnp.asarray(a) for a in bench.solver_data(problem))
w0 = jax.block_until_ready(jnp.zeros(problem.d, dtype=bench.DTYPE))
t = time.perf_counter()
solver = cls(fun=bench._SOLVER_LOSSES[problem.kind], maxiter=problem.maxiter, **bench.POLYAK_SOLVER)
run = jax.jit(solver.run) if mode == "jit" else solver.run
jax.block_until_ready(run(w0, X, y))
first = time.perf_counter() - t
t = time.perf_counter()
jax.block_until_ready(run(w0, X, y))
print(json.dumps({"first_run": first, "second_run": time.perf_counter() - t}))
"""


def solver_first_run(name: str, problem: str = "lstsq_small", mode: str = "run") -> dict:
    """Seconds of the first ``run`` of solver contender ``name`` in a fresh process: building
    the solver, tracing and compiling, and running (``first_run``), and of the second run
    (``second_run``, compiled). Imports and JAX's own start-up (a first trivial ``jax.jit``) are
    paid before and excluded."""
    _solver_class(name)  # Unavailable here rather than a failed subprocess
    return _run_python(_SOLVER_FIRST_RUN_CODE, name, problem, mode)


# ----------------------------------------------------------------------------------------------
# Threads, machine, versions
# ----------------------------------------------------------------------------------------------
def pin_threads(pin_cpu: bool = True) -> dict:
    """One thread per framework; optionally the process on one CPU. Returns what to restore.

    ``torch.set_num_threads(1)`` is applied when torch is installed (torch is imported). The CPU
    affinity set here is inherited by threads and processes started afterwards (XLA's pool,
    the start-up subprocesses); it is the only reliable way to keep XLA:CPU on one thread.
    """
    saved: dict = {}
    try:
        import torch
    except ImportError:
        pass
    else:
        saved["torch_threads"] = torch.get_num_threads()
        torch.set_num_threads(1)
    if pin_cpu and hasattr(os, "sched_setaffinity"):
        cpus = os.sched_getaffinity(0)
        saved["affinity"] = cpus
        os.sched_setaffinity(0, {max(cpus)})
    return saved


def restore_threads(saved: dict) -> None:
    if "torch_threads" in saved:
        import torch

        torch.set_num_threads(saved["torch_threads"])
    if "affinity" in saved:
        os.sched_setaffinity(0, saved["affinity"])


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}"}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


_VERSIONED = ("uniopt", "numpy", "numba", "torch", "jax", "jaxlib", "optax", "qhoptim",
              "humancompatible-train")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------------------------
# Goals (reported, never asserted)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    text: str
    column: str | None  # a table column (rows of ``layouts``), or None for a start-up metric
    sizes: tuple[int, ...] | None  # None: every measured size (or solver problem)
    target: float
    at_most: bool = True  # met when value <= target (else value >= target)
    #: a start-up metric key, "tiny" for the fixed-cost row, or "solver" for a column of the
    #: solver table (every problem measured)
    metric: str | None = None
    unit: str = ""  # "", "s" or "us" (values are kept in seconds)
    layouts: tuple[str, ...] = ("model",)  # the table rows a column goal is evaluated on

    def show(self, value: float) -> str:
        if self.unit == "us":
            return f"{value * 1e6:.0f} us"
        if self.unit == "s":
            return f"{value:.2f} s"
        return f"{value:.2f}"


GOALS: tuple[Goal, ...] = (
    Goal("uniopt QHAdam / fused Adam", "r_qhadam_fused", (10_000, 100_000), 0.25),
    Goal("uniopt QHAdam / fused Adam", "r_qhadam_fused", (1_000_000,), 0.6),
    Goal("uniopt QHAdam / fused Adam", "r_qhadam_fused", (10_000_000,), 0.95),
    Goal("uniopt QHAdam / qhoptim QHAdam", "r_qhadam_qho", None, 0.25),
    Goal("uniopt QHM / qhoptim QHM", "r_qhm_qho", None, 0.5),
    Goal("uniopt jax qhadam / optax adam", "r_jax_optax", None, 1.1),
    Goal("uniopt torch PolyakSGD / SGD", "r_polyak_sgd", (1_000_000, 10_000_000), 1.3,
         layouts=("one", "model")),
    Goal("uniopt jax PolyakSGD.run / jaxopt", "r_run", None, 1.0, metric="solver"),
    Goal("jit(uniopt jax PolyakSGD.run) / jaxopt", "r_jit", None, 1.0, metric="solver"),
    Goal("humancompatible iALM / uniopt torch iALM", "r_ialm", (100_000, 1_000_000), 5.0,
         at_most=False, metric="ialm"),
    Goal("kernel / stream bandwidth", "r_kernel_stream", (10_000_000,), 0.85, at_most=False),
    Goal("fixed cost per step, uniopt QHAdam", "uo_qhadam", None, 60e-6, metric="tiny", unit="us"),
    Goal("import uniopt", None, None, 0.5, metric="import_uniopt", unit="s"),
    Goal("first step, warm cache", None, None, 1.0, metric="first_step", unit="s"),
)


def evaluate_goals(rows: Sequence[Row], startup: dict,
                   solver_rows: Sequence[SolverRow] = (),
                   ialm_rows: Sequence[IALMRow] = ()) -> list[dict]:
    """Every goal at every place it applies: value, target, "met" / "MISSED" / "n/a"."""
    out = []
    for goal in GOALS:
        measured: list[tuple[str, float | None]] = []
        if goal.column is None:
            value = startup.get(goal.metric)
            measured.append(("", value if isinstance(value, float) else None))
        elif goal.metric == "tiny":
            measured += [(f"{TINY_TENSORS}x{TINY_SIZE}", r.value(goal.column))
                         for r in rows if r.layout == "tiny"]
        elif goal.metric == "solver":
            measured += [(r.problem.label, r.value(goal.column)) for r in solver_rows]
        elif goal.metric == "ialm":
            measured += [(f"m={_size_label(r.m)}", r.value(goal.column)) for r in ialm_rows
                         if goal.sizes is None or r.m in goal.sizes]
        else:
            measured += [(_size_label(r.n) + (f" ({_layout_label(r)})" if len(goal.layouts) > 1
                                              else ""), r.value(goal.column))
                         for r in rows
                         if r.layout in goal.layouts and (goal.sizes is None or r.n in goal.sizes)]
        for where, value in measured:
            if value is None:
                status = "n/a"
            elif (value <= goal.target) if goal.at_most else (value >= goal.target):
                status = "met"
            else:
                status = "MISSED"
            out.append({"goal": goal.text, "at": where, "value": value,
                        "shown": "n/a" if value is None else goal.show(value),
                        "target": ("<= " if goal.at_most else ">= ") + goal.show(goal.target),
                        "status": status})
    return out


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def _size_label(n: int) -> str:
    exponent = round(np.log10(n)) if n > 0 else 0
    return f"1e{exponent}" if n == 10**exponent else f"{n:,}"


def _layout_label(row: Row) -> str:
    if row.layout == "tiny":
        return f"{TINY_TENSORS}x{TINY_SIZE} (fixed cost)"
    return "1 tensor" if len(row.sizes) == 1 else f"{len(row.sizes)} tensors"


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _cell(row: Row, col: Column) -> str:
    value = row.value(col.key)
    if value is None:
        return "n/a"
    if col.kind == "ms":
        return _fmt_ms(value)
    if col.kind == "gbps":
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> str:
    """A Markdown table: one line per row, times in ms per step."""
    header = ["params", "layout"] + [c.label for c in columns]
    body = [[_size_label(r.n) if r.layout != "tiny" else str(sum(r.sizes)), _layout_label(r)]
            + [_cell(r, c) for c in columns] for r in rows]
    return _markdown(header, body)


def format_solver_table(rows: Sequence[SolverRow],
                        columns: Sequence[Column] = SOLVER_COLUMNS) -> str:
    """The solver table in Markdown: one line per problem, times in ms per whole run."""
    header = ["problem", "maxiter"] + [c.label for c in columns]
    body = [[r.problem.label, str(r.problem.maxiter)] + [_cell(r, c) for c in columns]
            for r in rows]
    return _markdown(header, body)


def format_ialm_table(rows: Sequence[IALMRow], columns: Sequence[Column] = IALM_COLUMNS) -> str:
    """The iALM table in Markdown: one line per constraint count, ms per dual step."""
    header = ["constraints", "groups"] + [c.label for c in columns]
    body = [[_size_label(r.m), "1"] + [_cell(r, c) for c in columns] for r in rows]
    return _markdown(header, body)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    """Two left-aligned label columns, then right-aligned numbers."""
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "| " + " | ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(b) for b in body])


def _missing(rows, columns: Sequence[Column]) -> dict[str, str]:
    """Column label -> why it is n/a (the first reason seen)."""
    label = {c.case: c.label for c in columns if c.case}
    missing: dict[str, str] = {}
    for r in rows:
        for case, reason in r.unavailable.items():
            if case in label:
                missing.setdefault(label[case], reason)
    return missing


def format_report(result: dict, rows: Sequence[Row], solver_rows: Sequence[SolverRow] = (),
                  ialm_rows: Sequence[IALMRow] = ()) -> str:
    meta = result["meta"]
    m, v = meta["machine"], meta["versions"]
    lines = [
        f"uniopt bench, {meta['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['system']})"
        + (f", load average {m['load_average']}" if "load_average" in m else ""),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
        f"settings: float32; {meta['threads']}; median of {meta['repeat']} interleaved repeats "
        f"(each >= {meta['min_time'] * 1e3:.0f} ms); times in ms per step (lower is better)",
        "",
        format_table(rows),
        "",
        "columns:",
    ]
    lines += [f"  {c.label:<17} {c.help}" for c in COLUMNS]
    missing = _missing(rows, COLUMNS)
    if missing:
        lines += ["", "n/a:"] + [f"  {name}: {reason}" for name, reason in missing.items()]
    if solver_rows:
        settings = ", ".join(f"{k}={val!r}" for k, val in POLYAK_SOLVER.items())
        lines += [
            "",
            f"Polyak SGD solver runs (JAX, float32, w0 = 0, {settings}: every iteration runs); "
            "ms per whole run (lower is better)",
            "",
            format_solver_table(solver_rows),
            "",
            "columns:",
        ]
        lines += [f"  {c.label:<17} {c.help}" for c in SOLVER_COLUMNS]
        missing = _missing(solver_rows, SOLVER_COLUMNS)
        if missing:
            lines += ["", "n/a:"] + [f"  {name}: {reason}" for name, reason in missing.items()]
    if ialm_rows:
        settings = ", ".join(f"{k}={val!r}" for k, val in IALM.items())
        lines += ["", f"iALM dual steps (torch, float32, one group, {settings}); ms per "
                      "update(c) (lower is better)", "", format_ialm_table(ialm_rows), "",
                  "columns:"]
        lines += [f"  {c.label:<17} {c.help}" for c in IALM_COLUMNS]
        missing = _missing(ialm_rows, IALM_COLUMNS)
        if missing:
            lines += ["", "n/a:"] + [f"  {name}: {reason}" for name, reason in missing.items()]
    startup = result.get("startup") or {}
    if startup:
        lines += ["", "start-up (fresh processes):"]
        for key, value in startup.items():
            text = value if isinstance(value, str) else f"{value:.3f} s"
            lines.append(f"  {key:<34} {text}")
    goals = result.get("goals") or []
    if goals:
        lines += ["", "goals (100-tensor layout unless a layout or problem is named; measured, "
                      "not asserted):"]
        where = [g["goal"] + (f" at {g['at']}" if g["at"] else "") for g in goals]
        width = max(42, *(len(w) for w in where))
        for g, w in zip(goals, where):
            lines.append(f"  {w:<{width}} {g['shown']:>9}   target {g['target']:<10} "
                         f"{g['status']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --sizes {text!r}; expected e.g. 1e4,1e5") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"invalid --sizes {text!r}; expected positive counts")
    return sizes


def _parse_layouts(text: str) -> list[str]:
    layouts = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in layouts if s not in LAYOUTS]
    if bad or not layouts:
        raise argparse.ArgumentTypeError(f"invalid --layouts {text!r}; choose from {','.join(LAYOUTS)}")
    return layouts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m uniopt bench",
        description="uniopt's optimizers against torch.optim, qhoptim, optax and jaxopt: one "
                    "side-by-side table, and one of Polyak SGD solver runs (medians of "
                    "interleaved repeats; float32).",
    )
    p.add_argument("--quick", action="store_true",
                   help="one size (1e4), 3 repeats, short samples, one small solver problem, "
                        "start-up: import time only; a smoke run")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help="comma-separated parameter counts (default 1e4,1e5,1e6,1e7)")
    p.add_argument("--layouts", type=_parse_layouts, default=list(LAYOUTS),
                   help="comma-separated layouts: one (a single tensor), model (100 mixed-size "
                        "tensors); default both")
    p.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 7, quick 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per sample (default 0.05, quick 0.005)")
    p.add_argument("--no-fixed-cost", dest="fixed_cost", action="store_false",
                   help=f"skip the fixed-cost row ({TINY_TENSORS} tensors of {TINY_SIZE} elements)")
    p.add_argument("--no-solver", dest="solver", action="store_false",
                   help="skip the solver table (uniopt's JAX PolyakSGD.run against jaxopt's)")
    p.add_argument("--no-ialm", dest="ialm", action="store_false",
                   help="skip the iALM table (dual steps against humancompatible-train)")
    p.add_argument("--no-startup", dest="startup", action="store_false",
                   help="skip the start-up measurements in fresh processes (import time; "
                        "without --quick also first step with a warm cache and compile time)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the process to one CPU (torch still runs one thread)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", metavar="PATH", help="also write every sample and the metadata here")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="bench", unit="step", file=sys.stderr, leave=False)


def _startup(quick: bool, solver: bool = True) -> dict:
    """Start-up metrics in fresh processes; ``quick`` measures only the import time; ``solver``:
    also the first (compiling) run of each Polyak solver."""
    out: dict = {}
    try:
        out["import_uniopt"] = import_time(repeat=1 if quick else 5)
    except Exception as exc:  # report, don't lose the table
        out["import_uniopt"] = f"failed: {exc}"
    if quick:
        return out
    try:
        try:
            fs = first_step_time("torch")
        except Unavailable:
            fs = first_step_time("numpy")
        out["first_step"] = fs["first_step"]
        out["first_step_setup"] = (f"uniopt {fs['backend']} QHAdam, 1e5 params in 100 tensors, "
                                   "warm kernel cache")
        out["import_uniopt_adapter"] = fs["import_uniopt"]
        if "torch_first_step" in fs:
            out["torch_one_off_first_step"] = fs["torch_first_step"]
    except Exception as exc:
        out["first_step"] = f"failed: {exc}"
    try:
        ct = compile_times()
        out["compile_qhadam_table"] = ct["kernel_qhadam"]
        out["compile_qhm_table"] = ct["kernel_qhm"]
        out["numba_first_jit"] = ct["numba_first_jit"]
    except Exception as exc:
        out["compile"] = f"failed: {exc}"
    if solver:
        for name in SOLVER_CASES:
            key = f"polyak_first_run_{name.removesuffix('_polyak')}"
            try:
                out[key] = solver_first_run(name, QUICK_SOLVER_PROBLEMS[0])["first_run"]
            except Unavailable as exc:
                out[key] = f"n/a: {exc}"
            except Exception as exc:
                out[key] = f"failed: {exc}"
        out["polyak_first_run_setup"] = (f"PolyakSGD(...).run on {QUICK_SOLVER_PROBLEMS[0]}: "
                                         "build, trace, compile, run")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table. Returns 0 (goals are reported, not enforced)."""
    args = _parser().parse_args(argv)
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    repeat = args.repeat or (3 if args.quick else 7)
    min_time = args.min_time or (0.005 if args.quick else 0.05)
    if repeat < 1 or min_time <= 0:
        _parser().error("--repeat and --min-time must be positive")
    for layout in args.layouts:
        for n in sizes:
            if layout == "model" and n < MODEL_TENSORS:
                _parser().error(f"layout 'model' needs sizes >= {MODEL_TENSORS}, got {n}")

    rows = [Row(n, layout, layout_sizes(n, layout)) for n in sizes for layout in args.layouts]
    if args.fixed_cost:
        tiny = layout_sizes(0, "tiny")
        rows.append(Row(sum(tiny), "tiny", tiny))
    cases = list(dict.fromkeys(c.case for c in COLUMNS if c.case))
    solver_rows = ([SolverRow(SOLVER_PROBLEMS[k])
                    for k in (QUICK_SOLVER_PROBLEMS if args.quick else SOLVER_PROBLEMS)]
                   if args.solver else [])
    solver_cases = len(SOLVER_CASES) * len(SOLVER_MODES)
    ialm_rows = ([IALMRow(m) for m in (QUICK_IALM_SIZES if args.quick else IALM_SIZES)]
                 if args.ialm else [])

    saved = pin_threads(args.pin)
    try:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(),
            "versions": versions(),
            "threads": "torch 1 thread, "
                       + ("serial numba kernels" if _jit.PARALLEL_MIN_SIZE >= 2**62 else
                          f"numba parallel kernels from {_jit.PARALLEL_MIN_SIZE} params")
                       + (f", process pinned to CPU {max(saved['affinity'])}" if "affinity" in saved
                          else ", process not pinned (XLA may use several threads)"),
            "repeat": repeat,
            "min_time": min_time,
            "parallel_min_size": _jit.PARALLEL_MIN_SIZE,
        }
        bar = _progress_bar((len(rows) * len(cases) + len(solver_rows) * solver_cases
                             + len(ialm_rows) * len(IALM_CASES)) * (1 + repeat), args.progress)
        try:
            for row in rows:
                measure_row(row, cases, repeat, min_time, seed=args.seed, progress=bar)
                if "torch_threads" in saved:  # a framework may have changed it (numba's OpenMP)
                    import torch

                    torch.set_num_threads(1)
            for solver_row in solver_rows:
                measure_solver_row(solver_row, repeat, min_time, seed=args.seed, progress=bar)
            for ialm_row in ialm_rows:
                measure_ialm_row(ialm_row, repeat, min_time, seed=args.seed, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        startup = _startup(args.quick, args.solver) if args.startup else {}
    finally:
        restore_threads(saved)

    result = {"meta": meta, "rows": [r.to_json() for r in rows], "startup": startup,
              "columns": [{"key": c.key, "label": c.label, "kind": c.kind, "help": c.help}
                          for c in COLUMNS]}
    result["solver"] = {"rows": [r.to_json() for r in solver_rows],
                        "columns": [{"key": c.key, "label": c.label, "kind": c.kind,
                                     "help": c.help} for c in SOLVER_COLUMNS],
                        "settings": dict(POLYAK_SOLVER)}
    result["ialm"] = {"rows": [r.to_json() for r in ialm_rows], "settings": dict(IALM)}
    result["goals"] = evaluate_goals(rows, startup, solver_rows, ialm_rows)
    print(format_report(result, rows, solver_rows, ialm_rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
