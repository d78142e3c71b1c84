"""A jtok model for transformers (remote code: it imports torch and transformers only).

The decoder of project/model.py in plain torch, term for term (docs/METHOD.md): pre-norm layers
`x = RMSNorm(h)`, `h~ = h + Attn(x)` (causal, RoPE on the two halves of each head, grouped-query heads),
`m = FFN(RMSNorm(h~))` (SwiGLU, or shared + top-k routed SwiGLU experts), then
- none:   `h_next = h~ + m`
- JTok:   `h_next = h~ + m * (1 + s * u / (||u|| + eps))`, `u = E[x_t]`
- JTok-M: `h_next = h~ + m + s / sqrt(2L) * e / (||e|| + eps)`, `e = sum_{top-K of g} w_i E_i[x_t]`,
          `g = RMSNorm_attn(h) @ R`, `w_i = sigmoid(g_i) / sum_topK sigmoid(g_j)`.
Module and parameter names are those of project/model.py, so an exported state dict is the trained one.
There is no KV cache: every forward reads the whole sequence (generation works, recomputing the prefix).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_jtok import JTokConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions_BT: torch.Tensor, head_dim: int, theta: float):
    """cos and sin of the rotary angles at the given positions, each [B, 1, T, Hd/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions_BT.float()[..., None] * inv_freq.to(positions_BT.device)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x_BHTd, cos, sin):
    """Rotate the two halves of each head vector by the position's angles."""
    x1, x2 = x_BHTd.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x_BHTd.dtype)


class Attention(nn.Module):
    def __init__(self, config: JTokConfig):
        super().__init__()
        d, self.head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x_BTD, cos, sin, mask_B1TT):
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.kv_heads != self.n_heads
        if mask_B1TT is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """Shared SwiGLU experts (one SwiGLU of width n_shared * F) plus token-choice top-k routed experts, weighted
    by their scores renormalised over the top-k; the expert bias shifts only the choice."""

    def __init__(self, config: JTokConfig):
        super().__init__()
        D, E, Fe = config.hidden_size, config.n_routed_experts, config.expert_hidden
        self.top_k, self.score = config.moe_top_k, config.router_score
        self.router = nn.Linear(D, E, bias=False)
        self.shared = SwiGLU(D, config.n_shared_experts * Fe) if config.n_shared_experts else None
        self.w_gate_EDF = nn.Parameter(torch.empty(E, D, Fe))
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, Fe))
        self.w_down_EFD = nn.Parameter(torch.empty(E, Fe, D))
        self.register_buffer("expert_bias", torch.zeros(E))

    def forward(self, x_ND):
        logits_NE = self.router(x_ND).float()
        scores_NE = logits_NE.softmax(-1) if self.score == "softmax" else logits_NE.sigmoid()
        topk_idx_NK = (scores_NE + self.expert_bias).topk(self.top_k, dim=-1).indices
        topk_w_NK = scores_NE.gather(-1, topk_idx_NK)
        topk_w_NK = (topk_w_NK / topk_w_NK.sum(-1, keepdim=True)).to(x_ND.dtype)
        y_ND = torch.zeros_like(x_ND)
        flat_expert = topk_idx_NK.reshape(-1)
        flat_token = torch.arange(x_ND.shape[0], device=x_ND.device).repeat_interleave(self.top_k)
        flat_w = topk_w_NK.reshape(-1)
        for e in range(self.w_gate_EDF.shape[0]):
            slot = (flat_expert == e).nonzero(as_tuple=True)[0]
            token = flat_token[slot]
            x_nD = x_ND[token]
            h_nF = F.silu(x_nD @ self.w_gate_EDF[e]) * (x_nD @ self.w_up_EDF[e])
            y_ND.index_add_(0, token, (h_nF @ self.w_down_EFD[e]) * flat_w[slot].unsqueeze(-1))
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND


class TokenTable(nn.Module):
    """Rows looked up by token id: [V, d] (JTok) or a pool [n_e, V, d] (JTok-M)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class JTok(nn.Module):
    def __init__(self, config: JTokConfig):
        super().__init__()
        self.eps = config.jtok_eps
        self.table = TokenTable(config.vocab_size, config.hidden_size)
        self.scale = nn.Parameter(torch.full((config.hidden_size,), float(config.jtok_scale_init)))

    def forward(self, h_ND, m_ND, ids_N):
        """The next residual stream h~ + m * (1 + s * u / (||u|| + eps))."""
        u_ND = self.table.weight[ids_N]
        unit_ND = u_ND / (u_ND.norm(dim=-1, keepdim=True) + self.eps)
        return h_ND + m_ND * (1.0 + self.scale * unit_ND)


class JTokM(nn.Module):
    def __init__(self, config: JTokConfig):
        super().__init__()
        self.top_k, self.eps = config.jtokm_top_k, config.jtok_eps
        self.alpha = 1.0 / math.sqrt(2 * config.num_hidden_layers)
        self.tables = TokenTable(config.jtokm_tables, config.vocab_size, config.hidden_size)
        self.router = nn.Linear(config.hidden_size, config.jtokm_tables, bias=False)
        self.scale = nn.Parameter(torch.full((config.hidden_size,), float(config.jtokm_scale_init)))

    def forward(self, x_norm_ND, ids_N):
        """The residual term s / sqrt(2L) * e / (||e|| + eps) of the top-K routed tables' mixture e."""
        g_NE = self.router(x_norm_ND).float()
        top_g_NK, topk_idx_NK = g_NE.topk(self.top_k, dim=-1)
        gate_NK = top_g_NK.sigmoid()
        w_NK = (gate_NK / gate_NK.sum(-1, keepdim=True)).to(self.tables.weight.dtype)
        rows_NKD = self.tables.weight[topk_idx_NK, ids_N[:, None]]
        e_ND = (w_NK.unsqueeze(-1) * rows_NKD).sum(dim=1)
        r_ND = self.alpha * self.scale * (e_ND / (e_ND.norm(dim=-1, keepdim=True) + self.eps))
        return r_ND.to(x_norm_ND.dtype)


