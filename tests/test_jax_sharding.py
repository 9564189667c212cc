"""The JAX face on 2 (forced host) devices: sharded parameters under ``jit`` and ``shard_map``
data parallelism (``axis_name``), for every family, against the unsharded single-device run.

The device count must be set before jax is imported, so every scenario runs in ONE subprocess
(this file run as a script with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``),
started once by a module-scoped fixture; it writes its results to an ``.npz`` file and the
tests assert on them here. Everything is float64.

* ``jit``: parameters (and the multipliers of the constrained faces) sharded by a
  ``NamedSharding`` over a 2-device mesh follow the unsharded run's trajectory to 1e-12, and
  every non-scalar output keeps its input's sharding (parameters and per-parameter state).
* ``shard_map``: each device gets half of the batch (``axis_name="data"``); the run equals the
  full-batch single-device run to 1e-12 and the two replicas are bitwise equal. Both of
  ``shard_map``'s modes are run: ``check_vma=True`` (the default: the loss is averaged before
  it is differentiated) and ``check_vma=False`` (the gradients are averaged after). Without
  ``axis_name`` the runs that need it leave the full-batch trajectory (the control that
  shows the reduction is what makes them equal).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
TOL = 1e-12

OPTAX_FAMILIES = ("qhm", "qhadam", "qhadamw", "polyak_sgd")
DP_MODES = ("vma", "novma")
# (family, shard_map mode) pairs run with shard_map; every family in both modes
DP_RUNS = ([(f, m) for f in OPTAX_FAMILIES for m in DP_MODES]
           + [("PolyakSGD", m) for m in DP_MODES] + [("PolyakSGD.run", "vma")]
           + [("PolyakSGD.value_and_grad", m) for m in DP_MODES]
           + [("ialm", m) for m in DP_MODES]
           + [("constrained.simultaneous", m) for m in DP_MODES]
           + [("constrained.alternating_primal_dual", "vma"),
              ("constrained.alternating_dual_primal", "novma")])
JIT_RUNS = OPTAX_FAMILIES + ("PolyakSGD", "ialm", "constrained")
# the unsharded run of each family of the jit section: a full-batch run of the shard_map section
JIT_REFERENCE = {"constrained": "constrained.simultaneous"}
# families also run under pmap
PMAP_RUNS = ("polyak_sgd", "PolyakSGD")
# families whose shard_map run without axis_name must differ (their reduction matters there)
CONTROLS = ("polyak_sgd", "PolyakSGD", "ialm", "constrained.simultaneous")


# ----------------------------------------------------------------------------------------------
# The scenarios (run in the subprocess only)
# ----------------------------------------------------------------------------------------------
def _scenarios(out_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from uniopt.adapters.jax import PolyakSGD, ialm, polyak_sgd, qhadam, qhadamw, qhm
    from uniopt.adapters.jax import constrained as C

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 2, jax.devices()
    results: dict = {}

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((8, 4)))
    y = jnp.asarray(np.asarray(X) @ np.array([1.0, -0.5, 0.25, 2.0])
                    + 0.1 * rng.standard_normal(8))
    params0 = {"w": jnp.asarray(rng.standard_normal(4)), "b": jnp.asarray(0.5)}
    results["params0/w"] = np.asarray(params0["w"])

    def loss_fn(p, X, y):
        return 0.5 * jnp.mean((X @ p["w"] + p["b"] - y) ** 2)

    def constraints_of(p, X):
        # an equality (a scalar) and four inequalities, both means over the batch
        return {"eq": jnp.mean(X[:, :2] @ p["w"][:2]) - 0.3,
                "ineq": jnp.mean(X, axis=0) * p["w"] - 0.1}

    def value_and_grad(f, p, X, y, mode):
        """The value and gradient of the mean loss ``f`` on the batch the caller sees.

        ``None``: the full batch; ``"vma"``: a shard, the loss averaged before it is
        differentiated (check_vma=True); ``"novma"``: a shard, the gradients averaged after
        (check_vma=False; the value stays the shard's).
        """
        if mode == "vma":
            return jax.value_and_grad(lambda p: lax.pmean(f(p, X, y), "data"))(p)
        value, grad = jax.value_and_grad(f)(p, X, y)
        if mode == "novma":
            grad = lax.pmean(grad, "data")
        return value, grad

    def loop(step, carry):
        return lax.fori_loop(0, STEPS, lambda _, c: step(c), carry)

    # -- the optimizers, and runs: run(params, X, y, axis_name, mode) -> final pytree ----------
    def make_tx(family, axis=None):
        return {"qhm": lambda: qhm(0.1, momentum=0.9, nu=0.7),
                "qhadam": lambda: qhadam(0.05, nus=(0.7, 1.0)),
                "qhadamw": lambda: qhadamw(0.05, weight_decay=0.1),
                "polyak_sgd": lambda: polyak_sgd(max_learning_rate=0.5, momentum=0.5,
                                                 axis_name=axis)}[family]()

    def optax_step(tx, family, X, y, mode):
        def step(carry):
            p, state = carry
            value, grad = value_and_grad(loss_fn, p, X, y, mode)
            extra = {"value": value} if family == "polyak_sgd" else {}
            updates, state = tx.update(grad, state, p, **extra)
            return optax.apply_updates(p, updates), state
        return step

    def optax_run(family):
        def run(p, X, y, axis, mode):
            tx = make_tx(family, axis)
            return loop(optax_step(tx, family, X, y, mode), (p, tx.init(p)))
        return run

    def make_solver(axis=None):
        return PolyakSGD(loss_fn, max_stepsize=0.5, momentum=0.5, maxiter=STEPS, tol=0.0,
                         axis_name=axis)

    def polyak_value_and_grad_run(p, X, y, axis, mode):
        # fun gives its own gradient: that of the averaged value (check_vma=True, where
        # jax.grad of the shard's value would be the SUM over the devices), else the shard's
        def fun(p, X, y):
            return value_and_grad(loss_fn, p, X, y, "vma" if mode == "vma" else None)
        solver = PolyakSGD(fun, value_and_grad=True, max_stepsize=0.5, momentum=0.5,
                           axis_name=axis)
        return loop(lambda c: tuple(solver.update(*c, X, y)), (p, solver.init_state(p, X, y)))

    def polyak_solver_run(use_run):
        def run(p, X, y, axis, mode):
            solver = make_solver(axis)
            if use_run:
                return tuple(solver.run(p, X, y))
            return loop(lambda c: tuple(solver.update(*c, X, y)),
                        (p, solver.init_state(p, X, y)))
        return run

    def make_dual(axis=None):
        return ialm(beta=0.5, sigma=1.2, gamma=2.0, penalty=1.0, momentum=0.5,
                    is_ineq={"eq": False, "ineq": True}, axis_name=axis)

    def ialm_step(dual, X, y, mode):
        def step(carry):  # the simultaneous idiom: the primal gradient at the old multipliers
            p, state = carry

            def lagrangian(p):
                loss = loss_fn(p, X, y)
                return dual.lagrangian(lax.pmean(loss, "data") if mode == "vma" else loss,
                                       constraints_of(p, X), state)
            grad = jax.grad(lagrangian)(p)
            if mode == "novma":
                grad = lax.pmean(grad, "data")
            state = dual.update(constraints_of(p, X), state)
            return jax.tree.map(lambda a, g: a - 0.1 * g, p, grad), state
        return step

    def ialm_run(p, X, y, axis, mode):
        dual = make_dual(axis)
        return loop(ialm_step(dual, X, y, mode), (p, dual.init(constraints_of(p, X))))

    def cmp(p, X, y):
        c = constraints_of(p, X)
        return C.CMPState(loss_fn(p, X, y), {"g": C.ConstraintState(c["ineq"]),
                                             "h": C.ConstraintState(c["eq"])})

    def make_constraints(weight):
        return {"g": C.Constraint(C.ConstraintType.INEQUALITY,
                                  formulation=C.augmented_lagrangian,
                                  multiplier=C.DenseMultiplier(init=weight),
                                  penalty_coefficient=C.DensePenaltyCoefficient(2.0)),
                "h": C.Constraint(C.ConstraintType.EQUALITY, multiplier=C.DenseMultiplier(1))}

    def make_constrained(roll="simultaneous", axis=None):
        return C.ConstrainedOptimizer(cmp, optax.sgd(0.1), C.projected_ascent(0.2), roll=roll,
                                      axis_name=axis)

    def constrained_step(solver, X, y):
        return lambda c: solver.step(*c, X, y)[:3]

    def constrained_run(roll):
        def run(p, X, y, axis, mode):
            solver = make_constrained(roll, axis)
            constraints = make_constraints(jnp.zeros(4))
            return loop(constrained_step(solver, X, y),
                        (p, constraints, solver.init(p, constraints)))
        return run

    dp_runs = {**{f: optax_run(f) for f in OPTAX_FAMILIES},
               "PolyakSGD": polyak_solver_run(False), "PolyakSGD.run": polyak_solver_run(True),
               "PolyakSGD.value_and_grad": polyak_value_and_grad_run,
               "ialm": ialm_run,
               **{f"constrained.{r}": constrained_run(r) for r in
                  ("simultaneous", "alternating_primal_dual", "alternating_dual_primal")}}

    def put(name, tree):
        for k, leaf in enumerate(jax.tree.leaves(tree)):
            results[f"{name}/{k}"] = np.asarray(leaf)

    # -- shard_map data parallelism: one compiled program per mode -------------------------------
    dmesh = Mesh(np.array(jax.devices()), ("data",))

    def data_parallel(names, axis, mode):
        def body(p, Xs, ys):
            out = {name: dp_runs[name](p, Xs, ys, axis, mode) for name in names}
            return jax.tree.map(lambda a: jnp.asarray(a)[None], out)  # one copy per device
        f = jax.shard_map(body, mesh=dmesh, in_specs=(P(), P("data"), P("data")),
                          out_specs=P("data"), check_vma=(mode == "vma"))
        return jax.jit(f)(params0, X, y)

    families = sorted({family for family, _ in DP_RUNS})
    full = jax.jit(lambda p, X, y: {name: dp_runs[name](p, X, y, None, None)
                                    for name in families})(params0, X, y)
    for name in families:
        put(f"dp/{name}/full", full[name])
    for mode in DP_MODES:
        names = [family for family, m in DP_RUNS if m == mode]
        stacked = data_parallel(names, "data", mode)
        for name in names:
            put(f"dp/{name}/{mode}/replica0", jax.tree.map(lambda a: a[0], stacked[name]))
            put(f"dp/{name}/{mode}/replica1", jax.tree.map(lambda a: a[1], stacked[name]))
    stacked = data_parallel(CONTROLS, None, "novma")
    for name in CONTROLS:
        put(f"control/{name}", jax.tree.map(lambda a: a[0], stacked[name]))
    # pmap (its collectives are check_vma=False's): the Polyak transform and solver
    pmapped = jax.pmap(lambda p, Xs, ys: {name: dp_runs[name](p, Xs, ys, "data", "novma")
                                          for name in PMAP_RUNS},
                       axis_name="data", in_axes=(None, 0, 0))(
        params0, X.reshape(2, 4, 4), y.reshape(2, 4))
    for name in PMAP_RUNS:
        for k in (0, 1):
            put(f"pmap/{name}/replica{k}", jax.tree.map(lambda a: a[k], pmapped[name]))

    # -- jit with parameters sharded over a 2-device mesh ----------------------------------------
    mesh = Mesh(np.array(jax.devices()), ("x",))
    split = NamedSharding(mesh, P("x"))

    def carries(p):
        """Every family's initial carry from ``p``. The optax states are created from ``p``
        eagerly, so they follow its sharding; the multipliers are placed (``device_put``)."""
        out = {f: (p, make_tx(f).init(p)) for f in OPTAX_FAMILIES}
        out["PolyakSGD"] = (p, make_solver().init_state(p, X, y))
        state = make_dual().init(constraints_of(p, X))
        weight = jnp.zeros(4)
        if isinstance(p["w"].sharding, NamedSharding):
            weight = jax.device_put(weight, split)
            state = state._replace(duals={**state.duals, "ineq": jax.device_put(
                state.duals["ineq"], split)})
        out["ialm"] = (p, state)
        constraints = make_constraints(weight)
        out["constrained"] = (p, constraints, make_constrained().init(p, constraints))
        return out

    steps = {**{f: optax_step(make_tx(f), f, X, y, None) for f in OPTAX_FAMILIES},
             "PolyakSGD": lambda c: tuple(make_solver().update(*c, X, y)),
             "ialm": ialm_step(make_dual(), X, y, None),
             "constrained": constrained_step(make_constrained(), X, y)}
    run_all = jax.jit(lambda cs: {f: loop(steps[f], cs[f]) for f in JIT_RUNS})
    sharded0 = {"w": jax.device_put(params0["w"], split),
                "b": jax.device_put(params0["b"], NamedSharding(mesh, P()))}
    # the unsharded run is the full-batch one of the shard_map section (the same steps)
    inputs = carries(sharded0)
    sharded = run_all(inputs)
    for family in JIT_RUNS:
        put(f"jit/{family}/sharded", sharded[family])
        # every output keeps the sharding its input has over the mesh
        pairs = [(a, b) for a, b in zip(jax.tree.leaves(inputs[family]),
                                        jax.tree.leaves(sharded[family]))
                 if isinstance(a.sharding, NamedSharding)]
        results[f"jit/{family}/split_leaves"] = np.asarray(
            sum(a.sharding.spec == P("x") for a, _ in pairs))
        results[f"jit/{family}/kept"] = np.asarray(
            all(b.sharding.is_equivalent_to(a.sharding, b.ndim) for a, b in pairs))
    np.savez(out_path, **results)


# ----------------------------------------------------------------------------------------------
# The tests (parent process)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_sharding") / "results.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _tree(results, prefix):
    keys = sorted((k for k in results if k.startswith(prefix + "/")),
                  key=lambda k: int(k.rsplit("/", 1)[1]))
    assert keys, prefix
    return [results[k] for k in keys]


def _assert_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family, mode", DP_RUNS, ids=[f"{f}-{m}" for f, m in DP_RUNS])
def test_shard_map_equals_the_full_batch_run(results, family, mode):
    full = _tree(results, f"dp/{family}/full")
    replicas = [_tree(results, f"dp/{family}/{mode}/replica{k}") for k in (0, 1)]
    # leaves 0 and 1 are the parameters b and w: the run moved them
    assert np.max(np.abs(full[1] - results["params0/w"])) > 1e-3
    _assert_close(replicas[0], full)
    for a, b in zip(*replicas):  # the two devices hold the same bits
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", PMAP_RUNS)
def test_pmap_equals_the_full_batch_run(results, family):
    replicas = [_tree(results, f"pmap/{family}/replica{k}") for k in (0, 1)]
    _assert_close(replicas[0], _tree(results, f"dp/{family}/full"))
    for a, b in zip(*replicas):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", CONTROLS)
def test_without_axis_name_the_shards_do_not_give_the_full_batch_run(results, family):
    full = _tree(results, f"dp/{family}/full")
    control = _tree(results, f"control/{family}")
    gaps = [np.max(np.abs(a - b)) for a, b in zip(control, full)
            if np.issubdtype(a.dtype, np.floating) and a.size]
    assert max(gaps) > 1e-6


@pytest.mark.parametrize("family", JIT_RUNS)
def test_jit_with_sharded_parameters_follows_the_unsharded_run(results, family):
    plain = _tree(results, f"dp/{JIT_REFERENCE.get(family, family)}/full")
    sharded = _tree(results, f"jit/{family}/sharded")
    _assert_close(sharded, plain)
    assert bool(results[f"jit/{family}/kept"])
    # the parameters "w" and every state buffer of its shape were split over the devices
    assert int(results[f"jit/{family}/split_leaves"]) >= 1


if __name__ == "__main__":
    _scenarios(sys.argv[1])


def test_the_shard_map_example_equals_its_single_device_run():
    """examples/jax_shard_map.py (it forces its 2 devices itself) trains with shard_map and
    polyak_sgd(axis_name=...) and prints its difference from the single-device run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "NUMBA_ENABLE_CUDASIM")}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "jax_shard_map.py")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("result ")]
    assert len(lines) == 1, proc.stdout
    result = {k: float(v) for k, v in (item.split("=") for item in lines[0].split()[1:])}
    assert result["devices"] == 2
    assert result["max_abs_diff"] <= TOL
    # it trained: the realisable regression's loss (minimum 0) fell by orders of magnitude
    assert result["final_loss"] < 1e-8 * result["initial_loss"]


