"""PyTorch reference implementations of the ops behind the kernel dispatch boundary.

These are the exact semantics every Triton kernel must reproduce (forward and gradients);
they are also what runs on CPU. Shapes: N tokens (flattened), d hidden, V vocabulary,
n_e tables per layer, K tables per token, E routed experts, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def jtok_gate(
    m_ND: torch.Tensor,
    ids_N: torch.Tensor,
    table_VD: torch.Tensor,
    scale_D: torch.Tensor,
    eps: float,
    residual_ND: torch.Tensor | None = None,
) -> torch.Tensor:
    """JTok: `m * (1 + s * u / (||u|| + eps))` with `u = E[ids]`, plus `residual` when given."""
    u_ND = table_VD[ids_N]
    unit_ND = u_ND / (u_ND.norm(dim=-1, keepdim=True) + eps)
    out_ND = m_ND * (1.0 + scale_D * unit_ND)
    return out_ND if residual_ND is None else residual_ND + out_ND


def jtok_m_mix(
    ids_N: torch.Tensor,
    tables_EVD: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_w_NK: torch.Tensor,
    scale_D: torch.Tensor,
    alpha: float,
    eps: float,
) -> torch.Tensor:
    """JTok-M residual `alpha * s * e / (||e|| + eps)` with `e = sum_k w_k * E_{idx_k}[ids]`."""
    rows_NKD = tables_EVD[topk_idx_NK, ids_N[:, None]]
    e_ND = (topk_w_NK.unsqueeze(-1).to(rows_NKD.dtype) * rows_NKD).sum(dim=1)
    return alpha * scale_D * (e_ND / (e_ND.norm(dim=-1, keepdim=True) + eps))


def moe_experts(
    x_ND: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_w_NK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts: `sum_k w_k * down_e(silu(x gate_e) * (x up_e))`, looping over experts."""
    out_ND = torch.zeros_like(x_ND)
    flat_expert = topk_idx_NK.reshape(-1)
    flat_token = torch.arange(x_ND.shape[0], device=x_ND.device).repeat_interleave(topk_idx_NK.shape[1])
    flat_w = topk_w_NK.reshape(-1)
    for e in range(w_gate_EDF.shape[0]):
        # An expert with no tokens still runs on zero rows, so its weights get (zero) gradients.
        slot = (flat_expert == e).nonzero(as_tuple=True)[0]
        token = flat_token[slot]
        x_nD = x_ND[token]
        h_nF = F.silu(x_nD @ w_gate_EDF[e]) * (x_nD @ w_up_EDF[e])
        y_nD = (h_nF @ w_down_EFD[e]) * flat_w[slot].unsqueeze(-1).to(x_ND.dtype)
        out_ND.index_add_(0, token, y_nD)
    return out_ND
