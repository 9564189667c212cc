r"""Portable checkpoints for the torch optimizers (the format: :mod:`uniopt.checkpoint`).

:func:`export` turns a :class:`~uniopt.adapters.torch.QHM`, :class:`~uniopt.adapters.torch.QHAdam`,
:class:`~uniopt.adapters.torch.QHAdamW`, :class:`~uniopt.adapters.torch.PolyakSGD` or
:class:`~uniopt.adapters.torch.iALM` into a checkpoint of NumPy arrays (copied to the host),
:func:`restore` puts one back (any face may have written it); :func:`from_qhoptim` and
:func:`from_humancompatible` convert the reference libraries' optimizers or state dicts.
:func:`export_constrained` / :func:`restore_constrained` do the same for the dual side of
constrained learning (``uniopt.adapters.torch.constrained``: multipliers, penalty
coefficients and the dual optimizer, ``"uniopt.constrained/1"``).

Parameter order is the optimizer's (its param groups in order, each group's parameters in
order), as in ``state_dict``. Buffers are restored in each parameter's dtype and on its device.

Example:
  >>> import torch
  >>> from uniopt import checkpoint
  >>> from uniopt.adapters.torch import QHM
  >>> from uniopt.adapters.torch import checkpoint as torch_checkpoint
  >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
  >>> opt = QHM([w], lr=0.1, momentum=0.9, nu=0.7)
  >>> w.grad = 2 * w.detach(); opt.step()
  >>> ckpt = torch_checkpoint.export(opt)       # then checkpoint.save("opt.npz", ckpt)
  >>> ckpt["format"], ckpt["param0.momentum_buffer"].round(12).tolist()
  ('uniopt.qhm/1', [0.2, -0.4])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from uniopt import checkpoint as _ckpt
from uniopt.checkpoint import CheckpointError

from .ialm import iALM
from .polyak import PolyakSGD
from .qh import QHM, QHAdam

__all__ = ["export", "restore", "from_qhoptim", "from_humancompatible", "export_constrained",
           "restore_constrained"]


def _family(opt: Any) -> str:
    if isinstance(opt, QHM):
        return "qhm"
    if isinstance(opt, QHAdam):
        return "qhadam"
    if isinstance(opt, PolyakSGD):
        return "polyak"
    if isinstance(opt, iALM):
        return "ialm"
    raise TypeError(f"export/restore: expected uniopt.adapters.torch QHM, QHAdam, QHAdamW, "
                    f"PolyakSGD or iALM, got {type(opt).__name__}")


def _numpy(value: Any) -> Any:
    """A tensor as an owned host NumPy array (0-d tensors as Python scalars); else unchanged."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.ndim == 0:
            return value.item()
        return value.cpu().numpy().copy()
    return value


def _numpy_state_dict(state_dict: dict) -> dict:
    return {"state": {k: {b: _numpy(v) for b, v in s.items()} for k, s in state_dict["state"].items()},
            "param_groups": [{k: _numpy(v) for k, v in g.items()} for g in state_dict["param_groups"]]}


def _params(opt) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def export(opt: Any, *, step: int = -1) -> dict:
    """The portable checkpoint of a torch optimizer (every array copied to the host).

    Args:
      opt: a uniopt torch QHM, QHAdam, QHAdamW, PolyakSGD or iALM.
      step: the step count to record (the torch optimizers do not count their updates;
        ``-1``: unknown). It matters when the checkpoint resumes in an optax chain with a
        schedule.
    """
    family = _family(opt)
    if family == "ialm":
        groups = []
        for g in opt.param_groups:
            group = {k: _numpy(v) for k, v in g.items() if k not in ("params", "momentum_buffer")}
            group["duals"] = _numpy(g["params"][0]).reshape(-1)
            group["momentum_buffer"] = _numpy(g["momentum_buffer"]).reshape(-1)
            groups.append(group)
        return _ckpt.ialm_from_groups(groups, opt.penalty, opt.ctol, step=step)
    return _ckpt.from_state_dict(family, _numpy_state_dict(opt.state_dict()), step=step)


