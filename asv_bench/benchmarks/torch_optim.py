"""uniopt's torch QHAdam/QHM against qhoptim and torch.optim (float32, one torch thread).

Every class times one ``optimizer.step()`` over SIZES x LAYOUTS (one tensor, or 100 mixed-size
tensors) with gradients already in ``.grad``.
"""

from .common import StepBenchmark


class UnioptQHAdam(StepBenchmark):
    """uniopt.adapters.torch.QHAdam, nus=(0.7, 1.0)."""

    case = "uniopt_torch_qhadam"


class TorchAdamFused(StepBenchmark):
    """torch.optim.Adam(fused=True)."""

    case = "torch_adam_fused"


class TorchAdamForeach(StepBenchmark):
    """torch.optim.Adam(foreach=True)."""

    case = "torch_adam_foreach"


class QhoptimQHAdam(StepBenchmark):
    """qhoptim.pyt.QHAdam, nus=(0.7, 1.0)."""

    case = "qhoptim_qhadam"


class UnioptQHM(StepBenchmark):
    """uniopt.adapters.torch.QHM, momentum=0.9, nu=0.7."""

    case = "uniopt_torch_qhm"


class QhoptimQHM(StepBenchmark):
    """qhoptim.pyt.QHM, momentum=0.9, nu=0.7."""

    case = "qhoptim_qhm"


class TorchSGDMomentum(StepBenchmark):
    """torch.optim.SGD(momentum=0.9, foreach=True)."""

    case = "torch_sgd_momentum"
