"""The MoE grouped GEMMs at the GPU's tile sizes, run through the Triton interpreter on CPU (float32).

tests/test_kernels.py runs them at the interpreter's small tile (16x64x32); here `forced_config`
makes every GEMM kernel take the 64x64 and 128x128 tiles the autotuner picks from on a GPU, with
GROUP_M > 1, several column tiles, d = 2048, an expert without tokens and all tokens on one expert.
bf16 GEMMs are not checked here: the interpreter's bf16 tl.dot is not exact, that needs a GPU.
"""

from __future__ import annotations

import math
import os

# Triton decides when it is first imported whether kernels are interpreted (tests/conftest.py sets this too).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl

from kernels import reference
from kernels.ops import moe_configs, moe_experts, moe_routing
from tensor_asserts import assert_close

if not moe_configs.INTERPRETED:
    pytest.skip("these tests run the kernels under TRITON_INTERPRET=1 (set before triton is imported)",
                allow_module_level=True)

# tensor_asserts' bound, but against a float64 reference: at these sizes (130 rows into one expert's dWg,
# d = 2048) the float32 reference's own error is as large as the kernel's (both <= ~0.7x the bound against
# float64) and their difference alone reached ~1.1x the bound.
# Tile shapes from moe_configs.MMA_CONFIGS; GROUP_M below its 8 so these few row tiles form several groups.
GPU_TILES = {
    "64x64x64_g2": moe_configs.config(64, 64, 64, 2, 4, 4),
    "128x128x32_g4": moe_configs.config(128, 128, 32, 4, 8, 4),
}


