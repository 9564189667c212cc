"""Constrained dual steps (issue 9): uniopt's ConstrainedOptimizer.dual_step against cooper-optim.

* ``UnioptIndexedDualStep`` / ``CooperIndexedDualStep``: ``time_dual_step`` of one
  ``dual_step()`` on an IndexedMultiplier of ``m`` float32 rows with
  ``contenders.CONSTRAINED_SAMPLED`` rows sampled (the sparse gradient in place), projected
  SGD; uniopt's is the indexed kernel, whose time must not grow with ``m``.
* ``...DenseDualStep`` / ``...NuPIDualStep``: a DenseMultiplier of ``m`` entries, projected SGD
  (uniopt: step and projection fused) and nuPI (uniopt's nuPI with the projection in its
  kernel; Cooper's ``nuPI`` then a relu).
* ``ConstrainedRatios.track_...``: the ratios of the goals, measured interleaved in one process:
  cooper / uniopt indexed (>= 20 at 1e7), uniopt / cooper dense and nuPI (<= 0.5 at 1e6).

Violations are positive and the multipliers start at zero, so every repetition of a step finds
the multipliers in the same regime (none at the bound).
"""

from . import common  # noqa: F401, I001  (first: pins the process before any thread pool)

from . import contenders  # noqa: E402

SIZES = list(contenders.CONSTRAINED_SIZES)
_REPEAT, _MIN_TIME = 7, 0.05


def _build(name, m):
    try:
        return contenders.build_constrained(name, m)
    except contenders.Unavailable as exc:
        raise NotImplementedError(str(exc)) from exc


class _DualStep:
    case = ""
    params = [SIZES]
    param_names = ["m"]
    timeout = 300

    def setup(self, m):
        self.step = _build(self.case, m)

    def teardown(self, m):
        self.step = None

    def time_dual_step(self, m):
        self.step()


class UnioptIndexedDualStep(_DualStep):
    """uniopt dual_step(): IndexedMultiplier, sampled rows, projected SGD (indexed kernel)."""

    case = "uniopt_indexed"


class CooperIndexedDualStep(_DualStep):
    """cooper-optim dual_step(): SGD on the sparse gradient, then relu over every row."""

    case = "cooper_indexed"


class UnioptDenseDualStep(_DualStep):
    """uniopt dual_step(): DenseMultiplier, projected SGD in one fused pass."""

    case = "uniopt_dense"


class CooperDenseDualStep(_DualStep):
    """cooper-optim dual_step(): SGD, then relu."""

    case = "cooper_dense"


class UnioptNuPIDualStep(_DualStep):
    """uniopt dual_step() with uniopt's nuPI (the projection in its kernel)."""

    case = "uniopt_nupi"


class CooperNuPIDualStep(_DualStep):
    """cooper-optim dual_step() with cooper.optim.nuPI, then relu."""

    case = "cooper_nupi"


class ConstrainedRatios:
    """The goals' ratios, one process, interleaved repeats: cooper / uniopt indexed (higher is
    better), uniopt / cooper dense and nuPI (lower is better)."""

    params = [SIZES]
    param_names = ["m"]
    timeout = 900

    PAIRS = {"indexed": ("cooper_indexed", "uniopt_indexed"),
             "dense": ("uniopt_dense", "cooper_dense"),
             "nupi": ("uniopt_nupi", "cooper_nupi")}

    def setup_cache(self):
        out = {}
        for m in SIZES:
            for kind, (num, den) in self.PAIRS.items():
                try:
                    steps = {name: _build(name, m) for name in (num, den)}
                except NotImplementedError as exc:
                    out[(m, kind)] = str(exc)
                    continue
                out[(m, kind)] = contenders.paired_ratio(steps, num, den, _REPEAT, _MIN_TIME)
                steps.clear()
        return out

    def _ratio(self, ratios, m, kind):
        value = ratios[(m, kind)]
        if isinstance(value, str):
            raise NotImplementedError(value)
        return value

    def track_indexed_speedup(self, ratios, m):
        return self._ratio(ratios, m, "indexed")

    def track_dense_ratio(self, ratios, m):
        return self._ratio(ratios, m, "dense")

    def track_nupi_ratio(self, ratios, m):
        return self._ratio(ratios, m, "nupi")

    track_indexed_speedup.unit = "ratio"
    track_dense_ratio.unit = "ratio"
    track_nupi_ratio.unit = "ratio"
