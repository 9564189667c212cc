"""The contenders of uniopt's benchmarks, shared by the asv suite and the side-by-side table.

Everything both measure lives here, so they measure the same thing: the builders of every
contender (uniopt's optimizers against torch.optim, qhoptim, optax, jaxopt and
humancompatible-train), their data and hyper-parameters, the table's columns and rows, the
interleaved timing helpers and the start-up measurements. ``asv_bench/table.py`` prints the
side-by-side table (``make bench``); the modules next to this one are the asv suite. No kernel is
defined here: the bandwidth yardstick is :mod:`uniopt.kernels.bandwidth`.

The table's rows are parameter counts x layouts (one tensor, or a model-like list of 100
mixed-size tensors), its columns milliseconds per optimizer step of every contender, the core
kernel's achieved bandwidth next to a measured bandwidth ceiling, and the ratios uniopt's goals
are stated in. Measurements are interleaved (every repeat times every contender of a row, in a
rotating order) and the median of the repeats is reported, so the ratios compare numbers taken
under the same machine conditions.

A second, smaller table compares whole solver runs: uniopt's JAX ``PolyakSGD(...).run`` against
``jaxopt.PolyakSGD(...).run`` on the same seeded interpolation problems (realisable least
squares, separable logistic regression), float32, a fixed ``maxiter`` and ``tol=0`` so that both
run every iteration (checked when the case is built); called as is and under ``jax.jit``.

Fairness rules:

* float32 everywhere, identical data (seeded), gradients filled before the optimizer is built and
  never touched again; each contender owns its copy of every tensor, allocated separately;
* torch runs one thread (``torch.set_num_threads(1)``); uniopt's kernels are serial by default;
  by default the whole process is also pinned to one CPU (affinity), which is the only way to
  keep XLA:CPU on one thread;
* every contender is warmed up (compiled, cached, state allocated) before timing;
* JAX steps are ``jax.jit``-ed with donated params and state, and the timed call blocks until
  the results are ready; solver runs are compiled by a first run and also block.

This module imports torch and JAX only inside functions, and a missing framework or adapter
raises :class:`Unavailable` (an "n/a" cell with a footnote in the table, a skipped benchmark in
asv) instead of an error.
"""
from __future__ import annotations

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

from uniopt import _jit
from uniopt.kernels import qh_cpu
from uniopt.kernels._pointers import addresses
from uniopt.kernels.bandwidth import BYTES_PER_PARAM, stream_table_
from uniopt.rules import qh as _rules

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
    "medians",
    "paired_ratio",
    "pin_threads",
    "solver_first_run",
]

# ----------------------------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------------------------
DTYPE = np.float32
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


#: Whether JAX steps donate their params and state (the protocol; ``benchmarks.jax_ffi
#: --no-donate`` turns it off to measure the copies XLA then makes).
JAX_DONATE = True


def _jax_step(make_transform: Callable, data: Data, fused: bool = False,
              identity: bool = False) -> Callable[[], object]:
    """A jitted step with donated params and state: ``update`` + ``apply_updates``, or
    (``fused``) ``uniopt.adapters.jax.update_and_apply``, or (``identity``) nothing: the
    params and state returned as they came (JAX's own cost of a call over these buffers)."""
    jax, optax = _import_jax()
    import jax.numpy as jnp

    tx = make_transform()
    params = [jnp.array(p) for p in data.params]  # copies, in XLA's own buffers
    grads = [jnp.array(g) for g in data.grads]
    # Distinct buffers for every state leaf: XLA refuses to donate one buffer twice, and an
    # init that reuses one zero array for two leaves would otherwise fail under donation.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))

    def update(params, state, grads):
        if identity:
            return params, state
        if fused:
            from uniopt.adapters.jax import update_and_apply

            return update_and_apply(tx, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1) if JAX_DONATE else ())
    carry = [params, state]

    def step():
        carry[0], carry[1] = update(carry[0], carry[1], grads)
        return jax.block_until_ready(carry)

    step()  # compile
    return step


