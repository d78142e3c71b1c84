"""The contract between build_report and an analysis: what a section is given and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.report.groups import Group
from eval.report.runs import Run


@dataclass
class Context:
    """Everything an analysis may read: the runs, their per-run rows, the benchmarks and the groups of seeds."""

    runs: list[Run]
    rows: dict[Path, dict[str, Any]]  # run folder -> its row of the per-run table (with deltas)
    benchmarks: list[str]
    groups: list[Group]
    out_dir: Path  # where the section's plots go


@dataclass
class Section:
    """What an analysis gives back: its entry in analysis.json, its Markdown, its CSV tables and its plots."""

    key: str  # its key in analysis.json and in build_report's result
    result: Any  # the value under that key (also when the analysis does not apply)
    markdown: str | None = None  # its part of report.md; None when it has nothing to say
    tables: dict[str, tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)  # name -> (CSV file, records)
    figures: list[Path] = field(default_factory=list)  # the plots it wrote
