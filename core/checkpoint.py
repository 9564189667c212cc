r"""Portable checkpoints: one documented state format per family, readable without torch or JAX.

A checkpoint is a flat ``dict`` of NumPy arrays and Python scalars (``str``, ``bool``, ``int``,
``float``) with a ``"format"`` key naming its family and version:

============================  =====================================================================
``"uniopt.qhm/1"``            :class:`uniopt.QHM`, ``uniopt.adapters.torch.QHM``,
                              ``uniopt.adapters.jax.qhm``
``"uniopt.qhadam/1"``         QHAdam and QHAdamW (``decouple_weight_decay`` tells them apart)
``"uniopt.polyak/1"``         :class:`uniopt.PolyakSGD`, ``uniopt.adapters.torch.PolyakSGD``,
                              ``uniopt.adapters.jax.polyak_sgd``
``"uniopt.ialm/1"``           :class:`uniopt.iALM`, ``uniopt.adapters.torch.iALM``,
                              ``uniopt.adapters.jax.ialm``
``"uniopt.constrained/1"``    constrained learning (Cooper): Dense/Indexed multipliers, penalty
                              coefficients, the dual optimizer (projected SGD ascent or nuPI)
============================  =====================================================================

Keys common to every family:

* ``format`` (str), ``step`` (int: the number of updates made, ``-1`` when the face that wrote
  it does not count them), ``n_groups`` (int);
* per parameter group ``k``: ``group{k}.<hyper-parameter>`` (the torch/NumPy names:
  ``lr``, ``momentum``, ``betas``, ...), ``group{k}.params`` (int64 array: the indices of the
  group's parameters in parameter order; not for iALM) and ``group{k}.nonfinite_skips`` (int,
  only when the optimizer keeps that counter);
* per parameter ``i`` (QH, Polyak): ``n_params`` and ``param{i}.<buffer>`` with the state
  buffer names of the torch/NumPy optimizers (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
  ``beta1_weight``, ``beta2_weight``, ``velocity``), shaped like the parameter, in its dtype. A
  parameter that has not been stepped yet has no buffer keys (its state is the initial one).

``"uniopt.constrained/1"`` (the dual side of constrained learning) has its own keys:
``optimizer`` (``"sgd"``: ``torch.optim.SGD(maximize=True)`` / projected ascent, or
``"nupi"``), ``n_multipliers`` and per multiplier ``i`` ``multiplier{i}.kind`` (``"dense"`` /
``"indexed"``), ``multiplier{i}.constraint_type`` (``"inequality"`` / ``"equality"`` /
``"none"``), ``multiplier{i}.weight`` (1-D: an indexed torch ``(m, 1)`` table is stored flat)
and the dual optimizer's buffers ``multiplier{i}.momentum_buffer`` (SGD with momentum) or
``multiplier{i}.xi`` and ``multiplier{i}.needs_error_initialization_mask`` (nuPI; bool: the
entries whose first step is still to come), shaped as the weight; the groups'
``group{k}.params`` index the multipliers and their hyper-parameters are SGD's (``lr``,
``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``) or nuPI's (``lr``,
``weight_decay``, ``Kp``, ``Ki``, ``ema_nu``, ``init_type`` as ``"sgd"``/``"zeros"``,
``maximize``); ``n_penalty_coefficients`` and per coefficient ``j``
``penalty_coefficient{j}.kind``, ``.value`` and ``.init`` (0-d or 1-D). The NumPy face's
converters are :func:`export_constrained` / :func:`restore_constrained`, the framework-free
helpers :func:`constrained_from_parts` / :func:`constrained_to_parts`.

The family tables are in ``docs/checkpoints.md`` and in :data:`FAMILIES`. :func:`save` writes
a checkpoint as an ``.npz`` file (strings as unicode arrays, no pickle) and :func:`load` reads
it back with ``allow_pickle=False``: reading a checkpoint needs NumPy only.

The NumPy face's converters are here: :func:`export` / :func:`restore` for :class:`uniopt.QHM`,
:class:`uniopt.QHAdam`, :class:`uniopt.QHAdamW`, :class:`uniopt.iALM` and the
:class:`uniopt.PolyakSGD` solver. The torch and JAX faces have theirs in
``uniopt.adapters.torch.checkpoint`` and ``uniopt.adapters.jax.checkpoint``; all of them go
through the framework-free helpers :func:`from_state_dict` / :func:`to_state_dict` (QH,
Polyak: torch's ``state_dict`` layout over NumPy arrays) and :func:`ialm_from_groups` /
:func:`ialm_to_groups`.

Example:
  >>> import numpy as np, uniopt
  >>> from uniopt import checkpoint
  >>> x = np.array([1.0, -2.0])
  >>> opt = uniopt.QHM([x], lr=0.1, momentum=0.9, nu=0.7)
  >>> opt.step([2 * x])
  >>> ckpt = checkpoint.export(opt)
  >>> ckpt["format"], ckpt["step"], ckpt["param0.momentum_buffer"].round(12).tolist()
  ('uniopt.qhm/1', -1, [0.2, -0.4])
  >>> y = x.copy()
  >>> opt2 = checkpoint.restore(uniopt.QHM([y], lr=1.0, momentum=0.0, nu=1.0), ckpt)
  >>> opt2.param_groups[0]["lr"]
  0.1
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import numpy as np

__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "CheckpointError",
    "save",
    "load",
    "validate",
    "family_of",
    "from_state_dict",
    "to_state_dict",
    "ialm_from_groups",
    "ialm_to_groups",
    "export",
    "restore",
    "constrained_from_parts",
    "constrained_to_parts",
    "export_constrained",
    "restore_constrained",
]

#: The version every format string carries (``"uniopt.<family>/1"``).
FORMAT_VERSION = 1

_FLOAT, _BOOL, _STR, _PAIR = "float", "bool", "str", "pair"


@dataclasses.dataclass(frozen=True)
class _Family:
    """One family's format: group hyper-parameters (name -> kind) and per-parameter buffers."""

    name: str
    hyper: dict
    buffers: tuple  # per-parameter (QH, Polyak) or per-group (iALM) arrays
    scalars: tuple = ()  # per-parameter float scalars
    top: dict = dataclasses.field(default_factory=dict)  # optimizer-wide settings

    @property
    def format(self) -> str:
        return f"uniopt.{self.name}/{FORMAT_VERSION}"


