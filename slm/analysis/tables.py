"""A table of rows (dicts sharing their keys) written beside a run's plots as CSV and Markdown."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path


def write_rows(
    rows: list[dict], out: Path, stem: str, cell: Callable[[str, object], str], note: str | None = None
) -> str:
    """``<stem>.csv`` and ``<stem>.md`` in ``out`` (columns in the first row's order; ``cell(column, value)``
    writes a Markdown cell; ``note``: a line under the Markdown table saying how to read it); the Markdown."""
    cols = list(rows[0])
    with (out / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join(cell(c, r[c]) for c in cols) + " |\n" for r in rows)
    if note:
        md += f"\n{note}\n"
    (out / f"{stem}.md").write_text(md)
    return md
