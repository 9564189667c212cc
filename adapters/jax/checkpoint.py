r"""Portable checkpoints for the optax transforms (the format: :mod:`uniopt.checkpoint`).

An optax state holds buffers but not the hyper-parameters (they live in the transform's
closures), so :func:`export` takes the state, the parameters and the hyper-parameters the
transform was built with (the transform's own argument names); :func:`restore` builds the
transform from a checkpoint and a state for given parameters, ``(tx, state)``.

**Parameter order** is :func:`jax.tree_util.tree_leaves` order of the params pytree (dict keys
sorted): leaf ``i`` is the checkpoint's ``param{i}``. A torch model's parameters in
``model.parameters()`` order match a pytree whose leaves come in that order, e.g. a list, or a
dict with keys that sort in that order (``{"00.weight": ..., "01.bias": ...}``).

Per family:

* ``qhm(learning_rate, momentum, nu, weight_decay=0.0, weight_decay_type="grad")`` --
  ``"uniopt.qhm/1"``;
* ``qhadam`` / ``qhadamw(learning_rate=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), eps=1e-8,
  weight_decay=0.0, decouple_weight_decay)`` -- ``"uniopt.qhadam/1"``. The optax state keeps one
  ``beta1_weight``/``beta2_weight`` for every leaf; a checkpoint whose parameters have
  different weights (possible in torch, where a parameter without a gradient is not stepped)
  does not restore here (``CheckpointError``);
* ``polyak_sgd(max_learning_rate=1.0, scaling=1.0, f_min=0.0, eps=0.0, variant="sps",
  momentum=0.0)`` -- ``"uniopt.polyak/1"`` as ``SPS_max`` with ``fun_min=f_min``,
  ``max_stepsize=max_learning_rate``, ``delta=eps``. The optax velocity :math:`d` is the
  *negated* format velocity :math:`v` (:math:`x_{t+1} = x_t - d_{t+1} = x_t + v_{t+1}`); only
  ``scaling=1`` has a torch/NumPy equivalent; an ``SPS+`` checkpoint has no optax equivalent;
  a torch ``lr != 1`` becomes ``max_learning_rate = lr * max_stepsize``;
* ``ialm(...)`` (:class:`uniopt.adapters.jax.IALMState`): the groups are the leaves of the
  constraints pytree; ``sigma``, ``gamma``, ``momentum``, ``dampening``, ``dual_range``,
  ``is_ineq`` are given once or as a list with one entry per group; ``beta`` is the state's
  (current) one; ``step`` is ``state.count``.

The ``step`` of a checkpoint comes from the first ``ScaleByScheduleState`` (or
``InjectHyperparamsState``) count in the state, and goes back into every such count on
restore (``-1``, unknown, leaves them at 0). Learning-rate schedules are not stored: export
needs numbers; to resume with a schedule, pass the transform built with it as
``restore(..., tx=...)``.

Constrained learning (``uniopt.adapters.jax.constrained``, ``"uniopt.constrained/1"``):
:func:`export_constrained` takes the multipliers (or the constraints mapping), the dual
transform's state (:func:`~uniopt.adapters.jax.constrained.projected_ascent`: the format's
``"sgd"``; :func:`~uniopt.adapters.jax.constrained.nupi`) and its hyper-parameters;
:func:`restore_constrained` gives the multipliers, the transform and its state back.

Example:
  >>> import jax.numpy as jnp
  >>> from uniopt.adapters.jax import qhm
  >>> from uniopt.adapters.jax import checkpoint as jax_checkpoint
  >>> params = {"w": jnp.array([1.0, -2.0])}
  >>> tx = qhm(learning_rate=0.1, momentum=0.9, nu=0.7)
  >>> _, state = tx.update({"w": 2 * params["w"]}, tx.init(params), params)
  >>> ckpt = jax_checkpoint.export(state, params, learning_rate=0.1, momentum=0.9, nu=0.7)
  >>> tx2, state2 = jax_checkpoint.restore(ckpt, params)   # the same transform and state
  >>> ckpt["format"]
  'uniopt.qhm/1'
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniopt import checkpoint as _ckpt
from uniopt.checkpoint import CheckpointError

from .ialm import IALMState, ialm
from .polyak import ScaleByPolyakState, polyak_sgd
from .qh import ScaleByQHAdamState, ScaleByQHMState, qhadam, qhm

__all__ = ["export", "restore", "transform_kwargs", "export_constrained", "restore_constrained",
           "constrained_transform_kwargs"]

_BLOCKS = {ScaleByQHMState: "qhm", ScaleByQHAdamState: "qhadam", ScaleByPolyakState: "polyak"}


# ----------------------------------------------------------------------------------------------
# Walking a (chained, injected) optax state
# ----------------------------------------------------------------------------------------------
def _nodes(state: Any):
    """Every tuple node (NamedTuples included) of ``state``, depth first."""
    if isinstance(state, tuple):
        yield state
        for child in state:
            yield from _nodes(child)
    elif isinstance(state, dict):
        for child in state.values():
            yield from _nodes(child)


def _replace(state: Any, fn):
    """``state`` with every tuple node ``n`` for which ``fn(n)`` is not None replaced by it."""
    if isinstance(state, tuple):
        new = fn(state)
        if new is not None:
            return new
        children = [_replace(c, fn) for c in state]
        return type(state)(*children) if hasattr(state, "_fields") else tuple(children)
    if isinstance(state, dict):
        return type(state)((k, _replace(v, fn)) for k, v in state.items())
    return state


def _family(state: Any) -> tuple:
    if isinstance(state, IALMState):
        return "ialm", state
    for node in _nodes(state):
        for cls, name in _BLOCKS.items():
            if isinstance(node, cls):
                return name, node
    raise TypeError(f"export: no uniopt QHM, QHAdam, Polyak or iALM state in {type(state).__name__}")


def _count_nodes(state: Any) -> list:
    return [n for n in _nodes(state) if isinstance(n, (optax.ScaleByScheduleState,
                                                       optax.InjectHyperparamsState))]


def _number(name: str, value: Any) -> Any:
    if callable(value):
        raise TypeError(f"export: {name} is a schedule; a checkpoint stores numbers (pass the "
                        f"transform built with the schedule to restore(..., tx=...))")
    return value


def _host(x: Any) -> np.ndarray:
    return np.array(jax.device_get(x), copy=True)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def export(state: Any, params: Any = None, *, learning_rate: Any = None, momentum: Any = None,
           nu: Any = None, weight_decay: Any = 0.0, weight_decay_type: str = "grad",
           betas: Any = (0.9, 0.999), nus: Any = (1.0, 1.0), eps: Any = None,
           decouple_weight_decay: bool = False, max_learning_rate: Any = 1.0, scaling: Any = 1.0,
           f_min: Any = 0.0, variant: str = "sps", penalty: Any = 1.0, ctol: float = 0.0,
           sigma: Any = 1.0, gamma: Any = 1.0, dampening: Any = 0.0,
           dual_range: Any = (-100.0, 100.0), is_ineq: Any = False, beta: Any = None) -> dict:
    """The portable checkpoint of an optax state of :func:`qhm`, :func:`qhadam`,
    :func:`qhadamw`, :func:`polyak_sgd` (or a chain holding their blocks) or :func:`ialm`.

    Args:
      state: the state (``tx.init`` / ``tx.update``'s).
      params: the parameters (QH, Polyak; leaves in :func:`jax.tree_util.tree_leaves` order).
      the rest: the hyper-parameters the transform was built with, under its argument names
        (see the module docstring). ``eps`` defaults to the family's default (QHAdam 1e-8,
        Polyak 0). iALM's per-group ones: one value, or a list with one per group.

    Raises:
      TypeError: a state of no supported family, a schedule given as a hyper-parameter, or
        ``learning_rate``/``momentum``/``nu`` missing for QHM.
      ValueError: ``scaling != 1`` for Polyak (no torch/NumPy equivalent).
    """
    family, block = _family(state)
    counts = _count_nodes(state)
    step = int(counts[0].count) if counts else -1
    if family == "ialm":
        return _export_ialm(state, penalty=penalty, ctol=ctol, sigma=sigma, gamma=gamma,
                            momentum=0.0 if momentum is None else momentum, dampening=dampening,
                            dual_range=dual_range, is_ineq=is_ineq)
    if params is None:
        raise TypeError("export: the parameters are needed for a QH or Polyak state")
    leaves = jax.tree.leaves(params)
    n = len(leaves)
    if family == "qhm":
        if learning_rate is None or momentum is None or nu is None:
            raise TypeError("export: a QHM state needs learning_rate, momentum and nu")
        hyper = {"lr": _number("learning_rate", learning_rate), "momentum": momentum, "nu": nu,
                 "weight_decay": _number("weight_decay", weight_decay),
                 "weight_decay_type": weight_decay_type, "maximize": False}
        state_of = {i: {"momentum_buffer": _host(b)}
                    for i, b in enumerate(jax.tree.leaves(block.momentum_buffer))}
    elif family == "qhadam":
        hyper = {"lr": _number("learning_rate", 1e-3 if learning_rate is None else learning_rate),
                 "betas": tuple(betas), "nus": tuple(nus),
                 "weight_decay": _number("weight_decay", weight_decay),
                 "decouple_weight_decay": bool(decouple_weight_decay),
                 "eps": 1e-8 if eps is None else eps, "maximize": False}
        w1, w2 = float(block.beta1_weight), float(block.beta2_weight)
        state_of = {i: {"exp_avg": _host(m), "exp_avg_sq": _host(v), "beta1_weight": w1,
                        "beta2_weight": w2}
                    for i, (m, v) in enumerate(zip(jax.tree.leaves(block.exp_avg),
                                                   jax.tree.leaves(block.exp_avg_sq)))}
    else:
        scaling = _number("scaling", scaling)
        if float(scaling) != 1.0:
            raise ValueError(f"export: polyak_sgd with scaling={scaling} has no torch/NumPy "
                             f"equivalent (the format's step is not scaled)")
        hyper = {"fun_min": f_min, "variant": "SPS_max", "max_stepsize": max_learning_rate,
                 "delta": 0.0 if eps is None else eps, "momentum": 0.0 if momentum is None else momentum,
                 "lr": 1.0}
        state_of = {}
        if block.velocity is not None:
            state_of = {i: {"velocity": -_host(d)} for i, d in enumerate(jax.tree.leaves(block.velocity))}
    if state_of and len(state_of) != n:
        raise CheckpointError(f"export: the state has {len(state_of)} leaves, the parameters {n}")
    sd = {"state": state_of, "param_groups": [{**hyper, "params": list(range(n))}]}
    return _ckpt.from_state_dict(family, sd, step=step)


def _per_group(name: str, value: Any, n: int) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"export: {name} has {len(value)} entries for {n} groups")
        return value
    return [value] * n


def _export_ialm(state: IALMState, *, penalty, ctol, sigma, gamma, momentum, dampening,
                 dual_range, is_ineq) -> dict:
    duals = jax.tree.leaves(state.duals)
    n = len(duals)
    hyper = {"sigma": _per_group("sigma", sigma, n), "gamma": _per_group("gamma", gamma, n),
             "momentum": _per_group("momentum", momentum, n),
             "dampening": _per_group("dampening", dampening, n),
             "dual_range": _per_group("dual_range", dual_range, n),
             "is_ineq": _per_group("is_ineq", is_ineq, n)}
    groups = []
    for k, (lam, buf, beta) in enumerate(zip(duals, jax.tree.leaves(state.momentum_buffer),
                                             jax.tree.leaves(state.beta))):
        group = {h: v[k] for h, v in hyper.items()}
        group.update(name=f"group{k}", beta=float(beta), duals=_host(lam).reshape(-1),
                     momentum_buffer=_host(buf).reshape(-1))
        groups.append(group)
    return _ckpt.ialm_from_groups(groups, penalty, ctol, step=int(state.count))


# ----------------------------------------------------------------------------------------------
# restore
# ----------------------------------------------------------------------------------------------
def _one_group(sd: dict, what: str) -> dict:
    groups = sd["param_groups"]
    first = {k: v for k, v in groups[0].items() if k != "params"}
    for k, g in enumerate(groups[1:], 1):
        other = {key: v for key, v in g.items() if key != "params"}
        if other != first:
            raise CheckpointError(f"{what} takes one set of hyper-parameters; the checkpoint's "
                                  f"group {k} differs from group 0: {other} != {first}")
    return first


def _leaf_arrays(sd: dict, key: str, leaves: list, *, sign: float = 1.0) -> list:
    """Buffer ``key`` of each parameter as a JAX array of its leaf's dtype (zeros if absent)."""
    out = []
    for i, leaf in enumerate(leaves):
        entry = sd["state"].get(i)
        if entry is None or key not in entry:
            out.append(jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)))
        else:
            a = np.asarray(entry[key]) * sign if sign != 1.0 else np.asarray(entry[key])
            out.append(jnp.asarray(a, dtype=jnp.result_type(leaf)))
    return out


