"""Hydra entry points: ``slm-train`` and ``slm-score``, and the pieces they build from config."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from slm import checkpoints, parallel, runs
from slm.architectures import build_model
from slm.blocks import BlockFilter
from slm.data import build, check_block_size
from slm.hub import check_run_sources
from slm.model import SELECTORS, SelectiveLM
from slm.ref_sources import (
    check_reference_tokenizer,
    check_score_vocab,
    container,
    reference_source,
    stored_scores,
    trained_reference,
)
from slm.reference import load_reference
from slm.selection import ratio_schedule
from slm.settings import downstream_config, effective_selector, needed_reference, resolve_block_size, validate
from slm.store import META_FILE
from slm.tracking import Tracker
from slm.train import NonFiniteLoss, RunInterrupted, TrainConfig, Trainer

log = logging.getLogger("slm")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _setup_logging(acc) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not acc.is_main_process:  # one process speaks; the slm.* loggers inherit from "slm"
        import datasets

        datasets.disable_progress_bars()
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("slm").setLevel(logging.WARNING)


def _export_slurm_distributed_env() -> None:
    """Under a multi-task submitit/SLURM job, set RANK, WORLD_SIZE, MASTER_ADDR, ... for Accelerate."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        try:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export()
        except (ImportError, RuntimeError) as e:  # not inside a submitit job: leave the environment alone
            log.warning("SLURM_NTASKS>1 but the distributed environment could not be set from submitit: %s", e)


