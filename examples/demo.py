"""``python examples/demo.py`` (``make demo``): the main job, run on every backend.

Each section runs one family on the NumPy core, on torch and on JAX, from the same start, in
float64, prints one row per backend and two separate verdicts: whether the backends agree (the
same update rule, so the same numbers up to rounding; each section's docstring says how that is
checked) and whether every run reached the section's goal. The exit status is 1 when the
backends disagree, else 0 (``--steps`` too small to reach a goal is not a fault):

* ``qhadam-digits``: a small MLP classifier (64-32-10, tanh) on scikit-learn's bundled digits
  data set trained with QHAdam (final train loss, test accuracy, time);
* ``polyak-interpolation``: Polyak SGD on least squares with planted targets (an interpolating
  problem, f* = 0), which it drives towards 0;
* ``neyman-pearson``: iALM on Neyman-Pearson classification of scikit-learn's bundled breast
  cancer data (minimise missed tumours subject to a false-positive-rate bound), printing the
  constraint satisfaction;
* ``recall-floor``: Cooper-style constrained learning (the core's indexed dual step, our
  torch package ``uniopt.adapters.torch.constrained`` with Cooper's API, our JAX module
  ``uniopt.adapters.jax.constrained`` with the whole run jitted): multinomial logistic
  regression on digits with a recall floor per class, one indexed multiplier per class sampled
  by each mini-batch, printing each class's recall and the classes below the floor for the
  unconstrained and the constrained model;
* ``bilevel-hyper-cleaning``: data hyper-cleaning on digits with half the training labels
  corrupted (uniopt's bilevel ``Dynamic``, torch and JAX): per-sample weights learned by RAD
  and IAPTT-GM, printing the test accuracy against training on the noisy labels and the
  precision and recall of the samples flagged as corrupted (no NumPy-core row: the bilevel
  faces are torch's and JAX's).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from typing import Callable

import numpy as np

__all__ = ["main", "load_digits_split", "noisy_digits_split", "hyper_cleaning_report",
           "weighted_softmax_regression", "hyper_cleaning_example", "SECTIONS"]

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


def _one_torch_thread(train: Callable) -> Callable:
    """Run a torch backend with one intra-op thread (the previous count restored after).

    The demo's tensors are small: extra threads only add synchronisation, and on a busy
    2-core machine they made 50 full-batch QHAdam steps 4 to 30 times slower (measured:
    1.5-10.3 s with 2 threads, 0.3 s with 1).
    """

    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return train(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


# -- one training loop per backend; each returns (final params, final train loss, test logits) --
def _train_numpy(params, x, y, x_test, steps, hyper=QHADAM):
    import uniopt

    params = [p.copy() for p in params]
    onehot = np.eye(params[3].size)[y]
    opt = uniopt.QHAdam(params, **hyper)

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


@_one_torch_thread
def _train_torch(params, x, y, x_test, steps, hyper=QHADAM):
    import torch

    from uniopt.adapters.torch import QHAdam

    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = QHAdam(tensors, **hyper)

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


def _train_jax(params, x, y, x_test, steps, hyper=QHADAM):
    import jax
    import jax.numpy as jnp
    import optax

    from uniopt.adapters.jax import qhadam

    jax.config.update("jax_enable_x64", True)
    opt = qhadam(learning_rate=hyper["lr"], betas=hyper["betas"], nus=hyper["nus"])

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


#: A wrong learning rate, for the self-check of the agreement verdict (``--bug``).
BUG_FACTOR = 1.0 + 1e-4


def qhadam_digits(steps: int = 300, bug: str | None = None) -> tuple[bool, bool]:
    """Train the MLP with QHAdam on every backend and print one row each.

    Goal: every backend's final train loss is below a tenth of ``ln 10`` (the loss of a
    uniform guess over the 10 classes). Agreement: the final parameters differ by < 1e-8
    (relative) from the core's: QHAdam's normalised steps do not amplify rounding here, so
    correct backends stay within about 1e-15 of each other at any step count.

    Args:
        steps: Full-batch steps per backend.
        bug: A backend to train with a learning rate off by a factor ``BUG_FACTOR`` (the
            self-check that the agreement verdict catches a real difference).

    Returns:
        ``(backends agree, goal reached)``.
    """
    x, y, x_test, y_test = load_digits_split()
    init = _init_params(x.shape[1], 10)
    target = np.log(10) / 10
    print(f"QHAdam {QHADAM} on digits ({len(y)} train / {len(y_test)} test), MLP 64-{HIDDEN}-10, "
          f"{steps} full-batch steps, float64")
    print(f"{'backend':<14} {'train loss':>12} {'test acc':>9} {'time [s]':>9}  goal")
    wrong = {**QHADAM, "lr": QHADAM["lr"] * BUG_FACTOR}
    backends = {name: functools.partial(train, hyper=wrong if name == bug else QHADAM)
                for name, train in BACKENDS.items()}
    finals, reached = {}, True
    for name, (params, loss, logits), elapsed in _timed_runs(backends, init, x, y, x_test, steps):
        finals[name] = params
        goal = bool(np.isfinite(loss) and loss < target)
        reached &= goal
        print(f"{name:<14} {loss:>12.6f} {_accuracy(logits, y_test):>9.3f} {elapsed:>9.2f}  "
              f"{f'loss < ln(10)/10 = {target:.3f}' if goal else 'NOT REACHED'}")
    return _agree(finals), bool(reached)


# -- Polyak SGD on an interpolating problem: least squares with targets a linear model fits ----
POLYAK = dict(max_stepsize=10.0, momentum=0.0)


def _planted_least_squares():
    """Standardised digits features (constant pixels dropped), targets from a planted linear
    model: the minimum f* = 0 is attained at the unique solution ``w_true``."""
    x, _, _, _ = load_digits_split()
    scale = x.std(axis=0)
    x = (x[:, scale > 0] - x[:, scale > 0].mean(axis=0)) / scale[scale > 0]
    w_true = np.random.default_rng(1).standard_normal(x.shape[1])
    return x, x @ w_true, w_true


def _polyak_numpy(x, t, steps, fun_min=0.0):
    """The core's ``PolyakSGD.run`` from 0; also every iterate (the reference trajectory)."""
    import uniopt

    def fun(w):
        r = x @ w - t
        return 0.5 * float(r @ r) / len(t), x.T @ r / len(t)

    solver = uniopt.PolyakSGD(fun, maxiter=steps, tol=0.0, fun_min=fun_min, **POLYAK)
    w = np.zeros(x.shape[1])
    state = solver.init_state(w)
    path = [w]
    for _ in range(steps):  # what run() does, keeping every iterate
        w, state = solver.update(w, state)
        path.append(w)
    return w, fun(w)[0], np.array(path)