def _set_counts(state: Any, step: int) -> Any:
    if step < 0:
        return state

    def fn(node):
        if isinstance(node, (optax.ScaleByScheduleState, optax.InjectHyperparamsState)):
            inner = {f: _replace(getattr(node, f), fn) for f in node._fields if f != "count"}
            return node._replace(count=jnp.asarray(step, dtype=jnp.result_type(node.count)), **inner)
        return None

    return _replace(state, fn)


def restore(ckpt: dict, params: Any, *, tx: Any = None) -> tuple:
    """A transform and its state, resuming a checkpoint written by any face.

    Args:
      ckpt: the checkpoint (:func:`uniopt.checkpoint.load`'s result or an ``export``'s).
      params: the parameters (QH, Polyak), or the constraint values (iALM: one leaf per group,
        of the group's size), whose structure, shapes and dtypes the state takes; leaves in
        :func:`jax.tree_util.tree_leaves` order are the checkpoint's parameters in order.
      tx: the transform to use instead of the one built from the checkpoint's
        hyper-parameters (e.g. one with a learning-rate schedule); its state must hold the
        checkpoint family's block.

    Returns:
      ``(tx, state)``.

    Raises:
      CheckpointError: the checkpoint does not fit (number of leaves, shapes, groups with
        different hyper-parameters, ``maximize=True``, per-parameter QHAdam weights that
        differ, an SPS+ Polyak checkpoint).
    """
    fam = _ckpt.family_of(ckpt)
    if fam.name == "ialm":
        return _restore_ialm(ckpt, params, tx)
    leaves = jax.tree.leaves(params)
    sd = _ckpt.to_state_dict(ckpt, [tuple(jnp.shape(x)) for x in leaves])
    hyper = _one_group(sd, "an optax transform")
    step = int(_ckpt.validate(ckpt)["step"])
    if hyper.get("maximize"):
        raise CheckpointError("the optax transforms minimise: a maximize=True checkpoint does not "
                              "restore here (negate the gradients and restore with maximize=False)")
    if tx is None:
        tx = _BUILDERS[fam.name](**transform_kwargs(ckpt))
    if fam.name == "qhm":
        bufs = _leaf_arrays(sd, "momentum_buffer", leaves)
        treedef = jax.tree.structure(params)
        block = ScaleByQHMState(momentum_buffer=treedef.unflatten(bufs))
        cls = ScaleByQHMState
    elif fam.name == "qhadam":
        weights = {(s["beta1_weight"], s["beta2_weight"]) for s in sd["state"].values()}
        if sd["state"] and len(sd["state"]) != len(leaves):
            weights.add((0.0, 0.0))
        if len(weights) > 1:
            raise CheckpointError(f"the optax QHAdam state has one beta1_weight/beta2_weight for "
                                  f"every leaf; the checkpoint's parameters have {sorted(weights)}")
        w1, w2 = weights.pop() if weights else (0.0, 0.0)
        treedef = jax.tree.structure(params)
        template = next(n for n in _nodes(tx.init(params)) if isinstance(n, ScaleByQHAdamState))
        w_dtype = jnp.result_type(template.beta1_weight)
        block = ScaleByQHAdamState(beta1_weight=jnp.asarray(w1, w_dtype),
                                   beta2_weight=jnp.asarray(w2, w_dtype),
                                   exp_avg=treedef.unflatten(_leaf_arrays(sd, "exp_avg", leaves)),
                                   exp_avg_sq=treedef.unflatten(_leaf_arrays(sd, "exp_avg_sq", leaves)))
        cls = ScaleByQHAdamState
    else:
        template = next(n for n in _nodes(tx.init(params)) if isinstance(n, ScaleByPolyakState))
        if template.velocity is None:
            block = template
        else:
            treedef = jax.tree.structure(params)
            block = ScaleByPolyakState(velocity=treedef.unflatten(
                _leaf_arrays(sd, "velocity", leaves, sign=-1.0)))
        cls = ScaleByPolyakState
    state = tx.init(params)
    if not any(isinstance(n, cls) for n in _nodes(state)):
        raise CheckpointError(f"restore: the given tx's state has no {cls.__name__}")
    state = _replace(state, lambda node: block if isinstance(node, cls) else None)
    return tx, _set_counts(state, step)


