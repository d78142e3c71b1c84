"""Finding and loading runs: run folders, their summary.json and metrics.csv, and the order of variants."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from project.config import VARIANTS, UserError

BASELINE = "baseline"
VARIANT_ORDER = tuple(VARIANTS)  # the report lists variants in the model's order
REQUIRED_KEYS = ("variant", "seed", "val_loss")  # a summary without them cannot place its run in any table
log = logging.getLogger(__name__)


class NoRunsFound(UserError, FileNotFoundError):
    """The report's patterns reach no run with a usable summary.json."""


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
    """The runs behind the patterns, sorted by sweep, variant and seed; a clear error if there are none.
    A summary.json that is not valid JSON or lacks REQUIRED_KEYS is skipped with a warning naming it."""
    run_globs = [run_globs] if isinstance(run_globs, str) else list(run_globs)
    summaries = find_summaries(run_globs)
    if not summaries:
        raise NoRunsFound(
            f"no runs found for {run_globs}: give run folders (holding summary.json), summary.json files, "
            f"or folders of runs such as a Hydra multirun folder"
        )
    runs = [Run(p.parent, summary) for p in summaries if (summary := read_summary(p)) is not None]
    if not runs:
        raise NoRunsFound(
            f"no usable runs for {run_globs}: every summary.json found was skipped "
            f"({', '.join(map(str, summaries))}; see the warnings above)"
        )

    def order(run: Run) -> tuple:
        variant = run.summary.get("variant", "")
        return str(run.sweep), variant_rank(variant), variant, run.summary.get("seed") or 0, str(run.path)

    return sorted(runs, key=order)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's summary, or None after a warning naming the file when it is unreadable or incomplete."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("skipping %s: not valid JSON (%s)", path, e)
        return None
    if not isinstance(summary, dict):
        log.warning("skipping %s: not a JSON object", path)
        return None
    missing = [key for key in REQUIRED_KEYS if key not in summary]
    if missing:
        log.warning("skipping %s: missing the keys %s", path, ", ".join(missing))
        return None
    return summary


def metrics_records(run: Run) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv (Lightning CSVLogger), [] without one."""
    path = run.path / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
