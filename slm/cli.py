"""Hydra entry points: ``slm-train`` and ``slm-score``, and the pieces they build from config."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from slm import checkpoints, parallel, runs
from slm.data import DataConfig, build, check_block_size
from slm.downstream import DownstreamConfig, harness
from slm.hub import check_run_sources
from slm.model import SCORES, SelectiveLM
from slm.ref_sources import check_score_vocab, container, reference_source, stored_scores, trained_reference
from slm.reference import load_reference
from slm.selection import SCOPES, ratio_schedule
from slm.tracking import Tracker
from slm.train import NonFiniteLoss, RunInterrupted, TrainConfig, Trainer

log = logging.getLogger("slm")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SELECTOR_NAMES = ("excess_loss", "train_loss", "reference_loss", "reference_entropy", "random", "all", "union",
                  "intersection")  # fmt: skip


def _run_stamp() -> str:
    """One timestamp per launch: every process of an ``accelerate launch``/``torchrun`` job
    derives it from their common parent's start time, so they share one run directory."""
    stamp = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(stamp))


def effective_selector(selector: str, ratio, reference_kind: str) -> str:
    """What a run actually selects by: every token at a constant ratio 1.0; the training loss when
    excess loss has no reference. Run names, run_info.json and curve legends use this."""
    try:
        schedule = ratio_schedule(ratio)
    except ValueError:
        return selector  # an invalid ratio: validate() names it
    if selector == "all" or (schedule.is_constant and schedule.start >= 1.0):
        return "all"
    if selector == "excess_loss" and reference_kind == "none":
        return "train_loss"
    return selector


def _run_name(selector: str, ratio, reference_kind: str, seed) -> str:
    try:
        label = ratio_schedule(ratio).label()
    except ValueError:
        label = str(ratio)
    return f"{effective_selector(selector, ratio, reference_kind)}-{label}-{reference_kind}-s{seed}"


def needed_reference(cfg: DictConfig) -> dict:
    """Which reference values the selector needs: ``{"loss": bool, "entropy": bool}``."""
    sel = cfg.selector
    names = list(sel.get("scores") or []) if sel.name in ("union", "intersection") else [sel.name]
    return {"loss": any(n in ("excess_loss", "reference_loss") for n in names),
            "entropy": "reference_entropy" in names}  # fmt: skip


