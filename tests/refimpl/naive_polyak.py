"""A deliberately plain NumPy Polyak step-size SGD, written from the papers.

It shares no code with uniopt. The step size follows Loizou et al. (2021), eq. (SPS_max), and
Garrigos et al. (2023) (SPS+), literally, with uniopt's two documented conventions spelled out
as branches: a non-positive gap ``f - f*`` gives a zero step, and SPS_max with a zero
denominator (zero gradient, ``delta = 0``) and a positive gap gives ``max_stepsize`` (the
gradient is zero, so nothing moves). The norm is taken in float64 with ``math.fsum``.
"""

from __future__ import annotations

import math

import numpy as np


def naive_sq_norm(grads) -> float:
    """``sum ||g||^2`` over a list of arrays, exactly rounded (``math.fsum`` of float64 squares)."""
    return math.fsum(float(x) ** 2 for g in grads for x in np.asarray(g, dtype=np.float64).ravel())


def naive_stepsize(value, sq_norm, fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0,
                   eps=np.finfo(np.float64).eps) -> float:
    gap = float(value) - fun_min
    if gap <= 0:
        return 0.0
    if variant == "SPS_max":
        denominator = sq_norm + delta
        if denominator == 0:
            return max_stepsize
        return min(gap / denominator, max_stepsize)
    if variant == "SPS+":
        if sq_norm <= eps:
            return 0.0
        return max(gap / sq_norm, 0.0)
    raise ValueError(variant)


class NaivePolyakSGD:
    """Polyak SGD with optional heavy-ball momentum on a list of arrays (float64 arithmetic).

    ``step(params, grads, value)`` returns the new parameters (new arrays) and remembers the
    velocity: ``v = momentum * v - gamma * g``, ``p = p + v`` (``p - gamma * g`` without
    momentum). ``last_stepsize`` and ``last_sq_norm`` record the step.
    """

    def __init__(self, fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0, momentum=0.0,
                 dtype=np.float64):
        self.fun_min, self.variant = fun_min, variant
        self.max_stepsize, self.delta, self.momentum = max_stepsize, delta, momentum
        self.eps = float(np.finfo(dtype).eps)
        self.velocity = None
        self.last_stepsize = self.last_sq_norm = None

    def step(self, params, grads, value):
        params = [np.asarray(p, dtype=np.float64) for p in params]
        grads = [np.asarray(g, dtype=np.float64) for g in grads]
        s = naive_sq_norm(grads)
        gamma = naive_stepsize(value, s, self.fun_min, self.variant, self.max_stepsize,
                               self.delta, self.eps)
        self.last_stepsize, self.last_sq_norm = gamma, s
        if self.momentum == 0:
            return [p - gamma * g for p, g in zip(params, grads)]
        if self.velocity is None:
            self.velocity = [np.zeros_like(p) for p in params]
        self.velocity = [self.momentum * v - gamma * g for v, g in zip(self.velocity, grads)]
        return [p + v for p, v in zip(params, self.velocity)]
