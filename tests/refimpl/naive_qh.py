"""Deliberately plain NumPy implementations of each update rule, written from the papers.

They share no code with uniopt: each keeps its own state and follows the formula literally,
step by step, in float64 unless the inputs are float32.
"""

from __future__ import annotations

import numpy as np


class NaiveQHM:
    """QHM (Ma & Yarats 2019, eq. 2) with qhoptim's weight-decay options."""

    def __init__(self, lr, momentum, nu, weight_decay=0.0, weight_decay_type="grad", maximize=False):
        self.lr, self.momentum, self.nu = lr, momentum, nu
        self.weight_decay, self.weight_decay_type, self.maximize = weight_decay, weight_decay_type, maximize
        self.buf = None

    def step(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        p, g = p.copy(), g.copy()
        if self.maximize:
            g = -g
        if self.weight_decay != 0:
            if self.weight_decay_type == "grad":
                g = g + self.weight_decay * p
            else:
                p = p * (1 - self.lr * self.weight_decay)
        if self.buf is None:
            self.buf = np.zeros_like(p)
        self.buf = self.momentum * self.buf + (1 - self.momentum) * g
        return p - self.lr * ((1 - self.nu) * g + self.nu * self.buf)


class NaiveQHAdam:
    """QHAdam (Ma & Yarats 2019, Algorithm 2) with explicit 1 - beta**t bias correction."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.0,
                 decouple_weight_decay=False, eps=1e-8, maximize=False):
        self.lr, self.betas, self.nus = lr, betas, nus
        self.weight_decay, self.decouple, self.eps, self.maximize = weight_decay, decouple_weight_decay, eps, maximize
        self.t = 0
        self.m = self.v = None

    def step(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        p, g = p.copy(), g.copy()
        if self.maximize:
            g = -g
        if self.weight_decay != 0:
            if self.decouple:
                p = p * (1 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        if self.m is None:
            self.m, self.v = np.zeros_like(p), np.zeros_like(p)
        self.t += 1
        b1, b2 = self.betas
        nu1, nu2 = self.nus
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        num = (1 - nu1) * g + nu1 * m_hat
        den = np.sqrt((1 - nu2) * g * g + nu2 * v_hat) + self.eps
        return p - self.lr * num / den
