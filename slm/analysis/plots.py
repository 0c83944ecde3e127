"""The data-efficiency figure: eval loss (and answer accuracy) against tokens, time and FLOPs, one panel per axis."""

from __future__ import annotations

import math
from pathlib import Path

from slm.analysis.efficiency import AXES, AXIS_LABELS, Curve
from slm.runs import MIN_EVAL_POINTS


def plot(
    cs_loss: list[Curve],
    cs_acc: list[Curve],
    out: Path,
    metric: str = "eval/loss",
    audit: dict | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write curves.png/.svg in ``out``: the figure :func:`draw` makes."""
    fig = draw(cs_loss, cs_acc, metric, audit, title)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "curves.png", out / "curves.svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    return paths


def draw(
    cs_loss: list[Curve],
    cs_acc: list[Curve],
    metric: str = "eval/loss",
    audit: dict | None = None,
    title: str | None = None,
):
    """The data-efficiency figure: the metric against every x-axis the runs logged (tokens seen and
    selected, training time, FLOPs); ``audit`` (label -> curves) adds a panel each against tokens seen
    (the selection audit). Readable at any length: a marker at every eval point, a curve resting on fewer
    than MIN_EVAL_POINTS eval points labelled "rough", the baseline's final value drawn as the target line,
    the reference's level for the metric's eval set where known, and a title naming the runs and the metric.
    A ``Figure`` of its own: the caller's pyplot backend is left alone."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss_label = "eval loss (first eval set, every token)" if metric == "eval/loss" else metric
    panels = [(cs_loss, loss_label)] + ([(cs_acc, "answer accuracy")] if cs_acc else [])
    axes_used = [ax for ax in AXES if any(ax in c.x for c in cs_loss)]
    plots = [(cs, ylabel, axis) for cs, ylabel in panels for axis in axes_used]
    plots += [(cs, label, "tokens_seen") for label, cs in (audit or {}).items() if cs]
    ncols = min(2, len(plots))
    nrows = math.ceil(len(plots) / ncols)
    fig = Figure(figsize=(6.5 * ncols, 3.8 * nrows + 0.35 * (len(cs_loss) + 1)))
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False).flatten()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    base = next((c for c in cs_loss if c.is_baseline), None)
    for ax, (cs, ylabel, axis) in zip(grid, plots):
        for i, c in enumerate(cs):
            if axis not in c.x:
                continue
            style = dict(color="black", ls="--", lw=2) if c.is_baseline else dict(color=colors[i % len(colors)])
            if c.partial:
                style["alpha"] = 0.6
            rough = f" (rough: {len(c.mean)} eval points)" if len(c.mean) < MIN_EVAL_POINTS else ""
            ax.plot(c.x[axis], c.mean, label=c.label + rough, marker="o", ms=3.5, **style)
            if len(c.runs) > 1:
                ax.fill_between(c.x[axis], c.lo, c.hi, alpha=0.2, color=style["color"])
            if "loss" in ylabel:
                _mark_reference(ax, c, axis, metric, style["color"])
        if "loss" in ylabel and base is not None and len(base.mean):
            ax.axhline(float(base.mean[-1]), color="grey", ls="-.", lw=1, label="the baseline's final value (target)")
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if "loss" in ylabel:  # leave out step 0's loss (far above the rest) only when the curves have more
            values = [v for c in cs for v in (c.mean[1:] if len(c.mean) > 2 else c.mean) if math.isfinite(v)]
            lo, hi = min(values or [1.0]), max(values or [1.0])
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax.set_ylim(top=hi + pad, bottom=lo - pad)
    fig.suptitle(f"{title or 'slm-curves'}: {metric} against what each run spent")
    for ax in grid[len(plots) :]:
        ax.set_visible(False)
    handles, labels = grid[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1 if len(labels) > 4 else 2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * len(labels) / (nrows + 1), 1, 1))
    return fig


def _mark_reference(ax, c: Curve, axis: str, metric: str, color) -> None:
    """Where each run's model reached its reference's eval loss (a triangle on its own loss) and the
    reference's own level on the metric's eval set (a dotted line), where the runs recorded it."""
    marks = [(e[axis], y) for e, y in c.outgrown(metric) if axis in e]
    if marks:
        xs, ys = zip(*marks)
        ax.scatter(xs, ys, marker="v", s=40, color=color, edgecolors="black", zorder=5,
                   label=f"{c.group}: reached its reference")  # fmt: skip
    level = c.reference_level(metric)
    if level is not None and not c.is_baseline:
        ax.axhline(level, color=color, ls=":", lw=1)
