"""The research regime: shipped experiments read each training document at most once, runs record epochs and
exposures per fact, and the report flags overfitting; the capacity and real-text pieces that go with it."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import CONFIG_DIR
from eval import knowledge
from eval.report import build_report, capacity, overfitting
from project import pipeline
from project.config import ConfigError
from project.data import DocstringSource, FactsSource, budget
from project.data.facts import VALUE_POOL_SIZES

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# seconds-long test configs may repeat their data; table_decay repeats it on purpose (repetition is its question)
REPEATING = {"smoke", "table_decay"} | {e for e in EXPERIMENTS if e.endswith("_tiny")}


def sweep_combinations(experiment: str | None) -> list[list[str]]:
    """Every job of the experiment's Hydra sweep, as override lists ([[]] for a single run)."""
    overrides = [] if experiment is None else [f"experiment={experiment}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params or {})
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [overrides + list(combo) for combo in itertools.product(*axes)]


def compose_job(overrides: list[str], cache: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.data.cache_dir = str(cache)
        cfg.run_dir = str(cache / "unused")
    return cfg


@pytest.mark.parametrize("experiment", [None, *(e for e in EXPERIMENTS if e not in REPEATING)])
def test_every_shipped_experiment_reads_each_training_document_at_most_once(experiment, data_cache):
    """Computed from the config: tokens a job reads vs the training tokens its corpus holds. Facts corpora
    sized by docs_per_entity=auto are estimated from the pilot corpus's tokens per document (the run checks the
    built corpus again and refuses more than one epoch); train_epochs <= 1 holds by construction."""
    for overrides in sweep_combinations(experiment):
        cfg = compose_job(overrides, data_cache)
        if cfg.get("train_epochs") is not None:
            assert not budget.is_auto(cfg.data) and 0 < cfg.train_epochs <= 1, overrides
            continue
        assert budget.is_auto(cfg.data), f"{overrides}: a long experiment must size its corpus (docs_per_entity=auto)"
        with open_dict(cfg):
            cfg.data.source.docs_per_entity = budget.PILOT_DOCS_PER_ENTITY
        pilot = hydra.utils.instantiate(cfg.data)
        pilot.prepare_data()  # cached: every job shares the default facts corpus's pilot
        docs = pipeline.size_facts_corpus(cfg, pilot)
        per_doc = pilot.meta["train_tokens"] / pilot.meta["train_documents"]
        estimate = budget.DataBudget(
            steps=cfg.trainer.max_steps, windows_per_step=budget.windows_per_step(cfg.data.batch_size, cfg.trainer),
            seq_len=cfg.data.seq_len, train_tokens=int(docs * cfg.data.source.num_entities * per_doc),
        )  # fmt: skip
        assert estimate.epochs <= 1 / (1 + budget.SIZE_MARGIN / 2), (overrides, docs, estimate.epochs)


def test_auto_sized_run_reads_at_most_one_epoch_and_records_it(make_cfg):
    cfg = make_cfg("model=jtok", "data.source.docs_per_entity=auto", "trainer.max_steps=100", "trainer.val_check_interval=50")
    summary = pipeline.train(cfg).summary
    data = summary["data"]
    docs = data["docs_per_entity"]
    assert docs == cfg.data.source.docs_per_entity >= 2  # resolved from 'auto'
    assert 0 < data["epochs"] <= 1.0 and data["windows_read"] == 100 * cfg.data.batch_size <= data["usable_windows"]
    assert data["epochs"] * docs / (docs - 1) > 0.9  # not oversized: one document per person fewer would not do
    assert data["exposures_per_fact"] == pytest.approx(data["docs_per_entity"] * data["epochs"])
    assert json.loads((Path(cfg.run_dir) / "summary.json").read_text())["data"] == data


def test_train_epochs_sets_the_steps_and_conflicting_budgets_are_refused(make_cfg):
    cfg = make_cfg("train_epochs=0.5", "trainer.max_steps=null")
    datamodule, _, plan = pipeline.prepare_data(cfg)
    per_epoch = plan.steps_per_epoch
    assert cfg.trainer.max_steps == int(0.5 * per_epoch) and plan.epochs <= 0.5
    assert cfg.trainer.val_check_interval <= cfg.trainer.max_steps
    with pytest.raises(ConfigError, match="both set the step count"):
        pipeline.prepare_data(make_cfg("train_epochs=0.5", "train_flops=1e9"))
    with pytest.raises(ConfigError, match="docs_per_entity=auto"):
        pipeline.prepare_data(make_cfg("train_epochs=0.5", "data.source.docs_per_entity=auto"))
    with pytest.raises(ValueError, match="'auto' is resolved by the train stage"):
        FactsSource(docs_per_entity="auto")


def test_a_run_that_reads_its_data_again_is_warned_about(make_cfg, caplog):
    cfg = make_cfg("trainer.max_steps=100")
    _, _, plan = pipeline.prepare_data(cfg)
    assert plan.epochs > 1
    assert "reads its training data" in caplog.text


def write_run(folder: Path, variant: str, seed: int, val: list[tuple[int, float]], train_loss: float,
              epochs: float = 0.9) -> None:  # fmt: skip
    folder.mkdir(parents=True)
    rows = [{"step": s, "val/loss": v, "train/loss": ""} for s, v in val]
    rows += [{"step": s, "val/loss": "", "train/loss": train_loss} for s in range(0, val[-1][0] + 1, 10)]
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "val/loss", "train/loss"])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["step"]))
    summary = {"variant": variant, "seed": seed, "steps": val[-1][0], "val_loss": val[-1][1],
               "data": {"epochs": epochs, "exposures_per_fact": 10 * epochs}, "eval": {}}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))


