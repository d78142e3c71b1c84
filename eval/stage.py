"""The eval stage: run the configured benchmarks on a checkpoint, write `run_dir/eval.json`, return the summary.

Each benchmark is a separate `simple_evaluate` call (lm-eval loads every task's data before scoring, so one
missing dataset would abort a joint call). All data is loaded before the model: with `strict`, a missing
benchmark fails at once; otherwise it is recorded as `{"status": "unavailable", "reason": ...}`. A benchmark that
fails while scoring (e.g. more shots than its few-shot split holds) is recorded as `{"status": "error", "reason"}`
naming the task and the shot count, and the others still score; with `strict`, the stage then raises
`BenchmarkFailed`, after writing eval.json.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from project.config import settings_from_dict
from project.hub import ensure_hub_mode
from project.io import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_BENCHMARKS = ("facts_qa", "mmlu", "arc_easy", "arc_challenge", "ceval")


@dataclass
class EvalSettings:
    """The `eval` config section (configs/eval/default.yaml documents every key)."""

    enabled: bool = True
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    num_fewshot: dict[str, int | None] = field(default_factory=dict)  # per benchmark; missing = task default
    limit: int | float | None = None  # per-task sample cap (a float < 1 is a fraction)
    batch_size: int | str = 16
    device: str | None = None  # None = CUDA if available, else CPU
    data_dir: str | None = None  # local copies in Hugging Face layout (python -m eval.export_benchmarks)
    offline: bool | None = None  # None = probe the Hub; True = never touch it
    strict: bool = False  # raise for a benchmark that is unavailable (at once) or fails (after the others)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> EvalSettings:
        settings = settings_from_dict(cls, _plain(values or {}), "eval")
        settings.benchmarks = list(settings.benchmarks)
        settings.num_fewshot = dict(settings.num_fewshot or {})
        return settings

    def fewshot(self, name: str, task: str) -> int | None:
        """The few-shot count for a benchmark (looked up by our name, then by lm-eval's task name)."""
        return self.num_fewshot.get(name, self.num_fewshot.get(task))


def _plain(values: Any) -> dict[str, Any]:
    """A plain dict from a mapping or an OmegaConf DictConfig."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            return OmegaConf.to_container(values, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(values)


def evaluate_checkpoint(
    ckpt_path: str | os.PathLike,
    eval_cfg: Mapping[str, Any],
    run_dir: str | os.PathLike,
    qa_path: str | os.PathLike | None = None,
    *,
    strict: bool | None = None,
) -> dict[str, Any]:
    """Run the configured benchmarks on a checkpoint, write `run_dir/eval.json`, print a table, and return
    the compact results for `summary["eval"]`: {key: {"status": "ok", "acc", "stderr", "num_fewshot",
    "n_samples", ...} or {"status": "unavailable" | "error", "reason"}}. `strict` (default: eval_cfg.strict)
    raises instead: `BenchmarkUnavailable` for missing data (before scoring), `BenchmarkFailed` for failed runs
    (after scoring the rest and writing eval.json)."""
    settings = EvalSettings.from_dict(eval_cfg)
    if not settings.enabled:
        log.info("evaluation disabled (eval.enabled=false)")
        return {}
    strict = settings.strict if strict is None else strict
    run_dir = Path(run_dir)
    offline = ensure_hub_mode(settings.offline)  # before lm-eval imports `datasets`

    from eval import benchmarks

    loaded: dict[str, benchmarks.LoadedBenchmark] = {}
    records: dict[str, dict[str, Any]] = {}
    for name in settings.benchmarks:
        try:
            loaded[name] = benchmarks.load_benchmark(
                name, settings.data_dir, None if qa_path is None else str(qa_path), run_dir / "lm_eval_tasks"
            )
        except benchmarks.BenchmarkUnavailable as exc:
            if strict:
                raise
            log.warning("%s", exc)
            records[name] = {"status": "unavailable", "reason": str(exc)}

    summary: dict[str, dict[str, Any]] = {}
    env: dict[str, Any] = {}
    bits = None
    if loaded:
        from eval.adapter import JTokLM

        lm = JTokLM(checkpoint=ckpt_path, device=settings.device, batch_size=settings.batch_size)
        for name, bench in loaded.items():
            start = time.perf_counter()
            try:
                results = run_benchmark(lm, bench, settings)
            except Exception as exc:  # one broken benchmark must not lose the others after a long run
                records[name] = failure_record(bench, settings, exc)
                continue
            env = {k: results.pop(k) for k in ("pretty_env_info", "transformers_version") if k in results} or env
            records[name] = {"status": "ok", "source": bench.source, "seconds": time.perf_counter() - start, **results}
        if "facts_qa" in loaded and qa_path is not None:
            bits = facts_bits(lm, qa_path)
    for name in settings.benchmarks:
        if records[name]["status"] == "ok":
            summary.update(summarize(loaded[name], records[name]))
        else:
            summary[name] = records[name]

    if bits is not None:
        summary["facts_bits"] = bits
    import lm_eval

    atomic_write_json(
        run_dir / "eval.json",
        {
            "checkpoint": str(ckpt_path),
            "hub_offline": offline,
            "settings": dataclasses.asdict(settings),
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "summary": summary,
            "benchmarks": records,
            "env": env,
        },
    )
    print(format_table(summary))
    log.info("wrote %s", run_dir / "eval.json")
    failed = [e["reason"] for e in summary.values() if e.get("status") == "error"]
    if strict and failed:
        raise benchmarks.BenchmarkFailed(
            f"{len(failed)} evaluation(s) failed while scoring; what was scored is in {run_dir / 'eval.json'}: "
            + "; ".join(failed)
        )
    return summary


def failure_record(bench: Any, settings: EvalSettings, exc: Exception) -> dict[str, Any]:
    """The eval.json record of a benchmark that failed while scoring: the reason names its task and shot count
    (and what to change when the few-shot split is too small); logged, with the traceback unless it is that."""
    task = task_name(bench)
    shots = settings.fewshot(bench.name, task)
    shot_count = "the task's default shots" if shots is None else f"{shots}-shot"
    reason = f"{bench.name} (task {task}, {shot_count}) failed: {type(exc).__name__}: {exc}"
    too_few = isinstance(exc, ValueError) and "Sample larger than population" in str(exc)
    if too_few:
        reason += f". Its few-shot split holds fewer examples than that: lower eval.num_fewshot.{bench.name}"
    log.error("%s", reason, exc_info=None if too_few else exc)
    return {"status": "error", "task": task, "num_fewshot": shots, "reason": reason}


def facts_bits(lm: Any, qa_path: str | os.PathLike) -> dict[str, Any]:
    """The knowledge stored in bits over the facts QA items (eval/knowledge.py), or the reason it failed."""
    from eval.knowledge import stored_bits

    try:
        return stored_bits(lm, qa_path)
    except Exception as exc:
        log.exception("facts_bits failed")
        return {"status": "error", "reason": f"facts_bits failed: {type(exc).__name__}: {exc}"}


def task_name(bench: Any) -> str:
    """The lm-eval task (or our group name) a loaded benchmark runs under."""
    return bench.keys[0] if len(bench.keys) == 1 else bench.name


def run_benchmark(lm: Any, bench: Any, settings: EvalSettings) -> dict[str, Any]:
    """One `simple_evaluate` call over a loaded benchmark; lm-eval's results dict (without samples)."""
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval.evaluator").addFilter(_quiet_fewshot_override)
    task = task_name(bench)
    results = simple_evaluate(
        model=lm,
        tasks=bench.objects,
        num_fewshot=settings.fewshot(bench.name, task),
        limit=settings.limit,
        task_manager=bench.task_manager,
        log_samples=False,
    )
    results.pop("samples", None)
    return results


def _quiet_fewshot_override(record: logging.LogRecord) -> bool:
    """Drop lm-eval's per-subtask "Overwriting default num_fewshot" lines (one per MMLU/CEval subject)."""
    return not str(record.msg).startswith("Overwriting default num_fewshot")


def summarize(bench: Any, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compact entries of one benchmark's results: one per result key (plus the pooled facts_qa)."""
    from eval.benchmarks import FACTS_QA, STOCK

    entries = {key: _entry(results, key) for key in bench.keys}
    if bench.name in STOCK:
        return {bench.name: entries[bench.keys[0]]}
    if bench.name == FACTS_QA:
        return {FACTS_QA: _pooled(entries), **entries}
    return entries


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _leaves(results: dict[str, Any], key: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(key)
    if not children:
        return [key]
    return [leaf for child in children for leaf in _leaves(results, child)]


def _entry(results: dict[str, Any], key: str) -> dict[str, Any]:
    """acc ± stderr (and acc_norm when reported), n-shot and sample count of one task or group."""
    row = results["results"][key]
    leaves = _leaves(results, key)
    n_samples, n_shot = results.get("n-samples", {}), results.get("n-shot", {})
    shots = {n_shot.get(leaf) for leaf in leaves}
    entry: dict[str, Any] = {
        "status": "ok",
        "task": key,
        "acc": _number(row.get("acc,none")),
        "stderr": _number(row.get("acc_stderr,none")),
        "num_fewshot": n_shot.get(key, shots.pop() if len(shots) == 1 else None),
        "n_samples": sum(n_samples.get(leaf, {}).get("effective", 0) for leaf in leaves),
        "limit": results.get("config", {}).get("limit"),
    }
    if "acc_norm,none" in row:
        entry["acc_norm"] = _number(row["acc_norm,none"])
        entry["acc_norm_stderr"] = _number(row.get("acc_norm_stderr,none"))
    if entry["acc"] is None:  # not an accuracy task: keep every numeric metric
        entry["metrics"] = {k: _number(v) for k, v in row.items() if "," in k and _number(v) is not None}
    return entry


def _pooled(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sample-weighted accuracy and pooled stderr over the facts_qa splits, as lm-eval aggregates groups."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    parts = list(entries.values())
    sizes = [e["n_samples"] for e in parts]
    acc = aggregate_subtask_metrics([e["acc"] for e in parts], sizes)
    stderrs = [e["stderr"] for e in parts]
    stderr = None if None in stderrs or sum(sizes) <= len(sizes) else float(pooled_sample_stderr(stderrs, sizes))
    return {**parts[0], "task": "+".join(entries), "acc": acc, "stderr": stderr, "n_samples": sum(sizes),
            "splits": list(entries)}  # fmt: skip


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A small plain-text table: benchmark, accuracy ± stderr, n-shot, samples (or why it was skipped)."""
    lines = [f"{'benchmark':<18} {'acc':>7} {'± stderr':>9} {'n-shot':>6} {'n':>7}"]
    for name, e in summary.items():
        if e.get("status") != "ok":
            lines.append(f"{name:<18} {e.get('status')}: {e.get('reason', '')[:100]}")
        elif e.get("acc") is None:
            lines.append(f"{name:<18} {e.get('metrics')}")
        else:
            stderr = "" if e.get("stderr") is None else f"{e['stderr']:.4f}"
            lines.append(f"{name:<18} {e['acc']:>7.4f} {stderr:>9} {e.get('num_fewshot')!s:>6} {e['n_samples']:>7}")
    return "\n".join(lines)
