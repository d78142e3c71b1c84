"""The kernel ops as `torch.library` custom ops (namespace `jtok`), the form `torch.compile` runs them in.

Each op is a pair of opaque custom ops, a forward returning `[out, *extras]` and a backward, joined
by `register_autograd`; dynamo and AOTAutograd see only their fake (meta) implementations, so a
compiled graph calls them like any aten op and never traces into Triton launches. Implementations:
- Triton (`use_triton`: a static argument of every op, computed by `kernels/__init__.py` in the traced
  code, so dynamo guards on the backend choice and recompiles when it changes, and the fake and real
  implementations read one flag): the plain `*_fwd` / `*_bwd` functions of `kernels/ops/`; `extras`
  are the tensors the backward needs that are not inputs (jtok_gate: the row norms; moe_experts: the
  SwiGLU pre-activations and the routing);
- reference (elsewhere): `extras` is empty and the backward is `torch.func.vjp` of the reference
  forward (a recomputation: compiled CPU runs pay one extra reference forward per op). The reference
  runs with autocast off, forward and backward, so its output dtype is the promotion of the input
  dtypes that the fake promises (under autocast the operands are cast before the op, outside it),
  and its outputs are made contiguous, the strides the fakes promise.
The eager model does not come here (`kernels/__init__.py` routes only compiled code through these ops),
and neither does the row-sparse table gradient (a sparse COO tensor, which AOTAutograd cannot trace).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from kernels import reference


def _ops(op: str, use_triton: bool) -> ModuleType | None:
    """The `kernels.ops` module of `op` when the op runs Triton, else None (the reference)."""
    return importlib.import_module(f"kernels.ops.{op}") if use_triton else None


def _no_autocast(t: Tensor) -> torch.autocast:
    """Autocast off on `t`'s device: the reference computes in its operands' dtypes, as the fakes say."""
    return torch.autocast(t.device.type, enabled=False)


def _vjp(fn, primals: dict[str, Tensor], grad: Tensor) -> dict[str, Tensor]:
    """Gradients of `fn(**primals)` (a reference forward) with respect to `primals`, by recomputation."""
    names = list(primals)
    with _no_autocast(grad):
        _, pullback = torch.func.vjp(lambda *xs: fn(**dict(zip(names, xs))), *primals.values())
        return {name: g.contiguous() for name, g in zip(names, pullback(grad))}


def _empty_like(*tensors: Tensor) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


# ----------------------------------------------------------------------------- jtok_gate


@torch.library.custom_op("jtok::jtok_gate", mutates_args=())
def jtok_gate_op(m_ND: Tensor, ids_N: Tensor, table_VD: Tensor, scale_D: Tensor, eps: float,
                 residual_ND: Tensor | None, use_triton: bool) -> list[Tensor]:  # fmt: skip
    """`[out_ND]` (reference) or `[out_ND, norm_N]` (Triton: the fp32 row norms its backward reads)."""
    ops = _ops("jtok_gate", use_triton)
    if ops is None:
        with _no_autocast(m_ND):
            return [reference.jtok_gate(m_ND, ids_N, table_VD, scale_D, eps, residual_ND).contiguous()]
    out_ND, saved = ops.jtok_gate_fwd(m_ND, ids_N, table_VD, scale_D, eps, residual_ND)
    return [out_ND, saved[-1]]


@jtok_gate_op.register_fake
def _(m_ND, ids_N, table_VD, scale_D, eps, residual_ND, use_triton):
    dtype = torch.promote_types(torch.promote_types(m_ND.dtype, table_VD.dtype), scale_D.dtype)
    if residual_ND is not None:
        dtype = torch.promote_types(dtype, residual_ND.dtype)
    out = [m_ND.new_empty(m_ND.shape, dtype=dtype)]
    if use_triton:
        out.append(m_ND.new_empty(m_ND.shape[:1], dtype=torch.float32))
    return out


@torch.library.custom_op("jtok::jtok_gate_backward", mutates_args=())
def jtok_gate_backward(grad_ND: Tensor, m_ND: Tensor, ids_N: Tensor, table_VD: Tensor, scale_D: Tensor,
                       extras: list[Tensor], eps: float, table_grad: bool,
                       use_triton: bool) -> list[Tensor]:  # fmt: skip
    """`[dm_ND, d_scale]`, plus `d_table` (dense) with `table_grad`."""
    ops = _ops("jtok_gate", use_triton)
    if ops is None:
        primals = {"m_ND": m_ND, "scale_D": scale_D} | ({"table_VD": table_VD} if table_grad else {})
        fixed = {"ids_N": ids_N, "eps": eps} | ({} if table_grad else {"table_VD": table_VD})
        grads = _vjp(lambda **kw: reference.jtok_gate(**kw, **fixed), primals, grad_ND)
        return [grads["m_ND"], grads["scale_D"]] + ([grads["table_VD"]] if table_grad else [])
    saved = (m_ND.contiguous(), ids_N.contiguous(), table_VD.contiguous(), scale_D.contiguous(), *extras)
    dm_ND, d_table, d_scale = ops.jtok_gate_bwd(grad_ND, *saved, eps, table_grad=table_grad)
    return [dm_ND, d_scale] + ([d_table] if table_grad else [])


@jtok_gate_backward.register_fake
def _(grad_ND, m_ND, ids_N, table_VD, scale_D, extras, eps, table_grad, use_triton):
    return _empty_like(m_ND, scale_D, *([table_VD] if table_grad else []))


def _jtok_gate_setup(ctx, inputs, output):
    m_ND, ids_N, table_VD, scale_D, eps, residual_ND, use_triton = inputs
    ctx.save_for_backward(m_ND, ids_N, table_VD, scale_D, *output[1:])
    ctx.eps, ctx.use_triton = eps, use_triton
    ctx.res_dtype = None if residual_ND is None else residual_ND.dtype


def _jtok_gate_grads(ctx, grads):
    m_ND, ids_N, table_VD, scale_D, *extras = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[2]
    dm_ND, d_scale, *d_table = torch.ops.jtok.jtok_gate_backward(
        grads[0], m_ND, ids_N, table_VD, scale_D, extras, ctx.eps, table_grad, ctx.use_triton
    )
    d_res = None if ctx.res_dtype is None else grads[0].to(ctx.res_dtype)
    return dm_ND, None, d_table[0] if table_grad else None, d_scale, None, d_res, None


torch.library.register_autograd("jtok::jtok_gate", _jtok_gate_grads, setup_context=_jtok_gate_setup)


# ----------------------------------------------------------------------------- jtok_m_mix


@torch.library.custom_op("jtok::jtok_m_mix", mutates_args=())
def jtok_m_mix_op(ids_N: Tensor, tables_EVD: Tensor, topk_idx_NK: Tensor, topk_w_NK: Tensor, scale_D: Tensor,
                  alpha: float, eps: float, use_triton: bool) -> Tensor:  # fmt: skip
    """The mixture's output (neither backend keeps anything but the inputs: the backward recomputes `e`)."""
    ops = _ops("jtok_m_mix", use_triton)
    if ops is None:
        with _no_autocast(tables_EVD):
            return reference.jtok_m_mix(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps).contiguous()
    return ops.jtok_m_mix_fwd(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps)[0]


