"""The kernel dispatch boundary: the only place the model calls its token-indexed and MoE hot paths.

Each op validates its inputs, then runs a Triton kernel on CUDA tensors (when one is registered
for it) and the PyTorch reference (`kernels.reference`) otherwise. The environment variable
`JTOK_KERNELS` overrides the choice: `reference` forces PyTorch everywhere, `triton` forces the
Triton path even on CPU (run it under `TRITON_INTERPRET=1`), `auto` (default) picks by device.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from kernels import reference

BACKENDS = ("auto", "reference", "triton")

# op name -> Triton implementation with the reference signature; filled in by `_register_triton`.
_TRITON_OPS: dict[str, Callable] = {}


def backend() -> str:
    """The backend requested through `JTOK_KERNELS`."""
    choice = os.environ.get("JTOK_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"JTOK_KERNELS={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def _pick(op: str, device: torch.device) -> Callable:
    choice = backend()
    if choice == "reference":
        return getattr(reference, op)
    if op in _TRITON_OPS and (choice == "triton" or device.type == "cuda"):
        return _TRITON_OPS[op]
    if choice == "triton":
        raise RuntimeError(f"JTOK_KERNELS=triton but no Triton kernel is available for {op}")
    return getattr(reference, op)


def check_ids(ids: torch.Tensor, num_rows: int, what: str = "table") -> None:
    """Raise a clear error for token ids outside `[0, num_rows)` (never read out of bounds)."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token ids must be int32 or int64, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_rows:
        bad = hi if hi >= num_rows else lo
        raise IndexError(f"token id {bad} is outside the {what}'s vocabulary [0, {num_rows})")


def _check_same(device_of: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device_of.device:
            raise ValueError(f"{name} is on {t.device}, expected {device_of.device}")


def jtok_gate(m_ND, ids_N, table_VD, scale_D, eps: float, residual_ND=None, validate: bool = True,
              sparse_grad: bool = False):  # fmt: skip
    """JTok's gated FFN update (optionally plus the residual); see `reference.jtok_gate`. With
    `sparse_grad` the table's gradient is row-sparse (`reference.row_sparse_grad`)."""
    if validate:
        if m_ND.dim() != 2 or ids_N.shape != m_ND.shape[:1] or table_VD.shape[1] != m_ND.shape[1]:
            raise ValueError(
                f"jtok_gate shapes: m {tuple(m_ND.shape)}, ids {tuple(ids_N.shape)}, table {tuple(table_VD.shape)}"
            )
        if scale_D.shape != (m_ND.shape[1],):
            raise ValueError(f"jtok_gate: scale has shape {tuple(scale_D.shape)}, expected ({m_ND.shape[1]},)")
        _check_same(m_ND, ids=ids_N, table=table_VD, scale=scale_D)
        check_ids(ids_N, table_VD.shape[0], "JTok table")
    return _pick("jtok_gate", m_ND.device)(m_ND, ids_N, table_VD, scale_D, eps, residual_ND, sparse_grad)


def jtok_m_mix(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha: float, eps: float, validate: bool = True,
               sparse_grad: bool = False):  # fmt: skip
    """JTok-M's residual term from K routed tables; see `reference.jtok_m_mix`. With `sparse_grad` the
    tables' gradient is row-sparse over (table, id) pairs (`reference.row_sparse_grad`)."""
    if validate:
        n_tables, _, d = tables_EVD.shape
        if topk_idx_NK.shape != topk_w_NK.shape or topk_idx_NK.shape[0] != ids_N.shape[0]:
            raise ValueError(
                f"jtok_m_mix shapes: ids {tuple(ids_N.shape)}, topk_idx {tuple(topk_idx_NK.shape)}, "
                f"topk_w {tuple(topk_w_NK.shape)}"
            )
        if scale_D.shape != (d,):
            raise ValueError(f"jtok_m_mix: scale has shape {tuple(scale_D.shape)}, expected ({d},)")
        _check_same(tables_EVD, ids=ids_N, topk_idx=topk_idx_NK, topk_w=topk_w_NK, scale=scale_D)
        check_ids(ids_N, tables_EVD.shape[1], "JTok-M table")
        check_ids(topk_idx_NK, n_tables, "JTok-M pool")
    return _pick("jtok_m_mix", tables_EVD.device)(
        ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, sparse_grad
    )


def moe_experts(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, validate: bool = True):
    """The routed experts' weighted SwiGLU outputs; see `reference.moe_experts`."""
    if validate:
        if topk_idx_NK.shape != topk_w_NK.shape or topk_idx_NK.shape[0] != x_ND.shape[0]:
            raise ValueError(
                f"moe_experts shapes: x {tuple(x_ND.shape)}, topk_idx {tuple(topk_idx_NK.shape)}, "
                f"topk_w {tuple(topk_w_NK.shape)}"
            )
        _check_same(x_ND, topk_idx=topk_idx_NK, topk_w=topk_w_NK, w_gate=w_gate_EDF)
        check_ids(topk_idx_NK, w_gate_EDF.shape[0], "expert set")
    return _pick("moe_experts", x_ND.device)(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _register_triton() -> None:
    """Register the Triton ops if they import (ImportError when triton is absent)."""
    try:
        from kernels.ops import OPS
    except ImportError:
        return
    _TRITON_OPS.update(OPS)


_register_triton()
