"""What the pre-tokeniser reads: local files, or a Hugging Face dataset streamed shard by shard, as an ordered list
of parts whose documents can be resumed from any (part, document) position, and each document's split."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from project.data.hf import load_hf_dataset, record_texts
from project.data.text import Skipped, read_documents, resolve_files

Position = tuple[int, int]  # (part, documents of that part already read)
HASH_CHARS = 2**20  # characters hashed at a time, so a huge document is never copied whole into bytes


class Inputs(Protocol):
    """A corpus in parts: `describe()` keys a resume, `documents(part)` yields that part's non-empty texts."""

    num_parts: int

    def describe(self) -> dict[str, Any]: ...

    def documents(self, part: int) -> Iterator[str]: ...


class FileInputs:
    """Local .txt / .jsonl / .parquet files (paths, folders, globs), one part per file, read as `data=text` does."""

    def __init__(self, patterns: list[str], text_field: str = "text", encoding_errors: str = "strict") -> None:
        self.files = resolve_files(patterns)
        self.text_field = text_field
        self.encoding_errors = encoding_errors
        self.num_parts = len(self.files)

    def describe(self) -> dict[str, Any]:
        return {
            "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files],
            "text_field": self.text_field,
            "encoding_errors": self.encoding_errors,
        }

    def documents(self, part: int) -> Iterator[str]:
        """The file's documents; once it is read to the end, a warning about records without text, or an error
        if it had none."""
        path: Path = self.files[part]
        skipped = Skipped()
        count = 0
        for count, document in enumerate(read_documents(path, self.text_field, self.encoding_errors, skipped), 1):
            yield document
        skipped.check(path, self.text_field, count)


class HFInputs:
    """A Hugging Face dataset (a Hub name in a warm cache, or a local folder of data files) read with
    `streaming=True`, one part per shard of the stream (usually one per data file): nothing is held whole."""

    def __init__(self, name: str, config: str | None = None, split: str = "train", text_field: str = "text") -> None:
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.dataset = load_hf_dataset(name, config, split, streaming=True)
        self.num_parts = int(self.dataset.n_shards)

    def describe(self) -> dict[str, Any]:
        return {"hf": self.name, "config": self.config, "split": self.split, "text_field": self.text_field,
                "shards": self.num_parts}  # fmt: skip

    def documents(self, part: int) -> Iterator[str]:
        shard = self.dataset.shard(num_shards=self.num_parts, index=part)
        label = f"{self.name} (shard {part} of {self.num_parts})"
        return (text for text in record_texts(shard, self.text_field, label) if text)


def documents_from(inputs: Inputs, start: Position = (0, 0)) -> Iterator[tuple[Position, str]]:
    """Every document from `start` on, with the position just after it (where a resume would start)."""
    first_part, skip = start
    for part in range(first_part, inputs.num_parts):
        offset = skip if part == first_part else 0
        documents = inputs.documents(part)
        for _ in itertools.islice(documents, offset):  # read, not encoded: only the position is restored
            pass
        for index, document in enumerate(documents, offset + 1):
            yield (part, index), document


def split_of(document: str, val_fraction: float) -> str:
    """The document's split: val for a `val_fraction` of documents chosen by a hash of their text (so duplicates
    share a split, and the choice depends neither on the order nor on the number of processes), else train."""
    digest = hashlib.blake2b(digest_size=8)
    for start in range(0, len(document), HASH_CHARS):
        digest.update(document[start : start + HASH_CHARS].encode("utf-8", "surrogatepass"))
    return "val" if int.from_bytes(digest.digest(), "big") < val_fraction * 2**64 else "train"
