"""run.py's stages end to end: train + eval offline over local benchmark copies, stage=eval on an
existing checkpoint, and a four-variant multirun followed by stage=report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmark_fixtures import write_benchmark_fixtures
from conftest import offline_env, run_py
from project.config import ConfigError
from stages import evaluate
BENCHMARKS = ("facts_qa", "facts_qa_heldout", "facts_qa_train", "mmlu", "arc_easy", "arc_challenge", "ceval")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return offline_env(tmp_path_factory.mktemp("stage_cache"))


@pytest.fixture(scope="module")
def benchmarks_dir(tmp_path_factory) -> Path:
    return write_benchmark_fixtures(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def trained(env, benchmarks_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "jtok_m"
    # The fixtures have 2 few-shot examples per subject: ask for 2 shots (the defaults are 5 / 25).
    shots = [f"eval.num_fewshot.{name}=2" for name in ("mmlu", "arc_easy", "arc_challenge", "ceval")]
    run_py(env, "experiment=smoke", "model=jtok_m", f"eval.data_dir={benchmarks_dir}", "eval.limit=4", *shots,
           f"hydra.run.dir={run_dir}")  # fmt: skip
    return run_dir


def test_train_ends_with_every_benchmark_scored_offline_from_local_copies(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert set(summary["eval"]) == set(BENCHMARKS) | {"facts_bits"}
    bits = summary["eval"]["facts_bits"]
    assert bits["status"] == "ok" and bits["facts"] == 40 * 5 and bits["prior_bits"] > 0
    assert bits["bits_train"] <= bits["prior_bits_train"] + 1e-6  # log-probs are <= 0
    for name in BENCHMARKS:
        entry = summary["eval"][name]
        assert entry["status"] == "ok", (name, entry)
        assert 0.0 <= entry["acc"] <= 1.0 and entry["n_samples"] > 0
    assert summary["eval"]["mmlu"]["num_fewshot"] == 2 and summary["eval"]["facts_qa"]["num_fewshot"] == 0
    stored = json.loads((trained / "eval.json").read_text())
    assert stored["summary"] == summary["eval"] and stored["hub_offline"] is True


def test_stage_eval_updates_the_run_and_fails_fast_on_a_missing_benchmark_asked_for(trained, env):
    ckpt = trained / "checkpoints" / "last.ckpt"
    before = json.loads((trained / "summary.json").read_text())
    run_py(env, "stage=eval", f"ckpt_path={ckpt}", "experiment=smoke", "eval.benchmarks=[facts_qa]",
           f"hydra.run.dir={trained.parent / 'eval_stage'}")  # fmt: skip
    after = json.loads((trained / "summary.json").read_text())
    assert set(after["eval"]) == {"facts_qa", "facts_qa_heldout", "facts_qa_train", "facts_bits"}
    assert before["eval"]["facts_qa"]["limit"] == 4 and after["eval"]["facts_qa"]["limit"] is None  # re-scored
    # stage=eval rewrites only summary["eval"]: val_loss is the stored float read back from JSON, not recomputed
    assert after["eval"]["facts_qa"]["status"] == "ok" and after["val_loss"] == before["val_loss"]

    start = time.perf_counter()
    proc = run_py(env, "stage=eval", f"ckpt_path={ckpt}", "experiment=smoke", "eval.benchmarks=[arc_easy]",
                  f"hydra.run.dir={trained.parent / 'eval_missing'}", check=False)  # fmt: skip
    assert proc.returncode != 0 and time.perf_counter() - start < 60
    assert "allenai/ai2_arc" in proc.stderr and "eval.data_dir" in proc.stderr
    assert json.loads((trained / "summary.json").read_text()) == after  # nothing half-written


def test_stage_eval_refuses_an_unreadable_checkpoint(env, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"\x00garbage")
    proc = run_py(env, "stage=eval", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "broken.ckpt is not a readable PyTorch checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr  # a user error: one message, no traceback


def test_stage_eval_with_eval_disabled_is_a_user_error_not_a_silent_success(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="stage=eval with eval.enabled=false has nothing to do"):
        evaluate(make_cfg("stage=eval", f"ckpt_path={tmp_path / 'any.ckpt'}", "eval.enabled=false"))


def test_four_variant_multirun_then_report(env, tmp_path):
    sweep = tmp_path / "sweep"
    run_py(env, "-m", "experiment=smoke", "model=baseline,jtok,jtok_m,moe", "eval.benchmarks=[facts_qa]",
           f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert len(list(sweep.glob("*/summary.json"))) == 4
    out = tmp_path / "report"
    run_py(env, "stage=report", f"runs={sweep}", f"report_dir={out}", f"hydra.run.dir={tmp_path / 'r'}")
    table = (out / "report.md").read_text()
    for variant in ("baseline", "jtok", "jtok_m", "moe"):
        assert f"| {variant} " in table
    rows = (out / "report.csv").read_text().splitlines()
    assert len(rows) == 5 and "facts_qa" in rows[0]
    assert (out / "val_loss_vs_steps.png").stat().st_size > 0 and (out / "val_loss_vs_flops.png").stat().st_size > 0
