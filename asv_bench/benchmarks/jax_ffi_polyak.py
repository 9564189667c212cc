"""uniopt's JAX ``polyak_sgd`` through XLA's FFI (the fused Numba step inside ``jax.jit``)
against its traced path, ``optax.polyak_sgd`` and uniopt's torch ``PolyakSGD`` (kernel path).

Each JAX contender is one jitted step with donated params and state (``contenders._jax_step``;
one XLA thread: the process is pinned to one CPU by ``common``), the loss a precomputed Python
number ``SGD["lr"] * ||g||^2`` (so the step size is SGD's learning rate, as in the torch
contender ``uniopt_torch_polyak``); only the path differs:

* ``uniopt_jax_polyak_fused``: ``update_and_apply(polyak_sgd(ffi=True), ..., value=loss)``,
  one FFI call per step for all leaves: the norm pass reads ``g`` (4 B/param), the update pass
  reads ``g`` and ``p`` and writes ``p`` in place (12): 16 B/param;
* ``uniopt_jax_polyak_traced``: ``polyak_sgd(ffi=False)``, ``update`` + ``apply_updates``,
  the ``jax.numpy`` expression XLA compiles (at best the same 16 B/param: a reduction, then one
  fused elementwise pass);
* ``optax_polyak_sgd``: ``optax.polyak_sgd()`` (its default hyper-parameters; same traffic as
  the traced path);
* ``uniopt_torch_polyak`` (script mode only): ``uniopt.adapters.torch.PolyakSGD.step(loss=...)``,
  the table kernels (16 B/param, plus the loss's ``.item()``).

Script mode (interleaved paired ratios), from ``asv_bench/``::

    python -m benchmarks.jax_ffi_polyak --sizes 1e4,1e6,1e7 --repeat 11

prints, per size (100 tensors, float32, one pinned CPU), the median ms per step and the median
over interleaved repeats of fused/traced, fused/optax.polyak_sgd, fused/torch PolyakSGD.
"""

import argparse
import json
import statistics

from . import contenders
from .common import LAYOUTS, SIZES, StepBenchmark


def _loss(data) -> float:
    """``SGD["lr"] * ||g||^2`` in float64 (the torch contender's loss)."""
    import numpy as np

    return contenders.SGD["lr"] * sum(float(np.dot(g.astype(np.float64), g.astype(np.float64)))
                                      for g in data.grads)


def _with_value(tx, value: float):
    """``tx`` whose ``update`` (and ``update_and_apply``) get ``value=`` (a static number)."""
    _, optax = contenders._import_jax()
    inner = tx.update

    def update(updates, state, params=None, **extra):
        return inner(updates, state, params, value=value, **extra)

    fused = getattr(inner, "update_and_apply", None)
    if fused is not None:
        update.update_and_apply = lambda g, s, p, **extra: fused(g, s, p, value=value, **extra)
    return optax.GradientTransformationExtraArgs(tx.init, update)


def _uniopt_jax_polyak(ffi, fused):
    def build(data):
        contenders._import_jax()
        try:
            from uniopt.adapters.jax import update_and_apply  # noqa: F401
            from uniopt.adapters.jax.polyak import polyak_sgd
        except ImportError as exc:
            raise contenders.Unavailable(f"uniopt.adapters.jax.polyak_sgd not available ({exc})") \
                from exc
        value = _loss(data)
        return contenders._jax_step(lambda: _with_value(polyak_sgd(ffi=ffi), value), data,
                                    fused=fused)

    return build


def _optax_polyak_sgd(data):
    _, optax = contenders._import_jax()
    value = _loss(data)
    return contenders._jax_step(lambda: _with_value(optax.polyak_sgd(), value), data)


#: The contenders of the asv classes (the torch one comes from ``contenders.CASES``).
CASES = {"uniopt_jax_polyak_fused": _uniopt_jax_polyak(True, True),
         "uniopt_jax_polyak_traced": _uniopt_jax_polyak(False, False),
         "optax_polyak_sgd": _optax_polyak_sgd}


