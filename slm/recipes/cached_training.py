"""Models slm trains once on their own text, cached, and shares with every run and sweep job that names them: the
reference (``reference=train``; the built-in ``demo`` trains on the corpus's clean split) and the base model a
continued-pretraining run starts from (``base=train``). Each is cached by a hash of everything that decides its
weights. Caches become visible only when complete (a ``DONE`` marker written last), so an interrupted run never
leaves a cache that breaks the next one (the next run resumes it from its checkpoint); one job of a sweep trains
it while the others wait on its lock."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from slm import parallel
from slm.data import CacheLock, PackedData, build_split, wait_for_holder
from slm.model import SelectiveLM, build_model
from slm.recipes.settings import RunSettings, ScoreSettings, config_hash, own_split
from slm.reference import load_reference
from slm.runs import Tracker, checkpoints
from slm.train import EarlyStop, RunInterrupted, Trainer

log = logging.getLogger(__name__)
DONE = "DONE"
NOT_IN_THE_WEIGHTS = ("progress", "resume", "overwrite", "keep_checkpoints", "log_every")  # not in its cache key
Settings = RunSettings | ScoreSettings  # what slm-train and slm-score share: model, data, reference, cache


@contextmanager
def job_lock(entry: Path, what: str, acc):
    """The cache entry's lock for the whole job: its main process takes it (and yields the lock, to
    ``confirm`` before publishing), every other process waits on the same lock file until its own job holds it
    (however long another job holds it first) and yields None. No process sits in a collective meanwhile."""
    box = [uuid.uuid4().hex]
    broadcast_object_list(box)  # the job's token: every process is here at once
    if acc.is_main_process:
        with CacheLock(entry, what, token=box[0]) as lock:
            yield lock
    else:
        wait_for_holder(entry, what, box[0])
        yield None


def agreed(value: bool) -> bool:
    box = [value]
    broadcast_object_list(box)  # the main process's view decides for everyone
    return box[0]


def stage_text(settings: Settings, data: PackedData, stage: str, seed: int) -> tuple:
    """(packed training text of a trained reference or base, its identity). The run's own built-in corpus's
    splits come from its packed data (in document order); any other source is packed with the run's
    tokenizer and block size and cached, in document order where the stage holds part of it out (so the
    held-out part is whole documents: training order comes from the batch stream's shuffle either way)."""
    cfg = getattr(settings, stage)
    source, own = cfg.data, settings.data.source
    if own_split(source, settings.data):  # a split of the run's own corpus
        split = source.split or "clean"
        if split not in data.splits:
            raise ValueError(f"{stage}.data.split={split!r}: the {own} corpus has {sorted(data.splits)}")
        return data[split], {own: data.identity["data_hash"][split]}
    packed = build_split(
        source,
        data.tokenizer,
        data.identity["block_size"],
        settings.data.cache_dir,
        shuffle_seed=None if cfg.converge.holdout else seed,
    )
    return packed, {
        "source": source.identity(settings.data.cache_dir),
        "tokenizer": data.identity["tokenizer"],
        "block_size": data.identity["block_size"],
    }


def _stage_model(settings: Settings, data: PackedData, init: str, seed: int):
    fresh = init == "scratch"
    return build_model(settings.model, len(data.tokenizer), seed + 1, data.tokenizer, fresh=fresh)


def train_reference(settings: Settings, data: PackedData, acc) -> tuple[str, torch.nn.Module]:
    """``reference=train`` (and the built-in ``demo``): a reference trained once on its own text
    (``reference.data``) from scratch or from the training model's starting weights (``reference.init``:
    ``model.pretrained``, or the base a ``base=train`` run starts from), cached by a hash of everything that
    decides its weights and reused by every run and sweep job. Returns (its model folder, the model, frozen)."""
    return train_stage(settings, data, acc, "reference")


def train_stage(settings: Settings, data: PackedData, acc, stage: str) -> tuple[str, torch.nn.Module]:
    """A model trained once on ``<stage>.data`` (``stage``: reference | base), cached and reused: (its model
    folder, the model loaded frozen)."""
    rcfg = getattr(settings, stage)
    seed = int(rcfg.seed)  # not the run's seed: every seed of a sweep shares one
    tcfg = replace(rcfg.trainer, seed=seed)
    ref_data, data_identity = stage_text(settings, data, stage, seed)
    # Everything that changes the model's weights: the global batch depends on the process count.
    identity = {
        "model": asdict(settings.model),
        "init": rcfg.init,
        "trainer": {k: v for k, v in asdict(tcfg).items() if k not in NOT_IN_THE_WEIGHTS},
        "data": data_identity,
        "seed": seed,
        "processes": acc.num_processes,
        "mixed_precision": parallel.resolve_mixed_precision(tcfg.mixed_precision),
    }
    converge = rcfg.converge
    if converge.holdout:  # held out as whole documents (a reference cut from shuffled blocks is another one)
        identity["converge"] = {**asdict(converge), "held_out": "whole documents"}
    where = settings.cache_root / stage / config_hash(identity)
    what = f"{rcfg.data.source} ({rcfg.data.split or 'all'})"
    heldout_name = f"{stage}_heldout"
    # one job of a sweep trains it; the others wait on its lock (saying so), then reuse it
    with job_lock(where, f"the {stage} {where}", acc) as lock:
        if agreed((where / DONE).exists()):
            log.info(
                "%s: reusing the cached %s %s (trained once on %s, shared by every run and sweep job with these "
                "settings)",
                stage,
                stage,
                where,
                what,
            )
        else:
            resume_from = checkpoints.latest(where / "run", warn=False) if where.exists() else None
            if agreed(resume_from is not None):  # an interrupted first run: carry on from its checkpoint
                log.warning("%s: resuming the interrupted %s from %s", stage, stage, resume_from)
                tcfg = replace(tcfg, resume=True)
            elif acc.is_main_process and where.exists():
                log.warning("%s: %s holds a partial %s (an interrupted run); rebuilding it", stage, where, stage)
                shutil.rmtree(where)
            acc.wait_for_everyone()
            log.info("%s: training the %s on %s (first run only) -> %s", stage, stage, what, where)
            with parallel.model_init(trained=False):  # trained with DDP under DeepSpeed, see below
                model = _stage_model(settings, data, rcfg.init, seed)
            lm = SelectiveLM(model, ratio=1.0)
            # DeepSpeed takes one model per run (the one trained next): this one trains with DDP.
            mode = "ddp" if parallel.requested_mode() == "deepspeed" else None
            step = checkpoints.read_state(resume_from)["step"] if resume_from is not None else None
            train_text, eval_sets, early = ref_data, data.eval_sets, None
            if converge.holdout:
                train_text, heldout = hold_out(
                    ref_data, converge.holdout, data.tokenizer.eos_token_id, f"{stage}.converge.holdout"
                )
                eval_sets = {**data.eval_sets, heldout_name: heldout}
                best = lambda: t.engine.save_pretrained(where / "model", data.tokenizer)  # noqa: E731 (the best weights)
                early = EarlyStop(heldout_name, converge.patience, converge.min_delta, on_best=best)
                log.info(
                    "%s: trains until its loss on %d held-out blocks of its text stops improving "
                    "(patience %d evals of %d steps, at most %d steps)",
                    stage,
                    len(heldout),
                    early.patience,
                    tcfg.eval_every,
                    tcfg.max_steps,
                )
            t = Trainer(
                acc,
                lm,
                train_text,
                eval_sets,
                tcfg,
                Tracker(where / "run", enabled=acc.is_main_process, resume_step=step),
                name=stage,
                watchers=[early] if early else [],
                mode=mode,
            )
            try:
                res = t.fit()
            except RunInterrupted as e:  # say how to continue the user's run, not how to resume the cache's
                raise RunInterrupted(
                    e.signum,
                    e.step,
                    e.checkpoint,
                    hint=(
                        f"interrupted while training the {stage} model (step {e.step} of {tcfg.max_steps}, "
                        f"checkpointed in its cache {where}); the next run resumes it by itself: run the same command "
                        "again to continue"
                    ),
                ) from e
            # what it cost (slm-curves charges it to the runs that select with it): time and FLOPs of its steps
            res = {**res, "train_time_s": round(t.train_time, 3), "flops": t.flops, "processes": acc.num_processes}
            if early is None or early.best_step == 0:  # else model/ holds the best eval's weights already
                t.engine.save_pretrained(where / "model", data.tokenizer)
            if acc.is_main_process:
                lock.confirm()  # never publish over another job's work (this one was away past the stale time)
                (where / "result.json").write_text(json.dumps(res, indent=1))
                (where / DONE).write_text("")  # last: the cache is complete
            acc.wait_for_everyone()
            t.engine.release()
            del t, lm, model
    return str(where / "model"), load_reference(str(where / "model"), device=acc.device)


HELDOUT = "reference_heldout"  # the eval set a converging reference is judged on (a base's: base_heldout)


def hold_out(packed, share: float, eos_id: int, setting: str = "reference.converge.holdout") -> tuple:
    """(training blocks, held-out blocks) of a packed split in document order: about the last ``share`` of its
    blocks held out as whole documents, so the held-out loss measures text the reference never trained on. The
    document that straddles the cut is in neither part (the blocks from the cut to the first end of a document
    at or after it are dropped)."""
    n = len(packed)
    k = max(1, round(share * n))
    if n - k < 1:
        raise ValueError(f"{setting}={share}: its text has only {n} block(s)")
    cut = n - k
    ends = packed.select(range(cut, n))["input_ids"]
    first_end = next((cut + i for i, row in enumerate(ends) if eos_id in row), None)
    if first_end is None or first_end + 1 >= n:
        raise ValueError(
            f"{setting}={share}: the last {k} block(s) of its text are one document; "
            "hold out a larger share or give it more documents"
        )
    return packed.select(range(cut)), packed.select(range(first_end + 1, n))
