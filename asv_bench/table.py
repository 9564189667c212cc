"""``make bench``'s side-by-side table: uniopt against torch.optim, qhoptim, optax and jaxopt.

Run from the repository root: ``python asv_bench/table.py [--quick] [--out DIR]``. It measures
the contenders of :mod:`benchmarks.contenders` (the same the asv suite times) with a progress
bar, prints the Markdown report and writes it, with every sample (``table.json``) and a plot of
the time per step against the parameter count (log-log, one line per contender,
``time_per_step.png``), into the output folder (default ``asv_bench/results/``).

The machine, versions and date are printed with the table. Nothing here is asserted: goals are
reported as measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the suite's folder

from uniopt import _jit  # noqa: E402

from benchmarks.contenders import (  # noqa: E402
    Column, COLUMNS, compile_times, CONSTRAINED_CASES, CONSTRAINED_COLUMNS, CONSTRAINED_SAMPLED, CONSTRAINED_SGD,
    CONSTRAINED_NUPI, CONSTRAINED_SIZES, ConstrainedRow, measure_constrained_rows,
    QUICK_CONSTRAINED_SIZES, first_step_time, IALM, IALM_CASES, IALM_COLUMNS, IALM_SIZES,
    IALMRow, import_time, layout_sizes, LAYOUTS, machine_info, measure_ialm_row, measure_row,
    measure_solver_row, MODEL_TENSORS, pin_threads, POLYAK_SOLVER, QUICK_IALM_SIZES, QUICK_SIZES,
    QUICK_SOLVER_PROBLEMS, restore_threads, Row, SIZES, SOLVER_CASES, SOLVER_COLUMNS,
    solver_first_run, SOLVER_MODES, SOLVER_PROBLEMS, SolverRow, TINY_SIZE, TINY_TENSORS,
    Unavailable, versions,
)
from benchmarks.contenders import _size_label  # noqa: E402
from benchmarks import bilevel  # noqa: E402  (imports no framework; its cases run in subprocesses)


#: Where ``make bench`` writes its table, samples and plot (kept out of git).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The plot's file name in the output folder.
PLOT_NAME = "time_per_step.png"


# ----------------------------------------------------------------------------------------------
# Goals (reported, never asserted)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    text: str
    column: str | None  # a table column (rows of ``layouts``), or None for a start-up metric
    sizes: tuple[int, ...] | None  # None: every measured size (or solver problem)
    target: float
    at_most: bool = True  # met when value <= target (else value >= target)
    #: a start-up metric key, "tiny" for the fixed-cost row, or "solver" for a column of the
    #: solver table (every problem measured)
    metric: str | None = None
    unit: str = ""  # "", "s" or "us" (values are kept in seconds)
    layouts: tuple[str, ...] = ("model",)  # the table rows a column goal is evaluated on

    def show(self, value: float) -> str:
        if self.unit == "us":
            return f"{value * 1e6:.0f} us"
        if self.unit == "s":
            return f"{value:.2f} s"
        return f"{value:.2f}"


GOALS: tuple[Goal, ...] = (
    Goal("uniopt QHAdam / fused Adam", "r_qhadam_fused", (10_000, 100_000), 0.25),
    Goal("uniopt QHAdam / fused Adam", "r_qhadam_fused", (1_000_000,), 0.6),
    Goal("uniopt QHAdam / fused Adam", "r_qhadam_fused", (10_000_000,), 0.95),
    Goal("uniopt QHAdam / qhoptim QHAdam", "r_qhadam_qho", None, 0.25),
    Goal("uniopt QHM / qhoptim QHM", "r_qhm_qho", None, 0.5),
    Goal("uniopt jax qhadam / optax adam", "r_jax_optax", None, 1.1),
    Goal("uniopt jax fused qhadam (FFI) / optax adam", "r_jax_fused_optax", (10_000,), 1.0),
    Goal("uniopt jax fused qhadam (FFI) / optax adam", "r_jax_fused_optax",
         (1_000_000, 10_000_000), 0.5),
    Goal("uniopt jax fused qhadam (FFI) / uniopt torch QHAdam", "r_jax_fused_torch",
         (10_000_000,), 1.2),
    Goal("uniopt torch PolyakSGD / SGD", "r_polyak_sgd", (1_000_000, 10_000_000), 1.3,
         layouts=("one", "model")),
    Goal("uniopt jax PolyakSGD.run / jaxopt", "r_run", None, 1.0, metric="solver"),
    Goal("jit(uniopt jax PolyakSGD.run) / jaxopt", "r_jit", None, 1.0, metric="solver"),
    Goal("humancompatible iALM / uniopt torch iALM", "r_ialm", (100_000, 1_000_000), 5.0,
         at_most=False, metric="ialm"),
    Goal("uniopt indexed dual step growth (m / smallest m)", "g_idx", (10_000_000,), 2.0,
         metric="constrained"),
    Goal("cooper / uniopt indexed dual step", "r_idx", (10_000_000,), 20.0, at_most=False,
         metric="constrained"),
    Goal("uniopt / cooper dense projected dual step", "r_dense", (1_000_000,), 0.5,
         metric="constrained"),
    Goal("uniopt / cooper nuPI dual step", "r_nupi", (1_000_000,), 0.5, metric="constrained"),
    Goal("kernel / stream bandwidth", "r_kernel_stream", (10_000_000,), 0.85, at_most=False),
    Goal("fixed cost per step, uniopt QHAdam", "uo_qhadam", None, 60e-6, metric="tiny", unit="us"),
    Goal("import uniopt", None, None, 0.5, metric="import_uniopt", unit="s"),
    Goal("first step, warm cache", None, None, 1.0, metric="first_step", unit="s"),
)


def evaluate_goals(rows: Sequence[Row], startup: dict,
                   solver_rows: Sequence[SolverRow] = (),
                   ialm_rows: Sequence[IALMRow] = (),
                   constrained_rows: Sequence[ConstrainedRow] = ()) -> list[dict]:
    """Every goal at every place it applies: value, target, "met" / "MISSED" / "n/a"."""
    out = []
    for goal in GOALS:
        measured: list[tuple[str, float | None]] = []
        if goal.column is None:
            value = startup.get(goal.metric)
            measured.append(("", value if isinstance(value, float) else None))
        elif goal.metric == "tiny":
            measured += [(f"{TINY_TENSORS}x{TINY_SIZE}", r.value(goal.column))
                         for r in rows if r.layout == "tiny"]
        elif goal.metric == "solver":
            measured += [(r.problem.label, r.value(goal.column)) for r in solver_rows]
        elif goal.metric in ("ialm", "constrained"):
            measured += [(f"m={_size_label(r.m)}", r.value(goal.column))
                         for r in (ialm_rows if goal.metric == "ialm" else constrained_rows)
                         if goal.sizes is None or r.m in goal.sizes]
        else:
            measured += [(_size_label(r.n) + (f" ({_layout_label(r)})" if len(goal.layouts) > 1
                                              else ""), r.value(goal.column))
                         for r in rows
                         if r.layout in goal.layouts and (goal.sizes is None or r.n in goal.sizes)]
        for where, value in measured:
            if value is None:
                status = "n/a"
            elif (value <= goal.target) if goal.at_most else (value >= goal.target):
                status = "met"
            else:
                status = "MISSED"
            out.append({"goal": goal.text, "at": where, "value": value,
                        "shown": "n/a" if value is None else goal.show(value),
                        "target": ("<= " if goal.at_most else ">= ") + goal.show(goal.target),
                        "status": status})
    return out


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def _layout_label(row: Row) -> str:
    if row.layout == "tiny":
        return f"{TINY_TENSORS}x{TINY_SIZE} (fixed cost)"
    return "1 tensor" if len(row.sizes) == 1 else f"{len(row.sizes)} tensors"


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _cell(row: Row, col: Column) -> str:
    value = row.value(col.key)
    if value is None:
        return "n/a"
    if col.kind == "ms":
        return _fmt_ms(value)
    if col.kind == "gbps":
        return f"{value:.1f}"
    if col.kind == "floor":
        return _fmt_ms(value)
    return f"{value:.2f}"


def format_table(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> str:
    """A Markdown table: one line per row, times in ms per step."""
    header = ["params", "layout"] + [c.label for c in columns]
    body = [[_size_label(r.n) if r.layout != "tiny" else str(sum(r.sizes)), _layout_label(r)]
            + [_cell(r, c) for c in columns] for r in rows]
    return _markdown(header, body)


def format_solver_table(rows: Sequence[SolverRow],
                        columns: Sequence[Column] = SOLVER_COLUMNS) -> str:
    """The solver table in Markdown: one line per problem, times in ms per whole run."""
    header = ["problem", "maxiter"] + [c.label for c in columns]
    body = [[r.problem.label, str(r.problem.maxiter)] + [_cell(r, c) for c in columns]
            for r in rows]
    return _markdown(header, body)


def format_ialm_table(rows: Sequence[IALMRow], columns: Sequence[Column] = IALM_COLUMNS) -> str:
    """The iALM table in Markdown: one line per constraint count, ms per dual step."""
    header = ["constraints", "groups"] + [c.label for c in columns]
    body = [[_size_label(r.m), "1"] + [_cell(r, c) for c in columns] for r in rows]
    return _markdown(header, body)


def format_constrained_table(rows: Sequence[ConstrainedRow],
                             columns: Sequence[Column] = CONSTRAINED_COLUMNS) -> str:
    """The constrained table in Markdown: one line per multiplier count, ms per dual step."""
    header = ["multipliers", "sampled"] + [c.label for c in columns]
    body = [[_size_label(r.m), str(min(r.m, CONSTRAINED_SAMPLED))] + [_cell(r, c) for c in columns]
            for r in rows]
    return _markdown(header, body)


def format_bilevel(section: dict) -> str:
    """The bilevel hypergradient table (``--only bilevel``): one line per size, ``T`` and
    contender, with its ratios to the plain unroll of its framework, and the legend."""
    settings = section["settings"]
    header = ["params", "T", "contender", "time [s]", "peak [MiB]", "time/plain", "memory/plain",
              "grad diff"]

    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    body = []
    for row in section["rows"]:
        for case, cell in row["cases"].items():
            body.append([_size_label(row["n_params"]), str(row["T"]), bilevel.CASES[case][1],
                         num(cell["seconds"], ".3f"), num(cell["peak_mib"], ".1f"),
                         num(cell["time_ratio"], ".2f"), num(cell["memory_ratio"], ".2f"),
                         num(cell["grad_rel_diff"], ".1e")])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= 3 else "-") for i, w in enumerate(widths)) + "|"
    lines = [f"bilevel RAD hypergradient (float32; LL: linear model {settings['d_in']} -> "
             f"params/{settings['d_in']}, {settings['n_samples']} samples, T plain SGD steps "
             f"lr {settings['lr']} from 0, per-sample weights sigmoid(x); UL: validation loss, "
             "dF/dx). Times: median of "
             f"{settings['repeat']} interleaved hypergradients per framework in one fresh process; "
             "peak: peak RSS growth during one hypergradient, one fresh process per framework with "
             "malloc returning freed blocks to the OS (the same yardstick for torch and XLA)", "",
             line(header), rule] + [line(b) for b in body]
    lines += ["", "contenders:"] + [f"  {label:<18} {text}"
                                    for label, text in ((c[1], c[2]) for c in bilevel.CASES.values())]
    lines += ["  grad diff: the largest difference of the hypergradient from the plain unroll's, "
              "relative to its largest entry"]
    errors = {f"{bilevel.CASES[case][1]}: {why}" for row in section["rows"]
              for case, why in row.get("unavailable", {}).items()}
    if errors:
        lines += ["", "n/a:"] + [f"  {e}" for e in sorted(errors)]
    return "\n".join(lines)


def measure_bilevel(sizes, steps_list, repeat: int, pin: bool, progress=None) -> dict:
    """Every bilevel case at every size and ``T`` (see :mod:`benchmarks.bilevel`); the
    ``result["bilevel"]`` section."""
    rows = []
    for n in sizes:
        measured = bilevel.measure(n, steps_list, repeat=repeat, pin=pin)
        for steps in steps_list:
            results = measured[steps]
            rows.append({"n_params": n, "T": steps, "cases": bilevel.summarize(results),
                         "samples": {c: r.get("seconds") for c, r in results.items()},
                         "peak_bytes": {c: r.get("peak_bytes") for c, r in results.items()},
                         "unavailable": {c: r.get("unavailable") or r.get("error")
                                         or r.get("memory_error")
                                         for c, r in results.items()
                                         if "seconds" not in r or "peak_bytes" not in r}})
        if progress is not None:
            progress.update(1)
    return {"rows": rows, "settings": {"n_samples": bilevel.N_SAMPLES, "d_in": bilevel.D_IN,
                                       "lr": bilevel.LR, "repeat": repeat,
                                       "sizes": list(sizes), "steps": list(steps_list)}}


#: The bilevel goals: (text, case, summary key, target); met when value <= target.
BILEVEL_GOALS = (
    ("uniopt torch / torch plain unroll, time", "torch_uniopt", "time_ratio", 1.0),
    ("uniopt torch ckpt / torch plain unroll, peak memory", "torch_uniopt_ckpt", "memory_ratio", 0.5),
    ("uniopt jax / jax plain scan, time", "jax_uniopt", "time_ratio", 1.0),
    ("uniopt jax ckpt / jax plain scan, peak memory", "jax_uniopt_ckpt", "memory_ratio", 0.5),
)


def bilevel_goals(section: dict) -> list[dict]:
    """Every bilevel goal at every measured size and ``T``."""
    out = []
    for text, case, key, target in BILEVEL_GOALS:
        for row in section["rows"]:
            value = row["cases"].get(case, {}).get(key)
            status = "n/a" if value is None else ("met" if value <= target else "MISSED")
            out.append({"goal": text, "at": f"{_size_label(row['n_params'])}, T={row['T']}",
                        "value": value, "shown": "n/a" if value is None else f"{value:.2f}",
                        "target": f"<= {target:.2f}", "status": status})
    return out


def _markdown(header: list[str], body: list[list[str]]) -> str:
    """Two left-aligned label columns, then right-aligned numbers."""
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "| " + " | ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(b) for b in body])


def _missing(rows, columns: Sequence[Column]) -> dict[str, str]:
    """Column label -> why it is n/a (the first reason seen)."""
    label = {c.case: c.label for c in columns if c.case}
    missing: dict[str, str] = {}
    for r in rows:
        for case, reason in r.unavailable.items():
            if case in label:
                missing.setdefault(label[case], reason)
    return missing


def _legend(rows, columns: Sequence[Column]) -> list[str]:
    """The ``columns:`` lines under a table, and an ``n/a:`` block for unmeasured columns."""
    lines = ["", "columns:"] + [f"  {c.label:<17} {c.help}" for c in columns]
    missing = _missing(rows, columns)
    if missing:
        lines += ["", "n/a:"] + [f"  {name}: {reason}" for name, reason in missing.items()]
    return lines


def format_report(result: dict, rows: Sequence[Row], solver_rows: Sequence[SolverRow] = (),
                  ialm_rows: Sequence[IALMRow] = (),
                  constrained_rows: Sequence[ConstrainedRow] = ()) -> str:
    meta = result["meta"]
    m, v = meta["machine"], meta["versions"]
    lines = [
        f"uniopt bench, {meta['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['system']})"
        + (f", load average {m['load_average']}" if "load_average" in m else ""),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
    ]
    if meta["min_time"]:
        lines.append(f"settings: float32; {meta['threads']}; median of {meta['repeat']} interleaved "
                     f"repeats (each >= {meta['min_time'] * 1e3:.0f} ms); times in ms per step "
                     "(lower is better)")
    else:  # the bilevel table alone: its own settings line
        lines.append(f"settings: float32; {meta['threads']}")
    if rows:
        lines += ["", format_table(rows)]
        lines += _legend(rows, COLUMNS)
    if solver_rows:
        settings = ", ".join(f"{k}={val!r}" for k, val in POLYAK_SOLVER.items())
        lines += [
            "",
            f"Polyak SGD solver runs (JAX, float32, w0 = 0, {settings}: every iteration runs); "
            "ms per whole run (lower is better)",
            "",
            format_solver_table(solver_rows),
        ]
        lines += _legend(solver_rows, SOLVER_COLUMNS)
    if ialm_rows:
        settings = ", ".join(f"{k}={val!r}" for k, val in IALM.items())
        lines += ["", f"iALM dual steps (torch, float32, one group, {settings}); ms per "
                      "update(c) or forward_update(loss, c) (lower is better)", "",
                  format_ialm_table(ialm_rows)]
        lines += _legend(ialm_rows, IALM_COLUMNS)
    if constrained_rows:
        sgd = ", ".join(f"{k}={val!r}" for k, val in CONSTRAINED_SGD.items())
        nupi = ", ".join(f"{k}={val!r}" for k, val in CONSTRAINED_NUPI.items())
        lines += ["", f"constrained dual step (torch, float32, one inequality multiplier, "
                      f"ConstrainedOptimizer.dual_step() with the gradients in place; SGD({sgd}, "
                      f"maximize=True), nuPI({nupi}, init_type=ZEROS, maximize=True)); ms per "
                      "step (lower is "
                      "better)", "", format_constrained_table(constrained_rows)]
        lines += _legend(constrained_rows, CONSTRAINED_COLUMNS)
    if result.get("bilevel", {}).get("rows"):
        lines += ["", format_bilevel(result["bilevel"])]
    startup = result.get("startup") or {}
    if startup:
        lines += ["", "start-up (fresh processes):"]
        for key, value in startup.items():
            text = value if isinstance(value, str) else f"{value:.3f} s"
            lines.append(f"  {key:<34} {text}")
    goals = result.get("goals") or []
    if goals:
        lines += ["", "goals (100-tensor layout unless a layout or problem is named; measured, "
                      "not asserted):"]
        where = [g["goal"] + (f" at {g['at']}" if g["at"] else "") for g in goals]
        width = max(42, *(len(w) for w in where))
        for g, w in zip(goals, where):
            lines.append(f"  {w:<{width}} {g['shown']:>9}   target {g['target']:<10} "
                         f"{g['status']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --sizes {text!r}; expected e.g. 1e4,1e5") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"invalid --sizes {text!r}; expected positive counts")
    return sizes


def _parse_layouts(text: str) -> list[str]:
    layouts = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in layouts if s not in LAYOUTS]
    if bad or not layouts:
        raise argparse.ArgumentTypeError(f"invalid --layouts {text!r}; choose from {','.join(LAYOUTS)}")
    return layouts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python asv_bench/table.py",
        description="uniopt's optimizers against torch.optim, qhoptim, optax and jaxopt: one "
                    "side-by-side table, and one of Polyak SGD solver runs (medians of "
                    "interleaved repeats; float32).",
    )
    p.add_argument("--quick", action="store_true",
                   help="one size (1e4), 3 repeats, short samples, one small solver problem, "
                        "start-up: import time only; a smoke run")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help="comma-separated parameter counts (default 1e4,1e5,1e6,1e7)")
    p.add_argument("--layouts", type=_parse_layouts, default=list(LAYOUTS),
                   help="comma-separated layouts: one (a single tensor), model (100 mixed-size "
                        "tensors); default both")
    p.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 7, quick 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per sample (default 0.05, quick 0.005)")
    p.add_argument("--no-fixed-cost", dest="fixed_cost", action="store_false",
                   help=f"skip the fixed-cost row ({TINY_TENSORS} tensors of {TINY_SIZE} elements)")
    p.add_argument("--no-solver", dest="solver", action="store_false",
                   help="skip the solver table (uniopt's JAX PolyakSGD.run against jaxopt's)")
    p.add_argument("--no-ialm", dest="ialm", action="store_false",
                   help="skip the iALM table (dual steps against humancompatible-train)")
    p.add_argument("--no-constrained", dest="constrained", action="store_false",
                   help="skip the constrained dual step table (against cooper-optim)")
    p.add_argument("--only", choices=("constrained", "bilevel"), default=None,
                   help="measure one table only: 'constrained' (the constrained dual steps, "
                        "no start-up; --sizes then sets its multiplier counts) or 'bilevel' "
                        "(RAD hypergradients against plain torch/JAX unrolls, time and peak "
                        "memory, fresh processes; --sizes sets the LL parameter counts, "
                        "multiples of 4, default 1e5,1e6; --steps the unroll lengths, default "
                        "50,100,200; --quick: 1e5 and T=50, 1 repeat)")
    p.add_argument("--steps", type=_parse_sizes, default=None,
                   help="with --only bilevel: comma-separated unroll lengths T")
    p.add_argument("--no-startup", dest="startup", action="store_false",
                   help="skip the start-up measurements in fresh processes (import time; "
                        "without --quick also first step with a warm cache and compile time)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the process to one CPU (torch still runs one thread)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--out", metavar="DIR", type=Path, default=RESULTS_DIR,
                   help="folder for table.md, table.json and time_per_step.png "
                        "(default asv_bench/results/)")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="do not write the plot (it needs matplotlib, in the bench extra)")
    p.add_argument("--json", metavar="PATH", help="also write every sample and the metadata here")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm  # the bench extra

    return tqdm(total=total, desc="bench", unit="step", file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------------------
def plot_series(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> dict:
    """What :func:`plot_time_per_step` draws: ``{layout: {contender label: [(n, seconds)]}}``.

    One series per contender (the "ms" columns) and layout, over the measured parameter counts
    in increasing order; the fixed-cost row and unmeasured cells are left out.
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in sorted(rows, key=lambda r: r.n):
        if row.layout == "tiny":
            continue
        for col in columns:
            if col.kind != "ms":
                continue
            seconds = row.seconds(col.case)
            if seconds is not None:
                series.setdefault(row.layout, {}).setdefault(col.label, []).append((row.n, seconds))
    return series