def _uniopt_jax_qhadam_builder(ffi=None, fused=False, packed=False, identity=False):
    """A builder of uniopt's JAX qhadam step: ``update`` + ``apply_updates`` (``fused``:
    ``update_and_apply``; ``packed``: of ``flatten(qhadam(...))``; ``identity``: a jitted
    call over the same buffers that computes nothing)."""

    def build(data):
        _import_jax()
        try:
            import uniopt.adapters.jax as ujax
            ujax.qhadam, ujax.update_and_apply, ujax.flatten  # noqa: B018
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"uniopt.adapters.jax not available ({exc})") from exc
        kw = dict(QHADAM)
        lr = kw.pop("lr")

        def make():
            tx = ujax.qhadam(lr, ffi=ffi, **kw)
            return ujax.flatten(tx) if packed else tx

        return _jax_step(make, data, fused=fused, identity=identity)

    return build


_build_uniopt_jax_qhadam = _uniopt_jax_qhadam_builder()
_build_uniopt_jax_qhadam_fused = _uniopt_jax_qhadam_builder(ffi=True, fused=True)
_build_uniopt_jax_qhadam_packed = _uniopt_jax_qhadam_builder(ffi=True, fused=True, packed=True)


def _build_jax_floor(data):
    """The least time of a jitted JAX step over the packed step's buffers: the 28 B/param sweep
    at stream speed (``stream``), then a jitted call over the same donated params and packed
    state and the same gradients that computes nothing (JAX's own cost per call; after the
    sweep, with cold caches, as in a real step)."""
    sweep = _build_stream(data)
    call = _uniopt_jax_qhadam_builder(ffi=True, fused=True, packed=True, identity=True)(data)

    def step():
        sweep()
        return call()

    return step


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


def _build_stream(data):
    arrays, (p, g, m, v), sizes = _kernel_tables(data)
    like = np.empty(1, dtype=DTYPE)

    def step(arrays=arrays):
        stream_table_(p, g, m, v, sizes, like)

    step()
    return step


def _build_uniopt_numpy_qhadam(data):
    from uniopt import QHAdam

    params, grads = data.copies()
    opt = QHAdam(params, **QHADAM)
    opt.step(grads)
    return lambda: opt.step(grads)


def _build_uniopt_numpy_qhm(data):
    from uniopt import QHM as _QHM

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
    "uniopt_jax_qhadam_fused": _build_uniopt_jax_qhadam_fused,
    "uniopt_jax_qhadam_packed": _build_uniopt_jax_qhadam_packed,
    "optax_adam": _build_optax_adam,
    "kernel_qhadam": _build_kernel_qhadam,
    "stream": _build_stream,
    "kernel_qhm": _build_kernel_qhm,
    "uniopt_numpy_qhadam": _build_uniopt_numpy_qhadam,
    "uniopt_numpy_qhm": _build_uniopt_numpy_qhm,
}


def build(name: str, n: int, layout: str, seed: int = 0, data: Data | None = None,
          cases: dict | None = None):
    """A warmed-up step callable of contender ``name`` (a key of ``cases``, default
    :data:`CASES`) on ``layout_sizes(n, layout)``."""
    if data is None:
        data = Data.make(layout_sizes(n, layout), seed)
    return (CASES if cases is None else cases)[name](data)


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


def _torch_ialm_step(opt, m: int, seed: int, entry: str):
    """A warmed-up ``opt.update(c)`` (``entry="update"``) or ``opt.forward_update(loss, c)``
    (``"forward_update"``: the training loop's call; ``c`` a leaf that requires grad, so the
    Lagrangian's graph is recorded as in training, never back-propagated)."""
    torch = _import_torch()
    c = torch.from_numpy(_ialm_constraints(m, seed))
    if entry == "update":
        step = functools.partial(opt.update, c)
    else:
        c.requires_grad_(True)
        step = functools.partial(opt.forward_update, torch.tensor(1.0), c)
    step()
    return step


def _build_uniopt_torch_ialm(m: int, seed: int = 0, entry: str = "update"):
    torch = _import_torch()
    try:
        from uniopt.adapters.torch.dual_optim import iALM
    except ImportError as exc:
        raise Unavailable(f"uniopt.adapters.torch.dual_optim not available ({exc})") from exc
    return _torch_ialm_step(iALM(m, penalty=None, init_duals=torch.zeros(m), **IALM), m, seed, entry)


