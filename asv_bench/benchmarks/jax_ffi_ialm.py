"""uniopt's JAX iALM dual step through XLA's FFI (the Numba kernel inside ``jax.jit``) against its
traced path and a jitted step that does nothing (the floor: JAX's and XLA's fixed cost of a
jitted call with the same arguments and donated state).

Each contender is one jitted ``update(c, state)`` with the state donated, float32, ``m``
constraints in one group or split into 10 equal groups, settings ``contenders.IALM`` (momentum
0.5, no ``ctol``), fixed constraint values (one pinned CPU, as every benchmark module):

* ``ffi``: ``ialm(..., ffi=True)``: one FFI call per step, multipliers and momentum buffers
  updated in place (two passes over the group: read ``c`` and the buffer, then read ``c``, the
  buffer and the multipliers and write the last two, 28 bytes per float32 constraint; groups
  after the first are read once more for the whole-step finiteness check, 4 more);
* ``traced``: ``ialm(..., ffi=False)``, the ``jax.numpy`` expression XLA compiles;
* ``floor``: ``jax.jit(lambda c, state: state, donate_argnums=1)``.

Script mode (the interleaved ratios behind ``uniopt.adapters.jax.ialm.FFI_MIN_SIZE``), from
``asv_bench/``::

    python -m benchmarks.jax_ffi_ialm --sizes 1e2,1e4,1e5,1e6 --groups 1,10 --repeat 21

prints, per size and group count, the median ms per step of each contender and the medians of
the interleaved paired ratios ffi/traced, ffi/floor and traced/floor.
"""

from . import common  # noqa: F401, I001  (first: pins the process before any thread pool)

import argparse
import json
import statistics

from . import contenders  # noqa: E402

SIZES = [100, 10_000, 100_000, 1_000_000]
GROUPS = [1, 10]
#: (label, numerator, denominator) of the printed ratios.
RATIOS = [("ffi / traced", "ffi", "traced"), ("ffi / floor", "ffi", "floor"),
          ("traced / floor", "traced", "floor")]


def _constraints(m: int, groups: int) -> list:
    """``groups`` float32 arrays of ``m`` constraint values in all (sizes differ by at most 1)."""
    import numpy as np

    c = contenders._ialm_constraints(m).astype(np.float32)
    return [np.ascontiguousarray(part) for part in np.array_split(c, groups)]


def build(case: str, m: int, groups: int):
    """A warmed-up step callable (one jitted update with donated state) of contender ``case``."""
    jax, _ = contenders._import_jax()
    import jax.numpy as jnp

    try:
        from uniopt.adapters.jax import ialm
    except ImportError as exc:
        raise contenders.Unavailable(f"uniopt.adapters.jax.ialm not available ({exc})") from exc
    c = [jnp.asarray(part) for part in _constraints(m, groups)]
    dual = ialm(**contenders.IALM, ffi=case == "ffi")
    # distinct buffers for every state leaf (XLA refuses to donate one buffer twice)
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), dual.init(c))
    if case == "floor":
        update = jax.jit(lambda c, state: state, donate_argnums=(1,))
    else:
        update = jax.jit(dual.update, donate_argnums=(1,))
    carry = [state]

    def step():
        carry[0] = update(c, carry[0])
        return jax.block_until_ready(carry[0])

    step()  # compile (and, for ffi, compile or load the handler)
    return step


class _IALMStep:
    """``time_update``: one jitted ``update`` of ``m`` float32 constraints in ``groups`` groups."""

    case = ""
    params = [SIZES, GROUPS]
    param_names = ["m", "groups"]
    timeout = 300

    def setup(self, m, groups):
        try:
            self.step = build(self.case, m, groups)
        except contenders.Unavailable as exc:
            raise NotImplementedError(str(exc)) from exc

    def teardown(self, m, groups):
        self.step = None

    def time_update(self, m, groups):
        self.step()


class UnioptJaxIALMFFI(_IALMStep):
    """uniopt.adapters.jax.ialm(ffi=True).update, jitted, state donated."""

    case = "ffi"


class UnioptJaxIALMTraced(_IALMStep):
    """uniopt.adapters.jax.ialm(ffi=False).update, jitted, state donated."""

    case = "traced"


class JaxNoOpFloor(_IALMStep):
    """A jitted function of the same arguments returning the donated state as it is."""

    case = "floor"


# ----------------------------------------------------------------------------------------------
# Script mode: the interleaved ratios
# ----------------------------------------------------------------------------------------------
def measure(m: int, groups: int, repeat: int, min_time: float) -> dict:
    """Median ms per step of every contender and the median paired ratios."""
    steps = {case: build(case, m, groups) for case in ("ffi", "traced", "floor")}
    samples, numbers = contenders.interleave(steps, repeat, min_time)
    del steps
    return {"m": m, "groups": groups, "repeat": repeat, "numbers": numbers,
            "ms": {k: 1e3 * statistics.median(v) for k, v in samples.items()},
            "ratios": {label: contenders._median_ratio(samples[a], samples[b])
                       for label, a, b in RATIOS}}


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_ints, default=SIZES)
    parser.add_argument("--groups", type=_ints, default=GROUPS)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--min-time", type=float, default=0.02)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args(argv)
    for groups in args.groups:
        for m in args.sizes:
            result = measure(m, groups, args.repeat, args.min_time)
            if args.json:
                print(json.dumps(result), flush=True)
                continue
            print(f"m={m:.0e} groups={groups} ({args.repeat} repeats): "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in result["ms"].items())
                  + "; " + ", ".join(f"{label} {value:.3f}"
                                     for label, value in result["ratios"].items()), flush=True)


if __name__ == "__main__":
    main()
