"""Iso-FLOP: per FLOP budget a parabola of loss in model size, each variant's frontier through the optima, and
the compute saved at equal loss against `baseline` and `moe`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.report import plots, stats
from eval.report.fits import Parabola, compute_saving, fit_frontier, fit_parabola, perturbed
from eval.report.fmt import fixed, interval_cell, md_head, si
from eval.report.groups import BUDGET_KEY, REFERENCES, SIZE_KEYS, Group, Setting, seed_values, settings_label
from eval.report.runs import BASELINE
from eval.report.section import Context, Section


@dataclass
class IsoSeries:
    """One variant's runs under FLOP budgets: budget -> [(active params, [loss per seed]) per model size]."""

    variant: str
    label: str
    condition: Setting
    cells: dict[float, list[tuple[float, list[float]]]]


def iso_series(groups: list[Group], rows: dict[Path, dict[str, Any]]) -> list[IsoSeries]:
    """Budgeted groups gathered per variant (and its non-size settings) across sizes and budgets."""
    series: dict[tuple, IsoSeries] = {}
    drop = (*SIZE_KEYS, BUDGET_KEY)
    for g in groups:
        if g.budget is None:
            continue
        own = tuple((k, v) for k, v in g.settings if k not in drop)
        cond = tuple((k, v) for k, v in g.condition if k not in drop)
        label = f"{g.variant} ({settings_label(own)})" if own else g.variant
        s = series.setdefault((g.variant, own), IsoSeries(g.variant, label, cond, {}))
        values = list(seed_values(g, rows, "val_loss").values())
        active = [r.summary.get("params", {}).get("active_per_token") for r in g.runs]
        if values and all(active):
            s.cells.setdefault(g.budget, []).append((float(np.mean(active)), values))
    return [s for s in series.values() if s.cells]


def _parabola(cells: list[tuple[float, list[float]]]) -> Parabola | None:
    if len({n for n, _ in cells}) < 3:
        return None
    return fit_parabola([n for n, v in cells for _ in v], [y for _, v in cells for y in v])


def _optima(fits: dict[float, Parabola | None]) -> tuple[list[float], list[float]]:
    pairs = [(c, p.loss_opt) for c, p in sorted(fits.items()) if p is not None and p.convex]
    return [c for c, _ in pairs], [y for _, y in pairs]


def _compare(fits_s: dict, fits_r: dict) -> tuple[float | None, float | None]:
    """(compute saving at equal loss against the reference frontier, mean loss difference at equal budgets)."""
    cs, ys = _optima(fits_s)
    cr, yr = _optima(fits_r)
    saving = None
    if cs and len(set(cr)) >= 2:
        saving = compute_saving(fit_frontier(cr, yr), cs, ys)
    common = sorted(set(cs) & set(cr))
    delta = float(np.mean([ys[cs.index(c)] - yr[cr.index(c)] for c in common])) if common else None
    return saving, delta


def _uncertainty(s: IsoSeries, r: IsoSeries, fits: dict[str, dict]) -> tuple[str, Callable | None]:
    """How to resample: over seeds when every size has >= 3 seeds, else from the parabolas' covariance
    (which needs more runs than parameters: >= 4 runs per budget)."""
    cells = [c for x in (s, r) for cs in x.cells.values() for c in cs]
    if all(len(v) >= stats.MIN_BOOTSTRAP_N for _, v in cells):

        def draw(rng):
            return [{b: _parabola([(n, list(stats.resample(v, rng))) for n, v in cs]) for b, cs in x.cells.items()}
                    for x in (s, r)]  # fmt: skip

        return "bootstrap over seeds", draw
    parabolas = [p for x in (s, r) for p in fits[x.label].values() if p is not None]
    if parabolas and all(p.cov is not None and np.all(np.isfinite(p.cov)) for p in parabolas):

        def draw(rng):
            return [{b: perturbed(p, rng) if p is not None else None for b, p in fits[x.label].items()}
                    for x in (s, r)]  # fmt: skip

        return "parabola covariance (parametric bootstrap)", draw
    return f"none: needs >= {stats.MIN_BOOTSTRAP_N} seeds per size, or >= 4 runs per budget", None


