"""Fair linear regression with uniopt's Cooper-style constrained learning in torch.

Least squares subject to demographic parity of the predictions: the mean prediction of group
1 equals that of group 0 (an equality constraint, one Lagrange multiplier), solved by
simultaneous gradient descent-ascent with ``import uniopt.adapters.torch.constrained as
cooper`` exactly as with Cooper.

Run: python examples/torch_constrained_fairness.py
"""

import numpy as np
import torch

import uniopt.adapters.torch.constrained as cooper

rng = np.random.default_rng(0)
group = rng.random(400) < 0.4  # a protected attribute, correlated with the features
features = rng.standard_normal((400, 4)) + 0.8 * group[:, None]
x = torch.from_numpy(np.hstack([features, np.ones((400, 1))]))  # with a bias column
y = x @ torch.tensor([1.0, -0.5, 0.3, 0.8, 0.2], dtype=torch.float64) + torch.from_numpy(
    0.1 * rng.standard_normal(400) + 0.5 * group)
in_group = torch.from_numpy(group)


class FairRegression(cooper.ConstrainedMinimizationProblem):
    def __init__(self):
        super().__init__()
        multiplier = cooper.multipliers.DenseMultiplier(num_constraints=1, dtype=torch.float64)
        self.parity = cooper.Constraint(cooper.ConstraintType.EQUALITY, multiplier=multiplier)

    def compute_cmp_state(self, w):
        pred = x @ w
        gap = pred[in_group].mean() - pred[~in_group].mean()
        return cooper.CMPState(loss=0.5 * torch.mean((pred - y) ** 2),
                               observed_constraints={self.parity: cooper.ConstraintState(
                                   violation=gap.reshape(1))})


w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
cmp = FairRegression()
optimizer = cooper.optim.SimultaneousOptimizer(
    cmp, torch.optim.SGD([w], lr=0.2),
    torch.optim.SGD(cmp.dual_parameters(), lr=0.2, maximize=True))
for step in range(3000):
    rollout = optimizer.roll(compute_cmp_state_kwargs={"w": w})
    if step % 1000 == 0 or step == 2999:
        gap = rollout.cmp_state.observed_constraints[cmp.parity].violation.item()
        print(f"step {step:4d}  loss {rollout.loss.item():.6f}  parity gap {gap:+.2e}")
# The claim, checked by the tests against the KKT system solved in closed form: the loss and
# the multiplier are the constrained optimum's, and the parity gap is closed.
with torch.no_grad():
    state = cmp.compute_cmp_state(w)
    print(f"result loss={state.loss.item():.12f} "
          f"gap={state.observed_constraints[cmp.parity].violation.item():.3e} "
          f"multiplier={cmp.parity.multiplier.weight.item():.12f}")