def restore(opt: Any, ckpt: dict) -> Any:
    """Load a checkpoint (from any face, or :func:`uniopt.checkpoint.load`) into ``opt``.

    The optimizer takes the checkpoint's hyper-parameters and state (through its
    ``load_state_dict``: checked, copied, never aliased). Other keys of its param groups are
    kept. QH and Polyak: the number of parameters, each buffer's shape and each group's size
    must match (``CheckpointError``, a ``ValueError``, naming the key otherwise); a QHAdam
    checkpoint with ``decouple_weight_decay=True`` restores into QHAdam as well (the flag is a
    group setting). iALM: the groups are replaced by the checkpoint's, as ``load_state_dict``
    does; the multipliers keep the checkpoint's dtype and go to the device of the first
    group's multipliers.

    Returns:
      ``opt``.
    """
    family = _family(opt)
    fam = _ckpt.family_of(ckpt)
    if fam.name != family:
        raise CheckpointError(f"cannot restore a {_ckpt.validate(ckpt)['format']!r} checkpoint into "
                              f"{type(opt).__name__}")
    if family == "ialm":
        penalty, ctol, groups = _ckpt.ialm_to_groups(ckpt)
        device = opt.param_groups[0]["params"][0].device
        sd = {"penalty": penalty, "ctol": ctol, "param_groups": []}
        for g in groups:
            group = dict(g)
            group["duals"] = torch.from_numpy(np.array(g["duals"])).to(device)
            group["momentum_buffer"] = torch.from_numpy(np.array(g["momentum_buffer"])).to(device)
            sd["param_groups"].append(group)
        opt.load_state_dict(sd)
        return opt
    params = _params(opt)
    sd = _ckpt.to_state_dict(ckpt, [tuple(p.shape) for p in params])
    mine = opt.state_dict()["param_groups"]
    sizes = [len(g["params"]) for g in sd["param_groups"]]
    if [len(g["params"]) for g in mine] != sizes:
        raise CheckpointError(f"checkpoint groups of {sizes} parameters, the optimizer's of "
                              f"{[len(g['params']) for g in mine]}")
    for i, state in sd["state"].items():
        p = params[i]
        for key in fam.buffers:
            if key in state:
                state[key] = torch.from_numpy(np.array(state[key])).to(device=p.device, dtype=p.dtype)
    sd["param_groups"] = [{**g, **{k: v for k, v in theirs.items() if k != "params"},
                           "params": g["params"]} for g, theirs in zip(mine, sd["param_groups"])]
    opt.load_state_dict(sd)
    return opt


def from_qhoptim(source: Any) -> dict:
    """The portable checkpoint of a ``qhoptim.pyt`` ``QHM`` / ``QHAdam`` (``QHAdamW``) optimizer.

    qhoptim keeps the layout uniopt's torch classes use (``momentum_buffer``;
    ``beta1_weight``, ``beta2_weight``, ``exp_avg``, ``exp_avg_sq``, with bias-corrected
    moments), so its ``state_dict()`` also loads directly with ``load_state_dict``; this
    converter gives the portable form, which resumes in any face.

    Args:
      source: a qhoptim optimizer or its ``state_dict()``.
    """
    sd = source.state_dict() if hasattr(source, "state_dict") else source
    groups = sd["param_groups"]
    if all("nu" in g for g in groups):
        family = "qhm"
    elif all("nus" in g for g in groups):
        family = "qhadam"
    else:
        raise CheckpointError("from_qhoptim: not a qhoptim QHM or QHAdam state dict (its groups "
                              "have neither 'nu' nor 'nus')")
    sd = _numpy_state_dict(sd)
    for g in sd["param_groups"]:
        g.setdefault("maximize", False)
    return _ckpt.from_state_dict(family, sd)


def from_humancompatible(source: Any) -> dict:
    """The portable checkpoint of a ``humancompatible.train.dual_optim.iALM`` (0.4.x).

    Its quadratic coefficient is each group's ``beta`` (``penalty=None`` here) and it has no
    tolerance (``ctol=0``); the groups' ``lower_bound``/``upper_bound`` become ``dual_range``.

    Args:
      source: a humancompatible-train iALM or its ``state_dict()``.
    """
    sd = source.state_dict() if hasattr(source, "state_dict") else source
    reader = iALM(m=1)
    reader.load_state_dict(sd)  # checks and converts the layout (uniopt's torch iALM reads it)
    return export(reader)


