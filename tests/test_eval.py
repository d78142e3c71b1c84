"""The lm-eval adapter, the benchmark plumbing and the eval stage, offline over invented fixture datasets.

The fixture datasets follow the stock schemas (MMLU, ARC, CEval) in Hugging Face folder layout, with every
subject config the stock groups need and one or two invented items each. Scores are checked against a hand
computation from the model's own log-probabilities.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from benchmark_fixtures import HAN, sentence
from benchmark_fixtures import write_benchmark_fixtures
from eval import benchmarks
from eval.adapter import JTokLM
from eval.stage import evaluate_checkpoint
from project.checkpoint import STATE_PREFIX, load_model
from project.config import ModelConfig
from project.data.tokenizer import EOS, train_tokenizer
from project.model import Transformer

MAX_SEQ_LEN = 32
# The adapter scores right-padded batches, the hand computation one unpadded sequence: the same math on other
# shapes, so their float32 log-probs differ by round-off (~1e-6 here). A choice (argmax token, best answer)
# whose top two scores are closer than TIE may legitimately come out either way; every other must match.
TIE = 1e-4
TINY_MODEL = {"variant": "moe_jtok", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": MAX_SEQ_LEN,
              "n_routed_experts": 4, "moe_top_k": 2}  # fmt: skip


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory):
    """HF_HUB_OFFLINE=1 and a private datasets cache for the whole module (also patched if already imported).

    Torch runs on one thread meanwhile: the models are tiny, and spinning threads on a busy 2-core machine
    slow the evaluation down several-fold."""
    cache = tmp_path_factory.mktemp("hf-datasets-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        import datasets.config
        import huggingface_hub.constants

        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["Question: why does the " + sentence(i) + "?\nAnswer: " + sentence(i + 1, 2) for i in range(30)] + [
        "The following are multiple choice questions (with answers) about " + sentence(i) for i in range(10)
    ]
    corpus += ["".join(HAN[(i + k) % len(HAN)] for k in range(12)) + "答案：" for i in range(20)]
    corpus += [f"Fenwick Dray lives in Quibholm. Item {i}: A. B. C. D." for i in range(10)]
    return train_tokenizer(iter(corpus), vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny randomly initialised moe_jtok model (context of 32 tokens) saved as a jtok checkpoint."""
    cfg = ModelConfig.from_dict({**TINY_MODEL, "vocab_size": tokenizer.get_vocab_size()})
    torch.manual_seed(0)
    model = Transformer(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    state = {STATE_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()},
                "tokenizer_json": tokenizer.to_str()}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def lm(loaded, checkpoint) -> JTokLM:
    return JTokLM.from_loaded(loaded, batch_size=3, checkpoint=str(checkpoint))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, offline_hub) -> Path:
    """Invented MMLU / ARC / CEval copies in Hugging Face layout, written like `eval.export_benchmarks` does."""
    return write_benchmark_fixtures(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def qa_path(tmp_path_factory) -> Path:
    """A facts QA file in the data module's format with training and held-out template items."""
    names, cities = ["Fenwick Dray", "Olla Mirt", "Quib Zarn"], [" Quibholm", " Zarnwick", " Florport", " Skivmere"]
    rows = []
    for i, name in enumerate(names):
        for split, prompt in (("train", f"{name} lives in"), ("heldout", f"The home city of {name} is")):
            rows.append({"entity": name, "attribute": "city", "template": 0 if split == "train" else 5,
                         "template_split": split, "prompt": prompt, "choices": cities, "label": i % 4})  # fmt: skip
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EVAL_CFG = {
    "benchmarks": ["facts_qa", "mmlu", "arc_easy", "arc_challenge", "ceval"],
    "num_fewshot": {"facts_qa": 0, "mmlu": 0, "arc_easy": 0, "arc_challenge": 3, "ceval": 1},
    "batch_size": 4,
    "device": "cuda:0",  # falls back to the CPU here
    "offline": True,
    "strict": True,
}


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory, checkpoint, data_dir, qa_path):
    run_dir = tmp_path_factory.mktemp("run")
    summary = evaluate_checkpoint(checkpoint, {**EVAL_CFG, "data_dir": str(data_dir)}, run_dir, qa_path=qa_path)
    return SimpleNamespace(summary=summary, run_dir=run_dir, record=json.loads((run_dir / "eval.json").read_text()))


# ---------------------------------------------------------------- hand computation


