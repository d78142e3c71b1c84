"""The interface every document source implements, and the train/val tail split they share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from project.config import ConfigError, UserError

SPLITS = ("train", "val")


class MissingDataError(UserError, FileNotFoundError):
    """A data file or tokenizer named in the settings does not exist."""


@runtime_checkable
class Source(Protocol):
    """A corpus: `kind` names the cache folder, `describe()` keys the cache, `documents()` yields text."""

    kind: str

    def describe(self) -> dict[str, Any]: ...

    def documents(self, split: str) -> Iterator[str]: ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.source.val_fraction must be in (0, 1), got {val_fraction}")


def val_count(num_documents: int, val_fraction: float, what: str) -> int:
    """Number of trailing documents that form the validation split (at least one, never all)."""
    if num_documents < 2:
        raise ConfigError(f"{what}: found {num_documents} document(s); a train/val split needs at least 2")
    return min(num_documents - 1, max(1, round(num_documents * val_fraction)))


def tail_split(docs: Iterator[str], split: str, num_documents: int, num_val: int) -> Iterator[str]:
    """Yield the first `num_documents - num_val` documents for train, the rest for val."""
    first_val = num_documents - num_val
    stop = num_documents if split == "val" else first_val
    for index, doc in enumerate(docs):
        if index >= stop:
            return
        if split == "train" or index >= first_val:
            yield doc