class Block(nn.Module):
    def __init__(self, config: JTokConfig):
        super().__init__()
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn = MoE(config) if config.ffn_kind == "moe" else SwiGLU(d, config.intermediate_size)
        self.jtok = JTok(config) if config.modulator == "jtok" else None
        self.jtok_m = JTokM(config) if config.modulator == "jtok_m" else None

    def forward(self, h_BTD, ids_BT, cos, sin, mask_B1TT):
        B, T, D = h_BTD.shape
        x_BTD = self.attn_norm(h_BTD)
        h_BTD = h_BTD + self.attn(x_BTD, cos, sin, mask_B1TT)
        h_ND, ids_N = h_BTD.reshape(B * T, D), ids_BT.reshape(B * T)
        m_ND = self.ffn(self.ffn_norm(h_ND))
        if self.jtok is not None:
            h_ND = self.jtok(h_ND, m_ND, ids_N)
        elif self.jtok_m is not None:
            # The router reads the attention's RMSNorm of the layer input (the choice project/model.py makes).
            h_ND = h_ND + m_ND + self.jtok_m(x_BTD.reshape(B * T, D), ids_N)
        else:
            h_ND = h_ND + m_ND
        return h_ND.view(B, T, D)


class JTokPreTrainedModel(PreTrainedModel):
    config_class = JTokConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The initialisation of project/model.py (GPT-2 style scaled output projections), for a fresh model."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, TokenTable):
            nn.init.normal_(module.weight, std=self.config.table_init_std)
        elif isinstance(module, SwiGLU):
            for linear, s in ((module.w_gate, std), (module.w_up, std), (module.w_down, out_std)):
                nn.init.normal_(linear.weight, std=s)
        elif isinstance(module, Attention):
            for linear, s in ((module.wq, std), (module.wk, std), (module.wv, std), (module.wo, out_std)):
                nn.init.normal_(linear.weight, std=s)
        elif isinstance(module, MoE):
            nn.init.normal_(module.router.weight, std=std)
            nn.init.normal_(module.w_gate_EDF, std=std)
            nn.init.normal_(module.w_up_EDF, std=std)
            nn.init.normal_(module.w_down_EFD, std=out_std)
            module.expert_bias.zero_()
        elif isinstance(module, JTok):
            module.scale.fill_(float(self.config.jtok_scale_init))
        elif isinstance(module, JTokM):
            nn.init.normal_(module.router.weight, std=std)
            module.scale.fill_(float(self.config.jtokm_scale_init))
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Linear) and module.weight.shape[0] == self.config.vocab_size:
            nn.init.normal_(module.weight, std=std)  # the untied output head


class JTokModel(JTokPreTrainedModel):
    """Token embedding, the decoder layers and the final norm."""

    def __init__(self, config: JTokConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        B, T = input_ids.shape
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:  # left padding: each sequence's positions count its own tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = None
        if padded:
            # Causal and not padding; a position always sees itself, so a padding row is never all masked (NaN).
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            keys_B1T = attention_mask.bool()[:, None, :]
            mask = (causal_TT & keys_B1T | torch.eye(T, dtype=torch.bool, device=input_ids.device))[:, None]
        h = self.tok_emb(input_ids)
        for block in self.layers:
            h = block(h, input_ids, cos, sin, mask)
        return self.norm(h)


class JTokForCausalLM(JTokPreTrainedModel, GenerationMixin):
    """The decoder and its output head (tied to the token embedding when tie_word_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: JTokConfig):
        super().__init__(config)
        self.model = JTokModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, logits_to_keep=0,
                **unused):  # fmt: skip
        """Logits [B, T, V] (the last `logits_to_keep` positions when > 0); with `labels`, the mean next-token loss."""
        if input_ids is None:
            raise ValueError("JTokForCausalLM needs input_ids: the token-indexed tables are looked up by token id")
        hidden = self.model(input_ids, attention_mask, position_ids)
        logits = self.lm_head(hidden if not logits_to_keep else hidden[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **unused)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **unused):
        """No KV cache: each generation step reads the whole sequence so far."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
