# Copyright (C) 2025 The Cooper Developers.
# Licensed under the MIT License.

from .cooper_helpers import (
    AlternationType,
    SquaredNormLinearCMP,
    build_cooper_optimizer,
    build_dual_optimizer,
    build_primal_optimizers,
)
from .utils import frozen_rand_generator, validate_state_dicts
