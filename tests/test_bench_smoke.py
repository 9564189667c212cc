"""Smoke test of ``python -m uniopt bench`` on the tiniest configuration.

It checks the shape of the report (columns, rows, metadata), never a timing: timings on a shared
CI machine mean nothing.
"""

import json

import pytest

from uniopt import bench


def _run(capsys, tmp_path, *extra):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--sizes", "1e3", "--layouts", "one", "--repeat", "1", "--min-time", "1e-4",
            "--no-startup", "--no-progress", "--no-pin", "--json", str(path), *extra]
    assert bench.main(argv) == 0
    return capsys.readouterr().out, json.loads(path.read_text())


def _header(out, first="params"):
    lines = [line for line in out.splitlines() if line.startswith(f"| {first} ")]
    assert len(lines) == 1, out
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def _table_rows(out, first):
    """The body lines of the Markdown table whose header starts with ``first``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} "))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


def test_bench_table_has_every_column(capsys, tmp_path):
    out, result = _run(capsys, tmp_path)
    assert _header(out) == ["params", "layout"] + [c.label for c in bench.COLUMNS]
    for label in ("uniopt QHAdam", "Adam fused", "Adam foreach", "qhoptim QHAdam", "uniopt QHM",
                  "qhoptim QHM", "SGD mom.", "uniopt Polyak", "SGD", "uniopt jax qhadam",
                  "optax adam", "kernel GB/s", "QHAdam/fused", "QHAdam/qhoptim", "QHM/qhoptim",
                  "Polyak/SGD", "jax/optax"):
        assert label in _header(out)
    assert "machine:" in out and "versions:" in out and "goals" in out

    # One row for 1e3 x "one", one for the fixed-cost layout (100 tensors x 4 elements).
    assert [(r["n"], r["layout"], r["tensors"]) for r in result["rows"]] == [
        (1000, "one", 1), (bench.TINY_TENSORS * bench.TINY_SIZE, "tiny", bench.TINY_TENSORS)]
    row = result["rows"][0]
    assert set(row["columns"]) == {c.key for c in bench.COLUMNS}
    # The core kernel needs nothing optional: it is always measured. Any other contender is
    # either measured or reported unavailable with a reason.
    assert row["columns"]["kernel_gbps"] > 0
    for col in bench.COLUMNS:
        if col.case is not None and row["columns"][col.key] is None:
            assert row["unavailable"][col.case]
    assert result["meta"]["machine"]["cores"] >= 1
    assert result["meta"]["versions"]["uniopt"]

    # The solver table: --quick runs one small problem, both solvers, both call modes.
    labels = [c.label for c in bench.SOLVER_COLUMNS]
    assert _header(out, "problem") == ["problem", "maxiter"] + labels
    for label in ("uniopt run", "jaxopt run", "run ratio", "uniopt jit(run)", "jaxopt jit(run)",
                  "jit ratio"):
        assert label in _header(out, "problem")
    problem = bench.SOLVER_PROBLEMS[bench.QUICK_SOLVER_PROBLEMS[0]]
    assert [r[:2] for r in _table_rows(out, "problem")] == [[problem.label, str(problem.maxiter)]]
    solver = result["solver"]
    assert [r["problem"] for r in solver["rows"]] == list(bench.QUICK_SOLVER_PROBLEMS)
    assert [c["key"] for c in solver["columns"]] == [c.key for c in bench.SOLVER_COLUMNS]
    assert solver["settings"]["tol"] == 0
    srow = solver["rows"][0]
    assert set(srow["columns"]) == {c.key for c in bench.SOLVER_COLUMNS}
    for col in bench.SOLVER_COLUMNS:
        if col.case is not None:
            assert (srow["columns"][col.key] is not None) != (col.case in srow["unavailable"])
    goals = {(g["goal"], g["at"]) for g in result["goals"]}
    assert ("uniopt jax PolyakSGD.run / jaxopt", problem.label) in goals
    assert ("jit(uniopt jax PolyakSGD.run) / jaxopt", problem.label) in goals
    assert all(g["status"] in ("met", "MISSED", "n/a") for g in result["goals"])


def test_no_solver_skips_the_solver_table(capsys, tmp_path):
    out, result = _run(capsys, tmp_path, "--no-solver", "--no-fixed-cost")
    assert not any(line.startswith("| problem ") for line in out.splitlines())
    assert result["solver"]["rows"] == []
    assert not any("PolyakSGD.run" in g["goal"] for g in result["goals"])


def test_polyak_goal_covers_both_layouts_at_1e6_and_1e7():
    rows = []
    for n in (10_000, 1_000_000, 10_000_000):
        for layout in ("one", "model"):
            row = bench.Row(n, layout, bench.layout_sizes(n, layout))
            row.samples = {"uniopt_torch_polyak": [1.2, 1.4, 2.0], "torch_sgd": [1.0, 1.0, 1.0]}
            rows.append(row)
    goals = [g for g in bench.evaluate_goals(rows, {})
             if g["goal"] == "uniopt torch PolyakSGD / SGD"]
    assert [g["at"] for g in goals] == ["1e6 (1 tensor)", "1e6 (100 tensors)",
                                        "1e7 (1 tensor)", "1e7 (100 tensors)"]
    # The ratio is the median of ratios paired by repeat: 1.4 > 1.3.
    assert all(g["value"] == pytest.approx(1.4) and g["status"] == "MISSED" for g in goals)


def test_layouts_sum_to_n():
    for n in (100, 10_000, 1_234_567, 10_000_000):
        sizes = bench.layout_sizes(n, "model")
        assert len(sizes) == bench.MODEL_TENSORS and min(sizes) >= 1 and sum(sizes) == n
    assert bench.layout_sizes(10, "one") == [10]
    with pytest.raises(ValueError, match="layout 'model' needs n >= 100"):
        bench.layout_sizes(99, "model")


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "ten"])
    with pytest.raises(SystemExit):
        bench.main(["--layouts", "diagonal"])


def test_missing_contenders_are_reported_not_raised(capsys, tmp_path, monkeypatch):
    def unavailable(data):
        raise bench.Unavailable("torch not installed")

    def no_jaxopt(problem, mode, seed=0):
        raise bench.Unavailable("jaxopt not installed")

    for name in bench.CASES:
        if name not in ("kernel_qhadam", "stream"):
            monkeypatch.setitem(bench.CASES, name, unavailable)
    monkeypatch.setitem(bench.SOLVER_CASES, "jaxopt_polyak", no_jaxopt)
    out, result = _run(capsys, tmp_path, "--no-fixed-cost")
    row = result["rows"][0]
    assert row["columns"]["uo_qhadam"] is None and row["columns"]["r_qhadam_fused"] is None
    assert row["columns"]["uo_polyak"] is None and row["columns"]["r_polyak_sgd"] is None
    assert row["columns"]["kernel_gbps"] > 0
    assert "uniopt QHAdam: torch not installed" in out
    assert "uniopt Polyak: torch not installed" in out
    srow = result["solver"]["rows"][0]
    assert srow["columns"]["jaxopt_run"] is None and srow["columns"]["r_run"] is None
    assert srow["columns"]["r_jit"] is None
    assert "jaxopt run: jaxopt not installed" in out
    assert any(g["status"] == "n/a" for g in result["goals"])
    assert {g["status"] for g in result["goals"] if "PolyakSGD.run" in g["goal"]} == {"n/a"}


def test_bench_ialm_table(capsys, tmp_path):
    out, result = _run(capsys, tmp_path, "--no-solver")
    assert _header(out, "constraints") == ["constraints", "groups"] + [c.label for c in bench.IALM_COLUMNS]
    body = _table_rows(out, "constraints")
    assert [row[0] for row in body] == ["1e3"]
    ialm = result["ialm"]
    assert [r["m"] for r in ialm["rows"]] == list(bench.QUICK_IALM_SIZES)
    assert ialm["settings"] == json.loads(json.dumps(bench.IALM))
    row = ialm["rows"][0]
    for name in ("uniopt_numpy_ialm", "hct_ialm"):  # the torch face is checked where it exists
        assert name in row["samples"] or name in row["unavailable"]
    measured = row["columns"]["uo_np_ialm"]
    assert measured is None or measured > 0


def test_ialm_contenders_do_the_same_update():
    """Every iALM contender of the table computes the same multipliers from the same c."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("humancompatible.train")
    m = 50
    c = torch.from_numpy(bench._ialm_constraints(m))
    from humancompatible.train.dual_optim import iALM as Reference

    import uniopt

    ref = Reference(m, init_duals=torch.zeros(m), **bench.IALM)
    ours = uniopt.iALM(m, penalty=None, init_duals=torch.zeros(m).numpy(), **bench.IALM)
    for _ in range(3):
        ref.update(c)
        ours.update(c.numpy())
    assert ours.duals.dtype == ref.duals.detach().numpy().dtype
    assert abs(ours.duals - ref.duals.detach().numpy()).max() <= 1e-5