_BUILDERS = {"qhm": qhm, "qhadam": qhadam, "polyak": polyak_sgd, "ialm": ialm}


def transform_kwargs(ckpt: dict) -> dict:
    """The keyword arguments of the transform a checkpoint resumes in (and that
    :func:`export` takes back): ``qhm(**kw)``, ``qhadam(**kw)``, ``polyak_sgd(**kw)`` or
    ``ialm(**kw)`` by the checkpoint's family (iALM: per-group lists, ``beta`` the current one).

    Raises:
      CheckpointError: groups with different hyper-parameters, ``maximize=True``, an SPS+
        Polyak checkpoint.
    """
    fam = _ckpt.family_of(ckpt)
    if fam.name == "ialm":
        penalty, ctol, groups = _ckpt.ialm_to_groups(ckpt)
        kw = {h: [g[h] for g in groups] for h in ("beta", "sigma", "gamma", "momentum", "dampening",
                                                 "is_ineq")}
        kw["dual_range"] = [tuple(g["dual_range"]) for g in groups]
        return {**kw, "penalty": penalty, "ctol": ctol}
    hyper = _one_group(_ckpt.to_state_dict(ckpt), "an optax transform")
    if hyper.get("maximize"):
        raise CheckpointError("the optax transforms minimise: a maximize=True checkpoint does not "
                              "restore here (negate the gradients and restore with maximize=False)")
    if fam.name == "qhm":
        return {"learning_rate": hyper["lr"], "momentum": hyper["momentum"], "nu": hyper["nu"],
                "weight_decay": hyper["weight_decay"], "weight_decay_type": hyper["weight_decay_type"]}
    if fam.name == "qhadam":
        return {"learning_rate": hyper["lr"], "betas": tuple(hyper["betas"]),
                "nus": tuple(hyper["nus"]), "eps": hyper["eps"], "weight_decay": hyper["weight_decay"],
                "decouple_weight_decay": hyper["decouple_weight_decay"]}
    if hyper["variant"] != "SPS_max":
        raise CheckpointError(f"an optax polyak_sgd has no {hyper['variant']!r} variant (its "
                              f"'sps' and 'sps+' are the format's SPS_max)")
    return {"max_learning_rate": hyper["lr"] * hyper["max_stepsize"], "f_min": hyper["fun_min"],
            "eps": hyper["delta"], "momentum": hyper["momentum"]}


