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


from . import contenders
from .common import StepBenchmark


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
    cases = CASES


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
    return contenders.measure_ratios(SCRIPT_CASES, RATIOS, n, repeat, min_time, layout)


def main(argv=None) -> None:
    contenders.ratio_script(argv, __doc__.split("\n")[0], SCRIPT_CASES, RATIOS, repeat=11,
                            bytes_per_param=BYTES_PER_PARAM)


if __name__ == "__main__":
    main()
