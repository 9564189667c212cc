"""Bilevel hypergradients (issue 10): uniopt's ``Dynamic`` against plain unrolls.

One RAD hypergradient of a data hyper-cleaning-like problem, float32:

* lower level (LL): a linear model ``W`` (``d_out x d_in``, ``d_in = 4``, so ``n_params =
  4 d_out``: 1e5 or 1e6) fitted to random data by ``T`` plain SGD steps (lr 0.1, from
  ``W_0 = 0``) on the per-sample weighted least-squares loss ``f(W, x) = 1/(2n) sum_i
  sigmoid(x_i) |W a_i - b_i|^2`` (``n = 16`` samples, half with corrupted targets);
* upper level (UL): the per-sample logits ``x`` (``n`` of them, at 0); ``F(W) = 1/(2n) sum_j
  |W a'_j - b'_j|^2`` on ``n`` validation samples; the hypergradient is ``dF(W_T(x))/dx``.

The shape is chosen so that what a reverse pass must keep per step (the residuals, ``n d_out =
4 n_params`` floats) is larger than the LL state (``n_params``): the regime of data-heavy LL
problems, where checkpointing can pay off, at a compute cost that stays small.

Contenders (``CASES``), each computing the same vector (``tests/test_bench_smoke.py`` checks
it against a NumPy reverse pass; the table prints the differences):

* ``torch_plain``: a plain torch autograd unroll, no uniopt: ``torch.func.functional_call``
  of the ``nn.Linear``, ``torch.autograd.grad(create_graph=True)`` w.r.t. the LL weights, the
  SGD step as torch ops, one ``torch.autograd.grad`` of ``F`` w.r.t. ``x``;
* ``torch_uniopt`` / ``torch_uniopt_ckpt``: ``uniopt.adapters.torch.bilevel.Dynamic`` with
  ``ll_opt=torch.optim.SGD`` (its kernel path: the Numba forward and VJP kernels of the update),
  without and with per-step checkpointing;
* ``jax_plain``: ``jax.jit(jax.grad(...))`` of a plain ``lax.scan`` unroll, no uniopt;
* ``jax_uniopt`` / ``jax_uniopt_ckpt``: ``jax.jit`` of
  ``uniopt.adapters.jax.bilevel.Dynamic(...).hypergrad`` with ``optax.sgd``, without and with
  ``checkpoint=True`` (``jax.checkpoint`` on the scan body).

How it is measured (:func:`measure`), in fresh processes pinned to one CPU
(``UNIOPT_BENCH_PIN=0`` turns the pinning off) with one torch thread; every case is first warmed
by a one-step hypergradient (kernels loaded, frameworks started) and JAX cases are compiled
ahead of time, so neither counts:

* **time**: per framework one process builds its three cases at each ``T`` and times
  ``repeat`` rounds of one hypergradient of each, interleaved in a rotating order (JAX results
  blocked on); the median is the time, and the ratios to the plain unroll are taken from
  numbers measured side by side;
* **peak memory**: per framework one more process, with glibc's malloc set to hand every freed
  block back to the OS (:data:`MEMORY_ENV`), so that the resident set follows what is live;
  before each hypergradient the peak RSS is reset to the current RSS
  (``/proc/self/clear_refs``, Linux) and the peak memory is the peak RSS during the
  hypergradient minus the RSS before it: memory the process really touched, everything
  autograd or XLA keeps for the backward pass included, with the same yardstick for torch's
  and XLA's allocators.

The asv class below reports these numbers (``track_seconds``, ``track_peak_mib`` and the
ratios) for a subset (:data:`ASV_SIZES` x :data:`ASV_STEPS`), measured once in
``setup_cache``; ``asv_bench/table.py --only bilevel`` prints the whole grid with the goals.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: LL parameter counts (float32) and unroll lengths of the table.
SIZES = (100_000, 1_000_000)
STEPS = (50, 100, 200)
QUICK_SIZES, QUICK_STEPS = (100_000,), (50,)
#: The asv grid (every case is a fresh process; kept small for ``make bench``).
ASV_SIZES, ASV_STEPS = (100_000,), (50, 200)
#: The problem's fixed sizes and step size.
N_SAMPLES, D_IN, LR = 16, 4, 0.1

#: case -> (framework, label, help) in table order; the plain unroll first in each framework.
CASES = {
    "torch_plain": ("torch", "torch plain", "torch autograd unroll (functional_call + "
                    "autograd.grad(create_graph=True)), no uniopt"),
    "torch_uniopt": ("torch", "uniopt torch", "uniopt.adapters.torch.bilevel.Dynamic, "
                     "ll_opt=torch.optim.SGD (plain SGD: one torch add per step; momentum/Adam/QH: Numba update + VJP kernels)"),
    "torch_uniopt_ckpt": ("torch", "uniopt torch ckpt", "the same with checkpoint=True "
                          "(per-step non-reentrant checkpointing)"),
    "jax_plain": ("jax", "jax plain", "jax.jit(jax.grad) of a plain lax.scan unroll, no uniopt"),
    "jax_uniopt": ("jax", "uniopt jax", "jax.jit(uniopt.adapters.jax.bilevel.Dynamic(...)"
                   ".hypergrad), ll_opt=optax.sgd"),
    "jax_uniopt_ckpt": ("jax", "uniopt jax ckpt", "the same with checkpoint=True "
                        "(jax.checkpoint on the scan body)"),
}
#: The plain unroll each case is compared with.
BASELINE = {"torch": "torch_plain", "jax": "jax_plain"}


class Unavailable(Exception):
    """A case cannot run here (framework or uniopt face missing); the reason."""


def problem(n_params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded float32 data of the problem with ``n_params`` LL parameters."""
    if n_params % D_IN:
        raise ValueError(f"n_params must be a multiple of {D_IN}, got {n_params}")
    d_out = n_params // D_IN
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal((d_out, D_IN)).astype(np.float32) / np.sqrt(D_IN)

    def split():
        a = rng.standard_normal((N_SAMPLES, D_IN)).astype(np.float32)
        return a, a @ w_true.T + rng.standard_normal((N_SAMPLES, d_out)).astype(np.float32)

    (a, b), (a_val, b_val) = split(), split()
    # Half the training targets corrupted (the hypergradient then has a clear direction).
    b[::2] = rng.standard_normal(b[::2].shape).astype(np.float32) * 2
    return {"a": a, "b": b, "a_val": a_val, "b_val": b_val,
            "x": np.zeros(N_SAMPLES, np.float32), "w0": np.zeros((d_out, D_IN), np.float32)}