def _bad_axis_name_factories():
    import optax

    from uniopt.adapters.jax import PolyakSGD, ialm, polyak_sgd, scale_by_polyak
    from uniopt.adapters.jax import constrained as C

    return {"scale_by_polyak": lambda a: scale_by_polyak(axis_name=a),
            "polyak_sgd": lambda a: polyak_sgd(axis_name=a),
            "PolyakSGD": lambda a: PolyakSGD(lambda p: p ** 2, axis_name=a),
            "ialm": lambda a: ialm(axis_name=a),
            "ConstrainedOptimizer": lambda a: C.ConstrainedOptimizer(
                lambda p: C.CMPState(p), optax.sgd(0.1), axis_name=a)}


@pytest.mark.parametrize("name", ["scale_by_polyak", "polyak_sgd", "PolyakSGD", "ialm",
                                  "ConstrainedOptimizer"])
@pytest.mark.parametrize("bad", [3, ("data", 1), (), ["data"]], ids=repr)
def test_axis_name_is_checked_at_construction(name, bad):
    make = _bad_axis_name_factories()[name]
    with pytest.raises(TypeError, match=r"Invalid axis_name: .* \(expected None, a str or a "
                                        r"tuple of str\)"):
        make(bad)
    make(None), make("data"), make(("data", "model"))  # valid: nothing raised


