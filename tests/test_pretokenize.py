"""The pre-tokeniser and data=tokens: round trip, resume after a kill, worker-count independence, training from the
shards, clear errors, Hugging Face streaming input, and bounded memory on a huge single-line document."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from project import pipeline
from project.config import ConfigError
from project.data import PretokenizedDataError, PretokenizedDataModule, TokenDataModule
from project.data import cache as cache_mod
from project.data.inputs import FileInputs, HFInputs, split_of
from project.data.manifest import load_manifest
from project.data.pretokenize import main, pretokenize
from project.data.shards import ShardWriter
from project.data.source import MissingDataError
from project.data.tokenizer import MAX_PIECE_CHARS, load_tokenizer, train_tokenizer
from project.data.tokens import ShardedTokenWindows
from project.data.windows import TokenWindows
from project.lit_module import LMModule

from conftest import CONFIG_DIR, ROOT

WORDS = ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
         "river", "mountain", "city", "history", "music", "science"]  # fmt: skip
SHARD_TOKENS = 3000  # small, so the test corpus makes several shards (with windows across their boundaries)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def write_corpus(folder: Path) -> list[str]:
    """A .jsonl, a .txt and a .parquet file (one document over MAX_PIECE_CHARS characters); returns the documents in
    the order they are read."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    jsonl = [text(rng, rng.randint(3, 120)) for _ in range(60)]
    jsonl[7] = text(rng, MAX_PIECE_CHARS // 3)  # ~5 characters per word: a document cut into pieces
    assert len(jsonl[7]) > MAX_PIECE_CHARS
    txt = [text(rng, rng.randint(3, 80)) for _ in range(30)]
    parquet = [text(rng, rng.randint(3, 80)) for _ in range(40)]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in jsonl))
    (folder / "b.txt").write_text("\n\n".join(txt) + "\n")
    pq.write_table(pa.table({"text": parquet}), folder / "c.parquet")
    return jsonl + txt + parquet


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """The corpus folder, its documents, and a small byte-level BPE trained on them."""
    folder = tmp_path_factory.mktemp("pretok") / "corpus"
    documents = write_corpus(folder)
    tokenizer = train_tokenizer(iter(documents[:20]), 300, 2)
    tokenizer.save(str(folder.parent / "tokenizer.json"))
    return folder, documents, folder.parent / "tokenizer.json"


def run(corpus, out: Path, workers: int = 1, **settings) -> dict:
    folder, _, tokenizer = corpus
    settings = {"shard_tokens": SHARD_TOKENS, "val_fraction": 0.2, "progress_bar": False, **settings}
    return pretokenize(FileInputs([str(folder)]), str(tokenizer), out, workers=workers, **settings)


def split_tokens(folder: Path, manifest: dict, split: str) -> np.ndarray:
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.fromfile(folder / s["name"], dtype=manifest["dtype"]) for s in shards])


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


