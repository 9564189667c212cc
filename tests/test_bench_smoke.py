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


def _header(out):
    lines = [line for line in out.splitlines() if line.startswith("| params")]
    assert len(lines) == 1, out
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_bench_table_has_every_column(capsys, tmp_path):
    out, result = _run(capsys, tmp_path)
    assert _header(out) == ["params", "layout"] + [c.label for c in bench.COLUMNS]
    for label in ("uniopt QHAdam", "Adam fused", "Adam foreach", "qhoptim QHAdam", "uniopt QHM",
                  "qhoptim QHM", "SGD mom.", "uniopt jax qhadam", "optax adam", "kernel GB/s",
                  "QHAdam/fused", "QHAdam/qhoptim", "QHM/qhoptim", "jax/optax"):
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

    for name in bench.CASES:
        if name not in ("kernel_qhadam", "stream"):
            monkeypatch.setitem(bench.CASES, name, unavailable)
    out, result = _run(capsys, tmp_path, "--no-fixed-cost")
    row = result["rows"][0]
    assert row["columns"]["uo_qhadam"] is None and row["columns"]["r_qhadam_fused"] is None
    assert row["columns"]["kernel_gbps"] > 0
    assert "uniopt QHAdam: torch not installed" in out
    assert any(g["status"] == "n/a" for g in result["goals"])
