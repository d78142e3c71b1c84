"""Benchmarks that time whole models, variants interleaved in one process: `python -m project.bench.generate`,
`python -m project.bench.train_step`; and `python -m project.bench.table_parallel`, the token tables' memory and
bytes per step on several ranks."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from project.io import atomic_write_text


def write_table(rows: list[dict], fields: list[str], out: Path, name: str, header: str) -> None:
    """`<out>/<name>.csv` and `<out>/<name>.md` (a header line, then a Markdown table), written atomically; the
    table is also printed."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / f"{name}.csv", buffer.getvalue())
    lines = [header, "", "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(r[f]) for f in fields) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / f"{name}.md", table)
    print(table)