for _name, _fn in (("slm_stamp", _run_stamp), ("slm_run_name", _run_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=_name == "slm_stamp")


def build_model(mcfg, vocab_size: int, seed: int, tokenizer=None, fresh: bool = False):
    """An HF causal LM: ``pretrained`` (hub name or path), else built from ``config``. A model built
    from config carries ``tokenizer``'s special token ids (generation stops at its end token).
    ``fresh=True``: a pretrained model's architecture, freshly initialised (a reference trained
    from scratch)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, mcfg.get("dtype", "float32"))
    if mcfg.get("pretrained") and not fresh:
        return _from_pretrained(mcfg.pretrained, dtype)
    if mcfg.get("pretrained"):
        config = AutoConfig.from_pretrained(mcfg.pretrained)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    kwargs = container(mcfg.config)
    model_type = kwargs.pop("model_type")
    if tokenizer is not None:
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tokenizer is not None and model.generation_config is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


def _from_pretrained(name: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise ValueError(f"model.pretrained={name!r}: could not load it ({e})") from e


def _missing(node, key: str) -> bool:
    return OmegaConf.is_config(node) and (OmegaConf.is_missing(node, key) or node.get(key) is None)


MAX_DEFAULT_BLOCK = 2048


def resolve_block_size(cfg: DictConfig) -> None:
    """``data.block_size: null`` becomes the model's context length (at most 2048)."""
    if cfg.data.get("block_size") is not None:
        return
    if cfg.model.get("pretrained"):
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(cfg.model.pretrained)
        limit = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
    else:
        limit = cfg.model.config.get("max_position_embeddings") or cfg.model.config.get("n_positions")
    cfg.data.block_size = min(int(limit or MAX_DEFAULT_BLOCK), MAX_DEFAULT_BLOCK)
    log.info("data.block_size=null: using %d (the model's context length, at most %d)", cfg.data.block_size,
             MAX_DEFAULT_BLOCK)  # fmt: skip


def validate(cfg: DictConfig) -> TrainConfig:
    """Check the composed config before anything slow runs; every error names the full key."""
    sel = cfg.selector
    if sel.name not in SELECTOR_NAMES:
        raise ValueError(f"selector.name must be one of {SELECTOR_NAMES}, got {sel.name!r}")
    schedule = ratio_schedule(sel.ratio)
    if sel.name in ("union", "intersection"):
        scores = list(sel.get("scores") or [])
        if len(scores) != 2 or not set(scores) <= set(SCORES):
            raise ValueError(f"selector={sel.name} combines two scores: selector.scores=[a,b] with a, b in {SCORES}")
    if sel.scope not in SCOPES:
        raise ValueError(f"selector.scope must be one of {SCOPES}, got {sel.scope!r}")
    if _missing(cfg.data, "source"):
        raise ValueError("data.source is required with this data option: a file, glob or folder (data=files) "
                         "or a hub dataset name (data=hub)")  # fmt: skip
    DataConfig(**{**container(cfg.data), "block_size": cfg.data.get("block_size") or 2})  # null: resolved later
    kind = cfg.reference.kind
    if kind == "stored" and _missing(cfg.reference, "scores_dir"):
        raise ValueError("reference=stored needs reference.scores_dir=<folder>: run slm-score first (with the same "
                         "model and data options); it prints the folder and the slm-train command to use")  # fmt: skip
    if kind == "live" and _missing(cfg.reference, "path"):
        raise ValueError("reference=live needs reference.path=<a model folder or hub name> sharing the training "
                         "model's tokenizer")  # fmt: skip
    if kind == "demo" and cfg.data.source != "builtin":
        raise ValueError(
            f"reference=demo trains its reference on the built-in corpus's clean split, but data.source="
            f"{cfg.data.source!r}. Choose one: reference=none (no reference: every token with selector=all, or "
            "selection by the training loss), reference=train reference.data.source=<clean text> (a reference "
            "trained once on it), reference=live reference.path=<model> (a pretrained reference), or "
            "reference=stored reference.scores_dir=<folder> (losses stored by slm-score)"
        )
    needs = needed_reference(cfg)
    selecting = not (schedule.is_constant and schedule.start >= 1.0)
    if kind == "none" and selecting and (needs["entropy"] or sel.name == "reference_loss"):
        raise ValueError(f"selector={sel.name} needs a reference (reference=live, stored, train or demo)")
    if kind == "train" and _missing(cfg.reference.data, "source"):
        raise ValueError("reference=train needs reference.data.source=<the reference's training text: a file, glob, "
                         "folder, hub dataset or builtin>")  # fmt: skip
    if cfg.reference.get("init") == "pretrained" and not cfg.model.get("pretrained"):
        raise ValueError("reference.init=pretrained starts the reference from model.pretrained, which is not set")
    if downstream_config(cfg).tasks:
        harness()  # a clear error now if lm-evaluation-harness is missing, not at the first eval point
    tcfg = TrainConfig(**container(cfg.trainer), seed=cfg.seed)
    if sel.name in ("union", "intersection") and tcfg.grad_accum != 1:
        raise ValueError(f"selector={sel.name} keeps a data-dependent number of tokens: trainer.grad_accum must be 1 "
                         "(the step is normalised after its one forward)")  # fmt: skip
    return tcfg


def downstream_config(cfg: DictConfig) -> DownstreamConfig:
    return DownstreamConfig(**container(cfg.downstream)) if cfg.get("downstream") else DownstreamConfig()


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
    merged, changed = runs.resume_config(container(OmegaConf.load(saved)), container(cfg), overrides)
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
    selector = effective_selector(sel.name, sel.ratio, cfg.reference.kind)
    schedule = ratio_schedule(1.0 if selector == "all" else sel.ratio)
    ratio = schedule.start if schedule.is_constant else schedule.label()
    combine = tuple(sel.scores) if selector in ("union", "intersection") else None
    lm = SelectiveLM(model, ratio=schedule.start, selector="train_loss" if selector == "all" else selector,
                     combine=combine,
                     scope=sel.scope, seed=cfg.seed, head_backend=tcfg.head_backend,
                     check_scores="deferred")  # the loop checks them with its end-of-step reduce  # fmt: skip
    info = dict(name=cfg.name, experiment=cfg.experiment_name, selector=selector, ratio=ratio, scope=sel.scope,
                reference=cfg.reference.kind, seed=cfg.seed, scores_dir=ref.scores_dir, status="running",
                processes=acc.num_processes, mode=parallel.requested_mode())  # fmt: skip
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = runs.read_json(run_dir / runs.RUN_INFO) if tcfg.resume else None
        if old is not None:
            info = {**old, "status": "running", "resumes": [*old.get("resumes", []), {k: list(v) for k, v in
                    changed.items()}]}  # fmt: skip
        else:
            OmegaConf.save(cfg, run_dir / runs.CONFIG, resolve=True)
        runs.write_json(run_dir / runs.RUN_INFO, info)
    wandb_cfg = None if cfg.logger.kind == "none" else container(cfg.logger)
    tracker = Tracker(run_dir, enabled=acc.is_main_process, wandb_cfg=wandb_cfg, config=container(cfg),
                      resume_step=_resume_step(run_dir) if tcfg.resume else None)  # fmt: skip
    trainer = Trainer(acc, lm, train_ds, data.eval_sets, tcfg, run_dir, ref=ref, tracker=tracker, name=cfg.name,
                      ratio=schedule, downstream=downstream_config(cfg), tokenizer=data.tokenizer)  # fmt: skip
    try:
        result = trainer.fit()
    except RunInterrupted as e:
        _finish(acc, run_dir, info, {"status": "interrupted", "step": e.step, "checkpoint": str(e.checkpoint),
                                     "signal": e.signum})  # fmt: skip
        raise
    except Exception as e:
        _finish(acc, run_dir, info, {"status": "failed", "step": trainer.step, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        tracker.finish()
    trainer.engine.save_pretrained(run_dir / "model", data.tokenizer)
    _finish(acc, run_dir, info, {"status": "finished", **result})
    if acc.is_main_process:
        tracker.summary(result)
        _print_summary(run_dir, result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _finish(acc, run_dir: Path, info: dict, result: dict) -> None:
    if acc.is_main_process:
        runs.write_json(run_dir / runs.RESULT, result)
        runs.write_json(run_dir / runs.RUN_INFO, {**info, "status": result["status"]})


def _resume_step(run_dir: Path) -> int | None:
    ckpt = checkpoints.latest(run_dir, warn=False)
    return checkpoints.read_state(ckpt)["step"] if ckpt else None


def _print_summary(run_dir: Path, result: dict) -> None:
    numbers = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                        if k != "status")  # fmt: skip
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


def score(cfg: DictConfig) -> Path:
    """``slm-score``: store reference losses of the training split as a ``ref_loss`` column."""
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
        name, ref = cfg.reference.path, load_reference(cfg.reference.path, device=acc.device,
                                                       dtype=cfg.reference.get("dtype", "auto"))  # fmt: skip
    check_score_vocab(cfg, data, ref)
    out = stored_scores(cfg, data, ref, name, acc, out_dir=cfg.get("out_dir"), entropy=bool(cfg.get("entropy")))
    if acc.is_main_process:
        meta = runs.read_json(out / "slm_ref.json") or {}
        print(f"\nslm-score: stored ref_loss for {len(data['train'])} blocks in {out}"
              f"\n  throughput: {meta.get('tokens_per_s')} tokens/s over {meta.get('processes')} process(es)"
              f"\n  train with: slm-train reference=stored reference.scores_dir={out}", flush=True)  # fmt: skip
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="score")
def score_app(cfg: DictConfig) -> None:
    with one_line_errors():
        score(cfg)


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
        _fail(f"interrupted at step {e.step}; checkpoint {e.checkpoint}. Continue with trainer.resume=true "
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


def main_train() -> None:
    with one_line_errors():  # Ctrl-C before Hydra hands over (e.g. while composing) lands here
        train_app()


def main_score() -> None:
    with one_line_errors():
        score_app()


if __name__ == "__main__":
    main_train()
