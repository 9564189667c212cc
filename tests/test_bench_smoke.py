"""Smoke test of ``make bench``'s table (``asv_bench/table.py``) on the tiniest configuration.

It checks the shape of the report (columns, rows, metadata) and that every contender was
measured (every framework and reference is installed with the test extra: a missing one fails
here), never a timing: timings on a shared CI machine mean nothing.
"""

import json

import numpy as np
import pytest
import table
from benchmarks import contenders as bench


def _run(capsys, tmp_path, *extra):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--sizes", "1e3", "--layouts", "one", "--repeat", "1", "--min-time", "1e-4",
            "--no-startup", "--no-progress", "--no-pin", "--no-plot", "--out", str(tmp_path),
            "--json", str(path), *extra]
    assert table.main(argv) == 0
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
    # Every framework and reference is installed with the test extra: every cell is measured.
    assert row["unavailable"] == {}
    for col in bench.COLUMNS:
        assert row["columns"][col.key] is not None and row["columns"][col.key] > 0, col.key
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
    assert srow["unavailable"] == {}
    for col in bench.SOLVER_COLUMNS:
        assert srow["columns"][col.key] is not None and srow["columns"][col.key] > 0, col.key
    goals = {(g["goal"], g["at"]) for g in result["goals"]}
    assert ("uniopt jax PolyakSGD.run / jaxopt", problem.label) in goals
    assert ("jit(uniopt jax PolyakSGD.run) / jaxopt", problem.label) in goals
    # Only the start-up goals (not measured: --no-startup) may be n/a.
    startup_goals = {g.text for g in table.GOALS if g.column is None}
    for g in result["goals"]:
        assert g["status"] in (("n/a",) if g["goal"] in startup_goals else ("met", "MISSED")), g

    # What the table script writes next to its output.
    assert (tmp_path / "table.md").read_text().strip() == out.split("written:")[0].strip()
    assert json.loads((tmp_path / "table.json").read_text()) == result


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
    goals = [g for g in table.evaluate_goals(rows, {})
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
        table.main(["--sizes", "ten"])
    with pytest.raises(SystemExit):
        table.main(["--layouts", "diagonal"])


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
    assert row["unavailable"] == {}
    for name in bench.IALM_CASES:  # update and forward_update, every contender measured
        assert len(row["samples"][name]) == 1 and row["samples"][name][0] > 0
    assert row["columns"]["uo_np_ialm"] > 0
    assert row["columns"]["r_ialm"] > 0 and row["columns"]["r_ialm_fu"] > 0


def test_ialm_contenders_do_the_same_update():
    """Every iALM contender of the table computes the same multipliers from the same c."""
    import torch

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
    # the forward_update contenders: the same Lagrangian, and the same multipliers after it
    ours_fu, ref_fu = bench.build_ialm("uniopt_torch_ialm_fu", m), bench.build_ialm("hct_ialm_fu", m)
    for _ in range(2):
        torch.testing.assert_close(ours_fu(), ref_fu(), rtol=1e-5, atol=1e-5)


def _rows_for_plot():
    rows = []
    for n in (10_000, 1_000, 100_000):
        for layout in ("one", "model"):
            row = bench.Row(n, layout, bench.layout_sizes(n, layout))
            row.samples = {"uniopt_torch_qhadam": [n * 1e-9, n * 3e-9], "torch_sgd": [n * 2e-9]}
            rows.append(row)
    tiny = bench.layout_sizes(0, "tiny")
    row = bench.Row(sum(tiny), "tiny", tiny)
    row.samples = {"uniopt_torch_qhadam": [1.0]}
    return rows + [row]


def test_plot_series_one_line_per_contender_and_layout():
    series = table.plot_series(_rows_for_plot())
    assert set(series) == {"one", "model"}  # the fixed-cost row is not a point of a line
    for layout in ("one", "model"):
        assert set(series[layout]) == {"uniopt QHAdam", "SGD"}
        # Increasing parameter counts; the median of each row's samples.
        assert series[layout]["uniopt QHAdam"] == [(n, pytest.approx(n * 2e-9))
                                                   for n in (1_000, 10_000, 100_000)]
        assert series[layout]["SGD"] == [(n, pytest.approx(n * 2e-9))
                                         for n in (1_000, 10_000, 100_000)]


def test_plot_is_a_png(tmp_path):
    import matplotlib  # noqa: F401  (the bench extra, installed with `make test`)

    path = table.plot_time_per_step(_rows_for_plot(), tmp_path / "sub" / table.PLOT_NAME,
                                    title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="nothing to plot"):
        table.plot_time_per_step([], tmp_path / "empty.png")


def test_table_script_runs_from_the_repository_root():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "asv_bench/table.py", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--out", "--no-plot", "--sizes", "--no-progress"):
        assert option in out.stdout


def test_bench_constrained_table(capsys, tmp_path):
    """``--only constrained``: the constrained dual step table alone, every cell measured."""
    out, result = _run(capsys, tmp_path, "--only", "constrained", "--sizes", "1e3,2e3")
    assert _header(out, "multipliers") == ["multipliers", "sampled"] + [
        c.label for c in bench.CONSTRAINED_COLUMNS]
    assert [row[:2] for row in _table_rows(out, "multipliers")] == [["1e3", "1000"], ["2,000", "1000"]]
    assert result["rows"] == [] and result["ialm"]["rows"] == [] and result["solver"]["rows"] == []
    rows = result["constrained"]["rows"]
    assert [r["m"] for r in rows] == [1000, 2000]
    for row in rows:
        assert row["unavailable"] == {}  # cooper-optim is installed with the test extra
        for name in bench.CONSTRAINED_CASES:  # every contender measured
            assert len(row["samples"][name]) == 1 and row["samples"][name][0] > 0
        for key, value in row["columns"].items():  # every cell has a value
            assert value is not None and value > 0, key
    assert rows[0]["columns"]["g_idx"] == 1.0  # the growth base is the smallest m
    assert result["goals"] == []  # its goals are at 1e6 and 1e7; no other table's goal
    m = 2000
    stream = rows[1]["columns"]["stream_gbps"]
    assert rows[1]["columns"]["floor_dense"] == pytest.approx(12 * m / (stream * 1e9))
    assert rows[1]["columns"]["floor_nupi"] == pytest.approx(20 * m / (stream * 1e9))
    for label in ("uniopt indexed", "cooper indexed", "cooper/uniopt idx", "uniopt/cooper dense",
                  "uniopt/cooper nuPI", "dense floor"):
        assert label in out


def test_constrained_goals_are_evaluated_on_their_sizes():
    rows = []
    for m, t in ((10_000, 1.0), (1_000_000, 1.2), (10_000_000, 1.5)):
        row = bench.ConstrainedRow(m=m)
        row.samples = {"uniopt_indexed": [t * 1e-4], "cooper_indexed": [m * 1e-9],
                       "uniopt_dense": [1.0], "cooper_dense": [3.0],
                       "uniopt_nupi": [1.0], "cooper_nupi": [1.5]}
        rows.append(row)
    bench.measure_constrained_rows([], 1, 1e-4)  # no rows: nothing to do
    for row in rows:
        row.base = 1e-4
    goals = [g for g in table.evaluate_goals([], {}, constrained_rows=rows)
             if g["at"].startswith("m=")]
    by_goal = {(g["goal"], g["at"]): g for g in goals}
    growth = by_goal[("uniopt indexed dual step growth (m / smallest m)", "m=1e7")]
    assert growth["value"] == pytest.approx(1.5) and growth["status"] == "met"
    speedup = by_goal[("cooper / uniopt indexed dual step", "m=1e7")]
    assert speedup["value"] == pytest.approx(1e-2 / 1.5e-4) and speedup["status"] == "met"
    assert by_goal[("uniopt / cooper dense projected dual step", "m=1e6")]["status"] == "met"
    assert by_goal[("uniopt / cooper nuPI dual step", "m=1e6")]["status"] == "MISSED"
    assert len(goals) == 4  # each goal at its own size only


@pytest.mark.parametrize("kind", ["indexed", "dense", "nupi"])
def test_constrained_contenders_do_the_same_update(kind):
    """uniopt's and cooper's contenders of each kind compute the same multipliers."""
    import torch

    ours = bench.build_constrained(f"uniopt_{kind}", 3000)
    theirs = bench.build_constrained(f"cooper_{kind}", 3000)
    for _ in range(3):
        ours()
        theirs()
    assert ours.weight.dtype == theirs.weight.dtype == torch.float32
    assert torch.count_nonzero(ours.weight) == (1000 if kind == "indexed" else 3000)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-7)


