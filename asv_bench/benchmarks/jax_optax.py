"""uniopt's JAX qhadam against optax.adam: ``jax.jit`` with donated params and state, one
XLA thread (the process is pinned to one CPU, see ``common``).

The timed call runs one jitted update + apply_updates and blocks until params and state are
ready.
"""

from .common import StepBenchmark


class UnioptQHAdam(StepBenchmark):
    """uniopt.adapters.jax.qhadam, nus=(0.7, 1.0)."""

    case = "uniopt_jax_qhadam"


class OptaxAdam(StepBenchmark):
    """optax.adam."""

    case = "optax_adam"