def _restore_ialm(ckpt: dict, constraints: Any, tx: Any) -> tuple:
    penalty, ctol, groups = _ckpt.ialm_to_groups(ckpt)
    leaves = jax.tree.leaves(constraints)
    sizes = [int(np.size(x)) for x in leaves]
    if sizes != [g["duals"].size for g in groups]:
        raise CheckpointError(f"checkpoint has iALM groups of sizes {[g['duals'].size for g in groups]}, "
                              f"the constraints' leaves have sizes {sizes}")
    if tx is None:
        tx = ialm(**transform_kwargs(ckpt))
    state = tx.init(constraints)
    treedef = jax.tree.structure(state.duals)
    old = jax.tree.leaves(state.duals)
    duals = [jnp.asarray(g["duals"].reshape(jnp.shape(o)), jnp.result_type(o)) for g, o in zip(groups, old)]
    bufs = [jnp.asarray(g["momentum_buffer"].reshape(jnp.shape(o)), jnp.result_type(o))
            for g, o in zip(groups, old)]
    betas = [jnp.asarray(g["beta"], b.dtype) for g, b in zip(groups, jax.tree.leaves(state.beta))]
    step = int(_ckpt.validate(ckpt)["step"])
    state = state._replace(duals=treedef.unflatten(duals), momentum_buffer=treedef.unflatten(bufs),
                           beta=treedef.unflatten(betas),
                           count=jnp.asarray(max(step, 0), jnp.result_type(state.count)))
    return tx, state