@jtok_m_mix_op.register_fake
def _(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, use_triton):
    dtype = torch.promote_types(tables_EVD.dtype, scale_D.dtype)
    return tables_EVD.new_empty((ids_N.shape[0], tables_EVD.shape[2]), dtype=dtype)


@torch.library.custom_op("jtok::jtok_m_mix_backward", mutates_args=())
def jtok_m_mix_backward(grad_ND: Tensor, ids_N: Tensor, tables_EVD: Tensor, topk_idx_NK: Tensor, topk_w_NK: Tensor,
                        scale_D: Tensor, alpha: float, eps: float, table_grad: bool,
                        use_triton: bool) -> list[Tensor]:  # fmt: skip
    """`[dw_NK, d_scale]`, plus `d_tables` (dense) with `table_grad`."""
    ops = _ops("jtok_m_mix", use_triton)
    if ops is None:
        primals = {"topk_w_NK": topk_w_NK, "scale_D": scale_D} | ({"tables_EVD": tables_EVD} if table_grad else {})
        fixed = {"ids_N": ids_N, "topk_idx_NK": topk_idx_NK, "alpha": alpha, "eps": eps}
        fixed |= {} if table_grad else {"tables_EVD": tables_EVD}
        grads = _vjp(lambda **kw: reference.jtok_m_mix(**kw, **fixed), primals, grad_ND)
        return [grads["topk_w_NK"], grads["scale_D"]] + ([grads["tables_EVD"]] if table_grad else [])
    saved = tuple(t.contiguous() for t in (ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D))
    d_tables, dw_NK, d_scale = ops.jtok_m_mix_bwd(grad_ND, *saved, alpha, eps, table_grad=table_grad)
    return [dw_NK, d_scale] + ([d_tables] if table_grad else [])


@jtok_m_mix_backward.register_fake
def _(grad_ND, ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, table_grad, use_triton):
    return _empty_like(topk_w_NK, scale_D, *([tables_EVD] if table_grad else []))


def _jtok_m_mix_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.alpha, ctx.eps, ctx.use_triton = inputs[5:]


def _jtok_m_mix_grads(ctx, grad_ND):
    ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[1]
    dw_NK, d_scale, *d_tables = torch.ops.jtok.jtok_m_mix_backward(
        grad_ND, ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, ctx.alpha, ctx.eps, table_grad, ctx.use_triton
    )
    return None, d_tables[0] if table_grad else None, None, dw_NK, d_scale, None, None, None


torch.library.register_autograd("jtok::jtok_m_mix", _jtok_m_mix_grads, setup_context=_jtok_m_mix_setup)


# ----------------------------------------------------------------------------- moe_experts