def direct_loglikelihood(loaded, context: str, continuation: str) -> tuple[float, bool | None]:
    """TemplateLM's token split and left truncation, scored by one unpadded forward pass: the log-likelihood and
    whether greedy decoding yields the continuation (None when that hinges on a near-tie, within TIE)."""
    tok, model, eot = loaded.tokenizer, loaded.model, loaded.tokenizer.token_to_id(EOS)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context:
        ctx = tok.encode(context).ids
        cont = tok.encode(context + continuation).ids[len(ctx) :]
    else:
        ctx, cont = [eot], tok.encode(continuation).ids
    ids = (ctx + cont)[-(MAX_SEQ_LEN + 1) :]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
    positions = range(len(ids) - 1 - len(cont), len(ids) - 1)
    total = sum(float(logprobs[p, t]) for p, t in zip(positions, cont))
    greedy: bool | None = True
    for p, t in zip(positions, cont):
        others = logprobs[p].clone()
        others[t] = -float("inf")
        margin = float(logprobs[p, t] - others.max())  # > 0: t is the argmax
        if margin < -TIE:
            return total, False  # clearly not the greedy token
        if margin <= TIE:
            greedy = None  # a near-tie decides it: either answer is right
    return total, greedy


def hand_accuracy(loaded, items: list[tuple[str, list[str], int]]) -> tuple[float, int]:
    """Accuracy of argmax over choices, and how many items have a near-tie (margin < TIE) at the top."""
    correct = ties = 0
    for context, choices, label in items:
        scores = [direct_loglikelihood(loaded, context, c)[0] for c in choices]
        ranked = sorted(scores, reverse=True)
        correct += max(range(len(scores)), key=scores.__getitem__) == label
        ties += ranked[0] - ranked[1] < TIE
    return correct / len(items), ties


def assert_accuracy_matches(got: float, want: float, ties: int, n: int) -> None:
    """Equal but for the near-tied items, compared as counts of correct items (no round-off in the fractions)."""
    assert abs(round(got * n) - round(want * n)) <= ties, (got, want, ties, n)


def requests(*args) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in args]


# ---------------------------------------------------------------- the adapter


def test_registered_with_the_builtin_models_and_built_from_cli_arguments(checkpoint):
    from lm_eval.api.registry import get_model

    assert get_model("jtok") is JTokLM
    assert get_model("dummy") is not None  # the built-in registry survived our registration
    lm = JTokLM.create_from_arg_string(f"checkpoint={checkpoint}", {"batch_size": "auto", "device": "cuda:0"})
    assert lm.device == torch.device("cpu") and isinstance(lm.batch_size, int)
    assert JTokLM.create_from_arg_string(f"pretrained={checkpoint}", {"batch_size": "5"}).batch_size == 5


def test_loglikelihood_matches_a_direct_forward_pass(lm, loaded):
    long_context = "Question: " + " ".join(sentence(i) for i in range(12)) + "\nAnswer:"
    cases = [
        ("Question: why does the quib zarn?\nAnswer:", " florp mendle"),
        ("Fenwick Dray lives in ", "Quibholm"),  # the trailing space moves into the continuation
        (long_context, " skiv trollop"),  # longer than the model's 32-token context: cut from the left
        (long_context + " vantic", " A"),
        ("", "quib zarn florp"),  # empty context: conditioned on EOS
    ]
    assert len(lm.tok_encode(long_context)) > MAX_SEQ_LEN
    got = lm.loglikelihood(requests(*cases), disable_tqdm=True)
    decided = 0
    for (context, continuation), (logprob, greedy) in zip(cases, got, strict=True):
        want, want_greedy = direct_loglikelihood(loaded, context, continuation)
        # float32 round-off between padded and unpadded forwards is ~1e-6 per token; 1e-4 leaves ample room
        assert logprob == pytest.approx(want, abs=1e-4), (context[-30:], continuation)
        if want_greedy is not None:
            assert greedy == want_greedy, (context[-30:], continuation)
            decided += 1
    assert decided >= len(cases) - 1  # near-ties are rare: the greedy flags are really checked


def test_rolling_loglikelihood_is_the_sum_of_token_logprobs(lm, loaded):
    text = "Fenwick Dray lives in Quibholm."
    ids = loaded.tokenizer.encode(text).ids
    eot = loaded.tokenizer.token_to_id(EOS)
    with torch.no_grad():
        logprobs = loaded.model(torch.tensor([[eot] + ids[:-1]])).logits[0].log_softmax(-1)
    want = sum(float(logprobs[i, t]) for i, t in enumerate(ids))
    long_text = " ".join(sentence(i) for i in range(20))  # several windows of max_seq_len
    short, long = lm.loglikelihood_rolling(requests((text,), (long_text,)), disable_tqdm=True)
    assert short == pytest.approx(want, abs=1e-4)
    assert len(loaded.tokenizer.encode(long_text).ids) > 2 * MAX_SEQ_LEN and long < short < 0


