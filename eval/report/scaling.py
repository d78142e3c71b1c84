"""Scaling in token-indexed parameters: loss per doubling of JTok-M's tables at a fixed backbone, and the
N_eff fit of docs/METHOD.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eval.report import plots, stats
from eval.report.fits import fit_loglinear, fit_neff
from eval.report.fmt import fixed, interval_cell, md_head
from eval.report.groups import Group, seed_values, settings_label
from eval.report.runs import BASELINE
from eval.report.section import Context, Section


def _scaling_points(group: Group, rows: dict[Path, dict[str, Any]]) -> list[dict[str, float]]:
    """One point per seed: token-indexed and backbone params, n_e, K and the validation loss."""
    model = group.runs[0].summary.get("model") or {}
    params = group.runs[0].summary.get("params") or {}
    return [{"n_ti": float(params.get("token_indexed") or 0), "n_b": float(params.get("backbone") or 0),
             "n_e": model.get("jtokm_tables"), "k": model.get("jtokm_top_k"), "loss": v, "group": group.label}
            for v in seed_values(group, rows, "val_loss").values()]  # fmt: skip


def analyse(groups: list[Group], rows: dict[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shared condition with JTok-M runs at >= 2 token-indexed sizes: loss vs log2(token-indexed params) per
    rho = K / n_e (slope per doubling, R², 95% interval), and the N_eff fit including the backbone-only runs."""
    out = []
    for cond in dict.fromkeys(g.condition for g in groups):
        for variant, ref in (("jtok_m", BASELINE), ("moe_jtok_m", "moe")):
            members = [g for g in groups if g.condition == cond and g.variant == variant]
            points = [p for g in members for p in _scaling_points(g, rows)]
            if len({p["n_ti"] for p in points}) < 2 or any(p["n_e"] is None for p in points):
                continue
            slopes = []
            for rho in sorted({p["k"] / p["n_e"] for p in points}):
                pts = [p for p in points if p["k"] / p["n_e"] == rho]
                tables = sorted({(p["n_e"], p["k"]) for p in pts})
                if len({p["n_ti"] for p in pts}) < 2:
                    slopes.append({"rho": rho, "tables": tables, "runs": len(pts), "fit": None,
                                   "note": "one token-indexed size at this rho: no slope"})  # fmt: skip
                    continue
                fit = fit_loglinear([p["n_ti"] for p in pts], [p["loss"] for p in pts])
                slopes.append({"rho": rho, "tables": tables, "runs": len(pts), "fit": fit, "note": fit.slope_ci.note})
            refs = [p for g in groups if g.condition == cond and g.variant == ref for p in _scaling_points(g, rows)]
            eta = [0.0] * len(refs) + [p["n_ti"] / p["n_b"] for p in points]
            rho = [1.0] * len(refs) + [p["k"] / p["n_e"] for p in points]
            loss = [p["loss"] for p in refs] + [p["loss"] for p in points]
            neff = fit_neff(eta, rho, loss)
            out.append({"condition": settings_label(cond), "variant": variant, "reference": ref, "n_ref": len(refs),
                        "points": points, "ref_points": refs, "slopes": slopes, "neff": neff})  # fmt: skip
    return out


def markdown(scaling: list[dict[str, Any]]) -> str:
    """Slopes per doubling of token-indexed parameters and the N_eff fit."""
    out = ["## Scaling in token-indexed parameters (fixed backbone)", "",
           "Loss = a + b·log2(N_token-indexed) per rho = K/n_e over seed-level points; b is the change in loss per "
           "doubling (t interval, 95%). N_eff fit: L = L_c + s·log2(1 + eta·gamma(rho)), eta = N_token-indexed / "
           "N_backbone, over the same points plus the backbone-only reference (eta = 0); s is the loss change per "
           "doubling of effective parameters; intervals from the fit covariance (t, 95%).", ""]  # fmt: skip
    for sc in scaling:
        head = f"### {sc['variant']}" + (f" ({sc['condition']})" if sc["condition"] else "")
        out += [head, "", *md_head("rho = K/n_e", "(n_e, K)", "runs", "slope per doubling [95% CI]", "R²", "note")]
        for s in sc["slopes"]:
            fit = s["fit"]
            slope = "" if fit is None else interval_cell(fit.slope, fit.slope_ci.low, fit.slope_ci.high, "+.4f")
            tables = ", ".join(f"({n}, {k})" for n, k in s["tables"])
            out.append(f"| {s['rho']:.3g} | {tables} | {s['runs']} | {slope} | {fixed(fit.r2 if fit else None, 3)} | "
                       f"{s['note'] or ''} |")  # fmt: skip
        neff = sc["neff"]
        verdict = "" if neff.identified else " — NOT IDENTIFIED"
        out += ["", f"N_eff fit, {neff.form}; {neff.n} points ({sc['n_ref']} {sc['reference']}), "
                f"{neff.dof} degrees of freedom, rmse {neff.rmse:.4f}{verdict}.", ""]  # fmt: skip
        if neff.params:
            out += md_head("parameter", "estimate", "95% CI")
            for name, iv in neff.params.items():
                ci = f"[{iv.low:.4g}, {iv.high:.4g}]" if iv.ok else "no interval"
                out.append(f"| {name} | {iv.estimate:.4g} | {ci} |")
        if neff.note:
            out += ["", f"Note: {neff.note}."]
        out.append("")
    return "\n".join(out)


