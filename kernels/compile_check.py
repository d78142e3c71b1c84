"""`python -m kernels.compile_check`: compile every Triton kernel of the project for sm_90 / sm_80 on a
machine without a GPU and report registers, spills and shared memory per kernel, shape and config.

The kernels are driven through the real op functions (`kernels.ops.*`, forward then backward, with
CPU tensors) inside `kernels.aot.aot_target`, so exactly the grids, constexprs and autotune configs
production launches are compiled; nothing runs (outputs are uninitialised). Resource numbers come from
`cuobjdump -res-usage` on the cubin (REG, STACK) and `ptxas -v` on the PTX (spill stores / loads);
`shared` is Triton's dynamic shared memory per block (checked against the target's opt-in maximum);
`binary` is the start of Triton's kernel hash: d, F and V are runtime integers, so shapes that agree in
their divisibility by 16 share one binary.

Spill rule: a kernel fails when spill stores + spill loads (bytes, `ptxas -v`) > --max-spill-bytes
(default 0). The exit status is 1 on any compile failure, host-code failure or spill above the
threshold; configs `triton.autotune` dropped (OutOfResources, PTXASError) are listed, not failures.

Shapes: tokens N=4096; d in {768, 2048, 4096, 8192}; JTok-M n_e in {5, 16}, K=2; MoE E=8 (top-2,
F = the project's default expert width (8/3 d rounded up to 64) // 3) and E=64 (top-6, F = 11 d / 16,
i.e. 1408 at d=2048). V (default 4096) only enters kernels as runtime integers (Triton specialises
them by divisibility by 16 and i32 width, the same for production vocabularies up to V d < 2^31); a
small V keeps the ops' zero-filled dense table gradients small. Dtypes: float32 (everything fp32) and
bfloat16 (JTok: m and residual bf16, tables and scale fp32; JTok-M: bf16 tables as under FSDP mixed
precision; MoE: x, weights and routing weights bf16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.aot import CompileRecord, aot_target, capture_launches, resources  # noqa: F401  (public API)

DS = (768, 2048, 4096, 8192)
OPS = ("jtok_gate", "jtok_m_mix", "moe_experts")
FIELDS = [
    "arch",
    "dtype",
    "op",
    "shape",
    "kernel",
    "config",
    "regs",
    "spill_bytes",
    "stack",
    "shared",
    "status",
    "binary",
    "note",
]


@dataclass
class Case:
    """One op call at one shape: `run()` calls it forward and backward (kernels compile, nothing runs)."""

    op: str
    dtype: str
    shape: str
    run: Callable[[], None]


def round_up(x: float, m: int) -> int:
    return -(-int(x) // m) * m


def moe_hidden(d: int, experts: int) -> tuple[int, int]:
    """(top_k, F) of the MoE shapes: E=8 the project's default width, E=64 fine-grained (1408 at d=2048)."""
    if experts == 8:
        return 2, round_up(8 * d / 3, 64) // 3
    return 6, d * 11 // 16


def _backward(out: torch.Tensor) -> None:
    out.backward(torch.empty_like(out))


def jtok_gate_case(d: int, dtype: torch.dtype, sparse: bool, N: int, V: int) -> Callable[[], None]:
    def run():
        from kernels.ops.jtok_gate import jtok_gate

        leaf = {"dtype": dtype, "requires_grad": True}
        m, res = torch.empty(N, d, **leaf), torch.empty(N, d, **leaf)
        table = torch.empty(V, d, dtype=torch.float32, requires_grad=True)
        scale = torch.empty(d, dtype=torch.float32, requires_grad=True)
        _backward(jtok_gate(m, torch.randint(0, V, (N,)), table, scale, 1e-6, res, sparse))

    return run


def jtok_m_mix_case(
    d: int, dtype: torch.dtype, sparse: bool, n_e: int, N: int, V: int, K: int = 2
) -> Callable[[], None]:
    def run():
        from kernels.ops.jtok_m_mix import jtok_m_mix

        tables = torch.empty(n_e, V, d, dtype=dtype, requires_grad=True)
        scale = torch.empty(d, dtype=dtype, requires_grad=True)
        idx = torch.rand(N, n_e).topk(K, dim=-1).indices
        w = torch.rand(N, K).to(dtype).requires_grad_()
        _backward(jtok_m_mix(torch.randint(0, V, (N,)), tables, idx, w, scale, 0.1, 1e-6, sparse))

    return run


