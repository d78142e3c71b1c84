"""JTok gate: `out = residual + m * (1 + s * u / (||u|| + eps))`, `u = E[ids]`, forward and backward.

Forward: one program per block of rows gathers the table rows, normalises them and gates m (the
residual add is fused). Backward: a persistent grid (`persistent_programs`) loops over the same row
blocks, producing dm and the per-token row gradient du, and keeps its partial sum of ds in registers
(one [d] row per program, summed afterwards: deterministic, no atomics); du is then reduced per unique
id by `dedup_rows.segment_sum_rows` into the dense [V, d] table gradient, or with `sparse_grad` by
`dedup_rows.sparse_table_grad` into a row-sparse one (`reference.row_sparse_grad`; no [V, d] buffer).
Every offset that grows with N, V or the grid is computed in int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.ops.dedup_rows import segment_sum_rows, sparse_table_grad


def row_block(D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): a whole row per tile, about 2K elements per program."""
    BLOCK_D = triton.next_power_of_2(D)
    return max(1, min(16, 2048 // BLOCK_D)), BLOCK_D


def num_warps_for(BLOCK_D: int) -> int:
    """Warps per program for a row tile `BLOCK_D` wide."""
    return 4 if BLOCK_D <= 1024 else 8 if BLOCK_D <= 4096 else 16


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, n_blocks: int) -> int:
    """Programs of a persistent backward: about two per SM on CUDA, 4 elsewhere (so the interpreter runs
    the loop), never more than there are row blocks."""
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(n_blocks, target))


@triton.jit
def _row_tile(ids_ptr, blk, N, col_mask, BLOCK_N: tl.constexpr):
    """Row block `blk` (an int64 index): int64 row indices, masks (N and d need not fill the block), token ids."""
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    mask = row_mask[:, None] & col_mask[None, :]
    ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return rows, row_mask, mask, ids


