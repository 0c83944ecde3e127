"""One training run from its settings, without Hydra: :func:`build_run` assembles data, model, reference,
selection, watchers and the trainer into a :class:`Run`; :meth:`Run.train` trains it, writes its records and
the final model. :func:`train` does both.

A run folder holds ``config.yaml`` (what it was started with: the config a resume starts from), ``run_info.json``
(what ran), ``result.json``, ``metrics.jsonl``, its checkpoints and the final ``model/`` (see :mod:`slm.runs`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from slm import parallel, runs
from slm.data import PackedData, build, check_block_size
from slm.model import SELECTORS, SelectiveLM, build_model
from slm.parallel import CheckpointRefused
from slm.recipes.base_model import continue_from_base
from slm.recipes.ratio_choice import choose_ratio
from slm.recipes.references import (
    describe_quality,
    measured_quality,
    reference_cost,
    reference_quality,
    reference_source,
    run_reference_eval,
)
from slm.recipes.settings import RunSettings, resolve_block_size, resolve_reference_budget, resolve_tokenizer_text
from slm.reference import RefSource
from slm.runs import Tracker, checkpoints
from slm.selection import ratio_schedule
from slm.train import (
    BlockFilter,
    DownstreamTasks,
    OutgrownWatch,
    RisingEval,
    RunInterrupted,
    SelectionAudit,
    StepSelection,
    Trainer,
    Watcher,
    candidates,
    groupings,
)

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A training run, built and ready to train: its settings, folder, accelerator, data and trainer, and the
    records it started with."""

    settings: RunSettings
    run_dir: Path
    acc: object
    data: PackedData
    trainer: Trainer
    info: dict  # run_info.json as the run started
    before: dict | None  # the earlier record on a resume (what a refused resume puts back)

    def train(self) -> dict:
        """Train to the end (or resume to it); write result.json, the final ``model/`` and the run's records.
        Returns the final counters and eval numbers."""
        acc, run_dir, trainer = self.acc, self.run_dir, self.trainer
        try:
            result = trainer.fit()
            _save_model(trainer, run_dir, self.data.tokenizer)
        except RunInterrupted as e:
            self._finish({"status": "interrupted", "step": e.step, "checkpoint": str(e.checkpoint), "signal": e.signum})
            raise
        except KeyboardInterrupt as e:  # a second Ctrl-C, or one after training (while model/ is written)
            ckpt = checkpoints.latest(run_dir, warn=False)
            self._finish(
                {"status": "interrupted", "step": trainer.step, "checkpoint": str(ckpt), "signal": signal.SIGINT}
            )
            raise RunInterrupted(signal.SIGINT, trainer.step, ckpt) from e
        except CheckpointRefused:  # said before anything was read or trained: the run's records stay as they were
            if self.before is not None:
                runs.write_json(run_dir / runs.RUN_INFO, self.before)
            raise
        except checkpoints.FAILURES as e:
            self._finish({"status": "failed", "step": trainer.step, "error": checkpoints.describe_error(e)})
            raise
        finally:
            trainer.tracker.finish()
        self._finish({"status": "finished", **result})
        if acc.is_main_process:
            trainer.tracker.summary(result)
        acc.wait_for_everyone()
        acc.end_training()
        return result

    def _finish(self, result: dict) -> None:
        if self.acc.is_main_process:
            runs.write_json(self.run_dir / runs.RESULT, result)
            runs.write_json(self.run_dir / runs.RUN_INFO, {**self.info, "status": result["status"]})


def train(settings: RunSettings, run_dir, config: dict | None = None, changed: dict | None = None) -> dict:
    """Build the run and train it (see :func:`build_run`)."""
    return build_run(settings, run_dir, config, changed).train()


