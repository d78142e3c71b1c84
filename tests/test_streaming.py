"""data=hf_stream: windows packed as the cache packs them, a partition of the documents over ranks and dataloader
workers, exact resume, training end to end, and the errors a stream has that a cache has not."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from omegaconf import open_dict

from project import pipeline
from project.config import ConfigError
from project.data import DatasetUnavailableError, StreamEndedError, StreamingDataModule
from project.data.cache import write_tokens
from project.data.inputs import split_of
from project.data.stream import stream_documents
from project.data.tokenizer import EOS, train_tokenizer
from project.data.windows import TokenWindows
from stages import train

WORDS = "the a cat dog sat on mat with red blue green house tree river stone light".split()
VAL_FRACTION = 0.1


def write_corpus(folder: Path, files: int, docs_per_file: int, suffix: str = "jsonl") -> list[str]:
    """Documents tagged `dF_I` in .jsonl or .parquet files, plus records a stream skips (null and empty text)."""
    rng = random.Random(files * 1000 + docs_per_file)
    folder.mkdir(parents=True)
    documents = []
    for f in range(files):
        texts = [f"d{f}_{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for i in range(docs_per_file)]
        documents += texts
        records = [{"text": t} for t in texts[:3]] + [{"text": None}, {"text": ""}] + [{"text": t} for t in texts[3:]]
        if suffix == "jsonl":
            (folder / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            pq.write_table(pa.Table.from_pylist(records), folder / f"part{f}.parquet", row_group_size=16)
    return documents


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream_tok") / "tokenizer.json"
    train_tokenizer(iter([" ".join(WORDS)] * 4 + [f"d{i}_{j}" for i in range(9) for j in range(10)]), 300, 1).save(str(path))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def datamodule(folder: Path, tokenizer: Path, **settings) -> StreamingDataModule:
    settings = {"seq_len": 8, "batch_size": 2, "num_workers": 0, "max_val_batches": 2, **settings}
    dm = StreamingDataModule({"name": str(folder), "val_fraction": VAL_FRACTION}, {"path": str(tokenizer)}, **settings)
    dm.setup()
    return dm


def read_all(dm: StreamingDataModule, rank: int = 0, world: int = 1) -> list[tuple[int, torch.Tensor]]:
    """Every training batch of one (simulated) rank until its streams end: (stream, batch of windows)."""
    dm._rank_and_world = lambda: (rank, world)  # type: ignore[method-assign]
    batches, ended = [], ""
    loader = iter(dm.train_dataloader())
    try:
        for inputs, targets, tag in loader:
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            batches.append((tag["stream"], torch.cat([inputs, targets[:, -1:]], dim=1)))
    except StreamEndedError as e:
        ended = str(e)
        e.__traceback__ = None  # it holds the loader in a reference cycle, which would shut its workers down late
    del loader
    assert "ended after" in ended
    return batches


def stream_texts(dm: StreamingDataModule, batches: list[tuple[int, torch.Tensor]]) -> dict[int, list[str]]:
    """Each stream's documents, decoded from its windows (which overlap by one token) and cut at EOS."""
    ids: dict[int, list[int]] = {}
    for stream, windows in batches:
        for window in windows.tolist():
            ids.setdefault(stream, window[:1])
            ids[stream] += window[1:]
    return {s: dm.tokenizer.decode(t, skip_special_tokens=False).split(EOS) for s, t in ids.items()}