#: The formats, by family name.
FAMILIES = {
    "qhm": _Family("qhm", {"lr": _FLOAT, "momentum": _FLOAT, "nu": _FLOAT,
                           "weight_decay": _FLOAT, "weight_decay_type": _STR, "maximize": _BOOL},
                   ("momentum_buffer",)),
    "qhadam": _Family("qhadam", {"lr": _FLOAT, "betas": _PAIR, "nus": _PAIR, "weight_decay": _FLOAT,
                                 "decouple_weight_decay": _BOOL, "eps": _FLOAT, "maximize": _BOOL},
                      ("exp_avg", "exp_avg_sq"), ("beta1_weight", "beta2_weight")),
    "polyak": _Family("polyak", {"fun_min": _FLOAT, "variant": _STR, "max_stepsize": _FLOAT,
                                 "delta": _FLOAT, "momentum": _FLOAT, "lr": _FLOAT},
                      ("velocity",)),
    "ialm": _Family("ialm", {"name": _STR, "beta": _FLOAT, "sigma": _FLOAT, "gamma": _FLOAT,
                             "momentum": _FLOAT, "dampening": _FLOAT, "dual_range": _PAIR,
                             "is_ineq": _BOOL},
                    ("duals", "momentum_buffer"), (), {"penalty": _FLOAT, "ctol": _FLOAT}),
    # the group hyper-parameters depend on the dual optimizer: see _CONSTRAINED_HYPER
    "constrained": _Family("constrained", {}, ("momentum_buffer", "xi", "needs_error_initialization_mask"),
                           (), {"optimizer": _STR}),
}

#: The constrained family's group hyper-parameters per dual optimizer (``"optimizer"`` key):
#: torch.optim.SGD's (Cooper's projected ascent) and nuPI's, under the torch names.
_CONSTRAINED_HYPER = {
    "sgd": {"lr": _FLOAT, "momentum": _FLOAT, "dampening": _FLOAT, "weight_decay": _FLOAT,
            "nesterov": _BOOL, "maximize": _BOOL},
    "nupi": {"lr": _FLOAT, "weight_decay": _FLOAT, "Kp": _FLOAT, "Ki": _FLOAT, "ema_nu": _FLOAT,
             "init_type": _STR, "maximize": _BOOL},
}
#: The dual optimizer's state buffers per multiplier, per dual optimizer.
_CONSTRAINED_BUFFERS = {"sgd": ("momentum_buffer",),
                        "nupi": ("xi", "needs_error_initialization_mask")}
_MULTIPLIER_KINDS = ("dense", "indexed")
_CONSTRAINT_TYPES = ("inequality", "equality", "none")

