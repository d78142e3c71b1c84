"""Documents from local .txt, .jsonl and .parquet files (paths, globs or folders)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from project.data.source import check_fraction, check_split, tail_split, val_count

SUFFIXES = (".txt", ".jsonl", ".parquet")
ENCODING_ERRORS = ("strict", "replace", "ignore")


class TextDecodeError(ValueError):
    """A text file is not valid UTF-8."""


class TextSource:
    """Local text files. A .txt file holds one document per blank-line-separated block; a .jsonl file one
    JSON object per line with the text in `text_field`; a .parquet file a string column `text_field`.
    Files are read in sorted order per pattern; the last `val_fraction` of documents (at least one) is val."""

    kind = "text"

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        text_field: str = "text",
        val_fraction: float = 0.05,
        encoding_errors: str = "strict",
    ) -> None:
        check_fraction(val_fraction)
        if encoding_errors not in ENCODING_ERRORS:
            raise ValueError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
        self.patterns = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
        if not self.patterns:
            raise ValueError("TextSource needs at least one path (data.source.paths=[...])")
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.encoding_errors = encoding_errors
        self.files = resolve_files(self.patterns)
        self._num_documents: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files],
            "text_field": self.text_field,
            "val_fraction": self.val_fraction,
            "encoding_errors": self.encoding_errors,
        }

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        if self._num_documents is None:
            self._num_documents = sum(1 for _ in self._all_documents())
        num_val = val_count(self._num_documents, self.val_fraction, f"TextSource({self.patterns})")
        return tail_split(self._all_documents(), split, self._num_documents, num_val)

    def _all_documents(self) -> Iterator[str]:
        for path in self.files:
            count = 0
            for doc in read_documents(path, self.text_field, self.encoding_errors):
                count += 1
                yield doc
            if count == 0:
                what = f"no non-empty {self.text_field!r} field" if path.suffix != ".txt" else "no text"
                raise ValueError(f"{path}: {what} found (empty data)")


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand globs and folders into a list of supported files; each pattern must match something."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        found: list[Path] = []
        for match in map(Path, matches):
            if match.is_dir():
                found += sorted(p for p in match.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            elif match.is_file():
                if match.suffix not in SUFFIXES:
                    raise ValueError(f"{match}: unsupported file type {match.suffix!r}; expected one of {SUFFIXES}")
                found.append(match)
        if not found:
            raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} files match data path {pattern!r}")
        files += [f.absolute() for f in found]
    return list(dict.fromkeys(files))


def read_documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        yield from _read_parquet(path, text_field)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, errors)
    else:
        yield from _read_txt(path, errors)


def _lines(path: Path, errors: str) -> Iterator[tuple[int, str]]:
    """Decoded lines with their 1-based line numbers; a decode error names the file and byte offset."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise TextDecodeError(
                    f"{path}: invalid UTF-8 at byte offset {offset + e.start} (line {number}): {e.reason}. "
                    "Fix the file or set data.source.encoding_errors=replace to substitute U+FFFD."
                ) from e
            offset += len(raw)


def _read_txt(path: Path, errors: str) -> Iterator[str]:
    block: list[str] = []
    for _, line in _lines(path, errors):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).strip("\n")
            block = []
    if block:
        yield "".join(block).strip("\n")


def _read_jsonl(path: Path, text_field: str, errors: str) -> Iterator[str]:
    for number, line in _lines(path, errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON: {e}") from e
        text = record.get(text_field) if isinstance(record, dict) else None
        if text is None:
            continue
        if not isinstance(text, str):
            raise ValueError(f"{path}: line {number}: field {text_field!r} is {type(text).__name__}, not a string")
        if text.strip():
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read as parquet: {e}") from e
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    try:
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, bytes):
                    raise ValueError(f"{path}: column {text_field!r} holds bytes, not strings")
                if text and text.strip():
                    yield text
    except pa.ArrowException as e:
        raise ValueError(f"{path}: cannot read column {text_field!r}: {e}") from e