def hand_greedy(loaded, prompt: str, steps: int) -> set[str]:
    """Greedy decoding by hand: append the argmax token, feeding the last max_seq_len tokens; cut at EOS.

    Where the top logits are within TIE of each other (a near-tie that round-off in the adapter's padded batches
    could flip), every tied token is followed: the set of acceptable outputs, normally just one."""
    tok, eot = loaded.tokenizer, loaded.tokenizer.token_to_id(EOS)
    prompt_ids = tok.encode(prompt).ids
    start = len(prompt_ids)
    outputs, pending = set(), [prompt_ids]
    with torch.no_grad():
        while pending:
            ids = pending.pop()
            if len(ids) - start == steps or (len(ids) > start and ids[-1] == eot):
                outputs.add(tok.decode(ids[start:], skip_special_tokens=False).split(EOS)[0])
                continue
            logits = loaded.model(torch.tensor([ids[-MAX_SEQ_LEN:]])).logits[0, -1]
            tied = (logits >= logits.max() - TIE).nonzero().flatten().tolist()
            pending += [ids + [token] for token in tied]
            assert len(pending) + len(outputs) <= 8, "too many near-ties for a meaningful check"
    return outputs


def test_generate_until_is_greedy_and_stops_at_until(lm, loaded):
    prompts = ["Question: why does the quib zarn?\nAnswer:", "Fenwick Dray lives in", "甲乙丙丁" * 10]
    batched = lm.generate_until(requests(*[(p, {"until": [], "max_gen_toks": 8}) for p in prompts]), disable_tqdm=True)
    hand = [hand_greedy(loaded, p, 8) for p in prompts]
    for text, acceptable in zip(batched, hand, strict=True):
        assert text in acceptable, (text, acceptable)  # greedy, max_gen_toks, right padding
    text = max(batched, key=lambda t: len(t.replace("\ufffd", "")))
    stop = next(text[i : i + 2] for i in range(1, len(text)) if "\ufffd" not in text[i : i + 2])
    i = batched.index(text)
    # Decoded alone now (another batch shape than above): any hand-greedy output, cut at the stop string.
    acceptable = {t[: t.index(stop)] if stop in t else t for t in hand[i]}
    (stopped,) = lm.generate_until(requests((prompts[i], {"until": [stop], "max_gen_toks": 8})), disable_tqdm=True)
    assert stopped in acceptable, (stopped, acceptable)
    (stopped,) = lm.generate_until(requests((prompts[i], {"until": stop, "max_new_tokens": 8})), disable_tqdm=True)
    assert stopped in acceptable, (stopped, acceptable)  # a single string and lm-eval's alias for max_gen_toks


# ---------------------------------------------------------------- benchmarks and the stage


def test_local_override_yamls_only_replace_the_dataset_path(data_dir, tmp_path):
    found = benchmarks.write_local_tasks(data_dir, tmp_path)
    assert sorted(found) == ["arc_challenge", "arc_easy", "ceval", "mmlu"]
    spec = yaml.safe_load((tmp_path / "mmlu.yaml").read_text())
    assert spec == {"include": str(benchmarks.LM_EVAL_TASKS / "mmlu/default/_mmlu.yaml"),
                    "dataset_path": str(data_dir / "cais/mmlu")}  # fmt: skip
    assert len(benchmarks.dataset_configs("mmlu")) == 57 and len(benchmarks.dataset_configs("ceval-valid")) == 52


