"""The Numba kernels inside ``jax.jit`` on CPU, through XLA's FFI: registration, calls, path choice.

The handlers are ``numba.cfunc`` C callbacks of :mod:`uniopt.kernels.qh_ffi`,
:mod:`uniopt.kernels.polyak_ffi` and :mod:`uniopt.kernels.ialm_ffi` (table :data:`_TARGETS`);
this module registers them with :func:`jax.ffi.register_ffi_target` (platform ``"cpu"``, typed FFI
``api_version=1``) the first time a transform takes the FFI path, never at import, and emits
one :func:`jax.ffi.ffi_call` per dtype per step for every leaf of the pytree: the optimizer
state is aliased to the results (``input_output_aliases``), so with donated state XLA updates
it in place, without copies and without Python in the step.

Path choice (:func:`choose`): ``ffi=True`` forces the FFI call, ``ffi=False`` the traced
(``jax.numpy``) path; ``ffi=None`` (the default) takes the FFI path only where it applies and
pays: under ``jit`` (every input an abstract value of a ``jit`` trace: not under ``grad``,
``jvp``, ``vmap``, nor eagerly), with ``jax.default_backend() == "cpu"``, float32/float64
leaves whose state has their dtype, and at least :data:`MIN_SIZE` elements in all (default:
never, see :data:`MIN_SIZE`). A jitted
update that is differentiated or batched from outside (``jax.grad(jax.jit(step))``) still
works: the FFI call sits inside a :func:`jax.custom_jvp` whose derivative is the traced
path's, and its ``vmap_method`` loops over the batch.

The fused entry point :func:`update_and_apply` (``uniopt.adapters.jax.update_and_apply``)
replaces ``tx.update`` + ``optax.apply_updates``: one call per dtype per step updates the
parameters and the state in place (:func:`uniopt.kernels.qh_ffi.qhadam_apply_handler`; for
:func:`~uniopt.adapters.jax.polyak_sgd`, :func:`uniopt.kernels.polyak_ffi.polyak_apply_handler`).
The same rules choose its path, with :data:`APPLY_MIN_SIZE` (default 0) as the size threshold.
:func:`flatten` packs a QH transform's state (``optax.flatten``'s layout) for a fused call
with two state buffers instead of two per leaf. iALM's dual step calls its handler from
:mod:`uniopt.adapters.jax.ialm` with these same pieces.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import _jit

__all__ = ["MIN_SIZE", "APPLY_MIN_SIZE", "registered", "ensure_registered", "is_jit_value",
           "choose", "call", "update_and_apply", "flatten", "apply_pair", "schedule_value",
           "advanced", "with_traced_derivatives"]

#: Total element count of a step from which ``ffi=None`` takes the FFI path (environment:
#: ``UNIOPT_JAX_FFI_MIN_SIZE``, parsed as ``UNIOPT_PARALLEL_MIN_SIZE`` is). Default: never.
#: Measured on this project's machine (docs/performance notes in the closing report of issue
#: 12), the FFI path of an optax ``update`` lost to XLA's traced path at every size: optax
#: materialises the updates (written by the call, read again by ``apply_updates``) and the
#: call is a fusion barrier (the gradient is written out before it), 44-48 bytes per parameter
#: against the traced path's fused 28. So ``ffi=None`` keeps the traced path unless told.
MIN_SIZE = _jit._parse_min_size("UNIOPT_JAX_FFI_MIN_SIZE",
                                os.environ.get("UNIOPT_JAX_FFI_MIN_SIZE"))

#: Whether the updates are written over the gradients' buffers (``UNIOPT_JAX_FFI_ALIAS_GRADS``):
#: free when the gradients are computed in the same ``jit`` (no new buffer for the updates);
#: a copy of the gradients when they are an argument of the jitted function that is not donated.
ALIAS_GRADIENTS = os.environ.get("UNIOPT_JAX_FFI_ALIAS_GRADS", "1") != "0"

#: Total element count from which ``ffi=None`` runs :func:`update_and_apply` of a uniopt QH
#: transform through the fused FFI call (environment: ``UNIOPT_JAX_FFI_APPLY_MIN_SIZE``, parsed
#: as ``MIN_SIZE``; an empty value means never). Default 0: the fused call moves the floor's
#: 28 bytes per float32 parameter (QHAdam) and its fixed cost is below XLA's per-leaf one, so
#: with donated parameters and state it was faster than ``optax.adam`` at every size measured,
#: 1e2 to 1e7 (docs/performance.md, "JAX on CPU through XLA's FFI").
APPLY_MIN_SIZE = _jit._parse_min_size("UNIOPT_JAX_FFI_APPLY_MIN_SIZE",
                                      os.environ.get("UNIOPT_JAX_FFI_APPLY_MIN_SIZE", "0"))

#: family -> (XLA target name, kernel module under ``uniopt.kernels``, handler factory name).
_TARGETS = {
    "qhadam": ("uniopt_qhadam", "qh_ffi", "qhadam_handler"),
    "qhm": ("uniopt_qhm", "qh_ffi", "qhm_handler"),
    "qhadam_apply": ("uniopt_qhadam_apply", "qh_ffi", "qhadam_apply_handler"),
    "qhm_apply": ("uniopt_qhm_apply", "qh_ffi", "qhm_apply_handler"),
    "qhadam_apply_packed": ("uniopt_qhadam_apply_packed", "qh_ffi", "qhadam_apply_packed_handler"),
    "qhm_apply_packed": ("uniopt_qhm_apply_packed", "qh_ffi", "qhm_apply_packed_handler"),
    "polyak_apply": ("uniopt_polyak_apply", "polyak_ffi", "polyak_apply_handler"),
    "ialm": ("uniopt_ialm", "ialm_ffi", "ialm_handler"),
}
_registered: set[str] = set()
_SUPPORTED = (np.dtype(np.float32), np.dtype(np.float64))


def registered() -> frozenset:
    """The families whose FFI target this process has registered so far."""
    return frozenset(_registered)


def ensure_registered(family: str) -> str:
    """Compile (or load from the cache) ``family``'s handler and register it once; its name."""
    name, module, factory = _TARGETS[family]
    if family not in _registered:
        import importlib

        handler = getattr(importlib.import_module(f"uniopt.kernels.{module}"), factory)()
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.ctypes), platform="cpu",
                                    api_version=1)
        _registered.add(family)
    return name


