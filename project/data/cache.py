"""Build a dataset's cache folder (tokenizer, token shards, meta) atomically, or find the one already built."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from project.data.source import SPLITS, Source
from project.data.tokenizer import TokenizerSettings, eos_id, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
ENCODE_BATCH = 512
log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def cache_folder(cache_dir: Path, source: Source, settings: TokenizerSettings) -> Path:
    """`cache_dir/<kind>-<sha256(source settings, tokenizer settings, format version)[:16]>`."""
    key = {"source": source.describe(), "tokenizer": settings.describe(), "format_version": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{source.kind}-{digest}"


def load_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_cache(folder: Path, source: Source, settings: TokenizerSettings) -> dict[str, Any]:
    """Return the folder's meta, building the folder first if needed (into a temporary sibling, then renamed)."""
    meta = load_meta(folder)
    if meta is not None:
        return meta
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = build(tmp, source, settings)
        try:
            os.replace(tmp, folder)
        except OSError:
            if load_meta(folder) is None:
                raise
            log.info("%s was built concurrently by another process; using that one", folder)
            meta = load_meta(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def build(folder: Path, source: Source, settings: TokenizerSettings) -> dict[str, Any]:
    start = time.perf_counter()
    if settings.path is None:
        log.info("training a %d-token byte-level BPE on %s train documents", settings.vocab_size, source.kind)
        tokenizer = train_tokenizer(source.documents("train"), settings.vocab_size, settings.min_frequency)
    else:
        tokenizer = load_tokenizer(settings.path)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab_size = max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab().values()) + 1)
    if settings.path is None and vocab_size < settings.vocab_size:
        log.warning("the corpus only supports a %d-token vocabulary (asked for %d)", vocab_size, settings.vocab_size)
    eos = eos_id(tokenizer)
    dtype = token_dtype(vocab_size)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": source.kind,
        "source": source.describe(),
        "tokenizer": {**settings.describe(), "path": settings.path},
        "requested_vocab_size": None if settings.path else settings.vocab_size,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "dtype": dtype.name,
    }
    for split in SPLITS:
        docs, tokens = write_tokens(tokenizer, source.documents(split), folder / f"{split}.bin", dtype, eos, split)
        meta[f"{split}_documents"], meta[f"{split}_tokens"] = docs, tokens
        log.info("%s %s: %d documents, %d tokens", source.kind, split, docs, tokens)
    write_qa = getattr(source, "write_qa", None)
    meta["qa"] = "qa.jsonl" if write_qa is not None else None
    if write_qa is not None:
        meta["qa_items"] = write_qa(folder / "qa.jsonl")
    meta["build_seconds"] = round(time.perf_counter() - start, 3)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_tokens(
    tokenizer: Tokenizer, documents: Iterable[str], path: Path, dtype: np.dtype, eos: int, split: str
) -> tuple[int, int]:
    """Tokenize documents, each followed by EOS, appending to a flat binary file; return (documents, tokens)."""
    num_docs = num_tokens = 0
    progress = tqdm(documents, desc=f"tokenize {split}", unit="doc", delay=2.0, leave=False)
    with path.open("wb") as f:
        for batch in _batches((d for d in progress if d), ENCODE_BATCH):
            ids = [np.append(np.asarray(e.ids, dtype=dtype), dtype.type(eos)) for e in tokenizer.encode_batch(batch)]
            chunk = np.concatenate(ids)
            chunk.tofile(f)
            num_docs += len(batch)
            num_tokens += len(chunk)
    return num_docs, num_tokens


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(items, size)):
        yield batch
