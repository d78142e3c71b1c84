"""Analytic parameter counts and training FLOPs per token for every variant.

Conventions (also in README):
- `token_indexed`: all JTok / JTok-M table entries (L*V*d, or L*n_e*V*d); `backbone` is the rest.
- `active_per_token`: parameters one token touches. A lookup table counts only the rows read
  (d for the input embedding when untied, d per layer for JTok, K*d for JTok-M); the routed
  experts count only the top-k; everything else counts in full.
- `flops_per_token` (training, forward + backward = 3x forward): `6 * P_matmul + 12 * L * T * H * Hd`,
  with P_matmul the active parameters used in matrix products (attention projections, the active
  FFN experts and routers, the output head; lookups are free) and the second term the causal
  attention scores and values counted over the full T x T window, as PyTorch's FLOP counter does.
"""

from __future__ import annotations

from project.config import ModelConfig


def _layer_counts(cfg: ModelConfig) -> dict[str, int]:
    D, L = cfg.d_model, cfg.n_layers
    attn = D * cfg.n_heads * cfg.head_dim * 2 + D * cfg.kv_heads * cfg.head_dim * 2
    norms = 2 * D
    if cfg.ffn_kind == "moe":
        expert = 3 * D * cfg.routed_hidden
        ffn_total = D * cfg.n_routed_experts + (cfg.n_routed_experts + cfg.n_shared_experts) * expert
        ffn_active = D * cfg.n_routed_experts + (cfg.moe_top_k + cfg.n_shared_experts) * expert
    else:
        ffn_total = ffn_active = 3 * D * cfg.dense_hidden
    tables = rows_read = mod_matmul = mod_other = 0
    if cfg.modulator == "jtok":
        tables, rows_read, mod_other = cfg.vocab_size * D, D, D
    elif cfg.modulator == "jtok_m":
        tables = cfg.jtokm_tables * cfg.vocab_size * D
        rows_read, mod_matmul, mod_other = cfg.jtokm_top_k * D, D * cfg.jtokm_tables, D
    del L
    return dict(
        attn=attn, norms=norms, ffn_total=ffn_total, ffn_active=ffn_active, tables=tables,
        rows_read=rows_read, mod_matmul=mod_matmul, mod_other=mod_other,
    )


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total / backbone / token_indexed / active_per_token, as in the module docstring."""
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    c = _layer_counts(cfg)
    per_layer = c["attn"] + c["norms"] + c["ffn_total"] + c["tables"] + c["mod_matmul"] + c["mod_other"]
    embeddings = V * D * (1 if cfg.tie_embeddings else 2)
    total = L * per_layer + embeddings + D
    token_indexed = L * c["tables"]
    active_layer = c["attn"] + c["norms"] + c["ffn_active"] + c["rows_read"] + c["mod_matmul"] + c["mod_other"]
    active_embeddings = V * D + (0 if cfg.tie_embeddings else D)
    return dict(
        total=total,
        backbone=total - token_indexed,
        token_indexed=token_indexed,
        active_per_token=L * active_layer + active_embeddings + D,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), as in the module docstring."""
    T = seq_len or cfg.max_seq_len
    c = _layer_counts(cfg)
    matmul = cfg.n_layers * (c["attn"] + c["ffn_active"] + c["mod_matmul"]) + cfg.vocab_size * cfg.d_model
    return 6 * matmul + 12 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim
