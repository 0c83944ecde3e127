"""Runs and their data-efficiency curves: what ``slm-curves`` reads and compares.

Reads run directories or whole sweep directories (every ``metrics.jsonl`` below them), or a W&B
project (``wandb:ENTITY/PROJECT[/GROUP]``, online). Runs are grouped by everything in their config
that decides what they train (the seed and bookkeeping aside, see :data:`NOT_THE_EXPERIMENT`):
runs of a group are seeds, averaged (mean line, min-max band), and runs whose settings differ are
never averaged; the legend names the settings that tell groups apart. The baseline is the group
that trains every token (``--baseline`` names any group instead, e.g. a clean-text-only run).
Fractions of the baseline are paired by seed: each seed against the baseline run of the same seed.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from slm.runs import CONFIG, METRICS_FILE, RESULT, RUN_INFO, flatten, read_json, read_metrics

log = logging.getLogger(__name__)

# Config keys that do not change what a run trains (so two runs differing only there are seeds of
# one experiment): the seed itself, names, cadence of evals and logs, caches, the logger.
NOT_THE_EXPERIMENT = (
    "seed",
    "name",
    "experiment_name",
    "hydra",
    "logger",
    "downstream",
    "score_batch_size",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.progress",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.eval_batch_size",
    "data.cache_dir",
    "data.num_proc",
    "data.eval",
)
AXES = ("tokens_seen", "tokens_selected", "train_time_s", "flops")
AXIS_LABELS = {
    "tokens_seen": "tokens seen",
    "tokens_selected": "tokens selected",
    "train_time_s": "training time (s)",
    "flops": "training FLOPs (estimated)",
}


def _experiment_key(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_THE_EXPERIMENT)


@dataclass
class RunRecord:
    path: str
    info: dict  # selector, ratio, reference, seed, experiment, status
    events: list[dict]
    max_steps: int | None = None  # what the run was set to reach
    config: dict = field(default_factory=dict)  # its flattened config (empty for runs without one)
    sweep: str | None = None  # the sweep folder it belongs to (Hydra's multirun.yaml beside its job folders)
    apart: bool = False  # read beside runs of other sweeps: its sweep is one of its settings

    @property
    def last_step(self) -> int:
        return max((e.get("step", 0) for e in self.events), default=0)

    @property
    def seed(self):
        return self.config.get("seed", self.info.get("seed"))

    @property
    def settings(self) -> dict:
        """What decides what this run trains: its config without the seed and bookkeeping (or, for a
        run without a saved config, what its run_info says)."""
        if self.config:
            out = {k: v for k, v in self.config.items() if _experiment_key(k)}
        else:
            out = {f"selector.{k}" if k in ("ratio",) else k: self.info.get(k) for k in ("selector", "ratio")}
        if self.apart:
            out["sweep"] = Path(self.sweep).name
        out["selector.effective"] = self.info.get("selector")  # what it really selected by
        if out["selector.effective"] == "all":  # every token trains: no other selector setting acts
            out = {k: v for k, v in out.items() if not k.startswith("selector.") or k == "selector.effective"}
        elif float(out.get("selector.blocks", 1.0)) >= 1.0:
            out.pop("selector.block_score", None)  # ranks candidate blocks only when some are dropped
        return out

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
        if self.info.get("selector") == "oracle":
            return "oracle (all but the junk)"
        ratio = "auto" if self.info.get("ratio_auto") else self.info.get("ratio", "?")  # auto: chosen per run
        return f"{self.info.get('selector', '?')} {ratio}"

    @property
    def is_baseline(self) -> bool:
        """Every token of the training data: no token or block selection, the usual training split."""
        if float(self.info.get("blocks", 1.0)) < 1.0 or self.info.get("train_split", "train") != "train":
            return False
        if self.info.get("selector") == "oracle":  # every token but the junk
            return False
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
    runs: list[RunRecord] = field(default_factory=list)
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

    def outgrown(self, metric: str) -> list[tuple[dict, float]]:
        """(eval event, its ``metric``) of each run at the step its model reached its reference's eval loss."""
        marks = []
        for r in self.runs:
            steps = {e["step"] for e in r.events if e.get("reference/outgrown")}
            marks += [(e, e[metric]) for e in r.evals(metric) if e["step"] in steps]
        return marks

    @property
    def reference_loss(self) -> float | None:
        """The reference's loss on the first eval set its runs were watched against (None: not watched)."""
        levels = {next(iter(v.values())) for r in self.runs if (v := r.info.get("reference_eval_loss"))}
        return levels.pop() if len(levels) == 1 else None

    def reference_level(self, metric: str) -> float | None:
        """The reference's value of ``metric`` (an eval loss) on the runs' own eval set: the level they were
        watched against, or the reference's quality measured on that set; None where unknown or not one."""
        levels = set()
        for r in self.runs:
            watched = r.info.get("reference_eval_loss") or {}
            quality = r.info.get("reference_quality") or {}
            if metric == "eval/loss" and watched:
                levels.add(next(iter(watched.values())))
            elif metric.count("/") == 2 and metric.split("/")[1] in watched:
                levels.add(watched[metric.split("/")[1]])
            elif quality.get("measured_on") == "this run's eval sets" and metric in quality:
                levels.add(quality[metric])
        return levels.pop() if len(levels) == 1 else None

    @property
    def label(self) -> str:
        seeds = f" ({len(self.runs)} seeds)" if len(self.runs) > 1 else ""
        return self.group + seeds + (" (partial)" if self.partial else "")


