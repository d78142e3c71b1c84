"""JTok gate: `out = residual + m * (1 + s * u / (||u|| + eps))`, `u = E[ids]`, forward and backward.

Forward: one program per block of rows gathers the table rows, normalises them and gates m (the
residual add is fused). Backward: the same row blocks produce dm, the per-token row gradient du and
per-block partial sums of ds (summed afterwards: deterministic, no atomics); du is then reduced per
unique id by `dedup_rows.segment_sum_rows` into the dense [V, d] table gradient, or with `sparse_grad`
by `dedup_rows.sparse_table_grad` into a row-sparse one (`reference.row_sparse_grad`; no [V, d] buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.dedup_rows import segment_sum_rows, sparse_table_grad


def row_block(D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): a whole row per tile, about 2K elements per program."""
    BLOCK_D = triton.next_power_of_2(D)
    return max(1, min(16, 2048 // BLOCK_D)), BLOCK_D


def num_warps_for(BLOCK_D: int) -> int:
    return 4 if BLOCK_D <= 1024 else 8 if BLOCK_D <= 4096 else 16


@triton.jit
def _token_tile(ids_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of token rows: indices, masks (N and d need not fill the block) and token ids."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return rows, cols, row_mask, col_mask, mask, ids


@triton.jit
def _jtok_gate_fwd_kernel(
    m_ptr, ids_ptr, table_ptr, scale_ptr, res_ptr, out_ptr, norm_ptr,
    N, D, stride_m, stride_t, stride_r, stride_o, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, row_mask, col_mask, mask, ids = _token_tile(ids_ptr, N, D, BLOCK_N, BLOCK_D)
    rows64 = rows.to(tl.int64)

    u = tl.load(table_ptr + ids[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(u * u, axis=1))
    unit = u / (norm + eps)[:, None]
    s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + rows64[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = m * (1.0 + s[None, :] * unit)
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + rows, norm, mask=row_mask)


@triton.jit
def _jtok_gate_bwd_kernel(
    g_ptr, m_ptr, ids_ptr, table_ptr, scale_ptr, norm_ptr, dm_ptr, du_ptr, ds_part_ptr,
    N, D, stride_g, stride_m, stride_t, stride_dm, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, row_mask, col_mask, mask, ids = _token_tile(ids_ptr, N, D, BLOCK_N, BLOCK_D)
    rows64 = rows.to(tl.int64)

    u = tl.load(table_ptr + ids[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
    inv = 1.0 / (norm + eps)
    unit = u * inv[:, None]
    s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + rows64[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    tl.store(dm_ptr + rows64[:, None] * stride_dm + cols[None, :],
             (g * (1.0 + s[None, :] * unit)).to(dm_ptr.dtype.element_ty), mask=mask)
    gm = g * m
    tl.store(ds_part_ptr + pid * D + cols, tl.sum(gm * unit, axis=0), mask=col_mask)
    # d unit / d u = (I - u u^T / (||u|| (||u|| + eps))) / (||u|| + eps); zero rows get no gradient.
    dunit = gm * s[None, :]
    proj = tl.sum(dunit * u, axis=1)
    coef = tl.where(norm > 0, proj * inv * inv / tl.where(norm > 0, norm, 1.0), 0.0)
    du = dunit * inv[:, None] - u * coef[:, None]
    tl.store(du_ptr + rows64[:, None] * D + cols[None, :], du, mask=mask)


class JTokGateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m_ND, ids_N, table_VD, scale_D, eps, residual_ND, sparse_grad):
        m_ND, ids_N, table_VD, scale_D = m_ND.contiguous(), ids_N.contiguous(), table_VD.contiguous(), scale_D.contiguous()
        has_res = residual_ND is not None
        out_dtype = torch.promote_types(torch.promote_types(m_ND.dtype, table_VD.dtype), scale_D.dtype)
        if has_res:
            residual_ND = residual_ND.contiguous()
            out_dtype = torch.promote_types(out_dtype, residual_ND.dtype)
        N, D = m_ND.shape
        out_ND = torch.empty(N, D, dtype=out_dtype, device=m_ND.device)
        norm_N = torch.empty(N, dtype=torch.float32, device=m_ND.device)
        BLOCK_N, BLOCK_D = row_block(D)
        if N > 0:
            _jtok_gate_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
                m_ND, ids_N, table_VD, scale_D, residual_ND if has_res else m_ND, out_ND, norm_N,
                N, D, m_ND.stride(0), table_VD.stride(0), residual_ND.stride(0) if has_res else 0, out_ND.stride(0),
                eps, HAS_RESIDUAL=has_res, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_D),
            )
        ctx.save_for_backward(m_ND, ids_N, table_VD, scale_D, norm_N)
        ctx.eps, ctx.sparse_grad = eps, sparse_grad
        ctx.res_dtype = residual_ND.dtype if has_res else None
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        m_ND, ids_N, table_VD, scale_D, norm_N = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        N, D = m_ND.shape
        BLOCK_N, BLOCK_D = row_block(D)
        n_prog = triton.cdiv(N, BLOCK_N)
        dm_ND = torch.empty_like(m_ND)
        du_ND = torch.empty(N, D, dtype=torch.float32, device=m_ND.device)
        ds_part_PD = torch.zeros(max(n_prog, 1), D, dtype=torch.float32, device=m_ND.device)
        if N > 0:
            _jtok_gate_bwd_kernel[(n_prog,)](
                grad_ND, m_ND, ids_N, table_VD, scale_D, norm_N, dm_ND, du_ND, ds_part_PD,
                N, D, grad_ND.stride(0), m_ND.stride(0), table_VD.stride(0), dm_ND.stride(0), ctx.eps,
                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_D),
            )
        d_table = None
        if ctx.needs_input_grad[2] and ctx.sparse_grad:
            d_table = sparse_table_grad(du_ND, ids_N, table_VD)
        elif ctx.needs_input_grad[2]:
            d_table = segment_sum_rows(du_ND, ids_N, table_VD.shape[0], table_VD.dtype)
        d_scale = ds_part_PD.sum(0).to(scale_D.dtype)
        d_res = grad_ND.to(ctx.res_dtype) if ctx.res_dtype is not None else None
        return dm_ND, None, d_table, d_scale, None, d_res, None


def jtok_gate(m_ND, ids_N, table_VD, scale_D, eps: float, residual_ND=None, sparse_grad: bool = False):
    """Triton `reference.jtok_gate`."""
    return JTokGateFunction.apply(m_ND, ids_N, table_VD, scale_D, eps, residual_ND, sparse_grad)