_FORMAT_RE = re.compile(r"^uniopt\.([a-z_]+)/(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the optimizer it is restored into."""


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------
def _scalar(value: Any) -> Any:
    """A 0-d array or NumPy scalar as the Python scalar; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _array(value: Any) -> np.ndarray:
    """An owned, C-contiguous copy of ``value`` (a NumPy array or anything ``np.array`` takes)."""
    return np.array(value, copy=True, order="C")


def _pair(value: Any) -> np.ndarray:
    """A pair of floats as a float64 array of shape (2,); ``None`` entries (unbounded ends of
    a ``dual_range``) as ``-inf`` (first) and ``+inf`` (second)."""
    value = list(value)
    out = np.array([(-np.inf if i == 0 else np.inf) if v is None else float(v)
                    for i, v in enumerate(value)], dtype=np.float64)
    if out.shape != (2,):
        raise CheckpointError(f"expected a pair of numbers, got {value!r}")
    return out


def _kind(key: str, kind: str, value: Any) -> Any:
    """A hyper-parameter as the format keeps it (checked)."""
    value = _scalar(value)
    if kind == _PAIR:
        return _pair(value)
    if kind == _STR:
        if not isinstance(value, str):
            raise CheckpointError(f"checkpoint key {key!r}: expected a str, got {value!r}")
        return value
    if kind == _BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise CheckpointError(f"checkpoint key {key!r}: expected a bool, got {value!r}")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"checkpoint key {key!r}: expected a number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def family_of(ckpt: Any) -> _Family:
    """The :data:`FAMILIES` entry of ``ckpt``'s ``"format"`` (checked).

    Raises:
      CheckpointError: not a mapping, no ``format`` key, a format string that is not
        ``"uniopt.<family>/<version>"``, an unknown family or an unsupported version.
    """
    if not hasattr(ckpt, "keys"):
        raise CheckpointError(f"a checkpoint is a dict of arrays and scalars, got {type(ckpt).__name__}")
    if "format" not in ckpt:
        raise CheckpointError("not a uniopt checkpoint: it has no 'format' key")
    fmt = _scalar(ckpt["format"])
    match = _FORMAT_RE.match(fmt) if isinstance(fmt, str) else None
    if match is None:
        raise CheckpointError(f"Invalid checkpoint format: {fmt!r} (expected 'uniopt.<family>/<version>', "
                              f"e.g. 'uniopt.qhm/1')")
    name, version = match.group(1), int(match.group(2))
    if name not in FAMILIES:
        raise CheckpointError(f"Invalid checkpoint format: {fmt!r} (unknown family {name!r}; expected "
                              f"one of {sorted(FAMILIES)})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"Unsupported checkpoint version: {fmt!r} (this uniopt reads version "
                              f"{FORMAT_VERSION})")
    return FAMILIES[name]


def _need(ckpt, keys) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {_scalar(ckpt['format'])!r} is missing keys {missing}")


def _int(ckpt, key: str) -> int:
    value = _scalar(ckpt[key])
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CheckpointError(f"checkpoint key {key!r}: expected an int, got {value!r}")
    return int(value)


def validate(ckpt: Any) -> dict:
    """Check ``ckpt`` against its format; return it normalised (a new dict, arrays copied).

    Normalised: scalars as Python ``str``/``bool``/``int``/``float``, pairs (``betas``,
    ``nus``, ``dual_range``) as float64 arrays of shape (2,), buffers as owned arrays.

    Raises:
      CheckpointError (a ``ValueError``): a wrong format string or version, a missing key, a
        value of the wrong kind, buffers whose shapes disagree with each other (per parameter
        or group), a parameter in no group or in two.
    """
    fam = family_of(ckpt)
    if fam.name == "constrained":
        return _validate_constrained(ckpt)
    _need(ckpt, ["step", "n_groups"] + list(fam.top))
    out: dict = {"format": fam.format, "step": _int(ckpt, "step"), "n_groups": _int(ckpt, "n_groups")}
    n_groups = out["n_groups"]
    if n_groups < 1:
        raise CheckpointError(f"checkpoint key 'n_groups': expected >= 1, got {n_groups}")
    for key, kind in fam.top.items():
        value = _scalar(ckpt[key])
        out[key] = float("nan") if value is None else _kind(key, kind, value)
    for k in range(n_groups):
        keys = [f"group{k}.{h}" for h in fam.hyper]
        if fam.name == "ialm":
            keys += [f"group{k}.{b}" for b in fam.buffers]
        else:
            keys.append(f"group{k}.params")
        _need(ckpt, keys)
        for h, kind in fam.hyper.items():
            out[f"group{k}.{h}"] = _kind(f"group{k}.{h}", kind, ckpt[f"group{k}.{h}"])
        if f"group{k}.nonfinite_skips" in ckpt:
            out[f"group{k}.nonfinite_skips"] = _int(ckpt, f"group{k}.nonfinite_skips")
        if fam.name == "ialm":
            duals, buf = (_array(ckpt[f"group{k}.{b}"]) for b in fam.buffers)
            if duals.ndim != 1 or buf.shape != duals.shape:
                raise CheckpointError(f"checkpoint group {k}: duals of shape {duals.shape} and "
                                      f"momentum_buffer of shape {buf.shape} (expected equal 1-D shapes)")
            if duals.dtype not in (np.float32, np.float64) or buf.dtype != duals.dtype:
                raise CheckpointError(f"checkpoint group {k}: duals/momentum_buffer of dtype "
                                      f"{duals.dtype}/{buf.dtype} (expected float32 or float64)")
            out[f"group{k}.duals"], out[f"group{k}.momentum_buffer"] = duals, buf
        else:
            idx = np.asarray(ckpt[f"group{k}.params"])
            if idx.ndim != 1 or idx.dtype.kind not in "iu":
                raise CheckpointError(f"checkpoint key 'group{k}.params': expected a 1-D int array")
            out[f"group{k}.params"] = idx.astype(np.int64)
    if fam.name == "ialm":
        return out
    _need(ckpt, ["n_params"])
    n_params = out["n_params"] = _int(ckpt, "n_params")
    seen = np.concatenate([out[f"group{k}.params"] for k in range(n_groups)])
    if sorted(seen.tolist()) != list(range(n_params)):
        raise CheckpointError(f"checkpoint: the groups' params {[out[f'group{k}.params'].tolist() for k in range(n_groups)]} "
                              f"are not each of the {n_params} parameters exactly once")
    for i in range(n_params):
        present = [b for b in fam.buffers + fam.scalars if f"param{i}.{b}" in ckpt]
        if present and len(present) != len(fam.buffers) + len(fam.scalars):
            missing = [f"param{i}.{b}" for b in fam.buffers + fam.scalars if b not in present]
            raise CheckpointError(f"checkpoint {fam.format!r} is missing keys {missing}")
        shape = None
        for b in fam.buffers:
            key = f"param{i}.{b}"
            if key in ckpt:
                a = _array(ckpt[key])
                if a.dtype.kind != "f":
                    raise CheckpointError(f"checkpoint key {key!r}: dtype {a.dtype} (expected floats)")
                if shape is not None and a.shape != shape:
                    raise CheckpointError(f"checkpoint key {key!r}: shape {a.shape} != {shape} of "
                                          f"param{i}'s other buffers")
                shape = a.shape
                out[key] = a
        for s in fam.scalars:
            key = f"param{i}.{s}"
            if key in ckpt:
                out[key] = _kind(key, _FLOAT, ckpt[key])
    return out


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def save(path: Any, ckpt: dict) -> None:
    """Write ``ckpt`` (validated first) to ``path`` as an uncompressed ``.npz`` (no pickle).

    Strings are stored as unicode arrays, scalars as 0-d arrays. ``path`` gets no ``.npz``
    suffix added when it has one already (NumPy adds it otherwise).
    """
    ckpt = validate(ckpt)
    arrays = {}
    for key, value in ckpt.items():
        a = np.asarray(value)
        if a.dtype == object:  # pragma: no cover (validate allows no object values)
            raise CheckpointError(f"checkpoint key {key!r}: {value!r} cannot be stored without pickle")
        arrays[key] = a
    np.savez(os.fspath(path) if not hasattr(path, "write") else path, **arrays)


def load(path: Any) -> dict:
    """Read a checkpoint written by :func:`save` (``allow_pickle=False``), validated.

    Raises:
      CheckpointError: the file is not a valid checkpoint (see :func:`validate`).
    """
    with np.load(path, allow_pickle=False) as data:
        raw = {key: data[key] for key in data.files}
    return validate(raw)


# ----------------------------------------------------------------------------------------------
# torch's state_dict layout <-> the format (QH, Polyak); arrays are NumPy here
# ----------------------------------------------------------------------------------------------
def _family_name(name: str) -> _Family:
    if name not in FAMILIES:
        raise ValueError(f"Invalid family: {name!r} (expected one of {sorted(FAMILIES)})")
    return FAMILIES[name]


def from_state_dict(family: str, state_dict: dict, *, step: int = -1) -> dict:
    """A checkpoint from a torch-layout state dict whose tensors are NumPy arrays already.

    ``state_dict``: ``{"state": {index: {buffer: array or float}}, "param_groups": [{...,
    "params": [indices]}]}`` (the layout of ``torch.optim.Optimizer.state_dict`` and of
    uniopt's NumPy optimizers). Keys of the groups that are not in the family's table are
    ignored, except ``nonfinite_skips``.
    """
    fam = _family_name(family)
    groups = state_dict["param_groups"]
    ckpt: dict = {"format": fam.format, "step": int(step), "n_groups": len(groups)}
    n_params = 0
    for k, group in enumerate(groups):
        for h in fam.hyper:
            if h not in group:
                if fam.name == "polyak" and h == "lr":
                    ckpt[f"group{k}.lr"] = 1.0
                    continue
                raise CheckpointError(f"param group {k} has no {h!r}")
            value = group[h]
            ckpt[f"group{k}.{h}"] = value.item() if hasattr(value, "item") and np.size(value) == 1 else value
        if "nonfinite_skips" in group:
            ckpt[f"group{k}.nonfinite_skips"] = int(group["nonfinite_skips"])
        ckpt[f"group{k}.params"] = np.array(group["params"], dtype=np.int64)
        n_params += len(group["params"])
    ckpt["n_params"] = n_params
    for index, state in state_dict["state"].items():
        i = int(index)
        if not state:
            continue
        for b in fam.buffers:
            if b in state:
                ckpt[f"param{i}.{b}"] = _array(state[b])
        for s in fam.scalars:
            if s in state:
                ckpt[f"param{i}.{s}"] = float(_scalar(state[s]))
    return validate(ckpt)


def _hyper_value(kind: str, value: Any) -> Any:
    if kind == _PAIR:
        return tuple(float(v) for v in value.tolist())
    return value


def to_state_dict(ckpt: dict, shapes: list | None = None) -> dict:
    """The torch-layout state dict (NumPy arrays) of a QH or Polyak checkpoint (validated).

    Args:
      ckpt: the checkpoint.
      shapes: the shapes of the target's parameters in parameter order: each buffer is checked
        against its parameter's shape (``CheckpointError`` naming both), and their number
        against ``n_params``.
    """
    ckpt = validate(ckpt)
    fam = family_of(ckpt)
    if fam.name == "ialm":
        raise CheckpointError("an iALM checkpoint has no parameter state dict: use ialm_to_groups")
    if shapes is not None:
        if len(shapes) != ckpt["n_params"]:
            raise CheckpointError(f"checkpoint has {ckpt['n_params']} parameters, the optimizer "
                                  f"{len(shapes)}")
        for i, shape in enumerate(shapes):
            for b in fam.buffers:
                key = f"param{i}.{b}"
                if key in ckpt and tuple(ckpt[key].shape) != tuple(shape):
                    raise CheckpointError(f"checkpoint key {key!r}: shape {tuple(ckpt[key].shape)} "
                                          f"!= parameter {i}'s shape {tuple(shape)}")
    groups = []
    for k in range(ckpt["n_groups"]):
        group = {h: _hyper_value(kind, ckpt[f"group{k}.{h}"]) for h, kind in fam.hyper.items()}
        if f"group{k}.nonfinite_skips" in ckpt:
            group["nonfinite_skips"] = ckpt[f"group{k}.nonfinite_skips"]
        group["params"] = ckpt[f"group{k}.params"].tolist()
        groups.append(group)
    state = {}
    for i in range(ckpt["n_params"]):
        entry = {b: ckpt[f"param{i}.{b}"] for b in fam.buffers if f"param{i}.{b}" in ckpt}
        entry.update({s: ckpt[f"param{i}.{s}"] for s in fam.scalars if f"param{i}.{s}" in ckpt})
        if entry:
            state[i] = entry
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# iALM's groups <-> the format
# ----------------------------------------------------------------------------------------------
def ialm_from_groups(groups: list, penalty: Any, ctol: float, *, step: int = -1) -> dict:
    """An iALM checkpoint from groups ``{"name", "beta", "sigma", "gamma", "momentum",
    "dampening", "dual_range", "is_ineq", "duals", "momentum_buffer"}`` (NumPy arrays).

    ``penalty=None`` (each group's ``beta``) is stored as NaN.
    """
    fam = FAMILIES["ialm"]
    ckpt: dict = {"format": fam.format, "step": int(step), "n_groups": len(groups),
                  "penalty": float("nan") if penalty is None else float(penalty),
                  "ctol": float(ctol)}
    for k, g in enumerate(groups):
        for h in fam.hyper:
            value = g[h]
            ckpt[f"group{k}.{h}"] = value.item() if hasattr(value, "item") and np.size(value) == 1 else value
        for b in fam.buffers:
            ckpt[f"group{k}.{b}"] = _array(g[b]).reshape(-1)
        if "nonfinite_skips" in g:
            ckpt[f"group{k}.nonfinite_skips"] = int(g["nonfinite_skips"])
    return validate(ckpt)


def ialm_to_groups(ckpt: dict, sizes: list | None = None) -> tuple:
    """``(penalty, ctol, groups)`` of an iALM checkpoint (validated); ``penalty`` None for NaN.

    ``groups``: one dict per group, as :func:`ialm_from_groups` takes them (``dual_range`` a
    tuple with ``None`` for unbounded). ``sizes`` (the target's group sizes), when given, must
    match the checkpoint's.
    """
    ckpt = validate(ckpt)
    fam = family_of(ckpt)
    if fam.name != "ialm":
        raise CheckpointError(f"expected an iALM checkpoint, got {ckpt['format']!r}")
    groups = []
    for k in range(ckpt["n_groups"]):
        g = {h: _hyper_value(kind, ckpt[f"group{k}.{h}"]) for h, kind in fam.hyper.items()}
        g.update({b: ckpt[f"group{k}.{b}"] for b in fam.buffers})
        if f"group{k}.nonfinite_skips" in ckpt:
            g["nonfinite_skips"] = ckpt[f"group{k}.nonfinite_skips"]
        groups.append(g)
    if sizes is not None:
        theirs = [g["duals"].size for g in groups]
        if list(sizes) != theirs:
            raise CheckpointError(f"checkpoint has iALM groups of sizes {theirs}, the optimizer {list(sizes)}")
    penalty = None if math.isnan(ckpt["penalty"]) else ckpt["penalty"]
    return penalty, ckpt["ctol"], groups


def _expect(ckpt: dict, names: tuple, what: str) -> _Family:
    fam = family_of(ckpt)
    if fam.name not in names:
        raise CheckpointError(f"cannot restore a {ckpt['format']!r} checkpoint into {what}")
    return fam


# ----------------------------------------------------------------------------------------------
# The NumPy face
# ----------------------------------------------------------------------------------------------
def _numpy_family(opt: Any) -> str:
    from .ialm import iALM
    from .polyak import PolyakSGD
    from .qh import QHM, QHAdam

    if isinstance(opt, QHM):
        return "qhm"
    if isinstance(opt, QHAdam):
        return "qhadam"
    if isinstance(opt, PolyakSGD):
        return "polyak"
    if isinstance(opt, iALM):
        return "ialm"
    raise TypeError(f"export/restore: expected uniopt.QHM, QHAdam, QHAdamW, PolyakSGD or iALM, "
                    f"got {type(opt).__name__}")


def _polyak_leaves(tree) -> list:
    from .polyak import _flatten

    leaves: list = []
    _flatten(tree, leaves)
    return leaves


def export(opt: Any, state: Any = None, params: Any = None, *, step: int | None = None) -> dict:
    """The portable checkpoint of a NumPy optimizer (arrays copied).

    Args:
      opt: a :class:`uniopt.QHM`, :class:`uniopt.QHAdam` / :class:`uniopt.QHAdamW`,
        :class:`uniopt.iALM`, or a :class:`uniopt.PolyakSGD` solver (then ``state`` is its
        :class:`uniopt.PolyakSGDState` and ``params`` its parameters; leaves in parameter
        order, dict keys sorted as in JAX).
      state: the solver state (PolyakSGD only).
      params: the solver's parameters (PolyakSGD only).
      step: the step count to record (default: the solver's ``iter_num``; ``-1`` for the
        optimizers, which do not count their updates).
    """
    family = _numpy_family(opt)
    if family == "ialm":
        return ialm_from_groups(opt.param_groups, opt.penalty, opt.ctol,
                                step=-1 if step is None else step)
    if family == "polyak":
        from .polyak import _Params

        if state is None or params is None:
            raise TypeError("export(PolyakSGD solver, state, params): the solver's state and "
                            "parameters are needed")
        hyper = {"fun_min": opt.fun_min, "variant": opt.variant, "max_stepsize": opt.max_stepsize,
                 "delta": opt.delta, "momentum": opt.momentum, "lr": 1.0}
        tree = _Params(params)
        velocity = [] if state.velocity is None else tree.matching(state.velocity, "velocity")
        sd = {"state": {i: {"velocity": v} for i, v in enumerate(velocity)},
              "param_groups": [{**hyper, "params": list(range(len(tree.leaves)))}]}
        return from_state_dict("polyak", sd, step=int(state.iter_num) if step is None else step)
    return from_state_dict(family, opt.state_dict(), step=-1 if step is None else step)


def restore(opt: Any, ckpt: dict, params: Any = None) -> Any:
    """Restore a checkpoint into a NumPy optimizer (arrays copied; the source is not aliased).

    The optimizer takes the checkpoint's hyper-parameters (``decouple_weight_decay`` included:
    it is a group setting, as in torch) and state; its parameters must match the checkpoint's
    in number and shape (``CheckpointError`` otherwise). For QH optimizers the group structure
    must match too (each group's parameter count), as in ``load_state_dict``. Other keys of
    the optimizer's groups are kept.

    Args:
      opt: a :class:`uniopt.QHM`, :class:`uniopt.QHAdam` / :class:`uniopt.QHAdamW`,
        :class:`uniopt.iALM`, or a :class:`uniopt.PolyakSGD` solver.
      ckpt: the checkpoint (:func:`load`'s result, or an ``export``'s).
      params: the PolyakSGD solver's parameters (their structure shapes the velocity).

    Returns:
      ``opt`` (restored in place); for a PolyakSGD solver, ``(solver, state)``: a copy of the
      solver with the checkpoint's hyper-parameters and a :class:`uniopt.PolyakSGDState` with
      its ``iter_num`` (0 when the checkpoint's step is -1) and velocity.
    """
    family = _numpy_family(opt)
    if family == "ialm":
        _expect(ckpt, ("ialm",), type(opt).__name__)
        penalty, ctol, groups = ialm_to_groups(ckpt)
        sd = {"penalty": penalty, "ctol": ctol,
              "param_groups": [{**g, "duals": np.array(g["duals"]),
                                "momentum_buffer": np.array(g["momentum_buffer"]),
                                "dtype_fixed": True} for g in groups]}
        opt.load_state_dict(sd)
        return opt
    if family == "polyak":
        from .polyak import PolyakSGDState, _Params

        _expect(ckpt, ("polyak",), "PolyakSGD")
        if params is None:
            raise TypeError("restore(PolyakSGD solver, ckpt, params): the parameters are needed")
        tree = _Params(params)
        sd = to_state_dict(ckpt, [a.shape for a in tree.leaves])
        if len(sd["param_groups"]) != 1:
            raise CheckpointError(f"a PolyakSGD solver has one group; the checkpoint has "
                                  f"{len(sd['param_groups'])}")
        g = sd["param_groups"][0]
        if g["lr"] != 1.0 and g["variant"] == "SPS+":
            raise CheckpointError("an SPS+ checkpoint with lr != 1 has no PolyakSGD solver equivalent")
        solver = dataclasses.replace(opt, fun_min=g["fun_min"], variant=g["variant"],
                                     max_stepsize=g["lr"] * g["max_stepsize"], delta=g["delta"],
                                     momentum=g["momentum"])
        velocity = None
        if solver.momentum != 0:
            velocity = tree.tree([np.array(sd["state"][i]["velocity"], dtype=tree.dtype)
                                  if i in sd["state"] else np.zeros(a.shape, tree.dtype)
                                  for i, a in enumerate(tree.leaves)])
        step = max(int(ckpt["step"]), 0)
        state = PolyakSGDState(iter_num=step, error=tree.dtype.type(np.inf),
                               value=np.float64(np.inf), aux=None, stepsize=tree.dtype.type(1.0),
                               velocity=velocity, num_fun_eval=step + 1, num_grad_eval=step)
        return solver, state
    fam = _expect(ckpt, (family,), type(opt).__name__)
    sd = to_state_dict(ckpt, [p.shape for p in opt._params])
    mine = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in mine] != [len(g["params"]) for g in sd["param_groups"]]:
        raise CheckpointError(f"checkpoint groups of {[len(g['params']) for g in sd['param_groups']]} "
                              f"parameters, the optimizer's of {[len(g['params']) for g in mine]}")
    for k, (g, theirs) in enumerate(zip(mine, sd["param_groups"])):
        if g["params"] != theirs["params"]:
            raise CheckpointError(f"checkpoint group {k} holds parameters {theirs['params']}, the "
                                  f"optimizer's {g['params']}")
    for state in sd["state"].values():
        for key in fam.buffers:
            if key in state:
                state[key] = np.array(state[key])
    sd["param_groups"] = [{**g, **theirs} for g, theirs in zip(mine, sd["param_groups"])]
    opt.load_state_dict(sd)
    return opt


# ----------------------------------------------------------------------------------------------
# Constrained learning (Cooper): multipliers, penalty coefficients, the dual optimizer
# ----------------------------------------------------------------------------------------------
def _float_vector(key: str, value: Any, ndim: tuple = (1,)) -> np.ndarray:
    a = _array(value)
    if a.dtype not in (np.float32, np.float64) or a.ndim not in ndim:
        raise CheckpointError(f"checkpoint key {key!r}: a {a.ndim}-D {a.dtype} array (expected a "
                              f"{'/'.join(f'{n}-D' for n in ndim)} float32 or float64 array)")
    return a


def _choice(key: str, value: Any, options: tuple) -> str:
    value = _kind(key, _STR, value)
    if value not in options:
        raise CheckpointError(f"checkpoint key {key!r}: {value!r} (expected one of {list(options)})")
    return value


def _validate_constrained(ckpt: Any) -> dict:
    """:func:`validate` for ``"uniopt.constrained/1"``."""
    fam = FAMILIES["constrained"]
    _need(ckpt, ["step", "n_groups", "optimizer", "n_multipliers", "n_penalty_coefficients"])
    out: dict = {"format": fam.format, "step": _int(ckpt, "step"), "n_groups": _int(ckpt, "n_groups")}
    optimizer = out["optimizer"] = _choice("optimizer", ckpt["optimizer"], tuple(_CONSTRAINED_HYPER))
    n_mult = out["n_multipliers"] = _int(ckpt, "n_multipliers")
    n_pen = out["n_penalty_coefficients"] = _int(ckpt, "n_penalty_coefficients")
    if out["n_groups"] < 1 or n_mult < 1 or n_pen < 0:
        raise CheckpointError(f"checkpoint: n_groups={out['n_groups']}, n_multipliers={n_mult}, "
                              f"n_penalty_coefficients={n_pen} (expected >= 1, >= 1, >= 0)")
    for i in range(n_mult):
        keys = [f"multiplier{i}.{k}" for k in ("kind", "constraint_type", "weight")]
        _need(ckpt, keys)
        out[keys[0]] = _choice(keys[0], ckpt[keys[0]], _MULTIPLIER_KINDS)
        out[keys[1]] = _choice(keys[1], ckpt[keys[1]], _CONSTRAINT_TYPES)
        weight = out[keys[2]] = _float_vector(keys[2], ckpt[keys[2]])
        present = [b for b in _CONSTRAINED_BUFFERS[optimizer] if f"multiplier{i}.{b}" in ckpt]
        if present and len(present) != len(_CONSTRAINED_BUFFERS[optimizer]):
            raise CheckpointError(f"checkpoint {fam.format!r} is missing keys "
                                  f"{[f'multiplier{i}.{b}' for b in _CONSTRAINED_BUFFERS[optimizer] if b not in present]}")
        for b in present:
            key = f"multiplier{i}.{b}"
            a = _array(ckpt[key])
            want = np.bool_ if b == "needs_error_initialization_mask" else weight.dtype
            if a.shape != weight.shape or a.dtype != want:
                raise CheckpointError(f"checkpoint key {key!r}: shape {a.shape}, dtype {a.dtype} "
                                      f"(expected the weight's shape {weight.shape}, dtype "
                                      f"{np.dtype(want)})")
            out[key] = a
        stray = [k for k in ckpt if k.startswith(f"multiplier{i}.")
                 and k.split(".", 1)[1] in fam.buffers and k.split(".", 1)[1] not in present]
        if stray:
            raise CheckpointError(f"checkpoint keys {stray} are not state of the {optimizer!r} dual "
                                  f"optimizer")
    hyper = _CONSTRAINED_HYPER[optimizer]
    for k in range(out["n_groups"]):
        _need(ckpt, [f"group{k}.{h}" for h in hyper] + [f"group{k}.params"])
        for h, kind in hyper.items():
            out[f"group{k}.{h}"] = _kind(f"group{k}.{h}", kind, ckpt[f"group{k}.{h}"])
        if optimizer == "nupi":
            _choice(f"group{k}.init_type", out[f"group{k}.init_type"], ("sgd", "zeros"))
        if f"group{k}.nonfinite_skips" in ckpt:
            out[f"group{k}.nonfinite_skips"] = _int(ckpt, f"group{k}.nonfinite_skips")
        idx = np.asarray(ckpt[f"group{k}.params"])
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise CheckpointError(f"checkpoint key 'group{k}.params': expected a 1-D int array")
        out[f"group{k}.params"] = idx.astype(np.int64)
    seen = np.concatenate([out[f"group{k}.params"] for k in range(out["n_groups"])])
    if sorted(seen.tolist()) != list(range(n_mult)):
        raise CheckpointError(f"checkpoint: the groups' params "
                              f"{[out[f'group{k}.params'].tolist() for k in range(out['n_groups'])]} "
                              f"are not each of the {n_mult} multipliers exactly once")
    for j in range(n_pen):
        keys = [f"penalty_coefficient{j}.{k}" for k in ("kind", "value", "init")]
        _need(ckpt, keys)
        out[keys[0]] = _choice(keys[0], ckpt[keys[0]], _MULTIPLIER_KINDS)
        value = out[keys[1]] = _float_vector(keys[1], ckpt[keys[1]], (0, 1))
        init = out[keys[2]] = _float_vector(keys[2], ckpt[keys[2]], (0, 1))
        if init.shape != value.shape or init.dtype != value.dtype:
            raise CheckpointError(f"checkpoint key {keys[2]!r}: shape {init.shape}, dtype {init.dtype} "
                                  f"(expected the value's {value.shape}, {value.dtype})")
    return out


def constrained_from_parts(optimizer: str, multipliers: list, groups: list, state: dict,
                           penalty_coefficients: list = (), *, step: int = -1) -> dict:
    """A ``"uniopt.constrained/1"`` checkpoint from framework-free parts (NumPy arrays).

    Args:
      optimizer: the dual optimizer, ``"sgd"`` (projected SGD ascent, torch.optim.SGD's
        hyper-parameters) or ``"nupi"``.
      multipliers: one dict per multiplier, in order: ``{"kind": "dense" | "indexed",
        "constraint_type": "inequality" | "equality" | "none", "weight": array}`` (flattened
        to 1-D).
      groups: the dual optimizer's groups: the hyper-parameters (torch names; nuPI's
        ``init_type`` as ``"sgd"``/``"zeros"``), ``"params"`` (the indices of the group's
        multipliers) and optionally ``"nonfinite_skips"``.
      state: ``{multiplier index: {buffer: array}}`` (``momentum_buffer``; ``xi`` and
        ``needs_error_initialization_mask``), flattened to 1-D; a multiplier without state has
        its initial one (a nuPI state equal to the initial one, ``xi`` zero and the mask the
        initialisation's, is stored as none).
      penalty_coefficients: one dict per coefficient: ``{"kind", "value", "init"}`` (0-d or
        1-D arrays).
      step: the number of dual updates (``-1``: unknown).
    """
    ckpt: dict = {"format": FAMILIES["constrained"].format, "step": int(step),
                  "optimizer": optimizer, "n_groups": len(groups),
                  "n_multipliers": len(multipliers),
                  "n_penalty_coefficients": len(penalty_coefficients)}
    if optimizer not in _CONSTRAINED_HYPER:
        raise CheckpointError(f"Invalid dual optimizer: {optimizer!r} (expected one of "
                              f"{sorted(_CONSTRAINED_HYPER)})")
    for i, m in enumerate(multipliers):
        ckpt[f"multiplier{i}.kind"] = m["kind"]
        ckpt[f"multiplier{i}.constraint_type"] = m["constraint_type"]
        ckpt[f"multiplier{i}.weight"] = _array(m["weight"]).reshape(-1)
    for k, g in enumerate(groups):
        for h in _CONSTRAINED_HYPER[optimizer]:
            if h not in g:
                raise CheckpointError(f"dual optimizer group {k} has no {h!r}")
            value = g[h]
            ckpt[f"group{k}.{h}"] = value.item() if hasattr(value, "item") and np.size(value) == 1 else value
        ckpt[f"group{k}.params"] = np.array(g["params"], dtype=np.int64)
        if "nonfinite_skips" in g:
            ckpt[f"group{k}.nonfinite_skips"] = int(g["nonfinite_skips"])
    initial = {}  # nuPI: the state a multiplier starts with (xi = 0; mask = SGD initialisation)
    if optimizer == "nupi":
        for g in groups:
            for i in g["params"]:
                initial[int(i)] = g["init_type"] == "sgd"
    for i, s in state.items():
        i = int(i)
        arrays = {b: _array(value).reshape(-1) for b, value in s.items()}
        if (i in initial and "xi" in arrays and not arrays["xi"].any()
                and bool(np.all(arrays.get("needs_error_initialization_mask") == initial[i]))):
            continue  # the initial state: stored as no state (one form for every face)
        for b, a in arrays.items():
            ckpt[f"multiplier{i}.{b}"] = a
    for j, c in enumerate(penalty_coefficients):
        ckpt[f"penalty_coefficient{j}.kind"] = c["kind"]
        ckpt[f"penalty_coefficient{j}.value"] = _array(c["value"])
        ckpt[f"penalty_coefficient{j}.init"] = _array(c["init"])
    return validate(ckpt)


def constrained_to_parts(ckpt: dict) -> dict:
    """The parts of a ``"uniopt.constrained/1"`` checkpoint (validated; arrays copied):
    ``{"optimizer", "step", "multipliers", "groups", "state", "penalty_coefficients"}`` as
    :func:`constrained_from_parts` takes them (``groups[k]["params"]`` a list of ints)."""
    ckpt = validate(ckpt)
    if ckpt["format"] != FAMILIES["constrained"].format:
        raise CheckpointError(f"expected a 'uniopt.constrained/1' checkpoint, got {ckpt['format']!r}")
    optimizer = ckpt["optimizer"]
    multipliers = [{"kind": ckpt[f"multiplier{i}.kind"],
                    "constraint_type": ckpt[f"multiplier{i}.constraint_type"],
                    "weight": ckpt[f"multiplier{i}.weight"]} for i in range(ckpt["n_multipliers"])]
    groups = []
    for k in range(ckpt["n_groups"]):
        g = {h: ckpt[f"group{k}.{h}"] for h in _CONSTRAINED_HYPER[optimizer]}
        g["params"] = ckpt[f"group{k}.params"].tolist()
        if f"group{k}.nonfinite_skips" in ckpt:
            g["nonfinite_skips"] = ckpt[f"group{k}.nonfinite_skips"]
        groups.append(g)
    state = {}
    for i in range(ckpt["n_multipliers"]):
        entry = {b: ckpt[f"multiplier{i}.{b}"] for b in _CONSTRAINED_BUFFERS[optimizer]
                 if f"multiplier{i}.{b}" in ckpt}
        if entry:
            state[i] = entry
    penalties = [{k: ckpt[f"penalty_coefficient{j}.{k}"] for k in ("kind", "value", "init")}
                 for j in range(ckpt["n_penalty_coefficients"])]
    return {"optimizer": optimizer, "step": ckpt["step"], "multipliers": multipliers,
            "groups": groups, "state": state, "penalty_coefficients": penalties}


def _groups_for(theirs: list, owners: list, what: str) -> list:
    """The checkpoint group each target group takes its hyper-parameters from: the same group
    when both hold the same multipliers; else, when every checkpoint group has the same
    hyper-parameters (e.g. one written by JAX, whose transforms have one set), that one."""
    if owners == [g["params"] for g in theirs]:
        return list(theirs)
    first = {k: v for k, v in theirs[0].items() if k not in ("params", "nonfinite_skips")}
    if all({k: v for k, v in g.items() if k not in ("params", "nonfinite_skips")} == first
           for g in theirs[1:]):
        return [theirs[0]] * len(owners)
    raise CheckpointError(f"checkpoint groups hold multipliers {[g['params'] for g in theirs]} "
                          f"with different hyper-parameters, {what} {owners}")


def _check_sizes(what: str, theirs: list, mine: list) -> None:
    if list(theirs) != list(mine):
        raise CheckpointError(f"checkpoint has {what} of sizes {list(theirs)}, the target "
                              f"{list(mine)}")


def export_constrained(multipliers: Sequence, dual_optimizer: Any = None, *, lr: Any = None,
                       kinds: Sequence | None = None, constraint_types: Sequence | None = None,
                       penalty_coefficients: Sequence = (), penalty_kinds: Sequence | None = None,
                       penalty_inits: Sequence | None = None, step: int = -1) -> dict:
    """The ``"uniopt.constrained/1"`` checkpoint of the NumPy face's dual side (arrays copied).

    Args:
      multipliers: the multiplier arrays, in order (an indexed one is ``(m,)`` or ``(m, 1)``).
      dual_optimizer: a :class:`uniopt.constrained.nuPI` over exactly these arrays, or ``None``
        for :func:`uniopt.constrained.projected_ascent_` /
        :func:`~uniopt.constrained.indexed_projected_ascent_` (stateless; then ``lr`` is
        needed).
      lr: the projected ascent's step size (``dual_optimizer=None`` only).
      kinds: ``"dense"`` / ``"indexed"`` per multiplier (default all ``"dense"``).
      constraint_types: ``"inequality"`` / ``"equality"`` per multiplier; default for nuPI
        its groups' ``nonnegative`` flag; required for projected ascent.
      penalty_coefficients: the penalty coefficient arrays (0-d or 1-D), in order.
      penalty_kinds: ``"dense"`` / ``"indexed"`` per coefficient (default ``"dense"``).
      penalty_inits: their initial values (restarts); default their current values.
      step: the number of dual updates to record (``-1``: unknown).

    Raises:
      TypeError: a missing ``lr``/``constraint_types``, a ``dual_optimizer`` that is not a
        nuPI or does not hold exactly ``multipliers``.
      CheckpointError: per-entry nuPI gains (not in format version 1).
    """
    from .constrained import MASK_KEY, nuPI

    arrays = [np.asarray(m) for m in multipliers]
    kinds = ["dense"] * len(arrays) if kinds is None else list(kinds)
    if dual_optimizer is None:
        if lr is None or constraint_types is None:
            raise TypeError("export_constrained(multipliers, None, lr=..., constraint_types=...): "
                            "projected ascent keeps no hyper-parameters: give lr and "
                            "constraint_types")
        groups = [{"lr": float(lr), "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                   "nesterov": False, "maximize": True, "params": list(range(len(arrays)))}]
        return constrained_from_parts(
            "sgd", _np_multipliers(arrays, kinds, constraint_types), groups, {},
            _np_penalties(penalty_coefficients, penalty_kinds, penalty_inits), step=step)
    if not isinstance(dual_optimizer, nuPI):
        raise TypeError(f"export_constrained: expected a uniopt.constrained.nuPI or None, got "
                        f"{type(dual_optimizer).__name__}")
    if len(dual_optimizer._params) != len(arrays) or any(
            p is not a for p, a in zip(dual_optimizer._params, multipliers)):
        raise TypeError("export_constrained: the nuPI optimizer's parameters are not the given "
                        "multiplier arrays (same objects, same order)")
    groups, types = [], [None] * len(arrays)
    for g, indices in zip(dual_optimizer.param_groups, dual_optimizer._group_indices()):
        if isinstance(g["Kp"], np.ndarray) or isinstance(g["Ki"], np.ndarray):
            raise CheckpointError("export_constrained: per-entry nuPI gains are not in the "
                                  "'uniopt.constrained/1' format")
        group = {"lr": g["lr"], "weight_decay": g["weight_decay"], "Kp": g["Kp"], "Ki": g["Ki"],
                 "ema_nu": g["ema_nu"], "init_type": g["init_type"].name.lower(),
                 "maximize": g["maximize"], "params": list(indices)}
        if "nonfinite_skips" in g:
            group["nonfinite_skips"] = g["nonfinite_skips"]
        groups.append(group)
        for i in indices:
            types[i] = "inequality" if g["nonnegative"] else "equality"
    state = {}
    for i, s in dual_optimizer.state.items():
        if s and "xi" in s:
            mask = s.get(MASK_KEY)
            state[i] = {"xi": s["xi"], "needs_error_initialization_mask":
                        np.zeros(s["xi"].shape, bool) if mask is None else np.asarray(mask, bool)}
    return constrained_from_parts(
        "nupi", _np_multipliers(arrays, kinds, types if constraint_types is None else constraint_types),
        groups, state, _np_penalties(penalty_coefficients, penalty_kinds, penalty_inits), step=step)


def _np_multipliers(arrays: list, kinds: list, types: Sequence) -> list:
    types = list(types)
    if len(kinds) != len(arrays) or len(types) != len(arrays):
        raise TypeError(f"export_constrained: {len(arrays)} multipliers, {len(kinds)} kinds, "
                        f"{len(types)} constraint types")
    return [{"kind": k, "constraint_type": t, "weight": a} for a, k, t in zip(arrays, kinds, types)]


def _np_penalties(values: Sequence, kinds: Sequence | None, inits: Sequence | None) -> list:
    values = [np.asarray(v) for v in values]
    kinds = ["dense"] * len(values) if kinds is None else list(kinds)
    inits = values if inits is None else [np.asarray(v) for v in inits]
    if len(kinds) != len(values) or len(inits) != len(values):
        raise TypeError(f"export_constrained: {len(values)} penalty coefficients, {len(kinds)} "
                        f"kinds, {len(inits)} inits")
    return [{"kind": k, "value": v, "init": i} for v, k, i in zip(values, kinds, inits)]


def restore_constrained(ckpt: dict, multipliers: Sequence, dual_optimizer: Any = None, *,
                        penalty_coefficients: Sequence = ()) -> dict:
    """Restore a ``"uniopt.constrained/1"`` checkpoint into the NumPy face, in place.

    Everything is checked before anything changes. The multiplier (and penalty coefficient)
    arrays take the checkpoint's values (their own shape and dtype; the sizes must match); a
    :class:`uniopt.constrained.nuPI` takes its hyper-parameters and state (its groups must
    hold the same multipliers as the checkpoint's, or the checkpoint's groups must share their
    hyper-parameters; each group's ``nonnegative`` becomes whether its multipliers are
    inequality ones).

    Args:
      ckpt: the checkpoint.
      multipliers: the multiplier arrays (float32/float64, writeable), in order.
      dual_optimizer: a nuPI over exactly these arrays for a ``"nupi"`` checkpoint; ``None``
        for an ``"sgd"`` one (projected ascent: restored through the returned ``lr``).
      penalty_coefficients: the penalty coefficient arrays, in order (as many as stored).

    Returns:
      ``{"optimizer", "step", "lr", "kinds", "constraint_types", "nonnegative",
      "penalty_kinds", "penalty_inits"}``: what the next steps need (``lr`` of the first group;
      ``nonnegative`` per multiplier, for ``projected_ascent_(..., nonnegative=...)``;
      ``penalty_inits`` for ``update_penalty_coefficients_(..., init=...)``).

    Raises:
      CheckpointError: another family, sizes that differ, a ``"sgd"`` checkpoint with
        momentum, weight decay, nesterov or ``maximize=False`` (projected ascent has none of
        them), a dual optimizer that does not fit, a group mixing inequality and equality
        multipliers.
    """
    from .constrained import MASK_KEY, nuPI, nuPIInitType

    parts = constrained_to_parts(ckpt)
    arrays = list(multipliers)
    _check_sizes("multipliers", [m["weight"].size for m in parts["multipliers"]],
                 [np.size(a) for a in arrays])
    pens = list(penalty_coefficients)
    _check_sizes("penalty coefficients", [c["value"].size for c in parts["penalty_coefficients"]],
                 [np.size(a) for a in pens])
    nonnegative = [m["constraint_type"] == "inequality" for m in parts["multipliers"]]
    groups = parts["groups"]
    if parts["optimizer"] == "sgd":
        if dual_optimizer is not None:
            raise CheckpointError("a projected-ascent ('sgd') checkpoint restores with "
                                  "dual_optimizer=None (projected_ascent_ keeps no state)")
        for k, g in enumerate(groups):
            if g["momentum"] != 0 or g["weight_decay"] != 0 or g["nesterov"] or not g["maximize"]:
                raise CheckpointError(f"checkpoint group {k}: SGD with momentum={g['momentum']}, "
                                      f"weight_decay={g['weight_decay']}, nesterov={g['nesterov']}, "
                                      f"maximize={g['maximize']} has no NumPy equivalent "
                                      f"(projected_ascent_ is momentum 0, no decay, maximize)")
        if len({g["lr"] for g in groups}) != 1:
            raise CheckpointError(f"checkpoint groups with different lr {[g['lr'] for g in groups]}")
    else:
        if not isinstance(dual_optimizer, nuPI):
            raise CheckpointError(f"a 'nupi' checkpoint restores into a uniopt.constrained.nuPI, "
                                  f"got {type(dual_optimizer).__name__}")
        if len(dual_optimizer._params) != len(arrays) or any(
                p is not a for p, a in zip(dual_optimizer._params, arrays)):
            raise CheckpointError("restore_constrained: the nuPI optimizer's parameters are not the "
                                  "given multiplier arrays (same objects, same order)")
        mine = [list(ix) for ix in dual_optimizer._group_indices()]
        sources = _groups_for(groups, mine, "the nuPI's")
        for k, own in enumerate(mine):
            if len({nonnegative[i] for i in own}) > 1:
                raise CheckpointError(f"the nuPI's group {k} holds inequality and equality "
                                      f"multipliers (a NumPy nuPI group has one 'nonnegative')")
    for a in arrays + pens:
        if not (isinstance(a, np.ndarray) and a.flags.writeable):
            raise CheckpointError(f"restore_constrained: the targets are writeable NumPy arrays, "
                                  f"got {type(a).__name__}")
    if parts["optimizer"] == "nupi":  # load_state_dict checks everything before changing
        state = {}
        for i, s in parts["state"].items():
            shape, dtype = np.shape(arrays[i]), arrays[i].dtype
            entry = {"xi": s["xi"].reshape(shape).astype(dtype)}
            mask = s["needs_error_initialization_mask"]
            if mask.any():
                entry[MASK_KEY] = mask.reshape(shape).copy()
            state[i] = entry
        new_groups = []
        for g, theirs, own in zip(dual_optimizer.param_groups, sources, mine):
            group = {k: v for k, v in g.items() if k != "params"}
            group.update({h: theirs[h] for h in _CONSTRAINED_HYPER["nupi"]})
            group["init_type"] = nuPIInitType[theirs["init_type"].upper()]
            group["nonnegative"] = bool(own) and nonnegative[own[0]]
            if "nonfinite_skips" in theirs and "nonfinite_skips" in g:
                group["nonfinite_skips"] = theirs["nonfinite_skips"]
            group["params"] = list(range(len(g["params"])))
            new_groups.append(group)
        sd = dual_optimizer.state_dict()
        sd["param_groups"] = [{**ng, "params": old["params"]}
                              for ng, old in zip(new_groups, sd["param_groups"])]
        sd["state"] = state
        dual_optimizer.load_state_dict(sd)
    for m, a in zip(parts["multipliers"], arrays):
        a[...] = m["weight"].reshape(np.shape(a))
    for c, a in zip(parts["penalty_coefficients"], pens):
        a[...] = c["value"].reshape(np.shape(a))
    return {"optimizer": parts["optimizer"], "step": parts["step"], "lr": groups[0]["lr"],
            "kinds": [m["kind"] for m in parts["multipliers"]],
            "constraint_types": [m["constraint_type"] for m in parts["multipliers"]],
            "nonnegative": nonnegative,
            "penalty_kinds": [c["kind"] for c in parts["penalty_coefficients"]],
            "penalty_inits": [c["init"] for c in parts["penalty_coefficients"]]}
