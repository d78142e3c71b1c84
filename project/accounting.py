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
- MFU (model FLOPs utilisation) = `flops_per_token` x global tokens/s / (peak FLOP/s of one device x devices), the
  peak a dense datasheet figure at the precision the matmuls run in (PEAK_FLOPS) or `mfu.peak_flops`.
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


def fsdp_table_bytes_per_step(cfg: ModelConfig, world: int, param_bytes: int = 4, reduce_bytes: int = 4,
                              gathers: int = 2) -> int:  # fmt: skip
    """Bytes one rank sends per training step for the token tables when FSDP2 shards them as parameters: each
    table is all-gathered `gathers` times (forward, and again in backward when resharded after forward) in the
    compute dtype and its gradient reduce-scattered in the reduce dtype; a ring collective sends (world - 1) / world
    of the whole tensor from every rank. Row-sharded tables (`parallel.tables=row_sharded`) are measured instead."""
    tables = param_counts(cfg)["token_indexed"]
    return round(tables * (world - 1) / world * (gathers * param_bytes + reduce_bytes))


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), as in the module docstring."""
    T = seq_len or cfg.max_seq_len
    c = _layer_counts(cfg)
    matmul = cfg.n_layers * (c["attn"] + c["ffn_active"] + c["mod_matmul"]) + cfg.vocab_size * cfg.d_model
    return 6 * matmul + 12 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim


# Dense peak FLOP/s of one device (vendor datasheets; the "with sparsity" figures are twice these), by the precision
# the matmuls run in: bf16 (fp16 the same), tf32 (fp32 training with torch.backends TF32 matmuls on), fp32.
PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200 SXM": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100 SXM": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}
# torch.cuda.get_device_name() -> PEAK_FLOPS key, first match wins (lower case substrings), e.g. "NVIDIA H200",
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB".
DEVICE_NAMES = (
    ("h200 nvl", "H200 NVL"), ("h200", "H200 SXM"), ("h100 nvl", "H100 NVL"), ("h100 pcie", "H100 PCIe"),
    ("h100 80gb hbm2e", "H100 PCIe"), ("h100", "H100 SXM"), ("a100", "A100"),
)  # fmt: skip


def known_device(device_name: str) -> str | None:
    """The PEAK_FLOPS entry for a CUDA device name, or None when it is not in the table."""
    name = device_name.lower()
    return next((key for pattern, key in DEVICE_NAMES if pattern in name), None)


def matmul_precision(trainer_precision: str, fp32_matmul_precision: str = "highest") -> str | None:
    """The precision the matmuls of a run compute in, as a PEAK_FLOPS column, from Lightning's precision setting
    ("bf16-mixed", "16-true", "32-true", ...) and torch.get_float32_matmul_precision(); None for fp64 and others."""
    setting = str(trainer_precision)
    if setting.startswith(("bf16", "16")):
        return "bf16"  # fp16 peaks equal bf16 peaks on every device in the table
    if setting.startswith("32"):
        return "fp32" if fp32_matmul_precision == "highest" else "tf32"
    return None


def peak_flops(device_name: str, precision: str | None) -> float | None:
    """Dense peak FLOP/s of one device named `device_name` at `precision` (a PEAK_FLOPS column), or None if unknown."""
    device = known_device(device_name)
    return None if device is None or precision is None else PEAK_FLOPS[device].get(precision)


def model_flops_utilisation(
    tokens_per_sec: float, flops_per_token: float, peak_per_device: float, devices: int
) -> float:
    """MFU: the model FLOP/s the run achieves (analytic FLOPs per token x global tokens/s) over the peak of all its
    devices."""
    return tokens_per_sec * flops_per_token / (peak_per_device * devices)
