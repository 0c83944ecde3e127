"""slm-curves: data-efficiency plots and the "tokens, time and FLOPs to reach the baseline" table.

Reads runs (:mod:`slm.analysis.efficiency`), writes the plot (:mod:`slm.analysis.plots`), the
savings table (:mod:`slm.analysis.savings`) and the selection audit (:mod:`slm.analysis.audit_report`) beside them."""

from __future__ import annotations

import argparse
from pathlib import Path

from slm.analysis.audit_report import audit_table, write_audit
from slm.analysis.efficiency import curves, load_runs
from slm.analysis.plots import plot
from slm.analysis.savings import REFERENCE_COLUMNS, REFERENCE_NOTE, savings_table, write_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slm-curves", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="run dirs, sweep dirs, or wandb:ENTITY/PROJECT[/GROUP]")
    p.add_argument("--out", default=None, help="output folder (default: the first path, or ./curves)")
    p.add_argument(
        "--metric",
        default="eval/loss",
        help="the eval loss to plot and tabulate: eval/<name>/loss for an eval set (default: eval/loss, the first set)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="the group every other is compared with: part of its label (as the legend shows it) or a "
        "path of one of its runs (default: the group that trains every token)",
    )
    args = p.parse_args(argv)

    older: list[Path] = []
    try:
        runs = load_runs(args.paths, skipped=older)
    except (FileNotFoundError, ValueError) as e:  # a missing folder, or one without runs: one line, no traceback
        raise SystemExit(str(e)) from None
    read = sorted({r.sweep for r in runs if r.sweep})
    if older:
        print(
            f"slm-curves: {', '.join(args.paths)} holds {len(older) + len(read)} sweeps; reading the newest, "
            f"{', '.join(read)} (name sweep folders to read others: {', '.join(str(o) for o in older)})"
        )
    elif read:
        print(f"slm-curves: reading {len(read)} sweep(s): {', '.join(read)}")
    empty = [r.path for r in runs if not r.evals(args.metric)]
    for path in empty:
        print(f"slm-curves: {path} has no {args.metric} points; skipped")
    acc_metric = args.metric[: -len("loss")] + "answer_acc" if args.metric.endswith("/loss") else None
    cs_loss, cs_acc = curves(runs, args.metric), curves(runs, acc_metric) if acc_metric else []
    if not cs_loss:
        known = sorted({k for r in runs for e in r.events for k in e if k.startswith("eval/") and k.endswith("loss")})
        raise SystemExit(
            f"slm-curves: none of the runs has {args.metric} points; nothing to plot (they have: "
            f"{', '.join(known) or 'no eval points'})"
        )
    for c in cs_loss:
        if c.partial:
            print(
                f"slm-curves: {c.group} is partial: {c.partial}; its curve stops at the last eval step all of "
                "its runs reached and is labelled (partial)"
            )
        seeds = [r.seed for r in c.runs]
        if len(set(map(repr, seeds))) < len(seeds):
            distinct = len(set(map(repr, seeds)))
            print(
                f"slm-curves: {c.group} holds {len(seeds)} runs of the same settings but only {distinct} distinct "
                "seed(s) (repeats are averaged as if they were seeds)"
            )
        reached = sorted(
            {(Path(r.path).name, e["step"]) for r in c.runs for e in r.events if e.get("reference/outgrown")}
        )
        if reached:
            print(
                f"slm-curves: {c.group}: the model reached its reference's eval loss in {len(reached)} of "
                f"{len(c.runs)} runs ({', '.join(f'{name} at step {step}' for name, step in reached)}; "
                "marked with a triangle)"
            )
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else Path("curves"))
    audit = {  # where the corpus marks its clean tokens: what each selection kept and dropped
        "clean tokens kept (since the last eval)": curves(runs, "audit/clean_kept"),
        "junk tokens dropped (since the last eval)": curves(runs, "audit/junk_dropped"),
    }
    for path in plot(cs_loss, cs_acc, out, args.metric, audit, title=first.resolve().name):
        print(f"slm-curves: wrote {path}")
    audited = audit_table(runs, args.metric)
    if audited:
        print(write_audit(audited, out))
        print(
            f"slm-curves: wrote {out / 'audit.csv'} and {out / 'audit.md'} (the selection audit, mean over eval points)"
        )
    rows, note = savings_table(cs_loss, args.baseline, args.metric)
    if note:
        print(f"slm-curves: {note}")
    else:
        print(write_table(rows, out))
        if any(REFERENCE_COLUMNS[0][0] in row for row in rows):
            print(f"slm-curves: {REFERENCE_NOTE}")
        print(f"slm-curves: wrote {out / 'tokens_to_baseline.csv'} and {out / 'tokens_to_baseline.md'}")
