"""The in-training knowledge probe: its accuracy equals a direct computation, and it lands in metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from project.checkpoint import load_model
from eval.probe import KnowledgeProbe
from stages import train


# The probe scores right-padded batches through the lm-eval adapter, direct_accuracy one unpadded sequence per
# choice: the same math on other shapes, so the float32 scores differ by round-off (~1e-6). An item whose two best
# choices are closer than TIE may be decided either way; every other item must be decided the same.
TIE = 1e-4


def direct_accuracy(loaded, items) -> tuple[float, int]:
    """Score each choice by summing the model's log-probs of its tokens after the prompt: the accuracy, and how
    many items have a near-tie (margin < TIE) between their two best choices."""
    tok = loaded.tokenizer
    correct = ties = 0
    for item in items:
        prompt_ids = tok.encode(item["prompt"], add_special_tokens=False).ids
        scores = []
        for choice in item["choices"]:
            full = tok.encode(item["prompt"] + choice, add_special_tokens=False).ids
            cont = full[len(prompt_ids) :]
            window = full[-(loaded.config.max_seq_len + 1) :]  # context truncated from the left
            with torch.no_grad():
                logp = loaded.model(torch.tensor([window[:-1]])).logits[0].log_softmax(-1)
            first = len(window) - 1 - len(cont)
            scores.append(sum(float(logp[first + i, t]) for i, t in enumerate(cont)))
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
        best, second = sorted(scores, reverse=True)[:2]
        ties += best - second < TIE
    return correct / len(items), ties


def test_probe_matches_direct_scoring_and_is_logged_at_every_validation(make_cfg):
    cfg = make_cfg("model=jtok", "trainer.max_steps=30", "trainer.val_check_interval=10", "optim.lr=1e-2")
    summary = train(cfg)
    run = Path(cfg.run_dir)
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert [int(r["step"]) for r in rows] == [9, 19, 29]
    for r in rows:
        assert 0.0 <= float(r["probe/facts_qa_heldout"]) <= 1.0 and 0.0 <= float(r["probe/facts_qa_train"]) <= 1.0

    loaded = load_model(summary["checkpoint"])
    qa = Path(cfg.data.cache_dir).glob("facts-*/qa.jsonl")
    probe = KnowledgeProbe(next(qa), loaded.tokenizer.to_str(), max_items=40, batch_size=7)
    scores = probe.accuracy(loaded.model, loaded.config)
    assert set(scores) == {"heldout", "train"}
    for split, items in probe.items.items():
        assert len(items) == 40
        want, ties = direct_accuracy(loaded, items)
        assert ties <= 2, ties  # near-ties are rare: the comparison below stays (almost) exact
        n = len(items)  # compared as counts of correct items, free of float round-off in the fractions
        assert abs(round(scores[split] * n) - round(want * n)) <= ties, (split, scores[split], want, ties)
