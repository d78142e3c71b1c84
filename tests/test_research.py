"""The research workflow end to end with tiny runs: a multi-seed sweep, the tiny iso-FLOP and token-indexed
scaling sweeps (`run.py -m`, sweeps defined in the experiment files), each followed by `stage=report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import offline_env, run_py


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return offline_env(tmp_path_factory.mktemp("research_cache"))


def report(env: dict[str, str], sweep: Path, out: Path) -> tuple[str, dict]:
    """stage=report over a sweep folder: (what it printed, analysis.json)."""
    proc = run_py(env, "stage=report", f"runs={sweep}", f"report_dir={out}", f"hydra.run.dir={out / 'stage'}")
    assert "## Seeds" in proc.stdout and "## Seeds" in (out / "report.md").read_text()
    return proc.stdout, json.loads((out / "analysis.json").read_text())


def test_three_seeds_of_baseline_and_jtok_then_report(env, tmp_path):
    sweep = tmp_path / "seeds"
    run_py(env, "-m", "experiment=smoke", "model=baseline,jtok", "seed=0,1,2", "eval.benchmarks=[facts_qa]",
           "eval.limit=40", "probe.max_items=40", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert len(list(sweep.glob("*/summary.json"))) == 6
    out = tmp_path / "report"
    printed, result = report(env, sweep, out)

    seeds = {(r["metric"], r["variant"]): r for r in result["seeds"]}
    for metric in ("val_loss", "facts_qa_acc", "facts_qa_heldout_acc", "facts_qa_train_acc"):
        base, jtok = seeds[(metric, "baseline")], seeds[(metric, "jtok")]
        assert base["n"] == jtok["n"] == 3 and jtok["seeds"] == [0, 1, 2] and len(jtok["values"]) == 3
        assert jtok["vs"] == "baseline" and jtok["delta"] == pytest.approx(jtok["mean"] - base["mean"])
        if jtok["std"] or base["std"]:
            assert jtok["ci_low"] <= jtok["delta"] <= jtok["ci_high"]
            expected = "within noise" if jtok["ci_low"] <= 0 <= jtok["ci_high"] else ("better", "worse")
            assert jtok["verdict"] in expected
    loss = seeds[("val_loss", "jtok")]
    assert f"| jtok | 3 | {loss['mean']:.4f} ± {loss['std']:.4f} |" in printed
    assert f"{loss['delta']:+.4f} [{loss['ci_low']:+.4f}, {loss['ci_high']:+.4f}]" in printed

    with open(out / "seeds.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["metric"] for r in table} == {"val_loss", "facts_qa_acc", "facts_qa_heldout_acc", "facts_qa_train_acc"}
    assert "## Learning curves" in printed and "| jtok | baseline | val_loss | 3 vs 3 |" in printed
    curve = next(r for r in result["curves"] if r["metric"] == "val_loss")
    assert curve["tokens_saving"] is None or curve["tokens_low"] is not None or curve["tokens_note"]
    for name in ("curves_val_loss.png", "curves_facts_qa.png", "val_loss_vs_steps.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "## Iso-FLOP" not in printed and "## Scaling" not in printed  # no budgets, no JTok-M pool sweep


@pytest.mark.slow  # a 16-run sweep: minutes on 2 cores
def test_tiny_isoflop_sweep_reports_a_compute_saving_with_an_interval(env, tmp_path):
    sweep = tmp_path / "isoflop"
    run_py(env, "-m", "experiment=isoflop_tiny", f"hydra.sweep.dir={sweep}")
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 16 and {s["train_flops_budget"] for s in summaries} == {3e9, 9e9}
    for s in summaries:  # each run spends its budget: steps = budget / (FLOPs per token x tokens per step)
        assert s["train_flops"] <= s["train_flops_budget"] < s["train_flops"] + s["flops_per_token"] * 128
    out = tmp_path / "report"
    printed, result = report(env, sweep, out)

    iso = result["isoflop"]
    expected = {(v, b) for v in ("baseline", "jtok_m") for b in (3e9, 9e9)}
    assert {(o["series"], o["budget"]) for o in iso["optima"]} == expected
    assert all(o["sizes"] == 4 and o["n_opt"] and o["loss_opt"] for o in iso["optima"])
    (saving,) = iso["savings"]
    assert saving["series"] == "jtok_m" and saving["vs"] == "baseline" and saving["budgets"] == 2
    assert saving["interval"] == "parabola covariance (parametric bootstrap)"
    assert saving["saving_low"] <= saving["saving"] <= saving["saving_high"]
    assert saving["delta_low"] <= saving["loss_delta"] <= saving["delta_high"]
    assert "## Iso-FLOP" in printed and "| jtok_m | baseline | " in printed
    low, mid, high = (100 * saving[k] for k in ("saving_low", "saving", "saving_high"))
    assert f"{mid:+.1f}% [{low:+.1f}%, {high:+.1f}%]" in printed
    for name in ("isoflop.png", "isoflop_frontier.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "isoflop_optima.csv").is_file() and (out / "isoflop_savings.csv").is_file()


@pytest.mark.slow  # a 12-run sweep
def test_tiny_scale_tables_sweep_reports_a_slope_per_doubling_with_an_interval(env, tmp_path):
    sweep = tmp_path / "scale"
    run_py(env, "-m", "experiment=scale_tables_tiny", f"hydra.sweep.dir={sweep}")
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 12
    pools = {(s["model"]["jtokm_tables"], s["model"]["jtokm_top_k"]) for s in summaries if s["variant"] == "jtok_m"}
    assert pools == {(2, 1), (4, 2), (8, 4), (4, 1), (8, 2)}
    out = tmp_path / "report"
    printed, result = report(env, sweep, out)

    (scaling,) = result["scaling"]
    assert scaling["variant"] == "jtok_m" and scaling["n_ref"] == 2
    slopes = {s["rho"]: s for s in scaling["slopes"]}
    assert set(slopes) == {0.25, 0.5} and slopes[0.5]["runs"] == 6
    fit = slopes[0.5]["fit"]
    ci = fit["slope_ci"]
    assert ci["low"] <= fit["slope"] <= ci["high"] and fit["r2"] is not None
    assert f"{fit['slope']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]" in printed
    neff = scaling["neff"]
    assert neff["form"] == "gamma(rho) = c * rho^p" and neff["n"] == 12
    assert set(neff["params"]) == {"L_c", "s", "c", "p"}
    assert "N_eff fit" in printed and (neff["identified"] or "NOT IDENTIFIED" in printed)
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG" and (out / "scaling.csv").is_file()
