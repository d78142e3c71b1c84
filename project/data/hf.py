"""Documents from a Hugging Face dataset, failing fast and clearly when it cannot be reached.

`data=hf` tokenizes at start-up, so it suits what fits in one cache build (`max_documents`); a larger corpus is
pre-tokenised once (`python -m project.data.pretokenize --hf NAME`, which streams the dataset shard by shard)
and trained from with `data=tokens`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from project.config import ConfigError, UserError
from project.data.source import check_fraction, check_split, tail_split, val_count
from project.hub import ensure_hub_mode


class DatasetUnavailableError(UserError, RuntimeError):
    """The dataset is neither reachable on the Hub nor in the local Hugging Face cache."""


class HFSource:
    """`datasets.load_dataset(name, config, split=split)`; the last `val_fraction` of the first
    `max_documents` documents (all of them when None) is validation."""

    kind = "hf"

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        streaming: bool = False,
        max_documents: int | None = None,
        val_fraction: float = 0.01,
    ) -> None:
        check_fraction(val_fraction)
        if streaming and max_documents is None:
            raise ConfigError("HFSource(streaming=True) needs max_documents (a stream has no known length)")
        if max_documents is not None and max_documents < 2:
            raise ConfigError(f"data.source.max_documents must be >= 2, got {max_documents}")
        self.name = name
        self.config = config
        self.split = split
        self.text_field = text_field
        self.streaming = streaming
        self.max_documents = max_documents
        self.val_fraction = val_fraction

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
            "max_documents": self.max_documents,
            "val_fraction": self.val_fraction,
        }

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        dataset = self._load()
        total = self.max_documents if self.streaming else len(dataset)
        if self.max_documents is not None:
            total = min(total, self.max_documents)
        num_val = val_count(total, self.val_fraction, f"HFSource({self.label})")
        return tail_split(self._texts(dataset), split, total, num_val)

    @property
    def label(self) -> str:
        return self.name if self.config is None else f"{self.name}, config {self.config}"

    def _texts(self, dataset: Any) -> Iterator[str]:
        return record_texts(dataset, self.text_field, self.label)

    def _load(self) -> Any:
        return load_hf_dataset(self.name, self.config, self.split, self.streaming)


def record_texts(records: Iterable[Mapping[str, Any]], text_field: str, label: str) -> Iterator[str]:
    """Each record's `text_field` ("" for a null); ConfigError naming the fields when a record lacks it."""
    for record in records:
        if text_field not in record:
            raise ConfigError(f"dataset {label}: no field {text_field!r} (fields: {sorted(record)})")
        yield record[text_field] or ""


def load_hf_dataset(name: str, config: str | None, split: str, streaming: bool) -> Any:
    """`datasets.load_dataset(name, config, split=split, streaming=streaming)` (a Hub name, or a local folder of
    .jsonl/.parquet/.txt files); DatasetUnavailableError saying how to provide the data when it cannot be loaded."""
    offline = ensure_hub_mode()
    import datasets

    label = name if config is None else f"{name}, config {config}"
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:
        mode = "offline (Hub unreachable or HF_HUB_OFFLINE=1)" if offline else "online"
        raise DatasetUnavailableError(
            f"cannot load Hugging Face dataset {label} (split {split!r}, {mode}): "
            f"{type(e).__name__}: {e}\n"
            "Provide it in one of two ways:\n"
            "  1. warm the Hugging Face cache on a machine with Hub access (same HF_HOME), "
            f"e.g. datasets.load_dataset({name!r}, {config!r}, split={split!r}); or\n"
            "  2. export it to local .jsonl/.parquet/.txt files and train with "
            "data=text data.source.paths=[/path/to/files/*.parquet] (or pre-tokenise them: "
            "python -m project.data.pretokenize --input '/path/to/files/*.parquet' ..., or stream them: "
            "data=hf_stream data.source.name=/path/to/folder data.source.config=null)"
        ) from e
