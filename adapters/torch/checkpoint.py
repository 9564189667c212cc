r"""Portable checkpoints for the torch optimizers (the format: :mod:`uniopt.checkpoint`).

:func:`export` turns a :class:`~uniopt.adapters.torch.QHM`, :class:`~uniopt.adapters.torch.QHAdam`,
:class:`~uniopt.adapters.torch.QHAdamW`, :class:`~uniopt.adapters.torch.PolyakSGD` or
:class:`~uniopt.adapters.torch.iALM` into a checkpoint of NumPy arrays (copied to the host),
:func:`restore` puts one back (any face may have written it); :func:`from_qhoptim` and
:func:`from_humancompatible` convert the reference libraries' optimizers or state dicts.

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

__all__ = ["export", "restore", "from_qhoptim", "from_humancompatible"]


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
