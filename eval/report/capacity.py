"""The knowledge-capacity sweep: facts recall and stored bits against the number of facts, per variant.

Applies to runs on the facts corpus at two or more corpus sizes (`data.source.num_entities`). Bits come from
`summary["eval"]["facts_bits"]` (eval/knowledge.py): the trained paraphrases' bits measure what is stored, the
held-out ones what can be recalled through a new wording. Per backbone parameter: bits / backbone parameters;
per table parameter: (bits − the baseline's bits at the same size) / token-indexed parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.report import plots, stats
from eval.report.groups import run_settings
from eval.report.runs import BASELINE, VARIANT_ORDER
from eval.report.section import Context, Section

SIZE_KEY = "data.source.num_entities"
FACTS_PER_ENTITY = 5


def _value(run: Any, *path: str) -> float | None:
    node: Any = run.summary
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) else None


def records(runs: list[Any], settings_of: Callable[[Any], dict[str, Any]], order: tuple[str, ...]) -> list[dict]:
    """One record per (variant, corpus size): seeds pooled; [] unless some variant has >= 2 sizes."""
    cells: dict[tuple[str, int], list[Any]] = {}
    for run in runs:
        size = settings_of(run).get(SIZE_KEY)
        if isinstance(size, int) and (run.summary.get("eval") or {}).get("facts_qa_heldout"):
            cells.setdefault((run.summary.get("variant") or "?", size), []).append(run)
    sizes_per_variant: dict[str, set[int]] = {}
    for variant, size in cells:
        sizes_per_variant.setdefault(variant, set()).add(size)
    if not any(len(s) >= 2 for s in sizes_per_variant.values()):
        return []
    out = []
    for (variant, size), members in sorted(cells.items(), key=lambda kv: (_rank(kv[0][0], order), kv[0][1])):
        rec: dict[str, Any] = {"variant": variant, "num_entities": size, "facts": size * FACTS_PER_ENTITY,
                               "n": len(members)}  # fmt: skip
        for name, path in (("recall_heldout", ("eval", "facts_qa_heldout", "acc")),
                           ("recall_train", ("eval", "facts_qa_train", "acc")),
                           ("bits_train", ("eval", "facts_bits", "bits_train")),
                           ("bits_heldout", ("eval", "facts_bits", "bits_heldout"))):  # fmt: skip
            values = [v for r in members if (v := _value(r, *path)) is not None]
            summ = stats.summarize(values) if values else None
            rec[name] = summ.mean if summ else None
            rec[f"{name}_std"] = summ.std if summ else None
        rec["prior_bits"] = _value(members[0], "eval", "facts_bits", "prior_bits")
        rec["params_backbone"] = _value(members[0], "params", "backbone")
        rec["params_token_indexed"] = _value(members[0], "params", "token_indexed")
        out.append(rec)
    for rec in out:
        base = next((r for r in out if r["variant"] == BASELINE and r["num_entities"] == rec["num_entities"]), None)
        bits, backbone, tables = rec["bits_train"], rec["params_backbone"], rec["params_token_indexed"]
        rec["bits_per_backbone_param"] = bits / backbone if bits is not None and backbone else None
        extra = None if base is None or bits is None or base["bits_train"] is None else bits - base["bits_train"]
        rec["bits_over_baseline"] = extra
        rec["bits_per_table_param"] = extra / tables if extra is not None and tables else None
    return out


def _rank(variant: str, order: tuple[str, ...]) -> int:
    return order.index(variant) if variant in order else len(order)


def _cell(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return ""
    return format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")


def markdown(recs: list[dict[str, Any]]) -> str:
    """The capacity section: recall and stored bits per variant and corpus size."""
    out = ["## Knowledge capacity: recall and stored bits vs the number of facts", "",
           "Recall: facts QA accuracy (4 choices, chance 0.25). Bits: prior entropy of each value minus the model's "
           "loss on it after a trained paraphrase (eval/knowledge.py), summed over facts; mean ± std over seeds. "
           "Per table parameter: bits over the baseline of the same size / token-indexed parameters.", "",
           "| variant | facts | n | recall held-out | recall trained | bits stored | of prior | bits / backbone param "
           "| bits over baseline | bits / table param |", "|" + "---|" * 10]  # fmt: skip
    for r in recs:
        share = f"{r['bits_train'] / r['prior_bits']:.1%}" if r["bits_train"] is not None and r["prior_bits"] else ""
        out.append(" | ".join([
            f"| {r['variant']}", str(r["facts"]), str(r["n"]), _cell(r["recall_heldout"], r["recall_heldout_std"], ".3f"),
            _cell(r["recall_train"], r["recall_train_std"], ".3f"), _cell(r["bits_train"], r["bits_train_std"], ".0f"),
            share, "" if r["bits_per_backbone_param"] is None else f"{r['bits_per_backbone_param']:.3f}",
            "" if r["bits_over_baseline"] is None else f"{r['bits_over_baseline']:+.0f}",
            "" if r["bits_per_table_param"] is None else f"{r['bits_per_table_param']:.4f}",
        ]) + " |")  # fmt: skip
    return "\n".join(out) + "\n"


def plot(recs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """capacity.png: recall (held-out, trained) and stored bits against the number of facts, per variant."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    variants = list(dict.fromkeys(r["variant"] for r in recs))
    for j, variant in enumerate(variants):
        mine = [r for r in recs if r["variant"] == variant]
        x = [r["facts"] for r in mine]
        for ax, key in zip(axes, ("recall_heldout", "recall_train", "bits_train")):
            pts = [(xi, r[key], r[f"{key}_std"] or 0.0) for xi, r in zip(x, mine) if r[key] is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=f"C{j % 10}",
                            marker="o", markersize=4, capsize=3, label=variant)  # fmt: skip
    prior = sorted({(r["facts"], r["prior_bits"]) for r in recs if r["prior_bits"]})
    if prior:
        axes[2].plot([p[0] for p in prior], [p[1] for p in prior], color="grey", linestyle=":", label="all facts")
    for ax, title in zip(axes, ("recall, held-out paraphrase", "recall, trained paraphrase", "bits stored")):
        ax.set_xscale("log")
        ax.set_xlabel("facts in the corpus")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if title.startswith("recall"):
            ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)  # chance: four choices
        ax.legend(fontsize=8)
    path = plots.save_figure(fig, out_dir / "capacity.png")
    plt.close(fig)
    return [path]


def section(ctx: Context) -> Section:
    """Facts corpora at >= 2 sizes: capacity.csv, the Markdown and capacity.png."""
    recs = records(ctx.runs, run_settings, VARIANT_ORDER)
    if not recs:
        return Section("capacity", recs)
    return Section("capacity", recs, markdown(recs), {"capacity": ("capacity.csv", recs)}, plot(recs, ctx.out_dir))
