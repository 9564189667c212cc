"""The ``nonfinite`` policy of the JAX face (docs/faults.md), for optax transforms and solvers.

* ``"propagate"``: the transform or solver is returned as it is (its state gains nothing);
* ``"raise"``: the inputs are checked before the update; a non-finite value raises
  ``FloatingPointError`` naming the first leaf. The check needs concrete values: under
  ``jit``/``vmap``/``grad`` (traced inputs) it raises ``TypeError`` at trace time instead --
  use ``"skip"`` under ``jit``, or check the values yourself (e.g. ``jax.experimental.checkify``).
  The state's structure is the inner transform's;
* ``"skip"``: traced (works under ``jit``): when the inputs are not all finite the update is
  ``-0.0`` in every entry (``optax.apply_updates`` then returns the parameters bitwise, signed
  zeros included) and the inner state is kept; :class:`NonFiniteState` wraps the inner state
  and counts the skipped updates in an int32 ``nonfinite_skips``. As
  ``optax.apply_if_finite``, without its ``max_consecutive_errors`` (a skip never becomes an
  update).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from uniopt._validation import check_nonfinite, nonfinite_error

__all__ = ["NonFiniteState", "agreed", "all_finite", "first_nonfinite", "is_traced", "with_nonfinite",
           "nonfinite_raise", "select"]


class NonFiniteState(NamedTuple):
    """State of a transform with ``nonfinite="skip"``: the inner transform's state and the
    number of updates skipped for non-finite inputs (int32 scalar)."""

    inner_state: Any
    nonfinite_skips: Any


def _leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if x is not None]


def all_finite(*trees):
    """A boolean scalar (traced under ``jit``): every inexact entry of every tree is finite."""
    flags = [jnp.all(jnp.isfinite(x)) for tree in trees for x in _leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def is_traced(*trees) -> bool:
    """Whether any leaf is a JAX tracer (no concrete value)."""
    return any(isinstance(x, jax.core.Tracer) for tree in trees for x in _leaves(tree))


def first_nonfinite(named: dict) -> str:
    """The first non-finite leaf of ``named`` (``{"the gradient": tree, ...}``), as a label."""
    for what, tree in named.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if x is not None and not bool(jnp.all(jnp.isfinite(x))):
                return f"{what}{jax.tree_util.keystr(path)}"
    return "the inputs"


def nonfinite_raise(name: str, named: dict) -> None:
    """The ``"raise"`` policy on concrete values: ``FloatingPointError`` naming the first
    non-finite leaf; ``TypeError`` when the values are traced (under ``jit``)."""
    if is_traced(*named.values()):
        raise TypeError(f"{name}: nonfinite='raise' needs concrete values, but the update is "
                        f"traced (jit/vmap/grad); use nonfinite='skip' under jit (traced), or "
                        f"check the values outside (docs/faults.md)")
    if not bool(all_finite(*named.values())):
        raise nonfinite_error(name, first_nonfinite(named))


def select(ok, new, old):
    """``new`` where ``ok`` (a boolean scalar), else ``old``, leaf by leaf (traced)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def agreed(ok, axis_name=None):
    """``ok`` (a boolean scalar), the same on every device of ``axis_name`` (all of them must
    be finite: ``lax.pmin``); ``ok`` itself without an axis."""
    if axis_name is None:
        return ok
    return jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0


def with_nonfinite(tx, nonfinite: str, name: str, extra_names: tuple = (), axis_name=None):
    """``tx`` under the ``nonfinite`` policy (the module docstring).

    Args:
      tx: an optax ``GradientTransformation`` or ``GradientTransformationExtraArgs``.
      nonfinite: ``"propagate"``, ``"raise"`` or ``"skip"`` (anything else: ValueError).
      name: the transform's name in messages.
      extra_names: extra keyword arguments of ``update`` checked with the updates (Polyak's
        ``value``).
      axis_name: the ``shard_map``/``pmap`` axis of data parallelism, if any: every device
        then skips when any one of them sees a non-finite value (:func:`agreed`).
    """
    check_nonfinite(nonfinite)
    if nonfinite == "propagate":
        return tx
    tx = optax.with_extra_args_support(tx)
    inner_update = tx.update

    def inputs(updates, extra_args):
        named = {"the updates": updates}
        named.update({f"the {k}": extra_args[k] for k in extra_names if k in extra_args})
        return named

    if nonfinite == "raise":
        def update_fn(updates, state, params=None, **extra_args):
            nonfinite_raise(name, inputs(updates, extra_args))
            return inner_update(updates, state, params, **extra_args)

        return optax.GradientTransformationExtraArgs(tx.init, update_fn)

    def init_fn(params):
        return NonFiniteState(tx.init(params), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        ok = agreed(all_finite(*inputs(updates, extra_args).values()), axis_name)
        new_updates, new_inner = inner_update(updates, state.inner_state, params, **extra_args)
        skipped = jax.tree.map(lambda u: jnp.full_like(u, -0.0), new_updates)
        return (select(ok, new_updates, skipped),
                NonFiniteState(select(ok, new_inner, state.inner_state),
                               state.nonfinite_skips + jnp.where(ok, 0, 1).astype(jnp.int32)))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