@torch.library.custom_op("jtok::moe_experts", mutates_args=())
def moe_experts_op(x_ND: Tensor, topk_idx_NK: Tensor, topk_w_NK: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor,
                   w_down_EFD: Tensor, use_triton: bool) -> list[Tensor]:  # fmt: skip
    """`[out_ND]` (reference) or `[out_ND, *extras]` (Triton: `moe_experts_fwd`'s saved tensors past the inputs)."""
    ops = _ops("moe_experts", use_triton)
    if ops is None:
        with _no_autocast(x_ND):
            return [reference.moe_experts(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD).contiguous()]
    out_ND, saved = ops.moe_experts_fwd(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
    return [out_ND, *saved[_MOE_INPUTS_SAVED:]]


_MOE_INPUTS_SAVED = 5  # moe_experts_fwd saves (x, topk_w, w_gate, w_up, w_down) first, then its extras


@moe_experts_op.register_fake
def _(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, use_triton):
    out = [torch.empty_like(x_ND, memory_format=torch.contiguous_format)]
    if use_triton:
        S, E, F = topk_idx_NK.numel(), w_gate_EDF.shape[0], w_gate_EDF.shape[2]
        out += [x_ND.new_empty((S, F), dtype=w_gate_EDF.dtype) for _ in range(2)]  # a_SF, b_SF
        out += [x_ND.new_empty((S,), dtype=torch.int64) for _ in range(2)]  # perm_S, token_S
        out += [x_ND.new_empty((E,), dtype=torch.int32) for _ in range(2)]  # counts_E, offsets_E
    return out


@torch.library.custom_op("jtok::moe_experts_backward", mutates_args=())
def moe_experts_backward(grad_ND: Tensor, x_ND: Tensor, topk_idx_NK: Tensor, topk_w_NK: Tensor, w_gate_EDF: Tensor,
                         w_up_EDF: Tensor, w_down_EFD: Tensor, extras: list[Tensor],
                         use_triton: bool) -> list[Tensor]:  # fmt: skip
    """`[dx_ND, dw_NK, d_gate, d_up, d_down]`."""
    ops = _ops("moe_experts", use_triton)
    weights = {"w_gate_EDF": w_gate_EDF, "w_up_EDF": w_up_EDF, "w_down_EFD": w_down_EFD}
    if ops is None:
        primals = {"x_ND": x_ND, "topk_w_NK": topk_w_NK, **weights}
        grads = _vjp(lambda **kw: reference.moe_experts(topk_idx_NK=topk_idx_NK, **kw), primals, grad_ND)
        return [grads[name] for name in primals]
    saved = tuple(t.contiguous() for t in (x_ND, topk_w_NK, *weights.values()))
    return list(ops.moe_experts_bwd(grad_ND, *saved, *extras))


@moe_experts_backward.register_fake
def _(grad_ND, x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, extras, use_triton):
    return _empty_like(x_ND, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _moe_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1], *output[1:])
    ctx.use_triton = inputs[-1]


def _moe_grads(ctx, grads):
    x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *extras = ctx.saved_tensors
    dx_ND, dw_NK, d_gate, d_up, d_down = torch.ops.jtok.moe_experts_backward(
        grads[0], x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, extras, ctx.use_triton
    )
    return dx_ND, None, dw_NK, d_gate, d_up, d_down, None


torch.library.register_autograd("jtok::moe_experts", _moe_grads, setup_context=_moe_setup)


# ----------------------------------------------------------------------------- the boundary's entry points


def jtok_gate(m_ND, ids_N, table_VD, scale_D, eps: float, residual_ND=None, use_triton: bool = False) -> Tensor:
    """`reference.jtok_gate` (dense table gradient) through the custom op."""
    return torch.ops.jtok.jtok_gate(m_ND, ids_N, table_VD, scale_D, eps, residual_ND, use_triton)[0]


def jtok_m_mix(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha: float, eps: float,
               use_triton: bool = False) -> Tensor:  # fmt: skip
    """`reference.jtok_m_mix` (dense table gradient) through the custom op."""
    return torch.ops.jtok.jtok_m_mix(ids_N, tables_EVD, topk_idx_NK, topk_w_NK, scale_D, alpha, eps, use_triton)


def moe_experts(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD, use_triton: bool = False) -> Tensor:
    """`reference.moe_experts` through the custom op. Operands are first cast to one compute dtype (the
    autocast dtype when autocast is on), outside the op, so that autograd casts the gradients back."""
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(
            torch.promote_types(x_ND.dtype, w_gate_EDF.dtype), torch.promote_types(w_up_EDF.dtype, w_down_EFD.dtype)
        )
    out_ND = torch.ops.jtok.moe_experts(
        x_ND.to(dtype), topk_idx_NK, topk_w_NK, w_gate_EDF.to(dtype), w_up_EDF.to(dtype), w_down_EFD.to(dtype),
        use_triton,
    )[0]
    return out_ND.to(x_ND.dtype)
