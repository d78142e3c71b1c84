"""Fixed-length (input, target) windows over a flat token file, opened lazily so workers share the page cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from project.config import ConfigError


def window_count(num_tokens: int, seq_len: int) -> int:
    """Whole (input, target) windows in `num_tokens` tokens: consecutive windows share one token."""
    return (num_tokens - 1) // seq_len


class TokenWindows(Dataset[torch.Tensor]):
    """Window i is `tokens[i*seq_len : i*seq_len + seq_len + 1]`; `max_windows` caps the count."""

    def __init__(self, path: Path, dtype: str, num_tokens: int, seq_len: int, max_windows: int | None = None):
        if num_tokens < seq_len + 1:
            raise ConfigError(
                f"{path.name} has {num_tokens} tokens; seq_len={seq_len} needs at least {seq_len + 1} "
                "(use a smaller data.seq_len or more data)"
            )
        self.path = path
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        windows = window_count(num_tokens, seq_len)
        self.num_windows = windows if max_windows is None else min(windows, max_windows)
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        start = index * self.seq_len
        return torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


def collate_windows(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows of seq_len+1 into (inputs, targets), targets shifted by one."""
    batch = torch.stack(windows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
