"""The typed settings a recipe runs with: :class:`RunSettings` (a training run) and :class:`ScoreSettings` (a
store of reference losses), with :class:`ReferenceConfig` (``reference.*``). Plain frozen dataclasses: Hydra
composes and validates them in :mod:`slm.cli`, Python builds them directly."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from slm.data import GENERATED, DataConfig, SourceSpec
from slm.data.subword import bpe_size
from slm.model import ModelConfig
from slm.reference import check_evolution
from slm.train import DownstreamConfig, SelectorConfig, TrainConfig

log = logging.getLogger(__name__)


REFERENCE_KINDS = ("none", "live", "stored", "train", "demo")
MAX_DEFAULT_BLOCK = 2048


@dataclass(frozen=True)
class ConvergeConfig:
    """``reference.converge``: ``holdout`` (the share of the reference's text held out to judge it; 0: train
    ``reference.trainer.max_steps`` steps, no early stop), ``patience`` (evals without improvement before it
    stops), ``min_delta`` (the least fall in held-out loss that counts as one)."""

    holdout: float = 0.0
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self):
        if not 0.0 <= float(self.holdout) < 0.5:
            raise ValueError(f"reference.converge.holdout must be in [0, 0.5), got {self.holdout}")
        if int(self.patience) < 1:
            raise ValueError(f"reference.converge.patience must be >= 1, got {self.patience}")
        if not float(self.min_delta) >= 0:
            raise ValueError(f"reference.converge.min_delta must be >= 0, got {self.min_delta}")
        for name, kind in (("holdout", float), ("patience", int), ("min_delta", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @classmethod
    def of(cls, given: dict | None) -> ConvergeConfig:
        """From the ``reference.converge`` mapping (null values keep the defaults; unknown keys named)."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"reference.converge has no {', '.join(unknown)}: it takes {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class ReferenceConfig:
    """``reference.*``: where a run's reference values come from."""

    kind: str = "none"  # none | live | stored | train | demo
    path: str | None = None  # live: a model folder or hub name; stored: the reference the store must come from
    scores_dir: str | None = None  # stored: the folder slm-score printed
    dtype: str = "auto"  # live: auto = bfloat16 on CUDA, float32 on CPU
    check_tokenizer: bool = True  # live: refuse a reference whose tokenizer is not the training one
    data: SourceSpec | None = None  # train/demo: its training text (given as SourceSpec fields)
    init: str = "scratch"  # train/demo: scratch | pretrained (from model.pretrained)
    trainer: TrainConfig = field(default_factory=TrainConfig)  # train/demo: how it trains (max_steps: the cap)
    converge: ConvergeConfig = field(default_factory=ConvergeConfig)  # train/demo: its early stop
    seed: int = 0  # train/demo: its own seed, shared by every seed of a sweep
    budget: float | None = None  # train/demo: its cap as a share of the run's training tokens (None: trainer.max_steps)
    evolve_every: int | None = None  # refresh from the training model every N steps (scored live)
    evolve_ema: float = 0.0

    def __post_init__(self):
        kind = self.kind
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"reference.kind must be one of {REFERENCE_KINDS}, got {kind!r}")
        if kind == "stored" and not self.scores_dir:
            raise ValueError(
                "reference=stored needs reference.scores_dir=<folder>: run slm-score first (with the same "
                "model and data options); it prints the folder and the slm-train command to use"
            )
        if kind == "live" and not self.path:
            raise ValueError(
                "reference=live needs reference.path=<a model folder or hub name> sharing the training model's "
                "tokenizer"
            )
        data = self.data if isinstance(self.data, SourceSpec) or self.data is None else dict(self.data)
        if kind == "train" and not (data.source if isinstance(data, SourceSpec) else (data or {}).get("source")):
            raise ValueError(
                "reference=train needs reference.data.source=<the reference's training text: a file, glob, "
                "folder, hub dataset or builtin>"
            )
        if self.init not in ("scratch", "pretrained"):
            raise ValueError(f"reference.init must be scratch or pretrained, got {self.init!r}")
        if self.budget is not None:
            if not float(self.budget) > 0:
                raise ValueError(
                    f"reference.budget is a share of the run's training tokens (> 0), or null, got {self.budget}"
                )
            object.__setattr__(self, "budget", float(self.budget))
        if self.evolve_every is not None:
            if kind not in ("train", "demo", "live"):
                raise ValueError(
                    f"reference.evolve_every refreshes a reference model from the training model; "
                    f"reference={kind} has none (use reference=train, demo or live)"
                )
            check_evolution(self.evolve_every, self.evolve_ema)
        if isinstance(data, dict):  # unset fields (null) keep SourceSpec's defaults
            given = {k: v for k, v in data.items() if v is not None or k == "split"}
            data = typed(SourceSpec, given, "reference.data") if data else None
        typed_stage(self, "reference", data)

    @property
    def trained(self) -> bool:
        """A reference trained once by slm itself (reference=train, or the built-in demo)."""
        return self.kind in ("train", "demo")


