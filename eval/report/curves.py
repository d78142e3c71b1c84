"""Learning curves: each run's validation curve, and the tokens / FLOPs a group needs to reach its reference's
final value (seed-mean curves, bootstrap intervals over seeds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eval.report import plots, stats
from eval.report.fmt import md_head
from eval.report.groups import Group, references, settings_label
from eval.report.runs import Run, metrics_records
from eval.report.section import Context, Section

# ---------------------------------------------------------------- each run's validation curve


def _token_axis(run: Run, records: list[dict[str, str]]) -> Callable[[float], float | None]:
    """step -> training tokens: interpolated from the logged train_tokens, else steps x tokens per step."""
    seen = sorted(
        (float(r["step"]), float(r["train_tokens"])) for r in records if r.get("train_tokens") not in (None, "")
    )
    s = run.summary
    per_step = s["train_tokens"] / s["steps"] if s.get("train_tokens") and s.get("steps") else None

    def tokens(step: float) -> float | None:
        if seen:
            return float(np.interp(step, [p[0] for p in seen], [p[1] for p in seen]))
        return step * per_step if per_step else None

    return tokens


def val_curve(run: Run) -> list[tuple[float, float, float | None]]:
    """(step, val loss, training FLOPs) points from the run's metrics.csv (Lightning CSVLogger)."""
    records = metrics_records(run)
    val = [(float(r["step"]), float(r["val/loss"])) for r in records if r.get("val/loss") not in (None, "")]
    tokens = _token_axis(run, records)
    fpt = run.summary.get("flops_per_token")
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
    plt = plots.pyplot()
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
        written.append(plots.save_figure(fig, out_dir / name))
        plt.close(fig)
    return written


# ---------------------------------------------------------------- learning curves of groups of seeds


CURVE_METRICS = {  # name -> (metrics.csv column, lower is better)
    "val_loss": ("val/loss", True),
    "train_loss": ("train/loss", True),
    "facts_qa_heldout": ("probe/facts_qa_heldout", False),
    "facts_qa_train": ("probe/facts_qa_train", False),
}
AXES = {"tokens": "training tokens", "flops": "training FLOPs"}


def learning_curve(run: Run) -> dict[str, np.ndarray] | None:
    """step, tokens, flops and every CURVE_METRICS column at each validation (NaN where not logged)."""
    records = metrics_records(run)
    by_step: dict[float, dict[str, float]] = {}
    for r in records:
        for name, (column, _) in CURVE_METRICS.items():
            if r.get(column) not in (None, ""):
                by_step.setdefault(float(r["step"]), {})[name] = float(r[column])
    if not by_step:
        return None
    tokens_at = _token_axis(run, records)
    steps = sorted(by_step)
    fpt = run.summary.get("flops_per_token")
    tokens = np.array([np.nan if (t := tokens_at(s)) is None else t for s in steps], dtype=float)
    curve = {"step": np.array(steps), "tokens": tokens, "flops": tokens * fpt if fpt else np.full(len(steps), np.nan)}
    for name in CURVE_METRICS:
        curve[name] = np.array([by_step[s].get(name, np.nan) for s in steps], dtype=float)
    return curve