def _bilevel_oracle(n_params: int, steps: int) -> np.ndarray:
    """The benchmark problem's RAD hypergradient dF(W_T)/dx, independently: float64 NumPy,
    the SGD trajectory stored and reverse-mode by hand (the LL gradient of
    f = 1/(2n) sum_i s_i |W a_i - b_i|^2 is sum_i s_i r_i a_i^T / n, so the step's adjoint
    w.r.t. W is V -> V - lr sum_i s_i (V a_i) a_i^T / n and w.r.t. s_i is
    -lr r_i . (V a_i) / n; s = sigmoid(x), ds/dx = s (1 - s))."""
    from benchmarks import bilevel as bb

    data = {k: v.astype(np.float64) for k, v in bb.problem(n_params).items()}
    a, b, n = data["a"], data["b"], len(data["b"])
    s = 1.0 / (1.0 + np.exp(-data["x"]))
    path = [data["w0"]]
    for _ in range(steps):
        r = a @ path[-1].T - b
        path.append(path[-1] - bb.LR * (s[:, None] * r).T @ a / n)
    v = (a_val := data["a_val"]) @ path[-1].T - data["b_val"]
    adj = v.T @ a_val / len(v)  # dF/dW_T
    s_bar = np.zeros(n)
    for w in reversed(path[:-1]):
        r, av = a @ w.T - b, a @ adj.T
        s_bar -= bb.LR * np.sum(r * av, axis=1) / n
        adj = adj - bb.LR * (s[:, None] * av).T @ a / n
    return s_bar * s * (1.0 - s)