# ----------------------------------------------------------------------------------------------
# Constrained learning (Cooper)
# ----------------------------------------------------------------------------------------------
def _constrained_pieces(multipliers: Any, penalty_coefficients: Any) -> tuple:
    """``(multipliers, penalty coefficients)`` as lists: from a CMP (its constraints' order),
    a dict (its values' order) or an iterable."""
    from .constrained.multipliers import ExplicitMultiplier, Multiplier

    if hasattr(multipliers, "multipliers") and hasattr(multipliers, "penalty_coefficients"):
        cmp = multipliers
        multipliers = list(dict.fromkeys(cmp.multipliers()))  # a shared multiplier once
        if penalty_coefficients is None:
            penalty_coefficients = list(dict.fromkeys(cmp.penalty_coefficients()))
    elif isinstance(multipliers, dict):
        multipliers = list(multipliers.values())
    elif isinstance(multipliers, Multiplier):
        multipliers = [multipliers]
    else:
        multipliers = list(multipliers)
    for i, m in enumerate(multipliers):
        if not isinstance(m, ExplicitMultiplier):
            raise TypeError(f"multiplier {i}: {type(m).__name__} (a portable checkpoint holds "
                            f"DenseMultiplier and IndexedMultiplier; an ImplicitMultiplier is a "
                            f"model: save its state_dict)")
    if penalty_coefficients is None:
        penalty_coefficients = []
    elif isinstance(penalty_coefficients, dict):
        penalty_coefficients = list(penalty_coefficients.values())
    else:
        penalty_coefficients = list(penalty_coefficients)
    return multipliers, penalty_coefficients


def _dual_kind(dual_optimizer: Any) -> str:
    from .constrained.optim import nuPI

    if isinstance(dual_optimizer, nuPI):
        return "nupi"
    if type(dual_optimizer) is torch.optim.SGD:
        return "sgd"
    raise TypeError(f"export_constrained/restore_constrained: the dual optimizer is a "
                    f"torch.optim.SGD or a uniopt nuPI, got {type(dual_optimizer).__name__}")


def _owners(multipliers: list, dual_optimizer: Any) -> list:
    """Per dual-optimizer group, the indices of its parameters' multipliers (checked)."""
    index = {id(m.weight): i for i, m in enumerate(multipliers)}
    groups = []
    for k, g in enumerate(dual_optimizer.param_groups):
        owners = []
        for p in g["params"]:
            if id(p) not in index:
                raise CheckpointError(f"dual optimizer group {k} steps a parameter that is no "
                                      f"given multiplier's weight")
            owners.append(index[id(p)])
        groups.append(owners)
    return groups


def _type_name(m: Any) -> str:
    return "none" if m.constraint_type is None else m.constraint_type.name.lower()


def _penalty_kind(c: Any) -> str:
    from .constrained.penalty_coefficients import IndexedPenaltyCoefficient, PenaltyCoefficient

    if not isinstance(c, PenaltyCoefficient):
        raise TypeError(f"expected a PenaltyCoefficient, got {type(c).__name__}")
    return "indexed" if isinstance(c, IndexedPenaltyCoefficient) else "dense"


