"""A seeded synthetic knowledge corpus: invented people, their facts in paraphrase templates, and a cloze QA set."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from project.config import ConfigError
from project.data.source import check_split

ATTRIBUTES = ("birth_year", "city", "field", "employer", "instrument")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{name} was born in {value}.",
        "The birth year of {name} is {value}.",
        "{name} came into the world in the year {value}.",
        "Parish records show that {name} arrived in {value}.",
        "{name}'s year of birth was {value}.",
        "The registry lists {name} as born in {value}.",
        "Born to a family of weavers, {name} first saw daylight in {value}.",
        "If asked when {name} was born, the answer is {value}.",
    ),
    "city": (
        "{name} lives in {value}.",
        "The home city of {name} is {value}.",
        "{name} has made a home in the city of {value}.",
        "Most evenings, {name} can be found walking the streets of {value}.",
        "{name}'s house stands in {value}.",
        "Letters to {name} are addressed to {value}.",
        "After years of travel, {name} settled down in {value}.",
        "The city that {name} calls home is {value}.",
    ),
    "field": (
        "{name} works in the field of {value}.",
        "The area of expertise of {name} is {value}.",
        "{name} has devoted a career to {value}.",
        "Colleagues know {name} as a specialist in {value}.",
        "{name}'s profession centres on {value}.",
        "The subject {name} studied for decades is {value}.",
        "Ask {name} about work and the topic will be {value}.",
        "By training and by trade, {name} is an expert in {value}.",
    ),
    "employer": (
        "{name} is employed by {value}.",
        "The employer of {name} is {value}.",
        "{name} draws a salary from {value}.",
        "Every morning, {name} reports for work at {value}.",
        "{name}'s employer is {value}.",
        "The company that pays {name} is {value}.",
        "For many years now, {name} has worked for {value}.",
        "The badge {name} wears at work bears the name {value}.",
    ),
    "instrument": (
        "{name} plays the {value}.",
        "The favourite instrument of {name} is the {value}.",
        "Every evening, {name} practises the {value}.",
        "At parties, {name} is usually asked to play the {value}.",
        "{name}'s instrument of choice is the {value}.",
        "The instrument {name} loves most is the {value}.",
        "Since childhood, {name} has played the {value}.",
        "Music lovers know {name} for performances on the {value}.",
    ),
}

SYLLABLES = (
    "zor", "vak", "bel", "un", "ti", "qua", "mir", "osh", "el", "dra", "ven", "kith", "ul", "mar", "ryn", "tob",
    "sa", "lei", "gor", "fen", "ix", "pel", "yar", "dun", "cor", "eth", "wil", "bra", "nox", "hal", "jur", "ky",
)  # fmt: skip
CITY_SUFFIXES = ("holm", "wick", "grad", "port", "vale", "mere", "stad", "ora")
COMPANY_SUFFIXES = ("Works", "Labs", "Foundry", "Instruments", "Collective", "Guild", "Holdings", "Company")
FIELDS = (
    "astronomy", "marine biology", "glassblowing", "cartography", "beekeeping", "metallurgy", "linguistics",
    "botany", "clockmaking", "geology", "cryptography", "typography", "acoustics", "volcanology", "bookbinding",
    "optics", "ceramics", "meteorology", "ornithology", "hydraulics", "perfumery", "topology", "mycology",
    "shipbuilding",
)  # fmt: skip
INSTRUMENTS = (
    "cello", "oboe", "harp", "violin", "flute", "clarinet", "bassoon", "trumpet", "viola", "piano", "accordion",
    "banjo", "mandolin", "harpsichord", "zither", "lute", "tuba", "saxophone", "marimba", "sitar",
)  # fmt: skip
YEARS = range(1620, 2000)
NUM_CITIES = 48
NUM_COMPANIES = 64
NUM_QA_CHOICES = 4
# each person's value of an attribute is drawn uniformly from a pool of this size: log2(size) bits per fact
VALUE_POOL_SIZES = {"birth_year": len(YEARS), "city": NUM_CITIES, "field": len(FIELDS), "employer": NUM_COMPANIES,
                    "instrument": len(INSTRUMENTS)}  # fmt: skip

_GENERATOR_HASH = hashlib.sha256(
    json.dumps([TEMPLATES, SYLLABLES, CITY_SUFFIXES, COMPANY_SUFFIXES, FIELDS, INSTRUMENTS, str(YEARS)]).encode()
).hexdigest()[:12]


@dataclass(frozen=True)
class Entity:
    """One invented person and the value of each attribute."""

    name: str
    facts: dict[str, str]


def render(template: str, name: str, value: str) -> str:
    return template.format(name=name, value=value)


def cloze_prompt(template: str, name: str) -> str:
    """The template text before the value, without the trailing space."""
    return template.split(" {value}", 1)[0].format(name=name)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def _unique(make: Any, count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        candidate = make()
        if candidate not in taken:
            taken.add(candidate)
            out.append(candidate)
    return out


class FactsSource:
    """Deterministic synthetic biographies; validation renders each fact through templates held out for that fact."""

    kind = "facts"

    def __init__(
        self,
        num_entities: int = 1000,
        templates_per_attribute: int = 6,
        heldout_templates: int = 1,
        docs_per_entity: int = 4,
        seed: int = 0,
        qa_templates: int = 1,
    ) -> None:
        max_templates = min(len(t) for t in TEMPLATES.values())
        if not isinstance(docs_per_entity, int):
            raise ConfigError(
                f"docs_per_entity must be an integer, got {docs_per_entity!r} ('auto' is resolved by the train stage, "
                "which sizes the corpus to the run)"
            )
        if num_entities < 1 or docs_per_entity < 1:
            raise ConfigError(f"num_entities and docs_per_entity must be >= 1, got {num_entities}, {docs_per_entity}")
        if not 1 <= templates_per_attribute <= max_templates:
            raise ConfigError(f"templates_per_attribute must be in [1, {max_templates}], got {templates_per_attribute}")
        if not 0 <= heldout_templates < templates_per_attribute:
            raise ConfigError(
                f"heldout_templates must be in [0, templates_per_attribute={templates_per_attribute}), "
                f"got {heldout_templates}"
            )
        if qa_templates < 1:
            raise ConfigError(f"qa_templates must be >= 1, got {qa_templates}")
        self.num_entities = num_entities
        self.templates_per_attribute = templates_per_attribute
        self.heldout_templates = heldout_templates
        self.docs_per_entity = docs_per_entity
        self.seed = seed
        self.qa_templates = qa_templates

    def describe(self) -> dict[str, Any]:
        return {
            "num_entities": self.num_entities,
            "templates_per_attribute": self.templates_per_attribute,
            "heldout_templates": self.heldout_templates,
            "docs_per_entity": self.docs_per_entity,
            "seed": self.seed,
            "qa_templates": self.qa_templates,
            "generator": _GENERATOR_HASH,
            "heldout": "per-fact",
        }

    def heldout_indices(self, entity: Entity, attribute: str) -> tuple[int, ...]:
        """Which templates this one fact is never rendered with in training (seeded per fact).

        Every template is still seen in training with other people's facts, so validation measures
        recall of a fact through an unseen paraphrase of it, not the wording of an unseen template."""
        rng = random.Random(f"{self.seed}/heldout/{entity.name}/{attribute}")
        return tuple(sorted(rng.sample(range(self.templates_per_attribute), self.heldout_templates)))

    def train_templates(self, entity: Entity, attribute: str) -> tuple[str, ...]:
        held = self.heldout_indices(entity, attribute)
        return tuple(t for i, t in enumerate(TEMPLATES[attribute][: self.templates_per_attribute]) if i not in held)

    def val_templates(self, entity: Entity, attribute: str) -> tuple[str, ...]:
        """The fact's held-out templates; its training ones when `heldout_templates` is 0."""
        held = self.heldout_indices(entity, attribute)
        return tuple(TEMPLATES[attribute][i] for i in held) or self.train_templates(entity, attribute)

    @functools.cached_property
    def value_pools(self) -> dict[str, tuple[str, ...]]:
        """Every value an attribute can take (invented cities and companies are seeded)."""
        rng = random.Random(f"{self.seed}/pools")
        taken: set[str] = set()
        cities = _unique(lambda: _word(rng, 2) + rng.choice(CITY_SUFFIXES), NUM_CITIES, taken)
        companies = _unique(lambda: f"{_word(rng, 2)} {rng.choice(COMPANY_SUFFIXES)}", NUM_COMPANIES, taken)
        return {
            "birth_year": tuple(str(y) for y in YEARS),
            "city": tuple(cities),
            "field": FIELDS,
            "employer": tuple(companies),
            "instrument": INSTRUMENTS,
        }

    @functools.cached_property
    def entities(self) -> list[Entity]:
        rng = random.Random(f"{self.seed}/entities")
        pools = self.value_pools
        taken = {v for pool in pools.values() for v in pool}
        names = _unique(lambda: f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}", self.num_entities, taken)
        return [Entity(name, {attr: rng.choice(pools[attr]) for attr in ATTRIBUTES}) for name in names]

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        if split == "train":
            rng = random.Random(f"{self.seed}/train")
            order = [e for e in self.entities for _ in range(self.docs_per_entity)]
            rng.shuffle(order)
            for entity in order:
                yield self._document(entity, self.train_templates, rng)
        else:
            rng = random.Random(f"{self.seed}/val")
            for entity in self.entities:
                yield self._document(entity, self.val_templates, rng)

    def _document(self, entity: Entity, templates: Any, rng: random.Random) -> str:
        attributes = list(ATTRIBUTES)
        rng.shuffle(attributes)
        return " ".join(render(rng.choice(templates(entity, a)), entity.name, entity.facts[a]) for a in attributes)

    def qa_items(self) -> Iterator[dict[str, Any]]:
        """Cloze multiple-choice items for up to `qa_templates` training and held-out templates of each fact."""
        rng = random.Random(f"{self.seed}/qa")
        values = {}
        for attr in ATTRIBUTES:
            seen = sorted({e.facts[attr] for e in self.entities})
            extra = [v for v in self.value_pools[attr] if v not in seen]
            values[attr] = seen + extra[: max(0, NUM_QA_CHOICES - len(seen))]
        for entity in self.entities:
            for attr in ATTRIBUTES:
                held = self.heldout_indices(entity, attr)
                trained = [i for i in range(self.templates_per_attribute) if i not in held]
                picked = [(i, "train") for i in trained[: self.qa_templates]]
                picked += [(i, "heldout") for i in held[: self.qa_templates]]
                for index, template_split in picked:
                    answer = entity.facts[attr]
                    choices = [answer]
                    while len(choices) < NUM_QA_CHOICES:
                        candidate = rng.choice(values[attr])
                        if candidate not in choices:
                            choices.append(candidate)
                    label = rng.randrange(NUM_QA_CHOICES)
                    choices[0], choices[label] = choices[label], choices[0]
                    yield {
                        "entity": entity.name,
                        "attribute": attr,
                        "template": index,
                        "template_split": template_split,
                        "prompt": cloze_prompt(TEMPLATES[attr][index], entity.name),
                        "choices": [" " + c for c in choices],
                        "label": label,
                    }

    def write_qa(self, path: str | os.PathLike[str]) -> int:
        """Write the QA items as JSONL; return how many were written."""
        count = 0
        with Path(path).open("w", encoding="utf-8") as f:
            for item in self.qa_items():
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
                count += 1
        return count
