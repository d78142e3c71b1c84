"""The in-training knowledge probe: facts-QA accuracy at every validation, for learning curves."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def load_probe_items(qa_path: str | Path, max_items: int, seed: int = 0) -> dict[str, list[dict]]:
    """Up to `max_items` QA items per template split (train / heldout), a fixed seeded sample."""
    by_split: dict[str, list[dict]] = {}
    with open(qa_path, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            by_split.setdefault(item["template_split"], []).append(item)
    rng = random.Random(seed)
    return {split: rng.sample(items, min(max_items, len(items))) for split, items in sorted(by_split.items())}


class KnowledgeProbe(Callback):
    """Scores the facts QA items by log-likelihood (the same adapter lm-eval uses) after each
    validation and logs `probe/facts_qa_<split>` accuracy. Every rank scores every item, so sharded
    models run the same forwards on all ranks."""

    def __init__(self, qa_path: str | Path, tokenizer_json: str, max_items: int = 500, batch_size: int = 64):
        self.items = load_probe_items(qa_path, max_items)
        self.tokenizer_json = tokenizer_json
        self.batch_size = batch_size

    def accuracy(self, model, config) -> dict[str, float]:
        """Fraction of items whose highest-likelihood choice is the right one, per split."""
        from lm_eval.api.instance import Instance
        from tokenizers import Tokenizer

        from eval.adapter import JTokLM  # imports lm-eval: seconds, paid only when the probe scores
        from project.checkpoint import LoadedModel

        loaded = LoadedModel(model, Tokenizer.from_str(self.tokenizer_json), config, {})
        lm = JTokLM.from_loaded(loaded, device=str(next(model.parameters()).device), batch_size=self.batch_size)
        scores: dict[str, float] = {}
        for split, items in self.items.items():
            requests = [
                Instance("loglikelihood", doc={}, arguments=(item["prompt"], choice), idx=i)
                for item in items
                for i, choice in enumerate(item["choices"])
            ]
            loglik = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
            correct, offset = 0, 0
            for item in items:
                n = len(item["choices"])
                chosen = max(range(n), key=lambda i: loglik[offset + i])
                correct += chosen == item["label"]
                offset += n
            scores[split] = correct / len(items)
        return scores

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for split, acc in self.accuracy(pl_module.model, pl_module.model_cfg).items():
            pl_module.log(f"probe/facts_qa_{split}", acc)
