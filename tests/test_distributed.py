"""Multi-process training on CPU (gloo, 2 ranks): FSDP2 and DDP match one process on the same global
batch, sharded checkpoints resume exactly and consolidate into a single-device checkpoint. A streamed dataset
(`data=hf_stream`) counts what 2 ranks read, resumes exactly, and stops both ranks when one rank's stream ends.

Deselect locally with `-m "not distributed"`."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import offline_env
from datasets.distributed import split_dataset_by_node
from test_streaming import WORDS, write_corpus

from project.checkpoint import consolidate, is_sharded_checkpoint, load_model
from project.data import StreamingDataModule
from project.data.stream import stream_documents, token_chunks
from project.data.tokenizer import train_tokenizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# Sums over a batch split across ranks are reduced in another order: float32 round-off only.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 2e-5


def launch(run_dir: Path, cache: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`run.py` in a session of its own: on a timeout the whole process group (both ranks and their dataloader
    workers) is killed, so a hung rank cannot outlive the test."""
    cmd = [sys.executable, "run.py", "experiment=smoke", f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}",
           "trainer.val_check_interval=3", *overrides]  # fmt: skip
    env = {**offline_env(cache), "JTOK_CACHE_DIR": str(cache)}  # one thread per process: 2 ranks on 2 cores
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(run_dir: Path, cache: Path, *overrides: str) -> dict:
    proc = launch(run_dir, cache, *overrides)
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


DENSE = "optim.table_optimizer=adamw"  # dense table gradients here; test_distributed_tables.py covers row-sparse ones


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist_cache")


@pytest.mark.parametrize(
    "variant, extra",
    [("baseline", []), ("jtok_m", []), ("moe_jtok_m", ["model.moe_bias_update_rate=0.01"])],
)
def test_fsdp_matches_one_process_on_the_same_global_batch(variant, extra, cache, tmp_path):
    single = run(tmp_path / "single", cache, f"model={variant}", DENSE, "data.batch_size=4", *extra)
    sharded = run(tmp_path / "fsdp", cache, f"model={variant}", DENSE, *two_ranks("fsdp"), *extra)
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
    overrides = ["model=jtok_m", DENSE, *two_ranks("fsdp"), "checkpoint.every_n_train_steps=3", "checkpoint.keep_all=true"]
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
    sharded = run(tmp_path / "fsdp", cache, "model=moe_jtok", DENSE, *two_ranks("fsdp"))
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
    single = run(tmp_path / "single", cache, "model=moe_jtok_m", DENSE, "data.batch_size=4")
    ddp = run(tmp_path / "ddp", cache, "model=moe_jtok_m", DENSE, *two_ranks("ddp"))
    assert_same_run(tmp_path / "single", tmp_path / "ddp")
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=LOSS_RTOL)


# data=hf_stream on 2 ranks x 2 dataloader workers: 4 files, one per (rank, worker) stream.
STREAM_RANKS, STREAM_WORKERS, STREAM_BATCH, STREAM_SEQ_LEN = 2, 2, 2, 32  # seq_len: experiment=smoke's
STREAM_VAL_FRACTION = 0.1


@pytest.fixture
def hub_offline(monkeypatch) -> None:
    """This process reads the local test corpus too (to know what the ranks read): never through the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def stream_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist_stream_tok") / "tokenizer.json"
    texts = [" ".join(WORDS)] * 4 + [f"d{i}_{j}" for i in range(9) for j in range(10)]  # as test_streaming's
    train_tokenizer(iter(texts), 300, 1).save(str(path))
    return path


def stream_overrides(folder: Path, tokenizer: Path) -> list[str]:
    return ["data=hf_stream", f"data.source.name={folder}", "data.source.config=null", f"data.tokenizer.path={tokenizer}",
            f"data.source.val_fraction={STREAM_VAL_FRACTION}", "data.max_val_batches=2",
            f"data.num_workers={STREAM_WORKERS}", "model=jtok_m", *two_ranks("ddp")]  # fmt: skip


def stream_datamodule(folder: Path, tokenizer: Path) -> StreamingDataModule:
    dm = StreamingDataModule({"name": str(folder), "val_fraction": STREAM_VAL_FRACTION}, {"path": str(tokenizer)},
                             seq_len=STREAM_SEQ_LEN, batch_size=STREAM_BATCH, num_workers=STREAM_WORKERS)  # fmt: skip
    dm.prepare_data()
    return dm


def rank_streams(dm, rank: int, stream: int):
    """The documents of (rank, stream), as the training run's dataloader worker reads them."""
    rank_part = split_dataset_by_node(dm.dataset, rank=rank, world_size=STREAM_RANKS)
    return stream_documents(rank_part, STREAM_WORKERS, stream)


def documents_touched(dm, rank: int, stream: int, tokens: int) -> int:
    """Documents with a token among the first `tokens` + 1 of the stream (its windows overlap by one token):
    counted from the EOS after each document, independently of the datamodule's running count."""
    chunks = token_chunks(rank_streams(dm, rank, stream), dm.tokenizer, "text", STREAM_VAL_FRACTION, "train")
    ids = np.concatenate([chunk.ids for chunk in chunks])
    assert len(ids) > tokens, "the test corpus is too small for the run"
    return int((ids[:tokens] == dm.eos_id).sum()) + 1


def test_streamed_training_counts_what_both_ranks_read_and_resumes_exactly(cache, tmp_path, stream_tokenizer,
                                                                          hub_offline):  # fmt: skip
    write_corpus(tmp_path / "ds", files=STREAM_RANKS * STREAM_WORKERS, docs_per_file=150)
    overrides = [*stream_overrides(tmp_path / "ds", stream_tokenizer), "checkpoint.keep_all=true"]
    full = run(tmp_path / "full", cache, *overrides)
    data = full["data"]
    # Each rank trains on STEPS batches of STREAM_BATCH windows, its workers' streams taking turns.
    windows = STEPS * STREAM_BATCH * STREAM_RANKS
    assert data["streaming"] is True and full["steps"] == STEPS
    assert data["windows_read"] == windows and data["tokens_read"] == windows * STREAM_SEQ_LEN == full["train_tokens"]
    dm = stream_datamodule(tmp_path / "ds", stream_tokenizer)
    per_stream = STEPS // STREAM_WORKERS * STREAM_BATCH * STREAM_SEQ_LEN  # tokens each stream's windows advanced
    expected = sum(documents_touched(dm, rank, stream, per_stream)
                   for rank in range(STREAM_RANKS) for stream in range(STREAM_WORKERS))  # fmt: skip
    assert data["documents_read"] == expected

    midway = tmp_path / "full/checkpoints/step0000003.ckpt"  # 3 batches per rank: both resume at their stream 1
    resumed = run(tmp_path / "resumed", cache, *overrides, f"ckpt_path={midway}")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert set(b) == {3, 4, 5}
    # Same weights, optimizer state, batches and process layout: the gradient all-reduce of 2 ranks adds the same two
    # numbers, so the losses are bit-identical in practice; rel=1e-6 (~8 float32 ulp) does not rely on it. A rank
    # resuming at another window gives losses that differ in the second decimal.
    for step in (3, 4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)
    assert resumed["data"] == data  # the gathered positions and counts continue from the checkpoint
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)


def shorten_stream(folder: Path, tokenizer: Path, rank: int, batches: int) -> None:
    """Cut the file that stream 0 of `rank` reads to its first records that fill `batches` batches, not one more
    (a batch of windows overlapping by one token takes STREAM_BATCH x STREAM_SEQ_LEN tokens, plus one at the end)."""
    first = next(iter(rank_streams(stream_datamodule(folder, tokenizer), rank, 0)))["text"]  # "dF_0 ...": file F
    path = folder / f"part{first.split('_')[0][1:]}.jsonl"
    records = path.read_text().splitlines(keepends=True)
    per_batch = STREAM_BATCH * STREAM_SEQ_LEN
    for lines in range(1, len(records)):
        path.write_text("".join(records[:lines]))
        dm = stream_datamodule(folder, tokenizer)
        chunks = token_chunks(rank_streams(dm, rank, 0), dm.tokenizer, "text", STREAM_VAL_FRACTION, "train")
        tokens = sum(len(chunk.ids) for chunk in chunks)
        if tokens > batches * per_batch:
            assert tokens <= (batches + 1) * per_batch, tokens  # one record is shorter than a batch
            return
    raise AssertionError(f"the file does not fill {batches} batches")


def test_a_stream_holding_just_the_run_s_windows_trains_to_the_end(cache, tmp_path, stream_tokenizer, hub_offline):
    """Lightning asks for one batch beyond the last step: the stream must not fail for want of it."""
    folder = tmp_path / "ds"
    write_corpus(folder, files=STREAM_RANKS * STREAM_WORKERS, docs_per_file=150)
    shorten_stream(folder, stream_tokenizer, 1, batches=STEPS // STREAM_WORKERS)  # stream 0 of rank 1: 3 batches
    summary = run(tmp_path / "run", cache, *stream_overrides(folder, stream_tokenizer))
    assert summary["steps"] == STEPS and summary["data"]["windows_read"] == STEPS * STREAM_BATCH * STREAM_RANKS


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stream_ending_on_one_rank_stops_both_with_its_error(cache, tmp_path, stream_tokenizer, hub_offline, rank):
    """Rank 0 is the process run.py started; rank 1 is the one Lightning launched. Whichever runs out first, the run
    exits non-zero with the StreamEndedError message, and neither rank waits for the other in a collective."""
    folder = tmp_path / "ds"
    write_corpus(folder, files=STREAM_RANKS * STREAM_WORKERS, docs_per_file=150)
    shorten_stream(folder, stream_tokenizer, rank, batches=1)  # the rank's 3rd batch is not there: a mid-run end
    start = time.monotonic()
    proc = launch(tmp_path / "run", cache, *stream_overrides(folder, stream_tokenizer), timeout=300)
    seconds = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert f"training stream 0 of {STREAM_WORKERS}" in proc.stderr and "ended after" in proc.stderr, proc.stderr[-4000:]
    print(f"rank {rank} ran out: exit status {proc.returncode} after {seconds:.0f} s")
