"""Tests for project.data: sources, tokenizer, cached shards, windows and bad input."""

from __future__ import annotations

import itertools

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from project import hub
from project.config import ConfigError
from project.data.sampler import ResumableShuffleSampler
from project.data import (
    DatasetUnavailableError,
    FactsSource,
    HFSource,
    TextDecodeError,
    TextSource,
    TokenDataModule,
)
from project.data import cache as cache_mod
from project.data.facts import ATTRIBUTES, TEMPLATES, cloze_prompt, render
from project.data.tokenizer import EOS

SMALL_TOKENIZER = {"vocab_size": 512, "path": None, "min_frequency": 2}


def small_facts(seed: int = 0, **overrides: int) -> FactsSource:
    settings = {"num_entities": 50, "templates_per_attribute": 4, "heldout_templates": 1, "docs_per_entity": 2}
    return FactsSource(seed=seed, **{**settings, **overrides})


def make_dm(tmp_path: Path, source, **overrides) -> TokenDataModule:
    settings = {"tokenizer": SMALL_TOKENIZER, "seq_len": 32, "batch_size": 4, "cache_dir": tmp_path / "cache"}
    return TokenDataModule(source=source, **{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> TokenDataModule:
    dm = make_dm(tmp_path_factory.mktemp("facts"), small_facts(), max_val_batches=2)
    dm.prepare_data()
    return dm


# --- facts corpus ---------------------------------------------------------------------------------


def test_facts_deterministic_per_seed(tmp_path: Path) -> None:
    a, b, c = small_facts(seed=1), small_facts(seed=1), small_facts(seed=2)
    for split in ("train", "val"):
        assert list(a.documents(split)) == list(b.documents(split))
        assert list(a.documents(split)) != list(c.documents(split))
    a.write_qa(tmp_path / "a.jsonl")
    b.write_qa(tmp_path / "b.jsonl")
    c.write_qa(tmp_path / "c.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "c.jsonl").read_text()


def test_facts_sizes_and_unique_names() -> None:
    source = small_facts(docs_per_entity=3)
    assert len(list(source.documents("train"))) == 50 * 3
    assert len(list(source.documents("val"))) == 50
    assert len({e.name for e in source.entities}) == 50
    assert all(set(e.facts) == set(ATTRIBUTES) for e in source.entities)


def test_templates_are_cloze_and_distinct() -> None:
    rendered = [render(t, "X", "V") for ts in TEMPLATES.values() for t in ts]
    for attribute, templates in TEMPLATES.items():
        for template in templates:
            assert template.endswith(" {value}.") and "{name}" in template, template
            prompt = cloze_prompt(template, "X")
            others = [r for r in rendered if r != render(template, "X", "V")]
            assert not any(prompt in r for r in others), f"{attribute}: prompt {prompt!r} occurs in another template"


def test_each_fact_is_held_out_in_its_own_templates_while_every_template_is_trained() -> None:
    source = small_facts(templates_per_attribute=5, heldout_templates=2)
    train = "\n".join(source.documents("train"))
    val = "\n".join(source.documents("val"))
    heldout_choices = set()
    for entity in source.entities:
        for attribute in ATTRIBUTES:
            assert len(source.val_templates(entity, attribute)) == 2
            for template in source.val_templates(entity, attribute):
                assert cloze_prompt(template, entity.name) not in train
            for template in source.train_templates(entity, attribute):
                assert cloze_prompt(template, entity.name) not in val
            value = entity.facts[attribute]
            used = {t for t in source.val_templates(entity, attribute) if render(t, entity.name, value) in val}
            assert len(used) == 1
            heldout_choices.add(source.heldout_indices(entity, attribute))
    assert len(heldout_choices) > 1  # held-out templates differ from fact to fact
    for attribute in ATTRIBUTES:
        for template in TEMPLATES[attribute][:5]:
            assert template.split("{name}")[-1].split(" {value}")[0] in train  # every wording is trained


def test_qa_file_schema_and_labels(tmp_path: Path) -> None:
    source = small_facts(qa_templates=2, templates_per_attribute=5, heldout_templates=2)
    count = source.write_qa(tmp_path / "qa.jsonl")
    items = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    assert count == len(items) == 50 * len(ATTRIBUTES) * 4
    facts = {e.name: e.facts for e in source.entities}
    for item in items:
        assert set(item) >= {"entity", "attribute", "prompt", "choices", "label", "template_split"}
        assert item["template_split"] in {"train", "heldout"}
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert all(c.startswith(" ") for c in item["choices"])
        answer = " " + facts[item["entity"]][item["attribute"]]
        assert item["choices"][item["label"]] == answer
        assert not item["prompt"].endswith(" ") and item["entity"] in item["prompt"]
        template = TEMPLATES[item["attribute"]][item["template"]]
        assert item["prompt"] + answer + "." == render(template, item["entity"], answer[1:])
        entity = next(e for e in source.entities if e.name == item["entity"])
        heldout = template in source.val_templates(entity, item["attribute"])
        assert item["template_split"] == ("heldout" if heldout else "train")
    assert {i["template_split"] for i in items} == {"train", "heldout"}
    assert len({i["label"] for i in items}) == 4


def test_facts_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="heldout_templates"):
        FactsSource(templates_per_attribute=3, heldout_templates=3)
    with pytest.raises(ValueError, match="templates_per_attribute"):
        FactsSource(templates_per_attribute=99)


# --- datamodule, windows and cache ----------------------------------------------------------------


def test_properties_after_prepare_without_setup(prepared: TokenDataModule) -> None:
    assert isinstance(prepared.tokenizer, Tokenizer)
    assert prepared.vocab_size == prepared.tokenizer.get_vocab_size() == 512
    assert prepared.eos_id == prepared.tokenizer.token_to_id(EOS)
    assert prepared.cache_path.is_dir() and prepared.cache_path.name.startswith("facts-")
    assert prepared.qa_path == prepared.cache_path / "qa.jsonl" and prepared.qa_path.is_file()
    meta = json.loads((prepared.cache_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["train_documents"] == 100 and meta["val_documents"] == 50
    windows = (meta["train_tokens"] - 1) // 32
    assert prepared.train_tokens_per_epoch == windows // 4 * 4 * 32 > 0


def test_shards_hold_documents_with_eos(prepared: TokenDataModule) -> None:
    tokens = np.fromfile(prepared.cache_path / "train.bin", dtype=np.uint16)
    assert len(tokens) == prepared.meta["train_tokens"]
    eos_positions = np.flatnonzero(tokens == prepared.eos_id)
    assert len(eos_positions) == 100 and eos_positions[-1] == len(tokens) - 1
    first_doc = next(small_facts().documents("train"))
    assert prepared.tokenizer.decode(tokens[: eos_positions[0]].tolist()) == first_doc


def test_window_batches(prepared: TokenDataModule) -> None:
    prepared.setup("fit")
    inputs, targets = next(iter(prepared.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 32)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(inputs.max()) < prepared.vocab_size

    tokens = torch.from_numpy(np.fromfile(prepared.cache_path / "val.bin", dtype=np.uint16).astype(np.int64))
    val_batches = list(prepared.val_dataloader())
    assert len(val_batches) == 2
    v_inputs, v_targets = val_batches[0]
    assert torch.equal(v_inputs[1], tokens[32:64]) and torch.equal(v_targets[1], tokens[33:65])

    first = list(itertools.islice(prepared.train_dataloader(), 3))
    again = list(itertools.islice(prepared.train_dataloader(), 3))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, again))
    sequential = torch.stack([prepared.train_dataset[i][:-1] for i in range(4)])
    assert not torch.equal(first[0][0], sequential)


def test_sampler_passes_are_permutations_and_ranks_split_the_global_batch() -> None:
    single = ResumableShuffleSampler(num_windows=10, batch_size=4, seed=3)
    stream = list(itertools.islice(iter(single), 16))  # 2 passes of 2 batches (2 windows dropped per pass)
    assert len(set(stream[:8])) == 8 and len(set(stream[8:])) == 8 and stream[:8] != stream[8:]
    ranks = [ResumableShuffleSampler(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(itertools.islice(iter(s), 8)) for s in ranks]
    for batch in range(4):
        union = per_rank[0][2 * batch : 2 * batch + 2] + per_rank[1][2 * batch : 2 * batch + 2]
        assert sorted(union) == sorted(stream[4 * batch : 4 * batch + 4])


def test_sampler_resumes_at_any_batch() -> None:
    full = list(itertools.islice(iter(ResumableShuffleSampler(10, 4, seed=1)), 20))
    for done in (1, 2, 3):
        resumed = ResumableShuffleSampler(10, 4, seed=1, start_batch=lambda: done)
        assert list(itertools.islice(iter(resumed), 20 - 4 * done)) == full[4 * done :]


def test_second_prepare_reuses_cache(prepared: TokenDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_mod, "write_tokens", refuse)
    monkeypatch.setattr(cache_mod, "train_tokenizer", refuse)
    again = make_dm(prepared.cache_dir.parent, small_facts(), seq_len=16, batch_size=2)
    start = time.perf_counter()
    again.prepare_data()
    assert time.perf_counter() - start < 0.5
    assert again.cache_path == prepared.cache_path and again.vocab_size == prepared.vocab_size
    assert make_dm(prepared.cache_dir.parent, small_facts(seed=1)).cache_path != prepared.cache_path
    assert [p.name for p in prepared.cache_dir.iterdir() if p.name.startswith(".")] == []


def test_failed_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache_mod, "write_tokens", crash)
    dm = make_dm(tmp_path, small_facts(num_entities=5))
    with pytest.raises(RuntimeError, match="disk full"):
        dm.prepare_data()
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(RuntimeError, match="prepare_data"):
        dm.vocab_size


def test_tiny_corpus_keeps_actual_vocab(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("tiny corpus here\n\nanother tiny block\n\nand a last one\n")
    dm = make_dm(tmp_path, TextSource(str(tmp_path / "a.txt"), val_fraction=0.3), tokenizer={"vocab_size": 5000})
    dm.prepare_data()
    assert 257 <= dm.vocab_size < 5000
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() == dm.meta["vocab_size"]
    assert dm.qa_path is None


def test_seq_len_longer_than_split(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, small_facts(num_entities=4), seq_len=100_000)
    with pytest.raises(ValueError, match=r"has \d+ tokens; seq_len=100000 needs at least 100001"):
        dm.setup("fit")


def test_token_dtype_switches_to_uint32(tmp_path: Path) -> None:
    assert cache_mod.token_dtype(65536) == np.uint16
    assert cache_mod.token_dtype(65537) == np.uint32
    vocab = {EOS: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.save(str(tmp_path / "tokenizer.json"))
    words = " ".join(f"w{i}" for i in range(69_900, 70_000))
    (tmp_path / "big.txt").write_text(f"{words}\n\n{words}\n")
    source = TextSource(str(tmp_path / "big.txt"), val_fraction=0.5)
    dm = make_dm(tmp_path, source, tokenizer={"path": str(tmp_path / "tokenizer.json")}, batch_size=1)
    dm.prepare_data()
    assert dm.meta["dtype"] == "uint32" and dm.vocab_size == 70_002
    dm.setup("fit")
    inputs, _ = next(iter(dm.val_dataloader()))
    assert inputs[0, :3].tolist() == [69_902, 69_903, 69_904]


# --- text sources --------------------------------------------------------------------------------


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("first block\nstill first\n\n\nsecond block\n")
    records = [{"text": f"json doc {i}"} for i in range(3)] + [{"other": "skipped"}]
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(5)]}), folder / "c.parquet")


def test_text_source_formats_and_split(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    source = TextSource([str(tmp_path / "corpus" / "*")], val_fraction=0.2)
    train, val = list(source.documents("train")), list(source.documents("val"))
    assert train[:2] == ["first block\nstill first", "second block"]
    assert train[2:5] == ["json doc 0", "json doc 1", "json doc 2"]
    assert val == ["parquet doc 3", "parquet doc 4"] and len(train) == 8
    assert [f.name for f in TextSource(str(tmp_path / "corpus")).files] == ["a.txt", "b.jsonl", "c.parquet"]


def test_text_source_needs_two_documents(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("just one document\n")
    with pytest.raises(ValueError, match="at least 2"):
        list(TextSource(str(tmp_path / "one.txt")).documents("train"))


def test_text_datamodule_cache_key_tracks_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    (corpus / "d.txt").write_text("\n\n".join(f"paragraph number {i} of the text corpus." for i in range(200)))
    dm = make_dm(tmp_path, TextSource(str(corpus / "*.txt")), seq_len=8)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path.name.startswith("text-") and len(dm.val_dataset) > 0
    (corpus / "d.txt").write_text("changed text\n\nmore changed text\n")
    assert make_dm(tmp_path, TextSource(str(corpus / "*.txt"))).cache_path != dm.cache_path


# --- bad input -----------------------------------------------------------------------------------


def test_missing_path_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here.txt"):
        TextSource(str(tmp_path / "nothing-here.txt"))
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl"):
        TextSource(str(tmp_path / "*.jsonl"))


def test_empty_files(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n \n\n")
    (tmp_path / "full.txt").write_text("some text\n\nmore text\n")
    with pytest.raises(ValueError, match="empty.txt"):
        list(TextSource([str(tmp_path / "full.txt"), str(tmp_path / "empty.txt")]).documents("train"))
    (tmp_path / "no_field.jsonl").write_text('{"content": "a"}\n{"content": "b"}\n')
    with pytest.raises(ValueError, match=r"no_field\.jsonl.*'text'"):
        list(TextSource(str(tmp_path / "no_field.jsonl")).documents("train"))
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "no_col.parquet")
    with pytest.raises(ValueError, match=r"no_col\.parquet.*'text'"):
        list(TextSource(str(tmp_path / "no_col.parquet")).documents("train"))


def test_jsonl_records_without_the_text_field_are_counted_not_dropped_silently(tmp_path: Path, caplog) -> None:
    """Item 13: 150 of 300 records lack the field: a warning names the file and the count (once, not per pass)."""
    records = [{"text": f"document {i}"} if i % 2 else {"body": f"elsewhere {i}"} for i in range(300)]
    (tmp_path / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = TextSource(str(tmp_path / "half.jsonl"))
    assert len(list(source.documents("train"))) + len(list(source.documents("val"))) == 150
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "half.jsonl" in warnings[0]
    assert "150 of 300 records have no 'text' field" in warnings[0] and "data.source.text_field" in warnings[0]
    (tmp_path / "none.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n{"text": null}\n')
    with pytest.raises(ConfigError, match=r"none\.jsonl: none of its 3 records has a 'text' field.*body"):
        list(TextSource(str(tmp_path / "none.jsonl")).documents("train"))


def test_smoke_experiment_composes_with_every_data_source(make_cfg, tmp_path: Path) -> None:
    """Item 10: the smoke experiment shrinks the facts corpus only for the facts source; data=text needs paths."""
    import hydra

    from project.data import DocstringSource

    facts = hydra.utils.instantiate(make_cfg().data)
    assert isinstance(facts.source, FactsSource) and facts.source.num_entities == 40
    write_corpus(tmp_path / "corpus")
    text = hydra.utils.instantiate(make_cfg("data=text", f"data.source.paths=[{tmp_path / 'corpus'}]").data)
    assert isinstance(text.source, TextSource) and text.seq_len == 32
    assert isinstance(hydra.utils.instantiate(make_cfg("data=hf").data).source, HFSource)
    assert isinstance(hydra.utils.instantiate(make_cfg("data=docstrings").data).source, DocstringSource)
    with pytest.raises(Exception, match=r"data=text needs data\.source\.paths") as err:
        hydra.utils.instantiate(make_cfg("data=text").data)
    assert isinstance(err.value.__cause__ or err.value, ConfigError)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "fake.parquet").write_text("this is not parquet")
    with pytest.raises(ValueError, match="fake.parquet"):
        list(TextSource(str(tmp_path / "fake.parquet")).documents("train"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2"):
        list(TextSource(str(tmp_path / "broken.jsonl")).documents("train"))
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="table.csv"):
        TextSource(str(tmp_path / "table.csv"))


def test_non_utf8_text(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes(b"first line ok\n\ncaf\xe9 au lait\n")
    with pytest.raises(TextDecodeError, match=r"latin1\.txt: invalid UTF-8 at byte offset 18.*encoding_errors=replace"):
        list(TextSource(str(tmp_path / "latin1.txt")).documents("train"))
    assert issubclass(TextDecodeError, ValueError)
    source = TextSource(str(tmp_path / "latin1.txt"), encoding_errors="replace")
    assert list(source.documents("val")) == ["caf\ufffd au lait"]


def test_hf_unavailable_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = HFSource("jtok-test/no-such-dataset", config="tiny", streaming=True, max_documents=10)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as info:
        list(source.documents("train"))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "jtok-test/no-such-dataset" in message and "tiny" in message
    assert "cache" in message and "data=text data.source.paths=" in message


def test_hf_local_folder_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    source = HFSource(str(tmp_path / "ds"), val_fraction=0.1, max_documents=10, streaming=True)
    assert list(source.documents("train")) == [f"doc {i}" for i in range(9)]
    assert list(source.documents("val")) == ["doc 9"]


def test_missing_tokenizer_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-tokenizer.json"):
        make_dm(tmp_path, small_facts(), tokenizer={"path": str(tmp_path / "missing-tokenizer.json")})
    with pytest.raises(TypeError, match="vocab"):
        make_dm(tmp_path, small_facts(), tokenizer={"vocab": 100})


def test_ensure_hub_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert hub.ensure_hub_mode(offline=False) is False
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)
    assert hub.ensure_hub_mode() is False and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)
    assert hub.ensure_hub_mode() is True
    assert os.environ["HF_HUB_OFFLINE"] == "1" == os.environ["HF_DATASETS_OFFLINE"]
    assert hub.ensure_hub_mode(offline=False) is True


def test_hub_probe_is_bounded_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub._hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        assert hub._hub_reachable() is False
        assert hub._hub_reachable() is False
        assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 1
        assert hub._hub_reachable.cache_info().hits == 1
    finally:
        hub._hub_reachable.cache_clear()
