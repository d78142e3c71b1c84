"""Build a dataset's cache folder (tokenizer, token shards, meta) atomically, or find the one already built.

meta.json records every file's size and BLAKE2b checksum; a folder is checked against it on every load and rebuilt,
with a warning naming the bad file, when they disagree. Builds happen in temporary sibling folders named after
their host and process, so that the next build can remove those of builds that died."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from project.data.source import SPLITS, Source
from project.data.tokenizer import (
    TokenizerSettings, document_pieces, eos_id, load_tokenizer, pieces, train_tokenizer, vocab_size_of,
)

FORMAT_VERSION = 2  # 2: meta.json records every file's size and checksum
ENCODE_BATCH = 512  # documents (or pieces of long ones) per encode call
ENCODE_BATCH_CHARS = 2**20  # characters per encode call: bounds the tokenizer's working memory
STALE_SECONDS = 24 * 3600  # a build folder of another host untouched this long belongs to a build that died
REQUIRED_META = ("vocab_size", "eos_id", "dtype", "train_tokens", "val_tokens", "files")
log = logging.getLogger(__name__)


class DamagedCache(Exception):
    """A file of a built cache folder disagrees with its meta.json (the message names the file)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def cache_folder(cache_dir: Path, source: Source, settings: TokenizerSettings) -> Path:
    """`cache_dir/<kind>-<sha256(source settings, tokenizer settings, format version)[:16]>`."""
    key = {"source": source.describe(), "tokenizer": settings.describe(), "format_version": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{source.kind}-{digest}"


def load_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's meta.json, checked against the files it lists; None if the folder is not built.
    Raises DamagedCache naming the first file that is missing, truncated, corrupt or unreadable."""
    if not folder.exists():
        return None
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedCache(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise DamagedCache(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DamagedCache(f"{path} is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DamagedCache(f"{path} is format version {meta.get('format_version')}, not {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing or not isinstance(meta["files"], dict):
        raise DamagedCache(f"{path} lacks {missing or 'a files record'}")
    for name, record in meta["files"].items():
        check_file(folder / name, record)
    return meta


def file_record(path: Path) -> dict[str, Any]:
    """What meta.json records of a file: its size in bytes and its BLAKE2b-128 checksum."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return {"bytes": path.stat().st_size, "blake2b": digest}


def check_file(path: Path, record: dict[str, Any]) -> None:
    """Raise DamagedCache unless `path` has the size and checksum meta.json records."""
    if not path.is_file():
        raise DamagedCache(f"{path} is missing")
    if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
        raise DamagedCache(f"{path}: meta.json's record of it is malformed ({record!r})")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DamagedCache(f"{path} has {size} bytes, meta.json records {record['bytes']}")
    digest = file_record(path)["blake2b"]
    if digest != record["blake2b"]:
        raise DamagedCache(f"{path} checksum {digest} differs from meta.json's {record['blake2b']} (corrupt)")


def verified_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's meta when it is built and intact; None (after a warning naming the bad file) when damaged."""
    try:
        return load_meta(folder)
    except DamagedCache as e:
        log.warning("%s: rebuilding the cache folder %s", e, folder)
        return None


def ensure_cache(folder: Path, source: Source, settings: TokenizerSettings) -> dict[str, Any]:
    """Return the folder's meta, building the folder first if it is missing or damaged (into a temporary
    sibling, then renamed); orphan build folders of builds that died are removed first."""
    meta = verified_meta(folder)
    if meta is not None:
        return meta
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder.parent)
    tmp = temporary_sibling(folder)
    tmp.mkdir()
    try:
        meta = install(tmp, folder, build(tmp, source, settings))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def install(built: Path, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Rename the built folder into place and return its meta, unless another process installed an intact one
    meanwhile (then that one's). A damaged folder in the way is moved aside (readers keep its open files), removed."""
    aside = temporary_sibling(folder)
    try:
        theirs = _intact_meta(folder)
        if theirs is not None:
            log.info("%s was built concurrently by another process; using that one", folder)
            return theirs
        os.replace(folder, aside)
    except FileNotFoundError:  # nothing in the way
        pass
    try:
        os.replace(built, folder)
    except OSError:
        theirs = _intact_meta(folder)
        if theirs is None:
            raise
        log.info("%s was built concurrently by another process; using that one", folder)
        return theirs
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return meta


def _intact_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's meta if it is built and intact, else None (quietly: the caller replaces it)."""
    try:
        return load_meta(folder)
    except DamagedCache:
        return None


def temporary_sibling(folder: Path) -> Path:
    """A fresh name beside `folder` that records this host and process, so an orphan can be told from a build."""
    return folder.parent / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_TEMPORARY = re.compile(r"^\..+\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")  # host absent: format 1


def remove_orphans(cache_dir: Path) -> None:
    """Remove the temporary folders of builds that died: on this host those whose process is gone; of other
    hosts sharing the cache (or of unknown origin) those untouched for STALE_SECONDS."""
    for path in cache_dir.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_dir() and _is_orphan(path, match["host"], int(match["pid"])):
            log.info("removing %s, left by a cache build that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def _is_orphan(path: Path, host: str | None, pid: int) -> bool:
    """Whether a temporary folder's build is over: its process is gone (this host), or it is stale (elsewhere)."""
    if host == socket.gethostname():
        return not _process_alive(pid)
    try:
        touched = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir())])
    except FileNotFoundError:  # removed meanwhile
        return False
    return time.time() - touched > STALE_SECONDS


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def build(folder: Path, source: Source, settings: TokenizerSettings) -> dict[str, Any]:
    start = time.perf_counter()
    if settings.path is None:
        log.info("training a %d-token byte-level BPE on %s train documents", settings.vocab_size, source.kind)
        documents = document_pieces(source.documents("train"))  # the same pre-tokens as whole documents
        tokenizer = train_tokenizer(documents, settings.vocab_size, settings.min_frequency)
    else:
        tokenizer = load_tokenizer(settings.path)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab_size = vocab_size_of(tokenizer)
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
    meta["files"] = {path.name: file_record(path) for path in sorted(folder.iterdir())}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_tokens(
    tokenizer: Tokenizer, documents: Iterable[str], path: Path, dtype: np.dtype, eos: int, split: str
) -> tuple[int, int]:
    """Tokenize documents, each followed by EOS, appending to a flat binary file; return (documents, tokens).
    Long documents go in pieces and each encode call gets at most ENCODE_BATCH_CHARS characters."""
    num_docs = num_tokens = 0
    progress = tqdm(documents, desc=f"tokenize {split}", unit="doc", delay=2.0, leave=False)
    with path.open("wb") as f:
        for batch in _piece_batches((d for d in progress if d), ENCODE_BATCH, ENCODE_BATCH_CHARS):
            chunk = _encode(tokenizer, batch, dtype, eos)
            chunk.tofile(f)
            num_docs += sum(last for _, _, last in batch)
            num_tokens += len(chunk)
    return num_docs, num_tokens