def test_jaxopt_protocol_leaves_axis_name_out():
    from uniopt.adapters.jax import PolyakSGD

    solver = PolyakSGD(lambda p: p ** 2, axis_name="data")
    assert "axis_name" not in solver.attribute_names()
    assert solver.attribute_names()[-1] == "unroll"
    assert hash(solver) != hash(PolyakSGD(lambda p: p ** 2))  # it still tells solvers apart
    with pytest.raises(TypeError):
        PolyakSGD(lambda p: p ** 2, False, False, 0.0, "SPS_max", 1.0, 0.0, 0.0, None, 500,
                  1e-3, False, False, None, True, "auto", "data")  # keyword only


def test_constrained_axis_name_refuses_indexed_constraints():
    import jax.numpy as jnp
    import optax

    from uniopt.adapters.jax import constrained as C

    def cmp(p):
        return C.CMPState(jnp.sum(p ** 2), {"g": C.ConstraintState(
            p[:2], constraint_features=jnp.array([0, 2]))})

    constraints = {"g": C.Constraint(C.ConstraintType.EQUALITY,
                                     multiplier=C.IndexedMultiplier(3))}
    solver = C.ConstrainedOptimizer(cmp, optax.sgd(0.1), C.projected_ascent(0.1),
                                    axis_name="data")
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="constraint 'g' has constraint features"):
        solver.step(params, constraints, solver.init(params, constraints))
