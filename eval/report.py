"""The ablation report: runs' `summary.json` files as a Markdown and CSV table, plus validation-loss plots.

    python -m eval.report 'runs/multirun_*' --out reports/latest

A glob may match run folders, `summary.json` files, or folders holding runs (Hydra multirun folders with
numbered subfolders). The runs of one folder form a sweep; deltas compare each run with the sweep's
`baseline` run of the same seed (else the mean of its baseline runs), and are blank without one.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from project.io import atomic_write_text

BASELINE = "baseline"
BENCHMARK_ORDER = ("facts_qa", "facts_qa_heldout", "facts_qa_train", "mmlu", "arc_easy", "arc_challenge", "ceval")
VARIANT_ORDER = ("baseline", "jtok", "jtok_m", "moe", "moe_jtok", "moe_jtok_m")
BASE_COLUMNS = (
    "sweep", "run", "variant", "seed", "params_total", "params_backbone", "params_token_indexed", "params_active",
    "flops_per_token", "train_tokens", "steps", "val_loss", "val_ppl", "tokens_per_sec", "delta_val_loss",
)  # fmt: skip


@dataclass
class Run:
    """One run folder and its summary."""

    path: Path
    summary: dict[str, Any]

    @property
    def sweep(self) -> Path:
        return self.path.parent


# ---------------------------------------------------------------- collecting runs


def find_summaries(run_globs: Iterable[str]) -> list[Path]:
    """Every summary.json the patterns reach: directly, in a matched run folder, or below a matched folder."""
    found: dict[Path, None] = {}
    for pattern in run_globs:
        for match in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            path = Path(match)
            if path.is_file() and path.name == "summary.json":
                found[path.resolve()] = None
            elif (path / "summary.json").is_file():
                found[(path / "summary.json").resolve()] = None
            elif path.is_dir():
                found.update((p.resolve(), None) for p in sorted(path.rglob("summary.json")))
    return list(found)


def load_runs(run_globs: Iterable[str]) -> list[Run]:
    """The runs behind the patterns, sorted by sweep, variant and seed; a clear error if there are none."""
    run_globs = [run_globs] if isinstance(run_globs, str) else list(run_globs)
    summaries = find_summaries(run_globs)
    if not summaries:
        raise FileNotFoundError(
            f"no runs found for {run_globs}: give run folders (holding summary.json), summary.json files, "
            f"or folders of runs such as a Hydra multirun folder"
        )
    runs = [Run(p.parent, json.loads(p.read_text())) for p in summaries]

    def order(run: Run) -> tuple:
        variant = run.summary.get("variant", "")
        rank = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
        return str(run.sweep), rank, variant, run.summary.get("seed") or 0, str(run.path)

    return sorted(runs, key=order)


# ---------------------------------------------------------------- the table


def benchmark_names(runs: list[Run]) -> list[str]:
    """Benchmarks with an accuracy in at least one run, in a fixed order (known ones first)."""
    names = {k for r in runs for k, e in (r.summary.get("eval") or {}).items() if _acc(e) is not None}
    known = [b for b in BENCHMARK_ORDER if b in names]
    return known + sorted(names - set(known))


def _acc(entry: Any) -> float | None:
    if isinstance(entry, dict) and entry.get("status", "ok") == "ok" and isinstance(entry.get("acc"), (int, float)):
        return float(entry["acc"])
    return None


def run_row(run: Run, benchmarks: list[str]) -> dict[str, Any]:
    """A run's flat row of raw numbers (None where unknown)."""
    s = run.summary
    params = s.get("params") or {}
    row: dict[str, Any] = {
        "sweep": run.sweep.name,
        "run": run.path.name,
        "variant": s.get("variant"),
        "seed": s.get("seed"),
        "params_total": params.get("total"),
        "params_backbone": params.get("backbone"),
        "params_token_indexed": params.get("token_indexed"),
        "params_active": params.get("active_per_token"),
        "flops_per_token": s.get("flops_per_token"),
        "train_tokens": s.get("train_tokens"),
        "steps": s.get("steps"),
        "val_loss": s.get("val_loss"),
        "val_ppl": s.get("val_ppl"),
        "tokens_per_sec": s.get("tokens_per_sec"),
    }
    evals = s.get("eval") or {}
    for b in benchmarks:
        entry = evals.get(b)
        row[f"{b}_acc"] = _acc(entry)
        row[f"{b}_stderr"] = entry.get("stderr") if row[f"{b}_acc"] is not None else None
    return row


def add_deltas(rows: list[dict[str, Any]], benchmarks: list[str]) -> None:
    """Set delta_val_loss and delta_<benchmark>_acc against the sweep's baseline (same seed, else the mean)."""
    metrics = ["val_loss"] + [f"{b}_acc" for b in benchmarks]
    for row in rows:
        base = [r for r in rows if r["sweep"] == row["sweep"] and r["variant"] == BASELINE]
        same_seed = [r for r in base if r["seed"] == row["seed"]]
        base = same_seed or base
        for m in metrics:
            ref = [r[m] for r in base if r[m] is not None]
            row[f"delta_{m}"] = row[m] - sum(ref) / len(ref) if ref and row[m] is not None else None


