"""The research report over finished runs: the per-run table, then every analysis the runs allow.

    python run.py stage=report runs='runs/multirun_*' report_dir=reports/latest
    python -m eval.report 'runs/multirun_*' --out reports/latest

A glob may match run folders, `summary.json` files, or folders holding runs (Hydra multirun folders with
numbered subfolders). The per-run table compares each run with the `baseline` run of the same sweep
folder and seed (else the mean of its baseline runs). The analyses group runs by variant and settings
(seeds pooled, wherever they lie) and compare each group with the `baseline` and `moe` groups under the
same shared settings:

- overfitting (eval/overfitting.py): epochs read, train/val gap, best validation loss and its step, warnings;
- seeds: mean ± std, every seed's value, delta with Welch's 95% interval, 'within noise' when it holds 0;
- learning curves (metrics.csv): tokens / FLOPs to reach the reference's final loss or facts recall;
- iso-FLOP (runs with `train_flops=`): parabola per budget, frontier, compute saving at equal loss;
- token-indexed scaling (JTok-M at several pool sizes): slope per doubling and the N_eff fit;
- knowledge capacity (facts corpora of several sizes, eval/capacity.py): recall and stored bits vs facts.

Statistics and fits live in eval/analysis.py.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval import analysis, capacity, overfitting
from project.io import atomic_write_json, atomic_write_text

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


def _metrics_records(run: Run) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv (Lightning CSVLogger), [] without one."""
    path = run.path / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


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
    records = _metrics_records(run)
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
    plt = _pyplot()
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


# ---------------------------------------------------------------- run settings and groups of seeds

BUDGET_KEY = "train_flops_budget"
SIZE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_hidden",
             "model.expert_hidden")  # fmt: skip
IGNORED_KEYS = ("data.seed", "data.cache_dir", "data.num_workers", "data.val_batch_size")
# settings that only matter to some variants: (key prefix, predicate on (ffn kind, modulator))
VARIANT_SPECIFIC: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("model.jtokm_", lambda ffn, mod: mod == "jtok_m"),
    ("model.jtok_", lambda ffn, mod: mod == "jtok"),
    ("model.table_init_std", lambda ffn, mod: mod != "none"),
    ("optim.table_", lambda ffn, mod: mod != "none"),
    ("optim.scale_lr_mult", lambda ffn, mod: mod != "none"),
    ("model.n_shared_experts", lambda ffn, mod: ffn == "moe"),
    ("model.n_routed_experts", lambda ffn, mod: ffn == "moe"),
    ("model.moe_", lambda ffn, mod: ffn == "moe"),
    ("model.expert_hidden", lambda ffn, mod: ffn == "moe"),
    ("model.router_score", lambda ffn, mod: ffn == "moe"),
)
N_BOOT = 1000

Setting = tuple[tuple[str, Any], ...]


def variant_kind(variant: str) -> tuple[str, str]:
    """(FFN kind, modulator) of a variant name; unknown names count as a dense backbone without modulator."""
    from project.config import VARIANTS

    return VARIANTS.get(variant, ("dense", "none"))


def is_shared(key: str) -> bool:
    """Whether a setting matters to every variant (so a reference run must match it)."""
    return not any(key.startswith(prefix) for prefix, _ in VARIANT_SPECIFIC)


def relevant(key: str, variant: str) -> bool:
    """Whether a setting can change a run of this variant (JTok-M's pool size cannot change a baseline)."""
    ffn, mod = variant_kind(variant)
    return all(pred(ffn, mod) for prefix, pred in VARIANT_SPECIFIC if key.startswith(prefix))


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: _hashable(value)})
    return out


def run_settings(run: Run) -> dict[str, Any]:
    """Everything that defines a run except its seed: the model settings and FLOP budget from summary.json,
    and the data / optimizer / step settings from the run's config.yaml when it has one."""
    import yaml

    s = run.summary
    out = {f"model.{k}": _hashable(v) for k, v in (s.get("model") or {}).items() if k != "variant"}
    out[BUDGET_KEY] = s.get(BUDGET_KEY)
    config = run.path / "config.yaml"
    if config.is_file():
        cfg = yaml.safe_load(config.read_text()) or {}
        for section in ("data", "optim"):
            out.update(_flatten(cfg.get(section) or {}, section))
        trainer = cfg.get("trainer") or {}
        if out[BUDGET_KEY] is None:  # with a budget the steps follow from it (and differ by variant)
            out["trainer.max_steps"] = trainer.get("max_steps")
        out["trainer.accumulate_grad_batches"] = trainer.get("accumulate_grad_batches", 1)
    return {k: v for k, v in out.items() if k not in IGNORED_KEYS}


