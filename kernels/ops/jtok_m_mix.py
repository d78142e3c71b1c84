"""JTok-M mixture: `r = alpha * s * e / (||e|| + eps)`, `e = sum_k w_k * E_{idx_k}[ids]`, forward and backward.

Forward: one program per block of rows loops over the K selected tables, gathers and mixes the
rows in fp32 and normalises; e is never written. Backward, on a persistent grid
(`jtok_gate.persistent_programs`) looping over the row blocks: recompute e (K more gathers rather
than keeping an [N, d] fp32 activation), form de once, accumulate ds in registers (one [d] partial
row per program, summed afterwards), then a second pass over the K rows gives dw_k = <de, E_k[id]>;
the table gradient w_k * de is reduced per unique (table, id) pair by `dedup_rows.segment_sum_rows`,
reading de and w directly (no [N*K, d] buffer); with `sparse_grad`, `dedup_rows.sparse_table_grad`
returns only the touched (table, id) rows (no [n_e*V, d] buffer). Offsets that grow with N, V or the
grid are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.dedup_rows import segment_sum_rows, sparse_table_grad
from kernels.ops.jtok_gate import _row_tile, num_warps_for, persistent_programs, row_block


@triton.jit
def _mix_rows(ids, rows, row_mask, mask, cols, tables_ptr, idx_ptr, w_ptr, stride_te, stride_tv, K,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """e = sum_k w_k E[idx_k, id] in fp32 for a tile of (int64) rows."""
    e = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        t = tl.load(idx_ptr + rows * K + k, mask=row_mask, other=0).to(tl.int64)
        # the reference casts w to the table dtype before mixing
        wk = tl.load(w_ptr + rows * K + k, mask=row_mask, other=0.0).to(tables_ptr.dtype.element_ty).to(tl.float32)
        row = tl.load(tables_ptr + t[:, None] * stride_te + ids[:, None] * stride_tv + cols[None, :], mask=mask, other=0.0)
        e += wk[:, None] * row.to(tl.float32)
    return e


@triton.jit
def _jtok_m_mix_fwd_kernel(
    ids_ptr, tables_ptr, idx_ptr, w_ptr, scale_ptr, out_ptr,
    N, D, K, stride_te, stride_tv, alpha, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    rows, row_mask, mask, ids = _row_tile(ids_ptr, tl.program_id(0).to(tl.int64), N, col_mask, BLOCK_N)
    e = _mix_rows(ids, rows, row_mask, mask, cols, tables_ptr, idx_ptr, w_ptr, stride_te, stride_tv, K, BLOCK_N, BLOCK_D)
    norm = tl.sqrt(tl.sum(e * e, axis=1))
    s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = alpha * s[None, :] * (e / (norm + eps)[:, None])
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jtok_m_mix_bwd_kernel(
    g_ptr, ids_ptr, tables_ptr, idx_ptr, w_ptr, scale_ptr, de_ptr, dw_ptr, ds_part_ptr,
    N, D, K, stride_g, stride_te, stride_tv, alpha, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # an int64 start makes the loop's block index int64
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    ds = tl.zeros([BLOCK_D], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows, row_mask, mask, ids = _row_tile(ids_ptr, blk, N, col_mask, BLOCK_N)
        # reloaded per block (a cache hit): kept live across the loop, it made ptxas spill (sm_80, bf16, d=2048)
        s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        e = _mix_rows(ids, rows, row_mask, mask, cols, tables_ptr, idx_ptr, w_ptr, stride_te, stride_tv, K,
                      BLOCK_N, BLOCK_D)  # fmt: skip
        norm = tl.sqrt(tl.sum(e * e, axis=1))
        inv = 1.0 / (norm + eps)
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32) * alpha

        ds += tl.sum(g * e * inv[:, None], axis=0)
        dunit = g * s[None, :]
        proj = tl.sum(dunit * e, axis=1)
        coef = tl.where(norm > 0, proj * inv * inv / tl.where(norm > 0, norm, 1.0), 0.0)
        de = dunit * inv[:, None] - e * coef[:, None]
        tl.store(de_ptr + rows[:, None] * D + cols[None, :], de, mask=mask)
        for k in range(K):
            t = tl.load(idx_ptr + rows * K + k, mask=row_mask, other=0).to(tl.int64)
            row = tl.load(tables_ptr + t[:, None] * stride_te + ids[:, None] * stride_tv + cols[None, :],
                          mask=mask, other=0.0)  # fmt: skip
            tl.store(dw_ptr + rows * K + k, tl.sum(de * row.to(tl.float32), axis=1), mask=row_mask)
    tl.store(ds_part_ptr + pid * D + cols, ds, mask=col_mask)


def jtok_m_mix_fwd(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha: float, eps: float):
    """Forward: (out_ND, saved) with saved = (ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D).

    out_ND: [N, d], dtype promote(tables, scale). saved holds the inputs made contiguous: ids_N [N]
    (int32 or int64), tables_EVD [n_e, V, d] (any float dtype), topk_idx_NK [N, K] (int32 or int64),
    topk_w_NK [N, K] (float), scale_D [d]; nothing is computed for the backward (it recomputes e).
    Static arguments: alpha, eps (floats)."""
    ids_N, tables_EVD, scale_D = ids_N.contiguous(), tables_EVD.contiguous(), scale_D.contiguous()
    topk_idx_NK, topk_w_NK = topk_idx_NK.contiguous(), topk_w_NK.contiguous()
    N, K = topk_idx_NK.shape
    D = tables_EVD.shape[2]
    out_ND = torch.empty(N, D, dtype=torch.promote_types(tables_EVD.dtype, scale_D.dtype), device=tables_EVD.device)
    BLOCK_N, BLOCK_D = row_block(D)
    if N > 0:
        _jtok_m_mix_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
            ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, out_ND,
            N, D, K, tables_EVD.stride(0), tables_EVD.stride(1), alpha, eps,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_D),
        )
    return out_ND, (ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D)


def jtok_m_mix_bwd(grad_ND, ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha: float, eps: float,
                   table_grad: bool = True, sparse_grad: bool = False):  # fmt: skip
    """Backward from `jtok_m_mix_fwd`'s saved tensors: (d_tables, dw_NK, d_scale).

    d_tables is None without `table_grad`, else a dense [n_e, V, d] tensor of the tables' dtype or, with
    `sparse_grad`, a coalesced sparse COO tensor of the tables' shape (one host sync); dw_NK [N, K] has
    topk_w's dtype; d_scale [d] has scale's dtype. Static arguments: alpha, eps, table_grad, sparse_grad."""
    grad_ND = grad_ND.contiguous()
    N, K = topk_idx_NK.shape
    n_tables, V, D = tables_EVD.shape
    BLOCK_N, BLOCK_D = row_block(D)
    de_ND = torch.empty(N, D, dtype=torch.float32, device=grad_ND.device)
    dw_NK = torch.empty(N, K, dtype=torch.float32, device=grad_ND.device)
    if N > 0:
        n_prog = persistent_programs(grad_ND.device, triton.cdiv(N, BLOCK_N))
        ds_part_PD = torch.empty(n_prog, D, dtype=torch.float32, device=grad_ND.device)  # each program writes its row
        _jtok_m_mix_bwd_kernel[(n_prog,)](
            grad_ND, ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, de_ND, dw_NK, ds_part_PD,
            N, D, K, grad_ND.stride(0), tables_EVD.stride(0), tables_EVD.stride(1), alpha, eps,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_D),
        )
        d_scale = ds_part_PD.sum(0).to(scale_D.dtype)
    else:
        d_scale = torch.zeros_like(scale_D)
    d_tables = None
    if table_grad:
        keys_NK = topk_idx_NK.to(torch.int64) * V + ids_N.to(torch.int64)[:, None]
        w_NK = topk_w_NK.to(tables_EVD.dtype)  # as in the reference's mixing
        if sparse_grad:
            d_tables = sparse_table_grad(de_ND, keys_NK, tables_EVD, slot_scale_S=w_NK)
        else:
            d_tables = segment_sum_rows(de_ND, keys_NK, n_tables * V, tables_EVD.dtype, slot_scale_S=w_NK)
            d_tables = d_tables.view(n_tables, V, D)
    return d_tables, dw_NK.to(topk_w_NK.dtype), d_scale


class JTokMMixFunction(torch.autograd.Function):
    """Autograd wrapper of `jtok_m_mix_fwd` / `jtok_m_mix_bwd`."""

    @staticmethod
    def forward(ctx, ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, sparse_grad):
        out_ND, saved = jtok_m_mix_fwd(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps)
        ctx.save_for_backward(*saved)
        ctx.alpha, ctx.eps, ctx.sparse_grad = alpha, eps, sparse_grad
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        d_tables, dw_NK, d_scale = jtok_m_mix_bwd(grad_ND, *ctx.saved_tensors, ctx.alpha, ctx.eps,
                                                  table_grad=ctx.needs_input_grad[1], sparse_grad=ctx.sparse_grad)
        return None, d_tables, None, dw_NK, d_scale, None, None, None


def jtok_m_mix(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha: float, eps: float,
               sparse_grad: bool = False):  # fmt: skip
    """Triton `reference.jtok_m_mix`."""
    return JTokMMixFunction.apply(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, sparse_grad)
