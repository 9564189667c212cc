"""The core table kernels, and how close they come to the memory-bandwidth limit.

``time_step`` benchmarks call the kernels directly on pointer tables (no optimizer object).
``Bandwidth`` reports, at 1e7 parameters, the QHAdam kernel's achieved GB/s (28 bytes per
parameter per step: reads p, g, m, v; writes p, m, v), the GB/s of a kernel with the same memory
traffic and trivial arithmetic over the same kind of table (the ceiling on this machine), and
their ratio; the two kernels are measured interleaved, in one process.
"""

from . import contenders

from .common import BANDWIDTH_SIZE, LAYOUTS, StepBenchmark, build


class QHAdamTable(StepBenchmark):
    """uniopt.kernels.qh_cpu.qhadam_table_."""

    case = "kernel_qhadam"


class QHMTable(StepBenchmark):
    """uniopt.kernels.qh_cpu.qhm_table_."""

    case = "kernel_qhm"


class StreamTable(StepBenchmark):
    """uniopt.kernels.bandwidth.stream_table_: QHAdam's memory traffic, trivial arithmetic."""

    case = "stream"


class Bandwidth:
    """Achieved bandwidth at 1e7 float32 parameters (GB/s, higher is better).

    ``setup_cache`` measures once, in one process, both kernels of both layouts interleaved;
    the ``track_`` methods report from that one measurement.
    """

    params = [LAYOUTS]
    param_names = ["layout"]
    timeout = 600

    def setup_cache(self):
        seconds = {}
        for layout in LAYOUTS:
            steps = {name: build(name, BANDWIDTH_SIZE, layout) for name in ("kernel_qhadam", "stream")}
            seconds[layout] = contenders.medians(steps, repeat=7, min_time=0.05)
            del steps
        return seconds

    @staticmethod
    def _gbps(seconds):
        return contenders.BYTES_PER_PARAM * BANDWIDTH_SIZE / seconds / 1e9

    def track_kernel_gbps(self, seconds, layout):
        return self._gbps(seconds[layout]["kernel_qhadam"])

    track_kernel_gbps.unit = "GB/s"

    def track_stream_gbps(self, seconds, layout):
        return self._gbps(seconds[layout]["stream"])

    track_stream_gbps.unit = "GB/s"

    def track_kernel_fraction_of_stream(self, seconds, layout):
        return seconds[layout]["stream"] / seconds[layout]["kernel_qhadam"]

    track_kernel_fraction_of_stream.unit = "fraction"
