"""Checkpoints of the reference libraries resume in uniopt; bad checkpoints give clear errors;
reading a saved checkpoint needs neither torch nor JAX.

* qhoptim 1.1.0 (``qhoptim.pyt.QHM``, ``QHAdam``, ``QHAdamW``): its ``state_dict()`` loads with
  uniopt's torch ``load_state_dict`` and, converted by
  ``uniopt.adapters.torch.checkpoint.from_qhoptim``, resumes in the torch, NumPy and JAX faces;
  the continued trajectory is qhoptim's own (float64, 1e-12).
* humancompatible-train 0.4.2 (``humancompatible.train.dual_optim.iALM``): the same through
  ``from_humancompatible``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
import torch

import uniopt
from uniopt import checkpoint
from uniopt.adapters import jax as ujax
from uniopt.adapters import torch as utorch
from uniopt.adapters.jax import checkpoint as jax_checkpoint
from uniopt.adapters.torch import checkpoint as torch_checkpoint
from uniopt.checkpoint import CheckpointError

N, M = 5, 5
SHAPES = [(3,), (2, 2)]


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _problem():
    rng = np.random.default_rng(11)
    x0 = [rng.standard_normal(s) for s in SHAPES]
    a = [rng.uniform(0.5, 2.0, s) for s in SHAPES]
    c = [rng.standard_normal(s) for s in SHAPES]
    return x0, a, c


def _grads(xs, a, c):
    return [ai * (x - ci) for x, ai, ci in zip(xs, a, c)]


# ----------------------------------------------------------------------------------------------
# qhoptim
# ----------------------------------------------------------------------------------------------
QHOPTIM = {
    "QHM": dict(lr=0.3, momentum=0.8, nu=0.6, weight_decay=0.05, weight_decay_type="grad"),
    "QHAdam": dict(lr=0.05, betas=(0.8, 0.95), nus=(0.7, 0.9), weight_decay=0.02, eps=1e-6),
    "QHAdamW": dict(lr=0.05, betas=(0.8, 0.95), nus=(0.7, 0.9), weight_decay=0.02, eps=1e-6),
}


def _qhoptim_run(name, steps):
    """qhoptim's optimizer after ``steps`` steps (float64) and its parameters."""
    import qhoptim.pyt

    x0, a, c = _problem()
    ps = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in x0]
    opt = getattr(qhoptim.pyt, name)(ps, **QHOPTIM[name])
    for _ in range(steps):
        for p, g in zip(ps, _grads([p.detach().numpy() for p in ps], a, c)):
            p.grad = torch.from_numpy(g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # qhoptim's deprecated add_ overloads
            opt.step()
    return opt, ps, (a, c)


def _continue(face, opt, xs, a, c, steps):
    """Step a restored optimizer of ``face`` (parameters ``xs``: its own objects)."""
    if face == "jax":
        tx, state = opt
        update = jax.jit(tx.update)
    for _ in range(steps):
        if face == "torch":
            for p, g in zip(xs, _grads([p.detach().numpy() for p in xs], a, c)):
                p.grad = torch.from_numpy(g)
            opt.step()
        elif face == "numpy":
            opt.step(_grads(xs, a, c))
        else:
            grads = [jnp.asarray(g) for g in _grads([np.asarray(x) for x in xs], a, c)]
            updates, state = update(grads, state, xs)
            xs = optax.apply_updates(xs, updates)
    if face == "torch":
        return [p.detach().numpy() for p in xs]
    return [np.asarray(x) for x in xs]


@pytest.mark.parametrize("name", sorted(QHOPTIM))
def test_qhoptim_checkpoints_resume_in_every_face(name):
    reference, ref_ps, (a, c) = _qhoptim_run(name, N + M)
    expected = [p.detach().numpy() for p in ref_ps]
    head, ps, _ = _qhoptim_run(name, N)
    x_n = [p.detach().numpy().copy() for p in ps]
    sd = head.state_dict()

    # 1. qhoptim's state dict as is, through load_state_dict
    cls = getattr(utorch, name)
    kwargs = {k: v for k, v in QHOPTIM[name].items()}
    mine = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in x_n]
    ours = cls(mine, **kwargs)
    ours.load_state_dict(sd)
    results = {"load_state_dict": _continue("torch", ours, mine, a, c, M)}

    # 2. the portable checkpoint, in every face (hyper-parameters from the checkpoint)
    ckpt = torch_checkpoint.from_qhoptim(head)
    family = "qhm" if name == "QHM" else "qhadam"
    assert ckpt["format"] == f"uniopt.{family}/1"
    assert ckpt["group0.lr"] == QHOPTIM[name]["lr"]
    assert ckpt.get("group0.decouple_weight_decay", False) == (name == "QHAdamW")
    mine = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in x_n]
    defaults = {"QHM": dict(lr=1.0, momentum=0.0, nu=1.0)}.get(name, {})
    results["torch"] = _continue("torch", torch_checkpoint.restore(cls(mine, **defaults), ckpt), mine, a, c, M)
    xs = [x.copy() for x in x_n]
    results["numpy"] = _continue("numpy", checkpoint.restore(getattr(uniopt, name)(xs, **defaults), ckpt),
                                 xs, a, c, M)
    xs = [jnp.asarray(x) for x in x_n]
    results["jax"] = _continue("jax", jax_checkpoint.restore(ckpt, xs), xs, a, c, M)
    for how, got in results.items():
        for x, y in zip(got, expected):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15, err_msg=how)


