"""The ablation report over hand-written fake runs: table, deltas against the baseline, CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
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
    assert rows[("baseline", 0)]["delta_val_loss"] == 0  # x - sum([x]) / 1 == x - x == 0 exactly
    assert rows[("jtok_m", 0)]["mmlu_acc"] is None and rows[("jtok_m", 0)]["delta_mmlu_acc"] is None
    assert rows[("moe", 0)]["delta_val_loss"] is None  # no baseline in its sweep
    assert rows[("jtok", 0)]["params_token_indexed"] == 1_000_000 and rows[("jtok", 0)]["flops_per_token"] == 1100

    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and [r["variant"] for r in table[1:3]] == ["baseline", "baseline"]
    jtok = next(r for r in table if r["variant"] == "jtok" and r["seed"] == "0")
    assert float(jtok["delta_val_loss"]) == pytest.approx(-0.10) and float(jtok["mmlu_stderr"]) == 0.01  # copied
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
    from eval.report.curves import val_curve
    from eval.report.runs import load_runs

    run = next(r for r in load_runs([str(runs / "multirun_2026" / "1_jtok_s0")]))
    points = val_curve(run)
    assert [p[0] for p in points] == [9, 19, 29, 39]
    # train_tokens is logged at steps 0, 10, 20, 30 as (step + 1) * 100: interpolated at step 9 -> 1000
    assert points[0][2] == pytest.approx(1000 * 1100)
    assert points[-1][2] == pytest.approx(3100 * 1100)  # past the last logged step: the last value


def test_corrupt_or_incomplete_summaries_are_skipped_with_a_warning(runs, tmp_path, caplog):
    """Item 11: a truncated summary.json and one missing required keys are named and skipped, not fatal or blank."""
    sweep = runs / "multirun_2026"
    (sweep / "9_broken").mkdir()
    (sweep / "9_broken" / "summary.json").write_text('{"variant": "jtok", "seed": 0, "val_lo')
    (sweep / "8_partial").mkdir()
    (sweep / "8_partial" / "summary.json").write_text(json.dumps({"variant": "jtok", "eval": {}}))
    (sweep / "7_list").mkdir()
    (sweep / "7_list" / "summary.json").write_text("[1, 2]")
    report = build_report([str(sweep)], tmp_path / "out")
    assert report["runs"] == 5 and all(r["variant"] for r in report["rows"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    broken = next(w for w in warnings if "9_broken" in w)
    assert "summary.json" in broken and "not valid JSON" in broken
    partial = next(w for w in warnings if "8_partial" in w)
    assert "seed" in partial and "val_loss" in partial and "missing" in partial
    assert any("7_list" in w and "not a JSON object" in w for w in warnings)
    with pytest.raises(FileNotFoundError, match="no usable runs.*9_broken"):
        build_report([str(sweep / "9_broken")], tmp_path / "out2")


def test_no_matching_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs found"):
        build_report([str(tmp_path / "nothing-*")], tmp_path / "out")


# ---------------------------------------------------------------- the analyses over synthetic runs with known answers


def fake_run(folder: Path, variant: str, seed: int, val_loss: float, *, model: dict | None = None,
             budget: float | None = None, params: dict | None = None, fpt: int = 1000,
             curve: list[tuple[int, float, float]] | None = None, evals: dict | None = None) -> Path:  # fmt: skip
    """A run folder with summary.json (model settings, budget) and optionally a metrics.csv of
    (step, val loss, facts held-out) validations at 100 tokens per step."""
    folder.mkdir(parents=True)
    summary = {
        "variant": variant, "seed": seed, "val_loss": val_loss, "flops_per_token": fpt, "steps": 100,
        "train_tokens": 10_000, "train_flops_budget": budget, "model": {"variant": variant, **(model or {})},
        "params": params or {"total": 1000, "backbone": 1000, "token_indexed": 0, "active_per_token": 1000},
        "eval": evals or {},
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    if curve:
        rows = ["step,train_tokens,val/loss,probe/facts_qa_heldout"]
        rows += [f"{step},{(step + 1) * 100},{loss},{acc}" for step, loss, acc in curve]
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_seeds_are_aggregated_per_group_with_welch_deltas(tmp_path):
    from eval.report import stats

    sweep = tmp_path / "seeds"
    base, jtok = [3.00, 3.02, 2.98], [2.90, 2.93, 2.91]
    for s, (b, j) in enumerate(zip(base, jtok)):
        acc = {"facts_qa": {"status": "ok", "acc": 0.3 + 0.01 * s, "stderr": 0.02}}
        fake_run(sweep / f"{2 * s}_baseline_s{s}", "baseline", s, b, evals=acc)
        acc = {"facts_qa": {"status": "ok", "acc": 0.31 + 0.02 * s, "stderr": 0.02}}
        fake_run(sweep / f"{2 * s + 1}_jtok_s{s}", "jtok", s, j, evals=acc)
    fake_run(sweep / "6_jtok_m_s0", "jtok_m", 0, 2.95)
    report = build_report([str(sweep)], tmp_path / "out")

    recs = {(r["metric"], r["variant"]): r for r in report["seeds"]}
    loss = recs[("val_loss", "jtok")]
    expected = stats.welch_delta(jtok, base)
    assert (loss["n"], loss["seeds"], loss["values"]) == (3, [0, 1, 2], jtok)
    assert loss["mean"] == pytest.approx(sum(jtok) / 3) and loss["std"] == pytest.approx(stats.summarize(jtok).std)
    # Same function on the same values in the same (seed) order, which JSON round-trips exactly: bit-identical.
    assert (loss["delta"], loss["ci_low"], loss["ci_high"]) == (expected.estimate, expected.low, expected.high)
    assert loss["verdict"] == "better" and loss["vs"] == "baseline"
    acc = recs[("facts_qa_acc", "jtok")]
    assert acc["ci_low"] < 0 < acc["ci_high"] and acc["verdict"] == "within noise"
    single = recs[("val_loss", "jtok_m")]
    assert single["n"] == 1 and single["ci_low"] is None and single["verdict"] == "n=1: no interval"
    md = report["analysis_markdown"]
    row = f"| jtok | 3 | {loss['mean']:.4f} ± {loss['std']:.4f} | s0: 2.9000, s1: 2.9300, s2: 2.9100 | baseline |"
    assert row in md
    assert "| jtok_m | 1 | 2.9500 (n=1) |" in md and "n=1: no interval" in md and "within noise" in md
    assert (tmp_path / "out" / "seeds.csv").read_text().count("\n") == len(report["seeds"]) + 1
    assert report["isoflop"] is None and report["scaling"] == []  # nothing to fit


def test_groups_split_on_settings_that_matter_to_the_variant(tmp_path):
    sweep = tmp_path / "s"
    for seed in (0, 1):
        fake_run(sweep / f"b{seed}", "baseline", seed, 3.0, model={"jtokm_tables": 5, "d_model": 64})
        for n_e in (2, 4):
            fake_run(sweep / f"m{n_e}_{seed}", "jtok_m", seed, 2.9, model={"jtokm_tables": n_e, "d_model": 64})
    fake_run(sweep / "wide", "baseline", 0, 2.8, model={"jtokm_tables": 5, "d_model": 128})
    report = build_report([str(sweep)], tmp_path / "out")
    labels = {g["label"]: len(g["runs"]) for g in report["groups"]}
    assert labels == {"baseline (d_model=64)": 2, "jtok_m (d_model=64, jtokm_tables=2)": 2,
                      "jtok_m (d_model=64, jtokm_tables=4)": 2, "baseline (d_model=128)": 1}  # fmt: skip
    vs = {r["group"]: r["vs"] for r in report["seeds"] if r["metric"] == "val_loss"}
    assert vs["jtok_m (d_model=64, jtokm_tables=4)"] == "baseline (d_model=64)"  # same backbone only


def test_learning_curves_give_the_token_saving_to_reach_the_baseline(tmp_path):
    sweep = tmp_path / "curves"
    steps = [9, 19, 39, 79]  # validations at 1000, 2000, 4000, 8000 tokens
    for seed in range(3):
        noise = 0.001 * (seed - 1)
        # baseline: loss = 4 - 0.5 log2(tokens / 1000); jtok reaches every loss with half the tokens
        fake_run(sweep / f"b{seed}", "baseline", seed, 2.5,
                 curve=[(s, 4 - 0.5 * i + noise, 0.25 + 0.1 * i) for i, s in enumerate(steps)])  # fmt: skip
        fake_run(sweep / f"j{seed}", "jtok", seed, 2.0, fpt=1100,
                 curve=[(s, 3.5 - 0.5 * i + noise, 0.35 + 0.1 * i) for i, s in enumerate(steps)])  # fmt: skip
    report = build_report([str(sweep)], tmp_path / "out")
    rec = {r["metric"]: r for r in report["curves"]}
    loss = rec["val_loss"]
    assert loss["target"] == pytest.approx(2.5) and loss["tokens_reached"] == pytest.approx(4000, rel=1e-3)
    assert loss["tokens_saving"] == pytest.approx(0.5, abs=1e-3)
    assert loss["flops_saving"] == pytest.approx(1 - 4000 * 1100 / (8000 * 1000), abs=1e-3)
    assert loss["tokens_low"] <= loss["tokens_saving"] <= loss["tokens_high"]
    assert rec["facts_qa_heldout"]["tokens_saving"] == pytest.approx(0.5, abs=1e-3)
    assert "| jtok | baseline | val_loss | 3 vs 3 | 2.5000 | 2.0000 | +50.0% [" in report["analysis_markdown"]
    names = [Path(p).name for p in report["files"]["analysis_plots"]]
    assert names == ["curves_val_loss.png", "curves_facts_qa.png"]


def _isoflop_runs(root: Path, seeds: int = 1) -> None:
    """Known iso-FLOP landscape: L(C, N) = 4 - 0.3 log10(C / 1e12) + 0.2 (log10 N - u*(C))^2; JTok-M at C
    matches the baseline at 2C (a 50% compute saving at equal loss)."""
    k = 0
    for c in (1e12, 1e13, 1e14):
        for u in (5.0, 5.5, 6.0, 6.5, 7.0):
            for variant, scale in (("baseline", 1.0), ("jtok_m", 2.0)):
                for seed in range(seeds):
                    eff = c * scale
                    loss = 4 - 0.3 * np.log10(eff / 1e12) + 0.2 * (u - (5.5 + 0.4 * np.log10(eff / 1e12))) ** 2
                    loss += 0.002 * ((k % 3) - 1)  # deterministic scatter
                    n = 10**u
                    fake_run(root / f"{k}_{variant}_s{seed}", variant, seed, float(loss), budget=c,
                             model={"d_model": int(n), "jtokm_tables": 5},
                             params={"total": n, "backbone": n, "token_indexed": 0, "active_per_token": n})  # fmt: skip
                    k += 1


@pytest.mark.parametrize("seeds, method", [(1, "parabola covariance"), (3, "bootstrap over seeds")])
def test_isoflop_recovers_a_known_compute_saving(tmp_path, seeds, method):
    _isoflop_runs(tmp_path / "iso", seeds)
    report = build_report([str(tmp_path / "iso")], tmp_path / "out")
    iso = report["isoflop"]
    opt = {(o["series"], o["budget"]): o for o in iso["optima"]}
    assert opt[("baseline", 1e12)]["n_opt"] == pytest.approx(10**5.5, rel=0.1)
    assert opt[("baseline", 1e14)]["loss_opt"] == pytest.approx(4 - 0.6, abs=0.01)
    (saving,) = iso["savings"]
    assert saving["interval"].startswith(method)
    assert saving["saving"] == pytest.approx(0.5, abs=0.03)
    assert saving["saving_low"] <= 0.5 <= saving["saving_high"] or saving["saving"] == pytest.approx(0.5, abs=0.01)
    assert saving["loss_delta"] == pytest.approx(-0.3 * np.log10(2), abs=0.01)
    assert "| jtok_m | baseline | +" in report["analysis_markdown"] and "## Iso-FLOP" in report["analysis_markdown"]
    assert {Path(p).name for p in report["files"]["analysis_plots"]} == {"isoflop.png", "isoflop_frontier.png"}


def test_scaling_recovers_a_known_slope_per_doubling(tmp_path):
    sweep = tmp_path / "scale"
    for seed in range(2):
        scatter = 0.002 * (seed - 0.5)  # zero mean per size: the least-squares slope is exactly the true one
        fake_run(sweep / f"b{seed}", "baseline", seed, 3.0 + scatter, model={"jtokm_tables": 5})
        for n_e in (2, 4, 8, 16):
            n_ti = n_e * 1e6
            loss = 2.98 - 0.012 * np.log2(n_e / 2) + scatter
            model = {"jtokm_tables": n_e, "jtokm_top_k": n_e // 4 or 1}
            params = {"total": 1e6 + n_ti, "backbone": 1e6, "token_indexed": n_ti, "active_per_token": 1e6}
            fake_run(sweep / f"e{n_e}_{seed}", "jtok_m", seed, float(loss), model=model, params=params)
    report = build_report([str(sweep)], tmp_path / "out")
    (sc,) = report["scaling"]
    slopes = {s["rho"]: s for s in sc["slopes"]}
    assert set(slopes) == {0.5, 0.25}  # (2, 1) has rho 0.5; (4, 1), (8, 2), (16, 4) have rho 0.25
    fit = slopes[0.25]["fit"]
    assert fit.slope == pytest.approx(-0.012) and fit.slope_ci.low < -0.012 < fit.slope_ci.high < 0
    assert slopes[0.5]["fit"] is None and "one token-indexed size" in slopes[0.5]["note"]
    assert sc["neff"].n == 10 and sc["n_ref"] == 2
    md = report["analysis_markdown"]
    assert "## Scaling in token-indexed parameters" in md and f"{fit.slope:+.4f} [" in md and "N_eff fit" in md
    assert (tmp_path / "out" / "scaling.png").is_file()


def test_every_variant_is_compared_with_baseline_and_moe(tmp_path):
    sweep = tmp_path / "refs"
    for seed in range(2):
        for i, variant in enumerate(("baseline", "jtok_m", "moe", "moe_jtok_m")):
            fake_run(sweep / f"{variant}_{seed}", variant, seed, 3.0 - 0.1 * i + 0.01 * seed)
    report = build_report([str(sweep)], tmp_path / "out")
    pairs = {(r["variant"], r["vs"]) for r in report["seeds"]}
    assert pairs == {("baseline", None), ("jtok_m", "baseline"), ("jtok_m", "moe"), ("moe", "baseline"),
                     ("moe_jtok_m", "baseline"), ("moe_jtok_m", "moe")}  # fmt: skip
    (moe_m,) = [r for r in report["seeds"] if (r["variant"], r["vs"]) == ("moe_jtok_m", "moe")]
    assert moe_m["delta"] == pytest.approx(-0.1) and moe_m["verdict"] == "better"


def test_the_csv_carries_each_run_s_table_traffic(tmp_path):
    sweep = tmp_path / "runs" / "multirun_t"
    make_run(sweep / "0_baseline_s0", "baseline", 0, 3.00, 0.25, 0.40)
    summary_path = make_run(sweep / "1_jtok_m_s0", "jtok_m", 0, 2.90, 0.27, 0.50) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["tables"] = {"mode": "row_sharded", "world": 2, "held_bytes_per_rank": 1000,
                         "bytes_sent_per_step": 250.5, "fsdp_bytes_per_step": 6000}  # fmt: skip
    summary_path.write_text(json.dumps(summary))
    build_report([str(sweep)], tmp_path / "report")
    with open(tmp_path / "report" / "report.csv", newline="") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    row = table["jtok_m"]
    assert (row["tables_mode"], row["tables_held_bytes_per_rank"]) == ("row_sharded", "1000")
    assert (row["tables_bytes_sent_per_step"], row["tables_fsdp_bytes_per_step"]) == ("250.5", "6000")
    assert table["baseline"]["tables_mode"] == ""  # no tables: empty cells
