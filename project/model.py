"""The decoder: a pre-norm Llama-style transformer whose FFN slot is dense or MoE, optionally
modulated per layer by token-indexed parameters (JTok or JTok-M), as in docs/METHOD.md.

Shape suffixes: B batch, T time, D d_model, N tokens (B*T), V vocabulary, E experts or tables,
K selected per token, F hidden size, H heads, Hd head size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.reference import expert_counts
from project.config import ModelConfig
from project.kv_cache import KVCache
from project.table_parallel import Route, RowShard, TableExchange, Uncast, fetch_rows, premix
from project.token_table import TokenTable


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # scalar: the sum of all load-balancing losses


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [T, Hd/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHTd: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head vector by the position's angles."""
    x1, x2 = x_BHTd.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_Th - x2 * sin_Th, x2 * cos_Th + x1 * sin_Th), dim=-1)
    return rotated.to(x_BHTd.dtype)


class ServedRows(NamedTuple):
    """Token-table rows gathered ahead of a step (tables kept in host memory, `project.generate.HostTables`; JTok's
    row-sharded tables): `ids_BT` index the gathered rows, `weights[l]` is layer l's `[U, d]` (JTok) or `[n_e, U, d]`
    (JTok-M), possibly wrapped in `Uncast`."""

    ids_BT: torch.Tensor
    weights: list[torch.Tensor]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE and optional grouped-query heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:  # fmt: skip
        """`cos`/`sin`: the rotary tables [max_seq_len, Hd/2]; with a cache, each token's own [B, 1, T, Hd/2]."""
        B, T, _ = x_BTD.shape
        if cache is None:
            cos, sin = cos[:T], sin[:T]
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask_B1TS, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """The dense FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def switch_aux_loss(probs_NE: torch.Tensor, topk_idx_NK: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing term `n * sum_i f_i * P_i` (1.0 when perfectly balanced).

    f_i is the fraction of the N*K routing slots that chose i, P_i the mean routing probability.
    """
    n = probs_NE.shape[-1]
    counts_E = expert_counts(topk_idx_NK, n).to(probs_NE.dtype)
    slots = counts_E.sum()  # = N*K, computed on the device (a tensor built from a Python number would copy from the host)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # f is a count over the global batch (P's gradient is averaged by data parallelism), so the
        # loss equals the single-device loss on the same global batch.
        stats = torch.cat([counts_E, slots[None]])
        torch.distributed.all_reduce(stats)
        counts_E, slots = stats[:-1], stats[-1]
    return n * (counts_E / slots * probs_NE.mean(dim=0)).sum()


class MoE(nn.Module):
    """Shared experts plus token-choice top-k routed SwiGLU experts, with Switch aux loss and/or
    the aux-loss-free expert bias (which shifts only the selection, not the weights)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, E, Fe = cfg.d_model, cfg.n_routed_experts, cfg.routed_hidden
        self.top_k, self.score = cfg.moe_top_k, cfg.router_score
        self.aux_coef, self.bias_rate = cfg.moe_aux_loss_coef, cfg.moe_bias_update_rate
        self.router = nn.Linear(D, E, bias=False)
        # n shared experts of width Fe are one SwiGLU of width n*Fe.
        self.shared = SwiGLU(D, cfg.n_shared_experts * Fe) if cfg.n_shared_experts else None
        self.w_gate_EDF = nn.Parameter(torch.empty(E, D, Fe))
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, Fe))
        self.w_down_EFD = nn.Parameter(torch.empty(E, Fe, D))
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_NE = self.router(x_ND).float()
        scores_NE = logits_NE.softmax(-1) if self.score == "softmax" else logits_NE.sigmoid()
        topk_idx_NK = (scores_NE + self.expert_bias).topk(self.top_k, dim=-1).indices
        topk_w_NK = scores_NE.gather(-1, topk_idx_NK)
        topk_w_NK = topk_w_NK / topk_w_NK.sum(-1, keepdim=True)
        aux = x_ND.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_coef > 0:
            probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
            aux = self.aux_coef * switch_aux_loss(probs_NE, topk_idx_NK)
        if self.training and self.bias_rate > 0:
            self.expert_load += expert_counts(topk_idx_NK, self.expert_load.numel())
        y_ND = kernels.moe_experts(
            x_ND, topk_idx_NK, topk_w_NK.to(x_ND.dtype), self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD,
            validate=False,
        )
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND, aux

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing: nudge under-loaded experts up, over-loaded ones down.

        The load is summed over data-parallel ranks first, so every rank keeps the same bias."""
        if self.bias_rate <= 0:
            return
        load = self.expert_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
        load.zero_()


