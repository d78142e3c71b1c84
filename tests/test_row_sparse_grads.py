"""Row-sparse table gradients (`sparse_grad=True`) against the dense ones, for the reference and the Triton ops.

For JTok's gate (with and without the residual) and JTok-M's mixture, on both backends: the sparse gradient is a
coalesced COO tensor of the table's shape whose rows are exactly the touched rows (the non-zero rows of the dense
gradient), with the dense gradient's values; every other gradient is unchanged; the Triton values match the
reference's; the Triton backward allocates no table-sized buffer; and two sparse backwards accumulate in `.grad`.
The Triton ops run through the interpreter (TRITON_INTERPRET=1), in float32.
"""

from __future__ import annotations

import os

# Must be set before triton is first imported (tests/conftest.py sets it for the whole pytest process).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tensor_asserts import assert_close  # noqa: E402

INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)
if not INTERPRETED:
    pytest.skip("these tests run the kernels under TRITON_INTERPRET=1 (set before triton is imported)",
                allow_module_level=True)

from kernels.ops import OPS, dedup_rows  # noqa: E402

# Sparse vs dense on one backend: the same terms summed (Triton: by the same kernel in the same order, so in fact
# bit-identical; reference: index_add vs the index backward), so only a few ulp may separate them.
ATOL, RTOL = 1e-6, 1e-5
# Triton vs reference: different summation orders over O(1) terms, as in tests/test_kernels.py.
X_ATOL, X_RTOL = 1e-5, 1e-4
BACKENDS = ("reference", "triton")


def op_fn(op: str, backend: str):
    """The op of one backend, with the reference signature (sparse_grad last)."""
    return getattr(reference, op) if backend == "reference" else OPS[op]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def make_ids(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """`repeat`: uniform over a vocabulary much smaller than n (heavy repeats); `all_equal`: one id everywhere."""
    if kind == "repeat":
        return torch.randint(0, vocab, (n,), generator=gen)
    return torch.full((n,), vocab - 1)


# ----------------------------------------------------------------------------- cases


def gate_case(N, D, V, ids_kind, residual, seed=0):
    """(op, args without sparse_grad, {name: leaf}, table leaf, flat keys of the touched slots)."""
    gen = torch.Generator().manual_seed(seed)
    m, table = leaf(torch.randn(N, D, generator=gen)), leaf(torch.randn(V, D, generator=gen))
    scale = leaf(torch.randn(D, generator=gen))
    res = leaf(torch.randn(N, D, generator=gen)) if residual else None
    ids = make_ids(ids_kind, N, V, gen)
    leaves = {"m": m, "table": table, "scale": scale} | ({"residual": res} if residual else {})
    return "jtok_gate", (m, ids, table, scale, 1e-6, res), leaves, table, ids


def mix_case(N, D, V, n_e, K, ids_kind, seed=0):
    """As `gate_case`, for JTok-M (keys t * V + v)."""
    gen = torch.Generator().manual_seed(seed)
    tables, scale = leaf(torch.randn(n_e, V, D, generator=gen)), leaf(torch.randn(D, generator=gen))
    ids = make_ids(ids_kind, N, V, gen)
    idx = torch.rand(N, n_e, generator=gen).argsort(-1)[:, :K]
    w = torch.rand(N, K, generator=gen) + 0.1
    w = leaf(w / w.sum(-1, keepdim=True))
    leaves = {"tables": tables, "w": w, "scale": scale}
    return "jtok_m_mix", (ids, tables, idx, w, scale, 0.5, 1e-6), leaves, tables, idx * V + ids[:, None]


GATE_CASES = [
    pytest.param(N, D, 4, "repeat", res, id=f"N{N}-D{D}-{'res' if res else 'nores'}")
    for N in (1, 7, 37) for D in (5, 33) for res in (False, True)
] + [pytest.param(37, 33, 4, "all_equal", True, id="all_equal-res"),
     pytest.param(7, 5, 4, "all_equal", False, id="all_equal-nores")]

MIX_CASES = [
    pytest.param(N, D, 4, n_e, K, "repeat", id=f"N{N}-D{D}-E{n_e}-K{K}")
    for N, D in ((1, 5), (7, 33), (37, 5), (37, 33)) for n_e, K in ((1, 1), (3, 1), (3, 2))
] + [pytest.param(37, 33, 4, 3, 2, "all_equal", id="all_equal-E3-K2"),
     pytest.param(7, 5, 4, 1, 1, "all_equal", id="all_equal-E1-K1")]


def grads(fn, args, leaves: dict, sparse_grad: bool, seed: int = 1) -> dict:
    """Every leaf's gradient under one fixed random upstream gradient."""
    out = fn(*args, sparse_grad)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), up)))