class _FFIStep(StepBenchmark):
    params = [SIZES, LAYOUTS]

    def setup(self, n, layout):
        data = contenders.Data.make(contenders.layout_sizes(n, layout))
        try:
            self.step = CASES[self.case](data)
        except contenders.Unavailable as exc:
            raise NotImplementedError(str(exc)) from exc


class UnioptPolyakFused(_FFIStep):
    """uniopt.adapters.jax.update_and_apply(polyak_sgd(ffi=True), ..., value=loss)."""

    case = "uniopt_jax_polyak_fused"


class UnioptPolyakTraced(_FFIStep):
    """uniopt.adapters.jax.polyak_sgd(ffi=False): update + apply_updates."""

    case = "uniopt_jax_polyak_traced"


class OptaxPolyakSGD(_FFIStep):
    """optax.polyak_sgd(): update + apply_updates."""

    case = "optax_polyak_sgd"


# ----------------------------------------------------------------------------------------------
# Script mode: the interleaved ratios
# ----------------------------------------------------------------------------------------------
#: name -> builder of every contender the script times (the fused step first).
SCRIPT_CASES = {**CASES, "uniopt_torch_polyak": contenders.CASES["uniopt_torch_polyak"]}
#: (label, numerator, denominator) of the printed ratios.
RATIOS = [("fused / traced", "uniopt_jax_polyak_fused", "uniopt_jax_polyak_traced"),
          ("fused / optax.polyak_sgd", "uniopt_jax_polyak_fused", "optax_polyak_sgd"),
          ("fused / torch PolyakSGD", "uniopt_jax_polyak_fused", "uniopt_torch_polyak"),
          ("traced / optax.polyak_sgd", "uniopt_jax_polyak_traced", "optax_polyak_sgd")]
#: bytes each contender moves per float32 parameter (reads + writes; see the module docs)
BYTES_PER_PARAM = {"uniopt_jax_polyak_fused": 16, "uniopt_jax_polyak_traced": 16,
                   "optax_polyak_sgd": 16, "uniopt_torch_polyak": 16}


def measure(n: int, repeat: int, min_time: float, layout: str = "model") -> dict:
    """Median ms per step of every script contender and the median paired ratios at size ``n``."""
    data = contenders.Data.make(contenders.layout_sizes(n, layout))
    steps = {name: build(data) for name, build in SCRIPT_CASES.items()}
    samples, numbers = contenders.interleave(steps, repeat, min_time)
    del steps
    return {"n": n, "layout": layout, "repeat": repeat, "numbers": numbers,
            "ms": {k: 1e3 * statistics.median(v) for k, v in samples.items()},
            "ratios": {label: contenders._median_ratio(samples[a], samples[b])
                       for label, a, b in RATIOS}}


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--layout", default="model", choices=LAYOUTS)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--min-time", type=float, default=0.02)
    parser.add_argument("--json", action="store_true", help="one JSON line per size")
    parser.add_argument("--no-donate", action="store_true",
                        help="jit the JAX steps without donating params and state")
    args = parser.parse_args(argv)
    contenders.JAX_DONATE = not args.no_donate
    for n in args.sizes:
        result = measure(n, args.repeat, args.min_time, args.layout)
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        gbs = {k: BYTES_PER_PARAM[k] * n / (v * 1e-3) / 1e9 for k, v in result["ms"].items()}
        print(f"n={n:.0e} ({args.layout}, {args.repeat} repeats"
              f"{', not donated' if args.no_donate else ''}): "
              + ", ".join(f"{k} {v:.3f} ms ({gbs[k]:.1f} GB/s at {BYTES_PER_PARAM[k]} B/param)"
                          for k, v in result["ms"].items()), flush=True)
        for label, value in result["ratios"].items():
            print(f"    {label}: {value:.3f}", flush=True)


if __name__ == "__main__":
    main()