class JTok(nn.Module):
    """JTok: h_next = h~ + m * (1 + s * u/(||u|| + eps)), u = E[x_t]."""

    def __init__(self, cfg: ModelConfig, deferred_tables: bool = False):
        super().__init__()
        self.eps = cfg.jtok_eps
        self.table = TokenTable(cfg.vocab_size, cfg.d_model, init_std=cfg.table_init_std, deferred=deferred_tables)
        self.scale = nn.Parameter(torch.full((cfg.d_model,), float(cfg.jtok_scale_init)))

    def forward(self, h_ND: torch.Tensor, m_ND: torch.Tensor, ids_N: torch.Tensor,
                table_VD: torch.Tensor | Uncast | None = None) -> torch.Tensor:  # fmt: skip
        """`table_VD` replaces the own table with rows gathered ahead (then `ids_N` index those)."""
        own = table_VD is None
        table_VD = self.table.rows() if own else table_VD.tensor if isinstance(table_VD, Uncast) else table_VD
        out_ND = kernels.jtok_gate(m_ND, ids_N, table_VD, self.scale, self.eps, residual_ND=h_ND, validate=False,
                                   sparse_grad=self.table.sparse_grad and own)  # fmt: skip
        return out_ND.to(h_ND.dtype)  # a table kept out of mixed precision (row-sparse under FSDP) stays fp32


