"""``python -m uniopt demo``: the main job, run on every installed backend.

Trains a small MLP classifier (64-32-10, tanh) on scikit-learn's bundled digits data set with
QHAdam, from the same initial weights, on the NumPy core, on torch and on JAX, in float64;
prints one row per backend (final train loss, test accuracy, time) and checks that the backends
agree (same update rule, so the same trajectory up to rounding). Later families add sections.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

__all__ = ["main", "load_digits_split", "SECTIONS"]

HIDDEN = 32
QHADAM = dict(lr=1e-2, betas=(0.995, 0.999), nus=(0.7, 1.0))  # the paper's recommended QHAdam


def load_digits_split(seed: int = 0):
    """Digits, scaled to [0, 1], split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _init_params(n_in: int, n_out: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n_in, HIDDEN)) / np.sqrt(n_in), np.zeros(HIDDEN),
            rng.standard_normal((HIDDEN, n_out)) / np.sqrt(HIDDEN), np.zeros(n_out)]


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == y))


# -- one training loop per backend; each returns (final params, final train loss, test logits) --
def _train_numpy(params, x, y, x_test, steps):
    import uniopt

    params = [p.copy() for p in params]
    onehot = np.eye(params[3].size)[y]
    opt = uniopt.QHAdam(params, **QHADAM)

    def loss_and_grads():
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        logits = h @ w2 + b2
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -np.mean(np.sum(onehot * log_p, axis=1))
        d_logits = (np.exp(log_p) - onehot) / len(y)
        d_pre = (d_logits @ w2.T) * (1.0 - h * h)
        return loss, [x.T @ d_pre, d_pre.sum(0), h.T @ d_logits, d_logits.sum(0)]

    for _ in range(steps):
        loss, grads = loss_and_grads()
        opt.step(grads)
    loss, _ = loss_and_grads()
    w1, b1, w2, b2 = params
    return params, float(loss), np.tanh(x_test @ w1 + b1) @ w2 + b2


def _train_torch(params, x, y, x_test, steps):
    import torch

    from uniopt.adapters.torch import QHAdam

    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = QHAdam(tensors, **QHADAM)

    def loss_fn():
        w1, b1, w2, b2 = tensors
        return torch.nn.functional.cross_entropy(torch.tanh(xt @ w1 + b1) @ w2 + b2, yt)

    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w1, b1, w2, b2 = tensors
        logits = torch.tanh(torch.from_numpy(x_test) @ w1 + b1) @ w2 + b2
        return [t.detach().numpy().copy() for t in tensors], float(loss_fn()), logits.numpy()


def _train_jax(params, x, y, x_test, steps):
    import jax
    import jax.numpy as jnp
    import optax

    from uniopt.adapters.jax import qhadam

    jax.config.update("jax_enable_x64", True)
    opt = qhadam(learning_rate=QHADAM["lr"], betas=QHADAM["betas"], nus=QHADAM["nus"])

    def forward(p, inputs):
        w1, b1, w2, b2 = p
        return jnp.tanh(inputs @ w1 + b1) @ w2 + b2

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

    @jax.jit
    def train(p):
        def body(carry, _):
            p, state = carry
            grads = jax.grad(loss_fn)(p)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
        return p, loss_fn(p), forward(p, x_test)

    p, loss, logits = train([jnp.asarray(a) for a in params])
    return [np.asarray(a) for a in p], float(loss), np.asarray(logits)


BACKENDS: dict[str, Callable] = {"numpy (core)": _train_numpy, "torch": _train_torch, "jax": _train_jax}


def qhadam_digits(steps: int = 300) -> bool:
    """Train the MLP with QHAdam on every backend; print the table; return whether all agree."""
    x, y, x_test, y_test = load_digits_split()
    init = _init_params(x.shape[1], 10)
    print(f"QHAdam {QHADAM} on digits ({len(y)} train / {len(y_test)} test), MLP 64-{HIDDEN}-10, "
          f"{steps} full-batch steps, float64")
    print(f"{'backend':<14} {'train loss':>12} {'test acc':>9} {'time [s]':>9}")
    finals, ok = {}, True
    for name, train in BACKENDS.items():
        try:
            start = time.perf_counter()
            params, loss, logits = train(init, x, y, x_test, steps)
            elapsed = time.perf_counter() - start
        except ImportError as exc:
            print(f"{name:<14} {'skipped: ' + str(exc):>32}")
            continue
        finals[name] = params
        print(f"{name:<14} {loss:>12.6f} {_accuracy(logits, y_test):>9.3f} {elapsed:>9.2f}")
        ok &= np.isfinite(loss)
    reference = next(iter(finals.values()))
    for name, params in finals.items():
        diff = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
                   for a, b in zip(params, reference))
        agree = diff < 1e-8
        ok &= agree
        print(f"  {name:<12} vs {next(iter(finals))}: max rel. param difference {diff:.1e} "
              f"-> {'agree' if agree else 'DISAGREE'}")
    return bool(ok)


SECTIONS: dict[str, Callable[..., bool]] = {"qhadam-digits": qhadam_digits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per backend")
    args = parser.parse_args(argv)
    ok = True
    for name, section in SECTIONS.items():
        print(f"== {name} ==")
        ok &= section(steps=args.steps)
        print()
    print("all backends agree" if ok else "BACKENDS DISAGREE")
    return 0 if ok else 1
