"""Documents from local .txt, .jsonl and .parquet files (paths, globs or folders)."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from project.config import ConfigError, UserError
from project.data.source import MissingDataError, check_fraction, check_split, tail_split, val_count

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")
ENCODING_ERRORS = ("strict", "replace", "ignore")


class TextDecodeError(UserError, ValueError):
    """A text file is not valid UTF-8."""


class TextSource:
    """Local text files. A .txt file holds one document per blank-line-separated block; a .jsonl file one
    JSON object per line with the text in `text_field`; a .parquet file a string column `text_field`.
    Files are read in sorted order per pattern; the last `val_fraction` of documents (at least one) is val."""

    kind = "text"

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None,
        text_field: str = "text",
        val_fraction: float = 0.05,
        encoding_errors: str = "strict",
    ) -> None:
        check_fraction(val_fraction)
        if encoding_errors not in ENCODING_ERRORS:
            raise ConfigError(f"data.source.encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
        self.patterns = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths or []]
        if not self.patterns:
            raise ConfigError(
                "data=text needs data.source.paths: the files, folders or globs to read, "
                "e.g. data=text 'data.source.paths=[corpus/*.jsonl]'"
            )
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
            self._num_documents = self._count_documents()
        num_val = val_count(self._num_documents, self.val_fraction, f"TextSource({self.patterns})")
        return tail_split(self._all_documents(), split, self._num_documents, num_val)

    def _all_documents(self) -> Iterator[str]:
        for path in self.files:
            yield from read_documents(path, self.text_field, self.encoding_errors)

    def _count_documents(self) -> int:
        """Documents in all files (the first full pass): warns once per file about records without text, and
        refuses a file without any."""
        total = 0
        for path in self.files:
            skipped = Skipped()
            count = sum(1 for _ in read_documents(path, self.text_field, self.encoding_errors, skipped))
            skipped.check(path, self.text_field, count)
            total += count
        return total


@dataclass
class Skipped:
    """Records of one file that gave no document: without the text field (or null), or with empty text."""

    missing: int = 0
    empty: int = 0
    fields: set[str] = field(default_factory=set)  # the fields the records without the text field have

    def check(self, path: Path, text_field: str, count: int) -> None:
        """Warn about the skipped records (naming the file and the counts); ConfigError if nothing is left."""
        records = count + self.missing + self.empty
        if count == 0 and self.missing == records:
            seen = f" (fields found: {', '.join(sorted(self.fields))})" if self.fields else ""
            raise ConfigError(
                f"{path}: none of its {records} records has a {text_field!r} field{seen}; "
                "set data.source.text_field to the field that holds the text"
            )
        if count == 0:
            what = f"no non-empty {text_field!r} field" if path.suffix != ".txt" else "no text"
            raise ConfigError(f"{path}: {what} found (empty data)")
        if self.missing:
            log.warning("%s: %d of %d records have no %r field and were skipped (data.source.text_field names the "
                        "field that holds the text)", path, self.missing, records, text_field)  # fmt: skip
        if self.empty:
            log.warning("%s: %d of %d records have an empty %r field and were skipped", path, self.empty, records,
                        text_field)  # fmt: skip


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
                    raise ConfigError(f"{match}: unsupported file type {match.suffix!r}; expected one of {SUFFIXES}")
                found.append(match)
        if not found:
            raise MissingDataError(f"no {'/'.join(SUFFIXES)} files match data path {pattern!r}")
        files += [f.absolute() for f in found]
    return list(dict.fromkeys(files))


def read_documents(path: Path, text_field: str, errors: str, skipped: Skipped | None = None) -> Iterator[str]:
    """The non-empty documents of one file; records without text are counted in `skipped`."""
    skipped = Skipped() if skipped is None else skipped
    if path.suffix == ".parquet":
        yield from _read_parquet(path, text_field, skipped)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, errors, skipped)
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


def _read_jsonl(path: Path, text_field: str, errors: str, skipped: Skipped) -> Iterator[str]:
    for number, line in _lines(path, errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {number} is not valid JSON: {e}") from e
        text = record.get(text_field) if isinstance(record, dict) else None
        if text is None:
            skipped.missing += 1
            skipped.fields.update(k for k in (record if isinstance(record, dict) else ()) if k != text_field)
            continue
        if not isinstance(text, str):
            raise ConfigError(f"{path}: line {number}: field {text_field!r} is {type(text).__name__}, not a string")
        if text.strip():
            yield text
        else:
            skipped.empty += 1


def _read_parquet(path: Path, text_field: str, skipped: Skipped) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: cannot read as parquet: {e}") from e
    if text_field not in parquet.schema_arrow.names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    try:
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, bytes):
                    raise ConfigError(f"{path}: column {text_field!r} holds bytes, not strings")
                if text is None:
                    skipped.missing += 1
                elif text.strip():
                    yield text
                else:
                    skipped.empty += 1
    except pa.ArrowException as e:
        raise ConfigError(f"{path}: cannot read column {text_field!r}: {e}") from e
