"""The one typed boundary: the composed slm-train / slm-score config becomes frozen settings objects
(:class:`RunSettings`, :class:`ScoreSettings`) before anything slow runs. Each group's dataclass checks
its own fields (every error names the full key and the way on); :func:`validate` adds the rules that
span groups. Nothing below ``slm.cli`` reads a DictConfig.

Also what the settings imply (what a run really selects by, its name, the block size), and the Hydra
resolvers the configs use (``slm_stamp``, ``slm_run_name``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slm.data import DataConfig
from slm.reference import check_evolution
from slm.selection import ratio_schedule
from slm.train import DownstreamConfig, SelectorConfig, TrainConfig, check_blocks, harness

log = logging.getLogger(__name__)


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
    if selector == "oracle":  # the corpus's own clean tokens, whatever the ratio
        return selector
    if selector == "all" or (schedule.is_constant and schedule.start >= 1.0):
        return "blocks" if float(blocks) < 1.0 else "all"
    if selector == "excess_loss" and reference_kind == "none":
        return "train_loss"
    return selector


def _run_name(selector: str, ratio, reference_kind: str, seed, blocks=1.0, scope="batch") -> str:
    """``<selector>-<ratio>[-blocks<b>][-<scope>]-<reference>-s<seed>``: the scope where it decides what is
    kept (not the default per-batch top-k, nor a run that trains every token)."""
    try:
        label = ratio_schedule(ratio).label()
    except ValueError:
        label = str(ratio)
    effective = effective_selector(selector, ratio, reference_kind, blocks)
    kept = f"-blocks{blocks}" if float(blocks) < 1.0 else ""
    where = f"-{scope}" if scope != "batch" and effective not in ("all", "blocks") else ""
    return f"{effective}-{label}{kept}{where}-{reference_kind}-s{seed}"


for _name, _fn in (("slm_stamp", _run_stamp), ("slm_run_name", _run_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=_name == "slm_stamp")


REFERENCE_KINDS = ("none", "live", "stored", "train", "demo")
MAX_DEFAULT_BLOCK = 2048


@dataclass(frozen=True)
class ReferenceConfig:
    """``reference.*``: where a run's reference values come from."""

    kind: str = "none"  # none | live | stored | train | demo
    path: str | None = None  # live: a model folder or hub name; stored: the reference the store must come from
    scores_dir: str | None = None  # stored: the folder slm-score printed
    dtype: str = "auto"  # live: auto = bfloat16 on CUDA, float32 on CPU
    check_tokenizer: bool = True  # live: refuse a reference whose tokenizer is not the training one
    data: dict = field(default_factory=dict)  # train/demo: its training text (SourceSpec fields)
    init: str = "scratch"  # train/demo: scratch | pretrained (from model.pretrained)
    trainer: dict = field(default_factory=dict)  # train/demo: its TrainConfig fields (max_steps: the cap)
    converge: dict = field(default_factory=dict)  # train/demo: holdout, patience, min_delta (early stop)
    seed: int = 0  # train/demo: its own seed, shared by every seed of a sweep
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
        if kind == "train" and not (self.data or {}).get("source"):
            raise ValueError(
                "reference=train needs reference.data.source=<the reference's training text: a file, glob, "
                "folder, hub dataset or builtin>"
            )
        if self.init not in ("scratch", "pretrained"):
            raise ValueError(f"reference.init must be scratch or pretrained, got {self.init!r}")
        if self.evolve_every is not None:
            if kind not in ("train", "demo", "live"):
                raise ValueError(
                    f"reference.evolve_every refreshes a reference model from the training model; "
                    f"reference={kind} has none (use reference=train, demo or live)"
                )
            check_evolution(self.evolve_every, self.evolve_ema)
        if self.trained:
            _typed(TrainConfig, self.trainer, "reference.trainer", seed=self.seed)
            object.__setattr__(self, "converge", check_converge(self.converge))

    @property
    def trained(self) -> bool:
        """A reference trained once by slm itself (reference=train, or the built-in demo)."""
        return self.kind in ("train", "demo")


CONVERGE_KEYS = {"holdout": 0.0, "patience": 3, "min_delta": 0.0}