def _polyak_numpy_map(x, t, points, fun_min=0.0):
    """The core's one-step map: one ``PolyakSGD`` update from each row of ``points``."""
    import uniopt

    def fun(w):
        r = x @ w - t
        return 0.5 * float(r @ r) / len(t), x.T @ r / len(t)

    solver = uniopt.PolyakSGD(fun, maxiter=1, tol=0.0, fun_min=fun_min, **POLYAK)
    return np.array([solver.update(w, solver.init_state(w))[0] for w in points])


@_one_torch_thread
def _polyak_torch(x, t, steps, fun_min=0.0):
    import torch

    from uniopt.adapters.torch import PolyakSGD

    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = PolyakSGD([w], fun_min=fun_min, **POLYAK)

    def closure():
        opt.zero_grad()
        loss = 0.5 * torch.mean((xt @ w - tt) ** 2)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return w.numpy().copy(), float(0.5 * torch.mean((xt @ w - tt) ** 2))


@_one_torch_thread
def _polyak_torch_map(x, t, points, fun_min=0.0):
    """torch's one-step map: one ``PolyakSGD.step`` from each row of ``points``."""
    import torch

    from uniopt.adapters.torch import PolyakSGD

    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)

    def closure():
        opt.zero_grad()
        loss = 0.5 * torch.mean((xt @ w - tt) ** 2)
        loss.backward()
        return loss

    out = []
    for point in points:
        opt = PolyakSGD([w], fun_min=fun_min, **POLYAK)
        with torch.no_grad():
            w.copy_(torch.from_numpy(point))
        opt.step(closure)
        out.append(w.detach().numpy().copy())
    return np.array(out)


def _polyak_jax_solver(x, t, steps, fun_min):
    import jax
    import jax.numpy as jnp

    from uniopt.adapters.jax import PolyakSGD

    jax.config.update("jax_enable_x64", True)
    xj, tj = jnp.asarray(x), jnp.asarray(t)

    def fun(w):
        return 0.5 * jnp.mean((xj @ w - tj) ** 2)

    return fun, PolyakSGD(fun=fun, maxiter=steps, tol=0.0, fun_min=fun_min, **POLYAK)


def _polyak_jax(x, t, steps, fun_min=0.0):
    import jax.numpy as jnp

    fun, solver = _polyak_jax_solver(x, t, steps, fun_min)
    w, _ = solver.run(jnp.zeros(x.shape[1]))
    return np.asarray(w), float(fun(w))


def _polyak_jax_map(x, t, points, fun_min=0.0):
    """JAX's one-step map: one ``PolyakSGD.update`` from each row of ``points`` (vmapped)."""
    import jax
    import jax.numpy as jnp

    _, solver = _polyak_jax_solver(x, t, 1, fun_min)
    one_step = jax.jit(jax.vmap(lambda w: solver.update(w, solver.init_state(w)).params))
    return np.asarray(one_step(jnp.asarray(points)))


POLYAK_BACKENDS: dict[str, Callable] = {"numpy (core)": _polyak_numpy, "torch": _polyak_torch,
                                        "jax": _polyak_jax}
POLYAK_MAPS: dict[str, Callable] = {"numpy (core)": _polyak_numpy_map, "torch": _polyak_torch_map,
                                    "jax": _polyak_jax_map}
#: How far one backend's one-step map may be from the core's, in units of float64's machine
#: epsilon times the size of the iterates (see :func:`polyak_interpolation`).
POLYAK_MAP_ULPS = 256


