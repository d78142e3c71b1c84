"""Which transformers class a jtok model becomes, with its config and the renamed weights.

- baseline -> LlamaForCausalLM (same layer, weights renamed).
- moe -> GraniteMoeSharedForCausalLM when the router scores by softmax and no expert bias is set (Granite picks
  the top-k of the router logits and softmaxes over them: the same choice and weights as our softmax renormalised
  over the top-k; the multipliers set to 1 and the attention scale to 1/sqrt(head size) make it a Llama layer),
  Glm4MoeForCausalLM when it scores by sigmoid (its `e_score_correction_bias` is our selection-only expert bias;
  one group, no dense first layers, full-width RoPE, scaling factor 1), given a shared expert and >= 2 experts;
  both only when d_model and the expert width are multiples of 8 (transformers' grouped matmul refuses other
  row sizes).
- everything else (JTok, JTok-M, and an MoE that fits neither) -> the remote-code JTokForCausalLM shipped in
  this package, whose weight names are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from project.config import ModelConfig

REMOTE_CODE_CLASS = "JTokForCausalLM"


@dataclass
class Target:
    """An export plan: the transformers class name, its config arguments and the state dict in its names."""

    class_name: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def remote_code(self) -> bool:
        return self.class_name == REMOTE_CODE_CLASS


def _common(cfg: ModelConfig, eos_id: int, dtype: torch.dtype) -> dict[str, Any]:
    """Config fields every target shares: sizes, norm, RoPE, embeddings tie, special tokens."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,  # documents are separated by EOS: it is also what starts one
        "eos_token_id": eos_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _rope(cfg: ModelConfig) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}}