@pytest.fixture(scope="module")
def pretokenized(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretok-out") / "tokens"
    return out, run(corpus, out)


def test_shards_hold_every_document_encoded_directly_with_eos_between(corpus, pretokenized) -> None:
    _, documents, tokenizer_path = corpus
    out, manifest = pretokenized
    tokenizer = load_tokenizer(tokenizer_path)
    eos = manifest["tokenizer"]["eos_id"]
    assert len(manifest["splits"]["train"]["shards"]) >= 3 and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        docs = [d for d in documents if split_of(d, 0.2) == split]
        want = [i for d in docs for i in [*tokenizer.encode(d).ids, eos]]  # the long one encoded whole, too
        assert split_tokens(out, manifest, split).tolist() == want, split
        assert manifest["splits"][split]["documents"] == len(docs)
        # ... which is also exactly what the data cache writes for these documents
        cache_mod.write_tokens(tokenizer, docs, out.parent / f"cache-{split}.bin", np.dtype(np.uint16), eos, split)
        assert np.fromfile(out.parent / f"cache-{split}.bin", dtype=np.uint16).tolist() == want
    assert 0 < manifest["splits"]["val"]["documents"] < len(documents) // 2
    assert (out / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    assert not (out / "progress.json").exists() and not list(out.glob(".*.tmp*"))


def test_any_number_of_workers_writes_the_same_folder(corpus, pretokenized, tmp_path) -> None:
    out, manifest = pretokenized
    parallel = run(corpus, tmp_path / "two", workers=2)
    assert parallel == manifest
    assert shard_files(tmp_path / "two") == shard_files(out)


def test_a_killed_run_resumes_after_its_finished_shards(corpus, pretokenized, tmp_path, monkeypatch) -> None:
    """A run killed after two shard checkpoints leaves a partial shard; the rerun removes it, keeps the finished
    shards untouched (same inode and mtime) and writes the rest, ending with the uninterrupted run's folder."""
    out = tmp_path / "killed"
    real_checkpoint = ShardWriter.checkpoint
    calls = []
    kill_after: list[int] = [2]

    def counted_checkpoint(self, position):
        if len(calls) == kill_after[0]:
            raise KeyboardInterrupt("simulated kill")  # the next shards are open, partly written
        calls.append(position)
        real_checkpoint(self, position)

    monkeypatch.setattr(ShardWriter, "checkpoint", counted_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out)
    partial = list(out.glob(".train-00002.bin.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.bin")}
    assert {"train-00000.bin", "train-00001.bin"} <= set(finished) and not (out / "manifest.json").exists()
    with pytest.raises(PretokenizedDataError, match="has not finished.*rerun the same"):
        load_manifest(out)

    calls.clear()
    kill_after[0] = -1  # no more kills
    resumed = run(corpus, out)
    _, complete = pretokenized
    assert resumed == complete and shard_files(out) == shard_files(pretokenized[0])
    assert len(calls) == len(complete["splits"]["train"]["shards"]) - 2  # only the unfinished shards were written
    assert {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in finished} == finished
    assert not list(out.glob(".*.tmp*")) and not (out / "progress.json").exists()
    calls.clear()
    assert run(corpus, out) == complete and calls == []  # a finished folder: nothing to do


@pytest.mark.parametrize("split", ["train", "val"])
def test_windows_across_shards_equal_those_of_one_file(pretokenized, tmp_path, split) -> None:
    out, manifest = pretokenized
    tokens = split_tokens(out, manifest, split)
    tokens.tofile(tmp_path / "split.bin")
    shards = [(out / s["name"], s["tokens"]) for s in manifest["splits"][split]["shards"]]
    # train: short windows, some across a boundary; val: windows longer than any shard, each across two or more
    seq_len = 37 if split == "train" else max(tokens for _, tokens in shards) + 1
    sharded = ShardedTokenWindows(shards, manifest["dtype"], seq_len)
    flat = TokenWindows(tmp_path / "split.bin", manifest["dtype"], len(tokens), seq_len)
    assert len(sharded) == len(flat) > 0 and len(shards) > 1
    for i in range(len(flat)):
        assert sharded[i].tolist() == flat[i].tolist(), i
    with pytest.raises(IndexError):
        sharded[len(flat)]


def tokens_cfg(path: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=smoke", "eval.enabled=false", "data=tokens",
                                                       f"data.path={path}", *overrides])  # fmt: skip
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def test_training_from_the_shards(pretokenized, tmp_path) -> None:
    import hydra

    out, manifest = pretokenized
    cfg = tokens_cfg(out, tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, PretokenizedDataModule) and isinstance(dm, TokenDataModule)
    dm.prepare_data()
    assert dm.vocab_size == manifest["tokenizer"]["vocab_size"] and dm.meta["train_tokens"] == len(
        split_tokens(out, manifest, "train")
    )
    module = LMModule(model=pipeline.model_config(cfg, dm.vocab_size), optim=dict(cfg.optim))
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=2, logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2

    result = pipeline.train(cfg)  # the whole train stage: data budget, summary, checkpoint with the data identity
    data = result.summary["data"]
    assert data["train_tokens"] == manifest["splits"]["train"]["tokens"] and data["epochs"] < 1
    run_tokenizer = json.loads((result.run_dir / "tokenizer.json").read_text())
    assert run_tokenizer == json.loads((out / "tokenizer.json").read_text())


def test_clear_errors_for_bad_folders(pretokenized, tmp_path, corpus) -> None:
    out, manifest = pretokenized
    with pytest.raises(ConfigError, match="data=tokens needs data.path"):
        PretokenizedDataModule(path=None)
    with pytest.raises(MissingDataError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretokenizedDataError, match="no manifest.json; not a pre-tokenised folder"):
        load_manifest(tmp_path / "empty")

    def zero_first_shard(folder: Path) -> None:
        path = folder / "train-00000.bin"
        path.write_bytes(bytes(path.stat().st_size))

    def damaged(edit) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        copy.mkdir()
        for p in out.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        edit(copy)
        return copy

    cases = {
        "empty manifest": (lambda f: (f / "manifest.json").write_text(""), "manifest.json is not valid JSON"),
        "not a manifest": (lambda f: (f / "manifest.json").write_text("{}"), "not a pre-tokenised manifest"),
        "truncated shard": (lambda f: (f / "train-00001.bin").write_bytes(b"\0\0"), "train-00001.bin has 2 bytes"),
        "missing shard": (lambda f: (f / "val-00000.bin").unlink(), "val-00000.bin is missing"),
        "corrupt shard": (zero_first_shard, "train-00000.bin checksum"),
        "other tokenizer": (lambda f: (f / "tokenizer.json").write_text("{}\n"), "not the tokenizer the shards were"),
    }
    for edit, message in cases.values():
        with pytest.raises(PretokenizedDataError, match=message):
            load_manifest(damaged(edit))
    # sizes are always checked, checksums unless switched off
    zeroed = damaged(cases["corrupt shard"][0])
    assert load_manifest(zeroed, verify_checksums=False)["splits"] == manifest["splits"]
    with pytest.raises(PretokenizedDataError, match="train-00001.bin is missing or does not have the"):
        load_manifest(damaged(cases["truncated shard"][0]), verify_checksums=False)

    other = train_tokenizer(iter(corpus[1][20:40]), 280, 2)
    other.save(str(tmp_path / "other.json"))
    dm = PretokenizedDataModule(path=str(out), tokenizer={"path": str(tmp_path / "other.json")}, seq_len=16)
    with pytest.raises(PretokenizedDataError, match="is not the tokenizer .* was pre-tokenised with"):
        dm.prepare_data()
    same = PretokenizedDataModule(path=str(out), tokenizer={"path": str(corpus[2])}, seq_len=16, batch_size=2)
    same.setup()
    assert len(same.train_dataset) == (manifest["splits"]["train"]["tokens"] - 1) // 16


def test_the_pre_tokeniser_refuses_bad_settings(corpus, pretokenized, tmp_path) -> None:
    out, _ = pretokenized
    with pytest.raises(PretokenizedDataError, match=r"other settings \(differing: shard_tokens\)"):
        run(corpus, out, shard_tokens=SHARD_TOKENS + 1)
    with pytest.raises(ConfigError, match="neither a tokenizer.json file nor bpe:VOCAB_SIZE"):
        pretokenize(FileInputs([str(corpus[0])]), "missing.json", tmp_path / "a", progress_bar=False)
    with pytest.raises(PretokenizedDataError, match="no document of the input fell into the val split"):
        run(corpus, tmp_path / "b", val_fraction=1e-9)
    # the command line: a user error is one line on stderr and status 2
    proc = subprocess.run([sys.executable, "-m", "project.data.pretokenize", "--input", str(tmp_path / "none*.jsonl"),
                           "--tokenizer", "bpe:300", "--out", str(tmp_path / "c")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: no .txt/.jsonl/.parquet files match")


def test_a_trained_tokenizer_and_the_command_line(corpus, tmp_path) -> None:
    folder, documents, _ = corpus
    code = main(["--input", str(folder / "a.jsonl"), "--tokenizer", "bpe:280", "--tokenizer-documents", "30",
                 "--out", str(tmp_path / "out"), "--shard-tokens", "1e4", "--workers", "1",
                 "--val-fraction", "0.2"])  # fmt: skip
    assert code == 0
    manifest = load_manifest(tmp_path / "out")
    train_docs = [d for d in documents[:60] if split_of(d, 0.2) == "train"]
    want = train_tokenizer(iter(train_docs[:30]), 280, 2)  # the first 30 training documents, pieces being exact
    assert load_tokenizer(tmp_path / "out" / "tokenizer.json").get_vocab() == want.get_vocab()
    assert manifest["plan"]["tokenizer"] == {"train": {"vocab_size": 280, "documents": 30, "min_frequency": 2}}


def test_a_hugging_face_dataset_is_streamed_shard_by_shard(corpus, tmp_path, monkeypatch) -> None:
    """A local dataset folder read with datasets' streaming=True, one part per data file (no Hub access needed):
    the same shards as reading the files directly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rng = random.Random(1)
    (tmp_path / "ds").mkdir()
    for part in range(3):
        docs = [text(rng, rng.randint(3, 60)) for _ in range(40)]
        (tmp_path / "ds" / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    inputs = HFInputs(str(tmp_path / "ds"))
    assert inputs.num_parts == 3
    settings = {"shard_tokens": 1000, "val_fraction": 0.2, "progress_bar": False}
    streamed = pretokenize(inputs, str(corpus[2]), tmp_path / "hf", **settings)
    files = pretokenize(FileInputs([str(tmp_path / "ds")]), str(corpus[2]), tmp_path / "files", **settings)
    assert streamed["splits"] == files["splits"]
    assert shard_files(tmp_path / "hf") == shard_files(tmp_path / "files")


MEMORY_PROBE = """
import json, re, sys
from pathlib import Path
from project.data.inputs import FileInputs
from project.data.pretokenize import pretokenize

def status(field):
    return int(re.search(rf"^{field}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024

if __name__ == "__main__":
    corpus, tokenizer, out = sys.argv[1:]
    before = status("VmRSS")
    manifest = pretokenize(FileInputs([corpus]), tokenizer, out, workers=1, val_fraction=0.4, progress_bar=False)
    print(json.dumps({"growth_mb": status("VmHWM") - before, "tokens": manifest["splits"]["train"]["tokens"]
                      + manifest["splits"]["val"]["tokens"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux /proc")
@pytest.mark.parametrize(("megabytes", "bound_mb"), [(6, 300), pytest.param(40, 400, marks=pytest.mark.slow)])
def test_a_huge_single_line_document_is_encoded_in_bounded_memory(corpus, tmp_path, megabytes, bound_mb) -> None:
    """Encoded whole (as the data cache did before it cut long documents into pieces), a one-line document needs
    ~160 bytes per character: 2.5 GB measured at 16 MB, ~9 GB at 58 MB. In bounded pieces the peak grows by one
    encode batch (~100-150 MB) and a few copies of the document's text (reading it): measured 150 MB at 6 MB and
    220 MB at 40 MB, where encoding it whole would take ~1 GB and ~6.5 GB."""
    rng = random.Random(0)
    line = " ".join(rng.choices(WORDS, k=megabytes * 2**20 // 4))[: megabytes * 2**20]
    (tmp_path / "long.txt").write_text(f"{line}\n\na short second document\n\nand a third one\n")
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "long.txt"), str(corpus[2]),
                            str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    assert measured["growth_mb"] < bound_mb, measured
    manifest = load_manifest(tmp_path / "out")
    prefix = line[: line.rfind(" ", 0, 2**16)]  # whole words, far before the first piece boundary
    want = load_tokenizer(corpus[2]).encode(prefix).ids
    first = manifest["splits"][split_of(line, 0.4)]["shards"][0]
    assert np.fromfile(tmp_path / "out" / first["name"], dtype=manifest["dtype"])[: len(want)].tolist() == want
