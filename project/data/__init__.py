"""Token data for jtok: document sources, tokenizer, cached shards and the LightningDataModule."""

from project.data.docstrings import DocstringSource
from project.data.facts import FactsSource
from project.data.hf import DatasetUnavailableError, HFSource
from project.data.module import TokenDataModule
from project.data.source import Source
from project.data.text import TextDecodeError, TextSource

__all__ = [
    "DatasetUnavailableError",
    "DocstringSource",
    "FactsSource",
    "HFSource",
    "Source",
    "TextDecodeError",
    "TextSource",
    "TokenDataModule",
]