def plot(scaling: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """scaling.png: loss vs token-indexed parameters (one point per seed, fitted lines per rho, the reference's
    mean ± std as a band) and, when identified, loss vs the fitted log2(N_eff / N_c)."""
    plt = plots.pyplot()
    written = []
    for i, sc in enumerate(scaling):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        ax = axes[0]
        for j, s in enumerate(sc["slopes"]):
            color = f"C{j % 10}"
            pts = [p for p in sc["points"] if p["k"] / p["n_e"] == s["rho"]]
            ax.plot([p["n_ti"] for p in pts], [p["loss"] for p in pts], "o", color=color, label=f"rho={s['rho']:.3g}")
            if s["fit"] is not None:
                grid = np.geomspace(min(p["n_ti"] for p in pts), max(p["n_ti"] for p in pts), 50)
                ax.plot(grid, s["fit"].predict(grid), color=color, linewidth=1,
                        label=f"{s['fit'].slope:+.4f} / doubling")  # fmt: skip
        if sc["ref_points"]:
            ref = stats.summarize([p["loss"] for p in sc["ref_points"]])
            ax.axhline(ref.mean, color="black", linestyle="--", linewidth=1, label=f"{sc['reference']} (n={ref.n})")
            if ref.std is not None:
                ax.axhspan(ref.mean - ref.std, ref.mean + ref.std, color="grey", alpha=0.2)
        plots.log_x(ax, base=2)
        ax.set_xlabel("token-indexed parameters")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{sc['variant']}: loss vs token-indexed parameters")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1]
        neff = sc["neff"]
        if neff.params:
            pts = sc["ref_points"] + sc["points"]
            eta = np.array([0.0] * len(sc["ref_points"]) + [p["n_ti"] / p["n_b"] for p in sc["points"]])
            rho = np.array([1.0] * len(sc["ref_points"]) + [p["k"] / p["n_e"] for p in sc["points"]])
            u = np.log2(1 + eta * neff.gamma(rho))
            ax.plot(u, [p["loss"] for p in pts], "o", color="C0", label="runs")
            grid = np.linspace(0, max(u.max(), 1e-3), 50)
            ax.plot(grid, neff.params["L_c"].estimate + neff.params["s"].estimate * grid, color="C1",
                    label=f"s = {neff.params['s'].estimate:+.4f} per doubling of N_eff")  # fmt: skip
            ax.legend(fontsize=7)
        ax.set_xlabel("log2(N_eff / N_c) = log2(1 + eta·gamma(rho)), fitted gamma")
        ax.set_ylabel("validation loss")
        ax.set_title(neff.form + ("" if neff.identified else " (not identified)"), fontsize=9)
        ax.grid(True, alpha=0.3)
        written.append(plots.save_figure(fig, out_dir / f"scaling{f'_{i}' if len(scaling) > 1 else ''}.png"))
        plt.close(fig)
    return written


def csv_records(scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV record per slope and per N_eff parameter."""
    records = []
    for sc in scaling:
        for s in sc["slopes"]:
            fit = s["fit"]
            records.append({"condition": sc["condition"], "variant": sc["variant"], "kind": "slope_per_doubling",
                            "rho": s["rho"], "name": "slope", "estimate": fit.slope if fit else None,
                            "ci_low": fit.slope_ci.low if fit else None, "ci_high": fit.slope_ci.high if fit else None,
                            "r2": fit.r2 if fit else None, "n": s["runs"], "note": s["note"]})  # fmt: skip
        neff = sc["neff"]
        for name, iv in neff.params.items():
            records.append({"condition": sc["condition"], "variant": sc["variant"], "kind": "neff", "rho": None,
                            "name": name, "estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high, "r2": None,
                            "n": neff.n,
                            "note": f"{neff.form}; identified={neff.identified}; {neff.note or ''}"})  # fmt: skip
    return records


def section(ctx: Context) -> Section:
    """JTok-M runs at >= 2 token-indexed sizes under otherwise equal settings: scaling.csv, the Markdown, the plots."""
    scaling = analyse(ctx.groups, ctx.rows)
    result = [{k: v for k, v in sc.items() if k not in ("points", "ref_points")} for sc in scaling]
    if not scaling:
        return Section("scaling", result)
    tables = {"scaling": ("scaling.csv", csv_records(scaling))}
    return Section("scaling", result, markdown(scaling), tables, plot(scaling, ctx.out_dir))
