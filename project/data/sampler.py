"""An endless, seeded, rank-sharded shuffle over training windows that can resume at any batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Yields window indices forever: pass p is a seeded permutation of all windows, cut into
    global batches of `batch_size * world_size`; rank r takes every `world_size`-th index of each.

    So the union of the ranks' batch k is exactly the single-process batch k of size
    `batch_size * world_size`, and `start_batch()` (read when iteration starts) skips batches
    already trained on, so a resumed run sees the same data as an uninterrupted one."""

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: Callable[[], int] = lambda: 0,
    ) -> None:
        self.global_batch = batch_size * world_size
        if num_windows < self.global_batch:
            raise ValueError(
                f"{num_windows} training windows cannot fill one global batch of {batch_size} x {world_size} ranks"
            )
        self.num_windows, self.seed, self.rank, self.world_size = num_windows, seed, rank, world_size
        self.batches_per_pass = num_windows // self.global_batch
        self.start_batch = start_batch

    def _permutation(self, pass_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return torch.randperm(self.num_windows, generator=generator)

    def __iter__(self) -> Iterator[int]:
        batch = self.start_batch()
        while True:
            pass_index, offset = divmod(batch, self.batches_per_pass)
            order = self._permutation(pass_index)
            for b in range(offset, self.batches_per_pass):
                chunk = order[b * self.global_batch : (b + 1) * self.global_batch]
                yield from chunk[self.rank :: self.world_size].tolist()
            batch = (pass_index + 1) * self.batches_per_pass