# -- torch -------------------------------------------------------------------------------------
def _torch_parts(data):
    import torch

    torch.set_num_threads(1)
    t = {k: torch.from_numpy(v) for k, v in data.items()}
    d_out = data["w0"].shape[0]
    model = torch.nn.Linear(D_IN, d_out, bias=False)
    with torch.no_grad():
        model.weight.copy_(t["w0"])
    return torch, t, model


def _build_torch_plain(data, steps):
    torch, t, model = _torch_parts(data)
    call = torch.func.functional_call

    def hypergrad():
        x = t["x"].clone().requires_grad_()
        w = t["w0"].clone().requires_grad_()
        weights = torch.sigmoid(x)
        for _ in range(steps):
            r = call(model, {"weight": w}, (t["a"],)) - t["b"]
            loss = 0.5 * (weights * (r * r).sum(dim=1)).mean()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            w = w - LR * g
        r = call(model, {"weight": w}, (t["a_val"],)) - t["b_val"]
        (hx,) = torch.autograd.grad(0.5 * (r * r).sum(dim=1).mean(), x)
        return hx.numpy()

    return hypergrad


def _build_torch_uniopt(data, steps, checkpoint=False):
    torch, t, model = _torch_parts(data)
    try:
        from uniopt.adapters.torch.bilevel import Dynamic
    except ImportError as exc:
        raise Unavailable(f"uniopt.adapters.torch.bilevel: {exc}") from exc

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(t["x"].clone())

    ul_model = Logits()

    def ll_objective(state):
        r = state["lower_model"](state["data"]) - state["target"]
        return 0.5 * (torch.sigmoid(state["upper_model"].x) * (r * r).sum(dim=1)).mean()

    def ul_objective(state):
        r = state["lower_model"](state["data"]) - state["target"]
        return 0.5 * (r * r).sum(dim=1).mean()

    dyn = Dynamic(ll_objective, steps, ul_model, ul_objective, model,
                  ll_opt=torch.optim.SGD(model.parameters(), lr=LR), checkpoint=checkpoint)

    def hypergrad():
        ul_model.x.grad = None
        result = dyn.optimize(t["a"], t["b"])
        dyn.hypergrad(result, t["a_val"], t["b_val"])
        return ul_model.x.grad.numpy().copy()

    return hypergrad


