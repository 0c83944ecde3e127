"""slm-curves: data-efficiency plots and the "tokens to reach the baseline" table.

Reads run directories or whole sweep directories (every ``metrics.jsonl`` below them), or a
W&B project (``wandb:ENTITY/PROJECT[/GROUP]``, online). Runs that differ only by seed are
averaged (mean line, min-max band). The baseline is the run group with ratio 1.0 (every token).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm.runs import CONFIG, RESULT, RUN_INFO, read_json
from slm.tracking import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)


@dataclass
class Run:
    path: str
    info: dict  # selector, ratio, reference, seed, experiment, status
    events: list[dict]
    max_steps: int | None = None  # what the run was set to reach

    @property
    def last_step(self) -> int:
        return max((e.get("step", 0) for e in self.events), default=0)

    @property
    def partial(self) -> str | None:
        """Why the run is incomplete (interrupted, failed, still running), or None if it finished."""
        status = self.info.get("status", "finished")
        if status == "finished" and (self.max_steps is None or self.last_step >= self.max_steps):
            return None
        of = f" of {self.max_steps}" if self.max_steps else ""
        return f"{status if status != 'finished' else 'incomplete'} at step {self.last_step}{of}"

    @property
    def group(self) -> str:
        if self.is_baseline:
            return "baseline (all tokens)"
        return f"{self.info.get('selector', '?')} {self.info.get('ratio', '?')}"

    @property
    def is_baseline(self) -> bool:
        if self.info.get("selector") == "all":
            return True
        try:
            return float(self.info.get("ratio", 0)) >= 1.0
        except (TypeError, ValueError):  # a ratio schedule's label
            return False

    def evals(self, metric: str) -> list[dict]:
        return [e for e in self.events if e.get(metric) is not None]


@dataclass
class Curve:
    """One group's eval metric, averaged over its seeds at shared eval points."""

    group: str
    is_baseline: bool
    runs: list[Run] = field(default_factory=list)
    x: dict = field(default_factory=dict)  # axis -> array
    mean: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @property
    def partial(self) -> str | None:
        """Which of the group's runs are incomplete, or None when all finished."""
        notes = [f"{Path(r.path).name}: {r.partial}" for r in self.runs if r.partial]
        if not notes:
            return None
        return f"{len(notes)} of {len(self.runs)} runs incomplete ({'; '.join(notes)})"

    @property
    def label(self) -> str:
        seeds = f" ({len(self.runs)} seeds)" if len(self.runs) > 1 else ""
        return self.group + seeds + (" (partial)" if self.partial else "")


def load_runs(paths: list[str]) -> list[Run]:
    runs = []
    for p in paths:
        if p.startswith("wandb:"):
            runs += _wandb_runs(p[len("wandb:") :])
            continue
        root = Path(p)
        if not root.exists():
            raise FileNotFoundError(f"slm-curves: {p} does not exist (give run or sweep folders: multirun/...)")
        files = [root] if root.is_file() else sorted(root.rglob(METRICS_FILE))
        for f in files:
            run_dir = f.parent
            if "reference" in run_dir.parts and (run_dir.parent / "model").exists():
                continue  # a cached demo reference's own training log
            info = read_json(run_dir / RUN_INFO) or {"selector": run_dir.name, "ratio": 0, "status": "unknown"}
            result = read_json(run_dir / RESULT)
            if result is not None:  # the final word: a run killed without a chance to write stays "running"
                info["status"] = result.get("status", "finished")
            runs.append(Run(str(run_dir), info, read_metrics(f), _max_steps(run_dir)))
    if not runs:
        raise ValueError(f"slm-curves: no runs under {', '.join(paths)} (no {METRICS_FILE} found): give the folder "
                         "slm-train wrote (outputs/... or multirun/...)")  # fmt: skip
    return runs


def _max_steps(run_dir: Path) -> int | None:
    try:
        from omegaconf import OmegaConf

        return int(OmegaConf.load(run_dir / CONFIG).trainer.max_steps)
    except Exception:  # no saved config (an older run, a bare metrics.jsonl)
        return None


def _wandb_runs(spec: str) -> list[Run]:
    import wandb

    parts = spec.split("/")
    filters = {"group": parts[2]} if len(parts) > 2 else {}
    out = []
    for r in wandb.Api().runs(f"{parts[0]}/{parts[1]}", filters=filters):
        cfg = r.config
        info = {"selector": cfg.get("selector", {}).get("name"), "ratio": cfg.get("selector", {}).get("ratio"),
                "reference": cfg.get("reference", {}).get("kind"), "seed": cfg.get("seed")}  # fmt: skip
        out.append(Run(f"wandb:{r.path}", info, [dict(row) for row in r.scan_history()]))
    return out