def polyak_interpolation(steps: int = 300, bug: str | None = None) -> tuple[bool, bool]:
    """Polyak SGD (SPS_max) on planted least squares, on every backend.

    Goal: the final loss of every backend is below 1e-2 times the initial loss (an
    interpolating problem: the loss heads to f* = 0).

    Agreement: the Polyak step size is a ratio of small quantities, so rounding differences
    between backends are amplified along a trajectory (1e-15 after one step, about 1e-3 after
    100 here) and whole trajectories cannot be compared with a fixed tolerance. What is the same
    for every step count is the update rule itself: from every iterate ``w_k`` of the core's
    trajectory, each backend takes one step, and the result must match the core's
    ``w_{k+1}`` to within ``POLYAK_MAP_ULPS`` machine epsilons times ``|w_k| + |w_{k+1} -
    w_k|``. Correct backends differ by rounding only (a few ulps); a wrong step size or update
    differs by many orders of magnitude more at the first steps already.

    Args:
        steps: Updates per backend.
        bug: A backend to run with a wrong ``fun_min`` (1e-6 times the initial loss instead of
            0): the self-check that the agreement verdict catches a real difference.

    Returns:
        ``(backends agree, goal reached)``.
    """
    x, t, w_true = _planted_least_squares()
    print(f"PolyakSGD {POLYAK} on planted least squares (standardised digits features, "
          f"{len(t)} x {x.shape[1]}), {steps} steps, float64, f* = 0")
    print(f"{'backend':<14} {'final loss':>12} {'|w-w*|/|w*|':>12} {'time [s]':>9}  goal")
    initial_loss = 0.5 * float(t @ t) / len(t)
    wrong = 1e-6 * initial_loss
    reached, path, ran = True, None, []
    for name, result, elapsed in _timed_runs(
            {k: functools.partial(f, fun_min=wrong if k == bug else 0.0)
             for k, f in POLYAK_BACKENDS.items()}, x, t, steps):
        w, loss = result[:2]
        ran.append(name)
        if path is None:
            path = result[2]  # the core's trajectory: every iterate
        distance = float(np.linalg.norm(w - w_true) / np.linalg.norm(w_true))
        goal = bool(np.isfinite(loss) and loss < 1e-2 * initial_loss)
        reached &= goal
        print(f"{name:<14} {loss:>12.3e} {distance:>12.1e} {elapsed:>9.2f}  "
              f"{'loss < 1e-2 initial' if goal else 'NOT REACHED'}")
    starts, expected = path[:-1], path[1:]
    scale = (np.linalg.norm(starts, axis=1) + np.linalg.norm(expected - starts, axis=1))
    allowed = POLYAK_MAP_ULPS * np.finfo(np.float64).eps
    agree = True
    print(f"  one-step maps from the core's {len(starts)} iterates, allowed difference "
          f"{allowed:.1e} x (|w_k| + |step|):")
    diffs = {}
    for name in _progress(ran, "one-step maps"):
        fun_min = wrong if name == bug else 0.0
        nexts = POLYAK_MAPS[name](x, t, starts, fun_min=fun_min)
        diffs[name] = float(np.max(np.linalg.norm(nexts - expected, axis=1) / scale))
    for name, diff in diffs.items():
        ok = diff <= allowed  # False for NaN too
        agree &= ok
        print(f"  {name:<12} vs numpy (core): max relative difference {diff:.1e} "
              f"({diff / np.finfo(np.float64).eps:.0f} ulps) -> {'agree' if ok else 'DISAGREE'}")
    return bool(agree), bool(reached)


# -- iALM: Neyman-Pearson classification (minimise misses subject to a false-alarm bound) -----
NP_ALPHA = 0.02  # bound on the (smoothed) false-positive rate
NP_LR = 0.5
IALM = dict(m=1, beta=4.0, sigma=1.0, gamma=4.0, penalty=None, is_ineq=True)


def load_breast_cancer_split(seed: int = 0):
    """scikit-learn's bundled breast cancer data, malignant = 1, standardised with the training
    split's statistics, a bias column appended, split 70/30 with a fixed permutation."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = data.data.astype(np.float64), (data.target == 0).astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.7 * len(y))
    x_train, x_test = x[order[:cut]], x[order[cut:]]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)

    def prepare(a):
        a = (a - mean) / std
        return np.hstack([a, np.ones((len(a), 1))])

    return prepare(x_train), y[order[:cut]], prepare(x_test), y[order[cut:]]


def _sigmoid(z):
    """The logistic function, overflow-free."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _np_numpy(x, y, steps, settings=IALM):
    """Objective: logistic loss on the positives (a surrogate of the miss rate); constraint:
    mean sigmoid score of the negatives (a smoothed false-positive rate) <= NP_ALPHA."""
    import uniopt

    pos, neg = y == 1, y == 0
    xp, xn = x[pos], x[neg]

    def parts(w):
        zp, zn = xp @ w, xn @ w
        s = _sigmoid(zn)
        f = float(np.mean(np.logaddexp(0.0, -zp)))
        return (f, xp.T @ (-_sigmoid(-zp)) / len(zp), np.array([s.mean() - NP_ALPHA]),
                xn.T @ (s * (1.0 - s)) / len(zn))

    w = np.zeros(x.shape[1])
    dual = uniopt.iALM(**settings)
    for _ in range(steps):
        f, df, c, dc = parts(w)
        dual.update(c)  # forward_update idiom: the Lagrangian's gradient with the new duals
        w -= NP_LR * (df + dual.constraint_weights(c, rhos="last")[0] * dc)
    return w, float(dual.duals[0])


@_one_torch_thread
def _np_torch(x, y, steps, settings=IALM):
    import torch

    from uniopt.adapters.torch.dual_optim import iALM

    xp, xn = torch.from_numpy(x[y == 1]), torch.from_numpy(x[y == 0])
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    primal = torch.optim.SGD([w], lr=NP_LR)
    dual = iALM(**settings)
    for _ in range(steps):
        primal.zero_grad()
        f = torch.nn.functional.softplus(-(xp @ w)).mean()
        c = torch.sigmoid(xn @ w).mean().reshape(1) - NP_ALPHA
        dual.forward_update(f, c).backward()
        primal.step()
    return w.detach().numpy().copy(), float(dual.duals[0])


def _np_jax(x, y, steps, settings=IALM):
    import jax
    import jax.numpy as jnp

    from uniopt.adapters.jax import ialm

    jax.config.update("jax_enable_x64", True)
    xp, xn = jnp.asarray(x[y == 1]), jnp.asarray(x[y == 0])
    dual = ialm(**{k: v for k, v in settings.items() if k != "m"})

    def parts(w):
        return (jax.nn.softplus(-(xp @ w)).mean(),
                jnp.reshape(jax.nn.sigmoid(xn @ w).mean() - NP_ALPHA, (1,)))

    @jax.jit
    def train(w):
        def body(carry, _):
            w, state = carry

            def lagrangian(w, state):
                f, c = parts(w)
                value, new_state = dual.forward_update(f, c, state)
                return value, new_state

            grad, state = jax.grad(lagrangian, has_aux=True)(w, state)
            return (w - NP_LR * grad, state), None

        state = dual.init(parts(w)[1])
        (w, state), _ = jax.lax.scan(body, (w, state), None, length=steps)
        return w, state

    w, state = train(jnp.zeros(x.shape[1]))
    return np.asarray(w), float(jax.tree_util.tree_leaves(state.duals)[0][0])


NP_BACKENDS: dict[str, Callable] = {"numpy (core)": _np_numpy, "torch": _np_torch, "jax": _np_jax}


