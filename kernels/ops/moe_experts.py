"""Routed SwiGLU experts as grouped GEMMs: one launch per GEMM stage for all experts, fwd and bwd.

The N*K (token, expert) slots are sorted by expert (`moe_routing`); each row tile of a launch
belongs to one expert and gathers its token rows on load, so no permuted copy of x is made.
Forward:  up   a, b = x[tok] @ Wg[e], x[tok] @ Wu[e]   (SwiGLU epilogue: h = silu(a) * b)
          down y[slot] = h @ Wd[e]                     (scattered back to slot order)
          combine out[n] = sum_k w[n, k] * y[n, k]
Backward: dh   dh = w * (g[tok] @ Wd[e]^T) -> da, db, h, and per-tile partial dw = <g[tok] @ Wd^T, h>
          dx   dx[slot] = da @ Wg[e]^T + db @ Wu[e]^T, then summed over k per token
          wgrad dWg[e], dWu[e] = x[tok]^T [da, db];  dWd[e] = h^T (w * g[tok])  (expert's rows only;
                an expert without rows writes zeros)
Every reduction is a fixed-order loop or a partial buffer summed afterwards: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.moe_routing import MoERouting, moe_routing, tile_rows


def block_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): GPU-sized tiles on CUDA, small ones for the interpreter."""
    return (64, 64, 32) if device.type == "cuda" else (16, 64, 32)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (no TF32), to match the reference's fp32 matmuls.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _moe_up_kernel(
    x_ptr, token_ptr, wg_ptr, wu_ptr, a_ptr, b_ptr, h_ptr, tile_end_ptr, counts_ptr, offsets_ptr,
    D, F, E, stride_x, stride_we, stride_wk, stride_wn,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    e, row_start, row_end, valid = tile_rows(tl.program_id(0), tile_end_ptr, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if valid:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < F
        wg_e = wg_ptr + e.to(tl.int64) * stride_we
        wu_e = wu_ptr + e.to(tl.int64) * stride_we
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            x = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_off = ks[:, None] * stride_wk + cols[None, :] * stride_wn
            w_mask = k_mask[:, None] & col_mask[None, :]
            acc_a = _mma(x, tl.load(wg_e + w_off, mask=w_mask, other=0.0), acc_a, IEEE)
            acc_b = _mma(x, tl.load(wu_e + w_off, mask=w_mask, other=0.0), acc_b, IEEE)
        out_off = rows.to(tl.int64)[:, None] * F + cols[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        h = acc_a * tl.sigmoid(acc_a) * acc_b
        tl.store(a_ptr + out_off, acc_a.to(a_ptr.dtype.element_ty), mask=out_mask)
        tl.store(b_ptr + out_off, acc_b.to(b_ptr.dtype.element_ty), mask=out_mask)
        tl.store(h_ptr + out_off, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _moe_down_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, out_ptr, perm_ptr, tile_end_ptr, counts_ptr, offsets_ptr,
    KD, ND, E, stride_be, stride_bk, stride_bn,
    DUAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[perm[row]] = a1[row] @ b1[e] (+ a2[row] @ b2[e]); a rows are expert-sorted, [S, KD]."""
    e, row_start, row_end, valid = tile_rows(tl.program_id(0), tile_end_ptr, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if valid:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < ND
        b1_e = b1_ptr + e.to(tl.int64) * stride_be
        b2_e = b2_ptr + e.to(tl.int64) * stride_be
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, KD, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < KD
            a_off = rows64[:, None] * KD + ks[None, :]
            a_mask = row_mask[:, None] & k_mask[None, :]
            b_off = ks[:, None] * stride_bk + cols[None, :] * stride_bn
            b_mask = k_mask[:, None] & col_mask[None, :]
            acc = _mma(tl.load(a1_ptr + a_off, mask=a_mask, other=0.0), tl.load(b1_e + b_off, mask=b_mask, other=0.0), acc, IEEE)
            if DUAL:
                acc = _mma(tl.load(a2_ptr + a_off, mask=a_mask, other=0.0), tl.load(b2_e + b_off, mask=b_mask, other=0.0), acc, IEEE)
        slot = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.store(out_ptr + slot[:, None] * ND + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_dh_kernel(
    g_ptr, token_ptr, perm_ptr, w_ptr, wd_ptr, a_ptr, b_ptr, da_ptr, db_ptr, h_ptr, dw_part_ptr,
    tile_end_ptr, counts_ptr, offsets_ptr,
    D, F, E, stride_g, stride_we, stride_wk, stride_wn, n_col_tiles,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dh = w * (g[tok] @ Wd[e]^T) with the SwiGLU backward epilogue; also h and partial dw."""
    pid_n = tl.program_id(1)
    e, row_start, row_end, valid = tile_rows(tl.program_id(0), tile_end_ptr, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if valid:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < F
        wd_e = wd_ptr + e.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            g = tl.load(g_ptr + tok[:, None] * stride_g + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wdt = tl.load(wd_e + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                          mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = _mma(g.to(wdt.dtype), wdt, acc, IEEE)
        off = rows.to(tl.int64)[:, None] * F + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        h = silu * b
        slot = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        # d<out, g>/dw[slot] = <g[tok] @ Wd^T, h>, summed over this tile's F columns
        tl.store(dw_part_ptr + slot * n_col_tiles + pid_n, tl.sum(acc * h, axis=1), mask=row_mask)
        dh = acc * tl.load(w_ptr + slot, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(da_ptr + off, (dh * b * sig * (1.0 + a * (1.0 - sig))).to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + off, (dh * silu).to(db_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_wgrad_kernel(
    a_ptr, b1_ptr, b2_ptr, token_ptr, perm_ptr, w_ptr, out1_ptr, out2_ptr, counts_ptr, offsets_ptr,
    P, Q, stride_a, stride_b,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_B: tl.constexpr, DUAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[e] = A[rows of e]^T @ B[rows of e] ([P, Q] per expert); gathered rows read token[row]."""
    e = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = ps < P
    q_mask = qs < Q
    start = tl.load(offsets_ptr + e)
    end = start + tl.load(counts_ptr + e)
    acc1 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < end
        tok = tl.load(token_ptr + rs, mask=r_mask, other=0).to(tl.int64)
        a_rows = tok if GATHER_A else rs.to(tl.int64)
        b_rows = tok if GATHER_B else rs.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ps[None, :], mask=r_mask[:, None] & p_mask[None, :], other=0.0)
        b_off = b_rows[:, None] * stride_b + qs[None, :]
        b_mask = r_mask[:, None] & q_mask[None, :]
        b1 = tl.load(b1_ptr + b_off, mask=b_mask, other=0.0)
        if SCALE_B:
            slot = tl.load(perm_ptr + rs, mask=r_mask, other=0).to(tl.int64)
            b1 = b1.to(tl.float32) * tl.load(w_ptr + slot, mask=r_mask, other=0.0).to(tl.float32)[:, None]
        at = tl.trans(a)
        acc1 = _mma(at, b1.to(a.dtype), acc1, IEEE)
        if DUAL:
            acc2 = _mma(at, tl.load(b2_ptr + b_off, mask=b_mask, other=0.0).to(a.dtype), acc2, IEEE)
    out_off = e.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    out_mask = p_mask[:, None] & q_mask[None, :]
    tl.store(out1_ptr + out_off, acc1.to(out1_ptr.dtype.element_ty), mask=out_mask)
    if DUAL:
        tl.store(out2_ptr + out_off, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _moe_combine_kernel(
    y_ptr, w_ptr, out_ptr, N, D, K,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n] = sum_k w[n, k] * y[n * K + k] (w = 1 without HAS_W), in k order."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        y = tl.load(y_ptr + (rows64 * K + k)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            y *= tl.load(w_ptr + rows64 * K + k, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        acc += y
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _combine(y_SD: torch.Tensor, w_NK: torch.Tensor | None, N: int, K: int, out_dtype: torch.dtype) -> torch.Tensor:
    D = y_SD.shape[1]
    out_ND = torch.empty(N, D, dtype=out_dtype, device=y_SD.device)
    BLOCK_D = min(triton.next_power_of_2(D), 256)
    BLOCK_N = max(1, min(64, 2048 // BLOCK_D))
    _moe_combine_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))](
        y_SD, w_NK if w_NK is not None else y_SD, out_ND, N, D, K, HAS_W=w_NK is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out_ND


def _row_grid(r: MoERouting, cols: int, block_n: int) -> tuple[int, int]:
    return (r.max_tiles, triton.cdiv(cols, block_n))


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
        x_ND, topk_w_NK = x_ND.contiguous(), topk_w_NK.contiguous()
        w_gate_EDF, w_up_EDF, w_down_EFD = w_gate_EDF.contiguous(), w_up_EDF.contiguous(), w_down_EFD.contiguous()
        N, D = x_ND.shape
        K = topk_idx_NK.shape[1]
        E, _, F = w_gate_EDF.shape
        S = N * K
        BM, BN, BK = block_config(x_ND.device)
        r = moe_routing(topk_idx_NK, E, BM)
        dt, dev = w_gate_EDF.dtype, x_ND.device
        common = dict(IEEE=dt == torch.float32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=triton.next_power_of_2(E))

        a_SF, b_SF, h_SF = (torch.empty(S, F, dtype=dt, device=dev) for _ in range(3))
        y_SD = torch.empty(S, D, dtype=dt, device=dev)
        if S > 0:
            _moe_up_kernel[_row_grid(r, F, BN)](
                x_ND, r.token_S, w_gate_EDF, w_up_EDF, a_SF, b_SF, h_SF, r.tile_end_E, r.counts_E, r.offsets_E,
                D, F, E, x_ND.stride(0), D * F, F, 1, **common,
            )
            _moe_down_kernel[_row_grid(r, D, BN)](
                h_SF, w_down_EFD, h_SF, w_down_EFD, y_SD, r.perm_S, r.tile_end_E, r.counts_E, r.offsets_E,
                F, D, E, F * D, D, 1, DUAL=False, **common,
            )
        out_ND = _combine(y_SD, topk_w_NK.to(x_ND.dtype), N, K, x_ND.dtype)
        ctx.save_for_backward(x_ND, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, a_SF, b_SF, *r[:5])
        ctx.meta = (r.max_tiles, r.block_m)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, a_SF, b_SF, *rt = ctx.saved_tensors
        r = MoERouting(*rt, *ctx.meta)
        grad_ND = grad_ND.contiguous()
        N, D = x_ND.shape
        K = topk_w_NK.shape[1]
        E, _, F = w_gate_EDF.shape
        S = N * K
        BM, BN, BK = block_config(x_ND.device)
        dt, dev = w_gate_EDF.dtype, x_ND.device
        ieee = dt == torch.float32
        common = dict(IEEE=ieee, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=triton.next_power_of_2(E))
        w_S = topk_w_NK.to(x_ND.dtype).reshape(-1)

        n_f_tiles = triton.cdiv(F, BN)
        da_SF, db_SF, h_SF = (torch.empty(S, F, dtype=dt, device=dev) for _ in range(3))
        dw_part_SP = torch.zeros(S, n_f_tiles, dtype=torch.float32, device=dev)
        dx_SD = torch.empty(S, D, dtype=dt, device=dev)
        d_gate, d_up, d_down = torch.empty_like(w_gate_EDF), torch.empty_like(w_up_EDF), torch.empty_like(w_down_EFD)
        if S > 0:
            # Wd[e]^T as a [D, F] operand: k strides over D (1), n over F (D)
            _moe_dh_kernel[_row_grid(r, F, BN)](
                grad_ND, r.token_S, r.perm_S, w_S, w_down_EFD, a_SF, b_SF, da_SF, db_SF, h_SF, dw_part_SP,
                r.tile_end_E, r.counts_E, r.offsets_E,
                D, F, E, grad_ND.stride(0), F * D, 1, D, n_f_tiles, **common,
            )
            # Wg[e]^T, Wu[e]^T as [F, D] operands: k strides over F (1), n over D (F)
            _moe_down_kernel[_row_grid(r, D, BN)](
                da_SF, w_gate_EDF, db_SF, w_up_EDF, dx_SD, r.perm_S, r.tile_end_E, r.counts_E, r.offsets_E,
                F, D, E, D * F, 1, F, DUAL=True, **common,
            )
        wg = dict(IEEE=ieee, BLOCK_P=BN, BLOCK_Q=BN, BLOCK_R=BK)
        _moe_wgrad_kernel[(E, triton.cdiv(D, BN), triton.cdiv(F, BN))](
            x_ND, da_SF, db_SF, r.token_S, r.perm_S, w_S, d_gate, d_up, r.counts_E, r.offsets_E,
            D, F, x_ND.stride(0), F, GATHER_A=True, GATHER_B=False, SCALE_B=False, DUAL=True, **wg,
        )
        _moe_wgrad_kernel[(E, triton.cdiv(F, BN), triton.cdiv(D, BN))](
            h_SF, grad_ND, grad_ND, r.token_S, r.perm_S, w_S, d_down, d_down, r.counts_E, r.offsets_E,
            F, D, F, grad_ND.stride(0), GATHER_A=False, GATHER_B=True, SCALE_B=True, DUAL=False, **wg,
        )
        dx_ND = _combine(dx_SD, None, N, K, x_ND.dtype)
        dw_NK = dw_part_SP.sum(1).view(N, K).to(topk_w_NK.dtype)
        return dx_ND, None, dw_NK, d_gate, d_up, d_down


def moe_experts(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Triton `reference.moe_experts`. Operands are cast to one compute dtype first (the autocast
    dtype when autocast is on, as the reference's matmuls would be), outside the autograd
    Function so that autograd casts the gradients back."""
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(torch.promote_types(x_ND.dtype, w_gate_EDF.dtype),
                                 torch.promote_types(w_up_EDF.dtype, w_down_EFD.dtype))
    out_ND = MoEExpertsFunction.apply(
        x_ND.to(dt), topk_idx_NK, topk_w_NK, w_gate_EDF.to(dt), w_up_EDF.to(dt), w_down_EFD.to(dt),
    )
    return out_ND.to(x_ND.dtype)
