"""Hydra entry points: ``slm-train`` and ``slm-score``, and the pieces they build from config."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from slm.curves import RUN_INFO
from slm.data import PackedData, build, check_block_size, default_cache_dir
from slm.model import SelectiveLM
from slm.reference import (
    META_FILE,
    check_vocab,
    freeze,
    load_reference,
    load_stored,
    reference_identity,
    score_dataset,
)
from slm.tracking import Tracker
from slm.train import RefSource, TrainConfig, Trainer

log = logging.getLogger("slm")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _run_stamp() -> str:
    """One timestamp per launch: every process of an ``accelerate launch``/``torchrun`` job
    derives it from their common parent's start time, so they share one run directory."""
    stamp = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(stamp))


if not OmegaConf.has_resolver("slm_stamp"):
    OmegaConf.register_new_resolver("slm_stamp", _run_stamp, use_cache=True)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def build_model(mcfg, vocab_size: int, seed: int):
    """An HF causal LM: ``pretrained`` (hub name or path), else built from ``config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, mcfg.get("dtype", "float32"))
    if mcfg.get("pretrained"):
        try:
            return AutoModelForCausalLM.from_pretrained(mcfg.pretrained, dtype=dtype)
        except OSError as e:
            raise ValueError(f"model.pretrained={mcfg.pretrained!r}: could not load it ({e})") from e
    kwargs = _container(mcfg.config)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _cpu_only() -> bool:
    # Accelerate only sets up multi-process CPU (gloo) runs, e.g. under torchrun, when told cpu=True.
    return not torch.cuda.is_available()


def _export_slurm_distributed_env() -> None:
    """Under a multi-task submitit/SLURM job, set RANK, WORLD_SIZE, MASTER_ADDR, ... for Accelerate."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        try:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export()
        except (ImportError, RuntimeError) as e:  # not inside a submitit job: leave the environment alone
            log.warning("SLURM_NTASKS>1 but the distributed environment could not be set from submitit: %s", e)


def make_accelerator(tcfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _export_slurm_distributed_env()
    acc = Accelerator(mixed_precision=tcfg.mixed_precision, step_scheduler_with_optimizer=False, cpu=_cpu_only())
    set_seed(tcfg.seed)
    return acc


def _cache_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.get("cache_dir") or default_cache_dir()).expanduser()


def _locked(path: Path):
    from filelock import FileLock  # a dependency of datasets and huggingface_hub

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def demo_reference(cfg: DictConfig, data: PackedData, acc) -> tuple[str, torch.nn.Module]:
    """The built-in demo's reference: trained on the clean split once, then cached and reused."""
    rcfg = cfg.reference
    seed = int(rcfg.get("seed", 0))  # not the run's seed: every seed of a sweep shares one reference
    settings = {"model": _container(cfg.model), "trainer": _container(rcfg.trainer),
                "clean": data.identity["data_hash"]["clean"], "seed": seed}  # fmt: skip
    where = _cache_root(cfg) / "reference" / _hash(settings)
    done = where / "model" / "config.json"
    with _locked(where) if acc.is_main_process else nullcontext():
        cached = [done.exists()]
        broadcast_object_list(cached)  # the main process's view decides for everyone
        if cached[0]:
            log.info("reference: reusing the cached demo reference %s (trained once, shared by every run "
                     "and sweep job with these settings)", where)  # fmt: skip
        else:
            log.info("reference: training the demo reference on the clean split (first run only) -> %s", where)
            tcfg = TrainConfig(**_container(rcfg.trainer), seed=seed)
            model = build_model(cfg.model, len(data.tokenizer), seed + 1)
            lm = SelectiveLM(model, ratio=1.0)
            t = Trainer(acc, lm, data["clean"], data["validation"], tcfg, where / "run",
                        tracker=Tracker(where / "run", enabled=acc.is_main_process), name="reference")  # fmt: skip
            res = t.fit()
            if acc.is_main_process:
                acc.unwrap_model(t.lm).save_pretrained(where / "model")
                (where / "result.json").write_text(json.dumps(res, indent=1))
            acc.wait_for_everyone()
            acc.free_memory(t.lm, t.opt, t.sched)  # forget them, or save_state would store them too
            del t, lm, model
    return str(where / "model"), load_reference(str(where / "model"), device=acc.device)


