"""The decoder and its variants: shapes, gradients, exact method semantics, bad settings."""

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from project.accounting import flops_per_token, param_counts
from project.config import VARIANTS, ConfigError, ModelConfig
from project.model import MoE, Transformer, expert_counts, switch_aux_loss

# Score margin below which a top-k choice could flip between two float32 code paths (their round-off is ~1e-6).
TIE = 1e-4
TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, max_seq_len=16, n_routed_experts=4, moe_top_k=2)


def tiny(variant: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict({**TINY, "variant": variant, **overrides}))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_and_every_parameter_gets_a_finite_gradient(variant):
    model = tiny(variant, n_kv_heads=2)
    ids = torch.randint(0, 97, (3, 11))
    out = model(ids)
    assert out.logits.shape == (3, 11, 97)
    (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    if variant in ("jtok", "moe_jtok"):
        grad = model.layers[0].jtok.table.weight.grad
        read = torch.zeros(97, dtype=torch.bool)
        read[ids.unique()] = True
        # Rows never read get no gradient: the backward of `table[ids]` accumulates into a zero tensor
        # and leaves the other rows untouched, so they are exactly 0.0 (no float sum to compare).
        assert (grad[~read] == 0).all()
        assert (grad[read].abs().sum(-1) > 0).all()  # every row the batch read gets a non-zero gradient


@pytest.mark.parametrize("variant", ["jtok", "jtok_m", "moe_jtok", "moe_jtok_m"])
def test_token_indexed_counts(variant):
    cfg = ModelConfig.from_dict({**TINY, "variant": variant})
    counts = param_counts(cfg)
    L, V, D = cfg.n_layers, cfg.vocab_size, cfg.d_model
    expected = L * V * D if variant.endswith("jtok") else L * cfg.jtokm_tables * V * D
    assert counts["token_indexed"] == expected
    assert counts["backbone"] == counts["total"] - expected
    plain = "moe" if variant.startswith("moe") else "baseline"
    extra = counts["backbone"] - param_counts(ModelConfig.from_dict({**TINY, "variant": plain}))["total"]
    assert extra == L * D * (1 + (cfg.jtokm_tables if variant.endswith("jtok_m") else 0))  # scales s_l (+ routers)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tie", [True, False])
def test_analytic_parameter_count_matches_the_module(variant, tie):
    cfg = ModelConfig.from_dict({**TINY, "variant": variant, "tie_embeddings": tie, "n_kv_heads": 2})
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if variant in ("baseline", "moe"):
        assert counts["token_indexed"] == 0
    assert counts["active_per_token"] <= counts["total"]


@pytest.mark.parametrize("variant", ["jtok", "moe_jtok"])
def test_jtok_with_zero_scale_reproduces_the_backbone_exactly(variant):
    base = tiny("moe" if variant == "moe_jtok" else "baseline")
    jtok = tiny(variant, jtok_scale_init=0.0)
    missing, unexpected = jtok.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".jtok." in k for k in missing)
    ids = torch.randint(0, 97, (2, 16))
    base.eval(), jtok.eval()
    # Bit-identical by construction: kernels.reference.jtok_gate computes h + m * (1 + s * unit); with s = 0,
    # s * unit is +-0, 1 + (+-0) == 1 and m * 1 == m exactly, and h + m is the backbone's own residual add.
    # Everything else (weights copied, same ops, same shapes, same process) is the same computation.
    assert torch.equal(base(ids).logits, jtok(ids).logits)
    jtok.layers[1].jtok.scale.data.fill_(0.5)
    assert not torch.allclose(base(ids).logits, jtok(ids).logits)


def test_jtok_gate_matches_hand_computation():
    torch.manual_seed(1)
    m, table, s = torch.randn(3, 4), torch.randn(10, 4), torch.randn(4)
    ids = torch.tensor([7, 2, 7])
    out = kernels.jtok_gate(m, ids, table, s, 1e-6)
    for n in range(3):
        u = table[ids[n]]
        expected = m[n] * (1 + s * u / (math.sqrt(float((u * u).sum())) + 1e-6))
        torch.testing.assert_close(out[n], expected)


