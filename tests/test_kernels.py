"""The Triton kernels against `kernels.reference`, run through the Triton interpreter on CPU.

Every forward output and every gradient (torch.autograd.grad with a random upstream gradient) is
compared in float32 with explicit tolerances, over odd shapes, repeated ids, K = 1 and K = n_e,
empty and overloaded experts; then a tiny model trains for 3 steps through the boundary with
`JTOK_KERNELS=triton` and with `JTOK_KERNELS=reference` and must give the same losses.
"""

from __future__ import annotations

import os

# Triton decides at decoration time whether a function (its own `tl.sum`, `tl.sigmoid`, ... as
# well as ours) is compiled or interpreted, so this must be set before triton is first imported
# (tests/conftest.py sets it for the whole pytest process).
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tensor_asserts import ATOL, RTOL, assert_close  # noqa: E402

INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)

if INTERPRETED:
    from kernels.ops import OPS, dedup_rows, moe_routing  # noqa: E402
    from kernels.ops import jtok_gate as gate_mod  # noqa: E402
    from kernels.ops import moe_experts as moe_mod  # noqa: E402

    assert isinstance(gate_mod._jtok_gate_fwd_kernel, InterpretedFunction)


if not INTERPRETED:
    pytest.skip("these tests run the kernels under TRITON_INTERPRET=1 (set before triton is imported)",
                allow_module_level=True)


# ----------------------------------------------------------------------------- helpers


def compare_op(op: str, fn, args: tuple, grad_of: dict[str, torch.Tensor], atol=ATOL, rtol=RTOL, seed=0) -> None:
    """Run `fn(*args)` and `reference.<op>(*args)`, compare the output and the gradients of the
    named inputs under the same random upstream gradient."""
    names, leaves = list(grad_of), list(grad_of.values())
    got = fn(*args)
    want = getattr(reference, op)(*args)
    assert_close(f"{op} forward", got, want, atol, rtol)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed)).to(want.dtype)
    g_got = torch.autograd.grad(got, leaves, upstream, allow_unused=True)
    g_want = torch.autograd.grad(want, leaves, upstream, allow_unused=True)
    for name, a, b in zip(names, g_got, g_want):
        assert_close(f"{op} d{name}", a, b, atol, rtol)