# ----------------------------------------------------------------------------------------------
# humancompatible-train's iALM
# ----------------------------------------------------------------------------------------------
def _constraints(t):
    return [np.sin(0.7 * t + np.arange(2)) * 1.5 + 0.2, np.cos(0.4 * t + np.arange(3)) + 0.3]


def _hct_ialm():
    from humancompatible.train.dual_optim import iALM

    torch_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its beta/sigma/gamma tensors and duals in float64
    try:
        dual = iALM(m=2, beta=0.5, sigma=1.1, gamma=0.7, momentum=0.5, dampening=0.1,
                    dual_range=(-3.0, 3.0), init_duals=torch.zeros(2, dtype=torch.float64))
        dual.add_constraint_group(m=3, beta=0.8, sigma=1.05, gamma=2.0, momentum=0.0,
                                  dual_range=(0.0, 2.5), is_ineq=True,
                                  init_duals=torch.zeros(3, dtype=torch.float64))
    finally:
        torch.set_default_dtype(torch_default)
    return dual


def test_humancompatible_ialm_checkpoint_resumes_in_every_face():
    reference = _hct_ialm()
    for t in range(N + M):
        reference.update([torch.from_numpy(c) for c in _constraints(t)])
    expected = reference.duals.detach().numpy()
    head = _hct_ialm()
    for t in range(N):
        head.update([torch.from_numpy(c) for c in _constraints(t)])
    ckpt = torch_checkpoint.from_humancompatible(head)
    assert ckpt["format"] == "uniopt.ialm/1" and np.isnan(ckpt["penalty"])
    assert ckpt["group1.is_ineq"] and ckpt["group0.beta"] == pytest.approx(0.5 * 1.1 ** N, rel=1e-15)

    dual = torch_checkpoint.restore(utorch.iALM(m=1), ckpt)
    for t in range(N, N + M):
        dual.update([torch.from_numpy(c) for c in _constraints(t)])
    results = {"torch": dual.duals.detach().numpy()}
    dual = checkpoint.restore(uniopt.iALM(m=1), ckpt)
    for t in range(N, N + M):
        dual.update(_constraints(t))
    results["numpy"] = dual.duals
    tx, state = jax_checkpoint.restore(ckpt, [jnp.asarray(c) for c in _constraints(0)])
    update = jax.jit(tx.update)
    for t in range(N, N + M):
        state = update([jnp.asarray(c) for c in _constraints(t)], state)
    results["jax"] = np.concatenate([np.asarray(d) for d in state.duals])
    assert int(state.count) == N + M - N  # humancompatible-train counts no steps: from 0
    for how, got in results.items():
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, err_msg=how)


