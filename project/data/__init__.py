"""Token data for jtok: document sources, tokenizer, cached shards and the LightningDataModule.

Exports are imported on first use (PEP 562), so that `python -m project.data.pretokenize` and its worker processes
do not import Lightning (13 s of CPU on a 2-core machine) for the tokenizer alone."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from project.data.docstrings import DocstringSource
    from project.data.facts import FactsSource
    from project.data.hf import DatasetUnavailableError, HFSource
    from project.data.manifest import PretokenizedDataError
    from project.data.module import TokenDataModule
    from project.data.source import Source
    from project.data.stream import StreamEndedError, StreamingDataModule
    from project.data.text import TextDecodeError, TextSource
    from project.data.tokens import PretokenizedDataModule

_EXPORTS = {
    "DatasetUnavailableError": "project.data.hf",
    "DocstringSource": "project.data.docstrings",
    "FactsSource": "project.data.facts",
    "HFSource": "project.data.hf",
    "PretokenizedDataError": "project.data.manifest",
    "PretokenizedDataModule": "project.data.tokens",
    "Source": "project.data.source",
    "StreamEndedError": "project.data.stream",
    "StreamingDataModule": "project.data.stream",
    "TextDecodeError": "project.data.text",
    "TextSource": "project.data.text",
    "TokenDataModule": "project.data.module",
}
__all__ = [
    "DatasetUnavailableError",
    "DocstringSource",
    "FactsSource",
    "HFSource",
    "PretokenizedDataError",
    "PretokenizedDataModule",
    "Source",
    "StreamEndedError",
    "StreamingDataModule",
    "TextDecodeError",
    "TextSource",
    "TokenDataModule",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