def stored_scores(cfg: DictConfig, data: PackedData, reference, ref_name: str, acc, out_dir=None) -> Path:
    """Score the training split once per (reference weights, data); reuse the store afterwards."""
    ident = reference_identity(reference, ref_name)
    meta = {"tokenizer": data.identity["tokenizer"], "block_size": data.identity["block_size"],
            "data_hash": data.identity["data_hash"]["train"], "reference": ident}  # fmt: skip
    out_dir = Path(out_dir) if out_dir else _cache_root(cfg) / "scores" / _hash(meta)
    with _locked(out_dir) if acc.is_main_process else nullcontext():  # concurrent sweep jobs score once
        done = [(out_dir / META_FILE).exists()]
        broadcast_object_list(done)
        if done[0]:
            log.info("reference: reusing stored reference losses %s (scored once for this reference and data)", out_dir)
        else:
            score_dataset(reference, data["train"], out_dir, meta, batch_size=cfg.get("score_batch_size", 32),
                          accelerator=acc)  # fmt: skip
    return out_dir


def reference_source(cfg: DictConfig, data: PackedData, acc, model) -> tuple:
    """(train dataset, RefSource) for ``cfg.reference.kind``: none | live | stored | demo."""
    kind = cfg.reference.kind
    if kind == "none":
        if cfg.selector.name in ("excess_loss", "reference_loss") and float(cfg.selector.ratio) < 1.0:
            if cfg.selector.name == "reference_loss":
                raise ValueError("selector=reference_loss needs a reference (reference=live, stored or demo)")
            log.info("reference=none: excess_loss falls back to the training loss (reference-free selection)")
        return data["train"], RefSource("none")
    if kind == "live":
        ref = load_reference(cfg.reference.path, device=acc.device, dtype=cfg.reference.get("dtype", "auto"))
        check_vocab(model, ref)
        return data["train"], RefSource("live", freeze(ref))
    expected = {"tokenizer": data.identity["tokenizer"], "block_size": data.identity["block_size"],
                "data_hash": data.identity["data_hash"]["train"]}  # fmt: skip
    if kind == "stored":
        ds, meta = load_stored(cfg.reference.scores_dir, expected)
        return ds, RefSource("stored", scores_dir=str(cfg.reference.scores_dir))
    if kind == "demo":
        if cfg.data.source != "builtin":
            raise ValueError("reference=demo trains on the built-in corpus's clean split; with other data use "
                             "reference=live or reference=stored")  # fmt: skip
        name, ref = demo_reference(cfg, data, acc)
        check_vocab(model, ref)
        store = stored_scores(cfg, data, ref, name, acc)
        ds, _ = load_stored(store, expected)
        return ds, RefSource("stored", scores_dir=str(store))
    raise ValueError(f"reference.kind must be none, live, stored or demo, got {kind!r}")


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


