"""The per-run table: one row of raw numbers per run, deltas against the sweep's baseline, Markdown and CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

from eval.report.fmt import fixed, si
from eval.report.runs import BASELINE, Run

BENCHMARK_ORDER = ("facts_qa", "facts_qa_heldout", "facts_qa_train", "mmlu", "arc_easy", "arc_challenge", "ceval")
BASE_COLUMNS = (
    "sweep", "run", "variant", "seed", "params_total", "params_backbone", "params_token_indexed", "params_active",
    "flops_per_token", "train_tokens", "steps", "val_loss", "val_ppl", "tokens_per_sec", "delta_val_loss",
    "tables_mode", "tables_held_bytes_per_rank", "tables_bytes_sent_per_step", "tables_fsdp_bytes_per_step",
)  # fmt: skip


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
    tables = s.get("tables") or {}  # the token tables' parallelism (project/lit_module.py: _table_record)
    row["tables_mode"] = tables.get("mode")
    for key in ("held_bytes_per_rank", "bytes_sent_per_step", "fsdp_bytes_per_step"):
        row[f"tables_{key}"] = tables.get(key)
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


def markdown_table(rows: list[dict[str, Any]], benchmarks: list[str]) -> str:
    """The ablation table in Markdown (human units; accuracies as acc ± stderr, deltas signed)."""
    head = ["sweep", "variant", "seed", "params", "backbone", "token-indexed", "active", "FLOPs/tok", "train tok",
            "val loss", "val ppl", "Δ val loss", "tok/s"]  # fmt: skip
    for b in benchmarks:
        head += [b, f"Δ {b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["sweep"], str(r["variant"]), str(r["seed"]), si(r["params_total"]), si(r["params_backbone"]),
            si(r["params_token_indexed"]), si(r["params_active"]), si(r["flops_per_token"]),
            si(r["train_tokens"]), fixed(r["val_loss"], 4), fixed(r["val_ppl"], 2),
            fixed(r["delta_val_loss"], 4, signed=True), si(r["tokens_per_sec"]),
        ]  # fmt: skip
        for b in benchmarks:
            acc, err = r[f"{b}_acc"], r[f"{b}_stderr"]
            cells.append("n/a" if acc is None else f"{acc:.3f}" + (f" ± {err:.3f}" if err is not None else ""))
            cells.append(fixed(r[f"delta_{b}_acc"], 3, signed=True))
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
