"""Invented benchmark datasets (never real items) in the stock MMLU / ARC / CEval schemas and
Hugging Face folder layouts, as `python -m eval.export_benchmarks` writes them."""

from __future__ import annotations

from pathlib import Path

from eval import benchmarks

WORDS = ("quib", "zarn", "florp", "mendle", "skiv", "trollop", "vantic", "gorble", "plinth", "wexa", "dromal", "yusk")
HAN = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥"


def sentence(rng_index: int, n: int = 4) -> str:
    return " ".join(WORDS[(rng_index * 7 + k * 3) % len(WORDS)] for k in range(n))


def _mmlu_rows(subject: str, split: str, n: int) -> list[dict]:
    return [
        {"question": f"Which {sentence(i)} does the {subject.split('_')[0]} quib use?", "subject": subject,
         "choices": [sentence(i + k, 2) for k in range(4)], "answer": (i + len(subject)) % 4}
        for i in range(n)
    ]  # fmt: skip


def _ceval_rows(subject: str, n: int) -> list[dict]:
    def han(i: int, k: int) -> str:
        return "".join(HAN[(i * 5 + k * 3 + j) % len(HAN)] for j in range(3))

    return [
        {"id": i, "question": f"{han(i, 9)}{subject[:4]}？", "A": han(i, 0), "B": han(i, 1), "C": han(i, 2),
         "D": han(i, 3), "answer": "ABCD"[(i + len(subject)) % 4], "explanation": ""}
        for i in range(n)
    ]  # fmt: skip


def _arc_rows(config: str, split: str, n: int) -> list[dict]:
    return [
        {"id": f"{config}-{split}-{i}", "question": f"Why does the {sentence(i + len(split))} florp?",
         "choices": {"text": [sentence(i + k, 2) for k in range(4)], "label": ["A", "B", "C", "D"]},
         "answerKey": "ABCD"[(i * 3 + len(config)) % 4]}
        for i in range(n)
    ]  # fmt: skip


def write_benchmark_fixtures(root: Path) -> Path:
    """Every subject config the stock groups need, one or two invented items each, under `root`."""
    from datasets import Dataset

    from eval.export_benchmarks import write_hf_folder

    ds = Dataset.from_list
    mmlu = {s: {"test": ds(_mmlu_rows(s, "test", 2)), "validation": ds(_mmlu_rows(s, "validation", 1)),
                "dev": ds(_mmlu_rows(s, "dev", 2))} for s in benchmarks.dataset_configs("mmlu")}  # fmt: skip
    ceval = {s: {"val": ds(_ceval_rows(s, 2)), "dev": ds(_ceval_rows(s, 2)), "test": ds(_ceval_rows(s, 1))}
             for s in benchmarks.dataset_configs("ceval")}  # fmt: skip
    arc = {c: {sp: ds(_arc_rows(c, sp, n)) for sp, n in (("train", 4), ("validation", 2), ("test", 12))}
           for c in ("ARC-Easy", "ARC-Challenge")}  # fmt: skip
    write_hf_folder(root / "cais/mmlu", mmlu)
    write_hf_folder(root / "ceval/ceval-exam", ceval)
    write_hf_folder(root / "allenai/ai2_arc", arc)
    return root
