"""Model configuration and the variant table: the one place a variant name becomes an architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

# variant -> (FFN kind, token-indexed modulator)
VARIANTS: dict[str, tuple[str, str]] = {
    "baseline": ("dense", "none"),
    "jtok": ("dense", "jtok"),
    "jtok_m": ("dense", "jtok_m"),
    "moe": ("moe", "none"),
    "moe_jtok": ("moe", "jtok"),
    "moe_jtok_m": ("moe", "jtok_m"),
}


USER_ERROR = 2  # the exit status of a command line that stops on a UserError


class UserError(Exception):
    """A mistake in the user's settings or files: `run.py` prints its message alone and exits with status 2
    (every other exception is a bug and keeps its traceback)."""


class ConfigError(UserError, ValueError):
    """An inconsistent or unknown model/training setting."""


def settings_from_dict(cls: type[T], values: Mapping[str, Any], section: str) -> T:
    """Build the settings dataclass `cls` from a config section, naming any unknown key and the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} settings {unknown}; valid ones: {sorted(known)}")
    return cls(**dict(values))


@dataclass
class ModelConfig:
    """Every architecture hyper-parameter; `configs/model/*.yaml` mirror these fields."""

    variant: str = "baseline"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_hidden: int | None = None  # None = about 8/3 d rounded up to a multiple of 64
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    check_token_ids: bool = True  # validate ids once per forward (host-side on CPU, a device-side assert on CUDA)

    # MoE FFN: n_shared always-on experts + n_routed token-choice top-k experts
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    moe_top_k: int = 2
    expert_hidden: int | None = None  # None = ffn_hidden // (n_shared_experts + moe_top_k)
    router_score: str = "softmax"  # softmax | sigmoid
    moe_aux_loss_coef: float = 0.01  # Switch-style loss weight (0 disables it)
    moe_bias_update_rate: float = 0.0  # aux-loss-free expert-bias step per optimizer step (0 disables it)

    # JTok: one [V, d] table and a scale s per layer, gating the FFN update
    jtok_scale_init: float = 1.0
    jtok_eps: float = 1e-6
    table_init_std: float = 1.0

    # JTok-M: n_e tables per layer, top-K routed, added as a residual scaled by 1/sqrt(2L)
    jtokm_tables: int = 5
    jtokm_top_k: int = 2
    jtokm_aux_loss_coef: float = 1e-4
    jtokm_scale_init: float = 1.0

    @property
    def ffn_kind(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def modulator(self) -> str:
        return VARIANTS[self.variant][1]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dense_hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(8 * self.d_model / 3) // 64) * 64

    @property
    def routed_hidden(self) -> int:
        return self.expert_hidden or max(1, self.dense_hidden // (self.n_shared_experts + self.moe_top_k))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        cfg = settings_from_dict(cls, values, "model")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_optional_sizes(self) -> None:
        """Sizes where null means a default: 0 or a negative is refused, not silently taken as the default."""
        defaults = {
            "n_kv_heads": "n_heads, no grouped-query attention",
            "ffn_hidden": "about 8/3 d_model rounded up to a multiple of 64",
            "expert_hidden": "ffn_hidden // (n_shared_experts + moe_top_k)",
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(
                    f"model.{name} must be a positive integer or null (null = {default}), got {value!r}"
                )

    def _check_scalars(self) -> None:
        """Standard deviations, epsilons, rates and loss weights that torch would take, or fail on, silently."""
        for name in ("init_std", "norm_eps", "jtok_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        for name in ("table_init_std", "moe_aux_loss_coef", "moe_bias_update_rate", "jtokm_aux_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")

    def validate(self) -> None:
        """Raise ConfigError for an unknown variant or settings that cannot build a model."""
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; valid variants: {', '.join(VARIANTS)}")
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        self._check_optional_sizes()
        self._check_scalars()
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head size d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        if self.ffn_kind == "moe":
            if self.n_routed_experts < 1:
                raise ConfigError(f"model.n_routed_experts must be >= 1, got {self.n_routed_experts}")
            if not 1 <= self.moe_top_k <= self.n_routed_experts:
                raise ConfigError(
                    f"model.moe_top_k={self.moe_top_k} must be in [1, n_routed_experts={self.n_routed_experts}]"
                )
            if self.n_shared_experts < 0:
                raise ConfigError(f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
            if self.router_score not in ("softmax", "sigmoid"):
                raise ConfigError(f"model.router_score must be softmax or sigmoid, got {self.router_score!r}")
        if self.modulator == "jtok_m":
            if self.jtokm_tables < 1:
                raise ConfigError(f"model.jtokm_tables (n_e) must be >= 1, got {self.jtokm_tables}")
            if not 1 <= self.jtokm_top_k <= self.jtokm_tables:
                raise ConfigError(
                    f"model.jtokm_top_k (K={self.jtokm_top_k}) must be in [1, jtokm_tables (n_e={self.jtokm_tables})]"
                )


def check_seq_len(seq_len: int, max_seq_len: int) -> None:
    """Refuse training windows longer than the model's context (before any data is prepared)."""
    if seq_len > max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} is longer than model.max_seq_len={max_seq_len}: the model cannot read such "
            f"windows; lower data.seq_len or raise model.max_seq_len"
        )