def test_overfitting_flags_a_rise_above_the_seed_noise_and_repeated_data(tmp_path):
    for seed, final in enumerate((2.00, 2.01, 1.99)):  # noise: std 0.01
        write_run(tmp_path / f"base{seed}", "baseline", seed, [(100, 2.5), (200, final)], 1.9)
    write_run(tmp_path / "jtok0", "jtok", 0, [(100, 2.0), (200, 1.8), (300, 1.95)], 1.2, epochs=6.0)  # rose 0.15
    write_run(tmp_path / "jtok1", "jtok", 1, [(100, 2.0), (200, 1.8), (300, 1.803)], 1.7)  # rose 0.003: noise
    report = build_report([str(tmp_path / "*")], tmp_path / "out")
    runs = {r["run"]: r for r in report["overfitting"]["runs"]}
    assert not runs["base0"]["warnings"] and not runs["jtok1"]["warnings"]
    assert runs["jtok0"]["best_step"] == 200 and runs["jtok0"]["rise"] == pytest.approx(0.15)
    assert runs["jtok0"]["gap"] == pytest.approx(1.95 - 1.2) and runs["jtok0"]["epochs"] == 6.0
    assert [w.split(" ")[0:3] for w in runs["jtok0"]["warnings"]] == [["reads", "its", "data"], ["val", "loss", "rose"]]
    base = next(g for g in report["overfitting"]["groups"] if g["group"] == "baseline")
    assert base["seed_noise"] == pytest.approx(0.01) and base["threshold"] == pytest.approx(0.01)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Warning: 1 of 5 run(s) flagged.**" in text and "val loss rose 0.1500" in text
    assert (tmp_path / "out" / "overfitting.csv").read_text().count("\n") == 6


def test_report_flags_a_tiny_run_built_to_overfit(make_cfg, tmp_path):
    """20 people, one document each, a constant high learning rate: JTok-M's tables memorise the ~1K training
    tokens within ~10 passes and the held-out paraphrases' loss turns up."""
    cfg = make_cfg("model=jtok_m", "data.source.docs_per_entity=1", "data.source.num_entities=20", "optim.lr=0.02",
                   "optim.schedule=constant", "trainer.max_steps=300", "trainer.val_check_interval=10",
                   "trainer.log_every_n_steps=5", "checkpoint.every_n_train_steps=1000", "probe.enabled=false",
                   run_dir=tmp_path / "overfit")  # fmt: skip
    summary = pipeline.train(cfg).summary
    assert summary["data"]["epochs"] > 10
    (run,) = build_report([str(tmp_path / "overfit")], tmp_path / "out")["overfitting"]["runs"]
    assert run["rise"] > overfitting.MIN_RISE and run["best_step"] < 300, run
    assert any(w.startswith("val loss rose") for w in run["warnings"]) and run["gap"] > 0.2


