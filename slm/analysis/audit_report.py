"""The selection audit over whole runs: each group's share of clean tokens kept, of junk dropped (all of
it and by kind), of each source file and each quarter of the block kept, averaged over its eval points
and seeds (the runs log them per interval between eval points, see :mod:`slm.train.selection_audit`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.analysis.efficiency import RunRecord, curves
from slm.analysis.tables import write_rows

LABELS = {  # metric prefix -> how the table names it
    "audit/clean_kept": "clean tokens kept",
    "audit/junk_dropped/": "junk dropped: ",
    "audit/junk_dropped": "junk tokens dropped",
    "audit/kept/source/": "kept of source ",
    "audit/kept/position/": "kept of block part ",
}


def audit_label(key: str) -> str:
    prefix = next(p for p in LABELS if key.startswith(p))
    return LABELS[prefix] + key[len(prefix) :]


def _order(key: str) -> tuple:
    prefix = next(i for i, p in enumerate(LABELS) if key.startswith(p))
    return (prefix, key)


def audit_table(runs: list[RunRecord], metric: str = "eval/loss") -> list[dict]:
    """One row per audit metric the runs logged, one column per group (labelled as in the savings table):
    the metric's mean over each run's eval points, then over the group's runs."""
    keys = sorted({k for r in runs for e in r.events for k in e if k.startswith("audit/")}, key=_order)
    groups = curves(runs, metric)
    rows = []
    for k in keys:
        row = {"audit": audit_label(k)}
        for c in groups:
            per_run = [np.mean(v) for r in c.runs if (v := [e[k] for e in r.events if k in e])]
            row[c.group] = float(np.mean(per_run)) if per_run else None
        rows.append(row)
    return rows


def write_audit(rows: list[dict], out: Path) -> str:
    """``audit.csv`` and ``audit.md`` in ``out``; the Markdown."""

    def cell(col: str, v) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    return write_rows(rows, out, "audit", cell)