def make_accelerator(tcfg: TrainConfig):
    from accelerate.utils import set_seed

    _export_slurm_distributed_env()
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
    for key, (old, new) in changed.items():
        log.info("resume: %s changed from %r to %r", key, old, new)
    return OmegaConf.create(merged), changed


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """One run of ``slm-train`` (usable without Hydra's decorator, e.g. from tests).

    ``overrides``: the launch's explicit ``key=value`` settings; on resume only they may differ
    from the run's saved config (``None``: every key is compared).
    """
    run_dir = Path(run_dir)
    cfg, changed = run_config(cfg, run_dir, overrides)
    tcfg = validate(cfg)  # before anything slow: settings first, then what must be fetched
    check_run_sources(cfg)
    resolve_block_size(cfg)
    acc = make_accelerator(tcfg)
    _setup_logging(acc)
    runs.claim(run_dir, tcfg.resume, tcfg.overwrite, acc.is_main_process)
    acc.wait_for_everyone()
    with acc.main_process_first():  # one process packs and caches; the others then load the cache
        data = build(cfg.data)
    with parallel.model_init():
        model = build_model(cfg.model, len(data.tokenizer), cfg.seed, data.tokenizer)
    check_block_size(model.config, int(cfg.data.block_size))
    train_ds, ref = reference_source(cfg, data, acc, model, entropy=needed_reference(cfg)["entropy"])
    sel = cfg.selector
    selector = effective_selector(sel.name, sel.ratio, cfg.reference.kind, sel.get("blocks", 1.0))
    schedule = ratio_schedule(1.0 if selector in ("all", "blocks") else sel.ratio)
    ratio = schedule.start if schedule.is_constant else schedule.label()
    combine = tuple(sel.scores) if selector in ("union", "intersection") else None
    lm = SelectiveLM(model, ratio=schedule.start, selector=selector if selector in SELECTORS else "train_loss",
                     combine=combine,
                     scope=sel.scope, seed=cfg.seed, head_backend=tcfg.head_backend,
                     check_scores="deferred")  # the loop checks them with its end-of-step reduce  # fmt: skip
    info = dict(name=cfg.name, experiment=cfg.experiment_name, selector=selector, ratio=ratio, scope=sel.scope,
                blocks=float(sel.get("blocks", 1.0)), train_split=cfg.data.get("train_split", "train"),
                reference=cfg.reference.kind, seed=cfg.seed, scores_dir=ref.scores_dir, status="running",
                processes=acc.num_processes, mode=parallel.requested_mode())  # fmt: skip
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = runs.read_json(run_dir / runs.RUN_INFO) if tcfg.resume else None
        if old is not None:
            record = {k: list(v) for k, v in changed.items()}
            if old.get("processes") != acc.num_processes:
                record["processes"] = [old.get("processes"), acc.num_processes]
            info = {**old, "status": "running", "processes": acc.num_processes, "mode": info["mode"],
                    "resumes": [*old.get("resumes", []), record]}  # fmt: skip
        else:
            OmegaConf.save(cfg, run_dir / runs.CONFIG, resolve=True)
        runs.write_json(run_dir / runs.RUN_INFO, info)
    wandb_cfg = None if cfg.logger.kind == "none" else container(cfg.logger)
    tracker = Tracker(run_dir, enabled=acc.is_main_process, wandb_cfg=wandb_cfg, config=container(cfg),
                      resume_step=_resume_step(run_dir) if tcfg.resume else None)  # fmt: skip
    blocks = None
    if float(sel.get("blocks", 1.0)) < 1.0:
        blocks = BlockFilter(float(sel.blocks), sel.get("block_score", "excess_loss"), tcfg.batch_size)
    trainer = Trainer(acc, lm, train_ds, data.eval_sets, tcfg, run_dir, ref=ref, tracker=tracker, name=cfg.name,
                      ratio=schedule, downstream=downstream_config(cfg), tokenizer=data.tokenizer,
                      blocks=blocks)  # fmt: skip
    try:
        result = trainer.fit()
        _save_model(trainer, run_dir, data.tokenizer)
    except RunInterrupted as e:
        _finish(acc, run_dir, info, {"status": "interrupted", "step": e.step, "checkpoint": str(e.checkpoint),
                                     "signal": e.signum})  # fmt: skip
        raise
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one after training (while model/ is written)
        ckpt = checkpoints.latest(run_dir, warn=False)
        _finish(acc, run_dir, info, {"status": "interrupted", "step": trainer.step, "checkpoint": str(ckpt),
                                     "signal": signal.SIGINT})  # fmt: skip
        raise RunInterrupted(signal.SIGINT, trainer.step, ckpt) from e
    except Exception as e:
        _finish(acc, run_dir, info, {"status": "failed", "step": trainer.step, "error": f"{type(e).__name__}: {e}"})
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

    numbers = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                        if k != "status" and not repeats_first_set(k))  # fmt: skip
    print(f"\nslm-train finished: {numbers}\n  run directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}"
          f"\n  model: {run_dir / 'model'}  (AutoModelForCausalLM.from_pretrained)\n"
          f"  plot: slm-curves {run_dir}", flush=True)  # fmt: skip


def run_dir_from_hydra() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    with one_line_errors():  # inside the app: Hydra reports any exception that reaches it as a traceback
        result = train(cfg, run_dir_from_hydra(), _task_overrides())
    return result.get("eval/loss")


def score(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """``slm-score``: store reference losses of the training split (``overrides``: the launch's own,
    to print the ``slm-train`` command that uses the store)."""
    check_run_sources(cfg)
    resolve_block_size(cfg)
    acc = parallel.make_accelerator("no")
    _setup_logging(acc)
    with acc.main_process_first():
        data = build(cfg.data)
    if cfg.reference.kind in ("demo", "train"):
        name, ref = trained_reference(cfg, data, acc)
    elif cfg.reference.kind != "live":
        raise ValueError(f"slm-score needs reference=demo, train or live, got reference.kind={cfg.reference.kind!r}")
    else:
        check_reference_tokenizer(cfg, data)
        name, ref = cfg.reference.path, load_reference(cfg.reference.path, device=acc.device,
                                                       dtype=cfg.reference.get("dtype", "auto"))  # fmt: skip
    check_score_vocab(cfg, data, ref)
    out, reused = stored_scores(cfg, data, ref, name, acc, out_dir=cfg.get("out_dir"),
                                entropy=bool(cfg.get("entropy")), dtype=cfg.get("store_dtype", "float32"))  # fmt: skip
    if acc.is_main_process:
        meta = runs.read_json(out / META_FILE) or {}
        rate = meta.get("tokens_per_s")
        how = ("reused: an earlier slm-score run had stored these exact losses" if reused or not rate
               else f"scored at {rate:,} tokens/s over {meta.get('processes')} process(es)")  # fmt: skip
        print(f"\nslm-score: stored ref_loss for {len(data['train'])} blocks in {out} ({how})"
              f"\n  train with: slm-train {' '.join(_data_overrides(overrides))} reference=stored "
              f"reference.scores_dir={out}", flush=True)  # fmt: skip
    return out


def _data_overrides(overrides: list[str] | None) -> list[str]:
    """The launch's data and model options: a run on this store must pass them again (the packed
    data the store belongs to is found by them)."""
    keep = ("data", "model", "seed")
    return [o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0].split(".")[0] in keep]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="score")