def _sort_value(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _fmt_setting(key: str, value: Any) -> str:
    name = "C" if key == BUDGET_KEY else key.removeprefix("model.")
    if isinstance(value, float):
        value = f"{value:.3g}"
    return f"{name}={value}"


def settings_label(settings: Setting) -> str:
    """'d_model=64, C=1e+13' for a settings tuple."""
    return ", ".join(_fmt_setting(k, v) for k, v in settings)


@dataclass
class Group:
    """The runs (seeds) of one variant with identical settings; `condition` is what a reference must match."""

    variant: str
    settings: Setting  # the settings relevant to this variant that vary across the report
    condition: Setting  # the shared ones among them
    runs: list[Run]

    @property
    def label(self) -> str:
        return f"{self.variant} ({settings_label(self.settings)})" if self.settings else self.variant

    @property
    def budget(self) -> float | None:
        budgets = {r.summary.get(BUDGET_KEY) for r in self.runs}
        return float(budgets.pop()) if len(budgets) == 1 and None not in budgets else None


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by variant and the settings (other than the seed) that vary across the report."""
    settings = {r.path: run_settings(r) for r in runs}
    keys = sorted(set().union(*settings.values()))

    def variant(r: Run) -> str:
        return r.summary.get("variant") or "?"

    varying = [k for k in keys if len({settings[r.path].get(k) for r in runs if relevant(k, variant(r))}) > 1]
    groups: dict[tuple, Group] = {}
    for r in runs:
        own = tuple((k, settings[r.path].get(k)) for k in varying if relevant(k, variant(r)))
        cond = tuple((k, v) for k, v in own if is_shared(k))
        groups.setdefault((variant(r), own), Group(variant(r), own, cond, [])).runs.append(r)

    def order(g: Group) -> tuple:
        rank = VARIANT_ORDER.index(g.variant) if g.variant in VARIANT_ORDER else len(VARIANT_ORDER)
        cond, own = [(k, _sort_value(v)) for k, v in g.condition], [(k, _sort_value(v)) for k, v in g.settings]
        return cond, rank, g.variant, own

    return sorted(groups.values(), key=order)


REFERENCES = (BASELINE, "moe")  # every other variant is compared with each of these that the report has


def references(group: Group, groups: list[Group]) -> list[Group]:
    """The groups this one is compared with, under the same shared settings: `baseline` and `moe` (so `moe`
    against `baseline`, the others against both; `baseline` against nothing)."""
    if group.variant == BASELINE:
        return []
    return [
        g for g in groups if g.variant in REFERENCES and g.variant != group.variant and g.condition == group.condition
    ]


def seed_values(group: Group, rows: dict[Path, dict[str, Any]], metric: str) -> dict[int, float]:
    """seed -> the metric (the mean if several runs share a seed), for runs that have it."""
    by_seed: dict[int, list[float]] = {}
    for r in group.runs:
        value = rows[r.path].get(metric)
        if value is not None and math.isfinite(value):
            by_seed.setdefault(r.summary.get("seed") or 0, []).append(float(value))
    return {seed: sum(v) / len(v) for seed, v in sorted(by_seed.items())}


# ---------------------------------------------------------------- seeds: mean, std, deltas with Welch intervals


def metrics_of(benchmarks: list[str]) -> list[tuple[str, bool]]:
    """(row column, lower is better): validation loss, then each benchmark's accuracy."""
    return [("val_loss", True)] + [(f"{b}_acc", False) for b in benchmarks]


def seed_records(groups: list[Group], rows: dict[Path, dict[str, Any]], benchmarks: list[str]) -> list[dict[str, Any]]:
    """One record per (metric, group, reference): the group's seed summary and its delta against the reference
    with Welch's 95% interval and a verdict ('within noise' when the interval contains 0)."""
    records = []
    for metric, lower in metrics_of(benchmarks):
        for g in groups:
            values = seed_values(g, rows, metric)
            if not values:
                continue
            summ = analysis.summarize(list(values.values()))
            base = {
                "metric": metric, "group": g.label, "variant": g.variant, "condition": settings_label(g.condition),
                "n": summ.n, "seeds": list(values), "values": list(values.values()), "mean": summ.mean, "std": summ.std,
                "vs": None, "delta": None, "ci_low": None, "ci_high": None, "p_value": None, "verdict": None,
                "lower_is_better": lower,
            }  # fmt: skip
            refs = [(ref, seed_values(ref, rows, metric)) for ref in references(g, groups)]
            refs = [(ref, v) for ref, v in refs if v]
            if not refs:
                records.append(base)
            for ref, ref_values in refs:
                iv = analysis.welch_delta(list(values.values()), list(ref_values.values()))
                records.append({**base, "vs": ref.label, "delta": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                                "p_value": iv.p_value, "verdict": analysis.verdict(iv, lower)})  # fmt: skip
    return records


def _md_head(*cols: str) -> list[str]:
    """A Markdown table's header and separator lines."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _interval_cell(estimate: float | None, low: float | None, high: float | None, fmt: str,
                   note: str | None = None, unit: str = "") -> str:  # fmt: skip
    """'+0.0123 [-0.0100, +0.0346]' (or the estimate and the note when there is no interval)."""
    if estimate is None:
        return ""
    cell = format(estimate, fmt) + unit
    if low is not None and high is not None:
        return f"{cell} [{format(low, fmt)}{unit}, {format(high, fmt)}{unit}]"
    return f"{cell} ({note})" if note else cell


def seeds_markdown(records: list[dict[str, Any]]) -> str:
    """Per metric: each group's mean ± std over seeds, every seed's value, the delta vs its reference."""
    out = ["## Seeds: mean ± std, deltas with Welch 95% intervals", "",
           "Δ = group mean − reference mean. 'within noise': the interval contains 0; "
           "n=1 groups get no interval.", ""]  # fmt: skip
    for metric in dict.fromkeys(r["metric"] for r in records):
        recs = [r for r in records if r["metric"] == metric]
        lower = recs[0]["lower_is_better"]
        digits = 4 if metric == "val_loss" else 3
        out += [f"### {metric} ({'lower' if lower else 'higher'} is better)", "",
                *_md_head("group", "n", "mean ± std", "per seed", "vs", "Δ [95% CI]", "p", "verdict")]
        for r in recs:
            mean = f"{r['mean']:.{digits}f}" + (f" ± {r['std']:.{digits}f}" if r["std"] is not None else " (n=1)")
            seeds = ", ".join(f"s{s}: {v:.{digits}f}" for s, v in zip(r["seeds"], r["values"]))
            delta = _interval_cell(r["delta"], r["ci_low"], r["ci_high"], f"+.{digits}f")
            p = f"{r['p_value']:.3g}" if r["p_value"] is not None else ""
            out.append(f"| {r['group']} | {r['n']} | {mean} | {seeds} | {r['vs'] or ''} | {delta} | {p} | "
                       f"{r['verdict'] or ('reference' if r['variant'] == BASELINE else '')} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- learning curves


CURVE_METRICS = {  # name -> (metrics.csv column, lower is better)
    "val_loss": ("val/loss", True),
    "train_loss": ("train/loss", True),
    "facts_qa_heldout": ("probe/facts_qa_heldout", False),
    "facts_qa_train": ("probe/facts_qa_train", False),
}
AXES = {"tokens": "training tokens", "flops": "training FLOPs"}


def learning_curve(run: Run) -> dict[str, np.ndarray] | None:
    """step, tokens, flops and every CURVE_METRICS column at each validation (NaN where not logged)."""
    records = _metrics_records(run)
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


def _saving_from(var: list, ref: list, decreasing: bool) -> tuple[float | None, analysis.Crossing | None, float | None]:
    vc, rc = analysis.mean_curve(var), analysis.mean_curve(ref)
    if vc is None or rc is None:
        return None, None, None
    target = float(rc.mean[-1])
    saving, cross = analysis.crossing_saving(vc.x, vc.mean, float(rc.x[-1]), target, decreasing)
    return saving, cross, target


def curve_records(groups: list[Group], curves: dict[Path, Any]) -> list[dict[str, Any]]:
    """For each group vs its reference: where the group's mean curve first reaches the reference's final
    value (val loss, facts_qa held-out), and the tokens / FLOPs saved, 1 - x / x_ref_final, with a bootstrap
    interval over seeds (both sides resampled) when both have >= MIN_BOOTSTRAP_N seeds."""
    records = []
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
                    final = float(analysis.mean_curve(var).mean[-1])
                    rec.update(n=len(var), n_ref=len(base), target=target, final=final)
                    rec[f"{axis}_reached"] = cross.x
                    rec[f"{axis}_at_first_point"] = cross.at_first_point
                    rec[f"{axis}_saving"] = saving
                    rec[f"{axis}_low"] = rec[f"{axis}_high"] = None
                    if min(len(var), len(base)) < analysis.MIN_BOOTSTRAP_N:
                        rec[f"{axis}_note"] = f"n={min(len(var), len(base))}: no interval"
                        continue

                    def replicate(rng: np.random.Generator, var=var, base=base, decreasing=decreasing) -> float | None:
                        pick_v = [var[i] for i in rng.integers(0, len(var), len(var))]
                        pick_b = [base[i] for i in rng.integers(0, len(base), len(base))]
                        return _saving_from(pick_v, pick_b, decreasing)[0]

                    boot = analysis.bootstrap(replicate, n_boot=N_BOOT, undefined_as="not reached")
                    rec[f"{axis}_low"], rec[f"{axis}_high"], rec[f"{axis}_note"] = boot.low, boot.high, boot.note
                if "target" in rec:
                    records.append(rec)
    return records


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


def curves_markdown(records: list[dict[str, Any]], skipped_budget: int) -> str:
    """The 'reaches the reference's final value with X% fewer tokens / FLOPs' table."""
    out = ["## Learning curves: tokens and FLOPs to reach the reference's final value", "",
           "Saving = 1 − x / x_ref, where x is where the group's seed-mean curve first reaches the reference's final "
           "seed-mean value (interpolated in log x) and x_ref the reference's final x; positive = fewer. "
           "'≥': already reached at the first validation. Intervals: bootstrap over seeds, both sides resampled "
           f"(percentile, 95%; needs >= {analysis.MIN_BOOTSTRAP_N} seeds per side, optimistic with few seeds).",
           ""]  # fmt: skip
    if records:
        out += _md_head("group", "vs", "metric", "n", "ref final", "group final", "tokens saved", "FLOPs saved")
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


def plot_learning_curves(groups: list[Group], curves: dict[Path, Any], out_dir: Path) -> list[Path]:
    """Seed-mean learning curves with ± std bands (n >= 2), one figure set per shared condition:
    curves_val_loss*.png (validation and, dashed, train loss vs tokens and FLOPs) and curves_facts_qa*.png (held-out and trained paraphrases,
    vs tokens and FLOPs)."""
    plt = _pyplot()
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
                        c = analysis.mean_curve(seed_curves(g, curves, metric, axis))
                        if c is None:
                            continue
                        val_top = max(val_top, float(np.max(c.mean + (c.std if c.std is not None else 0.0))))
                        color = f"C{j % 10}"
                        ax.plot(c.x, c.mean, color=color, marker="o", markersize=3, label=f"{g.label} (n={c.n})")
                        if c.std is not None:
                            ax.fill_between(c.x, c.mean - c.std, c.mean + c.std, color=color, alpha=0.2, linewidth=0)
                        train = analysis.mean_curve(seed_curves(g, curves, "train_loss", axis))
                        if metric == "val_loss" and train is not None:  # beside val: a widening gap is overfitting
                            ax.plot(train.x, train.mean, color=color, linestyle="--", linewidth=1, alpha=0.8)
                    if metric == "val_loss" and np.isfinite(val_top):
                        ax.set_ylim(top=val_top * 1.05)  # early train losses would squash the validation curves
                    _log_x(ax)
                    ax.set_xlabel(AXES[axis])
                    ax.set_ylabel("loss (solid: val, dashed: train)" if metric == "val_loss" else metric.replace("_", " "))
                    if metric != "val_loss":
                        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)  # chance: four choices
                    ax.grid(True, alpha=0.3)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
            fig.suptitle(f"{name.replace('_', ' ')}: seed mean ± std" + (f" ({title})" if title else ""))
            written.append(_save_figure(fig, out_dir / f"curves_{name}{suffix}.png"))
            plt.close(fig)
    return written


