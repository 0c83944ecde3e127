"""``slm-train``: one training run from the composed config: settings, data, model, reference,
selector, tracker, trainer; then the run's records and the final model."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from slm import parallel, runs
from slm.cli.common import (
    CONF_DIR,
    check_output_dirs,
    export_slurm_distributed_env,
    one_line_errors,
    run_dir_from_hydra,
    setup_logging,
    task_overrides,
)
from slm.cli.preflight import check_run_sources
from slm.cli.references import describe_quality, reference_quality, reference_source, run_reference_eval
from slm.cli.settings import RunSettings, container, effective_selector, resolve_block_size, validate
from slm.data import build, check_block_size
from slm.model import SELECTORS, SelectiveLM, build_model
from slm.parallel import CheckpointRefused
from slm.runs import Tracker, checkpoints
from slm.selection import ratio_schedule
from slm.train import BlockFilter, OutgrownWatch, RunInterrupted, TrainConfig, Trainer, candidates
from slm.train.config import ORACLE_COLUMN

log = logging.getLogger(__name__)


def _accelerator(tcfg: TrainConfig):
    from accelerate.utils import set_seed

    export_slurm_distributed_env()
    acc = parallel.make_accelerator(parallel.resolve_mixed_precision(tcfg.mixed_precision), tcfg.grad_accum)
    set_seed(tcfg.seed)
    return acc


def run_config(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> tuple[DictConfig, dict]:
    """The config this launch trains with: on resume the run's own saved config plus the allowed
    changes (see :mod:`slm.runs`), else ``cfg``."""
    saved = run_dir / runs.CONFIG
    if not cfg.trainer.get("resume") or not saved.exists():
        return cfg, {}
    info = runs.read_json(run_dir / runs.RUN_INFO) or {}
    processes = (int(info.get("processes", 1)), int(os.environ.get("WORLD_SIZE", "1")))
    merged, changed = runs.resume_config(container(OmegaConf.load(saved)), container(cfg), overrides, processes)
    _check_candidates(merged, changed, processes)
    for key, (old, new) in changed.items():
        log.info("resume: %s changed from %r to %r", key, old, new)
    return OmegaConf.create(merged), changed


def _check_candidates(merged: dict, changed: dict, processes: tuple[int, int]) -> None:
    """With block selection, a step reads processes x grad_accum x candidates(batch_size) blocks: a resume
    with another layout of the same rows per step would read other rows than the uninterrupted run."""
    blocks = float(merged["selector"].get("blocks", 1.0))
    if blocks >= 1.0:
        return
    now = merged["trainer"]
    before = {**now, **{k.split(".", 1)[1]: old for k, (old, _) in changed.items() if k.startswith("trainer.")}}
    read = [
        world * int(t["grad_accum"]) * candidates(int(t["batch_size"]), blocks)
        for world, t in ((processes[0], before), (processes[1], now))
    ]
    if read[0] != read[1]:
        raise runs.ResumeMismatch(
            f"trainer.resume=true: with selector.blocks={blocks} the run read {read[0]} candidate blocks per step "
            f"({processes[0]} process(es) x trainer.batch_size={before['batch_size']} x trainer.grad_accum="
            f"{before['grad_accum']}); this launch would read {read[1]}, so other rows than the run would have: "
            "resume with the run's own process count, batch size and grad_accum"
        )


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """One run of ``slm-train`` (usable without Hydra's decorator, e.g. from tests).

    ``overrides``: the launch's explicit ``key=value`` settings; on resume only they may differ
    from the run's saved config (``None``: every key is compared).
    """
    run_dir = Path(run_dir)
    cfg, changed = run_config(cfg, run_dir, overrides)
    settings = validate(cfg)  # before anything slow: settings first, then what must be fetched
    check_run_sources(cfg)
    settings = resolve_block_size(cfg, settings)
    tcfg, sel = settings.trainer, settings.selector
    acc = _accelerator(tcfg)
    setup_logging(acc)
    runs.claim(run_dir, tcfg.resume, tcfg.overwrite, acc.is_main_process)
    acc.wait_for_everyone()

    log.info("data: %s (blocks of %d tokens)", settings.data.source, settings.data.block_size)
    with acc.main_process_first():  # one process packs and caches; the others then load the cache
        data = build(settings.data)
    log.info("model: %s", settings.model.get("name"))
    with parallel.model_init():
        model = build_model(settings.model, len(data.tokenizer), settings.seed, data.tokenizer)
    check_block_size(model.config, settings.data.block_size)
    log.info("reference: %s", settings.reference.kind)
    train_ds, ref = reference_source(settings, data, acc, model)
    quality = reference_quality(ref)
    if quality:
        log.info("reference quality: %s", describe_quality(quality))
    outgrown = _outgrown_watch(settings, data, acc, ref)

    selector = effective_selector(sel.name, sel.ratio, settings.reference.kind, sel.blocks)
    schedule = ratio_schedule(1.0 if selector in ("all", "blocks", "oracle") else sel.ratio)
    lm = SelectiveLM(
        model,
        ratio=schedule.start,
        selector=selector if selector in SELECTORS else "train_loss",
        combine=sel.scores if sel.combines else None,
        scope=sel.scope,
        seed=settings.seed,
        head_backend=tcfg.head_backend,
        check_scores="deferred",  # the loop checks them with its end-of-step reduce
    )
    ref_eval = {outgrown.eval_set: outgrown.reference_loss} if outgrown else None
    passes = _passes(settings, acc, len(train_ds))
    info, before = _record_start(
        cfg, settings, run_dir, acc, changed, selector, schedule, ref.scores_dir, quality, ref_eval, passes
    )
    tracker = Tracker(
        run_dir,
        enabled=acc.is_main_process,
        wandb_cfg=settings.logger,
        config=container(cfg),
        resume_step=_resume_step(run_dir) if tcfg.resume else None,
    )
    blocks = BlockFilter(sel.blocks, sel.block_score, tcfg.batch_size) if sel.blocks < 1.0 else None
    trainer = Trainer(
        acc,
        lm,
        train_ds,
        data.eval_sets,
        tcfg,
        run_dir,
        ref=ref,
        tracker=tracker,
        name=settings.name,
        ratio=schedule,
        downstream=settings.downstream,
        tokenizer=data.tokenizer,
        blocks=blocks,
        outgrown=outgrown,
        mask_column=ORACLE_COLUMN if selector == "oracle" else None,
        labels=data.labels,
    )
    try:
        result = trainer.fit()
        _save_model(trainer, run_dir, data.tokenizer)
    except RunInterrupted as e:
        _finish(
            acc,
            run_dir,
            info,
            {"status": "interrupted", "step": e.step, "checkpoint": str(e.checkpoint), "signal": e.signum},
        )
        raise
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one after training (while model/ is written)
        ckpt = checkpoints.latest(run_dir, warn=False)
        _finish(
            acc,
            run_dir,
            info,
            {"status": "interrupted", "step": trainer.step, "checkpoint": str(ckpt), "signal": signal.SIGINT},
        )
        raise RunInterrupted(signal.SIGINT, trainer.step, ckpt) from e
    except CheckpointRefused:  # said before anything was read or trained: the run's records stay as they were
        if before is not None:
            runs.write_json(run_dir / runs.RUN_INFO, before)
        raise
    except checkpoints.FAILURES as e:
        _finish(acc, run_dir, info, {"status": "failed", "step": trainer.step, "error": checkpoints.describe(e)})
        raise
    finally:
        tracker.finish()
    _finish(acc, run_dir, info, {"status": "finished", **result})
    if acc.is_main_process:
        tracker.summary(result)
        _print_summary(run_dir, result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


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


def _outgrown_watch(settings: RunSettings, data, acc, ref) -> OutgrownWatch | None:
    """Watch the model's eval loss against its reference's on the first eval set, for a run whose selection
    ranks by the reference (None otherwise, or when the reference's eval loss cannot be had)."""
    sel = settings.selector
    needs = sel.needs()
    if not (sel.selects and (needs["loss"] or needs["entropy"])) or ref.kind == "none":
        return None
    losses = run_reference_eval(settings, data, acc, ref)
    if not losses:
        why = "an evolving reference" if ref.evolve_every else "its weights are not on this machine"
        log.info("reference: its eval loss is unknown (%s): the run cannot tell when the model outgrows it", why)
        return None
    name = next(iter(data.eval_sets))
    log.info(
        "reference: its loss on %s is %.4f; once the model's reaches it, selector.when_outgrown=%s",
        name,
        losses[name],
        sel.when_outgrown,
    )
    return OutgrownWatch(name, losses[name], margin=sel.outgrown_margin, remedy=sel.when_outgrown)


def _record_start(
    cfg,
    settings: RunSettings,
    run_dir: Path,
    acc,
    changed: dict,
    selector: str,
    schedule,
    scores_dir,
    quality: dict | None = None,
    reference_eval_loss: dict | None = None,
    passes: float | None = None,
) -> tuple[dict, dict | None]:
    """run_info.json as the run starts (a resume adds to the earlier record); config.yaml on the first start.
    Returns (the record, the earlier one on a resume: what a refused resume puts back)."""
    sel = settings.selector
    info = dict(
        name=settings.name,
        experiment=settings.experiment_name,
        selector=selector,
        ratio=schedule.start if schedule.is_constant else schedule.label(),
        scope=sel.scope,
        blocks=sel.blocks,
        train_split=settings.data.train_split,
        reference=settings.reference.kind,
        seed=settings.seed,
        scores_dir=scores_dir,
        status="running",
        processes=acc.num_processes,
        mode=parallel.requested_mode(),
        launch_dir=os.getcwd(),  # where relative data paths of its config start from
        reference_quality=quality,  # a reference slm trained: its eval losses and steps (None otherwise)
        reference_eval_loss=reference_eval_loss,  # the loss the model is watched against (None: not watched)
        passes=passes,  # how many times the run reads its training text
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
                **old,
                "status": "running",
                "processes": acc.num_processes,
                "mode": info["mode"],
                "resumes": [*old.get("resumes", []), record],
            }
        else:
            OmegaConf.save(cfg, run_dir / runs.CONFIG, resolve=True)
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


def _finish(acc, run_dir: Path, info: dict, result: dict) -> None:
    if acc.is_main_process:
        runs.write_json(run_dir / runs.RESULT, result)
        runs.write_json(run_dir / runs.RUN_INFO, {**info, "status": result["status"]})


def _resume_step(run_dir: Path) -> int | None:
    ckpt = checkpoints.latest(run_dir, warn=False)
    return checkpoints.read_state(ckpt)["step"] if ckpt else None


def _print_summary(run_dir: Path, result: dict) -> None:
    def repeats_first_set(key: str) -> bool:  # eval/<first>/loss is also eval/loss: print it once
        parts = key.split("/")
        return len(parts) == 3 and parts[0] == "eval" and result.get(f"eval/{parts[2]}") == result[key]

    def breakdown(key: str) -> bool:  # audit/junk_dropped/<kind> and the like: in metrics.jsonl and slm-curves
        return key.startswith("audit/") and key.count("/") > 1

    numbers = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items()
        if k != "status" and not repeats_first_set(k) and not breakdown(k)
    )
    print(
        f"\nslm-train finished: {numbers}\n  run directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}"
        f"\n  model: {run_dir / 'model'}  (AutoModelForCausalLM.from_pretrained)\n"
        f"  plot: slm-curves {run_dir}",
        flush=True,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    with one_line_errors():  # inside the app: Hydra reports any exception that reaches it as a traceback
        result = train(cfg, run_dir_from_hydra(), task_overrides())
    return result.get("eval/loss")


def main_train() -> None:
    with one_line_errors():  # Ctrl-C before Hydra hands over (e.g. while composing) lands here
        check_output_dirs(sys.argv[1:])
        train_app()