def _build_hct_ialm(m: int, seed: int = 0, entry: str = "update"):
    torch = _import_torch()
    try:
        from humancompatible.train.dual_optim import iALM
    except ImportError as exc:
        raise Unavailable("humancompatible-train not installed") from exc
    return _torch_ialm_step(iALM(m, init_duals=torch.zeros(m), **IALM), m, seed, entry)


def _build_uniopt_numpy_ialm(m: int, seed: int = 0):
    from uniopt import iALM

    c = _ialm_constraints(m, seed)
    opt = iALM(m, penalty=None, init_duals=np.zeros(m, DTYPE), **IALM)
    opt.update(c)
    return lambda: opt.update(c)


#: iALM contenders: name -> builder(m, seed) -> warmed-up ``update(c)`` callable.
IALM_CASES: dict[str, Callable[..., Callable[[], object]]] = {
    "uniopt_torch_ialm": _build_uniopt_torch_ialm,
    "hct_ialm": _build_hct_ialm,
    "uniopt_numpy_ialm": _build_uniopt_numpy_ialm,
    "uniopt_torch_ialm_fu": functools.partial(_build_uniopt_torch_ialm, entry="forward_update"),
    "hct_ialm_fu": functools.partial(_build_hct_ialm, entry="forward_update"),
}


def build_ialm(name: str, m: int, seed: int = 0):
    """A warmed-up dual step of iALM contender ``name`` (a key of ``IALM_CASES``) with ``m``
    constraints."""
    return IALM_CASES[name](m, seed)


# ----------------------------------------------------------------------------------------------
# Constrained dual steps: uniopt's ConstrainedOptimizer.dual_step against cooper-optim's
# ----------------------------------------------------------------------------------------------
#: Multiplier counts of the constrained table (one multiplier per problem).
CONSTRAINED_SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
QUICK_CONSTRAINED_SIZES = (10_000,)
#: Rows sampled per step by the indexed contenders (unique rows, in random order).
CONSTRAINED_SAMPLED = 1_000
#: The dual optimizers' settings (both libraries). Violations are positive, so the multipliers
#: only grow: every repetition of a step is in the same state (no entry at the bound).
CONSTRAINED_SGD = dict(lr=1e-3)
CONSTRAINED_NUPI = dict(lr=1e-3, Kp=1.0, Ki=1.0, ema_nu=0.5)
#: Bytes per multiplier of a float32 step at the memory floor: projected SGD reads the
#: multiplier and its gradient and writes the multiplier; nuPI also reads and writes xi.
CONSTRAINED_BYTES = {"dense": 12, "nupi": 20}


def _constrained_lib(lib: str):
    """``uniopt.adapters.torch.constrained`` (``"uniopt"``) or ``cooper`` (``"cooper"``)."""
    _import_torch()
    if lib == "cooper":
        try:
            import cooper
        except ImportError as exc:
            raise Unavailable("cooper-optim not installed") from exc
        return cooper
    try:
        import uniopt.adapters.torch.constrained as ours
    except ImportError as exc:
        raise Unavailable(f"uniopt.adapters.torch.constrained not available ({exc})") from exc
    return ours