# ---------------------------------------------------------------- iso-FLOP


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


def _parabola(cells: list[tuple[float, list[float]]]) -> analysis.Parabola | None:
    if len({n for n, _ in cells}) < 3:
        return None
    return analysis.fit_parabola([n for n, v in cells for _ in v], [y for _, v in cells for y in v])


def _optima(fits: dict[float, analysis.Parabola | None]) -> tuple[list[float], list[float]]:
    pairs = [(c, p.loss_opt) for c, p in sorted(fits.items()) if p is not None and p.convex]
    return [c for c, _ in pairs], [y for _, y in pairs]


def _compare(fits_s: dict, fits_r: dict) -> tuple[float | None, float | None]:
    """(compute saving at equal loss against the reference frontier, mean loss difference at equal budgets)."""
    cs, ys = _optima(fits_s)
    cr, yr = _optima(fits_r)
    saving = None
    if cs and len(set(cr)) >= 2:
        saving = analysis.compute_saving(analysis.fit_frontier(cr, yr), cs, ys)
    common = sorted(set(cs) & set(cr))
    delta = float(np.mean([ys[cs.index(c)] - yr[cr.index(c)] for c in common])) if common else None
    return saving, delta


def _uncertainty(s: IsoSeries, r: IsoSeries, fits: dict[str, dict]) -> tuple[str, Callable | None]:
    """How to resample: over seeds when every size has >= 3 seeds, else from the parabolas' covariance
    (which needs more runs than parameters: >= 4 runs per budget)."""
    cells = [c for x in (s, r) for cs in x.cells.values() for c in cs]
    if all(len(v) >= analysis.MIN_BOOTSTRAP_N for _, v in cells):

        def draw(rng):
            return [{b: _parabola([(n, list(analysis.resample(v, rng))) for n, v in cs]) for b, cs in x.cells.items()}
                    for x in (s, r)]  # fmt: skip

        return "bootstrap over seeds", draw
    parabolas = [p for x in (s, r) for p in fits[x.label].values() if p is not None]
    if parabolas and all(p.cov is not None and np.all(np.isfinite(p.cov)) for p in parabolas):

        def draw(rng):
            return [{b: analysis.perturbed(p, rng) if p is not None else None for b, p in fits[x.label].items()}
                    for x in (s, r)]  # fmt: skip

        return "parabola covariance (parametric bootstrap)", draw
    return f"none: needs >= {analysis.MIN_BOOTSTRAP_N} seeds per size, or >= 4 runs per budget", None


