"""The data cache under damage: shards checked against meta.json and rebuilt, orphan build folders removed,
and long documents tokenized in bounded memory."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from project.data import FactsSource, TextSource, TokenDataModule
from project.data import cache as cache_mod

SMALL_TOKENIZER = {"vocab_size": 300, "path": None, "min_frequency": 2}


def make_dm(cache_dir: Path, source=None) -> TokenDataModule:
    source = source or FactsSource(num_entities=6, templates_per_attribute=3, docs_per_entity=2)
    return TokenDataModule(source=source, tokenizer=SMALL_TOKENIZER, seq_len=8, batch_size=2, cache_dir=cache_dir)


@pytest.fixture
def built(tmp_path: Path) -> TokenDataModule:
    dm = make_dm(tmp_path / "cache")
    dm.prepare_data()
    return dm


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "meta.json"}


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "zeroed train.bin": ("train.bin", zero, "checksum"),
    "truncated train.bin": ("train.bin", truncate, "bytes"),
    "missing val.bin": ("val.bin", Path.unlink, "missing"),
    "zeroed qa.jsonl": ("qa.jsonl", zero, "checksum"),
    "truncated meta.json": ("meta.json", truncate, "not valid JSON"),
    "meta.json not an object": ("meta.json", lambda p: p.write_text("[]"), "not a JSON object"),
    "missing meta.json": ("meta.json", Path.unlink, "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_detected_named_and_rebuilt(built: TokenDataModule, damage: str, caplog) -> None:
    """Item 4: every file of the cache folder is checked against the sizes and checksums in meta.json."""
    name, spoil, reason = DAMAGE[damage]
    folder = built.cache_path
    good, good_meta = snapshot(folder), json.loads((folder / "meta.json").read_text())
    spoil(folder / name)
    caplog.set_level(logging.WARNING, logger=cache_mod.__name__)
    again = make_dm(built.cache_dir)
    again.prepare_data()
    message = next(r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage())
    assert str(folder / name) in message and reason in message
    assert snapshot(folder) == good
    assert {k: v for k, v in again.meta.items() if k != "build_seconds"} == \
        {k: v for k, v in good_meta.items() if k != "build_seconds"}  # fmt: skip
    assert [p.name for p in built.cache_dir.iterdir()] == [folder.name]  # the damaged copy is gone


def test_meta_json_records_each_file_size_and_checksum(built: TokenDataModule) -> None:
    files = built.meta["files"]
    assert set(files) == {"tokenizer.json", "train.bin", "val.bin", "qa.jsonl"}
    for name, record in files.items():
        assert record["bytes"] == (built.cache_path / name).stat().st_size
        assert re.fullmatch(r"[0-9a-f]{32}", record["blake2b"])


def test_an_intact_cache_is_reused_without_a_word(built: TokenDataModule, caplog) -> None:
    caplog.set_level(logging.INFO, logger=cache_mod.__name__)
    make_dm(built.cache_dir).prepare_data()
    assert "rebuilding" not in caplog.text and "training" not in caplog.text


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphan_build_folders_are_removed_by_the_next_build(tmp_path: Path) -> None:
    """Item 15: a build that died left its temporary folder; the next build removes those of dead processes
    on this host, and those of other hosts once they are older than STALE_SECONDS; it keeps live ones."""
    cache_dir = tmp_path / "cache"
    host = socket.gethostname()
    folders = {
        "dead": f".facts-0123456789abcdef.tmp-{host}-{dead_pid()}-0a1b2c3d",
        "legacy_old": ".facts-0123456789abcdef.tmp-99999999-0a1b2c3d",
        "other_host_old": ".text-0123456789abcdef.tmp-elsewhere-12-0a1b2c3d",
        "live": f".facts-0123456789abcdef.tmp-{host}-{os.getpid()}-0a1b2c3d",
        "other_host_new": ".text-0123456789abcdef.tmp-elsewhere-13-0a1b2c3d",
        "unrelated": ".not-a-build-folder",
    }
    old = time.time() - cache_mod.STALE_SECONDS - 60
    for key, name in folders.items():
        (cache_dir / name).mkdir(parents=True)
        (cache_dir / name / "train.bin").write_bytes(b"\0" * 16)
        if key.endswith("_old"):
            os.utime(cache_dir / name / "train.bin", (old, old))
            os.utime(cache_dir / name, (old, old))
    dm = make_dm(cache_dir)
    dm.prepare_data()
    left = {p.name for p in cache_dir.iterdir()}
    assert left == {dm.cache_path.name, folders["live"], folders["other_host_new"], folders["unrelated"]}


def clear_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_a_long_single_line_document_is_tokenized_in_bounded_memory(tmp_path: Path) -> None:
    """Item 14: encoded whole, a 3 MB one-line document took ~450 MB above the baseline (~140 bytes per character:
    58 MB needed ~7 GB); in bounded pieces the whole build (tokenizer training included) takes ~100 MB, under the
    200 MB bound, and the ids are those of the whole document."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    line = " ".join(rng.choices(words, k=550_000))[: 3 * 2**20]
    (tmp_path / "long.txt").write_text(f"{line}\n\na short second document for validation\n")
    dm = make_dm(tmp_path / "cache", TextSource(str(tmp_path / "long.txt"), val_fraction=0.5))
    if not clear_peak_rss():
        pytest.skip("cannot reset the peak RSS here")
    before = rss_mb("VmRSS")
    dm.prepare_data()
    growth = rss_mb("VmHWM") - before
    assert growth < 200, f"peak memory grew by {growth:.0f} MB"
    prefix = line[: line.rfind(" ", 0, 2**16)]  # whole words, far before the first piece boundary
    want = dm.tokenizer.encode(prefix).ids
    assert np.fromfile(dm.cache_path / "train.bin", dtype=dm.meta["dtype"])[: len(want)].tolist() == want


def test_pieces_cut_at_whitespace_and_keep_the_encoding(built: TokenDataModule) -> None:
    from project.data.tokenizer import pieces

    text = "lorem  ipsum\tdolor sit amet, consectetur " * 200
    parts = list(pieces(text, 100))
    assert "".join(parts) == text and all(len(p) <= 100 for p in parts)
    assert all(p[0].isspace() for p in parts[1:]) and all(not p[-1].isspace() for p in parts[:-1])
    tok = built.tokenizer
    assert [i for p in parts for i in tok.encode(p).ids] == tok.encode(text).ids
    assert list(pieces("x" * 250, 100)) == ["x" * 100, "x" * 100, "x" * 50]  # no whitespace: hard cuts