# ----------------------------------------------------------------------------------------------
# Constrained learning (Cooper): multipliers, penalty coefficients, the dual transform
# ----------------------------------------------------------------------------------------------
def _cons():
    from . import constrained

    return constrained


def _split_constraints(tree: Any, penalty_coefficients: Any) -> tuple:
    """``(multipliers pytree, penalty pytree or None, constraints or None)``: a mapping of
    ``Constraint`` gives its multipliers ``{name: multiplier}`` and penalty coefficients."""
    c = _cons()
    if isinstance(tree, dict) and tree and all(isinstance(v, c.Constraint) for v in tree.values()):
        mults = c._multipliers(tree)
        if penalty_coefficients is None:
            penalty_coefficients = {n: k.penalty_coefficient for n, k in tree.items()
                                    if k.penalty_coefficient is not None}
        return mults, penalty_coefficients, tree
    return tree, penalty_coefficients, None


def _mult_leaves(tree: Any) -> list:
    c = _cons()
    leaves = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, c.Multiplier))
    for i, m in enumerate(leaves):
        if not isinstance(m, (c.DenseMultiplier, c.IndexedMultiplier)):
            raise TypeError(f"multiplier {i}: {type(m).__name__} (expected DenseMultiplier or "
                            f"IndexedMultiplier nodes)")
    return leaves


