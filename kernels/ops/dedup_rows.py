"""De-duplicated, deterministic row-gradient accumulation for token-indexed tables.

Many slots (tokens, or (token, table) pairs) write into the same table row; natural text is
Zipfian, so a few rows receive most of them. Instead of one atomic add per slot, the slots are
sorted by key and one program per unique key sums its slots' gradient rows in a fixed order, then
writes the row once. The result is bit-for-bit reproducible and touches each table row once.
The sums land either at row `key` of a dense `[num_rows, D]` gradient (`segment_sum_rows`) or, for a
row-sparse gradient, at row `rank of key among the unique keys` of a compact `[U, D]` buffer
(`segment_sum_compact`, `sparse_table_grad`): then no table-sized buffer exists at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import sparse_rows


@triton.jit
def _segment_sum_rows_kernel(
    src_ptr,  # [S // SLOTS_PER_ROW, D] gradient rows (fp32); slot i reads row i // SLOTS_PER_ROW
    scale_ptr,  # [S] per-slot multiplier (read only if HAS_SCALE)
    perm_ptr,  # [S] slot index of each sorted position
    keys_ptr,  # [S] sorted keys (destination row of each sorted position)
    seg_end_ptr,  # [S] for a segment's first position: one past its last position
    rank_ptr,  # [S] rank of each sorted position's run among the runs (read only if BY_RANK)
    rows_ptr,  # [U] out: the key of each run, by rank (written only if BY_RANK)
    out_ptr,  # [R, D] destination: dense and zero-initialised, or [U, D] compact if BY_RANK
    D,
    stride_src,
    stride_out,
    SLOTS_PER_ROW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BY_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # every pointer offset is int64
    col_mask = cols < D
    key = tl.load(keys_ptr + pid)
    prev = tl.load(keys_ptr + pid - 1, mask=pid > 0, other=-1)
    # Only the first position of each run of equal keys works; the others exit (the dense path needs
    # no host sync to count the unique keys, at the price of idle programs).
    if (pid == 0) | (key != prev):
        end = tl.load(seg_end_ptr + pid)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(pid, end, BLOCK_M):
            offs = start + tl.arange(0, BLOCK_M)
            row_mask = offs < end
            slots = tl.load(perm_ptr + offs, mask=row_mask, other=0).to(tl.int64)
            rows = slots // SLOTS_PER_ROW
            tile = tl.load(
                src_ptr + rows[:, None] * stride_src + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_SCALE:
                tile *= tl.load(scale_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            acc += tl.sum(tile, axis=0)
        if BY_RANK:
            dst = tl.load(rank_ptr + pid).to(tl.int64)
            if tl.program_id(1) == 0:
                tl.store(rows_ptr + dst, key.to(rows_ptr.dtype.element_ty))
        else:
            dst = key.to(tl.int64)
        tl.store(out_ptr + dst * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def _sort_runs(keys_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sort_segments` plus the run-start mask (True at the first position of each run)."""
    sorted_M, perm_M = torch.sort(keys_M, stable=True)
    M = sorted_M.numel()
    pos = torch.arange(M, device=keys_M.device)
    is_start = torch.ones(M, dtype=torch.bool, device=keys_M.device)
    is_start[1:] = sorted_M[1:] != sorted_M[:-1]
    start_or_M = torch.where(is_start, pos, torch.full_like(pos, M))
    # the first run start strictly after p: reverse cumulative minimum of the shifted starts
    nxt = torch.cat((start_or_M[1:], pos.new_full((1,), M)))
    seg_end_M = nxt.flip(0).cummin(0).values.flip(0)
    return sorted_M, perm_M, is_start, seg_end_M


