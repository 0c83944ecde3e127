"""The composed slm-train / slm-score config: checked before anything slow runs (every error names
the full key and the way on), and what it implies (what a run really selects by, its name, the
reference values it needs, the block size).

Registers the Hydra resolvers the configs use (``slm_stamp``, ``slm_run_name``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slm.data import DataConfig, default_cache_dir
from slm.model import SCORES
from slm.reference import check_evolution
from slm.selection import BLOCK_SCORES, SCOPES, check_ratio, ratio_schedule
from slm.train import DownstreamConfig, TrainConfig, harness

log = logging.getLogger(__name__)

SELECTOR_NAMES = (
    "excess_loss",
    "train_loss",
    "reference_loss",
    "reference_entropy",
    "random",
    "all",
    "union",
    "intersection",
)


def _run_stamp() -> str:
    """One timestamp per launch: every process of an ``accelerate launch``/``torchrun`` job
    derives it from their common parent's start time, so they share one run directory."""
    stamp = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(stamp))


def effective_selector(selector: str, ratio, reference_kind: str, blocks=1.0) -> str:
    """What a run actually selects by: every token at a constant ratio 1.0 (``blocks``: whole blocks
    when only blocks are selected); the training loss when excess loss has no reference. Run names,
    run_info.json and curve legends use this."""
    try:
        schedule = ratio_schedule(ratio)
    except ValueError:
        return selector  # an invalid ratio: validate() names it
    if selector == "all" or (schedule.is_constant and schedule.start >= 1.0):
        return "blocks" if float(blocks) < 1.0 else "all"
    if selector == "excess_loss" and reference_kind == "none":
        return "train_loss"
    return selector


def _run_name(selector: str, ratio, reference_kind: str, seed, blocks=1.0) -> str:
    try:
        label = ratio_schedule(ratio).label()
    except ValueError:
        label = str(ratio)
    kept = f"-blocks{blocks}" if float(blocks) < 1.0 else ""
    return f"{effective_selector(selector, ratio, reference_kind, blocks)}-{label}{kept}-{reference_kind}-s{seed}"


def needed_reference(cfg: DictConfig) -> dict:
    """Which reference values the selector needs: ``{"loss": bool, "entropy": bool}``."""
    sel = cfg.selector
    names = list(sel.get("scores") or []) if sel.name in ("union", "intersection") else [sel.name]
    if float(sel.get("blocks", 1.0)) < 1.0:
        names.append(sel.get("block_score", "excess_loss"))
    return {"loss": any(n in ("excess_loss", "reference_loss") for n in names), "entropy": "reference_entropy" in names}


for _name, _fn in (("slm_stamp", _run_stamp), ("slm_run_name", _run_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=_name == "slm_stamp")


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
    log.info(
        "data.block_size=null: using %d (the model's context length, at most %d)",
        cfg.data.block_size,
        MAX_DEFAULT_BLOCK,
    )


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
    if sel.scope == "dataset" and sel.name in ("union", "intersection"):
        raise ValueError(
            f"selector={sel.name} combines two exact top-k sets: selector.scope must be sequence, batch or global"
        )
    check_ratio(sel.get("blocks", 1.0), "selector.blocks")
    if sel.get("block_score", "excess_loss") not in BLOCK_SCORES:
        raise ValueError(f"selector.block_score must be one of {BLOCK_SCORES}, got {sel.get('block_score')!r}")
    if _missing(cfg.data, "source"):
        raise ValueError(
            "data.source is required with this data option: a file, glob or folder (data=files) "
            "or a hub dataset name (data=hub)"
        )
    DataConfig(**{**container(cfg.data), "block_size": cfg.data.get("block_size") or 2})  # null: resolved later
    kind = cfg.reference.kind
    if kind == "stored" and _missing(cfg.reference, "scores_dir"):
        raise ValueError(
            "reference=stored needs reference.scores_dir=<folder>: run slm-score first (with the same "
            "model and data options); it prints the folder and the slm-train command to use"
        )
    if kind == "live" and _missing(cfg.reference, "path"):
        raise ValueError(
            "reference=live needs reference.path=<a model folder or hub name> sharing the training model's tokenizer"
        )
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
        raise ValueError(
            "reference=train needs reference.data.source=<the reference's training text: a file, glob, "
            "folder, hub dataset or builtin>"
        )
    if cfg.reference.get("evolve_every") is not None:
        if kind not in ("train", "demo", "live"):
            raise ValueError(
                f"reference.evolve_every refreshes a reference model from the training model; "
                f"reference={kind} has none (use reference=train, demo or live)"
            )
        check_evolution(cfg.reference.evolve_every, cfg.reference.get("evolve_ema", 0.0))
    if cfg.reference.get("init") == "pretrained" and not cfg.model.get("pretrained"):
        raise ValueError("reference.init=pretrained starts the reference from model.pretrained, which is not set")
    if downstream_config(cfg).tasks:
        harness()  # a clear error now if lm-evaluation-harness is missing, not at the first eval point
    tcfg = TrainConfig(**container(cfg.trainer), seed=cfg.seed)
    if (sel.name in ("union", "intersection") or sel.scope == "dataset") and tcfg.grad_accum != 1:
        what = f"selector={sel.name}" if sel.scope != "dataset" else "selector.scope=dataset"
        raise ValueError(
            f"{what} keeps a data-dependent number of tokens: trainer.grad_accum must be 1 (the step "
            "is normalised after its one forward)"
        )
    return tcfg


def downstream_config(cfg: DictConfig) -> DownstreamConfig:
    return DownstreamConfig(**container(cfg.downstream)) if cfg.get("downstream") else DownstreamConfig()


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def cache_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.get("cache_dir") or default_cache_dir()).expanduser()
