"""The JTok element-wise kernels at GPU-relevant shapes, and their compiled form for sm_90 / sm_80.

Interpreter tests (float32, CPU): d = 2048 (one row per block), the persistent backward's loop with more
row blocks than programs, the segment sum over several column tiles (d > 256), forward and every gradient
against `kernels.reference`, dense and row-sparse table gradients, repeated ids; the split
`*_fwd` / `*_bwd` functions return what their docstrings promise.

Compile tests (a subprocess with TRITON_INTERPRET unset, `kernels.aot.aot_target`: no GPU needed): every
pointer offset of the JTok kernels and the segment sum is computed without a 32-bit multiply (offsets
wrap once tokens * d >= 2^31 otherwise), checked on the TTIR; and no kernel spills registers.
"""

from __future__ import annotations

import os

# Must be set before triton is first imported (tests/conftest.py sets it for the whole pytest process).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction

from kernels import reference
from tensor_asserts import assert_close

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in a subprocess under TRITON_INTERPRET=1")

if INTERPRETED:
    from kernels.ops import OPS
    from kernels.ops import jtok_gate as gate_mod
    from kernels.ops import jtok_m_mix as mix_mod


@pytest.mark.skipif(INTERPRETED, reason="the interpreter is on: the tests below run in this process")
def test_interpreter_tests_in_subprocess():
    """Triton was imported without the interpreter: run this file's interpreter tests in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not compiled"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- interpreter: helpers


def assert_grad_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Dense gradients by value; row-sparse ones by their (exact, integer) rows, then values."""
    assert got.layout == want.layout, f"{name}: layout {got.layout} != {want.layout}"
    if got.layout == torch.sparse_coo:
        assert got.is_coalesced() and want.is_coalesced(), name
        assert torch.equal(got._indices(), want._indices()), f"{name}: different touched rows"
        got, want = got._values(), want._values()
    assert_close(name, got, want)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def compare(op: str, args: tuple, leaves: dict, sparse_grad: bool) -> None:
    """Forward and the gradient of every leaf, Triton vs reference, under one random upstream gradient."""
    got, want = OPS[op](*args, sparse_grad), getattr(reference, op)(*args, sparse_grad)
    assert_close(f"{op} forward", got, want)
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad(got, list(leaves.values()), up)
    g_want = torch.autograd.grad(want, list(leaves.values()), up)
    for name, a, b in zip(leaves, g_got, g_want):
        assert_grad_close(f"{op} d{name} (sparse_grad={sparse_grad})", a, b)


