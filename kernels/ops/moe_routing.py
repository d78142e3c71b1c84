"""Routing metadata for the grouped expert GEMMs: the N*K (token, expert) slots grouped by expert.

Everything stays on the device (no host sync): the GEMM kernels launch an upper bound of
`cdiv(N*K, BLOCK_M) + E` row tiles and each tile finds its expert from `tile_end_E`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class MoERouting(NamedTuple):
    perm_S: torch.Tensor  # [S] slot (n*K + k) at each expert-sorted row
    token_S: torch.Tensor  # [S] token n of each expert-sorted row
    counts_E: torch.Tensor  # [E] rows per expert (int32)
    offsets_E: torch.Tensor  # [E] first sorted row of each expert (int32)
    tile_end_E: torch.Tensor  # [E] cumulative number of BLOCK_M row tiles up to and including e (int32)
    max_tiles: int  # grid size along rows: cdiv(S, BLOCK_M) + E bounds sum_e cdiv(count_e, BLOCK_M)
    block_m: int


def moe_routing(topk_idx_NK: torch.Tensor, n_experts: int, block_m: int) -> MoERouting:
    """Group the slots by expert with a stable sort (slot order is kept inside each expert)."""
    K = topk_idx_NK.shape[1]
    flat_S = topk_idx_NK.reshape(-1).to(torch.int64)
    perm_S = torch.sort(flat_S, stable=True).indices
    # scatter_add rather than bincount: bincount syncs with the host on CUDA
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=flat_S.device).scatter_add_(0, flat_S, torch.ones_like(flat_S))
    offsets_E = counts_E.cumsum(0) - counts_E
    tile_end_E = ((counts_E + block_m - 1) // block_m).cumsum(0)
    return MoERouting(
        perm_S=perm_S,
        token_S=perm_S // K,
        counts_E=counts_E.to(torch.int32),
        offsets_E=offsets_E.to(torch.int32),
        tile_end_E=tile_end_E.to(torch.int32),
        max_tiles=triton.cdiv(flat_S.numel(), block_m) + n_experts,
        block_m=block_m,
    )


@triton.jit
def tile_rows(pid, tile_end_ptr, counts_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """For row tile `pid`: (expert, first row, one past the expert's last row, tile is real)."""
    es = tl.arange(0, BLOCK_E)
    tile_end = tl.load(tile_end_ptr + es, mask=es < E, other=2147483647)
    e = tl.sum((tile_end <= pid).to(tl.int32), axis=0)
    valid = e < E
    e = tl.minimum(e, E - 1)
    count = tl.load(counts_ptr + e)
    offset = tl.load(offsets_ptr + e)
    first_tile = tl.load(tile_end_ptr + e) - (count + BLOCK_M - 1) // BLOCK_M
    return e, offset + (pid - first_tile) * BLOCK_M, offset + count, valid