class JTokM(nn.Module):
    """JTok-M: r = s/sqrt(2L) * e/(||e|| + eps), e = sum over the top-K routed tables of w_i E_i[x_t]."""

    def __init__(self, cfg: ModelConfig, deferred_tables: bool = False):
        super().__init__()
        self.top_k, self.eps, self.aux_coef = cfg.jtokm_top_k, cfg.jtok_eps, cfg.jtokm_aux_loss_coef
        self.alpha = 1.0 / math.sqrt(2 * cfg.n_layers)
        self.tables = TokenTable(cfg.jtokm_tables, cfg.vocab_size, cfg.d_model, init_std=cfg.table_init_std,
                                 deferred=deferred_tables)
        self.router = nn.Linear(cfg.d_model, cfg.jtokm_tables, bias=False)
        self.scale = nn.Parameter(torch.full((cfg.d_model,), float(cfg.jtokm_scale_init)))

    def forward(self, x_norm_ND: torch.Tensor, ids_N: torch.Tensor, tables_EVD: torch.Tensor | None = None,
                route: Route | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """`tables_EVD` replaces the own tables with rows gathered ahead (then `ids_N` index those); with a
        `route` (row-sharded tables), the owners of the ids mix the rows (`project.table_parallel.premix`)."""
        own = tables_EVD is None and route is None
        g_NE = self.router(x_norm_ND).float()
        top_g_NK, topk_idx_NK = g_NE.topk(self.top_k, dim=-1)
        gate_NK = top_g_NK.sigmoid()
        topk_w_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
        aux = x_norm_ND.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_coef > 0:
            aux = self.aux_coef * switch_aux_loss(g_NE.softmax(-1), topk_idx_NK)
        if route is not None:
            e_ND = premix(route, self.tables.weight, topk_idx_NK, topk_w_NK)
            r_ND = self.alpha * self.scale * (e_ND / (e_ND.norm(dim=-1, keepdim=True) + self.eps))
            return r_ND.to(x_norm_ND.dtype), aux
        tables_EVD = self.tables.rows() if tables_EVD is None else tables_EVD
        r_ND = kernels.jtok_m_mix(
            ids_N, tables_EVD, topk_idx_NK, topk_w_NK.to(tables_EVD.dtype), self.scale,
            self.alpha, self.eps, validate=False, sparse_grad=self.tables.sparse_grad and own,
        )
        return r_ND.to(x_norm_ND.dtype), aux


class Block(nn.Module):
    """One decoder layer: attention, FFN (dense or MoE), and the optional token-indexed modulator."""

    def __init__(self, cfg: ModelConfig, deferred_tables: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.ffn_kind == "moe" else SwiGLU(cfg.d_model, cfg.dense_hidden)
        self.jtok = JTok(cfg, deferred_tables) if cfg.modulator == "jtok" else None
        self.jtok_m = JTokM(cfg, deferred_tables) if cfg.modulator == "jtok_m" else None

    def forward(self, h_BTD, ids_BT, cos, sin, cache: KVCache | None = None, layer: int = 0,
                table: torch.Tensor | Uncast | None = None,
                route: Route | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        B, T, D = h_BTD.shape
        x_BTD = self.attn_norm(h_BTD)
        h_BTD = h_BTD + self.attn(x_BTD, cos, sin, cache, layer)
        h_ND, ids_N = h_BTD.reshape(B * T, D), ids_BT.reshape(B * T)
        ffn_in_ND = self.ffn_norm(h_ND)
        if isinstance(self.ffn, MoE):
            m_ND, aux = self.ffn(ffn_in_ND)
        else:
            m_ND, aux = self.ffn(ffn_in_ND), h_ND.new_zeros((), dtype=torch.float32)
        if self.jtok is not None:
            h_ND = self.jtok(h_ND, m_ND, ids_N, table)
        elif self.jtok_m is not None:
            # The router reads RMSNorm(h) of the layer input; the attention's norm is reused for it (choice).
            r_ND, aux_m = self.jtok_m(x_BTD.reshape(B * T, D), ids_N, table, route)
            h_ND, aux = h_ND + m_ND + r_ND, aux + aux_m
        else:
            h_ND = h_ND + m_ND
        return h_ND.view(B, T, D), aux


class Transformer(nn.Module):
    """Token embedding, L blocks, final norm and output head (tied to the embedding by default)."""

    def __init__(self, cfg: ModelConfig, deferred_tables: bool = False):
        """`deferred_tables`: the token tables get no storage until `shard_token_tables` (row-sharded tables)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, deferred_tables) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.table_exchange: TableExchange | None = None  # set by `shard_token_tables`
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, output projections scaled by 1/sqrt(2L) (GPT-2 style),
        Normal(0, table_init_std) token tables; norms and scales keep their constructor values."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, TokenTable):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                is_out = name.endswith(("wo", "w_down"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w_gate_EDF, std=std)
                nn.init.normal_(module.w_up_EDF, std=std)
                nn.init.normal_(module.w_down_EFD, std=out_std)

    def forward(self, ids_BT: torch.Tensor, cache: KVCache | None = None, valid_BT: torch.Tensor | None = None,
                served: ServedRows | None = None, last_only: bool = False) -> ModelOutput:  # fmt: skip
        """Logits of every position (of the last only with `last_only`).

        With a `cache` (incremental decoding), `ids_BT` are the next T tokens of each row, `valid_BT`
        marks which are real (default: all), and the cache advances by T. `served` supplies the token
        tables' rows gathered ahead of the step (host-memory tables)."""
        B, T = ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        if self.cfg.check_token_ids:
            kernels.check_ids(ids_BT, self.cfg.vocab_size, "model")
        cos, sin = self.rope_cos, self.rope_sin
        if cache is not None:
            valid_BT = torch.ones_like(ids_BT, dtype=torch.bool) if valid_BT is None else valid_BT
            pos_BT = cache.begin(valid_BT)
            cos, sin = self.rope_cos[pos_BT][:, None], self.rope_sin[pos_BT][:, None]
        if self.table_exchange is not None and served is None:
            served, route = self._exchange_tables(ids_BT)
        else:
            route = None
        table_ids_BT = ids_BT if served is None else served.ids_BT
        h_BTD = self.tok_emb(ids_BT)
        aux = h_BTD.new_zeros((), dtype=torch.float32)
        for layer, block in enumerate(self.layers):
            table = None if served is None else served.weights[layer]
            h_BTD, block_aux = block(h_BTD, table_ids_BT, cos, sin, cache, layer, table, route)
            aux = aux + block_aux
        if cache is not None:
            cache.end(T)
        if last_only:
            h_BTD = h_BTD[:, -1:]
        return ModelOutput(self.lm_head(self.norm(h_BTD)), aux)

    def _exchange_tables(self, ids_BT: torch.Tensor) -> tuple[ServedRows | None, Route | None]:
        """Row-sharded tables: route the ids to their owners once for every layer; JTok fetches all layers' rows
        now (`ServedRows`), JTok-M hands the route to each layer, whose owners pre-mix its rows."""
        per_token = self.cfg.modulator == "jtok_m"
        route = self.table_exchange.route(ids_BT.reshape(-1), per_token)
        if per_token:
            return None, route
        rows_ULD = fetch_rows(route, [block.jtok.table.weight for block in self.layers])
        return ServedRows(route.inverse_N.view(ids_BT.shape), [Uncast(rows) for rows in rows_ULD.unbind(1)]), None

    def shard_token_tables(self, shard: RowShard, seed: int) -> None:
        """Row-shard every token table: keep the rows `shard` gives this rank (initialised from `seed`, the same
        values whatever the world size) and exchange rows with the other ranks in forward and backward."""
        if self.cfg.modulator == "none":
            return
        for index, table in enumerate(self.token_tables()):
            table.take_rows(shard, seed * 1009 + index)
        self.table_exchange = TableExchange(shard)

    def token_tables(self) -> list[TokenTable]:
        """Every layer's token-indexed table (JTok) or pool of tables (JTok-M)."""
        return [m for m in self.modules() if isinstance(m, TokenTable)]

    def use_row_sparse_grads(self, sparse: bool) -> None:
        """Make every token table's gradient row-sparse (or dense), as a row-sparse `optim.table_optimizer` needs."""
        for table in self.token_tables():
            table.sparse_grad = sparse

    def update_router_biases(self) -> None:
        """Apply the aux-loss-free bias step of every MoE layer (call once per optimizer step)."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.update_bias()
