"""A small torch.optim-shaped base class for optimizers over NumPy arrays.

Parameters are float32/float64 C-contiguous ndarrays updated in place. They are organised in
param groups (a list of arrays, or a list of dicts with a ``"params"`` entry and per-group
hyper-parameters), state lives in ``self.state[i]`` keyed by the parameter's position, and
``state_dict()``/``load_state_dict()`` copy (never alias) arrays.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import numpy as np

from ._validation import check_nonfinite, nonfinite_error, real

__all__ = ["Optimizer"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_param(index: int, p: Any) -> np.ndarray:
    if not isinstance(p, np.ndarray):
        raise TypeError(f"Invalid parameter at index {index}: expected a numpy.ndarray, got {type(p).__name__}")
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"Invalid parameter at index {index}: dtype {p.dtype} (expected float32 or float64)")
    if not p.flags.c_contiguous or not p.flags.writeable:
        raise ValueError(f"Invalid parameter at index {index}: must be a writeable C-contiguous array")
    return p


class Optimizer:
    """Base class: param groups, lazily created per-parameter state, state dicts.

    Subclasses set ``defaults`` and implement ``_step_group(group, indices, grads)``.

    ``nonfinite`` (``"propagate"``, ``"raise"`` or ``"skip"``) is the policy for steps whose
    gradients are not all finite (docs/faults.md). Unless it is ``"propagate"`` (then the groups
    are as before), every param group has an int ``nonfinite_skips`` counter (in the state
    dict), incremented by a skipped step.
    """

    def __init__(self, params: Iterable, defaults: dict, *, nonfinite: str = "propagate"):
        self.nonfinite = check_nonfinite(nonfinite)
        self.defaults = dict(defaults)
        if self.nonfinite != "propagate":
            self.defaults.setdefault("nonfinite_skips", 0)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        self._params: list[np.ndarray] = []
        params = list(params) if not isinstance(params, np.ndarray) else [params]
        if len(params) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    # -- groups ---------------------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """Validate a group's hyper-parameters (subclasses override)."""

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param group: {type(param_group).__name__} (expected a dict)")
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, np.ndarray) else list(params)
        start = len(self._params)
        for offset, p in enumerate(params):
            _check_param(start + offset, p)
            if any(p is q for q in self._params):
                raise ValueError("some parameters appear in more than one parameter group")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group)
        group["params"] = params
        self._params.extend(params)
        self.param_groups.append(group)

    def _group_indices(self) -> list[list[int]]:
        out, start = [], 0
        for group in self.param_groups:
            out.append(list(range(start, start + len(group["params"]))))
            start += len(group["params"])
        return out

    # -- stepping -------------------------------------------------------------------------
    def _check_grads(self, grads: Sequence) -> list:
        """Validate all gradients before anything is mutated (a failing step changes nothing)."""
        if isinstance(grads, np.ndarray):
            grads = [grads]
        grads = list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"step() got {len(grads)} gradients for {len(self._params)} parameters")
        checked = []
        for i, (p, g) in enumerate(zip(self._params, grads)):
            if g is None:
                checked.append(None)
                continue
            g = np.asarray(g)
            if g.shape != p.shape:
                raise ValueError(f"Invalid gradient at index {i}: shape {g.shape} != parameter shape {p.shape}")
            if g.dtype != p.dtype:
                raise TypeError(f"Invalid gradient at index {i}: dtype {g.dtype} != parameter dtype {p.dtype}")
            checked.append(np.ascontiguousarray(g))
        return checked

    def _nonfinite_gate(self, grads: list) -> bool:
        """Apply the ``nonfinite`` policy to checked gradients, before anything changes.

        Returns ``True`` when the step goes ahead; ``False`` when it is skipped (every group's
        ``nonfinite_skips`` was incremented). Raises ``FloatingPointError`` under ``"raise"``.
        """
        if self.nonfinite == "propagate":
            return True
        for i, g in enumerate(grads):
            values = g[1] if isinstance(g, tuple) else g  # (indices, values) of a sparse gradient
            if values is not None and not np.isfinite(values).all():
                if self.nonfinite == "raise":
                    raise nonfinite_error(type(self).__name__, f"the gradient of parameter {i}")
                for group in self.param_groups:
                    group["nonfinite_skips"] = int(group.get("nonfinite_skips", 0)) + 1
                return False
        return True

    def step(self, grads: Sequence, closure=None):
        """Update every parameter with a gradient (``None`` skips that parameter).

        Args:
          grads: one gradient (ndarray of the parameter's shape and dtype, or ``None``) per
            parameter, in the order of the param groups.
          closure: optional callable evaluated first; its result is returned.
        """
        loss = closure() if closure is not None else None
        grads = self._check_grads(grads)
        if self.nonfinite != "propagate" and not self._nonfinite_gate(grads):
            return loss
        for group, indices in zip(self.param_groups, self._group_indices()):
            for dtype in _FLOAT_DTYPES:
                same = [i for i in indices if grads[i] is not None and self._params[i].dtype == dtype]
                if same:
                    self._step_group(group, same, grads, dtype)
        return loss

    def _step_group(self, group: dict, indices: list[int], grads: list, dtype: np.dtype) -> None:
        raise NotImplementedError

    # -- state dicts ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        groups, indices = [], self._group_indices()
        for group, idx in zip(self.param_groups, indices):
            g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            g["params"] = idx
            groups.append(g)
        state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for mine, theirs in zip(self.param_groups, groups):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        new_state = {}
        for key, s in state_dict["state"].items():
            i = int(key)
            p = self._params[i]
            new_state[i] = {
                k: (np.array(v, dtype=p.dtype, copy=True).reshape(p.shape) if isinstance(v, np.ndarray) else real(k, v))
                for k, v in s.items()
            }
        for mine, theirs in zip(self.param_groups, groups):
            updated = {k: copy.deepcopy(v) for k, v in theirs.items() if k != "params"}
            self._check_group({**mine, **updated})
            mine.update(updated)
            if self.nonfinite != "propagate":
                mine["nonfinite_skips"] = int(theirs.get("nonfinite_skips", 0))
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