def neyman_pearson(steps: int = 300, bug: str | None = None) -> tuple[bool, bool]:
    """iALM on Neyman-Pearson classification, on every backend.

    Logistic regression on the breast cancer data: minimise a surrogate of the false-negative
    rate (missed malignant tumours) subject to a smoothed false-positive rate <= NP_ALPHA, with
    full-batch gradient descent on the Lagrangian and one iALM dual update per step
    (``forward_update``). Prints the constraint value and the real (thresholded) rates on the
    training and test splits.

    Goal: the constraint is satisfied (within 1e-3 of the bound) on every backend. Agreement:
    the final weights differ by < 1e-8 (relative) from the core's; this gradient descent with
    a capped dual step does not amplify rounding, so correct backends stay within about 1e-15.

    Args:
        steps: Primal-dual steps per backend.
        bug: A backend to run with a dual step size ``beta`` off by a factor ``BUG_FACTOR``
            (the self-check that the agreement verdict catches a real difference).

    Returns:
        ``(backends agree, goal reached)``.
    """
    x, y, x_test, y_test = load_breast_cancer_split()
    print(f"iALM {IALM} on Neyman-Pearson logistic regression (breast cancer, {len(y)} train / "
          f"{len(y_test)} test), smoothed FPR <= {NP_ALPHA}, {steps} steps, float64")
    print(f"{'backend':<14} {'constraint':>11} {'dual':>7} {'train FPR':>10} {'train FNR':>10} "
          f"{'test FPR':>9} {'test FNR':>9} {'time [s]':>9}  goal")
    wrong = {**IALM, "beta": IALM["beta"] * BUG_FACTOR}
    backends = {name: functools.partial(run, settings=wrong if name == bug else IALM)
                for name, run in NP_BACKENDS.items()}
    finals, reached = {}, True
    xn = x[y == 0]
    for name, (w, dual), elapsed in _timed_runs(backends, x, y, steps):
        finals[name] = [w]
        constraint = float(np.mean(_sigmoid(xn @ w))) - NP_ALPHA
        z, zt = x @ w, x_test @ w
        rates = (np.mean(z[y == 0] > 0), np.mean(z[y == 1] <= 0),
                 np.mean(zt[y_test == 0] > 0), np.mean(zt[y_test == 1] <= 0))
        satisfied = bool(constraint <= 1e-3)  # within 1e-3 of the bound after `steps` updates
        reached &= satisfied
        print(f"{name:<14} {constraint:>11.2e} {dual:>7.3f} {rates[0]:>10.3f} {rates[1]:>10.3f} "
              f"{rates[2]:>9.3f} {rates[3]:>9.3f} {elapsed:>9.2f}"
              f"  {'satisfied' if satisfied else 'VIOLATED'}")
    return _agree(finals), bool(reached)


# -- Cooper-style constrained learning: a recall floor per class, sampled per mini-batch -------
RF_FLOOR = 0.9  # every class's recall must reach this
RF_SLACK = 0.02  # the goal's tolerance below the floor (see recall_floor)
RF = dict(lr=0.05, dual_lr=2.0, batch=64)  # primal SGD, dual projected SGD ascent, batch size
RF_CLASSES = 10


def _recall_batches(n: int, steps: int, batch: int, seed: int = 0) -> np.ndarray:
    """``(steps, batch)`` row indices: one mini-batch per step, each drawn without replacement
    by a seeded NumPy generator (the same batches for every backend)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n, batch, replace=False) for _ in range(steps)])


def _recall_init(n_in: int, seed: int = 0) -> list[np.ndarray]:
    """A small seeded start for the weights (no exact ties in the first predictions)."""
    rng = np.random.default_rng(seed)
    return [0.01 * rng.standard_normal((n_in, RF_CLASSES)), np.zeros(RF_CLASSES)]


def _recalls(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each class's recall on ``(x, y)``, vectorised: one-hot sums, no loop over classes."""
    onehot = np.eye(RF_CLASSES)[y]
    hits = onehot * np.eye(RF_CLASSES)[np.argmax(x @ w + b, axis=1)]
    return hits.sum(axis=0) / onehot.sum(axis=0)


def _recall_numpy(x, y, batches, init, dual_lr):
    """The core: the gradients by hand (NumPy) and the dual step with
    ``uniopt.constrained.indexed_projected_ascent_`` on the classes present in the batch."""
    from uniopt.constrained import indexed_projected_ascent_

    w, b = (a.copy() for a in init)
    lam = np.zeros(RF_CLASSES)
    eye = np.eye(RF_CLASSES)
    for idx in batches:
        xb, yb = x[idx], y[idx]
        onehot = eye[yb]
        z = xb @ w + b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        counts = onehot.sum(axis=0)
        classes = np.flatnonzero(counts)
        recall = (onehot * eye[np.argmax(z, axis=1)]).sum(axis=0) / np.maximum(counts, 1.0)
        # d/dz of mean cross-entropy + sum_c lam_c (FLOOR - mean_{y_i=c} p_ic): the constraint
        # term of sample i is -lam_c / n_c * p_ic (c = y_i), whose z_i-gradient is
        # -lam_c / n_c * p_ic * (e_c - p_i).
        a = (lam / np.maximum(counts, 1.0))[yb] * p[np.arange(len(yb)), yb]
        dz = (p - onehot) / len(yb) - a[:, None] * (onehot - p)
        w -= RF["lr"] * (xb.T @ dz)
        b -= RF["lr"] * dz.sum(axis=0)
        indexed_projected_ascent_(lam, classes, RF_FLOOR - recall[classes], dual_lr,
                                  nonnegative=True)
    return [w, b, lam]