def _pen_leaves(tree: Any) -> list:
    c = _cons()
    if tree is None:
        return []
    leaves = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, c.PenaltyCoefficient))
    for j, p in enumerate(leaves):
        if not isinstance(p, c.PenaltyCoefficient):
            raise TypeError(f"penalty coefficient {j}: {type(p).__name__} (expected a PenaltyCoefficient)")
    return leaves


def _jkind(node: Any) -> str:
    c = _cons()
    return "indexed" if isinstance(node, (c.IndexedMultiplier, c.IndexedPenaltyCoefficient)) else "dense"


def _jtype(m: Any) -> str:
    return "none" if m.constraint_type is None else m.constraint_type.name.lower()


def _dual_node(state: Any) -> Any:
    c = _cons()
    if isinstance(state, c.ConstrainedOptimizerState):
        state = state.dual
    for node in _nodes(state):
        if isinstance(node, (c.ProjectedAscentState, c.NuPIState)):
            return node
    raise TypeError(f"export_constrained: no projected_ascent or nupi state in {type(state).__name__}")


def export_constrained(multipliers: Any, state: Any, *, learning_rate: Any, weight_decay: Any = 0.0,
                       Kp: Any = 0.0, Ki: Any = 1.0, ema_nu: Any = 0.0, init_type: Any = "sgd",
                       maximize: bool = False, penalty_coefficients: Any = None) -> dict:
    """The ``"uniopt.constrained/1"`` checkpoint of the JAX face's dual side.

    Args:
      multipliers: a pytree of ``DenseMultiplier`` / ``IndexedMultiplier`` nodes (the order is
        :func:`jax.tree_util.tree_leaves`', dict keys sorted), or the constraints mapping
        ``{name: Constraint}`` (its multipliers and, by default, penalty coefficients).
      state: the dual transform's state (:class:`~uniopt.adapters.jax.constrained.ProjectedAscentState`,
        :class:`~uniopt.adapters.jax.constrained.NuPIState`, possibly wrapped, or a
        ``ConstrainedOptimizerState``: its ``dual``).
      learning_rate, weight_decay, Kp, Ki, ema_nu, init_type, maximize: the hyper-parameters the
        transform was built with (``projected_ascent`` takes ``learning_rate`` only; it is the
        format's ``"sgd"`` with ``maximize=True`` and no momentum); numbers, not schedules.
      penalty_coefficients: a pytree of ``PenaltyCoefficient`` nodes (default: the
        constraints', or none).

    ``step`` is the state's ``count``.
    """
    c = _cons()
    tree, pens, _ = _split_constraints(multipliers, penalty_coefficients)
    leaves = _mult_leaves(tree)
    node = _dual_node(state)
    _number("learning_rate", learning_rate)
    parts = [{"kind": _jkind(m), "constraint_type": _jtype(m), "weight": _host(m.weight)} for m in leaves]
    group = {"params": list(range(len(leaves)))}
    st = {}
    if isinstance(node, c.ProjectedAscentState):
        optimizer = "sgd"
        group.update(lr=float(learning_rate), momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=True)
    else:
        optimizer = "nupi"
        for name, v in (("Kp", Kp), ("Ki", Ki)):
            if np.size(v) != 1:
                raise CheckpointError(f"export_constrained: per-entry nuPI gains ({name}) are not in "
                                      f"the 'uniopt.constrained/1' format")
        group.update(lr=float(learning_rate), weight_decay=float(weight_decay),
                     Kp=float(np.asarray(Kp).reshape(-1)[0]), Ki=float(np.asarray(Ki).reshape(-1)[0]),
                     ema_nu=float(ema_nu), init_type=c._check_init_type(init_type).name.lower(),
                     maximize=bool(maximize))
        xis, freshes = jax.tree.leaves(node.xi), jax.tree.leaves(node.fresh)
        if len(xis) != len(leaves) or len(freshes) != len(leaves):
            raise CheckpointError(f"export_constrained: the nupi state has {len(xis)} leaves, the "
                                  f"multipliers {len(leaves)}")
        for i, (xi, fresh) in enumerate(zip(xis, freshes)):
            st[i] = {"xi": _host(xi), "needs_error_initialization_mask": _host(fresh).astype(bool)}
    pen = [{"kind": _jkind(p), "value": _host(p.value), "init": _host(p.init)} for p in _pen_leaves(pens)]
    return _ckpt.constrained_from_parts(optimizer, parts, [group], st, pen, step=int(node.count))


