"""Cooper's optimizers for constrained learning: ``uniopt.adapters.torch.constrained.optim``.

The names of ``cooper.optim`` (cooper-optim 1.0.1): the constrained optimizers (simultaneous,
alternating, extrapolation), :class:`UnconstrainedOptimizer`, their base
:class:`CooperOptimizer` with :class:`CooperOptimizerState` and :class:`RollOut`, and the
extragradient torch optimizers :class:`ExtraSGD` and :class:`ExtraAdam`, and the PI-controller
optimizer :class:`nuPI` (kernel paths through the shared dispatcher). Any
:class:`torch.optim.Optimizer` works on either side (uniopt's ``QHM``/``QHAdam`` included; on
the dual side with ``maximize=True``).
"""

from .constrained_optimizers import (
    AlternatingDualPrimalOptimizer,
    AlternatingPrimalDualOptimizer,
    ConstrainedOptimizer,
    ExtrapolationConstrainedOptimizer,
    SimultaneousOptimizer,
)
from .extragradient import ExtraAdam, ExtragradientOptimizer, ExtraSGD
from .optimizer import CooperOptimizer, CooperOptimizerState, RollOut
from .torch_optimizers import nuPI, nuPIInitType
from .unconstrained_optimizer import UnconstrainedOptimizer

__all__ = [
    "AlternatingDualPrimalOptimizer",
    "AlternatingPrimalDualOptimizer",
    "ConstrainedOptimizer",
    "CooperOptimizer",
    "CooperOptimizerState",
    "ExtraAdam",
    "ExtraSGD",
    "ExtragradientOptimizer",
    "ExtrapolationConstrainedOptimizer",
    "RollOut",
    "SimultaneousOptimizer",
    "UnconstrainedOptimizer",
    "nuPI",
    "nuPIInitType",
]
