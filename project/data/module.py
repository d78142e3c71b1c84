"""The LightningDataModule: a source, a tokenizer and cached shards, served as fixed-length windows."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Subset

from project.config import ConfigError
from project.data import cache
from project.data.sampler import ResumableShuffleSampler
from project.data.source import Source
from project.data.tokenizer import TokenizerSettings, load_tokenizer
from project.data.windows import TokenWindows, collate_windows, window_count


class TokenDataModule(L.LightningDataModule):
    """Serves `(inputs, targets)` int64 batches of shape [B, seq_len] from a cached, tokenized source."""

    def __init__(
        self,
        source: Source,
        tokenizer: Mapping[str, Any] | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | os.PathLike[str] = ".cache/jtok",
        seed: int = 0,
        max_val_batches: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("val_batch_size", val_batch_size),
                            ("max_val_batches", max_val_batches)):  # fmt: skip
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        self.source = source
        self.tokenizer_settings = TokenizerSettings.from_config(tokenizer)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.seed = seed
        self.max_val_batches = max_val_batches
        self._cache_path: Path | None = None
        self._meta: dict[str, Any] | None = None
        self._tokenizer: Tokenizer | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    def prepare_data(self) -> None:
        """Build (or find) the tokenizer and token shards in the cache folder; cheap once built."""
        if self._meta is None:
            self._meta = cache.ensure_cache(self.cache_path, self.source, self.tokenizer_settings)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if self.train_dataset is None:
            self.train_dataset = self._windows("train", None)
            if len(self.train_dataset) < self.batch_size:
                raise ConfigError(
                    f"the train split has {len(self.train_dataset)} windows of seq_len={self.seq_len}, "
                    f"fewer than batch_size={self.batch_size}"
                )
            max_windows = None if self.max_val_batches is None else self.max_val_batches * self.val_batch_size
            self.val_dataset = self._windows("val", max_windows)

    def _windows(self, split: str, max_windows: int | None) -> TokenWindows:
        meta = self.meta
        path = self.cache_path / f"{split}.bin"
        return TokenWindows(path, meta["dtype"], meta[f"{split}_tokens"], self.seq_len, max_windows)

    def train_dataloader(self) -> DataLoader:
        """Endless seeded shuffle (train by `trainer.max_steps`), sharded over ranks, resumable mid-pass."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        rank, world = self._rank_and_world()
        sampler = ResumableShuffleSampler(
            len(self.train_dataset), self.batch_size, self.seed, rank, world, start_batch=self._batches_done
        )
        return self._loader(self.train_dataset, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Every rank gets the same number of windows (FSDP needs matching forward calls)."""
        if self.val_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        rank, world = self._rank_and_world()
        usable = len(self.val_dataset) // world * world
        if usable == 0:
            raise ConfigError(f"the val split has {len(self.val_dataset)} windows, fewer than {world} ranks")
        subset = Subset(self.val_dataset, range(rank, usable, world))
        return self._loader(subset, self.val_batch_size, shuffle=False, drop_last=False)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _batches_done(self) -> int:
        """Training batches already consumed (restored from a checkpoint when resuming)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        # The loop's batch counters lag by one when a checkpoint is written at the end of a batch;
        # optimizer steps are exact.
        return int(trainer.global_step) * int(trainer.accumulate_grad_batches)

    def _loader(self, dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_windows,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    @property
    def cache_path(self) -> Path:
        if self._cache_path is None:
            self._cache_path = cache.cache_folder(self.cache_dir, self.source, self.tokenizer_settings)
        return self._cache_path

    @property
    def meta(self) -> dict[str, Any]:
        """The cache folder's meta.json: dtype, token and document counts, vocab size, settings."""
        if self._meta is None:
            self._meta = cache.load_meta(self.cache_path)
            if self._meta is None:
                raise RuntimeError(f"{self.cache_path} is not built yet: call prepare_data() first")
        return self._meta

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            _ = self.meta  # raises before prepare_data()
            self._tokenizer = load_tokenizer(self.cache_path / "tokenizer.json")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def qa_path(self) -> Path | None:
        name = self.meta.get("qa")
        return None if name is None else self.cache_path / name

    @property
    def train_tokens_per_epoch(self) -> int:
        """Target tokens seen in one epoch: full batches of full windows (drop_last)."""
        windows = window_count(self.meta["train_tokens"], self.seq_len)
        return windows // self.batch_size * self.batch_size * self.seq_len