def constrained_transform_kwargs(ckpt: dict) -> dict:
    """The keyword arguments of the dual transform a ``"uniopt.constrained/1"`` checkpoint
    resumes in: ``projected_ascent(**kw)`` (``"sgd"``) or ``nupi(**kw)`` (``"nupi"``).

    Raises:
      CheckpointError: groups with different hyper-parameters; SGD with momentum, weight decay,
        nesterov or ``maximize=False`` (``projected_ascent`` has none of them).
    """
    parts = _ckpt.constrained_to_parts(ckpt)
    first = {k: v for k, v in parts["groups"][0].items() if k not in ("params", "nonfinite_skips")}
    for k, g in enumerate(parts["groups"][1:], 1):
        other = {key: v for key, v in g.items() if key not in ("params", "nonfinite_skips")}
        if other != first:
            raise CheckpointError(f"a JAX dual transform takes one set of hyper-parameters; the "
                                  f"checkpoint's group {k} differs from group 0: {other} != {first}")
    if parts["optimizer"] == "sgd":
        if first["momentum"] != 0 or first["weight_decay"] != 0 or first["nesterov"] or not first["maximize"]:
            raise CheckpointError(f"SGD with momentum={first['momentum']}, weight_decay="
                                  f"{first['weight_decay']}, nesterov={first['nesterov']}, maximize="
                                  f"{first['maximize']} has no JAX equivalent (projected_ascent is "
                                  f"momentum 0, no decay, ascent)")
        return {"learning_rate": first["lr"]}
    return {"learning_rate": first["lr"], "weight_decay": first["weight_decay"], "Kp": first["Kp"],
            "Ki": first["Ki"], "ema_nu": first["ema_nu"], "init_type": first["init_type"],
            "maximize": first["maximize"]}


