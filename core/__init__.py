"""uniopt: research optimizers, one numerical definition per update rule, every framework.

The core package needs only NumPy, SciPy and Numba; it never imports torch or JAX. The
framework faces live in :mod:`uniopt.adapters.torch` and :mod:`uniopt.adapters.jax`.
"""

from . import checkpoint, constrained, unroll
from .ialm import iALM
from ._minimize import minimize, minimize_polyak, minimize_qhadam, minimize_qhm
from .polyak import OptStep, PolyakSGD, PolyakSGDState
from .qh import QHM, QHAdam, QHAdamW

__version__ = "0.1.0"

__all__ = [
    "QHM", "QHAdam", "QHAdamW", "checkpoint", "constrained", "iALM", "PolyakSGD", "PolyakSGDState", "OptStep",
    "minimize", "minimize_qhm", "minimize_qhadam", "minimize_polyak", "unroll", "__version__",
]