def isoflop_analysis(groups: list[Group], rows: dict[Path, dict[str, Any]]) -> dict[str, Any] | None:
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
            fr = analysis.fit_frontier(cs, ys)
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
                boot = analysis.bootstrap(lambda rng, i=i: _compare(*draw(rng))[i], n_boot=N_BOOT,
                                          undefined_as="no convex optimum or frontier")  # fmt: skip
                rec[f"{prefix}_low"], rec[f"{prefix}_high"] = boot.low, boot.high
                notes.append(f"{name}: {boot.note}" if boot.note else None)
            ref_losses, losses = _optima(fits[r.label])[1], _optima(fits[s.label])[1]
            if saving is not None and any(y < min(ref_losses) or y > max(ref_losses) for y in losses):
                notes.append("extrapolates the reference frontier")
            rec["note"] = "; ".join(dict.fromkeys(n for n in notes if n)) or None
            savings.append(rec)
    return {"series": series, "fits": fits, "optima": optima, "frontiers": frontiers, "savings": savings}


def isoflop_markdown(iso: dict[str, Any]) -> str:
    """Optima per budget, frontier fits, and the compute saving / loss difference tables."""
    out = ["## Iso-FLOP", "",
           "Per budget C, loss is fitted as a parabola in log10 N (N = active parameters per token); "
           "N*, L* are its minimum. Frontier: L* = a + b·log10 C through the optima. Saving = 1 − C / C_ref(L*), "
           "C_ref inverting the reference frontier, averaged in log over the budgets; ΔL* compares optima at equal "
           "budgets (negative = better).", "",
           *_md_head("series", "budget C", "sizes", "runs", "N* (active)", "L*", "note")]  # fmt: skip
    for o in iso["optima"]:
        out.append(f"| {o['series']} | {o['budget']:.3g} | {o['sizes']} | {o['runs']} | {_si(o['n_opt'])} | "
                   f"{_fixed(o['loss_opt'], 4)} | {o['note'] or ''} |")  # fmt: skip
    if iso["frontiers"]:
        out += ["", *_md_head("series", "budgets", "frontier slope per decade of C", "R²")]
        for f in iso["frontiers"]:
            out.append(f"| {f['series']} | {f['budgets']} | {f['slope_per_decade']:+.4f} | {_fixed(f['r2'], 3)} |")
    if iso["savings"]:
        out += ["", *_md_head("series", "vs", "compute saving at equal loss [95% CI]",
                              "ΔL* at equal compute [95% CI]", "interval", "note")]  # fmt: skip
        for s in iso["savings"]:
            saving = "n/a" if s["saving"] is None else _interval_cell(
                100 * s["saving"], _scaled(s["saving_low"]), _scaled(s["saving_high"]), "+.1f", unit="%")
            delta = "n/a"
            if s["loss_delta"] is not None:
                delta = _interval_cell(s["loss_delta"], s["delta_low"], s["delta_high"], "+.4f")
            out.append(f"| {s['series']} | {s['vs']} | {saving} | {delta} | {s['interval']} | {s['note'] or ''} |")
    return "\n".join(out) + "\n"


