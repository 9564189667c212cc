r"""Lagrange multipliers as :class:`torch.nn.Module`\ s (the names of ``cooper.multipliers``).

A multiplier holds the dual variables of one :class:`~uniopt.adapters.torch.constrained.Constraint`.
The dual optimizer is a stock :mod:`torch.optim` optimizer with ``maximize=True`` (the gradient
of the dual Lagrangian in the multipliers is the constraint violation); after each of its steps
:meth:`Multiplier.post_step_` projects inequality multipliers back onto :math:`\lambda \ge 0`
(:func:`uniopt.rules.constrained.projected`, executed with torch ops).

* :class:`DenseMultiplier`: all constraints observed at every step; ``forward()`` returns the
  whole vector.
* :class:`IndexedMultiplier`: a subset of constraints observed per step; ``forward(indices)``
  returns the sampled entries through a sparse embedding lookup, so the gradient is a sparse
  COO tensor whose rows are ``indices`` and only those rows move (optimizers that accept sparse
  gradients: SGD, Adagrad, SparseAdam, nuPI; ``torch.optim.Adam`` does not).
* :class:`ImplicitMultiplier`: a user model mapping constraint features to multiplier values.

Differences from cooper-optim 1.0.1 (docs/deviations.md): a tensor ``init`` keeps its own dtype
unless ``dtype`` is given (Cooper silently casts it to float32);
``ImplicitMultiplier.expects_constraint_features`` is defined (``True``); bad arguments raise
torch-style errors naming the argument and the value.

Example:
  >>> import torch
  >>> import uniopt.adapters.torch.constrained as cooper
  >>> lam = cooper.multipliers.DenseMultiplier(init=torch.tensor([0.5, -1.0], dtype=torch.float64))
  >>> lam.set_constraint_type(cooper.ConstraintType.EQUALITY)
  >>> lam().dtype
  torch.float64
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch

from uniopt._validation import integer

from .utils import ConstraintType, torch_rules

__all__ = ["Multiplier", "ExplicitMultiplier", "DenseMultiplier", "IndexedMultiplier", "ImplicitMultiplier"]


class Multiplier(torch.nn.Module, abc.ABC):
    """Base class of the multipliers: a module whose ``forward`` returns multiplier values.

    Attributes:
      expects_constraint_features: whether ``forward`` takes the constraint features (the
        indices of an :class:`IndexedMultiplier`, the features of an :class:`ImplicitMultiplier`).
      constraint_type: set by :meth:`set_constraint_type` (``None`` until then).
    """

    expects_constraint_features: bool
    constraint_type: Optional[ConstraintType] = None

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the current value of the multiplier."""

    @abc.abstractmethod
    def post_step_(self) -> None:
        """Called after each dual optimizer step (projection or other post-processing)."""

    def sanity_check(self) -> None:
        """Check the multiplier against its constraint type (no check by default)."""

    def set_constraint_type(self, constraint_type: ConstraintType) -> None:
        """Store the type of the constraint this multiplier belongs to, then :meth:`sanity_check`.

        Args:
          constraint_type: ``ConstraintType.EQUALITY`` or ``ConstraintType.INEQUALITY``.

        Raises:
          TypeError: ``constraint_type`` is not a :class:`ConstraintType`.
        """
        if not isinstance(constraint_type, ConstraintType):
            raise TypeError(f"Invalid constraint_type: {constraint_type!r} (expected a ConstraintType)")
        self.constraint_type = constraint_type
        self.sanity_check()


