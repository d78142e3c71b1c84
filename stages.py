"""The stages `run.py` runs: train (then evaluate), evaluate a checkpoint, report over runs.

This module sits above both layers: `project/` trains and knows nothing of evaluation; `eval/` scores
checkpoints and reads runs. Here the two are put in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval.probe import KnowledgeProbe
from eval.report import build_report
from eval.stage import evaluate_checkpoint
from project import pipeline
from project.checkpoint import MissingCheckpointError, read_checkpoint, single_file_checkpoint
from project.config import ConfigError
from project.io import atomic_write_json, atomic_write_text

STAGES = ("train", "eval", "report", "generate")


def probe_callbacks(cfg: DictConfig):
    """The in-training knowledge probe for a facts corpus, when `probe.enabled`."""

    def make(datamodule: Any) -> list:
        if not cfg.probe.enabled or datamodule.qa_path is None:
            return []
        return [KnowledgeProbe(datamodule.qa_path, datamodule.tokenizer.to_str(), cfg.probe.max_items)]

    return make


def train(cfg: DictConfig) -> dict[str, Any]:
    """`stage=train`: train, then (on rank 0) evaluate the final checkpoint; returns the summary."""
    result = pipeline.train(cfg, callbacks=probe_callbacks(cfg))
    if result.is_global_zero:
        result.summary["eval"] = run_eval(cfg, result.checkpoint, result.run_dir, result.qa_path)
        atomic_write_json(result.run_dir / "summary.json", result.summary)
    return result.summary


def run_eval(cfg: DictConfig, checkpoint: Path, run_dir: Path, qa_path: Path | None, strict: bool | None = None):
    """The eval stage on one checkpoint: lm-eval benchmarks and the facts probe (see eval/stage.py)."""
    if not cfg.eval.enabled:
        return {}
    return evaluate_checkpoint(checkpoint, OmegaConf.to_container(cfg.eval, resolve=True), run_dir, qa_path, strict=strict)


def evaluate(cfg: DictConfig, explicit_benchmarks: bool = False) -> dict[str, Any]:
    """`stage=eval ckpt_path=...`: evaluate an existing checkpoint. When it lies in a run's
    `checkpoints/` folder, that run's eval.json and summary.json are updated; otherwise the results
    go to this stage's run dir. Benchmarks named on the command line must be available."""
    if not cfg.eval.enabled:
        raise ConfigError("stage=eval with eval.enabled=false has nothing to do: drop eval.enabled=false")
    source = given_checkpoint(cfg)
    checkpoint = single_file_checkpoint(source)
    read_checkpoint(checkpoint)  # a clear error for an unreadable file before any benchmark loads
    owner = source.parent.parent
    run_dir = owner if (owner / "summary.json").is_file() else Path(cfg.run_dir).resolve()
    summary_path = run_dir / "summary.json"
    summary = read_summary(summary_path) if summary_path.is_file() else None
    strict = True if explicit_benchmarks else None
    results = run_eval(cfg, checkpoint, run_dir, facts_qa_path(summary), strict=strict)
    if summary is not None:
        summary["eval"] = results
        atomic_write_json(summary_path, summary)
    return results


def given_checkpoint(cfg: DictConfig) -> Path:
    """The existing checkpoint (file or sharded folder) that `ckpt_path` names for this stage, resolved."""
    if not cfg.ckpt_path:
        raise ConfigError(f"stage={cfg.stage} needs ckpt_path=PATH (a .ckpt file, or a sharded checkpoint folder)")
    source = Path(cfg.ckpt_path).resolve()
    if not source.exists():
        raise MissingCheckpointError(f"checkpoint {source} does not exist")
    return source


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, or a clear error naming it when it is not a JSON object."""
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): restore it, or delete it to evaluate without it") from exc
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} does not hold a JSON object: restore it, or delete it to evaluate without it")
    return summary


def facts_qa_path(summary: dict[str, Any] | None) -> Path | None:
    """The facts QA file of the run that trained the checkpoint, as its summary records it."""
    recorded = ((summary or {}).get("data") or {}).get("qa_path")
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def report(cfg: DictConfig) -> dict[str, Any]:
    """`stage=report runs=GLOB`: the ablation table and plots over finished runs."""
    if not cfg.runs:
        raise ConfigError("stage=report needs runs=GLOB (e.g. runs='runs/multirun_*') or a list of run folders")
    globs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    return build_report(globs, cfg.report_dir or cfg.run_dir)


def generate(cfg: DictConfig) -> list[dict[str, str]]:
    """`stage=generate ckpt_path=... prompt=...` (or `generate.prompts_file=...`): continue prompts with the
    checkpoint's model, streaming a single prompt to the terminal; all results go to generations.jsonl."""
    import sys

    from tqdm.auto import tqdm

    from project.checkpoint import load_model
    from project.data.tokenizer import EOS
    from project.generate import HostTables, SamplingSettings, generate_text, resolve_device

    g = cfg.generate
    source = given_checkpoint(cfg)
    prompts = read_prompts(cfg.prompt, g.prompts_file)
    settings = SamplingSettings(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                top_p=g.top_p, seed=g.seed)  # fmt: skip
    if g.batch_size < 1:
        raise ConfigError(f"generate.batch_size must be >= 1, got {g.batch_size}")
    device = resolve_device(g.device)
    loaded = load_model(single_file_checkpoint(source), "cpu" if g.host_tables else device)
    host = HostTables(loaded.model, device) if g.host_tables else None
    eos = loaded.tokenizer.token_to_id(EOS)

    def show(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = len(prompts) == 1
    texts: list[str] = []
    for start in tqdm(range(0, len(prompts), g.batch_size), desc="generate", disable=stream):
        batch = prompts[start : start + g.batch_size]
        texts += generate_text(loaded.model, loaded.tokenizer, batch, settings, eos, list(g.stop),
                               on_text=show if stream else None, host_tables=host)  # fmt: skip
    if stream:
        sys.stdout.write("\n")
    else:
        for prompt, text in zip(prompts, texts, strict=True):
            print(f"--- {prompt}\n{text}")
    records = [{"prompt": p, "generation": t} for p, t in zip(prompts, texts, strict=True)]
    out = Path(cfg.run_dir).resolve() / "generations.jsonl"
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """The prompts of stage=generate: `prompt`, or the lines (.txt) / "prompt" fields (.jsonl) of a file."""
    if (prompt is None) == (prompts_file is None):
        raise ConfigError('stage=generate needs exactly one of prompt="..." or generate.prompts_file=PATH')
    if prompt is not None:
        return [str(prompt)]
    path = Path(prompts_file)
    if not path.is_file():
        raise ConfigError(f"generate.prompts_file={path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            prompts = [json.loads(line)["prompt"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: every line must be a JSON object with a \"prompt\" ({exc})") from exc
    else:
        prompts = lines
    if not prompts:
        raise ConfigError(f"generate.prompts_file={path} holds no prompts")
    return [str(p) for p in prompts]
