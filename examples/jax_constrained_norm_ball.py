"""Least squares in a norm ball with uniopt's constrained learning in JAX, one jitted step.

Minimise the mean squared error subject to ``|w|^2 <= r^2`` (an inequality constraint whose
radius is smaller than the unconstrained solution's norm, so it is active): the Lagrangian
formulation with projected gradient ascent on the multiplier, the whole primal-dual step
(``ConstrainedOptimizer.step``) compiled by ``jax.jit``.

Run: python examples/jax_constrained_norm_ball.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import uniopt.adapters.jax.constrained as jc

jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
a = jnp.asarray(rng.standard_normal((200, 6)))
b = a @ jnp.asarray(rng.standard_normal(6)) + 0.1 * jnp.asarray(rng.standard_normal(200))
RADIUS = 1.0


def compute_cmp_state(w):
    loss = 0.5 * jnp.mean((a @ w - b) ** 2)
    return jc.CMPState(loss, {"ball": jc.ConstraintState(jnp.sum(w ** 2) - RADIUS ** 2)})


constraints = {"ball": jc.Constraint(jc.ConstraintType.INEQUALITY,
                                     multiplier=jc.DenseMultiplier(1, dtype=jnp.float64))}
solver = jc.ConstrainedOptimizer(compute_cmp_state, optax.sgd(0.1), jc.projected_ascent(0.1),
                                 roll="alternating_dual_primal")
w = jnp.zeros(6)
state = solver.init(w, constraints)
step = jax.jit(solver.step)
for i in range(3000):
    w, constraints, state, rollout = step(w, constraints, state)
    if i % 1000 == 0 or i == 2999:
        print(f"step {i:4d}  loss {float(rollout.loss):.6f}  |w|^2 - r^2 "
              f"{float(rollout.cmp_state.observed_constraints['ball'].violation):+.2e}")
# The claim, checked by the tests against the KKT conditions solved independently (a 1-D root
# of |w(lambda)|^2 = r^2): the loss and the multiplier are the constrained optimum's, and the
# constraint holds (with equality: it is active).
final = compute_cmp_state(w)
print(f"result loss={float(final.loss):.12f} "
      f"constraint={float(final.observed_constraints['ball'].violation):.3e} "
      f"multiplier={float(constraints['ball'].multiplier.weight[0]):.12f}")