def moe_case(d: int, dtype: torch.dtype, experts: int, N: int) -> Callable[[], None]:
    def run():
        from kernels.ops.moe_experts import moe_experts

        K, F = moe_hidden(d, experts)
        leaf = {"dtype": dtype, "requires_grad": True}
        x = torch.empty(N, d, **leaf)
        w_gate, w_up, w_down = (
            torch.empty(experts, d, F, **leaf),
            torch.empty(experts, d, F, **leaf),
            torch.empty(experts, F, d, **leaf),
        )
        idx = torch.rand(N, experts).topk(K, dim=-1).indices
        w = torch.rand(N, K).to(dtype).requires_grad_()
        _backward(moe_experts(x, idx, w, w_gate, w_up, w_down))

    return run


def cases(ops, dtypes, ds, tables, experts, N: int, V: int) -> list[Case]:
    """Every (op, dtype, shape) to compile; both gradient contracts of the JTok ops."""
    out = []
    for dt in dtypes:
        dtype = getattr(torch, dt)
        for d in ds:
            if "jtok_gate" in ops:
                for sp in (False, True):
                    shape = f"d={d} {'sparse' if sp else 'dense'}"
                    out.append(Case("jtok_gate", dt, shape, jtok_gate_case(d, dtype, sp, N, V)))
            if "jtok_m_mix" in ops:
                for n_e in tables:
                    for sp in (False, True):
                        shape = f"d={d} n_e={n_e} K=2 {'sparse' if sp else 'dense'}"
                        out.append(Case("jtok_m_mix", dt, shape, jtok_m_mix_case(d, dtype, sp, n_e, N, V)))
            if "moe_experts" in ops:
                for E in experts:
                    K, F = moe_hidden(d, E)
                    out.append(Case("moe_experts", dt, f"d={d} E={E} K={K} F={F}", moe_case(d, dtype, E, N)))
    return out


def config_str(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def base_row(arch: int, case: Case, kernel: str, **fields) -> dict:
    """A table row with every field present (empty unless given)."""
    row = dict.fromkeys(FIELDS, "")
    return (
        row | {"arch": f"sm_{arch}", "dtype": case.dtype, "op": case.op, "shape": case.shape, "kernel": kernel} | fields
    )


def row_of(rec: CompileRecord, arch: int, case: Case, max_spill: int) -> dict:
    """One table row: resources of a compiled kernel, or why it has none."""
    binary = rec.kernel.hash[:10] if rec.kernel is not None else ""
    row = base_row(
        arch, case, rec.name, config=config_str(rec.config), status=rec.status, binary=binary, note=rec.error
    )
    if rec.status == "skipped":
        row["status"] = f"skipped-by-autotune: {rec.error.split(':')[0]}"
    if rec.kernel is None:
        return row
    try:
        usage = resources(rec)
    except Exception as err:  # noqa: BLE001  (a cubin or ptx the tools cannot read fails the check)
        row.update(status="failed", note=f"resource usage: {type(err).__name__}: {err}"[:300])
        return row
    spill = usage["spill_stores"] + usage["spill_loads"]
    row.update(regs=usage["regs"], spill_bytes=spill, stack=usage["stack"], shared=rec.shared)
    if rec.status == "ok" and spill > max_spill:
        row.update(
            status="spill",
            note=f"{usage['spill_stores']} B spill stores + {usage['spill_loads']} B spill loads > {max_spill}",
        )
    return row


def check_case(arch: int, case: Case, max_spill: int) -> list[dict]:
    """Compile one case for sm_<arch>: a row per distinct compiled kernel (and one if host code failed)."""
    error = None
    with aot_target(arch) as records:
        try:
            case.run()
        except Exception as err:  # noqa: BLE001  (any host-code failure is a row of the report)
            error = err
    rows, seen = [], set()
    for rec in records:
        if rec.key not in seen:
            seen.add(rec.key)
            rows.append(row_of(rec, arch, case, max_spill))
    if error is not None and not any(r["status"] == "failed" for r in rows):
        note = f"{type(error).__name__}: {error}"[:300]
        rows.append(base_row(arch, case, "(host code)", status="failed", note=note))
    return rows


def check(archs, all_cases: list[Case], max_spill: int = 0, progress: bool = True) -> list[dict]:
    """All rows for all archs and cases; progress on stderr."""
    from tqdm import tqdm

    rows = []
    jobs = [(a, c) for a in archs for c in all_cases]
    bar = tqdm(jobs, file=sys.stderr, disable=not progress, unit="case")
    for arch, case in bar:
        bar.set_description(f"sm_{arch} {case.dtype} {case.op} {case.shape}")
        rows += check_case(arch, case, max_spill)
    return rows


def bad_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] in ("failed", "spill")]


