"""Shared helpers of the torch QH tests (this module holds no tests).

``Problem`` is a small deterministic objective over a few tensors of different shapes: a random
positive-definite quadratic plus a cubic term, so trajectories depend on every earlier step.
Gradients are fresh tensors computed in float64 from the current parameter values, so every
optimizer under comparison sees the same function of its own iterates.
"""

from __future__ import annotations

import math

import torch

SHAPES = [(5, 3), (4,), (2, 2, 2)]


class Problem:
    def __init__(self, seed: int, shapes=SHAPES, sign: float = 1.0):
        gen = torch.Generator().manual_seed(seed)
        self.x0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        self.A, self.c = [], []
        for s in shapes:
            n = math.prod(s)
            m = torch.randn(n, n, generator=gen, dtype=torch.float64)
            self.A.append(m @ m.T / n + 0.5 * torch.eye(n, dtype=torch.float64))
            self.c.append(torch.randn(n, generator=gen, dtype=torch.float64))
        self.sign = sign

    def grad(self, i: int, p: torch.Tensor) -> torch.Tensor:
        """The gradient at ``p`` of the ``i``-th term, as a new tensor of ``p``'s dtype."""
        v = p.detach().reshape(-1).to(torch.float64)
        g = self.sign * (self.A[i] @ v + self.c[i] + 0.05 * v**3)
        return g.reshape(p.shape).to(p.dtype)

    def params(self, dtype=torch.float64) -> list:
        return [torch.nn.Parameter(x.to(dtype).clone()) for x in self.x0]


def run(make_opt, problem: Problem, steps: int, dtype=torch.float64, params=None, opt=None):
    """``steps`` optimizer steps on ``problem``; returns ``(params, opt)``."""
    params = problem.params(dtype) if params is None else params
    opt = make_opt(params) if opt is None else opt
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = problem.grad(i, p)
        opt.step()
    return params, opt


def assert_state_close(opt_a, opt_b, params_a, params_b, **tol) -> None:
    """Same state keys (in order) per parameter, tensors and floats close."""
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert list(sa) == list(sb)
        for key in sa:
            if isinstance(sb[key], torch.Tensor):
                torch.testing.assert_close(sa[key], sb[key], **tol)
            else:
                assert isinstance(sa[key], float)
                assert math.isclose(sa[key], sb[key], rel_tol=tol.get("rtol", 0.0))


def max_relative_error(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()
