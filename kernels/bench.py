"""Time and peak memory of the Triton kernels vs the PyTorch references: `python -m kernels.bench`.

Per op (jtok_gate, jtok_m_mix, moe_experts) and mode (forward, backward, full = forward +
backward), prints a table and writes it to a CSV (atomically). On CUDA both implementations are
timed with `triton.testing.do_bench` and peak memory is `torch.cuda.max_memory_allocated` above
the inputs. On CPU only the reference is a performance number (torch.utils.benchmark; peak memory
from torch's MemTracker); the Triton rows need a GPU, and unless `--no-interpret` the kernels are
also run once through the Triton interpreter at a tiny size, labelled as a correctness smoke run;
on CUDA the same fp32 check of the compiled kernels is a `triton-check` row. The MoE also gets
a `torch-grouped-mm` row: the same experts on PyTorch's grouped GEMM (`torch._grouped_mm`).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.reference import expert_counts

FIELDS = ["op", "mode", "impl", "device", "dtype", "tokens", "d", "ms", "peak_mib", "note"]
MODES = ("forward", "backward", "full")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="N, tokens per call (batch x sequence)")
    p.add_argument("--d", type=int, default=512, help="hidden size")
    p.add_argument("--vocab", type=int, default=8192, help="V, rows per table")
    p.add_argument("--tables", type=int, default=5, help="n_e, JTok-M tables per layer")
    p.add_argument("--topk", type=int, default=2, help="K: JTok-M tables and MoE experts per token")
    p.add_argument("--experts", type=int, default=8, help="E, routed experts")
    p.add_argument("--hidden", type=int, default=None, help="F, expert hidden size (default d)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--ops", default="jtok_gate,jtok_m_mix,moe_experts")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per row on CPU")
    p.add_argument("--no-interpret", action="store_true", help="on CPU, skip the tiny interpreter run")
    p.add_argument("--out", default="bench_results/kernels.csv")
    return p.parse_args(argv)


def zipf_ids(n: int, vocab: int, device) -> torch.Tensor:
    """Token ids with p(rank r) ~ 1/r, like natural text."""
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True).to(device)


def make_case(op: str, a: argparse.Namespace, N: int, D: int, device, dtype) -> tuple[tuple, list[torch.Tensor]]:
    """(args of the op, the leaves that get gradients)."""
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    ids = zipf_ids(N, a.vocab, device)
    if op == "jtok_gate":
        m, h, table, s = leaf(torch.randn(N, D)), leaf(torch.randn(N, D)), leaf(torch.randn(a.vocab, D)), leaf(torch.ones(D))
        return (m, ids, table, s, 1e-6, h), [m, table, s, h]
    if op == "jtok_m_mix":
        K = min(a.topk, a.tables)
        tables, s = leaf(torch.randn(a.tables, a.vocab, D)), leaf(torch.ones(D))
        idx = torch.rand(N, a.tables).argsort(-1)[:, :K].to(device)
        w = leaf(torch.softmax(torch.randn(N, K), -1))
        return (ids, tables, idx, w, s, 1.0 / math.sqrt(24), 1e-6), [tables, w, s]
    E, K, F = a.experts, min(a.topk, a.experts), a.hidden or D
    x = leaf(torch.randn(N, D))
    wg, wu = leaf(torch.randn(E, D, F) / D**0.5), leaf(torch.randn(E, D, F) / D**0.5)
    wd = leaf(torch.randn(E, F, D) / F**0.5)
    idx = torch.rand(N, E).argsort(-1)[:, :K].to(device)
    w = leaf(torch.softmax(torch.randn(N, K), -1))
    return (x, idx, w, wg, wu, wd), [x, w, wg, wu, wd]


def moe_experts_grouped_mm(x_ND, topk_idx_NK, topk_w_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """`reference.moe_experts` with PyTorch's grouped GEMM (`torch._grouped_mm`): the baseline the
    Triton MoE must beat. Slots are sorted by expert, x rows gathered into one copy, three grouped
    GEMMs, then each slot's output is weighted and summed per token. bf16 needs d and F multiples of 8."""
    N, K = topk_idx_NK.shape
    E = w_gate_EDF.shape[0]
    flat_S = topk_idx_NK.reshape(-1).to(torch.int64)
    perm_S = torch.sort(flat_S, stable=True).indices
    counts_E = expert_counts(topk_idx_NK, E)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    xs_SD = x_ND[perm_S // K]
    h_SF = F.silu(torch._grouped_mm(xs_SD, w_gate_EDF, offs=offs_E)) * torch._grouped_mm(xs_SD, w_up_EDF, offs=offs_E)
    ys_SD = torch._grouped_mm(h_SF, w_down_EFD, offs=offs_E)
    y_SD = torch.empty_like(ys_SD).index_copy(0, perm_S, ys_SD)
    return (y_SD.view(N, K, -1) * topk_w_NK.to(y_SD.dtype)[..., None]).sum(1)


def mode_fn(fn: Callable, args: tuple, leaves: list[torch.Tensor], mode: str) -> Callable[[], None]:
    """A closure running one mode; backward reuses one forward graph (retain_graph)."""
    if mode == "forward":
        return lambda: fn(*args)
    if mode == "backward":
        out = fn(*args)
        g = torch.randn_like(out)
        return lambda: out.backward(g, retain_graph=True)
    g = torch.randn_like(fn(*args))
    return lambda: fn(*args).backward(g)


def time_ms(run: Callable[[], None], device, min_time: float) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(run, warmup=25, rep=100))
    from torch.utils import benchmark

    return benchmark.Timer(stmt="run()", globals={"run": run}).blocked_autorange(min_run_time=min_time).median * 1e3


