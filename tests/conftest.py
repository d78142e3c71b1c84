"""Shared fixtures: Hydra composition of the project's configs and a per-session data cache."""

from __future__ import annotations

import os
from pathlib import Path

# Triton decides when it is first imported whether kernels are compiled or interpreted; on these
# CPU-only machines the kernel tests run the real kernels through the interpreter. Setting it here,
# before any test module imports triton, is harmless elsewhere: CPU tensors never reach Triton
# unless JTOK_KERNELS=triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")


def offline_env(cache: Path) -> dict[str, str]:
    """Environment for `run.py` subprocesses: an isolated data cache, no Hugging Face Hub, one thread
    (tiny models run fastest on one, and two processes with two threads each thrash two cores)."""
    return {
        **os.environ,
        "JTOK_CACHE_DIR": str(cache / "jtok"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache / "hf"),
        "OMP_NUM_THREADS": "1",
    }


def run_py(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python run.py ARGS` from the repository root; with `check`, fail with its stderr unless it succeeds."""
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(autouse=True)
def seed_everything():
    """Every test starts from the same random state (torch, numpy, random), whichever tests ran before it:
    an unseeded `torch.randn` draws the same numbers on every run, alone or in the full suite."""
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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