def test_stock_tasks_over_local_copies_match_a_hand_computation(stage_run, loaded, data_dir):
    import datasets

    summary = stage_run.summary
    arc = datasets.load_dataset(str(data_dir / "allenai/ai2_arc"), "ARC-Easy", split="test")
    items = [(f"Question: {d['question']}\nAnswer:", [" " + t for t in d["choices"]["text"]],
              d["choices"]["label"].index(d["answerKey"])) for d in arc]  # fmt: skip
    want, ties = hand_accuracy(loaded, items)
    assert summary["arc_easy"]["n_samples"] == len(items) and summary["arc_easy"]["num_fewshot"] == 0
    assert_accuracy_matches(summary["arc_easy"]["acc"], want, ties, len(items))

    manager = benchmarks.task_manager()
    items = []
    for task in benchmarks.leaf_tasks(manager, "mmlu"):
        cfg = manager.task_index[task].cfg
        for d in datasets.load_dataset(str(data_dir / "cais/mmlu"), cfg["dataset_name"], split="test"):
            context = (
                cfg["description"]
                + d["question"].strip()
                + "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", d["choices"]))
                + "\nAnswer:"
            )
            items.append((context, [" A", " B", " C", " D"], d["answer"]))
    assert max(len(loaded.tokenizer.encode(c).ids) for c, _, _ in items) > MAX_SEQ_LEN  # truncation happened
    want, ties = hand_accuracy(loaded, items)
    assert summary["mmlu"]["n_samples"] == len(items) == 57 * 2
    assert_accuracy_matches(summary["mmlu"]["acc"], want, ties, len(items))
    assert summary["mmlu"]["stderr"] > 0


def test_few_shot_prompts_longer_than_the_context_still_score(stage_run):
    summary = stage_run.summary
    assert summary["arc_challenge"]["num_fewshot"] == 3 and summary["arc_challenge"]["n_samples"] == 12
    assert summary["ceval"] == {**summary["ceval"], "status": "ok", "task": "ceval-valid", "num_fewshot": 1}
    assert summary["ceval"]["n_samples"] == 52 * 2 and 0 <= summary["ceval"]["acc_norm"] <= 1


def test_facts_qa_scores_each_template_split_like_the_hand_computation(stage_run, loaded, qa_path):
    summary = stage_run.summary
    rows = [json.loads(line) for line in qa_path.read_text().splitlines()]
    for split in ("heldout", "train"):
        items = [(r["prompt"], r["choices"], r["label"]) for r in rows if r["template_split"] == split]
        want, ties = hand_accuracy(loaded, items)
        entry = summary[f"facts_qa_{split}"]
        assert entry["n_samples"] == len(items) and entry["num_fewshot"] == 0
        assert_accuracy_matches(entry["acc"], want, ties, len(items))
    pooled = summary["facts_qa"]
    assert pooled["n_samples"] == len(rows)
    assert pooled["acc"] == pytest.approx((summary["facts_qa_heldout"]["acc"] + summary["facts_qa_train"]["acc"]) / 2)


def test_eval_json_holds_lm_eval_results_per_benchmark(stage_run, checkpoint):
    record, summary = stage_run.record, stage_run.summary
    assert list(summary)[:3] == ["facts_qa", "facts_qa_heldout", "facts_qa_train"]
    assert record["summary"] == summary and record["checkpoint"] == str(checkpoint) and record["hub_offline"]
    mmlu = record["benchmarks"]["mmlu"]
    assert mmlu["status"] == "ok" and "mmlu_anatomy" in mmlu["results"] and "mmlu_stem" in mmlu["groups"]
    assert mmlu["results"]["mmlu"]["acc,none"] == summary["mmlu"]["acc"]  # the summary copies lm-eval's value
    assert mmlu["versions"]["mmlu_anatomy"] is not None and mmlu["n-shot"]["mmlu_anatomy"] == 0
    assert record["benchmarks"]["arc_easy"]["config"]["limit"] is None
    assert (stage_run.run_dir / "lm_eval_tasks" / "facts_qa_heldout.yaml").is_file()


def test_a_missing_benchmark_fails_fast_when_asked_for_explicitly(checkpoint, tmp_path):
    start = time.perf_counter()
    with pytest.raises(benchmarks.BenchmarkUnavailable) as err:
        evaluate_checkpoint(checkpoint, {"benchmarks": ["arc_easy"], "offline": True}, tmp_path, strict=True)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "allenai/ai2_arc" in message and "eval.data_dir" in message
    assert "python -m eval.export_benchmarks" in message and "cache" in message
    assert not (tmp_path / "eval.json").exists()