@torch.no_grad()
def test_jtok_m_block_matches_hand_computation():
    model = tiny("jtok_m", jtokm_tables=4, jtokm_top_k=2, jtokm_scale_init=0.7)
    block, cfg = model.layers[0], model.cfg
    h = torch.randn(1, 5, cfg.d_model)
    ids = torch.tensor([[3, 3, 50, 96, 0]])
    out, _ = block(h, ids, model.rope_cos, model.rope_sin)

    x = block.attn_norm(h)
    h_mid = h + block.attn(x, model.rope_cos, model.rope_sin)
    m = block.ffn(block.ffn_norm(h_mid))
    pool, router, s = block.jtok_m.tables.weight, block.jtok_m.router.weight, block.jtok_m.scale
    for t in range(5):
        g = router @ x[0, t]  # a mat-vec here, a batched linear in the block: equal only up to round-off
        top = sorted(range(4), key=lambda i: -float(g[i]))[:2]
        # So the selected set must not hinge on a near-tie (these seeded inputs have margins >= 0.01).
        assert min(float(g[i]) for i in top) - max(float(g[i]) for i in range(4) if i not in top) > TIE, t
        sig = [1 / (1 + math.exp(-float(g[i]))) for i in top]
        w = [v / sum(sig) for v in sig]
        e = sum(w[j] * pool[top[j], ids[0, t]] for j in range(2))
        r = (1 / math.sqrt(2 * cfg.n_layers)) * s * e / (e.norm() + cfg.jtok_eps)
        torch.testing.assert_close(out[0, t], h_mid[0, t] + m[0, t] + r, atol=1e-5, rtol=1e-5)


def test_switch_aux_loss_is_one_when_balanced_and_larger_when_not():
    probs = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_aux_loss(probs, balanced).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    skewed = torch.tensor([[0, 1]] * 8)
    # f = [0.5, 0.5, 0, 0], P = [0.7, 0.1, 0.1, 0.1] -> 4 * (0.35 + 0.05) = 1.6
    assert switch_aux_loss(skewed_probs, skewed).item() == pytest.approx(1.6)


def test_expert_counts_equal_bincount_including_unchosen_experts():
    idx_NK = torch.randint(0, 5, (37, 3))  # experts 5..8 never chosen
    want = torch.bincount(idx_NK.reshape(-1), minlength=9)
    assert torch.equal(expert_counts(idx_NK, 9), want)  # integer counts: exact


@pytest.mark.parametrize("variant", ["moe", "jtok_m", "moe_jtok_m"])
def test_routing_statistics_run_on_meta_tensors_so_they_never_sync_with_the_host(variant, monkeypatch):
    """Meta tensors have shapes but no data, so any op whose output size depends on the data
    (bincount, nonzero) or any read of a value on the host (`.item()`, `int(t)`) fails on them: the
    same reads are the host syncs that stall a CUDA step. The model's own code (routers, aux losses,
    load counts) runs here on meta; the three kernel ops are replaced by shape-only stand-ins, since
    their CPU reference is not what runs on CUDA (the Triton ops' routing is sync-free by design)."""
    monkeypatch.setattr(kernels, "moe_experts", lambda x_ND, *a, **k: x_ND.clone())
    monkeypatch.setattr(kernels, "jtok_m_mix", lambda ids_N, tables_EVD, *a, **k: tables_EVD[0, ids_N].clone())
    cfg = ModelConfig(variant=variant, vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                      check_token_ids=False, moe_bias_update_rate=0.1)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.train()
    out = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    (out.logits.float().sum() + out.aux_loss).backward()
    model.update_router_biases()
    assert out.logits.shape == (2, 8, 64) and out.aux_loss.device.type == "meta"


def test_moe_routes_top_k_and_combines_experts_by_renormalised_weights():
    model = tiny("moe", n_shared_experts=1, moe_aux_loss_coef=0.01)
    moe: MoE = model.layers[0].ffn
    x = torch.randn(6, 48)
    moe.train()
    y, aux = moe(x)
    # The same router call on the same input as in forward (and expert_bias is 0, scores + 0 == scores), so
    # the top-k choice below is bit-identical to the module's, near-ties included.
    probs = moe.router(x).softmax(-1)
    top_w, top_i = probs.topk(2, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    for n in range(6):
        expected = moe.shared(x[n])
        for k in range(2):
            e = top_i[n, k]
            hidden = F.silu(x[n] @ moe.w_gate_EDF[e]) * (x[n] @ moe.w_up_EDF[e])
            expected = expected + top_w[n, k] * (hidden @ moe.w_down_EFD[e])
        torch.testing.assert_close(y[n], expected, atol=1e-5, rtol=1e-5)
    assert aux.item() == pytest.approx(0.01 * switch_aux_loss(probs, top_i).item(), rel=1e-5)


def test_aux_free_bias_shifts_selection_towards_underloaded_experts():
    model = tiny("moe", moe_aux_loss_coef=0.0, moe_bias_update_rate=0.1)
    moe: MoE = model.layers[0].ffn
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 1.0  # expert 0 always scores highest for positive inputs
    x = torch.rand(32, 48)
    moe.train()
    moe(x)
    load = moe.expert_load.clone()
    assert load[0] == 32 and load.sum() == 64
    moe.update_bias()
    assert moe.expert_bias[0] < 0 and (moe.expert_load == 0).all()
    assert (moe.expert_bias[load < load.mean()] > 0).all()


def test_router_bias_is_part_of_the_state_dict():
    assert any(k.endswith("expert_bias") for k in tiny("moe").state_dict())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(variant="jtok_x"), "valid variants: baseline, jtok, jtok_m, moe, moe_jtok, moe_jtok_m"),
        (dict(variant="jtok_m", jtokm_tables=3, jtokm_top_k=4), "jtokm_top_k"),
        (dict(variant="moe", n_routed_experts=2, moe_top_k=3), "moe_top_k"),
        (dict(d_model=50, n_heads=4), "not divisible"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(router_score="max", variant="moe"), "router_score"),
        (dict(hidden=3), "unknown model settings"),
    ],
)
def test_bad_settings_fail_with_a_specific_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**TINY, **overrides})


