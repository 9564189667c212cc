"""uniopt's JAX qhadam through XLA's FFI (the Numba kernel inside ``jax.jit``) against its traced
path, optax.adam and uniopt's torch QHAdam (kernel path).

Each contender is one jitted step with donated params and state as in :mod:`.jax_optax` (one XLA
thread: the process is pinned to one CPU by ``common``); only the path differs:

* ``uniopt_jax_qhadam_fused``: ``update_and_apply(qhadam(..., ffi=True), ...)``, one fused FFI
  call per step for all leaves, parameters and state updated in place (28 B/param);
* ``uniopt_jax_qhadam_packed``: ``update_and_apply(flatten(qhadam(..., ffi=True)), ...)``, the
  fused call over packed state (``optax.flatten``'s layout: 2 state buffers, not 200);
* ``uniopt_jax_qhadam_ffi``: ``update`` + ``apply_updates`` with ``ffi=True`` (the update-only
  call writes the updates, XLA reads them back: 44-48 B/param);
* ``uniopt_jax_qhadam_traced``: ``ffi=False``, the ``jax.numpy`` expression XLA compiles;
* ``jax_floor``: the floor of any jitted step over the packed step's buffers: the 28 B/param
  sweep at stream speed, then a jitted call over the same donated params and state and the same
  gradients that computes nothing (JAX's own cost per call, with the caches the sweep left).

``track_handler_compile`` is the cost of compiling the handlers in a fresh process with the
on-disk cache off.

Script mode (the interleaved ratios of docs/performance.md), from ``asv_bench/``::

    python -m benchmarks.jax_ffi --sizes 1e4,1e6,1e7 --repeat 31

prints, per size (100 tensors, float32, one pinned CPU), the median over interleaved repeats of
fused/optax.adam, fused/torch QHAdam (kernel path) and the other paths' ratios. ``--layout one``
times one tensor; ``--no-donate`` jits the JAX steps without donation.
"""

import os
import subprocess
import sys

from . import contenders
from .common import StepBenchmark


#: The FFI benchmark's contenders (the others come from ``contenders.CASES``).
CASES = {"uniopt_jax_qhadam_fused": contenders.CASES["uniopt_jax_qhadam_fused"],
         "uniopt_jax_qhadam_packed": contenders.CASES["uniopt_jax_qhadam_packed"],
         "uniopt_jax_qhadam_ffi": contenders._uniopt_jax_qhadam_builder(ffi=True),
         "uniopt_jax_qhadam_traced": contenders._uniopt_jax_qhadam_builder(ffi=False),
         "jax_floor": contenders._build_jax_floor}


class _FFIStep(StepBenchmark):
    cases = CASES


class UnioptQHAdamFused(_FFIStep):
    """uniopt.adapters.jax.update_and_apply(qhadam(ffi=True), ...), nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam_fused"


class UnioptQHAdamPacked(_FFIStep):
    """uniopt.adapters.jax.update_and_apply(flatten(qhadam(ffi=True)), ...), nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam_packed"


class UnioptQHAdamFFI(_FFIStep):
    """uniopt.adapters.jax.qhadam(ffi=True), nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam_ffi"


class UnioptQHAdamTraced(_FFIStep):
    """uniopt.adapters.jax.qhadam(ffi=False), nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam_traced"


class JAXFloor(_FFIStep):
    """The stream sweep then a jitted call that computes nothing over the packed step's
    buffers."""

    case = "jax_floor"


class HandlerCompile:
    """Seconds to compile the QHM and QHAdam FFI handlers, update and fused (cache off), in a
    fresh process."""

    timeout = 300
    number = 1
    repeat = 1

    def track_handler_compile(self):
        code = ("import time; from uniopt.kernels import qh_ffi; t = time.perf_counter(); "
                "qh_ffi.qhadam_handler(); qh_ffi.qhm_handler(); qh_ffi.qhadam_apply_handler(); "
                "qh_ffi.qhm_apply_handler(); print(time.perf_counter() - t)")
        env = dict(os.environ, UNIOPT_NUMBA_CACHE="0")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    track_handler_compile.unit = "seconds"


# ----------------------------------------------------------------------------------------------
# Script mode: the interleaved ratios
# ----------------------------------------------------------------------------------------------
#: name -> builder of every contender the script times (the fused step first).
SCRIPT_CASES = {**CASES, "optax_adam": contenders.CASES["optax_adam"],
                "uniopt_torch_qhadam": contenders.CASES["uniopt_torch_qhadam"],
                "stream": contenders.CASES["stream"]}
#: (label, numerator, denominator) of the printed ratios.
RATIOS = [("fused / optax.adam", "uniopt_jax_qhadam_fused", "optax_adam"),
          ("fused / torch QHAdam", "uniopt_jax_qhadam_fused", "uniopt_torch_qhadam"),
          ("packed / optax.adam", "uniopt_jax_qhadam_packed", "optax_adam"),
          ("packed / torch QHAdam", "uniopt_jax_qhadam_packed", "uniopt_torch_qhadam"),
          ("stream / optax.adam", "stream", "optax_adam"),
          ("JAX floor / optax.adam", "jax_floor", "optax_adam"),
          ("packed / JAX floor", "uniopt_jax_qhadam_packed", "jax_floor"),
          ("fused / traced", "uniopt_jax_qhadam_fused", "uniopt_jax_qhadam_traced"),
          ("update FFI / optax.adam", "uniopt_jax_qhadam_ffi", "optax_adam"),
          ("traced / optax.adam", "uniopt_jax_qhadam_traced", "optax_adam")]


def measure(n: int, repeat: int, min_time: float, layout: str = "model") -> dict:
    """Median ms per step of every script contender and the median paired ratios at size ``n``."""
    return contenders.measure_ratios(SCRIPT_CASES, RATIOS, n, repeat, min_time, layout)


def main(argv=None) -> None:
    contenders.ratio_script(argv, __doc__.split("\n")[0], SCRIPT_CASES, RATIOS, repeat=31)


if __name__ == "__main__":
    main()
