"""uniopt's JAX face: optax gradient transformations (``scale_by_*`` blocks and recipes) and
jaxopt-style solvers (:class:`PolyakSGD`), iALM's functional dual optimizer (:func:`ialm`),
constrained learning with Lagrange multipliers in functional form (:mod:`.constrained`), and
the bilevel lower-level ``Dynamic`` unrolled with ``lax.scan`` (:mod:`.bilevel`).

This package imports jax and optax; ``import uniopt`` never does.

Example:
  >>> import optax
  >>> from uniopt.adapters.jax import qhadam
  >>> solver = optax.chain(optax.clip_by_global_norm(1.0), qhadam(1e-3, nus=(0.7, 1.0)))
"""

from . import bilevel, constrained
from ._faults import NonFiniteState
from ._ffi import flatten, update_and_apply
from .ialm import IALMState, IALMTransformation, ialm
from .polyak import (
    OptStep,
    PolyakSGD,
    PolyakSGDSkipState,
    PolyakSGDState,
    ScaleByPolyakState,
    polyak_sgd,
    scale_by_polyak,
)
from .qh import (
    ScaleByQHAdamState,
    ScaleByQHMState,
    qhadam,
    qhadamw,
    qhm,
    scale_by_qhadam,
    scale_by_qhm,
)

__all__ = [
    "ScaleByQHMState",
    "ScaleByQHAdamState",
    "scale_by_qhm",
    "scale_by_qhadam",
    "qhm",
    "qhadam",
    "qhadamw",
    "update_and_apply",
    "flatten",
    "OptStep",
    "PolyakSGD",
    "PolyakSGDState",
    "PolyakSGDSkipState",
    "NonFiniteState",
    "ScaleByPolyakState",
    "scale_by_polyak",
    "polyak_sgd",
    "IALMState",
    "IALMTransformation",
    "ialm",
    "constrained",
    "bilevel",
]