# ----------------------------------------------------------------------------------------------
# Bad checkpoints
# ----------------------------------------------------------------------------------------------
def _qhm_ckpt():
    x = np.array([1.0, -2.0, 0.5])
    opt = uniopt.QHM([x], lr=0.1, momentum=0.9, nu=0.7)
    opt.step([2 * x])
    return checkpoint.export(opt)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("format"), "has no 'format' key"),
    (lambda c: c.update(format="qhm"), "Invalid checkpoint format: 'qhm'"),
    (lambda c: c.update(format="uniopt.sgd/1"), "unknown family 'sgd'"),
    (lambda c: c.update(format="uniopt.qhm/2"), "Unsupported checkpoint version: 'uniopt.qhm/2'"),
    (lambda c: c.pop("group0.nu"), r"is missing keys \['group0.nu'\]"),
    (lambda c: c.pop("n_params"), r"is missing keys \['n_params'\]"),
    (lambda c: c.update({"group0.lr": "fast"}), "'group0.lr': expected a number, got 'fast'"),
    (lambda c: c.update({"group0.params": np.array([0, 0])}), "exactly once"),
])
def test_bad_checkpoints_are_rejected_with_clear_errors(tmp_path, change, message):
    ckpt = _qhm_ckpt()
    change(ckpt)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.validate(ckpt)
    arrays = {k: np.asarray(v) for k, v in ckpt.items()}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):  # CheckpointError is a ValueError
        checkpoint.load(tmp_path / "bad.npz")


def test_shape_and_family_mismatches_change_nothing():
    ckpt = _qhm_ckpt()
    y = np.zeros(4)
    opt = uniopt.QHM([y], lr=0.5, momentum=0.1, nu=0.2)
    before = opt.state_dict()
    with pytest.raises(CheckpointError, match=r"'param0.momentum_buffer': shape \(3,\) != parameter 0's shape \(4,\)"):
        checkpoint.restore(opt, ckpt)
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(CheckpointError, match=r"shape \(3,\) != parameter 0's shape \(4,\)"):
        torch_checkpoint.restore(utorch.QHM([w], lr=0.5, momentum=0.1, nu=0.2), ckpt)
    with pytest.raises(CheckpointError, match=r"shape \(3,\) != parameter 0's shape \(4,\)"):
        jax_checkpoint.restore(ckpt, [jnp.zeros(4)])
    with pytest.raises(CheckpointError, match="checkpoint has 1 parameters, the optimizer 2"):
        checkpoint.restore(uniopt.QHM([np.zeros(3), np.zeros(2)], lr=0.5, momentum=0.1, nu=0.2), ckpt)
    with pytest.raises(CheckpointError, match=r"cannot restore a 'uniopt.qhm/1' checkpoint into QHAdam"):
        checkpoint.restore(uniopt.QHAdam([np.zeros(3)]), ckpt)
    with pytest.raises(CheckpointError, match=r"cannot restore a 'uniopt.qhm/1' checkpoint into iALM"):
        torch_checkpoint.restore(utorch.iALM(m=3), ckpt)
    assert opt.state_dict()["param_groups"] == before["param_groups"] and opt.state == {}


