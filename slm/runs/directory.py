"""A run directory: what a run writes there, and how earlier results are protected.

``run_info.json`` (what ran: selector, ratio, reference, seed, status), ``config.yaml`` (the
resolved config of the first launch), ``result.json`` (final numbers and status),
``metrics.jsonl``, ``checkpoints/`` and ``model/``. A launch into a directory that already holds a
run continues it (``trainer.resume=true``, with the run's own config) or replaces it
(``trainer.overwrite=true``); anything else is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slm.runs import checkpoints

RUN_INFO = "run_info.json"
RESULT = "result.json"
CONFIG = "config.yaml"
RUN_FILES = ("metrics.jsonl", RESULT, RUN_INFO, CONFIG, "checkpoints", "model", "wandb", "wandb_id.txt")

# Settings a resume may change: they decide how long and how visibly a run trains, not what it
# trains up to the step it reached. Everything else must match the run's own config.
RESUMABLE = (
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.progress",
    "trainer.eval_batch_size",
    "trainer.resume",
    "trainer.overwrite",
    "logger",
    "data.num_proc",
    "data.cache_dir",
    "data.eval",
    "downstream",
    "score_batch_size",
    "hydra",
)


class RunDirExists(RuntimeError):
    pass


class ResumeMismatch(ValueError):
    pass


def holds_a_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / f).exists() for f in RUN_FILES)


def claim(run_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse to write over an earlier run unless told to continue or replace it; refuse to resume
    a run that has nothing to resume from (it would start over and replace what it wrote)."""
    run_dir = Path(run_dir)
    if resume and holds_a_run(run_dir) and checkpoints.latest(run_dir, warn=False) is None:
        status = (read_json(run_dir / RUN_INFO) or {}).get("status", "unknown")
        raise RunDirExists(
            f"trainer.resume=true: {run_dir} holds a run (status {status}) but no complete checkpoint in "
            f"{run_dir / 'checkpoints'} (deleted, or never written): there is nothing to resume from. Start it again "
            "in place with trainer.overwrite=true (its metrics, model/ and results are replaced), or write elsewhere "
            "(a new hydra.run.dir=...)"
        )
    if resume or not holds_a_run(run_dir):
        return
    if not overwrite:
        raise RunDirExists(
            f"{run_dir} already holds a run (metrics, checkpoints or a model). Continue it with "
            "trainer.resume=true, write elsewhere (a new hydra.run.dir=...), or replace it with trainer.overwrite=true"
        )
    if is_main:
        for f in RUN_FILES:
            path = run_dir / f
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resumable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def _set(d: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


SPLIT_KEYS = ("trainer.batch_size", "trainer.grad_accum")  # how a step's rows are split over processes


def resume_config(
    saved: dict, new: dict, overrides: list[str] | None, processes: tuple[int, int] = (1, 1)
) -> tuple[dict, dict]:
    """The config a resumed run continues with: its saved one, plus the allowed changes.

    ``overrides`` are the launch's explicit ``key=value`` overrides (``None``: compare every key
    of ``new``). ``processes``: (the run's process count, this launch's). A run may resume at
    another process count with another ``trainer.batch_size`` / ``trainer.grad_accum`` as long as
    a step trains as many rows (the same rows: see :class:`slm.train.BatchStream`). Returns
    (config, {key: (old, new)} of the changes applied). A change to a key that decides what is
    trained raises :class:`ResumeMismatch` naming each one.
    """
    flat_saved, flat_new = flatten(saved), flatten(new)
    if overrides is None:
        keys = set(flat_saved) | set(flat_new)
    else:
        keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        keys = {k for k in flat_new if any(k == o or k.startswith(o + ".") for o in keys)} | keys
    changed = {
        k: (flat_saved.get(k), flat_new.get(k))
        for k in sorted(keys)
        if k in flat_new and flat_saved.get(k) != flat_new.get(k)
    }
    refused = {k: v for k, v in changed.items() if not _resumable(k)}
    if processes[0] != processes[1] or set(SPLIT_KEYS) & set(refused):
        _check_step_rows(flat_saved, {k: changed.get(k, (None, flat_saved.get(k)))[1] for k in SPLIT_KEYS}, processes)
        refused = {k: v for k, v in refused.items() if k not in SPLIT_KEYS}
    if refused:
        lines = "\n".join(f"  {k}: the run has {a!r}, this launch asks for {b!r}" for k, (a, b) in refused.items())
        raise ResumeMismatch(
            "trainer.resume=true continues a run with its own config; these settings would change what is "
            f"trained:\n{lines}\nResume without them (the saved config is reused), or start a new run."
        )
    out = json.loads(json.dumps(saved))
    for k, (_, value) in changed.items():
        _set(out, k, value)
    return out, changed


def _check_step_rows(saved: dict, now: dict, processes: tuple[int, int]) -> None:
    def rows(cfg: dict, world: int) -> tuple[int, str]:
        b, a = int(cfg["trainer.batch_size"]), int(cfg["trainer.grad_accum"])
        return world * b * a, f"{world} process(es) x trainer.batch_size={b} x trainer.grad_accum={a}"

    (before, how_before), (after, how_now) = rows(saved, processes[0]), rows(now, processes[1])
    if before != after:
        hint = f"trainer.batch_size={before // processes[1]}" if before % processes[1] == 0 else "another process count"
        raise ResumeMismatch(
            f"trainer.resume=true: the run trained {before} rows per step ({how_before}); this launch would train "
            f"{after} ({how_now}). Keep {before} rows per step so that the run continues on the same data (here: "
            f"{hint} with trainer.grad_accum=1, or a matching grad_accum)"
        )


def write_json(path: Path, obj: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