def plot_time_per_step(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """Write a PNG: time per step against parameter count, log-log, one line per contender.

    One panel per layout (one tensor; 100 tensors). Needs matplotlib (the bench extra); draws
    with the Agg backend, so no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(rows)
    if not series:
        raise ValueError("nothing to plot: no contender was measured")
    layouts = [layout for layout in LAYOUTS if layout in series]
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 5), squeeze=False,
                             sharey=True)
    names = {"one": "1 tensor", "model": f"{MODEL_TENSORS} tensors"}
    for ax, layout in zip(axes[0], layouts):
        for label, points in series[layout].items():
            n, seconds = zip(*points)
            style = "-" if label.startswith("uniopt") else "--"
            ax.loglog(n, np.array(seconds) * 1e3, style, marker="o", markersize=3, label=label)
        ax.set_title(names.get(layout, layout))
        ax.set_xlabel("parameters (float32)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time per step [ms] (lower is better)")
    axes[0][-1].legend(fontsize="small", loc="upper left")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _startup(quick: bool, solver: bool = True) -> dict:
    """Start-up metrics in fresh processes; ``quick`` measures only the import time; ``solver``:
    also the first (compiling) run of each Polyak solver."""
    out: dict = {}
    try:
        out["import_uniopt"] = import_time(repeat=1 if quick else 5)
    except Exception as exc:  # report, don't lose the table
        out["import_uniopt"] = f"failed: {exc}"
    if quick:
        return out
    try:
        try:
            fs = first_step_time("torch")
        except Unavailable:
            fs = first_step_time("numpy")
        out["first_step"] = fs["first_step"]
        out["first_step_setup"] = (f"uniopt {fs['backend']} QHAdam, 1e5 params in 100 tensors, "
                                   "warm kernel cache")
        out["import_uniopt_adapter"] = fs["import_uniopt"]
        if "torch_first_step" in fs:
            out["torch_one_off_first_step"] = fs["torch_first_step"]
    except Exception as exc:
        out["first_step"] = f"failed: {exc}"
    try:
        ct = compile_times()
        out["compile_qhadam_table"] = ct["kernel_qhadam"]
        out["compile_qhm_table"] = ct["kernel_qhm"]
        out["numba_first_jit"] = ct["numba_first_jit"]
    except Exception as exc:
        out["compile"] = f"failed: {exc}"
    if solver:
        for name in SOLVER_CASES:
            key = f"polyak_first_run_{name.removesuffix('_polyak')}"
            try:
                out[key] = solver_first_run(name, QUICK_SOLVER_PROBLEMS[0])["first_run"]
            except Unavailable as exc:
                out[key] = f"n/a: {exc}"
            except Exception as exc:
                out[key] = f"failed: {exc}"
        out["polyak_first_run_setup"] = (f"PolyakSGD(...).run on {QUICK_SOLVER_PROBLEMS[0]}: "
                                         "build, trace, compile, run")
    return out


def _main_bilevel(args) -> int:
    """``--only bilevel``: the bilevel table alone (every case in fresh processes)."""
    sizes = args.sizes or list(bilevel.QUICK_SIZES if args.quick else bilevel.SIZES)
    steps_list = args.steps or list(bilevel.QUICK_STEPS if args.quick else bilevel.STEPS)
    bad = [n for n in sizes if n % bilevel.D_IN]
    if bad:
        _parser().error(f"--only bilevel needs sizes that are multiples of {bilevel.D_IN}, got {bad}")
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        _parser().error("--repeat must be positive")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(), "versions": versions(),
        "threads": "torch 1 thread, " + ("each process pinned to one CPU" if args.pin
                                         else "processes not pinned (XLA may use several threads)"),
        "repeat": repeat, "min_time": 0.0, "parallel_min_size": _jit.PARALLEL_MIN_SIZE,
    }
    bar = _progress_bar(len(sizes), args.progress)
    try:
        section = measure_bilevel(sizes, steps_list, repeat, args.pin, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    result = {"meta": meta, "rows": [], "startup": {}, "columns": [],
              "solver": {"rows": []}, "ialm": {"rows": []}, "constrained": {"rows": []},
              "bilevel": section, "goals": bilevel_goals(section)}
    report = format_report(result, [])
    print(report, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(report + "\n")
    for path in filter(None, [args.out / "table.json", args.json]):
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print("written: " + ", ".join(str(p) for p in (args.out / "table.md", args.out / "table.json")),
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table. Returns 0 (goals are reported, not enforced)."""
    args = _parser().parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before measuring, not after)
        except ImportError:
            _parser().error("the plot needs matplotlib (pip install -e '.[bench]'); "
                            "or pass --no-plot")
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    constrained_sizes = list(QUICK_CONSTRAINED_SIZES if args.quick else CONSTRAINED_SIZES)
    if args.only == "constrained":
        constrained_sizes = args.sizes or constrained_sizes
        args.layouts, args.fixed_cost, args.solver, args.ialm = [], False, False, False
        args.startup, args.plot, args.constrained = False, False, True
    if args.only == "bilevel":
        return _main_bilevel(args)
    repeat = args.repeat or (3 if args.quick else 7)
    min_time = args.min_time or (0.005 if args.quick else 0.05)
    if repeat < 1 or min_time <= 0:
        _parser().error("--repeat and --min-time must be positive")
    for layout in args.layouts:
        for n in sizes:
            if layout == "model" and n < MODEL_TENSORS:
                _parser().error(f"layout 'model' needs sizes >= {MODEL_TENSORS}, got {n}")

    rows = [Row(n, layout, layout_sizes(n, layout)) for n in sizes for layout in args.layouts]
    if args.fixed_cost:
        tiny = layout_sizes(0, "tiny")
        rows.append(Row(sum(tiny), "tiny", tiny))
    cases = list(dict.fromkeys(c.case for c in COLUMNS if c.case))
    solver_rows = ([SolverRow(SOLVER_PROBLEMS[k])
                    for k in (QUICK_SOLVER_PROBLEMS if args.quick else SOLVER_PROBLEMS)]
                   if args.solver else [])
    solver_cases = len(SOLVER_CASES) * len(SOLVER_MODES)
    ialm_rows = ([IALMRow(m) for m in (QUICK_IALM_SIZES if args.quick else IALM_SIZES)]
                 if args.ialm else [])
    constrained_rows = ([ConstrainedRow(m=m) for m in constrained_sizes] if args.constrained
                        else [])

    saved = pin_threads(args.pin)
    try:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(),
            "versions": versions(),
            "threads": "torch 1 thread, "
                       + ("serial numba kernels" if _jit.PARALLEL_MIN_SIZE >= 2**62 else
                          f"numba parallel kernels from {_jit.PARALLEL_MIN_SIZE} params")
                       + (f", process pinned to CPU {max(saved['affinity'])}" if "affinity" in saved
                          else ", process not pinned (XLA may use several threads)"),
            "repeat": repeat,
            "min_time": min_time,
            "parallel_min_size": _jit.PARALLEL_MIN_SIZE,
        }
        bar = _progress_bar((len(rows) * len(cases) + len(solver_rows) * solver_cases
                             + len(ialm_rows) * len(IALM_CASES)
                             + len(constrained_rows) * len(CONSTRAINED_CASES)) * (1 + repeat),
                            args.progress)
        try:
            for row in rows:
                measure_row(row, cases, repeat, min_time, seed=args.seed, progress=bar)
                if "torch_threads" in saved:  # a framework may have changed it (numba's OpenMP)
                    import torch

                    torch.set_num_threads(1)
            for solver_row in solver_rows:
                measure_solver_row(solver_row, repeat, min_time, seed=args.seed, progress=bar)
            for ialm_row in ialm_rows:
                measure_ialm_row(ialm_row, repeat, min_time, seed=args.seed, progress=bar)
            measure_constrained_rows(constrained_rows, repeat, min_time, seed=args.seed,
                                     progress=bar)
        finally:
            if bar is not None:
                bar.close()
        startup = _startup(args.quick, args.solver) if args.startup else {}
    finally:
        restore_threads(saved)

    result = {"meta": meta, "rows": [r.to_json() for r in rows], "startup": startup,
              "columns": [{"key": c.key, "label": c.label, "kind": c.kind, "help": c.help}
                          for c in COLUMNS]}
    result["solver"] = {"rows": [r.to_json() for r in solver_rows],
                        "columns": [{"key": c.key, "label": c.label, "kind": c.kind,
                                     "help": c.help} for c in SOLVER_COLUMNS],
                        "settings": dict(POLYAK_SOLVER)}
    result["ialm"] = {"rows": [r.to_json() for r in ialm_rows], "settings": dict(IALM)}
    result["constrained"] = {"rows": [r.to_json() for r in constrained_rows],
                             "settings": {"sgd": dict(CONSTRAINED_SGD), "nupi": dict(CONSTRAINED_NUPI),
                                          "sampled": CONSTRAINED_SAMPLED},
                             "columns": [{"key": c.key, "label": c.label, "kind": c.kind,
                                          "help": c.help} for c in CONSTRAINED_COLUMNS]}
    result["goals"] = evaluate_goals(rows, startup, solver_rows, ialm_rows, constrained_rows)
    if args.only == "constrained":  # the other tables' goals were not measured
        texts = {g.text for g in GOALS if g.metric == "constrained"}
        result["goals"] = [g for g in result["goals"] if g["goal"] in texts]
    report = format_report(result, rows, solver_rows, ialm_rows, constrained_rows)
    print(report, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(report + "\n")
    for path in filter(None, [args.out / "table.json", args.json]):
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    written = [args.out / "table.md", args.out / "table.json"]
    if args.plot:
        written.append(plot_time_per_step(rows, args.out / PLOT_NAME,
                                          title=f"uniopt bench, {meta['date']}, "
                                                f"{meta['machine']['cpu']}"))
    print("written: " + ", ".join(str(p) for p in written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
