"""Data-parallel training with ``shard_map`` and uniopt's Polyak SGD on 2 (forced) CPU devices.

Each device gets half of every minibatch. The loss is averaged over the devices
(``lax.pmean``) before it is differentiated, so every device gets the minibatch's gradient,
and ``polyak_sgd(axis_name="data")`` averages the loss value it uses for the step size (the
value each device passes may be its own half's). The parameters stay replicated and the run
equals the single-device run on whole minibatches; the script checks it.

Run: python examples/jax_shard_map.py
"""

import os

# Two CPU devices: this must happen before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from uniopt.adapters.jax import polyak_sgd  # noqa: E402

jax.config.update("jax_enable_x64", True)

# A realisable regression (the minimum loss is 0, Polyak's f_min).
rng = np.random.default_rng(0)
x = rng.standard_normal((1024, 16))
y = x @ rng.standard_normal(16) + 0.5
params0 = {"w": jnp.zeros(16), "b": jnp.zeros(())}
batches = [rng.permutation(1024)[:128] for _ in range(40)]  # 40 minibatches of 128


def loss_fn(p, x, y):
    return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


# -- one device, whole minibatches ---------------------------------------------------------------
opt = polyak_sgd(max_learning_rate=1.0, momentum=0.3)


@jax.jit
def step(p, state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
    updates, state = opt.update(grads, state, p, value=loss)
    return optax.apply_updates(p, updates), state


# -- two devices, half a minibatch each ------------------------------------------------------------
mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
dp_opt = polyak_sgd(max_learning_rate=1.0, momentum=0.3, axis_name="data")


def local_step(p, state, xb, yb):  # xb, yb: this device's half of the minibatch
    loss, grads = jax.value_and_grad(lambda p: jax.lax.pmean(loss_fn(p, xb, yb), "data"))(p)
    updates, state = dp_opt.update(grads, state, p, value=loss)
    return optax.apply_updates(p, updates), state


dp_step = jax.jit(jax.shard_map(local_step, mesh=mesh,
                                in_specs=(P(), P(), P("data"), P("data")),
                                out_specs=(P(), P())))
halves = NamedSharding(mesh, P("data"))

p1, s1 = params0, opt.init(params0)
p2, s2 = params0, dp_opt.init(params0)
for i, idx in enumerate(batches):
    p1, s1 = step(p1, s1, x[idx], y[idx])
    p2, s2 = dp_step(p2, s2, jax.device_put(x[idx], halves), jax.device_put(y[idx], halves))
    if i % 20 == 0 or i == len(batches) - 1:
        print(f"step {i:2d}  loss {float(loss_fn(p2, x, y)):.3e}")

gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                         jax.tree.leaves(p2)))
print(f"devices {len(mesh.devices)}; largest difference from the single-device run {gap:.1e}")
assert gap <= 1e-12, gap
print(f"result max_abs_diff={gap:.3e} initial_loss={float(loss_fn(params0, x, y)):.6e} "
      f"final_loss={float(loss_fn(p2, x, y)):.6e} devices={len(mesh.devices)}")