def test_a_missing_benchmark_is_recorded_while_the_others_score(checkpoint, qa_path, tmp_path):
    empty = tmp_path / "no-benchmarks"
    empty.mkdir()
    cfg = {"benchmarks": ["mmlu", "facts_qa"], "offline": True, "data_dir": str(empty)}
    summary = evaluate_checkpoint(checkpoint, cfg, tmp_path / "run", qa_path=qa_path)
    assert summary["mmlu"]["status"] == "unavailable"
    assert "cais/mmlu" in summary["mmlu"]["reason"] and "has no cais/mmlu folder" in summary["mmlu"]["reason"]
    assert summary["facts_qa"]["status"] == "ok" and summary["facts_qa"]["n_samples"] == 6
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["benchmarks"]["mmlu"]["status"] == "unavailable"
    no_qa = evaluate_checkpoint(checkpoint, {"benchmarks": ["facts_qa"], "offline": True}, tmp_path / "run2")
    assert no_qa["facts_qa"]["status"] == "unavailable" and "QA file" in no_qa["facts_qa"]["reason"]


def test_a_benchmark_failing_while_scoring_keeps_the_others(checkpoint, qa_path, data_dir, tmp_path):
    """Item 7: 25 shots drawn from ARC's 4-row train split fail inside lm-eval; the error names the task
    and the shot count, and the benchmarks scored around it are kept (and written, even when strict)."""
    cfg = {"benchmarks": ["arc_easy", "facts_qa"], "num_fewshot": {"arc_easy": 25, "facts_qa": 0}, "limit": 2,
           "offline": True, "data_dir": str(data_dir), "batch_size": 4}  # fmt: skip
    summary = evaluate_checkpoint(checkpoint, cfg, tmp_path / "lenient", qa_path=qa_path)
    assert summary["facts_qa"]["status"] == "ok"
    failed = summary["arc_easy"]
    assert failed["status"] == "error" and failed["task"] == "arc_easy" and failed["num_fewshot"] == 25
    assert "arc_easy" in failed["reason"] and "25-shot" in failed["reason"]
    assert "Sample larger than population" in failed["reason"] and "eval.num_fewshot" in failed["reason"]

    with pytest.raises(RuntimeError, match=r"arc_easy \(task arc_easy, 25-shot\)") as err:
        evaluate_checkpoint(checkpoint, {**cfg, "strict": True}, tmp_path / "strict", qa_path=qa_path)
    assert isinstance(err.value, benchmarks.BenchmarkFailed)
    record = json.loads((tmp_path / "strict" / "eval.json").read_text())
    assert record["benchmarks"]["facts_qa"]["status"] == "ok"  # scored after the failure, and written
    assert record["summary"]["arc_easy"]["status"] == "error"


def test_disabled_and_unknown_settings(checkpoint, tmp_path):
    assert evaluate_checkpoint(checkpoint, {"enabled": False}, tmp_path) == {}
    with pytest.raises(ValueError, match="unknown eval settings"):
        evaluate_checkpoint(checkpoint, {"n_shot": 5}, tmp_path)


def test_facts_qa_tasks_follow_the_splits_in_the_file(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "x", "choices": [" a", " b"], "label": 0, "template_split": "train"}) + "\n")
    tasks = benchmarks.write_facts_qa_tasks(qa, tmp_path / "tasks")
    assert list(tasks) == ["facts_qa_train"]
    spec = yaml.safe_load(tasks["facts_qa_train"].read_text())
    assert spec["dataset_kwargs"] == {"data_files": {"test": str(qa.resolve())}}
    assert os.path.isfile(spec["include"])


def test_export_writes_the_layout_the_stage_reads(data_dir, tmp_path, monkeypatch):
    import datasets

    from eval.export_benchmarks import export

    real_load = datasets.load_dataset
    calls = []

    def from_fixture(repo, config):  # stands in for the Hub
        calls.append((repo, config))
        return real_load(str(data_dir / repo), config)

    monkeypatch.setattr(datasets, "load_dataset", from_fixture)
    written = export(tmp_path / "out", ["arc_easy", "arc_challenge"])
    assert calls == [("allenai/ai2_arc", "ARC-Easy"), ("allenai/ai2_arc", "ARC-Challenge")]
    assert list(written) == ["allenai/ai2_arc"]
    front = yaml.safe_load((tmp_path / "out/allenai/ai2_arc/README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in front["configs"]] == ["ARC-Easy", "ARC-Challenge"]
    assert sorted(p.name for p in (tmp_path / "out/lm_eval_tasks").iterdir()) == ["arc_challenge.yaml", "arc_easy.yaml"]
    monkeypatch.setattr(datasets, "load_dataset", real_load)
    test = real_load(str(tmp_path / "out/allenai/ai2_arc"), "ARC-Challenge", split="test")
    assert test.to_list() == real_load(str(data_dir / "allenai/ai2_arc"), "ARC-Challenge", split="test").to_list()