def flat_rows(sparse: torch.Tensor) -> torch.Tensor:
    """The keys of a sparse table gradient's rows in the table flattened to `[-1, d]`."""
    idx = sparse._indices()
    return idx[0] if sparse.dim() == 2 else idx[0] * sparse.shape[1] + idx[1]


def check_sparse_vs_dense(name: str, sparse: torch.Tensor, dense: torch.Tensor, table: torch.Tensor,
                          keys: torch.Tensor) -> None:  # fmt: skip
    """`sparse` is the row-sparse form of `dense`: right layout, shape, rows (the touched ones) and values."""
    assert sparse.layout == torch.sparse_coo and sparse.shape == table.shape, name
    assert sparse.is_coalesced() and sparse._values().dtype == table.dtype, name
    d = table.shape[-1]
    rows = flat_rows(sparse)
    touched = torch.unique(keys.reshape(-1))
    dense_flat = dense.reshape(-1, d)
    nonzero = (dense_flat != 0).any(-1).nonzero().flatten()
    assert torch.equal(rows, touched), f"{name}: rows {rows.tolist()} != touched {touched.tolist()}"
    assert torch.equal(rows, nonzero), f"{name}: rows {rows.tolist()} != non-zero dense rows {nonzero.tolist()}"
    assert sparse._values().shape == (touched.numel(), d), name
    assert_close(f"{name} values", sparse._values(), dense_flat[rows], ATOL, RTOL)


def check_op(op, args, leaves, table, keys, backend) -> dict:
    """Dense and sparse gradients of one backend agree; returns the sparse ones."""
    table_name = next(n for n, t in leaves.items() if t is table)
    fn = op_fn(op, backend)
    dense, sparse = grads(fn, args, leaves, False), grads(fn, args, leaves, True)
    assert dense[table_name].layout == torch.strided and dense[table_name].shape == table.shape
    check_sparse_vs_dense(f"{backend} {op}", sparse[table_name], dense[table_name], table, keys)
    if backend == "triton":  # one segment-sum kernel, same order: only the destination row differs
        rows = flat_rows(sparse[table_name])
        assert torch.equal(sparse[table_name]._values(), dense[table_name].reshape(-1, table.shape[-1])[rows])
    for name in leaves:
        if name != table_name:
            # The other gradients do not depend on how the table's is laid out: the same ops in both modes.
            assert torch.equal(sparse[name], dense[name]), f"{backend} {op} d{name} differs between the modes"
    return sparse


# ----------------------------------------------------------------------------- sparse == dense


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,D,V,ids_kind,residual", GATE_CASES)
def test_jtok_gate_sparse_matches_dense(N, D, V, ids_kind, residual, backend):
    check_op(*gate_case(N, D, V, ids_kind, residual), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,D,V,n_e,K,ids_kind", MIX_CASES)
def test_jtok_m_mix_sparse_matches_dense(N, D, V, n_e, K, ids_kind, backend):
    check_op(*mix_case(N, D, V, n_e, K, ids_kind), backend)


@pytest.mark.parametrize(
    "case",
    [pytest.param(lambda: gate_case(37, 33, 4, "repeat", True), id="gate-res"),
     pytest.param(lambda: gate_case(7, 5, 4, "all_equal", False), id="gate-all_equal"),
     pytest.param(lambda: mix_case(37, 33, 4, 3, 2, "repeat"), id="mix-E3-K2"),
     pytest.param(lambda: mix_case(7, 5, 4, 1, 1, "all_equal"), id="mix-all_equal")],
)
def test_triton_sparse_matches_reference_sparse(case):
    op, args, leaves, _, _ = case()
    got, want = grads(OPS[op], args, leaves, True), grads(getattr(reference, op), args, leaves, True)
    for name in leaves:
        g, w = got[name], want[name]
        if g.layout == torch.sparse_coo:
            assert w.layout == torch.sparse_coo and torch.equal(g._indices(), w._indices()), name
            g, w = g._values(), w._values()
        assert_close(f"{op} d{name}", g, w, X_ATOL, X_RTOL)


# ----------------------------------------------------------------------------- no table-sized buffer


class LargeAllocations(TorchDispatchMode):
    """Records every strided tensor produced by an aten op whose storage is at least `limit_bytes` and is not
    one of the `known` storages (the inputs': the interpreter re-wraps kernel arguments over their storage)."""

    def __init__(self, limit_bytes: int, known: list[torch.Tensor]):
        super().__init__()
        self.limit, self.known = limit_bytes, {t.untyped_storage().data_ptr() for t in known}
        self.seen: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage.nbytes() >= self.limit and storage.data_ptr() not in self.known:
                    self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["jtok_gate", "jtok_m_mix"])
