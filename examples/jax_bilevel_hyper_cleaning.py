"""Data hyper-cleaning with uniopt's JAX bilevel ``Dynamic`` (RAD and IAPTT-GM).

The problem of ``torch_bilevel_hyper_cleaning.py`` in JAX: half of the training labels of
scikit-learn's bundled digits are replaced by a wrong class, and a weight ``sigmoid(x_i)`` per
training sample is learned so that a softmax regression trained on the weighted noisy data does
well on a small clean validation set:

* lower level (LL): ``HC["T"]`` full-batch ``optax.sgd`` steps of a 64->10 softmax regression
  (parameters ``(W, b)``, a pytree) from zero on ``mean_i sigmoid(x_i) CE(W a_i + b, y_i)``;
* upper level (UL): the clean validation cross-entropy at the LL solution, minimised over ``x``
  (from 0) by ``optax.adam``; the hypergradient comes from
  :class:`uniopt.adapters.jax.bilevel.Dynamic` (``hypergrad``, the whole UL step jitted): RAD
  (through every step) or IAPTT-GM (``acquire_max_loss=True``: from the worst iterate ``t*``;
  ``init_aux=True``: the LL initial point is learned too).

The weights are judged as in the torch example (``demo.py``'s NumPy code): the test accuracy of
the LL solve retrained from zero with them against the same solve on the noisy labels, and the
precision and recall of the samples they flag as corrupted (``sigmoid(x_i) < 0.5``). Run:
``python examples/jax_bilevel_hyper_cleaning.py`` (about 12 s on 2 cores, no download); it
prints one ``result`` line.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from demo import HC, HC_METHODS, hyper_cleaning_example
from uniopt.adapters.jax.bilevel import Dynamic

jax.config.update("jax_enable_x64", True)


def _logits(params, inputs):
    w, b = params
    return inputs @ w.T + b


def ll_objective(state):
    """The LL loss: the per-sample weighted training cross-entropy of the LL iterate."""
    losses = optax.softmax_cross_entropy_with_integer_labels(
        _logits(state["lower_model"], state["data"]), state["target"])
    return jnp.mean(jax.nn.sigmoid(state["upper_model"]) * losses)


def ul_objective(state):
    """The UL loss: the clean validation cross-entropy of the LL iterate."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        _logits(state["lower_model"], state["data"]), state["target"]))


def learn_weights(data: dict, method: str = "RAD", ul_lr: float = HC["ul_lr"],
                  outer: int = HC["outer"], steps: int = HC["T"]) -> list[np.ndarray]:
    """Learn the per-sample logits with ``method`` ("RAD" or "IAPTT-GM"), float64.

    Returns:
        ``[x]`` (RAD) or ``[x, W_0, b_0]`` (IAPTT-GM: the learned LL initial point too), NumPy.
    """
    if method not in HC_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {HC_METHODS})")
    iaptt = method == "IAPTT-GM"
    batch = tuple(jnp.asarray(data[k]) for k in ("x_train", "y_train", "x_val", "y_val"))
    dyn = Dynamic(ll_objective, steps, ul_objective, acquire_max_loss=iaptt, init_aux=iaptt,
                  ll_opt=optax.sgd(HC["ll_lr"]))
    ul_opt = optax.adam(ul_lr)
    x = jnp.zeros(len(data["y_train"]), dtype=jnp.float64)
    w0 = (jnp.zeros((10, 64), dtype=jnp.float64), jnp.zeros(10, dtype=jnp.float64))
    learned = (x, w0) if iaptt else x  # RAD: every LL solve starts at w0 = 0

    @jax.jit
    def ul_step(learned, opt_state):
        x, start = learned if iaptt else (learned, w0)
        out = dyn.hypergrad(x, start, *batch)
        grads = (out.ul_grad, out.ll_init_grad) if iaptt else out.ul_grad
        updates, opt_state = ul_opt.update(grads, opt_state, learned)
        return optax.apply_updates(learned, updates), opt_state

    opt_state = ul_opt.init(learned)
    for _ in range(outer):
        learned, opt_state = ul_step(learned, opt_state)
    return [np.asarray(a) for a in jax.tree.leaves(learned)]


def main() -> dict[str, float]:
    return hyper_cleaning_example(learn_weights)

if __name__ == "__main__":
    main()