def typed_stage(cfg, group: str, data: SourceSpec | None) -> None:
    """Set the typed fields of a model slm trains once and caches (``reference.*``, ``base.*``), from the mappings
    Hydra gives: its text ``data``, its ``trainer`` (with its own seed) and its early stop ``converge``."""
    object.__setattr__(cfg, "data", data)
    if not isinstance(cfg.trainer, TrainConfig):
        object.__setattr__(cfg, "trainer", typed(TrainConfig, cfg.trainer, f"{group}.trainer", seed=cfg.seed))
    if not isinstance(cfg.converge, ConvergeConfig):
        object.__setattr__(cfg, "converge", ConvergeConfig.of(cfg.converge))


BASE_KINDS = ("none", "train")


@dataclass(frozen=True)
class BaseConfig:
    """``base.*``: a base model pretrained once on general text (``base=train``), cached and shared by every run
    and sweep job that names it; the training model starts from it (continued pretraining), and so does a
    reference with ``reference.init=pretrained``. The base has ``model.config``'s architecture and the run's
    tokenizer; it trains until its loss on held-out text stops improving (``converge``), at most
    ``trainer.max_steps`` steps."""

    kind: str = "none"  # none | train
    data: SourceSpec | None = None  # its general text (SourceSpec fields)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    converge: ConvergeConfig = field(default_factory=ConvergeConfig)
    seed: int = 0  # its own seed, shared by every seed of a sweep

    init = "scratch"  # what a cached stage starts from (slm.recipes.cached_training)

    def __post_init__(self):
        if self.kind not in BASE_KINDS:
            raise ValueError(f"base.kind must be one of {BASE_KINDS}, got {self.kind!r}")
        data = self.data
        if isinstance(data, dict) or hasattr(data, "items"):
            given = {k: v for k, v in dict(data).items() if v is not None or k == "split"}
            data = typed(SourceSpec, given, "base.data") if given.get("source") else None
        if self.kind == "train" and (data is None or not data.source):
            raise ValueError(
                "base=train needs base.data.source=<its general text: a file, glob, folder, hub dataset, or realtext "
                "with base.data.realtext.prose=docstrings>"
            )
        typed_stage(self, "base", data)

    @property
    def trained(self) -> bool:
        return self.kind == "train"


@dataclass(frozen=True)
class ScoreSettings:
    """What ``slm-score`` runs with (``score.yaml``)."""

    model: ModelConfig
    data: DataConfig
    reference: ReferenceConfig
    seed: int = 0
    score_batch_size: int = 32
    entropy: bool = False
    store_dtype: str = "float32"
    out_dir: str | None = None

    @property
    def cache_root(self) -> Path:
        return Path(self.data.cache_dir).expanduser()