def sort_segments(keys_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort keys and find each run's end, all on device (no host sync).

    Returns (sorted keys, permutation, seg_end) where seg_end[p] is one past the last position of
    the run that starts at p (only read at run starts)."""
    sorted_M, perm_M, _, seg_end_M = _sort_runs(keys_M)
    return sorted_M, perm_M, seg_end_M


def _launch(src_MD, scale_S, perm_S, sorted_S, seg_end_S, out_RD, rank_S=None, rows_U=None) -> None:
    """Run the segment-sum kernel over S sorted slots (S > 0); with `rank_S`, into the compact `out_RD`."""
    M, D = src_MD.shape
    S = sorted_S.numel()
    has_scale, by_rank = scale_S is not None, rank_S is not None
    BLOCK_D = min(triton.next_power_of_2(D), 256)
    BLOCK_M = max(16, min(64, 4096 // BLOCK_D))
    grid = (S, triton.cdiv(D, BLOCK_D))
    _segment_sum_rows_kernel[grid](
        src_MD, scale_S if has_scale else src_MD, perm_S, sorted_S, seg_end_S,
        rank_S if by_rank else seg_end_S, rows_U if by_rank else sorted_S, out_RD,
        D, src_MD.stride(0), out_RD.stride(0),
        SLOTS_PER_ROW=S // M, HAS_SCALE=has_scale, BY_RANK=by_rank, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )


def segment_sum_rows(
    src_MD: torch.Tensor,
    keys_S: torch.Tensor,
    num_rows: int,
    out_dtype: torch.dtype,
    slot_scale_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense `[num_rows, D]` tensor whose row r is `sum over slots i with keys[i] == r of
    scale[i] * src[i // (S / M)]` (S = keys.numel() slots share the M source rows evenly)."""
    src_MD = src_MD.contiguous()
    keys_S = keys_S.reshape(-1)
    out_RD = torch.zeros(num_rows, src_MD.shape[1], dtype=out_dtype, device=src_MD.device)
    if keys_S.numel() == 0:
        return out_RD
    sorted_S, perm_S, seg_end_S = sort_segments(keys_S)
    scale_S = slot_scale_S.reshape(-1).contiguous() if slot_scale_S is not None else None
    _launch(src_MD, scale_S, perm_S, sorted_S, seg_end_S, out_RD)
    return out_RD


def segment_sum_compact(
    src_MD: torch.Tensor,
    keys_S: torch.Tensor,
    out_dtype: torch.dtype,
    slot_scale_S: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_sum_rows` without the dense buffer: (rows_U, values_UD), the unique keys (int64,
    ascending) and `[U, D]` sums, values_UD[u] being the dense result's row rows_U[u]."""
    src_MD = src_MD.contiguous()
    keys_S = keys_S.reshape(-1).to(torch.int64)
    D = src_MD.shape[1]
    if keys_S.numel() == 0:
        return keys_S.new_empty(0), torch.zeros(0, D, dtype=out_dtype, device=src_MD.device)
    sorted_S, perm_S, is_start_S, seg_end_S = _sort_runs(keys_S)
    rank_S = is_start_S.cumsum(0) - 1
    # The one host synchronisation: U (the number of unique keys) sizes the [U, D] output.
    U = int(rank_S[-1]) + 1
    rows_U = torch.empty(U, dtype=torch.int64, device=src_MD.device)
    values_UD = torch.empty(U, D, dtype=out_dtype, device=src_MD.device)  # every row is written once
    scale_S = slot_scale_S.reshape(-1).contiguous() if slot_scale_S is not None else None
    _launch(src_MD, scale_S, perm_S, sorted_S, seg_end_S, values_UD, rank_S=rank_S, rows_U=rows_U)
    return rows_U, values_UD


def sparse_table_grad(
    src_MD: torch.Tensor, keys_S: torch.Tensor, table: torch.Tensor, slot_scale_S: torch.Tensor | None = None
) -> torch.Tensor:
    """The row-sparse table gradient (`reference.row_sparse_grad`): the touched rows of `table`
    flattened to `[-1, d]` (keys index those), each the sum of its slots, as a coalesced COO tensor."""
    rows_U, values_UD = segment_sum_compact(src_MD, keys_S, table.dtype, slot_scale_S)
    return sparse_rows(rows_U, values_UD, table.shape)