Piece = tuple[str, bool, bool]  # text, first piece of its document, last piece of its document


def _piece_batches(documents: Iterator[str], max_items: int, max_chars: int) -> Iterator[list[Piece]]:
    """The documents' pieces in batches of at most `max_items` pieces and (but for one long piece) `max_chars`."""
    batch: list[Piece] = []
    chars = 0
    for document in documents:
        parts = list(pieces(document))
        for index, part in enumerate(parts):
            if batch and (len(batch) == max_items or chars + len(part) > max_chars):
                yield batch
                batch, chars = [], 0
            batch.append((part, index == 0, index == len(parts) - 1))
            chars += len(part)
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, batch: list[Piece], dtype: np.dtype, eos: int) -> np.ndarray:
    """The batch's ids, EOS after each document's last piece; a tokenizer's special tokens only where a document
    starts (as when it is encoded whole)."""
    heads = iter(tokenizer.encode_batch_fast([text for text, first, _ in batch if first]))
    rest = iter(tokenizer.encode_batch_fast([text for text, first, _ in batch if not first], add_special_tokens=False))
    ids: list[np.ndarray] = []
    for _, first, last in batch:
        ids.append(np.asarray(next(heads if first else rest).ids, dtype=dtype))
        if last:
            ids.append(np.array([eos], dtype=dtype))
    return np.concatenate(ids)