def _jaxpr_tracer_type():
    try:
        from jax._src.interpreters.partial_eval import DynamicJaxprTracer
    except ImportError:  # pragma: no cover - jax moved it: never choose the FFI path by itself
        return None
    return DynamicJaxprTracer


_JIT_TRACER = _jaxpr_tracer_type()


def is_jit_value(x) -> bool:
    """Whether ``x`` is a value of a ``jit`` trace (not a grad/vmap tracer, not concrete)."""
    return _JIT_TRACER is not None and type(x) is _JIT_TRACER


def _all_jit_or_static(values) -> bool:
    """Every array is a jit tracer and at least one is (Python numbers may be static)."""
    seen = False
    for x in values:
        if isinstance(x, jax.core.Tracer):
            if not is_jit_value(x):
                return False
            seen = True
        elif isinstance(x, jax.Array):
            return False  # a concrete array: an eager call
    return seen


def check_flag(ffi) -> None:
    """The ``ffi`` argument of a transform: None, True or False (by identity: ``1 == True``
    and ``0.0 == False`` are not flags), else ``TypeError`` naming the value."""
    if not (ffi is None or ffi is True or ffi is False):
        raise TypeError(f"Invalid ffi: {ffi!r} (expected None, True or False)")


def supported_dtype(dtype) -> bool:
    return np.dtype(dtype) in _SUPPORTED


def choose(ffi: bool | None, leaves: Sequence, states: Sequence[Sequence], scalars: Sequence,
           min_size: int | None = None) -> bool:
    """Whether this step runs through the FFI call.

    Args:
      ffi: the transform's ``ffi`` argument (True/False force; None chooses).
      leaves: the gradient leaves (and parameter leaves where the rule reads them).
      states: per gradient leaf, its state leaves (and, for the fused step, its parameter):
        a shape other than the gradient's takes the traced path, even with ``ffi=True``.
      scalars: every other input of the step (hyper-parameters, counts, bias weights).
      min_size: the element count from which ``ffi=None`` chooses the call (default
        :data:`MIN_SIZE`).

    Raises:
      TypeError: ``ffi=True`` with a leaf whose dtype is neither float32 nor float64, or with
        state of another dtype than its gradient.
    """
    if ffi is False:
        return False
    if any(jnp.shape(s) != jnp.shape(g) for g, group in zip(leaves, states) for s in group):
        return False  # not the handlers' layout: the traced path (broadcasts as optax does)
    dtypes_ok = all(supported_dtype(jnp.result_type(x)) for x in leaves) and all(
        jnp.result_type(s) == jnp.result_type(g) for g, group in zip(leaves, states)
        for s in group)
    if ffi:
        if not dtypes_ok:
            bad = sorted({str(jnp.result_type(x)) for x in leaves if not supported_dtype(
                jnp.result_type(x))}) or ["state dtype differs from its gradient's"]
            raise TypeError(f"Invalid ffi=True: the FFI path runs float32/float64 leaves "
                            f"whose state has their dtype, got {', '.join(bad)}")
        return True
    if not dtypes_ok or jax.default_backend() != "cpu":
        return False
    if sum(int(np.prod(jnp.shape(x))) for x in leaves) < (MIN_SIZE if min_size is None
                                                           else min_size):
        return False
    everything = [*leaves, *(s for group in states for s in group), *scalars]
    return _all_jit_or_static([x for x in everything if x is not None])