def analyse(groups: list[Group], rows: dict[Path, dict[str, Any]]) -> dict[str, Any] | None:
    """Per budget and variant, a parabola of loss in log10(active params); each variant's frontier through the
    optima; the compute saving at equal loss and the loss difference at equal compute against `baseline` and
    `moe`, with bootstrap intervals."""
    series = iso_series(groups, rows)
    if not series:
        return None
    fits = {s.label: {b: _parabola(cs) for b, cs in sorted(s.cells.items())} for s in series}
    optima, frontiers, savings = [], [], []
    for s in series:
        for b, cs in sorted(s.cells.items()):
            p = fits[s.label][b]
            note = p.note if p is not None else f"{len({n for n, _ in cs})} size(s): a parabola needs 3"
            optima.append({"series": s.label, "variant": s.variant, "budget": b, "sizes": len({n for n, _ in cs}),
                           "runs": sum(len(v) for _, v in cs), "n_opt": p.n_opt if p is not None else None,
                           "loss_opt": p.loss_opt if p is not None else None, "note": note})  # fmt: skip
        cs, ys = _optima(fits[s.label])
        if len(set(cs)) >= 2:
            fr = fit_frontier(cs, ys)
            frontiers.append({"series": s.label, "budgets": len(cs), "slope_per_decade": fr.slope,
                              "intercept": fr.intercept, "r2": fr.r2})  # fmt: skip
    for s in series:
        for r in series:
            if s.variant == BASELINE or r.variant not in REFERENCES or r.variant == s.variant:
                continue
            if r.condition != s.condition:
                continue
            saving, delta = _compare(fits[s.label], fits[r.label])
            rec = {"series": s.label, "vs": r.label, "saving": saving, "loss_delta": delta,
                   "budgets": len(_optima(fits[s.label])[0]), "saving_low": None, "saving_high": None,
                   "delta_low": None, "delta_high": None, "note": None}  # fmt: skip
            if saving is None and len(set(_optima(fits[r.label])[0])) < 2:
                rec["note"] = "the reference needs optima at >= 2 budgets for a frontier"
            method, draw = _uncertainty(s, r, fits)
            rec["interval"] = method
            notes = [rec["note"]]
            for i, (prefix, name, estimate) in enumerate((("saving", "saving", saving), ("delta", "ΔL*", delta))):
                if draw is None or estimate is None:
                    continue
                boot = stats.bootstrap(lambda rng, i=i: _compare(*draw(rng))[i], n_boot=stats.N_BOOT,
                                       undefined_as="no convex optimum or frontier")  # fmt: skip
                rec[f"{prefix}_low"], rec[f"{prefix}_high"] = boot.low, boot.high
                notes.append(f"{name}: {boot.note}" if boot.note else None)
            ref_losses, losses = _optima(fits[r.label])[1], _optima(fits[s.label])[1]
            if saving is not None and any(y < min(ref_losses) or y > max(ref_losses) for y in losses):
                notes.append("extrapolates the reference frontier")
            rec["note"] = "; ".join(dict.fromkeys(n for n in notes if n)) or None
            savings.append(rec)
    return {"series": series, "fits": fits, "optima": optima, "frontiers": frontiers, "savings": savings}


