"""The kernel dispatch boundary: the only place the model calls its token-indexed and MoE hot paths.

Each op validates its inputs, then runs a Triton kernel on CUDA tensors (when one is registered
for it) and the PyTorch reference (`kernels.reference`) otherwise. The environment variable
`JTOK_KERNELS` overrides the choice: `reference` forces PyTorch everywhere, `triton` forces the
Triton path even on CPU (run it under `TRITON_INTERPRET=1`), `auto` (default) picks by device. It is
read once, on the first call (`set_backend` changes or re-reads it).

Eager code runs the Triton `autograd.Function`s or the differentiable reference, as before. Code
being compiled (`torch.compiler.is_compiling()`) runs the same implementations as the opaque custom
ops of `kernels.library`, except the row-sparse table gradient (`sparse_grad=True` on a table that
needs a gradient): a sparse COO tensor, which AOTAutograd cannot trace, so that call runs eagerly
(`torch.compiler.disable`: one graph break per call). The backend choice reaches the custom ops as a
static argument (`use_triton`) computed here, in the traced code: dynamo guards on it, so a later
`set_backend` recompiles rather than mixing one backend's fakes with the other's kernels.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from kernels import reference

BACKENDS = ("auto", "reference", "triton")

# op name -> Triton implementation with the reference signature; filled in by `_register_triton`.
_TRITON_OPS: dict[str, Callable] = {}

_BACKEND: str | None = None  # the resolved choice; None: read JTOK_KERNELS on the next call


def _checked(choice: str) -> str:
    choice = choice.lower()
    if choice not in BACKENDS:
        raise ValueError(f"JTOK_KERNELS={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def set_backend(choice: str | None) -> None:
    """Use `choice` (auto | reference | triton) from now on; None re-reads `JTOK_KERNELS` on the next call.
    Compiled code re-traces on its next call after a change (dynamo guards on the choice)."""
    global _BACKEND
    _BACKEND = None if choice is None else _checked(choice)


def backend() -> str:
    """The backend in use: `set_backend`'s choice, else `JTOK_KERNELS` as read on the first call."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = _checked(os.environ.get("JTOK_KERNELS", "auto"))
    return _BACKEND


def _uses_triton(op: str, device: torch.device) -> bool:
    choice = backend()
    if choice == "reference":
        return False
    if op in _TRITON_OPS and (choice == "triton" or device.type == "cuda"):
        return True
    if choice == "triton":
        raise RuntimeError(f"JTOK_KERNELS=triton but no Triton kernel is available for {op}")
    return False


def _pick(op: str, device: torch.device) -> Callable:
    return _TRITON_OPS[op] if _uses_triton(op, device) else getattr(reference, op)


def check_ids(ids: torch.Tensor, num_rows: int, what: str = "table") -> None:
    """Fail on token ids outside `[0, num_rows)` (never read out of bounds).

    On CPU in eager mode: an IndexError naming the first offending id (one host-side min/max). On CUDA
    and in compiled code: `torch._assert_async` on the device, so no host sync and no graph break;
    a bad id then fails the next synchronising call with a device-side assertion (on CUDA it
    poisons the CUDA context: the process must restart) whose message names the range, not the id."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token ids must be int32 or int64, got {ids.dtype}")
    if ids.numel() == 0:
        return
    if ids.is_cuda or torch.compiler.is_compiling():
        inside = ((ids >= 0) & (ids < num_rows)).all()
        torch._assert_async(inside, f"a token id is outside the {what}'s vocabulary [0, {num_rows})")
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_rows:
        bad = hi if hi >= num_rows else lo
        raise IndexError(f"token id {bad} is outside the {what}'s vocabulary [0, {num_rows})")


def _check_same(device_of: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device_of.device:
            raise ValueError(f"{name} is on {t.device}, expected {device_of.device}")


def _row_sparse(sparse_grad: bool, table: torch.Tensor) -> bool:
    """Whether the call forms a row-sparse table gradient (which compiled code leaves to eager mode)."""
    return sparse_grad and torch.is_grad_enabled() and table.requires_grad


def _run(op: str, device: torch.device, *args):
    """`op` on `_pick`'s implementation."""
    return _pick(op, device)(*args)


# Built once, here: a `torch.compiler.disable` made inside traced code is a new skipped function per frame.
_run_outside_graph = torch.compiler.disable(_run)


def _eager(op: str, device: torch.device, *args):
    """`op` on `_pick`'s implementation; under compile (row-sparse gradients only) behind a graph break."""
    return (_run_outside_graph if torch.compiler.is_compiling() else _run)(op, device, *args)


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
    if torch.compiler.is_compiling() and not _row_sparse(sparse_grad, table_VD):
        use_triton = _uses_triton("jtok_gate", m_ND.device)
        return library.jtok_gate(m_ND, ids_N, table_VD, scale_D, eps, residual_ND, use_triton)
    return _eager("jtok_gate", m_ND.device, m_ND, ids_N, table_VD, scale_D, eps, residual_ND, sparse_grad)


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
    if torch.compiler.is_compiling() and not _row_sparse(sparse_grad, tables_EVD):
        use_triton = _uses_triton("jtok_m_mix", tables_EVD.device)
        return library.jtok_m_mix(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, use_triton)
    return _eager(
        "jtok_m_mix", tables_EVD.device, ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, sparse_grad
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
    if torch.compiler.is_compiling():
        use_triton = _uses_triton("moe_experts", x_ND.device)
        return library.moe_experts(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, use_triton)
    return _pick("moe_experts", x_ND.device)(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _register_triton() -> None:
    """Register the Triton ops if they import (ImportError when triton is absent)."""
    try:
        from kernels.ops import OPS
    except ImportError:
        return
    _TRITON_OPS.update(OPS)


_register_triton()

from kernels import library  # last: it registers the custom ops (and imports `kernels.reference`)
