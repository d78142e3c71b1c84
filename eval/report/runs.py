"""Finding and loading runs: run folders, their summary.json and metrics.csv, and the order of variants."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from project.config import VARIANTS

BASELINE = "baseline"
VARIANT_ORDER = tuple(VARIANTS)  # the report lists variants in the model's order


def variant_rank(variant: str) -> int:
    """A variant's place in VARIANT_ORDER; unknown variants come after every known one."""
    return VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)


@dataclass
class Run:
    """One run folder and its summary."""

    path: Path
    summary: dict[str, Any]

    @property
    def sweep(self) -> Path:
        return self.path.parent


def find_summaries(run_globs: Iterable[str]) -> list[Path]:
    """Every summary.json the patterns reach: directly, in a matched run folder, or below a matched folder."""
    found: dict[Path, None] = {}
    for pattern in run_globs:
        for match in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            path = Path(match)
            if path.is_file() and path.name == "summary.json":
                found[path.resolve()] = None
            elif (path / "summary.json").is_file():
                found[(path / "summary.json").resolve()] = None
            elif path.is_dir():
                found.update((p.resolve(), None) for p in sorted(path.rglob("summary.json")))
    return list(found)


def load_runs(run_globs: Iterable[str]) -> list[Run]:
    """The runs behind the patterns, sorted by sweep, variant and seed; a clear error if there are none."""
    run_globs = [run_globs] if isinstance(run_globs, str) else list(run_globs)
    summaries = find_summaries(run_globs)
    if not summaries:
        raise FileNotFoundError(
            f"no runs found for {run_globs}: give run folders (holding summary.json), summary.json files, "
            f"or folders of runs such as a Hydra multirun folder"
        )
    runs = [Run(p.parent, json.loads(p.read_text())) for p in summaries]

    def order(run: Run) -> tuple:
        variant = run.summary.get("variant", "")
        return str(run.sweep), variant_rank(variant), variant, run.summary.get("seed") or 0, str(run.path)

    return sorted(runs, key=order)


def metrics_records(run: Run) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv (Lightning CSVLogger), [] without one."""
    path = run.path / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
