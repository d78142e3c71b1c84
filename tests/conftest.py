"""Shared fixtures: Hydra composition of the project's configs and a per-session data cache."""

from __future__ import annotations

import os
from pathlib import Path

# Triton decides when it is first imported whether kernels are compiled or interpreted; on these
# CPU-only machines the kernel tests run the real kernels through the interpreter. Setting it here,
# before any test module imports triton, is harmless elsewhere: CPU tensors never reach Triton
# unless JTOK_KERNELS=triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the whole test session, so each corpus is tokenized once."""
    return tmp_path_factory.mktemp("jtok_cache")


@pytest.fixture
def make_cfg(data_cache, tmp_path):
    """compose(overrides) -> the project's config with `experiment=smoke`, no eval stage, a tmp run dir and the shared cache."""

    def _compose(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["experiment=smoke", "eval.enabled=false", *overrides])
        with open_dict(cfg):
            cfg.run_dir = str(run_dir or tmp_path / "run")
            cfg.data.cache_dir = str(data_cache)
        return cfg

    return _compose