def build_run(settings: RunSettings, run_dir, config: dict | None = None, changed: dict | None = None) -> Run:
    """Everything a run needs, in order: accelerator, run folder, data, model, reference, selection,
    watchers, records, trainer. ``config``: the plain config to save as config.yaml and hand to W&B (default:
    the settings themselves); ``changed``: on a resume, the settings this launch changed (recorded)."""
    run_dir = Path(run_dir)
    settings = resolve_reference_budget(resolve_tokenizer_text(resolve_block_size(settings)))
    tcfg, sel = settings.trainer, settings.selector
    acc = _accelerator(settings)
    runs.claim(run_dir, tcfg.resume, tcfg.overwrite, acc.is_main_process)
    acc.wait_for_everyone()

    log.info("data: %s (blocks of %d tokens)", settings.data.source, settings.data.block_size)
    with acc.main_process_first():  # one process packs and caches; the others then load the cache
        data = build(settings.data)
    settings, base_quality = continue_from_base(settings, data, acc)  # base=train: model.pretrained = the base
    log.info("model: %s", settings.model.name)
    with parallel.model_init():
        model = build_model(settings.model, len(data.tokenizer), settings.seed, data.tokenizer)
    check_block_size(model.config, settings.data.block_size)
    log.info("reference: %s", settings.reference.kind)
    train_ds, ref = reference_source(settings, data, acc, model)
    earlier = runs.read_json(run_dir / runs.RUN_INFO) if tcfg.resume else None  # every process reads it
    eval_sets = _eval_sets(data, (earlier or {}).get("eval_loss_set"))
    first, trained = next(iter(eval_sets)), reference_quality(ref)
    # selector.ratio=auto: chosen now from the training text and the clean eval set eval/loss follows
    settings, ratio_auto = choose_ratio(settings, train_ds, (first, eval_sets[first]), ref, model, acc, earlier)
    sel = settings.selector
    watched, recorded = _ranks_by_reference(settings, ref), (earlier or {}).get("reference_eval_loss")
    # the reference's losses on the run's eval sets, once, for its quality and for the outgrown watch (a resume
    # watches against the level it recorded at its start, whether or not the reference is still at hand)
    losses = run_reference_eval(settings, data, acc, ref) if trained or (watched and not recorded) else None
    quality = measured_quality(trained, losses, first) if trained else None
    if quality:
        log.info("reference quality: %s", describe_quality(quality))
    outgrown = _outgrown_watch(settings, ref, first, recorded or losses) if watched else None

    selector = sel.selects_by(settings.reference.kind)
    schedule = ratio_schedule(sel.token_ratio(settings.reference.kind))
    lm = SelectiveLM(
        model,
        ratio=schedule.start,
        selector=selector if selector in SELECTORS else "train_loss",
        combine=sel.scores if sel.combines else None,
        scope=sel.scope,
        seed=settings.seed,
        head_backend=tcfg.head_backend,
        sparse_backward=tcfg.sparse_backward,
        check_scores="deferred",  # the loop checks them with its end-of-step reduce
    )
    started = dict(
        eval_loss_set=next(iter(eval_sets)),  # the set eval/loss follows, for the whole run
        selector=selector,
        ratio=schedule.start if schedule.is_constant else schedule.label(),
        ratio_auto=ratio_auto,  # selector.ratio=auto: what it chose and the evidence (None otherwise)
        scores_dir=ref.scores_dir,
        reference_quality=quality,  # a reference slm trained: its eval losses and steps (None otherwise)
        # what making the reference and its store cost, where the selection uses them (slm-curves charges it)
        reference_cost=reference_cost(ref) if watched else None,
        base=settings.model.pretrained if settings.base.trained else None,  # base=train: the cached base's folder
        base_quality=base_quality,  # its eval losses and steps (None: no base stage)
        # the loss the model is watched against (None: not watched)
        reference_eval_loss={outgrown.eval_set: outgrown.reference_loss} if outgrown else None,
        passes=_passes(settings, acc, len(train_ds)),  # how many times the run reads its training text
    )
    record = _saved_config(settings, config)
    info, before = _record_start(settings, run_dir, acc, changed or {}, started, record)
    tracker = Tracker(
        run_dir,
        enabled=acc.is_main_process,
        wandb_cfg=settings.logger,
        config=record,
        resume_step=_resume_step(run_dir) if tcfg.resume else None,
    )
    watchers: list[Watcher] = [SelectionAudit(groupings(train_ds.column_names, data.labels), acc.device), RisingEval()]
    if outgrown is not None:
        watchers.append(outgrown)
    if settings.downstream.tasks:
        watchers.append(DownstreamTasks(settings.downstream, data.tokenizer, tcfg.eval_every))
    trainer = Trainer(
        acc,
        lm,
        train_ds,
        eval_sets,
        tcfg,
        tracker,
        name=settings.name,
        selection=StepSelection(
            ratio=schedule,
            ref=ref,
            blocks=BlockFilter(sel.blocks, sel.block_score, tcfg.batch_size) if sel.blocks < 1.0 else None,
            oracle=selector == "oracle",
        ),
        watchers=watchers,
    )
    return Run(settings, run_dir, acc, data, trainer, info, before)


def _accelerator(settings: RunSettings):
    from accelerate.utils import set_seed

    tcfg = settings.trainer
    parallel.export_slurm_distributed_env()
    acc = parallel.make_accelerator(parallel.resolve_mixed_precision(tcfg.mixed_precision), tcfg.grad_accum)
    set_seed(tcfg.seed)
    parallel.quiet_other_processes(acc)
    return acc


def _passes(settings: RunSettings, acc, n_rows: int) -> float:
    """How many times the run reads its training text (rows read over rows there); said when above one:
    a saving measured over repeated text is not one over fresh text (the second pass's clean tokens are
    known ones)."""
    t, blocks = settings.trainer, settings.selector.blocks
    per_step = acc.num_processes * t.grad_accum * (candidates(t.batch_size, blocks) if blocks < 1.0 else t.batch_size)
    passes = round(per_step * t.max_steps / max(n_rows, 1), 3)
    if passes > 1:
        log.warning(
            "the run reads its training text %.2f times (%d steps x %d blocks of %d): selection's saving over "
            "repeated text is not its saving over one pass of fresh text",
            passes,
            t.max_steps,
            per_step,
            n_rows,
        )
    return passes