def restore_constrained(ckpt: dict, multipliers: Any, *, tx: Any = None,
                        penalty_coefficients: Any = None) -> tuple:
    """Restore a ``"uniopt.constrained/1"`` checkpoint (from any face) into the JAX face.

    Args:
      ckpt: the checkpoint.
      multipliers: the target multipliers (a pytree of ``DenseMultiplier`` /
        ``IndexedMultiplier`` nodes giving the structure, kinds and dtypes) or the constraints
        mapping ``{name: Constraint}``. A multiplier without a constraint type takes the
        checkpoint's.
      tx: the dual transform to use (default: built from the checkpoint,
        :func:`constrained_transform_kwargs`); its state must be a ``projected_ascent`` /
        ``nupi`` one matching the checkpoint's dual optimizer.
      penalty_coefficients: the target penalty coefficients (pytree; default: the
        constraints', or none).

    Returns:
      ``(multipliers, tx, state, penalty_coefficients)``: the multipliers (or the constraints
      mapping, with its multipliers and penalty coefficients restored), the transform, its
      state (initialised on the multipliers ``{name: multiplier}`` of a constraints mapping,
      as :class:`~uniopt.adapters.jax.constrained.ConstrainedOptimizer` does; ``count`` the
      checkpoint's ``step``, 0 when unknown) and the penalty coefficients (``None`` when none
      were given).

    Raises:
      CheckpointError: another family, different numbers, kinds or sizes of multipliers or
        penalty coefficients, constraint types that disagree, SGD hyper-parameters that
        ``projected_ascent`` does not have.
    """
    c = _cons()
    parts = _ckpt.constrained_to_parts(ckpt)
    tree, pens, constraints = _split_constraints(multipliers, penalty_coefficients)
    leaves = _mult_leaves(tree)
    theirs = parts["multipliers"]
    if len(theirs) != len(leaves):
        raise CheckpointError(f"checkpoint has {len(theirs)} multipliers, the target {len(leaves)}")
    new_leaves = []
    for i, (t, m) in enumerate(zip(theirs, leaves)):
        if t["kind"] != _jkind(m) or t["weight"].size != int(np.size(m.weight)):
            raise CheckpointError(f"checkpoint multiplier {i}: {t['kind']} of size {t['weight'].size}, "
                                  f"the target's {_jkind(m)} of size {int(np.size(m.weight))}")
        if "none" not in (t["constraint_type"], _jtype(m)) and t["constraint_type"] != _jtype(m):
            raise CheckpointError(f"checkpoint multiplier {i} is an {t['constraint_type']} "
                                  f"multiplier, the target's {_jtype(m)}")
        new = m.replace(weight=jnp.asarray(t["weight"].reshape(jnp.shape(m.weight)),
                                           jnp.result_type(m.weight)))
        if m.constraint_type is None and t["constraint_type"] != "none":
            new = new.replace(constraint_type=c.ConstraintType[t["constraint_type"].upper()])
        new_leaves.append(new)
    pen_leaves = _pen_leaves(pens)
    if len(parts["penalty_coefficients"]) != len(pen_leaves):
        raise CheckpointError(f"checkpoint has {len(parts['penalty_coefficients'])} penalty "
                              f"coefficients, the target {len(pen_leaves)}")
    new_pens = []
    for j, (t, p) in enumerate(zip(parts["penalty_coefficients"], pen_leaves)):
        if t["kind"] != _jkind(p) or t["value"].shape != tuple(jnp.shape(p.value)):
            raise CheckpointError(f"checkpoint penalty coefficient {j}: {t['kind']} of shape "
                                  f"{t['value'].shape}, the target's {_jkind(p)} of shape "
                                  f"{tuple(jnp.shape(p.value))}")
        dt = jnp.result_type(p.value)
        new_pens.append(p.replace(value=jnp.asarray(t["value"], dt), init=jnp.asarray(t["init"], dt)))
    if tx is None:
        kw = constrained_transform_kwargs(ckpt)
        tx = c.projected_ascent(**kw) if parts["optimizer"] == "sgd" else c.nupi(**kw)
    is_m = lambda n: isinstance(n, c.Multiplier)  # noqa: E731
    tree = jax.tree.unflatten(jax.tree.structure(tree, is_leaf=is_m), new_leaves)
    if pens is not None:
        is_p = lambda n: isinstance(n, c.PenaltyCoefficient)  # noqa: E731
        pens = jax.tree.unflatten(jax.tree.structure(pens, is_leaf=is_p), new_pens)
    state = tx.init(tree)
    node = _dual_node(state)
    want = c.ProjectedAscentState if parts["optimizer"] == "sgd" else c.NuPIState
    if not isinstance(node, want):
        raise CheckpointError(f"restore_constrained: a {parts['optimizer']!r} checkpoint, the tx's "
                              f"state holds a {type(node).__name__}")
    count = jnp.asarray(max(parts["step"], 0), jnp.result_type(node.count))
    if want is c.ProjectedAscentState:
        block = node._replace(count=count)
    else:
        treedef = jax.tree.structure(node.xi)
        xis, freshes = jax.tree.leaves(node.xi), jax.tree.leaves(node.fresh)
        new_xi, new_fresh = [], []
        for i, (x, f) in enumerate(zip(xis, freshes)):
            s = parts["state"].get(i)
            if s is None:  # the initial state
                new_xi.append(x)
                new_fresh.append(f)
            else:
                new_xi.append(jnp.asarray(s["xi"].reshape(jnp.shape(x)), jnp.result_type(x)))
                new_fresh.append(jnp.asarray(s["needs_error_initialization_mask"].reshape(jnp.shape(f))))
        block = node._replace(count=count, xi=treedef.unflatten(new_xi),
                              fresh=treedef.unflatten(new_fresh))
    state = _replace(state, lambda n: block if n is node else None)
    if constraints is not None:
        restored_pens = pens or {}
        constraints = {name: k.replace(multiplier=tree.get(name, k.multiplier),
                                       penalty_coefficient=restored_pens.get(name, k.penalty_coefficient))
                       for name, k in constraints.items()}
        return constraints, tx, state, pens
    return tree, tx, state, pens
