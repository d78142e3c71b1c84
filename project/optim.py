"""Optimizer parameter groups and learning-rate schedules (warm-up + cosine, WSD)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from project.config import ConfigError, settings_from_dict
from project.table_optim import STATE_DTYPES, TABLE_OPTIMIZERS, AdamWWithRowSparseTables

SCHEDULES = ("cosine", "wsd", "constant")
# What a checkpoint saved before a setting existed was trained with (compared on resume).
SETTINGS_BEFORE_THEY_EXISTED = {"table_optimizer": "adamw", "table_state_dtype": "float32"}


@dataclass
class OptimConfig:
    """AdamW and schedule settings; `configs/optim/*.yaml` mirror these fields."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # Token-indexed tables and their scales s_l get their own learning-rate multipliers (docs/METHOD.md):
    # at 1x, s_l barely moves from its initial value in short runs.
    table_lr_mult: float = 10.0
    table_weight_decay: float = 0.0
    # adam / rowwise_adam: row-sparse gradients and an update of the touched rows only (project/table_optim.py),
    # so a step's cost does not grow with V or n_e; adamw: dense table gradients and AdamW.
    table_optimizer: str = "adam"
    table_state_dtype: str = "float32"  # the row-sparse optimizers' state: float32 | bfloat16
    scale_lr_mult: float = 10.0
    schedule: str = "cosine"
    warmup_steps: int | float = 0.05  # an int is steps, a float in [0, 1) a fraction of max_steps
    decay_fraction: float = 0.2  # WSD: the final fraction of steps that decays
    min_lr_ratio: float = 0.1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OptimConfig":
        cfg = settings_from_dict(cls, {k: (tuple(v) if k == "betas" else v) for k, v in values.items()}, "optim")
        if cfg.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if cfg.table_optimizer not in TABLE_OPTIMIZERS:
            raise ConfigError(f"optim.table_optimizer={cfg.table_optimizer!r} is not one of {', '.join(TABLE_OPTIMIZERS)}")
        if cfg.table_state_dtype not in STATE_DTYPES:
            raise ConfigError(f"optim.table_state_dtype={cfg.table_state_dtype!r} is not one of {', '.join(STATE_DTYPES)}")
        if not 0.0 <= cfg.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {cfg.decay_fraction}")
        return cfg

    @property
    def row_sparse_tables(self) -> bool:
        """Whether the token tables train on row-sparse gradients (any table optimizer but dense adamw)."""
        return self.table_optimizer != "adamw"


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Four groups: matrices (decay), norms/biases (no decay), token tables, token-indexed scales."""
    from project.model import JTok, JTokM, TokenTable

    tables, scales = set(), set()
    for module in model.modules():
        if isinstance(module, TokenTable):
            tables.add(id(module.weight))
        elif isinstance(module, (JTok, JTokM)):
            scales.add(id(module.scale))
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "no_decay": [], "tables": [], "scales": []}
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        if id(p) in tables:
            groups["tables"].append(p)
        elif id(p) in scales:
            groups["scales"].append(p)
        elif p.dim() >= 2:
            groups["matrices"].append(p)
        else:
            groups["no_decay"].append(p)
    settings = {
        "matrices": dict(lr_mult=1.0, weight_decay=cfg.weight_decay),
        "no_decay": dict(lr_mult=1.0, weight_decay=0.0),
        "tables": dict(lr_mult=cfg.table_lr_mult, weight_decay=cfg.table_weight_decay,
                       **(dict(table_optimizer=cfg.table_optimizer, state_dtype=cfg.table_state_dtype)
                          if cfg.row_sparse_tables else {})),
        "scales": dict(lr_mult=cfg.scale_lr_mult, weight_decay=0.0),
    }
    return [
        {"name": name, "params": params, "lr": cfg.lr * settings[name]["lr_mult"], **settings[name]}
        for name, params in groups.items()
        if params
    ]


def lr_factor(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """The multiplier of the base learning rate at `step` (0-based)."""
    warmup = int(cfg.warmup_steps * max_steps) if isinstance(cfg.warmup_steps, float) else int(cfg.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)  # WSD: warm-up, stable, linear decay
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1 - floor) * progress


def build_optimizer(model: nn.Module, cfg: OptimConfig, max_steps: int):
    """AdamW over `param_groups` (the tables' group row-sparse with `table_optimizer` adam / rowwise_adam)
    with a LambdaLR following `lr_factor`."""
    groups = param_groups(model, cfg)
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    optimizer = AdamWWithRowSparseTables if cfg.row_sparse_tables else torch.optim.AdamW
    opt = optimizer(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, max_steps, cfg))
    return opt, sched
