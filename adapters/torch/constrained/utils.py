"""Shared names of the constrained-learning package: the constraint type and small helpers.

Mirrors ``cooper.utils`` (cooper-optim 1.0.1): :class:`ConstraintType`, ``OneOrSequence`` and
:func:`ensure_sequence`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum, auto
from typing import Optional, TypeVar, Union

import torch

from uniopt.rules import bind
from uniopt.rules import constrained as _constrained_rules

__all__ = ["ConstraintType", "OneOrSequence", "ensure_sequence"]

#: :mod:`uniopt.rules.constrained` executed with torch ops (differentiable, any device): the
#: arithmetic of the multiplier projection and of the penalty-coefficient updates.
torch_rules = bind(_constrained_rules, where=torch.where, maximum=torch.maximum, minimum=torch.minimum)

T = TypeVar("T")
OneOrSequence = Union[T, Sequence[T]]


class ConstraintType(Enum):
    """The kind of a constraint: ``EQUALITY`` (:math:`h(x) = 0`) or ``INEQUALITY``
    (:math:`g(x) \\le 0`)."""

    EQUALITY = auto()
    INEQUALITY = auto()


def ensure_sequence(argument: Optional[OneOrSequence[T]]) -> Optional[Sequence[T]]:
    """``argument`` as a sequence: a single object is wrapped in a list, ``None`` stays ``None``.

    Args:
      argument: one object, a sequence of objects, or ``None``.

    Returns:
      ``None``, ``argument`` itself when it is a sequence, else ``[argument]``.
    """
    if argument is None:
        return None
    return argument if isinstance(argument, Sequence) else [argument]