def test_windows_equal_the_cache_packing_of_the_same_documents(tmp_path, tokenizer_path):
    documents = write_corpus(tmp_path / "ds", files=2, docs_per_file=40, suffix="parquet")
    dm = datamodule(tmp_path / "ds", tokenizer_path, batch_size=1)
    streamed = torch.cat([windows for _, windows in read_all(dm)])

    train_docs = [d for d in documents if split_of(d, VAL_FRACTION) == "train"]
    count, tokens = write_tokens(dm.tokenizer, train_docs, tmp_path / "train.bin", np.dtype(np.uint16), dm.eos_id, "train")
    cached = TokenWindows(tmp_path / "train.bin", "uint16", tokens, seq_len=8)
    assert count == len(train_docs) and len(cached) == len(streamed) > 20
    assert torch.equal(streamed, torch.stack([cached[i] for i in range(len(cached))]))
    # Validation: the held-out documents only, packed the same way, the first max_val_batches x batch_size windows.
    val_docs = [d for d in documents if split_of(d, VAL_FRACTION) == "val"]
    _, val_tokens = write_tokens(dm.tokenizer, val_docs, tmp_path / "val.bin", np.dtype(np.uint16), dm.eos_id, "val")
    val = TokenWindows(tmp_path / "val.bin", "uint16", val_tokens, seq_len=8, max_windows=2)
    assert torch.equal(dm.val_dataset, torch.stack([val[i] for i in range(2)]))


@pytest.mark.parametrize("files, world, workers", [(4, 1, 2), (4, 2, 2), (3, 2, 2), (3, 2, 0)])
def test_ranks_and_workers_read_disjoint_documents_that_cover_the_train_split(tmp_path, tokenizer_path, files, world,
                                                                              workers):  # fmt: skip
    """4 files over 2 ranks x 2 workers: one file each; 3 files: some ranks split a file's examples. Each stream
    (rank, worker) holds a part of the documents; the parts partition the train split, and each stream's windows
    hold its part in order, up to where the first stream to end stopped the run."""
    documents = write_corpus(tmp_path / "ds", files=files, docs_per_file=12)
    train_docs = [d for d in documents if split_of(d, VAL_FRACTION) == "train"]
    parts: list[str] = []
    for rank in range(world):
        dm = datamodule(tmp_path / "ds", tokenizer_path, num_workers=workers, max_val_batches=1)
        streams = max(workers, 1)
        expected = {j: [t for r in stream_documents(split_dataset_by_node(dm.dataset, rank, world), streams, j).iter(8)
                        for t in r["text"] if t and split_of(t, VAL_FRACTION) == "train"] for j in range(streams)}
        parts += [t for part in expected.values() for t in part]
        batches = read_all(dm, rank, world)
        assert [s for s, _ in batches][: 2 * streams] == [i % streams for i in range(2 * streams)]  # workers take turns
        for stream, (*whole, last) in stream_texts(dm, batches).items():
            assert whole == expected[stream][: len(whole)]
            following = expected[stream][len(whole) :]  # from the document being read when the run stopped
            assert following[0].startswith(last) if last else True
    assert sorted(parts) == sorted(train_docs)  # disjoint, and together the whole train split


@pytest.mark.parametrize("workers, stop", [(0, 3), (2, 3), (2, 4)])
def test_resume_continues_with_the_windows_an_uninterrupted_run_reads(tmp_path, tokenizer_path, workers, stop):
    write_corpus(tmp_path / "ds", files=2, docs_per_file=60)
    full = datamodule(tmp_path / "ds", tokenizer_path, num_workers=workers)
    batches = []
    for index, batch in enumerate(full.train_dataloader()):
        batches.append(full.on_before_batch_transfer(batch, 0))  # as Lightning does before training on it
        if index + 1 == stop:
            state = full.state_dict()
        if index + 1 == stop + 5:
            break
    resumed = datamodule(tmp_path / "ds", tokenizer_path, num_workers=workers)
    resumed.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=False))  # through a checkpoint file
    loader = iter(resumed.train_dataloader())
    for expected in batches[stop:]:
        inputs, targets = resumed.on_before_batch_transfer(next(loader), 0)
        assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    assert resumed.data_record()["windows_read"] == full.data_record()["windows_read"] == (stop + 5) * 2
    assert resumed.data_record()["documents_read"] == full.data_record()["documents_read"]


