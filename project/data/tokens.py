"""Train from a folder of pre-tokenised shards (`python -m project.data.pretokenize`; layout in manifest.py), read
by memmap. A split is the concatenation of its shards in manifest order; its windows are cut from that
concatenation exactly as from the cache's single file, so the sampler's one pass reads no window, hence no
document, twice."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from project.config import ConfigError
from project.data.manifest import TOKENIZER, PretokenizedDataError, content_digest, load_manifest
from project.data.module import TokenDataModule
from project.data.source import SPLITS
from project.data.tokenizer import TOKENIZER_KEYS, load_tokenizer
from project.data.windows import window_count

MAX_OPEN_SHARDS = 64  # memmaps kept open per process (each holds a file descriptor)


class ShardedTokenWindows(Dataset[torch.Tensor]):
    """`TokenWindows` over the concatenation of several token files: window i is tokens[i*T : i*T + T + 1]
    (T = seq_len), read from the one or more shards it spans; shards are memmapped lazily, a few at a time."""

    def __init__(self, shards: list[tuple[Path, int]], dtype: str, seq_len: int, max_windows: int | None = None):
        self.paths = [path for path, _ in shards]
        self.starts = np.cumsum([0] + [tokens for _, tokens in shards])  # token offset of each shard, then the total
        self.num_tokens = int(self.starts[-1])
        if self.num_tokens < seq_len + 1:
            raise ConfigError(
                f"the {len(shards)} shard(s) from {self.paths[0].name} hold {self.num_tokens} tokens; "
                f"seq_len={seq_len} needs at least {seq_len + 1} (use a smaller data.seq_len or more data)"
            )
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        windows = window_count(self.num_tokens, seq_len)
        self.num_windows = windows if max_windows is None else min(windows, max_windows)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        start = index * self.seq_len
        stop = start + self.seq_len + 1
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            begin = start - int(self.starts[shard])
            end = min(stop, int(self.starts[shard + 1])) - int(self.starts[shard])
            parts.append(self._tokens(shard)[begin:end])
            start += end - begin
            shard += 1
        window = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(window.astype(np.int64))

    def _tokens(self, shard: int) -> np.memmap:
        tokens = self._maps.pop(shard, None)
        if tokens is None:
            size = int(self.starts[shard + 1] - self.starts[shard])
            tokens = np.memmap(self.paths[shard], dtype=self.dtype, mode="r", shape=(size,))
            if len(self._maps) >= MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        self._maps[shard] = tokens  # most recently used last
        return tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}  # each dataloader worker opens its own maps


class PretokenizedDataModule(TokenDataModule):
    """`TokenDataModule` over a pre-tokenised folder: same windows, sampler, rank sharding and resume; the
    tokenizer is the folder's (`tokenizer.path`, if given, must be the same tokenizer by content)."""

    def __init__(
        self,
        path: str | None,
        tokenizer: Mapping[str, Any] | None = None,
        seq_len: int = 1024,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_val_batches: int | None = None,
        verify_checksums: bool = True,
    ) -> None:
        if not path:
            raise ConfigError("data=tokens needs data.path: the folder written by `python -m project.data.pretokenize`")
        # vocab_size / min_frequency are the other sources' training settings (experiments set them for every
        # source); the folder fixes the tokenizer, so only `path` is checked.
        unknown = set(tokenizer or {}) - TOKENIZER_KEYS
        if unknown:
            raise ConfigError(f"unknown data.tokenizer settings {sorted(unknown)} for data=tokens; expected path")
        self.folder = Path(path).expanduser().absolute()
        self.expected_tokenizer = (tokenizer or {}).get("path")
        self.verify_checksums = verify_checksums
        super().__init__(source=None, tokenizer=None, seq_len=seq_len, batch_size=batch_size,  # type: ignore[arg-type]
                         val_batch_size=val_batch_size, num_workers=num_workers, cache_dir=self.folder, seed=seed,
                         max_val_batches=max_val_batches)  # fmt: skip
        self.manifest: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        """Check the manifest, the tokenizer and the shards (no tokenization: that was done once, beforehand)."""
        if self._meta is not None:
            return
        manifest = load_manifest(self.folder, self.verify_checksums)
        if self.expected_tokenizer is not None:
            theirs = load_tokenizer(Path(self.expected_tokenizer).expanduser()).to_str()
            if theirs != load_tokenizer(self.folder / TOKENIZER).to_str():
                raise PretokenizedDataError(
                    f"data.tokenizer.path={self.expected_tokenizer} is not the tokenizer {self.folder} was "
                    f"pre-tokenised with ({self.folder / TOKENIZER}); drop the setting or pre-tokenise with that one"
                )
        splits = manifest["splits"]
        self.manifest = manifest
        self._meta = {
            "kind": "tokens",
            "source": {"content_sha256": content_digest(manifest), "val_fraction": manifest["plan"]["val_fraction"]},
            "vocab_size": manifest["tokenizer"]["vocab_size"],
            "eos_id": manifest["tokenizer"]["eos_id"],
            "dtype": manifest["dtype"],
            **{f"{split}_{what}": splits[split][what] for split in SPLITS for what in ("tokens", "documents")},
            "qa": None,
        }

    def _windows(self, split: str, max_windows: int | None) -> ShardedTokenWindows:
        assert self.manifest is not None, "setup() prepares the data first"
        shards = [(self.folder / s["name"], int(s["tokens"])) for s in self.manifest["splits"][split]["shards"]]
        return ShardedTokenWindows(shards, self.meta["dtype"], self.seq_len, max_windows)

    @property
    def cache_path(self) -> Path:
        return self.folder

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            raise RuntimeError(f"{self.folder} is not checked yet: call prepare_data() first")
        return self._meta
