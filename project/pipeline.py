"""The train stage: prepare data, build the variant, fit, validate, write the run directory.

Evaluation comes after it, from the stage runner above both layers (`stages.py`)."""

from __future__ import annotations

import hashlib
import logging
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from project.accounting import flops_per_token
from project.config import ConfigError, ModelConfig, check_seq_len
from project.data import budget
from project.checkpoint import AtomicCheckpointIO, is_sharded_checkpoint, read_checkpoint, single_file_checkpoint
from project.io import atomic_write_json, atomic_write_text
from project.lit_module import LMModule, perplexity
from project.optim import SETTINGS_BEFORE_THEY_EXISTED, OptimConfig
from project.parallel import check_table_strategy, compile_backend, table_mode
from project.throughput import Throughput, check_peak_flops
from project.run_dir import (
    RunCheckpoint, TrainingInterrupted, build_loggers, check_loggers, claim_run_dir, finish_loggers, is_rank_zero,
    stop_on_signals,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What the train stage wrote: the summary (also in `run_dir/summary.json` on rank 0) and where the
    evaluation finds the checkpoint and the facts QA file."""

    summary: dict[str, Any]
    run_dir: Path
    checkpoint: Path
    qa_path: Path | None
    is_global_zero: bool


def model_config(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The model section, validated, with V taken from the tokenizer (or checked against it)."""
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    if settings.get("vocab_size") is None:
        settings["vocab_size"] = vocab_size
    elif settings["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.vocab_size={settings['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab_size}): "
            f"ids would fall outside the tables. Leave model.vocab_size=null to take it from the tokenizer."
        )
    return ModelConfig.from_dict(settings)


def tokenizer_sha256(tokenizer_json: str) -> str:
    """A tokenizer's identity by content: the same tokenizer read from another path is the same."""
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


def data_identity(cfg: DictConfig, datamodule: Any, tokenizer_json: str) -> dict[str, Any]:
    """What a checkpoint records of its training data, checked on resume: the source's settings, how it is cut into
    windows and batches, and the tokenizer (`tokenizer_json`, its serialised form, compared by content)."""
    return {
        "source": {"kind": datamodule.meta.get("kind"), **(datamodule.meta.get("source") or {})},
        "seq_len": int(cfg.data.seq_len),
        "batch_size": int(cfg.data.batch_size),
        "seed": cfg.data.get("seed"),
        "tokenizer": {
            "vocab_size": int(datamodule.tokenizer.get_vocab_size()),
            "sha256": tokenizer_sha256(tokenizer_json),
        },
    }


def flatten(settings: Any, prefix: str) -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"prefix.a.b": 1}`, so that a mismatch names the exact setting."""
    if not isinstance(settings, dict):
        return {prefix: settings}
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(flatten(value, f"{prefix}.{key}"))
    return flat


def resume_record(ckpt_path: str) -> dict[str, Any]:
    """Everything but the tensors of the checkpoint to resume from (verified: read_checkpoint checks its checksum)."""
    path = Path(ckpt_path)
    if path.is_dir():  # a sharded checkpoint: its meta.pt holds the same record (the strategy reads the shards)
        if not is_sharded_checkpoint(path):
            raise ConfigError(f"ckpt_path={ckpt_path} is a folder but not a sharded checkpoint (no meta.pt inside)")
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return read_checkpoint(path)


def check_resume(ckpt_path: str, model_cfg: ModelConfig, optim: dict[str, Any], data: dict[str, Any],
                 tables: str = "strategy") -> int:  # fmt: skip
    """Fail before training if the checkpoint is unreadable or was trained with other settings (model, optimizer,
    data source, tokenizer, `parallel.tables`: its checkpoints lay the tables' optimizer state out otherwise), naming
    every differing field; return the step it resumes from."""
    record = resume_record(ckpt_path)
    saved_model = ModelConfig.from_dict(record["hyper_parameters"]["model"]).to_dict()
    # Optimizer settings in full: a setting added since the checkpoint compares at the value it was trained with.
    ours = {**flatten(model_cfg.to_dict(), "model"), **flatten(asdict(OptimConfig.from_dict(optim)), "optim")}
    saved_optim = {**SETTINGS_BEFORE_THEY_EXISTED, **(record["hyper_parameters"].get("optim") or {})}
    saved_optim = asdict(OptimConfig.from_dict(saved_optim))
    theirs = {**flatten(saved_model, "model"), **flatten(saved_optim, "optim")}
    if model_cfg.modulator != "none":
        ours["parallel.tables"] = tables
        theirs["parallel.tables"] = (record["hyper_parameters"].get("parallel") or {}).get("tables") or "strategy"
    if record.get("data_identity") is not None:
        ours.update(flatten(data, "data"))
        theirs.update(flatten(record["data_identity"], "data"))
    else:  # a checkpoint from before data identities: only its tokenizer can be compared
        log.warning("checkpoint %s does not record its training data: the data source cannot be checked", ckpt_path)
        saved = record.get("tokenizer_json")
        if saved is not None:
            ours["data.tokenizer.sha256"] = data["tokenizer"]["sha256"]
            theirs["data.tokenizer.sha256"] = tokenizer_sha256(saved)
    diff = [k for k in dict.fromkeys([*theirs, *ours]) if theirs.get(k) != ours.get(k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diff)
        raise ConfigError(
            f"cannot resume from {ckpt_path}: it was trained with other settings ({detail}). Resume with the "
            f"checkpoint's settings, or start a new run without ckpt_path"
        )
    return int(record.get("global_step", 0))


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[Callback], resume_step: int = 0) -> L.Trainer:
    """Instantiate `cfg.trainer` with the run directory's checkpointing, CSV metrics (rows before `resume_step` kept
    from the run being resumed) and the loggers chosen with `logger=`."""
    ckpt = RunCheckpoint(run_dir / "checkpoints", cfg.checkpoint.every_n_train_steps, cfg.checkpoint.keep_all)
    logger = build_loggers(cfg.get("logger"), run_dir, resume_step)
    strategy = cfg.trainer.get("strategy", "auto")
    plugins = [AtomicCheckpointIO()] if isinstance(strategy, str) and strategy in ("auto", "ddp") else None
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=[ckpt, *extra_callbacks], logger=logger, default_root_dir=str(run_dir), plugins=plugins
    )


def fit(trainer: L.Trainer, module: LMModule, datamodule: Any, ckpt_path: str | None, last: Path) -> None:
    """`trainer.fit`; on SIGTERM or SIGINT, Lightning finishes the step and saves a checkpoint (RunCheckpoint), then
    this raises TrainingInterrupted, so the run never looks finished."""
    with stop_on_signals() as received:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            received.append(signal.SIGTERM)  # another rank's SIGTERM, broadcast by Lightning
    if received:
        raise TrainingInterrupted(received[0], trainer.global_step, last)


def tokens_per_step(cfg: DictConfig) -> int:
    """Global training tokens per optimizer step."""
    return budget.windows_per_step(cfg.data.batch_size, cfg.trainer) * cfg.data.seq_len


def set_max_steps(cfg: DictConfig, steps: int) -> None:
    """Train for `steps` steps, with validation and checkpoint intervals clamped to fit in the run."""
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        if isinstance(cfg.trainer.get("val_check_interval"), int):
            cfg.trainer.val_check_interval = min(cfg.trainer.val_check_interval, steps)
        cfg.checkpoint.every_n_train_steps = min(cfg.checkpoint.every_n_train_steps, steps)


def data_budget(cfg: DictConfig, datamodule: Any, steps: int | None = None) -> budget.DataBudget:
    """What this run reads of the prepared training split."""
    return budget.DataBudget(
        steps=cfg.trainer.max_steps if steps is None else steps,
        windows_per_step=budget.windows_per_step(cfg.data.batch_size, cfg.trainer),
        seq_len=cfg.data.seq_len,
        train_tokens=int(datamodule.meta["train_tokens"]),
    )


def resolve_steps(cfg: DictConfig, model_cfg: ModelConfig, datamodule: Any) -> None:
    """Set `trainer.max_steps` from `train_flops` (a compute budget: FLOPs per token x tokens per step) or
    from `train_epochs` (passes over the training split); then check it is a positive step count."""
    flops, epochs = cfg.get("train_flops"), cfg.get("train_epochs")
    if flops is not None and epochs is not None:
        raise ConfigError(f"train_flops={flops} and train_epochs={epochs} both set the step count: give one")
    if flops is not None:
        per_step = flops_per_token(model_cfg, cfg.data.seq_len) * tokens_per_step(cfg)
        steps = int(float(flops) // per_step)
        if steps < 1:
            raise ConfigError(f"train_flops={flops:.3g} is less than one step ({per_step:.3g} FLOPs)")
        set_max_steps(cfg, steps)
        log.info("train_flops=%.3g: %d steps of %.3g FLOPs", float(flops), steps, per_step)
    elif epochs is not None:
        if getattr(datamodule, "streaming", False):
            raise ConfigError(f"train_epochs={epochs}: a streamed dataset has no known length; set trainer.max_steps "
                              "(or train_flops) instead")  # fmt: skip
        per_epoch = data_budget(cfg, datamodule, steps=0).steps_per_epoch
        steps = int(float(epochs) * per_epoch)
        if steps < 1:
            raise ConfigError(f"train_epochs={epochs} is less than one step ({per_epoch} steps per epoch)")
        set_max_steps(cfg, steps)
        log.info("train_epochs=%g: %d steps (%d per epoch)", float(epochs), steps, per_epoch)
    if not cfg.trainer.get("max_steps") or cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps must be a positive number of optimizer steps (the data stream is endless)")


def prepare_data(cfg: DictConfig) -> tuple[Any, ModelConfig, budget.DataBudget | None]:
    """Build the data module and the model config, fix the step count, and check how often the run reads
    its data. `data.source.docs_per_entity=auto` first measures tokens per document on a pilot corpus,
    then grows the facts corpus so the run reads it at most once."""
    check_seq_len(cfg.data.seq_len, cfg.model.max_seq_len)  # before any data is prepared
    auto = budget.is_auto(cfg.data)
    if auto:
        if cfg.get("train_epochs") is not None:
            raise ConfigError(
                "data.source.docs_per_entity=auto sizes the corpus to the step count; with train_epochs the step "
                "count follows from the corpus: give docs_per_entity a number"
            )
        with open_dict(cfg):
            cfg.data.source.docs_per_entity = budget.PILOT_DOCS_PER_ENTITY
        pilot = hydra.utils.instantiate(cfg.data)
        pilot.prepare_data()
        docs = size_facts_corpus(cfg, pilot)
        with open_dict(cfg):
            cfg.data.source.docs_per_entity = docs
        log.info("docs_per_entity=auto: %d documents per person for %d steps", docs, cfg.trainer.max_steps)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    model_cfg = model_config(cfg, datamodule.vocab_size)
    resolve_steps(cfg, model_cfg, datamodule)
    if getattr(datamodule, "streaming", False):  # no known length: what was read is counted as it is read
        return datamodule, model_cfg, None
    plan = data_budget(cfg, datamodule)
    if plan.epochs > 1:
        if auto:
            raise RuntimeError(f"the auto-sized corpus holds {plan.epochs:.3f} epochs of this run, not <= 1: a bug")
        log.warning(
            "this run reads its training data %.2f times (%d steps, %d per epoch): repeated documents let "
            "token-indexed tables memorise them (see eval/RESEARCH.md, 'When data repeats')",
            plan.epochs, plan.steps, plan.steps_per_epoch,
        )  # fmt: skip
    return datamodule, model_cfg, plan


def size_facts_corpus(cfg: DictConfig, pilot: Any) -> int:
    """Documents per person for a facts corpus this run reads at most once, from the pilot corpus's tokens
    per document (the step count is resolved first: it may follow from a FLOP budget)."""
    resolve_steps(cfg, model_config(cfg, pilot.vocab_size), pilot)
    meta = pilot.meta
    wps = budget.windows_per_step(cfg.data.batch_size, cfg.trainer)
    needed = budget.tokens_needed(cfg.trainer.max_steps, wps, cfg.data.seq_len)
    return budget.docs_per_entity_for(needed, meta["train_tokens"] / meta["train_documents"],
                                      cfg.data.source.num_entities)  # fmt: skip


def data_record(datamodule: Any, plan: budget.DataBudget | None) -> dict[str, Any]:
    """summary.json's `data`: what the training split holds and how much of it the run read."""
    if plan is None:  # a stream
        return datamodule.data_record()
    meta = datamodule.meta
    record: dict[str, Any] = {
        "train_tokens": int(meta["train_tokens"]),
        "train_documents": int(meta["train_documents"]),
        "usable_windows": plan.usable_windows,
        "windows_read": plan.steps * plan.windows_per_step,
        "steps_per_epoch": plan.steps_per_epoch,
        "epochs": plan.epochs,
        "qa_path": None if datamodule.qa_path is None else str(datamodule.qa_path),
    }
    docs_per_entity = (meta.get("source") or {}).get("docs_per_entity")
    if isinstance(docs_per_entity, int):  # facts: each document states each of its person's facts once
        record["docs_per_entity"] = docs_per_entity
        record["exposures_per_fact"] = docs_per_entity * plan.epochs
    return record


def train(cfg: DictConfig, callbacks: Callable[[Any], list[Callback]] | None = None) -> TrainResult:
    """Run the train stage and write `run_dir/summary.json` (its `eval` still empty). `callbacks(datamodule)`
    adds the caller's callbacks (the in-training knowledge probe) once the data is prepared."""
    run_dir = Path(cfg.run_dir).resolve()
    check_loggers(cfg.get("logger"))  # a missing logger package fails here, not after the data is prepared
    configured_peak = check_peak_flops((cfg.get("mfu") or {}).get("peak_flops"))
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim_cfg = OptimConfig.from_dict(optim)  # a bad optimizer setting fails here, not after the data is prepared
    parallel = cfg.get("parallel") or {}
    compile_backend(parallel.get("compile"))  # so does a bad parallel.compile
    tables = table_mode(parallel.get("tables"), optim_cfg)
    check_table_strategy(tables, cfg.trainer)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule, model_cfg, plan = prepare_data(cfg)
    tokenizer_json = datamodule.tokenizer.to_str()
    data = data_identity(cfg, datamodule, tokenizer_json)
    resume_step = check_resume(cfg.ckpt_path, model_cfg, optim, data, tables) if cfg.ckpt_path else 0
    if is_rank_zero():
        claim_run_dir(run_dir, cfg)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_text(run_dir / "tokenizer.json", tokenizer_json)

    module = LMModule(
        model=model_cfg,
        optim=optim,
        parallel=OmegaConf.to_container(cfg.parallel, resolve=True) if "parallel" in cfg else {},
    )
    module.tokenizer_json = tokenizer_json
    module.data_identity = data
    throughput = Throughput(flops_per_token(model_cfg, cfg.data.seq_len), configured_peak)
    trainer = build_trainer(cfg, run_dir, [throughput, *(callbacks(datamodule) if callbacks else [])], resume_step)
    stats = module.stats()
    log.info("variant %s: %s", model_cfg.variant, stats)
    try:
        fit(trainer, module, datamodule, cfg.ckpt_path, run_dir / "checkpoints" / "last.ckpt")
        if throughput.validated_at == trainer.global_step and "val/loss" in trainer.callback_metrics:
            val = {k: float(v) for k, v in trainer.callback_metrics.items()}  # the final weights were just validated
        else:
            val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    except BaseException:
        finish_loggers(trainer.loggers, failed=True)
        raise
    finish_loggers(trainer.loggers)

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if trainer.is_global_zero:
        checkpoint = single_file_checkpoint(checkpoint)  # sharded runs: one file for eval and reuse
    summary = {
        "variant": model_cfg.variant,
        "seed": cfg.seed,
        **stats,
        "train_tokens": module.train_tokens,
        "train_flops": module.train_tokens * stats["flops_per_token"],
        "train_flops_budget": cfg.get("train_flops"),
        "steps": trainer.global_step,
        "data": data_record(datamodule, plan),
        "val_loss": float(val["val/loss"]),
        "val_ppl": perplexity(float(val["val/loss"])),
        "tokens_per_sec": throughput.tokens_per_sec,
        "train_seconds": throughput.seconds,
        "mfu": throughput.mfu(throughput.tokens_per_sec),
        "peak_flops": throughput.peak_per_device,
        "checkpoint": str(checkpoint),
        "tables": module.table_traffic,
        "model": model_cfg.to_dict(),
        "eval": {},
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", summary)  # training results are safe before eval starts
    return TrainResult(summary, run_dir, checkpoint, datamodule.qa_path, trainer.is_global_zero)
