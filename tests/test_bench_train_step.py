"""The training-step benchmark (`python -m project.bench.train_step`): its table and its memory accounting."""

from __future__ import annotations

import csv

import pytest
import torch

from project.bench import train_step as bench
from project.config import ModelConfig


def test_train_step_benchmark_writes_its_table(tmp_path):
    rows = bench.main(["--quick", "--variants", "baseline,jtok,jtok_m", "--table-optimizers", "adamw,rowwise_adam",
                       "--vocab", "64", "--sweep-vocabs", "64,128", "--sweep-tables", "5,6", "--repeats", "2",
                       "--steps", "1", "--warmup", "1", "--out", str(tmp_path), "--name", "t"])  # fmt: skip
    keys = [(r["variant"], r["V"], r["n_e"], r["table_optimizer"]) for r in rows]
    default = [("baseline", 64, "-", "-"), ("jtok", 64, "-", "adamw"), ("jtok", 64, "-", "rowwise_adam"),
               ("jtok_m", 64, 5, "adamw"), ("jtok_m", 64, 5, "rowwise_adam")]  # fmt: skip
    sweep_tables = [("jtok_m", 64, 6, "adamw"), ("jtok_m", 64, 6, "rowwise_adam")]  # n_e 5 at V 64 is a default row
    sweep_vocab = [("baseline", 128, "-", "-"), ("jtok", 128, "-", "adamw"), ("jtok", 128, "-", "rowwise_adam"),
                   ("jtok_m", 128, 5, "adamw"), ("jtok_m", 128, 5, "rowwise_adam")]  # fmt: skip
    assert keys == default + sweep_tables + sweep_vocab
    assert all(r["step_ms"] > 0 and r["vs_baseline"] > 0 and r["memory_mib"] > 0 for r in rows)
    assert all(0 < float(lo) <= r["vs_baseline"] <= float(hi) for r in rows for lo, hi in [r["spread"].split("-")])
    assert [r["vs_baseline"] for r in rows if r["variant"] == "baseline"] == [1.0, 1.0]  # x / x in every repetition
    assert all((r["table_state_mib"] > 0) == (r["variant"] != "baseline") for r in rows)
    with open(tmp_path / "t.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == bench.FIELDS and len(written) == len(rows)
    md = (tmp_path / "t.md").read_text()
    assert "| variant | V | n_e | table_optimizer | step_ms |" in md and "| jtok_m | 128 | 5 | rowwise_adam |" in md


def table_state(table_optimizer: str) -> tuple[int, int]:
    """(all bytes, table-state bytes) after one real training step of a one-layer jtok model with d = 128."""
    cfg = ModelConfig(variant="jtok", vocab_size=256, d_model=128, n_layers=1, n_heads=4, max_seq_len=16)
    trainer = bench.Trainer(cfg, table_optimizer, torch.device("cpu"), "32-true", max_steps=10)
    ((inputs_BT, targets_BT),) = bench.zipf_batches(256, batch=2, seq_len=16, count=1)
    return trainer.step(inputs_BT, targets_BT, account=True)


def test_rowwise_adam_keeps_at_most_55_percent_of_dense_adamw_table_state():
    _, dense = table_state("adamw")
    _, rowwise = table_state("rowwise_adam")
    d = 128
    assert dense == pytest.approx(2 * 256 * d * 4, abs=16)  # exp_avg + exp_avg_sq [V, d] fp32, and the step count
    assert rowwise / dense <= 0.55  # exp_avg [V, d], exp_avg_sq and row_step [V]: (d + 2) / 2d = 0.508


def test_sparse_gradients_count_their_indices_and_values():
    grad = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.ones(2, 5), (10, 5), check_invariants=True).coalesce()
    assert bench.tensor_bytes(grad) == 2 * 8 + 2 * 5 * 4
    assert bench.tensor_bytes(torch.zeros(10, 5)) == 200