def check_converge(converge: dict | None) -> dict:
    """``reference.converge``: ``holdout`` (the share of the reference's text held out to judge it; 0: train
    ``reference.trainer.max_steps`` steps, no early stop), ``patience`` (evals without improvement before it
    stops), ``min_delta`` (the least fall in held-out loss that counts as one)."""
    converge = dict(converge or {})
    unknown = sorted(set(converge) - set(CONVERGE_KEYS))
    if unknown:
        raise ValueError(f"reference.converge has no {', '.join(unknown)}: it takes {', '.join(CONVERGE_KEYS)}")
    out = {**CONVERGE_KEYS, **{k: v for k, v in converge.items() if v is not None}}
    if not 0.0 <= float(out["holdout"]) < 0.5:
        raise ValueError(f"reference.converge.holdout must be in [0, 0.5), got {out['holdout']}")
    if int(out["patience"]) < 1:
        raise ValueError(f"reference.converge.patience must be >= 1, got {out['patience']}")
    if not float(out["min_delta"]) >= 0:
        raise ValueError(f"reference.converge.min_delta must be >= 0, got {out['min_delta']}")
    return {"holdout": float(out["holdout"]), "patience": int(out["patience"]), "min_delta": float(out["min_delta"])}


@dataclass(frozen=True)
class ScoreSettings:
    """What ``slm-score`` runs with (``score.yaml``)."""

    model: dict  # the model.* settings, plain (slm.model.build_model reads them)
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

    model: dict
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

    @property
    def cache_root(self) -> Path:
        return Path(self.data.cache_dir).expanduser()


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


def _typed(cls, values: dict | None, group: str, **extra):
    """``cls(**values)`` with an unknown key named by its full setting."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ValueError(f"{group}.{unknown[0]} is not a setting of {group}; it has {sorted(known - set(extra))}")
    return cls(**(values or {}), **extra)


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
    selector = _typed(SelectorConfig, plain["selector"], "selector")
    data = _data(plain)
    reference = _typed(ReferenceConfig, plain["reference"], "reference")
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
    if reference.init == "pretrained" and not plain["model"].get("pretrained"):
        raise ValueError("reference.init=pretrained starts the reference from model.pretrained, which is not set")
    downstream = _typed(DownstreamConfig, plain.get("downstream"), "downstream")
    if downstream.tasks:
        harness()  # a clear error now if lm-evaluation-harness is missing, not at the first eval point
    trainer = _typed(TrainConfig, plain["trainer"], "trainer", seed=plain["seed"])
    check_blocks(trainer.batch_size, selector.blocks)
    if (selector.combines or selector.scope == "dataset") and trainer.grad_accum != 1:
        what = f"selector={selector.name}" if selector.scope != "dataset" else "selector.scope=dataset"
        raise ValueError(
            f"{what} keeps a data-dependent number of tokens: trainer.grad_accum must be 1 (the step "
            "is normalised after its one forward)"
        )
    logger = None if plain["logger"]["kind"] == "none" else plain["logger"]
    return RunSettings(
        model=plain["model"],
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
    )


def score_settings(cfg: DictConfig) -> ScoreSettings:
    """The composed slm-score config as :class:`ScoreSettings`."""
    plain = container(cfg)
    reference = _typed(ReferenceConfig, plain["reference"], "reference")
    if reference.kind not in ("demo", "train", "live"):
        raise ValueError(f"slm-score needs reference=demo, train or live, got reference.kind={reference.kind!r}")
    if plain.get("store_dtype", "float32") not in ("float32", "bfloat16"):
        raise ValueError(f"store_dtype must be float32 or bfloat16, got {plain['store_dtype']!r}")
    return ScoreSettings(
        model=plain["model"],
        data=_data(plain),
        reference=reference,
        seed=plain.get("seed", 0),
        score_batch_size=plain.get("score_batch_size", 32),
        entropy=bool(plain.get("entropy")),
        store_dtype=plain.get("store_dtype", "float32"),
        out_dir=plain.get("out_dir"),
    )


def resolve_block_size(cfg: DictConfig, settings):
    """``data.block_size: null`` becomes the model's context length (at most 2048), in the settings and in
    ``cfg`` (the config a run saves records what it trained with)."""
    if settings.data.block_size is not None:
        return settings
    model = settings.model
    if model.get("pretrained"):
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(model["pretrained"])
        limit = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
    else:
        limit = model["config"].get("max_position_embeddings") or model["config"].get("n_positions")
    size = min(int(limit or MAX_DEFAULT_BLOCK), MAX_DEFAULT_BLOCK)
    cfg.data.block_size = size
    log.info("data.block_size=null: using %d (the model's context length, at most %d)", size, MAX_DEFAULT_BLOCK)
    return replace(settings, data=replace(settings.data, block_size=size))


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