def gate_case(N, D, V, residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, table, scale = (leaf(torch.randn(*s, generator=gen)) for s in ((N, D), (V, D), (D,)))
    res = leaf(torch.randn(N, D, generator=gen)) if residual else None
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[-1] = ids[0]  # at least one repeated id
    leaves = {"m": m, "table": table, "scale": scale} | ({"residual": res} if residual else {})
    return (m, ids, table, scale, 1e-6, res), leaves


def mix_case(N, D, V, n_e, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables, scale = leaf(torch.randn(n_e, V, D, generator=gen)), leaf(torch.randn(D, generator=gen))
    ids = torch.randint(0, V, (N,), generator=gen)
    idx = torch.rand(N, n_e, generator=gen).argsort(-1)[:, :K]
    ids[-1], idx[-1] = ids[0], idx[0]  # at least one repeated (table, id) pair
    w = torch.rand(N, K, generator=gen) + 0.1
    w = leaf(w / w.sum(-1, keepdim=True))
    return (ids, tables, idx, w, scale, 0.5, 1e-6), {"tables": tables, "w": w, "scale": scale}


# (N, D): d = 2048 has one row per block (7 blocks over 4 programs) and 8 segment-sum column tiles;
# d = 300 has 4 rows per block (10 blocks, the last partial, over 4 programs) and 2 column tiles.
SHAPES = [pytest.param(7, 2048, id="N7-d2048"), pytest.param(37, 300, id="N37-d300")]


# ----------------------------------------------------------------------------- interpreter: tests


@needs_interpreter
def test_backward_grid_is_persistent_with_more_blocks_than_programs():
    cpu = torch.device("cpu")
    assert gate_mod.persistent_programs(cpu, 1000) == 4 and gate_mod.persistent_programs(cpu, 3) == 3
    for N, D in ((7, 2048), (37, 300)):  # the shapes below loop: more row blocks than programs
        BLOCK_N, _ = gate_mod.row_block(D)
        assert triton.cdiv(N, BLOCK_N) > gate_mod.persistent_programs(cpu, triton.cdiv(N, BLOCK_N))


@needs_interpreter
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("N,D", SHAPES)
def test_jtok_gate_at_gpu_shapes(N, D, sparse_grad):
    compare("jtok_gate", *gate_case(N, D, V=5, residual=True), sparse_grad)


@needs_interpreter
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("N,D", SHAPES)
def test_jtok_m_mix_at_gpu_shapes(N, D, sparse_grad):
    compare("jtok_m_mix", *mix_case(N, D, V=4, n_e=3, K=2), sparse_grad)


@needs_interpreter
def test_jtok_gate_fwd_bwd_functions():
    """The plain functions behind the autograd.Function: saved tensors, optional table gradient, N = 0."""
    (m, ids, table, scale, eps, res), _ = gate_case(7, 2048, 5, residual=True)
    out, saved = gate_mod.jtok_gate_fwd(m, ids.to(torch.int32), table, scale, eps, res)
    assert_close("jtok_gate_fwd", out, reference.jtok_gate(m, ids, table, scale, eps, res))
    assert [t.shape for t in saved] == [m.shape, ids.shape, table.shape, scale.shape, (7,)]
    assert saved[1].dtype == torch.int32 and saved[4].dtype == torch.float32
    assert_close("norm_N", saved[4], table.detach()[ids].norm(dim=-1))
    dm, d_table, d_scale = gate_mod.jtok_gate_bwd(torch.ones_like(out), *saved, eps, table_grad=False)
    assert d_table is None and dm.shape == m.shape and d_scale.shape == scale.shape
    out0, saved0 = gate_mod.jtok_gate_fwd(m[:0], ids[:0], table, scale, eps)
    dm0, d_table0, d_scale0 = gate_mod.jtok_gate_bwd(out0, *saved0, eps)
    # no token: nothing is computed, the gradients are the zero-filled buffers
    assert dm0.shape == (0, 2048) and not d_table0.any() and not d_scale0.any()


@needs_interpreter
def test_jtok_m_mix_fwd_bwd_functions():
    (ids, tables, idx, w, scale, alpha, eps), _ = mix_case(7, 2048, 4, 3, 2)
    out, saved = mix_mod.jtok_m_mix_fwd(ids, tables, idx, w, scale, alpha, eps)
    assert_close("jtok_m_mix_fwd", out, reference.jtok_m_mix(ids, tables, idx, w, scale, alpha, eps))
    assert [t.shape for t in saved] == [ids.shape, tables.shape, idx.shape, w.shape, scale.shape]
    d_tables, dw, d_scale = mix_mod.jtok_m_mix_bwd(torch.ones_like(out), *saved, alpha, eps, table_grad=False)
    assert d_tables is None and dw.shape == w.shape and dw.dtype == w.dtype and d_scale.shape == scale.shape


# ----------------------------------------------------------------------------- compiled for sm_90 / sm_80

# Runs in a subprocess without TRITON_INTERPRET: compiles the ops' kernels for each case and a probe kernel
# with a 32-bit offset multiply (the checker must flag it) and its int64 twin (which it must pass).
COMPILE_SCRIPT = r'''
import importlib.util, json, sys
import torch
from kernels.aot import aot_target, resources
from kernels.ops import jtok_gate as jg, jtok_m_mix as jm

out_path, probe_path, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location("offset_probe", probe_path)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
found = []
for i, (arch, D, dtype, ids_dtype) in enumerate(cases):
    dt, it = getattr(torch, dtype), getattr(torch, ids_dtype)
    N, V, n_e = 64, 50, 3
    with aot_target(arch) as records:
        m, tab, s = torch.randn(N, D).to(dt), torch.randn(V, D).to(dt), torch.randn(D).to(dt)
        ids = torch.randint(0, V, (N,)).to(it)
        variants = (False, True) if i == 0 else (True,)  # kernel variants: the first case compiles all
        for res in variants:
            out, saved = jg.jtok_gate_fwd(m, ids, tab, s, 1e-6, m if res else None)
        for sparse in variants:
            jg.jtok_gate_bwd(out, *saved, 1e-6, sparse_grad=sparse)
        tabs, w = torch.randn(n_e, V, D).to(dt), torch.rand(N, 2).to(dt)
        idx = torch.randint(0, n_e, (N, 2)).to(it)
        out, saved = jm.jtok_m_mix_fwd(ids, tabs, idx, w, s, 0.5, 1e-6)
        for sparse in variants:
            jm.jtok_m_mix_bwd(out, *saved, 0.5, 1e-6, sparse_grad=sparse)
        if i == 0:
            x = torch.empty(4, D)
            for kernel in (probe._i32_offsets_kernel, probe._i64_offsets_kernel):
                kernel.warmup(x, x, D, BLOCK_D=1024, grid=(4,))
            probe._sibling_loops_offsets_kernel.warmup(x, x, D, 2, BLOCK_D=1024, grid=(4,))
    seen = set()
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            found.append(dict(case=[arch, D, dtype, ids_dtype], name=r.name, status=r.status, error=r.error,
                              config=r.config, ttir=r.asm.get("ttir", ""), res=resources(r) if r.kernel else None))
json.dump(found, open(out_path, "w"))
'''

OFFSET_PROBE = '''
import triton
import triton.language as tl


@triton.jit
def _i32_offsets_kernel(x_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    row = tl.program_id(0) * D
    tl.store(out_ptr + row + cols, tl.load(x_ptr + row + cols, mask=cols < D), mask=cols < D)


@triton.jit
def _sibling_loops_offsets_kernel(x_ptr, out_ptr, D, K, BLOCK_D: tl.constexpr):
    # The same names in two sibling loops; only the first multiplies in 32 bits.
    cols = tl.arange(0, BLOCK_D)
    for k in range(K):
        row = (tl.program_id(0) * K + k) * D
        tl.store(out_ptr + row + cols, tl.load(x_ptr + row + cols, mask=cols < D), mask=cols < D)
    for k in range(K):
        row = (tl.program_id(0).to(tl.int64) * K + k) * D
        tl.store(out_ptr + row + cols, tl.load(x_ptr + row + cols, mask=cols < D), mask=cols < D)


@triton.jit
def _i64_offsets_kernel(x_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    row = tl.program_id(0).to(tl.int64) * D
    tl.store(out_ptr + row + cols, tl.load(x_ptr + row + cols, mask=cols < D), mask=cols < D)
'''

# (arch, d, dtype, ids dtype): rows per block 2 and 1, int32 and int64 ids, the widest tile; the sm_80
# bf16 d = 2048 backward of jtok_m_mix spilled 24 bytes when scale was kept live across the loop.
COMPILE_CASES = [(90, 768, "float32", "int32"), (80, 2048, "bfloat16", "int64"), (90, 8192, "bfloat16", "int64")]
JTOK_KERNELS = {"_jtok_gate_fwd_kernel", "_jtok_gate_bwd_kernel", "_jtok_m_mix_fwd_kernel",
                "_jtok_m_mix_bwd_kernel", "_segment_sum_rows_kernel"}  # fmt: skip

_DEF = re.compile(r'^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*"?([\w.]+)"?(.*)$')
_VALUE = re.compile(r"%[\w$.-]+")
_ELEM = re.compile(r"(i\d+|f\d+|bf16)>?\s*$")


def ttir_defs(ttir: str) -> dict[int, tuple[str, list[int | None], str, str]]:
    """Line of each op of a TTIR module -> (op, the defining lines of its operands, element type of the
    result, line text). MLIR reuses value names across sibling regions (two `for k in range(K)` loops
    both define `%t`), so a use resolves to the innermost enclosing definition; block and kernel
    arguments resolve to None."""
    scopes: list[dict[str, int]] = [{}]
    defs = {}
    for i, raw in enumerate(ttir.splitlines()):
        line = raw[: raw.rfind(" loc(")] if " loc(" in raw else raw
        if line.strip().startswith("}"):
            scopes.pop()
        m = _DEF.match(line)
        if m is not None:
            name, op, rest = m.groups()
            operands, _, types = rest.rpartition(" : ")
            uses = [next((sc[v] for sc in reversed(scopes) if v in sc), None) for v in _VALUE.findall(operands)]
            elem = _ELEM.search(types)
            scopes[-1][name] = i
            defs[i] = (op, uses, elem.group(1) if elem else "", raw.strip())
        if line.strip().endswith("{"):
            scopes.append({})
    return defs


def offset_multiplies(ttir: str) -> dict[str, list[str]]:
    """The integer multiplies (and shifts) that feed a pointer offset (`tt.addptr`), by element type."""
    defs = ttir_defs(ttir)
    found: dict[str, list[str]] = {}
    for op, operands, _, _ in defs.values():
        if op != "tt.addptr":
            continue
        stack, seen = operands[1:2], set()
        while stack:
            v = stack.pop()
            if v is None or v in seen:  # block arguments (loop indices, kernel arguments) end the walk
                continue
            seen.add(v)
            vop, vargs, elem, line = defs[v]
            if vop == "tt.load":  # a loaded value (ids, permutation) is data; its own address is checked
                continue
            if vop in ("arith.muli", "arith.shli") and line not in found.get(elem, []):
                found.setdefault(elem, []).append(line)
            stack.extend(vargs)
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """Compile records of COMPILE_CASES (one subprocess: Triton must import without the interpreter)."""
    tmp = tmp_path_factory.mktemp("aot")
    (tmp / "probe.py").write_text(OFFSET_PROBE)
    (tmp / "compile.py").write_text(COMPILE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}  # fmt: skip
    cmd = [sys.executable, str(tmp / "compile.py"), str(tmp / "out.json"), str(tmp / "probe.py")]
    cmd.append(json.dumps(COMPILE_CASES))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def test_compiled_offset_checker_flags_a_32_bit_multiply(compiled):
    probes = {r["name"]: offset_multiplies(r["ttir"]) for r in compiled if "offsets_kernel" in r["name"]}
    assert set(probes) == {"_i32_offsets_kernel", "_i64_offsets_kernel", "_sibling_loops_offsets_kernel"}
    assert probes["_sibling_loops_offsets_kernel"].get("i32"), "the first of two sibling loops must be seen"
    assert probes["_i32_offsets_kernel"].get("i32") and not probes["_i32_offsets_kernel"].get("i64")
    assert probes["_i64_offsets_kernel"].get("i64") and not probes["_i64_offsets_kernel"].get("i32")


def test_compiled_pointer_offsets_are_int64(compiled):
    kernels = [r for r in compiled if r["name"] in JTOK_KERNELS]
    assert {r["name"] for r in kernels} == JTOK_KERNELS and all(r["status"] == "ok" for r in kernels)
    for r in kernels:
        muls = offset_multiplies(r["ttir"])
        assert not muls.get("i32"), f"{r['name']} {r['case']}: 32-bit offset multiplies {muls['i32']}"
        assert muls.get("i64"), f"{r['name']} {r['case']}: no offset multiply found (is the checker blind?)"


def test_compiled_kernels_do_not_spill(compiled):
    for r in compiled:
        if r["name"] in JTOK_KERNELS:
            res = r["res"]
            assert res["spill_stores"] == res["spill_loads"] == res["local"] == 0, f"{r['name']} {r['case']}: {res}"
