"""Polyak step-size SGD (issue 3): uniopt against jaxopt (JAX solver runs) and torch.optim.SGD.

* ``UnioptJaxPolyakSGDRun`` / ``JaxoptPolyakSGDRun``: ``time_run`` of one whole
  ``PolyakSGD(...).run(w0, X, y)`` (uniopt.adapters.jax vs jaxopt 0.8.5) on the same seeded
  float32 interpolation problems (realisable least squares, separable logistic regression;
  ``contenders.SOLVER_PROBLEMS``), fixed ``maxiter``, ``tol=0`` so that both run every
  iteration; mode ``run`` calls ``solver.run`` as is, mode ``jit`` calls ``jax.jit(solver.run)``.
  Compiled in ``setup``; the timed call blocks until the result is ready.
* ``JaxPolyakOverJaxopt.track_ratio``: uniopt time / jaxopt time, measured interleaved in one
  process (goal: <= 1, no slower).
* ``SolverFirstRun.track_first_run``: building, tracing, compiling and running each solver once
  in a fresh process (compile time, kept out of ``time_run``).
* ``UnioptTorchPolyakSGD`` / ``TorchSGD``: ``time_step`` of ``uniopt.adapters.torch.PolyakSGD``
  (``step(loss=...)`` with gradients filled and a precomputed loss tensor) and of
  ``torch.optim.SGD(foreach=True)``, one torch thread, over SIZES x LAYOUTS.
* ``TorchPolyakOverSGD.track_ratio``: PolyakSGD time / SGD time at 1e6 and 1e7 parameters,
  measured interleaved (goal: <= 1.3; Polyak adds one reduction over the gradients).
"""

from . import contenders

from .common import (LAYOUTS, SOLVER_MODES, SOLVER_PROBLEMS, SolverRunBenchmark, StepBenchmark,
                     build, build_solver)

#: The sizes the torch goal is stated at.
RATIO_SIZES = [1_000_000, 10_000_000]
_REPEAT, _MIN_TIME = 7, 0.05


def _ratios(make_steps, keys, numerator, denominator):
    """key -> paired ratio (or the reason it is unavailable, a str)."""
    out = {}
    for key in keys:
        try:
            steps = make_steps(*key)
        except NotImplementedError as exc:
            out[key] = str(exc)
            continue
        out[key] = contenders.paired_ratio(steps, numerator, denominator, _REPEAT, _MIN_TIME)
        del steps
    return out


def _value(ratios, key):
    value = ratios[key]
    if isinstance(value, str):
        raise NotImplementedError(value)
    return value


# ----------------------------------------------------------------------------------------------
# JAX: uniopt.adapters.jax.PolyakSGD(...).run vs jaxopt.PolyakSGD(...).run
# ----------------------------------------------------------------------------------------------
class UnioptJaxPolyakSGDRun(SolverRunBenchmark):
    """uniopt.adapters.jax.PolyakSGD(fun, maxiter=..., tol=0).run(w0, X, y)."""

    case = "uniopt_jax_polyak"


class JaxoptPolyakSGDRun(SolverRunBenchmark):
    """jaxopt.PolyakSGD(fun, maxiter=..., tol=0).run(w0, X, y)."""

    case = "jaxopt_polyak"


class JaxPolyakOverJaxopt:
    """uniopt PolyakSGD.run time / jaxopt PolyakSGD.run time (goal <= 1), one process,
    interleaved repeats (lower is better)."""

    params = [SOLVER_PROBLEMS, SOLVER_MODES]
    param_names = ["problem", "mode"]
    timeout = 600

    def setup_cache(self):
        def make(problem, mode):
            return {name: build_solver(name, problem, mode)
                    for name in ("uniopt_jax_polyak", "jaxopt_polyak")}

        keys = [(p, m) for p in SOLVER_PROBLEMS for m in SOLVER_MODES]
        return _ratios(make, keys, "uniopt_jax_polyak", "jaxopt_polyak")

    def setup(self, ratios, problem, mode):
        _value(ratios, (problem, mode))

    def track_ratio(self, ratios, problem, mode):
        return _value(ratios, (problem, mode))

    track_ratio.unit = "ratio"


class SolverFirstRun:
    """Seconds of the first ``run`` (build, trace, compile, run) of each solver on the small
    least-squares problem, in a fresh process, after JAX's own start-up."""

    params = [["uniopt_jax_polyak", "jaxopt_polyak"]]
    param_names = ["solver"]
    timeout = 300

    def setup(self, solver):
        build_solver(solver, "lstsq_small", "run")  # NotImplementedError when missing

    def track_first_run(self, solver):
        return contenders.solver_first_run(solver, "lstsq_small", "run")["first_run"]

    track_first_run.unit = "seconds"


# ----------------------------------------------------------------------------------------------
# torch: uniopt.adapters.torch.PolyakSGD.step vs torch.optim.SGD.step
# ----------------------------------------------------------------------------------------------
class UnioptTorchPolyakSGD(StepBenchmark):
    """uniopt.adapters.torch.PolyakSGD, step(loss=...) with a precomputed loss tensor."""

    case = "uniopt_torch_polyak"


class TorchSGD(StepBenchmark):
    """torch.optim.SGD(lr=1e-3, foreach=True), no momentum."""

    case = "torch_sgd"


class TorchPolyakOverSGD:
    """uniopt torch PolyakSGD step time / torch.optim.SGD step time (goal <= 1.3), one
    process, interleaved repeats (lower is better)."""

    params = [RATIO_SIZES, LAYOUTS]
    param_names = ["n", "layout"]
    timeout = 600

    def setup_cache(self):
        def make(n, layout):
            return {name: build(name, n, layout) for name in ("uniopt_torch_polyak", "torch_sgd")}

        keys = [(n, layout) for n in RATIO_SIZES for layout in LAYOUTS]
        return _ratios(make, keys, "uniopt_torch_polyak", "torch_sgd")

    def setup(self, ratios, n, layout):
        _value(ratios, (n, layout))

    def track_ratio(self, ratios, n, layout):
        return _value(ratios, (n, layout))

    track_ratio.unit = "ratio"