SWEEP_FILE = "multirun.yaml"  # Hydra's sweeper writes it into each sweep folder


def sweep_of(run_dir: Path, root: Path) -> Path | None:
    """The sweep folder a run belongs to: its nearest folder (up to ``root``'s parent) holding multirun.yaml."""
    for folder in (run_dir, *run_dir.parents):
        if (folder / SWEEP_FILE).exists():
            return folder
        if folder == root.parent:
            return None
    return None


def newest_sweep(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """A folder holding several sweeps (``multirun/<experiment>``) is read as its newest sweep: runs of two
    sweeps are never seeds of one group. Returns (the files kept, the sweep folders passed over)."""
    sweeps = sorted({s for f in files if (s := sweep_of(f.parent, root)) is not None}, key=lambda s: s.name)
    if len(sweeps) < 2:
        return files, []
    newest = sweeps[-1]
    return [f for f in files if sweep_of(f.parent, root) in (newest, None)], sweeps[:-1]


def load_runs(paths: list[str], skipped: list | None = None) -> list[RunRecord]:
    """Every run under ``paths`` (run folders, sweep folders, folders of sweeps: the newest sweep of each;
    ``skipped`` collects the sweep folders passed over), or a W&B project (``wandb:ENTITY/PROJECT[/GROUP]``)."""
    runs = []
    for p in paths:
        if p.startswith("wandb:"):
            runs += _wandb_runs(p[len("wandb:") :])
            continue
        root = Path(p)
        if not root.exists():
            raise FileNotFoundError(f"slm-curves: {p} does not exist (give run or sweep folders: multirun/...)")
        files = [root] if root.is_file() else sorted(root.rglob(METRICS_FILE))
        files, older = newest_sweep(files, root)
        if skipped is not None:
            skipped += older
        for f in files:
            run_dir = f.parent
            if "reference" in run_dir.parts and (run_dir.parent / "model").exists():
                continue  # a cached demo reference's own training log
            info = read_json(run_dir / RUN_INFO) or {"selector": run_dir.name, "ratio": 0, "status": "unknown"}
            result = read_json(run_dir / RESULT)
            if result is not None:  # the final word: a run killed without a chance to write stays "running"
                info["status"] = result.get("status", "finished")
            config = _config(run_dir)
            max_steps = config.get("trainer.max_steps")
            sweep = sweep_of(run_dir, root)
            runs.append(
                RunRecord(
                    str(run_dir),
                    info,
                    read_metrics(f),
                    int(max_steps) if max_steps else None,
                    config,
                    sweep=str(sweep) if sweep else None,
                )
            )
    if len({r.sweep for r in runs if r.sweep}) > 1:
        for r in runs:
            r.apart = r.sweep is not None
    if not runs:
        raise ValueError(
            f"slm-curves: no runs under {', '.join(paths)} (no {METRICS_FILE} found): give the folder "
            "slm-train wrote (outputs/... or multirun/...)"
        )
    return runs


def _config(run_dir: Path) -> dict:
    try:  # saved resolved by slm-train: plain YAML
        return flatten(yaml.safe_load((run_dir / CONFIG).read_text()))
    except Exception:  # no saved config (an older run, a bare metrics.jsonl)
        return {}


def _wandb_runs(spec: str) -> list[RunRecord]:
    import wandb

    parts = spec.split("/")
    filters = {"group": parts[2]} if len(parts) > 2 else {}
    out = []
    for r in wandb.Api().runs(f"{parts[0]}/{parts[1]}", filters=filters):
        cfg = flatten(dict(r.config))
        info = {
            "selector": cfg.get("selector.name"),
            "ratio": cfg.get("selector.ratio"),
            "reference": cfg.get("reference.kind"),
            "seed": cfg.get("seed"),
        }
        out.append(RunRecord(f"wandb:{r.path}", info, [dict(row) for row in r.scan_history()], config=cfg))
    return out


def _groups(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by their settings, each group named by its selector and ratio plus whichever
    settings tell it apart from the other groups (a differing reference kind stands for all of its
    reference.* settings)."""
    by_settings: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_settings[repr(sorted(r.settings.items(), key=lambda kv: kv[0]))].append(r)
    members = list(by_settings.values())
    keys = sorted({k for m in members for k in m[0].settings})
    # a key differs when the groups where it acts disagree (a baseline has no selector.scope, say)
    differing = [k for k in keys if len({repr(m[0].settings[k]) for m in members if k in m[0].settings}) > 1]
    shown = {"selector.name", "selector.ratio", "selector.effective"}  # in the group's name already
    if "reference.kind" in differing:
        shown |= {k for k in differing if k.startswith("reference.") and k != "reference.kind"}
    differing = [k for k in differing if k not in shown]
    # A label names the settings in which its group departs from what most groups have (all of them when
    # no value is the most common).
    usual = {}
    for k in differing:
        (top, n), *rest = Counter(repr(m[0].settings[k]) for m in members if k in m[0].settings).most_common()
        usual[k] = top if not rest or n > rest[0][1] else None
    out: dict[str, list[RunRecord]] = {}
    for m in members:
        extra = ", ".join(
            f"{'reference' if k == 'reference.kind' else k}={m[0].settings.get(k)}"
            for k in differing
            if k in m[0].settings and repr(m[0].settings.get(k)) != usual[k]  # a setting that acts in this group
        )
        chosen = sorted({r.info["ratio"] for r in m if r.info.get("ratio_auto")})  # what auto chose, per seed
        name = m[0].group + (f" ({', '.join(map(str, chosen))})" if chosen else "") + (f" [{extra}]" if extra else "")
        while name in out:  # settings that print alike
            name += "'"
        out[name] = m
    return out


def curves(runs: list[RunRecord], metric: str = "eval/loss", by_seed: bool = False) -> list[Curve]:
    """Group runs by their settings (:func:`_groups`); average seeds over the eval steps they all
    reached. ``by_seed=True`` keeps every run its own curve."""
    with_points = [r for r in runs if r.evals(metric)]
    groups = {f"{r.group}#{i}": [r] for i, r in enumerate(with_points)} if by_seed else _groups(with_points)
    out = []
    for name, members in groups.items():
        steps = sorted(set.intersection(*[{e["step"] for e in r.evals(metric)} for r in members]))
        by_step = [{e["step"]: e for e in r.evals(metric)} for r in members]
        vals = np.array([[m[s][metric] for s in steps] for m in by_step], dtype=float).reshape(len(members), -1)
        axes = [ax for ax in AXES if all(ax in m[s] for m in by_step for s in steps)]
        x = {ax: np.array([np.mean([m[s][ax] for m in by_step]) for s in steps], dtype=float) for ax in axes}
        out.append(Curve(name, members[0].is_baseline, members, x, vals.mean(0), vals.min(0), vals.max(0)))
    return sorted(out, key=lambda c: (not c.is_baseline, c.group))


def tokens_to_reach(curve: Curve, target: float, axis: str = "tokens_seen") -> float | None:
    """First x where the mean eval loss reaches ``target`` (linear between eval points)."""
    if axis not in curve.x:
        return None
    x, y = curve.x[axis], curve.mean
    for i in range(len(y)):
        if y[i] <= target:
            if i == 0:
                return float(x[0])
            frac = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(x[i - 1] + frac * (x[i] - x[i - 1]))
    return None
