"""Train a byte-level BPE tokenizer, or load a given tokenizer.json, with `<|endoftext|>` as EOS."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerSettings:
    """The `data.tokenizer` config: train a BPE of `vocab_size`, or load the tokenizer.json at `path`."""

    vocab_size: int = 2048
    path: str | None = None
    min_frequency: int = 2

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TokenizerSettings:
        config = dict(config or {})
        unknown = set(config) - {"vocab_size", "path", "min_frequency"}
        if unknown:
            raise TypeError(f"unknown tokenizer settings {sorted(unknown)}; expected vocab_size, path, min_frequency")
        settings = cls(**config)
        if settings.path is not None:
            path = Path(settings.path).expanduser().absolute()
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer.path {settings.path!r} does not exist (resolved to {path})")
            settings = cls(settings.vocab_size, str(path), settings.min_frequency)
        elif settings.vocab_size < 1 or settings.min_frequency < 1:
            raise ValueError(f"vocab_size and min_frequency must be >= 1, got {settings}")
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot load as a Hugging Face tokenizer.json: {e}") from e
    eos_id(tokenizer, path)
    return tokenizer


def eos_id(tokenizer: Tokenizer, where: str | Path = "tokenizer") -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise ValueError(f"{where}: the vocabulary has no {EOS!r} token, which jtok uses as end of document")
    return token_id
