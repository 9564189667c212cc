"""Logistic regression with uniopt's optax-style qhadam under jax.jit.

Run: python examples/jax_qhadam_logreg.py
"""

import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_breast_cancer

from uniopt.adapters.jax import qhadam

data = load_breast_cancer()
x = jnp.asarray((data.data - data.data.mean(0)) / data.data.std(0), dtype=jnp.float32)
y = jnp.asarray(data.target, dtype=jnp.float32)
params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}


def loss_fn(p):
    return optax.sigmoid_binary_cross_entropy(x @ p["w"] + p["b"], y).mean()


opt = optax.chain(optax.clip_by_global_norm(1.0),
                  qhadam(learning_rate=optax.cosine_decay_schedule(5e-2, 300), nus=(0.7, 1.0)))


@jax.jit
def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss


state = opt.init(params)
for i in range(300):
    params, state, loss = step(params, state)
    if i % 100 == 0 or i == 299:
        print(f"step {i:3d}  loss {float(loss):.4f}")
accuracy = jnp.mean((x @ params["w"] + params["b"] > 0) == (y > 0.5))
print(f"train accuracy {float(accuracy):.3f}")
# The claim, checked by the tests: far below the loss of the zero start (log 2), and more
# accurate than always predicting the majority class.
majority = max(float(y.mean()), 1.0 - float(y.mean()))
print(f"result final_loss={float(loss_fn(params)):.6f} initial_loss={float(jnp.log(2.0)):.6f} "
      f"accuracy={float(accuracy):.4f} majority_rate={majority:.4f}")
