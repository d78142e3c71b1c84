"""Seeds: each group's mean ± std over seeds and its delta against the references, with Welch's 95% interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.report import stats
from eval.report.fmt import interval_cell, md_head
from eval.report.groups import Group, references, seed_values, settings_label
from eval.report.runs import BASELINE
from eval.report.section import Context, Section


def metrics_of(benchmarks: list[str]) -> list[tuple[str, bool]]:
    """(row column, lower is better): validation loss, then each benchmark's accuracy."""
    return [("val_loss", True)] + [(f"{b}_acc", False) for b in benchmarks]


def records(groups: list[Group], rows: dict[Path, dict[str, Any]], benchmarks: list[str]) -> list[dict[str, Any]]:
    """One record per (metric, group, reference): the group's seed summary and its delta against the reference
    with Welch's 95% interval and a verdict ('within noise' when the interval contains 0)."""
    out = []
    for metric, lower in metrics_of(benchmarks):
        for g in groups:
            values = seed_values(g, rows, metric)
            if not values:
                continue
            summ = stats.summarize(list(values.values()))
            base = {
                "metric": metric, "group": g.label, "variant": g.variant, "condition": settings_label(g.condition),
                "n": summ.n, "seeds": list(values), "values": list(values.values()), "mean": summ.mean, "std": summ.std,
                "vs": None, "delta": None, "ci_low": None, "ci_high": None, "p_value": None, "verdict": None,
                "lower_is_better": lower,
            }  # fmt: skip
            refs = [(ref, seed_values(ref, rows, metric)) for ref in references(g, groups)]
            refs = [(ref, v) for ref, v in refs if v]
            if not refs:
                out.append(base)
            for ref, ref_values in refs:
                iv = stats.welch_delta(list(values.values()), list(ref_values.values()))
                out.append({**base, "vs": ref.label, "delta": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                            "p_value": iv.p_value, "verdict": stats.verdict(iv, lower)})  # fmt: skip
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """Per metric: each group's mean ± std over seeds, every seed's value, the delta vs its reference."""
    out = ["## Seeds: mean ± std, deltas with Welch 95% intervals", "",
           "Δ = group mean − reference mean. 'within noise': the interval contains 0; "
           "n=1 groups get no interval.", ""]  # fmt: skip
    for metric in dict.fromkeys(r["metric"] for r in records):
        recs = [r for r in records if r["metric"] == metric]
        lower = recs[0]["lower_is_better"]
        digits = 4 if metric == "val_loss" else 3
        out += [f"### {metric} ({'lower' if lower else 'higher'} is better)", "",
                *md_head("group", "n", "mean ± std", "per seed", "vs", "Δ [95% CI]", "p", "verdict")]
        for r in recs:
            mean = f"{r['mean']:.{digits}f}" + (f" ± {r['std']:.{digits}f}" if r["std"] is not None else " (n=1)")
            seeds = ", ".join(f"s{s}: {v:.{digits}f}" for s, v in zip(r["seeds"], r["values"]))
            delta = interval_cell(r["delta"], r["ci_low"], r["ci_high"], f"+.{digits}f")
            p = f"{r['p_value']:.3g}" if r["p_value"] is not None else ""
            out.append(f"| {r['group']} | {r['n']} | {mean} | {seeds} | {r['vs'] or ''} | {delta} | {p} | "
                       f"{r['verdict'] or ('reference' if r['variant'] == BASELINE else '')} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def section(ctx: Context) -> Section:
    """Always: seeds.csv and the Markdown, one record per (metric, group, reference)."""
    recs = records(ctx.groups, ctx.rows, ctx.benchmarks)
    return Section("seeds", recs, markdown(recs), {"seeds": ("seeds.csv", recs)})
