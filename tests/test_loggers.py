"""Loggers as a config group (metrics.csv always kept), model FLOPs utilisation, tokens/s timed in one place."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project import pipeline, run_dir as run_dir_module
from project.accounting import flops_per_token, matmul_precision, model_flops_utilisation, peak_flops
from project.config import ConfigError
from project.run_dir import RunCSVLogger, build_loggers, claim_run_dir

from conftest import CONFIG_DIR


def metrics_rows(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "metrics.csv") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_model_flops_utilisation_is_achieved_over_peak_flops():
    # 2000 tokens/s x 3e9 FLOPs/token = 6e12 FLOP/s achieved, over 2 devices x 1e13 peak = 0.3
    assert model_flops_utilisation(2000.0, 3e9, 1e13, 2) == pytest.approx(0.3, rel=1e-12)
    assert model_flops_utilisation(1000.0, 6e6, 1e12, 1) == pytest.approx(6e-3, rel=1e-12)


@pytest.mark.parametrize(
    ("device", "precision", "fp32_matmuls", "peak"),
    [
        ("NVIDIA H200", "bf16-mixed", "highest", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "bf16-true", "highest", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "32-true", "high", 494.7e12),  # fp32 weights, TF32 matmuls
        ("NVIDIA H100 PCIe", "16-mixed", "highest", 756e12),
        ("NVIDIA A100-SXM4-80GB", "32-true", "highest", 19.5e12),
        ("NVIDIA A100 80GB PCIe", "bf16-mixed", "highest", 312e12),
        ("NVIDIA GeForce GTX 1080", "bf16-mixed", "highest", None),  # not in the table
        ("NVIDIA H200", "64-true", "highest", None),  # no fp64 column
    ],
)
def test_peak_flops_come_from_the_device_table_by_precision(device, precision, fp32_matmuls, peak):
    # Exact: the values are the table's own literals, returned unchanged.
    assert peak_flops(device, matmul_precision(precision, fp32_matmuls)) == peak


def test_logger_group_composes_one_or_several_options():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        default = compose(config_name="config")
        several = compose(config_name="config", overrides=["logger=[csv,tensorboard,wandb]"])
        alone = compose(config_name="config", overrides=["logger=mlflow"])
    assert list(default.logger) == ["csv"]
    assert list(several.logger) == ["csv", "tensorboard", "wandb"] and several.logger.wandb.offline is True
    assert list(alone.logger) == ["mlflow"]


def test_metrics_csv_is_kept_whatever_loggers_are_chosen(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=tensorboard"])
    OmegaConf.update(cfg, "run_dir", str(tmp_path), force_add=True)
    loggers = build_loggers(cfg.logger, tmp_path)
    assert isinstance(loggers[0], RunCSVLogger) and len(loggers) == 2
    assert Path(loggers[1].log_dir) == tmp_path / "tensorboard"
    assert isinstance(build_loggers(None, tmp_path)[0], RunCSVLogger)


def test_every_logger_writes_under_the_run_dir_and_mfu_follows_a_configured_peak(make_cfg):
    # csv is not named: it is written anyway.
    cfg = make_cfg("logger=[tensorboard,wandb,mlflow]", "mfu.peak_flops=1e12", "probe.enabled=false")
    summary = pipeline.train(cfg).summary
    run = Path(cfg.run_dir)
    per_token = flops_per_token(pipeline.model_config(cfg, 384), cfg.data.seq_len)

    header, rows = metrics_rows(run)
    assert [h for h in header if "tokens_per_sec" in h] == ["train/tokens_per_sec"]  # timed in one place
    logged = [r for r in rows if r["train/tokens_per_sec"]]
    assert [int(r["step"]) for r in logged] == list(range(cfg.trainer.max_steps))  # once per step, from the first
    for r in logged:
        # Both values pass through float32 when logged: 1e-5 relative is a few float32 ulps of each.
        expected = float(r["train/tokens_per_sec"]) * per_token / 1e12
        assert float(r["train/mfu"]) == pytest.approx(expected, rel=1e-5)
    # The summary's totals come from the same callback, in float64.
    assert summary["peak_flops"] == 1e12
    assert summary["mfu"] == pytest.approx(summary["tokens_per_sec"] * per_token / 1e12, rel=1e-12)
    assert summary["tokens_per_sec"] == pytest.approx(summary["train_tokens"] / summary["train_seconds"], rel=1e-12)
    # One clock for both: with log_every_n_steps=1 each logged rate is one batch's tokens over that batch's seconds,
    # so the batch times they imply add up to the summary's train_seconds (float32 rounding: 1e-5 relative).
    tokens_per_batch = cfg.data.batch_size * cfg.data.seq_len
    implied = sum(tokens_per_batch / float(r["train/tokens_per_sec"]) for r in logged)
    assert cfg.trainer.log_every_n_steps == 1 and implied == pytest.approx(summary["train_seconds"], rel=1e-5)

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0])).Reload()
    assert {"train/tokens_per_sec", "train/mfu", "val/loss"} <= set(scalars.Tags()["scalars"])

    (offline_run,) = (run / "wandb").glob("offline-run-*")
    (records,) = offline_run.glob("run-*.wandb")
    assert b"train/mfu" in records.read_bytes()  # the key is stored verbatim in the protobuf records

    (mfu_file,) = (run / "mlruns").glob("*/*/metrics/train/mfu")
    assert len(mfu_file.read_text().splitlines()) == cfg.trainer.max_steps


def test_without_a_known_peak_mfu_is_not_logged_on_cpu(make_cfg):
    cfg = make_cfg("trainer.max_steps=2", "probe.enabled=false")
    summary = pipeline.train(cfg).summary
    header, _ = metrics_rows(Path(cfg.run_dir))
    assert "train/tokens_per_sec" in header and "train/mfu" not in header
    assert summary["mfu"] is None and summary["peak_flops"] is None and summary["tokens_per_sec"] > 0


@pytest.mark.parametrize("value", ["-1", "0", "abc", "inf"])
def test_a_bad_peak_is_refused_before_anything_is_written(make_cfg, value):
    cfg = make_cfg(f"mfu.peak_flops={value}")
    with pytest.raises(ConfigError, match="mfu.peak_flops"):
        pipeline.train(cfg)
    assert not Path(cfg.run_dir).exists()


def test_a_missing_logger_package_is_named_before_the_data_is_prepared(make_cfg, monkeypatch):
    # As if wandb were not installed: its logger's module name points nowhere. A ConfigError is a UserError, which
    # run.py prints as one line with exit status 2 (tests/test_train.py checks that path).
    monkeypatch.setitem(run_dir_module.LOGGER_PACKAGES, "WandbLogger", ("wandb_not_installed", "wandb"))
    cfg = make_cfg("logger=[csv,wandb]")
    with pytest.raises(ConfigError) as err:
        pipeline.train(cfg)
    assert str(err.value) == (
        "logger=wandb needs the `wandb_not_installed` package, which is not installed: pip install wandb"
    )
    assert not Path(cfg.run_dir).exists()


def test_overwrite_removes_the_previous_runs_logger_folders(tmp_path):
    for name in ("tensorboard", "wandb", "mlruns"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "old").write_text("previous run")
    (tmp_path / "summary.json").write_text(json.dumps({}))
    claim_run_dir(tmp_path, OmegaConf.create({"ckpt_path": None, "overwrite": True}))
    assert not any((tmp_path / name).exists() for name in ("tensorboard", "wandb", "mlruns", "summary.json"))
    assert set(run_dir_module.RUN_OUTPUTS) >= {"tensorboard", "wandb", "mlruns"}