def test_sparse_backward_allocates_no_table_sized_buffer(op, backend):
    # A vocabulary much larger than the batch: every activation-sized buffer is far below the table's size.
    case = gate_case(7, 5, 64, "repeat", True) if op == "jtok_gate" else mix_case(7, 5, 32, 3, 2, "repeat")
    _, args, leaves, table, _ = case
    fn = op_fn(op, backend)
    found = {}
    for sparse_grad in (False, True):
        out = fn(*args, sparse_grad)
        up = torch.randn(out.shape)
        with LargeAllocations(table.numel() * table.element_size(), [table, up, *leaves.values()]) as spy:
            torch.autograd.grad(out, list(leaves.values()), up)
        found[sparse_grad] = spy.seen
    assert found[False], "the dense backward's [V, d] gradient went unseen: the detector is broken"
    assert not found[True], f"the sparse backward allocated table-sized buffers: {found[True]}"


# ----------------------------------------------------------------------------- accumulation and the boundary


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["jtok_gate", "jtok_m_mix"])
def test_two_sparse_backwards_accumulate_in_grad(op, backend):
    fn = op_fn(op, backend)
    cases = [gate_case(7, 5, 6, "repeat", True, seed=s) if op == "jtok_gate" else
             mix_case(7, 5, 6, 3, 2, "repeat", seed=s) for s in (0, 1)]  # fmt: skip
    table = cases[0][3]
    want = torch.zeros_like(table)
    for i, (_, args, _, own_table, _) in enumerate(cases):  # the second case's ids (and m / w) on the first's table
        args = tuple(table if a is own_table else a for a in args)
        out = fn(*args, False)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(i))
        want += torch.autograd.grad(out, table, up)[0]
        fn(*args, True).backward(up)
    assert table.grad.layout == torch.sparse_coo and table.grad.shape == table.shape
    assert_close(f"{backend} {op} accumulated grad", table.grad.to_dense(), want, ATOL, RTOL)


def test_boundary_passes_sparse_grad_to_the_triton_ops(monkeypatch):
    monkeypatch.setattr(kernels, "_BACKEND", "triton")
    _, (m, ids, table, scale, eps, res), _, _, _ = gate_case(7, 5, 4, "repeat", True)
    out = kernels.jtok_gate(m, ids, table, scale, eps, residual_ND=res, sparse_grad=True)
    assert out.grad_fn is not None and "JTokGate" in type(out.grad_fn).__name__
    assert torch.autograd.grad(out.sum(), table)[0].layout == torch.sparse_coo
    _, (ids, tables, idx, w, scale, alpha, eps), _, _, _ = mix_case(7, 5, 4, 3, 2, "repeat")
    out = kernels.jtok_m_mix(ids, tables, idx, w, scale, alpha, eps, sparse_grad=True)
    assert "JTokMMix" in type(out.grad_fn).__name__
    assert torch.autograd.grad(out.sum(), tables)[0].layout == torch.sparse_coo
    # a frozen table: no table gradient is formed, the others still flow
    dm = torch.autograd.grad(kernels.jtok_gate(m, ids, table.detach(), scale, eps, sparse_grad=True).sum(), m)[0]
    assert dm.shape == m.shape


@pytest.mark.parametrize("scaled,D", [(False, 33), (True, 33), (True, 300)])  # 300: two column tiles
def test_segment_sum_compact_matches_index_add(scaled, D):
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(9, D, generator=gen)
    keys = torch.randint(3, 40, (18,), generator=gen, dtype=torch.int32)  # two slots per source row
    scale = torch.rand(18, generator=gen) if scaled else None
    rows, values = dedup_rows.segment_sum_compact(src, keys, torch.float32, slot_scale_S=scale)
    assert rows.dtype == torch.int64 and torch.equal(rows, torch.unique(keys.long()))
    want = torch.zeros(40, D).index_add_(0, keys, src.repeat_interleave(2, 0) * (scale[:, None] if scaled else 1))
    assert_close("segment_sum_compact", values, want[rows], ATOL, RTOL)
    dense = dedup_rows.segment_sum_rows(src, keys, 40, torch.float32, slot_scale_S=scale)
    assert torch.equal(values, dense[rows])  # the same sums, bit for bit
    empty_rows, empty_values = dedup_rows.segment_sum_compact(src[:0], keys[:0], torch.float32)
    assert empty_rows.shape == (0,) and empty_values.shape == (0, D)