def _build_constrained(lib: str, kind: str, m: int, seed: int = 0):
    """A warmed-up ``ConstrainedOptimizer.dual_step`` of ``lib`` with the gradients in place.

    ``kind``: ``"indexed"`` (an IndexedMultiplier of ``m`` rows, :data:`CONSTRAINED_SAMPLED`
    of them observed, projected SGD), ``"dense"`` (a DenseMultiplier, projected SGD) or
    ``"nupi"`` (a DenseMultiplier, nuPI). One inequality constraint, float32, zero initial
    multipliers, positive violations (seeded).
    """
    torch = _import_torch()
    c = _constrained_lib(lib)
    rng = np.random.default_rng(seed)
    dtype = torch.float32

    class Problem(c.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            cls = c.multipliers.IndexedMultiplier if kind == "indexed" else c.multipliers.DenseMultiplier
            multiplier = cls(num_constraints=m, dtype=dtype)
            self.constraint = c.Constraint(c.ConstraintType.INEQUALITY, multiplier=multiplier)

        def compute_cmp_state(self):  # the gradients are put in place directly
            raise NotImplementedError

    cmp = Problem()
    weight = cmp.constraint.multiplier.weight
    if kind == "indexed":
        rows = torch.from_numpy(rng.choice(m, size=min(m, CONSTRAINED_SAMPLED), replace=False))
        violation = torch.from_numpy(rng.random(rows.numel(), dtype=DTYPE) + 0.5)
        (cmp.constraint.multiplier(rows) * violation).sum().backward()
    else:
        weight.grad = torch.from_numpy(rng.random(m, dtype=DTYPE) + 0.5)
    if kind == "nupi":  # ZEROS: the two libraries' SGD initialisations differ (deviations.md)
        dual = c.optim.nuPI(cmp.dual_parameters(), maximize=True,
                            init_type=c.optim.nuPIInitType.ZEROS, **CONSTRAINED_NUPI)
    else:
        dual = torch.optim.SGD(cmp.dual_parameters(), maximize=True, **CONSTRAINED_SGD)
    x = torch.zeros(1, requires_grad=True)
    opt = c.optim.SimultaneousOptimizer(cmp, torch.optim.SGD([x], lr=1e-3), dual)
    opt.dual_step()

    def step(cmp=cmp):  # the default keeps the problem alive
        opt.dual_step()

    step()
    step.weight = weight  # for the tests: the multipliers this step updates
    return step


#: Constrained contenders: name -> builder(m, seed) -> warmed-up ``dual_step`` callable.
CONSTRAINED_CASES: dict[str, Callable[..., Callable[[], object]]] = {
    f"{lib}_{kind}": functools.partial(_build_constrained, lib, kind)
    for kind in ("indexed", "dense", "nupi") for lib in ("uniopt", "cooper")
}


def _build_constrained_stream(m: int, seed: int = 0):
    """The bandwidth yardstick (:func:`uniopt.kernels.bandwidth.stream_table_`) on ``m``
    float32 elements: the reachable bandwidth at that size."""
    data = Data.make([m], seed)
    return _build_stream(data)


CONSTRAINED_CASES["stream"] = _build_constrained_stream


def build_constrained(name: str, m: int, seed: int = 0):
    """A warmed-up dual step of constrained contender ``name`` (a key of
    ``CONSTRAINED_CASES``) with ``m`` multipliers."""
    return CONSTRAINED_CASES[name](m, seed)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def _size_label(n: int) -> str:
    """``1e4`` for a power of ten, else ``12,345``."""
    exponent = round(np.log10(n)) if n > 0 else 0
    return f"1e{exponent}" if n == 10**exponent else f"{n:,}"


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
    Column("uo_jax_fused", "uniopt jax fused", "ms", "uniopt_jax_qhadam_fused",
           help="uniopt.adapters.jax.update_and_apply(qhadam(..., ffi=True), ...) under "
                "jax.jit: one fused FFI call, donated params and state"),
    Column("uo_jax_packed", "uniopt jax packed", "ms", "uniopt_jax_qhadam_packed",
           help="uniopt.adapters.jax.update_and_apply(flatten(qhadam(..., ffi=True)), ...) "
                "under jax.jit: the fused FFI call over packed state (2 state buffers)"),
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
    Column("r_jax_fused_optax", "jax fused/optax", "ratio", ratio=("uo_jax_fused", "optax_adam"),
           help="uniopt jax fused qhadam step (update_and_apply, FFI) time / optax.adam time"),
    Column("r_jax_fused_torch", "jax fused/torch", "ratio", ratio=("uo_jax_fused", "uo_qhadam"),
           help="uniopt jax fused qhadam step time / uniopt torch QHAdam (kernel path) time"),
    Column("r_jax_packed_optax", "jax packed/optax", "ratio",
           ratio=("uo_jax_packed", "optax_adam"),
           help="uniopt jax packed fused qhadam step time / optax.adam time"),
    Column("r_jax_packed_torch", "jax packed/torch", "ratio",
           ratio=("uo_jax_packed", "uo_qhadam"),
           help="uniopt jax packed fused qhadam step time / uniopt torch QHAdam time"),
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
    Column("uo_ialm_fu", "uniopt torch fwd_upd", "ms", "uniopt_torch_ialm_fu",
           help="uniopt.adapters.torch.dual_optim.iALM(...).forward_update(loss, c), c requires grad"),
    Column("hct_ialm_fu", "hct fwd_upd", "ms", "hct_ialm_fu",
           help="humancompatible.train.dual_optim.iALM(...).forward_update(loss, c), c requires grad"),
    Column("r_ialm_fu", "hct / uniopt fwd_upd", "ratio", ratio=("hct_ialm_fu", "uo_ialm_fu"),
           help="humancompatible-train forward_update time / uniopt torch forward_update time "
                "(speed-up; higher is better)"),
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


#: The constrained table's columns (milliseconds per dual step, ratios, the memory floor).
CONSTRAINED_COLUMNS: tuple[Column, ...] = (
    Column("uo_idx", "uniopt indexed", "ms", "uniopt_indexed",
           help=f"uniopt SimultaneousOptimizer.dual_step(), IndexedMultiplier, "
                f"{CONSTRAINED_SAMPLED} rows sampled, SGD(maximize=True)"),
    Column("cooper_idx", "cooper indexed", "ms", "cooper_indexed",
           help="cooper-optim 1.0.1's dual_step() on the same problem"),
    Column("r_idx", "cooper/uniopt idx", "ratio", ratio=("cooper_idx", "uo_idx"),
           help="cooper time / uniopt time, indexed (speed-up; higher is better)"),
    Column("g_idx", "idx growth", "growth", "uniopt_indexed",
           help="uniopt indexed time / its time at the smallest m of the run (flat is O(k))"),
    Column("uo_dense", "uniopt dense", "ms", "uniopt_dense",
           help="uniopt dual_step(), DenseMultiplier, SGD(maximize=True): fused step+projection"),
    Column("cooper_dense", "cooper dense", "ms", "cooper_dense",
           help="cooper dual_step(): SGD step, then relu over every entry"),
    Column("r_dense", "uniopt/cooper dense", "ratio", ratio=("uo_dense", "cooper_dense"),
           help="uniopt time / cooper time, dense projected SGD (lower is better)"),
    Column("uo_nupi", "uniopt nuPI", "ms", "uniopt_nupi",
           help="uniopt dual_step() with uniopt's nuPI (projection fused into its kernel)"),
    Column("cooper_nupi", "cooper nuPI", "ms", "cooper_nupi",
           help="cooper dual_step() with cooper.optim.nuPI, then relu"),
    Column("r_nupi", "uniopt/cooper nuPI", "ratio", ratio=("uo_nupi", "cooper_nupi"),
           help="uniopt time / cooper time, nuPI (lower is better)"),
    Column("stream_gbps", "stream GB/s", "gbps", "stream",
           help=f"uniopt.kernels.bandwidth.stream_table_ on m float32 elements "
                f"({BYTES_PER_PARAM} B each): the bandwidth reachable at that size"),
    Column("floor_dense", "dense floor", "floor", "stream",
           help=f"{CONSTRAINED_BYTES['dense']} B/multiplier (read lambda, g; write lambda) at "
                "the stream bandwidth: the least time of a dense projected step"),
    Column("floor_nupi", "nuPI floor", "floor", "stream",
           help=f"{CONSTRAINED_BYTES['nupi']} B/multiplier (also read and write xi) at the "
                "stream bandwidth"),
)
_CONSTRAINED_BY_KEY = {c.key: c for c in CONSTRAINED_COLUMNS}


@dataclass
class ConstrainedRow(_TimedRow):
    """One multiplier count of the constrained table: seconds per dual step of each contender.

    ``base``: the uniopt indexed time of the run's smallest ``m`` (for the growth column).
    """

    COLUMNS = _CONSTRAINED_BY_KEY
    m: int
    base: float | None = None

    def value(self, key: str) -> float | None:
        """As :meth:`_TimedRow.value`, plus the growth, GB/s and floor columns."""
        col = self.COLUMNS[key]
        if col.kind in ("ms", "ratio"):
            return super().value(key)
        s = self.samples.get(col.case)
        t = statistics.median(s) if s else None
        if t is None:
            return None
        if col.kind == "growth":
            return None if not self.base else t / self.base
        gbps = BYTES_PER_PARAM * self.m / t / 1e9
        if col.kind == "gbps":
            return gbps
        return CONSTRAINED_BYTES[key.removeprefix("floor_")] * self.m / (gbps * 1e9)

    def to_json(self) -> dict:
        return {"m": self.m, "samples": self.samples, "steps_per_sample": self.numbers,
                "columns": {c.key: self.value(c.key) for c in CONSTRAINED_COLUMNS},
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


def measure_ratios(cases: dict, ratios: list, n: int, repeat: int, min_time: float,
                   layout: str = "model") -> dict:
    """Median ms per step of every case (name -> builder) at size ``n`` and the medians of the
    interleaved paired ``ratios`` (``(label, numerator, denominator)``)."""
    data = Data.make(layout_sizes(n, layout))
    steps = {name: build(data) for name, build in cases.items()}
    samples, numbers = interleave(steps, repeat, min_time)
    del steps
    return {"n": n, "layout": layout, "repeat": repeat, "numbers": numbers,
            "ms": {k: 1e3 * statistics.median(v) for k, v in samples.items()},
            "ratios": {label: _median_ratio(samples[a], samples[b]) for label, a, b in ratios}}


def ratio_script(argv, description: str, cases: dict, ratios: list, repeat: int,
                 bytes_per_param: dict | None = None) -> None:
    """The command line of the side-by-side ratio scripts (``python -m benchmarks.jax_ffi``...):
    per size, the median ms of every case (and GB/s where ``bytes_per_param`` names the bytes a
    case moves per float32 parameter), then the median paired ratios."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", type=lambda text: [int(float(x)) for x in text.split(",")],
                        default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--layout", default="model", choices=("one", "model"))
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--min-time", type=float, default=0.02)
    parser.add_argument("--json", action="store_true", help="one JSON line per size")
    parser.add_argument("--no-donate", action="store_true",
                        help="jit the JAX steps without donating params and state")
    args = parser.parse_args(argv)
    global JAX_DONATE
    JAX_DONATE = not args.no_donate
    for n in args.sizes:
        result = measure_ratios(cases, ratios, n, args.repeat, args.min_time, args.layout)
        if args.json:
            print(json.dumps(result), flush=True)
            continue

        def cell(k, ms):
            if not bytes_per_param or k not in bytes_per_param:
                return f"{k} {ms:.3f} ms"
            gbs = bytes_per_param[k] * n / (ms * 1e-3) / 1e9
            return f"{k} {ms:.3f} ms ({gbs:.1f} GB/s at {bytes_per_param[k]} B/param)"

        print(f"n={n:.0e} ({args.layout}, {args.repeat} repeats"
              f"{', not donated' if args.no_donate else ''}): "
              + ", ".join(cell(k, v) for k, v in result["ms"].items()), flush=True)
        for label, value in result["ratios"].items():
            print(f"    {label}: {value:.3f}", flush=True)


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


def measure_constrained_rows(rows: Sequence[ConstrainedRow], repeat: int, min_time: float,
                             seed: int = 0, progress=None) -> Sequence[ConstrainedRow]:
    """Build every constrained contender of each row, time their dual steps interleaved, then
    set each row's growth base (the uniopt indexed time at the smallest ``m``)."""
    for row in rows:
        builders = {name: functools.partial(make, row.m, seed)
                    for name, make in CONSTRAINED_CASES.items()}
        row.samples, row.numbers = _measure(f"constrained m={_size_label(row.m)}", builders,
                                            row.unavailable, repeat, min_time, progress)
    if rows:
        smallest = min(rows, key=lambda r: r.m)
        s = smallest.samples.get("uniopt_indexed")
        base = statistics.median(s) if s else None
        for row in rows:
            row.base = base
    return rows


#: The folder that holds the ``benchmarks`` package: the start-up subprocesses import this
#: module from there.
_SUITE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, *args: str, env: dict | None = None, timeout: float = 300) -> dict:
    path = os.pathsep.join(filter(None, [_SUITE_DIR, os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": path, **(env or {})}, timeout=timeout,
                         check=False)
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
from benchmarks.contenders import _compile_report
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
from benchmarks import contenders as bench
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
