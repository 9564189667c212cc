"""uniopt's NumPy optimizers (``uniopt.QHAdam``, ``uniopt.QHM``): ``opt.step(grads)``."""

from .common import StepBenchmark


class QHAdam(StepBenchmark):
    """uniopt.QHAdam on float32 arrays, nus=(0.7, 1.0)."""

    case = "uniopt_numpy_qhadam"


class QHM(StepBenchmark):
    """uniopt.QHM on float32 arrays, momentum=0.9, nu=0.7."""

    case = "uniopt_numpy_qhm"