@_one_torch_thread
def _recall_torch(x, y, batches, init, dual_lr):
    """Our Cooper package: one ``IndexedMultiplier``, proxy and strict violations,
    ``SimultaneousOptimizer``."""
    import torch

    import uniopt.adapters.torch.constrained as cooper

    class RecallFloor(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            multiplier = cooper.multipliers.IndexedMultiplier(num_constraints=RF_CLASSES,
                                                              dtype=torch.float64)
            self.floor = cooper.Constraint(cooper.ConstraintType.INEQUALITY,
                                           formulation_type=cooper.formulations.Lagrangian,
                                           multiplier=multiplier)

        def compute_cmp_state(self, inputs, targets):
            logits = inputs @ w + b
            onehot = torch.nn.functional.one_hot(targets, RF_CLASSES).to(logits.dtype)
            counts = onehot.sum(dim=0)
            classes = torch.nonzero(counts).flatten()  # long indices of the present classes
            proxy = (onehot * torch.softmax(logits, dim=1)).sum(dim=0) / counts.clamp(min=1.0)
            with torch.no_grad():
                hits = onehot * torch.nn.functional.one_hot(logits.argmax(dim=1), RF_CLASSES)
                recall = hits.sum(dim=0) / counts.clamp(min=1.0)
            state = cooper.ConstraintState(
                violation=RF_FLOOR - proxy[classes], constraint_features=classes,
                strict_violation=RF_FLOOR - recall[classes], strict_constraint_features=classes)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            return cooper.CMPState(loss=loss, observed_constraints={self.floor: state})

    w, b = (torch.tensor(a, requires_grad=True) for a in init)
    cmp = RecallFloor()
    optimizer = cooper.optim.SimultaneousOptimizer(
        cmp, torch.optim.SGD([w, b], lr=RF["lr"]),
        torch.optim.SGD(cmp.dual_parameters(), lr=dual_lr, maximize=True))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for idx in torch.from_numpy(batches):
        optimizer.roll(compute_cmp_state_kwargs={"inputs": xt[idx], "targets": yt[idx]})
    return [w.detach().numpy().copy(), b.detach().numpy().copy(),
            cmp.floor.multiplier.weight.detach().numpy().reshape(-1).copy()]


@functools.cache
def _recall_jax_train():
    """The jitted JAX training run, built once per process (the unconstrained and constrained
    runs share its compilation: the dual step size is an argument)."""
    import jax
    import jax.numpy as jnp
    import optax

    import uniopt.adapters.jax.constrained as jc

    jax.config.update("jax_enable_x64", True)

    def compute_cmp_state(params, inputs, targets):
        w, b = params
        logits = inputs @ w + b
        onehot = jax.nn.one_hot(targets, RF_CLASSES, dtype=logits.dtype)
        counts = onehot.sum(axis=0)
        present = counts > 0
        # The present classes as a fixed-size index vector (shapes are static under jit): the
        # padding repeats a present class with a zero violation, which adds nothing.
        classes = jnp.nonzero(present, size=RF_CLASSES, fill_value=jnp.argmax(present))[0]
        valid = jnp.arange(RF_CLASSES) < present.sum()
        proxy = (onehot * jax.nn.softmax(logits, axis=1)).sum(axis=0) / jnp.maximum(counts, 1.0)
        hits = onehot * jax.nn.one_hot(jnp.argmax(logits, axis=1), RF_CLASSES, dtype=logits.dtype)
        recall = hits.sum(axis=0) / jnp.maximum(counts, 1.0)  # a value: no gradient flows
        state = jc.ConstraintState(
            violation=jnp.where(valid, RF_FLOOR - proxy[classes], 0.0),
            constraint_features=classes,
            strict_violation=jnp.where(valid, RF_FLOOR - recall[classes], 0.0),
            strict_constraint_features=classes)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return jc.CMPState(loss=loss, observed_constraints={"floor": state})

    @jax.jit
    def train(params, x, y, batches, dual_lr):
        solver = jc.ConstrainedOptimizer(compute_cmp_state, optax.sgd(RF["lr"]),
                                         jc.projected_ascent(dual_lr), roll="simultaneous")
        multiplier = jc.IndexedMultiplier(RF_CLASSES, dtype=jnp.float64)
        constraints = {"floor": jc.Constraint(jc.ConstraintType.INEQUALITY,
                                              formulation=jc.lagrangian, multiplier=multiplier)}

        def body(carry, idx):
            params, constraints, state = carry
            params, constraints, state, _ = solver.step(params, constraints, state, x[idx],
                                                        y[idx])
            return (params, constraints, state), None

        carry = (params, constraints, solver.init(params, constraints))
        (params, constraints, _), _ = jax.lax.scan(body, carry, batches)
        return params, constraints["floor"].multiplier.weight

    return train


def _recall_jax(x, y, batches, init, dual_lr):
    """Our JAX module: the same problem as a pure ``compute_cmp_state``, one
    ``ConstrainedOptimizer.step`` per batch inside a ``lax.scan``, the whole run jitted."""
    import jax.numpy as jnp

    (w, b), lam = _recall_jax_train()(tuple(jnp.asarray(a) for a in init), jnp.asarray(x),
                                      jnp.asarray(y), jnp.asarray(batches),
                                      jnp.asarray(dual_lr, jnp.float64))
    return [np.asarray(w), np.asarray(b), np.asarray(lam)]


RF_BACKENDS: dict[str, Callable] = {"numpy (core)": _recall_numpy, "torch": _recall_torch,
                                    "jax": _recall_jax}


def _recall_run(train, x, y, batches, init, dual_lr):
    """A backend's unconstrained model (dual step size 0: the multipliers stay 0, the primal
    Lagrangian is the loss) and its constrained model."""
    return train(x, y, batches, init, 0.0), train(x, y, batches, init, dual_lr)


def recall_floor(steps: int = 300, bug: str | None = None) -> tuple[bool, bool]:
    """Multinomial logistic regression on digits with a recall floor per class, on every
    backend (Cooper's proxy-constraint mechanism with an indexed multiplier).

    Constraint per class c: ``recall_c >= RF_FLOOR`` (an INEQUALITY, Lagrangian formulation,
    one ``IndexedMultiplier`` of 10 rows of which each mini-batch samples the classes it
    contains). The recall on the batch is not differentiable: it is the *strict* violation
    ``FLOOR - recall_c`` that drives the multiplier, while the primal step follows the
    differentiable *proxy* ``FLOOR - mean_{i in batch, y_i = c} softmax_c(x_i)``. Primal SGD
    and projected dual ascent (SGD ``maximize=True`` then ``relu``) move simultaneously, on the
    same seeded mini-batches for every backend. The unconstrained model is the same run with a
    dual step size of 0 (the multipliers stay 0).

    Goal: every class's recall on the training set is at least ``RF_FLOOR - RF_SLACK`` for
    the constrained model. The slack: the multipliers react to batch recalls (about 6
    samples of a class per batch of 64, so a batch recall moves in steps of about 1/6), and
    the last iterate oscillates around the floor by that noise; the dual ascent only
    guarantees the *average* batch violation, ``(1/T) sum_t (FLOOR - recall_{c,t}) <=
    lambda_{c,T} / (eta_dual T)`` (the projection only ever raises a multiplier). 0.02 is
    about 3 samples of a class of ~145 in the training set.

    Agreement: the final weights, biases and multipliers (and the unconstrained model's) of
    torch and JAX differ by < 1e-8 (relative, as in the other sections) from the core's. The
    primal steps are smooth in the parameters, and the dual steps see the batch recalls, which
    are the same counts over the same class sizes in every backend unless the two largest
    logits of a sample tie to within the backends' rounding difference (about 1e-12 here; with
    ~1e5 predictions per 1000 steps the chance of one such flip is ~1e-7): correct backends
    stay within about 5e-12 of each other (measured at 1, 300, 400 and 2000 steps). A dual step
    size off by a factor ``BUG_FACTOR`` changes the multipliers by 1e-4 relative at the first
    step, and soon flips batch recalls (0.1 after 100 steps).

    Args:
        steps: Mini-batch steps per backend and model.
        bug: A backend whose dual step size is off by a factor ``BUG_FACTOR`` (the self-check
            that the agreement verdict catches a real difference).

    Returns:
        ``(backends agree, goal reached)``.
    """
    x, y, x_test, y_test = load_digits_split()
    batches = _recall_batches(len(y), steps, RF["batch"])
    init = _recall_init(x.shape[1])
    print(f"Multinomial logistic regression 64->10 on digits ({len(y)} train / {len(y_test)} "
          f"test), SGD lr {RF['lr']}, {steps} steps of {RF['batch']}-sample batches (seeded, the "
          f"same for every backend), float64")
    print(f"  constraint: train recall_c >= {RF_FLOOR} per class c (proxy: the batch's mean "
          f"softmax_c over class c), Lagrangian, IndexedMultiplier(10) sampled per batch, dual "
          f"SGD lr {RF['dual_lr']} (maximize), simultaneous")
    print(f"{'backend':<14} {'unconstrained':>22} {'constrained':>22} {'max mult.':>10} "
          f"{'time [s]':>9}  goal")
    print(f"{'':<14} {'min recall  < floor':>22} {'min recall  < floor':>22}")
    backends = {name: functools.partial(
                    _recall_run, train,
                    dual_lr=RF["dual_lr"] * (BUG_FACTOR if name == bug else 1.0))
                for name, train in RF_BACKENDS.items()}
    finals, reached, tables = {}, True, {}
    for name, (free, bound), elapsed in _timed_runs(backends, x, y, batches, init):
        finals[name] = [*free, *bound]
        r_free, r_bound = _recalls(x, y, *free[:2]), _recalls(x, y, *bound[:2])
        tables[name] = (r_free, r_bound)
        goal = bool(np.all(r_bound >= RF_FLOOR - RF_SLACK))  # False for NaN
        reached &= goal
        print(f"{name:<14} {r_free.min():>10.3f} {int(np.sum(r_free < RF_FLOOR)):>11d} "
              f"{r_bound.min():>10.3f} {int(np.sum(r_bound < RF_FLOOR)):>11d} "
              f"{float(np.max(bound[2])):>10.3f} {elapsed:>9.2f}  "
              f"{f'all recalls >= {RF_FLOOR - RF_SLACK:.2f}' if goal else 'NOT REACHED'}")
    if tables:
        first = next(iter(tables))
        print(f"  train recall per class ({first}): {'':<2}"
              + " ".join(f"{c:>5d}" for c in range(RF_CLASSES)))
        for label, recalls in zip(("unconstrained", "constrained"), tables[first]):
            print(f"    {label:<34}" + " ".join(f"{r:>5.3f}" for r in recalls))
    return _agree(finals), bool(reached)


# -- bilevel data hyper-cleaning: per-sample weights learned by RAD and IAPTT-GM ----------------
#: The split, the label noise, the LL solve (T full-batch SGD steps of a 64->10 softmax
#: regression from zero), the UL optimizer (Adam on one logit per training sample) and the
#: number of UL steps; the examples ``{torch,jax}_bilevel_hyper_cleaning.py`` use these.
HC = dict(n_train=600, n_val=300, noise=0.5, T=25, ll_lr=1.0, ul_lr=0.2, outer=30)
HC_METHODS = ("RAD", "IAPTT-GM")
HC_MARGIN = 0.02  # the goal: the learned weights beat the noisy baseline's accuracy by this
HC_PRECISION = 0.8  # ... and this fraction of the flagged samples is really corrupted


def noisy_digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits (scaled to [0, 1]) split into train / validation / test with a fixed permutation;
    ``HC["noise"]`` of the *training* labels replaced by a different, uniformly drawn class.

    Returns:
        ``x_train, y_train`` (noisy), ``y_train_clean``, ``corrupted`` (bool mask),
        ``x_val, y_val``, ``x_test, y_test`` (clean).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_tr, n_val = HC["n_train"], HC["n_val"]
    train, val, test = order[:n_tr], order[n_tr:n_tr + n_val], order[n_tr + n_val:]
    clean = y[train]
    noisy = clean.copy()
    flip = rng.permutation(n_tr)[:int(round(HC["noise"] * n_tr))]
    noisy[flip] = (clean[flip] + rng.integers(1, 10, size=len(flip))) % 10  # another class
    return {"x_train": x[train], "y_train": noisy, "y_train_clean": clean,
            "corrupted": noisy != clean, "x_val": x[val], "y_val": y[val],
            "x_test": x[test], "y_test": y[test]}


def weighted_softmax_regression(x, y, weights, steps=HC["T"], lr=HC["ll_lr"]):
    """The LL solve in NumPy: ``steps`` full-batch gradient steps from zero on
    ``mean_i weights_i * CE(W x_i + b, y_i)``; returns ``(W, b)`` (``W``: 10 x 64)."""
    w, b = np.zeros((10, x.shape[1])), np.zeros(10)
    onehot = np.eye(10)[y]
    for _ in range(steps):
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        d = weights[:, None] * (p - onehot) / len(y)
        w, b = w - lr * d.T @ x, b - lr * d.sum(axis=0)
    return w, b


def hyper_cleaning_report(data: dict, x_logits: np.ndarray) -> dict[str, float]:
    """What the learned per-sample logits are worth, computed the same way for every run.

    Returns:
        ``noisy_acc``: test accuracy of the LL solve on the noisy labels, every weight 1;
        ``acc``: test accuracy of the LL solve retrained from zero with the learned weights
        ``sigmoid(x)``; ``precision`` / ``recall``: of the samples flagged as corrupted
        (``sigmoid(x_i) < 0.5``, i.e. ``x_i < 0``) against the truly corrupted ones;
        ``flagged``: how many were flagged.
    """
    def accuracy(weights):
        w, b = weighted_softmax_regression(data["x_train"], data["y_train"], weights)
        return float(np.mean(np.argmax(data["x_test"] @ w.T + b, axis=1) == data["y_test"]))

    flagged = np.asarray(x_logits) < 0.0
    hits = int(np.sum(flagged & data["corrupted"]))
    return {"noisy_acc": accuracy(np.ones(len(x_logits))),
            "acc": accuracy(1.0 / (1.0 + np.exp(-np.asarray(x_logits)))),
            "precision": hits / max(int(flagged.sum()), 1),
            "recall": hits / int(data["corrupted"].sum()), "flagged": float(flagged.sum())}


def hyper_cleaning_example(learn_weights: Callable) -> dict[str, float]:
    """The body of ``examples/{torch,jax}_bilevel_hyper_cleaning.py``: learn the weights with
    every method of ``HC_METHODS`` by ``learn_weights(data, method)``, print what they are worth
    (:func:`hyper_cleaning_report`) and a ``result key=value ...`` line; returns its values."""
    data = noisy_digits_split()
    out: dict[str, float] = {}
    for method in HC_METHODS:
        start = time.perf_counter()
        x = learn_weights(data, method)[0]
        elapsed = time.perf_counter() - start
        m = hyper_cleaning_report(data, x)
        print(f"{method:<9} test accuracy {m['acc']:.3f} (noisy labels, unweighted: "
              f"{m['noisy_acc']:.3f}); flagged {int(m['flagged'])} of {len(x)} as corrupted: "
              f"precision {m['precision']:.3f}, recall {m['recall']:.3f}; {elapsed:.1f} s")
        key = method.lower().replace("-", "_")
        out.update({"noisy_acc": m["noisy_acc"], f"{key}_acc": m["acc"],
                    f"{key}_precision": m["precision"], f"{key}_recall": m["recall"]})
    out["corrupted_fraction"] = float(np.mean(data["corrupted"]))
    print("result " + " ".join(f"{k}={v:.6f}" for k, v in out.items()))
    return out


def _hc_torch(method, data, ul_lr):
    from torch_bilevel_hyper_cleaning import learn_weights

    return _one_torch_thread(learn_weights)(data, method, ul_lr=ul_lr)


def _hc_jax(method, data, ul_lr):
    from jax_bilevel_hyper_cleaning import learn_weights

    return learn_weights(data, method, ul_lr=ul_lr)


HC_BACKENDS: dict[str, Callable] = {"torch": _hc_torch, "jax": _hc_jax}


def bilevel_hyper_cleaning(steps: int = 300, bug: str | None = None) -> tuple[bool, bool]:
    """Data hyper-cleaning on digits with half the training labels corrupted: per-sample
    weights learned by RAD and by IAPTT-GM, with uniopt's torch and JAX bilevel ``Dynamic``.

    LL: a 64->10 softmax regression trained from zero by ``HC["T"]`` full-batch SGD steps on
    ``mean_i sigmoid(x_i) CE_i`` (noisy training labels); UL: the clean validation
    cross-entropy at the LL solution, minimised over the logits ``x`` (one per training sample,
    from 0) by ``HC["outer"]`` Adam steps. RAD differentiates through all steps; IAPTT-GM
    (``acquire_max_loss=True, init_aux=True``) through the steps up to the worst iterate
    ``t* = argmax_t F(w_t)`` and also learns the LL initial point. Every learned weight vector is
    judged the same way (:func:`hyper_cleaning_report`, NumPy, the LL solve retrained from zero
    with the weights): test accuracy against the same solve on the noisy labels with every weight
    1, and precision / recall of the samples flagged as corrupted (``sigmoid(x_i) < 0.5``).

    Goal: for every method and backend, the learned weights beat the noisy baseline's test
    accuracy by ``HC_MARGIN`` and at least ``HC_PRECISION`` of the flagged samples are corrupted
    (a random guess flags corrupted samples with precision ``HC["noise"]``).

    Agreement: the same float64 computation in torch and JAX; the learned logits (and, for
    IAPTT-GM, the learned initial point) of JAX differ from torch's by < 1e-6 relative (measured:
    about 1e-12; Adam's normalised steps do not amplify rounding, the argmax ``t*`` has no
    near-ties here). ``--steps`` does not apply (the step counts are ``HC``'s).

    Args:
        steps: Ignored (the section's step counts are fixed by ``HC``).
        bug: A backend whose UL learning rate is off by a factor ``BUG_FACTOR``.

    Returns:
        ``(backends agree, goal reached)``.
    """
    del steps
    data = noisy_digits_split()
    print(f"Data hyper-cleaning on digits ({HC['n_train']} train with {HC['noise']:.0%} labels "
          f"corrupted / {HC['n_val']} clean val / {len(data['y_test'])} test), softmax regression "
          f"64->10, LL: {HC['T']} SGD steps lr {HC['ll_lr']} from 0 on sigmoid(x_i)-weighted CE; "
          f"UL: Adam lr {HC['ul_lr']} on x, {HC['outer']} steps; float64")
    print(f"{'backend':<14} {'method':<9} {'noisy acc':>9} {'weighted':>9} {'precision':>9} "
          f"{'recall':>7} {'time [s]':>9}  goal")
    finals, reached, rows = {}, True, []
    for method in HC_METHODS:
        runs = {name: functools.partial(
                    train, method, ul_lr=HC["ul_lr"] * (BUG_FACTOR if name == bug else 1.0))
                for name, train in HC_BACKENDS.items()}
        for name, learned, elapsed in _timed_runs(runs, data):
            finals.setdefault(name, []).extend(learned)
            m = hyper_cleaning_report(data, learned[0])
            goal = bool(m["acc"] >= m["noisy_acc"] + HC_MARGIN and m["precision"] >= HC_PRECISION)
            reached &= goal
            rows.append((name, method, m))
            print(f"{name:<14} {method:<9} {m['noisy_acc']:>9.3f} {m['acc']:>9.3f} "
                  f"{m['precision']:>9.3f} {m['recall']:>7.3f} {elapsed:>9.2f}  "
                  + (f"acc >= noisy + {HC_MARGIN}, precision >= {HC_PRECISION}" if goal
                     else "NOT REACHED"))
    return _agree_with(finals, "torch", 1e-6), bool(reached and rows)


def _agree_with(finals: dict, first: str, tolerance: float) -> bool:
    """Print and check the largest relative difference of each backend's arrays from
    ``first``'s; NaN disagrees."""
    ok = True
    for name, arrays in finals.items():
        diff = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
                   for a, b in zip(arrays, finals[first]))
        agree = diff < tolerance  # False for NaN
        ok &= agree
        print(f"  {name:<12} vs {first}: max rel. difference of the learned weights {diff:.1e} "
              f"-> {'agree' if agree else 'DISAGREE'}")
    return bool(ok) and first in finals