def make_ids(kind: str, n: int, vocab: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    if kind == "uniform":
        ids = torch.randint(0, vocab, (n,), generator=gen)
    elif kind == "all_equal":
        ids = torch.full((n,), vocab // 2)
    elif kind == "zipf":  # p(rank r) ~ 1/r: a few ids take most of the slots
        p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
        ids = torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)
    else:
        raise ValueError(kind)
    return ids.to(dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


# ----------------------------------------------------------------------------- JTok gate


def gate_inputs(N, D, V, ids_kind, residual, noncontig=False, ids_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if noncontig:  # transposed views and a column slice
        m = leaf(torch.randn(D, N, generator=gen)).t()
        table = leaf(torch.randn(V, D + 3, generator=gen))[:, :D]
    else:
        m = leaf(torch.randn(N, D, generator=gen))
        table = leaf(torch.randn(V, D, generator=gen))
    scale = leaf(torch.randn(D, generator=gen))
    res = leaf(torch.randn(N, D, generator=gen)) if residual else None
    ids = make_ids(ids_kind, N, V, gen, ids_dtype)
    return m, ids, table, scale, res


@pytest.mark.parametrize(
    "N,D,V,ids_kind,residual,noncontig",
    [
        (37, 48, 11, "uniform", True, False),  # N not a multiple of the row block, d not a power of 2
        (37, 40, 11, "all_equal", False, False),
        (50, 48, 64, "zipf", True, False),
        (16, 32, 8, "uniform", False, False),  # exact blocks
        (23, 40, 13, "zipf", True, True),  # non-contiguous m, residual and table
        (5, 200, 7, "uniform", True, False),  # one row per program (BLOCK_D = 256)
    ],
)
def test_jtok_gate_matches_reference(N, D, V, ids_kind, residual, noncontig):
    m, ids, table, scale, res = gate_inputs(N, D, V, ids_kind, residual, noncontig)
    grad_of = {"m": m, "table": table, "scale": scale} | ({"residual": res} if residual else {})
    compare_op("jtok_gate", OPS["jtok_gate"], (m, ids, table, scale, 1e-6, res), grad_of)


def test_jtok_gate_int32_ids_and_zero_row():
    m, ids, table, scale, res = gate_inputs(29, 48, 9, "zipf", True, ids_dtype=torch.int32)
    with torch.no_grad():
        table[int(ids[0])] = 0.0  # ||u|| = 0: the unit vector is 0, its gradient 1/eps
    compare_op("jtok_gate", OPS["jtok_gate"], (m, ids, table, scale, 1e-6, res),
               {"m": m, "table": table, "scale": scale, "residual": res})


def test_jtok_gate_table_grad_is_dense_and_deterministic():
    m, ids, table, scale, _ = gate_inputs(40, 48, 30, "all_equal", False)
    out = OPS["jtok_gate"](m, ids, table, scale, 1e-6)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    g1 = torch.autograd.grad(out, table, up, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, table, up)[0]
    assert g1.shape == table.shape and g1.is_contiguous() and g1.layout == torch.strided
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[ids] = False
    # The gradient starts as torch.zeros and only the rows of ids are written: the others are exactly 0.0.
    assert bool((g1[untouched] == 0).all()) and bool((g1[~untouched] != 0).any())
    # The same backward on the same inputs twice: bit-identical because the segment sums add in a fixed order
    # (no atomics), which is the property under test.
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("op", ["jtok_gate", "jtok_m_mix"])
def test_bf16_elementwise_kernels_close_to_fp32(op):
    """bf16 storage, fp32 accumulation (the GEMM kernel is not checked in bf16: the interpreter's
    tl.dot is unreliable there)."""
    gen = torch.Generator().manual_seed(3)
    N, D, V = 21, 40, 9
    ids = make_ids("zipf", N, V, gen)
    scale = torch.randn(D, generator=gen)
    if op == "jtok_gate":
        m, table = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen)
        args = lambda dt: (m.to(dt), ids, table.to(dt), scale.to(dt), 1e-6, m.to(dt))  # noqa: E731
    else:
        tables = torch.randn(4, V, D, generator=gen)
        idx = torch.rand(N, 4, generator=gen).argsort(-1)[:, :2]
        w = torch.rand(N, 2, generator=gen)
        args = lambda dt: (ids, tables.to(dt), idx, w.to(dt), scale.to(dt), 0.5, 1e-6)  # noqa: E731
    got = OPS[op](*args(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    # bf16 rounds each input and the output by up to 2^-9 (~2e-3) relative, more where 1 + s*u cancels: the worst
    # element reaches ~1/4 of this bound.
    assert_close(f"{op} bf16", got.float(), getattr(reference, op)(*args(torch.float32)), atol=5e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- JTok-M mixture


def mix_inputs(N, D, V, n_e, K, ids_kind, route="random", noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables = leaf(torch.randn(n_e, V, D + (5 if noncontig else 0), generator=gen))
    tables_view = tables[..., :D] if noncontig else tables
    scale = leaf(torch.randn(D, generator=gen))
    ids = make_ids(ids_kind, N, V, gen)
    if route == "random":
        idx = torch.rand(N, n_e, generator=gen).argsort(-1)[:, :K]
    else:  # every token picks the same K tables
        idx = torch.arange(K).expand(N, K)
    w = torch.rand(N, K, generator=gen) + 0.1
    w = leaf(w / w.sum(-1, keepdim=True))
    if noncontig:
        idx, w = idx.t().contiguous().t(), leaf(w.t().contiguous()).t()
    return ids, tables, tables_view, idx, w, scale


@pytest.mark.parametrize(
    "N,D,V,n_e,K,ids_kind,route,noncontig",
    [
        (37, 48, 11, 5, 2, "uniform", "random", False),
        (37, 40, 11, 4, 1, "all_equal", "random", False),  # K = 1
        (37, 40, 11, 4, 4, "zipf", "random", False),  # K = n_e
        (33, 48, 9, 5, 2, "all_equal", "same", False),  # every slot hits the same 2 (table, id) rows
        (19, 40, 7, 3, 2, "zipf", "random", True),  # non-contiguous pool, idx and w
    ],
)
def test_jtok_m_mix_matches_reference(N, D, V, n_e, K, ids_kind, route, noncontig):
    ids, tables, tables_view, idx, w, scale = mix_inputs(N, D, V, n_e, K, ids_kind, route, noncontig)
    alpha = 1.0 / math.sqrt(2 * 3)
    compare_op("jtok_m_mix", OPS["jtok_m_mix"], (ids, tables_view, idx, w, scale, alpha, 1e-6),
               {"tables": tables, "w": w, "scale": scale})


# ----------------------------------------------------------------------------- MoE experts


def moe_inputs(N, D, F, E, K, routing, noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = leaf(torch.randn(D, N, generator=gen)).t() if noncontig else leaf(torch.randn(N, D, generator=gen))
    w_gate = leaf(torch.randn(E, D, F, generator=gen) / math.sqrt(D))
    w_up = leaf(torch.randn(E, D, F, generator=gen) / math.sqrt(D))
    w_down = leaf(torch.randn(E, F, D, generator=gen) / math.sqrt(F))
    if routing == "random":
        idx = torch.rand(N, E, generator=gen).argsort(-1)[:, :K]
    elif routing == "expert0_empty":  # expert 0 gets no token
        idx = 1 + torch.rand(N, E - 1, generator=gen).argsort(-1)[:, :K]
    elif routing == "one_expert":  # every token's only expert is 2
        assert K == 1
        idx = torch.full((N, 1), 2)
    else:
        raise ValueError(routing)
    w = torch.rand(N, K, generator=gen) + 0.1
    return x, idx, leaf(w / w.sum(-1, keepdim=True)), w_gate, w_up, w_down


@pytest.mark.parametrize(
    "N,D,F,E,K,routing,noncontig",
    [
        (13, 48, 42, 4, 2, "random", False),
        (13, 48, 72, 4, 4, "random", False),  # K = E; F spans two column tiles
        (21, 40, 20, 5, 1, "expert0_empty", False),  # K = 1, an expert without tokens
        (17, 32, 40, 4, 1, "one_expert", False),  # all tokens on one expert, the others empty
        (40, 48, 42, 3, 2, "random", False),  # several row tiles per expert
        (11, 40, 24, 4, 2, "expert0_empty", True),  # non-contiguous x
    ],
)
def test_moe_experts_matches_reference(N, D, F, E, K, routing, noncontig):
    x, idx, w, w_gate, w_up, w_down = moe_inputs(N, D, F, E, K, routing, noncontig)
    compare_op("moe_experts", OPS["moe_experts"], (x, idx, w, w_gate, w_up, w_down),
               {"x": x, "w": w, "w_gate": w_gate, "w_up": w_up, "w_down": w_down})


def test_moe_empty_experts_get_zero_gradients():
    x, idx, w, w_gate, w_up, w_down = moe_inputs(17, 32, 40, 4, 1, "one_expert")
    out = OPS["moe_experts"](x, idx, w, w_gate, w_up, w_down)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (w_gate, w_up, w_down), up)
    for g in grads:
        assert g is not None and torch.isfinite(g).all()
        # An expert without rows stores its zero-initialised accumulator: exactly 0.0, no arithmetic involved.
        assert bool((g[[0, 1, 3]] == 0).all()) and bool((g[2] != 0).any())


def test_moe_routing_metadata():
    idx = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 2], [2, 0]])
    r = moe_routing.moe_routing(idx, n_experts=5, block_m=2)
    flat = idx.reshape(-1)
    assert r.counts_E.tolist() == torch.bincount(flat, minlength=5).tolist() == [3, 0, 5, 2, 0]
    assert r.offsets_E.tolist() == [0, 3, 3, 8, 10]
    assert r.tile_end_E.tolist() == [2, 2, 5, 6, 6]
    assert flat[r.perm_S].tolist() == sorted(flat.tolist())
    assert r.perm_S.tolist() == [1, 4, 9, 0, 2, 5, 7, 8, 3, 6]  # stable: slot order within an expert
    assert torch.equal(r.token_S, r.perm_S // 2)
    assert r.max_tiles >= int(r.tile_end_E[-1])


# ----------------------------------------------------------------------------- de-duplication


@pytest.mark.parametrize("scaled", [False, True])
def test_segment_sum_rows_matches_index_add(scaled):
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(70, 40, generator=gen)
    keys = make_ids("zipf", 140, 50, gen)  # two slots per source row
    scale = torch.rand(140, generator=gen) if scaled else None
    got = dedup_rows.segment_sum_rows(src, keys, 50, torch.float32, slot_scale_S=scale)
    rows = src.repeat_interleave(2, dim=0) * (scale[:, None] if scaled else 1.0)
    want = torch.zeros(50, 40).index_add_(0, keys, rows)
    assert_close("segment_sum_rows", got, want)


# ----------------------------------------------------------------------------- the tests can fail


def _perturbed_output(fn, eps=1e-3):
    def wrapped(*args):
        out = fn(*args)
        bump = torch.zeros_like(out)
        bump.view(-1)[out.numel() // 2] = eps
        return out + bump

    return wrapped


def test_comparison_detects_a_wrong_forward():
    m, ids, table, scale, res = gate_inputs(37, 48, 11, "uniform", True)
    with pytest.raises(AssertionError, match="jtok_gate forward"):
        compare_op("jtok_gate", _perturbed_output(OPS["jtok_gate"]), (m, ids, table, scale, 1e-6, res),
                   {"m": m, "table": table, "scale": scale, "residual": res})


def test_comparison_detects_a_wrong_table_gradient(monkeypatch):
    real = gate_mod.segment_sum_rows

    def off_by_a_bit(*args, **kwargs):
        out = real(*args, **kwargs)
        out[out.abs().sum(-1).argmax(), 0] += 1e-3  # the most repeated row
        return out

    monkeypatch.setattr(gate_mod, "segment_sum_rows", off_by_a_bit)
    m, ids, table, scale, res = gate_inputs(37, 48, 11, "zipf", True)
    with pytest.raises(AssertionError, match="jtok_gate dtable"):
        compare_op("jtok_gate", OPS["jtok_gate"], (m, ids, table, scale, 1e-6, res),
                   {"m": m, "table": table, "scale": scale, "residual": res})


def test_comparison_detects_a_wrong_router_weight_gradient(monkeypatch):
    real_backward = moe_mod.MoEExpertsFunction.backward

    def backward(ctx, grad):
        dx, didx, dw, *rest = real_backward(ctx, grad)
        return (dx, didx, dw * (1 + 1e-3), *rest)

    monkeypatch.setattr(moe_mod.MoEExpertsFunction, "backward", staticmethod(backward))
    x, idx, w, w_gate, w_up, w_down = moe_inputs(13, 48, 42, 4, 2, "random")
    with pytest.raises(AssertionError, match="moe_experts dw"):
        compare_op("moe_experts", OPS["moe_experts"], (x, idx, w, w_gate, w_up, w_down),
                   {"x": x, "w": w, "w_gate": w_gate, "w_up": w_up, "w_down": w_down})


# ----------------------------------------------------------------------------- through the boundary


def test_boundary_keeps_its_functions_and_registers_all_ops():
    assert set(OPS) == {"jtok_gate", "jtok_m_mix", "moe_experts"}
    for op in OPS:
        assert callable(getattr(kernels, op)) and getattr(kernels, op).__module__ == "kernels"
        assert kernels._TRITON_OPS[op] is OPS[op]


def _train_losses(variant: str, steps: int = 3) -> list[float]:
    from project.config import ModelConfig
    from project.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(variant=variant, vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                     max_seq_len=16, n_routed_experts=4, moe_top_k=2))
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Zipf-like ids so that rows repeat within the batch
    ids = make_ids("zipf", 2 * 9, 64, torch.Generator().manual_seed(1)).view(2, 9)
    losses = []
    for _ in range(steps):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), ids[:, 1:].reshape(-1)) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", ["jtok", "jtok_m", "moe", "moe_jtok_m"])
def test_model_trains_the_same_with_triton_kernels(variant, monkeypatch):
    monkeypatch.setattr(kernels, "_BACKEND", "reference")
    want = _train_losses(variant)
    monkeypatch.setattr(kernels, "_BACKEND", "triton")
    calls = {op: 0 for op in OPS}
    for op, fn in list(kernels._TRITON_OPS.items()):
        def counted(*args, _fn=fn, _op=op):
            calls[_op] += 1
            return _fn(*args)

        monkeypatch.setitem(kernels._TRITON_OPS, op, counted)
    got = _train_losses(variant)
    used = {"jtok": "jtok_gate", "jtok_m": "jtok_m_mix", "moe": "moe_experts", "moe_jtok_m": "jtok_m_mix"}[variant]
    assert calls[used] == 3 * 2  # steps x layers: the Triton path really ran
    if variant == "moe_jtok_m":
        assert calls["moe_experts"] == 6
    # Kernel and reference differ by round-off only; it reaches <= ~5e-7 in the losses over these 3 steps (AVX2
    # and ATEN_CPU_CAPABILITY=default), so abs=1e-4 leaves a ~200x margin.
    assert got == pytest.approx(want, abs=1e-4), (got, want)


# ----------------------------------------------------------------------------- benchmark


def test_bench_writes_the_table(tmp_path, capsys):
    import csv

    from kernels import bench

    out = tmp_path / "k.csv"
    assert bench.main(["--tokens", "64", "--d", "40", "--vocab", "50", "--experts", "4", "--hidden", "24",
                       "--min-time", "0.01", "--no-interpret", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["mode"], r["impl"]) for r in rows} >= {
        (op, mode, "reference") for op in OPS for mode in ("forward", "backward", "full")
    }
    assert all(float(r["ms"]) > 0 for r in rows if r["impl"] in ("reference", "torch-grouped-mm"))
    assert {r["mode"] for r in rows if r["impl"] == "torch-grouped-mm"} == {"forward", "backward", "full"}
    assert "needs a GPU" in capsys.readouterr().out


def test_grouped_mm_moe_baseline_of_the_benchmark_matches_the_reference():
    """The benchmark's `torch._grouped_mm` MoE computes the same function, forward and every gradient
    (fp32 on CPU; expert 3 gets no token, so its weights' gradient must be exactly zero)."""
    from kernels import bench

    torch.manual_seed(0)
    N, D, F, E, K = 23, 16, 24, 4, 2
    idx = torch.stack([torch.randint(0, 3, (N,)), torch.full((N,), 0)], 1)
    idx[:, 1] = (idx[:, 0] + 1) % 3
    leaves = [torch.randn(N, D), torch.softmax(torch.randn(N, K), -1), torch.randn(E, D, F) / 4,
              torch.randn(E, D, F) / 4, torch.randn(E, F, D) / 5]
    leaves = [t.requires_grad_(True) for t in leaves]
    x, w, wg, wu, wd = leaves
    got, want = bench.moe_experts_grouped_mm(x, idx, w, wg, wu, wd), reference.moe_experts(x, idx, w, wg, wu, wd)
    assert_close("out", got, want)
    g = torch.randn_like(want)
    names = ["dx", "dw", "dWg", "dWu", "dWd"]
    for name, a, b in zip(names, torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert_close(name, a, b)
    assert torch.autograd.grad(bench.moe_experts_grouped_mm(x, idx, w, wg, wu, wd), wg, g)[0][3].abs().max() == 0
