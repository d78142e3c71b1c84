"""Overfitting made visible: epochs read, the train/val gap at the end, the best validation loss and its step.

A run is flagged when it read its training data more than once, or when its final validation loss is worse
than its best by more than the seed noise (the std of the final validation loss over the group's seeds,
never less than MIN_RISE). Token-indexed tables memorise repeated documents fast (eval/RESEARCH.md,
'When data repeats'), so a flagged comparison says more about the regime than about the method.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from eval.report import stats
from eval.report.groups import Group
from eval.report.runs import Run, metrics_records
from eval.report.section import Context, Section

MIN_RISE = 0.005  # nats: a rise of the validation loss below this is never flagged
TRAIN_TAIL = 5  # the train loss at the end: mean of the last TRAIN_TAIL logged values (single batches are noisy)


def run_record(run: Run, records: list[dict[str, str]]) -> dict[str, Any]:
    """One run's epochs, final train and val loss, their gap, and the best validation loss with its step."""
    val = [(float(r["step"]), float(r["val/loss"])) for r in records if r.get("val/loss") not in (None, "")]
    train = [float(r["train/loss"]) for r in records if r.get("train/loss") not in (None, "")]
    s = run.summary
    final = s.get("val_loss")
    if final is None and val:
        final = val[-1][1]
    best_step, best = min(val, key=lambda p: p[1]) if val else (None, final)
    if final is not None and best is not None and final < best:
        best_step, best = s.get("steps"), final  # the final validation is the best one
    train_end = float(np.mean(train[-TRAIN_TAIL:])) if train else None
    epochs = (s.get("data") or {}).get("epochs")
    return {
        "run": run.path.name,
        "variant": s.get("variant"),
        "seed": s.get("seed"),
        "epochs": epochs,
        "exposures_per_fact": (s.get("data") or {}).get("exposures_per_fact"),
        "train_loss_end": train_end,
        "val_loss_end": final,
        "gap": None if final is None or train_end is None else final - train_end,
        "best_val_loss": best,
        "best_step": best_step,
        "steps": s.get("steps"),
        "rise": None if final is None or best is None else final - best,
    }


def records(groups: list[Group]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-run records, per-group records), each with its warnings."""
    runs_out, groups_out = [], []
    for g in groups:
        recs = [{**run_record(r, metrics_records(r)), "group": g.label} for r in g.runs]
        finals = [r["val_loss_end"] for r in recs if r["val_loss_end"] is not None]
        noise = stats.summarize(finals).std if len(finals) > 1 else None
        threshold = max(noise or 0.0, MIN_RISE)
        for r in recs:
            r["warnings"] = _warnings(r, threshold)
        runs_out += recs
        groups_out.append({
            "group": g.label, "n": len(recs), "seed_noise": noise, "threshold": threshold,
            **{k: _mean(recs, k) for k in ("epochs", "exposures_per_fact", "train_loss_end", "val_loss_end", "gap",
                                           "best_val_loss", "rise")},
            "best_steps": [r["best_step"] for r in recs],
            "warnings": sorted({w for r in recs for w in r["warnings"]}),
        })  # fmt: skip
    return runs_out, groups_out


def _warnings(rec: dict[str, Any], threshold: float) -> list[str]:
    out = []
    if rec["epochs"] is not None and rec["epochs"] > 1 + 1e-9:
        out.append(f"reads its data {rec['epochs']:.2f} times")
    if rec["rise"] is not None and rec["rise"] > threshold:
        out.append(f"val loss rose {rec['rise']:.4f} above its best (step {rec['best_step']:g}), "
                   f"more than the noise {threshold:.4f}")  # fmt: skip
    return out


def _mean(recs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in recs if r[key] is not None and math.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def markdown(run_recs: list[dict[str, Any]], group_recs: list[dict[str, Any]]) -> str:
    """The overfitting section: warnings first, then the per-group and per-run tables."""
    out = ["## Overfitting: epochs, train/val gap, best validation", "",
           f"Gap = final val loss − train loss (mean of the last {TRAIN_TAIL} logged batches). Rise = final − best "
           f"val loss; flagged above the group's seed noise (std of final val loss, at least {MIN_RISE}). "
           "Epochs > 1: the run read training documents more than once.", ""]  # fmt: skip
    flagged = [r for r in run_recs if r["warnings"]]
    if flagged:
        out += [f"**Warning: {len(flagged)} of {len(run_recs)} run(s) flagged.**", ""]
        out += [f"- {r['group']} s{r['seed']} ({r['run']}): " + "; ".join(r["warnings"]) for r in flagged]
        out.append("")
    else:
        out += ["No run read its data more than once or ended above its best validation loss.", ""]
    out += ["| group | n | epochs | exposures/fact | train loss (end) | val loss (end) | gap | best val | best at step "
            "| rise | noise |", "|" + "---|" * 11]  # fmt: skip
    for g in group_recs:
        steps = ", ".join("" if s is None else f"{s:g}" for s in g["best_steps"])
        out.append(f"| {g['group']} | {g['n']} | {_num(g['epochs'], 2)} | {_num(g['exposures_per_fact'], 1)} | "
                   f"{_num(g['train_loss_end'])} | {_num(g['val_loss_end'])} | {_num(g['gap'])} | "
                   f"{_num(g['best_val_loss'])} | {steps} | {_num(g['rise'])} | {_num(g['seed_noise'])} |")
    out += ["", "| run | group | seed | epochs | train loss (end) | val loss (end) | gap | best val | best at step "
            "| warnings |", "|" + "---|" * 10]  # fmt: skip
    for r in run_recs:
        step = "" if r["best_step"] is None else f"{r['best_step']:g}"
        out.append(f"| {r['run']} | {r['group']} | {r['seed']} | {_num(r['epochs'], 2)} | {_num(r['train_loss_end'])} "
                   f"| {_num(r['val_loss_end'])} | {_num(r['gap'])} | {_num(r['best_val_loss'])} | {step} | "
                   f"{'; '.join(r['warnings'])} |")  # fmt: skip
    return "\n".join(out) + "\n"


def section(ctx: Context) -> Section:
    """Always: overfitting.csv (per run) and the Markdown, warnings first."""
    run_recs, group_recs = records(ctx.groups)
    result = {"runs": run_recs, "groups": group_recs}
    tables = {"overfitting": ("overfitting.csv", run_recs)}
    return Section("overfitting", result, markdown(run_recs, group_recs), tables)
