"""Routing metadata for the grouped expert GEMMs: the N*K (token, expert) slots grouped by expert.

Everything stays on the device (no host sync). The row-tile map depends on BLOCK_M, which the
autotuner picks per launch, so the kernels derive it themselves from `counts_E` (`tile_rows`):
a launch has `cdiv(N*K, BLOCK_M) + E` row tiles (an upper bound on `sum_e cdiv(count_e, BLOCK_M)`)
and the surplus tiles exit. `tile_end_E` is the same map computed by torch for one given
`block_m` (tests and diagnostics; the kernels do not read it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.reference import expert_counts


class MoERouting(NamedTuple):
    perm_S: torch.Tensor  # [S] slot (n*K + k) at each expert-sorted row (int64)
    token_S: torch.Tensor  # [S] token n of each expert-sorted row (int64)
    counts_E: torch.Tensor  # [E] rows per expert (int32)
    offsets_E: torch.Tensor  # [E] first sorted row of each expert (int32)
    tile_end_E: torch.Tensor | None = None  # [E] cumulative row tiles of `block_m` rows up to and including e
    max_tiles: int = 0  # cdiv(S, block_m) + E, the row tiles a launch at `block_m` has
    block_m: int = 0


def moe_routing(topk_idx_NK: torch.Tensor, n_experts: int, block_m: int | None = None) -> MoERouting:
    """Group the slots by expert with a stable sort (slot order is kept inside each expert); with
    `block_m`, also the host view of the row-tile map at that tile height."""
    K = topk_idx_NK.shape[1]
    flat_S = topk_idx_NK.reshape(-1).to(torch.int64)
    perm_S = torch.sort(flat_S, stable=True).indices
    counts_E = expert_counts(topk_idx_NK, n_experts)
    offsets_E = counts_E.cumsum(0) - counts_E
    r = MoERouting(perm_S, perm_S // K, counts_E.to(torch.int32), offsets_E.to(torch.int32))
    if block_m is None:
        return r
    tile_end_E = ((counts_E + block_m - 1) // block_m).cumsum(0).to(torch.int32)
    return r._replace(tile_end_E=tile_end_E, max_tiles=triton.cdiv(flat_S.numel(), block_m) + n_experts, block_m=block_m)


@triton.jit
def tile_rows(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """For row tile `pid_m`: (expert, first row, one past the expert's last row, tile is real).

    Expert e owns tiles [tile_end[e-1], tile_end[e]) with tile_end the running sum of
    cdiv(count, BLOCK_M); empty experts own none."""
    es = tl.arange(0, BLOCK_E)
    tiles = (tl.load(counts_ptr + es, mask=es < E, other=0) + BLOCK_M - 1) // BLOCK_M
    before = tl.cumsum(tiles, axis=0) <= pid_m  # experts wholly before this tile (a prefix: tile_end ascends)
    e = tl.sum(before.to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(before, tiles, 0), axis=0)
    valid = e < E
    e = tl.minimum(e, E - 1)
    offset = tl.load(offsets_ptr + e)
    return e, offset + (pid_m - first_tile) * BLOCK_M, offset + tl.load(counts_ptr + e), valid


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a 1-D program id, GROUP_M row tiles at a time across all column
    tiles (Triton's matmul tutorial ordering: programs running together share operand tiles in L2)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m