def markdown(iso: dict[str, Any]) -> str:
    """Optima per budget, frontier fits, and the compute saving / loss difference tables."""
    out = ["## Iso-FLOP", "",
           "Per budget C, loss is fitted as a parabola in log10 N (N = active parameters per token); "
           "N*, L* are its minimum. Frontier: L* = a + b·log10 C through the optima. Saving = 1 − C / C_ref(L*), "
           "C_ref inverting the reference frontier, averaged in log over the budgets; ΔL* compares optima at equal "
           "budgets (negative = better).", "",
           *md_head("series", "budget C", "sizes", "runs", "N* (active)", "L*", "note")]  # fmt: skip
    for o in iso["optima"]:
        out.append(f"| {o['series']} | {o['budget']:.3g} | {o['sizes']} | {o['runs']} | {si(o['n_opt'])} | "
                   f"{fixed(o['loss_opt'], 4)} | {o['note'] or ''} |")  # fmt: skip
    if iso["frontiers"]:
        out += ["", *md_head("series", "budgets", "frontier slope per decade of C", "R²")]
        for f in iso["frontiers"]:
            out.append(f"| {f['series']} | {f['budgets']} | {f['slope_per_decade']:+.4f} | {fixed(f['r2'], 3)} |")
    if iso["savings"]:
        out += ["", *md_head("series", "vs", "compute saving at equal loss [95% CI]",
                              "ΔL* at equal compute [95% CI]", "interval", "note")]  # fmt: skip
        for s in iso["savings"]:
            saving = "n/a" if s["saving"] is None else interval_cell(
                100 * s["saving"], _scaled(s["saving_low"]), _scaled(s["saving_high"]), "+.1f", unit="%")
            delta = "n/a"
            if s["loss_delta"] is not None:
                delta = interval_cell(s["loss_delta"], s["delta_low"], s["delta_high"], "+.4f")
            out.append(f"| {s['series']} | {s['vs']} | {saving} | {delta} | {s['interval']} | {s['note'] or ''} |")
    return "\n".join(out) + "\n"


def _scaled(x: float | None, k: float = 100.0) -> float | None:
    return None if x is None else k * x


def plot(iso: dict[str, Any], out_dir: Path) -> list[Path]:
    """isoflop.png (loss vs active params per budget, parabolas and optima) and isoflop_frontier.png."""
    plt = plots.pyplot()
    budgets = sorted({b for s in iso["series"] for b in s.cells})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.2), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for j, s in enumerate(iso["series"]):
            cs = s.cells.get(b)
            if not cs:
                continue
            color = f"C{j % 10}"
            n = np.array([c[0] for c in cs])
            mean = np.array([np.mean(c[1]) for c in cs])
            err = np.array([np.std(c[1], ddof=1) if len(c[1]) > 1 else 0.0 for c in cs])
            ax.errorbar(n, mean, yerr=err, fmt="o", color=color, label=s.label, capsize=2)
            p = iso["fits"][s.label].get(b)
            if p is not None:
                grid = np.logspace(p.u_range[0] - 0.1, p.u_range[1] + 0.1, 100)
                ax.plot(grid, p.predict(grid), color=color, linewidth=1)
                if p.convex:
                    ax.plot([p.n_opt], [p.loss_opt], marker="*", markersize=12, color=color)
        plots.log_x(ax)
        ax.set_xlabel("active parameters per token")
        ax.set_ylabel("validation loss")
        ax.set_title(f"C = {b:.3g} FLOPs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    written = [plots.save_figure(fig, out_dir / "isoflop.png")]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, s in enumerate(iso["series"]):
        cs, ys = _optima(iso["fits"][s.label])
        if not cs:
            continue
        color = f"C{j % 10}"
        ax.plot(cs, ys, "o", color=color, label=s.label)
        if len(set(cs)) >= 2:
            fr = fit_frontier(cs, ys)
            grid = np.logspace(np.log10(min(budgets)) - 0.1, np.log10(max(budgets)) + 0.1, 50)
            ax.plot(grid, fr.predict(grid), color=color, linewidth=1)
    plots.log_x(ax)
    ax.set_xlabel("training FLOPs (budget)")
    ax.set_ylabel("optimal validation loss L*")
    ax.set_title("iso-FLOP frontier")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    written.append(plots.save_figure(fig, out_dir / "isoflop_frontier.png"))
    plt.close(fig)
    return written


def section(ctx: Context) -> Section:
    """Runs with a train_flops budget: isoflop_optima.csv, isoflop_savings.csv, the Markdown and the plots."""
    iso = analyse(ctx.groups, ctx.rows)
    if iso is None:
        return Section("isoflop", None)
    tables = {"isoflop_optima": ("isoflop_optima.csv", iso["optima"])}
    if iso["savings"]:
        tables["isoflop_savings"] = ("isoflop_savings.csv", iso["savings"])
    result = {k: iso[k] for k in ("optima", "frontiers", "savings")}
    return Section("isoflop", result, markdown(iso), tables, plot(iso, ctx.out_dir))