def curves(runs: list[Run], metric: str = "eval/loss", by_seed: bool = False) -> list[Curve]:
    """Group runs by selector and ratio; average seeds over the eval steps they all reached.

    ``by_seed=True`` keeps every run its own curve."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for i, r in enumerate(runs):
        if r.evals(metric):
            groups[f"{r.group}#{i}" if by_seed else r.group].append(r)
    out = []
    for name, members in groups.items():
        steps = sorted(set.intersection(*[{e["step"] for e in r.evals(metric)} for r in members]))
        by_step = [{e["step"]: e for e in r.evals(metric)} for r in members]
        vals = np.array([[m[s][metric] for s in steps] for m in by_step], dtype=float)
        axes = ("tokens_seen", "tokens_selected")
        x = {ax: np.array([np.mean([m[s][ax] for m in by_step]) for s in steps]) for ax in axes}
        out.append(Curve(name, members[0].is_baseline, members, x, vals.mean(0), vals.min(0), vals.max(0)))
    return sorted(out, key=lambda c: (not c.is_baseline, c.group))


def tokens_to_reach(curve: Curve, target: float, axis: str = "tokens_seen") -> float | None:
    """First x where the mean eval loss reaches ``target`` (linear between eval points)."""
    x, y = curve.x[axis], curve.mean
    for i in range(len(y)):
        if y[i] <= target:
            if i == 0:
                return float(x[0])
            frac = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(x[i - 1] + frac * (x[i] - x[i - 1]))
    return None


def savings_table(cs: list[Curve]) -> tuple[list[dict], str | None]:
    """Rows of tokens needed to reach the baseline's final eval loss; and a note if impossible."""
    base = next((c for c in cs if c.is_baseline), None)
    if base is None:
        return [], "no baseline run (ratio 1.0 / selector=all) among the inputs: nothing to compare against"
    target = float(base.mean[-1])
    base_tokens = float(base.x["tokens_seen"][-1])
    rows = []
    for c in cs:
        seen = tokens_to_reach(c, target)
        sel = tokens_to_reach(c, target, "tokens_selected")
        per_seed = [tokens_to_reach(one, target) for one in curves(c.runs, by_seed=True)]
        worst = None if None in per_seed else max(per_seed) / base_tokens
        rows.append({
            "run": c.group + (" (partial)" if c.partial else ""), "seeds": len(c.runs),
            "final_eval_loss": round(float(c.mean[-1]), 4),
            "tokens_seen_to_reach_baseline": None if seen is None else int(seen),
            "tokens_selected_to_reach_baseline": None if sel is None else int(sel),
            "fraction_of_baseline_tokens": None if seen is None else round(seen / base_tokens, 3),
            "worst_seed_fraction": None if worst is None else round(worst, 3),
            "fold_saving": None if not seen else round(base_tokens / seen, 2),
        })  # fmt: skip
    return rows, None


def plot(cs_loss: list[Curve], cs_acc: list[Curve], out: Path, metric: str = "eval/loss") -> list[Path]:
    """Write curves.png/.svg. A ``Figure`` of its own: the caller's pyplot backend is left alone."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss_label = "eval loss (all tokens of the first eval set)" if metric == "eval/loss" else metric
    panels = [(cs_loss, loss_label)] + ([(cs_acc, "answer accuracy")] if cs_acc else [])
    fig = Figure(figsize=(11, 4 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 2, squeeze=False)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (cs, ylabel) in enumerate(panels):
        for col, axis in enumerate(("tokens_seen", "tokens_selected")):
            ax = axes[row][col]
            for i, c in enumerate(cs):
                style = dict(color="black", ls="--", lw=2) if c.is_baseline else dict(color=colors[i % len(colors)])
                if c.partial:
                    style["alpha"] = 0.6
                ax.plot(c.x[axis], c.mean, label=c.label, **style)
                if len(c.runs) > 1:
                    ax.fill_between(c.x[axis], c.lo, c.hi, alpha=0.2, color=style["color"])
            ax.set_xlabel(axis.replace("_", " "))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if "loss" in ylabel:
                finite = [v for c in cs for v in c.mean[1:] if math.isfinite(v)] or [1.0]
                ax.set_ylim(top=max(finite) * 1.1, bottom=min(finite) * 0.95)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "curves.png", out / "curves.svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    return paths


def write_table(rows: list[dict], out: Path) -> str:
    cols = list(rows[0])
    with (out / "tokens_to_baseline.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "not reached" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join(fmt(r[c]) for c in cols) + " |\n" for r in rows)
    (out / "tokens_to_baseline.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slm-curves", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="run dirs, sweep dirs, or wandb:ENTITY/PROJECT[/GROUP]")
    p.add_argument("--out", default=None, help="output folder (default: the first path, or ./curves)")
    p.add_argument("--metric", default="eval/loss",
                   help="the eval loss to plot and tabulate: eval/<name>/loss for an eval set (default: eval/loss, "
                        "the first set)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.paths)
    except (FileNotFoundError, ValueError) as e:  # a missing folder, or one without runs: one line, no traceback
        raise SystemExit(str(e)) from None
    empty = [r.path for r in runs if not r.evals(args.metric)]
    for path in empty:
        print(f"slm-curves: {path} has no {args.metric} points; skipped")
    acc_metric = args.metric[: -len("loss")] + "answer_acc" if args.metric.endswith("/loss") else None
    cs_loss, cs_acc = curves(runs, args.metric), curves(runs, acc_metric) if acc_metric else []
    if not cs_loss:
        known = sorted({k for r in runs for e in r.events for k in e if k.startswith("eval/") and k.endswith("loss")})
        raise SystemExit(f"slm-curves: none of the runs has {args.metric} points; nothing to plot (they have: "
                         f"{', '.join(known) or 'no eval points'})")  # fmt: skip
    for c in cs_loss:
        if c.partial:
            print(f"slm-curves: {c.group} is partial: {c.partial}; its curve stops at the last eval step all of "
                  "its runs reached and is labelled (partial)")  # fmt: skip
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else Path("curves"))
    for path in plot(cs_loss, cs_acc, out, args.metric):
        print(f"slm-curves: wrote {path}")
    rows, note = savings_table(cs_loss)
    if note:
        print(f"slm-curves: {note}")
    else:
        print(write_table(rows, out))
        print(f"slm-curves: wrote {out / 'tokens_to_baseline.csv'} and {out / 'tokens_to_baseline.md'}")


if __name__ == "__main__":
    main()