# -- JAX ---------------------------------------------------------------------------------------
def _jax_parts(data):
    import jax
    import jax.numpy as jnp

    return jax, jnp, {k: jnp.asarray(v) for k, v in data.items()}


def _build_jax_plain(data, steps):
    jax, jnp, j = _jax_parts(data)

    def ul_loss(x, w0, a, b, a_val, b_val):
        weights = jax.nn.sigmoid(x)

        def ll(w):
            r = a @ w.T - b
            return 0.5 * jnp.mean(weights * jnp.sum(r * r, axis=1))

        def body(w, _):
            return w - LR * jax.grad(ll)(w), None

        w, _ = jax.lax.scan(body, w0, None, length=steps)
        r = a_val @ w.T - b_val
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    args = (j["x"], j["w0"], j["a"], j["b"], j["a_val"], j["b_val"])
    grad = jax.jit(jax.grad(ul_loss)).lower(*args).compile()  # compiled here, not when timed

    def hypergrad():
        return np.asarray(grad(*args).block_until_ready())

    return hypergrad


def _build_jax_uniopt(data, steps, checkpoint=False):
    jax, jnp, j = _jax_parts(data)
    import optax

    try:
        from uniopt.adapters.jax.bilevel import Dynamic
    except ImportError as exc:
        raise Unavailable(f"uniopt.adapters.jax.bilevel: {exc}") from exc

    def ll_objective(state):
        r = state["data"] @ state["lower_model"].T - state["target"]
        return 0.5 * jnp.mean(jax.nn.sigmoid(state["upper_model"]) * jnp.sum(r * r, axis=1))

    def ul_objective(state):
        r = state["data"] @ state["lower_model"].T - state["target"]
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    dyn = Dynamic(ll_objective, steps, ul_objective, ll_opt=optax.sgd(LR), checkpoint=checkpoint)
    args = (j["x"], j["w0"], j["a"], j["b"], j["a_val"], j["b_val"])
    run = jax.jit(lambda *args: dyn.hypergrad(*args).ul_grad).lower(*args).compile()

    def hypergrad():
        return np.asarray(run(*args).block_until_ready())

    return hypergrad


BUILDERS = {
    "torch_plain": _build_torch_plain,
    "torch_uniopt": _build_torch_uniopt,
    "torch_uniopt_ckpt": lambda data, steps: _build_torch_uniopt(data, steps, checkpoint=True),
    "jax_plain": _build_jax_plain,
    "jax_uniopt": _build_jax_uniopt,
    "jax_uniopt_ckpt": lambda data, steps: _build_jax_uniopt(data, steps, checkpoint=True),
}


def build(case: str, n_params: int, steps: int, seed: int = 0):
    """A callable computing case ``case``'s hypergradient (a NumPy array), in this process.

    Raises:
        Unavailable: the framework or the uniopt face is not installed.
    """
    framework = CASES[case][0]
    try:
        __import__(framework)
    except ImportError as exc:
        raise Unavailable(f"{framework} not installed") from exc
    return BUILDERS[case](problem(n_params, seed), steps)


# -- measurement in fresh processes --------------------------------------------------------------
#: The subprocess environment of the memory measurement: glibc's malloc with a fixed mmap
#: threshold (so its dynamic threshold never rises) and trimming on every free, so that every
#: large block is mapped when allocated and unmapped when freed and the RSS follows what is
#: live. Used for the memory runs only: the page faults it costs distort times.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _warm(case: str, n_params: int, seed: int = 0) -> None:
    """A one-step hypergradient of ``case``: kernels loaded, frameworks and allocators warm."""
    build(case, n_params, 1, seed)()


