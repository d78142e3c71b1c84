"""The pre-tokeniser's two halves: encoding bounded batches of document pieces (in worker processes), and writing
the ids into shards that are closed, renamed into place and recorded in progress.json together, at document ends."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from project.data.cache import ENCODE_BATCH, ENCODE_BATCH_CHARS
from project.data.inputs import Position, split_of
from project.data.manifest import PROGRESS, shard_name
from project.data.source import SPLITS
from project.data.tokenizer import pieces
from project.io import atomic_write_json, default_file_mode

Item = tuple[str, bool, bool, Position]  # split, first piece of its document, last piece, position after the document
Batch = tuple[list[Item], list[str]]  # the pieces' bookkeeping and their texts

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def piece_batches(documents: Iterator[tuple[Position, str]], val_fraction: float) -> Iterator[Batch]:
    """The documents' pieces (at most MAX_PIECE_CHARS characters, cut where whitespace starts) in batches of at most
    ENCODE_BATCH pieces and ENCODE_BATCH_CHARS characters: what one encode call holds, whatever the document size."""
    items: list[Item] = []
    texts: list[str] = []
    chars = 0
    for position, document in documents:
        split = split_of(document, val_fraction)
        parts = pieces(document)
        part = next(parts)
        first = True
        while part is not None:
            following = next(parts, None)  # one piece ahead, to know the last one; never a list of all of them
            if items and (len(items) == ENCODE_BATCH or chars + len(part) > ENCODE_BATCH_CHARS):
                yield items, texts
                items, texts, chars = [], [], 0
            items.append((split, first, following is None, position))
            texts.append(part)
            chars += len(part)
            part, first = following, False
    if items:
        yield items, texts


def encode_pieces(tokenizer: Tokenizer, texts: list[str], firsts: list[bool], dtype: np.dtype) -> list[np.ndarray]:
    """Each piece's ids; a tokenizer's special tokens only where a document starts (as when encoded whole)."""
    heads = iter(tokenizer.encode_batch_fast([t for t, first in zip(texts, firsts) if first]))
    rest = iter(tokenizer.encode_batch_fast([t for t, first in zip(texts, firsts) if not first],
                                            add_special_tokens=False))  # fmt: skip
    return [np.asarray(next(heads if first else rest).ids, dtype=dtype) for first in firsts]


def init_worker(tokenizer_json: str, dtype: str) -> None:
    """A worker process's tokenizer, single-threaded (the processes are the parallelism)."""
    global _worker_tokenizer, _worker_dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer, _worker_dtype = Tokenizer.from_str(tokenizer_json), np.dtype(dtype)


def encode_in_worker(texts: list[str], firsts: list[bool]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None and _worker_dtype is not None, "init_worker did not run"
    return encode_pieces(_worker_tokenizer, texts, firsts, _worker_dtype)


class ShardWriter:
    """Appends ids to the current train and val shards; once they hold `shard_tokens` tokens together, at the end
    of a document, closes both, renames them into place and records them with the input position reached in
    progress.json (a checkpoint). A killed run resumes at the last checkpoint: finished shards stay untouched."""

    def __init__(self, folder: Path, progress: dict[str, Any], dtype: np.dtype, eos: int, shard_tokens: int) -> None:
        self.folder, self.progress, self.dtype, self.shard_tokens = folder, progress, dtype, shard_tokens
        self.eos = np.array([eos], dtype=dtype)
        self.open: dict[str, dict[str, Any]] = {}
        self.pending = 0  # tokens in the open shards

    @property
    def index(self) -> int:
        return len(self.progress["checkpoints"])

    def write(self, items: list[Item], ids: list[np.ndarray]) -> int:
        """Write one encoded batch (EOS after each document's last piece); return the tokens written."""
        written = 0
        for (split, _, last, position), piece in zip(items, ids):
            shard = self._shard(split)
            written += self._append(shard, piece)
            if last:
                written += self._append(shard, self.eos)
                shard["documents"] += 1
                if self.pending >= self.shard_tokens:
                    self.checkpoint(position)
        return written

    def checkpoint(self, position: Position) -> None:
        """Close the open shards, rename them into place, then record them (progress.json, atomically)."""
        shards = {}
        for split in SPLITS:
            shard = self.open.pop(split, None)
            if shard is None:
                continue
            shard["file"].flush()
            os.fsync(shard["file"].fileno())
            shard["file"].close()
            name = shard_name(split, self.index)
            os.replace(shard["tmp"], self.folder / name)
            shards[split] = {
                "name": name,
                "tokens": shard["tokens"],
                "documents": shard["documents"],
                "bytes": shard["tokens"] * self.dtype.itemsize,
                "blake2b": shard["hash"].hexdigest(),  # as the data cache's meta.json records files
            }
        self.progress["checkpoints"].append({"position": list(position), "shards": shards})
        atomic_write_json(self.folder / PROGRESS, self.progress)
        self.pending = 0

    def _shard(self, split: str) -> dict[str, Any]:
        shard = self.open.get(split)
        if shard is None:
            tmp = self.folder / f".{shard_name(split, self.index)}.tmp-{os.getpid()}"
            handle = open(tmp, "wb")  # noqa: SIM115 (closed at the checkpoint)
            os.fchmod(handle.fileno(), default_file_mode())
            shard = {"file": handle, "tmp": tmp, "tokens": 0, "documents": 0, "hash": hashlib.blake2b(digest_size=16)}
            self.open[split] = shard
        return shard

    def _append(self, shard: dict[str, Any], ids: np.ndarray) -> int:
        data = ids.tobytes()
        shard["file"].write(data)
        shard["hash"].update(data)
        shard["tokens"] += len(ids)
        self.pending += len(ids)
        return len(ids)