class FakeLM:
    """Returns a fixed log-likelihood per continuation."""

    def __init__(self, logprob: dict[str, float]):
        self.logprob = logprob

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(self.logprob[r.arguments[1]], False) for r in requests]


def test_stored_bits_is_prior_entropy_minus_the_loss_on_the_value(tmp_path):
    items = [{"entity": "A", "attribute": "city", "template_split": "train", "prompt": "A lives in",
              "choices": [" X", " Paris"], "label": 1},
             {"entity": "A", "attribute": "field", "template_split": "train", "prompt": "A works in",
              "choices": [" optics", " Y"], "label": 0},
             {"entity": "A", "attribute": "city", "template_split": "heldout", "prompt": "A's home is",
              "choices": [" Paris", " X"], "label": 0}]  # fmt: skip
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(i) + "\n" for i in items))
    got = knowledge.stored_bits(FakeLM({" Paris": math.log(0.5), " optics": math.log(1 / 48)}), qa)
    city, field = math.log2(VALUE_POOL_SIZES["city"]), math.log2(VALUE_POOL_SIZES["field"])
    assert got["facts"] == 2 and got["prior_bits"] == pytest.approx(city + field)
    assert got["bits_train"] == pytest.approx((city - 1) + (field - math.log2(48)))  # a confident miss counts < 0
    assert got["bits_heldout"] == pytest.approx(city - 1) and got["facts_heldout"] == 1


def test_capacity_records_recall_and_bits_against_the_number_of_facts(tmp_path):
    def run(variant, size, seed, recall, bits, tables):
        summary = {"variant": variant, "seed": seed, "params": {"backbone": 1000, "token_indexed": tables},
                   "eval": {"facts_qa_heldout": {"acc": recall}, "facts_qa_train": {"acc": recall + 0.1},
                            "facts_bits": {"status": "ok", "bits_train": bits, "prior_bits": 50.0 * size}}}  # fmt: skip
        return SimpleNamespace(summary=summary, size=size)

    runs = [run("baseline", n, s, 0.5, 100.0 + s, 0) for n in (10, 20) for s in (0, 1)]
    runs += [run("jtok_m", n, s, 0.6, 300.0 + s, 4000) for n in (10, 20) for s in (0, 1)]
    recs = capacity.records(runs, lambda r: {capacity.SIZE_KEY: r.size}, ("baseline", "jtok_m"))
    assert [(r["variant"], r["facts"], r["n"]) for r in recs] == [("baseline", 50, 2), ("baseline", 100, 2),
                                                                 ("jtok_m", 50, 2), ("jtok_m", 100, 2)]  # fmt: skip
    jm = recs[2]
    assert jm["bits_train"] == pytest.approx(300.5) and jm["bits_over_baseline"] == pytest.approx(200.0)
    assert jm["bits_per_table_param"] == pytest.approx(200.0 / 4000) and jm["bits_per_backbone_param"] == 300.5 / 1000
    assert "| jtok_m | 50 | 2 |" in capacity.markdown(recs)
    assert capacity.records(runs[:2], lambda r: {capacity.SIZE_KEY: 10}, ()) == []  # one size: no sweep


def test_docstring_source_is_deterministic_split_by_hash_and_keyed_by_version():
    source = DocstringSource(["omegaconf"], min_chars=100, val_fraction=0.3)
    train, val = list(source.documents("train")), list(source.documents("val"))
    assert train and val and not set(train) & set(val) and len(set(train)) == len(train)
    assert all(len(d) >= 100 for d in train + val)
    assert train == list(DocstringSource(["omegaconf"], min_chars=100, val_fraction=0.3).documents("train"))
    assert source.describe()["packages"]["omegaconf"].startswith("2.3")
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        DocstringSource(["no_such_package_here"])
