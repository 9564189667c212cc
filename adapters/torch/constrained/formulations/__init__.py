"""Formulations of a constrained problem (the names of ``cooper.formulations``):
:class:`Lagrangian`, :class:`QuadraticPenalty`, :class:`AugmentedLagrangian`, their base
:class:`Formulation`, :class:`ContributionStore`, and the terms in :mod:`.utils`."""

from . import utils
from .formulations import AugmentedLagrangian, ContributionStore, Formulation, Lagrangian, QuadraticPenalty

__all__ = ["AugmentedLagrangian", "ContributionStore", "Formulation", "Lagrangian", "QuadraticPenalty", "utils"]