def peak_mib(run: Callable[[], None], device) -> float | None:
    """Peak memory allocated while `run` executes, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:  # private API (torch >= 2.5); memory is only a side column on CPU
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        with tracker:
            run()
        return tracker.get_tracker_snapshot("peak")[device]["Total"] / 2**20
    except Exception:  # noqa: BLE001
        return None


def bench_rows(a, impls: dict[str, Callable], op: str, N: int, D: int, device, dtype, note: str, timed: bool) -> list[dict]:
    rows = []
    for mode in MODES:
        for impl, fn in impls.items():
            torch.manual_seed(0)
            args, leaves = make_case(op, a, N, D, device, dtype)
            run = mode_fn(fn, args, leaves, mode)
            run()  # warm-up / compile
            ms = time_ms(run, device, a.min_time) if timed else float("nan")
            for t in leaves:
                t.grad = None
            mem = peak_mib(mode_fn(fn, args, leaves, mode), device) if timed else None
            rows.append(dict(op=op, mode=mode, impl=impl, device=device.type, dtype=str(dtype).replace("torch.", ""),
                             tokens=N, d=D, ms=f"{ms:.3f}", peak_mib="" if mem is None else f"{mem:.1f}", note=note))
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)


def print_table(rows: list[dict]) -> None:
    cols = ["op", "mode", "impl", "device", "dtype", "tokens", "d", "ms", "peak_mib", "note"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main(argv=None) -> int:
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    interpret = not cuda and not a.no_interpret
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton's first import, which `import kernels` (run by
        # `python -m kernels.bench`) has already done: start again with it on.
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "kernels.bench", *(sys.argv[1:] if argv is None else argv)])
    from kernels import reference

    try:
        from kernels.ops import OPS
    except ImportError as exc:
        OPS = {}
        print(f"triton unavailable ({exc}): reference rows only", file=sys.stderr)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    rows: list[dict] = []
    for op in ops:
        impls = {"reference": getattr(reference, op)}
        if op == "moe_experts" and hasattr(torch, "_grouped_mm"):
            impls["torch-grouped-mm"] = moe_experts_grouped_mm
        if cuda and op in OPS:
            impls["triton"] = OPS[op]
        rows += bench_rows(a, impls, op, a.tokens, a.d, device, dtype, "", timed=True)
        if not cuda:
            rows += [dict(op=op, mode=m, impl="triton", device="cpu", dtype=str(dtype).replace("torch.", ""),
                          tokens=a.tokens, d=a.d, ms="", peak_mib="", note="needs a GPU") for m in MODES]
        if (interpret or cuda) and op in OPS:
            small = argparse.Namespace(**{**vars(a), "vocab": 64, "experts": min(a.experts, 4), "hidden": 48})
            ok = _matches_reference(op, OPS[op], getattr(reference, op), small, device)
            impl, note = ("triton-check", "fp32 check of the compiled kernel") if cuda else (
                "triton-interpreter", "interpreter smoke run, not a performance number")
            rows += [dict(op=op, mode="full", impl=impl, device=device.type, dtype="float32", tokens=64, d=48,
                          ms="", peak_mib="", note=f"{note}; matches reference: {ok}")]
    print_table(rows)
    write_csv(rows, a.out)
    print(f"\nwrote {a.out}")
    if not cuda:
        print("Triton rows need a GPU: run `python -m kernels.bench` on a CUDA machine for kernel timings.")
    return 0


def _matches_reference(op: str, fn: Callable, ref: Callable, a: argparse.Namespace, device) -> bool:
    """One fp32 forward + backward of the kernel at a tiny size (N=64, d=48), compared with the reference."""
    torch.manual_seed(0)
    args, leaves = make_case(op, a, 64, 48, device, torch.float32)
    got, want = fn(*args), ref(*args)
    g = torch.randn_like(want)
    ok = torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    for x, y in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        ok &= torch.allclose(x, y, atol=1e-4, rtol=1e-4)
    return bool(ok)


if __name__ == "__main__":
    sys.exit(main())