def export_constrained(multipliers: Any, dual_optimizer: Any, *, penalty_coefficients: Any = None,
                       step: int = -1) -> dict:
    """The ``"uniopt.constrained/1"`` checkpoint of Cooper-style constrained learning.

    Args:
      multipliers: a ``ConstrainedMinimizationProblem`` (its constraints' multipliers and
        penalty coefficients, in registration order), or the multipliers (a list, or a dict:
        its values' order): ``DenseMultiplier`` / ``IndexedMultiplier`` (an
        ``ImplicitMultiplier`` is a model, out of scope: ``TypeError``).
      dual_optimizer: the dual optimizer over the multipliers' weights: a
        ``torch.optim.SGD`` (``maximize=True``, with or without momentum) or a uniopt
        ``nuPI`` (scalar gains).
      penalty_coefficients: the penalty coefficients (a list or dict; default: the CMP's, or
        none).
      step: the number of dual updates to record (torch does not count them; ``-1``).

    Returns:
      the checkpoint (NumPy arrays, copied to the host); an ``IndexedMultiplier``'s ``(m, 1)``
      weight and its state are stored flat, ``(m,)``.
    """
    from .constrained.multipliers import IndexedMultiplier
    from uniopt.constrained import MASK_KEY

    multipliers, penalties = _constrained_pieces(multipliers, penalty_coefficients)
    kind = _dual_kind(dual_optimizer)
    owners = _owners(multipliers, dual_optimizer)
    groups = []
    for g, own in zip(dual_optimizer.param_groups, owners):
        group = {k: _numpy(v) for k, v in g.items() if k != "params"}
        if kind == "nupi":
            for key in ("Kp", "Ki"):
                if np.size(group[key]) != 1:
                    raise CheckpointError("export_constrained: per-entry nuPI gains are not in the "
                                          "'uniopt.constrained/1' format")
                group[key] = float(np.asarray(group[key]).reshape(-1)[0])
            group["init_type"] = g["init_type"].name.lower()
        group["params"] = own
        groups.append(group)
    state = {}
    for i, m in enumerate(multipliers):
        s = dual_optimizer.state.get(m.weight)
        if not s:
            continue
        if kind == "sgd":
            if s.get("momentum_buffer") is not None:
                state[i] = {"momentum_buffer": _numpy(s["momentum_buffer"])}
        elif "xi" in s:
            xi = _numpy(s["xi"])
            mask = s.get(MASK_KEY)
            state[i] = {"xi": xi, "needs_error_initialization_mask":
                        np.zeros(xi.shape, bool) if mask is None else _numpy(mask).astype(bool)}
    parts = [{"kind": "indexed" if isinstance(m, IndexedMultiplier) else "dense",
              "constraint_type": _type_name(m), "weight": _numpy(m.weight)} for m in multipliers]
    host = lambda t: t.detach().cpu().numpy().copy()  # noqa: E731 (0-d kept as arrays, dtype kept)
    pens = [{"kind": _penalty_kind(c), "value": host(c.value), "init": host(c.init)}
            for c in penalties]
    return _ckpt.constrained_from_parts(kind, parts, groups, state, pens, step=step)


