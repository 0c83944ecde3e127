"""The one typed boundary: the composed slm-train / slm-score config becomes the frozen settings a recipe
runs with (:class:`slm.recipes.RunSettings`, :class:`slm.recipes.ScoreSettings`) before anything slow runs.
Each group's dataclass checks its own fields (every error names the full key and the way on);
:func:`validate` adds the rules that span groups. Nothing below ``slm.cli`` reads a DictConfig.

Also the Hydra resolvers the configs use (``slm_stamp``, ``slm_run_name``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from omegaconf import DictConfig, OmegaConf

from slm.data import DataConfig
from slm.model import ModelConfig
from slm.recipes import BaseConfig, ReferenceConfig, RunSettings, ScoreSettings, typed
from slm.selection import AUTO, ratio_schedule
from slm.train import DownstreamConfig, SelectorConfig, TrainConfig, check_blocks, harness, selects_by

log = logging.getLogger(__name__)


def _run_stamp() -> str:
    """One timestamp per launch: every process of an ``accelerate launch``/``torchrun`` job
    derives it from their common parent's start time, so they share one run directory."""
    stamp = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(stamp))


def _run_name(selector: str, ratio, reference_kind: str, seed, blocks=1.0, scope="batch", sparse=False) -> str:
    """``<selector>-<ratio>[-blocks<b>][-<scope>][-sparse[N]]-<reference>-s<seed>``: the scope where it decides
    what is kept (not the default per-batch top-k, nor a run that trains every token), and a sparse backward."""
    try:
        label = ratio_schedule(ratio).label()
    except ValueError:
        label = str(ratio)
    effective = selects_by(selector, ratio, blocks, reference_kind)
    kept = f"-blocks{blocks}" if float(blocks) < 1.0 else ""
    where = f"-{scope}" if scope != "batch" and effective not in ("all", "blocks") else ""
    backward = "" if sparse is False or effective == "all" else "-sparse" + ("" if sparse is True else str(sparse))
    return f"{effective}-{label}{kept}{where}{backward}-{reference_kind}-s{seed}"


for _name, _fn in (("slm_stamp", _run_stamp), ("slm_run_name", _run_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=_name == "slm_stamp")


def container(node) -> dict:
    """A plain dict of a config node, interpolations resolved and missing values (``???``) as None."""
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return _missing_as_none(plain)


def _missing_as_none(value):
    if isinstance(value, dict):
        return {k: _missing_as_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_missing_as_none(v) for v in value]
    return None if value == "???" else value


def _data(plain: dict) -> DataConfig:
    if plain["data"].get("source") is None:
        raise ValueError(
            "data.source is required with this data option: a file, glob or folder (data=files) "
            "or a hub dataset name (data=hub)"
        )
    return DataConfig(**plain["data"])


def validate(cfg: DictConfig) -> RunSettings:
    """The composed slm-train config as :class:`RunSettings`, checked before anything slow runs; every
    error names the full key. The rules here span groups; each group checks its own fields."""
    plain = container(cfg)
    selector = typed(SelectorConfig, plain["selector"], "selector")
    data = _data(plain)
    reference = typed(ReferenceConfig, plain["reference"], "reference")
    kind = reference.kind
    if kind == "demo" and data.source != "builtin":
        raise ValueError(
            f"reference=demo trains its reference on the built-in corpus's clean split, but data.source="
            f"{data.source!r}. Choose one: reference=none (no reference: every token with selector=all, or "
            "selection by the training loss), reference=train reference.data.source=<clean text> (a reference "
            "trained once on it), reference=live reference.path=<model> (a pretrained reference), or "
            "reference=stored reference.scores_dir=<folder> (losses stored by slm-score)"
        )
    if kind == "none" and selector.selects and (selector.needs()["entropy"] or selector.name == "reference_loss"):
        raise ValueError(f"selector={selector.name} needs a reference (reference=live, stored, train or demo)")
    if kind == "none" and selector.blocks < 1.0 and selector.block_score != "train_loss":
        raise ValueError(
            f"selector.block_score={selector.block_score} ranks blocks with a reference, and reference=none has "
            "none: use selector.block_score=train_loss (or a reference)"
        )
    if selector.ratio == AUTO and kind == "none":
        raise ValueError(
            "selector.ratio=auto chooses the ratio from the reference's losses against the starting model's: it needs "
            "a reference (reference=train, demo, stored or live), or give selector.ratio a number"
        )
    if selector.ratio == AUTO and reference.evolve_every is not None:
        raise ValueError("selector.ratio=auto is chosen against a fixed reference: not with reference.evolve_every")
    model = typed(ModelConfig, plain["model"], "model")
    base = typed(BaseConfig, plain.get("base") or {}, "base")
    if base.trained and model.pretrained:
        raise ValueError(
            f"base=train pretrains a base model built from model.config; model.pretrained={model.pretrained} is one "
            "already: use base=none to continue from it"
        )
    if reference.init == "pretrained" and not (model.pretrained or base.trained):
        raise ValueError(
            "reference.init=pretrained starts the reference from the training model's starting weights: set "
            "model.pretrained, or base=train (a base pretrained on general text)"
        )
    downstream = typed(DownstreamConfig, plain.get("downstream"), "downstream")
    if downstream.tasks:
        harness()  # a clear error now if lm-evaluation-harness is missing, not at the first eval point
    trainer = typed(TrainConfig, plain["trainer"], "trainer", seed=plain["seed"])
    check_blocks(trainer.batch_size, selector.blocks)
    if (selector.combines or selector.scope == "dataset") and trainer.grad_accum != 1:
        what = f"selector={selector.name}" if selector.scope != "dataset" else "selector.scope=dataset"
        raise ValueError(
            f"{what} keeps a data-dependent number of tokens: trainer.grad_accum must be 1 (the step "
            "is normalised after its one forward)"
        )
    logger = None if plain["logger"]["kind"] == "none" else plain["logger"]
    return RunSettings(
        model=model,
        data=data,
        reference=reference,
        selector=selector,
        trainer=trainer,
        downstream=downstream,
        logger=logger,
        name=plain["name"],
        experiment_name=plain.get("experiment_name", "default"),
        seed=plain["seed"],
        score_batch_size=plain.get("score_batch_size", 32),
        base=base,
    )


def score_settings(cfg: DictConfig) -> ScoreSettings:
    """The composed slm-score config as :class:`ScoreSettings`."""
    plain = container(cfg)
    reference = typed(ReferenceConfig, plain["reference"], "reference")
    if reference.kind not in ("demo", "train", "live"):
        raise ValueError(f"slm-score needs reference=demo, train or live, got reference.kind={reference.kind!r}")
    if plain.get("store_dtype", "float32") not in ("float32", "bfloat16"):
        raise ValueError(f"store_dtype must be float32 or bfloat16, got {plain['store_dtype']!r}")
    if reference.budget is not None and reference.trained:  # a share of a run's tokens: slm-score has no run
        log.warning(
            "reference.budget=%s is a share of a training run's tokens, and slm-score has no run: the reference "
            "trains at most reference.trainer.max_steps=%d steps (slm-train with the same budget caps it otherwise)",
            reference.budget,
            reference.trainer.max_steps,
        )
        reference = replace(reference, budget=None)
    return ScoreSettings(
        model=typed(ModelConfig, plain["model"], "model"),
        data=_data(plain),
        reference=reference,
        seed=plain.get("seed", 0),
        score_batch_size=plain.get("score_batch_size", 32),
        entropy=bool(plain.get("entropy")),
        store_dtype=plain.get("store_dtype", "float32"),
        out_dir=plain.get("out_dir"),
    )