def _progress(items, description: str):
    """A progress bar on stderr over ``items`` (shown on a terminal only; cleared when done)."""
    from tqdm import tqdm  # the demo extra

    return tqdm(items, desc=description, leave=False, disable=None, file=sys.stderr)


def _timed_runs(backends: dict, *args):
    """``(name, result, seconds)`` of each backend's run on ``args``, with a progress bar; a
    backend whose framework is not installed prints a "skipped" row instead."""
    bar = _progress(list(backends.items()), "backends")
    for name, train in bar:
        bar.set_postfix_str(name)
        try:
            start = time.perf_counter()
            result = train(*args)
            elapsed = time.perf_counter() - start
        except ImportError as exc:
            bar.write(f"{name:<14} skipped: {exc}", file=sys.stdout)
            continue
        with bar.external_write_mode(file=sys.stdout):  # the caller prints its row cleanly
            yield name, result, elapsed


def _agree(finals: dict) -> bool:
    """Print and check the largest relative parameter difference of each backend from the
    first (the core); NaN disagrees."""
    ok = True
    first = next(iter(finals))
    for name, params in finals.items():
        diff = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
                   for a, b in zip(params, finals[first]))
        agree = diff < 1e-8  # False for NaN
        ok &= agree
        print(f"  {name:<12} vs {first}: max rel. param difference {diff:.1e} "
              f"-> {'agree' if agree else 'DISAGREE'}")
    return bool(ok)


