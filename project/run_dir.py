"""The run directory under kills, resumes and reruns: claiming it, its metrics.csv and the other loggers, its
checkpoint callback and stopping on SIGTERM / SIGINT.

Nothing a run has written is lost to a kill -9: checkpoints are renamed into place (project/checkpoint.py), the
metric rows before a resume stay in metrics.csv (it is appended to, and only ever replaced atomically), and a refused
run writes nothing."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from project.checkpoint import remove_stale_temporaries
from project.config import ConfigError
from project.io import atomic_write_text

# What a train run writes into its run dir: an overwrite removes all of it before the new run starts.
RUN_OUTPUTS = ("checkpoints", "summary.json", "eval.json", "metrics.csv", "hparams.yaml", "lm_eval_tasks",
               "config.yaml", "tokenizer.json", "tensorboard", "wandb", "mlruns")  # fmt: skip
STEP_FILE = re.compile(r"step\d+\.ckpt")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (read from the launcher's environment, before any trainer exists)."""
    return getattr(rank_zero_only, "rank", 0) == 0


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a resumable checkpoint was saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum = int(signum)
        super().__init__(
            f"training stopped by {signal.Signals(signum).name} at step {step}; resume with ckpt_path={checkpoint}"
        )


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse, before anything is written, a fresh run over a finished or checkpointed one."""
    checkpoints = run_dir / "checkpoints"
    found = [p for p in checkpoints.iterdir() if not p.name.startswith(".")] if checkpoints.is_dir() else []
    if ((run_dir / "summary.json").is_file() or found) and not cfg.ckpt_path and not cfg.get("overwrite", False):
        resume = checkpoints / "last.ckpt" if (checkpoints / "last.ckpt").exists() else max(found, default=checkpoints)
        raise ConfigError(
            f"{run_dir} already holds a run: resume it with ckpt_path={resume}, choose another hydra.run.dir, "
            f"or pass overwrite=true to replace it"
        )
    if cfg.get("overwrite", False) and cfg.ckpt_path and checkpoints.resolve() in Path(cfg.ckpt_path).resolve().parents:
        raise ConfigError(
            f"overwrite=true would delete the checkpoint ckpt_path={cfg.ckpt_path} resumes from: drop overwrite=true "
            f"to resume in place"
        )


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Check the run dir (check_run_dir), remove what killed writes left behind, and with `overwrite=true` (and no
    resume) remove the previous run's outputs, so its checkpoints can never be mistaken for the new run's."""
    check_run_dir(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_stale_temporaries(folder)
    for trash in run_dir.glob(".overwritten-*"):
        shutil.rmtree(trash, ignore_errors=True)
    if cfg.get("overwrite", False) and not cfg.ckpt_path:
        # Renamed first (one atomic step per entry), deleted second: a kill in between leaves a hidden folder
        # that the next run removes, never a half-deleted checkpoints/ folder that looks like a run.
        trash = run_dir / f".overwritten-{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        for name in RUN_OUTPUTS:
            if (run_dir / name).exists():
                (run_dir / name).rename(trash / name)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """While training, SIGTERM and SIGINT end the run at the next step boundary with a checkpoint (Lightning's own
    SIGTERM handling: its handler calls this one too, and the loops raise SIGTERMException). SIGINT is passed on as
    SIGTERM so that Ctrl-C takes the same path; a second Ctrl-C stops at once. Yields the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield received
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)

    def on_sigint(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        signal.raise_signal(signal.SIGTERM)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for a run dir: `last.ckpt` always under that name (never `last-v1.ckpt`), a checkpoint when
    SIGTERM stops training (Lightning's `save_on_exception`, for that exception only: after a NaN loss the last good
    checkpoint stays untouched), and with `keep_all=false` only the newest `step*.ckpt`, also when a killed run left
    an older one that this run's ModelCheckpoint never saved."""

    def __init__(self, dirpath: Path, every_n_train_steps: int, keep_all: bool) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            save_last=True,
            save_top_k=-1 if keep_all else 1,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
            save_on_exception=True,
        )
        self.keep_all = keep_all

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not self.keep_all and STEP_FILE.fullmatch(Path(filepath).name):
            self._remove_older_steps(trainer, Path(filepath).name)

    def _remove_older_steps(self, trainer, newest: str) -> None:
        """Delete every `step*.ckpt` but the one just written."""
        for path in Path(self.dirpath).iterdir():
            if STEP_FILE.fullmatch(path.name) and path.name != newest:
                self._remove_checkpoint(trainer, str(path))


class RunMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer for `metrics.csv`, made safe against kill -9. Lightning's deletes the file when a run
    starts and rewrites it in place when a new column appears; this one keeps the rows the resumed run logged before
    `resume_step`, drops the rest (the resumed run logs those steps again), appends rows as they come, and replaces
    the file only atomically (a new column, or the rows dropped at the start)."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        super().__init__(log_dir=log_dir)
        self.path = Path(self.metrics_file_path)
        header, rows, intact = read_metrics(self.path)
        kept = [r for r in rows if _step(r) is not None and _step(r) < resume_step]
        self.metrics_keys = header if kept else []
        if kept != rows or not intact:
            self._replace(kept) if kept else self.path.unlink(missing_ok=True)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; the constructor above decides what to keep."""

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Lightning's hparams.yaml, written to a temporary file renamed into place."""
        self.hparams.update(params)
        path = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        save_hparams_to_yaml(tmp, self.hparams)
        os.replace(tmp, path)

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        if new_keys or not self.path.is_file():
            self._replace(read_metrics(self.path)[1] + self.metrics)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.metrics_keys, restval="").writerows(self.metrics)
        self.metrics = []

    def _replace(self, rows: list[dict[str, Any]]) -> None:
        """Write the whole file, with the current header, atomically."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.metrics_keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, out.getvalue())


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]], bool]:
    """metrics.csv's header and rows, and whether it was intact: a row cut short by a kill during an append (no line
    end) is left out rather than read with truncated numbers."""
    if not path.is_file():
        return [], [], True
    text = path.read_text(encoding="utf-8")
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete, newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows, complete == text


class RunCSVLogger(CSVLogger):
    """`run_dir/metrics.csv` through RunMetricsWriter, with every logged row on disk at once (appending is cheap)."""

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> RunMetricsWriter:
        if self._experiment is None:
            self._experiment = RunMetricsWriter(self.log_dir, self.resume_step)
        return self._experiment


# The package each optional Lightning logger imports (the module Lightning needs, the name pip installs it by).
LOGGER_PACKAGES = {
    "TensorBoardLogger": ("tensorboard", "tensorboard"),
    "WandbLogger": ("wandb", "wandb"),
    "MLFlowLogger": ("mlflow", "mlflow-skinny"),
}


def check_loggers(chosen: Mapping[str, Any] | None) -> None:
    """Fail before any data is prepared when a chosen logger's package is not installed, naming what to install."""
    for name, settings in (chosen or {}).items():
        target = str((settings or {}).get("_target_", ""))
        module, pip_name = LOGGER_PACKAGES.get(target.rsplit(".", 1)[-1], (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logger={name} needs the `{module}` package, which is not installed: pip install {pip_name}"
            )


def build_loggers(chosen: Mapping[str, Any] | None, run_dir: Path, resume_step: int = 0) -> list[Logger]:
    """The run's loggers: RunCSVLogger's metrics.csv always (first: summary and report read it), then every other
    logger chosen with `logger=` (a `logger` config group entry each, `_target_` a Lightning logger); the train stage
    has checked their packages with `check_loggers` before preparing data."""
    loggers: list[Logger] = [RunCSVLogger(run_dir, resume_step)]
    for name, settings in (chosen or {}).items():
        if name == "csv":
            continue
        if "_target_" not in settings:
            raise ConfigError(f"logger.{name} has no _target_: name the Lightning logger class it builds")
        if str(settings.get("tracking_uri", "")).startswith("file:"):
            # MLflow 3 refuses its local file store unless asked for it; a database store needs the full mlflow.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        loggers.append(hydra.utils.instantiate(settings))
    return loggers


def finish_loggers(loggers: list[Logger], failed: bool = False) -> None:
    """End what outlives `trainer.fit`: a wandb run stays open until `wandb.finish()` (its records unflushed, and the
    next job of a multirun would log into it); Lightning finalizes the other loggers itself."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)  # nothing to do where no run was started (other ranks)