def call(family: str, hyper: jax.Array, grads: list, params: list | None,
         states: list[list], apply: bool = False, packed: bool = False
         ) -> tuple[list, list[list], list]:
    """One FFI call for leaves of one dtype: ``(updates, new_states, extra_results)``.

    Args:
      family: ``"qhadam"`` or ``"qhm"``.
      hyper: the step's scalars (see :mod:`uniopt.kernels.qh_ffi`).
      grads: gradient leaves; params: parameter leaves (decay modes, or ``apply``) or None.
      states: the state leaves, one list per state field (QHAdam: ``[exp_avg, exp_avg_sq]``);
        ``packed``: one flat buffer per field (``[[exp_avg], [exp_avg_sq]]``).
      apply: the fused variant: the parameters are updated in place (aliased to the first
        results) and returned instead of the updates.
      packed: the fused variant over packed state (implies ``apply``).

    Returns:
      The updates (``apply``: the new parameters), the new state leaves (per field) and, for
      QHAdam, ``[weights]``: the two new bias weights in ``hyper``'s dtype.
    """
    apply = apply or packed
    name = ensure_registered(family + ("_apply_packed" if packed else "_apply" if apply else ""))
    n = len(grads)
    per_field = 1 if packed else n
    args = [hyper, *grads, *(params or []), *(s for field in states for s in field)]
    first_state = 1 + n * (2 if params else 1)
    results = [jax.ShapeDtypeStruct(jnp.shape(g), jnp.result_type(g)) for g in grads]
    results += [jax.ShapeDtypeStruct(jnp.shape(s), jnp.result_type(s))
                for field in states for s in field]
    if family == "qhadam":
        results.append(jax.ShapeDtypeStruct((2,), jnp.result_type(hyper)))
    aliases = {first_state + k: n + k for k in range(per_field * len(states))}
    if apply:
        aliases.update({1 + n + k: k for k in range(n)})
    elif ALIAS_GRADIENTS:
        aliases.update({1 + k: k for k in range(n)})
    out = jax.ffi.ffi_call(name, results, input_output_aliases=aliases,
                           vmap_method="sequential")(*args)
    end = n + per_field * len(states)
    return (list(out[:n]), [list(out[n + k * per_field:n + (k + 1) * per_field])
                            for k in range(len(states))], list(out[end:]))


def update_and_apply(tx, grads, state, params, **extra_args):
    """One optimizer step that returns the new parameters: ``tx.update`` then ``apply_updates``.

    For a uniopt QH transform (:func:`~uniopt.adapters.jax.qhm`,
    :func:`~uniopt.adapters.jax.qhadam`, :func:`~uniopt.adapters.jax.qhadamw`, as returned, not
    wrapped) whose step takes the FFI
    path, the step is ONE call per dtype of a fused Numba kernel that updates the parameters
    and the state in place (``input_output_aliases``): it reads the gradients, parameters and
    state and writes the parameters and state, 28 bytes per float32 parameter for QHAdam (20
    for QHM), where ``tx.update`` + :func:`optax.apply_updates` through the FFI also write and
    read back the updates (44-48). Under ``jax.jit(step, donate_argnums=...)`` with the
    parameters and state donated, XLA writes them where they were: no copies. Donate them:
    without donation XLA copies the parameters and state before the call (the inputs must
    survive), 24 more bytes per parameter, and the fused step then loses to the traced one from
    about 1e6 parameters. The path is chosen as the transform's ``ffi`` argument says, except
    that ``ffi=None`` takes the fused call from :data:`APPLY_MIN_SIZE` elements (default 0:
    always under ``jit`` on CPU; the update-only path's threshold is never).

    Everything else takes ``tx.update(grads, state, params, **extra_args)`` then
    ``optax.apply_updates(params, updates)``, with the same numbers: other transforms
    (optax's, :func:`optax.chain`, :func:`optax.inject_hyperparams`, :class:`optax.MultiSteps`,
    a ``nonfinite`` policy other than ``"propagate"``), and a uniopt transform on its traced
    path (``ffi=False``, under ``jax.grad``/``jax.vmap`` tracing, eagerly, off CPU, other
    dtypes, parameters of another dtype than their gradients). The fused step equals the pair
    bit for bit: ``p + u`` is rounded once, as ``apply_updates`` rounds it. With many leaves,
    wrap the transform in :func:`flatten`: its state is packed into one buffer per field and
    its fused call skips JAX's and XLA's fixed cost per state buffer of a jitted call.

    Args:
      tx: an optax ``GradientTransformation``.
      grads: the gradients (a pytree like ``params``).
      state: ``tx``'s state.
      params: the parameters (required).
      **extra_args: passed to ``tx.update``.

    Returns:
      ``(new_params, new_state)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from uniopt.adapters.jax import qhadam, update_and_apply
      >>> tx = qhadam(0.1, nus=(0.7, 1.0))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> step = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p), donate_argnums=(1, 2))
      >>> state = tx.init(params)
      >>> for _ in range(300):
      ...     params, state = step({"w": 2 * params["w"]}, state, params)
      >>> bool(jnp.abs(params["w"]).max() < 1e-2)
      True
    """
    fused = getattr(tx.update, "update_and_apply", None)
    if fused is not None:
        return fused(grads, state, params, **extra_args)
    return apply_pair(tx.update, grads, state, params, **extra_args)


