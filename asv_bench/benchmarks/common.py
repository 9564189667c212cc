"""Settings shared by every benchmark module: sizes, layouts, thread pinning, contenders.

The contenders themselves (data, hyper-parameters, warm-up) are built by :mod:`.contenders`,
which the side-by-side table (``asv_bench/table.py``, ``make bench``) also uses, so this suite and
the table measure exactly the same thing.

Threads: asv runs each benchmark in a fresh process. Importing this module pins that process to
one CPU (set ``UNIOPT_BENCH_PIN=0`` to turn it off), which keeps XLA:CPU on one thread; torch is
set to one thread by the builders, and uniopt's kernels are serial by default. Pinning happens
before numba, torch or JAX start any thread pool, since every benchmark module imports this one
first.
"""

import abc
import os
import warnings

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

if os.environ.get("UNIOPT_BENCH_PIN", "1") != "0" and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

from . import contenders  # noqa: E402

# qhoptim uses add_(Number, Tensor) overloads that torch deprecates: not ours to report.
warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning)

#: Total parameter counts (float32).
SIZES = [10_000, 100_000, 1_000_000, 10_000_000]
#: "one" tensor, or a "model"-like list of 100 mixed-size tensors (contenders.layout_sizes).
LAYOUTS = ["one", "model"]
#: The size at which bandwidth is reported (out of every cache).
BANDWIDTH_SIZE = 10_000_000
#: Solver-run problems (keys of contenders.SOLVER_PROBLEMS) and call modes ("run": as
#: called; "jit": jax.jit(solver.run)).
SOLVER_PROBLEMS = list(contenders.SOLVER_PROBLEMS)
SOLVER_MODES = list(contenders.SOLVER_MODES)


def build(case: str, n: int, layout: str, cases: dict | None = None):
    """A warmed-up step callable of contender ``case`` (of ``cases``, default
    ``contenders.CASES``); NotImplementedError (asv: skipped) when its framework or adapter is
    missing."""
    try:
        return contenders.build(case, n, layout, cases=cases)
    except contenders.Unavailable as exc:
        raise NotImplementedError(str(exc)) from exc


def build_solver(name: str, problem: str, mode: str):
    """A compiled, blocking run callable of solver contender ``name``; NotImplementedError
    (asv: skipped) when JAX, jaxopt or the adapter is missing."""
    try:
        return contenders.build_solver(name, problem, mode)
    except contenders.Unavailable as exc:
        raise NotImplementedError(str(exc)) from exc


class StepBenchmark(abc.ABC):
    """``time_step`` of one contender over SIZES x LAYOUTS; subclasses set ``case``.

    Gradients are filled before the optimizer is built; ``setup`` takes one step (state
    allocated, kernel compiled or loaded from cache, JAX function compiled). The class is
    abstract (asv skips it) until a subclass names its contender.
    """

    @property
    @abc.abstractmethod
    def case(self) -> str:
        """A key of ``contenders.CASES``."""
    params = [SIZES, LAYOUTS]
    param_names = ["n", "layout"]
    timeout = 600  # a JAX jit of 100 leaves takes seconds to compile, twice per round
    #: the builders ``case`` is looked up in (None: ``contenders.CASES``)
    cases: dict | None = None

    def setup(self, n, layout):
        self.step = build(self.case, n, layout, self.cases)

    def teardown(self, n, layout):
        self.step = None

    def time_step(self, n, layout):
        self.step()


class SolverRunBenchmark(abc.ABC):
    """``time_run``: one whole ``run`` of solver contender ``case`` (a key of
    ``contenders.SOLVER_CASES``) over SOLVER_PROBLEMS x SOLVER_MODES.

    ``setup`` builds the solver and runs it once (traced and compiled; it also checks that the
    run did all ``maxiter`` iterations); the timed call blocks until the result is ready.
    """

    @property
    @abc.abstractmethod
    def case(self) -> str:
        """A key of ``contenders.SOLVER_CASES``."""
    params = [SOLVER_PROBLEMS, SOLVER_MODES]
    param_names = ["problem", "mode"]
    timeout = 300

    def setup(self, problem, mode):
        self.run = build_solver(self.case, problem, mode)

    def teardown(self, problem, mode):
        self.run = None

    def time_run(self, problem, mode):
        self.run()