def moe_inputs(N, D, F, E, K, routing, seed=0):
    """x, topk_idx, topk_w and the expert weights (leaves); routing "random", "expert0_empty" or "one_expert"."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(t):
        return t.requires_grad_(True)

    x = leaf(torch.randn(N, D, generator=gen))
    w_gate = leaf(torch.randn(E, D, F, generator=gen) / math.sqrt(D))
    w_up = leaf(torch.randn(E, D, F, generator=gen) / math.sqrt(D))
    w_down = leaf(torch.randn(E, F, D, generator=gen) / math.sqrt(F))
    if routing == "random":
        idx = torch.rand(N, E, generator=gen).argsort(-1)[:, :K]
    elif routing == "expert0_empty":
        idx = 1 + torch.rand(N, E - 1, generator=gen).argsort(-1)[:, :K]
    else:  # "one_expert": every slot on the last expert
        idx = torch.full((N, K), E - 1)
    w = torch.rand(N, K, generator=gen) + 0.1
    return x, idx, leaf(w / w.sum(-1, keepdim=True)), w_gate, w_up, w_down


def compare(N, D, F, E, K, routing):
    """Forward and the gradients of x, w, Wg, Wu, Wd: Triton op (float32) against `reference.moe_experts`
    in float64, rounded to float32."""
    inputs = moe_inputs(N, D, F, E, K, routing)
    ref_inputs = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    names, leaf_at = ["x", "w", "w_gate", "w_up", "w_down"], [0, 2, 3, 4, 5]
    got, want = moe_experts.moe_experts(*inputs), reference.moe_experts(*ref_inputs)
    assert_close("forward", got, want.detach().float())
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad(got, [inputs[i] for i in leaf_at], up)
    g_want = torch.autograd.grad(want, [ref_inputs[i] for i in leaf_at], up.to(want.dtype))
    for name, g, r in zip(names, g_got, g_want):
        assert_close(f"d{name}", g, r.float())


@pytest.mark.parametrize("tile", list(GPU_TILES))
@pytest.mark.parametrize(
    "N,D,F,E,K,routing",
    [
        (24, 72, 136, 3, 2, "expert0_empty"),  # F: 3 column tiles at 64, 2 at 128; D: 2 at 64; an empty expert
        (130, 136, 72, 3, 1, "one_expert"),  # 3 (2) row tiles at 64 (128) on one expert, the others empty
    ],
)
def test_moe_matches_reference_at_gpu_tiles(tile, N, D, F, E, K, routing):
    with moe_configs.forced_config(GPU_TILES[tile]):
        compare(N, D, F, E, K, routing)


def test_moe_matches_reference_at_d2048():
    with moe_configs.forced_config(moe_configs.config(128, 128, 64, 4, 8, 3)):
        compare(2, 2048, 64, 2, 2, "random")


def test_forced_config_reaches_every_gemm_and_is_undone():
    cfg = GPU_TILES["64x64x64_g2"]
    tuners = [moe_experts._moe_up_kernel, moe_experts._moe_down_kernel, moe_experts._moe_dh_kernel,
              moe_experts._moe_wgrad_kernel]
    before = [t.configs for t in tuners]
    x, idx, w, w_gate, w_up, w_down = moe_inputs(5, 24, 40, 3, 2, "random")
    with moe_configs.forced_config(cfg):
        out = moe_experts.moe_experts(x, idx, w, w_gate, w_up, w_down)
        torch.autograd.grad(out.sum(), (x, w_gate))
        assert all(t.best_config == cfg for t in tuners)  # the config each launch actually ran with
    assert [t.configs for t in tuners] == before and before[0] == [moe_configs.INTERPRETER_CONFIG]


def test_router_gradient_with_unused_partial_columns(monkeypatch):
    """A tile wider than the narrowest BLOCK_N leaves partial-dw columns unwritten: they must be 0."""
    monkeypatch.setattr(moe_experts, "min_block_n", lambda tuner, ieee: 16)
    with moe_configs.forced_config(GPU_TILES["128x128x32_g4"]):
        compare(6, 40, 260, 2, 2, "random")  # 3 column tiles of 128 out of 17 partial columns


@pytest.mark.parametrize("reset", [True, False])
def test_tuning_several_dh_configs_leaves_no_stale_router_gradient_partials(monkeypatch, reset):
    """While tuning, every config of the dh kernel writes into the same zeroed partial-dw buffer: a
    narrow config fills more columns than a wide one, so without `reset_to_zero` the columns left by
    the narrow run are summed into the wide winner's router gradient. The tuner really benchmarks two
    configs here (the narrow one first; a stub timer makes the wide one win), with and without the reset."""
    tuner = moe_experts._moe_dh_kernel
    timings = iter([2.0, 1.0])
    monkeypatch.setattr(tuner, "configs", [moe_configs.config(16, 32, 32, 2, 4, 1), moe_configs.config(16, 128, 32, 2, 4, 1)])
    monkeypatch.setattr(tuner, "early_config_prune", None)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setitem(tuner.__dict__, "do_bench", lambda fn, quantiles=None, **_: (fn(), [next(timings)] * 3)[1])
    if not reset:
        monkeypatch.setattr(tuner, "reset_to_zero", [])
    x, idx, w, w_gate, w_up, w_down = moe_inputs(6, 40, 260, 2, 2, "random")
    ref = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in (x, idx, w, w_gate, w_up, w_down)]
    got = torch.autograd.grad(moe_experts.moe_experts(x, idx, w, w_gate, w_up, w_down).sum(), w)[0]
    want = torch.autograd.grad(reference.moe_experts(*ref).sum(), ref[2])[0].float()
    assert tuner.best_config.kwargs["BLOCK_N"] == 128
    if reset:
        assert_close("dw", got, want)
    else:  # the test's own check: the stale partials really reach the gradient when nothing zeroes them
        assert (got - want).abs().max() > 0.1


def test_fwd_saves_what_bwd_needs():
    """`moe_experts_fwd` / `moe_experts_bwd` (used by custom-op wrappers): saved shapes and dtypes, and
    backward equal to autograd through the Function."""
    N, D, F, E, K = 7, 24, 40, 3, 2
    inputs = moe_inputs(N, D, F, E, K, "random")
    out, saved = moe_experts.moe_experts_fwd(*[t.detach() for t in inputs])
    S = N * K
    shapes = [(N, D), (N, K), (E, D, F), (E, D, F), (E, F, D), (S, F), (S, F), (S,), (S,), (E,), (E,)]
    dtypes = [torch.float32] * 7 + [torch.int64, torch.int64, torch.int32, torch.int32]
    assert [tuple(t.shape) for t in saved] == shapes and [t.dtype for t in saved] == dtypes
    assert all(t.is_contiguous() for t in saved)
    grad = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    grads = moe_experts.moe_experts_bwd(grad, *saved)
    x, _, w, w_gate, w_up, w_down = inputs
    want = torch.autograd.grad(moe_experts.MoEExpertsFunction.apply(*inputs), (x, w, w_gate, w_up, w_down), grad)
    for name, g, r in zip(["x", "w", "w_gate", "w_up", "w_down"], grads, want):
        assert torch.equal(g, r), name  # the same kernels on the same inputs: bit-identical by construction
    assert_close("forward", out, reference.moe_experts(*inputs).detach())


@triton.jit
def _tile_map_kernel(counts_ptr, offsets_ptr, out_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    e, start, end, valid = moe_routing.tile_rows(tl.program_id(0), counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    out = out_ptr + tl.program_id(0) * 4
    tl.store(out, e)
    tl.store(out + 1, start)
    tl.store(out + 2, end)
    tl.store(out + 3, valid.to(tl.int32))


@pytest.mark.parametrize("block_m", [2, 16, 64, 128])
@pytest.mark.parametrize("routing", ["random", "expert0_empty", "one_expert", "skewed"])
def test_in_kernel_tile_map_covers_every_row_once(block_m, routing):
    N, E, K = 70, 6, 2
    gen = torch.Generator().manual_seed(3)
    if routing == "skewed":  # expert 1 gets most slots, 0 and 5 none
        idx = torch.stack([torch.full((N,), 1), 2 + torch.randint(0, 3, (N,), generator=gen)], 1)
    else:
        idx = moe_inputs(N, 4, 4, E, K, routing)[1]
    r = moe_routing.moe_routing(idx, E, block_m)
    S, tiles = N * K, r.max_tiles
    out = torch.full((tiles, 4), -1, dtype=torch.int32)
    _tile_map_kernel[(tiles,)](r.counts_E, r.offsets_E, out, E, BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(E))
    e, start, end, valid = out.T.long()
    n_real = int(r.tile_end_E[-1])
    assert valid.tolist() == [1] * n_real + [0] * (tiles - n_real)  # real tiles first, surplus ones flagged
    seen = torch.zeros(S, dtype=torch.long)
    for t in range(n_real):
        lo, hi = int(r.offsets_E[e[t]]), int(r.offsets_E[e[t]] + r.counts_E[e[t]])
        assert int(end[t]) == hi and lo <= int(start[t]) < hi, (t, e[t], start[t], end[t])
        seen[int(start[t]):min(int(start[t]) + block_m, hi)] += 1
    assert seen.tolist() == [1] * S
    assert e[:n_real].tolist() == sorted(e[:n_real].tolist())


@triton.jit
def _grouped_tile_kernel(out_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    pid_m, pid_n = moe_routing.grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    tl.store(out_ptr + tl.program_id(0) * 2, pid_m)
    tl.store(out_ptr + tl.program_id(0) * 2 + 1, pid_n)


@pytest.mark.parametrize("num_m,num_n,group_m", [(7, 5, 1), (7, 5, 3), (10, 4, 8), (3, 6, 8)])
def test_grouped_order_visits_every_tile_once(num_m, num_n, group_m):
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32)
    _grouped_tile_kernel[(num_m * num_n,)](out, num_m, num_n, GROUP_M=group_m)
    pairs = sorted(map(tuple, out.tolist()))
    assert pairs == [(m, n) for m in range(num_m) for n in range(num_n)]
    # consecutive programs stay within a group of group_m row tiles
    assert all(int(out[p, 0]) // group_m == p // (group_m * num_n) for p in range(num_m * num_n))
