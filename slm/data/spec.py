"""What data a run reads: :class:`DataConfig` for the training source, :class:`SourceSpec` for one more
source read as a single split (an eval set, a reference's text), and :class:`PackedData`, what packing returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from slm.data.sources import BUILTIN, GENERATED, content_digest, data_files, generated_config, is_local


def default_cache_dir() -> str:
    return os.environ.get("SLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "slm"))


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # builtin | realtext | a file, glob or folder | an HF hub dataset name
    tokenizer: str = BUILTIN  # builtin | an HF tokenizer name or local path
    block_size: int | None = 128
    text_field: str = "text"
    sample_by: str = "paragraph"  # text files: one document per line | paragraph | document (file)
    hub_config: str | None = None
    hub_revision: str | None = None  # a hub dataset's commit or tag: pins what is packed (the cache knows no other)
    train_split: str = "train"
    validation_split: str | None = "validation"  # hub split; None or missing: carve val_fraction
    val_fraction: float = 0.05
    seed: int = 0
    cache_dir: str | None = None
    num_proc: int | None = None
    builtin: dict = field(default_factory=dict)  # CorpusConfig fields
    realtext: dict = field(default_factory=dict)  # RealTextConfig fields
    eval: dict = field(default_factory=dict)  # name -> SourceSpec fields: extra eval sets (e.g. clean text)
    tokenizer_text: tuple = ()  # tokenizer=bpe:<n>: more texts it trains on (slm-train adds reference.data)

    def __post_init__(self):
        if self.block_size is not None and int(self.block_size) < 2:  # None: the model's length, set by slm.cli
            raise ValueError(f"data.block_size must be >= 2 (one input and one target), got {self.block_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"data.sample_by must be line, paragraph or document, got {self.sample_by!r}")
        set_ = object.__setattr__  # frozen: the normalised values, set once here
        set_(self, "builtin", dict(self.builtin))
        set_(self, "realtext", dict(self.realtext or {}))
        set_(self, "cache_dir", self.cache_dir or default_cache_dir())
        set_(self, "eval", {str(k): eval_spec(k, v) for k, v in dict(self.eval or {}).items()})
        texts = self.tokenizer_text or ()
        set_(self, "tokenizer_text", tuple(eval_spec(f"[{i}]", v, "data.tokenizer_text") for i, v in enumerate(texts)))
        if "validation" in self.eval:
            raise ValueError("data.eval.validation: that name is the training source's own validation split")


def eval_spec(name, value, group: str = "data.eval.") -> SourceSpec:
    """A :class:`SourceSpec` from ``data.eval.<name>``: a path or hub name, or a mapping of its fields."""
    if isinstance(value, SourceSpec):
        return value
    if isinstance(value, str):
        return SourceSpec(source=value)
    try:
        fields = dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"{group}{name} must be a source or a mapping with a source, got {value!r}") from None
    if "source" not in fields:
        raise ValueError(f"{group}{name} needs a source (a file, glob, folder, hub name, builtin or realtext)")
    known = set(SourceSpec.__dataclass_fields__)
    if set(fields) - known:
        raise ValueError(f"{group}{name} has unknown keys {sorted(set(fields) - known)}; use {sorted(known)}")
    return SourceSpec(**fields)


@dataclass(frozen=True)
class SourceSpec:
    """One source read as a single split: an eval set (``data.eval.<name>``) or a reference's text."""

    source: str
    text_field: str = "text"
    split: str | None = None  # hub / built-in split; files: every document
    sample_by: str = "paragraph"
    hub_config: str | None = None
    builtin: dict = field(default_factory=dict)
    realtext: dict = field(default_factory=dict)

    def identity(self, cache_dir: str | None = None) -> dict:
        src = source_identity(
            DataConfig(
                source=self.source,
                text_field=self.text_field,
                sample_by=self.sample_by,
                hub_config=self.hub_config,
                cache_dir=cache_dir,
                builtin=self.builtin,
                realtext=self.realtext,
            )
        )
        return {"source": src, "split": self.split, "text_field": self.text_field, "sample_by": self.sample_by}


@dataclass
class PackedData:
    splits: dict  # name -> datasets.Dataset with input_ids, labels, attention_mask[, answer_mask]
    tokenizer: object
    identity: dict  # what a stored reference column must agree with
    eval_sets: dict = field(default_factory=dict)  # name -> packed eval set (data.eval, then validation)
    labels: dict = field(default_factory=dict)  # label column -> a name per label (slm.data.sources.label_names)

    def __getitem__(self, split: str):
        return self.splits[split]


def data_config(cfg) -> DataConfig:
    """A :class:`DataConfig` from a mapping of its fields (``slm.cli`` passes a plain dict) or a DataConfig."""
    return cfg if isinstance(cfg, DataConfig) else DataConfig(**dict(cfg))


def source_identity(cfg: DataConfig) -> dict:
    if cfg.source in GENERATED:
        split = {"train_split": cfg.train_split} if cfg.train_split != "train" else {}
        return {cfg.source: generated_config(cfg).identity(), **split}
    if is_local(cfg.source):
        files = [(f, content_digest(f, cfg.cache_dir)) for f in data_files(cfg.source)]
        return {"files": files, "text_field": cfg.text_field, "sample_by": cfg.sample_by}
    return {
        "hub": cfg.source,
        "config": cfg.hub_config,
        "revision": cfg.hub_revision,
        "text_field": cfg.text_field,
        "splits": [cfg.train_split, cfg.validation_split],
    }
