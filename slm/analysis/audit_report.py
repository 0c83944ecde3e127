"""The selection audit over whole runs: each group's share of clean tokens kept, of junk dropped (all of
it and by kind), of each source file and each quarter of the block kept, averaged over its eval points
and seeds (the runs log them per interval between eval points, see :mod:`slm.train.selection_audit`). A run's
intervals are weighted by the tokens each read, so a short last interval counts for what it read."""

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


WEIGHTING = "each run's intervals between eval points weighted by the tokens each read, then the mean over runs"


def _run_mean(run: RunRecord, key: str) -> float | None:
    """The run's share over its intervals, each weighted by the tokens it read (the rise of ``tokens_seen``
    since the eval point before it); None when the run never logged ``key``."""
    shares, weights, before = [], [], 0
    for e in sorted((e for e in run.events if "tokens_seen" in e), key=lambda e: e["step"]):
        if "eval/loss" not in e and not any(k.startswith("audit/") for k in e):
            continue  # a training step's event: the interval runs from eval point to eval point
        if key in e:
            shares.append(e[key])
            weights.append(max(e["tokens_seen"] - before, 0))
        before = e["tokens_seen"]
    if not shares:
        return None
    return float(np.average(shares, weights=weights)) if sum(weights) > 0 else float(np.mean(shares))


def audit_table(runs: list[RunRecord], metric: str = "eval/loss") -> list[dict]:
    """One row per audit metric the runs logged, one column per group (labelled as in the savings table):
    the metric over each run's intervals, weighted by the tokens each read, then the mean over the group's
    runs."""
    keys = sorted({k for r in runs for e in r.events for k in e if k.startswith("audit/")}, key=_order)
    groups = curves(runs, metric)
    rows = []
    for k in keys:
        row = {"audit": audit_label(k)}
        for c in groups:
            per_run = [m for r in c.runs if (m := _run_mean(r, k)) is not None]
            row[c.group] = float(np.mean(per_run)) if per_run else None
        rows.append(row)
    return rows


def write_audit(rows: list[dict], out: Path) -> str:
    """``audit.csv`` and ``audit.md`` in ``out``; the Markdown (with how the shares were averaged)."""

    def cell(col: str, v) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    return write_rows(rows, out, "audit", cell, note=f"Shares: {WEIGHTING}.")