SUMMARY_FIELDS = ["arch", "dtype", "kernel", "variant", "rows", "configs", "max_regs", "max_spill_bytes", "max_shared",
                  "statuses"]  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (arch, dtype, kernel, variant) over every shape and autotune config: the worst
    registers, spill bytes and shared memory. The variant is the kernel's boolean constexprs (e.g.
    DUAL, BY_RANK) except IEEE, which the dtype decides."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        flags = [kv for kv in r["config"].split() if kv.endswith(("=True", "=False")) and not kv.startswith("IEEE=")]
        groups.setdefault((r["arch"], r["dtype"], r["kernel"], " ".join(flags)), []).append(r)
    out = []
    for (arch, dtype, kernel, variant), rs in groups.items():
        num = lambda f: max((int(r[f]) for r in rs if str(r[f]).lstrip("-").isdigit()), default=0)  # noqa: E731
        statuses = sorted({r["status"] for r in rs})
        out.append(dict(arch=arch, dtype=dtype, kernel=kernel, variant=variant, rows=len(rs),
                        configs=len({r["config"] for r in rs}), max_regs=num("regs"),
                        max_spill_bytes=num("spill_bytes"), max_shared=num("shared"), statuses=" ".join(statuses)))
    return out


def write_rows(rows: list[dict], out: Path, header: str) -> None:
    """`out` with suffix .csv and .md, both written atomically (`project.bench.write_table`)."""
    from project.bench import write_table

    write_table(rows, FIELDS, out.parent, out.with_suffix("").name, header)
    write_table(summarise(rows), SUMMARY_FIELDS, out.parent, out.with_suffix("").name + "_summary", header)


def print_rows(rows: list[dict]) -> None:
    widths = {f: max(len(f), *(len(str(r[f])) for r in rows)) for f in FIELDS if f != "note"}
    print("  ".join(f.ljust(widths[f]) for f in widths))
    for r in rows:
        print("  ".join(str(r[f]).ljust(widths[f]) for f in widths) + (f"  {r['note']}" if r["note"] else ""))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kernels.compile_check",
        description=__doc__.split("\n\n")[0],
        epilog="Spill rule: spill stores + spill loads bytes (ptxas -v) > --max-spill-bytes fails.",
    )
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[90, 80])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--d", type=int, nargs="+", default=list(DS))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--tables", type=int, nargs="+", default=[5, 16], help="JTok-M n_e")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], choices=[8, 64])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--fast", action="store_true", help="sm_90, bfloat16, d=2048, n_e=5, E=8 (the test suite's subset)")
    p.add_argument("--max-spill-bytes", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the table to OUT.csv and OUT.md (atomically)")
    args = p.parse_args(argv)
    if args.fast:
        args.arch, args.dtype, args.d, args.tables, args.experts = [90], ["bfloat16"], [2048], [5], [8]
    return args


def summary_line(rows: list[dict], max_spill: int, what: str, start: float) -> str:
    """Counts of compiled, distinct, skipped, spilling and failed kernels."""
    n_ok = sum(r["status"] in ("ok", "spill") for r in rows)
    n_skip = sum(r["status"].startswith("skipped") for r in rows)
    n_bin = len({r["binary"] for r in rows if r["binary"]})
    n_spill, n_fail = sum(r["status"] == "spill" for r in rows), sum(r["status"] == "failed" for r in rows)
    return (
        f"compile check: {len(rows)} kernel rows ({n_ok} compiled, {n_bin} distinct binaries, {n_skip} skipped by "
        f"autotune), {n_spill} spilling > {max_spill} B, {n_fail} failed; {what} in {time.time() - start:.0f} s"
    )


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Triton picks interpreter or compiler at import time: start again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "kernels.compile_check", *argv], env)
    args = parse_args(argv)
    start = time.time()
    all_cases = cases(args.ops, args.dtype, args.d, args.tables, args.experts, args.tokens, args.vocab)
    rows = check(args.arch, all_cases, args.max_spill_bytes)
    bad = bad_rows(rows)
    summary = summary_line(rows, args.max_spill_bytes, f"{len(all_cases)} cases x {len(args.arch)} archs", start)
    if args.out:
        write_rows(rows, args.out, f"# {summary}")
        print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('')}_summary.md")
    else:
        print_rows(rows)
    for r in bad:
        where = f"{r['arch']} {r['dtype']} {r['op']} [{r['shape']}] {r['kernel']} ({r['config']})"
        print(f"FAIL {where}: {r['status']} {r['note']}")
    print(summary)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