@pytest.mark.parametrize("variant", ["baseline", "jtok", "jtok_m"])
def test_token_id_out_of_range_is_a_clear_error(variant):
    model = tiny(variant)
    with pytest.raises(IndexError, match=r"token id 97 is outside .* \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))


def test_boundary_rejects_out_of_range_ids_even_when_called_directly():
    table = torch.randn(5, 4)
    with pytest.raises(IndexError, match="token id 5"):
        kernels.jtok_gate(torch.randn(2, 4), torch.tensor([0, 5]), table, torch.ones(4), 1e-6)
    with pytest.raises(IndexError, match="token id -1"):
        kernels.jtok_m_mix(torch.tensor([-1]), torch.randn(2, 5, 4), torch.tensor([[0]]), torch.ones(1, 1), torch.ones(4), 1.0, 1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ffn_hidden=-64), r"model\.ffn_hidden must be a positive integer or null.*-64"),
        (dict(ffn_hidden=0), r"model\.ffn_hidden must be a positive integer or null \(null = "),
        (dict(n_kv_heads=-2), r"model\.n_kv_heads must be a positive integer or null.*-2"),
        (dict(n_kv_heads=0), r"model\.n_kv_heads must be a positive integer or null"),
        (dict(variant="moe", expert_hidden=-8), r"model\.expert_hidden must be a positive integer or null.*-8"),
        (dict(variant="moe", expert_hidden=0), r"model\.expert_hidden must be a positive integer or null"),
        (dict(init_std=-0.02), r"model\.init_std must be > 0, got -0\.02"),
        (dict(norm_eps=-1e-5), r"model\.norm_eps must be > 0"),
        (dict(norm_eps=0.0), r"model\.norm_eps must be > 0"),
        (dict(variant="jtok", table_init_std=-1.0), r"model\.table_init_std must be >= 0"),
        (dict(variant="moe", moe_aux_loss_coef=-0.1), r"model\.moe_aux_loss_coef must be >= 0"),
    ],
)
def test_negative_or_zero_sizes_are_refused_not_taken_as_defaults(overrides, message):
    """Item 9: 0 no longer silently means "default" (null does), negatives fail before torch sees them."""
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**TINY, **overrides})
    ModelConfig.from_dict({**TINY, "ffn_hidden": None, "n_kv_heads": None, "expert_hidden": None})  # null = default


def test_data_windows_longer_than_the_model_context_are_refused():
    from project.config import check_seq_len

    check_seq_len(16, 16)
    with pytest.raises(ConfigError, match=r"data\.seq_len=17 is longer than model\.max_seq_len=16"):
        check_seq_len(17, 16)


def test_seq_len_beyond_the_context_fails_before_any_data_work(make_cfg, tmp_path):
    from project import pipeline

    cfg = make_cfg("data.seq_len=64", "model.max_seq_len=32")
    cfg.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data\.seq_len=64 is longer than model\.max_seq_len=32"):
        pipeline.prepare_data(cfg)
    assert not (tmp_path / "cache").exists()


def test_sequence_longer_than_the_context_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len=16"):
        tiny("baseline")(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_flops_match_pytorch_flop_counter(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.from_dict({**TINY, "variant": variant, "n_kv_heads": 2})
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 16))
    # The math backend spells attention as matmuls the counter sees (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids)
        (out.logits.sum() + out.aux_loss).backward()
    measured = counter.get_total_flops() / ids.numel()
    assert measured == pytest.approx(flops_per_token(cfg, seq_len=16), rel=0.02)
