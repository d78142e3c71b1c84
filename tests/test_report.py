"""The ablation report over hand-written fake runs: table, deltas against the baseline, CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from eval.report import build_report

FLOPS_PER_TOKEN = {"baseline": 1000, "jtok": 1100, "jtok_m": 1200, "moe": 900}


def make_run(folder: Path, variant: str, seed: int, val_loss: float, mmlu: float | None, facts: float,
             metrics: bool = True) -> Path:  # fmt: skip
    """A run folder with the summary.json the train stage writes and a CSVLogger-style metrics.csv."""
    folder.mkdir(parents=True)
    evals = {
        "facts_qa": {"status": "ok", "acc": facts, "stderr": 0.02, "num_fewshot": 0, "n_samples": 500},
        "mmlu": {"status": "ok", "acc": mmlu, "stderr": 0.01, "num_fewshot": 5, "n_samples": 14042}
        if mmlu is not None
        else {"status": "unavailable", "reason": "offline"},
    }
    summary = {
        "variant": variant, "seed": seed,
        "params": {"total": 2_000_000, "backbone": 1_000_000, "token_indexed": 1_000_000, "active_per_token": 900_000},
        "flops_per_token": FLOPS_PER_TOKEN[variant], "train_tokens": 4000, "steps": 40,
        "val_loss": val_loss, "val_ppl": 2.718281828 ** val_loss, "tokens_per_sec": 12345.6, "eval": evals,
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    if metrics:
        rows = ["epoch,step,train/loss,train_tokens,val/loss"]
        for step in range(0, 40, 10):
            rows.append(f"0,{step},{5 - step / 20},{(step + 1) * 100},")
            rows.append(f"0,{step + 9},,,{val_loss + (40 - step) / 40}")
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    sweep = tmp_path / "runs" / "multirun_2026"
    make_run(sweep / "0_baseline_s0", "baseline", 0, 3.00, 0.25, 0.40)
    make_run(sweep / "1_jtok_s0", "jtok", 0, 2.90, 0.27, 0.50)
    make_run(sweep / "2_jtok_m_s0", "jtok_m", 0, 2.95, None, 0.45, metrics=False)
    make_run(sweep / "3_baseline_s1", "baseline", 1, 3.10, 0.23, 0.42)
    make_run(sweep / "4_jtok_s1", "jtok", 1, 3.00, 0.26, 0.47)
    make_run(tmp_path / "runs" / "2026-11-23_moe_s0", "moe", 0, 2.80, 0.30, 0.60)  # its own sweep: no baseline
    return tmp_path / "runs"


def test_table_deltas_csv_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    report = build_report([str(runs / "multirun_*"), str(runs / "2026-*_moe_s0" / "summary.json")], out)
    assert report["runs"] == 6 and report["benchmarks"] == ["facts_qa", "mmlu"]
    rows = {(r["variant"], r["seed"]): r for r in report["rows"]}
    assert rows[("jtok", 0)]["delta_val_loss"] == pytest.approx(-0.10)  # against the baseline of seed 0
    assert rows[("jtok", 1)]["delta_val_loss"] == pytest.approx(-0.10)  # against the baseline of seed 1
    assert rows[("jtok", 0)]["delta_facts_qa_acc"] == pytest.approx(0.10)
    assert rows[("jtok", 1)]["delta_mmlu_acc"] == pytest.approx(0.03)
    assert rows[("baseline", 0)]["delta_val_loss"] == 0
    assert rows[("jtok_m", 0)]["mmlu_acc"] is None and rows[("jtok_m", 0)]["delta_mmlu_acc"] is None
    assert rows[("moe", 0)]["delta_val_loss"] is None  # no baseline in its sweep
    assert rows[("jtok", 0)]["params_token_indexed"] == 1_000_000 and rows[("jtok", 0)]["flops_per_token"] == 1100

    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and [r["variant"] for r in table[1:3]] == ["baseline", "baseline"]
    jtok = next(r for r in table if r["variant"] == "jtok" and r["seed"] == "0")
    assert float(jtok["delta_val_loss"]) == pytest.approx(-0.10) and float(jtok["mmlu_stderr"]) == 0.01
    assert next(r for r in table if r["variant"] == "moe")["delta_val_loss"] == ""

    md = (out / "report.md").read_text()
    assert "| multirun_2026 | jtok | 0 | 2M | 1M | 1M | 900K | 1.1K | 4K | 2.9000 |" in md
    assert "0.270 ± 0.010" in md and "+0.020" in md and "n/a" in md
    assert report["markdown"] in capsys.readouterr().out

    plots = [Path(p) for p in report["files"]["plots"]]
    assert [p.name for p in plots] == ["val_loss_vs_steps.png", "val_loss_vs_flops.png"]
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))  # atomic writes left no temporaries


def test_flops_come_from_logged_train_tokens(runs):
    from eval.report import load_runs, val_curve

    run = next(r for r in load_runs([str(runs / "multirun_2026" / "1_jtok_s0")]))
    points = val_curve(run)
    assert [p[0] for p in points] == [9, 19, 29, 39]
    # train_tokens is logged at steps 0, 10, 20, 30 as (step + 1) * 100: interpolated at step 9 -> 1000
    assert points[0][2] == pytest.approx(1000 * 1100)
    assert points[-1][2] == pytest.approx(3100 * 1100)  # past the last logged step: the last value


def test_no_matching_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs found"):
        build_report([str(tmp_path / "nothing-*")], tmp_path / "out")
