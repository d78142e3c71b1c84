"""Knowledge stored in a model, in bits: per fact, the prior entropy of its value minus the model's loss on it.

A facts-corpus value is drawn uniformly from a pool of size P (project/data/facts.py: VALUE_POOL_SIZES), so
knowing it is worth log2 P bits. A model that gives the value probability p, after the cloze prompt of one of
the fact's paraphrases, holds about log2 P + log2 p bits of it (the cross-entropy bound of the knowledge
capacity literature: a summed lower bound, not clipped per fact, so confident wrong answers count against).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from project.data.facts import VALUE_POOL_SIZES


def stored_bits(lm: Any, qa_path: str | Path) -> dict[str, Any]:
    """{"status": "ok", "facts", "prior_bits", "bits_<split>" per template split (train / heldout), ...}."""
    from lm_eval.api.instance import Instance

    items = [json.loads(line) for line in Path(qa_path).read_text(encoding="utf-8").splitlines() if line]
    requests = [Instance("loglikelihood", doc={}, arguments=(it["prompt"], it["choices"][it["label"]]), idx=0)
                for it in items]  # fmt: skip
    loglik = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    out: dict[str, Any] = {"status": "ok"}
    for split in sorted({it["template_split"] for it in items}):
        picked = [(it, ll) for it, ll in zip(items, loglik) if it["template_split"] == split]
        prior = sum(math.log2(VALUE_POOL_SIZES[it["attribute"]]) for it, _ in picked)
        bits = prior + sum(ll for _, ll in picked) / math.log(2)
        out.update({f"facts_{split}": len(picked), f"prior_bits_{split}": prior, f"bits_{split}": bits})
    facts = {(it["entity"], it["attribute"]) for it in items}
    out["facts"] = len(facts)
    out["prior_bits"] = sum(math.log2(VALUE_POOL_SIZES[a]) for _, a in facts)
    return out
