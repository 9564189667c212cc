"""Start-up costs, each measured in fresh Python processes (seconds, lower is better).

* ``track_import_uniopt``: ``import uniopt`` (median of 3 interpreters; interpreter start-up
  excluded).
* ``FirstStep``: building a QHAdam over 1e5 parameters (100 tensors) and taking its first step,
  with the on-disk numba cache warm: the script runs twice, the first run fills the cache.
* ``Compile``: the first call of each table kernel with uniopt's on-disk cache off
  (``UNIOPT_NUMBA_CACHE=0``), after numba's own one-off start-up (``track_numba_first_jit``).
"""

from . import contenders

from .common import build


def track_import_uniopt():
    return contenders.import_time(repeat=3)


track_import_uniopt.unit = "seconds"
track_import_uniopt.timeout = 120


class FirstStep:
    params = [["torch", "numpy"]]
    param_names = ["backend"]
    timeout = 300

    def setup(self, backend):
        if backend == "torch":
            build("uniopt_torch_qhadam", 0, "tiny")  # NotImplementedError without the adapter

    def track_first_step(self, backend):
        return contenders.first_step_time(backend)["first_step"]

    track_first_step.unit = "seconds"


class Compile:
    timeout = 300

    def setup_cache(self):
        return contenders.compile_times()

    def track_qhadam_table(self, times):
        return times["kernel_qhadam"]

    track_qhadam_table.unit = "seconds"

    def track_qhm_table(self, times):
        return times["kernel_qhm"]

    track_qhm_table.unit = "seconds"

    def track_numba_first_jit(self, times):
        return times["numba_first_jit"]

    track_numba_first_jit.unit = "seconds"
