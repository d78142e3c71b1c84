"""The train stage end to end: config composition, every variant through the pipeline, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project import pipeline
from project.checkpoint import AtomicCheckpointIO, CheckpointError, load_model, read_checkpoint
from project.config import VARIANTS, ConfigError
from project.io import atomic_write_text
from project.lit_module import LMModule, NonFiniteLossError
from project.pipeline import model_config
from project.run_dir import TrainingInterrupted
from stages import train

from conftest import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"variant", "params", "flops_per_token", "train_tokens", "steps", "val_loss", "val_ppl", "tokens_per_sec", "eval"}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(run_dir) if r.get("train/loss")}


def flip_weight_bytes(path: Path, count: int) -> None:
    """Invert `count` bytes in the middle of the checkpoint's largest tensor (a stored zip entry under data/)."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len + (entry.file_size - count) // 2
    raw[start : start + count] = bytes(b ^ 0xFF for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_model_option_composes_to_its_variant(variant):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={variant}"])
    assert cfg.model.variant == variant
    assert cfg.model.max_seq_len == cfg.data.seq_len
    assert model_config(cfg, vocab_size=2048).vocab_size == 2048


def test_unknown_model_option_names_the_valid_ones():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose(config_name="config", overrides=["model=jtok_q"])
    assert all(name in str(err.value) for name in VARIANTS)


def test_unknown_variant_value_names_the_valid_ones(make_cfg):
    cfg = make_cfg("model.variant=jtok_q")
    with pytest.raises(ConfigError, match="valid variants: baseline, jtok, jtok_m, moe, moe_jtok, moe_jtok_m"):
        model_config(cfg, vocab_size=100)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_dev_run(variant, make_cfg):
    cfg = make_cfg(f"model={variant}")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    module = LMModule(model=model_config(cfg, dm.vocab_size), optim=dict(cfg.optim))
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=2, logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pipeline_trains_every_variant_and_writes_a_complete_run_dir(variant, make_cfg, tmp_path):
    cfg = make_cfg(f"model={variant}", "trainer.max_steps=12", "optim.lr=1e-2")
    summary = train(cfg)
    run = Path(cfg.run_dir)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert SUMMARY_KEYS <= set(on_disk)
    assert set(on_disk["params"]) == {"total", "backbone", "token_indexed", "active_per_token"}
    assert on_disk["variant"] == variant and on_disk["steps"] == 12 and on_disk["eval"] == {}
    assert on_disk["train_tokens"] == 12 * cfg.data.batch_size * cfg.data.seq_len
    m = cfg.model
    V = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"].__len__()
    expected_ti = {"none": 0, "jtok": m.n_layers * V * m.d_model, "jtok_m": m.n_layers * m.jtokm_tables * V * m.d_model}
    assert on_disk["params"]["token_indexed"] == expected_ti[VARIANTS[variant][1]]
    assert on_disk["val_ppl"] == pytest.approx(math.exp(on_disk["val_loss"]))
    losses = train_losses(run)
    assert losses[max(losses)] < losses[min(losses)]  # it learns
    assert on_disk["val_loss"] < math.log(V)
    for name in ("config.yaml", "metrics.csv", "tokenizer.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name


def test_resume_from_a_checkpoint_continues_the_same_run(make_cfg, tmp_path):
    full = make_cfg("model=jtok_m", "trainer.max_steps=6", "checkpoint.keep_all=true", run_dir=tmp_path / "full")
    train(full)
    midway = tmp_path / "full/checkpoints/step0000003.ckpt"  # as if the run had stopped after step 3
    resumed = make_cfg("model=jtok_m", "trainer.max_steps=6", f"ckpt_path={midway}", run_dir=tmp_path / "resumed")
    summary = train(resumed)
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert summary["steps"] == 6 and set(b) == {3, 4, 5}
    # The resumed steps redo the same computation from exact copies of weights, optimizer and sampler state in the
    # same process, so the losses come out bit-identical in practice; rel=1e-6 (~8 float32 ulp) does not rely on it.
    for step in (3, 4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    assert summary["train_tokens"] == 6 * full.data.batch_size * full.data.seq_len


def test_resume_rejects_a_checkpoint_of_another_model(make_cfg, tmp_path):
    train(make_cfg("model=baseline", "trainer.max_steps=3", run_dir=tmp_path / "a"))
    cfg = make_cfg("model=jtok", f"ckpt_path={tmp_path / 'a/checkpoints/last.ckpt'}", run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="variant: checkpoint 'baseline' vs config 'jtok'"):
        train(cfg)
    assert not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_unreadable_or_missing_checkpoint_fails_before_training(make_cfg, tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content is not None:
        path.write_bytes(content)
    cfg = make_cfg(f"ckpt_path={path}")
    with pytest.raises((ValueError, FileNotFoundError), match="bad.ckpt"):
        train(cfg)


def test_model_vocabulary_smaller_than_the_tokenizer_is_rejected(make_cfg):
    with pytest.raises(ConfigError, match="smaller than the tokenizer's vocabulary"):
        train(make_cfg("model.vocab_size=100"))


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(make_cfg, monkeypatch):
    cfg = make_cfg("trainer.max_steps=8", "checkpoint.every_n_train_steps=2")
    real = LMModule._losses

    def poisoned(self, batch):
        ce, aux, n = real(self, batch)
        return (ce * float("nan") if self.training and self.global_step >= 5 else ce), aux, n

    monkeypatch.setattr(LMModule, "_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        train(cfg)
    ckpt = torch.load(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_run_py_command_line(data_cache, tmp_path):
    run_dir = tmp_path / "cli"
    env = {**os.environ, "JTOK_CACHE_DIR": str(data_cache), "OMP_NUM_THREADS": "1"}
    proc = run_cli(env, "experiment=smoke", "model=moe_jtok", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["variant"] == "moe_jtok" and summary["steps"] == 6
    assert "- model=moe_jtok" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    bad = run_cli(env, "experiment=smoke", "model=jtok_q", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "baseline" in bad.stderr and "jtok_m" in bad.stderr

    # A second run into the same dir is refused before it writes anything, Hydra's records included.
    records = {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()}
    again = run_cli(env, "experiment=smoke", "model=jtok", f"hydra.run.dir={run_dir}")
    assert again.returncode == 2 and f"error: {run_dir} already holds a run" in again.stderr
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == records


def test_a_user_error_is_one_message_and_status_2_also_under_multirun(data_cache, tmp_path):
    env = {**os.environ, "JTOK_CACHE_DIR": str(data_cache), "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "missing.ckpt"
    proc = run_cli(env, "-m", "model=baseline,jtok", "experiment=smoke", f"ckpt_path={missing}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert f"error: checkpoint {missing} does not exist" in proc.stderr


def test_a_bug_keeps_its_traceback(data_cache, tmp_path):
    env = {**os.environ, "JTOK_CACHE_DIR": str(data_cache), "OMP_NUM_THREADS": "1"}
    code = "import runpy, stages; stages.report = lambda cfg: 1 / 0; runpy.run_path('run.py', run_name='__main__')"
    bug = subprocess.run([sys.executable, "-c", code, "stage=report", "runs=x", f"hydra.run.dir={tmp_path / 'r'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bug.returncode == 1 and "ZeroDivisionError" in bug.stderr and "error:" not in bug.stderr


def test_a_flops_budget_sets_the_number_of_steps(make_cfg):
    from project.accounting import flops_per_token
    probe = make_cfg("model=jtok_m")
    per_step = flops_per_token(model_config(probe, vocab_size=384), 32) * 4 * 32
    summary = train(make_cfg("model=jtok_m", f"train_flops={7.5 * per_step}"))
    assert summary["steps"] == 7
    assert summary["train_tokens"] * summary["flops_per_token"] <= 7.5 * per_step
    with pytest.raises(ConfigError, match="less than one step"):
        train(make_cfg("model=jtok_m", f"train_flops={0.5 * per_step}"))


def test_a_finished_run_is_never_overwritten_and_resuming_in_place_keeps_its_metrics(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg("trainer.max_steps=6", "checkpoint.keep_all=true", run_dir=run_dir))
    before = (run_dir / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_cfg("trainer.max_steps=6", run_dir=run_dir))
    assert (run_dir / "metrics.csv").read_text() == before

    midway = run_dir / "checkpoints" / "step0000003.ckpt"
    train(make_cfg("trainer.max_steps=6", f"ckpt_path={midway}", run_dir=run_dir))
    losses = train_losses(run_dir)
    assert sorted(losses) == [0, 1, 2, 3, 4, 5]  # steps 0-2 from before the resume, 3-5 after it
    train(make_cfg("trainer.max_steps=6", "overwrite=true", run_dir=run_dir))


def test_overwrite_starts_clean_and_lightning_writes_last_ckpt_under_its_name(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg("trainer.max_steps=6", "checkpoint.keep_all=true", run_dir=run_dir))
    (run_dir / "eval.json").write_text("{}")
    again = ("trainer.max_steps=4", "checkpoint.every_n_train_steps=2", "overwrite=true")
    summary = train(make_cfg(*again, run_dir=run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step0000004.ckpt"]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == summary["steps"] == 4
    assert not (run_dir / "eval.json").exists() and sorted(train_losses(run_dir)) == [0, 1, 2, 3]


def test_metrics_logged_before_a_resume_stay_on_disk_throughout_the_resumed_run(make_cfg, tmp_path):
    """So a kill -9 at any moment of the resumed run keeps them (no `finally:` puts them back)."""
    run_dir = tmp_path / "run"
    train(make_cfg("trainer.max_steps=6", "checkpoint.keep_all=true", run_dir=run_dir))
    earlier = [r for r in read_metrics(run_dir) if int(r["step"]) < 3]
    on_disk: list[list[dict[str, str]]] = []

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            on_disk.append(read_metrics(run_dir))

    cfg = make_cfg("trainer.max_steps=6", f"ckpt_path={run_dir / 'checkpoints' / 'step0000003.ckpt'}", run_dir=run_dir)
    pipeline.train(cfg, callbacks=lambda datamodule: [Snapshot()])
    assert len(on_disk) == 3 and all(rows[: len(earlier)] == earlier for rows in on_disk)


def test_resume_refuses_another_tokenizer_or_data_source_naming_the_field(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=3", "model.vocab_size=384", run_dir=tmp_path / "a"))
    resume = [f"ckpt_path={tmp_path / 'a/checkpoints/last.ckpt'}", "model.vocab_size=384"]
    other_tokenizer = r"data\.tokenizer\.sha256: checkpoint '[0-9a-f]{64}' vs config '[0-9a-f]{64}'"
    with pytest.raises(ConfigError, match=other_tokenizer):
        train(make_cfg(*resume, "data.tokenizer.vocab_size=320", run_dir=tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"data\.source\.num_entities: checkpoint 40 vs config 41"):
        train(make_cfg(*resume, "data.source.num_entities=41", run_dir=tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"optim\.lr: checkpoint 0\.003 vs config 0\.01"):
        train(make_cfg(*resume, "optim.lr=0.01", run_dir=tmp_path / "d"))


def test_a_checkpoint_with_flipped_weight_bytes_is_refused_naming_the_file(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=3", run_dir=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    load_model(ckpt)
    flip_weight_bytes(ckpt, 400)
    torch.load(ckpt, weights_only=False)  # torch itself reads the damaged file without a word
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is corrupt"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is corrupt"):
        train(make_cfg(f"ckpt_path={ckpt}", run_dir=tmp_path / "b"))


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_stops_with_an_error(make_cfg, tmp_path):
    class Terminate(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    cfg = make_cfg("trainer.max_steps=6", "checkpoint.every_n_train_steps=100", run_dir=run_dir)
    with pytest.raises(TrainingInterrupted, match=f"stopped by SIGTERM at step 4; resume with ckpt_path={last}") as err:
        pipeline.train(cfg, callbacks=lambda datamodule: [Terminate()])
    assert err.value.signum == signal.SIGTERM and read_checkpoint(last)["global_step"] == 4
    assert train(make_cfg("trainer.max_steps=6", f"ckpt_path={last}", run_dir=run_dir))["steps"] == 6


def test_no_leftovers_orphan_steps_or_temporaries_and_files_get_the_usual_mode(make_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(make_cfg("trainer.max_steps=6", "checkpoint.keep_all=true", run_dir=run_dir))
    (run_dir / "checkpoints" / ".last.ckpt.tmp").write_bytes(b"half")  # what a kill during a write leaves
    midway = run_dir / "checkpoints" / "step0000003.ckpt"
    train(make_cfg("trainer.max_steps=9", f"ckpt_path={midway}", run_dir=run_dir))  # keep_all=false from here on
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step0000009.ckpt"]

    umask = os.umask(0)
    os.umask(umask)
    for name in ("summary.json", "config.yaml", "tokenizer.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(atomic_write_text(tmp_path / "x.txt", "x").stat().st_mode) == 0o666 & ~umask

    def disk_full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    (tmp_path / "c").mkdir()
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "c" / "x.ckpt")
    assert list((tmp_path / "c").iterdir()) == []


def test_real_text_experiment_trains_at_smoke_size(data_cache, tmp_path):
    """experiment=text_ablation (docstrings of installed packages, one pass) on one small package's docstrings."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=text_ablation", "model=jtok_m", "data.source.packages=[omegaconf]",
            "data.tokenizer.vocab_size=512", "data.seq_len=32", "data.batch_size=4", "train_epochs=0.5",
            "data.max_val_batches=2", "eval.enabled=false",
        ])  # fmt: skip
    with open_dict(cfg):
        cfg.run_dir, cfg.data.cache_dir = str(tmp_path / "run"), str(data_cache)
    summary = train(cfg)
    assert summary["data"]["epochs"] <= 1.0 and summary["steps"] >= 3  # one pass at most, as the experiment says
    assert summary["val_loss"] < math.log(512)