def peak_memory(cases, n_params: int, steps_list, seed: int = 0) -> dict:
    """Peak RSS growth of one hypergradient of every case and ``T``, in *this* process (run it
    in a fresh one with :data:`MEMORY_ENV`: :func:`measure`).

    Each case is warmed by a one-step hypergradient; then for each ``T`` the case is built (JAX:
    compiled ahead of time), the peak RSS is reset to the current RSS (``/proc/self/clear_refs``)
    and one hypergradient runs: its peak RSS minus the RSS before it is the case's peak memory.

    Returns:
        ``{T: {case: {"peak_bytes": int, "grad": [...]} or {"unavailable": reason}}}``.
    """
    out: dict = {steps: {} for steps in steps_list}
    for case in cases:
        try:
            _warm(case, n_params, seed)
        except Unavailable as exc:
            for steps in steps_list:
                out[steps][case] = {"unavailable": str(exc)}
            continue
        for steps in steps_list:
            hypergrad = build(case, n_params, steps, seed)
            with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
                f.write("5")
            before = _status_kib("VmRSS")
            grad = hypergrad()
            out[steps][case] = {"peak_bytes": 1024 * (_status_kib("VmHWM") - before),
                                "grad": np.asarray(grad).tolist()}
            del hypergrad, grad
    return out


def timings(cases, n_params: int, steps_list, repeat: int = 3, seed: int = 0) -> dict:
    """Interleaved times of ``cases`` (one framework) at every ``T``, in *this* process.

    Every case is warmed by a one-step hypergradient; then for each ``T`` every case is built
    (JAX: compiled ahead of time) and ``repeat`` rounds time one hypergradient of every case, in
    a rotating order.

    Returns:
        ``{T: {case: {"seconds": [...], "grad": [...]} or {"unavailable": reason}}}``.
    """
    out: dict = {steps: {} for steps in steps_list}
    ready = []
    for case in cases:
        try:
            _warm(case, n_params, seed)
            ready.append(case)
        except Unavailable as exc:
            for steps in steps_list:
                out[steps][case] = {"unavailable": str(exc)}
    for steps in steps_list:
        runs = {case: build(case, n_params, steps, seed) for case in ready}
        for case in ready:
            out[steps][case] = {"seconds": [], "grad": None}
        for k in range(repeat):
            for case in ready[k % len(ready):] + ready[:k % len(ready)]:
                start = time.perf_counter()
                grad = runs[case]()
                out[steps][case]["seconds"].append(time.perf_counter() - start)
                out[steps][case]["grad"] = np.asarray(grad).tolist()
        del runs
    return out


def _subprocess(task: dict, pin: bool, env: dict, timeout: float) -> dict:
    env = {**os.environ, **env, "UNIOPT_BENCH_PIN": "1" if pin else "0"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    code = "import sys; from benchmarks.bilevel import _main; _main(sys.argv[1])"
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(task)], capture_output=True,
                             text=True, timeout=timeout, env=env,
                             cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    result = json.loads(lines[-1])
    return {int(k): v for k, v in result.items()} if all(k.isdigit() for k in result) else result