@dataclass(frozen=True)
class RunSettings:
    """What ``slm-train`` runs with (``train.yaml``)."""

    model: ModelConfig
    data: DataConfig
    reference: ReferenceConfig
    selector: SelectorConfig
    trainer: TrainConfig
    downstream: DownstreamConfig
    logger: dict | None  # None: logger=none (metrics.jsonl only)
    name: str
    experiment_name: str = "default"
    seed: int = 0
    score_batch_size: int = 32
    base: BaseConfig = field(default_factory=BaseConfig)  # base=train: the model continues from a cached base

    @property
    def cache_root(self) -> Path:
        return Path(self.data.cache_dir).expanduser()


def typed(cls, values: dict | None, group: str, **extra):
    """``cls(**values)`` with an unknown key named by its full setting."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ValueError(f"{group}.{unknown[0]} is not a setting of {group}; it has {sorted(known - set(extra))}")
    return cls(**(values or {}), **extra)


def resolve_block_size(settings: RunSettings | ScoreSettings):
    """``data.block_size: null`` becomes the model's context length (at most 2048): the settings a run trains
    with, block size known (the config a run saves records it)."""
    if settings.data.block_size is not None:
        return settings
    model = settings.model
    if model.pretrained:
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(model.pretrained)
        limit = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
    else:
        limit = model.config.get("max_position_embeddings") or model.config.get("n_positions")
    size = min(int(limit or MAX_DEFAULT_BLOCK), MAX_DEFAULT_BLOCK)
    log.info("data.block_size=null: using %d (the model's context length, at most %d)", size, MAX_DEFAULT_BLOCK)
    return replace(settings, data=replace(settings.data, block_size=size))


def resolve_tokenizer_text(settings: RunSettings) -> RunSettings:
    """``data.tokenizer=bpe:<n>`` trains on the training text, the reference's clean text and a base model's
    general text: a trained reference's or base's text from another source joins ``data.tokenizer_text`` (a
    built-in corpus's own clean split is in already)."""
    data, ref = settings.data, settings.reference
    if bpe_size(data.tokenizer) is not None and settings.model.pretrained:
        raise ValueError(
            f"data.tokenizer={data.tokenizer}: a tokenizer trained on this text is for models built from config; "
            f"model.pretrained={settings.model.pretrained} has its own vocabulary (use its tokenizer)"
        )
    if bpe_size(data.tokenizer) is None:
        return settings
    base = getattr(settings, "base", None)
    texts = [ref.data] if ref.trained and ref.data is not None else []
    texts += [base.data] if base is not None and base.trained else []
    more = tuple(spec for spec in texts if not own_split(spec, data) and spec not in data.tokenizer_text)
    return replace(settings, data=replace(data, tokenizer_text=(*data.tokenizer_text, *more))) if more else settings


def own_split(spec: SourceSpec, data: DataConfig) -> bool:
    """Whether ``spec`` names a split of the run's own generated corpus (same source, and no settings of its own
    or the run's): the run's packed data holds it already."""
    if spec.source not in GENERATED or spec.source != data.source:
        return False
    given, run = (spec.builtin, data.builtin) if spec.source == "builtin" else (spec.realtext, data.realtext)
    return not given or given == run


def resolve_reference_budget(settings: RunSettings) -> RunSettings:
    """``reference.budget``: a trained reference's cap (``reference.trainer.max_steps``) set to that share of the
    run's training tokens, so that its cost follows the run it serves (a sweep's arms share one budget and one
    reference); its held-out early stop (``reference.converge``) still applies within it."""
    ref, run = settings.reference, settings.trainer
    if ref.budget is None or not ref.trained:
        return settings
    per_step = ref.trainer.batch_size * ref.trainer.grad_accum  # blocks; the block size and process count cancel
    steps = max(1, math.ceil(ref.budget * run.max_steps * run.batch_size * run.grad_accum / per_step))
    log.info(
        "reference.budget=%s: the reference trains at most %d steps (%s of the run's %d steps x %d blocks)",
        ref.budget,
        steps,
        ref.budget,
        run.max_steps,
        run.batch_size * run.grad_accum,
    )
    return replace(settings, reference=replace(ref, trainer=replace(ref.trainer, max_steps=steps)))


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