def flatten(inner) -> optax.GradientTransformationExtraArgs:
    """:func:`optax.flatten` (the state of ``inner`` over all parameters as one flat vector)
    whose :func:`update_and_apply` keeps the gradients and parameters as separate leaves.

    ``init`` and ``update`` are :func:`optax.flatten`'s: the state is ``inner``'s state of the
    concatenated parameters (the same arrays, bit for bit, so a state moves between the two),
    and ``update`` concatenates the gradients and splits the updates as optax does. For a
    uniopt QH transform (:func:`~uniopt.adapters.jax.qhm`, :func:`~uniopt.adapters.jax.qhadam`,
    :func:`~uniopt.adapters.jax.qhadamw`) whose step takes the FFI path, ``update_and_apply``
    is one fused call (:func:`uniopt.kernels.qh_ffi.qhadam_apply_packed_handler`) that reads
    each gradient and parameter where it lies and the state at its offset in the flat buffers:
    no concatenation, no split, the 28 bytes per float32 QHAdam parameter of the per-leaf fused
    step, and only two state buffers (one for QHM) in the jitted call instead of two per leaf.
    That is what it is for: with donated state, JAX's and XLA's fixed cost of a jitted step
    grows with the number of donated buffers (docs/performance.md), so a model of many
    tensors steps faster with its state packed. The leaves must share one float32/float64
    dtype (optax's concatenation promotes mixed ones: those steps take optax's path, as do
    every other transform and every case :func:`update_and_apply` lists).

    Args:
      inner: an optax ``GradientTransformation``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from uniopt.adapters.jax import flatten, qhadam, update_and_apply
      >>> tx = flatten(qhadam(0.1, nus=(0.7, 1.0)))
      >>> params = {"b": jnp.array([0.5]), "w": jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> state[1].exp_avg.shape  # one flat buffer for all three elements
      (3,)
      >>> step = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p), donate_argnums=(1, 2))
      >>> for _ in range(300):
      ...     params, state = step(jax.tree.map(lambda x: 2 * x, params), state, params)
      >>> bool(max(jnp.abs(x).max() for x in jax.tree.leaves(params)) < 1e-2)
      True
    """
    outer = optax.flatten(inner)
    packed = getattr(inner.update, "update_and_apply_packed", None)
    if packed is None:
        return outer

    def update_fn(updates, state, params=None, **extra_args):
        return outer.update(updates, state, params, **extra_args)

    def fused(grads, state, params, **extra_args):
        def fallback():
            return apply_pair(outer.update, grads, state, params, **extra_args)

        return packed(grads, state, params, fallback)

    update_fn.update_and_apply = fused
    return optax.GradientTransformationExtraArgs(outer.init, update_fn)


def schedule_value(hyper, sub_state):
    """A ``ScalarOrSchedule`` at this step (a schedule reads its transform's ``count``), for a
    fused call that stands for a chain's ``scale_by_learning_rate``/``add_decayed_weights``."""
    return hyper(sub_state.count) if callable(hyper) else hyper


def advanced(sub_state):
    """The state of ``add_decayed_weights``/``scale_by_learning_rate`` after one update (a
    schedule's ``count`` advances), as the fused call leaves it."""
    if "count" in getattr(sub_state, "_fields", ()):
        return sub_state._replace(count=optax.safe_increment(sub_state.count))
    return sub_state


def apply_pair(update, grads, state, params, **extra_args):
    """``update(grads, state, params)`` then :func:`optax.apply_updates`: ``(params, state)``."""
    updates, state = update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state


def with_traced_derivatives(ffi_fn: Callable, traced_fn: Callable) -> Callable:
    """``ffi_fn`` whose JVP (hence grad) is ``traced_fn``'s: both compute the same values."""
    fn = jax.custom_jvp(ffi_fn)

    @fn.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(traced_fn, primals, tangents)

    return fn