class ExplicitMultiplier(Multiplier):
    """A multiplier that stores its values in a :class:`torch.nn.Parameter` ``weight``.

    Args:
      num_constraints: number of constraints (entries of the multiplier).
      init: initial values, a 1-D tensor of shape ``(num_constraints,)``; zeros when omitted.
      device: device of the weight; ``None``: ``init``'s device, else torch's default device.
      dtype: dtype of the weight; ``None`` (the default): ``init``'s dtype when it is a
        floating-point tensor, else ``torch.float32``. (Cooper's default ``torch.float32``
        also overrides a float64 ``init``; pass ``dtype=torch.float32`` to get that.)

    Raises:
      ValueError: neither ``num_constraints`` nor ``init`` given, an ``init`` of the wrong shape
        or with a non-finite value, ``num_constraints < 1``.
      TypeError: ``num_constraints`` not an integer, ``init`` not a tensor, ``dtype`` not a
        floating-point ``torch.dtype``.
    """

    def __init__(
        self,
        num_constraints: Optional[int] = None,
        init: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.weight = self.initialize_weight(num_constraints=num_constraints, init=init, device=device, dtype=dtype)

    @staticmethod
    def initialize_weight(
        num_constraints: Optional[int],
        init: Optional[torch.Tensor],
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.nn.Parameter:
        """The multiplier's weight: a copy of ``init`` if given, else zeros of shape
        ``(num_constraints,)``. Arguments and errors as in the class docstring."""
        if num_constraints is None and init is None:
            raise ValueError("At least one of `num_constraints` and `init` must be provided.")
        if num_constraints is not None:
            num_constraints = integer("num_constraints", num_constraints, minimum=1)
        if init is not None and not isinstance(init, torch.Tensor):
            raise TypeError(f"Invalid init: {init!r} (expected a 1D torch.Tensor)")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Invalid dtype: {dtype!r} (expected a floating-point torch.dtype)")
        if num_constraints is not None and init is not None and (init.dim() == 0 or num_constraints != init.shape[0]):
            raise ValueError(f"Inconsistent `init` shape {init.shape} and `num_constraints={num_constraints}")
        if init is not None:
            if init.dim() != 1:
                raise ValueError("`init` must be a 1D tensor of shape `(num_constraints,)`.")
            if init.is_floating_point() and not bool(torch.all(torch.isfinite(init))):
                raise ValueError("Invalid init: not every value is finite")
            if dtype is None:
                dtype = init.dtype if init.dtype.is_floating_point else torch.float32
            # clone: the multiplier never shares memory with the caller's tensor
            return torch.nn.Parameter(init.detach().to(device=device, dtype=dtype, copy=True))
        return torch.nn.Parameter(torch.zeros(num_constraints, device=device, dtype=dtype or torch.float32))

    @property
    def device(self) -> torch.device:
        """The device of the weight."""
        return self.weight.device

    def sanity_check(self) -> None:
        """Inequality multipliers must be non-negative.

        Raises:
          ValueError: the constraint is an inequality and some entry is negative.
        """
        if self.constraint_type == ConstraintType.INEQUALITY and torch.any(self.weight.data < 0):
            raise ValueError("For inequality constraint, all entries in multiplier must be non-negative.")

    @torch.no_grad()
    def post_step_(self) -> None:
        r"""Project inequality multipliers onto :math:`\lambda \ge 0` in place (equality: no-op).

        The gradient is left untouched.
        """
        if self.constraint_type == ConstraintType.INEQUALITY:
            weight = self.weight.data
            weight.copy_(torch_rules.projected(weight, weight.new_zeros(())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_constraints={self.weight.shape[0]})"


class DenseMultiplier(ExplicitMultiplier):
    """An explicit multiplier for constraints that are all observed at every step.

    ``forward()`` returns (a differentiable copy of) the whole weight vector.
    """

    expects_constraint_features = False

    def forward(self) -> torch.Tensor:
        """The current multiplier values, shape ``(num_constraints,)``."""
        return torch.clone(self.weight)


class IndexedMultiplier(ExplicitMultiplier):
    """An explicit multiplier for constraints of which only a subset is observed per step.

    The weight has shape ``(num_constraints, 1)`` (as Cooper's, so checkpoints load both ways).
    ``forward(indices)`` is a sparse embedding lookup: the gradient of the weight is a sparse
    COO tensor holding only the rows in ``indices`` (repeated indices add up), so an optimizer
    that supports sparse gradients changes only the sampled rows.
    """

    expects_constraint_features = True

    def __init__(
        self,
        num_constraints: Optional[int] = None,
        init: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(num_constraints, init, device, dtype)
        self.weight = torch.nn.Parameter(self.weight.data.unsqueeze(-1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The multiplier values at ``indices``, flattened to 1-D.

        Args:
          indices: a ``torch.long`` tensor of constraint indices (boolean masks are rejected).

        Raises:
          ValueError: ``indices`` is not a ``torch.long`` tensor.
        """
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long:
            raise ValueError("Indices must be of type torch.long.")
        return torch.flatten(torch.nn.functional.embedding(indices, self.weight, sparse=True))

    def sanity_check(self) -> None:
        """As :meth:`ExplicitMultiplier.sanity_check`; also requires a ``(n, 1)`` weight."""
        if self.weight.dim() != 2 or self.weight.shape[1] != 1:
            raise ValueError("IndexedMultiplier weight must have shape (num_constraints, 1), "
                             f"got {tuple(self.weight.shape)}")
        super().sanity_check()


class ImplicitMultiplier(Multiplier):
    """A multiplier represented implicitly by a model of the constraint features.

    Subclasses implement ``forward(constraint_features)`` (the multiplier values of the observed
    constraints) and ``post_step_`` (e.g. keep an inequality multiplier non-negative).
    Unlike Cooper's base class, ``expects_constraint_features`` is defined (``True``: the
    formulation calls the module with the constraint features); a subclass may override it.
    """

    expects_constraint_features = True

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The multiplier values of the observed constraints."""

    @abc.abstractmethod
    def post_step_(self) -> None:
        """Called after each dual optimizer step."""