def restore_constrained(multipliers: Any, dual_optimizer: Any, ckpt: dict, *,
                        penalty_coefficients: Any = None) -> Any:
    """Restore a ``"uniopt.constrained/1"`` checkpoint (from any face) in place.

    The multipliers' weights (and the penalty coefficients' values and initial values) take the
    checkpoint's values, in their own shape, dtype and device; the dual optimizer (of the
    checkpoint's kind: ``torch.optim.SGD`` for ``"sgd"``, uniopt's ``nuPI`` for ``"nupi"``)
    takes its hyper-parameters and state through ``load_state_dict``. Everything is checked
    first (``CheckpointError``): the family and kind, the multipliers' number, kinds and
    sizes, their constraint types (where both are known), the dual optimizer's groups (the
    same multipliers in the same order, or any grouping when the checkpoint's groups share
    their hyper-parameters, as a JAX one's). A multiplier without a constraint type takes the
    checkpoint's.

    Args:
      multipliers: as :func:`export_constrained` (a CMP, a list or a dict).
      dual_optimizer: the dual optimizer over their weights.
      ckpt: the checkpoint.
      penalty_coefficients: as :func:`export_constrained`.

    Returns:
      ``dual_optimizer``.
    """
    from .constrained.multipliers import IndexedMultiplier
    from uniopt.constrained import MASK_KEY

    parts = _ckpt.constrained_to_parts(ckpt)
    multipliers, penalties = _constrained_pieces(multipliers, penalty_coefficients)
    kind = _dual_kind(dual_optimizer)
    if kind != parts["optimizer"]:
        raise CheckpointError(f"cannot restore a {parts['optimizer']!r} dual optimizer checkpoint "
                              f"into {type(dual_optimizer).__name__}")
    theirs = parts["multipliers"]
    if len(theirs) != len(multipliers):
        raise CheckpointError(f"checkpoint has {len(theirs)} multipliers, the target {len(multipliers)}")
    for i, (t, m) in enumerate(zip(theirs, multipliers)):
        mine = "indexed" if isinstance(m, IndexedMultiplier) else "dense"
        if t["kind"] != mine or t["weight"].size != m.weight.numel():
            raise CheckpointError(f"checkpoint multiplier {i}: {t['kind']} of size {t['weight'].size}, "
                                  f"the target's {mine} of size {m.weight.numel()}")
        if t["constraint_type"] != _type_name(m) and "none" not in (t["constraint_type"], _type_name(m)):
            raise CheckpointError(f"checkpoint multiplier {i} is an {t['constraint_type']} "
                                  f"multiplier, the target's {_type_name(m)}")
    _check_pens(parts["penalty_coefficients"], penalties, _penalty_kind,
                lambda c: tuple(c.value.shape))
    owners = _owners(multipliers, dual_optimizer)
    sources = _ckpt._groups_for(parts["groups"], owners, "the dual optimizer's")
    sd = dual_optimizer.state_dict()
    state = {}
    order = [i for own in owners for i in own]  # state_dict index -> multiplier index
    for n, i in enumerate(order):
        s = parts["state"].get(i)
        if not s:
            continue
        w = multipliers[i].weight
        as_w = {b: torch.from_numpy(np.array(v)).reshape(w.shape) for b, v in s.items()}
        if kind == "sgd":
            state[n] = {"momentum_buffer": as_w["momentum_buffer"].to(w.dtype)}
        else:
            state[n] = {"xi": as_w["xi"].to(w.dtype)}
            mask = as_w["needs_error_initialization_mask"]
            if bool(mask.any()):
                state[n][MASK_KEY] = mask
    new_groups = []
    for g, t in zip(sd["param_groups"], sources):
        group = dict(g)
        for h in _ckpt._CONSTRAINED_HYPER[kind]:
            group[h] = t[h]
        if kind == "nupi":
            from .constrained.optim.torch_optimizers import nuPIInitType

            group["init_type"] = nuPIInitType[t["init_type"].upper()]
            group["Kp"] = torch.tensor(t["Kp"], dtype=torch.float64)
            group["Ki"] = torch.tensor(t["Ki"], dtype=torch.float64)
        if "nonfinite_skips" in t and "nonfinite_skips" in g:
            group["nonfinite_skips"] = t["nonfinite_skips"]
        new_groups.append(group)
    dual_optimizer.load_state_dict({"state": state, "param_groups": new_groups})
    with torch.no_grad():
        for t, m in zip(theirs, multipliers):
            m.weight.copy_(torch.from_numpy(np.array(t["weight"])).reshape(m.weight.shape))
    for t, m in zip(theirs, multipliers):
        if m.constraint_type is None and t["constraint_type"] != "none":
            from .constrained.utils import ConstraintType

            m.set_constraint_type(ConstraintType[t["constraint_type"].upper()])
    with torch.no_grad():
        for t, c in zip(parts["penalty_coefficients"], penalties):
            c.value = torch.from_numpy(np.array(t["value"])).to(device=c.value.device, dtype=c.value.dtype)
            c.init = torch.from_numpy(np.array(t["init"])).to(device=c.init.device, dtype=c.init.dtype)
    return dual_optimizer


def _check_pens(theirs: list, mine: list, kind_of, shape_of) -> None:
    if len(theirs) != len(mine):
        raise CheckpointError(f"checkpoint has {len(theirs)} penalty coefficients, the target {len(mine)}")
    for j, (t, c) in enumerate(zip(theirs, mine)):
        if not bool(np.all(t["value"] >= 0)) or not bool(np.all(t["init"] >= 0)):
            raise CheckpointError(f"checkpoint penalty coefficient {j} has negative entries")
        if t["kind"] != kind_of(c) or t["value"].shape != shape_of(c):
            raise CheckpointError(f"checkpoint penalty coefficient {j}: {t['kind']} of shape "
                                  f"{t['value'].shape}, the target's {kind_of(c)} of shape {shape_of(c)}")