def measure(n_params: int, steps_list, repeat: int = 3, pin: bool = True, cases=tuple(CASES),
            timeout: float = 3600) -> dict:
    """Every case at one size and every ``T``, in fresh processes: per framework, one process
    times its cases (interleaved, :func:`timings`) and one measures their peak memory
    (:func:`peak_memory`, with :data:`MEMORY_ENV`).

    Returns:
        ``{T: {case: {"seconds", "grad", "peak_bytes"} or {"unavailable"} or {"error"}}}``.
    """
    steps_list = list(steps_list)
    out: dict = {steps: {} for steps in steps_list}
    for framework in dict.fromkeys(CASES[c][0] for c in cases):
        mine = [c for c in cases if CASES[c][0] == framework]
        task = {"cases": mine, "n_params": n_params, "steps_list": steps_list}
        times = _subprocess({"what": "times", "repeat": repeat, **task}, pin, {}, timeout)
        memory = _subprocess({"what": "memory", **task}, pin, MEMORY_ENV, timeout)
        for steps in steps_list:
            for case in mine:
                res = dict(times.get(steps, {}).get(case) or {"error": times.get("error")})
                mem = memory.get(steps, {}).get(case) or {"error": memory.get("error")}
                if "peak_bytes" in mem:
                    res["peak_bytes"] = mem["peak_bytes"]
                    res["grad_memory_run"] = mem["grad"]
                elif "seconds" in res:
                    res["memory_error"] = mem.get("error") or mem.get("unavailable")
                out[steps][case] = res
    return out


def _main(argument: str) -> None:
    """The subprocess's entry point: pin, run the task, print one JSON line."""
    task = json.loads(argument)
    if os.environ.get("UNIOPT_BENCH_PIN", "1") != "0" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    args = (task["cases"], task["n_params"], task["steps_list"])
    if task["what"] == "memory":
        result = peak_memory(*args)
    else:
        result = timings(*args, repeat=task["repeat"])
    print(json.dumps(result), flush=True)


def summarize(results: dict) -> dict:
    """Per case: median seconds, peak MiB, the ratios against its framework's plain unroll (time
    and peak memory), and the largest difference of its hypergradient from the plain unroll's
    (relative to the largest entry of the latter).

    Args:
        results: :func:`measure`'s result (one size and ``T``).
    """
    out = {}
    for case, res in results.items():
        base = results.get(BASELINE[CASES[case][0]], {})
        row = {"seconds": None, "peak_mib": None, "time_ratio": None, "memory_ratio": None,
               "grad_rel_diff": None}
        if "seconds" in res:
            row["seconds"] = statistics.median(res["seconds"])
            if "seconds" in base:
                row["time_ratio"] = row["seconds"] / statistics.median(base["seconds"])
                g, g0 = np.asarray(res["grad"]), np.asarray(base["grad"])
                row["grad_rel_diff"] = float(np.max(np.abs(g - g0)) / np.max(np.abs(g0)))
        if "peak_bytes" in res:
            row["peak_mib"] = res["peak_bytes"] / 2**20
            if "peak_bytes" in base:
                row["memory_ratio"] = res["peak_bytes"] / max(base["peak_bytes"], 1)
        out[case] = row
    return out


# -- asv ----------------------------------------------------------------------------------------
class BilevelHypergradient:
    """Every case over :data:`ASV_SIZES` x :data:`ASV_STEPS` (fresh processes, see
    :func:`measure`): ``track_seconds`` (median of 3 interleaved), ``track_peak_mib`` (peak RSS
    growth during one hypergradient) and the ratios to the framework's plain unroll."""

    params = [list(CASES), list(ASV_SIZES), list(ASV_STEPS)]
    param_names = ["case", "n_params", "T"]
    timeout = 3600

    def setup_cache(self):
        out = {}
        for n in ASV_SIZES:
            for steps, results in measure(n, ASV_STEPS).items():
                out[f"{n} {steps}"] = summarize(results)
        return out

    def _value(self, results, case, n_params, steps, key):
        value = results[f"{n_params} {steps}"][case][key]
        if value is None:
            raise NotImplementedError(f"{case}: {key} not measured")
        return value

    def track_seconds(self, results, case, n_params, steps):
        return self._value(results, case, n_params, steps, "seconds")

    track_seconds.unit = "seconds"

    def track_peak_mib(self, results, case, n_params, steps):
        return self._value(results, case, n_params, steps, "peak_mib")

    track_peak_mib.unit = "MiB"

    def track_time_ratio(self, results, case, n_params, steps):
        return self._value(results, case, n_params, steps, "time_ratio")

    track_time_ratio.unit = "ratio"

    def track_memory_ratio(self, results, case, n_params, steps):
        return self._value(results, case, n_params, steps, "memory_ratio")

    track_memory_ratio.unit = "ratio"