def _scaled(x: float | None, k: float = 100.0) -> float | None:
    return None if x is None else k * x


def plot_isoflop(iso: dict[str, Any], out_dir: Path) -> list[Path]:
    """isoflop.png (loss vs active params per budget, parabolas and optima) and isoflop_frontier.png."""
    plt = _pyplot()
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
        _log_x(ax)
        ax.set_xlabel("active parameters per token")
        ax.set_ylabel("validation loss")
        ax.set_title(f"C = {b:.3g} FLOPs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    written = [_save_figure(fig, out_dir / "isoflop.png")]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, s in enumerate(iso["series"]):
        cs, ys = _optima(iso["fits"][s.label])
        if not cs:
            continue
        color = f"C{j % 10}"
        ax.plot(cs, ys, "o", color=color, label=s.label)
        if len(set(cs)) >= 2:
            fr = analysis.fit_frontier(cs, ys)
            grid = np.logspace(np.log10(min(budgets)) - 0.1, np.log10(max(budgets)) + 0.1, 50)
            ax.plot(grid, fr.predict(grid), color=color, linewidth=1)
    _log_x(ax)
    ax.set_xlabel("training FLOPs (budget)")
    ax.set_ylabel("optimal validation loss L*")
    ax.set_title("iso-FLOP frontier")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    written.append(_save_figure(fig, out_dir / "isoflop_frontier.png"))
    plt.close(fig)
    return written


# ---------------------------------------------------------------- scaling in token-indexed parameters


def _scaling_points(group: Group, rows: dict[Path, dict[str, Any]]) -> list[dict[str, float]]:
    """One point per seed: token-indexed and backbone params, n_e, K and the validation loss."""
    model = group.runs[0].summary.get("model") or {}
    params = group.runs[0].summary.get("params") or {}
    return [{"n_ti": float(params.get("token_indexed") or 0), "n_b": float(params.get("backbone") or 0),
             "n_e": model.get("jtokm_tables"), "k": model.get("jtokm_top_k"), "loss": v, "group": group.label}
            for v in seed_values(group, rows, "val_loss").values()]  # fmt: skip


def scaling_analysis(groups: list[Group], rows: dict[Path, dict[str, Any]]) -> list[dict[str, Any]]:
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
                fit = analysis.fit_loglinear([p["n_ti"] for p in pts], [p["loss"] for p in pts])
                slopes.append({"rho": rho, "tables": tables, "runs": len(pts), "fit": fit, "note": fit.slope_ci.note})
            refs = [p for g in groups if g.condition == cond and g.variant == ref for p in _scaling_points(g, rows)]
            eta = [0.0] * len(refs) + [p["n_ti"] / p["n_b"] for p in points]
            rho = [1.0] * len(refs) + [p["k"] / p["n_e"] for p in points]
            loss = [p["loss"] for p in refs] + [p["loss"] for p in points]
            neff = analysis.fit_neff(eta, rho, loss)
            out.append({"condition": settings_label(cond), "variant": variant, "reference": ref, "n_ref": len(refs),
                        "points": points, "ref_points": refs, "slopes": slopes, "neff": neff})  # fmt: skip
    return out


def scaling_markdown(scaling: list[dict[str, Any]]) -> str:
    """Slopes per doubling of token-indexed parameters and the N_eff fit."""
    out = ["## Scaling in token-indexed parameters (fixed backbone)", "",
           "Loss = a + b·log2(N_token-indexed) per rho = K/n_e over seed-level points; b is the change in loss per "
           "doubling (t interval, 95%). N_eff fit: L = L_c + s·log2(1 + eta·gamma(rho)), eta = N_token-indexed / "
           "N_backbone, over the same points plus the backbone-only reference (eta = 0); s is the loss change per "
           "doubling of effective parameters; intervals from the fit covariance (t, 95%).", ""]  # fmt: skip
    for sc in scaling:
        head = f"### {sc['variant']}" + (f" ({sc['condition']})" if sc["condition"] else "")
        out += [head, "", *_md_head("rho = K/n_e", "(n_e, K)", "runs", "slope per doubling [95% CI]", "R²", "note")]
        for s in sc["slopes"]:
            fit = s["fit"]
            slope = "" if fit is None else _interval_cell(fit.slope, fit.slope_ci.low, fit.slope_ci.high, "+.4f")
            tables = ", ".join(f"({n}, {k})" for n, k in s["tables"])
            out.append(f"| {s['rho']:.3g} | {tables} | {s['runs']} | {slope} | {_fixed(fit.r2 if fit else None, 3)} | "
                       f"{s['note'] or ''} |")  # fmt: skip
        neff = sc["neff"]
        verdict = "" if neff.identified else " — NOT IDENTIFIED"
        out += ["", f"N_eff fit, {neff.form}; {neff.n} points ({sc['n_ref']} {sc['reference']}), "
                f"{neff.dof} degrees of freedom, rmse {neff.rmse:.4f}{verdict}.", ""]  # fmt: skip
        if neff.params:
            out += _md_head("parameter", "estimate", "95% CI")
            for name, iv in neff.params.items():
                ci = f"[{iv.low:.4g}, {iv.high:.4g}]" if iv.ok else "no interval"
                out.append(f"| {name} | {iv.estimate:.4g} | {ci} |")
        if neff.note:
            out += ["", f"Note: {neff.note}."]
        out.append("")
    return "\n".join(out)


def plot_scaling(scaling: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """scaling.png: loss vs token-indexed parameters (one point per seed, fitted lines per rho, the reference's
    mean ± std as a band) and, when identified, loss vs the fitted log2(N_eff / N_c)."""
    plt = _pyplot()
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
            ref = analysis.summarize([p["loss"] for p in sc["ref_points"]])
            ax.axhline(ref.mean, color="black", linestyle="--", linewidth=1, label=f"{sc['reference']} (n={ref.n})")
            if ref.std is not None:
                ax.axhspan(ref.mean - ref.std, ref.mean + ref.std, color="grey", alpha=0.2)
        _log_x(ax, base=2)
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
        written.append(_save_figure(fig, out_dir / f"scaling{f'_{i}' if len(scaling) > 1 else ''}.png"))
        plt.close(fig)
    return written


# ---------------------------------------------------------------- CSV and JSON of the analyses


def _records_csv(records: list[dict[str, Any]]) -> str:
    """Records as CSV (lists joined by ';', None as an empty cell)."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else ("" if v is None else v)
                         for k, v in r.items()})  # fmt: skip
    return out.getvalue()


def _scaling_records(scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable({k: getattr(obj, k) for k in obj.__dataclass_fields__ if not k.startswith("_")})
    return obj


def _log_x(ax: Any, base: float = 10) -> None:
    """Log x axis whose tick labels stay readable when it spans less than a decade."""
    ax.set_xscale("log", base=base)
    ax.tick_params(axis="x", which="both", labelsize=7, labelrotation=30)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- entry points


def build_report(run_globs: list[str] | str, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Collect the runs and write to `out_dir`: report.md (per-run table, then every analysis that applies),
    report.csv (per run), seeds.csv, curves.csv, isoflop_*.csv, scaling.csv, analysis.json and the plots;
    print the Markdown.

    Analyses: seeds (always: per group mean ± std and Welch deltas vs the reference), learning curves (runs with
    validation curves in metrics.csv), iso-FLOP (runs with a train_flops budget), scaling in token-indexed
    parameters (JTok-M runs at >= 2 token-indexed sizes under otherwise equal settings).

    Returns {"runs", "benchmarks", "columns", "rows", "markdown" (the per-run table), "groups", "seeds",
    "curves", "isoflop", "scaling", "analysis_markdown", "files": {"markdown", "csv", "plots", "analysis_plots",
    "tables"}}.
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
    plots = plot_curves(runs, out_dir)

    by_path = {r.path: row for r, row in zip(runs, rows)}
    groups = group_runs(runs)
    sections, tables, figures = [], {}, []
    fit_runs, fit_groups = overfitting.records(groups, _metrics_records)
    sections.append(overfitting.markdown(fit_runs, fit_groups))
    tables["overfitting"] = atomic_write_text(out_dir / "overfitting.csv", _records_csv(fit_runs))
    seeds = seed_records(groups, by_path, benchmarks)
    sections.append(seeds_markdown(seeds))
    tables["seeds"] = atomic_write_text(out_dir / "seeds.csv", _records_csv(seeds))

    curves = {r.path: learning_curve(r) for r in runs}
    curve_recs: list[dict[str, Any]] = []
    if any(c is not None for c in curves.values()):
        curve_recs = curve_records(groups, curves)
        sections.append(curves_markdown(curve_recs, sum(g.budget is not None for g in groups)))
        if curve_recs:
            tables["curves"] = atomic_write_text(out_dir / "curves.csv", _records_csv(curve_recs))
        figures += plot_learning_curves(groups, curves, out_dir)

    iso = isoflop_analysis(groups, by_path)
    if iso is not None:
        sections.append(isoflop_markdown(iso))
        tables["isoflop_optima"] = atomic_write_text(out_dir / "isoflop_optima.csv", _records_csv(iso["optima"]))
        if iso["savings"]:
            tables["isoflop_savings"] = atomic_write_text(out_dir / "isoflop_savings.csv", _records_csv(iso["savings"]))
        figures += plot_isoflop(iso, out_dir)

    scaling = scaling_analysis(groups, by_path)
    if scaling:
        sections.append(scaling_markdown(scaling))
        tables["scaling"] = atomic_write_text(out_dir / "scaling.csv", _records_csv(_scaling_records(scaling)))
        figures += plot_scaling(scaling, out_dir)

    capacity_recs = capacity.records(runs, run_settings, VARIANT_ORDER)
    if capacity_recs:
        sections.append(capacity.markdown(capacity_recs))
        tables["capacity"] = atomic_write_text(out_dir / "capacity.csv", _records_csv(capacity_recs))
        figures += capacity.plot(capacity_recs, out_dir, _pyplot(), _save_figure)

    analysis_md = "\n".join(sections)
    text = f"# Ablation report\n\n{len(runs)} run(s).\n\n{md}\n{analysis_md}"
    md_path = atomic_write_text(out_dir / "report.md", text)
    result = {
        "runs": len(runs),
        "benchmarks": benchmarks,
        "columns": cols,
        "rows": rows,
        "markdown": md,
        "groups": [{"label": g.label, "variant": g.variant, "condition": settings_label(g.condition),
                    "runs": [str(r.path) for r in g.runs]} for g in groups],  # fmt: skip
        "overfitting": {"runs": fit_runs, "groups": fit_groups},
        "seeds": seeds,
        "curves": curve_recs,
        "isoflop": None if iso is None else {k: iso[k] for k in ("optima", "frontiers", "savings")},
        "scaling": [{k: v for k, v in sc.items() if k not in ("points", "ref_points")} for sc in scaling],
        "capacity": capacity_recs,
        "analysis_markdown": analysis_md,
    }
    everything = _jsonable({k: v for k, v in result.items() if k != "rows"})
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
