"""Train a byte-level BPE tokenizer, or load a given tokenizer.json, with `<|endoftext|>` as EOS."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from project.config import ConfigError
from project.data.source import MissingDataError

EOS = "<|endoftext|>"
MAX_PIECE_CHARS = 2**18  # longer documents are tokenized in pieces: ~140 bytes of working memory per character
_RUN_START = re.compile(r"(?<=\S)\s")  # the first whitespace character after a word


TOKENIZER_KEYS = frozenset({"vocab_size", "path", "min_frequency"})  # the data.tokenizer settings


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Rows an embedding needs for every id the tokenizer can produce (ids may exceed its reported size)."""
    return max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab().values()) + 1)


@dataclass(frozen=True)
class TokenizerSettings:
    """The `data.tokenizer` config: train a BPE of `vocab_size`, or load the tokenizer.json at `path`."""

    vocab_size: int = 2048
    path: str | None = None
    min_frequency: int = 2

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TokenizerSettings:
        config = dict(config or {})
        unknown = set(config) - TOKENIZER_KEYS
        if unknown:
            raise TypeError(f"unknown tokenizer settings {sorted(unknown)}; expected vocab_size, path, min_frequency")
        settings = cls(**config)
        if settings.path is not None:
            path = Path(settings.path).expanduser().absolute()
            if not path.is_file():
                raise MissingDataError(f"data.tokenizer.path {settings.path!r} does not exist (resolved to {path})")
            settings = cls(settings.vocab_size, str(path), settings.min_frequency)
        elif settings.vocab_size < 1 or settings.min_frequency < 1:
            raise ConfigError(f"data.tokenizer vocab_size and min_frequency must be >= 1, got {settings}")
        return settings

    def describe(self) -> dict[str, Any]:
        """Cache-key view: only what changes the tokens (a given file by content, not by location)."""
        if self.path is None:
            return {"vocab_size": self.vocab_size, "min_frequency": self.min_frequency}
        return {"sha256": hashlib.sha256(Path(self.path).read_bytes()).hexdigest()}


def train_tokenizer(documents: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE; EOS is id 0. The vocab may come out smaller than asked on a tiny corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def pieces(document: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """`document` in consecutive pieces of at most `max_chars` characters, each cut where a whitespace run starts.

    The byte-level BPE trained here never merges across such a cut (no pre-token holds a non-space followed by
    whitespace), so the pieces' ids joined are the document's ids. A stretch without whitespace is cut anywhere."""
    start = 0
    while len(document) - start > max_chars:
        cut = _cut(document, start, max_chars)
        yield document[start:cut]
        start = cut
    yield document[start:]


def _cut(document: str, start: int, max_chars: int) -> int:
    """The end of the piece from `start`: the last whitespace-run start in its second half, else its full length."""
    cut = start + max_chars
    for match in _RUN_START.finditer(document, start + max_chars // 2, start + max_chars):
        cut = match.start()
    return cut


def document_pieces(documents: Iterable[str], max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """Every document's pieces in order (what the tokenizer trainer reads: the same pre-tokens, bounded memory)."""
    for document in documents:
        yield from pieces(document, max_chars)


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConfigError(f"{path}: cannot load as a Hugging Face tokenizer.json: {e}") from e
    eos_id(tokenizer, path)
    return tokenizer


def eos_id(tokenizer: Tokenizer, where: str | Path = "tokenizer") -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise ConfigError(f"{where}: the vocabulary has no {EOS!r} token, which jtok uses as end of document")
    return token_id
