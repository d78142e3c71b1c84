"""The storage of one layer's token-indexed parameters: a whole table, one moved to host memory, or a rank's rows
of a row-sharded one (`parallel.tables=row_sharded`, project/table_parallel.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from project.table_parallel import RowShard, ShardedRows, init_rows, load_rows_hook, save_rows_hook


class TokenTable(nn.Module):
    """Token-indexed rows: `[V, d]` (JTok) or a pool `[n_e, V, d]` (JTok-M). Its own module so
    that the optimizer and FSDP can treat the tables apart from the backbone. Row-sharded
    (`take_rows`), it holds one rank's slice of the rows: `[rows, d]` or `[n_e, rows, d]`."""

    def __init__(self, *shape: int, init_std: float, deferred: bool = False):
        super().__init__()
        # deferred: no storage until `take_rows` (row-sharded tables: no rank ever allocates the whole table).
        self.weight = nn.Parameter(torch.empty(*shape, device="meta" if deferred else None))
        self.global_shape = tuple(shape)
        self.init_std = init_std
        # True: backward yields only the touched rows, as a sparse COO gradient (`Transformer.use_row_sparse_grads`).
        self.sparse_grad = False
        self.shard: RowShard | None = None
        self.register_state_dict_post_hook(save_rows_hook)
        self.register_load_state_dict_pre_hook(load_rows_hook)

    def reset_parameters(self) -> None:
        if self.shard is None and not self.weight.is_meta:
            nn.init.normal_(self.weight, std=self.init_std)

    def take_rows(self, shard: RowShard, seed: int) -> None:
        """Keep only the rows `shard` gives this rank, drawn by `init_rows` from `seed` (row-sharded tables)."""
        device = "cpu" if self.weight.is_meta else self.weight.device  # the strategy moves the model afterwards
        rows = init_rows(self.global_shape, shard, self.init_std, seed).to(device, self.weight.dtype)
        self.weight = nn.Parameter(rows)
        self.weight.sharded_rows = ShardedRows(shard, self.global_shape[:-2])  # read by checkpoints and the optimizer
        self.shard = shard

    def rows(self) -> torch.Tensor:
        """The table, or a clear error once `offload` moved it to host memory, or while other ranks hold some of its rows."""
        if self.shard is not None and self.shard.world > 1:
            raise RuntimeError("this token table is row-sharded: its rows come through the table exchange")
        if self.weight.numel() == 0:
            raise RuntimeError("this token table lives in host memory: pass the rows gathered for the step (`served`)")
        return self.weight

    def offload(self) -> torch.Tensor:
        """Hand the table to host memory and keep an empty placeholder here."""
        host = self.weight.detach().to("cpu")
        self.weight = nn.Parameter(self.weight.new_empty((0,)), requires_grad=False)
        return host
