"""How much of the baseline's tokens, training time and FLOPs each group of runs needs to reach
the baseline's final eval loss: the table ``slm-curves`` prints and writes (CSV and Markdown).

Fractions are paired by seed: each seed's run against the baseline run of the same seed (its final
loss is the target; the tokens, time and FLOPs at which that baseline run *first reached* it are the
denominators), then the mean and the worst seed, since seeds of one setting spread as much as some
effects. Against the first crossing the baseline's own row reads 1.0 by construction, also when its curve
rises at the end (eval noise, or a run that overfits a small file): such a baseline is flagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.analysis.efficiency import Curve, RunRecord, curves, tokens_to_reach
from slm.analysis.tables import write_rows
from slm.runs import MIN_EVAL_POINTS


def pick_baseline(cs: list[Curve], name: str | None = None) -> tuple[Curve | None, str | None]:
    """The baseline curve: the group named by ``name`` (a substring of its label, or a path of one
    of its runs), else the one group that trains every token. (None, why) when there is none or
    several."""
    if name:
        hits = [c for c in cs if name in c.group or any(name.rstrip("/") in r.path for r in c.runs)]
        if len(hits) != 1:
            found = "no group" if not hits else f"{len(hits)} groups ({'; '.join(c.group for c in hits)})"
            return None, f"--baseline {name!r} matches {found}; groups: {'; '.join(c.group for c in cs)}"
        return hits[0], None
    bases = [c for c in cs if c.is_baseline]
    if not bases:
        return (
            None,
            "no baseline run (ratio 1.0 / selector=all) among the inputs: nothing to compare against "
            "(name one with --baseline)",
        )
    if len(bases) > 1:
        return None, (
            f"{len(bases)} baseline groups with different settings ({'; '.join(c.group for c in bases)}): "
            "name the one to compare against with --baseline"
        )
    return bases[0], None


def _run_curve(run: RunRecord, metric: str) -> Curve:
    return curves([run], metric, by_seed=True)[0]


def first_crossing(base: Curve, axis: str = "tokens_seen") -> float | None:
    """Where a baseline curve first reaches its own final value on ``axis`` (its end, unless the curve rose
    at its end); None without that axis or any point."""
    if axis not in base.x or not len(base.mean):
        return None
    return tokens_to_reach(base, float(base.mean[-1]), axis)


def _rising_end(base: Curve) -> str:
    """A note when the baseline reached its final loss before its end (its curve rose at the end)."""
    crossing, end = first_crossing(base), float(base.x["tokens_seen"][-1]) if "tokens_seen" in base.x else 0.0
    if crossing is None or not end or crossing >= end:
        return ""
    return (
        f"the baseline's curve rises at its end: it first reached its final loss at {crossing / end:.3f} of its "
        "tokens, and every fraction is against that first crossing"
    )


def _paired(c: Curve, base: Curve, metric: str, axis: str, extra=None) -> tuple[float | None, float | None, str, bool]:
    """(mean, worst) over seeds of: x a seed's run needs to reach its own baseline seed's final
    metric (plus ``extra(run)``, a cost paid before it: its reference's), over what that baseline run used
    (both None when a seed never reaches it, or ``extra`` is None for it); a note on seeds without a partner or
    not reaching; whether any seed had a partner."""
    base_by_seed = {r.seed: _run_curve(r, metric) for r in base.runs}
    fractions, missing, unreached = [], 0, 0
    for r in c.runs:
        b = base_by_seed.get(r.seed)
        crossing = first_crossing(b, axis) if b is not None else None
        if not crossing:
            missing += 1
            continue
        reach = tokens_to_reach(_run_curve(r, metric), float(b.mean[-1]), axis)
        paid = extra(r) if extra is not None else 0.0
        if reach is None:
            unreached += 1
        elif paid is None:
            return None, None, "", True
        else:
            fractions.append((reach + paid) / crossing)
    notes = ([f"{missing} seed(s) without a baseline run of the same seed"] if missing else []) + (
        [f"{unreached} of {len(c.runs)} seed(s) never reached it"] if unreached else []
    )
    paired = missing < len(c.runs)
    if not fractions or unreached:
        return None, None, "; ".join(notes), paired
    return float(np.mean(fractions)), max(fractions), "; ".join(notes), paired


def savings_table(
    cs: list[Curve], baseline: str | None = None, metric: str = "eval/loss"
) -> tuple[list[dict], str | None]:
    """Rows of what each group needs to reach the baseline's final ``metric`` (its mean over seeds):
    tokens seen and selected on the mean curve, and the fractions of the baseline's tokens, training
    time and FLOPs, paired by seed (mean and worst seed); and a note if there is no baseline."""
    base, why = pick_baseline(cs, baseline)
    if base is None:
        return [], why
    target = float(base.mean[-1])
    base_tokens = first_crossing(base) or 0.0  # where the baseline first reached its final loss
    charged = any(r.info.get("reference_cost") for c in cs for r in c.runs)
    ratio = lambda a, b: None if a is None or not b else round(a / b, 3)
    rows = []
    for c in cs:
        seen = tokens_to_reach(c, target)
        sel = tokens_to_reach(c, target, "tokens_selected")
        tok_mean, tok_worst, note, paired = _paired(c, base, metric, "tokens_seen")
        time_mean, time_worst, _, _ = _paired(c, base, metric, "train_time_s")
        flops_mean, _, _, _ = _paired(c, base, metric, "flops")
        rnd = lambda v: None if v is None else round(v, 3)
        with_ref = {}
        if charged:  # the reference's training (and its store's scoring) added to what each run paid
            for col, axis, keys in REFERENCE_COLUMNS:
                cost = lambda r, keys=keys: _reference_cost(r, keys)  # noqa: E731
                mean, worst, _, _ = _paired(c, base, metric, axis, extra=cost)
                with_ref[col] = rnd(mean)
                if axis == "tokens_seen":
                    with_ref["worst_seed_fraction_with_reference"] = rnd(worst)
        points = min(len(r.evals(metric)) for r in [*c.runs, *base.runs])
        if points < MIN_EVAL_POINTS:  # a fraction interpolated between two or three points is rough
            note = "; ".join(
                filter(None, [note, f"rests on {points} eval points (fewer than {MIN_EVAL_POINTS}): rough"])
            )
        if c is base:
            note = "; ".join(filter(None, [note, _rising_end(base)]))
        name = f"baseline: {c.group}" if c is base and baseline else c.group
        rows.append(
            {
                "run": name + (" (partial)" if c.partial else ""),
                "seeds": len(c.runs),
                "final_eval_loss": round(float(c.mean[-1]), 4),
                "tokens_seen_to_reach_baseline": None if seen is None else int(seen),
                "tokens_selected_to_reach_baseline": None if sel is None else int(sel),
                "fraction_of_baseline_tokens": rnd(tok_mean) if paired else ratio(seen, base_tokens),
                "worst_seed_fraction": rnd(tok_worst),
                "fraction_of_baseline_time": rnd(time_mean),
                "worst_seed_time_fraction": rnd(time_worst),
                "fraction_of_baseline_flops": rnd(flops_mean),
                **with_ref,
                "fold_saving": None if not seen or not base_tokens else round(base_tokens / seen, 2),
                "notes": note,
            }
        )
    _against_oracle(cs, rows)
    return rows, None


# (column, axis, the reference's costs added on that axis): tokens count the reference's training tokens (its
# scoring is a forward, counted in time and FLOPs); a run that does not select with a reference adds nothing
REFERENCE_COLUMNS = (
    ("fraction_of_baseline_tokens_with_reference", "tokens_seen", ("train_tokens",)),
    ("fraction_of_baseline_time_with_reference", "train_time_s", ("train_time_s", "score_time_s")),
    ("fraction_of_baseline_flops_with_reference", "flops", ("train_flops", "score_flops")),
)
REFERENCE_NOTE = (
    "*_with_reference: each run also charged its reference's whole training and its store's scoring (made once and "
    "shared by every run of a sweep that selects with them: a sweep of k such arms pays it once, not k times); "
    "tokens count the reference's training tokens, time and FLOPs also the scoring"
)


def _reference_cost(run: RunRecord, keys: tuple) -> float | None:
    """The reference's cost on one axis for a run (0 for a run that selects without one; None where a run
    selects with a reference whose cost was not recorded)."""
    cost = run.info.get("reference_cost")
    if cost is None:
        return None if run.info.get("reference_eval_loss") else 0.0  # watched: it ranks by a reference
    return float(sum(cost[k] for k in keys))


def _against_oracle(cs: list[Curve], rows: list[dict]) -> None:
    """With an oracle group among the inputs (the corpus's clean tokens, selector=oracle): each group's
    fraction of the baseline's tokens over the oracle's, the distance from what selection could do."""
    oracle = [row for c, row in zip(cs, rows) if all(r.info.get("selector") == "oracle" for r in c.runs)]
    if len(oracle) != 1:
        return
    best = oracle[0]["fraction_of_baseline_tokens"]
    for row in rows:
        f = row["fraction_of_baseline_tokens"]
        row["fraction_vs_oracle"] = None if f is None or not best else round(f / best, 3)
        row["notes"] = row.pop("notes")  # notes stay the last column


def write_table(rows: list[dict], out: Path) -> str:
    """``tokens_to_baseline.csv`` and ``.md`` in ``out``; the Markdown."""

    def cell(col: str, v) -> str:
        if col == "notes":
            return v
        return "not reached" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))

    return write_rows(rows, out, "tokens_to_baseline", cell)