def run_dir_from_hydra() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One run of ``slm-train`` (usable without Hydra's decorator, e.g. from tests)."""
    tcfg = TrainConfig(**_container(cfg.trainer), seed=cfg.seed)
    acc = make_accelerator(tcfg)
    _setup_logging(acc)
    with acc.main_process_first():  # one process packs and caches; the others then load the cache
        data = build(cfg.data)
    model = build_model(cfg.model, len(data.tokenizer), cfg.seed)
    check_block_size(model.config, int(cfg.data.block_size))
    train_ds, ref = reference_source(cfg, data, acc, model)
    sel = cfg.selector
    ratio = 1.0 if sel.name == "all" else float(sel.ratio)
    lm = SelectiveLM(model, ratio=ratio, selector="train_loss" if sel.name == "all" else sel.name,
                     scope=sel.scope, seed=cfg.seed)  # fmt: skip
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        info = dict(name=cfg.name, experiment=cfg.experiment_name, selector=sel.name, ratio=ratio, scope=sel.scope,
                    reference=cfg.reference.kind, seed=cfg.seed, scores_dir=ref.scores_dir)  # fmt: skip
        (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1))
    wandb_cfg = None if cfg.logger.kind == "none" else _container(cfg.logger)
    tracker = Tracker(run_dir, enabled=acc.is_main_process, wandb_cfg=wandb_cfg,
                      config=_container(cfg), resume_step=_resume_step(run_dir) if tcfg.resume else None)  # fmt: skip
    trainer = Trainer(acc, lm, train_ds, data["validation"], tcfg, run_dir, ref=ref, tracker=tracker, name=cfg.name)
    try:
        result = trainer.fit()
    finally:
        tracker.finish()
    if acc.is_main_process:
        acc.unwrap_model(trainer.lm).save_pretrained(run_dir / "model")
        data.tokenizer.save_pretrained(run_dir / "model")
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        tracker.summary(result)
        _print_summary(run_dir, result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _resume_step(run_dir: Path) -> int | None:
    from slm.train import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return json.loads((ckpt / "slm_state.json").read_text())["step"] if ckpt else None


def _print_summary(run_dir: Path, result: dict) -> None:
    numbers = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    print(f"\nslm-train finished: {numbers}\n  run directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}"
          f"\n  model: {run_dir / 'model'}  (AutoModelForCausalLM.from_pretrained)\n"
          f"  plot: slm-curves {run_dir}", flush=True)  # fmt: skip


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    result = train(cfg, run_dir_from_hydra())
    return result.get("eval/loss")


def score(cfg: DictConfig) -> Path:
    """``slm-score``: store reference losses of the training split as a ``ref_loss`` column."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=_cpu_only())
    _setup_logging(acc)
    with acc.main_process_first():
        data = build(cfg.data)
    if cfg.reference.kind == "demo":
        name, ref = demo_reference(cfg, data, acc)
    elif cfg.reference.kind != "live":
        raise ValueError(f"slm-score needs reference=demo or reference=live, got reference.kind={cfg.reference.kind!r}")
    else:
        name, ref = cfg.reference.path, load_reference(cfg.reference.path, device=acc.device,
                                                       dtype=cfg.reference.get("dtype", "auto"))  # fmt: skip
    _check_score_vocab(cfg, data, ref)
    out = stored_scores(cfg, data, ref, name, acc, out_dir=cfg.get("out_dir"))
    if acc.is_main_process:
        meta = json.loads((out / "slm_ref.json").read_text())
        print(f"\nslm-score: stored ref_loss for {len(data['train'])} blocks in {out}"
              f"\n  throughput: {meta.get('tokens_per_s')} tokens/s over {meta.get('processes')} process(es)"
              f"\n  train with: slm-train reference=stored reference.scores_dir={out}", flush=True)  # fmt: skip
    return out


def _check_score_vocab(cfg: DictConfig, data: PackedData, ref) -> None:
    """Refuse, before scoring, a reference whose vocabulary is not the training model's."""
    from transformers import AutoConfig

    pretrained = cfg.model.get("pretrained")
    vocab = AutoConfig.from_pretrained(pretrained).vocab_size if pretrained else len(data.tokenizer)
    v_ref = ref.get_output_embeddings().weight.shape[0]
    if v_ref != vocab:
        raise ValueError(
            f"the reference's vocabulary ({v_ref} tokens) differs from the training model's ({vocab}, "
            f"model={cfg.model.name}); a reference must share the training model's tokenizer"
        )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="score")
def score_app(cfg: DictConfig) -> None:
    score(cfg)


def main_train() -> None:
    train_app()


def main_score() -> None:
    score_app()


if __name__ == "__main__":
    main_train()
