"""Routed SwiGLU experts as grouped GEMMs: one launch per GEMM stage for all experts, fwd and bwd.

The N*K (token, expert) slots are sorted by expert (`moe_routing`); each row tile of a launch
belongs to one expert and gathers its token rows on load, so no permuted copy of x is made.
Forward:  up   a, b = x[tok] @ Wg[e], x[tok] @ Wu[e]   (SwiGLU epilogue: h = silu(a) * b)
          down y[slot] = h @ Wd[e]                     (scattered back to slot order)
          combine out[n] = sum_k w[n, k] * y[n, k]
Backward: dh   dh = w * (g[tok] @ Wd[e]^T) -> da, db, w h, and per-tile partial dw = <g[tok] @ Wd^T, h>
          dx   dx[slot] = da @ Wg[e]^T + db @ Wu[e]^T, then summed over k per token
          wgrad dWg[e], dWu[e] = x[tok]^T [da, db];  dWd[e] = (w h)^T g[tok]  (expert's rows only;
                an expert without rows writes zeros)
Every reduction is a fixed-order loop or a partial buffer summed afterwards: no atomics. Tile sizes
are autotuned (`moe_configs`); row-GEMM programs are ordered GROUP_M row tiles at a time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.ops.moe_configs import autotune, min_block_n
from kernels.ops.moe_routing import grouped_tile, moe_routing, tile_rows

ROW_KEY = ["S", "D", "F", "E"]  # S = N K slots: each batch size gets its own tiles (tuned once, cached on disk)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (no TF32), to match the reference's fp32 matmuls.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _al(n, ALIGN: tl.constexpr):
    # == n (the host checked ALIGN divides it); written so, the compiler knows rows start ALIGN-aligned
    # and vectorizes loads (Triton only learns divisibility by 16 from an argument's value itself)
    return n // ALIGN * ALIGN


@triton.jit
def _row_tile(S, E, n_cols, counts_ptr, offsets_ptr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's expert, rows (and mask), columns, first row and whether it has work."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(S, BLOCK_M) + E, tl.cdiv(n_cols, BLOCK_N), GROUP_M)
    e, row_start, row_end, valid = tile_rows(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    rows = row_start + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end, pid_n, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), row_start, valid


@autotune(lambda kw: "up", key=ROW_KEY)
@triton.jit
def _moe_up_kernel(
    x_ptr, token_ptr, wg_ptr, wu_ptr, a_ptr, b_ptr, h_ptr, counts_ptr, offsets_ptr,
    S, D, F, E,
    IEEE: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """a, b = x[tok] @ Wg[e], x[tok] @ Wu[e] and h = silu(a) * b for one [BLOCK_M, BLOCK_N] tile."""
    D, F = _al(D, ALIGN), _al(F, ALIGN)
    e, rows, row_mask, _, cols, row_start, valid = _row_tile(
        S, E, F, counts_ptr, offsets_ptr, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E)
    if valid:
        tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        col_mask = cols < F
        wg_e = wg_ptr + e.to(tl.int64) * D * F
        wu_e = wu_ptr + e.to(tl.int64) * D * F
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            x = tl.load(x_ptr + tok[:, None] * D + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_off = ks[:, None] * F + cols[None, :]
            w_mask = k_mask[:, None] & col_mask[None, :]
            acc_a = _mma(x, tl.load(wg_e + w_off, mask=w_mask, other=0.0), acc_a, IEEE)
            acc_b = _mma(x, tl.load(wu_e + w_off, mask=w_mask, other=0.0), acc_b, IEEE)
        # offsets inside the tile fit in int32 (half the registers of int64 ones); the tile base is int64
        base = row_start.to(tl.int64) * F
        off = tl.arange(0, BLOCK_M)[:, None] * F + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        # h from the stored (rounded) a, b, as the backward recomputes it; the fp32 accumulators die here
        a = acc_a.to(a_ptr.dtype.element_ty)
        tl.store(a_ptr + base + off, a, mask=mask)
        b = acc_b.to(b_ptr.dtype.element_ty)
        tl.store(b_ptr + base + off, b, mask=mask)
        a_f = a.to(tl.float32)
        tl.store(h_ptr + base + off, (a_f * tl.sigmoid(a_f) * b.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=mask)


@autotune(lambda kw: "dx" if kw["DUAL"] else "down", key=ROW_KEY + ["DUAL"])
@triton.jit
def _moe_down_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, out_ptr, perm_ptr, counts_ptr, offsets_ptr,
    S, D, F, E,
    DUAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[perm[row]] = a1[row] @ b1[e] (+ a2[row] @ b2[e]); a rows are expert-sorted, [S, F] -> [S, D]."""
    D, F = _al(D, ALIGN), _al(F, ALIGN)
    e, rows, row_mask, _, cols, row_start, valid = _row_tile(
        S, E, D, counts_ptr, offsets_ptr, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E)
    if valid:
        col_mask = cols < D
        a_base = row_start.to(tl.int64) * F
        b1_e = b1_ptr + e.to(tl.int64) * D * F
        b2_e = b2_ptr + e.to(tl.int64) * D * F
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < F
            a_off = tl.arange(0, BLOCK_M)[:, None] * F + ks[None, :]
            a_mask = row_mask[:, None] & k_mask[None, :]
            if DUAL:  # b = Wg[e]^T, Wu[e]^T: [D, F] stored, read as [F, D]
                b_off = ks[:, None] + cols[None, :] * F
            else:  # b = Wd[e], [F, D]
                b_off = ks[:, None] * D + cols[None, :]
            b_mask = k_mask[:, None] & col_mask[None, :]
            acc = _mma(tl.load(a1_ptr + a_base + a_off, mask=a_mask, other=0.0),
                       tl.load(b1_e + b_off, mask=b_mask, other=0.0), acc, IEEE)
            if DUAL:
                acc = _mma(tl.load(a2_ptr + a_base + a_off, mask=a_mask, other=0.0),
                           tl.load(b2_e + b_off, mask=b_mask, other=0.0), acc, IEEE)
        slot = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.store(out_ptr + slot[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


@autotune(lambda kw: "dh", key=ROW_KEY, reset_to_zero=["dw_part_ptr"])
@triton.jit
def _moe_dh_kernel(
    g_ptr, token_ptr, perm_ptr, w_ptr, wd_ptr, a_ptr, b_ptr, da_ptr, db_ptr, h_ptr, dw_part_ptr,
    counts_ptr, offsets_ptr,
    S, D, F, E, n_part,
    IEEE: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dh = w * (g[tok] @ Wd[e]^T) with the SwiGLU backward epilogue; also w h and partial dw
    (column tile pid_n of row slot at dw_part[slot, pid_n], the row stride n_part >= column tiles)."""
    D, F = _al(D, ALIGN), _al(F, ALIGN)
    e, rows, row_mask, pid_n, cols, row_start, valid = _row_tile(
        S, E, F, counts_ptr, offsets_ptr, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E)
    if valid:
        tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        col_mask = cols < F
        wd_e = wd_ptr + e.to(tl.int64) * F * D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            g = tl.load(g_ptr + tok[:, None] * D + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wdt = tl.load(wd_e + ks[:, None] + cols[None, :] * D,  # Wd[e] is [F, D], read as [D, F]
                          mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = _mma(g.to(wdt.dtype), wdt, acc, IEEE)
        slot = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        w = tl.load(w_ptr + slot, mask=row_mask, other=0.0).to(tl.float32)
        # the epilogue in two column halves: half the tiles of temporaries are live at a time
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        base = row_start.to(tl.int64) * F
        cols_lo = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        dw = _dh_epilogue(acc_lo, w, a_ptr, b_ptr, da_ptr, db_ptr, h_ptr, base, row_mask, cols_lo, F, BLOCK_M)
        dw += _dh_epilogue(acc_hi, w, a_ptr, b_ptr, da_ptr, db_ptr, h_ptr, base, row_mask, cols_lo + BLOCK_N // 2, F, BLOCK_M)
        # d<out, g>/dw[slot] = <g[tok] @ Wd^T, h>, summed over this tile's F columns
        tl.store(dw_part_ptr + slot * n_part + pid_n, dw, mask=row_mask)


@triton.jit
def _dh_epilogue(acc, w, a_ptr, b_ptr, da_ptr, db_ptr, h_ptr, base, row_mask, cols, F, BLOCK_M: tl.constexpr):
    """SwiGLU backward for columns `cols` of a dh tile: stores w h, da, db; returns the rows' <acc, h>."""
    off = tl.arange(0, BLOCK_M)[:, None] * F + cols[None, :]  # int32 inside the tile, int64 base
    mask = row_mask[:, None] & (cols < F)[None, :]
    a = tl.load(a_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    b = tl.load(b_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
    h = silu * b
    dw = tl.sum(acc * h, axis=1)
    # h is needed only by dWd = h^T (w g[tok]): store w h, so that GEMM needs no scaling
    tl.store(h_ptr + base + off, (h * w[:, None]).to(h_ptr.dtype.element_ty), mask=mask)
    dh = acc * w[:, None]
    tl.store(db_ptr + base + off, (dh * silu).to(db_ptr.dtype.element_ty), mask=mask)
    tl.store(da_ptr + base + off, (dh * b * (sig + silu * (1.0 - sig))).to(da_ptr.dtype.element_ty), mask=mask)
    return dw


@autotune(lambda kw: "wgrad" if kw["DUAL"] else "wgrad_one", key=["P", "Q", "E", "DUAL"])
@triton.jit
def _moe_wgrad_kernel(
    a_ptr, b1_ptr, b2_ptr, token_ptr, out1_ptr, out2_ptr, counts_ptr, offsets_ptr,
    P, Q, E,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, DUAL: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[e] = A[rows of e]^T @ B[rows of e] ([P, Q] per expert, [BLOCK_M, BLOCK_N] tiles, BLOCK_K
    rows per step); gathered rows read token[row]. Grid (tiles of P x Q, E)."""
    P, Q = _al(P, ALIGN), _al(Q, ALIGN)
    e = tl.program_id(1)
    pid_p, pid_q = grouped_tile(tl.program_id(0), tl.cdiv(P, BLOCK_M), tl.cdiv(Q, BLOCK_N), GROUP_M)
    ps = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = ps < P
    q_mask = qs < Q
    start = tl.load(offsets_ptr + e)
    end = start + tl.load(counts_ptr + e)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_mask = rs < end
        tok = tl.load(token_ptr + rs, mask=r_mask, other=0).to(tl.int64)
        a_rows = tok if GATHER_A else rs.to(tl.int64)
        b_rows = tok if GATHER_B else rs.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * P + ps[None, :], mask=r_mask[:, None] & p_mask[None, :], other=0.0)
        b_off = b_rows[:, None] * Q + qs[None, :]
        b_mask = r_mask[:, None] & q_mask[None, :]
        at = tl.trans(a)
        acc1 = _mma(at, tl.load(b1_ptr + b_off, mask=b_mask, other=0.0).to(a.dtype), acc1, IEEE)
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


def _alignment(D: int, F: int) -> int:
    """The largest power of two <= 16 dividing D and F: every row of the contiguous operands starts
    at a multiple of it (elements), which the kernels pass on to the compiler (`_al`)."""
    g = math.gcd(D, F)
    return max(1, min(16, g & -g))  # D = F = 0 (no columns) has no alignment to state


def _row_grid(S: int, E: int, n_cols: int):
    """Launch grid of a row GEMM: an upper bound of row tiles times column tiles, per config."""
    return lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(n_cols, meta["BLOCK_N"]),)


def _wgrad_grid(P: int, Q: int, E: int):
    """Launch grid of a weight gradient: the [P, Q] tiles of one expert times E."""
    return lambda meta: (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]), E)


def moe_experts_fwd(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Forward of the routed experts, x and the weights in one floating dtype (the compute dtype dt):
    (out_ND, saved) with saved = (x_ND [N, D] dt, topk_w_NK [N, K] (its dtype), w_gate_EDF [E, D, F] dt,
    w_up_EDF [E, D, F] dt, w_down_EFD [E, F, D] dt, a_SF [S, F] dt, b_SF [S, F] dt (the gate and up
    projections), perm_S [S] int64, token_S [S] int64, counts_E [E] int32, offsets_E [E] int32), S = N K,
    all contiguous. `moe_experts_bwd(grad_ND, *saved)` needs nothing else: every size is a shape of these."""
    x_ND, topk_w_NK = x_ND.contiguous(), topk_w_NK.contiguous()
    w_gate_EDF, w_up_EDF, w_down_EFD = w_gate_EDF.contiguous(), w_up_EDF.contiguous(), w_down_EFD.contiguous()
    N, D = x_ND.shape
    K = topk_idx_NK.shape[1]
    E, _, F = w_gate_EDF.shape
    S = N * K
    r = moe_routing(topk_idx_NK, E)
    dt, dev = w_gate_EDF.dtype, x_ND.device
    common = {"IEEE": dt == torch.float32, "BLOCK_E": triton.next_power_of_2(E), "ALIGN": _alignment(D, F)}

    a_SF, b_SF, h_SF = (torch.empty(S, F, dtype=dt, device=dev) for _ in range(3))
    y_SD = torch.empty(S, D, dtype=dt, device=dev)
    if S > 0:
        _moe_up_kernel[_row_grid(S, E, F)](
            x_ND, r.token_S, w_gate_EDF, w_up_EDF, a_SF, b_SF, h_SF, r.counts_E, r.offsets_E,
            S, D, F, E, **common,
        )
        _moe_down_kernel[_row_grid(S, E, D)](
            h_SF, w_down_EFD, h_SF, w_down_EFD, y_SD, r.perm_S, r.counts_E, r.offsets_E,
            S, D, F, E, DUAL=False, **common,
        )
    out_ND = _combine(y_SD, topk_w_NK.to(x_ND.dtype), N, K, x_ND.dtype)
    return out_ND, (x_ND, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, a_SF, b_SF, *r[:4])


def moe_experts_bwd(grad_ND, x_ND, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, a_SF, b_SF,
                    perm_S, token_S, counts_E, offsets_E):
    """Gradients (dx_ND, dw_NK, d_gate_EDF, d_up_EDF, d_down_EFD) from `moe_experts_fwd`'s saved tensors."""
    grad_ND = grad_ND.contiguous()
    N, D = x_ND.shape
    K = topk_w_NK.shape[1]
    E, _, F = w_gate_EDF.shape
    S = N * K
    dt, dev = w_gate_EDF.dtype, x_ND.device
    ieee = dt == torch.float32
    common = {"IEEE": ieee, "BLOCK_E": triton.next_power_of_2(E), "ALIGN": _alignment(D, F)}
    w_S = topk_w_NK.to(x_ND.dtype).reshape(-1)

    da_SF, db_SF, hw_SF = (torch.empty(S, F, dtype=dt, device=dev) for _ in range(3))
    # one column per F tile at the narrowest BLOCK_N the tuner may use; wider tiles leave zeros
    n_part = triton.cdiv(F, min_block_n(_moe_dh_kernel, ieee))
    dw_part_SP = torch.zeros(S, n_part, dtype=torch.float32, device=dev)
    dx_SD = torch.empty(S, D, dtype=dt, device=dev)
    d_gate, d_up, d_down = torch.empty_like(w_gate_EDF), torch.empty_like(w_up_EDF), torch.empty_like(w_down_EFD)
    if S > 0:
        _moe_dh_kernel[_row_grid(S, E, F)](
            grad_ND, token_S, perm_S, w_S, w_down_EFD, a_SF, b_SF, da_SF, db_SF, hw_SF, dw_part_SP,
            counts_E, offsets_E, S, D, F, E, n_part, **common,
        )
        _moe_down_kernel[_row_grid(S, E, D)](
            da_SF, w_gate_EDF, db_SF, w_up_EDF, dx_SD, perm_S, counts_E, offsets_E,
            S, D, F, E, DUAL=True, **common,
        )
    _moe_wgrad_kernel[_wgrad_grid(D, F, E)](
        x_ND, da_SF, db_SF, token_S, d_gate, d_up, counts_E, offsets_E,
        D, F, E, GATHER_A=True, GATHER_B=False, DUAL=True, IEEE=ieee, ALIGN=common["ALIGN"],
    )
    _moe_wgrad_kernel[_wgrad_grid(F, D, E)](
        hw_SF, grad_ND, grad_ND, token_S, d_down, d_down, counts_E, offsets_E,
        F, D, E, GATHER_A=False, GATHER_B=True, DUAL=False, IEEE=ieee, ALIGN=common["ALIGN"],
    )
    dx_ND = _combine(dx_SD, None, N, K, x_ND.dtype)
    dw_NK = dw_part_SP.sum(1).view(N, K).to(topk_w_NK.dtype)
    return dx_ND, dw_NK, d_gate, d_up, d_down


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
        out_ND, saved = moe_experts_fwd(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
        ctx.save_for_backward(*saved)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        dx_ND, dw_NK, d_gate, d_up, d_down = moe_experts_bwd(grad_ND, *ctx.saved_tensors)
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