def columns(benchmarks: list[str]) -> list[str]:
    """CSV columns: the run's numbers, each benchmark's accuracy and stderr, then the deltas."""
    cols = list(BASE_COLUMNS)
    for b in benchmarks:
        cols += [f"{b}_acc", f"{b}_stderr", f"delta_{b}_acc"]
    return cols


def _si(x: Any) -> str:
    if x is None:
        return ""
    x = float(x)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _fixed(x: Any, digits: int, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], benchmarks: list[str]) -> str:
    """The ablation table in Markdown (human units; accuracies as acc ± stderr, deltas signed)."""
    head = ["sweep", "variant", "seed", "params", "backbone", "token-indexed", "active", "FLOPs/tok", "train tok",
            "val loss", "val ppl", "Δ val loss", "tok/s"]  # fmt: skip
    for b in benchmarks:
        head += [b, f"Δ {b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["sweep"], str(r["variant"]), str(r["seed"]), _si(r["params_total"]), _si(r["params_backbone"]),
            _si(r["params_token_indexed"]), _si(r["params_active"]), _si(r["flops_per_token"]),
            _si(r["train_tokens"]), _fixed(r["val_loss"], 4), _fixed(r["val_ppl"], 2),
            _fixed(r["delta_val_loss"], 4, signed=True), _si(r["tokens_per_sec"]),
        ]  # fmt: skip
        for b in benchmarks:
            acc, err = r[f"{b}_acc"], r[f"{b}_stderr"]
            cells.append("n/a" if acc is None else f"{acc:.3f}" + (f" ± {err:.3f}" if err is not None else ""))
            cells.append(_fixed(r[f"delta_{b}_acc"], 3, signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """The rows as CSV with raw numbers (empty cells where unknown)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r[c] for c in cols})
    return out.getvalue()


# ---------------------------------------------------------------- plots


def val_curve(run: Run) -> list[tuple[float, float, float | None]]:
    """(step, val loss, training FLOPs) points from the run's metrics.csv (Lightning CSVLogger)."""
    path = run.path / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        records = list(csv.DictReader(f))
    val = [(float(r["step"]), float(r["val/loss"])) for r in records if r.get("val/loss") not in (None, "")]
    seen = sorted(
        (float(r["step"]), float(r["train_tokens"])) for r in records if r.get("train_tokens") not in (None, "")
    )
    s = run.summary
    fpt = s.get("flops_per_token")
    per_step = s["train_tokens"] / s["steps"] if s.get("train_tokens") and s.get("steps") else None

    def tokens(step: float) -> float | None:
        if seen:
            import numpy as np

            return float(np.interp(step, [p[0] for p in seen], [p[1] for p in seen]))
        return step * per_step if per_step else None

    points = []
    for step, loss in val:
        t = tokens(step)
        points.append((step, loss, t * fpt if t is not None and fpt else None))
    return points


def plot_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    """val_loss_vs_steps.png and val_loss_vs_flops.png, all runs on one figure each; [] without curves."""
    curves = {id(r): val_curve(r) for r in runs}
    if not any(curves.values()):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_sweeps = len({r.sweep for r in runs}) > 1
    written = []
    for x_index, x_label, name, log_x in ((0, "optimizer steps", "val_loss_vs_steps.png", False),
                                          (2, "training FLOPs", "val_loss_vs_flops.png", True)):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            pts = [p for p in curves[id(run)] if p[x_index] is not None]
            if not pts:
                continue
            label = f"{run.summary.get('variant')} s{run.summary.get('seed')}"
            label += f" ({run.sweep.name})" if several_sweeps else ""
            ax.plot([p[x_index] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation loss")
        ax.set_title(f"validation loss vs {x_label}")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        written.append(_save_figure(fig, out_dir / name))
        plt.close(fig)
    return written


def _save_figure(fig: Any, path: Path) -> Path:
    """Save a PNG beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- entry points


def build_report(run_globs: list[str] | str, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Collect the runs, write report.md, report.csv and the plots to `out_dir`, print the Markdown table.

    Returns {"runs": n, "benchmarks": [...], "columns": [...], "rows": [row dicts of raw numbers],
    "markdown": str, "files": {"markdown": path, "csv": path, "plots": [paths]}}.
    """
    runs = load_runs(run_globs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmarks = benchmark_names(runs)
    rows = [run_row(r, benchmarks) for r in runs]
    add_deltas(rows, benchmarks)
    cols = columns(benchmarks)
    md = markdown_table(rows, benchmarks)
    md_path = atomic_write_text(out_dir / "report.md", f"# Ablation report\n\n{len(runs)} run(s).\n\n{md}")
    csv_path = atomic_write_text(out_dir / "report.csv", csv_table(rows, cols))
    plots = plot_curves(runs, out_dir)
    print(md)
    return {
        "runs": len(runs),
        "benchmarks": benchmarks,
        "columns": cols,
        "rows": rows,
        "markdown": md,
        "files": {"markdown": str(md_path), "csv": str(csv_path), "plots": [str(p) for p in plots]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="glob patterns of run folders, summary.json files or sweep folders")
    parser.add_argument("--out", default="reports/latest", help="output folder (default: reports/latest)")
    args = parser.parse_args(argv)
    try:
        build_report(args.runs, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
