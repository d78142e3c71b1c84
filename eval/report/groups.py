"""Run settings and groups of seeds: what defines a run besides its seed, and which groups are compared."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.report.runs import BASELINE, Run, variant_rank
from project.config import VARIANTS

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
Setting = tuple[tuple[str, Any], ...]


def variant_kind(variant: str) -> tuple[str, str]:
    """(FFN kind, modulator) of a variant name; unknown names count as a dense backbone without modulator."""
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
        cond, own = [(k, _sort_value(v)) for k, v in g.condition], [(k, _sort_value(v)) for k, v in g.settings]
        return cond, variant_rank(g.variant), g.variant, own

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
