"""Configuration of a jtok model exported to Hugging Face format (remote code: it imports transformers only).

The fields mirror project/config.py's ModelConfig with every size resolved (no null defaults), under the names
transformers expects where one exists (hidden_size, num_hidden_layers, ...).
"""

from transformers import PretrainedConfig

# variant -> (FFN kind, token-indexed modulator), as in project/config.py
VARIANTS = {
    "baseline": ("dense", "none"),
    "jtok": ("dense", "jtok"),
    "jtok_m": ("dense", "jtok_m"),
    "moe": ("moe", "none"),
    "moe_jtok": ("moe", "jtok"),
    "moe_jtok_m": ("moe", "jtok_m"),
}


class JTokConfig(PretrainedConfig):
    """A pre-norm Llama-style decoder, dense or MoE FFN, optionally modulated by JTok or JTok-M."""

    model_type = "jtok"

    variant: str = "jtok"  # one of VARIANTS
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 384  # the dense SwiGLU's hidden size
    max_position_embeddings: int = 128  # the training context; longer inputs extrapolate RoPE
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = False  # every forward reads the whole sequence (no KV cache)

    # MoE FFN
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    moe_top_k: int = 2
    expert_hidden: int = 128
    router_score: str = "softmax"  # softmax | sigmoid

    # JTok
    jtok_eps: float = 1e-6
    jtok_scale_init: float = 1.0
    table_init_std: float = 1.0

    # JTok-M
    jtokm_tables: int = 5
    jtokm_top_k: int = 2
    jtokm_scale_init: float = 1.0

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def ffn_kind(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def modulator(self) -> str:
        return VARIANTS[self.variant][1]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
