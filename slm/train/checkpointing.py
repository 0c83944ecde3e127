"""A training run's checkpoints: what the loop carries across an interruption (its counters, the selector's
random state, the selection switch, each watcher's state, the engine's sharded state, a running threshold, an
evolving reference's weights), written complete or not at all (:mod:`slm.runs.checkpoints`); and the resume
that finds the newest intact one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from slm.parallel import CheckpointRefused
from slm.runs import checkpoints

log = logging.getLogger(__name__)


def all_ok(acc, ok: bool) -> bool:
    """Whether ``ok`` holds on every process (one reduce)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(flag, "sum")) == 0


def save_run_checkpoint(run) -> Path:
    """A checkpoint of ``run`` at its current step (complete or absent; the oldest beyond ``keep_checkpoints`` go)."""
    state = {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "tokens_selected": run.tokens_selected,
        "train_time_s": run.train_time,
        "flops": run.flops,
        "selector_rng": run.selective.generator.get_state().tolist(),
        "selection_off_step": run.selection_off_step,
        **{w.key: w.state(run) for w in run.watchers if w.key},
        **run.engine.checkpoint_info,
    }
    return checkpoints.save(
        run.run_dir,
        run.step,
        state,
        lambda folder: _write(run, folder),
        run.acc.is_main_process,
        run.cfg.keep_checkpoints,
        lambda ok: all_ok(run.acc, ok),
    )


def _write(run, folder: Path) -> None:
    """The engine's state, and what selection carries across steps (identical on every process,
    so the main process writes it): a running threshold, an evolving reference's weights."""
    run.engine.save_checkpoint(folder)
    if run.acc.is_main_process:
        if state := run.selective.selection_state():
            torch.save(state, folder / "selection.pt")
        if run.ref.evolve_every:
            torch.save(run.ref.evolving_state(), folder / "reference.pt")


def resume_run(run) -> Path | None:
    """Load the newest checkpoint that is complete, intact (the main process checks every file's hash)
    and loads; a damaged one is passed over with a warning and set aside when its step is written
    again. A checkpoint this launch cannot load (:class:`CheckpointRefused`) stops the run instead."""
    damaged: list[Path] = []
    while (ckpt := checkpoints.latest(run.run_dir, warn=not damaged, skip=tuple(damaged))) is not None:
        bad = checkpoints.damaged_file(ckpt) if run.acc.is_main_process else None
        why = f"{bad} does not match the hash recorded when it was written" if bad else None
        if all_ok(run.acc, bad is None):
            try:
                load_run_checkpoint(run, ckpt)
            except CheckpointRefused:
                raise
            except checkpoints.FAILURES as e:
                why = f"it does not load: {checkpoints.describe_error(e)}"
            if all_ok(run.acc, why is None):
                run.tracker.rewind(run.step)  # what was logged after this checkpoint is about to be redone
                return ckpt
        log.warning("checkpoint %s is damaged (%s); resuming from the one before it", ckpt, why or "elsewhere")
        damaged.append(ckpt)
    if damaged:  # a failed load may have changed some weights: never train on from them
        raise checkpoints.CheckpointError(
            f"no checkpoint of {run.run_dir} is intact ({', '.join(p.name for p in damaged)} are damaged): "
            "start the run again without trainer.resume"
        )
    return None


def load_run_checkpoint(run, path: Path) -> None:
    """``run``'s state as the checkpoint at ``path`` holds it."""
    state = checkpoints.read_state(path)
    run.engine.load_checkpoint(path, state)
    run.step = state["step"]
    run.tokens_seen, run.tokens_selected = state["tokens_seen"], state["tokens_selected"]
    run.train_time, run.flops = state.get("train_time_s", 0.0), state.get("flops", 0.0)
    run.selective.generator.set_state(torch.tensor(state["selector_rng"], dtype=torch.uint8))
    run.selection_off_step = state.get("selection_off_step")
    for w in run.watchers:
        if w.key:
            w.load(state.get(w.key), run)
    if (path / "selection.pt").exists():
        run.selective.load_selection_state(torch.load(path / "selection.pt", weights_only=True))
    if run.ref.evolve_every and (path / "reference.pt").exists():
        run.ref.load_evolving_state(torch.load(path / "reference.pt", weights_only=True))
    log.info("resumed from %s at step %d", path, run.step)
