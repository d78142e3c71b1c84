"""Building the report: the per-run table, then each analysis section in turn; CSV / JSON output and the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eval.report import capacity, curves, isoflop, overfitting, scaling, seeds
from eval.report.groups import group_runs, settings_label
from eval.report.runs import load_runs
from eval.report.section import Context, Section
from eval.report.table import add_deltas, benchmark_names, columns, csv_table, markdown_table, run_row
from project.io import atomic_write_json, atomic_write_text

# The analyses, in report order: each module's section(ctx) gives its Markdown, CSV tables, plots and JSON entry.
# A new analysis is a new module with a `section` function, and one line here.
SECTIONS: tuple[Callable[[Context], Section], ...] = (
    overfitting.section,
    seeds.section,
    curves.section,
    isoflop.section,
    scaling.section,
    capacity.section,
)


def records_csv(records: list[dict[str, Any]]) -> str:
    """Records as CSV (lists joined by ';', None as an empty cell)."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else ("" if v is None else v)
                         for k, v in r.items()})  # fmt: skip
    return out.getvalue()


def jsonable(obj: Any) -> Any:
    """`obj` with dataclasses, numpy values and tuples turned into JSON types (non-finite floats as None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable({k: getattr(obj, k) for k in obj.__dataclass_fields__ if not k.startswith("_")})
    return obj


def build_report(run_globs: list[str] | str, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Collect the runs and write to `out_dir`: report.md (per-run table, then every analysis that applies),
    report.csv (per run), overfitting.csv, seeds.csv, curves.csv, isoflop_*.csv, scaling.csv, capacity.csv,
    analysis.json and the plots; print the Markdown.

    Analyses (SECTIONS): overfitting and seeds (always: per group mean ± std and Welch deltas vs the reference),
    learning curves (runs with validation curves in metrics.csv), iso-FLOP (runs with a train_flops budget),
    scaling in token-indexed parameters (JTok-M runs at >= 2 token-indexed sizes under otherwise equal settings),
    knowledge capacity (facts corpora at >= 2 sizes).

    Returns {"runs", "benchmarks", "columns", "rows", "markdown" (the per-run table), "groups", "overfitting",
    "seeds", "curves", "isoflop", "scaling", "capacity", "analysis_markdown", "files": {"markdown", "csv",
    "plots", "analysis_plots", "tables"}}.
    """
    runs = load_runs(run_globs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmarks = benchmark_names(runs)
    rows = [run_row(r, benchmarks) for r in runs]
    add_deltas(rows, benchmarks)
    cols = columns(benchmarks)
    md = markdown_table(rows, benchmarks)
    csv_path = atomic_write_text(out_dir / "report.csv", csv_table(rows, cols))
    plots = curves.plot_curves(runs, out_dir)

    groups = group_runs(runs)
    ctx = Context(runs, {r.path: row for r, row in zip(runs, rows)}, benchmarks, groups, out_dir)
    sections = [section(ctx) for section in SECTIONS]
    tables = {name: atomic_write_text(out_dir / file, records_csv(recs))
              for s in sections for name, (file, recs) in s.tables.items()}  # fmt: skip
    figures = [p for s in sections for p in s.figures]

    analysis_md = "\n".join(s.markdown for s in sections if s.markdown is not None)
    text = f"# Ablation report\n\n{len(runs)} run(s).\n\n{md}\n{analysis_md}"
    md_path = atomic_write_text(out_dir / "report.md", text)
    group_records = [{"label": g.label, "variant": g.variant, "condition": settings_label(g.condition),
                      "runs": [str(r.path) for r in g.runs]} for g in groups]  # fmt: skip
    result = {
        "runs": len(runs),
        "benchmarks": benchmarks,
        "columns": cols,
        "rows": rows,
        "markdown": md,
        "groups": group_records,
        **{s.key: s.result for s in sections},
        "analysis_markdown": analysis_md,
    }
    everything = jsonable({k: v for k, v in result.items() if k != "rows"})
    tables["json"] = atomic_write_json(out_dir / "analysis.json", everything)
    result["files"] = {
        "markdown": str(md_path),
        "csv": str(csv_path),
        "plots": [str(p) for p in plots],
        "analysis_plots": [str(p) for p in figures],
        "tables": {k: str(v) for k, v in tables.items()},
    }
    print(md)
    print(analysis_md)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.report GLOB... [--out DIR]`: build the report; 1 with a message when no run matches."""
    description = sys.modules[__package__].__doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=description)
    parser.add_argument("runs", nargs="+", help="glob patterns of run folders, summary.json files or sweep folders")
    parser.add_argument("--out", default="reports/latest", help="output folder (default: reports/latest)")
    args = parser.parse_args(argv)
    try:
        build_report(args.runs, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
