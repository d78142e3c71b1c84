"""The attention KV cache for incremental decoding (used by `project.model.Attention` and `project.generate`)."""

from __future__ import annotations

import torch

from project.config import ModelConfig


class KVCache:
    """Keys and values of every layer for a batch being decoded, preallocated to `max_len` positions.

    Rows may hold padding (`valid_BT` False), e.g. left-padded prompts of different lengths: padding
    is never attended to and does not advance a row's positions, so each row decodes exactly as it
    would alone."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions is longer than model.max_seq_len={cfg.max_seq_len}")
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.valid_BS = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen_B = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens so far per row
        self.length = 0  # positions filled (real or padding), the same for every row
        self.mask_B1TS: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.valid_BS.shape[1]

    def begin(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """Admit T new positions; return each new token's rotary position [B, T]."""
        B, T = valid_BT.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        self.valid_BS[:, start:end] = valid_BT
        pos_BT = (self.seen_B[:, None] + valid_BT.long().cumsum(1) - 1).clamp(min=0)
        self.seen_B += valid_BT.sum(1)
        # Query i sees the real keys up to its own position, and itself (so a padding query never sees
        # nothing, which would make its softmax NaN).
        q_pos = torch.arange(start, end, device=valid_BT.device)[:, None]
        k_pos = torch.arange(end, device=valid_BT.device)[None, :]
        allowed_TS = (k_pos <= q_pos)
        self.mask_B1TS = ((allowed_TS & self.valid_BS[:, None, :end]) | (k_pos == q_pos))[:, None]
        return pos_BT

    def update(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values for `layer`; return all of them so far."""
        end = self.length + k_BHTd.shape[2]
        self.k[layer][:, :, self.length : end] = k_BHTd
        self.v[layer][:, :, self.length : end] = v_BHTd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def end(self, steps: int) -> None:
        """Close the step begun by `begin`."""
        self.length += steps
        self.mask_B1TS = None
