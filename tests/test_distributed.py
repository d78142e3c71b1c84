"""Multi-process training on CPU (gloo, 2 ranks): FSDP2 and DDP match one process on the same global
batch, sharded checkpoints resume exactly and consolidate into a single-device checkpoint.

Deselect locally with `-m "not distributed"`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import offline_env
from project.checkpoint import consolidate, is_sharded_checkpoint, load_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# Sums over a batch split across ranks are reduced in another order: float32 round-off only.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 2e-5


def run(run_dir: Path, cache: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "run.py", "experiment=smoke", f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}",
           "trainer.val_check_interval=3", *overrides]  # fmt: skip
    env = {**offline_env(cache), "JTOK_CACHE_DIR": str(cache)}  # one thread per process: 2 ranks on 2 cores
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model(ckpt).model.state_dict()


def assert_same_run(a: Path, b: Path, steps=range(STEPS)) -> None:
    la, lb = losses(a), losses(b)
    for step in steps:
        assert lb[step] == pytest.approx(la[step], rel=LOSS_RTOL), (step, la, lb)


def two_ranks(strategy: str) -> list[str]:
    return [f"trainer={strategy}", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist_cache")


@pytest.mark.parametrize(
    "variant, extra",
    [("baseline", []), ("jtok_m", []), ("moe_jtok_m", ["model.moe_bias_update_rate=0.01"])],
)
def test_fsdp_matches_one_process_on_the_same_global_batch(variant, extra, cache, tmp_path):
    single = run(tmp_path / "single", cache, f"model={variant}", "data.batch_size=4", *extra)
    sharded = run(tmp_path / "fsdp", cache, f"model={variant}", *two_ranks("fsdp"), *extra)
    assert_same_run(tmp_path / "single", tmp_path / "fsdp")
    assert sharded["train_tokens"] == single["train_tokens"] == STEPS * 4 * 32
    assert sharded["val_loss"] == pytest.approx(single["val_loss"], rel=LOSS_RTOL)
    assert is_sharded_checkpoint(tmp_path / "fsdp/checkpoints/last.ckpt")
    a, b = weights(Path(single["checkpoint"])), weights(Path(sharded["checkpoint"]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=WEIGHT_ATOL, rtol=1e-4, msg=name)
    if "moe_bias_update_rate=0.01" in extra:
        biases = [k for k in a if k.endswith("expert_bias")]
        assert biases and any(a[k].abs().sum() > 0 for k in biases)  # the bias moved, identically


def test_sharded_checkpoint_resumes_on_the_same_trajectory_and_consolidates(cache, tmp_path):
    overrides = ["model=jtok_m", *two_ranks("fsdp"), "checkpoint.every_n_train_steps=3", "checkpoint.keep_all=true"]
    full = run(tmp_path / "full", cache, *overrides)
    midway = tmp_path / "full/checkpoints/step0000003.ckpt"
    assert is_sharded_checkpoint(midway)
    resumed = run(tmp_path / "resumed", cache, *overrides, f"ckpt_path={midway}")
    assert set(losses(tmp_path / "resumed")) == {3, 4, 5}
    assert_same_run(tmp_path / "full", tmp_path / "resumed", steps=range(3, STEPS))
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=LOSS_RTOL)

    out = consolidate(tmp_path / "full/checkpoints/last.ckpt", tmp_path / "one.ckpt")
    loaded = load_model(out)
    assert loaded.config.variant == "jtok_m"
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded.model(ids).logits, load_model(full["checkpoint"]).model(ids).logits)


def test_consolidated_checkpoint_evaluates_on_one_process_to_the_sharded_run_s_val_loss(cache, tmp_path):
    sharded = run(tmp_path / "fsdp", cache, "model=moe_jtok", *two_ranks("fsdp"))
    import hydra
    import lightning as L
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from project.lit_module import LMModule

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=smoke"])
    with open_dict(cfg):
        cfg.data.cache_dir = str(cache)
    module = LMModule.load_from_checkpoint(sharded["checkpoint"], map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    val = trainer.validate(module, datamodule=hydra.utils.instantiate(cfg.data), verbose=False)[0]
    assert val["val/loss"] == pytest.approx(sharded["val_loss"], rel=LOSS_RTOL)


def test_ddp_matches_one_process_on_the_same_global_batch(cache, tmp_path):
    single = run(tmp_path / "single", cache, "model=moe_jtok_m", "data.batch_size=4")
    ddp = run(tmp_path / "ddp", cache, "model=moe_jtok_m", *two_ranks("ddp"))
    assert_same_run(tmp_path / "single", tmp_path / "ddp")
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=LOSS_RTOL)
