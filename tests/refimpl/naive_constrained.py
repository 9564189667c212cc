"""Naive NumPy oracles of the dual side of constrained learning (written from the formulas of
Cooper's docstrings and Sohrabi et al. 2024, not from uniopt's rules): loops over entries in
float64 (or the given dtype), no fusion, no kernels."""

from __future__ import annotations

import numpy as np


def coalesce(rows, values):
    """``{row: summed values}`` (in the order given)."""
    out = {}
    for r, v in zip(np.asarray(rows).tolist(), np.asarray(values)):
        out[r] = out[r] + v if r in out else np.array(v, copy=True)
    return out


def projected_step(param, grad, lr, lower):
    """``SGD(maximize=True).step()`` (``p + lr * g``) then the projection ``max(p, lower)``."""
    return np.maximum(param + lr * grad, lower)


def indexed_projected_step(param, rows, values, lr, lower):
    """The sparse SGD step of the coalesced rows, then the projection of those rows."""
    out = np.array(param, copy=True)
    for r, v in coalesce(rows, values).items():
        out[r] = np.maximum(out[r] + lr * v, lower)
    return out


class NaiveNuPI:
    """nuPI by its documented recursion, one array, dense or sparse (per-row first steps).

    xi_t = nu xi_{t-1} + (1 - nu) e_t;  u_t = Ki e_t + Kp (xi_t - xi_{t-1});
    theta <- max(theta + s lr u_t - lr wd theta, lower) with s = +1 (maximize) or -1;
    init "ZEROS": xi_{-1} = 0; "SGD": xi_{-1} = e_0 (entry by entry, at its first step).
    """

    def __init__(self, theta, lr, wd=0.0, kp=0.0, ki=1.0, nu=0.0, init="SGD", maximize=False,
                 lower=-np.inf):
        self.theta = np.array(theta, dtype=np.float64, copy=True)
        self.lr, self.wd, self.nu, self.init, self.lower = lr, wd, nu, init, lower
        self.kp = np.broadcast_to(np.asarray(kp, dtype=np.float64), self.theta.shape)
        self.ki = np.broadcast_to(np.asarray(ki, dtype=np.float64), self.theta.shape)
        self.sign = 1.0 if maximize else -1.0
        self.xi = np.zeros_like(self.theta)
        self.started = np.zeros(self.theta.shape, dtype=bool)

    def _entry(self, idx, e):
        first = not self.started[idx]
        if first:
            self.xi[idx] = e if self.init == "SGD" else 0.0
            self.started[idx] = True
        xi_prev = self.xi[idx]
        xi = self.nu * xi_prev + (1.0 - self.nu) * e
        if first and self.init == "SGD":
            xi = e  # xi_0 = nu e_0 + (1 - nu) e_0 = e_0 (the documented value, exactly)
        u = self.ki[idx] * e + self.kp[idx] * (xi - xi_prev)
        th = self.theta[idx]
        self.theta[idx] = max(th + self.sign * self.lr * u - self.lr * self.wd * th, self.lower)
        self.xi[idx] = xi

    def step(self, grad):
        for idx in np.ndindex(self.theta.shape):
            self._entry(idx, float(grad[idx]))
        return self.theta

    def sparse_step(self, rows, values):
        for r, v in coalesce(rows, values).items():
            v = np.asarray(v, dtype=np.float64).reshape(self.theta[r].shape)
            for sub in np.ndindex(v.shape):
                self._entry((r, *sub), float(v[sub]))
        return self.theta


def penalty_step(value, init, violation, is_ineq, tol, factor=1.0, increment=0.0, restart=True,
                 scalar=False):
    """Cooper's feasibility-driven update: grow where the measure exceeds ``tol``, then reset
    satisfied inequalities to ``init`` (with restart). ``scalar``: the measure is the norm."""
    v = np.maximum(violation, 0.0) if is_ineq else np.asarray(violation)
    measure = np.linalg.norm(v.astype(np.float64)) if scalar else np.abs(v)
    grown = np.where(measure > tol, value * factor + increment, value)
    if restart and is_ineq:
        grown = np.where(measure == 0, init, grown)
    return grown
