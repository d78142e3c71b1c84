"""De-duplicated, deterministic row-gradient accumulation for token-indexed tables.

Many slots (tokens, or (token, table) pairs) write into the same table row; natural text is
Zipfian, so a few rows receive most of them. Instead of one atomic add per slot, the slots are
sorted by key and one program per unique key sums its slots' gradient rows in a fixed order, then
writes the row once. The result is bit-for-bit reproducible and touches each table row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sum_rows_kernel(
    src_ptr,  # [S // SLOTS_PER_ROW, D] gradient rows (fp32); slot i reads row i // SLOTS_PER_ROW
    scale_ptr,  # [S] per-slot multiplier (read only if HAS_SCALE)
    perm_ptr,  # [S] slot index of each sorted position
    keys_ptr,  # [S] sorted keys (destination row of each sorted position)
    seg_end_ptr,  # [S] for a segment's first position: one past its last position
    out_ptr,  # [R, D] dense destination, zero-initialised
    D,
    stride_src,
    stride_out,
    SLOTS_PER_ROW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    key = tl.load(keys_ptr + pid)
    prev = tl.load(keys_ptr + pid - 1, mask=pid > 0, other=-1)
    # Only the first position of each run of equal keys works; the others exit (no host sync needed
    # to count the unique keys, at the price of idle programs).
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
        tl.store(out_ptr + key.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def sort_segments(keys_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort keys and find each run's end, all on device (no host sync).

    Returns (sorted keys, permutation, seg_end) where seg_end[p] is one past the last position of
    the run that starts at p (only read at run starts)."""
    sorted_M, perm_M = torch.sort(keys_M, stable=True)
    M = sorted_M.numel()
    pos = torch.arange(M, device=keys_M.device)
    is_start = torch.ones(M, dtype=torch.bool, device=keys_M.device)
    is_start[1:] = sorted_M[1:] != sorted_M[:-1]
    start_or_M = torch.where(is_start, pos, torch.full_like(pos, M))
    # the first run start strictly after p: reverse cumulative minimum of the shifted starts
    nxt = torch.cat((start_or_M[1:], pos.new_full((1,), M)))
    seg_end_M = nxt.flip(0).cummin(0).values.flip(0)
    return sorted_M, perm_M, seg_end_M


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
    M, D = src_MD.shape
    S = keys_S.numel()
    out_RD = torch.zeros(num_rows, D, dtype=out_dtype, device=src_MD.device)
    if S == 0:
        return out_RD
    sorted_S, perm_S, seg_end_S = sort_segments(keys_S)
    has_scale = slot_scale_S is not None
    scale_S = slot_scale_S.reshape(-1).contiguous() if has_scale else src_MD
    BLOCK_D = min(triton.next_power_of_2(D), 256)
    BLOCK_M = max(16, min(64, 4096 // BLOCK_D))
    grid = (S, triton.cdiv(D, BLOCK_D))
    _segment_sum_rows_kernel[grid](
        src_MD, scale_S, perm_S, sorted_S, seg_end_S, out_RD, D, src_MD.stride(0), out_RD.stride(0),
        SLOTS_PER_ROW=S // M, HAS_SCALE=has_scale, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )
    return out_RD