@pytest.mark.parametrize("case", ["torch_plain", "torch_uniopt", "torch_uniopt_ckpt",
                                  "jax_plain", "jax_uniopt", "jax_uniopt_ckpt"])
def test_bilevel_contenders_compute_the_hypergradient(case):
    """Every contender of the bilevel table computes the same RAD hypergradient: the
    independent NumPy reverse pass, to float32 accuracy."""
    from benchmarks import bilevel as bb

    expected = _bilevel_oracle(400, 4)
    assert np.max(np.abs(expected)) > 1e-3  # a non-trivial hypergradient
    got = bb.build(case, 400, 4)()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.max(np.abs(expected)))


def test_bench_bilevel_table(capsys, tmp_path):
    """``--only bilevel``: every contender measured in fresh processes (time, peak memory,
    the same hypergradient), the ratios and goals at every size and T."""
    from benchmarks import bilevel as bb

    path = tmp_path / "bench.json"
    assert table.main(["--only", "bilevel", "--sizes", "4e3", "--steps", "2,3", "--repeat", "1",
                       "--no-progress", "--out", str(tmp_path), "--json", str(path)]) == 0
    out, result = capsys.readouterr().out, json.loads(path.read_text())
    assert _header(out) == ["params", "T", "contender", "time [s]", "peak [MiB]", "time/plain",
                            "memory/plain", "grad diff"]
    body = _table_rows(out, "params")
    assert [(r[0], r[1], r[2]) for r in body] == [
        ("4,000", str(t), bb.CASES[c][1]) for t in (2, 3) for c in bb.CASES]
    rows = result["bilevel"]["rows"]
    assert [(r["n_params"], r["T"]) for r in rows] == [(4000, 2), (4000, 3)]
    for row in rows:
        assert row["unavailable"] == {}  # every framework and face is installed
        for case, cell in row["cases"].items():
            assert cell["seconds"] > 0 and cell["peak_mib"] is not None, case
            assert cell["grad_rel_diff"] <= 1e-5, case
            assert cell["time_ratio"] > 0 and cell["memory_ratio"] is not None
        for framework, base in bb.BASELINE.items():
            assert row["cases"][base]["time_ratio"] == 1.0
    assert result["rows"] == [] and result["constrained"]["rows"] == []
    goals = result["goals"]
    assert {g["goal"] for g in goals} == {text for text, *_ in table.BILEVEL_GOALS}
    assert len(goals) == len(table.BILEVEL_GOALS) * 2
    assert all(g["status"] in ("met", "MISSED") for g in goals)
    assert (tmp_path / "table.md").read_text().strip() == out.split("written:")[0].strip()


def test_bilevel_goals_compare_with_their_targets():
    section = {"rows": [{"n_params": 100_000, "T": 50, "cases": {
        "torch_uniopt": {"time_ratio": 0.9}, "torch_uniopt_ckpt": {"memory_ratio": 0.6},
        "jax_uniopt": {"time_ratio": 1.2}, "jax_uniopt_ckpt": {"memory_ratio": None}}}]}
    status = {g["goal"]: g["status"] for g in table.bilevel_goals(section)}
    assert list(status.values()) == ["met", "MISSED", "MISSED", "n/a"]
    assert all(g["at"] == "1e5, T=50" for g in table.bilevel_goals(section))


def test_bilevel_sizes_must_be_multiples_of_the_input_width():
    with pytest.raises(SystemExit):
        table.main(["--only", "bilevel", "--sizes", "1001"])