def score_app(cfg: DictConfig) -> None:
    with one_line_errors():
        score(cfg, _task_overrides())


@contextmanager
def one_line_errors():
    """An interruption or a bad setting ends with one line on stderr and a non-zero exit.

    128 + the signal number tells a launcher (SLURM, submitit) that the job was stopped so it can
    requeue it, and stops a sweep at the interrupted job instead of launching the next one.
    ``SLM_DEBUG=1`` shows the traceback instead.
    """
    try:
        yield
    except RunInterrupted as e:
        where = e.checkpoint.parent.parent if e.checkpoint else "<run dir>"
        _fail(e.hint or f"interrupted at step {e.step}; checkpoint {e.checkpoint}. Continue with trainer.resume=true "
              f"hydra.run.dir={where}", 128 + (e.signum or 2), e)  # fmt: skip
    except KeyboardInterrupt as e:
        _fail("interrupted (Ctrl-C); caches and stores are written only when complete, so rerun to continue", 130, e)
    except (runs.RunDirExists, runs.ResumeMismatch, NonFiniteLoss, checkpoints.CheckpointError, ValueError,
            FileNotFoundError, ImportError) as e:  # fmt: skip
        _fail(str(e), 1, e)


def _fail(message: str, code: int, error: BaseException):
    if os.environ.get("SLM_DEBUG"):
        raise error
    print(f"\nslm: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _check_output_dirs(argv: list[str]) -> None:
    """``hydra.run.dir=`` / ``hydra.sweep.dir=`` naming an existing file: said in one line (Hydra would
    fail creating the folder, with its own traceback)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value and os.path.isfile(value):
            raise ValueError(f"{key}={value!r} is a file; name a folder for the run's outputs")


def main_train() -> None:
    with one_line_errors():  # Ctrl-C before Hydra hands over (e.g. while composing) lands here
        _check_output_dirs(sys.argv[1:])
        train_app()


def main_score() -> None:
    with one_line_errors():
        if sys.argv[1:2] == ["--verify"]:
            verify_stores(sys.argv[2:])
        else:
            _check_output_dirs(sys.argv[1:])
            score_app()


def verify_stores(folders: list[str]) -> None:
    """``slm-score --verify <store>...``: hash every shard of each store against its metadata."""
    from tqdm.auto import tqdm

    from slm.store import StoredColumns, read_meta

    if not folders:
        raise ValueError("slm-score --verify takes one or more store folders (the folder slm-score printed)")
    for folder in folders:
        meta = read_meta(Path(folder))
        columns = StoredColumns(folder, meta)
        columns.check_files(sample=0)
        rows = meta["rows"] * len(columns.columns)
        with tqdm(total=rows, desc=f"verifying {folder}", unit="row", unit_scale=True) as bar:
            columns.verify_all(bar)
        shards = sum(len(meta["shards"][c]) for c in columns.columns)
        print(
            f"slm-score --verify: {folder} is intact ({shards} shards of {', '.join(columns.columns)}, "
            f"{meta['rows']} rows of {meta['block_size']} tokens)",
            flush=True,
        )


if __name__ == "__main__":
    main_train()