def seed_curves(group: Group, curves: dict[Path, Any], metric: str, axis: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each run's (x, y) points for one metric along one axis (tokens or flops)."""
    out = []
    for r in group.runs:
        c = curves.get(r.path)
        if c is None:
            continue
        keep = np.isfinite(c[axis]) & np.isfinite(c[metric])
        if keep.any():
            out.append((c[axis][keep], c[metric][keep]))
    return out


def _saving_from(var: list, ref: list, decreasing: bool) -> tuple[float | None, stats.Crossing | None, float | None]:
    vc, rc = stats.mean_curve(var), stats.mean_curve(ref)
    if vc is None or rc is None:
        return None, None, None
    target = float(rc.mean[-1])
    saving, cross = stats.crossing_saving(vc.x, vc.mean, float(rc.x[-1]), target, decreasing)
    return saving, cross, target


def records(groups: list[Group], curves: dict[Path, Any]) -> list[dict[str, Any]]:
    """For each group vs its reference: where the group's mean curve first reaches the reference's final
    value (val loss, facts_qa held-out), and the tokens / FLOPs saved, 1 - x / x_ref_final, with a bootstrap
    interval over seeds (both sides resampled) when both have >= MIN_BOOTSTRAP_N seeds."""
    out = []
    for g in groups:
        if g.budget is not None:
            continue
        for ref in references(g, groups):
            for metric in ("val_loss", "facts_qa_heldout"):
                decreasing = CURVE_METRICS[metric][1]
                rec: dict[str, Any] = {"group": g.label, "vs": ref.label, "metric": metric}
                for axis in AXES:
                    var, base = seed_curves(g, curves, metric, axis), seed_curves(ref, curves, metric, axis)
                    saving, cross, target = _saving_from(var, base, decreasing)
                    if cross is None:
                        continue
                    final = float(stats.mean_curve(var).mean[-1])
                    rec.update(n=len(var), n_ref=len(base), target=target, final=final)
                    rec[f"{axis}_reached"] = cross.x
                    rec[f"{axis}_at_first_point"] = cross.at_first_point
                    rec[f"{axis}_saving"] = saving
                    rec[f"{axis}_low"] = rec[f"{axis}_high"] = None
                    if min(len(var), len(base)) < stats.MIN_BOOTSTRAP_N:
                        rec[f"{axis}_note"] = f"n={min(len(var), len(base))}: no interval"
                        continue

                    def replicate(rng: np.random.Generator, var=var, base=base, decreasing=decreasing) -> float | None:
                        pick_v = [var[i] for i in rng.integers(0, len(var), len(var))]
                        pick_b = [base[i] for i in rng.integers(0, len(base), len(base))]
                        return _saving_from(pick_v, pick_b, decreasing)[0]

                    boot = stats.bootstrap(replicate, n_boot=stats.N_BOOT, undefined_as="not reached")
                    rec[f"{axis}_low"], rec[f"{axis}_high"], rec[f"{axis}_note"] = boot.low, boot.high, boot.note
                if "target" in rec:
                    out.append(rec)
    return out


def _saving_cell(rec: dict[str, Any], axis: str) -> str:
    if rec.get(f"{axis}_reached") is None:
        return "not reached" if f"{axis}_saving" in rec else ""
    pct = 100 * rec[f"{axis}_saving"]
    cell = ("≥ " if rec[f"{axis}_at_first_point"] else "") + f"{pct:+.1f}%"
    if rec.get(f"{axis}_low") is not None:
        cell += f" [{100 * rec[f'{axis}_low']:+.1f}%, {100 * rec[f'{axis}_high']:+.1f}%]"
    elif rec.get(f"{axis}_note"):
        cell += f" ({rec[f'{axis}_note']})"
    return cell


def markdown(records: list[dict[str, Any]], skipped_budget: int) -> str:
    """The 'reaches the reference's final value with X% fewer tokens / FLOPs' table."""
    out = ["## Learning curves: tokens and FLOPs to reach the reference's final value", "",
           "Saving = 1 − x / x_ref, where x is where the group's seed-mean curve first reaches the reference's final "
           "seed-mean value (interpolated in log x) and x_ref the reference's final x; positive = fewer. "
           "'≥': already reached at the first validation. Intervals: bootstrap over seeds, both sides resampled "
           f"(percentile, 95%; needs >= {stats.MIN_BOOTSTRAP_N} seeds per side, optimistic with few seeds).",
           ""]  # fmt: skip
    if records:
        out += md_head("group", "vs", "metric", "n", "ref final", "group final", "tokens saved", "FLOPs saved")
        for r in records:
            fmt = ".4f" if r["metric"] == "val_loss" else ".3f"
            cells = [r["group"], r["vs"], r["metric"], f"{r['n']} vs {r['n_ref']}", format(r["target"], fmt),
                     format(r["final"], fmt), _saving_cell(r, "tokens"), _saving_cell(r, "flops")]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    elif not skipped_budget:
        out.append("No group has a reference with learning curves.")
    if skipped_budget:
        out += ["", f"{skipped_budget} group(s) trained under a FLOP budget: see the iso-FLOP analysis instead."]
    return "\n".join(out) + "\n"


def plot(groups: list[Group], curves: dict[Path, Any], out_dir: Path) -> list[Path]:
    """Seed-mean learning curves with ± std bands (n >= 2), one figure set per shared condition:
    curves_val_loss*.png (validation and, dashed, train loss vs tokens and FLOPs) and curves_facts_qa*.png
    (held-out and trained paraphrases, vs tokens and FLOPs)."""
    plt = plots.pyplot()
    conditions = list(dict.fromkeys(g.condition for g in groups if g.budget is None))
    written = []
    for i, cond in enumerate(conditions):
        members = [g for g in groups if g.condition == cond and g.budget is None]
        suffix = f"_{i}" if len(conditions) > 1 else ""
        title = settings_label(cond)
        for name, metrics in (("val_loss", ["val_loss"]), ("facts_qa", ["facts_qa_heldout", "facts_qa_train"])):
            metrics = [m for m in metrics if any(seed_curves(g, curves, m, "tokens") for g in members)]
            if not metrics:
                continue
            fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4.2 * len(metrics)), squeeze=False)
            for row, metric in enumerate(metrics):
                for col, axis in enumerate(AXES):
                    ax = axes[row][col]
                    val_top = -np.inf
                    for j, g in enumerate(members):
                        c = stats.mean_curve(seed_curves(g, curves, metric, axis))
                        if c is None:
                            continue
                        val_top = max(val_top, float(np.max(c.mean + (c.std if c.std is not None else 0.0))))
                        color = f"C{j % 10}"
                        ax.plot(c.x, c.mean, color=color, marker="o", markersize=3, label=f"{g.label} (n={c.n})")
                        if c.std is not None:
                            ax.fill_between(c.x, c.mean - c.std, c.mean + c.std, color=color, alpha=0.2, linewidth=0)
                        train = stats.mean_curve(seed_curves(g, curves, "train_loss", axis))
                        if metric == "val_loss" and train is not None:  # beside val: a widening gap is overfitting
                            ax.plot(train.x, train.mean, color=color, linestyle="--", linewidth=1, alpha=0.8)
                    if metric == "val_loss" and np.isfinite(val_top):
                        ax.set_ylim(top=val_top * 1.05)  # early train losses would squash the validation curves
                    plots.log_x(ax)
                    ax.set_xlabel(AXES[axis])
                    ax.set_ylabel("loss (solid: val, dashed: train)" if metric == "val_loss" else metric.replace("_", " "))
                    if metric != "val_loss":
                        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)  # chance: four choices
                    ax.grid(True, alpha=0.3)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
            fig.suptitle(f"{name.replace('_', ' ')}: seed mean ± std" + (f" ({title})" if title else ""))
            written.append(plots.save_figure(fig, out_dir / f"curves_{name}{suffix}.png"))
            plt.close(fig)
    return written


def section(ctx: Context) -> Section:
    """Runs with validation curves in metrics.csv: curves.csv, the Markdown and the seed-mean plots."""
    curves = {r.path: learning_curve(r) for r in ctx.runs}
    if not any(c is not None for c in curves.values()):
        return Section("curves", [])
    recs = records(ctx.groups, curves)
    tables = {"curves": ("curves.csv", recs)} if recs else {}
    md = markdown(recs, sum(g.budget is not None for g in ctx.groups))
    return Section("curves", recs, md, tables, plot(ctx.groups, curves, ctx.out_dir))