def _eval_sets(data: PackedData, first: str | None) -> dict:
    """The run's eval sets, ``first`` first: the set ``eval/loss`` followed from the run's start stays the one it
    follows on a resume, whatever sets the resume adds (a new ``+data.eval.<name>`` sorts before validation)."""
    sets = data.eval_sets
    if first is None:
        return sets
    if first not in sets:
        raise ValueError(
            f"trainer.resume=true: the run's eval/loss follows its eval set {first!r}, which this launch does not "
            f"have (it has {sorted(sets)}): resume with the run's own data.eval settings"
        )
    return {first: sets[first], **{k: v for k, v in sets.items() if k != first}}


def _ranks_by_reference(settings: RunSettings, ref: RefSource) -> bool:
    """Whether the run's selection ranks by its reference (so it watches for the model outgrowing it)."""
    sel = settings.selector
    needs = sel.needs()
    return bool(sel.selects and (needs["loss"] or needs["entropy"])) and ref.kind != "none"


def _outgrown_watch(settings: RunSettings, ref: RefSource, name: str, losses: dict | None) -> OutgrownWatch | None:
    """Watch the model's eval loss against its reference's on the eval set ``name`` (eval/loss's), given the
    reference's ``losses`` (set -> loss); None, saying why, when that loss cannot be had."""
    sel = settings.selector
    if not losses or name not in losses:
        why = "an evolving reference" if ref.evolve_every else "its weights are not on this machine"
        log.info("reference: its eval loss is unknown (%s): the run cannot tell when the model outgrows it", why)
        return None
    log.info(
        "reference: its loss on %s is %.4f; once the model's reaches it, selector.when_outgrown=%s",
        name,
        losses[name],
        sel.when_outgrown,
    )
    return OutgrownWatch(name, losses[name], margin=sel.outgrown_margin, remedy=sel.when_outgrown)


def _saved_config(settings: RunSettings, config: dict | None) -> dict:
    """The config a run records (config.yaml, W&B): the composed one when there is one, else the settings;
    with the block size the run trains with."""
    record = dict(config) if config is not None else json.loads(json.dumps(asdict(settings), default=str))
    if isinstance(record.get("data"), dict):
        record["data"] = {**record["data"], "block_size": settings.data.block_size}
    return record


def _record_start(
    settings: RunSettings, run_dir: Path, acc, changed: dict, started: dict, config: dict
) -> tuple[dict, dict | None]:
    """run_info.json as the run starts (a resume adds to the earlier record); config.yaml on the first start.
    Returns (the record, the earlier one on a resume: what a refused resume puts back)."""
    sel = settings.selector
    info = dict(
        name=settings.name,
        experiment=settings.experiment_name,
        selector=started["selector"],
        ratio=started["ratio"],
        ratio_auto=started["ratio_auto"],
        scope=sel.scope,
        blocks=sel.blocks,
        train_split=settings.data.train_split,
        reference=settings.reference.kind,
        eval_loss_set=started["eval_loss_set"],  # the eval set eval/loss follows over the whole run
        seed=settings.seed,
        scores_dir=started["scores_dir"],
        status="running",
        processes=acc.num_processes,
        mode=parallel.requested_mode(),
        launch_dir=os.getcwd(),  # where relative data paths of its config start from
        reference_quality=started["reference_quality"],
        reference_cost=started["reference_cost"],
        base=started["base"],
        base_quality=started["base_quality"],
        reference_eval_loss=started["reference_eval_loss"],
        passes=started["passes"],
    )
    old = None
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = runs.read_json(run_dir / runs.RUN_INFO) if settings.trainer.resume else None
        if old is not None:
            record = {k: list(v) for k, v in changed.items()}
            if old.get("processes") != acc.num_processes:
                record["processes"] = [old.get("processes"), acc.num_processes]
            info = {
                "eval_loss_set": info["eval_loss_set"],  # a run recorded before it was: decided now, then kept
                **old,
                "status": "running",
                "processes": acc.num_processes,
                "mode": info["mode"],
                "resumes": [*old.get("resumes", []), record],
            }
        else:
            (run_dir / runs.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        runs.write_json(run_dir / runs.RUN_INFO, info)
    return info, old


def _save_model(trainer: Trainer, run_dir: Path, tokenizer) -> None:
    """The final ``model/`` (written aside, then renamed into place: complete or absent)."""
    try:
        trainer.engine.save_pretrained(run_dir / "model", tokenizer)
    except Exception as e:  # a full disk arrives as OSError, RuntimeError or safetensors' own error
        ckpt = checkpoints.latest(run_dir, warn=False)
        raise checkpoints.CheckpointError(
            f"could not write {run_dir / 'model'} ({type(e).__name__}: {e}). Training reached step "
            f"{trainer.step} and its checkpoint {ckpt} is complete: free disk space and run again with "
            f"trainer.resume=true hydra.run.dir={run_dir} to write model/"
        ) from e


def _resume_step(run_dir: Path) -> int | None:
    ckpt = checkpoints.latest(run_dir, warn=False)
    return checkpoints.read_state(ckpt)["step"] if ckpt else None