SECTIONS: dict[str, Callable[..., tuple[bool, bool]]] = {
    "qhadam-digits": qhadam_digits,
    "polyak-interpolation": polyak_interpolation,
    "neyman-pearson": neyman_pearson,
    "recall-floor": recall_floor,
    "bilevel-hyper-cleaning": bilevel_hyper_cleaning,
}


def _one_blas_thread():
    """A context with NumPy's BLAS on one thread (threadpoolctl, which scikit-learn -- the
    demo extra -- depends on; a no-op without it). The demo's matrices are small: on a busy
    2-core machine two OpenBLAS threads made 50 full-batch QHAdam steps of the core 3 times
    slower (measured: 1.7-2.0 s against 0.6 s)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``2.5``, ``0`` and ``-3`` are usage errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid positive integer: {text!r} (must be >= 1)")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the sections; print per section and overall two verdicts: whether the backends
    agree, and whether every run reached its goal.

    Returns:
        0 when the backends agree (whether or not every goal was reached in ``--steps``
        steps: too few steps is not a fault), 1 when they disagree. argparse exits with 2 on
        bad arguments.
    """
    parser = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_positive_int, default=300,
                        help="training steps per backend (a positive integer)")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    # The self-check of the agreement verdict: run this backend with a wrong hyper-parameter.
    parser.add_argument("--bug", choices=sorted(BACKENDS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    agree_all, reached_all = True, True
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name} ==")
        with _one_blas_thread():
            agree, reached = section(steps=args.steps, bug=args.bug)
        print(f"  {name}: backends {'agree' if agree else 'DISAGREE'}; "
              f"goal {'reached' if reached else 'NOT REACHED'}")
        print()
        agree_all &= agree
        reached_all &= reached
    print("verdict: all backends agree" if agree_all else "verdict: BACKENDS DISAGREE")
    print("verdict: every goal reached" if reached_all
          else f"verdict: some goal NOT REACHED in {args.steps} steps")
    return 0 if agree_all else 1


if __name__ == "__main__":
    sys.exit(main())