def _backbone_names(state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Embedding, attention, norms and head in Llama's names (every class here uses them)."""
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{theirs}self_attn.{b}.weight"] = state[f"{ours}attn.{a}.weight"]
    return out


def _routed_experts(state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Our [E, D, F] gate/up and [E, F, D] down as transformers' fused [E, 2F, D] gate_up and [E, D, F] down."""
    gate, up = state[prefix + "w_gate_EDF"].transpose(1, 2), state[prefix + "w_up_EDF"].transpose(1, 2)
    return torch.cat([gate, up], dim=1).contiguous(), state[prefix + "w_down_EFD"].transpose(1, 2).contiguous()


def llama(cfg: ModelConfig, state: dict[str, torch.Tensor], eos_id: int, dtype: torch.dtype) -> Target:
    config = {**_common(cfg, eos_id, dtype), **_rope(cfg), "intermediate_size": cfg.dense_hidden,
              "head_dim": cfg.head_dim, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}  # fmt: skip
    out = _backbone_names(state, cfg.n_layers, cfg.tie_embeddings)
    for i in range(cfg.n_layers):
        for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            out[f"model.layers.{i}.mlp.{b}.weight"] = state[f"layers.{i}.ffn.{a}.weight"]
    return Target("LlamaForCausalLM", config, out)


def granite_moe(cfg: ModelConfig, state: dict[str, torch.Tensor], eos_id: int, dtype: torch.dtype) -> Target:
    config = {**_common(cfg, eos_id, dtype), **_rope(cfg), "intermediate_size": cfg.routed_hidden,
              "shared_intermediate_size": cfg.n_shared_experts * cfg.routed_hidden,
              "num_local_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.moe_top_k, "hidden_act": "silu",
              "attention_multiplier": cfg.head_dim**-0.5, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
              "logits_scaling": 1.0, "attention_bias": False}  # fmt: skip
    out = _backbone_names(state, cfg.n_layers, cfg.tie_embeddings)
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.ffn.", f"model.layers.{i}."
        out[theirs + "block_sparse_moe.router.weight"] = state[ours + "router.weight"]
        gate_up, down = _routed_experts(state, ours)
        out[theirs + "block_sparse_moe.experts.gate_up_proj"] = gate_up
        out[theirs + "block_sparse_moe.experts.down_proj"] = down
        if cfg.n_shared_experts:
            shared_in = torch.cat([state[ours + "shared.w_gate.weight"], state[ours + "shared.w_up.weight"]])
            out[theirs + "shared_mlp.input_linear.weight"] = shared_in
            out[theirs + "shared_mlp.output_linear.weight"] = state[ours + "shared.w_down.weight"]
    return Target("GraniteMoeSharedForCausalLM", config, out)


def glm4_moe(cfg: ModelConfig, state: dict[str, torch.Tensor], eos_id: int, dtype: torch.dtype) -> Target:
    config = {**_common(cfg, eos_id, dtype), **_rope(cfg), "intermediate_size": cfg.dense_hidden,
              "moe_intermediate_size": cfg.routed_hidden, "n_shared_experts": cfg.n_shared_experts,
              "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.moe_top_k, "n_group": 1,
              "topk_group": 1, "first_k_dense_replace": 0, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
              "use_qk_norm": False, "attention_bias": False, "num_nextn_predict_layers": 0, "hidden_act": "silu",
              "head_dim": cfg.head_dim}  # fmt: skip
    out = _backbone_names(state, cfg.n_layers, cfg.tie_embeddings)
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.ffn.", f"model.layers.{i}.mlp."
        out[theirs + "gate.weight"] = state[ours + "router.weight"]
        out[theirs + "gate.e_score_correction_bias"] = state[ours + "expert_bias"]
        out[theirs + "experts.gate_up_proj"], out[theirs + "experts.down_proj"] = _routed_experts(state, ours)
        for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            out[f"{theirs}shared_experts.{b}.weight"] = state[f"{ours}shared.{a}.weight"]
    return Target("Glm4MoeForCausalLM", config, out)


def jtok_remote_code(cfg: ModelConfig, state: dict[str, torch.Tensor], eos_id: int, dtype: torch.dtype) -> Target:
    config = {**_common(cfg, eos_id, dtype), "variant": cfg.variant, "intermediate_size": cfg.dense_hidden,
              "rope_theta": cfg.rope_theta, "n_shared_experts": cfg.n_shared_experts,
              "n_routed_experts": cfg.n_routed_experts, "moe_top_k": cfg.moe_top_k,
              "expert_hidden": cfg.routed_hidden, "router_score": cfg.router_score, "jtok_eps": cfg.jtok_eps,
              "jtok_scale_init": cfg.jtok_scale_init, "table_init_std": cfg.table_init_std,
              "jtokm_tables": cfg.jtokm_tables, "jtokm_top_k": cfg.jtokm_top_k,
              "jtokm_scale_init": cfg.jtokm_scale_init}  # fmt: skip
    out = {("" if name.startswith("lm_head.") else "model.") + name: t for name, t in state.items()}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return Target(REMOTE_CODE_CLASS, config, out)


def choose(cfg: ModelConfig, state: dict[str, torch.Tensor], eos_id: int) -> Target:
    """The export plan for a model of `cfg` with weights `state` (project/model.py's names)."""
    dtype = state["tok_emb.weight"].dtype
    if cfg.variant == "baseline":
        return llama(cfg, state, eos_id, dtype)
    # transformers' default MoE path (torch grouped_mm) needs rows of 16 bytes: a multiple of 8 in 16-bit dtypes.
    aligned = cfg.d_model % 8 == 0 and cfg.routed_hidden % 8 == 0
    if cfg.variant == "moe" and aligned:
        bias_set = any(bool(t.any()) for name, t in state.items() if name.endswith(".expert_bias"))
        if cfg.router_score == "softmax" and not bias_set:
            return granite_moe(cfg, state, eos_id, dtype)
        if cfg.router_score == "sigmoid" and cfg.n_shared_experts >= 1 and cfg.n_routed_experts >= 2:
            return glm4_moe(cfg, state, eos_id, dtype)
    return jtok_remote_code(cfg, state, eos_id, dtype)