def _saved(tmp_path: Path, state: dict) -> Path:
    torch.save(state, tmp_path / "state.pt")
    return tmp_path / "state.pt"


def stream_cfg(make_cfg, folder: Path, tokenizer: Path, *overrides: str, run_dir: Path | None = None):
    cfg = make_cfg("data=hf_stream", f"data.source.name={folder}", "data.source.config=null",
                   f"data.tokenizer.path={tokenizer}",
                   "data.source.val_fraction=0.1", "data.max_val_batches=2", "data.num_workers=2",
                   "trainer.max_steps=6", *overrides, run_dir=run_dir)  # fmt: skip
    with open_dict(cfg):
        del cfg.data.cache_dir  # a stream has no cache
    return cfg


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_training_streams_records_what_it_read_and_resumes_exactly(make_cfg, tmp_path, tokenizer_path):
    write_corpus(tmp_path / "ds", files=2, docs_per_file=150)
    full = stream_cfg(make_cfg, tmp_path / "ds", tokenizer_path, "checkpoint.keep_all=true", run_dir=tmp_path / "full")
    summary = train(full)
    data = summary["data"]
    assert summary["steps"] == 6 and data["streaming"] is True and data["epochs"] is None
    assert data["windows_read"] == 6 * 4 and data["tokens_read"] == 6 * 4 * 32 and data["documents_read"] > 10
    assert json.loads((tmp_path / "full/summary.json").read_text())["data"] == data

    midway = tmp_path / "full/checkpoints/step0000003.ckpt"  # 3 batches: the resumed loader starts at stream 1
    resumed = stream_cfg(make_cfg, tmp_path / "ds", tokenizer_path, f"ckpt_path={midway}", run_dir=tmp_path / "resumed")
    again = train(resumed)
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert set(b) == {3, 4, 5}
    # Same weights, optimizer state and batches in the same process: bit-identical in practice; rel=1e-6 (~8 float32
    # ulp) does not rely on it. Other windows would give losses that differ in the second decimal.
    for step in (3, 4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    assert again["data"] == data  # the counts continue from the checkpoint

    with pytest.raises(ConfigError, match="data.source.streams: checkpoint 2 vs config 1"):
        train(stream_cfg(make_cfg, tmp_path / "ds", tokenizer_path, f"ckpt_path={midway}", "data.num_workers=0",
                         run_dir=tmp_path / "other"))  # fmt: skip


def test_a_stream_needs_a_step_count_a_tokenizer_and_a_reachable_dataset(make_cfg, tmp_path, tokenizer_path):
    write_corpus(tmp_path / "ds", files=1, docs_per_file=20)
    with pytest.raises(ConfigError, match="train_epochs=1: a streamed dataset has no known length"):
        pipeline.prepare_data(stream_cfg(make_cfg, tmp_path / "ds", tokenizer_path, "train_epochs=1"))
    with pytest.raises(ConfigError, match="trainer.max_steps must be a positive number"):
        pipeline.prepare_data(stream_cfg(make_cfg, tmp_path / "ds", tokenizer_path, "trainer.max_steps=-1"))
    with pytest.raises(ConfigError, match="needs data.tokenizer.path"):
        StreamingDataModule({"name": str(tmp_path / "ds")}, {"vocab_size": 384})
    with pytest.raises(ConfigError, match="needs data.max_val_batches"):
        StreamingDataModule({"name": str(tmp_path / "ds")}, {"path": str(tokenizer_path)}, max_val_batches=None)
    with pytest.raises(ConfigError, match="no field 'body'"):
        StreamingDataModule({"name": str(tmp_path / "ds"), "text_field": "body"}, {"path": str(tokenizer_path)},
                            seq_len=8).setup()  # fmt: skip
    with pytest.raises(DatasetUnavailableError, match="cannot load Hugging Face dataset jtok-test/no-such-dataset"):
        StreamingDataModule({"name": "jtok-test/no-such-dataset"}, {"path": str(tokenizer_path)}).prepare_data()
