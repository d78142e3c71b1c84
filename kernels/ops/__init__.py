"""Triton implementations registered at the kernel boundary (`kernels/__init__.py`).

Importing this module raises ImportError when triton is missing, so the boundary falls back to
the PyTorch reference. Each entry has exactly the signature of the same-named `kernels.reference`
function. On a machine without a GPU, run them under `TRITON_INTERPRET=1` (set before triton is
imported: triton decides at decoration time whether a kernel is compiled or interpreted).
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here means: no Triton backend)

from kernels.ops import jtok_gate, jtok_m_mix, moe_experts

OPS = {
    "jtok_gate": jtok_gate.jtok_gate,
    "jtok_m_mix": jtok_m_mix.jtok_m_mix,
    "moe_experts": moe_experts.moe_experts,
}
