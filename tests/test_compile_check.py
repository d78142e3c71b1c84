"""`kernels.compile_check`: every Triton kernel compiles for sm_90 without a GPU, and spills,
shared-memory overflows and autotune-skipped configs are reported as such.

pytest runs with TRITON_INTERPRET=1 (conftest), under which Triton never compiles, so each check runs
in a subprocess; the CLI re-executes itself without the variable (tested by leaving it set).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Forward and backward kernels of the three ops (the segment sum is the JTok ops' table gradient).
EXPECTED_KERNELS = {
    "_jtok_gate_fwd_kernel", "_jtok_gate_bwd_kernel", "_segment_sum_rows_kernel",
    "_jtok_m_mix_fwd_kernel", "_jtok_m_mix_bwd_kernel",
    "_moe_up_kernel", "_moe_down_kernel", "_moe_dh_kernel", "_moe_wgrad_kernel", "_moe_combine_kernel",
}  # fmt: skip


def _env(interpret: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _run(args: list[str], interpret: bool = False, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(interpret) | env, capture_output=True, text=True, timeout=600,
        check=False,
    )


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """`python -m kernels.compile_check --fast` with TRITON_INTERPRET=1 left set: (process, table rows)."""
    out = tmp_path_factory.mktemp("compile_check") / "fast"
    proc = _run(["-m", "kernels.compile_check", "--fast", "--out", str(out)], interpret=True)
    assert out.with_suffix(".md").read_text().startswith("# compile check:"), proc.stderr[-3000:]
    rows = _read(out.with_suffix(".csv"))
    summary = _read(out.with_name("fast_summary.csv"))
    # the summary keeps each kernel variant's worst row over shapes and configs
    for s in summary:
        group = [r for r in rows if r["kernel"] == s["kernel"] and all(v in r["config"].split() for v in s["variant"].split())]
        assert int(s["rows"]) == len(group) and int(s["max_regs"]) == max(int(r["regs"]) for r in group), s
    assert {s["kernel"] for s in summary} == {r["kernel"] for r in rows}
    return proc, rows


def test_fast_subset_compiles_every_kernel(fast_run):
    proc, rows = fast_run
    assert EXPECTED_KERNELS <= {r["kernel"] for r in rows}, {r["kernel"] for r in rows}
    assert {r["arch"] for r in rows} == {"sm_90"} and {r["dtype"] for r in rows} == {"bfloat16"}
    assert not [r for r in rows if r["status"] == "failed"], proc.stdout[-3000:]
    compiled = [r for r in rows if r["status"] in ("ok", "spill")]
    assert all(r["status"].startswith("skipped-by-autotune") for r in rows if r not in compiled)
    assert all(0 < int(r["regs"]) <= 255 and 0 <= int(r["shared"]) <= 232448 for r in compiled)
    # both gradient contracts of both JTok ops: dense (BY_RANK=False) and row-sparse (BY_RANK=True)
    for op in ("jtok_gate", "jtok_m_mix"):
        seg = [r for r in rows if r["op"] == op and r["kernel"] == "_segment_sum_rows_kernel"]
        assert {"dense" in r["shape"] for r in seg} == {True, False}
        assert {"BY_RANK=True" in r["config"] for r in seg} == {True, False}
    # the MoE GEMMs get GPU tiles (not the interpreter's BLOCK_M=16) for CPU tensors under aot_target
    assert all("BLOCK_M=16 " not in r["config"] for r in rows if r["kernel"] in ("_moe_up_kernel", "_moe_dh_kernel"))


def test_fast_subset_has_no_spills(fast_run):
    proc, rows = fast_run
    assert proc.returncode == 0, "\n".join(line for line in proc.stdout.splitlines() if line.startswith("FAIL"))
    assert all(int(r["spill_bytes"]) == 0 for r in rows if r["regs"])
    assert " 0 spilling > 0 B, 0 failed;" in proc.stdout


def test_spill_threshold_violation_fails_and_names_the_kernels():
    proc = _run(["-m", "kernels.compile_check", "--fast", "--ops", "jtok_gate", "--max-spill-bytes", "-1"])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    for name in ("_jtok_gate_fwd_kernel", "_jtok_gate_bwd_kernel", "_segment_sum_rows_kernel"):
        assert any(name in line and ": spill " in line for line in fails), fails


BAD_KERNELS = """
import json
import torch
import triton
import triton.language as tl
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from kernels.compile_check import Case, bad_rows, check_case


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x / tl.sum(x * x, axis=0))  # 256 live values per thread: over 255 registers


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        a = tl.load(a_ptr + offs[:, None] * K + (k + ks)[None, :])
        b = tl.load(b_ptr + (k + ks)[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


# 8 stages of 128x64 + 64x128 bf16 tiles need 256 KiB of shared memory, over the H100's 227 KiB
_tuned_gemm_kernel = triton.autotune([triton.Config({"STAGES": 8}), triton.Config({"STAGES": 2})], key=[],
                                     cache_results=True)(_gemm_kernel)


def spill():
    x = torch.empty(8192)
    _spilling_kernel[(1,)](x, x, BLOCK=8192, num_warps=1)


def gemm(kernel, **stages):
    a = torch.empty(128, 4096, dtype=torch.bfloat16)
    kernel[(1,)](a, a, a, 4096, BLOCK=128, BLOCK_K=64, **stages)


active, run, disk_check = driver._active, JITFunction.run, Autotuner.check_disk_cache
rows = check_case(90, Case("spill", "float32", "-", spill), 0)
rows += check_case(90, Case("gemm", "bfloat16", "-", lambda: gemm(_gemm_kernel, STAGES=8)), 0)
rows += check_case(90, Case("tuned", "bfloat16", "-", lambda: gemm(_tuned_gemm_kernel)), 0)
# again: neither the in-memory choice nor timings on disk may spare the second check its compiles
rows += check_case(90, Case("again", "bfloat16", "-", lambda: gemm(_tuned_gemm_kernel)), 0)
# a tuner made inside the check must not write the stub's timings to disk either
made_inside = []
def tune_new():
    made_inside.append(triton.autotune([triton.Config({"STAGES": 3}), triton.Config({"STAGES": 2})], key=[],
                                       cache_results=True)(_gemm_kernel))
    gemm(made_inside[-1])
rows += check_case(90, Case("inside", "bfloat16", "-", tune_new), 0)
restored = not made_inside[-1].cache and "do_bench" not in made_inside[-1].__dict__
restored = restored and driver._active is active and JITFunction.run is run and _tuned_gemm_kernel.cache_results
restored = restored and Autotuner.check_disk_cache is disk_check
print(json.dumps(dict(rows=rows, bad=[r["op"] for r in bad_rows(rows)], restored=restored)))
"""


def test_spills_shared_memory_overflow_and_autotune_skips_are_reported(tmp_path):
    script = tmp_path / "bad_kernels.py"
    script.write_text(textwrap.dedent(BAD_KERNELS))
    proc = _run([str(script)], TRITON_CACHE_DIR=str(tmp_path / "triton"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "triton").rglob("*.autotune.json"))  # no stub timing reaches the disk cache
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {(r["op"], r["config"].split(" num_warps")[0]): r for r in result["rows"]}
    spill = rows["spill", "BLOCK=8192"]
    assert spill["status"] == "spill" and int(spill["spill_bytes"]) > 0 and spill["kernel"] == "_spilling_kernel"
    failed = rows["gemm", "BLOCK=128 BLOCK_K=64 STAGES=8"]
    assert failed["status"] == "failed" and "OutOfResources" in failed["note"] and "shared memory" in failed["note"]
    assert rows["tuned", "BLOCK=128 BLOCK_K=64 STAGES=8"]["status"] == "skipped-by-autotune: OutOfResources"
    assert rows["tuned", "BLOCK=128 BLOCK_K=64 STAGES=2"]["status"] == "ok"
    assert rows["again", "BLOCK=128 BLOCK_K=64 STAGES=8"]["status"] == "skipped-by-autotune: OutOfResources"
    assert sorted(result["bad"]) == ["gemm", "spill"]
    assert result["restored"]


def test_aot_target_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("this process compiles Triton kernels (TRITON_INTERPRET unset)")
    from kernels.aot import aot_target

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), aot_target(90):
        pass
