"""uniopt's JAX qhadam through XLA's FFI (the Numba kernel inside ``jax.jit``) against its traced
path, optax.adam and uniopt's torch QHAdam (kernel path).

Each contender is the same jitted ``update + apply_updates`` with donated params and state as in
:mod:`.jax_optax` (one XLA thread: the process is pinned to one CPU by ``common``); only the
path differs: ``qhadam(..., ffi=True)`` runs one FFI call per step for all leaves,
``ffi=False`` the ``jax.numpy`` expression XLA compiles. ``track_handler_compile`` is the cost
of compiling both handlers in a fresh process with the on-disk cache off.
"""

import os
import subprocess
import sys

from . import contenders
from .common import LAYOUTS, SIZES, StepBenchmark


def _uniopt_jax_qhadam(ffi):
    def build(data):
        contenders._import_jax()
        try:
            from uniopt.adapters.jax import qhadam
        except ImportError as exc:
            raise contenders.Unavailable(f"uniopt.adapters.jax.qhadam not available ({exc})") from exc
        kw = dict(contenders.QHADAM)
        lr = kw.pop("lr")
        return contenders._jax_step(lambda: qhadam(lr, ffi=ffi, **kw), data)

    return build


#: The FFI benchmark's contenders (the others come from ``contenders.CASES``).
CASES = {"uniopt_jax_qhadam_ffi": _uniopt_jax_qhadam(True),
         "uniopt_jax_qhadam_traced": _uniopt_jax_qhadam(False)}


class _FFIStep(StepBenchmark):
    params = [SIZES, LAYOUTS]

    def setup(self, n, layout):
        data = contenders.Data.make(contenders.layout_sizes(n, layout))
        try:
            self.step = CASES[self.case](data)
        except contenders.Unavailable as exc:
            raise NotImplementedError(str(exc)) from exc


class UnioptQHAdamFFI(_FFIStep):
    """uniopt.adapters.jax.qhadam(ffi=True), nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam_ffi"


class UnioptQHAdamTraced(_FFIStep):
    """uniopt.adapters.jax.qhadam(ffi=False), nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam_traced"


class HandlerCompile:
    """Seconds to compile the QHM and QHAdam FFI handlers (cache off) in a fresh process."""

    timeout = 300
    number = 1
    repeat = 1

    def track_handler_compile(self):
        code = ("import time; from uniopt.kernels import qh_ffi; t = time.perf_counter(); "
                "qh_ffi.qhadam_handler(); qh_ffi.qhm_handler(); print(time.perf_counter() - t)")
        env = dict(os.environ, UNIOPT_NUMBA_CACHE="0")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    track_handler_compile.unit = "seconds"