@triton.jit
def _jtok_gate_fwd_kernel(
    m_ptr, ids_ptr, table_ptr, scale_ptr, res_ptr, out_ptr, norm_ptr,
    N, D, stride_m, stride_t, stride_r, stride_o, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    rows, row_mask, mask, ids = _row_tile(ids_ptr, tl.program_id(0).to(tl.int64), N, col_mask, BLOCK_N)

    u = tl.load(table_ptr + ids[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(u * u, axis=1))
    unit = u / (norm + eps)[:, None]
    s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = m * (1.0 + s[None, :] * unit)
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + rows, norm, mask=row_mask)


@triton.jit
def _jtok_gate_bwd_kernel(
    g_ptr, m_ptr, ids_ptr, table_ptr, scale_ptr, norm_ptr, dm_ptr, du_ptr, ds_part_ptr,
    N, D, stride_g, stride_m, stride_t, stride_dm, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # an int64 start makes the loop's block index int64
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    ds = tl.zeros([BLOCK_D], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows, row_mask, mask, ids = _row_tile(ids_ptr, blk, N, col_mask, BLOCK_N)
        s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # per block: fewer live registers
        u = tl.load(table_ptr + ids[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        norm = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
        inv = 1.0 / (norm + eps)
        unit = u * inv[:, None]
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)

        tl.store(dm_ptr + rows[:, None] * stride_dm + cols[None, :],
                 (g * (1.0 + s[None, :] * unit)).to(dm_ptr.dtype.element_ty), mask=mask)
        gm = g * m
        ds += tl.sum(gm * unit, axis=0)
        # d unit / d u = (I - u u^T / (||u|| (||u|| + eps))) / (||u|| + eps); zero rows get no gradient.
        dunit = gm * s[None, :]
        proj = tl.sum(dunit * u, axis=1)
        coef = tl.where(norm > 0, proj * inv * inv / tl.where(norm > 0, norm, 1.0), 0.0)
        du = dunit * inv[:, None] - u * coef[:, None]
        tl.store(du_ptr + rows[:, None] * D + cols[None, :], du, mask=mask)
    tl.store(ds_part_ptr + pid * D + cols, ds, mask=col_mask)


def jtok_gate_fwd(m_ND, ids_N, table_VD, scale_D, eps: float, residual_ND=None):
    """Forward: (out_ND, saved) with saved = (m_ND, ids_N, table_VD, scale_D, norm_N).

    out_ND: [N, d], dtype promote(m, table, scale[, residual]). saved holds contiguous copies (or the
    inputs themselves when already contiguous) of m_ND [N, d] (any float dtype), ids_N [N] (int32 or
    int64), table_VD [V, d], scale_D [d], plus norm_N [N] float32 (the fp32 row norms ||u||). Static
    argument: eps (float). The residual is not saved (its gradient is the upstream gradient)."""
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
    return out_ND, (m_ND, ids_N, table_VD, scale_D, norm_N)


def jtok_gate_bwd(grad_ND, m_ND, ids_N, table_VD, scale_D, norm_N, eps: float, table_grad: bool = True,
                  sparse_grad: bool = False):  # fmt: skip
    """Backward from `jtok_gate_fwd`'s saved tensors: (dm_ND, d_table, d_scale).

    dm_ND is like m_ND; d_table is None without `table_grad`, else a dense [V, d] tensor of the table's
    dtype or, with `sparse_grad`, a coalesced sparse COO tensor of the table's shape (one host sync);
    d_scale [d] has scale's dtype. Static arguments: eps, table_grad, sparse_grad. The residual's
    gradient (not computed here) is grad_ND itself, cast to the residual's dtype."""
    grad_ND = grad_ND.contiguous()
    N, D = m_ND.shape
    BLOCK_N, BLOCK_D = row_block(D)
    dm_ND = torch.empty_like(m_ND)
    du_ND = torch.empty(N, D, dtype=torch.float32, device=m_ND.device)
    if N > 0:
        n_prog = persistent_programs(m_ND.device, triton.cdiv(N, BLOCK_N))
        ds_part_PD = torch.empty(n_prog, D, dtype=torch.float32, device=m_ND.device)  # each program writes its row
        _jtok_gate_bwd_kernel[(n_prog,)](
            grad_ND, m_ND, ids_N, table_VD, scale_D, norm_N, dm_ND, du_ND, ds_part_PD,
            N, D, grad_ND.stride(0), m_ND.stride(0), table_VD.stride(0), dm_ND.stride(0), eps,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_D),
        )
        d_scale = ds_part_PD.sum(0).to(scale_D.dtype)
    else:
        d_scale = torch.zeros_like(scale_D)
    d_table = None
    if table_grad and sparse_grad:
        d_table = sparse_table_grad(du_ND, ids_N, table_VD)
    elif table_grad:
        d_table = segment_sum_rows(du_ND, ids_N, table_VD.shape[0], table_VD.dtype)
    return dm_ND, d_table, d_scale


class JTokGateFunction(torch.autograd.Function):
    """Autograd wrapper of `jtok_gate_fwd` / `jtok_gate_bwd`."""

    @staticmethod
    def forward(ctx, m_ND, ids_N, table_VD, scale_D, eps, residual_ND, sparse_grad):
        out_ND, saved = jtok_gate_fwd(m_ND, ids_N, table_VD, scale_D, eps, residual_ND)
        ctx.save_for_backward(*saved)
        ctx.eps, ctx.sparse_grad = eps, sparse_grad
        ctx.res_dtype = residual_ND.dtype if residual_ND is not None else None
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        dm_ND, d_table, d_scale = jtok_gate_bwd(grad_ND, *ctx.saved_tensors, ctx.eps,
                                                table_grad=ctx.needs_input_grad[2], sparse_grad=ctx.sparse_grad)
        d_res = grad_ND.to(ctx.res_dtype) if ctx.res_dtype is not None else None
        return dm_ND, None, d_table, d_scale, None, d_res, None


def jtok_gate(m_ND, ids_N, table_VD, scale_D, eps: float, residual_ND=None, sparse_grad: bool = False):
    """Triton `reference.jtok_gate`."""
    return JTokGateFunction.apply(m_ND, ids_N, table_VD, scale_D, eps, residual_ND, sparse_grad)
