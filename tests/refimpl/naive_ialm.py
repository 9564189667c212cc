"""A deliberately plain iALM dual step in NumPy, written from the issue's semantics.

It shares no code with uniopt: loops over Python floats, ``math.hypot`` for the norm (exact
to an ulp and overflow-safe), ``math.fsum`` for the Lagrangian's sums, explicit
branches for every convention (ctol, zero direction, inequality bounds, penalty=None).
"""

from __future__ import annotations

import math

import numpy as np


class NaiveIALM:
    """Groups as dicts: size, beta, sigma, gamma, momentum, dampening, lo, hi, is_ineq."""

    def __init__(self, groups, penalty=1.0, ctol=0.0):
        self.groups = []
        for g in groups:
            g = dict(g)
            lo = -math.inf if g["lo"] is None else float(g["lo"])
            g["lo"] = max(lo, 0.0) if g["is_ineq"] else lo
            g["hi"] = math.inf if g["hi"] is None else float(g["hi"])
            g["duals"] = [float(x) for x in g.get("init", [0.0] * g["size"])]
            g["buf"] = [0.0] * g["size"]
            self.groups.append(g)
        self.penalty, self.ctol = penalty, ctol

    def _split(self, c):
        c = [float(x) for x in np.asarray(c, dtype=np.float64).ravel()]
        out, start = [], 0
        for g in self.groups:
            out.append(c[start:start + g["size"]])
            start += g["size"]
        return out

    def _filter(self, x, is_ineq):
        if self.ctol > 0:
            if is_ineq and 0 < x <= self.ctol:
                return 0.0
            if not is_ineq and abs(x) <= self.ctol:
                return 0.0
        return x

    def update(self, c):
        """One dual step; constraint values that are not finite raise ValueError naming the
        group before anything changes."""
        rhos = [g["beta"] if self.penalty is None else self.penalty for g in self.groups]
        parts = self._split(c)
        for k, ck in enumerate(parts):
            if not all(math.isfinite(x) for x in ck):
                raise ValueError(f"group{k}: not finite")
        for g, ck in zip(self.groups, parts):
            ck = [self._filter(x, g["is_ineq"]) for x in ck]
            if g["momentum"] != 0:
                g["buf"] = [g["momentum"] * b + (1 - g["dampening"]) * x for b, x in zip(g["buf"], ck)]
                d = list(g["buf"])
            else:
                d = ck
            norm = math.hypot(*d)  # correctly scaled: no overflow or underflow of the squares
            step = 0.0 if norm == 0 else min(g["beta"], g["gamma"] / norm)
            g["duals"] = [min(max(lam + step * x, g["lo"]), g["hi"]) for lam, x in zip(g["duals"], d)]
        for g in self.groups:
            g["beta"] *= g["sigma"]
        return rhos

    def lagrangian(self, loss, c, rhos=None):
        if rhos is None:
            rhos = [g["beta"] if self.penalty is None else self.penalty for g in self.groups]
        total = float(loss)
        for g, ck, rho in zip(self.groups, self._split(c), rhos):
            total += math.fsum(lam * x for lam, x in zip(g["duals"], ck))
            pen = [self._filter(x, g["is_ineq"]) for x in ck]
            if g["is_ineq"]:
                pen = [max(x, 0.0) for x in pen]
            total += 0.5 * rho * math.fsum(x * x for x in pen)
        return total

    @property
    def duals(self):
        return np.array([x for g in self.groups for x in g["duals"]])

    @property
    def buffers(self):
        return np.array([x for g in self.groups for x in g["buf"]])


def closed_form_step(c, beta, gamma, keep=1.0, lo=-math.inf, hi=math.inf):
    """The multipliers after one step from zero duals and a zero buffer, derived by hand.

    d = keep * c (keep = 1 - dampening, or 1 without momentum); ||d|| = s * hypot(d / s) with
    s = max |d| (no overflow, no underflow); the step is min(beta, gamma / ||d||), so
    step * d_i = beta * d_i, or gamma * (d_i / s) / hypot(d / s) when gamma / ||d|| < beta
    (written so that nothing overflows even when ||d|| exceeds the float64 range).
    """
    d = [keep * float(x) for x in c]
    s = max(abs(x) for x in d)
    if s == 0:
        return np.clip(np.zeros(len(d)), lo, hi)
    unit = math.hypot(*(x / s for x in d))  # ||d|| / s, in [1, sqrt(n)]
    if gamma / s / unit < beta:
        out = [gamma * (x / s) / unit for x in d]
    else:
        out = [beta * x for x in d]
    return np.clip(np.array(out), lo, hi)


EXTREME64 = {
    "huge": ([1e200, 1e200], 1.0),
    "tiny": ([1e-200, 1e-200], 1e-210),  # gamma / ||d|| < beta: the norm's value matters
    "mixed": ([1e200, -3e199, 1e-200, 0.0], 1.0),
    "subnormal-squares": ([3e-160, -4e-160], 1e-170),
    "norm-beyond-float64": ([1.5e308, -1.5e308], 1.0),
    "plain": ([3.0, -4.0], 1.0),
}