def test_reading_a_checkpoint_needs_neither_torch_nor_jax(tmp_path):
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = utorch.QHAdamW([x], lr=0.1, weight_decay=0.1)
    x.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    opt.step()
    path = tmp_path / "qhadamw.npz"
    checkpoint.save(path, torch_checkpoint.export(opt))
    expected = opt.state_dict()["state"][0]["exp_avg_sq"].numpy()
    script = f"""
import sys
for name in ("torch", "jax", "jaxlib", "optax"):
    sys.modules[name] = None          # importing any of them now fails
import numpy as np
from uniopt import checkpoint
ckpt = checkpoint.load({str(path)!r})
assert ckpt["format"] == "uniopt.qhadam/1" and ckpt["group0.decouple_weight_decay"] is True
np.testing.assert_array_equal(ckpt["param0.exp_avg_sq"], np.array({expected.tolist()!r}))
y = np.array([1.0, -2.0])
import uniopt
opt = checkpoint.restore(uniopt.QHAdamW([y]), ckpt)
assert opt.param_groups[0]["lr"] == 0.1
assert not any(m.split(".")[0] in ("torch", "jax", "optax") for m, v in sys.modules.items() if v is not None)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_npz_holds_no_pickled_objects(tmp_path):
    path = tmp_path / "ialm.npz"
    dual = uniopt.iALM(m=2, penalty=None, dual_range=(None, 4.0))
    dual.update(np.array([0.5, -1.0]))
    checkpoint.save(path, checkpoint.export(dual))
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
        assert float(data["penalty"]) != float(data["penalty"])  # NaN: penalty=None
        assert data["group0.dual_range"].tolist() == [-np.inf, 4.0]
    back = checkpoint.restore(uniopt.iALM(m=1), checkpoint.load(path))
    assert back.penalty is None and back.param_groups[0]["dual_range"] == (-np.inf, 4.0)
    np.testing.assert_array_equal(back.duals, dual.duals)


def test_docstring_examples_run():
    import doctest

    for module in (checkpoint, torch_checkpoint, jax_checkpoint):
        result = doctest.testmod(module, raise_on_error=False, report=True)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_param_groups_travel_between_torch_and_numpy_and_jax_needs_one():
    rng = np.random.default_rng(3)
    x0 = [rng.standard_normal(s) for s in ((3,), (2,), (2, 2))]
    grads = [rng.standard_normal(x.shape) for x in x0]
    ps = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in x0]
    groups = [{"params": ps[:1], "lr": 0.2, "nu": 0.5},
              {"params": ps[1:], "weight_decay": 0.1, "weight_decay_type": "direct"}]
    opt = utorch.QHM(groups, lr=0.1, momentum=0.9, nu=0.7)
    for _ in range(2):
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    ckpt = torch_checkpoint.export(opt)
    assert ckpt["group0.params"].tolist() == [0] and ckpt["group1.params"].tolist() == [1, 2]
    xs = [p.detach().numpy().copy() for p in ps]
    mine = uniopt.QHM([{"params": xs[:1]}, {"params": xs[1:]}], lr=1.0, momentum=0.0, nu=1.0)
    checkpoint.restore(mine, ckpt)
    assert [(g["lr"], g["nu"], g["weight_decay_type"]) for g in mine.param_groups] == [
        (0.2, 0.5, "grad"), (0.1, 0.7, "direct")]
    mine.step(grads)
    for p, g in zip(ps, grads):
        p.grad = torch.from_numpy(g.copy())
    opt.step()
    for x, p in zip(xs, ps):
        np.testing.assert_array_equal(x, p.detach().numpy())
    with pytest.raises(CheckpointError, match="one set of hyper-parameters; the checkpoint's group 1 differs"):
        jax_checkpoint.restore(ckpt, [jnp.asarray(x) for x in xs])
    one_group = uniopt.QHM([{"params": [x.copy() for x in xs]}], lr=1.0, momentum=0.0, nu=1.0)
    with pytest.raises(CheckpointError, match=r"checkpoint groups of \[1, 2\] parameters, the optimizer's of \[3\]"):
        checkpoint.restore(one_group, ckpt)


def test_step_count_resumes_a_schedule_and_the_numpy_solver_count():
    rng = np.random.default_rng(5)
    xs0 = [jnp.asarray(rng.standard_normal(3))]
    schedule = optax.linear_schedule(0.3, 0.05, 10)

    def run(tx, state, xs, steps):
        for _ in range(steps):
            updates, state = tx.update([2.0 * xs[0]], state, xs)
            xs = optax.apply_updates(xs, updates)
        return state, xs

    tx = ujax.qhm(schedule, 0.8, 0.6)
    _, expected = run(tx, tx.init(xs0), xs0, N + M)
    state, xs = run(tx, tx.init(xs0), xs0, N)
    with pytest.raises(TypeError, match="learning_rate is a schedule"):
        jax_checkpoint.export(state, xs, learning_rate=schedule, momentum=0.8, nu=0.6)
    ckpt = jax_checkpoint.export(state, xs, learning_rate=0.3, momentum=0.8, nu=0.6)
    assert ckpt["step"] == N
    tx2, state2 = jax_checkpoint.restore(ckpt, xs, tx=ujax.qhm(schedule, 0.8, 0.6))
    assert int(state2[-1].count) == N
    _, got = run(tx2, state2, xs, M)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))

    solver = uniopt.PolyakSGD(lambda x: (float(x @ x), 2 * x), momentum=0.3)
    x = np.array([1.0, -2.0])
    state = solver.init_state(x)
    for _ in range(N):
        x, state = solver.update(x, state)
    ckpt = checkpoint.export(solver, state, x)
    assert ckpt["step"] == N
    _, back = checkpoint.restore(uniopt.PolyakSGD(lambda x: (float(x @ x), 2 * x)), ckpt, x)
    assert back.iter_num == N
    np.testing.assert_array_equal(back.velocity, state.velocity)
