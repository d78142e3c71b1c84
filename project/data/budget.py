"""How much of its training data a run reads: windows per step, epochs, and a facts corpus sized to one pass.

Training reads fixed-length windows through an endless seeded shuffle (`sampler.py`): pass p is a
permutation of the usable windows, so a run whose steps fit in one pass reads no window, hence no
training token, twice. `epochs` below is windows read / usable windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from project.data.windows import window_count

AUTO = "auto"  # data.source.docs_per_entity: size the facts corpus so the run reads it at most once
PILOT_DOCS_PER_ENTITY = 4  # the pilot corpus that measures tokens per document before sizing
SIZE_MARGIN = 0.05  # extra documents over the estimate (tokenizer and batching differences)


@dataclass(frozen=True)
class DataBudget:
    """What a run of `steps` optimizer steps reads of a training split of `train_tokens` tokens."""

    steps: int
    windows_per_step: int  # batch_size x data-parallel ranks x accumulate_grad_batches
    seq_len: int
    train_tokens: int

    @property
    def usable_windows(self) -> int:
        """Windows in one pass of the sampler: whole global batches of whole windows."""
        windows = window_count(self.train_tokens, self.seq_len)
        return windows // self.windows_per_step * self.windows_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.usable_windows // self.windows_per_step

    @property
    def epochs(self) -> float:
        """Passes over the training split (<= 1: no training token is read twice)."""
        if self.usable_windows == 0:
            return math.inf
        return self.steps * self.windows_per_step / self.usable_windows


def world_size(trainer: Any) -> int:
    """Data-parallel processes the trainer config asks for (devices x nodes; 1 for 'auto' or a list)."""
    devices = trainer.get("devices", 1)
    return (devices if isinstance(devices, int) else 1) * trainer.get("num_nodes", 1)


def windows_per_step(batch_size: int, trainer: Any) -> int:
    """Training windows one optimizer step reads over all ranks."""
    return batch_size * world_size(trainer) * trainer.get("accumulate_grad_batches", 1)


def is_auto(data_cfg: Any) -> bool:
    """Whether the data config asks for the facts corpus to be sized to the run."""
    source = data_cfg.get("source") or {}
    return source.get("docs_per_entity") == AUTO


def docs_per_entity_for(tokens_needed: int, tokens_per_document: float, num_entities: int) -> int:
    """Documents per person so the corpus holds `tokens_needed` tokens with SIZE_MARGIN to spare."""
    if tokens_per_document <= 0 or num_entities < 1:
        raise ValueError(f"need tokens_per_document > 0 and num_entities >= 1, got {tokens_per_document}, {num_entities}")
    documents = tokens_needed * (1 + SIZE_MARGIN) / tokens_per_document
    return max(1, math.ceil(documents / num_entities))


def tokens_needed(steps: int, windows_per_step: int, seq_len: int) -> int:
    """Training tokens a run of `steps` steps reads when no window repeats (windows overlap by one token)."""
    return steps * windows_per_step * seq_len + 1
